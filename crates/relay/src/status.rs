//! `outbox-relay status`: the slot as PostgreSQL sees it, and whether ClickHouse answers.

use serde::Serialize;

use crate::config::Config;
use crate::pg::{self, PgError, SlotState};
use crate::sink::ClickHouseSink;

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
    pub clickhouse_reachable: bool,
    pub clickhouse_error: Option<String>,
    /// Events ClickHouse refused, waiting in the dead-letter table (None before `setup`).
    pub dead_letters: Option<u64>,
    /// The newest checkpoint's confirmed LSN and time.
    pub last_checkpoint_lsn: Option<String>,
    pub last_checkpoint_at: Option<String>,
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

pub async fn status(config: &Config) -> Result<Status, PgError> {
    let client = pg::connect(&config.postgres_url).await?;
    let state = pg::slot_state(&client, &config.slot).await?;
    let sink = ClickHouseSink::from_config(config, &config.slot)
        .map_err(|e| PgError::NotReady(e.to_string()))?;
    let dead_letters = crate::deadletter::count(&client, config).await.ok();
    let checkpoint = crate::replay::last_checkpoint(&client, config)
        .await
        .ok()
        .flatten();
    let clickhouse_error = sink.ping().await.err().map(|e| e.to_string());
    let publication_problem = match pg::coverage(&client, config).await? {
        pg::Coverage::Covered { .. } => None,
        pg::Coverage::Uncovered(why) => Some(why),
    };
    let pending_window_from = crate::replay::pending_window(&client, config)
        .await
        .ok()
        .flatten();
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
        state,
        clickhouse_reachable: clickhouse_error.is_none(),
        clickhouse_error,
        dead_letters,
        last_checkpoint_lsn: checkpoint.as_ref().map(|c| c.0.clone()),
        last_checkpoint_at: checkpoint.map(|c| c.1),
    })
}
