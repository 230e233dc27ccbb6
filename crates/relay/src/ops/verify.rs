//! Completeness you can prove: compares the outbox rows PostgreSQL holds with the rows ClickHouse
//! holds for this outbox's source, window by window, and narrows a differing window down to the
//! exact missing and extra event ids (docs/guarantees.md, "What `verify` proves").
//!
//! Windows are ranges of `event_date_time`, the one time both sides store (the outbox has no
//! commit time, ClickHouse no xmin): the outbox's BRIN index and ClickHouse's monthly partitions
//! and sort key serve exactly such ranges, and the purge deletes by it, so the retained range is
//! a range of windows too. Per window each database computes, by itself, the row count and the
//! sum (mod 2^64) of a 64-bit hash of each event id: PostgreSQL's own `uuid_hash_extended(id, 0)`
//! (lookup3; [`id_hash`] in Rust, [`ch_hashed`] in ClickHouse, the steps written once). No
//! event rows travel while windows match.
//!
//! An event is only compared once the live relay has passed it: the outbox is read in a snapshot
//! S, and ClickHouse only after the slot's confirmed position passed the WAL insert position read
//! right after S was taken (the fence of [`crate::ops::replay`]). That position is also the cut:
//! ClickHouse's rows are compared when their `commit_lsn` is below it (a transaction committed at
//! or past it committed after S), so the rows the relay ships while a pass runs are neither
//! missing nor extra. The few a race leaves on the wrong side (committed below the cut but not
//! seen by S: their commit was being written while S was taken) are accounted for before a
//! window is narrowed ([`Checker::race`]), and rows ClickHouse holds that S does not see are
//! looked up in the outbox again before they are called extra.
//!
//! The background verifier carries sums from pass to pass ([`Memory`]) so a pass hashes only the
//! rows that came since the last one: on the outbox's side the rows of transactions below the
//! last snapshot's xmin (no later transaction adds to them; the rows of later ones are looked for
//! from the time those began, and every window is re-hashed in full in turn), on ClickHouse's the
//! rows below the last cut (their count and `commit_lsn` sum per window and the table's
//! mutations, read every pass, show any change; a changed window is hashed in full).

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
use crate::sink::{ClickHouseSink, OURS, SinkError, TABLE};
use crate::store::schema::{dead_letters_table, outbox_table};

/// A window with at most this many rows (both sides together) is compared id by id; a larger
/// differing one is grouped by id hash buckets first (at most 2^[`MAX_BUCKET_BITS`]).
const NARROW_ROWS: u64 = 20_000;
const MAX_BUCKET_BITS: u32 = 16;
/// Ids read per query when comparing id by id.
const ID_PAGE: usize = 5_000;
/// Most rows committed while a pass took its snapshot that a differing window's ids are looked
/// up for before it is narrowed.
const RACE_IDS: usize = 50_000;

/// The 64-bit hash of an event id both databases compute: PostgreSQL's
/// `uuid_hash_extended(id, 0)`, Bob Jenkins' lookup3 over the id's 16 bytes (PostgreSQL's
/// `hash_bytes_extended` on a little-endian server), which costs PostgreSQL about as much as
/// reading the row (md5 of the id's text cost it 0.85 µs a row); ClickHouse computes the same
/// steps column by column ([`ch_hashed`]). The steps live here once, in [`MIX`] and [`FINAL`].
pub fn id_hash(id: &[u8; 16]) -> i64 {
    let word = |i: usize| u32::from_le_bytes([id[i], id[i + 1], id[i + 2], id[i + 3]]);
    let mut v = [0, 4, 8].map(|i| HASH_INIT.wrapping_add(word(i)));
    for (x, y, z, k) in MIX {
        v[x] = v[x].wrapping_sub(v[z]) ^ v[z].rotate_left(k);
        v[z] = v[z].wrapping_add(v[y]);
    }
    v[0] = v[0].wrapping_add(word(12));
    for (x, y, k) in FINAL {
        v[x] = (v[x] ^ v[y]).wrapping_sub(v[y].rotate_left(k));
    }
    ((u64::from(v[1]) << 32) | u64::from(v[2])) as i64
}

/// [`id_hash`] of an id as text (`None`: not a UUID).
pub fn id_hash_text(id: &str) -> Option<i64> {
    crate::event::parse_uuid(id).map(|bytes| id_hash(&bytes))
}

/// lookup3's starting state for a 16-byte key and seed 0: `0x9e3779b9 + 16 + 3923095`.
const HASH_INIT: u32 = 0x9e37_79b9_u32.wrapping_add(16).wrapping_add(3_923_095);
/// lookup3's `mix()` of the state (a, b, c) = (0, 1, 2), a line each: `x = (x - z) ^ rot(z, k);
/// z = z + y`.
const MIX: [(usize, usize, usize, u32); 6] = [
    (0, 1, 2, 4),
    (1, 2, 0, 6),
    (2, 0, 1, 8),
    (0, 1, 2, 16),
    (1, 2, 0, 19),
    (2, 0, 1, 4),
];
/// lookup3's `final()`, a line each: `x = (x ^ y) - rot(y, k)`.
const FINAL: [(usize, usize, u32); 7] = [
    (2, 1, 14),
    (0, 2, 11),
    (1, 0, 25),
    (2, 1, 16),
    (0, 2, 4),
    (1, 0, 14),
    (2, 1, 24),
];

/// PostgreSQL's expression of [`id_hash`] for the outbox row `o`.
pub const PG_HASH: &str = "uuid_hash_extended(o.event_id, 0)";

