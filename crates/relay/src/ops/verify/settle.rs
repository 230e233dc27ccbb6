//! What the id-by-id comparison found, looked at once more outside the pass's snapshot (on a
//! plain connection, no lock held across statements) before anything is reported:
//!
//! - **missing**: an id ClickHouse holds under any `xid` is not missing (a row shipped before
//!   ClickHouse had `xid`, or one of a savepoint transaction across the horizon); one the outbox
//!   no longer holds, or that became a dead letter, is not either.
//! - **extra**: an id the outbox holds is not extra (unless ClickHouse holds it twice: a
//!   duplicate). One it does not hold is outside the proof when its transaction began before
//!   the horizon's snapshot (the purge may have deleted its outbox row: a savepoint's xid is
//!   judged by the purge apart from its transaction's); else it is unknown to the outbox.

use std::collections::HashSet;

use tokio_postgres::Client;

use super::narrow::Found;
use super::snapshot::Snapshot;
use crate::config::Config;
use crate::pg::PgError;
use crate::sink::ClickHouseSink;
use crate::store::schema::{dead_letters_table, outbox_table};

use super::VerifyError;

/// Ids per look-up.
const CHUNK: usize = 2_000;

/// An event ClickHouse holds for this source that it should not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Extra {
    pub event_id: String,
    /// Rows ClickHouse holds with this id (for this source).
    pub rows: u64,
    /// `duplicate` (the outbox holds it once) or `unknown` (the outbox does not hold it).
    pub kind: &'static str,
}

/// The reportable findings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    pub missing: Vec<String>,
    pub extra: Vec<Extra>,
    pub altered: Vec<String>,
    /// ClickHouse rows whose outbox row is gone (purged) or not known: outside the proof.
    pub outside: u64,
    /// Found but not listed (the lists are bounded).
    pub unlisted: u64,
}

impl Settled {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.altered.is_empty()
    }
}

/// Settles `found` (see the module's comment).
pub async fn settle(
    client: &Client,
    config: &Config,
    sink: &ClickHouseSink,
    horizon: Option<&Snapshot>,
    found: Found,
) -> Result<Settled, VerifyError> {
    let mut settled = Settled {
        altered: found.altered,
        unlisted: found.unlisted,
        ..Settled::default()
    };
    for page in found.missing.chunks(CHUNK) {
        let held: HashSet<String> = sink.existing_ids(page).await?.into_iter().collect();
        let left: Vec<&str> = page
            .iter()
            .filter(|id| !held.contains(*id))
            .map(String::as_str)
            .collect();
        let sql = format!(
            "SELECT o.event_id::text FROM {} o WHERE o.event_id = ANY($1::text[]::uuid[])
                AND NOT EXISTS (SELECT 1 FROM {} d WHERE d.event_id = o.event_id
                                   AND d.shipped_at IS NULL)",
            outbox_table(config),
            dead_letters_table(config)
        );
        let outbox = ids_held(client, &sql, &left).await?;
        settled.missing.extend(
            left.iter()
                .filter(|id| outbox.contains(**id))
                .map(|id| id.to_string()),
        );
    }
    let held_sql = format!(
        "SELECT o.event_id::text FROM {} o WHERE o.event_id = ANY($1::text[]::uuid[])",
        outbox_table(config)
    );
    for page in found.extra.chunks(CHUNK) {
        let ids: Vec<&str> = page.iter().map(|(id, ..)| id.as_str()).collect();
        let outbox = ids_held(client, &held_sql, &ids).await?;
        for (id, rows, xid) in page {
            let kind = match (outbox.contains(id), *rows > 1) {
                (true, true) => "duplicate",
                (true, false) => continue,
                (false, _) if horizon.is_some_and(|h| *xid < h.xmax) => {
                    settled.outside += rows;
                    continue;
                }
                (false, _) => "unknown",
            };
            settled.extra.push(Extra {
                event_id: id.clone(),
                rows: *rows,
                kind,
            });
        }
    }
    settled
        .extra
        .extend(found.duplicate.into_iter().map(|(event_id, rows)| Extra {
            event_id,
            rows,
            kind: "duplicate",
        }));
    settled.missing.sort();
    settled.extra.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    settled.altered.sort();
    Ok(settled)
}

/// The ids (first column) `sql` returns for `ids` as `$1`.
async fn ids_held(client: &Client, sql: &str, ids: &[&str]) -> Result<HashSet<String>, PgError> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(client
        .query(sql, &[&ids])
        .await
        .map_err(PgError::query("verify id look-up"))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
