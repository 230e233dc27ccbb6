//! A differing window, id by id, in bounded memory: first grouped by the top bits of the row
//! hash (about [`ROWS_PER_BUCKET`] rows a bucket, one pass on each side, read in bucket order),
//! then the rows of the differing buckets read from both servers sorted by id and merged as
//! they arrive, a page at a time. Memory holds one page of each side, the bucket sums (at most
//! 2^[`MAX_BUCKET_BITS`]) and the lists found, which are bounded ([`Found`]); it does not grow
//! with the window or with the number of differences.

use tokio_postgres::Transaction;

use super::VerifyError;
use super::content::{CH_MICROS, Fields, ch_bucket, pg_bucket};
use super::sums::{Scope, Sum, pg_time, wrap_sum};
use crate::pg::PgError;
use crate::sink::ClickHouseSink;

/// A window of at most this many rows (both sides) is merged whole.
const SMALL_WINDOW: u64 = 20_000;
/// Rows a bucket holds on average when a window is grouped.
const ROWS_PER_BUCKET: u64 = 64;
const MAX_BUCKET_BITS: u32 = 16;
/// More differing buckets than this: the whole window is merged (the list would not fit a
/// ClickHouse query).
const MAX_LISTED_BUCKETS: usize = 4_096;
/// Rows read from PostgreSQL per round trip.
const PAGE: i32 = 5_000;

/// Most ids a pass lists as missing (what `--repair` re-ships); more are counted.
pub const MAX_MISSING: usize = 100_000;
/// Most ids a pass lists of each other kind.
pub const MAX_OTHER: usize = 10_000;

/// What comparing windows id by id found, before it is settled ([`super::settle`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    /// In the outbox's set, not in ClickHouse's.
    pub missing: Vec<String>,
    /// In ClickHouse's set, not in the outbox's: (id, rows, the highest xid of its rows).
    pub extra: Vec<(String, u64, u64)>,
    /// In both, more than once in ClickHouse: (id, rows).
    pub duplicate: Vec<(String, u64)>,
    /// In both, once, with other content.
    pub altered: Vec<String>,
    /// Found but not listed (past the bounds of the lists).
    pub unlisted: u64,
}

impl Found {
    fn push<T>(list: &mut Vec<T>, max: usize, unlisted: &mut u64, item: T) {
        if list.len() < max {
            list.push(item);
        } else {
            *unlisted += 1;
        }
    }
}

/// Bits of the hash a window of `rows` rows is grouped by (0: merged whole).
fn bucket_bits(rows: u64) -> u32 {
    if rows <= SMALL_WINDOW {
        return 0;
    }
    rows.div_ceil(ROWS_PER_BUCKET)
        .next_power_of_two()
        .trailing_zeros()
        .min(MAX_BUCKET_BITS)
}

/// The window starting at `w`: conditions for PostgreSQL (outbox row `o`) and ClickHouse.
fn window_conditions(scope: &Scope<'_>, w: i64) -> (String, String) {
    let until = w.saturating_add(scope.width);
    (
        format!(
            "o.event_date_time >= {} AND o.event_date_time < {}",
            pg_time(w),
            pg_time(until)
        ),
        format!("{CH_MICROS} >= {w} AND {CH_MICROS} < {until}"),
    )
}

