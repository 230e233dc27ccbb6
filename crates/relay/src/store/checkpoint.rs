//! Checkpoints: the relay's record, in PostgreSQL, of where the slot stood and what the outbox
//! held then. Every confirmed batch writes one (with a snapshot and the WAL position read right
//! after it, and the publication's coverage the session streamed under); replay starts from them,
//! the outbox purge keeps what the newest old one does not see, and a coverage change or a lost
//! slot is remembered as a pending marker until the window is re-shipped.
//!
//! A snapshot S taken before WAL position L: a row whose transaction S does not see committed
//! after L. See `reship.rs` for how replay uses that.

use pgoutput::Lsn;
use tokio_postgres::Client;

use crate::config::Config;
use crate::pg::{self, PgError};
use crate::store::coverage;
use crate::store::schema::{checkpoints_table, outbox_table};

/// The publication's coverage of the outbox table as SQL (`$1` publication, `$2` schema, `$3`
/// table, shifted by `first`): the same fingerprint as [`crate::store::coverage::coverage`], `'none'` when the
/// outbox's inserts are not published.
fn fingerprint_sql(config: &Config, first: usize) -> String {
    let (p, s, t) = (first, first + 1, first + 2);
    format!(
        "{} || '/' || {}",
        crate::store::schema::base_fingerprint_sql(
            &format!("${p}"),
            &format!("${s}"),
            &format!("${t}")
        ),
        coverage::watch_id_sql(config)
    )
}

/// Records a checkpoint after a batch was confirmed, with the coverage the session streamed
/// under. Nothing is recorded, and `false` returned, when the publication's coverage in the
/// checkpoint's own snapshot is not `coverage` any more: the newest checkpoint then still
/// predates the change, which is where the next session re-ships from.
pub async fn record_checkpoint(
    client: &Client,
    config: &Config,
    confirmed: Lsn,
    rows: u64,
    coverage: &str,
) -> Result<bool, PgError> {
    Ok(insert_checkpoint(client, config, confirmed, rows, coverage, "true").await? == 1)
}

/// Inserts a checkpoint under `coverage` when the coverage in its own snapshot is `coverage`
/// and the SQL condition `also` holds (`$1` is the slot); the number of rows inserted.
async fn insert_checkpoint(
    client: &Client,
    config: &Config,
    confirmed: Lsn,
    rows: u64,
    coverage: &str,
    also: &str,
) -> Result<u64, PgError> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (slot, confirmed_lsn, rows, snapshot, snapshot_lsn, coverage)
                 SELECT $1, $2::text::pg_lsn, $3, pg_current_snapshot(), pg_current_wal_lsn(), $4
                  WHERE {} = $4 AND {also}",
                checkpoints_table(config),
                fingerprint_sql(config, 5)
            ),
            &[
                &config.slot,
                &confirmed.to_string(),
                &(rows as i64),
                &coverage,
                &config.publication,
                &config.outbox_schema,
                &config.outbox_table,
            ],
        )
        .await
        .map_err(PgError::query("checkpoint insert"))
}

/// The slot's newest checkpoint by recording time (a pending marker copies an older snapshot):
/// its `snapshot_lsn` and coverage.
async fn newest_checkpoint(
    client: &Client,
    config: &Config,
) -> Result<Option<(String, Option<String>)>, PgError> {
    let order = "c.recorded_at DESC, c.snapshot_lsn DESC";
    let row = newest(client, config, "c.snapshot_lsn::text, c.coverage", order).await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// A window the publication may not have covered, and where its rows are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoverageGap {
    /// The position to replay from.
    pub from: Lsn,
    /// The oids of the tables whose rows may have been skipped: the outbox table of the
    /// recorded coverage, of every pending window before it, and of the current one.
    pub tables: Vec<u32>,
}

/// The table oids a coverage (a fingerprint `publication/table/membership`, or a
/// `pending:oid,oid` marker) names.
pub fn coverage_tables(coverage: &str) -> Vec<u32> {
    match coverage.strip_prefix("pending:") {
        Some(list) => list.split(',').filter_map(|o| o.parse().ok()).collect(),
        None => coverage
            .split('/')
            .nth(1)
            .and_then(|o| o.parse().ok())
            .into_iter()
            .collect(),
    }
}

