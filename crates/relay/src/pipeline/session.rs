//! One replication connection's worth of streaming, over any [`Source`], [`Sink`] and [`Store`]:
//! decode, batch, flush, confirm; re-send after a failed insert.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pgoutput::{Lsn, Message};
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use super::mode::Mode;
use super::progress::{Progress, Settled};
use super::source::{Source, SourceEvent};
use super::store::Store;
use super::{AbortOnDrop, RelayError};
use crate::config::Config;
use crate::event::OwnedEventRow;
use crate::metrics::Metrics;
use crate::outbox::OutboxLayout;
use crate::reship;
use crate::sink::resend::Resend;
use crate::sink::{Insert, Present, Sink, SinkError};

/// Rows per insert while re-sending the rows of a failed batch (each insert is one block, so
/// all or nothing).
const RESEND_ROWS: usize = 10_000;

/// How many publisher traces a batch's Sentry transaction lists.
const MAX_LINKED_TRACES: usize = 32;

/// How often a session checks that the publication still covers the outbox table.
const COVERAGE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Messages taken in a row without going back to the select loop (which also watches the
/// shutdown signal and the batch deadline).
const READY_BURST: usize = 256;

/// A take of fewer messages than this in the middle of a transaction makes the relay wait
/// [`LINGER`] for the rest of it.
const LINGER_BELOW: usize = 8;

/// How long the relay's thread waits for the rest of a transaction after a small take: the
/// walsender writes its messages within microseconds; the socket holds them meanwhile.
const LINGER: Duration = Duration::from_millis(1);

/// A transaction that has brought this many rows is a large one: the walsender decodes it as
/// fast as it can, and a relay whose thread stopped reading for [`LINGER`] whenever it caught up
/// slowed it down (one 1,000,000-row transaction drained at 0.84 of the speed). In a large
/// transaction only the session's task waits, the replication worker reads on.
const LINGER_ROWS: u32 = 256;

/// How long the relay's thread waits for more transactions after a small take while a batch is
/// open (at most a tenth of `batch_max_wait_ms`): the batch ships at its deadline anyway.
const BATCH_LINGER: Duration = Duration::from_millis(20);

/// The transaction being received.
struct Tx {
    commit_lsn: Lsn,
    /// Unix µs.
    commit_time_us: i64,
    seq: u32,
    /// Its 64-bit transaction id (see [`crate::event::widen_xid`]).
    xid: u64,
}

/// The batch being filled: an open insert plus what it covers.
struct Batch<I> {
    insert: I,
    /// Commit LSN of the last transaction with rows in the batch.
    last_commit_lsn: Lsn,
    opened: Instant,
    deadline: tokio::time::Instant,
    first_commit_lsn: Lsn,
    /// Unix µs.
    last_commit_time_us: i64,
    transactions: u64,
    trace: Option<sentry::Transaction>,
    /// Open while rows are decoded and encoded into the insert.
    decode_span: Option<sentry::Span>,
    /// Distinct publisher trace ids seen in the batch (at most [`MAX_LINKED_TRACES`]).
    trace_ids: Vec<String>,
}

/// What the session knows of the outbox table from the newest Relation message.
struct OutboxRelation {
    id: u32,
    columns: Vec<(String, u32)>,
    layout: Result<OutboxLayout, String>,
}

/// The coverage replay running beside a session (see [`Session::coverage_replay`]).
pub(super) type CoverageReplay = AbortOnDrop<Result<reship::ReplayReport, reship::ReshipError>>;

/// One replication connection's worth of streaming.
pub(crate) struct Session<'a, S: Sink, P: Store> {
    config: &'a Config,
    /// The relay's sink, marked with this outbox's source identity.
    sink: S,
    store: P,
    metrics: &'a Metrics,
    /// Streaming or re-sending: the relay's, lent to this session.
    mode: &'a mut Mode,
    /// Re-shipping a window the publication did not cover, beside the stream; no checkpoint is
    /// recorded until it is done, so that a crash meanwhile makes the next session do it again.
    pub(super) coverage_replay: Option<CoverageReplay>,
    /// The outbox table's relation id, its column names and its layout, or why the relay cannot
    /// read rows of that shape (each such row becomes a dead letter; a later Relation message,
    /// after the table is fixed, brings a good layout back).
    outbox_relation: Option<OutboxRelation>,
    tx: Option<Tx>,
    batch: Option<Batch<S::Insert>>,
    progress: Progress,
    pub(super) shipped_batches: u64,
    /// Rows the sink already held when the session started: skipped.
    present: Present,
    /// While re-sending: the rows not yet sent.
    resend: Vec<OwnedEventRow>,
    /// When the take of messages in hand began: commits compare the batch's deadline with it
    /// (one clock read a take of up to [`READY_BURST`] messages, not one a transaction).
    now: tokio::time::Instant,
    /// The newest 64-bit transaction id known (the server's next one when the session started,
    /// then the stream's): the stream's 32-bit xids are widened next to it.
    pub(super) xid_reference: u64,
}

