//! Completeness you can prove: compares what the outbox holds with what ClickHouse holds for
//! this outbox's source, window by window, event by event, content included, and names every
//! missing, extra and altered event (docs/guarantees.md, "What `verify` proves").
//!
//! One pass ([`compare`]) is a short sequence of steps:
//!
//! 1. wait until the live relay passed the WAL position of now, with nothing locked;
//! 2. find the horizon H ([`horizon`]): what it sees is outside the proof;
//! 3. on a guarded connection ([`crate::pg::Guarded`]: it gives way to any session that queues
//!    behind its locks), lock the outbox, take the snapshot S and the WAL position after it;
//! 4. the outbox's sums per window ([`sums`]), hashing only what the background verifier's
//!    [`Memory`] does not vouch for;
//! 5. wait until the relay passed S's position: ClickHouse then holds every row of every
//!    transaction S sees, and the rows of the others are told apart by their `xid`;
//! 6. ClickHouse's sums per window;
//! 7. the differing windows compared id by id ([`narrow`]), unless the same sums were narrowed
//!    before; the snapshot is released;
//! 8. what was found is settled outside the snapshot ([`settle`]) and reported.

mod content;
mod horizon;
mod memory;
mod narrow;
mod settle;
mod snapshot;
mod sums;
mod time;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pgoutput::Lsn;
use serde::Serialize;
use tokio_postgres::{Client, Transaction};
use tracing::{info, warn};

pub use horizon::Horizon;
pub use memory::Memory;
pub use narrow::{MAX_MISSING, MAX_OTHER};
pub use settle::{Extra, Settled};
pub use snapshot::Snapshot;
pub use time::{format_us, parse_time};

use crate::config::Config;
use crate::ops::replay::{self, ReplayError, ReplayReport};
use crate::pg::{self, Guarded, PgError};
use crate::sink::{ClickHouseSink, OURS, SinkError, TABLE};
use crate::store::schema::{dead_letters_table, outbox_table};
use memory::{ChMemory, Narrowed, PgMemory};
use narrow::Found;
use sums::{Rows, Scope, Sum};

/// Rows per second of `verify_interval_s` the background verifier re-hashes in full on the
/// outbox's side, oldest window first, round the range (docs/guarantees.md).
pub const RESWEEP_ROWS_PER_S: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(transparent)]
    ClickHouse(#[from] SinkError),
    #[error("repair failed: {0}")]
    Repair(#[from] ReplayError),
    #[error("{0}")]
    Position(#[from] crate::ops::positions::PositionError),
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
        "PostgreSQL and ClickHouse hash the same event differently ({postgres} and {clickhouse}): \
         verify cannot compare their contents; set verify_interval_s = 0 and report both \
         servers' versions"
    )]
    HashDiffers { postgres: i64, clickhouse: i64 },
}

impl VerifyError {
    /// The pass gave way to a session waiting on its locks: trying again later does help.
    pub fn yielded(&self) -> bool {
        matches!(
            self,
            VerifyError::Postgres(PgError::Yielded(_))
                | VerifyError::Repair(ReplayError::Postgres(PgError::Yielded(_)))
        )
    }
}

/// What to verify and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// `[from, until)` of `event_date_time` in Unix µs, or every event the outbox holds.
    pub range: Option<(i64, i64)>,
    /// Only events committed after this position (`--from-lsn`).
    pub from_lsn: Option<Lsn>,
    /// Window width in µs.
    pub window_us: i64,
    /// How long to wait for the live relay to pass the snapshot (and, for `verify`, to try
    /// again after giving way to a migration).
    pub wait: Duration,
    pub repair: bool,
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
    pub altered: u64,
}