/// When the newest checkpoint was recorded under another coverage than `coverage` (the
/// publication dropped and created again, the table swapped or taken out and back in, or a
/// pending marker of an earlier session), the outbox's inserts may have been skipped since:
/// returns the position to replay from, that checkpoint's `snapshot_lsn` or the slot's
/// confirmed position `confirmed`, whichever is older, and the tables to read. `None` when
/// nothing changed, or nothing was recorded yet.
pub async fn coverage_gap(
    client: &Client,
    config: &Config,
    coverage: &str,
    confirmed: Lsn,
) -> Result<Option<CoverageGap>, PgError> {
    let row = newest_checkpoint(client, config).await?;
    let Some((lsn, recorded)) = row else {
        return Ok(None);
    };
    let recorded = match recorded {
        // Recorded before coverage was (an upgraded relay), or the same coverage.
        None => return Ok(None),
        Some(recorded) if recorded == coverage => return Ok(None),
        Some(recorded) => recorded,
    };
    let from = lsn.parse::<Lsn>().map_err(|_| {
        PgError::NotReady(format!(
            "checkpoint snapshot_lsn {lsn:?} is not a WAL position"
        ))
    })?;
    let mut tables = coverage_tables(&recorded);
    tables.extend(coverage_tables(coverage));
    tables.extend(watched_tables(client, config).await?);
    tables.sort_unstable();
    tables.dedup();
    Ok(Some(CoverageGap {
        from: from.min(confirmed),
        tables,
    }))
}

/// The tables the coverage watch saw with the outbox's name within the retention (a table
/// swapped in and out again between two checks is only known from there), that still exist.
async fn watched_tables(client: &Client, config: &Config) -> Result<Vec<u32>, PgError> {
    let rows = client
        .query(
            &format!(
                "SELECT DISTINCT table_oid::text FROM {} l
                  WHERE table_oid IS NOT NULL
                    AND recorded_at > now() - $1 * interval '1 hour'
                    AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = l.table_oid)",
                crate::store::schema::coverage_log_table(config)
            ),
            &[&(config.outbox_retention_hours as f64)],
        )
        .await
        .map_err(PgError::query("coverage watch log"))?;
    Ok(rows
        .iter()
        .filter_map(|row| row.get::<_, String>(0).parse().ok())
        .collect())
}

/// Records a first checkpoint under `coverage` when the slot has none with a coverage yet (a new
/// slot, or checkpoints of a relay from before coverage was recorded): from then on a change of
/// the publication is seen, even one before the first batch. Nothing when the coverage in the
/// checkpoint's own snapshot is not `coverage`.
pub async fn record_baseline(
    client: &Client,
    config: &Config,
    confirmed: Lsn,
    coverage: &str,
) -> Result<(), PgError> {
    let only_first = format!(
        "NOT EXISTS (SELECT 1 FROM {} WHERE slot = $1 AND coverage IS NOT NULL)",
        checkpoints_table(config)
    );
    insert_checkpoint(client, config, confirmed, 0, coverage, &only_first).await?;
    Ok(())
}

/// The start of a window recorded as pending (the newest checkpoint is a pending marker), if any.
pub async fn pending_window(client: &Client, config: &Config) -> Result<Option<String>, PgError> {
    let row = newest_checkpoint(client, config).await?;
    Ok(row.and_then(|(lsn, coverage)| {
        coverage
            .is_some_and(|c| c.starts_with("pending:"))
            .then_some(lsn)
    }))
}