/// Compares window `w` (of about `rows` rows, both sides) id by id, adding what differs to
/// `found`.
pub async fn narrow(
    scope: &Scope<'_>,
    tx: &Transaction<'_>,
    sink: &ClickHouseSink,
    w: i64,
    rows: u64,
    found: &mut Found,
) -> Result<(), VerifyError> {
    let (pg_window, ch_window) = window_conditions(scope, w);
    let bits = bucket_bits(rows);
    let (mut pg_filter, mut ch_filter) = (String::new(), String::new());
    if bits > 0 {
        let differing = differing_buckets(scope, tx, sink, (&pg_window, &ch_window), bits).await?;
        if differing.is_empty() {
            return Ok(());
        }
        if differing.len() <= MAX_LISTED_BUCKETS {
            let list = differing
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            pg_filter = format!("WHERE {} IN ({list})", pg_bucket("r.h", bits));
            ch_filter = format!("WHERE {} IN ({list})", ch_bucket("h", bits));
        }
    }
    let pg_sql = format!(
        "SELECT r.event_id::text, r.h FROM ({}) r {pg_filter} ORDER BY r.event_id",
        scope.pg_rows(&pg_window)
    );
    let ch_sql = format!(
        "SELECT toString(event_id) AS id, count(), min(h), max(h), max(xid)
           FROM (SELECT event_id, xid, {} AS h FROM {} WHERE {})
          {ch_filter} GROUP BY id ORDER BY id",
        Fields::clickhouse().ch_hash(),
        sink.rows_once(),
        scope.ch_where(&ch_window)
    );
    let statement = tx
        .prepare(&pg_sql)
        .await
        .map_err(PgError::query("verify outbox ids"))?;
    let portal = tx
        .bind(&statement, &[])
        .await
        .map_err(PgError::query("verify outbox ids"))?;
    let mut pg = Pages {
        tx,
        portal,
        page: Vec::new().into_iter(),
        done: false,
    };
    let mut ch = sink.cursor::<ChId>(&ch_sql)?;
    merge(&mut pg, &mut ch, found).await
}

/// An outbox row: its id and hash.
type PgId = (String, i64);
/// An id ClickHouse holds: rows, lowest and highest hash, highest xid.
type ChId = (String, u64, i64, i64, u64);

/// Merges the two sides' ids (each sorted) as they arrive.
async fn merge(
    pg: &mut Pages<'_, '_>,
    ch: &mut crate::sink::Cursor<ChId>,
    found: &mut Found,
) -> Result<(), VerifyError> {
    let mut p = pg.next().await?;
    let mut c = ch.next().await?;
    while p.is_some() || c.is_some() {
        let (took_p, took_c) = found.record(&mut p, &mut c);
        if took_p {
            p = pg.next().await?;
        }
        if took_c {
            c = ch.next().await?;
        }
    }
    Ok(())
}

impl Found {
    /// Records the smaller of the two ids at the heads of the sides (both when equal), taking
    /// it; which sides it took from.
    fn record(&mut self, p: &mut Option<PgId>, c: &mut Option<ChId>) -> (bool, bool) {
        use std::cmp::Ordering::{Equal, Greater, Less};
        let order = match (&p, &c) {
            (None, None) => return (false, false),
            (Some(_), None) => Less,
            (None, Some(_)) => Greater,
            (Some((pid, _)), Some((cid, ..))) => pid.as_str().cmp(cid.as_str()),
        };
        let unlisted = &mut self.unlisted;
        match (order, p.take(), c.take()) {
            (Less, Some((id, _)), c_back) => {
                *c = c_back;
                Found::push(&mut self.missing, MAX_MISSING, unlisted, id);
                (true, false)
            }
            (Greater, p_back, Some((id, n, _, _, xid))) => {
                *p = p_back;
                Found::push(&mut self.extra, MAX_OTHER, unlisted, (id, n, xid));
                (false, true)
            }
            (Equal, Some((_, h)), Some((id, n, low, high, _))) => {
                if n > 1 {
                    Found::push(&mut self.duplicate, MAX_OTHER, unlisted, (id, n));
                } else if low != h || high != h {
                    Found::push(&mut self.altered, MAX_OTHER, unlisted, id);
                }
                (true, true)
            }
            (_, p_back, c_back) => {
                (*p, *c) = (p_back, c_back);
                (false, false)
            }
        }
    }
}

/// A PostgreSQL query's rows (id, hash) read a page at a time through a portal.
struct Pages<'a, 't> {
    tx: &'a Transaction<'t>,
    portal: tokio_postgres::Portal,
    page: std::vec::IntoIter<tokio_postgres::Row>,
    done: bool,
}

impl Pages<'_, '_> {
    async fn next(&mut self) -> Result<Option<(String, i64)>, PgError> {
        loop {
            if let Some(row) = self.page.next() {
                return Ok(Some((row.get(0), row.get(1))));
            }
            if self.done {
                return Ok(None);
            }
            let rows = self
                .tx
                .query_portal(&self.portal, PAGE)
                .await
                .map_err(PgError::query("verify outbox ids"))?;
            self.done = rows.len() < PAGE as usize;
            self.page = rows.into_iter();
        }
    }
}

