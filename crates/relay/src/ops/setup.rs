//! `outbox-relay setup`: creates, idempotently, everything the relay needs on both servers.

use crate::config::Config;
use crate::pg::{self, PgError, quote_pg_ident};
use crate::sink::{self, SinkError};
use crate::store::coverage;
use crate::store::schema;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(transparent)]
    ClickHouse(#[from] SinkError),
    #[error("{0}")]
    Unsupported(String),
    /// The publication exists but does not stream the outbox's inserts (the CLI exits with 6,
    /// as `status` does for it).
    #[error("{0}")]
    Uncovered(String),
}

/// What setup found or created.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub slot_created: bool,
    /// When the slot was created again after the relay had shipped from an earlier one: the
    /// LSN to replay from (the newest checkpoint's).
    pub replay_from: Option<String>,
    /// Whether the slot is a failover slot (`None` before PostgreSQL 17).
    pub failover: Option<bool>,
    /// What standbys need for the slot to follow a failover, or why it will not.
    pub failover_note: Option<String>,
    /// Whether the coverage watch (an event trigger, docs/guarantees.md) is installed.
    pub coverage_watch: bool,
}

/// What a standby needs so that the failover slot is synchronized to it (PostgreSQL 17+).
pub const STANDBY_NEEDS: &str = "each standby needs sync_replication_slots = on, \
    hot_standby_feedback = on, a physical slot on the primary (primary_slot_name) and dbname=... \
    in its primary_conninfo; the primary needs that physical slot in synchronized_standby_slots \
    (clear synchronized_standby_slots on the standby itself, or it blocks decoding once \
    promoted); list every host in postgres_url; `outbox-relay status` shows whether each \
    standby holds the slot synced";

/// Applies the PostgreSQL DDL, creates the slot, then the ClickHouse database and table.
///
/// Concurrent setups (several replicas starting at once) take turns: each holds a PostgreSQL
/// advisory lock for the whole run, so `CREATE ... IF NOT EXISTS` never races another one's
/// catalog insert, and every step finds the previous setup's work and leaves it as it is.
pub async fn setup(config: &Config, recreate_slot: bool) -> Result<SetupReport, SetupError> {
    let lock = pg::connect(config.postgres()).await?;
    lock.execute(
        "SELECT pg_advisory_lock(hashtext('outbox-relay setup'))",
        &[],
    )
    .await
    .map_err(PgError::query("setup lock"))?;
    let result = async {
        let report = setup_postgres(config, recreate_slot).await?;
        setup_clickhouse(config).await?;
        Ok(report)
    }
    .await;
    // Closing the connection would release it too; this makes the next setup start at once.
    let _ = lock
        .execute(
            "SELECT pg_advisory_unlock(hashtext('outbox-relay setup'))",
            &[],
        )
        .await;
    result
}

/// Whether an admin prepared the outbox objects for a relay role without ownership (least
/// privilege, docs/operations.md): the outbox table exists and the current role is not a member
/// of its owner. Then every object this version's DDL needs must be there, or setup stops
/// naming what is missing and who can add it.
async fn prepared_by_another_role(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<bool, SetupError> {
    let owner_row = client
        .query_opt(
            "SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&config.outbox_schema, &config.outbox_table],
        )
        .await
        .map_err(PgError::query("outbox owner check"))?;
    match owner_row {
        None => return Ok(false),
        Some(row) if row.get::<_, bool>(0) => return Ok(false),
        Some(_) => {}
    }
    let needed = [
        (schema::checkpoints_table(config), "coverage"),
        (schema::dead_letters_table(config), "raw"),
        (schema::dead_letters_table(config), "shipped_at"),
        (schema::outbox_table(config), "event_context"),
        (schema::coverage_log_table(config), "table_oid"),
    ];
    let mut missing = Vec::new();
    for (table, column) in &needed {
        let found: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_attribute
                                 WHERE attrelid = to_regclass($1) AND attname = $2
                                   AND NOT attisdropped)",
                &[table, column],
            )
            .await
            .map_err(PgError::query("outbox objects check"))?
            .get(0);
        if !found {
            missing.push(format!("{table}.{column}"));
        }
    }
    if let coverage::Coverage::Uncovered { why, .. } = coverage::coverage(client, config).await? {
        missing.push(why);
    }
    if !missing.is_empty() {
        return Err(SetupError::Unsupported(format!(
            "the outbox table belongs to another role, and these objects of this version are \
             missing: {}. Run `outbox-relay setup` as the table's owner (or apply `outbox-relay \
             setup --print-sql` with your migration tool), then setup again as this role",
            missing.join("; ")
        )));
    }
    Ok(true)
}

