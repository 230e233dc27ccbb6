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
    /// With `clickhouse_cluster`: the nodes that answered, with the table's engine and
    /// replication delay there, and how many replicas the cluster declares.
    pub clickhouse_cluster: Option<crate::sink::ClusterStatus>,
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
    /// Whether PostgreSQL holds this copy as temporary (`pg_replication_slots.temporary`): a
    /// synced copy stays temporary until the standby caught up with the primary's slot, and a
    /// temporary copy is dropped at promotion.
    pub temporary: Option<bool>,
    /// Bytes of WAL between the primary's slot's confirmed position and this copy's: events the
    /// relay would receive again after a failover (the restart check skips them).
    pub behind_bytes: Option<i64>,
    /// Whether the slot would follow a failover to this host now: its copy here is synced
    /// from the primary, persistent and valid, and slot synchronization is set up. What to
    /// wait for before a planned failover.
    pub ready_for_failover: bool,
    /// Why not, as one stable word for scripts ([`FailoverState`]): `ready`, or the first of
    /// `unreachable`, `not_in_recovery`, `no_failover_slots`, `slot_not_failover`,
    /// `wal_level_below_logical`, `sync_replication_slots_off`, `hot_standby_feedback_off`,
    /// `no_primary_slot_name`, `no_dbname_in_primary_conninfo`, `missing`, `not_synced`,
    /// `invalidated`, `temporary`.
    pub failover_state: FailoverState,
    /// What keeps the slot from following a failover to this host (empty when nothing).
    pub problems: Vec<String>,
}

/// Whether a standby's copy of the slot would survive a failover to it, or the first reason it
/// would not (in the order a fix has to follow: the settings slot synchronization needs, then
/// the copy itself). Serialized as the snake_case word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverState {
    /// Synced from the primary, persistent and valid: the slot follows a failover here.
    Ready,
    /// The standby does not answer (see `error`).
    Unreachable,
    /// The host is not a standby.
    NotInRecovery,
    /// PostgreSQL before 17.
    NoFailoverSlots,
    /// The primary's slot was created without failover (`slot_failover = false`).
    SlotNotFailover,
    /// The standby's `wal_level` is below `logical`: its slot sync worker stops at once.
    WalLevelBelowLogical,
    SyncReplicationSlotsOff,
    HotStandbyFeedbackOff,
    /// No `primary_slot_name`: slot sync needs a physical slot on the primary.
    NoPrimarySlotName,
    NoDbnameInPrimaryConninfo,
    /// The slot is not on the standby (yet).
    Missing,
    /// The slot on the standby was created there, not synchronized from the primary.
    NotSynced,
    /// The copy is invalidated (`invalidation_reason`, `conflicting`).
    Invalidated,
    /// Synced, but PostgreSQL still holds the copy as temporary, and drops it at promotion:
    /// waiting for the standby to catch up with the primary's slot.
    Temporary,
}

impl FailoverState {
    /// The word `status --json` shows, for the text report: serde's own name (one mapping).
    pub fn name(self) -> String {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(word)) => word,
            _ => format!("{self:?}"),
        }
    }
}

/// A standby's copy of the slot as `pg_replication_slots` there shows it.
struct StandbyCopy {
    synced: Option<bool>,
    failover: Option<bool>,
    temporary: bool,
    confirmed_flush_lsn: Option<String>,
    /// `invalidation_reason` (17+), or `conflicting` when that is all there is.
    invalidated: Option<String>,
}

