//! Where the proof starts: a checkpoint's snapshot H; the rows of transactions H sees are
//! outside it on both sides. The newest of:
//!
//! - **the purge's reach**: the outbox purge deletes the rows its checkpoint's snapshot sees
//!   (`outbox_retention_hours`), so H is the newest checkpoint recorded before the retention
//!   horizon rounded up a step and one more step (a step is an hour, less for a retention under
//!   a day): never behind what a purge running during the pass may delete, and the same for a
//!   whole step, so the background verifier's sums stay valid that long;
//! - **`--from-lsn`**: the newest checkpoint whose snapshot predates that position (as replay);
//! - **the first rows with a transaction id**: ClickHouse rows shipped before `xid` existed
//!   hold 0 there, so the proof starts at the first checkpoint recorded past them.

use pgoutput::Lsn;
use tokio_postgres::Client;

use super::VerifyError;
use super::snapshot::Snapshot;
use crate::config::Config;
use crate::pg::PgError;
use crate::reship;
use crate::sink::{ClickHouseSink, OURS};
use crate::store::schema::checkpoints_table;

/// A checkpoint whose snapshot bounds the proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Horizon {
    pub snapshot: Snapshot,
    /// The checkpoint's `snapshot_lsn`.
    pub lsn: Lsn,
    pub recorded_at: String,
    /// Why it bounds the proof (for the report).
    pub why: &'static str,
}

/// The step the purge's reach is rounded by, in seconds: an hour, or a 24th of the retention.
pub fn step_s(config: &Config) -> u64 {
    (config.outbox_retention_hours * 3600 / 24).clamp(60, 3600)
}

/// The horizon of a pass (see the module's comment); `None` when the whole outbox is in the
/// proof.
pub async fn find(
    client: &Client,
    config: &Config,
    sink: &ClickHouseSink,
    from_lsn: Option<Lsn>,
) -> Result<Option<Horizon>, VerifyError> {
    let mut found: Vec<Horizon> = Vec::new();
    found.extend(purge_reach(client, config).await?);
    if let Some(from) = from_lsn {
        found.extend(from_position(client, config, from).await?);
    }
    let floor = found.iter().map(|h| h.lsn.0).max().unwrap_or(0);
    found.extend(first_with_xid(client, config, sink, floor).await?);
    Ok(found.into_iter().max_by_key(|h| h.lsn.0))
}

/// A checkpoint's columns as [`horizon`] reads them. Qualified names: an output column of the
/// same name (`snapshot_lsn::text`) would make an ORDER BY sort text ('0/FFBB780' after
/// '0/4842B770').
const COLUMNS: &str = "c.snapshot::text, c.snapshot_lsn::text,
                       to_char(c.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')";

/// The newest checkpoint a purge may use during this step, and the next one.
async fn purge_reach(client: &Client, config: &Config) -> Result<Option<Horizon>, VerifyError> {
    if config.outbox_retention_hours == 0 {
        return Ok(None);
    }
    let sql = format!(
        "SELECT {COLUMNS} FROM {} c WHERE c.slot = $1
            AND c.recorded_at < date_bin(make_interval(secs => $2),
                                         now() - make_interval(hours => $3), 'epoch')
                                + 2 * make_interval(secs => $2)
          ORDER BY c.snapshot_lsn DESC LIMIT 1",
        checkpoints_table(config)
    );
    let hours = i32::try_from(config.outbox_retention_hours).unwrap_or(i32::MAX);
    let row = client
        .query_opt(&sql, &[&config.slot, &(step_s(config) as f64), &hours])
        .await
        .map_err(PgError::query("verify horizon"))?;
    Ok(row.and_then(|r| horizon(&r, "the outbox retention")))
}

/// `--from-lsn`: the checkpoint replay would start from.
async fn from_position(
    client: &Client,
    config: &Config,
    from: Lsn,
) -> Result<Option<Horizon>, VerifyError> {
    crate::ops::positions::check_lsn(client, config, from).await?;
    let base = reship::base_snapshot(client, config, from)
        .await
        .map_err(VerifyError::Repair)?;
    let Some((snapshot, lsn)) = base else {
        return Ok(None);
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM {} c WHERE c.slot = $1
           AND c.snapshot::text = $2 AND c.snapshot_lsn = $3::text::pg_lsn LIMIT 1",
        checkpoints_table(config)
    );
    let row = client
        .query_opt(&sql, &[&config.slot, &snapshot, &lsn])
        .await
        .map_err(PgError::query("verify horizon"))?;
    Ok(row.and_then(|r| horizon(&r, "--from-lsn")))
}

/// ClickHouse rows past `floor` with no transaction id (shipped before `xid` existed): the
/// first checkpoint recorded past them, or now when there is none yet.
async fn first_with_xid(
    client: &Client,
    config: &Config,
    sink: &ClickHouseSink,
    floor: u64,
) -> Result<Option<Horizon>, VerifyError> {
    let before_xid: Vec<u64> = sink
        .fetch_all(&format!(
            "SELECT max(commit_lsn) FROM {}
              WHERE {OURS} AND xid = 0 AND commit_lsn > 0 AND commit_lsn >= {floor}",
            sink.parts_everywhere()
        ))
        .await?;
    let Some(&last) = before_xid.first().filter(|l| **l > 0) else {
        return Ok(None);
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM {} c WHERE c.slot = $1 AND c.confirmed_lsn > $2::text::pg_lsn
          ORDER BY c.snapshot_lsn LIMIT 1",
        checkpoints_table(config)
    );
    let row = client
        .query_opt(&sql, &[&config.slot, &Lsn(last).to_string()])
        .await
        .map_err(PgError::query("verify horizon"))?;
    if let Some(r) = row {
        return Ok(horizon(&r, "the first checkpoint of a relay writing xid"));
    }
    // Nothing shipped with an xid was checkpointed yet: nothing is provable yet.
    let now = client
        .query_one(
            "SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text,
                    to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            &[],
        )
        .await
        .map_err(PgError::query("verify horizon"))?;
    Ok(horizon(&now, "no checkpoint of a relay writing xid yet"))
}

/// A checkpoint row (snapshot, snapshot_lsn, recorded_at) as a horizon.
fn horizon(row: &tokio_postgres::Row, why: &'static str) -> Option<Horizon> {
    Some(Horizon {
        snapshot: Snapshot::parse(&row.get::<_, String>(0))?,
        lsn: row.get::<_, String>(1).parse().ok()?,
        recorded_at: row.get(2),
        why,
    })
}
