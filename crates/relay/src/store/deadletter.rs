//! Dead letters: events ClickHouse refused on their own (a value its column cannot hold), kept in
//! PostgreSQL with the error so the rest of their batch ships and nothing is dropped silently.
//!
//! `outbox-relay dead-letters list|retry|purge` manages them; an operator fixes a row with
//! `UPDATE` (psql) before `retry`.

use pgoutput::Lsn;
use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::event::{OwnedEventRow, fnv1a, parse_uuid};
use crate::pg::{self, PgError};
use crate::sink::resend::Resend;
use crate::sink::{ClickHouseSink, SinkError};
use crate::store::schema::{dead_letters_table, outbox_table};

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(transparent)]
    ClickHouse(#[from] SinkError),
    #[error("dead letter {0} has an event_id that is not a UUID")]
    BadId(String),
}

/// One dead letter as `list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub event_id: String,
    pub commit_lsn: String,
    pub tx_seq: i32,
    /// Empty for a row that could not become an event (see `raw`).
    pub event_type: String,
    pub event_date_time: String,
    /// The outbox row's values by column name, for a row that could not become an event.
    pub raw: Option<serde_json::Value>,
    pub error: String,
    pub failed_at: String,
    pub attempts: i32,
}

/// Stores a refused event; a repeat of the same event (a replayed stream) changes nothing.
/// Returns whether it was new.
pub async fn record(
    client: &Client,
    config: &Config,
    row: &OwnedEventRow,
    error: &str,
) -> Result<bool, PgError> {
    let sql = format!(
        "INSERT INTO {} (event_id, commit_lsn, tx_seq, event_type, event_date_time, environment,
                         event_context, metadata_version, sentry_trace, error)
         VALUES ($1::text::uuid, $2::text::pg_lsn, $3, $4,
                 'epoch'::timestamptz + $5::int8 * interval '1 microsecond', $6, $7, $8, $9, $10)
         ON CONFLICT (event_id) DO NOTHING",
        dead_letters_table(config)
    );
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let inserted = client
        .execute(
            &sql,
            &[
                &row.event_id_text(),
                &Lsn(row.commit_lsn).to_string(),
                &(row.tx_seq as i32),
                &text(&row.event_type),
                &row.event_date_time_us,
                &text(&row.environment),
                &text(&row.event_context),
                &(row.metadata_version as i64),
                &row.sentry_trace.as_deref().map(text),
                &error,
            ],
        )
        .await
        .map_err(PgError::query("dead-letter insert"))?;
    Ok(inserted == 1)
}

/// Stores an outbox row that cannot become an event row (see [`crate::outbox::raw_values`]),
/// with its WAL position and why; a repeat changes nothing. Returns whether it was new.
pub async fn record_unmapped(
    client: &Client,
    config: &Config,
    event_id: &[u8; 16],
    position: (u64, u32),
    raw: &serde_json::Value,
    error: &str,
) -> Result<bool, PgError> {
    let sql = format!(
        "INSERT INTO {} (event_id, commit_lsn, tx_seq, raw, error)
         VALUES ($1::text::uuid, $2::text::pg_lsn, $3, $4::text::jsonb, $5)
         ON CONFLICT (event_id) DO NOTHING",
        dead_letters_table(config)
    );
    let inserted = client
        .execute(
            &sql,
            &[
                &crate::event::uuid_text(event_id),
                &Lsn(position.0).to_string(),
                &(position.1 as i32),
                &raw.to_string(),
                &error,
            ],
        )
        .await
        .map_err(PgError::query("dead-letter insert"))?;
    Ok(inserted == 1)
}

/// Deletes letters shipped by `retry` longer than the outbox retention ago.
pub async fn purge_shipped(client: &Client, config: &Config) -> Result<u64, PgError> {
    let hours = i32::try_from(config.outbox_retention_hours).unwrap_or(i32::MAX);
    client
        .execute(
            &format!(
                "DELETE FROM {} WHERE shipped_at < now() - make_interval(hours => $1)",
                dead_letters_table(config)
            ),
            &[&hours],
        )
        .await
        .map_err(PgError::query("dead-letter purge"))
}