async fn standby_copy(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<StandbyCopy>, PgError> {
    let row = client
        .query_opt(
            "SELECT (to_jsonb(s) ->> 'synced')::bool, (to_jsonb(s) ->> 'failover')::bool,
                    temporary, confirmed_flush_lsn::text,
                    coalesce(to_jsonb(s) ->> 'invalidation_reason',
                             CASE WHEN (to_jsonb(s) ->> 'conflicting')::bool
                                  THEN 'conflicting' END)
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::query("standby slot query"))?;
    Ok(row.map(|r| StandbyCopy {
        synced: r.get(0),
        failover: r.get(1),
        temporary: r.get(2),
        confirmed_flush_lsn: r.get(3),
        invalidated: r.get(4),
    }))
}

async fn standby_status(
    target: &crate::pgtls::Target,
    host: String,
    slot: &str,
    primary: Option<&SlotState>,
) -> StandbyStatus {
    let mut s = StandbyStatus {
        host,
        error: None,
        in_recovery: None,
        slot_exists: None,
        synced: None,
        failover: None,
        confirmed_flush_lsn: None,
        temporary: None,
        behind_bytes: None,
        ready_for_failover: false,
        failover_state: FailoverState::Unreachable,
        problems: Vec::new(),
    };
    let looked = async {
        let client = pg::connect_host(target).await?;
        let settings = standby_settings(&client).await?;
        let copy = standby_copy(&client, slot).await?;
        Ok::<_, PgError>((settings, copy))
    };
    let (settings, copy) = match looked.await {
        Ok(found) => found,
        Err(e) => {
            s.error = Some(crate::error_chain(&e));
            return s;
        }
    };
    s.in_recovery = Some(settings.in_recovery);
    // Every reason, in the order a fix has to follow; the state is the first.
    let mut problems = setting_problems(&settings, primary);
    s.slot_exists = Some(copy.is_some());
    if let Some(copy) = &copy {
        s.synced = copy.synced;
        s.failover = copy.failover;
        s.temporary = Some(copy.temporary);
        s.confirmed_flush_lsn = copy.confirmed_flush_lsn.clone();
        let confirmed: Option<pgoutput::Lsn> = copy
            .confirmed_flush_lsn
            .as_deref()
            .and_then(|c| c.parse().ok());
        if let (Some(p), Some(c)) = (primary.and_then(SlotState::confirmed_flush), confirmed) {
            s.behind_bytes = Some(p.0 as i64 - c.0 as i64);
        }
    }
    problems.extend(copy_problem(copy.as_ref()));
    s.failover_state = problems.first().map_or(FailoverState::Ready, |p| p.0);
    s.ready_for_failover = s.failover_state == FailoverState::Ready;
    s.problems = problems.into_iter().map(|p| p.1).collect();
    s
}

/// What a standby's settings say about slot synchronization.
struct StandbySettings {
    in_recovery: bool,
    version: i32,
    sync_replication_slots: Option<String>,
    hot_standby_feedback: Option<String>,
    primary_conninfo: Option<String>,
    wal_level: String,
    primary_slot_name: Option<String>,
}

async fn standby_settings(client: &tokio_postgres::Client) -> Result<StandbySettings, PgError> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int,
                    current_setting('sync_replication_slots', true),
                    current_setting('hot_standby_feedback', true),
                    current_setting('primary_conninfo', true),
                    current_setting('wal_level'),
                    current_setting('primary_slot_name', true)",
            &[],
        )
        .await
        .map_err(PgError::query("standby settings"))?;
    Ok(StandbySettings {
        in_recovery: row.get(0),
        version: row.get(1),
        sync_replication_slots: row.get(2),
        hot_standby_feedback: row.get(3),
        primary_conninfo: row.get(4),
        wal_level: row.get(5),
        primary_slot_name: row.get(6),
    })
}

/// The standby's settings that keep the slot from following a failover, in the order a fix has
/// to follow.
fn setting_problems(
    s: &StandbySettings,
    primary: Option<&SlotState>,
) -> Vec<(FailoverState, String)> {
    let mut problems = Vec::new();
    if !s.in_recovery {
        problems.push((
            FailoverState::NotInRecovery,
            "not in recovery: a second primary (split brain?) or the old primary after a failover"
                .into(),
        ));
    }
    if s.version < 170_000 {
        problems.push((
            FailoverState::NoFailoverSlots,
            "PostgreSQL before 17 has no failover slots: the slot will not follow".into(),
        ));
        return problems;
    }
    let on = |v: &Option<String>| v.as_deref() == Some("on");
    let checks = [
        (
            primary.is_some_and(|p| p.failover == Some(false)),
            FailoverState::SlotNotFailover,
            "the primary's slot is not a failover slot (created with slot_failover = false, or \
             before 17): it is never synchronized (`outbox-relay setup` says how to change it)"
                .to_string(),
        ),
        (
            s.wal_level != "logical",
            FailoverState::WalLevelBelowLogical,
            format!(
                "wal_level is {} here: slot synchronization needs wal_level = logical on the \
                 standby too (ALTER SYSTEM SET wal_level = logical, then restart it)",
                s.wal_level
            ),
        ),
        (
            !on(&s.sync_replication_slots),
            FailoverState::SyncReplicationSlotsOff,
            "sync_replication_slots is not on: the slot is not synchronized here".into(),
        ),
        (
            !on(&s.hot_standby_feedback),
            FailoverState::HotStandbyFeedbackOff,
            "hot_standby_feedback is not on: slot sync needs it".into(),
        ),
        (
            s.primary_slot_name
                .as_deref()
                .unwrap_or_default()
                .is_empty(),
            FailoverState::NoPrimarySlotName,
            "primary_slot_name is not set: slot sync needs the standby to stream through a \
             physical slot on the primary (create one, set primary_slot_name, reload; list it \
             in the primary's synchronized_standby_slots)"
                .into(),
        ),
        (
            s.primary_conninfo
                .as_deref()
                .is_some_and(|c| !c.contains("dbname=")),
            FailoverState::NoDbnameInPrimaryConninfo,
            "primary_conninfo has no dbname=...: slot sync needs it (add it, then reload)".into(),
        ),
    ];
    problems.extend(
        checks
            .into_iter()
            .filter(|(bad, ..)| *bad)
            .map(|(_, state, text)| (state, text)),
    );
    problems
}

