//! The relay's own tables in PostgreSQL, beside the outbox: their schema (and ClickHouse's),
//! the dead letters, and the check that the publication covers the outbox.

pub mod coverage;
pub mod deadletter;
pub mod schema;