/// Why setup stops when the publication (which setup creates only when it is missing) exists
/// without streaming the outbox, with the exact statement that fixes it. Setup does not change
/// such a publication itself: another subscriber may rely on what it publishes.
async fn uncovered(
    client: &tokio_postgres::Client,
    config: &Config,
    why: &str,
) -> Result<String, SetupError> {
    let publication = quote_pg_ident(&config.publication);
    let table = schema::outbox_table(config);
    let row = client
        .query_opt(
            "SELECT p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate,
                    EXISTS (SELECT 1 FROM pg_publication_rel r
                             WHERE r.prpubid = p.oid AND r.prrelid = to_regclass($2)
                               AND r.prqual IS NOT NULL)
               FROM pg_publication p WHERE p.pubname = $1",
            &[&config.publication, &table],
        )
        .await
        .map_err(PgError::query("publication check"))?;
    let fix = match row {
        None => "outbox-relay setup (it creates the publication)".to_string(),
        Some(r) if !r.get::<_, bool>(0) => {
            let mut publish = vec!["insert"];
            for (i, what) in [(1, "update"), (2, "delete"), (3, "truncate")] {
                if r.get::<_, bool>(i) {
                    publish.push(what);
                }
            }
            format!(
                "ALTER PUBLICATION {publication} SET (publish = '{}');",
                publish.join(", ")
            )
        }
        Some(r) if r.get::<_, bool>(4) => format!(
            "ALTER PUBLICATION {publication} DROP TABLE {table}; \
             ALTER PUBLICATION {publication} ADD TABLE {table};"
        ),
        Some(_) => format!("ALTER PUBLICATION {publication} ADD TABLE {table};"),
    };
    Ok(format!(
        "setup stopped: {why}. The publication existed before setup, which does not change it \
         (another subscriber may rely on what it publishes). As its owner, run\n  {fix}\nthen \
         `outbox-relay setup` again; or set publication (RELAY_PUBLICATION) to a new name and \
         setup creates one for the outbox"
    ))
}

pub async fn setup_postgres(
    config: &Config,
    recreate_slot: bool,
) -> Result<SetupReport, SetupError> {
    let client = pg::connect(config.postgres()).await?;
    let version = check_server(&client).await?;
    let mut report = SetupReport::default();
    if prepared_by_another_role(&client, config).await? {
        tracing::info!(
            "the outbox objects exist and belong to another role (an admin ran setup): their DDL \
             is left to that role; checking the slot and ClickHouse only"
        );
    } else {
        client
            .batch_execute(&format!(
                "SET client_min_messages = warning;\n{}",
                schema::postgres_ddl(config)
            ))
            .await
            .map_err(PgError::query("outbox DDL"))?;
    }
    if let coverage::Coverage::Uncovered { why, .. } = coverage::coverage(&client, config).await? {
        return Err(SetupError::Uncovered(
            uncovered(&client, config, &why).await?,
        ));
    }
    report.coverage_watch =
        crate::store::coverage::coverage_watch_installed(&client, config).await?;
    if pg::slot_state(&client, &config.slot).await?.is_none() {
        report.replay_from = lost_slot(&client, config, recreate_slot).await?;
        report.slot_created = create_slot(&client, config, version).await?;
    }
    // The coverage the slot starts under: a change of the publication from here on, even before
    // the relay's first batch, is seen and its window re-shipped.
    if let Some(confirmed) = pg::slot_state(&client, &config.slot)
        .await?
        .and_then(|s| s.confirmed_flush())
        && let coverage::Coverage::Covered { fingerprint } =
            coverage::coverage(&client, config).await?
    {
        crate::store::checkpoint::record_baseline(&client, config, confirmed, &fingerprint).await?;
    }
    report.failover = pg::slot_state(&client, &config.slot)
        .await?
        .and_then(|s| s.failover);
    report.failover_note = Some(failover_note(config, version, report.failover));
    Ok(report)
}

