//! The relay's own tables in PostgreSQL, beside the outbox: their schema (and ClickHouse's),
//! and the dead letters.

pub mod deadletter;
pub mod schema;