/// Where the proof starts (the horizon), as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ProofStart {
    /// The checkpoint whose snapshot bounds the proof: events of transactions it sees are not
    /// compared.
    pub checkpoint_lsn: String,
    pub recorded_at: String,
    pub why: &'static str,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub source: String,
    /// The `event_date_time` range compared (`--since`/`--until`), or empty: every event.
    pub from: String,
    pub until: String,
    /// `None`: every event the outbox holds is in the proof.
    pub proof_start: Option<ProofStart>,
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
    /// Event ids ClickHouse holds with other content than the outbox's, sorted.
    pub altered: Vec<String>,
    /// Differences found but not listed (the lists are bounded: [`MAX_MISSING`],
    /// [`MAX_OTHER`]); run again after a repair.
    pub unlisted: u64,
    /// ClickHouse rows of this source whose outbox row is gone (purged): outside the proof.
    pub outside_proof: u64,
    /// Rows of other sources in the same table (not checked: their outbox is elsewhere).
    pub other_sources: Vec<(String, u64)>,
    /// Up to where (Unix µs) every event is proven: the start of the first differing window,
    /// or the time of the pass's snapshot.
    pub verified_through_us: i64,
    /// What `--repair` re-shipped.
    pub repair: Option<ReplayReport>,
    /// Rows whose content this pass hashed, on both sides together (the background verifier's
    /// cost: after its first pass, the rows that came since the last one).
    #[serde(skip)]
    pub hashed_rows: u64,
    /// Windows compared id by id this pass (not counting those whose result was remembered).
    #[serde(skip)]
    pub narrowed_windows: u64,
}

impl VerifyReport {
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.altered.is_empty()
            && self.unlisted == 0
    }
}

