//! What the background verifier carries from one pass to the next, so a pass hashes only what
//! came (and memory and CPU stay flat while a window keeps differing):
//!
//! - the outbox's sums per window over its settled rows (xid below the last snapshot's xmin:
//!   no later transaction adds to them), with where the rows of later transactions may start
//!   (their `event_date_time` is not older than the pass before their xid, less a margin); whole
//!   windows are re-hashed round the range, [`super::RESWEEP_ROWS_PER_S`] rows' worth a second
//!   of interval, for rows written with an older `event_date_time` or deleted;
//! - ClickHouse's sums per window over the rows with xid below the last snapshot's xmin, with
//!   their count and xid sum, read again every pass (cheap columns) with the table's mutations:
//!   any change and the window is hashed afresh;
//! - the id-by-id result of each differing window, kept while both sides' sums stay the same.
//!
//! Everything is forgotten when the horizon or the window width changes. Nothing here makes a
//! window verified without that pass's comparison.

use std::collections::HashMap;

use super::settle::Settled;
use super::sums::Sum;

/// Margin below the start time of a pass, for the `event_date_time` of rows of transactions
/// that got their xid after it (a default taken just before the xid was assigned).
pub const XID_TIME_MARGIN_US: i64 = 2_000_000;

/// See the module's comment.
#[derive(Debug, Default)]
pub struct Memory {
    pub(super) width_us: i64,
    /// The horizon's `snapshot_lsn` the sums were taken under (0: none).
    pub(super) horizon: u64,
    /// Outbox rows a pass may re-hash in full (credit that accumulates while unused).
    pub(super) resweep_rows: u64,
    pub(super) pg: Option<PgMemory>,
    pub(super) ch: Option<ChMemory>,
    pub(super) narrowed: HashMap<i64, Narrowed>,
    /// Both servers hash the probe row alike (checked once).
    pub(super) hash_checked: bool,
}

impl Memory {
    /// An empty memory re-hashing `resweep_rows` outbox rows per pass.
    pub fn new(resweep_rows: u64) -> Memory {
        Memory {
            resweep_rows,
            ..Memory::default()
        }
    }

    /// Forgets the sums when the width or the horizon changed.
    pub(super) fn align(&mut self, width_us: i64, horizon: u64) {
        if self.width_us != width_us || self.horizon != horizon {
            *self = Memory {
                width_us,
                horizon,
                resweep_rows: self.resweep_rows,
                hash_checked: self.hash_checked,
                ..Memory::default()
            };
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct PgMemory {
    /// The snapshot's xmin: every transaction below it had ended.
    pub xmin: u64,
    /// The dead letters then (count, hash of their rows): any change forgets the sums.
    pub dead: (i64, i64),
    pub windows: HashMap<i64, Sum>,
    /// Per pass: (the next xid then, its start in Unix µs): a transaction whose xid is at or
    /// past it began after that time.
    pub history: Vec<(u64, i64)>,
    /// Re-hash credit (rows) and the window the re-hash goes on from.
    pub credit: u64,
    pub next: i64,
}

impl PgMemory {
    /// From when the rows of transactions at or past `xmin` can date.
    pub fn scan_from(&self) -> Option<i64> {
        self.history
            .iter()
            .filter(|(x, _)| *x <= self.xmin)
            .map(|(_, t)| *t - XID_TIME_MARGIN_US)
            .max()
    }

    /// Keeps the newest pass at or below `xmin` and those past it (at most the last 1,000: fewer
    /// only means older times), then adds this pass.
    pub fn record(history: &mut Vec<(u64, i64)>, xmin: u64, this: (u64, i64)) {
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
        history.push(this);
    }
}

#[derive(Debug, Clone)]
pub(super) struct ChMemory {
    pub xmin: u64,
    /// Mutations of the table then (a DELETE is one): any change re-checks every window.
    pub mutations: u64,
    /// Per window: the sum of the rows with xid below `xmin`, and their (count, xid sum).
    pub windows: HashMap<i64, (Sum, (u64, u64))>,
}

/// A differing window's settled result and the sums it was found for.
#[derive(Debug, Clone)]
pub(super) struct Narrowed {
    pub outbox: Sum,
    pub clickhouse: Sum,
    pub settled: Settled,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_what_the_next_scan_needs() {
        let mut h = Vec::new();
        PgMemory::record(&mut h, 10, (20, 1_000));
        PgMemory::record(&mut h, 20, (30, 2_000));
        // Passes at or below the new xmin collapse to the newest of them.
        assert_eq!(h, vec![(20, 1_000), (30, 2_000)]);
        let m = PgMemory {
            xmin: 25,
            dead: (0, 0),
            windows: HashMap::new(),
            history: h,
            credit: 0,
            next: 0,
        };
        assert_eq!(m.scan_from(), Some(1_000 - XID_TIME_MARGIN_US));
    }

    #[test]
    fn a_new_horizon_forgets_the_sums() {
        let mut m = Memory::new(7);
        m.align(10, 1);
        m.ch = Some(ChMemory {
            xmin: 1,
            mutations: 0,
            windows: HashMap::new(),
        });
        m.hash_checked = true;
        m.align(10, 1);
        assert!(m.ch.is_some());
        m.align(10, 2);
        assert!(m.ch.is_none() && m.hash_checked && m.resweep_rows == 7);
    }
}
