//! The relay loop: replication stream -> decode -> batch -> ClickHouse -> confirm.
//!
//! Where an event goes, by name: [`Relay::run`] keeps a session alive ([`Relay::session`] sets
//! it up against PostgreSQL and ClickHouse); the session (`pipeline/session.rs`) reads
//! [`SourceEvent`]s from a [`Source`] ([`PgSource`]: the replication connection),
//! [`pgoutput::decode`]s each change, turns outbox inserts into
//! [`EventRow`](crate::event::EventRow)s through the [`OutboxLayout`](crate::outbox::OutboxLayout),
//! writes them into the open insert of a [`Sink`](crate::sink::Sink), and confirms to the source
//! what [`Progress`] settles once the sink accepted the batch. [`Mode`] says whether rows stream
//! or, after a failed insert, are re-sent ([`crate::sink::resend`]); [`Store`] keeps checkpoints
//! and dead letters in PostgreSQL.
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

mod driver;
#[cfg(test)]
mod loop_tests;
mod mode;
mod progress;
mod session;
mod source;
mod store;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use pgoutput::Lsn;
use pgwire_replication::PgWireError;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::metrics::{Metrics, State};
use crate::outbox::{RowError, SchemaError};
use crate::pg::{self, PgError};
use crate::reship;
use crate::sink::{ClickHouseSink, SinkError};
use crate::store::checkpoint;
use crate::store::coverage;
use crate::store::deadletter;

pub use mode::Mode;
pub use progress::{Progress, Settled};
pub use source::{PgSource, Source, SourceEvent};
pub use store::{PgStore, Store};

