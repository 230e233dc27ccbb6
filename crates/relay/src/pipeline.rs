//! The relay loop: replication stream -> decode -> batch -> ClickHouse -> confirm.
//!
//! Where an event goes, by name: [`Relay::run`] keeps a [`Session`] alive; the session reads
//! [`ReplicationEvent`]s, [`pgoutput::decode`]s each change, turns outbox inserts into
//! [`EventRow`](crate::sink::EventRow)s through the [`OutboxLayout`], writes them into the open
//! [`Batch`]'s insert, and [`Session::flush`] ends that insert and only then confirms the batch's
//! last commit LSN to PostgreSQL.
//!
//! Invariants:
//! - a batch ends only at a transaction boundary, so a transaction is never split;
//! - every row carries its commit LSN and position in its transaction; a session starts by asking
//!   ClickHouse which rows past the slot's confirmed LSN it already holds and skips them, so a
//!   batch that reached ClickHouse before its confirm did is never doubled (exactly once);
//! - after an insert fails, the rows up to that batch's last commit go again in small all-or-
//!   nothing inserts, split in halves on refusal, so one event ClickHouse refuses becomes a dead
//!   letter and the rest ships;
//! - the confirmed LSN is the end LSN of a commit whose rows ClickHouse has accepted, or, when
//!   nothing is pending, the WAL position the server says it has sent everything up to;
//! - any error drops the open insert (ClickHouse aborts it) and the session; the next session
//!   restarts from the slot's confirmed position, so nothing is lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pgoutput::{Lsn, Message};
use pgwire_replication::{
    FeedbackObserver, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Config;
use crate::deadletter;
use crate::metrics::{Metrics, State};
use crate::outbox::{OutboxLayout, RowError, SchemaError};
use crate::pg::{self, PgError};
use crate::pgtls;
use crate::replay;
use crate::sink::{BatchInsert, ClickHouseSink, OwnedEventRow, Present, SinkError};

/// Messages the replication connection reads ahead of the pipeline. The relay's memory is about
/// this times the largest message: 1,024 keeps a 10 KB-per-event stream at ~10 MB (the
/// library's default of 8,192 held 80 MB of it) and is deep enough to keep the walsender busy.
const REPLICATION_BUFFER_EVENTS: usize = 1_024;

/// Rows per insert while re-sending the rows of a failed batch (each insert is one block, so
/// all or nothing).
const CAREFUL_ROWS: usize = 10_000;

/// Microseconds between 1970-01-01 and 2000-01-01.
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error("replication connection to {target}: {source}")]
    Replication {
        target: String,
        #[source]
        source: PgWireError,
    },
    #[error("the replication stream ended without being asked to")]
    StreamEnded,
    #[error(transparent)]
    ClickHouse(#[from] SinkError),
    #[error("cannot decode a pgoutput message at WAL {lsn}: {source}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(
        "outbox row {tx_seq} of the transaction committed at {commit_lsn} cannot be shipped: \
         {source}. The relay stops here so that nothing is skipped; fix the row's source and \
         see docs/operations.md"
    )]
    Row {
        commit_lsn: Lsn,
        tx_seq: u32,
        #[source]
        source: RowError,
    },
    #[error("an insert into the outbox table arrived outside a transaction (WAL {0})")]
    Protocol(Lsn),
    /// The outbox's inserts are not (or no longer) streamed; waiting for an operator's fix.
    #[error("{0}")]
    Uncovered(String),
    #[error(
        "re-shipping the events committed while the publication did not cover the outbox \
         failed: {0}; the next session tries again"
    )]
    CoverageReplay(String),
}

impl RelayError {
    /// What the relay waits for after this (transient) error.
    pub fn waiting_state(&self) -> State {
        match self {
            RelayError::ClickHouse(_) => State::WaitingForClickHouse,
            RelayError::Uncovered(_) | RelayError::CoverageReplay(_) => {
                State::WaitingForPublication
            }
            _ => State::WaitingForPostgres,
        }
    }

    /// Whether waiting and reconnecting can cure this error.
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Postgres(
                PgError::NotReady(_) | PgError::Tls { .. } | PgError::SlotNotSynced(_),
            ) => false,
            RelayError::Postgres(_) => true,
            RelayError::Replication { source, .. } => !matches!(source, PgWireError::Auth(_)),
            RelayError::ClickHouse(SinkError::Table { .. }) => false,
            RelayError::StreamEnded
            | RelayError::ClickHouse(_)
            | RelayError::Uncovered(_)
            | RelayError::CoverageReplay(_) => true,
            RelayError::Decode { .. }
            | RelayError::Schema(_)
            | RelayError::Row { .. }
            | RelayError::Protocol(_) => false,
        }
    }
}

/// The relay: owns the configuration and the ClickHouse sink, runs sessions until shutdown.
pub struct Relay {
    config: Config,
    sink: ClickHouseSink,
    metrics: Arc<Metrics>,
}

impl Relay {
    pub fn new(config: Config) -> Result<Relay, crate::config::ConfigError> {
        let sink = ClickHouseSink::from_config(&config, &config.slot)?;
        Ok(Relay {
            config,
            sink,
            metrics: Arc::default(),
        })
    }