/// A ClickHouse subquery over the rows of `table` matching `filter`: the `payload` columns
/// (`(expression, name)`) and `_h`, the [`id_hash`] of `event_id`. One nested query a step of
/// [`MIX`] and [`FINAL`], each over the previous one's columns: the steps written as one
/// expression would reuse each other's results so often that ClickHouse's query tree (aliases
/// are expanded) would grow past its limit. About 0.15 µs a row.
pub fn ch_hashed(payload: &[(&str, &str)], table: &str, filter: &str) -> String {
    // Each level selects the payload's names, then its own columns.
    let level = |own: Vec<String>, from: &str| {
        let cols: Vec<String> = payload
            .iter()
            .map(|(_, name)| name.to_string())
            .chain(own)
            .collect();
        format!("SELECT {} FROM {from}", cols.join(", "))
    };
    let mut sql = format!(
        "SELECT {} FROM {table} WHERE {filter}",
        payload
            .iter()
            .map(|(e, n)| format!("{e} AS {n}, "))
            .collect::<String>()
            + "UUIDStringToNum(toString(event_id)) AS _id"
    );
    let word = |i: usize| format!("reinterpretAsUInt32(substring(_id, {}, 4))", 1 + 4 * i);
    let mut own: Vec<String> = (0..3)
        .map(|x| {
            format!(
                "toUInt32(plus(toUInt32({HASH_INIT}), {})) AS _v{x}_0",
                word(x)
            )
        })
        .collect();
    own.push(format!("{} AS _w3", word(3)));
    sql = level(own, &format!("({sql})"));
    let mut v = ["_v0_0", "_v1_0", "_v2_0"].map(String::from);
    let mut step = 0;
    // One level: `set` gives some of a, b, c new values from the previous level's.
    let mut next = |sql: &mut String, v: &mut [String; 3], set: Vec<(usize, String)>| {
        step += 1;
        let mut own = Vec::new();
        for (x, name) in v.iter_mut().enumerate() {
            match set.iter().find(|(y, _)| *y == x) {
                Some((_, e)) => {
                    *name = format!("_v{x}_{step}");
                    own.push(format!("{e} AS {name}"));
                }
                None => own.push(name.clone()),
            }
        }
        own.push("_w3".into());
        *sql = level(own, &format!("({sql})"));
    };
    for (x, y, z, k) in MIX {
        let set = vec![
            (
                x,
                format!(
                    "bitXor(toUInt32(minus({}, {})), bitRotateLeft({}, {k}))",
                    v[x], v[z], v[z]
                ),
            ),
            (z, format!("toUInt32(plus({}, {}))", v[z], v[y])),
        ];
        next(&mut sql, &mut v, set);
    }
    let set = vec![(0, format!("toUInt32(plus({}, _w3))", v[0]))];
    next(&mut sql, &mut v, set);
    for (x, y, k) in FINAL {
        let set = vec![(
            x,
            format!(
                "toUInt32(minus(bitXor({}, {}), bitRotateLeft({}, {k})))",
                v[x], v[y], v[y]
            ),
        )];
        next(&mut sql, &mut v, set);
    }
    let h = format!(
        "reinterpretAsInt64(bitOr(bitShiftLeft(toUInt64({}), 32), toUInt64({}))) AS _h",
        v[1], v[2]
    );
    format!("({})", level(vec![h], &format!("({sql})")))
}

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
    #[error(
        "{server} hashes event ids differently from this relay (the hash of {PROBE_ID} is \
         {got} there, the relay computes {relay}): a big-endian server, or a ClickHouse that \
         evaluates 32-bit arithmetic differently? verify cannot compare checksums with it; set \
         verify_interval_s = 0 and report the server's version"
    )]
    HashDiffers {
        server: &'static str,
        got: i64,
        relay: i64,
    },
}

/// The id whose hash each pass asks PostgreSQL for before it trusts [`PG_HASH`].
const PROBE_ID: &str = "00112233-4455-6677-8899-aabbccddeeff";

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
    /// Rows whose id this comparison hashed, on both sides together (the background
    /// verifier's cost: after its first pass, the rows that came since the last one).
    #[serde(skip)]
    pub hashed_rows: u64,
    /// Windows compared id by id (their sums differed after the race was accounted for).
    #[serde(skip)]
    pub narrowed_windows: u64,
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

/// Per bucket: (count, hash sum mod 2^64).
type Sums = HashMap<i64, (u64, i64)>;

/// Outbox rows of one window: all of them, and those not dead-lettered (count, hash sum mod
/// 2^64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PgPart {
    total: u64,
    n: u64,
    sum: i64,
}

impl PgPart {
    fn add(self, o: PgPart) -> PgPart {
        PgPart {
            total: self.total + o.total,
            n: self.n + o.n,
            sum: self.sum.wrapping_add(o.sum),
        }
    }
}

/// Per window start (Unix µs), the outbox rows the snapshot sees, by their inserting
/// transaction's xid: `[0]` below the remembered pass's xmin (only `total` is computed: the
/// remembered sums cover them), `[1]` from there to this snapshot's xmin (settled: no later
/// transaction can add to them), `[2]` the rest (not settled yet).
type PgSums = HashMap<i64, [PgPart; 3]>;

/// ClickHouse rows of one window: count, sum of `commit_lsn` (a signature read from cheap
/// columns) and sum of the id hash (mod 2^64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ChPart {
    n: u64,
    fp: u64,
    sum: i64,
}

impl ChPart {
    fn add(self, o: ChPart) -> ChPart {
        ChPart {
            n: self.n + o.n,
            fp: self.fp.wrapping_add(o.fp),
            sum: self.sum.wrapping_add(o.sum),
        }
    }
}

/// ClickHouse rows of one window by `commit_lsn`.
#[derive(Debug, Clone, Copy, Default)]
struct ChWindow {
    /// Below the remembered pass's cut: count and `commit_lsn` sum only.
    old: (u64, u64),
    /// From there to this pass's cut (everything, when not cut).
    new: ChPart,
    /// At or past this pass's cut (committed after the snapshot): count and the largest.
    after: (u64, u64),
}

/// Rows per second of `verify_interval_s` the background verifier re-hashes in full on the
/// outbox's side, oldest window first, round the range (docs/guarantees.md).
pub const RESWEEP_ROWS_PER_S: u64 = 10_000;

/// Margin below the start time of the passes before a transaction's xid, for the
/// `event_date_time` of its rows (a default taken just before the xid was assigned).
const XID_TIME_MARGIN_US: i64 = 2_000_000;

