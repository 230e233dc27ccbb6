//! Re-shipping from the outbox table, below both the relay loop (a window the publication did
//! not cover) and the operator's commands (`replay`, `verify --repair`); the checkpoints it
//! starts from are in `store/checkpoint.rs`.
//!
//! A slot cannot rewind below its confirmed LSN, so replay re-ships from what PostgreSQL keeps:
//! the outbox rows (kept `outbox_retention_hours`) and the relay's checkpoints. Each checkpoint
//! stores a snapshot taken before WAL position `snapshot_lsn`; a row whose transaction that
//! snapshot does not see committed after `snapshot_lsn`. Replay from LSN X takes the newest
//! checkpoint with `snapshot_lsn <= X` and re-ships every outbox row that checkpoint's snapshot
//! does not see (a superset of "committed after X") and ClickHouse does not hold.
//!
//! It runs beside the live relay without doubling anything: replay reads the outbox in its own
//! snapshot S, then waits until the slot's confirmed LSN passes the WAL position read right
//! after S was taken. From then on the live relay never ships a row S sees, and replay ships only
//! rows S sees, each after checking ClickHouse does not hold its event_id, with a
//! content-derived `insert_deduplication_token` so a repeated chunk is dropped by ClickHouse.

use std::time::{Duration, Instant};

use pgoutput::Lsn;
use serde::Serialize;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::config::Config;
use crate::event::{OwnedEventRow, fnv1a};
use crate::outbox::ROW_XID8;
use crate::outbox::SqlLayout;
use crate::pg::{self, Guarded, PgError};
use crate::sink::resend::Resend;
use crate::sink::{ClickHouseSink, SinkError};
use crate::store::deadletter;
use crate::store::schema::{checkpoints_table, dead_letters_table, outbox_table};

/// Rows checked and sent per ClickHouse round trip.
const CHUNK: i32 = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum ReshipError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(transparent)]
    ClickHouse(#[from] SinkError),
    #[error(
        "no checkpoint at or before {from} is kept for slot {slot:?} (oldest: {oldest}); the \
         outbox may no longer hold every event committed after {from}. Re-ship everything the \
         outbox still holds with `outbox-relay replay --from-lsn 0/0`"
    )]
    NoCheckpoint {
        from: Lsn,
        slot: String,
        oldest: String,
    },
    #[error("another `outbox-relay replay` for slot {0:?} is running; wait for it to finish")]
    Busy(String),
    #[error(
        "the live relay has not confirmed WAL position {fence} within {waited_s} s (slot {slot:?} \
         is at {confirmed}): replay waits for it so that no event is shipped twice. Start \
         `outbox-relay run`, or give it more time with --wait-s"
    )]
    FenceTimeout {
        fence: String,
        slot: String,
        confirmed: String,
        waited_s: u64,
    },
}

/// What a replay did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReplayReport {
    /// The checkpoint replay started from (`None` with `--from-lsn 0/0`: the whole outbox).
    pub checkpoint_snapshot_lsn: Option<String>,
    /// The WAL position the live relay had to pass before replay wrote anything.
    pub fence_lsn: String,
    /// Outbox rows committed after the checkpoint.
    pub candidates: u64,
    /// Of those, already in ClickHouse.
    pub already_there: u64,
    /// Sent to ClickHouse (0 with --dry-run).
    pub shipped: u64,
    /// Refused by ClickHouse and stored as dead letters.
    pub dead_letters: u64,
}

/// Re-ships every outbox row committed after `from` that ClickHouse does not hold (the whole
/// outbox for 0/0), from the tables with these oids (the outbox table under its configured name when
/// `None`): after a table swap, the rows PostgreSQL skipped are in the table that had the name
/// then, whatever its name is now. A table that no longer exists is skipped.
pub async fn replay_tables(
    config: &Config,
    sink: &ClickHouseSink,
    from: Lsn,
    wait: Duration,
    dry_run: bool,
    tables: Option<&[u32]>,
) -> Result<ReplayReport, ReshipError> {
    let control = replay_lock(config).await?;
    let base = base_snapshot(&control, config, from).await?;
    let mut report = ReplayReport {
        checkpoint_snapshot_lsn: base.as_ref().map(|(_, lsn)| lsn.clone()),
        ..ReplayReport::default()
    };
    let snapshot = base.map(|(snapshot, _)| snapshot);
    let job = Job::Replay {
        tables,
        snapshot: snapshot.as_deref(),
    };
    attempts(config, sink, &control, (wait, dry_run), job, &mut report).await?;
    Ok(report)
}