use session::Session;

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
            RelayError::ClickHouse(SinkError::Table { .. } | SinkError::Engine { .. }) => false,
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
        let sink = ClickHouseSink::from_config(&config, &config.slot);
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
        let result = driver::drive(self, &self.config, &self.metrics, &mut shutdown).await;
        if result.is_err() {
            self.metrics.set_state(State::StoppedOnError);
        }
        result
    }

    /// One session: finds the primary, checks the slot, the table and the publication's
    /// coverage, then streams (see [`Session`]) until shutdown or an error. `mode` carries over
    /// from one session to the next; `shipped_batches` counts this session's batches.
    async fn session(
        &self,
        mode: &mut Mode,
        shipped_batches: &mut u64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RelayError> {
        let config = &self.config;
        let primary = pg::connect_primary(config.postgres()).await?;
        let (sql, seen, target) = (primary.client, primary.seen, primary.target);
        let start = pg::preflight(&sql, &config.slot).await?;
        pg::standby_slots_trap(&sql, &config.slot, &primary.endpoint).await?;
        let sink = self
            .sink
            .clone()
            .with_source(pg::source_identity(&sql, config).await?);
        sink.check_table().await?;
        let coverage = match coverage::coverage(&sql, config).await? {
            coverage::Coverage::Covered { fingerprint } => fingerprint,
            coverage::Coverage::Uncovered { why, table } => {
                let tables: Vec<u32> = table.into_iter().collect();
                return Err(store::uncovered(&sql, config, start, &tables, why).await);
            }
        };
        let gap = checkpoint::coverage_gap(&sql, config, &coverage, start).await?;
        let mut outbox_tables = checkpoint::coverage_tables(&coverage);
        if let Some(gap) = &gap {
            outbox_tables.extend(&gap.tables);
        }
        let mut coverage_replay = None;
        match gap {
            None => checkpoint::record_baseline(&sql, config, start, &coverage).await?,
            Some(gap) => {
                checkpoint::record_pending(&sql, config, gap.from, &gap.tables).await?;
                warn!(
                    from_lsn = %gap.from,
                    tables = ?gap.tables,
                    "the publication or the outbox table changed since the last checkpoint \
                     (dropped and created again, swapped, taken out of the publication): \
                     PostgreSQL may have skipped events meanwhile; re-shipping them from the \
                     outbox table beside the stream (exactly once: ClickHouse's rows are \
                     checked first)"
                );
                let (config, sink) = (config.clone(), sink.clone());
                let (from, tables) = (gap.from, gap.tables);
                coverage_replay = Some(AbortOnDrop(tokio::spawn(async move {
                    reship::replay_tables(
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
        }
        self.metrics
            .dead_letters
            .store(deadletter::count(&sql, config).await?, Relaxed);
        let xid_reference = pg::next_xid(&sql).await?;
        let store = PgStore {
            sql,
            config,
            coverage,
            outbox_tables,
        };
        let mut session = Session::new(config, sink, store, &self.metrics, mode);
        session.coverage_replay = coverage_replay;
        session.xid_reference = xid_reference;
        // The slot first: only the relay that holds it claims the fence (on a cluster) and reads
        // what ClickHouse holds; one that lost it stops at `preflight` or here.
        let source = PgSource::connect(config, &target, start, &seen).await?;
        session.start(start).await?;
        info!(slot = %config.slot, from_lsn = %start, primary = %primary.endpoint, "streaming");
        self.metrics.replicating.store(true, Relaxed);
        self.metrics.set_state(State::Streaming);
        self.metrics.confirmed_lsn.store(start.0, Relaxed);
        let result = session.stream(source, shutdown).await;
        *shipped_batches = session.shipped_batches;
        result
    }

    /// The wait after a failure of the server `state` names: while that server does not answer
    /// a probe (every [`PROBE_INTERVAL`]), until it does: returns `true` then, so a session
    /// starts within about that long of its return and no session fails meanwhile. When it
    /// answers the first probe (the failure was not about its availability) or `state` names no
    /// server: the backoff `delay`, returning `false`.
    async fn probe(&self, state: State, delay: Duration) -> bool {
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
                    tokio::time::timeout(PROBE_TIMEOUT, pg::connect(self.config.postgres())).await,
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
            sql = tokio::time::timeout(PROBE_TIMEOUT, pg::connect(config.postgres()))
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
        && let Some(oldest) = checkpoint::oldest_unshipped(
            client,
            config,
            metrics.last_shipped_commit_us.load(Relaxed),
        )
        .await?
    {
        metrics.pending(oldest);
    }
    Ok(())
}

impl Relay {
    /// PostgreSQL before 18 cannot decode the WAL written while the publication was missing.
    /// When the publication exists again, the slot is moved past that WAL and the next session
    /// re-ships the window from the outbox ([`checkpoint::skip_unpublished_window`]); while it is
    /// missing, the relay waits.
    /// The error that stands for what was done (the window to re-ship), or for why it could
    /// not be.
    async fn skip_unpublished_window(&self, message: &str) -> RelayError {
        self.try_skip_unpublished_window(message)
            .await
            .unwrap_or_else(|e| e)
    }

    async fn try_skip_unpublished_window(&self, message: &str) -> Result<RelayError, RelayError> {
        let sql = pg::connect(self.config.postgres()).await?;
        let fingerprint = match coverage::coverage(&sql, &self.config).await? {
            coverage::Coverage::Uncovered { why, .. } => return Err(RelayError::Uncovered(why)),
            coverage::Coverage::Covered { fingerprint } => fingerprint,
        };
        let tables = checkpoint::coverage_tables(&fingerprint);
        let to = checkpoint::skip_unpublished_window(&self.config, &tables).await?;
        Ok(RelayError::Uncovered(format!(
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
    /// checkpoint from the outbox ([`checkpoint::recover_lost_slot`]).
    async fn recover_lost_slot(&self, why: &str) -> RelayError {
        warn!(reason = %why, "failover_recovery: creating the slot on the promoted server");
        let at = match checkpoint::recover_lost_slot(&self.config).await {
            Ok(at) => at,
            Err(e) => return e.into(),
        };
        RelayError::Uncovered(format!(
            "failover_recovery: slot {:?} created on the promoted server at {at}; the next \
             session re-ships, from the outbox table, the events committed since the last \
             checkpoint that ClickHouse lacks",
            self.config.slot
        ))
    }
}

impl driver::Sessions for Relay {
    async fn session(
        &self,
        mode: &mut Mode,
        shipped: &mut u64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), RelayError> {
        Relay::session(self, mode, shipped, shutdown).await
    }

    async fn recover(&self, error: RelayError) -> RelayError {
        match error {
            RelayError::Replication {
                source: PgWireError::Server(message),
                ..
            } if checkpoint::is_unpublished_window(&message) => {
                self.skip_unpublished_window(&message).await
            }
            RelayError::Postgres(PgError::SlotNotSynced(why)) if self.config.failover_recovery => {
                self.recover_lost_slot(&why).await
            }
            other => other,
        }
    }

    async fn wait_for(&self, state: State, delay: Duration) -> bool {
        self.probe(state, delay).await
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