/// What the background verifier carries from one pass to the next so a pass hashes only what
/// came: per window, the outbox's sums over its settled rows (of transactions below the last
/// snapshot's xmin: no later transaction adds to them) and ClickHouse's sums over the rows below
/// the last commit LSN cut. ClickHouse's are checked every pass before they are used (count and
/// `commit_lsn` sum of those rows per window, and the table's mutations); the outbox's are
/// re-hashed in full round the range, `resweep_rows` rows' worth per pass. Nothing here makes a
/// window verified: every pass compares every window.
#[derive(Debug, Default)]
pub struct Memory {
    width_us: i64,
    /// Outbox rows a pass may re-hash in full (credit that accumulates while unused).
    resweep_rows: u64,
    pg: Option<PgMemory>,
    ch: Option<ChMemory>,
    /// ClickHouse computed [`id_hash`] of [`PROBE_ID`] as the relay does.
    clickhouse_hash_checked: bool,
}

impl Memory {
    /// An empty memory re-hashing `resweep_rows` outbox rows per pass.
    pub fn new(resweep_rows: u64) -> Memory {
        Memory {
            resweep_rows,
            ..Memory::default()
        }
    }
}

#[derive(Debug)]
struct PgMemory {
    /// The snapshot's xmin (xid8): every transaction below it had ended.
    xmin: i64,
    /// (count, hash) of the unshipped dead letters then: any change forgets the sums.
    dead: (i64, i64),
    windows: HashMap<i64, PgPart>,
    /// Per pass: (its snapshot's xmax, its statement's start in Unix µs): a transaction whose
    /// xid is at or past that xmax began after that time.
    history: Vec<(i64, i64)>,
    /// Re-hash credit (rows) and the window the re-hash goes on from.
    credit: u64,
    next: i64,
}

#[derive(Debug)]
struct ChMemory {
    cut: u64,
    /// Mutations of the table then (a DELETE is one): any change re-checks every window.
    mutations: u64,
    windows: HashMap<i64, ChPart>,
}