/// What a re-ship reads from the outbox.
#[derive(Clone, Copy)]
enum Job<'a> {
    /// The rows `snapshot` (`None`: the whole outbox) does not see, in these tables.
    Replay {
        tables: Option<&'a [u32]>,
        snapshot: Option<&'a str>,
    },
    /// The rows with these event ids.
    Ids(&'a [String]),
}

/// Runs `job`, each attempt on a guarded connection; one that gave way to a migration is
/// started again (what it shipped stays: the existence checks skip it) until `wait` has passed.
async fn attempts(
    config: &Config,
    sink: &ClickHouseSink,
    control: &Client,
    (wait, dry_run): (Duration, bool),
    job: Job<'_>,
    report: &mut ReplayReport,
) -> Result<(), ReshipError> {
    let started = Instant::now();
    let work = match job {
        Job::Replay { .. } => "replay",
        Job::Ids(_) => "repair",
    };
    loop {
        let mut attempt = ReplayReport::default();
        let mut reader = Guarded::connect(config.postgres(), work).await?;
        let (reader, guard) = reader.split();
        let pass = Pass {
            config,
            sink,
            control,
            wait,
            dry_run,
        };
        let result = guard
            .run(async {
                match job {
                    Job::Replay { tables, snapshot } => {
                        pass.replay(reader, tables, snapshot, &mut attempt).await
                    }
                    Job::Ids(ids) => pass.reship(reader, ids, &mut attempt).await,
                }
            })
            .await;
        report.add(&attempt);
        match result {
            Err(ReshipError::Postgres(PgError::Yielded(waiter))) if started.elapsed() < wait => {
                info!(%waiter, "{work} gave way to a migration; starting again (what shipped stays)");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// One attempt of a re-ship (replay or repair) on a guarded connection.
struct Pass<'a> {
    config: &'a Config,
    sink: &'a ClickHouseSink,
    /// Holds replay's lock; fence waits and dead letters go through it.
    control: &'a Client,
    wait: Duration,
    dry_run: bool,
}

impl Pass<'_> {
    /// Replay from the tables with these oids (see [`replay_tables`]): the rows `snapshot`
    /// (`None`: the whole outbox) does not see.
    async fn replay(
        &self,
        reader: &mut Client,
        tables: Option<&[u32]>,
        snapshot: Option<&str>,
        report: &mut ReplayReport,
    ) -> Result<(), ReshipError> {
        let (config, control) = (self.config, self.control);
        let names = match tables {
            None => vec![outbox_table(config)],
            Some(oids) => {
                let mut names = Vec::new();
                for oid in oids {
                    let row = reader
                        .query_opt(
                            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
                               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::int8::oid",
                            &[&i64::from(*oid)],
                        )
                        .await
                        .map_err(PgError::query("outbox table by oid"))?;
                    match row {
                        Some(row) => names.push(row.get::<_, String>(0)),
                        None => warn!(oid, "a table to re-ship from no longer exists: skipped"),
                    }
                }
                names
            }
        };
        let mut layouts = Vec::with_capacity(names.len());
        for name in &names {
            layouts.push((name.clone(), SqlLayout::read_table(reader, name).await?));
        }
        let tx = self
            .snapshot(reader, &names, "replay snapshot", report)
            .await?;
        for (table, layout) in &layouts {
            let statement = tx
                .prepare(&candidates_sql(config, table, &layout.select))
                .await
                .map_err(PgError::query("replay query"))?;
            let portal = tx
                .bind(&statement, &[&snapshot])
                .await
                .map_err(PgError::query("replay query"))?;
            loop {
                let rows = tx
                    .query_portal(&portal, CHUNK)
                    .await
                    .map_err(PgError::query("replay read"))?;
                if rows.is_empty() {
                    break;
                }
                self.ship_rows(control, layout, &rows, report).await?;
                info!(
                    candidates = report.candidates,
                    shipped = report.shipped,
                    "replay progress"
                );
            }
        }
        Ok(())
    }

    /// Opens the read-only snapshot the rows are read in, the tables locked first (a table
    /// rewrite such as `ALTER TABLE ... TYPE` committed after the snapshot would show them
    /// empty to it; the guard gives way to it instead), and waits until the live relay passed
    /// it, so that it never ships them again.
    async fn snapshot<'c>(
        &self,
        reader: &'c mut Client,
        tables: &[String],
        what: &'static str,
        report: &mut ReplayReport,
    ) -> Result<tokio_postgres::Transaction<'c>, ReshipError> {
        let tx = pg::read_snapshot(reader, what).await?;
        if !tables.is_empty() {
            tx.batch_execute(&format!(
                "LOCK TABLE {} IN ACCESS SHARE MODE",
                tables.join(", ")
            ))
            .await
            .map_err(PgError::query("replay lock on the outbox"))?;
        }
        // The first query takes the snapshot; the WAL position is read after it.
        report.fence_lsn = pg::wal_position(&tx, what).await?;
        if !self.dry_run {
            wait_for_fence(self.control, self.config, &report.fence_lsn, self.wait).await?;
        }
        Ok(tx)
    }

    /// Maps a chunk of outbox rows and ships the events ClickHouse does not hold
    /// ([`ship_chunk`]); a row that cannot become an event is kept as a dead letter, as the
    /// live stream does (`dead-letters retry` ships it once the row is fixed).
    async fn ship_rows(
        &self,
        control: &Client,
        layout: &SqlLayout,
        rows: &[tokio_postgres::Row],
        report: &mut ReplayReport,
    ) -> Result<(), ReshipError> {
        let (config, dry_run) = (self.config, self.dry_run);
        report.candidates += rows.len() as u64;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            match layout.event(row) {
                Ok(event) => events.push(event),
                Err((why, raw)) => {
                    let id = layout.fallback_id(&raw);
                    if !dry_run
                        && deadletter::record_unmapped(control, config, &id, (0, 0), &raw, &why)
                            .await?
                    {
                        report.dead_letters += 1;
                    }
                }
            }
        }
        ship_chunk(config, self.sink, control, events, dry_run, report).await
    }
}