/// What keeps the standby's copy of the slot (or its absence) from following a failover.
fn copy_problem(copy: Option<&StandbyCopy>) -> Option<(FailoverState, String)> {
    let Some(copy) = copy else {
        return Some((
            FailoverState::Missing,
            "the slot is not here: after a failover to this host it would be missing".into(),
        ));
    };
    if copy.synced != Some(true) {
        return Some((
            FailoverState::NotSynced,
            "the slot here was created on this server, not synchronized from the primary".into(),
        ));
    }
    if let Some(reason) = &copy.invalidated {
        return Some((
            FailoverState::Invalidated,
            format!(
                "the slot's copy here is invalidated ({reason}): it cannot be used after a \
                 failover; the slot sync worker creates it again while the primary's slot is \
                 valid"
            ),
        ));
    }
    copy.temporary.then(|| {
        (
            FailoverState::Temporary,
            "the slot's copy here is synced but still temporary, and PostgreSQL drops a \
             temporary copy at promotion: a failover now would lose the slot. It turns \
             persistent once the primary's slot has moved past what this standby reserved for \
             it (the relay must be running and confirming batches; the first time can take \
             minutes)"
                .into(),
        )
    })
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
    let primary = pg::connect_primary(config.postgres()).await?;
    let client = primary.client;
    let state = pg::slot_state(&client, &config.slot).await?;
    let all = config.postgres();
    let mut standbys = Vec::new();
    if all.is_multi_host() {
        for i in 0..all.host_count() {
            let host = all.endpoint(i);
            if host != primary.endpoint {
                standbys
                    .push(standby_status(&all.only(i), host, &config.slot, state.as_ref()).await);
            }
        }
    }
    let sink = ClickHouseSink::from_config(config, &config.slot);
    let dead_letters = crate::store::deadletter::count(&client, config).await.ok();
    let checkpoint = crate::store::checkpoint::last_checkpoint(&client, config)
        .await
        .ok()
        .flatten();
    // Behind a load balancer a connection may land on a node that is down: a few
    // connections, each to the next node, before ClickHouse counts as unreachable.
    let clickhouse_error = three_tries(|| sink.ping())
        .await
        .err()
        .map(|e| e.to_string());
    let clickhouse_cluster = match clickhouse_error {
        None => three_tries(|| sink.cluster_status()).await.ok().flatten(),
        Some(_) => None,
    };
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
        clickhouse_cluster,
        dead_letters,
        last_checkpoint_lsn: checkpoint.as_ref().map(|c| c.0.clone()),
        last_checkpoint_at: checkpoint.map(|c| c.1),
        primary: primary.endpoint,
        standbys,
        verify,
    })
}

/// `request` tried up to three times (each a new connection), the last error kept.
async fn three_tries<T, E, F, Fut>(mut request: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut result = request().await;
    for _ in 0..2 {
        if result.is_ok() {
            break;
        }
        result = request().await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::FailoverState::*;

    /// The word the text report shows is the one `status --json` carries (scripts read either).
    #[test]
    fn failover_state_words_are_the_json_ones() {
        assert_eq!(Temporary.name(), "temporary");
        assert_eq!(
            NoDbnameInPrimaryConninfo.name(),
            "no_dbname_in_primary_conninfo"
        );
    }
}

#[cfg(test)]
mod standby_tests {
    use super::*;

    fn settings() -> StandbySettings {
        StandbySettings {
            in_recovery: true,
            version: 180_000,
            sync_replication_slots: Some("on".into()),
            hot_standby_feedback: Some("on".into()),
            primary_conninfo: Some("host=p dbname=app".into()),
            wal_level: "logical".into(),
            primary_slot_name: Some("standby1".into()),
        }
    }

    #[test]
    fn the_first_problem_in_fix_order_names_the_state() {
        assert!(setting_problems(&settings(), None).is_empty());
        let replica = StandbySettings {
            wal_level: "replica".into(),
            hot_standby_feedback: Some("off".into()),
            ..settings()
        };
        let found: Vec<FailoverState> = setting_problems(&replica, None)
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(
            found,
            [
                FailoverState::WalLevelBelowLogical,
                FailoverState::HotStandbyFeedbackOff
            ]
        );
        let old = StandbySettings {
            version: 160_000,
            wal_level: "replica".into(),
            ..settings()
        };
        let found: Vec<FailoverState> = setting_problems(&old, None)
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(found, [FailoverState::NoFailoverSlots]);
    }

    #[test]
    fn a_synced_copy_is_ready_only_once_persistent() {
        let copy = |synced, temporary| StandbyCopy {
            synced: Some(synced),
            failover: Some(true),
            temporary,
            confirmed_flush_lsn: None,
            invalidated: None,
        };
        assert_eq!(copy_problem(Some(&copy(true, false))), None);
        let state = |c: Option<&StandbyCopy>| copy_problem(c).map(|p| p.0);
        assert_eq!(
            state(Some(&copy(true, true))),
            Some(FailoverState::Temporary)
        );
        assert_eq!(
            state(Some(&copy(false, false))),
            Some(FailoverState::NotSynced)
        );
        assert_eq!(state(None), Some(FailoverState::Missing));
    }
}
