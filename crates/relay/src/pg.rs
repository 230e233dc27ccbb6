//! Plain (non-replication) PostgreSQL connections: setup, the slot pre-flight, status, purge.

use pgoutput::Lsn;
use serde::Serialize;
use std::sync::{Arc, Mutex};

use tokio_postgres::Client;
use tokio_postgres::config::SslMode as PqSslMode;

use crate::pgtls::{self, Seen, SslMode, Target};

mod guard;
pub use guard::{GuardHandle, Guarded, LOCK_TIMEOUT, Waiter};

/// Errors talking SQL to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL {what} failed: {}", server_says(source))]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// TLS to the server failed in a way an operator must fix (certificate, sslmode, server
    /// settings); retrying does not help.
    #[error("TLS to PostgreSQL at {target}: {problem}")]
    Tls { target: String, problem: String },
    /// The slot or server is in a state an operator must fix; retrying does not help.
    #[error("{0}")]
    NotReady(String),
    /// The slot is held by another connection; retrying does help.
    #[error("{0}")]
    SlotBusy(String),
    /// None of the hosts of a multi-host `postgres_url` is a primary that answers (a failover
    /// in progress); retrying does help.
    #[error("{0}")]
    NoPrimary(String),
    /// The server would hold logical decoding back until an operator fixes a setting (a
    /// failover trap); the relay says so and retries instead of hanging silently.
    #[error("{0}")]
    Blocked(String),
    /// Work on the application's tables gave way to a session that waited on its locks (a
    /// migration, see [`Guarded`]); trying again later does help.
    #[error(
        "gave way to {0}, which waited on a lock the relay held on the outbox: the relay never \
         keeps the application or a migration waiting; it tries again later"
    )]
    Yielded(Waiter),
    /// The slot is missing on a server promoted from a standby: it was not synchronized before
    /// the failover. Cured by `failover_recovery` (or an operator's `setup --recreate-slot` and
    /// `replay`).
    #[error("{0}")]
    SlotNotSynced(String),
}

/// The server's own words for an error it sent (message, SQLSTATE, detail, hint), which
/// tokio-postgres shows only as "db error"; a missing grant then reads "permission denied for
/// table ... (SQLSTATE 42501)".
fn server_says(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            if db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE {
                text.push_str(
                    "; the relay's role lacks a grant: docs/operations.md, \"Least privilege\", \
                     lists what each command needs",
                );
            }
            text
        }
        None => e.to_string(),
    }
}

impl PgError {
    pub(crate) fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
        move |source| PgError::Query { what, source }
    }
}

/// Host, port and database of `target`, for messages (never the password).
pub fn describe(target: &Target) -> String {
    describe_config(&target.config)
}

fn describe_config(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = (0..config.get_hosts().len().max(1))
        .map(|i| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{}:{port}", pgtls::nth_host(config, i))
        })
        .collect();
    format!("{}/{}", hosts.join(","), config.get_dbname().unwrap_or("?"))
}

/// Opens a SQL connection to the primary of `target` (`postgres_url`, parsed when the
/// configuration was loaded: [`crate::Config::postgres`]); its driver runs on a spawned task.
pub async fn connect(target: &Target) -> Result<Client, PgError> {
    connect_primary(target).await.map(|p| p.client)
}

/// A SQL connection to the current primary, what its TLS handshake saw, and `postgres_url`
/// narrowed to that host (for the replication connection, which must go to the same server).
pub struct Primary {
    pub client: Client,
    pub seen: Seen,
    pub target: Target,
    /// `host:port` of the primary.
    pub endpoint: String,
}

