//! The relay's own tables in PostgreSQL, beside the outbox: their schema (and ClickHouse's),
//! the checkpoints, the dead letters, and the check that the publication covers the outbox.

pub mod checkpoint;
pub mod coverage;
pub mod deadletter;
pub mod schema;
