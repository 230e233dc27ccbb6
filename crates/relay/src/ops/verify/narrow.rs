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
use crate::sink::{ClickHouseSink, TABLE};

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
           FROM (SELECT event_id, xid, {} AS h FROM {TABLE} WHERE {})
          {ch_filter} GROUP BY id ORDER BY id",
        Fields::clickhouse().ch_hash(),
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
    let mut ch = sink.cursor::<(String, u64, i64, i64, u64)>(&ch_sql)?;
    let mut p = pg.next().await?;
    let mut c = ch.next().await?;
    let unlisted = &mut found.unlisted;
    loop {
        let order = match (&p, &c) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((pid, _)), Some((cid, ..))) => pid.as_str().cmp(cid.as_str()),
        };
        match order {
            std::cmp::Ordering::Less => {
                if let Some((id, _)) = p.take() {
                    Found::push(&mut found.missing, MAX_MISSING, unlisted, id);
                }
                p = pg.next().await?;
            }
            std::cmp::Ordering::Greater => {
                if let Some((id, n, _, _, xid)) = c.take() {
                    Found::push(&mut found.extra, MAX_OTHER, unlisted, (id, n, xid));
                }
                c = ch.next().await?;
            }
            std::cmp::Ordering::Equal => {
                if let (Some((_, h)), Some((id, n, low, high, _))) = (p.take(), c.take()) {
                    if n > 1 {
                        Found::push(&mut found.duplicate, MAX_OTHER, unlisted, (id, n));
                    } else if low != h || high != h {
                        Found::push(&mut found.altered, MAX_OTHER, unlisted, id);
                    }
                }
                p = pg.next().await?;
                c = ch.next().await?;
            }
        }
    }
    Ok(())
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
        "SELECT {} AS b, count(), sum(h) FROM (SELECT {} AS h FROM {TABLE} WHERE {})
          GROUP BY b ORDER BY b",
        ch_bucket("h", bits),
        Fields::clickhouse().ch_hash(),
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