/// Opens a SQL connection to the primary. With one host, to that host. With several (a primary
/// and its standbys: `postgres://h1:5432,h2:5432/db`), to the first, in order, that accepts the
/// connection and is not in recovery (`pg_is_in_recovery()`), so that after a failover the
/// relay follows the promoted standby. `target_session_attrs` is not needed (the check is
/// always made).
pub async fn connect_primary(target: &Target) -> Result<Primary, PgError> {
    if !target.is_multi_host() {
        let (client, seen) = connect_target(target).await?;
        let endpoint = target.endpoint(0);
        return Ok(Primary {
            client,
            seen,
            target: target.clone(),
            endpoint,
        });
    }
    let mut tried = Vec::new();
    let mut permanent = None;
    for i in 0..target.host_count() {
        let one = target.only(i);
        let endpoint = target.endpoint(i);
        match connect_target(&one).await {
            Ok((client, seen)) => match in_recovery(&client).await {
                Ok(false) => {
                    return Ok(Primary {
                        client,
                        seen,
                        target: one,
                        endpoint,
                    });
                }
                Ok(true) => tried.push(format!("{endpoint} is a standby (in recovery)")),
                Err(e) => tried.push(format!("{endpoint}: {e}")),
            },
            Err(e @ (PgError::Tls { .. } | PgError::NotReady(_))) => {
                tried.push(format!("{endpoint}: {e}"));
                permanent.get_or_insert(e);
            }
            Err(e) => tried.push(format!("{endpoint}: {e}")),
        }
    }
    if let Some(e) = permanent {
        return Err(e);
    }
    Err(PgError::NoPrimary(format!(
        "no host of postgres_url is a primary that accepts connections ({}): during a failover \
         this lasts until a standby is promoted, and the relay retries; if it lasts, promote a \
         standby or check the hosts listed in postgres_url",
        tried.join("; ")
    )))
}

async fn in_recovery(client: &Client) -> Result<bool, PgError> {
    client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map(|row| row.get(0))
        .map_err(PgError::query("recovery check"))
}

/// Opens a SQL connection to the first host of `postgres_url` only (primary or not): `status`
/// uses it to look at each standby.
pub async fn connect_host(target: &Target) -> Result<Client, PgError> {
    connect_target(target).await.map(|(client, _)| client)
}

/// Opens a SQL connection with the TLS of `postgres_url`'s sslmode (libpq's meaning) and says
/// what its handshake saw.
async fn connect_target(target: &Target) -> Result<(Client, Seen), PgError> {
    let target = target.clone();
    let attempt = |mode| attempt(&target, mode);
    let mode = if pgtls::is_unix_socket(&target.host()) {
        SslMode::Disable
    } else {
        target.tls.mode
    };
    match mode {
        SslMode::Disable => attempt(PqSslMode::Disable).await,
        // libpq: plaintext first, TLS if the server refuses it.
        SslMode::Allow => match attempt(PqSslMode::Disable).await {
            Err(f) if f.is_server_refusal() => attempt(PqSslMode::Require).await,
            other => other,
        },
        // libpq: TLS if the server offers it, plaintext if it does not or the handshake fails.
        // (When plaintext is refused too, the handshake's failure is the one to fix.)
        SslMode::Prefer => match attempt(PqSslMode::Prefer).await {
            Err(tls) if tls.is_tls_failure() => match attempt(PqSslMode::Disable).await {
                Err(plain) if plain.is_server_refusal() => Err(tls),
                other => other,
            },
            other => other,
        },
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            attempt(PqSslMode::Require).await
        }
    }
    .map_err(|e| connect_error(&target, e))
}

/// Why one connection attempt failed.
enum Failure {
    /// With what the attempt's TLS handshake saw.
    Pg(tokio_postgres::Error, Seen),
    /// The TLS configuration could not be built from what the configuration read.
    Params(pgtls::TlsParamError),
}

impl Failure {
    fn is_server_refusal(&self) -> bool {
        matches!(self, Failure::Pg(e, _) if e.as_db_error().is_some())
    }

    fn is_tls_failure(&self) -> bool {
        matches!(self, Failure::Pg(e, _) if crate::tls::rustls_error(e).is_some())
    }
}