/// Verifies; with `repair`, re-ships the missing events. A pass that gave way to a migration is
/// tried again until `options.wait` has passed.
pub async fn verify(
    config: &Config,
    sink: &ClickHouseSink,
    options: &Options,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let mut report = loop {
        match compare(config, sink, options, &mut Memory::default(), true).await {
            Err(e) if e.yielded() && started.elapsed() < options.wait => {
                info!(error = %e, "verify gave way; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => break other?,
        }
    };
    if options.repair && !report.missing.is_empty() {
        report.repair =
            Some(replay::reship_ids(config, sink, &report.missing, options.wait).await?);
    }
    Ok(report)
}

/// What the snapshot statement read.
struct Taken {
    snapshot: Snapshot,
    /// No transaction with an xid from here on had one when the snapshot was taken (a
    /// snapshot's xmax is one past the newest *completed* xid: a transaction that got a newer one
    /// may be running, seen by neither its xip nor its xmin).
    next_xid: u64,
    /// The WAL insert position right after the snapshot was taken.
    fence: String,
    started_us: i64,
    /// The dead letters' (count, hash of their rows).
    dead: (i64, i64),
}

/// The outbox's side of a pass: per window, the sums of the set, and the windows hashed whole.
struct OutboxSide {
    sums: HashMap<i64, Sum>,
    whole: HashSet<i64>,
    hashed: u64,
}

/// One comparison (see the module's comment), hashing only what `memory` does not vouch for,
/// and leaving in it what the next pass may reuse. `others`: also count the other sources'
/// rows.
pub async fn compare(
    config: &Config,
    sink: &ClickHouseSink,
    options: &Options,
    memory: &mut Memory,
    others: bool,
) -> Result<VerifyReport, VerifyError> {
    if let Some((from, until)) = options.range
        && until <= from
    {
        return Err(VerifyError::Range(format!(
            "the range is empty: --until ({}) must be after --since ({})",
            format_us(until),
            format_us(from)
        )));
    }
    let control = settle_connection(config).await?;
    // 1. Nothing is locked while the relay catches up with now.
    let now: String = control
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(PgError::query("verify fence"))?
        .get(0);
    wait_for_fence(&control, config, &now, options.wait).await?;
    // 2.
    let horizon = horizon::find(&control, config, sink, options.from_lsn).await?;
    memory.align(options.window_us, horizon.as_ref().map_or(0, |h| h.lsn.0));
    check_hashes(&control, sink, memory).await?;
    // 3.-7. On a connection that gives way to whoever queues behind its locks.
    let mut guarded = Guarded::connect(&config.postgres_url, "verify").await?;
    let (reader, guard) = guarded.split();
    let compared = guard
        .run(read_and_compare(
            config,
            sink,
            options,
            (&control, reader),
            horizon.as_ref(),
            memory,
        ))
        .await?;
    drop(guarded);
    // 8.
    finish(
        config,
        sink,
        &control,
        (options, horizon.as_ref()),
        compared,
        memory,
        others,
    )
    .await
}

/// A plain connection for the fence, the horizon and the look-ups that settle what was found:
/// single statements, none of which waits long for a lock.
async fn settle_connection(config: &Config) -> Result<Client, PgError> {
    let client = pg::connect(&config.postgres_url).await?;
    client
        .batch_execute(&format!("SET lock_timeout = '{}'", pg::LOCK_TIMEOUT))
        .await
        .map_err(PgError::query("session settings"))?;
    Ok(client)
}

/// Both servers hash a probe row alike (once per memory): else every event would differ.
async fn check_hashes(
    control: &Client,
    sink: &ClickHouseSink,
    memory: &mut Memory,
) -> Result<(), VerifyError> {
    if memory.hash_checked {
        return Ok(());
    }
    let postgres: i64 = control
        .query_one(&content::pg_probe(), &[])
        .await
        .map_err(PgError::query("verify hash probe"))?
        .get(0);
    let clickhouse = sink
        .fetch_all::<i64>(&content::ch_probe())
        .await?
        .first()
        .copied()
        .unwrap_or_default();
    if postgres != clickhouse {
        return Err(VerifyError::HashDiffers {
            postgres,
            clickhouse,
        });
    }
    memory.hash_checked = true;
    Ok(())
}

/// What [`read_and_compare`] hands to [`finish`].
struct Compared {
    taken: Taken,
    outbox: OutboxSide,
    clickhouse: HashMap<i64, Sum>,
    /// Differing windows narrowed this pass: (window, outbox, ClickHouse, found).
    narrowed: Vec<(i64, Sum, Sum, Found)>,
    /// Differing windows whose result was remembered.
    remembered: Vec<(i64, Sum, Sum)>,
    hashed: u64,
}

/// Steps 3 to 7, on the guarded connection.
async fn read_and_compare(
    config: &Config,
    sink: &ClickHouseSink,
    options: &Options,
    (control, reader): (&Client, &mut Client),
    horizon: Option<&Horizon>,
    memory: &mut Memory,
) -> Result<Compared, VerifyError> {
    let tx = pg::read_snapshot(reader, "verify snapshot").await?;
    let taken = take_snapshot(&tx, config).await?;
    let scope = Scope {
        config,
        snapshot: &taken.snapshot,
        horizon: horizon.map(|h| &h.snapshot),
        range: options.range,
        width: options.window_us,
    };
    let mut outbox = outbox_side(&tx, &scope, &taken, memory).await?;
    wait_for_fence(control, config, &taken.fence, options.wait).await?;
    let (clickhouse, ch_hashed) = clickhouse_side(sink, &scope, memory).await?;
    let (mut narrowed, mut remembered) = (Vec::new(), Vec::new());
    let mut windows: Vec<i64> = outbox
        .sums
        .keys()
        .chain(clickhouse.keys())
        .copied()
        .collect();
    windows.sort_unstable();
    windows.dedup();
    for w in windows {
        let c = clickhouse.get(&w).copied().unwrap_or_default();
        let mut p = outbox.sums.get(&w).copied().unwrap_or_default();
        if p != c && !outbox.whole.contains(&w) {
            // The remembered sums do not see rows written with an older event_date_time than
            // their transaction's start: hash this window afresh first.
            p = rehash_outbox_window(&tx, &scope, w, memory, &mut outbox).await?;
        }
        if p == c {
            memory.narrowed.remove(&w);
            continue;
        }
        match memory.narrowed.get(&w) {
            Some(n) if n.outbox == p && n.clickhouse == c => remembered.push((w, p, c)),
            _ => {
                let mut found = Found::default();
                narrow::narrow(&scope, &tx, sink, w, p.n + c.n, &mut found).await?;
                narrowed.push((w, p, c, found));
            }
        }
    }
    drop(tx);
    Ok(Compared {
        taken,
        outbox,
        clickhouse,
        narrowed,
        remembered,
        hashed: ch_hashed,
    })
}

/// Step 3: locks the outbox (before the snapshot: a table rewrite committed after the snapshot
/// would show it the table empty), takes the snapshot and reads what the pass needs of it in
/// one simple statement.
async fn take_snapshot(tx: &Transaction<'_>, config: &Config) -> Result<Taken, VerifyError> {
    tx.batch_execute(&format!(
        "SET LOCAL TimeZone = 'UTC'; LOCK TABLE {}, {} IN ACCESS SHARE MODE",
        outbox_table(config),
        dead_letters_table(config)
    ))
    .await
    .map_err(PgError::query("verify lock on the outbox"))?;
    let sql = format!(
        "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text,
                floor(extract(epoch FROM statement_timestamp()) * 1000000)::int8::text,
                (SELECT count(*) FROM {dead} d)::text,
                (SELECT coalesce(sum(hashtext(d::text)::int8), 0) FROM {dead} d)::text,
                (SELECT coalesce(max(transactionid::text::int8), 0) FROM pg_locks
                  WHERE locktype = 'transactionid')::text",
        dead = dead_letters_table(config)
    );
    let row = tx
        .simple_query(&sql)
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
            PgError::NotReady(format!("verify snapshot: {:?} is not a number", text(i)))
        })
    };
    let snapshot = Snapshot::parse(&text(0)).ok_or_else(|| {
        PgError::NotReady(format!("verify snapshot: {:?} is not a snapshot", text(0)))
    })?;
    let locked = crate::event::widen_xid(int(5)? as u32, snapshot.xmax);
    Ok(Taken {
        next_xid: snapshot.xmax.max(locked + 1),
        snapshot,
        fence: text(1),
        started_us: int(2)?,
        dead: (int(3)?, int(4)?),
    })
}

