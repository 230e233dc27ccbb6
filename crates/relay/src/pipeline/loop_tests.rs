//! The relay loop in-process: a WAL of outbox transactions built here as pgoutput messages, a
//! [`Source`] that streams it from the slot's confirmed position as PostgreSQL does, the
//! [`MemorySink`] with its faults and a [`Store`] in memory. Each test runs sessions as
//! [`Relay`](super::Relay) does (the mode carried from one to the next, each restarting from
//! the confirmed position) and checks, at every confirm, that the slot never passes a row the
//! sink does not hold.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use pgoutput::Lsn;
use tokio::sync::watch;

use super::RelayError;
use super::mode::Mode;
use super::session::Session;
use super::source::{Source, SourceEvent};
use super::store::Store;
use crate::config::Config;
use crate::event::{OwnedEventRow, uuid_text};
use crate::metrics::Metrics;
use crate::pg::PgError;
use crate::sink::memory::{Fault, MemorySink, Step};

const RELATION_ID: u32 = 16_384;

/// One transaction of the WAL: where it commits and the outbox events it inserts.
#[derive(Debug, Clone)]
struct Tx {
    commit_lsn: Lsn,
    end: Lsn,
    events: Vec<[u8; 16]>,
}

/// `counts[i]` outbox rows in transaction `i` (0: a transaction of other tables only).
fn wal(counts: &[usize]) -> Vec<Tx> {
    counts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let commit_lsn = Lsn(1_000 * (i as u64 + 1));
            Tx {
                commit_lsn,
                end: Lsn(commit_lsn.0 + 8),
                events: (0..n).map(|j| event_id(i, j)).collect(),
            }
        })
        .collect()
}

fn event_id(tx: usize, seq: usize) -> [u8; 16] {
    let mut id = [0xab; 16];
    id[0] = tx as u8;
    id[1] = seq as u8;
    id
}

fn cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// The outbox table's Relation message.
fn relation() -> Bytes {
    let columns = [
        ("event_id", 2950),
        ("event_type", 25),
        ("event_date_time", 1184),
        ("environment", 25),
        ("event_context", 3802),
        ("metadata_version", 20),
    ];
    let mut m = BytesMut::new();
    m.put_u8(b'R');
    m.put_u32(RELATION_ID);
    cstr(&mut m, "public");
    cstr(&mut m, "event_outbox");
    m.put_u8(b'd');
    m.put_u16(columns.len() as u16);
    for (name, oid) in columns {
        m.put_u8(0);
        cstr(&mut m, name);
        m.put_u32(oid);
        m.put_i32(-1);
    }
    m.freeze()
}

/// An Insert message of one outbox row, its values in text format.
fn insert(id: &[u8; 16]) -> Bytes {
    let values = [
        uuid_text(id),
        "order.created".into(),
        "2026-01-01 00:00:00+00".into(),
        "test".into(),
        "{}".into(),
        "1".into(),
    ];
    let mut m = BytesMut::new();
    m.put_u8(b'I');
    m.put_u32(RELATION_ID);
    m.put_u8(b'N');
    m.put_u16(values.len() as u16);
    for v in values {
        m.put_u8(b't');
        m.put_i32(v.len() as i32);
        m.put_slice(v.as_bytes());
    }
    m.freeze()
}

/// What the test sees of the slot: the confirms, and any that passed a row the sink lacked.
#[derive(Debug, Default)]
struct Slot {
    confirmed: Lsn,
    confirms: Vec<Lsn>,
    violations: Vec<String>,
    /// Sources closed gracefully.
    closed: usize,
}

#[derive(Debug, Default)]
struct Kept {
    checkpoints: Vec<(Lsn, u64)>,
    dead_letters: Vec<OwnedEventRow>,
}

/// The [`Store`] in memory.
#[derive(Debug, Clone, Default)]
struct MemoryStore(Arc<Mutex<Kept>>);

