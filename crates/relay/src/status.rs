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
    /// True when the slot has confirmed everything PostgreSQL has written.
    pub caught_up: bool,
    pub clickhouse_reachable: bool,
    pub clickhouse_error: Option<String>,
    /// Events ClickHouse refused, waiting in the dead-letter table (None before `setup`).
    pub dead_letters: Option<u64>,
    /// The newest checkpoint's confirmed LSN and time.
    pub last_checkpoint_lsn: Option<String>,
    pub last_checkpoint_at: Option<String>,
    /// The running relay's background verifier (read from its /metrics at metrics_addr; None
    /// when no relay answers there or the verifier has not finished a pass).
    pub verify: Option<VerifyStatus>,
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
        verified_through: crate::verify::format_us((through * 1e6) as i64),
        missing_events: value("outbox_relay_missing_events")? as u64,
        extra_events: value("outbox_relay_extra_events")? as u64,
    })
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
    let verify = verify_status(config).await;
    Ok(Status {
        slot: config.slot.clone(),
        exists: state.is_some(),
        caught_up: state
            .as_ref()
            .and_then(|s| s.lag_bytes)
            .is_some_and(|lag| lag <= 0),
        state,
        clickhouse_reachable: clickhouse_error.is_none(),
        clickhouse_error,
        dead_letters,
        last_checkpoint_lsn: checkpoint.as_ref().map(|c| c.0.clone()),
        last_checkpoint_at: checkpoint.map(|c| c.1),
        verify,
    })
}
