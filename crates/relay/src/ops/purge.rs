//! Keeps the outbox table bounded: deletes rows older than `outbox_retention_hours`, and the
//! checkpoints as old (each slot's newest is kept).
//!
//! Deleting a row never loses its event: the relay ships from the WAL, where the insert stays
//! until the slot has confirmed it. The rows kept are what `replay` re-ships from.
//!
//! The deletes run on a guarded connection ([`crate::pg::Guarded`]): a migration that queues
//! behind one (and the application's inserts behind the migration) ends it at once; the purge
//! goes on at its next interval.

use std::time::Duration;

use tracing::{info, warn};

use crate::config::Config;
use crate::pg::{self, PgError};
use crate::store::schema::outbox_table;

/// Rows deleted per statement, so no purge holds locks or bloats WAL for long.
const CHUNK: i64 = 10_000;

/// Deletes expired rows in chunks; returns how many.
///
/// A row expires when its transaction committed more than `outbox_retention_hours` ago, which
/// the relay knows from its own checkpoints (a row the snapshot of a checkpoint recorded before
/// then sees committed), never from `event_date_time`, which the publisher sets: a backdated
/// event stays as long as any other and `replay` can still find it.
pub async fn purge_once(config: &Config) -> Result<u64, PgError> {
    let mut guarded = pg::Guarded::connect(config.postgres(), "purge").await?;
    let (client, guard) = guarded.split();
    guard.run(purge(config, client)).await
}

async fn purge(config: &Config, client: &mut tokio_postgres::Client) -> Result<u64, PgError> {
    let client = &*client;
    let Some(snapshot) = crate::store::checkpoint::retention_snapshot(client, config).await? else {
        // No checkpoint is that old yet: nothing is known to have committed before then.
        crate::store::checkpoint::purge_checkpoints(client, config).await?;
        crate::store::deadletter::purge_shipped(client, config).await?;
        return Ok(0);
    };
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
             SELECT o.ctid FROM {table} o
              WHERE pg_visible_in_snapshot({xid8}, $1::text::pg_snapshot)
              LIMIT $2))",
        table = outbox_table(config),
        xid8 = crate::outbox::ROW_XID8,
    );
    let mut total = 0;
    loop {
        let deleted = client
            .execute(&sql, &[&snapshot, &CHUNK])
            .await
            .map_err(PgError::query("outbox purge"))?;
        total += deleted;
        if deleted < CHUNK as u64 {
            // Checkpoints are only useful while the outbox rows they point at are kept.
            crate::store::checkpoint::purge_checkpoints(client, config).await?;
            crate::store::deadletter::purge_shipped(client, config).await?;
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
            Err(e @ PgError::Yielded(_)) => {
                info!(error = %e, "outbox purge gave way; it goes on at its next interval")
            }
            Err(e) => warn!(error = %e, "outbox purge failed; will try again"),
        }
    }
}
