//! Completeness you can prove: compares the outbox rows PostgreSQL holds with the rows ClickHouse
//! holds for this outbox's source, window by window, and narrows a differing window down to the
//! exact missing and extra event ids (docs/guarantees.md, "What `verify` proves").
//!
//! Windows are ranges of `event_date_time`, the one time both sides store (the outbox has no
//! commit time, ClickHouse no xmin): the outbox's BRIN index and ClickHouse's monthly partitions
//! and sort key serve exactly such ranges, and the purge deletes by it, so the retained range is
//! a range of windows too. Per window each database computes, by itself, the row count and the
//! sum (mod 2^64) of a 64-bit hash of each event id: the first 8 bytes of `md5(<uuid text>)` as a
//! big-endian signed integer ([`id_hash`]), which PostgreSQL (`('x'||substr(md5(..),1,16))::bit(64)::int8`)
//! and ClickHouse (`reinterpretAsInt64(reverse(substring(MD5(..),1,8)))`) compute identically. No
//! event rows travel while windows match.
//!
//! An event is only compared once the live relay has passed it: the outbox is read in a snapshot
//! S, and ClickHouse only after the slot's confirmed position passed the WAL position read right
//! after S was taken (the fence of [`crate::ops::replay`]). Rows ClickHouse holds that S does not see
//! (committed since) are looked up in the outbox again before they are called extra.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::{Client, Transaction};
use tracing::{info, warn};

use crate::config::Config;
use crate::ops::replay::{self, ReplayError, ReplayReport};
use crate::pg::{self, PgError};
use crate::sink::{ClickHouseSink, SinkError, quote_ch_ident, quote_ch_literal};
use crate::store::schema::{dead_letters_table, outbox_table};

/// A window with at most this many rows (both sides together) is compared id by id; a larger
/// differing one is grouped by id hash buckets first (at most 2^[`MAX_BUCKET_BITS`]).
const NARROW_ROWS: u64 = 20_000;
const MAX_BUCKET_BITS: u32 = 16;
/// Ids read per query when comparing id by id.
const ID_PAGE: usize = 5_000;

/// The 64-bit hash of an event id both databases compute: the first 8 bytes of the MD5 of its
/// text (lower-case, hyphenated) as a big-endian signed integer.
pub fn id_hash(id_text: &str) -> i64 {
    use md5::Digest;
    let digest = md5::Md5::digest(id_text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// PostgreSQL's expression of [`id_hash`] for the outbox row `o`.
pub const PG_HASH: &str = "('x' || substr(md5(o.event_id::text), 1, 16))::bit(64)::int8";
/// ClickHouse's expression of [`id_hash`].
pub const CH_HASH: &str = "reinterpretAsInt64(reverse(substring(MD5(toString(event_id)), 1, 8)))";

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(transparent)]
    ClickHouse(#[from] SinkError),
    #[error("repair failed: {0}")]
    Repair(#[from] ReplayError),
    #[error(
        "the live relay has not confirmed WAL position {fence} within {waited_s} s (slot {slot:?} \
         is at {confirmed}): verify compares only events the relay has passed. Start \
         `outbox-relay run` (or let it catch up), or give it more time with --wait-s"
    )]
    FenceTimeout {
        fence: String,
        slot: String,
        confirmed: String,
        waited_s: u64,
    },
    #[error("{0}")]
    Range(String),
}

/// The time range to verify, in Unix microseconds of `event_date_time`: `[from_us, until_us)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Range {
    pub from_us: i64,
    pub until_us: i64,
}

/// An event ClickHouse holds for this source that it should not: a duplicate, or an id the
/// outbox does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Extra {
    pub event_id: String,
    /// Rows ClickHouse holds with this id (for this source).
    pub rows: u64,
    /// `duplicate` (the outbox holds it once) or `unknown` (the outbox does not hold it).
    pub kind: &'static str,
}