/// Step 4: the outbox's sums. With a memory: its settled sums plus the rows of the
/// transactions since its xmin (found from the time those began on), and some windows
/// re-hashed in full; without (or when the dead letters changed): every row.
async fn outbox_side(
    tx: &Transaction<'_>,
    scope: &Scope<'_>,
    taken: &Taken,
    memory: &mut Memory,
) -> Result<OutboxSide, VerifyError> {
    let remembered = memory
        .pg
        .take()
        .filter(|m| m.dead == taken.dead && m.xmin <= taken.snapshot.xmin);
    let (mut kept, settled_below, rows, mut history, mut credit, mut next) =
        match remembered.and_then(|m| m.scan_from().map(|t| (m, t))) {
            Some((m, t)) => (
                m.windows,
                m.xmin,
                Rows::From(t),
                m.history,
                m.credit,
                m.next,
            ),
            None => (HashMap::new(), 0, Rows::All, Vec::new(), 0, i64::MIN),
        };
    let mut parts = scope.pg_sums(tx, settled_below, rows).await?;
    let mut whole: HashSet<i64> = match rows {
        Rows::All => parts.keys().copied().collect(),
        _ => HashSet::new(),
    };
    // The re-hash: whole windows, round the range, while the credit lasts.
    credit = credit
        .saturating_add(memory.resweep_rows)
        .min(memory.resweep_rows.saturating_mul(1_000));
    let mut order: Vec<i64> = kept.keys().copied().collect();
    order.sort_unstable();
    let start = order.iter().position(|w| *w >= next).unwrap_or(0);
    for w in order[start..].iter().chain(&order[..start]).copied() {
        let rows = kept.get(&w).map_or(0, |s| s.n);
        if rows > credit {
            break;
        }
        credit -= rows;
        next = w.saturating_add(scope.width);
        kept.remove(&w);
        parts.remove(&w);
        parts.extend(scope.pg_sums(tx, 0, Rows::Window(w)).await?);
        whole.insert(w);
    }
    let mut side = OutboxSide {
        sums: HashMap::new(),
        whole,
        hashed: parts.values().map(|p| p[1].n + p[2].n).sum(),
    };
    let mut settled = HashMap::new();
    let windows: HashSet<i64> = parts.keys().chain(kept.keys()).copied().collect();
    for w in windows {
        let p = parts.get(&w).copied().unwrap_or_default();
        let done = kept.get(&w).copied().unwrap_or_default().add(p[1]);
        side.sums.insert(w, done.add(p[2]));
        if done != Sum::default() {
            settled.insert(w, done);
        }
    }
    PgMemory::record(
        &mut history,
        taken.snapshot.xmin,
        (taken.next_xid, taken.started_us),
    );
    memory.pg = Some(PgMemory {
        xmin: taken.snapshot.xmin,
        dead: taken.dead,
        windows: settled,
        history,
        credit,
        next,
    });
    Ok(side)
}

