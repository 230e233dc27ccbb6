//! A [`Sink`] in memory, with faults on demand: the relay loop's guarantees are tested against it
//! in-process (crates/relay/src/pipeline/loop_tests.rs), beside the real-server suite.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{EventRow, Failure, Insert, OwnedEventRow, Present, Sink, SinkError};

/// Which operation a [`Fault`] hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Writing a row into an open insert.
    Write,
    /// Ending an open insert.
    Commit,
    /// Ending an open insert: the rows land, but the answer is lost (a connection cut after
    /// ClickHouse accepted them).
    CommitLost,
    /// An insert of rows held in memory.
    InsertRows,
}

/// A network failure at the `nth` (from 1) operation of kind `step`; fires once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub step: Step,
    pub nth: usize,
}

#[derive(Debug, Default)]
struct State {
    /// The rows accepted, in order.
    table: Vec<OwnedEventRow>,
    /// Event ids refused as data ClickHouse cannot hold (code 117), in any insert.
    refused: Vec<[u8; 16]>,
    faults: Vec<Fault>,
    /// Operations seen so far, per step.
    seen: BTreeMap<&'static str, usize>,
    /// Inserts tried (open inserts committed, in-memory inserts), accepted or not.
    inserts: usize,
    /// Fences run.
    fences: usize,
}

impl State {
    /// Counts an operation of kind `step` (a commit counts for both commit steps); the fault
    /// that fires on it, if any.
    fn fires(&mut self, step: Step) -> Option<Fault> {
        let name = match step {
            Step::Write => "write",
            Step::Commit | Step::CommitLost => "commit",
            Step::InsertRows => "insert_rows",
        };
        let n = self.seen.entry(name).or_default();
        *n += 1;
        let n = *n;
        let same = |f: &Fault| match step {
            Step::Commit | Step::CommitLost => matches!(f.step, Step::Commit | Step::CommitLost),
            _ => f.step == step,
        };
        let i = self.faults.iter().position(|f| f.nth == n && same(f))?;
        Some(self.faults.remove(i))
    }

    /// Lands `rows` all or nothing: refused when one of them is refused.
    fn land(&mut self, rows: &[OwnedEventRow]) -> Result<(), SinkError> {
        self.inserts += 1;
        if let Some(row) = rows.iter().find(|r| self.refused.contains(&r.event_id)) {
            return Err(SinkError::Insert {
                table: "memory".into(),
                failure: Failure::Refused,
                source: clickhouse::error::Error::Custom(format!(
                    "event {} cannot be stored (refused by the memory sink)",
                    row.event_id_text()
                )),
            });
        }
        self.table.extend_from_slice(rows);
        Ok(())
    }
}

fn network_error() -> SinkError {
    SinkError::Insert {
        table: "memory".into(),
        failure: Failure::Unavailable,
        source: clickhouse::error::Error::Network("connection reset (injected)".into()),
    }
}

/// The in-memory sink; clones share the table.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    state: Arc<Mutex<State>>,
}

impl MemorySink {
    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Faults to inject (each fires once).
    pub fn fail(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state().faults.extend(faults);
    }

    /// Refuses every insert that holds the event `id`, as ClickHouse refuses a value its column
    /// cannot hold.
    pub fn refuse(&self, id: [u8; 16]) {
        self.state().refused.push(id);
    }

    /// The rows accepted, in order.
    pub fn table(&self) -> Vec<OwnedEventRow> {
        self.state().table.clone()
    }

    /// Inserts tried so far.
    pub fn inserts(&self) -> usize {
        self.state().inserts
    }

    /// Fences run so far.
    pub fn fences(&self) -> usize {
        self.state().fences
    }
}

/// An open insert of the [`MemorySink`]: rows land when it commits.
#[derive(Debug)]
pub struct MemoryInsert {
    sink: MemorySink,
    rows: Vec<OwnedEventRow>,
    bytes: u64,
}

impl Sink for MemorySink {
    type Insert = MemoryInsert;

    fn begin(&self) -> MemoryInsert {
        MemoryInsert {
            sink: self.clone(),
            rows: Vec::new(),
            bytes: 0,
        }
    }

    async fn insert_rows(
        &self,
        rows: &[OwnedEventRow],
        _token: Option<&str>,
    ) -> Result<(), SinkError> {
        let mut state = self.state();
        if state.fires(Step::InsertRows).is_some() {
            state.inserts += 1;
            return Err(network_error());
        }
        state.land(rows)
    }

    async fn stop_inflight(&self) -> Result<(), SinkError> {
        self.state().fences += 1;
        Ok(())
    }

    async fn present(&self, from: u64) -> Result<Present, SinkError> {
        let mut seqs: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        for row in self.state().table.iter().filter(|r| r.commit_lsn >= from) {
            seqs.entry(row.commit_lsn).or_default().push(row.tx_seq);
        }
        let mut ranges = Vec::new();
        for (lsn, mut seqs) in seqs {
            seqs.sort_unstable();
            seqs.dedup();
            let mut start = seqs[0];
            for pair in seqs.windows(2) {
                if pair[1] != pair[0] + 1 {
                    ranges.push((lsn, start, pair[0]));
                    start = pair[1];
                }
            }
            ranges.push((lsn, start, seqs[seqs.len() - 1]));
        }
        Ok(Present::from_ranges(ranges))
    }

    async fn existing_ids(&self, ids: &[String]) -> Result<Vec<String>, SinkError> {
        let state = self.state();
        Ok(ids
            .iter()
            .filter(|id| state.table.iter().any(|r| &r.event_id_text() == *id))
            .cloned()
            .collect())
    }
}

impl Insert for MemoryInsert {
    async fn write(&mut self, row: &EventRow<'_>) -> Result<(), SinkError> {
        if self.sink.state().fires(Step::Write).is_some() {
            return Err(network_error());
        }
        let mut encoded = Vec::new();
        row.encode(&mut encoded);
        self.bytes += encoded.len() as u64;
        self.rows.push(OwnedEventRow::new(row));
        Ok(())
    }

    fn rows(&self) -> u64 {
        self.rows.len() as u64
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    async fn commit(self) -> Result<(), SinkError> {
        let mut state = self.sink.state();
        match state.fires(Step::Commit).map(|f| f.step) {
            Some(Step::CommitLost) => {
                state.land(&self.rows)?;
                Err(network_error())
            }
            Some(_) => {
                state.inserts += 1;
                Err(network_error())
            }
            None => state.land(&self.rows),
        }
    }
}
