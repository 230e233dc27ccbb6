//! Step 8: what was found, settled and remembered, as the report.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use super::memory::{Memory, Narrowed};
use super::narrow::Found;
use super::sides::OutboxSide;
use super::snapshot::Taken;
use super::sums::Sum;
use super::{
    DifferingWindow, Horizon, MAX_MISSING, MAX_OTHER, Options, ProofStart, Settled, VerifyError,
    VerifyReport, format_us, settle,
};
use crate::config::Config;
use crate::sink::{ClickHouseSink, OURS};

/// What the pass ([`super::pass`]) hands to [`finish`].
pub(super) struct Compared {
    pub taken: Taken,
    pub outbox: OutboxSide,
    pub clickhouse: HashMap<i64, Sum>,
    /// Differing windows narrowed this pass: (window, outbox, ClickHouse, found).
    pub narrowed: Vec<(i64, Sum, Sum, Found)>,
    /// Differing windows whose result was remembered.
    pub remembered: Vec<(i64, Sum, Sum)>,
    pub hashed: u64,
}

/// Step 8: settles what was found, remembers it, and writes the report.
pub(super) async fn finish(
    config: &Config,
    sink: &ClickHouseSink,
    control: &Client,
    (options, horizon): (&Options, Option<&Horizon>),
    compared: Compared,
    memory: &mut Memory,
    others: bool,
) -> Result<VerifyReport, VerifyError> {
    let h = horizon.map(|h| &h.snapshot);
    for (w, outbox, clickhouse, found) in compared.narrowed.iter().cloned() {
        let settled = settle::settle(control, config, sink, h, found).await?;
        let narrowed = Narrowed {
            outbox,
            clickhouse,
            settled,
        };
        memory.narrowed.insert(w, narrowed);
    }
    let mut report = totals(sink, (options, horizon), &compared);
    let mut differing: Vec<(i64, Sum, Sum)> = compared
        .narrowed
        .iter()
        .map(|(w, p, c, _)| (*w, *p, *c))
        .chain(compared.remembered.iter().copied())
        .collect();
    differing.sort_unstable_by_key(|d| d.0);
    for (w, p, c) in differing {
        if let Some(n) = memory.narrowed.get(&w) {
            add_window(&mut report, (w, options.window_us), (p, c), &n.settled);
        }
    }
    report.missing.sort();
    report.extra.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    report.altered.sort();
    if others {
        let sql = format!(
            "SELECT toString(source), count() FROM {} WHERE NOT ({OURS})
              GROUP BY source ORDER BY source",
            sink.rows_once()
        );
        report.other_sources = sink.fetch_all(&sql).await?;
    }
    Ok(report)
}

/// The report before its differences: what was compared, and how much.
fn totals(
    sink: &ClickHouseSink,
    (options, horizon): (&Options, Option<&Horizon>),
    compared: &Compared,
) -> VerifyReport {
    let (outbox, clickhouse) = (&compared.outbox.sums, &compared.clickhouse);
    let windows: HashSet<i64> = outbox.keys().chain(clickhouse.keys()).copied().collect();
    let (from, until) = options
        .range
        .map_or((String::new(), String::new()), |(f, u)| {
            (format_us(f), format_us(u))
        });
    VerifyReport {
        source: sink.source().to_string(),
        from,
        until,
        proof_start: horizon.map(|h| ProofStart {
            checkpoint_lsn: h.lsn.to_string(),
            recorded_at: h.recorded_at.clone(),
            why: h.why,
        }),
        window_seconds: (options.window_us / 1_000_000) as u64,
        windows: windows.len() as u64,
        outbox_events: outbox.values().map(|s| s.n).sum(),
        clickhouse_rows: clickhouse.values().map(|s| s.n).sum(),
        verified_through_us: compared.taken.started_us,
        hashed_rows: compared.hashed + compared.outbox.hashed,
        narrowed_windows: compared.narrowed.len() as u64,
        ..VerifyReport::default()
    }
}

/// Adds a differing window's settled findings (within the lists' bounds).
fn add_window(report: &mut VerifyReport, (w, width): (i64, i64), (p, c): (Sum, Sum), s: &Settled) {
    report.outside_proof += s.outside;
    if s.is_empty() && s.unlisted == 0 {
        return;
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
    let unlisted = &mut report.unlisted;
    add_bounded(&mut report.missing, &s.missing, MAX_MISSING, unlisted);
    add_bounded(&mut report.extra, &s.extra, MAX_OTHER, unlisted);
    add_bounded(&mut report.altered, &s.altered, MAX_OTHER, unlisted);
    *unlisted += s.unlisted;
}

fn add_bounded<T: Clone>(list: &mut Vec<T>, items: &[T], max: usize, unlisted: &mut u64) {
    let room = max.saturating_sub(list.len()).min(items.len());
    list.extend_from_slice(&items[..room]);
    *unlisted += (items.len() - room) as u64;
}
