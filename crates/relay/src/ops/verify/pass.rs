//! One pass, step by step (the steps are listed in `mod.rs`): the connections, the snapshot and
//! the fences around it, the comparison of the two sides, window by window.

use std::time::Duration;

use tokio_postgres::{Client, Transaction};

use super::memory::Memory;
use super::narrow::{self, Found};
use super::report::{Compared, finish};
use super::sides::{clickhouse_side, outbox_side, rehash_outbox_window};
use super::snapshot::{Snapshot, Taken};
use super::sums::Scope;
use super::{Horizon, Options, VerifyError, VerifyReport, content, format_us, horizon};
use crate::config::Config;
use crate::pg::{self, Guarded, PgError};
use crate::reship::{self, ReshipError};
use crate::sink::ClickHouseSink;
use crate::store::schema::{dead_letters_table, outbox_table};

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
    let mut guarded = Guarded::connect(config.postgres(), "verify").await?;
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
    let client = pg::connect(config.postgres()).await?;
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

/// Waits until the slot's confirmed position passes `fence` (replay's wait, with verify's own
/// message when it times out).
async fn wait_for_fence(
    client: &Client,
    config: &Config,
    fence: &str,
    wait: Duration,
) -> Result<(), VerifyError> {
    match reship::wait_for_fence(client, config, fence, wait).await {
        Err(ReshipError::FenceTimeout {
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
        Err(ReshipError::Postgres(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
        Ok(()) => Ok(()),
    }
}