/// A window whose count or checksum differed.
#[derive(Debug, Clone, Serialize)]
pub struct DifferingWindow {
    pub from: String,
    pub until: String,
    pub outbox_events: u64,
    pub clickhouse_rows: u64,
    pub missing: u64,
    pub extra: u64,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub source: String,
    pub from: String,
    pub until: String,
    pub window_seconds: u64,
    /// Windows holding events on either side (empty windows are not listed).
    pub windows: u64,
    pub outbox_events: u64,
    pub clickhouse_rows: u64,
    pub differing_windows: Vec<DifferingWindow>,
    /// Event ids the outbox holds and ClickHouse does not, sorted.
    pub missing: Vec<String>,
    /// Duplicates and rows the outbox does not hold, sorted by id.
    pub extra: Vec<Extra>,
    /// Rows of other sources in the same table and range (not checked: their outbox is
    /// elsewhere), by source.
    pub other_sources: Vec<(String, u64)>,
    /// Up to where (Unix µs) every window is proven complete: the start of the first differing
    /// window, or the end of the range.
    pub verified_through_us: i64,
    /// What `--repair` re-shipped.
    pub repair: Option<ReplayReport>,
}

impl VerifyReport {
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty()
    }
}

/// Unix µs as RFC 3339 (UTC, microseconds).
pub fn format_us(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `--since`/`--until`: RFC 3339 (`2026-11-28T04:00:00Z`, offset or `Z` required) or an
/// age like `90m`, `6h`, `2d`, `30s` (that long before `now_us`).
pub fn parse_time(text: &str, now_us: i64) -> Result<i64, String> {
    let text = text.trim();
    let bad = || {
        format!(
            "{text:?} is not a time: use RFC 3339 (2026-11-28T04:00:00Z) or an age like 30s, 90m, \
             6h, 2d"
        )
    };
    if let Some(unit) = text.chars().last().filter(|c| c.is_ascii_alphabetic())
        && let Ok(n) = text[..text.len() - 1].parse::<i64>()
    {
        let secs = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        return Ok(now_us - n.saturating_mul(secs).saturating_mul(1_000_000));
    }
    // YYYY-MM-DDTHH:MM:SS[.ffffff](Z|±HH:MM)
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| text.get(r).and_then(|s| s.parse::<i64>().ok());
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(s)) = (
        num(0..4),
        num(5..7),
        num(8..10),
        num(11..13),
        num(14..16),
        num(17..19),
    ) else {
        return Err(bad());
    };
    let mut rest = &text[19..];
    let mut micros = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.chars().take_while(|c| c.is_ascii_digit()).count();
        let padded = format!("{:0<6}", &frac[..digits.min(6)]);
        micros = padded.parse::<i64>().map_err(|_| bad())?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let (Some(oh), Some(om)) = (o[1..3].parse::<i64>().ok(), o[4..6].parse::<i64>().ok())
            else {
                return Err(bad());
            };
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err(bad());
    }
    let days = crate::outbox::days_from_civil(y, mo, d).ok_or_else(bad)?;
    Ok(((days * 86_400 + h * 3600 + mi * 60 + s - offset) * 1_000_000) + micros)
}

/// `'epoch' + us` as a PostgreSQL timestamptz expression of parameter `$n` (µs, int8), exact.
fn pg_time(n: usize) -> String {
    format!(
        "('epoch'::timestamptz + (${n}::int8 / 1000000) * interval '1 second' \
          + (${n}::int8 % 1000000) * interval '1 microsecond')"
    )
}

/// Per window: (index, count, hash sum mod 2^64).
type Sums = HashMap<i64, (u64, i64)>;

/// One verification pass's connections and settings.
struct Checker<'a> {
    config: &'a Config,
    sink: &'a ClickHouseSink,
    table: String,
    source_filter: String,
}