impl MemoryStore {
    fn kept(&self) -> MutexGuard<'_, Kept> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    async fn checkpoint(&self, confirmed: Lsn, rows: u64) -> Result<(), RelayError> {
        self.kept().checkpoints.push((confirmed, rows));
        Ok(())
    }

    async fn dead_letter(&self, row: &OwnedEventRow, _error: &str) -> Result<bool, PgError> {
        let mut kept = self.kept();
        let new = !kept.dead_letters.iter().any(|r| r.event_id == row.event_id);
        if new {
            kept.dead_letters.push(row.clone());
        }
        Ok(new)
    }

    async fn unmapped(
        &self,
        _id: &[u8; 16],
        _position: (Lsn, u32),
        _raw: &serde_json::Value,
        _why: &str,
    ) -> Result<bool, PgError> {
        Ok(true)
    }

    async fn check_coverage(&self, _confirmed: Lsn) -> Result<(), RelayError> {
        Ok(())
    }

    async fn outbox_relation(
        &self,
        _relation_id: u32,
        _lsn: Lsn,
        _confirmed: Lsn,
    ) -> Result<(), RelayError> {
        Ok(())
    }
}

/// The replication stream of a slot whose confirmed position is `start`: the transactions
/// committed past it, as PostgreSQL sends them, then a keepalive; after that, it asks for the
/// shutdown (or once `stop_after` events were sent, if set: then it sends the rest one at a
/// time).
struct ScriptSource {
    events: std::vec::IntoIter<SourceEvent>,
    sent: usize,
    stop_after: Option<usize>,
    shutdown: watch::Sender<bool>,
    slot: Arc<Mutex<Slot>>,
    wal: Vec<Tx>,
    sink: MemorySink,
    store: MemoryStore,
}

impl ScriptSource {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn stream_from(wal: &[Tx], start: Lsn) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    let mut relation_sent = false;
    for tx in wal.iter().filter(|tx| tx.end > start) {
        events.push(SourceEvent::Begin {
            commit_lsn: tx.commit_lsn,
            commit_time_us: 1_767_225_600_000_000,
            xid: tx.commit_lsn.0 as u32,
        });
        for (seq, id) in tx.events.iter().enumerate() {
            let lsn = Lsn(tx.commit_lsn.0 - 500 + seq as u64);
            if !relation_sent {
                events.push(SourceEvent::Change {
                    lsn,
                    data: relation(),
                });
                relation_sent = true;
            }
            events.push(SourceEvent::Change {
                lsn,
                data: insert(id),
            });
        }
        events.push(SourceEvent::Commit { end: tx.end });
    }
    let last = wal.last().map_or(start, |tx| tx.end);
    events.push(SourceEvent::KeepAlive {
        wal_end: Lsn(last.0 + 100),
    });
    events
}

impl Source for ScriptSource {
    async fn recv(&mut self) -> Result<Option<SourceEvent>, RelayError> {
        if self.stop_after.is_some_and(|n| self.sent >= n) {
            // From here on, messages arrive one at a time, as from a slow walsender.
            let _ = self.shutdown.send(true);
            tokio::task::yield_now().await;
        }
        match self.events.next() {
            Some(event) => {
                self.sent += 1;
                Ok(Some(event))
            }
            None => {
                let _ = self.shutdown.send(true);
                std::future::pending().await
            }
        }
    }

    fn confirm(&self, lsn: Lsn) {
        let held = self.sink.table();
        let kept = self.store.kept();
        let dead = &kept.dead_letters;
        let missing: Vec<String> = self
            .wal
            .iter()
            .filter(|tx| tx.end <= lsn)
            .flat_map(|tx| &tx.events)
            .filter(|id| !held.iter().chain(dead.iter()).any(|r| &r.event_id == *id))
            .map(uuid_text)
            .collect();
        drop(kept);
        let mut slot = self.slot();
        if !missing.is_empty() {
            slot.violations
                .push(format!("confirmed {lsn} while the sink lacks {missing:?}"));
        }
        let before = slot.confirmed;
        if lsn <= before {
            slot.violations
                .push(format!("confirmed {lsn} after {before}"));
        }
        slot.confirmed = lsn;
        slot.confirms.push(lsn);
    }

    async fn close(self) {
        self.slot().closed += 1;
    }
}

/// What a run of the relay left.
#[derive(Debug)]
struct Run {
    slot: Slot,
    table: Vec<OwnedEventRow>,
    dead_letters: Vec<OwnedEventRow>,
    /// Why each failed session failed.
    failures: Vec<String>,
    mode: Mode,
}