async fn attempt(target: &Target, mode: PqSslMode) -> Result<(Client, Seen), Failure> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let connector = target
        .tls
        .connector(seen.clone())
        .map_err(Failure::Params)?;
    let mut config = target.config.clone();
    config.ssl_mode(mode);
    let connected = config.connect(connector).await;
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let (client, connection) = connected.map_err(|e| Failure::Pg(e, seen.clone()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok((client, seen))
}

fn connect_error(target: &Target, failure: Failure) -> PgError {
    let where_ = describe_config(&target.config);
    let (e, seen) = match failure {
        Failure::Params(e) => return PgError::NotReady(format!("postgres_url: {e}")),
        Failure::Pg(e, seen) => (e, seen),
    };
    match pgtls::problems::sql_problem(&e, target, &seen) {
        Some(problem) => PgError::Tls {
            target: where_,
            problem,
        },
        None => PgError::Connect {
            target: where_,
            source: e,
        },
    }
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
    /// PostgreSQL 17+: a failover slot (synchronized to standbys with `sync_replication_slots`).
    pub failover: Option<bool>,
    /// PostgreSQL 17+: the slot was synchronized from a primary (on a standby, or on a standby
    /// promoted since).
    pub synced: Option<bool>,
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
                    confirmed_flush_lsn::text, restart_lsn::text, w.lsn::text,
                    pg_wal_lsn_diff(w.lsn, confirmed_flush_lsn)::bigint,
                    pg_wal_lsn_diff(w.lsn, restart_lsn)::bigint,
                    wal_status,
                    (to_jsonb(s) ->> 'failover')::bool, (to_jsonb(s) ->> 'synced')::bool
               FROM pg_replication_slots s,
                    -- On a standby (status looks at them), the WAL it has replayed.
                    LATERAL (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                                         ELSE pg_current_wal_lsn() END AS lsn) w
              WHERE slot_name = $1",
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
        failover: r.get(12),
        synced: r.get(13),
    }))
}