/// Hashes outbox window `w` afresh (a differing window whose sums came partly from memory):
/// its sum, with the memory and `side` brought up to date.
async fn rehash_outbox_window(
    tx: &Transaction<'_>,
    scope: &Scope<'_>,
    w: i64,
    memory: &mut Memory,
    side: &mut OutboxSide,
) -> Result<Sum, VerifyError> {
    let fresh = scope.pg_sums(tx, 0, Rows::Window(w)).await?;
    let parts = fresh.get(&w).copied().unwrap_or_default();
    side.hashed += parts[1].n + parts[2].n;
    side.whole.insert(w);
    if let Some(m) = memory.pg.as_mut() {
        m.windows.remove(&w);
        if parts[1] != Sum::default() {
            m.windows.insert(w, parts[1]);
        }
    }
    let sum = parts[1].add(parts[2]);
    side.sums.insert(w, sum);
    Ok(sum)
}

/// Step 6: ClickHouse's sums: remembered sums of the rows below the last xmin, while their
/// count and xid sum are unchanged and no mutation came, plus the rows since.
async fn clickhouse_side(
    sink: &ClickHouseSink,
    scope: &Scope<'_>,
    memory: &mut Memory,
) -> Result<(HashMap<i64, Sum>, u64), VerifyError> {
    let mutations: u64 = sink
        .fetch_all::<u64>(
            "SELECT count() FROM system.mutations
              WHERE database = currentDatabase() AND table = {table_name:String}",
        )
        .await?
        .first()
        .copied()
        .unwrap_or_default();
    let remembered = memory
        .ch
        .take()
        .filter(|m| m.mutations == mutations && m.xmin <= scope.snapshot.xmin);
    let settled_below = remembered.as_ref().map_or(0, |m| m.xmin);
    let mut kept = remembered.map(|m| m.windows).unwrap_or_default();
    let mut windows = scope.ch_sums(sink, settled_below, None).await?;
    let mut stale: Vec<i64> = windows.keys().chain(kept.keys()).copied().collect();
    stale.sort_unstable();
    stale.dedup();
    stale.retain(|w| {
        let check = kept.get(w).map_or((0, 0), |(_, check)| *check);
        windows.get(w).map_or((0, 0), |c| c.old) != check
    });
    for w in &stale {
        kept.remove(w);
        windows.remove(w);
    }
    windows.extend(scope.ch_sums(sink, 0, Some(&stale)).await?);
    let mut sums = HashMap::new();
    let mut settled = HashMap::new();
    let mut hashed = 0;
    for (w, c) in windows {
        hashed += c.mid.0.n + c.new.n;
        let (old, check) = kept.get(&w).copied().unwrap_or_default();
        let done = old.add(c.mid.0);
        let check = (check.0 + c.mid.0.n, check.1.wrapping_add(c.mid.1));
        sums.insert(w, done.add(c.new));
        if done != Sum::default() {
            settled.insert(w, (done, check));
        }
    }
    memory.ch = Some(ChMemory {
        xmin: scope.snapshot.xmin,
        mutations,
        windows: settled,
    });
    Ok((sums, hashed))
}