fn config(batch_max_rows: usize, batch_max_wait_ms: u64) -> Config {
    Config {
        batch_max_rows,
        batch_max_wait_ms,
        ..Config::default()
    }
}

/// Runs sessions as the relay does until one ends on shutdown: each starts from the slot's
/// confirmed position with the mode the previous one left.
async fn run(config: &Config, wal: &[Tx], sink: &MemorySink, stop_after: Option<usize>) -> Run {
    let store = MemoryStore::default();
    let slot = Arc::new(Mutex::new(Slot::default()));
    let metrics = Metrics::default();
    let mut mode = Mode::Streaming;
    let mut failures = Vec::new();
    for _ in 0..20 {
        let start = slot.lock().unwrap().confirmed;
        let (shutdown_tx, mut shutdown) = watch::channel(false);
        let source = ScriptSource {
            events: stream_from(wal, start).into_iter(),
            sent: 0,
            stop_after,
            shutdown: shutdown_tx,
            slot: slot.clone(),
            wal: wal.to_vec(),
            sink: sink.clone(),
            store: store.clone(),
        };
        let mut session = Session::new(config, sink.clone(), store.clone(), &metrics, &mut mode);
        let result = match session.start(start).await {
            Ok(()) => session.stream(source, &mut shutdown).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                let slot = std::mem::take(&mut *slot.lock().unwrap());
                return Run {
                    slot,
                    table: sink.table(),
                    dead_letters: store.kept().dead_letters.clone(),
                    failures,
                    mode,
                };
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    panic!("no session ended on shutdown; failures: {failures:#?}");
}

/// Every event of `wal` except `refused` is in the table exactly once, in WAL order; the refused
/// ones are dead letters.
fn assert_exactly_once(run: &Run, wal: &[Tx], refused: &[[u8; 16]]) {
    assert!(run.slot.violations.is_empty(), "{:#?}", run.slot.violations);
    let expected: Vec<String> = wal
        .iter()
        .flat_map(|tx| &tx.events)
        .filter(|id| !refused.contains(id))
        .map(uuid_text)
        .collect();
    let mut shipped: Vec<String> = run.table.iter().map(|r| r.event_id_text()).collect();
    shipped.sort();
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(
        shipped, sorted,
        "each event once; failures: {:#?}",
        run.failures
    );
    let dead: Vec<[u8; 16]> = run.dead_letters.iter().map(|r| r.event_id).collect();
    assert_eq!(dead, refused);
    let last = wal.last().map_or(Lsn(0), |tx| tx.end);
    assert!(
        run.slot.confirmed >= last,
        "confirmed {} < {last}",
        run.slot.confirmed
    );
}

#[tokio::test]
async fn confirm_never_passes_what_the_sink_holds() {
    let wal = wal(&[2, 0, 3, 1, 0, 0, 4, 1, 2, 0]);
    let sink = MemorySink::default();
    let run = run(&config(3, 60_000), &wal, &sink, None).await;
    assert_exactly_once(&run, &wal, &[]);
    assert!(run.failures.is_empty(), "{:#?}", run.failures);
    // Batches of three rows or more are confirmed once they ship (transactions 0-2, 3-6, 7-8;
    // those without rows in between wait with them), a transaction without outbox rows at once
    // when nothing is held (9), and the final keepalive lets the slot pass the WAL of other
    // tables.
    let ends = |txs: &[usize]| txs.iter().map(|&i| wal[i].end).collect::<Vec<_>>();
    let mut expected = ends(&[2, 6, 8, 9]);
    expected.push(Lsn(wal[9].end.0 + 100));
    assert_eq!(run.slot.confirms, expected);
    assert_eq!(run.slot.closed, 1);
}

#[tokio::test]
async fn restart_after_a_failed_insert_at_each_step() {
    // The last transaction has no outbox rows: past the re-send, streaming resumes.
    let wal = wal(&[2, 0, 3, 1, 4, 0, 2, 0]);
    let total: usize = wal.iter().map(|tx| tx.events.len()).sum();
    let mut cases = Vec::new();
    for nth in 1..=total {
        cases.push(vec![Fault {
            step: Step::Write,
            nth,
        }]);
    }
    // Three batches of three or more rows: tx 0-2, 3-4, 6.
    for nth in 1..=3 {
        cases.push(vec![Fault {
            step: Step::Commit,
            nth,
        }]);
        cases.push(vec![Fault {
            step: Step::CommitLost,
            nth,
        }]);
        // A failure while re-sending the rows of the failed insert, too.
        for again in 1..=3 {
            cases.push(vec![
                Fault {
                    step: Step::Commit,
                    nth,
                },
                Fault {
                    step: Step::InsertRows,
                    nth: again,
                },
            ]);
        }
    }
    for faults in cases {
        let sink = MemorySink::default();
        sink.fail(faults.clone());
        let run = run(&config(3, 60_000), &wal, &sink, None).await;
        assert!(!run.failures.is_empty(), "{faults:?}: no fault fired");
        assert_exactly_once(&run, &wal, &[]);
        assert_eq!(
            run.mode,
            Mode::Streaming,
            "{faults:?}: streaming again after the re-send"
        );
        assert!(sink.fences() >= 2, "{faults:?}: every session fences");
    }
}

#[tokio::test]
async fn a_refused_row_is_singled_out_by_bisection() {
    let wal = wal(&[3, 5, 2, 0, 6, 1, 3, 0]);
    let refused = [event_id(1, 3), event_id(4, 0)];
    let sink = MemorySink::default();
    for id in refused {
        sink.refuse(id);
    }
    let run = run(&config(100, 5), &wal, &sink, None).await;
    assert_exactly_once(&run, &wal, &refused);
    assert!(
        run.failures.iter().all(|f| f.contains("cannot be stored")),
        "{:#?}",
        run.failures
    );
    assert_eq!(run.mode, Mode::Streaming);
}

/// The sink's answer decides, not the shape of the insert: a network failure while a single row
/// is re-sent is tried again (never a dead letter), a refused single row is a dead letter.
#[tokio::test]
async fn only_a_refused_row_becomes_a_dead_letter() {
    let wal = wal(&[1, 1, 1]);
    for nth in 1..=3 {
        let sink = MemorySink::default();
        sink.fail([
            Fault {
                step: Step::Commit,
                nth,
            },
            Fault {
                step: Step::InsertRows,
                nth: 1,
            },
        ]);
        let run = run(&config(1, 60_000), &wal, &sink, None).await;
        assert_eq!(run.failures.len(), 2, "{nth}: {:#?}", run.failures);
        assert_exactly_once(&run, &wal, &[]);
    }
    let sink = MemorySink::default();
    sink.refuse(event_id(1, 0));
    let run = run(&config(1, 60_000), &wal, &sink, None).await;
    assert_exactly_once(&run, &wal, &[event_id(1, 0)]);
}

#[tokio::test]
async fn shutdown_flushes_the_open_batch() {
    let wal = wal(&[2, 3, 1]);
    let sink = MemorySink::default();
    // Batches that never fill and never time out: only the shutdown ships them.
    let run = run(&config(1_000, 60_000), &wal, &sink, None).await;
    assert_exactly_once(&run, &wal, &[]);
    assert_eq!(sink.inserts(), 1, "one batch, shipped at shutdown");
    assert_eq!(run.slot.closed, 1);
}

#[tokio::test]
async fn shutdown_in_a_transaction_finishes_it_first() {
    let wal = wal(&[2, 3, 1]);
    let sink = MemorySink::default();
    // The shutdown comes after the second transaction's first insert (Begin, Relation, two
    // inserts, Commit, Begin, Insert).
    let run = run(&config(1_000, 60_000), &wal, &sink, Some(7)).await;
    assert!(run.slot.violations.is_empty(), "{:#?}", run.slot.violations);
    let shipped: Vec<[u8; 16]> = run.table.iter().map(|r| r.event_id).collect();
    let expected: Vec<[u8; 16]> = wal[..2].iter().flat_map(|tx| tx.events.clone()).collect();
    assert_eq!(
        shipped, expected,
        "the transaction in hand is finished, not split"
    );
    assert_eq!(run.slot.confirmed, wal[1].end);
}