impl Checker<'_> {
    fn outbox_where(&self) -> String {
        format!(
            "o.event_date_time >= {} AND o.event_date_time < {}
             AND NOT EXISTS (SELECT 1 FROM {} d WHERE d.event_id::text = o.event_id::text
                                AND d.shipped_at IS NULL)",
            pg_time(1),
            pg_time(2),
            dead_letters_table(self.config)
        )
    }

    async fn pg_sums(
        &self,
        tx: &Transaction<'_>,
        range: Range,
        width: i64,
    ) -> Result<Sums, PgError> {
        let sql = format!(
            "SELECT ((floor(extract(epoch FROM o.event_date_time) * 1000000)::int8 - $1) / $3)::int8,
                    count(*)::int8, sum({PG_HASH})::text
               FROM {} o WHERE {} GROUP BY 1",
            outbox_table(self.config),
            self.outbox_where()
        );
        let rows = tx
            .query(&sql, &[&range.from_us, &range.until_us, &width])
            .await
            .map_err(PgError::query("verify outbox sums"))?;
        let mut sums = Sums::new();
        for row in rows {
            let (w, n, sum): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
            // The exact sum, reduced mod 2^64 as ClickHouse's Int64 sum wraps.
            let wrapped = sum.parse::<i128>().map(|v| v as i64).unwrap_or_default();
            sums.insert(w, (n as u64, wrapped));
        }
        Ok(sums)
    }

    fn ch_where(&self, range: Range) -> String {
        format!(
            "{} AND event_date_time >= fromUnixTimestamp64Micro(toInt64({}), 'UTC')
                AND event_date_time < fromUnixTimestamp64Micro(toInt64({}), 'UTC')",
            self.source_filter, range.from_us, range.until_us
        )
    }

    async fn ch_sums(&self, range: Range, width: i64) -> Result<Sums, SinkError> {
        let sql = format!(
            "SELECT toInt64(intDiv(toUnixTimestamp64Micro(event_date_time) - toInt64({}), toInt64({width}))),
                    count(), sum({CH_HASH})
               FROM {} WHERE {} GROUP BY 1",
            range.from_us,
            self.table,
            self.ch_where(range)
        );
        let rows: Vec<(i64, u64, i64)> = self.sink.fetch_all(&sql).await?;
        Ok(rows.into_iter().map(|(w, n, s)| (w, (n, s))).collect())
    }

    /// `(bucket, count, hash sum)` per bucket of the ids' top `bits` hash bits in `range`.
    async fn pg_buckets(
        &self,
        tx: &Transaction<'_>,
        range: Range,
        bits: u32,
    ) -> Result<Sums, PgError> {
        let sql = format!(
            "SELECT {}, count(*)::int8, sum({PG_HASH})::text FROM {} o WHERE {} GROUP BY 1",
            pg_bucket(bits),
            outbox_table(self.config),
            self.outbox_where()
        );
        let rows = tx
            .query(&sql, &[&range.from_us, &range.until_us])
            .await
            .map_err(PgError::query("verify outbox buckets"))?;
        Ok(rows
            .iter()
            .map(|row| {
                let (b, n, sum): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
                let wrapped = sum.parse::<i128>().map(|v| v as i64).unwrap_or_default();
                (b, (n as u64, wrapped))
            })
            .collect())
    }

    async fn ch_buckets(&self, range: Range, bits: u32) -> Result<Sums, SinkError> {
        let sql = format!(
            "SELECT {}, count(), sum({CH_HASH}) FROM {} WHERE {} GROUP BY 1",
            ch_bucket(bits),
            self.table,
            self.ch_where(range)
        );
        let rows: Vec<(i64, u64, i64)> = self.sink.fetch_all(&sql).await?;
        Ok(rows.into_iter().map(|(b, n, s)| (b, (n, s))).collect())
    }

    /// The outbox ids in `range` (in these buckets of `bits` bits, when given).
    async fn pg_ids(
        &self,
        tx: &Transaction<'_>,
        range: Range,
        bits: u32,
        buckets: Option<&[i64]>,
    ) -> Result<HashSet<String>, PgError> {
        let filter = match buckets {
            Some(_) => format!(" AND {} = ANY($3::int8[])", pg_bucket(bits)),
            None => String::new(),
        };
        let sql = format!(
            "SELECT o.event_id::text FROM {} o WHERE {}{filter}",
            outbox_table(self.config),
            self.outbox_where()
        );
        let rows = match buckets {
            Some(b) => tx.query(&sql, &[&range.from_us, &range.until_us, &b]).await,
            None => tx.query(&sql, &[&range.from_us, &range.until_us]).await,
        }
        .map_err(PgError::query("verify outbox ids"))?;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    async fn ch_ids(
        &self,
        range: Range,
        bits: u32,
        buckets: Option<&[i64]>,
    ) -> Result<HashMap<String, u64>, SinkError> {
        let filter = match buckets {
            Some(b) => format!(
                " AND {} IN ({})",
                ch_bucket(bits),
                b.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            ),
            None => String::new(),
        };
        let sql = format!(
            "SELECT toString(event_id), count() FROM {} WHERE {}{filter} GROUP BY event_id",
            self.table,
            self.ch_where(range)
        );
        let rows: Vec<(String, u64)> = self.sink.fetch_all(&sql).await?;
        Ok(rows.into_iter().collect())
    }

    /// The missing and extra ids of a differing window. A large window is first grouped by the
    /// top bits of the id hash (uniform whatever the times, so one pass finds the differing
    /// buckets of about `NARROW_ROWS / 4` rows); then the ids of the window, or of its
    /// differing buckets, are compared one by one.
    async fn narrow(
        &self,
        tx: &Transaction<'_>,
        range: Range,
        rows: u64,
        found: &mut (Vec<String>, Vec<(String, u64)>),
    ) -> Result<(), VerifyError> {
        let bits = if rows <= NARROW_ROWS {
            0
        } else {
            rows.div_ceil(NARROW_ROWS / 4)
                .next_power_of_two()
                .trailing_zeros()
                .min(MAX_BUCKET_BITS)
        };
        let buckets = if bits == 0 {
            None
        } else {
            let pg = self.pg_buckets(tx, range, bits).await?;
            let ch = self.ch_buckets(range, bits).await?;
            let mut keys: Vec<i64> = pg.keys().chain(ch.keys()).copied().collect();
            keys.sort_unstable();
            keys.dedup();
            keys.retain(|k| {
                pg.get(k).copied().unwrap_or_default() != ch.get(k).copied().unwrap_or_default()
            });
            if keys.is_empty() {
                return Ok(());
            }
            Some(keys)
        };
        let pg = self.pg_ids(tx, range, bits, buckets.as_deref()).await?;
        let ch = self.ch_ids(range, bits, buckets.as_deref()).await?;
        found
            .0
            .extend(pg.iter().filter(|id| !ch.contains_key(*id)).cloned());
        found
            .1
            .extend(ch.into_iter().filter(|(id, n)| *n > 1 || !pg.contains(id)));
        Ok(())
    }
}