/// How many dead letters there are (not yet shipped).
pub async fn count(client: &Client, config: &Config) -> Result<u64, PgError> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE shipped_at IS NULL",
                dead_letters_table(config)
            ),
            &[],
        )
        .await
        .map_err(PgError::query("dead-letter count"))?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Every dead letter, oldest first.
pub async fn list(config: &Config) -> Result<Vec<DeadLetter>, PgError> {
    let client = pg::connect(config.postgres()).await?;
    let rows = client
        .query(
            &format!(
                "SELECT event_id::text, commit_lsn::text, tx_seq, event_type,
                        to_char(event_date_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                        error, to_char(failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        attempts, raw::text
                   FROM {} d WHERE d.shipped_at IS NULL ORDER BY d.commit_lsn, d.tx_seq",
                dead_letters_table(config)
            ),
            &[],
        )
        .await
        .map_err(PgError::query("dead-letter list"))?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
            event_id: r.get(0),
            commit_lsn: r.get(1),
            tx_seq: r.get(2),
            event_type: r.get::<_, Option<String>>(3).unwrap_or_default(),
            event_date_time: r.get::<_, Option<String>>(4).unwrap_or_default(),
            error: r.get(5),
            failed_at: r.get(6),
            attempts: r.get(7),
            raw: r
                .get::<_, Option<String>>(8)
                .and_then(|t| serde_json::from_str(&t).ok()),
        })
        .collect())
}

/// What `retry` did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RetryReport {
    /// Sent to ClickHouse and marked shipped (kept until the outbox retention, so a re-read stream never makes it a letter again).
    pub shipped: u64,
    /// Already in ClickHouse (an earlier retry that was cut short): marked shipped.
    pub already_there: u64,
    /// Refused again: kept, with the new error.
    pub refused: u64,
}

/// Sends dead letters (all, or one `event_id`) to ClickHouse again, one insert each; those
/// ClickHouse takes are deleted. Safe to repeat: an event ClickHouse holds is never sent twice.
pub async fn retry(
    config: &Config,
    sink: &ClickHouseSink,
    event_id: Option<&str>,
) -> Result<RetryReport, DeadLetterError> {
    let client = pg::connect(config.postgres()).await?;
    // One re-sender at a time: a replay (the relay's own, after a publication change, or
    // `outbox-relay replay`) checks ClickHouse and then inserts, and so does retry; run side by
    // side, both could find an event missing and both send it. Waits for a running replay.
    client
        .execute(
            "SELECT pg_advisory_lock(hashtext('outbox-relay replay ' || $1))",
            &[&config.slot],
        )
        .await
        .map_err(PgError::query("replay lock"))?;
    let layout = crate::outbox::SqlLayout::read_table(&client, &outbox_table(config)).await?;
    let table = dead_letters_table(config);
    let rows = client
        .query(
            &format!(
                "SELECT d.event_id::text, d.commit_lsn::text, d.tx_seq, d.event_type,
                        (extract(epoch FROM d.event_date_time) * 1000000)::int8, d.environment,
                        d.event_context, d.metadata_version, d.sentry_trace, d.raw IS NOT NULL,
                        (SELECT ({xid8})::text FROM {outbox} o WHERE o.event_id = d.event_id)
                   FROM {table} d WHERE ($1::text IS NULL OR d.event_id = $1::text::uuid)
                    AND d.shipped_at IS NULL
                  ORDER BY d.commit_lsn, d.tx_seq",
                xid8 = crate::outbox::ROW_XID8,
                outbox = outbox_table(config),
            ),
            &[&event_id],
        )
        .await
        .map_err(PgError::query("dead-letter read"))?;
    let mut report = RetryReport::default();
    for r in rows {
        let id: String = r.get(0);
        let lsn: String = r.get(1);
        let position = (
            lsn.parse::<Lsn>().map(|l| l.0).unwrap_or(0),
            r.get::<_, i32>(2) as u32,
        );
        let row = if r.get::<_, bool>(9) {
            // A row that could not become an event: read it from the outbox again, through
            // the mapping the live stream uses, now that it may be fixed.
            from_outbox(&client, config, &layout, &id).await?
        } else {
            typed_letter(&r, &id)
        };
        let mut row = match row {
            Ok(row) => row,
            Err(why) => {
                report.refused += 1;
                refused_again(&client, &table, &id, &why).await?;
                continue;
            }
        };
        (row.commit_lsn, row.tx_seq) = position;
        // Its transaction, as replay writes it: the outbox row's (0 once it is purged).
        row.xid = r
            .get::<_, Option<String>>(10)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        if !sink
            .existing_ids(std::slice::from_ref(&id))
            .await?
            .is_empty()
        {
            report.already_there += 1;
        } else {
            let token = format!("dead-letter:{id}:{:016x}", fnv1a(&row.event_context));
            let mut resend = Resend::new(std::slice::from_ref(&row));
            if let Some((_, e)) = resend.next_refused(sink, |_| Some(token.clone())).await? {
                report.refused += 1;
                refused_again(&client, &table, &id, &e.to_string()).await?;
                continue;
            }
            report.shipped += 1;
        }
        client
            .execute(
                &format!("UPDATE {table} SET shipped_at = now() WHERE event_id = $1::text::uuid"),
                &[&id],
            )
            .await
            .map_err(PgError::query("dead-letter delete"))?;
    }
    Ok(report)
}

