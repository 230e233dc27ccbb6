//! The relay loop in-process: a WAL of outbox transactions built here as pgoutput messages, a
//! [`Source`] that streams it from the slot's confirmed position as PostgreSQL does, the
//! [`MemorySink`] with its faults and a [`Store`] in memory. Each test runs the relay's own
//! driver ([`driver::drive`]: sessions one after another, the mode carried over, each restarting
//! from the confirmed position, backoff waits on tokio's paused clock) and checks, at every
//! confirm, that the slot never passes a row the sink does not hold.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use pgoutput::Lsn;
use tokio::sync::watch;

use super::RelayError;
use super::driver::{self, Sessions};
use super::mode::Mode;
use super::session::Session;
use super::source::{Source, SourceEvent};
use super::store::Store;
use crate::config::Config;
use crate::event::{OwnedEventRow, uuid_text};
use crate::metrics::{Metrics, State};
use crate::pg::PgError;
use crate::sink::memory::{Fault, MemorySink, Step};

const RELATION_ID: u32 = 16_384;

/// One transaction of the WAL: where it commits and the outbox events it inserts.
#[derive(Debug, Clone)]
struct Tx {
    commit_lsn: Lsn,
    end: Lsn,
    events: Vec<[u8; 16]>,
    /// Its rows whose event_type is NULL (they cannot become events).
    unmappable: Vec<[u8; 16]>,
    /// A Relation message with the outbox's columns in another order, before its rows.
    reordered: bool,
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
                unmappable: Vec::new(),
                reordered: false,
            }
        })
        .collect()
}

fn event_id(tx: usize, seq: usize) -> [u8; 16] {
    let mut id = [0xab; 16];
    id[0] = tx as u8;
    id[1..5].copy_from_slice(&(seq as u32).to_be_bytes());
    id
}

fn cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// The outbox table's columns, in the order of its Relation message.
const COLUMNS: [(&str, u32); 6] = [
    ("event_id", 2950),
    ("event_type", 25),
    ("event_date_time", 1184),
    ("environment", 25),
    ("event_context", 3802),
    ("metadata_version", 20),
];

/// The order of the columns after a table change: a column added first, the rest reversed.
fn order(reordered: bool) -> Vec<(&'static str, u32)> {
    match reordered {
        false => COLUMNS.to_vec(),
        true => std::iter::once(("note", 25))
            .chain(COLUMNS.iter().rev().copied())
            .collect(),
    }
}