/// Step 8: settles what was found, remembers it, and writes the report.
async fn finish(
    config: &Config,
    sink: &ClickHouseSink,
    control: &Client,
    (options, horizon): (&Options, Option<&Horizon>),
    compared: Compared,
    memory: &mut Memory,
    others: bool,
) -> Result<VerifyReport, VerifyError> {
    let width = options.window_us;
    let h = horizon.map(|h| &h.snapshot);
    for (w, outbox, clickhouse, found) in compared.narrowed.iter().cloned() {
        let settled = settle::settle(control, config, sink, h, found).await?;
        memory.narrowed.insert(
            w,
            Narrowed {
                outbox,
                clickhouse,
                settled,
            },
        );
    }
    let mut report = VerifyReport {
        source: sink.source().to_string(),
        proof_start: horizon.map(|h| ProofStart {
            checkpoint_lsn: h.lsn.to_string(),
            recorded_at: h.recorded_at.clone(),
            why: h.why,
        }),
        window_seconds: (width / 1_000_000) as u64,
        verified_through_us: compared.taken.started_us,
        hashed_rows: compared.hashed + compared.outbox.hashed,
        narrowed_windows: compared.narrowed.len() as u64,
        ..VerifyReport::default()
    };
    let windows: HashSet<i64> = compared
        .outbox
        .sums
        .keys()
        .chain(compared.clickhouse.keys())
        .copied()
        .collect();
    report.windows = windows.len() as u64;
    report.outbox_events = compared.outbox.sums.values().map(|s| s.n).sum();
    report.clickhouse_rows = compared.clickhouse.values().map(|s| s.n).sum();
    let mut differing: Vec<(i64, Sum, Sum)> = compared
        .narrowed
        .iter()
        .map(|(w, p, c, _)| (*w, *p, *c))
        .chain(compared.remembered.iter().copied())
        .collect();
    differing.sort_unstable_by_key(|d| d.0);
    for (w, p, c) in differing {
        let Some(s) = memory.narrowed.get(&w).map(|n| &n.settled) else {
            continue;
        };
        report.outside_proof += s.outside;
        if s.is_empty() && s.unlisted == 0 {
            continue;
        }
        report.verified_through_us = report.verified_through_us.min(w);
        report.differing_windows.push(DifferingWindow {
            from: format_us(w),
            until: format_us(w.saturating_add(width)),
            outbox_events: p.n,
            clickhouse_rows: c.n,
            missing: s.missing.len() as u64,
            extra: s.extra.len() as u64,
            altered: s.altered.len() as u64,
        });
        add_bounded(
            &mut report.missing,
            &s.missing,
            MAX_MISSING,
            &mut report.unlisted,
        );
        add_bounded(&mut report.extra, &s.extra, MAX_OTHER, &mut report.unlisted);
        add_bounded(
            &mut report.altered,
            &s.altered,
            MAX_OTHER,
            &mut report.unlisted,
        );
        report.unlisted += s.unlisted;
    }
    report.missing.sort();
    report.extra.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    report.altered.sort();
    if let Some((from, until)) = options.range {
        (report.from, report.until) = (format_us(from), format_us(until));
    }
    if others {
        let sql = format!(
            "SELECT toString(source), count() FROM {TABLE} WHERE NOT ({OURS})
              GROUP BY source ORDER BY source"
        );
        report.other_sources = sink.fetch_all(&sql).await?;
    }
    Ok(report)
}

fn add_bounded<T: Clone>(list: &mut Vec<T>, items: &[T], max: usize, unlisted: &mut u64) {
    let room = max.saturating_sub(list.len()).min(items.len());
    list.extend_from_slice(&items[..room]);
    *unlisted += (items.len() - room) as u64;
}

/// Waits until the slot's confirmed position passes `fence` (replay's wait, with verify's own
/// message when it times out).
async fn wait_for_fence(
    client: &Client,
    config: &Config,
    fence: &str,
    wait: Duration,
) -> Result<(), VerifyError> {
    match replay::wait_for_fence(client, config, fence, wait).await {
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

/// The background verifier of `run`: every `verify_interval_s`, verifies every event the
/// outbox holds, hashing only the rows that came since the last pass (see [`Memory`]).
pub async fn verify_forever(config: Config, gauges: Arc<crate::metrics::Metrics>) {
    if config.verify_lookback_hours.is_some() {
        warn!(
            "verify_lookback_hours is no longer used: the background verifier compares every \
             event the outbox holds (docs/guarantees.md, \"What `verify` proves\"); remove it"
        );
    }
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
                        altered = w.altered, outbox_events = w.outbox_events,
                        clickhouse_rows = w.clickhouse_rows,
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
                let missing = report.missing.len() as u64 + report.unlisted;
                gauges
                    .missing
                    .store(missing.saturating_sub(repaired), Relaxed);
                gauges.extra.store(report.extra.len() as u64, Relaxed);
                gauges.altered.store(report.altered.len() as u64, Relaxed);
                if let Some(r) = &report.repair {
                    info!(
                        shipped = r.shipped,
                        already_there = r.already_there,
                        "verify: missing events re-shipped"
                    );
                }
            }
            Err(e) if e.yielded() => {
                gauges.yielded.inc();
                info!(
                    error = %e,
                    "verify pass gave way to a migration: not checked; the next pass checks it"
                );
            }
            Err(e) => {
                gauges.errors.inc();
                warn!(error = %e, "verify pass could not check; will try again");
            }
        }
    }
}

/// One background pass (public for tests: `run` calls it from [`verify_forever`]): every event
/// the outbox holds, in windows of `verify_window_s`, reusing what `memory` vouches for.
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
    let options = Options {
        range: None,
        from_lsn: None,
        window_us: config.verify_window_s as i64 * 1_000_000,
        wait: Duration::from_secs(config.verify_grace_s.max(30)),
        // verify_forever repairs after logging.
        repair: false,
    };
    compare(config, sink, &options, memory, false).await
}