/// Records that the window from `from` on must be re-shipped from `tables` and the newest
/// checkpoint's table(s): a checkpoint with the snapshot of the newest checkpoint at or before
/// `from` (one that sees nothing when there is none) and the coverage `pending:<tables>`. Until a
/// session finishes that replay, the newest checkpoint stays such a marker, so a crash cannot
/// forget the window, and a further change adds its table to the list. Nothing is written when
/// the newest checkpoint is already a marker listing every table (its window starts earlier).
pub async fn record_pending(
    client: &Client,
    config: &Config,
    from: Lsn,
    tables: &[u32],
) -> Result<(), PgError> {
    let table = checkpoints_table(config);
    // The table(s) of the newest checkpoint stay on the list: a pending window not yet
    // re-shipped, or the table that was covered before.
    let newest = newest_checkpoint(client, config)
        .await?
        .and_then(|(_, coverage)| coverage);
    let listed = newest.as_deref().map(coverage_tables).unwrap_or_default();
    if newest.as_deref().is_some_and(|c| c.starts_with("pending:"))
        && tables.iter().all(|t| listed.contains(t))
    {
        return Ok(());
    }
    let mut tables = tables.to_vec();
    tables.extend(listed);
    tables.sort_unstable();
    tables.dedup();
    let list = tables
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    client
        .execute(
            &format!(
                "INSERT INTO {table} (slot, confirmed_lsn, rows, snapshot, snapshot_lsn, coverage)
                 SELECT $1, $2::text::pg_lsn, 0,
                        coalesce(b.snapshot, '1:1:'::pg_snapshot), coalesce(b.snapshot_lsn, '0/0'),
                        'pending:' || $3
                   FROM (SELECT 1) one
                   LEFT JOIN LATERAL (SELECT snapshot, snapshot_lsn FROM {table}
                                       WHERE slot = $1 AND snapshot_lsn <= $2::text::pg_lsn
                                       ORDER BY snapshot_lsn DESC LIMIT 1) b ON true"
            ),
            &[&config.slot, &from.to_string(), &list],
        )
        .await
        .map_err(PgError::query("checkpoint insert"))?;
    Ok(())
}

/// Whether a replication error is PostgreSQL (before 18) refusing to decode WAL written while
/// the publication did not exist: it does so at every start from a position before that window.
pub fn is_unpublished_window(server_error: &str) -> bool {
    server_error.contains("SQLSTATE 42704") && server_error.contains("publication")
}

/// Gets the slot past WAL PostgreSQL cannot decode because the publication was missing when it
/// was written (PostgreSQL 15 to 17 fail on it forever; 18 skips it): first records a pending
/// marker ([`record_pending`]) from the slot's confirmed position for `tables`, then advances
/// the slot to the current WAL position. The next session sees the marker and re-ships, from
/// the outbox, everything the marker's snapshot does not see, which covers what the advance
/// skipped; a crash in between repeats both steps. Call with the slot free.
pub async fn skip_unpublished_window(config: &Config, tables: &[u32]) -> Result<Lsn, PgError> {
    let client = pg::connect(config.postgres()).await?;
    let confirmed = pg::preflight(&client, &config.slot).await?;
    record_pending(&client, config, confirmed, tables).await?;
    let row = client
        .query_one(
            "SELECT end_lsn::text FROM pg_replication_slot_advance($1, pg_current_wal_lsn())",
            &[&config.slot],
        )
        .await
        .map_err(PgError::query("slot advance"))?;
    let to: String = row.get(0);
    to.parse()
        .map_err(|_| PgError::NotReady(format!("slot advanced to {to:?}, not a WAL position")))
}

/// Recovery after a failover that lost the slot (opt-in, `failover_recovery`): records a marker
/// checkpoint holding the snapshot of the newest checkpoint taken before the newest confirmed
/// position (the checkpoints table came over with the physical standby; the lost slot had
/// confirmed at least that far), then creates the slot on the promoted server. The next session sees
/// the marker ([`coverage_gap`]) and re-ships, from the outbox, everything that snapshot does
/// not see and ClickHouse lacks, which covers what the old slot had not confirmed and what was
/// committed before the new slot. A crash between the two steps repeats both; the marker comes
/// first so that a slot never exists without it.
pub async fn recover_lost_slot(config: &Config) -> Result<Lsn, PgError> {
    let client = pg::connect(config.postgres()).await?;
    let table = checkpoints_table(config);
    client
        .execute(
            &format!(
                "INSERT INTO {table} (slot, confirmed_lsn, rows, snapshot, snapshot_lsn, coverage)
                 SELECT $1, coalesce(b.confirmed_lsn, '0/0'), 0,
                        coalesce(b.snapshot, '1:1:'::pg_snapshot), coalesce(b.snapshot_lsn, '0/0'),
                        'failover-recovery'
                   FROM (SELECT 1) one
                   LEFT JOIN LATERAL (SELECT confirmed_lsn, snapshot, snapshot_lsn FROM {table}
                                       WHERE slot = $1 AND snapshot_lsn <=
                                             (SELECT max(confirmed_lsn) FROM {table}
                                               WHERE slot = $1)
                                       ORDER BY snapshot_lsn DESC LIMIT 1) b ON true"
            ),
            &[&config.slot],
        )
        .await
        .map_err(PgError::query("checkpoint insert"))?;
    let created = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&config.slot],
        )
        .await;
    let at: String = match created {
        Ok(row) => row.get(0),
        // Created meanwhile (another relay, an operator): the marker stands all the same.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {
            return pg::preflight(&client, &config.slot).await;
        }
        Err(e) => return Err(PgError::query("slot creation")(e)),
    };
    at.parse()
        .map_err(|_| PgError::NotReady(format!("slot created at {at:?}, not a WAL position")))
}