/// The outbox table's Relation message.
fn relation(reordered: bool) -> Bytes {
    let columns = order(reordered);
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

/// An Insert message of one outbox row, its values in text format (event_type NULL when the row
/// is to be unmappable), in the columns' order.
fn insert(id: &[u8; 16], reordered: bool, unmappable: bool) -> Bytes {
    let value = |name: &str| -> Option<String> {
        match name {
            "event_id" => Some(uuid_text(id)),
            "event_type" if unmappable => None,
            "event_type" => Some("order.created".into()),
            "event_date_time" => Some("2026-01-01 00:00:00+00".into()),
            "environment" => Some("test".into()),
            "event_context" => Some(format!("{{\"n\": \"{}\"}}", "x".repeat(id[4] as usize))),
            "metadata_version" => Some("1".into()),
            _ => None,
        }
    };
    let columns = order(reordered);
    let mut m = BytesMut::new();
    m.put_u8(b'I');
    m.put_u32(RELATION_ID);
    m.put_u8(b'N');
    m.put_u16(columns.len() as u16);
    for (name, _) in columns {
        match value(name) {
            Some(v) => {
                m.put_u8(b't');
                m.put_i32(v.len() as i32);
                m.put_slice(v.as_bytes());
            }
            None => m.put_u8(b'n'),
        }
    }
    m.freeze()
}

/// What the test sees of the slot: the confirms, and any that passed a row the sink lacked.
#[derive(Debug, Default)]
struct Slot {
    confirmed: Lsn,
    confirms: Vec<Lsn>,
    /// When each confirm came (tokio's clock).
    confirmed_at: Vec<tokio::time::Instant>,
    violations: Vec<String>,
    /// Sources closed gracefully.
    closed: usize,
    /// When the source paused (`Script::pause_after`).
    paused_at: Option<tokio::time::Instant>,
}

#[derive(Debug, Default)]
struct Kept {
    checkpoints: Vec<(Lsn, u64)>,
    dead_letters: Vec<OwnedEventRow>,
    /// Ids of the rows that could not become events.
    unmapped: Vec<[u8; 16]>,
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
        id: &[u8; 16],
        _position: (Lsn, u32),
        _raw: &serde_json::Value,
        _why: &str,
    ) -> Result<bool, PgError> {
        let mut kept = self.kept();
        let new = !kept.unmapped.contains(id);
        if new {
            kept.unmapped.push(*id);
        }
        Ok(new)
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
/// time). With `pause_after`, it stops sending for `pause` after that many events (the stream
/// idle: the batch deadline ships the batch).
struct ScriptSource {
    events: std::vec::IntoIter<SourceEvent>,
    sent: usize,
    script: Script,
    shutdown: Arc<watch::Sender<bool>>,
    slot: Arc<Mutex<Slot>>,
    sink: MemorySink,
    store: MemoryStore,
}

/// What a run streams, and how.
#[derive(Debug, Clone, Default)]
struct Script {
    wal: Vec<Tx>,
    stop_after: Option<usize>,
    pause_after: Option<(usize, std::time::Duration)>,
}

impl ScriptSource {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn stream_from(wal: &[Tx], start: Lsn) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    let mut relation_sent = None;
    for tx in wal.iter().filter(|tx| tx.end > start) {
        events.push(SourceEvent::Begin {
            commit_lsn: tx.commit_lsn,
            commit_time_us: 1_767_225_600_000_000,
            xid: tx.commit_lsn.0 as u32,
        });
        let rows = tx.events.iter().map(|id| (id, false));
        let rows = rows.chain(tx.unmappable.iter().map(|id| (id, true)));
        for (seq, (id, unmappable)) in rows.enumerate() {
            let lsn = Lsn(tx.commit_lsn.0 - 500 + seq as u64);
            if relation_sent != Some(tx.reordered) {
                events.push(SourceEvent::Change {
                    lsn,
                    data: relation(tx.reordered),
                });
                relation_sent = Some(tx.reordered);
            }
            events.push(SourceEvent::Change {
                lsn,
                data: insert(id, tx.reordered, unmappable),
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
        if self.script.stop_after.is_some_and(|n| self.sent >= n) {
            // From here on, messages arrive one at a time, as from a slow walsender.
            let _ = self.shutdown.send(true);
            tokio::task::yield_now().await;
        }
        if let Some((n, pause)) = self.script.pause_after
            && self.sent == n
        {
            // Cancel-safe: a recv dropped by the session's select sleeps on to the same time.
            let paused_at = *self
                .slot()
                .paused_at
                .get_or_insert_with(tokio::time::Instant::now);
            tokio::time::sleep_until(paused_at + pause).await;
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
        let kept = self.store.kept();
        let held: std::collections::HashSet<[u8; 16]> = self
            .sink
            .table()
            .iter()
            .chain(&kept.dead_letters)
            .map(|r| r.event_id)
            .chain(kept.unmapped.iter().copied())
            .collect();
        let missing: Vec<String> = self
            .script
            .wal
            .iter()
            .filter(|tx| tx.end <= lsn)
            .flat_map(|tx| tx.events.iter().chain(&tx.unmappable))
            .filter(|id| !held.contains(*id))
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
        slot.confirmed_at.push(tokio::time::Instant::now());
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
    unmapped: Vec<[u8; 16]>,
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

/// The world the driver runs sessions in: the script's source, the memory sink and store.
struct Scripted {
    config: Config,
    script: Script,
    sink: MemorySink,
    store: MemoryStore,
    slot: Arc<Mutex<Slot>>,
    metrics: Metrics,
    failures: Mutex<Vec<String>>,
    /// The mode the last session left.
    mode: Mutex<Mode>,
}

/// Sessions a run may take before it counts as stuck.
const MAX_SESSIONS: usize = 30;

impl Sessions for Scripted {
    /// Each session with a shutdown of its own: the script asks for it once it sent everything
    /// (or `stop_after` events), and a session that fails after that is followed by another.
    async fn session(
        &self,
        mode: &mut Mode,
        shipped: &mut u64,
        _shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RelayError> {
        let (stop, mut shutdown) = watch::channel(false);
        let failures = self.failures.lock().unwrap().len();
        if failures >= MAX_SESSIONS {
            // Permanent: the driver stops and the test fails below.
            return Err(RelayError::Protocol(Lsn(0)));
        }
        let start = self.slot.lock().unwrap().confirmed;
        let source = ScriptSource {
            events: stream_from(&self.script.wal, start).into_iter(),
            sent: 0,
            script: self.script.clone(),
            shutdown: Arc::new(stop),
            slot: self.slot.clone(),
            sink: self.sink.clone(),
            store: self.store.clone(),
        };
        let (config, metrics) = (&self.config, &self.metrics);
        let mut session =
            Session::new(config, self.sink.clone(), self.store.clone(), metrics, mode);
        let result = match session.start(start).await {
            Ok(()) => session.stream(source, &mut shutdown).await,
            Err(e) => Err(e),
        };
        *shipped = session.shipped_batches;
        drop(session);
        *self.mode.lock().unwrap() = *mode;
        if let Err(e) = &result {
            self.failures.lock().unwrap().push(e.to_string());
        }
        result
    }

    async fn recover(&self, error: RelayError) -> RelayError {
        error
    }

    async fn wait_for(&self, _state: State, delay: std::time::Duration) -> bool {
        tokio::time::sleep(delay).await;
        false
    }
}

/// Runs the relay's driver until a session ends on shutdown.
async fn run(config: &Config, wal: &[Tx], sink: &MemorySink, stop_after: Option<usize>) -> Run {
    let script = Script {
        wal: wal.to_vec(),
        stop_after,
        ..Script::default()
    };
    run_script(config, script, sink).await
}

async fn run_script(config: &Config, script: Script, sink: &MemorySink) -> Run {
    // The driver's own shutdown never comes: the sessions' do (see [`Scripted::session`]).
    let (_never, mut shutdown) = watch::channel(false);
    let world = Scripted {
        config: config.clone(),
        script,
        sink: sink.clone(),
        store: MemoryStore::default(),
        slot: Arc::default(),
        metrics: Metrics::default(),
        failures: Mutex::default(),
        mode: Mutex::default(),
    };
    let result = driver::drive(&world, config, &world.metrics, &mut shutdown).await;
    let failures = world.failures.lock().unwrap().clone();
    assert!(
        result.is_ok(),
        "no session ended on shutdown; failures: {failures:#?}"
    );
    let slot = std::mem::take(&mut *world.slot.lock().unwrap());
    let kept = world.store.kept();
    Run {
        slot,
        table: sink.table(),
        dead_letters: kept.dead_letters.clone(),
        unmapped: kept.unmapped.clone(),
        failures,
        mode: *world.mode.lock().unwrap(),
    }
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

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
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
#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_the_open_batch() {
    let wal = wal(&[2, 3, 1]);
    let sink = MemorySink::default();
    // Batches that never fill and never time out: only the shutdown ships them.
    let run = run(&config(1_000, 60_000), &wal, &sink, None).await;
    assert_exactly_once(&run, &wal, &[]);
    assert_eq!(sink.inserts(), 1, "one batch, shipped at shutdown");
    assert_eq!(run.slot.closed, 1);
}

#[tokio::test(start_paused = true)]
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

/// Rows that cannot become events (event_type NULL) are kept as dead letters with their values,
/// and the stream goes on past them; the slot never passes one that is neither shipped nor kept.
#[tokio::test(start_paused = true)]
async fn unmappable_rows_are_kept_and_the_stream_goes_on() {
    let mut wal = wal(&[2, 3, 1, 2]);
    wal[1].unmappable = vec![event_id(1, 7), event_id(1, 8)];
    wal[3].unmappable = vec![event_id(3, 9)];
    let sink = MemorySink::default();
    let run = run(&config(2, 60_000), &wal, &sink, None).await;
    assert_exactly_once(&run, &wal, &[]);
    assert_eq!(
        run.unmapped,
        [event_id(1, 7), event_id(1, 8), event_id(3, 9)]
    );
    assert!(run.failures.is_empty(), "{:#?}", run.failures);
}

/// A Relation message mid-stream with the columns reordered and one added: the rows after it
/// are read through the new layout.
#[tokio::test(start_paused = true)]
async fn a_layout_change_mid_stream_is_followed() {
    let mut wal = wal(&[2, 3, 2]);
    wal[1].reordered = true;
    let sink = MemorySink::default();
    let run = run(&config(100, 60_000), &wal, &sink, None).await;
    assert_exactly_once(&run, &wal, &[]);
    for row in &run.table {
        assert_eq!(row.event_type, b"order.created", "{row:?}");
        assert_eq!(row.environment, b"test", "{row:?}");
        let context = format!("{{\"n\": \"{}\"}}", "x".repeat(row.event_id[4] as usize));
        assert_eq!(row.event_context, context.as_bytes(), "{row:?}");
    }
}

/// `batch_max_bytes` ends a batch at the first commit past it, whatever the rows' count.
#[tokio::test(start_paused = true)]
async fn batches_end_at_the_byte_bound() {
    let wal = wal(&[100, 100, 100, 100]);
    let sink = MemorySink::default();
    let config = Config {
        batch_max_bytes: 4 * 1024,
        ..config(1_000_000, 60_000)
    };
    let run = run(&config, &wal, &sink, None).await;
    assert_exactly_once(&run, &wal, &[]);
    // 100 rows of about 100 bytes pass 4 KiB: each transaction is a batch of its own.
    assert_eq!(sink.inserts(), 4);
    let ends: Vec<Lsn> = wal.iter().map(|tx| tx.end).collect();
    assert_eq!(run.slot.confirms[..4], ends[..]);
}

/// A batch that never fills ships at its deadline, while the stream is idle.
#[tokio::test(start_paused = true)]
async fn an_idle_batch_ships_at_its_deadline() {
    let wal = wal(&[2, 1]);
    let sink = MemorySink::default();
    let script = Script {
        wal: wal.clone(),
        // Begin, Relation, Insert, Insert, Commit: then nothing for a minute.
        pause_after: Some((5, std::time::Duration::from_secs(60))),
        ..Script::default()
    };
    let run = run_script(&config(1_000, 700), script, &sink).await;
    assert_exactly_once(&run, &wal, &[]);
    let paused = run.slot.paused_at.expect("the source paused");
    let first = run.slot.confirmed_at[0];
    assert_eq!(run.slot.confirms[0], wal[0].end);
    assert!(
        first - paused <= std::time::Duration::from_millis(700),
        "the first batch was confirmed {:?} after the stream went idle",
        first - paused
    );
    assert_eq!(
        sink.inserts(),
        2,
        "the second transaction is a batch of its own"
    );
}

/// A transaction larger than a re-send insert: its rows go in inserts of 10,000 before its
/// commit (sent, not confirmed); a failure in the middle of that, and the next session skips
/// what arrived and sends the rest, exactly once.
#[tokio::test(start_paused = true)]
async fn a_large_transaction_is_re_sent_in_parts_exactly_once() {
    // The last transaction has no outbox rows: past the re-send, streaming resumes.
    let wal = wal(&[25_000, 3, 0]);
    for again in [1, 2] {
        let sink = MemorySink::default();
        sink.fail([
            Fault {
                step: Step::Commit,
                nth: 1,
            },
            Fault {
                step: Step::InsertRows,
                nth: again,
            },
        ]);
        let run = run(&config(100_000, 60_000), &wal, &sink, None).await;
        assert_eq!(run.failures.len(), 2, "{again}: {:#?}", run.failures);
        assert_exactly_once(&run, &wal, &[]);
        assert_eq!(run.mode, Mode::Streaming);
    }
}
