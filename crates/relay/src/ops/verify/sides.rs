//! The two sides' sums of a pass (steps 4 and 6), reusing what the background verifier's
//! [`Memory`] vouches for.

use std::collections::{HashMap, HashSet};

use tokio_postgres::Transaction;

use super::VerifyError;
use super::memory::{ChMemory, Memory, PgMemory};
use super::snapshot::Taken;
use super::sums::{Rows, Scope, Sum};
use crate::sink::ClickHouseSink;

/// The outbox's side of a pass: per window, the sums of the set, and the windows hashed whole.
pub(super) struct OutboxSide {
    pub sums: HashMap<i64, Sum>,
    pub whole: HashSet<i64>,
    pub hashed: u64,
}

/// Step 4: the outbox's sums. With a memory: its settled sums plus the rows of the
/// transactions since its xmin (found from the time those began on), and some windows
/// re-hashed in full; without (or when the dead letters changed): every row.
pub(super) async fn outbox_side(
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
pub(super) async fn rehash_outbox_window(
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
pub(super) async fn clickhouse_side(
    sink: &ClickHouseSink,
    scope: &Scope<'_>,
    memory: &mut Memory,
) -> Result<(HashMap<i64, Sum>, u64), VerifyError> {
    // On a cluster, every node's (a replica's own mutations, or one every replica runs).
    let mutations: u64 = sink
        .fetch_all::<u64>(&format!(
            "SELECT count() FROM {} WHERE database = {} AND table = {{table_name:String}}",
            sink.system_everywhere("mutations"),
            crate::sink::quote_ch_literal(sink.database())
        ))
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
