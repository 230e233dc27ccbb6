//! The outbox relay as a library: stream a transactional outbox out of a PostgreSQL `pgoutput`
//! slot into ClickHouse, in batches, confirming the slot only after ClickHouse accepted a batch.
//!
//! The pieces, in the order an event passes them:
//! - [`pipeline::Relay`]: the loop (replication stream, batching, flush, confirm), over a
//!   [`pipeline::Source`], a [`sink::Sink`] and a [`pipeline::Store`];
//! - [`pgoutput`] (its own crate): decodes each WAL message, pure;
//! - [`outbox::OutboxLayout`]: outbox tuple -> [`event::EventRow`], the row model;
//! - [`sink::ClickHouseSink`]: one RowBinary insert per batch; [`sink::resend`]: the one
//!   re-send of refused rows;
//! - [`store`]: the relay's tables in PostgreSQL (schema, dead letters);
//! - [`ops`]: setup, status, purge, replay, verify;
//! - [`config`], [`pg`] and [`pgtls`] (PostgreSQL connections), [`tls`] (what both servers'
//!   TLS shares), [`http`] and [`metrics`]: around it.

pub mod config;
pub mod event;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod pg;
pub mod pgtls;
pub mod pipeline;
pub mod reship;
pub mod sink;
pub mod store;
pub mod tls;

pub use config::Config;
pub use pipeline::{Relay, RelayError};

/// An error and its causes, `a: b: c`, leaving out a cause whose text is already there (the
/// relay's errors name their causes themselves): what a person reads of an error, in logs,
/// `status` and at the command line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let line = cause.to_string();
        if !text.contains(&line) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&line);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("db error")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot connect to PostgreSQL at h/db: {0}")]
        Names(#[source] Inner),
        #[error("cannot connect")]
        Hides(#[source] Inner),
    }

    #[test]
    fn error_chain_shows_each_cause_once() {
        assert_eq!(
            super::error_chain(&Outer::Names(Inner)),
            "cannot connect to PostgreSQL at h/db: db error"
        );
        assert_eq!(
            super::error_chain(&Outer::Hides(Inner)),
            "cannot connect: db error"
        );
    }
}