/// One verification pass's connections and settings.
struct Checker<'a> {
    config: &'a Config,
    sink: &'a ClickHouseSink,
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

    /// Per window of `range` (rows from `scan_from` on): the rows of the snapshot by class (see
    /// [`PgSums`]); `ages` are `age()` of the remembered xmin (`i32::MAX`: none, all rows are
    /// hashed) and of this snapshot's. Rows of class 0 are left out (counted only when `ages.0`
    /// is `i32::MAX`, when there are none).
    async fn pg_sums(
        &self,
        tx: &Transaction<'_>,
        range: Range,
        width: i64,
        ages: (i32, i32),
        scan_from: i64,
    ) -> Result<PgSums, PgError> {
        let bin = format!(
            "date_bin($3::int8 * interval '1 microsecond', o.event_date_time, {})",
            pg_time(1)
        );
        // Both ages i32::MAX (`verify`, which remembers nothing): one class, no age() per row.
        let class = if ages == (i32::MAX, i32::MAX) {
            "2"
        } else {
            "(CASE WHEN age(o.xmin) > $4::int4 THEN 0 WHEN age(o.xmin) > $5::int4 THEN 1 ELSE 2 END)"
        };
        // Rows of class 0 left out; the parameters referenced either way.
        let incremental = if ages.0 == i32::MAX {
            "AND $4::int4 >= $5::int4"
        } else {
            "AND age(o.xmin) <= $4::int4"
        };
        let live = format!(
            "o.event_id::text NOT IN (SELECT d.event_id::text FROM {} d
                                       WHERE d.shipped_at IS NULL AND d.event_id IS NOT NULL)",
            dead_letters_table(self.config)
        );
        let sql = format!(
            "SELECT floor(extract(epoch FROM {bin}) * 1000000)::int8, {class}, count(*)::int8,
                    count(*) FILTER (WHERE {class} > 0 AND {live})::int8,
                    coalesce(sum(CASE WHEN {class} > 0 AND {live} THEN {PG_HASH} END), 0)::text
               FROM {} o WHERE o.event_date_time >= {} AND o.event_date_time < {}
                {incremental}
              GROUP BY {bin}, {class}",
            outbox_table(self.config),
            pg_time(6),
            pg_time(2)
        );
        let scan_from = scan_from.max(range.from_us);
        let rows = tx
            .query(
                &sql,
                &[
                    &range.from_us,
                    &range.until_us,
                    &width,
                    &ages.0,
                    &ages.1,
                    &scan_from,
                ],
            )
            .await
            .map_err(PgError::query("verify outbox sums"))?;
        let mut sums = PgSums::new();
        for row in rows {
            let (w, class, total, n, sum): (i64, i32, i64, i64, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            sums.entry(w).or_default()[class.clamp(0, 2) as usize] = PgPart {
                total: total as u64,
                n: n as u64,
                sum: wrap_sum(&sum),
            };
        }
        Ok(sums)
    }

    /// `commit_lsn` below `cut` (everything when `None`).
    fn ch_cut(cut: Option<u64>) -> String {
        cut.map_or_else(|| "1".into(), |c| format!("commit_lsn < {c}"))
    }

    fn ch_where(&self, range: Range, cut: Option<u64>) -> String {
        format!(
            "{} AND event_date_time >= fromUnixTimestamp64Micro(toInt64({}), 'UTC')
                AND event_date_time < fromUnixTimestamp64Micro(toInt64({}), 'UTC') AND {}",
            OURS,
            range.from_us,
            range.until_us,
            Self::ch_cut(cut)
        )
    }

    /// Per window start of `range`: ClickHouse's rows by `commit_lsn` (see [`ChWindow`]): below
    /// `prev` only counted and their `commit_lsn` summed, from `prev` to `cut` hashed.
    async fn ch_sums(
        &self,
        range: Range,
        width: i64,
        prev: u64,
        cut: Option<u64>,
    ) -> Result<HashMap<i64, ChWindow>, SinkError> {
        let old = format!("commit_lsn < {prev}");
        let new = format!("commit_lsn >= {prev} AND {}", Self::ch_cut(cut));
        let after = format!("NOT ({})", Self::ch_cut(cut));
        let bin = format!(
            "toInt64(intDiv(toUnixTimestamp64Micro(event_date_time) - toInt64({}), toInt64({width})))",
            range.from_us
        );
        let sql = format!(
            "SELECT {bin}, countIf({old}), sumIf(commit_lsn, {old}),
                    countIf({new}), sumIf(commit_lsn, {new}),
                    countIf({after}), maxIf(commit_lsn, {after})
               FROM {TABLE} WHERE {} GROUP BY 1",
            self.ch_where(range, None)
        );
        type Row = (i64, u64, u64, u64, u64, u64, u64);
        let rows: Vec<Row> = self.sink.fetch_all(&sql).await?;
        // The id hashes of the rows from `prev` to the cut only (the others' are remembered).
        let mut sums = HashMap::new();
        if rows.iter().any(|r| r.3 > 0) {
            let hashed = ch_hashed(
                &[(bin.as_str(), "w")],
                TABLE,
                &format!("{} AND {new}", self.ch_where(range, None)),
            );
            let sql = format!("SELECT w, sum(_h) FROM {hashed} GROUP BY w");
            sums = self
                .sink
                .fetch_all::<(i64, i64)>(&sql)
                .await?
                .into_iter()
                .collect();
        }
        Ok(rows
            .into_iter()
            .map(|(w, on, ofp, n, fp, an, amax)| {
                let sum = sums.get(&w).copied().unwrap_or_default();
                let window = ChWindow {
                    old: (on, ofp),
                    new: ChPart { n, fp, sum },
                    after: (an, amax),
                };
                (range.from_us + w * width, window)
            })
            .collect())
    }

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
                (b, (n as u64, wrap_sum(&sum)))
            })
            .collect())
    }

    async fn ch_buckets(
        &self,
        range: Range,
        bits: u32,
        cut: Option<u64>,
    ) -> Result<Sums, SinkError> {
        let sql = format!(
            "SELECT {}, count(), sum(_h) FROM {} GROUP BY 1",
            ch_bucket(bits),
            ch_hashed(&[], TABLE, &self.ch_where(range, cut))
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
        cut: Option<u64>,
    ) -> Result<HashMap<String, u64>, SinkError> {
        let sql = match buckets {
            Some(b) => format!(
                "SELECT id, count() FROM {} WHERE {} IN ({}) GROUP BY id",
                ch_hashed(
                    &[("toString(event_id)", "id")],
                    TABLE,
                    &self.ch_where(range, cut)
                ),
                ch_bucket(bits),
                b.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            ),
            None => format!(
                "SELECT toString(event_id), count() FROM {} WHERE {} GROUP BY event_id",
                TABLE,
                self.ch_where(range, cut)
            ),
        };
        let rows: Vec<(String, u64)> = self.sink.fetch_all(&sql).await?;
        Ok(rows.into_iter().collect())
    }

    /// Rows ClickHouse holds in `range` below the cut that the snapshot does not see and the
    /// outbox holds now: transactions committing while the snapshot was taken. Their count and
    /// hash sum, from two kinds: (1) with `snapshot` given (with its xmax and the xmax read
    /// right after it), those still running for it whose commit record was written before
    /// `lo`, the WAL position read just before the snapshot: the ones in its xip, and those
    /// with an xid from its xmax to the later one (a snapshot's xmax is one past the newest
    /// completed xid, so a transaction that got a newer xid and was committing while the
    /// snapshot was taken is in neither its xip nor its view): the outbox's rows of
    /// each such transaction, grouped by transaction, matched (count and hash sum) with
    /// ClickHouse's rows from `prev` to `lo` grouped by `commit_lsn`; (2) those that committed
    /// from `lo` to the cut: ClickHouse's rows there, looked up by id in the snapshot and in the
    /// outbox now. `None` when (2) holds more than [`RACE_IDS`] rows, or an id ClickHouse also
    /// holds elsewhere in the window (a duplicate, which (1) may have counted already): the
    /// window is narrowed instead. A racing transaction still running after the later xmax
    /// escapes both kinds; the caller then asks again by id from `prev` (`lo = prev`).
    async fn race(
        &self,
        (tx, control): (&Transaction<'_>, &Client),
        range: Range,
        snapshot: Option<(&str, i64, i64)>,
        scan_from: i64,
        (prev, lo, cut): (u64, u64, u64),
    ) -> Result<Option<(u64, i64)>, VerifyError> {
        let mut race = (0u64, 0i64);
        let mut add = |n: u64, sum: i64| race = (race.0 + n, race.1.wrapping_add(sum));
        let lo = lo.clamp(prev, cut);
        // (1) Running for the snapshot, committed below `lo`.
        if let Some((snapshot, xmax, xmax_after)) = snapshot
            && prev < lo
        {
            let sql = format!(
                "SELECT count(*)::int8, coalesce(sum({PG_HASH}), 0)::text FROM {} o
                  WHERE {} AND o.event_date_time >= {}
                    AND (o.xmin::text::int8 IN (SELECT x::text::int8 & 4294967295
                                                  FROM pg_snapshot_xip($4::text::pg_snapshot) x)
                         OR ({xid8})::text::int8 >= $5 AND ({xid8})::text::int8 < $6)
                  GROUP BY o.xmin",
                outbox_table(self.config),
                self.outbox_where(),
                pg_time(3),
                xid8 = replay::XID8
            );
            let running = control
                .query(
                    &sql,
                    &[
                        &range.from_us,
                        &range.until_us,
                        &scan_from.max(range.from_us),
                        &snapshot,
                        &xmax,
                        &xmax_after,
                    ],
                )
                .await
                .map_err(PgError::query("verify racing transactions"))?;
            if !running.is_empty() {
                let hashed = ch_hashed(
                    &[("commit_lsn", "l")],
                    TABLE,
                    &format!(
                        "{} AND commit_lsn >= {prev} AND commit_lsn < {lo}",
                        self.ch_where(range, None)
                    ),
                );
                let held: HashSet<(u64, i64)> = self
                    .sink
                    .fetch_all::<(u64, i64)>(&format!(
                        "SELECT count(), sum(_h) FROM {hashed} GROUP BY l"
                    ))
                    .await?
                    .into_iter()
                    .collect();
                for (n, sum) in running
                    .iter()
                    .map(|r| (r.get::<_, i64>(0) as u64, wrap_sum(&r.get::<_, String>(1))))
                    .filter(|t| held.contains(t))
                {
                    add(n, sum);
                }
            }
        }
        // (2) Committed from `lo` to the cut, with the rows ClickHouse holds of each id in the
        // window.
        let within = self.ch_where(range, Some(cut));
        let sql = format!(
            "SELECT toString(event_id), count() FROM {TABLE} WHERE {within} AND event_id IN
               (SELECT event_id FROM {TABLE} WHERE {within} AND commit_lsn >= {lo})
             GROUP BY event_id LIMIT {}",
            RACE_IDS + 1
        );
        let ids: Vec<(String, u64)> = self.sink.fetch_all(&sql).await?;
        if ids.len() > RACE_IDS || ids.iter().any(|(_, rows)| *rows > 1) {
            return Ok(None);
        }
        if !ids.is_empty() {
            let held = format!(
                "SELECT o.event_id::text FROM {} o WHERE o.event_id = ANY($1::text[]::uuid[])",
                outbox_table(self.config)
            );
            let ids: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
            let seen = ids_held(tx, &held, &ids, "verify ids in the snapshot").await?;
            let now = ids_held(control, &held, &ids, "verify ids").await?;
            for id in ids
                .iter()
                .filter(|id| !seen.contains(**id) && now.contains(**id))
            {
                add(1, id_hash_text(id).unwrap_or_default());
            }
        }
        Ok(Some(race))
    }

    /// The missing and extra ids of a differing window. A large window is first grouped by the
    /// top bits of the id hash (uniform whatever the times, so one pass finds the differing
    /// buckets of about `NARROW_ROWS / 4` rows); then the ids of the window, or of its
    /// differing buckets, are compared one by one. ClickHouse's rows are those below `cut`
    /// (the commit LSN read right after the snapshot), as the window's sums were.
    async fn narrow(
        &self,
        tx: &Transaction<'_>,
        range: Range,
        rows: u64,
        cut: Option<u64>,
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
            let ch = self.ch_buckets(range, bits, cut).await?;
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
        let ch = self.ch_ids(range, bits, buckets.as_deref(), cut).await?;
        found
            .0
            .extend(pg.iter().filter(|id| !ch.contains_key(*id)).cloned());
        found
            .1
            .extend(ch.into_iter().filter(|(id, n)| *n > 1 || !pg.contains(id)));
        Ok(())
    }
}

/// PostgreSQL's exact sum (numeric, as text) reduced mod 2^64, as ClickHouse's Int64 sum wraps.
fn wrap_sum(text: &str) -> i64 {
    text.parse::<i128>().map(|v| v as i64).unwrap_or_default()
}

/// The top `bits` bits of [`id_hash`] as a number, in PostgreSQL (arithmetic shift, masked).
fn pg_bucket(bits: u32) -> String {
    format!("(({PG_HASH} >> {}) & {})", 64 - bits, (1i64 << bits) - 1)
}

/// The same in ClickHouse, of [`ch_hashed`]'s `_h` (logical shift of the unsigned hash).
fn ch_bucket(bits: u32) -> String {
    format!(
        "toInt64(bitAnd(bitShiftRight(reinterpretAsUInt64(_h), {}), {}))",
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
    let mut report = compare(config, sink, options, &mut Memory::default(), true).await?;
    if options.repair && !report.missing.is_empty() {
        report.repair =
            Some(replay::reship_ids(config, sink, &report.missing, options.wait).await?);
    }
    Ok(report)
}

/// One comparison of `options.range`, hashing only what `memory` does not vouch for (an empty
/// memory: everything), and leaving in `memory` what the next pass may reuse. `others`: also
/// count the other sources' rows in the range.
async fn compare(
    config: &Config,
    sink: &ClickHouseSink,
    options: &Options,
    memory: &mut Memory,
    others: bool,
) -> Result<VerifyReport, VerifyError> {
    let mut range = options.range;
    if range.until_us <= range.from_us {
        return Err(VerifyError::Range(format!(
            "the range is empty: --until ({}) must be after --since ({})",
            format_us(range.until_us),
            format_us(range.from_us)
        )));
    }
    let width = options.window_us;
    let started = std::time::Instant::now();
    let control = pg::connect(&config.postgres_url).await?;
    let mut reader = pg::connect(&config.postgres_url).await?;
    let tx = pg::read_snapshot(&mut reader, "verify snapshot").await?;
    // The WAL position before the snapshot (see [`Checker::race`]).
    let lo: i64 = control
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
            &[],
        )
        .await
        .map_err(PgError::query("verify snapshot"))?
        .get(0);
    let lo = lo as u64;
    // The first statement takes the snapshot S; the WAL insert position it reads next is the
    // cut: a transaction S sees committed below it, one whose commit is at or past it committed
    // after S. ClickHouse's rows are compared below the cut, so the rows the relay ships while
    // the pass runs are neither missing nor extra. A simple query: the extended protocol would
    // take S when the statement is parsed and read the cut a round trip later, and the
    // transactions committing in between are the ones ClickHouse holds below the cut and S does
    // not see (see [`Checker::race`]).
    let first = format!(
        "SELECT w.l::text, (w.l - '0/0'::pg_lsn)::int8,
                pg_snapshot_xmin(pg_current_snapshot())::text::int8,
                pg_snapshot_xmax(pg_current_snapshot())::text::int8,
                floor(extract(epoch FROM statement_timestamp()) * 1000000)::int8,
                uuid_hash_extended('{PROBE_ID}'::uuid, 0),
                pg_current_snapshot()::text
           FROM (SELECT pg_current_wal_insert_lsn() AS l) w"
    );
    let row = tx
        .simple_query(&first)
        .await
        .map_err(PgError::query("verify snapshot"))?
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or_else(|| PgError::NotReady("the snapshot query returned no row".into()))?;
    let text = |i: usize| row.get(i).unwrap_or_default().to_string();
    let int = |i: usize| {
        text(i).parse::<i64>().map_err(|_| {
            PgError::NotReady(format!(
                "verify snapshot: column {i} is not a number: {:?}",
                text(i)
            ))
        })
    };
    let (fence, cut, xmin, xmax, started_us) = (text(0), int(1)?, int(2)?, int(3)?, int(4)?);
    let (got, relay) = (int(5)?, id_hash_text(PROBE_ID).unwrap_or_default());
    let snapshot = text(6);
    if got != relay {
        return Err(VerifyError::HashDiffers {
            server: "PostgreSQL",
            got,
            relay,
        });
    }
    // The first xid not yet completed right after S (see [`Checker::race`]).
    let xmax_after: i64 = control
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8",
            &[],
        )
        .await
        .map_err(PgError::query("verify snapshot"))?
        .get(0);
    let cut = cut as u64;
    // An open-ended range starts at the oldest row, so windows are aligned to something near
    // the data.
    if range.from_us == i64::MIN / 4 {
        let oldest: Option<i64> = tx
            .query_one(
                &format!(
                    "SELECT floor(extract(epoch FROM min(event_date_time)) * 1000000)::int8 FROM {}",
                    outbox_table(config)
                ),
                &[],
            )
            .await
            .map_err(PgError::query("verify snapshot"))?
            .get(0);
        range.from_us = oldest
            .map(|o| o.div_euclid(width) * width)
            .unwrap_or(range.until_us - width)
            .min(range.until_us - 1);
    }
    wait_for_fence(&control, config, &fence, options.wait).await?;
    let waited = started.elapsed();

    let checker = Checker { config, sink };
    if memory.width_us != width {
        *memory = Memory {
            width_us: width,
            ..Memory::new(memory.resweep_rows)
        };
    }
    let in_range = |w: &i64| *w >= range.from_us && *w < range.until_us;
    let window_range = |w: i64| Range {
        from_us: w,
        until_us: (w + width).min(range.until_us),
    };

    // The outbox. With a memory: its settled sums plus the rows of the transactions since its
    // xmin, found from the time those transactions began on (their rows' event_date_time is
    // not older, unless written explicitly: the re-hash finds those), and some windows re-hashed
    // in full. Without (or when the dead letters changed): every row.
    let dead_sql = format!(
        "SELECT count(*)::int8, coalesce(sum(hashtext(d.event_id::text)), 0)::int8
           FROM {} d WHERE d.shipped_at IS NULL",
        dead_letters_table(config)
    );
    let row = tx
        .query_one(&dead_sql, &[])
        .await
        .map_err(PgError::query("verify dead letters"))?;
    let dead: (i64, i64) = (row.get(0), row.get(1));
    let pg_memory = memory.pg.take().filter(|m| {
        // age() is exact within 2^31 transactions.
        m.dead == dead && m.xmin <= xmin && xmax - m.xmin < 1 << 30
    });
    // From when the rows of transactions at or past the remembered xmin can date.
    let since = pg_memory.as_ref().and_then(|m| {
        m.history
            .iter()
            .filter(|(x, _)| *x <= m.xmin)
            .map(|(_, t)| *t - XID_TIME_MARGIN_US)
            .max()
    });
    let xid = |x: i64| (x & 0xffff_ffff).to_string();
    let row = tx
        .query_one(
            "SELECT age($1::text::xid)::int4, age($2::text::xid)::int4",
            &[
                &xid(pg_memory.as_ref().map_or(xmin, |m| m.xmin)),
                &xid(xmin),
            ],
        )
        .await
        .map_err(PgError::query("verify snapshot"))?;
    let (mut remembered, mut history, mut credit, mut next, ages, scan_from) =
        match (pg_memory, since) {
            (Some(m), Some(since)) => (
                m.windows,
                m.history,
                m.credit,
                m.next,
                (row.get::<_, i32>(0), row.get::<_, i32>(1)),
                since,
            ),
            _ => (
                HashMap::new(),
                Vec::new(),
                0,
                range.from_us,
                (i32::MAX, row.get::<_, i32>(1)),
                range.from_us,
            ),
        };
    remembered.retain(|w, _| in_range(w));
    let mut pg = checker.pg_sums(&tx, range, width, ages, scan_from).await?;
    let mut hashed = hashed_pg(&pg);
    // Windows whose every row this pass hashed (all of them without a memory).
    let mut whole: HashSet<i64> = if ages.0 == i32::MAX {
        pg.keys().copied().collect()
    } else {
        HashSet::new()
    };
    // The re-hash: whole windows, round the range, while the credit lasts.
    credit = credit
        .saturating_add(memory.resweep_rows)
        .min(memory.resweep_rows.saturating_mul(1_000));
    let mut order: Vec<i64> = remembered.keys().copied().collect();
    order.sort_unstable();
    let start = order.iter().position(|w| *w >= next).unwrap_or(0);
    for w in order[start..].iter().chain(&order[..start]).copied() {
        let rows = remembered.get(&w).map_or(0, |p| p.total);
        if rows > credit {
            break;
        }
        credit -= rows;
        next = w + width;
        remembered.remove(&w);
        pg.remove(&w);
        let fresh = checker
            .pg_sums(&tx, window_range(w), width, (i32::MAX, ages.1), w)
            .await?;
        hashed += hashed_pg(&fresh);
        whole.insert(w);
        pg.extend(fresh);
    }
    let mut outbox: Sums = Sums::new();
    let mut settled = HashMap::new();
    for w in pg
        .keys()
        .chain(remembered.keys())
        .copied()
        .collect::<HashSet<_>>()
    {
        let parts = pg.get(&w).copied().unwrap_or_default();
        let kept = remembered
            .get(&w)
            .copied()
            .unwrap_or_default()
            .add(parts[1]);
        let all = kept.add(parts[2]);
        outbox.insert(w, (all.n, all.sum));
        if kept != PgPart::default() {
            settled.insert(w, kept);
        }
    }
    // The next pass needs the newest pass at or below this xmin, and those past it (while a
    // transaction holds the xmin back: at most the last 1,000; fewer only means older times).
    let newest_below = history
        .iter()
        .filter(|(x, _)| *x <= xmin)
        .max_by_key(|(_, t)| *t)
        .copied();
    history.retain(|(x, _)| *x > xmin);
    if history.len() > 1_000 {
        history.drain(..history.len() - 1_000);
    }
    history.extend(newest_below);
    history.push((xmax, started_us));
    memory.pg = Some(PgMemory {
        xmin,
        dead,
        windows: settled,
        history,
        credit,
        next,
    });

    let outbox_done = started.elapsed();
    // ClickHouse: remembered sums of the rows below the last cut, while their count and
    // commit_lsn sum are unchanged and no mutation came, plus the rows from that cut to this one.
    let mutations: u64 = sink
        .fetch_all::<u64>(
            "SELECT count() FROM system.mutations
              WHERE database = currentDatabase() AND table = {table_name:String}",
        )
        .await?
        .first()
        .copied()
        .unwrap_or_default();
    if !memory.clickhouse_hash_checked {
        let probe = ch_hashed(
            &[],
            &format!("(SELECT toUUID('{PROBE_ID}') AS event_id)"),
            "1",
        );
        let got = sink
            .fetch_all::<i64>(&format!("SELECT _h FROM {probe}"))
            .await?
            .first()
            .copied()
            .unwrap_or_default();
        let relay = id_hash_text(PROBE_ID).unwrap_or_default();
        if got != relay {
            return Err(VerifyError::HashDiffers {
                server: "ClickHouse",
                got,
                relay,
            });
        }
        memory.clickhouse_hash_checked = true;
    }
    let ch_memory = memory.ch.take().filter(|m| m.mutations == mutations);
    let prev = ch_memory.as_ref().map_or(0, |m| m.cut.min(cut));
    let mut remembered = ch_memory.map(|m| m.windows).unwrap_or_default();
    remembered.retain(|w, _| in_range(w));
    let mut ch = checker.ch_sums(range, width, prev, Some(cut)).await?;
    let mut stale: Vec<i64> = ch.keys().chain(remembered.keys()).copied().collect();
    stale.sort_unstable();
    stale.dedup();
    stale.retain(|w| {
        let r = remembered.get(w).copied().unwrap_or_default();
        ch.get(w).map_or((0, 0), |c| c.old) != (r.n, r.fp)
    });
    let stale_windows = stale.len();
    for w in stale {
        remembered.remove(&w);
        ch.remove(&w);
        ch.extend(
            checker
                .ch_sums(window_range(w), width, 0, Some(cut))
                .await?,
        );
    }
    // Rows past the cut are the ones shipped since S, unless their commit_lsn is past anything
    // PostgreSQL has written: such a row (written by someone else) is compared like any other.
    let written: i64 = control
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
            &[],
        )
        .await
        .map_err(PgError::query("verify cut"))?
        .get(0);
    let mut uncut = HashSet::new();
    for (w, c) in &ch {
        if c.after.0 > 0 && c.after.1 > written as u64 {
            uncut.insert(*w);
        }
    }
    for w in &uncut {
        remembered.remove(w);
        ch.remove(w);
        ch.extend(checker.ch_sums(window_range(*w), width, 0, None).await?);
    }
    // Where a pass's time went (`log_level = "info,relay::ops::verify=debug"`).
    tracing::debug!(
        waited_for_relay_ms = waited.as_millis() as u64,
        outbox_ms = (outbox_done - waited).as_millis() as u64,
        clickhouse_ms = (started.elapsed() - outbox_done).as_millis() as u64,
        outbox_scanned_from = %format_us(scan_from),
        clickhouse_windows_rehashed = stale_windows + uncut.len(),
        hashed_rows = hashed,
        "verify: sums read"
    );
    let mut clickhouse: Sums = Sums::new();
    let mut below_cut = HashMap::new();
    for (w, c) in &ch {
        hashed += c.new.n;
        let all = remembered.get(w).copied().unwrap_or_default().add(c.new);
        clickhouse.insert(*w, (all.n, all.sum));
        if !uncut.contains(w) && all != ChPart::default() {
            below_cut.insert(*w, all);
        }
    }
    memory.ch = Some(ChMemory {
        cut,
        mutations,
        windows: below_cut,
    });

    let mut report = VerifyReport {
        source: sink.source().to_string(),
        from: format_us(range.from_us),
        until: format_us(range.until_us),
        window_seconds: (width / 1_000_000) as u64,
        verified_through_us: range.until_us,
        hashed_rows: hashed,
        ..VerifyReport::default()
    };
    let mut windows: Vec<i64> = outbox.keys().chain(clickhouse.keys()).copied().collect();
    windows.sort_unstable();
    windows.dedup();
    report.windows = windows.len() as u64;
    for w in windows {
        let (p, c) = (
            outbox.get(&w).copied().unwrap_or_default(),
            clickhouse.get(&w).copied().unwrap_or_default(),
        );
        report.outbox_events += p.0;
        report.clickhouse_rows += c.0;
        let window = window_range(w);
        let mut p = p;
        if p != c && !whole.contains(&w) && !uncut.contains(&w) {
            // The remembered sums do not see rows written with an older event_date_time than
            // their transaction's start: hash this window afresh first.
            let fresh = checker
                .pg_sums(&tx, window, width, (i32::MAX, ages.1), w)
                .await?;
            let parts = fresh.get(&w).copied().unwrap_or_default();
            report.hashed_rows += parts[1].n + parts[2].n;
            let all = parts[1].add(parts[2]);
            p = (all.n, all.sum);
            if let Some(m) = memory.pg.as_mut() {
                m.windows.remove(&w);
                if parts[1] != PgPart::default() {
                    m.windows.insert(w, parts[1]);
                }
            }
        }
        if p != c && !uncut.contains(&w) {
            // Rows of transactions committing while S was taken: in ClickHouse below the cut,
            // not in S. First by transaction and by the few ids past `lo`, then by every id
            // since the last pass.
            let mut settled = false;
            let running = (snapshot.as_str(), xmax, xmax_after);
            for (snapshot, lo) in [(Some(running), lo), (None, prev)] {
                if let Some(race) = checker
                    .race(
                        (&tx, &control),
                        window,
                        snapshot,
                        scan_from,
                        (prev, lo, cut),
                    )
                    .await?
                    && (p.0 + race.0, p.1.wrapping_add(race.1)) == c
                {
                    settled = true;
                    break;
                }
            }
            if settled {
                continue;
            }
        }
        if p == c {
            continue;
        }
        report.narrowed_windows += 1;
        let window_cut = (!uncut.contains(&w)).then_some(cut);
        let mut found = (Vec::new(), Vec::new());
        checker
            .narrow(&tx, window, p.0 + c.0, window_cut, &mut found)
            .await?;
        let (missing, extra) = found;
        // Rows committed after the snapshot are in ClickHouse but not in it, and an event
        // dead-lettered or purged since is not missing: look again.
        let extra = settle_extras(&control, config, extra).await?;
        let missing = settle_missing(&control, config, missing).await?;
        if missing.is_empty() && extra.is_empty() {
            // Nothing differs id by id: hash this window afresh next time.
            if let Some(m) = memory.pg.as_mut() {
                m.windows.remove(&w);
            }
            if let Some(m) = memory.ch.as_mut() {
                m.windows.remove(&w);
            }
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
    if others {
        let others = format!(
            "SELECT toString(source), count() FROM {} WHERE NOT ({}) AND event_date_time >= \
             fromUnixTimestamp64Micro(toInt64({}), 'UTC') AND event_date_time < \
             fromUnixTimestamp64Micro(toInt64({}), 'UTC') GROUP BY source ORDER BY source",
            TABLE, OURS, range.from_us, range.until_us
        );
        report.other_sources = sink.fetch_all(&others).await?;
    }
    Ok(report)
}

/// Outbox rows [`Checker::pg_sums`] hashed (of classes 1 and 2, not dead-lettered).
fn hashed_pg(sums: &PgSums) -> u64 {
    sums.values().map(|p| p[1].n + p[2].n).sum()
}

/// Missing ids as reported: those the outbox still holds and has not dead-lettered (a row
/// dead-lettered or purged after the snapshot is not missing).
async fn settle_missing(
    client: &Client,
    config: &Config,
    missing: Vec<String>,
) -> Result<Vec<String>, PgError> {
    let mut settled = Vec::new();
    for page in missing.chunks(ID_PAGE) {
        let sql = format!(
            "SELECT o.event_id::text FROM {} o WHERE o.event_id::text = ANY($1)
                AND NOT EXISTS (SELECT 1 FROM {} d WHERE d.event_id::text = o.event_id::text
                                   AND d.shipped_at IS NULL)",
            outbox_table(config),
            dead_letters_table(config)
        );
        let ids: Vec<&str> = page.iter().map(String::as_str).collect();
        let held = ids_held(client, &sql, &ids, "verify missing ids").await?;
        settled.extend(page.iter().filter(|id| held.contains(*id)).cloned());
    }
    Ok(settled)
}

/// The ids (first column) `sql` returns for `ids` as `$1`.
async fn ids_held<C: tokio_postgres::GenericClient>(
    client: &C,
    sql: &str,
    ids: &[&str],
    what: &'static str,
) -> Result<HashSet<String>, PgError> {
    Ok(client
        .query(sql, &[&ids])
        .await
        .map_err(PgError::query(what))?
        .iter()
        .map(|r| r.get(0))
        .collect())
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
        let sql = format!(
            "SELECT o.event_id::text FROM {} o WHERE o.event_id::text = ANY($1)",
            outbox_table(config)
        );
        let held = ids_held(client, &sql, &ids, "verify extra ids").await?;
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
/// `verify_lookback_hours` (within the retention) up to the one holding `now - verify_grace_s`,
/// hashing only the rows that came since the last pass (see [`Memory`]).
pub async fn verify_forever(config: Config, gauges: Arc<crate::metrics::Metrics>) {
    if config.verify_interval_s == 0 {
        return;
    }
    let grace = Duration::from_secs(config.verify_grace_s);
    // The first pass after one grace period: the relay has started streaming by then.
    tokio::time::sleep(grace.min(Duration::from_secs(config.verify_interval_s))).await;
    let mut every = tokio::time::interval(Duration::from_secs(config.verify_interval_s));
    // A pass longer than the interval is followed by one a full interval later, not by
    // back-to-back catch-up passes.
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sink: Option<ClickHouseSink> = None;
    let mut memory = Memory::new(RESWEEP_ROWS_PER_S.saturating_mul(config.verify_interval_s));
    loop {
        every.tick().await;
        let gauges = &gauges.verify;
        match verify_pass(&config, &mut sink, &mut memory).await {
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
                gauges.errors.inc();
                warn!(error = %e, "verify pass could not check; will try again");
            }
        }
    }
}

/// One background pass (public for tests: `run` calls it from [`verify_forever`]): the windows (aligned to multiples of `verify_window_s`) from
/// `verify_lookback_hours` (within the retention) to the one holding `now - verify_grace_s`,
/// each compared whole, reusing what `memory` vouches for.
pub async fn verify_pass(
    config: &Config,
    sink: &mut Option<ClickHouseSink>,
    memory: &mut Memory,
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
    let through_us = now - config.verify_grace_s as i64 * 1_000_000;
    let until_us = (through_us.div_euclid(window_us) + 1) * window_us;
    let mut from_us = (through_us - config.verify_lookback_hours as i64 * 3_600_000_000)
        .div_euclid(window_us)
        * window_us;
    if config.outbox_retention_hours > 0 {
        from_us = from_us.max(default_range(config, now, window_us).from_us);
    }
    let options = Options {
        range: Range {
            from_us: from_us.min(until_us - window_us),
            until_us,
        },
        window_us,
        wait: Duration::from_secs(config.verify_grace_s.max(30)),
        // verify_forever repairs after logging.
        repair: false,
    };
    let mut report = compare(config, sink, &options, memory, false).await?;
    report.verified_through_us = report.verified_through_us.min(through_us);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hash_is_postgresql_uuid_hash_extended() {
        // PostgreSQL 15 (x86_64): SELECT uuid_hash_extended(id::uuid, 0); tests/e2e/verify.rs
        // checks PostgreSQL and ClickHouse against id_hash for thousands of ids.
        for (id, expected) in [
            ("00000000-0000-0000-0000-000000000000", -6859010066814654381),
            ("00112233-4455-6677-8899-aabbccddeeff", 4462459420613485749),
            ("0b7d1f3e-8e3c-4f0b-9a63-2f8f8c1d2e4a", -3756612805458225549),
            ("ffffffff-ffff-ffff-ffff-ffffffffffff", 293445543803463785),
            ("018f6b2e-9c1a-7d3e-8f00-123456789abc", 770517717516070150),
        ] {
            assert_eq!(id_hash_text(id), Some(expected), "{id}");
        }
        assert_eq!(id_hash_text("not a uuid"), None);
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