/// A dead letter ClickHouse refused, as the operator may have corrected it with UPDATE.
fn typed_letter(r: &tokio_postgres::Row, id: &str) -> Result<OwnedEventRow, String> {
    let missing = || format!("dead letter {id} has an empty column: set it with UPDATE first");
    Ok(OwnedEventRow {
        event_id: parse_uuid(id).ok_or_else(|| format!("{id} is not a UUID"))?,
        commit_lsn: 0,
        tx_seq: 0,
        xid: 0,
        event_type: r
            .get::<_, Option<String>>(3)
            .ok_or_else(missing)?
            .into_bytes(),
        event_date_time_us: r.get::<_, Option<i64>>(4).ok_or_else(missing)?,
        environment: r
            .get::<_, Option<String>>(5)
            .ok_or_else(missing)?
            .into_bytes(),
        event_context: r
            .get::<_, Option<String>>(6)
            .ok_or_else(missing)?
            .into_bytes(),
        metadata_version: u64::try_from(r.get::<_, Option<i64>>(7).ok_or_else(missing)?)
            .map_err(|_| format!("dead letter {id}: metadata_version is negative"))?,
        sentry_trace: r.get::<_, Option<String>>(8).map(String::into_bytes),
    })
}

/// The outbox row of an unmappable dead letter, mapped as the live stream maps rows.
async fn from_outbox(
    client: &Client,
    config: &Config,
    layout: &crate::outbox::SqlLayout,
    id: &str,
) -> Result<Result<OwnedEventRow, String>, PgError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {} FROM {} o WHERE to_jsonb(o) ->> 'event_id' = $1",
                layout.select,
                crate::store::schema::outbox_table(config)
            ),
            &[&id],
        )
        .await
        .map_err(PgError::query("outbox read"))?;
    Ok(match row {
        None => Err(format!(
            "event {id} is no longer in the outbox table (purged or deleted): it cannot be \
             re-read; `dead-letters purge --event-id {id}` once handled"
        )),
        Some(row) => layout.event(&row).map_err(|(why, _)| why),
    })
}

async fn refused_again(client: &Client, table: &str, id: &str, why: &str) -> Result<(), PgError> {
    client
        .execute(
            &format!(
                "UPDATE {table} SET error = $2, attempts = attempts + 1, failed_at = now()
                  WHERE event_id = $1::text::uuid"
            ),
            &[&id, &why],
        )
        .await
        .map_err(PgError::query("dead-letter update"))?;
    Ok(())
}

/// Deletes dead letters (all, or one `event_id`) without shipping them; returns how many.
pub async fn purge(config: &Config, event_id: Option<&str>) -> Result<u64, PgError> {
    let client = pg::connect(config.postgres()).await?;
    client
        .execute(
            &format!(
                "DELETE FROM {} WHERE $1::text IS NULL OR event_id = $1::text::uuid",
                dead_letters_table(config)
            ),
            &[&event_id],
        )
        .await
        .map_err(PgError::query("dead-letter purge"))
}
