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
//! - [`config`], [`pg`] and [`pgtls`] (PostgreSQL connections), [`http`] and [`metrics`]: around
//!   it.

pub mod config;
pub mod event;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod pg;
pub mod pgtls;
pub mod pipeline;
pub mod sink;
pub mod store;

pub use config::Config;
pub use pipeline::{Relay, RelayError};