impl ReplayReport {
    /// Adds what an attempt shipped; its counts of what it found replace the earlier ones.
    fn add(&mut self, attempt: &ReplayReport) {
        self.candidates = attempt.candidates;
        self.already_there = attempt.already_there;
        self.shipped += attempt.shipped;
        self.dead_letters += attempt.dead_letters;
        if !attempt.fence_lsn.is_empty() {
            self.fence_lsn = attempt.fence_lsn.clone();
        }
    }
}

/// Re-ships the outbox rows with these event ids that ClickHouse does not hold, exactly once,
/// as `replay` does: under replay's lock, read in a snapshot the live relay has passed (so it
/// never ships them again), each chunk checked against ClickHouse first and inserted with a
/// content-derived deduplication token. Used by `verify --repair` and `verify_repair`.
pub async fn reship_ids(
    config: &Config,
    sink: &ClickHouseSink,
    ids: &[String],
    wait: Duration,
) -> Result<ReplayReport, ReshipError> {
    let control = replay_lock(config).await?;
    let mut report = ReplayReport::default();
    attempts(
        config,
        sink,
        &control,
        (wait, false),
        Job::Ids(ids),
        &mut report,
    )
    .await?;
    info!(
        candidates = report.candidates,
        shipped = report.shipped,
        "repair re-shipped missing events"
    );
    Ok(report)
}

impl Pass<'_> {
    /// The rows with these ids, as [`reship_ids`] ships them.
    async fn reship(
        &self,
        reader: &mut Client,
        ids: &[String],
        report: &mut ReplayReport,
    ) -> Result<(), ReshipError> {
        let outbox = outbox_table(self.config);
        let layout = SqlLayout::read_table(reader, &outbox).await?;
        let tx = self
            .snapshot(
                reader,
                std::slice::from_ref(&outbox),
                "repair snapshot",
                report,
            )
            .await?;
        let sql = format!(
            "SELECT {} FROM {outbox} o WHERE o.event_id::text = ANY($1)",
            layout.select
        );
        for chunk in ids.chunks(CHUNK as usize) {
            let rows = tx
                .query(&sql, &[&chunk])
                .await
                .map_err(PgError::query("repair read"))?;
            self.ship_rows(self.control, &layout, &rows, report).await?;
        }
        Ok(())
    }
}

/// Takes replay's lock (one re-sender per slot at a time: a replay, `verify --repair`) on a
/// connection of its own, held while it lives; fails [`ReshipError::Busy`] when another holds it.
async fn replay_lock(config: &Config) -> Result<Client, ReshipError> {
    let control = pg::connect(config.postgres()).await?;
    let locked: bool = control
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('outbox-relay replay ' || $1))",
            &[&config.slot],
        )
        .await
        .map_err(PgError::query("replay lock"))?
        .get(0);
    if !locked {
        return Err(ReshipError::Busy(config.slot.clone()));
    }
    Ok(control)
}

