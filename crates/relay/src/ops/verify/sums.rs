//! The two sets a pass compares, and their per-window sums, each computed inside its own server
//! (no event row travels while windows match).
//!
//! - **The outbox's set**: the outbox rows the pass's snapshot S sees, but those the horizon's
//!   snapshot H sees (rows the purge may delete: outside the proof) and unshipped dead letters
//!   (accounted for in their own table). A shipped dead letter that was a typed one is hashed
//!   as the letter was shipped (an operator may have fixed it with `UPDATE`).
//! - **ClickHouse's set**: this source's rows whose transaction (`xid`) S sees and H does not.
//!
//! A row inserted in a savepoint has the savepoint's xid as its `xmin` and its top-level
//! transaction's in ClickHouse: the two sides may then disagree on H (a transaction running
//! across the horizon's checkpoint) and the window is narrowed, where such a row is settled by
//! id ([`super::settle`]): never reported, only slower.

use std::collections::HashMap;

use tokio_postgres::Transaction;

use super::content::{CH_MICROS, Fields, ch_window, pg_micros, pg_window};
use super::snapshot::{Snapshot, pg_row_xid};
use crate::config::Config;
use crate::pg::PgError;
use crate::sink::{ClickHouseSink, OURS, SinkError};
use crate::store::schema::{dead_letters_table, outbox_table};

/// What a pass compares: the snapshot S, the horizon H, an optional `event_date_time` range
/// and the window width.
pub struct Scope<'a> {
    pub config: &'a Config,
    pub snapshot: &'a Snapshot,
    pub horizon: Option<&'a Snapshot>,
    /// `[from, until)` in Unix µs of `event_date_time` (`--since`/`--until`), or everything.
    pub range: Option<(i64, i64)>,
    pub width: i64,
}

/// Count and hash sum (mod 2^64) of a set of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Sum {
    pub n: u64,
    pub hash: i64,
}

impl Sum {
    pub fn add(self, o: Sum) -> Sum {
        Sum {
            n: self.n + o.n,
            hash: self.hash.wrapping_add(o.hash),
        }
    }
}

/// Outbox sums of one window by class of the rows' xid (see [`Scope::pg_sums`]).
pub type PgWindows = HashMap<i64, [Sum; 3]>;

/// ClickHouse rows of one window by xid (see [`Scope::ch_sums`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChWindow {
    /// Below the remembered xmin: (count, xid sum), a check that they did not change.
    pub old: (u64, u64),
    /// From there to this snapshot's xmin: hashed, and their xid sum.
    pub mid: (Sum, u64),
    /// The rest: hashed.
    pub new: Sum,
}

/// PostgreSQL's exact sum (numeric, as text) reduced mod 2^64, as ClickHouse's Int64 sum wraps.
pub fn wrap_sum(text: &str) -> i64 {
    text.parse::<i128>().map(|v| v as i64).unwrap_or_default()
}

/// `'epoch' + us` as a PostgreSQL timestamptz literal expression, exact.
pub fn pg_time(us: i64) -> String {
    format!(
        "('epoch'::timestamptz + ({}::int8 * interval '1 second') + ({}::int8 * interval '1 microsecond'))",
        us.div_euclid(1_000_000),
        us.rem_euclid(1_000_000)
    )
}

