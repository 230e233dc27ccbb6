//! `outbox-relay status`: the slot as PostgreSQL sees it, and whether ClickHouse answers.

use serde::Serialize;

use crate::config::Config;
use crate::pg::{self, PgError, SlotState};
use crate::sink::ClickHouseSink;
use crate::store::coverage;

/// Everything `status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub slot: String,
    pub exists: bool,
    #[serde(flatten)]
    pub state: Option<SlotState>,
    /// True when the slot has confirmed everything PostgreSQL has written, the publication
    /// covers the outbox and no uncovered window waits to be re-shipped.
    pub caught_up: bool,
    /// Why PostgreSQL is skipping the outbox's inserts, when it is (the publication missing, not
    /// publishing inserts, or not containing the outbox table).
    pub publication_problem: Option<String>,
    /// A window the publication did not cover, recorded and not yet re-shipped: the WAL
    /// position it starts at (the relay re-ships it by itself while it runs).
    pub pending_window_from: Option<String>,
    /// Whether the coverage watch (an event trigger logging coverage changes) is installed
    /// (None when it could not be read).
    pub coverage_watch: Option<bool>,
    pub clickhouse_reachable: bool,
    pub clickhouse_error: Option<String>,
    /// Events ClickHouse refused, waiting in the dead-letter table (None before `setup`).
    pub dead_letters: Option<u64>,
    /// The newest checkpoint's confirmed LSN and time.
    pub last_checkpoint_lsn: Option<String>,
    pub last_checkpoint_at: Option<String>,
    /// `host:port` of the primary the relay streams from (the first host of `postgres_url` that
    /// is not in recovery).
    pub primary: String,
    /// The other hosts of a multi-host `postgres_url`: whether each could take over.
    pub standbys: Vec<StandbyStatus>,
    /// The running relay's background verifier (read from its /metrics at metrics_addr; None
    /// when no relay answers there or the verifier has not finished a pass).
    pub verify: Option<VerifyStatus>,
}

/// A standby (another host of `postgres_url`) as seen from the relay: does it hold the slot,
/// synced, and how far behind the primary's.
#[derive(Debug, Clone, Serialize)]
pub struct StandbyStatus {
    pub host: String,
    /// Why it could not be read (down, refused), if so.
    pub error: Option<String>,
    pub in_recovery: Option<bool>,
    pub slot_exists: Option<bool>,
    pub synced: Option<bool>,
    pub failover: Option<bool>,
    pub confirmed_flush_lsn: Option<String>,
    /// Bytes of WAL between the primary's slot's confirmed position and this copy's: events the
    /// relay would receive again after a failover (the restart check skips them).
    pub behind_bytes: Option<i64>,
    /// What keeps the slot from following a failover to this host (empty when nothing).
    pub problems: Vec<String>,
}

async fn standby_status(
    target: &crate::pgtls::Target,
    host: String,
    slot: &str,
    primary_confirmed: Option<pgoutput::Lsn>,
) -> StandbyStatus {
    let mut s = StandbyStatus {
        host,
        error: None,
        in_recovery: None,
        slot_exists: None,
        synced: None,
        failover: None,
        confirmed_flush_lsn: None,
        behind_bytes: None,
        problems: Vec::new(),
    };
    let client = match pg::connect_host(target).await {
        Ok(c) => c,
        Err(e) => {
            s.error = Some(crate::error_chain(&e));
            return s;
        }
    };
    let row = match client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int,
                    current_setting('sync_replication_slots', true),
                    current_setting('hot_standby_feedback', true),
                    current_setting('primary_conninfo', true)",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            s.error = Some(crate::error_chain(&e));
            return s;
        }
    };
    let (in_recovery, version): (bool, i32) = (row.get(0), row.get(1));
    let (sync, feedback, conninfo): (Option<String>, Option<String>, Option<String>) =
        (row.get(2), row.get(3), row.get(4));
    s.in_recovery = Some(in_recovery);
    if !in_recovery {
        s.problems.push(
            "not in recovery: a second primary (split brain?) or the old primary after a failover"
                .into(),
        );
    }
    if version < 170_000 {
        s.problems
            .push("PostgreSQL before 17 has no failover slots: the slot will not follow".into());
    }
    if version >= 170_000 && sync.as_deref() != Some("on") {
        s.problems
            .push("sync_replication_slots is not on: the slot is not synchronized here".into());
    }
    if version >= 170_000 && feedback.as_deref() != Some("on") {
        s.problems
            .push("hot_standby_feedback is not on: slot sync needs it".into());
    }
    if let Some(conninfo) = &conninfo
        && version >= 170_000
        && !conninfo.contains("dbname=")
    {
        s.problems.push(
            "primary_conninfo has no dbname=...: slot sync needs it (add it, then reload)".into(),
        );
    }
    match pg::slot_state(&client, slot).await {
        Ok(Some(state)) => {
            s.slot_exists = Some(true);
            s.synced = state.synced;
            s.failover = state.failover;
            s.confirmed_flush_lsn = state.confirmed_flush_lsn.clone();
            if let (Some(p), Some(c)) = (primary_confirmed, state.confirmed_flush()) {
                s.behind_bytes = Some(p.0 as i64 - c.0 as i64);
            }
            if state.synced == Some(false) {
                s.problems.push(
                    "the slot here was created on this server, not synchronized from the primary"
                        .into(),
                );
            }
        }
        Ok(None) => {
            s.slot_exists = Some(false);
            s.problems.push(
                "the slot is not here: after a failover to this host it would be missing".into(),
            );
        }
        Err(e) => s.error = Some(crate::error_chain(&e)),
    }
    s
}

