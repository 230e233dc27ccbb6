//! Keeps the outbox table bounded: deletes rows older than `outbox_retention_hours`, and the
//! checkpoints as old (each slot's newest is kept).
//!
//! Deleting a row never loses its event: the relay ships from the WAL, where the insert stays
//! until the slot has confirmed it. The rows kept are what `replay` re-ships from.

use std::time::Duration;

use tracing::{info, warn};

use crate::config::Config;
use crate::pg::{self, PgError};
use crate::schema::quote_pg_ident;

/// Rows deleted per statement, so no purge holds locks or bloats WAL for long.
const CHUNK: i64 = 10_000;

/// Deletes expired rows in chunks; returns how many.
pub async fn purge_once(config: &Config) -> Result<u64, PgError> {
    let client = pg::connect(&config.postgres_url).await?;
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM {table}
              WHERE event_date_time < now() - make_interval(hours => $1)
              LIMIT $2))",
        table = format_args!(
            "{}.{}",
            quote_pg_ident(&config.outbox_schema),
            quote_pg_ident(&config.outbox_table)
        )
    );
    let hours = i32::try_from(config.outbox_retention_hours).unwrap_or(i32::MAX);
    let mut total = 0;
    loop {
        let deleted = client
            .execute(&sql, &[&hours, &CHUNK])
            .await
            .map_err(PgError::query("outbox purge"))?;
        total += deleted;
        if deleted < CHUNK as u64 {
            // Checkpoints are only useful while the outbox rows they point at are kept.
            crate::replay::purge_checkpoints(&client, config).await?;
            return Ok(total);
        }
    }
}

/// Purges every `purge_interval_s` until the process ends; errors are logged, not fatal.
pub async fn purge_forever(config: Config) {
    if config.outbox_retention_hours == 0 {
        return;
    }
    let mut every = tokio::time::interval(Duration::from_secs(config.purge_interval_s));
    loop {
        every.tick().await;
        match purge_once(&config).await {
            Ok(0) => {}
            Ok(rows) => info!(
                rows,
                retention_hours = config.outbox_retention_hours,
                "outbox purged"
            ),
            Err(e) => warn!(error = %e, "outbox purge failed; will try again"),
        }
    }
}