/// The top `bits` bits of [`id_hash`] as a number, in PostgreSQL (arithmetic shift, masked).
fn pg_bucket(bits: u32) -> String {
    format!("(({PG_HASH} >> {}) & {})", 64 - bits, (1i64 << bits) - 1)
}

/// The same in ClickHouse (logical shift of the unsigned hash).
fn ch_bucket(bits: u32) -> String {
    format!(
        "toInt64(bitAnd(bitShiftRight(reinterpretAsUInt64(reverse(substring(MD5(toString(event_id)), 1, 8))), {}), {}))",
        64 - bits,
        (1u64 << bits) - 1
    )
}

/// Waits until the slot's confirmed position passes `fence` (replay's wait, with verify's own
/// message when it times out).
async fn wait_for_fence(
    client: &Client,
    config: &Config,
    fence: &str,
    wait: Duration,
) -> Result<(), VerifyError> {
    match crate::ops::replay::wait_for_fence(client, config, fence, wait).await {
        Err(ReplayError::FenceTimeout {
            fence,
            slot,
            confirmed,
            waited_s,
        }) => Err(VerifyError::FenceTimeout {
            fence,
            slot,
            confirmed,
            waited_s,
        }),
        Err(ReplayError::Postgres(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(()),
    }
}

/// What to verify and how.
#[derive(Debug, Clone)]
pub struct Options {
    pub range: Range,
    /// Window width in µs.
    pub window_us: i64,
    /// How long to wait for the live relay to pass the snapshot.
    pub wait: Duration,
    pub repair: bool,
}

/// The range `--from-lsn` means: from the oldest `event_date_time` of an outbox row committed
/// after `from` (as `replay` chooses them: not visible in the newest checkpoint's snapshot at or
/// before it) to the end of time. `None` when there is no such row.
pub async fn range_from_lsn(
    config: &Config,
    from: pgoutput::Lsn,
) -> Result<Option<i64>, VerifyError> {
    let client = pg::connect(&config.postgres_url).await?;
    let snapshot = replay::base_snapshot(&client, config, from)
        .await
        .map_err(VerifyError::Repair)?
        .map(|(s, _)| s);
    let sql = format!(
        "SELECT floor(extract(epoch FROM min(o.event_date_time)) * 1000000)::int8 FROM {} o
          WHERE ($1::text IS NULL OR NOT pg_visible_in_snapshot({}, $1::text::pg_snapshot))",
        outbox_table(config),
        replay::XID8
    );
    let row = client
        .query_one(&sql, &[&snapshot])
        .await
        .map_err(PgError::query("verify range"))?;
    Ok(row.get(0))
}

/// The default range: the retained outbox (from one window past the purge horizon, so a window
/// the purge is deleting from is not compared) to the end of time.
pub fn default_range(config: &Config, now_us: i64, window_us: i64) -> Range {
    let from_us = if config.outbox_retention_hours == 0 {
        i64::MIN / 4
    } else {
        let horizon = now_us - config.outbox_retention_hours as i64 * 3_600_000_000;
        (horizon.div_euclid(window_us) + 1) * window_us
    };
    Range {
        from_us,
        // The outbox's CHECK allows times up to 2300-01-01.
        until_us: 10_413_792_000_000_000,
    }
}

/// Compares the range window by window; with `repair`, re-ships the missing events.
pub async fn verify(
    config: &Config,
    sink: &ClickHouseSink,
    options: &Options,
) -> Result<VerifyReport, VerifyError> {
    let mut range = options.range;
    if range.until_us <= range.from_us {
        return Err(VerifyError::Range(format!(
            "the range is empty: --until ({}) must be after --since ({})",
            format_us(range.until_us),
            format_us(range.from_us)
        )));
    }
    let control = pg::connect(&config.postgres_url).await?;
    let mut reader = pg::connect(&config.postgres_url).await?;
    let tx = pg::read_snapshot(&mut reader, "verify snapshot").await?;
    // The first statement takes the snapshot; the fence is read after it. An open-ended range
    // starts at the oldest row, so windows are aligned to something near the data.
    let row = tx
        .query_one(
            &format!(
                "SELECT floor(extract(epoch FROM min(event_date_time)) * 1000000)::int8 FROM {}",
                outbox_table(config)
            ),
            &[],
        )
        .await
        .map_err(PgError::query("verify snapshot"))?;
    let oldest: Option<i64> = row.get(0);
    let fence = pg::wal_position(&tx, "verify snapshot").await?;
    if range.from_us == i64::MIN / 4 {
        range.from_us = oldest
            .map(|o| o.div_euclid(options.window_us) * options.window_us)
            .unwrap_or(range.until_us - options.window_us)
            .min(range.until_us - 1);
    }
    wait_for_fence(&control, config, &fence, options.wait).await?;

    let checker = Checker {
        config,
        sink,
        table: quote_ch_ident(&config.clickhouse_table),
        source_filter: format!("source IN ({}, '')", quote_ch_literal(sink.source())),
    };
    let width = options.window_us;
    let pg_sums = checker.pg_sums(&tx, range, width).await?;
    let ch_sums = checker.ch_sums(range, width).await?;
    let mut report = VerifyReport {
        source: sink.source().to_string(),
        from: format_us(range.from_us),
        until: format_us(range.until_us),
        window_seconds: (width / 1_000_000) as u64,
        verified_through_us: range.until_us,
        ..VerifyReport::default()
    };
    let mut windows: Vec<i64> = pg_sums.keys().chain(ch_sums.keys()).copied().collect();
    windows.sort_unstable();
    windows.dedup();
    report.windows = windows.len() as u64;
    for w in windows {
        let (p, c) = (
            pg_sums.get(&w).copied().unwrap_or_default(),
            ch_sums.get(&w).copied().unwrap_or_default(),
        );
        report.outbox_events += p.0;
        report.clickhouse_rows += c.0;
        if p == c {
            continue;
        }
        let from_us = range.from_us + w * width;
        let window = Range {
            from_us,
            until_us: (from_us + width).min(range.until_us),
        };
        let mut found = (Vec::new(), Vec::new());
        checker.narrow(&tx, window, p.0 + c.0, &mut found).await?;
        let (missing, extra) = found;
        // Rows committed after the snapshot are in ClickHouse but not in it: look again.
        let extra = settle_extras(&control, config, extra).await?;
        if missing.is_empty() && extra.is_empty() {
            continue;
        }
        report.verified_through_us = report.verified_through_us.min(window.from_us);
        report.differing_windows.push(DifferingWindow {
            from: format_us(window.from_us),
            until: format_us(window.until_us),
            outbox_events: p.0,
            clickhouse_rows: c.0,
            missing: missing.len() as u64,
            extra: extra.len() as u64,
        });
        report.missing.extend(missing);
        report.extra.extend(extra);
    }
    drop(tx);
    report.missing.sort();
    report.extra.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    let others = format!(
        "SELECT toString(source), count() FROM {} WHERE NOT ({}) AND event_date_time >= \
         fromUnixTimestamp64Micro(toInt64({}), 'UTC') AND event_date_time < \
         fromUnixTimestamp64Micro(toInt64({}), 'UTC') GROUP BY source ORDER BY source",
        checker.table, checker.source_filter, range.from_us, range.until_us
    );
    report.other_sources = sink.fetch_all(&others).await?;
    if options.repair && !report.missing.is_empty() {
        report.repair =
            Some(replay::reship_ids(config, sink, &report.missing, options.wait).await?);
    }
    Ok(report)
}

/// Extras as reported: duplicates of outbox rows, and ids the outbox does not hold now (an id
/// S did not see may have been committed since).
async fn settle_extras(
    client: &Client,
    config: &Config,
    extra: Vec<(String, u64)>,
) -> Result<Vec<Extra>, PgError> {
    let mut settled = Vec::new();
    for page in extra.chunks(ID_PAGE) {
        let ids: Vec<&str> = page.iter().map(|(id, _)| id.as_str()).collect();
        let held: HashSet<String> = client
            .query(
                &format!(
                    "SELECT o.event_id::text FROM {} o WHERE o.event_id::text = ANY($1)",
                    outbox_table(config)
                ),
                &[&ids],
            )
            .await
            .map_err(PgError::query("verify extra ids"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (id, rows) in page {
            let kind = if held.contains(id) {
                if *rows < 2 {
                    continue;
                }
                "duplicate"
            } else {
                "unknown"
            };
            settled.push(Extra {
                event_id: id.clone(),
                rows: *rows,
                kind,
            });
        }
    }
    Ok(settled)
}

/// The background verifier of `run`: every `verify_interval_s`, verifies the windows of the last
/// `verify_lookback_hours` (within the retention) that ended at least `verify_grace_s` ago.
pub async fn verify_forever(config: Config, gauges: Arc<crate::metrics::Metrics>) {
    if config.verify_interval_s == 0 {
        return;
    }
    let grace = Duration::from_secs(config.verify_grace_s);
    // The first pass after one grace period: the relay has started streaming by then.
    tokio::time::sleep(grace.min(Duration::from_secs(config.verify_interval_s))).await;
    let mut every = tokio::time::interval(Duration::from_secs(config.verify_interval_s));
    let mut sink: Option<ClickHouseSink> = None;
    loop {
        every.tick().await;
        let gauges = &gauges.verify;
        match verify_pass(&config, &mut sink).await {
            Ok(mut report) => {
                for w in &report.differing_windows {
                    warn!(
                        from = %w.from, until = %w.until, missing = w.missing, extra = w.extra,
                        outbox_events = w.outbox_events, clickhouse_rows = w.clickhouse_rows,
                        "verify: window differs between the outbox and ClickHouse; see `outbox-relay verify`"
                    );
                }
                // Repaired after the differing windows are logged, so the log shows the loss
                // before its repair.
                if config.verify_repair
                    && !report.missing.is_empty()
                    && let Some(sink) = &sink
                {
                    let wait = Duration::from_secs(config.verify_grace_s.max(30));
                    match replay::reship_ids(&config, sink, &report.missing, wait).await {
                        Ok(r) => report.repair = Some(r),
                        Err(e) => warn!(error = %e, "verify: repair failed; will try again"),
                    }
                }
                gauges
                    .verified_through_us
                    .store(report.verified_through_us, Relaxed);
                let repaired = report.repair.as_ref().map_or(0, |r| r.shipped);
                gauges.missing.store(
                    (report.missing.len() as u64).saturating_sub(repaired),
                    Relaxed,
                );
                gauges.extra.store(report.extra.len() as u64, Relaxed);
                if let Some(r) = &report.repair {
                    info!(
                        shipped = r.shipped,
                        already_there = r.already_there,
                        "verify: missing events re-shipped"
                    );
                }
            }
            Err(e) => {
                gauges.errors.fetch_add(1, Relaxed);
                warn!(error = %e, "verify pass could not check; will try again");
            }
        }
    }
}

async fn verify_pass(
    config: &Config,
    sink: &mut Option<ClickHouseSink>,
) -> Result<VerifyReport, VerifyError> {
    if sink.is_none() {
        let client = pg::connect(&config.postgres_url).await?;
        let source = pg::source_identity(&client, config).await?;
        let writer = format!("{}-verify", config.slot);
        let made = ClickHouseSink::from_config(config, &writer)
            .map_err(|e| PgError::NotReady(e.to_string()))?
            .with_source(source);
        *sink = Some(made);
    }
    let Some(sink) = sink.as_ref() else {
        return Err(VerifyError::Range("no ClickHouse sink".into()));
    };
    let now = crate::metrics::unix_now_us();
    let window_us = config.verify_window_s as i64 * 1_000_000;
    let until_us = now - config.verify_grace_s as i64 * 1_000_000;
    let mut from_us = until_us - config.verify_lookback_hours as i64 * 3_600_000_000;
    if config.outbox_retention_hours > 0 {
        from_us = from_us.max(default_range(config, now, window_us).from_us);
    }
    let options = Options {
        range: Range {
            from_us: from_us.min(until_us - 1),
            until_us,
        },
        window_us,
        wait: Duration::from_secs(config.verify_grace_s.max(30)),
        // verify_forever repairs after logging.
        repair: false,
    };
    verify(config, sink, &options).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hash_is_the_first_8_md5_bytes_big_endian() {
        // Computed independently (Python: int.from_bytes(md5(s).digest()[:8], 'big',
        // signed=True)); tests/e2e/verify.rs checks PostgreSQL and ClickHouse against id_hash.
        assert_eq!(
            id_hash("00000000-0000-0000-0000-000000000000"),
            -6950804328280008906
        );
        assert_eq!(
            id_hash("0b7d1f3e-8e3c-4f0b-9a63-2f8f8c1d2e4a"),
            -7428792537869403823
        );
    }

    #[test]
    fn times_round_trip() {
        let now = 1_700_000_000_123_456;
        assert_eq!(format_us(now), "2023-11-14T22:13:20.123456Z");
        assert_eq!(parse_time("2023-11-14T22:13:20.123456Z", 0), Ok(now));
        assert_eq!(parse_time("2023-11-14T23:13:20.123456+01:00", 0), Ok(now));
        assert_eq!(parse_time("2h", now), Ok(now - 7_200_000_000));
        assert!(parse_time("yesterday", now).is_err());
        assert_eq!(format_us(0), "1970-01-01T00:00:00.000000Z");
    }
}