/// The server's `wal_level`, encoding and version fit the relay: its version.
async fn check_server(client: &tokio_postgres::Client) -> Result<i32, SetupError> {
    let settings = client
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('server_encoding'), \
                    current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map_err(PgError::query("settings query"))?;
    let (wal_level, encoding, version): (String, String, i32) =
        (settings.get(0), settings.get(1), settings.get(2));
    if wal_level != "logical" {
        return Err(SetupError::Unsupported(format!(
            "PostgreSQL wal_level is {wal_level:?}; logical replication needs wal_level = logical: \
             run `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL"
        )));
    }
    if encoding != "UTF8" {
        return Err(SetupError::Unsupported(format!(
            "database encoding is {encoding}; the relay ships text as UTF-8 and needs a UTF8 database"
        )));
    }
    if version < 150_000 {
        return Err(SetupError::Unsupported(format!(
            "PostgreSQL {version} is too old: the relay needs PostgreSQL 15 or newer"
        )));
    }
    Ok(version)
}

/// A slot the relay shipped from before and that is gone: a new one starts at the current WAL
/// position, so what was committed in between would be skipped without a replay. Refused unless
/// `recreate_slot`; then the position to replay from.
async fn lost_slot(
    client: &tokio_postgres::Client,
    config: &Config,
    recreate_slot: bool,
) -> Result<Option<String>, SetupError> {
    let Some((lsn, at)) = crate::store::checkpoint::last_checkpoint(client, config).await? else {
        return Ok(None);
    };
    if !recreate_slot {
        return Err(SetupError::Unsupported(format!(
            "replication slot {:?} is gone, but the relay shipped from it up to {lsn} \
             (checkpoint of {at}): it was dropped or lost (failover, max_slot_wal_keep_size). A \
             new slot would skip what was committed since. Run `outbox-relay setup \
             --recreate-slot`, then `outbox-relay replay --from-lsn {lsn}` \
             (docs/operations.md, \"Lost slot\")",
            config.slot
        )));
    }
    Ok(Some(lsn))
}

/// Creates the slot (a failover slot on 17+ with `slot_failover`): whether this setup did.
async fn create_slot(
    client: &tokio_postgres::Client,
    config: &Config,
    version: i32,
) -> Result<bool, SetupError> {
    let created = if version >= 170_000 {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, $2)",
                &[&config.slot, &config.slot_failover],
            )
            .await
    } else {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&config.slot],
            )
            .await
    };
    match created {
        Ok(_) => Ok(true),
        // Another setup created it in between: fine.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => Ok(false),
        Err(e) => Err(PgError::query("slot creation")(e).into()),
    }
}

/// What setup says about the slot and failovers.
fn failover_note(config: &Config, version: i32, failover: Option<bool>) -> String {
    match (version >= 170_000, failover) {
        (false, _) => format!(
            "PostgreSQL {version} has no failover slots: after a failover the slot is missing on \
             the promoted standby and the relay stops with the commands to run \
             (docs/operations.md, \"Failover\")"
        ),
        (true, Some(true)) => format!("slot {:?} is a failover slot: {STANDBY_NEEDS}", config.slot),
        (true, _) if config.slot_failover => format!(
            "slot {:?} existed before and is not a failover slot, so it will not follow a \
             failover: to make it one, stop the relay and run \
             `ALTER_REPLICATION_SLOT {} (FAILOVER true)` on a replication connection \
             (psql \"dbname=... replication=database\")",
            config.slot, config.slot
        ),
        (true, _) => format!(
            "slot {:?} is not a failover slot (slot_failover = false): it will not follow a \
             failover",
            config.slot
        ),
    }
}