/// Deletes checkpoints older than the outbox retention, keeping for each slot the newest one
/// older than the retention (the outbox purge deletes what its snapshot sees committed) and
/// every newer one.
pub async fn purge_checkpoints(client: &Client, config: &Config) -> Result<u64, PgError> {
    let hours = i32::try_from(config.outbox_retention_hours).unwrap_or(i32::MAX);
    client
        .execute(
            &format!(
                "DELETE FROM {t} c WHERE recorded_at < now() - make_interval(hours => $1)
                   AND recorded_at < (SELECT max(recorded_at) FROM {t} n
                                       WHERE n.slot = c.slot
                                         AND n.recorded_at < now() - make_interval(hours => $1))",
                t = checkpoints_table(config)
            ),
            &[&hours],
        )
        .await
        .map_err(PgError::query("checkpoint purge"))
}

/// The snapshot of the slot's newest checkpoint recorded more than `outbox_retention_hours`
/// ago: every outbox row it sees committed was committed before then.
pub async fn retention_snapshot(
    client: &Client,
    config: &Config,
) -> Result<Option<String>, PgError> {
    let hours = i32::try_from(config.outbox_retention_hours).unwrap_or(i32::MAX);
    let row = client
        .query_opt(
            &format!(
                "SELECT snapshot::text FROM {} WHERE slot = $1
                    AND recorded_at < now() - make_interval(hours => $2)
                  ORDER BY recorded_at DESC LIMIT 1",
                checkpoints_table(config)
            ),
            &[&config.slot, &hours],
        )
        .await
        .map_err(PgError::query("checkpoint read"))?;
    Ok(row.map(|r| r.get(0)))
}

/// The newest checkpoint of the slot, as (confirmed_lsn, recorded_at).
pub async fn last_checkpoint(
    client: &Client,
    config: &Config,
) -> Result<Option<(String, String)>, PgError> {
    let columns = "c.confirmed_lsn::text, c.recorded_at::text";
    let order = "c.confirmed_lsn DESC, c.recorded_at DESC";
    let row = newest(client, config, columns, order).await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The slot's first checkpoint (`c`) in `order`, its `columns`. Qualified names: an ORDER BY
/// naming a column the select list casts to text would sort the text ('0/FFBB780' after
/// '0/10015DA8').
async fn newest(
    client: &Client,
    config: &Config,
    columns: &str,
    order: &str,
) -> Result<Option<tokio_postgres::Row>, PgError> {
    client
        .query_opt(
            &format!(
                "SELECT {columns} FROM {} c WHERE c.slot = $1 ORDER BY {order} LIMIT 1",
                checkpoints_table(config)
            ),
            &[&config.slot],
        )
        .await
        .map_err(PgError::query("checkpoint read"))
}

/// The insert time (Unix µs) of the oldest outbox event newer than `after_us` (the commit time
/// of the last event shipped, Unix µs; 0 when unknown: then newer than the slot's newest
/// checkpoint), for the lag while no session streams. An event inserted before the last
/// shipped commit but committed after it (a long transaction) is not seen.
pub async fn oldest_unshipped(
    client: &Client,
    config: &Config,
    after_us: i64,
) -> Result<Option<i64>, PgError> {
    let after = (after_us > 0).then_some(after_us);
    let row = client
        .query_one(
            &format!(
                "SELECT (extract(epoch FROM min(event_date_time)) * 1000000)::bigint FROM {outbox}
                  WHERE event_date_time > coalesce(
                        to_timestamp($1::bigint / 1000000.0),
                        (SELECT recorded_at FROM {checkpoints} WHERE slot = $2
                          ORDER BY snapshot_lsn DESC LIMIT 1),
                        '-infinity')",
                outbox = outbox_table(config),
                checkpoints = checkpoints_table(config)
            ),
            &[&after, &config.slot],
        )
        .await
        .map_err(PgError::query("oldest unshipped event"))?;
    Ok(row.get(0))
}