/// The buckets (of `bits` bits) of the window whose sums differ, read in bucket order from both
/// servers and compared as they arrive.
async fn differing_buckets(
    scope: &Scope<'_>,
    tx: &Transaction<'_>,
    sink: &ClickHouseSink,
    (pg_window, ch_window): (&str, &str),
    bits: u32,
) -> Result<Vec<i64>, VerifyError> {
    let pg_sql = format!(
        "SELECT {} AS b, count(*)::int8, sum(r.h)::text FROM ({}) r GROUP BY 1 ORDER BY 1",
        pg_bucket("r.h", bits),
        scope.pg_rows(pg_window)
    );
    let pg: Vec<(i64, Sum)> = tx
        .query(&pg_sql, &[])
        .await
        .map_err(PgError::query("verify outbox buckets"))?
        .iter()
        .map(|r| {
            let (b, n, hash): (i64, i64, String) = (r.get(0), r.get(1), r.get(2));
            (
                b,
                Sum {
                    n: n as u64,
                    hash: wrap_sum(&hash),
                },
            )
        })
        .collect();
    let ch_sql = format!(
        "SELECT {} AS b, count(), sum(h) FROM (SELECT {} AS h FROM {} WHERE {})
          GROUP BY b ORDER BY b",
        ch_bucket("h", bits),
        Fields::clickhouse().ch_hash(),
        sink.rows_once(),
        scope.ch_where(ch_window)
    );
    let mut ch = sink.cursor::<(i64, u64, i64)>(&ch_sql)?;
    let mut differing = Vec::new();
    let mut pg = pg.into_iter().peekable();
    let mut c = ch.next().await?;
    loop {
        let next_pg = pg.peek().map(|(b, _)| *b);
        let next_ch = c.map(|(b, ..)| b);
        let b = match (next_pg, next_ch) {
            (None, None) => break,
            (Some(p), Some(q)) => p.min(q),
            (Some(p), None) => p,
            (None, Some(q)) => q,
        };
        let p = match pg.next_if(|(x, _)| *x == b) {
            Some((_, sum)) => sum,
            None => Sum::default(),
        };
        let q = match c {
            Some((x, n, hash)) if x == b => {
                c = ch.next().await?;
                Sum { n, hash }
            }
            _ => Sum::default(),
        };
        if p != q {
            differing.push(b);
        }
    }
    Ok(differing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_windows_are_grouped_by_about_64_rows_a_bucket() {
        assert_eq!(bucket_bits(20_000), 0);
        assert_eq!(bucket_bits(20_001), 9);
        assert_eq!(bucket_bits(2_700_000), 16);
        assert_eq!(bucket_bits(u64::MAX / 2), MAX_BUCKET_BITS);
    }

    #[test]
    fn the_merge_names_each_kind() {
        let pg = |id: &str, h: i64| Some((id.to_string(), h));
        let ch = |id: &str, n: u64, low: i64, high: i64| Some((id.to_string(), n, low, high, 7));
        let mut found = Found::default();
        let steps = [
            (pg("a", 1), ch("b", 1, 2, 2), (true, false)),
            (pg("b", 2), ch("b", 1, 2, 2), (true, true)),
            (pg("c", 3), ch("c", 2, 3, 3), (true, true)),
            (pg("d", 4), ch("d", 1, 5, 5), (true, true)),
            (pg("f", 6), ch("e", 1, 6, 6), (false, true)),
            (None, ch("g", 1, 7, 7), (false, true)),
            (pg("h", 8), None, (true, false)),
        ];
        for (mut p, mut c, took) in steps {
            assert_eq!(found.record(&mut p, &mut c), took);
        }
        assert_eq!(found.missing, ["a", "h"]);
        assert_eq!(
            found.extra,
            [("e".to_string(), 1, 7), ("g".to_string(), 1, 7)]
        );
        assert_eq!(found.duplicate, [("c".to_string(), 2)]);
        assert_eq!(found.altered, ["d"]);
    }

    #[test]
    fn found_lists_are_bounded() {
        let mut big = Found::default();
        for i in 0..MAX_OTHER + 5 {
            Found::push(
                &mut big.altered,
                MAX_OTHER,
                &mut big.unlisted,
                i.to_string(),
            );
        }
        assert_eq!((big.altered.len(), big.unlisted), (MAX_OTHER, 5));
    }
}
