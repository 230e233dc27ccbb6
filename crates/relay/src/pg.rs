//! Plain (non-replication) PostgreSQL connections: setup, the slot pre-flight, status, purge.

use pgoutput::Lsn;
use serde::Serialize;
use tokio_postgres::{Client, NoTls};

/// Errors talking SQL to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL {what} failed: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The slot or server is in a state an operator must fix; retrying does not help.
    #[error("{0}")]
    NotReady(String),
    /// The slot is held by another connection; retrying does help.
    #[error("{0}")]
    SlotBusy(String),
}

impl PgError {
    pub(crate) fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
        move |source| PgError::Query { what, source }
    }
}

/// Host, port and database of a connection string, for messages (never the password).
pub fn describe(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let host = c
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = c.get_ports().first().copied().unwrap_or(5432);
            format!("{host}:{port}/{}", c.get_dbname().unwrap_or("?"))
        }
        Err(_) => "<unparsable postgres_url>".into(),
    }
}

/// Opens a SQL connection; its driver runs on a spawned task.
pub async fn connect(url: &str) -> Result<Client, PgError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| PgError::Connect {
            target: describe(url),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// The slot as `pg_replication_slots` shows it, with the server's current WAL position.
#[derive(Debug, Clone, Serialize)]
pub struct SlotState {
    /// Not serialised: `status` shows the slot name once, beside this state.
    #[serde(skip_serializing)]
    pub slot: String,
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub current_wal_lsn: String,
    pub lag_bytes: Option<i64>,
    pub retained_wal_bytes: Option<i64>,
    pub wal_status: Option<String>,
}

impl SlotState {
    pub fn confirmed_flush(&self) -> Option<Lsn> {
        self.confirmed_flush_lsn.as_deref()?.parse().ok()
    }
}

/// Reads the slot; `None` when it does not exist.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, PgError> {
    let row = client
        .query_opt(
            "SELECT slot_name::text, plugin::text, slot_type, database::text, active, active_pid,
                    confirmed_flush_lsn::text, restart_lsn::text, pg_current_wal_lsn()::text,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                    wal_status
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::query("slot query"))?;
    Ok(row.map(|r| SlotState {
        slot: r.get(0),
        plugin: r.get(1),
        slot_type: r.get(2),
        database: r.get(3),
        active: r.get(4),
        active_pid: r.get(5),
        confirmed_flush_lsn: r.get(6),
        restart_lsn: r.get(7),
        current_wal_lsn: r.get(8),
        lag_bytes: r.get(9),
        retained_wal_bytes: r.get(10),
        wal_status: r.get(11),
    }))
}

/// Checks that the slot exists, decodes with pgoutput, is not lost and is free; returns the
/// position streaming resumes from.
pub async fn preflight(client: &Client, slot: &str) -> Result<Lsn, PgError> {
    let state = slot_state(client, slot).await?.ok_or_else(|| {
        PgError::NotReady(format!(
            "replication slot {slot:?} does not exist: run `outbox-relay setup` to create it \
             (if it existed before, it was dropped and events committed since are only in the \
             outbox table: see docs/operations.md, \"Lost slot\")"
        ))
    })?;
    if state.plugin.as_deref() != Some("pgoutput") {
        return Err(PgError::NotReady(format!(
            "replication slot {slot:?} uses plugin {:?}, not pgoutput: drop it or set RELAY_SLOT \
             to another name and run `outbox-relay setup`",
            state.plugin
        )));
    }
    if state.wal_status.as_deref() == Some("lost") || state.restart_lsn.is_none() {
        return Err(PgError::NotReady(format!(
            "replication slot {slot:?} is invalidated (wal_status lost): PostgreSQL removed WAL it \
             still needed (max_slot_wal_keep_size). Events in that WAL were not shipped; follow \
             docs/operations.md, \"Lost slot\""
        )));
    }
    if state.active {
        return Err(PgError::SlotBusy(format!(
            "replication slot {slot:?} is in use by PostgreSQL backend pid {}: another relay (or \
             a previous connection still closing) holds it; will retry",
            state.active_pid.unwrap_or_default()
        )));
    }
    state.confirmed_flush().ok_or_else(|| {
        PgError::NotReady(format!(
            "replication slot {slot:?} has no confirmed_flush_lsn"
        ))
    })
}