/// `outbox-relay status` exits with this when the slot is missing or lost.
pub const EXIT_SLOT_PROBLEM: u8 = 3;
/// ... and with this when ClickHouse does not answer (and the slot is fine).
pub const EXIT_CLICKHOUSE_UNREACHABLE: u8 = 4;
/// ... and with this when the publication does not cover the outbox (the slot is fine).
pub const EXIT_PUBLICATION_PROBLEM: u8 = 6;

impl Status {
    /// 0 when the slot exists and is usable and ClickHouse answers; otherwise
    /// [`EXIT_SLOT_PROBLEM`] or [`EXIT_CLICKHOUSE_UNREACHABLE`] (the slot's problem first: it is
    /// the one that can lose events).
    pub fn exit_code(&self) -> u8 {
        let lost = self
            .state
            .as_ref()
            .is_some_and(|s| s.wal_status.as_deref() == Some("lost") || s.restart_lsn.is_none());
        if !self.exists || lost {
            EXIT_SLOT_PROBLEM
        } else if self.publication_problem.is_some() {
            EXIT_PUBLICATION_PROBLEM
        } else if !self.clickhouse_reachable {
            EXIT_CLICKHOUSE_UNREACHABLE
        } else {
            0
        }
    }
}

/// What the background verifier last found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyStatus {
    /// Up to where every event is proven in ClickHouse exactly once (RFC 3339).
    pub verified_through: String,
    pub missing_events: u64,
    pub extra_events: u64,
}

/// The verifier's gauges from a running relay's `/metrics`.
async fn verify_status(config: &Config) -> Option<VerifyStatus> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = config.metrics_addr()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let body = tokio::time::timeout(std::time::Duration::from_secs(3), fetch)
        .await
        .ok()??;
    let value = |name: &str| -> Option<f64> {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
            .trim()
            .parse()
            .ok()
    };
    let through = value("outbox_relay_verified_through_seconds")?;
    if through <= 0.0 {
        return None;
    }
    Some(VerifyStatus {
        verified_through: crate::ops::verify::format_us((through * 1e6) as i64),
        missing_events: value("outbox_relay_missing_events")? as u64,
        extra_events: value("outbox_relay_extra_events")? as u64,
    })
}

pub async fn status(config: &Config) -> Result<Status, PgError> {
    let primary = pg::connect_primary(&config.postgres_url).await?;
    let client = primary.client;
    let state = pg::slot_state(&client, &config.slot).await?;
    let all = crate::pgtls::Target::parse(&config.postgres_url)
        .map_err(|e| PgError::NotReady(format!("postgres_url: {e}")))?;
    let mut standbys = Vec::new();
    if all.is_multi_host() {
        let confirmed = state.as_ref().and_then(|s| s.confirmed_flush());
        for i in 0..all.host_count() {
            let host = all.endpoint(i);
            if host != primary.endpoint {
                standbys.push(standby_status(&all.only(i), host, &config.slot, confirmed).await);
            }
        }
    }
    let sink = ClickHouseSink::from_config(config, &config.slot)
        .map_err(|e| PgError::NotReady(e.to_string()))?;
    let dead_letters = crate::store::deadletter::count(&client, config).await.ok();
    let checkpoint = crate::store::checkpoint::last_checkpoint(&client, config)
        .await
        .ok()
        .flatten();
    let clickhouse_error = sink.ping().await.err().map(|e| e.to_string());
    let publication_problem = match coverage::coverage(&client, config).await? {
        coverage::Coverage::Covered { .. } => None,
        coverage::Coverage::Uncovered { why, .. } => Some(why),
    };
    let pending_window_from = crate::store::checkpoint::pending_window(&client, config)
        .await
        .ok()
        .flatten();
    let coverage_watch = crate::store::coverage::coverage_watch_installed(&client, config)
        .await
        .ok();
    let verify = verify_status(config).await;
    Ok(Status {
        slot: config.slot.clone(),
        exists: state.is_some(),
        caught_up: state
            .as_ref()
            .and_then(|s| s.lag_bytes)
            .is_some_and(|lag| lag <= 0)
            && publication_problem.is_none()
            && pending_window_from.is_none(),
        publication_problem,
        pending_window_from,
        coverage_watch,
        state,
        clickhouse_reachable: clickhouse_error.is_none(),
        clickhouse_error,
        dead_letters,
        last_checkpoint_lsn: checkpoint.as_ref().map(|c| c.0.clone()),
        last_checkpoint_at: checkpoint.map(|c| c.1),
        primary: primary.endpoint,
        standbys,
        verify,
    })
}