/// The newest checkpoint whose snapshot predates `from`: (snapshot, snapshot_lsn).
pub(crate) async fn base_snapshot(
    client: &Client,
    config: &Config,
    from: Lsn,
) -> Result<Option<(String, String)>, ReshipError> {
    if from == Lsn(0) {
        return Ok(None);
    }
    let table = checkpoints_table(config);
    let row = client
        .query_opt(
            &format!(
                "SELECT c.snapshot::text, c.snapshot_lsn::text FROM {table} c
                  WHERE c.slot = $1 AND c.snapshot_lsn <= $2::text::pg_lsn
                  ORDER BY c.snapshot_lsn DESC LIMIT 1"
            ),
            &[&config.slot, &from.to_string()],
        )
        .await
        .map_err(PgError::query("checkpoint read"))?;
    if let Some(row) = row {
        return Ok(Some((row.get(0), row.get(1))));
    }
    let oldest: Option<String> = client
        .query_one(
            &format!("SELECT min(snapshot_lsn)::text FROM {table} WHERE slot = $1"),
            &[&config.slot],
        )
        .await
        .map_err(PgError::query("checkpoint read"))?
        .get(0);
    Err(ReshipError::NoCheckpoint {
        from,
        slot: config.slot.clone(),
        oldest: oldest.unwrap_or_else(|| "none recorded".into()),
    })
}

pub(crate) async fn wait_for_fence(
    client: &Client,
    config: &Config,
    fence: &str,
    wait: Duration,
) -> Result<(), ReshipError> {
    let started = Instant::now();
    loop {
        let row = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn >= $2::text::pg_lsn
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.slot, &fence],
            )
            .await
            .map_err(PgError::query("slot query"))?;
        let (confirmed, passed): (Option<String>, Option<bool>) = match &row {
            Some(r) => (r.get(0), r.get(1)),
            None => (None, None),
        };
        if passed == Some(true) {
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(ReshipError::FenceTimeout {
                fence: fence.into(),
                slot: config.slot.clone(),
                confirmed: confirmed.unwrap_or_else(|| "missing".into()),
                waited_s: wait.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Outbox rows the base snapshot ($1, NULL for all) does not see, minus dead letters.
fn candidates_sql(config: &Config, outbox: &str, select: &str) -> String {
    let xid8 = ROW_XID8;
    format!(
        "SELECT {select}
           FROM {outbox} o
          WHERE ($1::text IS NULL OR NOT pg_visible_in_snapshot({xid8}, $1::text::pg_snapshot))
            AND NOT EXISTS (SELECT 1 FROM {dead} d WHERE d.event_id::text = to_jsonb(o) ->> 'event_id'
                                AND d.shipped_at IS NULL)",
        dead = dead_letters_table(config),
    )
}

/// Sends the chunk's rows ClickHouse does not hold; rows it refuses become dead letters.
async fn ship_chunk(
    config: &Config,
    sink: &ClickHouseSink,
    pg: &Client,
    events: Vec<OwnedEventRow>,
    dry_run: bool,
    report: &mut ReplayReport,
) -> Result<(), ReshipError> {
    let ids = events
        .iter()
        .map(OwnedEventRow::event_id_text)
        .collect::<Vec<_>>();
    let there: std::collections::HashSet<String> =
        sink.existing_ids(&ids).await?.into_iter().collect();
    report.already_there += there.len() as u64;
    let missing = events
        .into_iter()
        .filter(|e| !there.contains(&e.event_id_text()))
        .collect::<Vec<_>>();
    if missing.is_empty() || dry_run {
        return Ok(());
    }
    let token = |rows: &[OwnedEventRow]| {
        let ids = rows.iter().flat_map(|r| r.event_id).collect::<Vec<_>>();
        Some(format!("replay:{:016x}:{}", fnv1a(&ids), rows.len()))
    };
    let mut resend = Resend::new(&missing);
    let result = async {
        while let Some((row, e)) = resend.next_refused(sink, token).await? {
            deadletter::record(pg, config, row, &e.to_string()).await?;
        }
        Ok::<(), ReshipError>(())
    }
    .await;
    report.shipped += resend.shipped;
    report.dead_letters += resend.refused;
    result
}
