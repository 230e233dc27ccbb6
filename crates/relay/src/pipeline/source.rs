//! Where the relay reads the outbox's WAL: the boundary between the relay loop and PostgreSQL's
//! replication protocol. [`PgSource`] is the replication connection (over `pgwire-replication`,
//! whose LSNs and timestamps are converted here, at the edge); the loop's tests feed a
//! [`Source`] of their own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgoutput::Lsn;
use pgwire_replication::{
    FeedbackObserver, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use tokio::sync::Notify;
use tokio_postgres::config::ChannelBinding;

use super::RelayError;
use crate::config::Config;
use crate::pg::{self, PgError};
use crate::pgtls;

/// Messages the replication connection reads ahead of the pipeline. The relay's memory is about
/// this times the largest message: 1,024 keeps a 10 KB-per-event stream at ~10 MB (the
/// library's default of 8,192 held 80 MB of it) and is deep enough to keep the walsender busy.
const REPLICATION_BUFFER_EVENTS: usize = 1_024;

/// One message of the replication stream, as the relay loop reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// A transaction begins; it commits at `commit_lsn`, at `commit_time_us` (Unix µs); `xid`
    /// is its (32-bit) transaction id.
    Begin {
        commit_lsn: Lsn,
        commit_time_us: i64,
        xid: u32,
    },
    /// A pgoutput message at WAL position `lsn` (see [`pgoutput::decode`]).
    Change { lsn: Lsn, data: Bytes },
    /// The transaction in hand committed; its commit record ends at `end`.
    Commit { end: Lsn },
    /// The server has sent everything up to `wal_end`.
    KeepAlive { wal_end: Lsn },
    /// Anything else (logical decoding messages, the end of a bounded stream).
    Other,
}

/// A replication stream: events in WAL order, and the position the relay confirms.
pub trait Source: Send {
    /// The next event; `None` when the stream ended.
    fn recv(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<SourceEvent>, RelayError>> + Send;

    /// Tells the server that everything up to `lsn` is safe: the slot may forget it.
    fn confirm(&self, lsn: Lsn);

    /// Graceful stop: makes sure the server heard the last confirmed position, closes.
    fn close(self) -> impl std::future::Future<Output = ()> + Send;
}

/// The replication connection to PostgreSQL.
pub struct PgSource {
    client: ReplicationClient,
    /// Told when a standby status update went out.
    feedback: Arc<Notify>,
    /// `postgres_url`, for explaining errors.
    all: Arc<pgtls::Target>,
    status_interval: Duration,
}

impl PgSource {
    /// Opens the replication stream of `config`'s slot from `start`; `target` is `postgres_url`
    /// narrowed to the primary the session's SQL connection found ([`pg::connect_primary`]),
    /// `seen` what that connection saw of TLS.
    pub async fn connect(
        config: &Config,
        target: &pgtls::Target,
        start: Lsn,
        seen: &pgtls::Seen,
    ) -> Result<PgSource, RelayError> {
        let feedback = Arc::new(Notify::new());
        let settings = replication_config(config, target, start, feedback.clone(), seen);
        let client = ReplicationClient::connect(settings)
            .await
            .map_err(|source| replication_error(config.postgres(), source))?;
        Ok(PgSource {
            client,
            feedback,
            all: config.postgres().clone(),
            status_interval: config.status_interval(),
        })
    }
}

impl Source for PgSource {
    async fn recv(&mut self) -> Result<Option<SourceEvent>, RelayError> {
        let event = self
            .client
            .recv()
            .await
            .map_err(|source| replication_error(&self.all, source))?;
        let lsn = |l: pgwire_replication::Lsn| Lsn(l.as_u64());
        Ok(event.map(|event| match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => SourceEvent::Begin {
                commit_lsn: lsn(final_lsn),
                commit_time_us: pgoutput::pg_to_unix_micros(commit_time_micros),
                xid,
            },
            ReplicationEvent::XLogData {
                data, wal_start, ..
            } => SourceEvent::Change {
                lsn: lsn(wal_start),
                data,
            },
            ReplicationEvent::Commit { end_lsn, .. } => SourceEvent::Commit { end: lsn(end_lsn) },
            ReplicationEvent::KeepAlive { wal_end, .. } => SourceEvent::KeepAlive {
                wal_end: lsn(wal_end),
            },
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {
                SourceEvent::Other
            }
        }))
    }

    fn confirm(&self, lsn: Lsn) {
        self.client
            .update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
    }

    async fn close(mut self) {
        let deadline = Instant::now() + self.status_interval * 3 + Duration::from_secs(2);
        while self.client.feedback_pending_since().is_some() && Instant::now() < deadline {
            let _ =
                tokio::time::timeout(Duration::from_millis(200), self.feedback.notified()).await;
        }
        let _ = self.client.shutdown().await;
    }
}

/// A replication error, explained as the SQL connection's are when it is about TLS; `all` is
/// `postgres_url`.
pub(super) fn replication_error(all: &pgtls::Target, source: PgWireError) -> RelayError {
    let target = pg::describe(all);
    match pgtls::problems::replication_problem(all, &source) {
        Some(problem) => RelayError::Postgres(PgError::Tls { target, problem }),
        None => RelayError::Replication { target, source },
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
        crate::pg::quote_pg_ident(&config.publication),
    )
    .with_port(pg.get_ports().first().copied().unwrap_or(5432))
    .with_tls(tls)
    .with_channel_binding(match pg.get_channel_binding() {
        ChannelBinding::Disable => pgwire_replication::ChannelBinding::Disable,
        ChannelBinding::Require => pgwire_replication::ChannelBinding::Require,
        _ => pgwire_replication::ChannelBinding::Prefer,
    })
    .with_start_lsn(start)
    .with_ack_lsn(start)
    .with_binary(true)
    .with_options("-c timezone=UTC -c datestyle=ISO")
    .with_application_name("outbox-relay")
    .with_status_interval(config.status_interval())
    .with_buffer_size(REPLICATION_BUFFER_EVENTS)
    .with_feedback_observer(FeedbackObserver::new(move |_| feedback.notify_one()))
}