impl Scope<'_> {
    /// The outbox rows of the set (`o`, its dead letter `d`, the row's xid8 `l.x`), their
    /// window `w` (by the outbox row's time) and hash `h`, with `extra` conditions (SQL).
    pub fn pg_rows(&self, extra: &str) -> String {
        let mut filter = vec!["(d.event_id IS NULL OR d.shipped_at IS NOT NULL)".to_string()];
        if let Some(h) = self.horizon {
            filter.push(h.sql_misses("l.x"));
        }
        if let Some((from, until)) = self.range {
            filter.push(format!(
                "o.event_date_time >= {} AND o.event_date_time < {}",
                pg_time(from),
                pg_time(until)
            ));
        }
        if !extra.is_empty() {
            filter.push(extra.to_string());
        }
        format!(
            "SELECT o.event_id, {w} AS w, l.x,
                    CASE WHEN d.event_type IS NOT NULL THEN {letter} ELSE {row} END AS h
               FROM {outbox} o
               LEFT JOIN {dead} d ON d.event_id = o.event_id
               CROSS JOIN LATERAL (SELECT {x} AS x) l
              WHERE {filter}",
            w = pg_window(&pg_micros("o.event_date_time"), self.width),
            letter = Fields::postgres("d").pg_hash(),
            row = Fields::postgres("o").pg_hash(),
            outbox = outbox_table(self.config),
            dead = dead_letters_table(self.config),
            x = pg_row_xid(self.snapshot.xmax),
            filter = filter.join("\n                AND "),
        )
    }

    /// ClickHouse's rows of the set, with `extra` conditions.
    pub fn ch_where(&self, extra: &str) -> String {
        let mut filter = vec![OURS.to_string(), self.snapshot.sql_sees("xid")];
        if let Some(h) = self.horizon {
            filter.push(h.sql_misses("xid"));
        }
        if let Some((from, until)) = self.range {
            filter.push(format!("{CH_MICROS} >= {from} AND {CH_MICROS} < {until}"));
        }
        if !extra.is_empty() {
            filter.push(extra.to_string());
        }
        filter.join(" AND ")
    }

    /// ClickHouse: the window of a row.
    pub fn ch_window(&self) -> String {
        ch_window(CH_MICROS, self.width)
    }

    /// Per window, the outbox set's sums by the rows' xid: class 0 below `settled_below` (left
    /// out: a remembered sum covers them; 0 for none), 1 from there to S's xmin (settled: no
    /// later transaction adds to them), 2 the rest. `rows` says which rows are read.
    pub async fn pg_sums(
        &self,
        tx: &Transaction<'_>,
        settled_below: u64,
        rows: Rows,
    ) -> Result<PgWindows, PgError> {
        let mut extra = format!("l.x >= {settled_below}");
        match rows {
            Rows::All => {}
            Rows::From(t) => {
                extra.push_str(&format!(" AND o.event_date_time >= {}", pg_time(t)));
            }
            Rows::Window(w) => extra.push_str(&format!(
                " AND o.event_date_time >= {} AND o.event_date_time < {}",
                pg_time(w),
                pg_time(w.saturating_add(self.width))
            )),
        }
        let sql = format!(
            "SELECT r.w, CASE WHEN r.x < {} THEN 1 ELSE 2 END, count(*)::int8,
                    coalesce(sum(r.h), 0)::text
               FROM ({}) r GROUP BY 1, 2",
            self.snapshot.xmin,
            self.pg_rows(&extra)
        );
        let rows = tx
            .query(&sql, &[])
            .await
            .map_err(PgError::query("verify outbox sums"))?;
        let mut sums = PgWindows::new();
        for row in rows {
            let (w, class, n, hash): (i64, i32, i64, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            sums.entry(w).or_default()[class.clamp(1, 2) as usize] = Sum {
                n: n as u64,
                hash: wrap_sum(&hash),
            };
        }
        Ok(sums)
    }

    /// Per window, ClickHouse's set by the rows' xid: below `settled_below` counted only
    /// (count, xid sum: a remembered sum covers them), from there to S's xmin hashed and
    /// counted (settled from now on), the rest hashed. `only`: just these windows.
    pub async fn ch_sums(
        &self,
        sink: &ClickHouseSink,
        settled_below: u64,
        only: Option<&[i64]>,
    ) -> Result<HashMap<i64, ChWindow>, SinkError> {
        let w = self.ch_window();
        let extra = match only {
            Some([]) => return Ok(HashMap::new()),
            Some(windows) => format!(
                "{w} IN ({})",
                windows
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None => String::new(),
        };
        let old = format!("xid < {settled_below}");
        let mid = format!("xid >= {settled_below} AND xid < {}", self.snapshot.xmin);
        let new = format!("xid >= {}", self.snapshot.xmin);
        let h = Fields::clickhouse().ch_hash();
        let sql = format!(
            "SELECT {w} AS w, countIf({old}), sumIf(xid, {old}),
                    countIf({mid}), sumIf(xid, {mid}), sum(if({mid}, {h}, toInt64(0))),
                    countIf({new}), sum(if({new}, {h}, toInt64(0)))
               FROM {} WHERE {} GROUP BY w",
            sink.rows_once(),
            self.ch_where(&extra),
        );
        type Row = (i64, u64, u64, u64, u64, i64, u64, i64);
        let rows: Vec<Row> = sink.fetch_all(&sql).await?;
        Ok(rows
            .into_iter()
            .map(|(w, on, ox, mn, mx, mh, nn, nh)| {
                let window = ChWindow {
                    old: (on, ox),
                    mid: (Sum { n: mn, hash: mh }, mx),
                    new: Sum { n: nn, hash: nh },
                };
                (w, window)
            })
            .collect())
    }
}

/// Which outbox rows [`Scope::pg_sums`] reads.
#[derive(Debug, Clone, Copy)]
pub enum Rows {
    All,
    /// With `event_date_time` from this time on (Unix µs): the BRIN index skips the rest.
    From(i64),
    /// Of the window starting here.
    Window(i64),
}