    /// The counters and gauges `/metrics` shows.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn sink(&self) -> &ClickHouseSink {
        &self.sink
    }

    /// Streams until `shutdown` turns true (then flushes and returns `Ok`) or a permanent error.
    /// Transient errors (a server down, a connection cut) are retried when the server that
    /// failed answers again, or after a [`Backoff`] wait when it answers all along
    /// ([`Relay::wait_for`]).
    /// Beside the sessions, [`watch_postgres`] keeps the lag metrics true from PostgreSQL's view.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), RelayError> {
        let _watcher = AbortOnDrop(tokio::spawn(watch_postgres(
            self.config.clone(),
            self.metrics.clone(),
        )));
        let result = self.sessions(&mut shutdown).await;
        if result.is_err() {
            self.metrics.set_state(State::StoppedOnError);
        }
        result
    }

    async fn sessions(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), RelayError> {
        let mut backoff = Backoff::new(&self.config);
        let mut careful_until = None;
        loop {
            let started = Instant::now();
            let mut session = Session::new(&self.config, self.sink.clone(), &self.metrics);
            session.careful_until = careful_until;
            let result = session.run(shutdown).await;
            careful_until = session.careful_until;
            self.metrics.replicating.store(false, Relaxed);
            match &result {
                Err(RelayError::ClickHouse(e)) => {
                    self.metrics.clickhouse_error(e.kind());
                    self.metrics.clickhouse_failed(e.to_string());
                }
                Err(_) => {
                    self.metrics.postgres_errors.fetch_add(1, Relaxed);
                }
                Ok(()) => {}
            }
            let result = match result {
                Err(RelayError::Replication {
                    source: PgWireError::Server(message),
                    ..
                }) if replay::is_unpublished_window(&message) => {
                    self.skip_unpublished_window(&message).await
                }
                Err(RelayError::Postgres(PgError::SlotNotSynced(why)))
                    if self.config.failover_recovery =>
                {
                    self.recover_lost_slot(&why).await
                }
                other => other,
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    if session.shipped_batches > 0 || started.elapsed() > backoff.max {
                        backoff.reset();
                    }
                    let delay = backoff.next();
                    let state = e.waiting_state();
                    self.metrics.set_state(state);
                    warn!(error = %e, state = state.name(), retry_in_ms = delay.as_millis() as u64,
                        "relay session failed; nothing was confirmed past ClickHouse, retrying \
                         (once the server answers again if it is down)");
                    tokio::select! {
                        back = self.wait_for(state, delay) => {
                            if back {
                                info!(state = state.name(), "the server answers again: reconnecting");
                            }
                        }
                        _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The wait after a failure of the server `state` names: while that server does not answer
    /// a probe (every [`PROBE_INTERVAL`]), until it does: returns `true` then, so a session
    /// starts within about that long of its return and no session fails meanwhile. When it
    /// answers the first probe (the failure was not about its availability) or `state` names no
    /// server: the backoff `delay`, returning `false`.
    async fn wait_for(&self, state: State, delay: Duration) -> bool {
        let started = tokio::time::Instant::now();
        let mut seen_down = false;
        loop {
            let up = match state {
                State::WaitingForClickHouse => {
                    matches!(
                        tokio::time::timeout(PROBE_TIMEOUT, self.sink.ping()).await,
                        Ok(Ok(()))
                    )
                }
                State::WaitingForPostgres => matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, pg::connect(&self.config.postgres_url))
                        .await,
                    Ok(Ok(_))
                ),
                _ => true,
            };
            match (up, seen_down) {
                (true, true) => return true,
                (true, false) => {
                    tokio::time::sleep_until(started + delay).await;
                    return false;
                }
                (false, _) => seen_down = true,
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }
}

/// How often a failed server is probed while the relay waits for it (ClickHouse `SELECT 1`, a
/// PostgreSQL connection), so that shipping resumes within about this long of its return.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// A probe not answered within this time counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often [`watch_postgres`] asks PostgreSQL for the slot's lag.
pub const LAG_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps `outbox_relay_lag_bytes`, `outbox_relay_slot_wal_status` and
/// `outbox_relay_postgres_up` true from PostgreSQL's own view, on a SQL connection of its own,
/// whatever the sessions are doing: one query on `pg_replication_slots` every
/// [`LAG_CHECK_INTERVAL`]. While no session streams and the relay knows of no unshipped event,
/// it also reads the oldest outbox event newer than the last one shipped (the outbox's
/// `event_date_time` index), so that `outbox_relay_lag_seconds` grows during an outage too.
pub async fn watch_postgres(config: Config, metrics: Arc<Metrics>) {
    let mut sql: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(LAG_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if sql.as_ref().is_none_or(|c| c.is_closed()) {
            sql = tokio::time::timeout(PROBE_TIMEOUT, pg::connect(&config.postgres_url))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some(client) = &sql else {
            metrics.postgres_up.store(false, Relaxed);
            continue;
        };
        match tokio::time::timeout(LAG_CHECK_INTERVAL, check_lag(client, &config, &metrics)).await {
            Ok(Ok(())) => metrics.postgres_up.store(true, Relaxed),
            Ok(Err(e)) => {
                debug!(error = %e, "lag check failed");
                metrics.postgres_up.store(false, Relaxed);
                sql = None;
            }
            Err(_) => {
                metrics.postgres_up.store(false, Relaxed);
                sql = None;
            }
        }
    }
}

async fn check_lag(
    client: &tokio_postgres::Client,
    config: &Config,
    metrics: &Metrics,
) -> Result<(), PgError> {
    let Some(slot) = pg::slot_state(client, &config.slot).await? else {
        return Ok(());
    };
    metrics.slot_seen(slot.lag_bytes, slot.wal_status.as_deref());
    if metrics.state() != State::Streaming
        && metrics.pending_since_us.load(Relaxed) == 0
        && slot.lag_bytes.unwrap_or(0) > 0
        && let Some(oldest) =
            replay::oldest_unshipped(client, config, metrics.last_shipped_commit_us.load(Relaxed))
                .await?
    {
        metrics.pending(oldest);
    }
    Ok(())
}

impl Relay {
    /// PostgreSQL before 18 cannot decode the WAL written while the publication was missing.
    /// When the publication exists again, the slot is moved past that WAL and the next session
    /// re-ships the window from the outbox ([`replay::skip_unpublished_window`]); while it is
    /// missing, the relay waits.
    async fn skip_unpublished_window(&self, message: &str) -> Result<(), RelayError> {
        let sql = pg::connect(&self.config.postgres_url).await?;
        let fingerprint = match pg::coverage(&sql, &self.config).await? {
            pg::Coverage::Uncovered(why) => return Err(RelayError::Uncovered(why)),
            pg::Coverage::Covered { fingerprint } => fingerprint,
        };
        let tables = replay::coverage_tables(&fingerprint);
        let to = replay::skip_unpublished_window(&self.config, &tables).await?;
        Err(RelayError::Uncovered(format!(
            "PostgreSQL cannot decode WAL written while publication {:?} was missing ({message}): \
             the slot was moved past it to {to}, and the next session re-ships the outbox's \
             events committed since the last checkpoint before it",
            self.config.publication
        )))
    }
}

impl Relay {
    /// `failover_recovery`: the slot is missing on a promoted server. Creates it there behind a
    /// marker checkpoint; the next session re-ships the events committed since the last
    /// checkpoint from the outbox ([`replay::recover_lost_slot`]).
    async fn recover_lost_slot(&self, why: &str) -> Result<(), RelayError> {
        warn!(reason = %why, "failover_recovery: creating the slot on the promoted server");
        let at = replay::recover_lost_slot(&self.config).await?;
        Err(RelayError::Uncovered(format!(
            "failover_recovery: slot {:?} created on the promoted server at {at}; the next \
             session re-ships, from the outbox table, the events committed since the last \
             checkpoint that ClickHouse lacks",
            self.config.slot
        )))
    }
}

/// Exponential backoff with jitter: the n-th wait in a row is drawn uniformly from
/// [¾·d, d], d = `retry_initial_ms` · 2^(n-1) capped at `retry_max_ms` (so each wait is
/// 1.5 to 2.7 times the one before until the cap).
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(config: &Config) -> Backoff {
        Backoff {
            initial: Duration::from_millis(config.retry_initial_ms),
            max: Duration::from_millis(config.retry_max_ms),
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next(&mut self) -> Duration {
        let nominal = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt += 1;
        nominal.mul_f64(rand::random_range(JITTER..=1.0))
    }
}

/// The shortest wait, as a fraction of the nominal one.
const JITTER: f64 = 0.75;

/// The transaction being received.
struct Tx {
    commit_lsn: Lsn,
    commit_time_us: i64,
    seq: u32,
}

/// The batch being filled: an open ClickHouse insert plus what it covers.
struct Batch {
    insert: BatchInsert,
    /// Commit LSN of the last transaction with rows in the batch.
    last_commit_lsn: Lsn,
    opened: Instant,
    deadline: tokio::time::Instant,
    first_commit_lsn: Lsn,
    /// End LSN of the last complete transaction in the batch: what a flush confirms.
    last_end_lsn: Option<Lsn>,
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

/// How many publisher traces a batch's Sentry transaction lists.
const MAX_LINKED_TRACES: usize = 32;

/// One replication connection's worth of streaming.
struct Session<'a> {
    config: &'a Config,
    /// The relay's sink, marked with this outbox's source identity.
    sink: ClickHouseSink,
    /// The publication's coverage of the outbox table when the session started
    /// ([`pg::coverage`]); checked again periodically and with every checkpoint.
    coverage: String,
    /// Re-shipping a window the publication did not cover, beside the stream; no checkpoint is
    /// recorded until it is done, so that a crash meanwhile makes the next session do it again.
    coverage_replay: Option<AbortOnDrop<Result<replay::ReplayReport, replay::ReplayError>>>,
    metrics: &'a Metrics,
    /// The outbox table's relation id, its column names and its layout, or why the relay cannot
    /// read rows of that shape (each such row becomes a dead letter; a later Relation message,
    /// after the table is fixed, brings a good layout back).
    outbox_relation: Option<OutboxRelation>,
    tx: Option<Tx>,
    batch: Option<Batch>,
    confirmed: Lsn,
    /// Highest WAL position the server said it has sent everything up to.
    wal_end: Lsn,
    shipped_batches: u64,
    /// SQL connection for checkpoints and dead letters.
    sql: Option<tokio_postgres::Client>,
    /// Rows ClickHouse already held when the session started: skipped.
    present: Present,
    /// Transactions committed up to here go in careful mode (after a failed insert).
    careful_until: Option<Lsn>,
    /// Careful mode's rows not yet sent.
    careful: Vec<OwnedEventRow>,
    /// End LSN of the last complete transaction among `careful`'s rows.
    careful_end: Option<Lsn>,
    /// When the take of messages in hand began: commits compare the batch's deadline with it
    /// (one clock read a take of up to [`READY_BURST`] messages, not one a transaction).
    now: tokio::time::Instant,
}

impl<'a> Session<'a> {
    fn new(config: &'a Config, sink: ClickHouseSink, metrics: &'a Metrics) -> Session<'a> {
        Session {
            config,
            sink,
            coverage: String::new(),
            coverage_replay: None,
            metrics,
            outbox_relation: None,
            tx: None,
            batch: None,
            confirmed: Lsn(0),
            wal_end: Lsn(0),
            shipped_batches: 0,
            sql: None,
            present: Present::default(),
            careful_until: None,
            careful: Vec::new(),
            careful_end: None,
            now: tokio::time::Instant::now(),
        }
    }

    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), RelayError> {
        let primary = pg::connect_primary(&self.config.postgres_url).await?;
        let (sql, seen, target) = (primary.client, primary.seen, primary.target);
        let start = pg::preflight(&sql, &self.config.slot).await?;
        pg::standby_slots_trap(&sql, &self.config.slot, &primary.endpoint).await?;
        self.sink = self
            .sink
            .clone()
            .with_source(pg::source_identity(&sql, self.config).await?);
        self.sink.check_table().await?;
        self.coverage = match pg::coverage(&sql, self.config).await? {
            pg::Coverage::Covered { fingerprint } => fingerprint,
            pg::Coverage::Uncovered(why) => return Err(RelayError::Uncovered(why)),
        };
        let gap = replay::coverage_gap(&sql, self.config, &self.coverage, start).await?;
        if gap.is_none() {
            replay::record_baseline(&sql, self.config, start, &self.coverage).await?;
        }
        if let Some(gap) = gap {
            replay::record_pending(&sql, self.config, gap.from, &gap.tables).await?;
            warn!(
                from_lsn = %gap.from,
                tables = ?gap.tables,
                "the publication or the outbox table changed since the last checkpoint (dropped \
                 and created again, swapped, taken out of the publication): PostgreSQL may have \
                 skipped events meanwhile; re-shipping them from the outbox table beside the \
                 stream (exactly once: ClickHouse's rows are checked first)"
            );
            let (config, sink) = (self.config.clone(), self.sink.clone());
            let (from, tables) = (gap.from, gap.tables);
            self.coverage_replay = Some(AbortOnDrop(tokio::spawn(async move {
                replay::replay_tables(
                    &config,
                    &sink,
                    from,
                    COVERAGE_REPLAY_WAIT,
                    false,
                    Some(&tables),
                )
                .await
            })));
        }
        self.metrics
            .dead_letters
            .store(deadletter::count(&sql, self.config).await?, Relaxed);
        self.sql = Some(sql);
        self.confirmed = start;
        // Exactly once: nothing of ours is still writing, then see what already arrived.
        self.sink.stop_inflight().await?;
        self.present = self.sink.present(start.0).await?;
        if !self.present.is_empty() {
            info!(
                rows = self.present.rows(),
                "ClickHouse already holds events past the slot's confirmed position (shipped \
                 before a confirm reached PostgreSQL); they are skipped, not sent again"
            );
        }
        if let Some(until) = self.careful_until {
            info!(until_lsn = %until, "re-sending the rows of a failed insert in small inserts");
        }
        let feedback = Arc::new(Notify::new());
        let mut client = self
            .connect(start, feedback.clone(), &target, &seen)
            .await?;
        info!(slot = %self.config.slot, from_lsn = %start, primary = %primary.endpoint, "streaming");
        self.metrics.replicating.store(true, Relaxed);
        self.metrics.set_state(State::Streaming);
        self.metrics.confirmed_lsn.store(start.0, Relaxed);
        let mut stopping = *shutdown.borrow();
        let mut coverage_check = tokio::time::interval_at(
            tokio::time::Instant::now() + COVERAGE_CHECK_INTERVAL,
            COVERAGE_CHECK_INTERVAL,
        );
        loop {
            if stopping && self.tx.is_none() {
                self.ship_careful(&client).await?;
                return self.finish(client, &feedback).await;
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
                    self.flush(&client).await?;
                }
                _ = coverage_check.tick() => self.check_coverage().await?,
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
                event = client.recv() => {
                    self.now = tokio::time::Instant::now();
                    let event = event.map_err(|source| self.replication_error(source))?;
                    if let Some(event) = self.handle_now(&client, event.ok_or(RelayError::StreamEnded)?) {
                        self.handle(&client, event).await?;
                    }
                    // Under load, take the messages already received without going back
                    // through the select (its timer and shutdown futures cost more than a
                    // message); the batch's deadline is still checked at every commit.
                    let mut taken = 1;
                    for _ in 0..READY_BURST {
                        let Some(event) = ready_now(client.recv()) else {
                            break;
                        };
                        let event = event.map_err(|source| self.replication_error(source))?;
                        if let Some(event) = self.handle_now(&client, event.ok_or(RelayError::StreamEnded)?) {
                            self.handle(&client, event).await?;
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
                        let linger = if self.tx.is_some() {
                            LINGER
                        } else if self.batch.is_some() {
                            BATCH_LINGER.min(self.config.batch_max_wait() / 10)
                        } else {
                            Duration::ZERO
                        };
                        if !linger.is_zero() {
                            std::thread::sleep(linger);
                        }
                    }
                }
            }
        }
    }

    async fn connect(
        &self,
        start: Lsn,
        feedback: Arc<Notify>,
        target: &pgtls::Target,
        seen: &pgtls::Seen,
    ) -> Result<ReplicationClient, RelayError> {
        let config = replication_config(self.config, target, start, feedback, seen);
        ReplicationClient::connect(config)
            .await
            .map_err(|source| self.replication_error(source))
    }

    fn replication_error(&self, source: PgWireError) -> RelayError {
        let target = pg::describe(&self.config.postgres_url);
        if let Some(problem) = replication_tls_problem(&self.config.postgres_url, &source) {
            return RelayError::Postgres(PgError::Tls { target, problem });
        }
        RelayError::Replication { target, source }
    }

    /// The messages that need no waiting, handled without entering [`Session::handle`] (an
    /// async call a message): a transaction's begin, its commit when the batch does not end
    /// there, keepalives. Returns the event when it needs [`Session::handle`]: row data, careful
    /// mode, a commit that ends the batch.
    fn handle_now(
        &mut self,
        client: &ReplicationClient,
        event: ReplicationEvent,
    ) -> Option<ReplicationEvent> {
        if self.careful_until.is_some() {
            return Some(event);
        }
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => self.begin(Lsn(final_lsn.as_u64()), commit_time_micros),
            ReplicationEvent::Commit { end_lsn, .. } if !self.batch_full() => {
                self.commit(client, Lsn(end_lsn.as_u64()));
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.keepalive(client, Lsn(wal_end.as_u64()));
            }
            event => return Some(event),
        }
        None
    }

    async fn handle(
        &mut self,
        client: &ReplicationClient,
        event: ReplicationEvent,
    ) -> Result<(), RelayError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                let commit_lsn = Lsn(final_lsn.as_u64());
                if self.careful_until.is_some_and(|until| commit_lsn > until) {
                    self.ship_careful(client).await?;
                    self.careful_until = None;
                    info!("the rows of the failed insert are all in ClickHouse or dead letters");
                }
                self.begin(commit_lsn, commit_time_micros);
            }
            ReplicationEvent::XLogData {
                data, wal_start, ..
            } => {
                let lsn = Lsn(wal_start.as_u64());
                let message =
                    pgoutput::decode(data).map_err(|source| RelayError::Decode { lsn, source })?;
                self.change(message, lsn).await?;
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let end = Lsn(end_lsn.as_u64());
                if self.careful_until.is_some() {
                    let tx = self.tx.take();
                    self.saw_wal(end);
                    self.careful_end = Some(end);
                    let last = tx.is_some_and(|tx| Some(tx.commit_lsn) >= self.careful_until);
                    if last || self.careful.len() >= CAREFUL_ROWS || self.careful.is_empty() {
                        self.ship_careful(client).await?;
                    }
                    return Ok(());
                }
                let full = self.batch_full();
                self.commit(client, end);
                if full {
                    self.flush(client).await?;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.keepalive(client, Lsn(wal_end.as_u64()));
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// A transaction begins (outside careful mode, or after its rows are shipped).
    fn begin(&mut self, commit_lsn: Lsn, commit_time_us: i64) {
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
        });
    }

    /// A transaction's commit outside careful mode: the batch ends with it now (the caller
    /// flushes a full batch), or, without a batch, it is confirmed at once.
    fn commit(&mut self, client: &ReplicationClient, end: Lsn) {
        let tx = self.tx.take();
        self.saw_wal(end);
        match &mut self.batch {
            Some(batch) => {
                batch.last_end_lsn = Some(end);
                batch.transactions += 1;
                if let Some(tx) = tx {
                    batch.last_commit_time_us = tx.commit_time_us;
                }
            }
            // A transaction without outbox rows: nothing to wait for.
            None => self.confirm(client, end),
        }
    }

    fn keepalive(&mut self, client: &ReplicationClient, wal_end: Lsn) {
        self.saw_wal(wal_end);
        if self.tx.is_none() && self.batch.is_none() && self.careful.is_empty() {
            // Everything the server sent up to wal_end is in ClickHouse: let the slot move on
            // even when only other tables write WAL.
            self.confirm(client, self.wal_end);
        }
    }

    /// One decoded change inside a transaction.
    async fn change(&mut self, message: Message, lsn: Lsn) -> Result<(), RelayError> {
        match message {
            Message::Relation(relation) => {
                let decode = |source| RelayError::Decode { lsn, source };
                if relation.namespace().map_err(decode)? == self.config.outbox_schema
                    && relation.name().map_err(decode)? == self.config.outbox_table
                {
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
                let (commit_lsn, tx_seq) = (tx.commit_lsn, tx.seq);
                tx.seq += 1;
                let mapped = match &relation.layout {
                    Ok(layout) => layout
                        .row(&insert.tuple, commit_lsn.0, tx_seq)
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
                if self.careful_until.is_some() {
                    self.careful.push(OwnedEventRow::new(&row));
                    if self.careful.len() >= CAREFUL_ROWS {
                        // Mid-transaction: sent, not confirmed (the restart check covers it).
                        self.ship_careful_rows().await?;
                    }
                    return Ok(());
                }
                let batch = match &mut self.batch {
                    Some(batch) => batch,
                    None => {
                        self.metrics.pending(tx.commit_time_us + PG_EPOCH_UNIX_US);
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

    /// Ends the batch's insert; once ClickHouse accepted it, confirms its last commit.
    async fn flush(&mut self, client: &ReplicationClient) -> Result<(), RelayError> {
        let Some(batch) = self.batch.take() else {
            return Ok(());
        };
        let Some(last_end) = batch.last_end_lsn else {
            // Only part of a transaction: cannot happen when flushes wait for commits.
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
            self.careful_until = self.careful_until.max(Some(last_commit));
            return Err(self.insert_failed(e));
        }
        let _in_span = span.enter();
        let insert_time = started.elapsed();
        let insert_ms = insert_time.as_millis() as u64;
        self.metrics.batch_shipped(rows, bytes, insert_time);
        self.metrics
            .last_shipped_commit_us
            .store(batch.last_commit_time_us + PG_EPOCH_UNIX_US, Relaxed);
        if let Some(span) = insert_span {
            span.finish();
        }
        let confirm_span = batch
            .trace
            .as_ref()
            .map(|t| t.start_child("relay.confirm", "standby status update"));
        self.confirm(client, last_end);
        self.checkpoint(last_end, rows).await?;
        if let Some(span) = confirm_span {
            span.finish();
        }
        self.shipped_batches += 1;
        let lag_ms =
            (crate::http::unix_now_us() - (batch.last_commit_time_us + PG_EPOCH_UNIX_US)) / 1000;
        info!(
            rows,
            bytes,
            transactions = batch.transactions,
            first_lsn = %batch.first_commit_lsn,
            last_lsn = %last_end,
            fill_ms,
            flush_ms = insert_ms,
            lag_ms,
            lag_bytes = self.wal_end.0.saturating_sub(last_end.0),
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
    /// transaction in hand) go again in careful mode in the next session.
    fn insert_failed(&mut self, e: SinkError) -> RelayError {
        let in_hand = self.tx.as_ref().map(|tx| tx.commit_lsn);
        let batch = self.batch.as_ref().map(|b| b.last_commit_lsn);
        self.careful_until = self.careful_until.max(in_hand).max(batch);
        e.into()
    }

    /// Careful mode, at a transaction boundary: sends what is held, then confirms the last
    /// complete transaction.
    async fn ship_careful(&mut self, client: &ReplicationClient) -> Result<(), RelayError> {
        let rows = self.ship_careful_rows().await?;
        if let Some(end) = self.careful_end.take() {
            self.confirm(client, end);
            if rows > 0 {
                self.checkpoint(end, rows).await?;
            }
        }
        Ok(())
    }

    /// Sends the careful rows in order, each insert all or nothing; an insert ClickHouse refuses
    /// is split in halves until the refused row is alone, and that row becomes a dead letter.
    async fn ship_careful_rows(&mut self) -> Result<u64, RelayError> {
        let rows = std::mem::take(&mut self.careful);
        let mut pending = VecDeque::new();
        pending.push_back(0..rows.len());
        let started = Instant::now();
        while let Some(range) = pending.pop_front() {
            if range.is_empty() {
                continue;
            }
            match self.sink.insert_rows(&rows[range.clone()], None).await {
                Ok(()) => {}
                Err(e) if e.is_rejected_data() && range.len() == 1 => {
                    self.dead_letter(&rows[range.start], &e).await?;
                }
                Err(e) if e.is_rejected_data() => {
                    let mid = range.start + range.len() / 2;
                    pending.push_front(mid..range.end);
                    pending.push_front(range.start..mid);
                }
                Err(e) => {
                    self.careful = rows;
                    return Err(e.into());
                }
            }
        }
        if !rows.is_empty() {
            self.metrics
                .batch_shipped(rows.len() as u64, 0, started.elapsed());
            info!(rows = rows.len(), "careful batch shipped");
        }
        Ok(rows.len() as u64)
    }

    /// An outbox row that cannot become an event row: a dead letter with its WAL position, its
    /// values and why; the stream goes on.
    async fn unmapped(
        &mut self,
        id: [u8; 16],
        (commit_lsn, tx_seq): (Lsn, u32),
        raw: serde_json::Value,
        why: String,
    ) -> Result<(), RelayError> {
        let sql = self.sql.as_ref().ok_or(RelayError::Protocol(commit_lsn))?;
        // Read again after a restart, a row a `dead-letters retry` already shipped stays shipped.
        let id_text = crate::sink::uuid_text(&id);
        if !self
            .sink
            .existing_ids(std::slice::from_ref(&id_text))
            .await?
            .is_empty()
        {
            return Ok(());
        }
        if deadletter::record_unmapped(sql, self.config, &id, (commit_lsn.0, tx_seq), &raw, &why)
            .await?
        {
            self.metrics.dead_letters.fetch_add(1, Relaxed);
        }
        warn!(
            event_id = %crate::sink::uuid_text(&id),
            commit_lsn = %commit_lsn,
            tx_seq,
            error = %why,
            "an outbox row cannot become an event: stored as a dead letter with its values, the \
             stream goes on (outbox-relay dead-letters list; fix the row, then retry)"
        );
        Ok(())
    }

    async fn dead_letter(&mut self, row: &OwnedEventRow, e: &SinkError) -> Result<(), RelayError> {
        let sql = self
            .sql
            .as_ref()
            .ok_or(RelayError::Protocol(Lsn(row.commit_lsn)))?;
        let error = e.to_string();
        if deadletter::record(sql, self.config, row, &error).await? {
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

    /// Records a checkpoint (for operators and replay); a failure only warns. Fails the
    /// session when the publication's coverage changed (see [`replay::record_checkpoint`]).
    async fn checkpoint(&self, confirmed: Lsn, rows: u64) -> Result<(), RelayError> {
        let Some(sql) = &self.sql else {
            return Ok(());
        };
        if self.coverage_replay.is_some() {
            return Ok(());
        }
        match replay::record_checkpoint(sql, self.config, confirmed, rows, &self.coverage).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.coverage_changed()),
            // PostgreSQL going away: the session's failure says so, once.
            Err(e) if sql.is_closed() => {
                debug!(error = %e, "cannot record a checkpoint; shipping goes on");
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "cannot record a checkpoint; shipping goes on");
                Ok(())
            }
        }
    }

    /// The periodic check that the outbox's inserts are still published, under the coverage
    /// the session started with.
    async fn check_coverage(&self) -> Result<(), RelayError> {
        let Some(sql) = &self.sql else {
            return Ok(());
        };
        match pg::coverage(sql, self.config).await? {
            pg::Coverage::Covered { fingerprint } if fingerprint == self.coverage => Ok(()),
            pg::Coverage::Covered { .. } => Err(self.coverage_changed()),
            pg::Coverage::Uncovered(why) => Err(RelayError::Uncovered(why)),
        }
    }

    fn coverage_changed(&self) -> RelayError {
        RelayError::Uncovered(format!(
            "publication {:?} or outbox table {:?}.{:?} changed while streaming (dropped and \
             created again, swapped, taken out of the publication): PostgreSQL may have skipped \
             outbox inserts; the next session re-ships them from the outbox table",
            self.config.publication, self.config.outbox_schema, self.config.outbox_table
        ))
    }

    fn saw_wal(&mut self, lsn: Lsn) {
        self.wal_end = self.wal_end.max(lsn);
        self.metrics.server_wal_lsn.store(self.wal_end.0, Relaxed);
    }

    fn confirm(&mut self, client: &ReplicationClient, lsn: Lsn) {
        if self.batch.is_none() && self.careful.is_empty() {
            // Everything received up to `lsn` is in ClickHouse.
            self.metrics.pending_since_us.store(0, Relaxed);
        }
        if lsn > self.confirmed {
            self.confirmed = lsn;
            self.metrics.confirmed_lsn.store(lsn.0, Relaxed);
            client.update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
        }
    }

    /// Graceful stop: flush, make sure the server heard the final position, close the stream.
    async fn finish(
        &mut self,
        mut client: ReplicationClient,
        feedback: &Notify,
    ) -> Result<(), RelayError> {
        self.flush(&client).await?;
        let deadline = Instant::now() + self.config.status_interval() * 3 + Duration::from_secs(2);
        while client.feedback_pending_since().is_some() && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(200), feedback.notified()).await;
        }
        let _ = client.shutdown().await;
        info!(confirmed_lsn = %self.confirmed, "stopped");
        Ok(())
    }
}

/// Opens a batch; with Sentry on, its transaction continues the first event's publisher trace
/// (`sentry-trace`), so the batch shows up inside the request that published it.
fn open_batch(
    sink: &ClickHouseSink,
    max_wait: Duration,
    first_commit_lsn: Lsn,
    sentry_trace: Option<&str>,
) -> Batch {
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
        last_end_lsn: None,
        last_commit_time_us: 0,
        transactions: 0,
        trace,
        decode_span,
        trace_ids: Vec::new(),
    }
}

/// How often a session checks that the publication still covers the outbox table.
const COVERAGE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How long a coverage replay waits for the stream to pass its snapshot's WAL position.
const COVERAGE_REPLAY_WAIT: Duration = Duration::from_secs(3600);

/// A spawned task aborted when its owner is dropped (a session that ends takes its replay
/// with it; the next session starts it again).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The coverage replay's result once it is done; never, when there is none.
async fn replay_done<T>(task: &mut Option<AbortOnDrop<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => (&mut task.0).await,
        None => std::future::pending().await,
    }
}

/// Messages taken in a row without going back to the select loop (which also watches the
/// shutdown signal and the batch deadline).
const READY_BURST: usize = 256;

/// A take of fewer messages than this in the middle of a transaction makes the relay wait
/// [`LINGER`] for the rest of it.
const LINGER_BELOW: usize = 8;

/// How long the relay's thread waits for the rest of a transaction after a small take: the
/// walsender writes its messages within microseconds; the socket holds them meanwhile.
const LINGER: Duration = Duration::from_millis(1);

/// How long the relay's thread waits for more transactions after a small take while a batch is
/// open (at most a tenth of `batch_max_wait_ms`): the batch ships at its deadline anyway.
const BATCH_LINGER: Duration = Duration::from_millis(20);

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

/// A TLS failure of the replication connection, explained as the SQL connection's are.
fn replication_tls_problem(url: &str, source: &PgWireError) -> Option<String> {
    let target = pgtls::Target::parse(url).ok()?;
    match source {
        PgWireError::Server(message) if message.contains("28000") => {
            pg::server_tls_refusal(message, &target.tls)
        }
        PgWireError::Tls(text) if text.contains("SSLRequest rejected") => {
            Some(pg::no_tls_message(&target.tls))
        }
        PgWireError::Tls(text) => match pgtls::CertProblem::of_text(text) {
            Some(p) => Some(p.explain(&target.tls, &target.host(), text)),
            // Settings, or the server's refusal of the handshake; a network error in the middle
            // of a handshake stays a (retried) replication error.
            None if ["TLS config error", "received fatal alert", "invalid SNI"]
                .iter()
                .any(|s| text.contains(s)) =>
            {
                Some(format!(
                    "{text}: check sslmode, sslrootcert, sslcert and sslkey in postgres_url and \
                     the server's ssl settings"
                ))
            }
            None => None,
        },
        _ => None,
    }
}

/// The replication connection's settings: `target` is `postgres_url` narrowed to the primary the
/// session's SQL connection found ([`pg::connect_primary`]); `seen` is what that connection saw
/// of TLS.
fn replication_config(
    config: &Config,
    target: &pgtls::Target,
    start: Lsn,
    feedback: Arc<Notify>,
    seen: &pgtls::Seen,
) -> ReplicationConfig {
    let pg = &target.config;
    let host = target.host();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let tls = target.tls.replication(&host, seen);
    let start = pgwire_replication::Lsn::from_u64(start.0);
    ReplicationConfig::new(
        host,
        pg.get_user().unwrap_or("postgres"),
        password,
        pg.get_dbname().unwrap_or("postgres"),
        config.slot.clone(),
        // Quoted: START_REPLICATION reads publication_names as a list of identifiers, so an
        // unquoted `UpPub` would be folded to `uppub` (and a quote or comma would not parse).
        crate::schema::quote_pg_ident(&config.publication),
    )
    .with_port(pg.get_ports().first().copied().unwrap_or(5432))
    .with_tls(tls)
    .with_start_lsn(start)
    .with_ack_lsn(start)
    .with_binary(true)
    .with_options("-c timezone=UTC -c datestyle=ISO")
    .with_application_name("outbox-relay")
    .with_status_interval(config.status_interval())
    .with_buffer_size(REPLICATION_BUFFER_EVENTS)
    .with_feedback_observer(FeedbackObserver::new(move |_| feedback.notify_one()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let config = Config {
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
            ..Config::default()
        };
        for _ in 0..200 {
            let mut backoff = Backoff::new(&config);
            let mut previous: Option<Duration> = None;
            for n in 0..12u32 {
                let nominal = Duration::from_millis((500u64 << n).min(60_000));
                let wait = backoff.next();
                assert!(
                    wait >= nominal.mul_f64(JITTER) && wait <= nominal,
                    "wait {n}: {wait:?} outside [3/4, 1] x {nominal:?}"
                );
                if let Some(previous) = previous
                    && nominal < Duration::from_millis(60_000)
                {
                    let ratio = wait.as_secs_f64() / previous.as_secs_f64();
                    assert!(
                        (1.5..=2.67).contains(&ratio),
                        "wait {n}: {ratio}x the one before"
                    );
                }
                previous = Some(wait);
            }
            backoff.reset();
            assert!(backoff.next() <= Duration::from_millis(500));
        }
    }

    #[test]
    fn errors_say_what_the_relay_waits_for() {
        let e = RelayError::Uncovered("gone".into());
        assert_eq!(e.waiting_state(), State::WaitingForPublication);
        assert_eq!(
            RelayError::StreamEnded.waiting_state(),
            State::WaitingForPostgres
        );
    }
}