/// Checks that the slot exists, decodes with pgoutput, is not lost and is free; returns the
/// position streaming resumes from.
pub async fn preflight(client: &Client, slot: &str) -> Result<Lsn, PgError> {
    let Some(state) = slot_state(client, slot).await? else {
        if promoted(client).await? {
            return Err(PgError::SlotNotSynced(format!(
                "replication slot {slot:?} does not exist on this server, which was promoted \
                 from a standby (its timeline is past 1): the slot was not synchronized to it \
                 before the failover. On PostgreSQL 17+ a slot follows a failover when it was \
                 created with failover (slot_failover = true, `outbox-relay setup`) and the \
                 standby has sync_replication_slots = on, hot_standby_feedback = on and dbname \
                 in primary_conninfo (`outbox-relay status` shows whether it is synced); on 15 \
                 and 16 there are no failover slots. Events committed since the relay's last \
                 checkpoint are only in the outbox table: set failover_recovery = true to have \
                 the relay create the slot and re-ship them, or run `outbox-relay setup \
                 --recreate-slot`, start the relay, then run the `outbox-relay replay \
                 --from-lsn ...` setup printed (docs/operations.md, \"Failover\")"
            )));
        }
        return Err(PgError::NotReady(format!(
            "replication slot {slot:?} does not exist: run `outbox-relay setup` to create it \
             (if it existed before, it was dropped and events committed since are only in the \
             outbox table: see docs/operations.md, \"Lost slot\")"
        )));
    };
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

/// Whether this server was promoted from a standby at some point: its current timeline (the
/// first 8 hex digits of the current WAL file's name, right from the promotion on) is past 1.
pub async fn promoted(client: &Client) -> Result<bool, PgError> {
    client
        .query_one(
            "SELECT NOT pg_is_in_recovery() AND
                    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int > 1",
            &[],
        )
        .await
        .map(|row| row.get(0))
        .map_err(PgError::query("timeline query"))
}

/// The failover trap of PostgreSQL 17+: `synchronized_standby_slots` (copied to a standby by
/// pg_basebackup) names physical slots that do not exist on this server, typically a standby
/// just promoted. PostgreSQL then holds back the decoding of failover slots, waiting, without an
/// error to the client: say so instead of hanging.
pub async fn standby_slots_trap(
    client: &Client,
    slot: &str,
    endpoint: &str,
) -> Result<(), PgError> {
    let row = client
        .query_one(
            "SELECT CASE WHEN bool_or(slot_name = $1 AND (to_jsonb(s) ->> 'failover')::bool)
                         THEN coalesce(current_setting('synchronized_standby_slots', true), '')
                         ELSE '' END,
                    coalesce(array_agg(slot_name::text) FILTER (WHERE slot_type = 'physical'),
                             '{}')
               FROM pg_replication_slots s",
            &[&slot],
        )
        .await
        .map_err(PgError::query("synchronized_standby_slots check"))?;
    let (setting, physical): (String, Vec<String>) = (row.get(0), row.get(1));
    let missing: Vec<&str> = setting
        .split(',')
        .map(|s| s.trim().trim_matches('"'))
        .filter(|s| !s.is_empty() && !physical.iter().any(|p| p == s))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(PgError::Blocked(format!(
        "synchronized_standby_slots on the primary {endpoint} names physical slot(s) {} that do \
         not exist there, so PostgreSQL holds back the decoding of failover slot {slot:?} (typical right after a \
         failover: pg_basebackup copied the old primary's setting to the standby). Either create \
         them for this server's standbys (SELECT pg_create_physical_replication_slot('{}')) or \
         clear the setting on it: ALTER SYSTEM SET synchronized_standby_slots = ''; SELECT \
         pg_reload_conf(); the relay retries",
        missing.join(", "),
        missing[0]
    )))
}

/// The identity of the outbox the relay streams, stored in ClickHouse's `source` column:
/// `pg:<system identifier>/<database>/<schema>.<table>`. It survives a failover to a physical
/// standby (same system identifier) and tells apart two outboxes of one database and two
/// servers; `source_id` overrides it (servers cloned from one base backup share an identifier).
pub async fn source_identity(
    client: &Client,
    config: &crate::config::Config,
) -> Result<String, PgError> {
    if !config.source_id.is_empty() {
        return Ok(config.source_id.clone());
    }
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_database()::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(PgError::query("system identifier query"))?;
    let (system, database): (String, String) = (row.get(0), row.get(1));
    Ok(format!(
        "pg:{system}/{database}/{}.{}",
        config.outbox_schema, config.outbox_table
    ))
}

/// Opens a read-only, repeatable-read transaction: its first statement takes the snapshot that
/// replay, repair and verify read in. `what` names it in errors.
pub async fn read_snapshot<'c>(
    client: &'c mut Client,
    what: &'static str,
) -> Result<tokio_postgres::Transaction<'c>, PgError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(PgError::query(what))
}

/// The server's next 64-bit transaction id (the xmax of a snapshot taken now): the replication
/// stream's 32-bit xids are widened next to it ([`crate::event::widen_xid`]).
pub async fn next_xid(client: &Client) -> Result<u64, PgError> {
    let next: i64 = client
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8",
            &[],
        )
        .await
        .map_err(PgError::query("next transaction id"))?
        .get(0);
    Ok(next as u64)
}

/// The server's current WAL position (`pg_current_wal_lsn()`) as text, read in `tx`.
pub async fn wal_position(
    tx: &tokio_postgres::Transaction<'_>,
    what: &'static str,
) -> Result<String, PgError> {
    Ok(tx
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(PgError::query(what))?
        .get(0))
}

/// `"name"` with inner quotes doubled, for PostgreSQL identifiers.
pub fn quote_pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with inner quotes doubled, for PostgreSQL string literals.
pub fn quote_pg_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
