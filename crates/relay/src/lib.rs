//! The outbox relay as a library: stream a transactional outbox out of a PostgreSQL `pgoutput`
//! slot into ClickHouse, in batches, confirming the slot only after ClickHouse accepted a batch.
//!
//! The pieces, in the order an event passes them:
//! - [`pipeline::Relay`]: the loop (replication stream, batching, flush, confirm);
//! - [`pgoutput`] (its own crate): decodes each WAL message, pure;
//! - [`outbox::OutboxLayout`]: outbox tuple -> [`sink::EventRow`];
//! - [`sink::ClickHouseSink`]: one RowBinary insert per batch;
//! - [`config::Config`], [`setup`], [`status`], [`schema`]: around it.

pub mod config;
pub mod deadletter;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod pg;
pub mod pgtls;
pub mod pipeline;
pub mod purge;
pub mod replay;
pub mod schema;
pub mod setup;
pub mod sink;
pub mod status;
pub mod verify;

pub use config::Config;
pub use pipeline::{Relay, RelayError};