impl<'a, S: Sink, P: Store> Session<'a, S, P> {
    pub(crate) fn new(
        config: &'a Config,
        sink: S,
        store: P,
        metrics: &'a Metrics,
        mode: &'a mut Mode,
    ) -> Session<'a, S, P> {
        Session {
            config,
            sink,
            store,
            metrics,
            mode,
            coverage_replay: None,
            outbox_relation: None,
            tx: None,
            batch: None,
            progress: Progress::new(Lsn(0)),
            shipped_batches: 0,
            present: Present::default(),
            resend: Vec::new(),
            now: tokio::time::Instant::now(),
            xid_reference: 0,
        }
    }

    /// Exactly once: from the slot's confirmed position `start`, stops what an earlier session
    /// may still be writing (the fence), then reads which rows the sink already holds.
    pub(crate) async fn start(&mut self, start: Lsn) -> Result<(), RelayError> {
        self.progress = Progress::new(start);
        let began = std::time::Instant::now();
        self.sink.stop_inflight().await?;
        self.present = self.sink.present(start.0).await?;
        info!(
            restart_check_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
            start_lsn = %start,
            "restart check done: the fence held, ClickHouse's rows past the slot read"
        );
        if !self.present.is_empty() {
            info!(
                rows = self.present.rows(),
                "ClickHouse already holds events past the slot's confirmed position (shipped \
                 before a confirm reached PostgreSQL); they are skipped, not sent again"
            );
        }
        if let Mode::Resending { until } = *self.mode {
            info!(until_lsn = %until, "re-sending the rows of a failed insert in small inserts");
        }
        Ok(())
    }

    /// Streams from `source` until `shutdown` turns true (then flushes, confirms and closes) or
    /// an error.
    pub(crate) async fn stream(
        &mut self,
        mut source: impl Source,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RelayError> {
        let mut stopping = *shutdown.borrow();
        let mut coverage_check = tokio::time::interval_at(
            tokio::time::Instant::now() + COVERAGE_CHECK_INTERVAL,
            COVERAGE_CHECK_INTERVAL,
        );
        loop {
            if stopping && self.tx.is_none() {
                self.ship_resend(&source).await?;
                return self.finish(source).await;
            }
            let flush_at = match (&self.batch, &self.tx) {
                (Some(batch), None) => Some(batch.deadline),
                _ => None,
            };
            tokio::select! {
                biased;
                _ = shutdown.changed(), if !stopping => {
                    stopping = *shutdown.borrow();
                    if stopping {
                        info!("shutdown requested: finishing the transaction in hand, flushing");
                    }
                }
                _ = sleep_until(flush_at), if flush_at.is_some() => {
                    self.flush(&source).await?;
                }
                _ = coverage_check.tick() => {
                    self.store.check_coverage(self.progress.confirmed()).await?;
                }
                done = replay_done(&mut self.coverage_replay) => {
                    self.coverage_replay = None;
                    let report = done
                        .map_err(|e| RelayError::CoverageReplay(e.to_string()))?
                        .map_err(|e| RelayError::CoverageReplay(e.to_string()))?;
                    warn!(
                        candidates = report.candidates,
                        already_there = report.already_there,
                        shipped = report.shipped,
                        dead_letters = report.dead_letters,
                        "the window the publication did not cover is re-shipped; checkpoints \
                         go on"
                    );
                }
                event = source.recv() => {
                    self.now = tokio::time::Instant::now();
                    if let Some(event) = self.handle_now(&source, event?.ok_or(RelayError::StreamEnded)?) {
                        self.handle(&source, event).await?;
                    }
                    // Under load, take the messages already received without going back
                    // through the select (its timer and shutdown futures cost more than a
                    // message); the batch's deadline is still checked at every commit.
                    let mut taken = 1;
                    for _ in 0..READY_BURST {
                        let Some(event) = ready_now(source.recv()) else {
                            break;
                        };
                        if let Some(event) = self.handle_now(&source, event?.ok_or(RelayError::StreamEnded)?) {
                            self.handle(&source, event).await?;
                        }
                        taken += 1;
                    }
                    // At moderate rates the walsender sends a transaction's messages one by one
                    // as it decodes them, and each would wake the relay (a context switch and
                    // the runtime's timers per message dominated its CPU at 2,000 events/s).
                    // After a small take, let more arrive and read it in one go: the rest of
                    // the transaction in hand, or, while a batch waits for its deadline anyway,
                    // the next transactions. Under load the takes are large and nothing waits.
                    if taken < LINGER_BELOW {
                        let linger = match &self.tx {
                            Some(tx) if tx.seq >= LINGER_ROWS => {
                                // A large transaction: the walsender sends as fast as it
                                // decodes. Only this task waits; the replication worker keeps
                                // reading the socket meanwhile, so the walsender never stalls.
                                tokio::time::sleep(LINGER).await;
                                Duration::ZERO
                            }
                            Some(_) => LINGER,
                            None if self.batch.is_some() => {
                                BATCH_LINGER.min(self.config.batch_max_wait() / 10)
                            }
                            None => Duration::ZERO,
                        };
                        if !linger.is_zero() {
                            std::thread::sleep(linger);
                        }
                    }
                }
            }
        }
    }

    /// The messages that need no waiting, handled without entering [`Session::handle`] (an
    /// async call a message): a transaction's begin, its commit when the batch does not end
    /// there, keepalives. Returns the event when it needs [`Session::handle`]: row data,
    /// re-sending, a commit that ends the batch.
    fn handle_now(&mut self, source: &impl Source, event: SourceEvent) -> Option<SourceEvent> {
        if self.mode.is_resending() {
            return Some(event);
        }
        match event {
            SourceEvent::Begin {
                commit_lsn,
                commit_time_us,
                xid,
            } => self.begin(commit_lsn, commit_time_us, xid),
            SourceEvent::Commit { end } if !self.batch_full() => {
                self.commit(source, end);
            }
            SourceEvent::KeepAlive { wal_end } => self.keepalive(source, wal_end),
            event => return Some(event),
        }
        None
    }

    async fn handle(&mut self, source: &impl Source, event: SourceEvent) -> Result<(), RelayError> {
        match event {
            SourceEvent::Begin {
                commit_lsn,
                commit_time_us,
                xid,
            } => {
                if self.mode.ends_before(commit_lsn) {
                    self.ship_resend(source).await?;
                    *self.mode = Mode::Streaming;
                    info!("the rows of the failed insert are all in ClickHouse or dead letters");
                }
                self.begin(commit_lsn, commit_time_us, xid);
            }
            SourceEvent::Change { lsn, data } => {
                let message =
                    pgoutput::decode(data).map_err(|source| RelayError::Decode { lsn, source })?;
                self.change(message, lsn).await?;
            }
            SourceEvent::Commit { end } => {
                if self.mode.is_resending() {
                    let tx = self.settle(source, end);
                    let last = tx.is_some_and(|tx| self.mode.last_to_resend(tx.commit_lsn));
                    if last || self.resend.len() >= RESEND_ROWS || self.resend.is_empty() {
                        self.ship_resend(source).await?;
                    }
                    return Ok(());
                }
                self.commit(source, end);
                if self.batch_full() {
                    self.flush(source).await?;
                }
            }
            SourceEvent::KeepAlive { wal_end } => self.keepalive(source, wal_end),
            SourceEvent::Other => {}
        }
        Ok(())
    }

    /// A transaction begins (streaming, or after the rows to re-send are shipped).
    fn begin(&mut self, commit_lsn: Lsn, commit_time_us: i64, xid: u32) {
        let xid = crate::event::widen_xid(xid, self.xid_reference);
        self.xid_reference = self.xid_reference.max(xid);
        if self
            .present
            .last_commit_lsn()
            .is_some_and(|last| commit_lsn.0 > last)
        {
            self.present = Present::default();
        }
        self.tx = Some(Tx {
            commit_lsn,
            commit_time_us,
            seq: 0,
            xid,
        });
    }

    /// A transaction's commit, in either mode: ends the transaction in hand (returned), and
    /// confirms what [`Progress::commit`] says is settled.
    fn settle(&mut self, source: &impl Source, end: Lsn) -> Option<Tx> {
        let tx = self.tx.take();
        let settled = self.progress.commit(end);
        self.metrics
            .server_wal_lsn
            .store(self.progress.received().0, Relaxed);
        self.confirm(source, settled);
        tx
    }

    /// A transaction's commit while streaming: settled at once without rows held, else counted
    /// in the batch (the caller flushes a full batch).
    fn commit(&mut self, source: &impl Source, end: Lsn) {
        let tx = self.settle(source, end);
        if let Some(batch) = &mut self.batch {
            batch.transactions += 1;
            if let Some(tx) = tx {
                batch.last_commit_time_us = tx.commit_time_us;
            }
        }
    }

    fn keepalive(&mut self, source: &impl Source, wal_end: Lsn) {
        let settled = self.progress.keepalive(wal_end, self.tx.is_some());
        self.metrics
            .server_wal_lsn
            .store(self.progress.received().0, Relaxed);
        self.confirm(source, settled);
    }

    /// One decoded change inside a transaction.
    async fn change(&mut self, message: Message, lsn: Lsn) -> Result<(), RelayError> {
        match message {
            Message::Relation(relation) => {
                let decode = |source| RelayError::Decode { lsn, source };
                if relation.namespace().map_err(decode)? == self.config.outbox_schema
                    && relation.name().map_err(decode)? == self.config.outbox_table
                {
                    self.store
                        .outbox_relation(relation.id, lsn, self.progress.confirmed())
                        .await?;
                    let layout = OutboxLayout::from_relation(&relation);
                    if let Err(e) = &layout {
                        warn!(
                            wal_lsn = %lsn, error = %e,
                            "the outbox table's shape at this point of the WAL does not fit the \
                             relay: its rows become dead letters until a later shape fits \
                             (docs/operations.md, \"Rows that cannot become events\")"
                        );
                    }
                    let columns = relation
                        .columns
                        .iter()
                        .map(|c| c.name().map(|n| (n.to_string(), c.type_oid)))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(decode)?;
                    self.outbox_relation = Some(OutboxRelation {
                        id: relation.id,
                        columns,
                        layout: layout.map_err(|e| e.to_string()),
                    });
                }
            }
            Message::Insert(insert) => {
                let Some(relation) = &self.outbox_relation else {
                    return Ok(());
                };
                if insert.relation_id != relation.id {
                    return Ok(());
                }
                let tx = self.tx.as_mut().ok_or(RelayError::Protocol(lsn))?;
                let (commit_lsn, tx_seq, xid) = (tx.commit_lsn, tx.seq, tx.xid);
                tx.seq += 1;
                let mapped = match &relation.layout {
                    Ok(layout) => layout
                        .row(&insert.tuple, (commit_lsn.0, tx_seq, xid))
                        .map_err(|e| e.to_string()),
                    Err(why) => Err(why.clone()),
                };
                let row = match mapped {
                    Ok(row) => row,
                    Err(why) => {
                        let raw = crate::outbox::raw_values(&relation.columns, &insert.tuple);
                        let id = crate::outbox::fallback_event_id(
                            &relation.columns,
                            &insert.tuple,
                            commit_lsn.0,
                            tx_seq,
                        );
                        return self.unmapped(id, (commit_lsn, tx_seq), raw, why).await;
                    }
                };
                let Some(tx) = self.tx.as_mut() else {
                    return Err(RelayError::Protocol(lsn));
                };
                if self.present.contains(row.commit_lsn, row.tx_seq) {
                    return Ok(());
                }
                self.progress.hold_row();
                if self.mode.is_resending() {
                    self.resend.push(OwnedEventRow::new(&row));
                    if self.resend.len() >= RESEND_ROWS {
                        // Mid-transaction: sent, not confirmed (the restart check covers it).
                        self.resend_rows().await?;
                    }
                    return Ok(());
                }
                let batch = match &mut self.batch {
                    Some(batch) => batch,
                    None => {
                        self.metrics.pending(tx.commit_time_us);
                        self.batch.insert(open_batch(
                            &self.sink,
                            self.config.batch_max_wait(),
                            tx.commit_lsn,
                            row.sentry_trace_header().as_deref(),
                        ))
                    }
                };
                if let Some(id) = row.trace_id()
                    && batch.trace.is_some()
                    && batch.trace_ids.len() < MAX_LINKED_TRACES
                    && !batch.trace_ids.iter().any(|t| t == id)
                {
                    batch.trace_ids.push(id.to_string());
                }
                batch.last_commit_lsn = tx.commit_lsn;
                if let Err(e) = batch.insert.write(&row).await {
                    return Err(self.insert_failed(e));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn batch_full(&self) -> bool {
        self.batch.as_ref().is_some_and(|b| {
            b.insert.rows() >= self.config.batch_max_rows as u64
                || b.insert.bytes() >= self.config.batch_max_bytes as u64
                || self.now >= b.deadline
        })
    }

    /// Ends the batch's insert; once the sink accepted it, confirms its last commit.
    async fn flush(&mut self, source: &impl Source) -> Result<(), RelayError> {
        let Some(last_end) = self.progress.held_end() else {
            // No batch, or only part of a transaction: cannot happen when flushes wait for
            // commits.
            return Ok(());
        };
        let Some(batch) = self.batch.take() else {
            return Ok(());
        };
        if let Some(span) = batch.decode_span {
            span.finish();
        }
        let (rows, bytes) = (batch.insert.rows(), batch.insert.bytes());
        let fill_ms = batch.opened.elapsed().as_millis() as u64;
        let insert_span = batch
            .trace
            .as_ref()
            .map(|t| t.start_child("db.clickhouse.insert", "INSERT ... FORMAT RowBinary"));
        let span = info_span!("batch", first_lsn = %batch.first_commit_lsn, last_lsn = %last_end);
        let started = Instant::now();
        let last_commit = batch.last_commit_lsn;
        if let Err(e) = batch.insert.commit().instrument(span.clone()).await {
            self.mode.resend_through(Some(last_commit));
            return Err(self.insert_failed(e));
        }
        let _in_span = span.enter();
        let insert_time = started.elapsed();
        let insert_ms = insert_time.as_millis() as u64;
        self.metrics.batch_shipped(rows, bytes, insert_time);
        self.metrics
            .last_shipped_commit_us
            .store(batch.last_commit_time_us, Relaxed);
        if let Some(span) = insert_span {
            span.finish();
        }
        let confirm_span = batch
            .trace
            .as_ref()
            .map(|t| t.start_child("relay.confirm", "standby status update"));
        let settled = self.progress.accepted();
        self.confirm(source, settled);
        self.checkpoint(last_end, rows).await?;
        if let Some(span) = confirm_span {
            span.finish();
        }
        self.shipped_batches += 1;
        let lag_ms = (crate::metrics::unix_now_us() - batch.last_commit_time_us) / 1000;
        info!(
            rows,
            bytes,
            transactions = batch.transactions,
            first_lsn = %batch.first_commit_lsn,
            last_lsn = %last_end,
            fill_ms,
            flush_ms = insert_ms,
            lag_ms,
            lag_bytes = self.progress.received().0.saturating_sub(last_end.0),
            "batch shipped"
        );
        if let Some(trace) = batch.trace {
            trace.set_data("rows", rows.into());
            trace.set_data("bytes", bytes.into());
            trace.set_data("first_lsn", batch.first_commit_lsn.to_string().into());
            trace.set_data("last_lsn", last_end.to_string().into());
            trace.set_data("linked_trace_ids", batch.trace_ids.clone().into());
            trace.finish();
        }
        Ok(())
    }

    /// After an insert failed: the rows up to the failed batch's last commit (and the
    /// transaction in hand) are re-sent in the next session.
    fn insert_failed(&mut self, e: SinkError) -> RelayError {
        self.mode
            .resend_through(self.tx.as_ref().map(|tx| tx.commit_lsn));
        self.mode
            .resend_through(self.batch.as_ref().map(|b| b.last_commit_lsn));
        e.into()
    }

    /// Re-sending, at a transaction boundary: sends what is held, then confirms the last
    /// complete transaction.
    async fn ship_resend(&mut self, source: &impl Source) -> Result<(), RelayError> {
        if !self.mode.is_resending() {
            return Ok(());
        }
        let rows = self.resend_rows().await?;
        let end = self.progress.held_end();
        let settled = self.progress.accepted();
        self.confirm(source, settled);
        if let Some(end) = end
            && rows > 0
        {
            self.checkpoint(end, rows).await?;
        }
        Ok(())
    }

    /// Sends the rows held for re-sending (see [`resend`]): a row the sink refuses becomes a
    /// dead letter, the rest ships.
    async fn resend_rows(&mut self) -> Result<u64, RelayError> {
        let rows = std::mem::take(&mut self.resend);
        if rows.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let mut resend = Resend::new(&rows);
        while let Some((row, e)) = resend.next_refused(&self.sink, |_| None).await? {
            self.dead_letter(row, &e).await?;
        }
        self.metrics
            .batch_shipped(rows.len() as u64, 0, started.elapsed());
        info!(rows = rows.len(), "careful batch shipped");
        Ok(rows.len() as u64)
    }

    /// An outbox row that cannot become an event row: a dead letter with its WAL position, its
    /// values and why; the stream goes on.
    async fn unmapped(
        &mut self,
        id: [u8; 16],
        position: (Lsn, u32),
        raw: serde_json::Value,
        why: String,
    ) -> Result<(), RelayError> {
        // Read again after a restart, a row a `dead-letters retry` already shipped stays shipped.
        let id_text = crate::event::uuid_text(&id);
        if !self
            .sink
            .existing_ids(std::slice::from_ref(&id_text))
            .await?
            .is_empty()
        {
            return Ok(());
        }
        if self.store.unmapped(&id, position, &raw, &why).await? {
            self.metrics.dead_letters.fetch_add(1, Relaxed);
        }
        warn!(
            event_id = %id_text,
            commit_lsn = %position.0,
            tx_seq = position.1,
            error = %why,
            "an outbox row cannot become an event: stored as a dead letter with its values, the \
             stream goes on (outbox-relay dead-letters list; fix the row, then retry)"
        );
        Ok(())
    }

    /// A row the sink refused: a dead letter; the rest ships.
    async fn dead_letter(&self, row: &OwnedEventRow, e: &SinkError) -> Result<(), RelayError> {
        let error = e.to_string();
        if self.store.dead_letter(row, &error).await? {
            self.metrics.dead_letters.fetch_add(1, Relaxed);
        }
        warn!(
            event_id = %row.event_id_text(),
            commit_lsn = %Lsn(row.commit_lsn),
            tx_seq = row.tx_seq,
            error = %error,
            "ClickHouse refused an event: stored as a dead letter, the rest ships \
             (outbox-relay dead-letters list)"
        );
        Ok(())
    }

    /// Records a checkpoint (for operators and replay), unless a coverage replay runs.
    async fn checkpoint(&self, confirmed: Lsn, rows: u64) -> Result<(), RelayError> {
        if self.coverage_replay.is_some() {
            return Ok(());
        }
        self.store.checkpoint(confirmed, rows).await
    }

    /// Acts on what [`Progress`] settled: nothing is unshipped any more, and the position to
    /// confirm, if any, goes to the server.
    fn confirm(&mut self, source: &impl Source, settled: Option<Settled>) {
        let Some(settled) = settled else {
            return;
        };
        self.metrics.pending_since_us.store(0, Relaxed);
        if let Some(lsn) = settled.confirm {
            self.metrics.confirmed_lsn.store(lsn.0, Relaxed);
            source.confirm(lsn);
        }
    }

    /// Graceful stop: flush, make sure the server heard the final position, close the stream.
    async fn finish(&mut self, source: impl Source) -> Result<(), RelayError> {
        self.flush(&source).await?;
        source.close().await;
        info!(confirmed_lsn = %self.progress.confirmed(), "stopped");
        Ok(())
    }
}

/// Opens a batch; with Sentry on, its transaction continues the first event's publisher trace
/// (`sentry-trace`), so the batch shows up inside the request that published it.
fn open_batch<S: Sink>(
    sink: &S,
    max_wait: Duration,
    first_commit_lsn: Lsn,
    sentry_trace: Option<&str>,
) -> Batch<S::Insert> {
    let trace = sentry::Hub::current().client().map(|_| {
        let (name, op) = ("outbox-relay batch", "relay.batch");
        let ctx = match sentry_trace {
            Some(header) => sentry::TransactionContext::continue_from_headers(
                name,
                op,
                [("sentry-trace", header)],
            ),
            None => sentry::TransactionContext::new(name, op),
        };
        let trace = sentry::start_transaction(ctx);
        trace.set_data("first_lsn", first_commit_lsn.to_string().into());
        trace
    });
    let decode_span = trace
        .as_ref()
        .map(|t| t.start_child("relay.decode", "decode pgoutput, encode RowBinary"));
    Batch {
        insert: sink.begin(),
        last_commit_lsn: first_commit_lsn,
        opened: Instant::now(),
        deadline: tokio::time::Instant::now() + max_wait,
        first_commit_lsn,
        last_commit_time_us: 0,
        transactions: 0,
        trace,
        decode_span,
        trace_ids: Vec::new(),
    }
}

/// The coverage replay's result once it is done; never, when there is none.
async fn replay_done<T>(task: &mut Option<AbortOnDrop<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => (&mut task.0).await,
        None => std::future::pending().await,
    }
}

/// The future's output if it is ready right now, without waiting.
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