/// Where the DDL goes: one server, every node through `ON CLUSTER`, or a database that
/// replicates its tables itself (`Replicated`, ClickHouse Cloud).
async fn layout<'a>(
    client: &clickhouse::Client,
    database: &str,
    cluster: &'a str,
) -> Result<schema::ClickHouseLayout<'a>, SetupError> {
    if cluster.is_empty() {
        return Ok(schema::ClickHouseLayout::Single);
    }
    let engine: Vec<String> = client
        .query("SELECT engine FROM system.databases WHERE name = ?")
        .bind(database)
        .fetch_all()
        .await
        .map_err(|source| sink::SinkError::query("database engine", source))?;
    Ok(match engine.first().map(String::as_str) {
        Some("Replicated" | "Shared") => schema::ClickHouseLayout::ReplicatedDatabase,
        _ => schema::ClickHouseLayout::OnCluster(cluster),
    })
}

/// A DDL statement failed; on a cluster, what to do where `ON CLUSTER` cannot run.
/// `found`: what the check of every node found before setup tried to create the table.
fn on_cluster_failed(cluster: &str, found: Option<&str>, e: sink::SinkError) -> SetupError {
    if cluster.is_empty() {
        return e.into();
    }
    let found = found
        .map(|f| format!(". What the nodes hold: {f}"))
        .unwrap_or_default();
    SetupError::Unsupported(format!(
        "{e}{found}. On cluster {cluster:?} setup runs its DDL with ON CLUSTER, which needs the \
         cluster's distributed DDL (Keeper and a distributed_ddl section). Where that cannot run, \
         create the table on every node yourself: `outbox-relay setup --print-sql` prints the \
         statements (drop the ON CLUSTER clauses and run them on each node), then run setup \
         again to check every node (docs/operations.md, \"ClickHouse clusters\")"
    ))
}

pub async fn setup_clickhouse(config: &Config) -> Result<(), SetupError> {
    let target = config.clickhouse();
    let server = target.client(false);
    let cluster = config.clickhouse_cluster.as_str();
    let on_cluster = match cluster {
        "" => String::new(),
        c => format!(" ON CLUSTER {}", sink::quote_ch_literal(c)),
    };
    let sink = sink::ClickHouseSink::from_config(config, "setup");
    // On a cluster whose every node holds the table already (made through ON CLUSTER, or on
    // each node where that cannot run), there is nothing to create: the check says so, before
    // any ON CLUSTER statement (which a cluster without distributed DDL refuses).
    let mut found = None;
    if !cluster.is_empty() {
        match sink.check_table().await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::info!(error = %e, "creating the table on cluster {cluster}");
                found = Some(e.to_string());
            }
        }
    }
    let failed = |e| on_cluster_failed(cluster, found.as_deref(), e);
    let database = sink::quote_ch_ident(&target.database);
    sink::execute(
        &server,
        &format!("CREATE DATABASE IF NOT EXISTS {database}{on_cluster}"),
    )
    .await
    .map_err(failed)?;
    let client = target.client(true);
    // An existing table whose engine would merge or drop the relay's rows is refused before
    // the DDL below alters it (and before an engine that takes no ALTER fails it obscurely).
    sink.check_engine().await?;
    let layout = layout(&client, &target.database, cluster).await?;
    // ClickHouse's HTTP interface takes one statement per request.
    for statement in schema::clickhouse_ddl_for(config, layout).split(";\n") {
        if !statement
            .lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with("--"))
        {
            continue;
        }
        match sink::execute(&client, statement).await {
            Ok(()) => {}
            // The fence needs Keeper (KeeperMap): without it the relay runs unfenced.
            Err(e) if statement.contains("KeeperMap") => tracing::warn!(
                error = %e,
                "the fence table could not be created (KeeperMap needs the cluster's Keeper): \
                 a relay that lost the slot could write after another took over \
                 (docs/operations.md, \"ClickHouse clusters\")"
            ),
            Err(e) => return Err(failed(e)),
        }
    }
    // An existing table is kept as it is: say now, not at the first insert, if it cannot take
    // the relay's rows.
    sink.check_table().await?;
    Ok(())
}
