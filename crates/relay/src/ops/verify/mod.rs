//! Completeness you can prove: compares what the outbox holds with what ClickHouse holds for
//! this outbox's source, window by window, event by event, content included, and names every
//! missing, extra and altered event (docs/guarantees.md, "What `verify` proves").
//!
//! One pass ([`compare`]) is a short sequence of steps:
//!
//! 1. wait until the live relay passed the WAL position of now, with nothing locked;
//! 2. find the horizon H ([`horizon`]): what it sees is outside the proof;
//! 3. on a guarded connection ([`crate::pg::Guarded`]: it gives way to any session that queues
//!    behind its locks), lock the outbox, take the snapshot S and the WAL position after it;
//! 4. the outbox's sums per window ([`sums`]), hashing only what the background verifier's
//!    [`Memory`] does not vouch for;
//! 5. wait until the relay passed S's position: ClickHouse then holds every row of every
//!    transaction S sees, and the rows of the others are told apart by their `xid`;
//! 6. ClickHouse's sums per window;
//! 7. the differing windows compared id by id ([`narrow`]), unless the same sums were narrowed
//!    before; the snapshot is released;
//! 8. what was found is settled outside the snapshot ([`settle`]) and reported.

mod background;
mod content;
mod horizon;
mod memory;
mod narrow;
mod pass;
mod report;
mod settle;
mod sides;
mod snapshot;
mod sums;
mod time;

use std::time::{Duration, Instant};

use pgoutput::Lsn;
use serde::Serialize;
use tracing::info;

pub use background::{verify_forever, verify_pass};
pub use horizon::Horizon;
pub use memory::Memory;
pub use narrow::{MAX_MISSING, MAX_OTHER};
pub use pass::compare;
pub use settle::{Extra, Settled};
pub use snapshot::Snapshot;
pub use time::{format_us, parse_time};

use crate::config::Config;
use crate::pg::PgError;
use crate::reship::{self, ReplayReport, ReshipError};
use crate::sink::{ClickHouseSink, SinkError};

/// Rows per second of `verify_interval_s` the background verifier re-hashes in full on the
/// outbox's side, oldest window first, round the range (docs/guarantees.md).
pub const RESWEEP_ROWS_PER_S: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(transparent)]
    ClickHouse(#[from] SinkError),
    #[error("repair failed: {0}")]
    Repair(#[from] ReshipError),
    #[error("{0}")]
    Position(#[from] crate::ops::positions::PositionError),
    #[error(
        "the live relay has not confirmed WAL position {fence} within {waited_s} s (slot {slot:?} \
         is at {confirmed}): verify compares only events the relay has passed. Start \
         `outbox-relay run` (or let it catch up), or give it more time with --wait-s"
    )]
    FenceTimeout {
        fence: String,
        slot: String,
        confirmed: String,
        waited_s: u64,
    },
    #[error("{0}")]
    Range(String),
    #[error(
        "PostgreSQL and ClickHouse hash the same event differently ({postgres} and {clickhouse}): \
         verify cannot compare their contents; set verify_interval_s = 0 and report both \
         servers' versions"
    )]
    HashDiffers { postgres: i64, clickhouse: i64 },
}

impl VerifyError {
    /// The pass gave way to a session waiting on its locks: trying again later does help.
    pub fn yielded(&self) -> bool {
        matches!(
            self,
            VerifyError::Postgres(PgError::Yielded(_))
                | VerifyError::Repair(ReshipError::Postgres(PgError::Yielded(_)))
        )
    }
}

/// What to verify and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// `[from, until)` of `event_date_time` in Unix µs, or every event the outbox holds.
    pub range: Option<(i64, i64)>,
    /// Only events committed after this position (`--from-lsn`).
    pub from_lsn: Option<Lsn>,
    /// Window width in µs.
    pub window_us: i64,
    /// How long to wait for the live relay to pass the snapshot (and, for `verify`, to try
    /// again after giving way to a migration).
    pub wait: Duration,
    pub repair: bool,
}

/// A window whose count or checksum differed.
#[derive(Debug, Clone, Serialize)]
pub struct DifferingWindow {
    pub from: String,
    pub until: String,
    pub outbox_events: u64,
    pub clickhouse_rows: u64,
    pub missing: u64,
    pub extra: u64,
    pub altered: u64,
}

/// Where the proof starts (the horizon), as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ProofStart {
    /// The checkpoint whose snapshot bounds the proof: events of transactions it sees are not
    /// compared.
    pub checkpoint_lsn: String,
    pub recorded_at: String,
    pub why: &'static str,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub source: String,
    /// The `event_date_time` range compared (`--since`/`--until`), or empty: every event.
    pub from: String,
    pub until: String,
    /// `None`: every event the outbox holds is in the proof.
    pub proof_start: Option<ProofStart>,
    pub window_seconds: u64,
    /// Windows holding events on either side (empty windows are not listed).
    pub windows: u64,
    pub outbox_events: u64,
    pub clickhouse_rows: u64,
    pub differing_windows: Vec<DifferingWindow>,
    /// Event ids the outbox holds and ClickHouse does not, sorted.
    pub missing: Vec<String>,
    /// Duplicates and rows the outbox does not hold, sorted by id.
    pub extra: Vec<Extra>,
    /// Event ids ClickHouse holds with other content than the outbox's, sorted.
    pub altered: Vec<String>,
    /// Differences found but not listed (the lists are bounded: [`MAX_MISSING`],
    /// [`MAX_OTHER`]); run again after a repair.
    pub unlisted: u64,
    /// ClickHouse rows of this source whose outbox row is gone (purged): outside the proof.
    pub outside_proof: u64,
    /// Rows of other sources in the same table (not checked: their outbox is elsewhere).
    pub other_sources: Vec<(String, u64)>,
    /// Up to where (Unix µs) every event is proven: the start of the first differing window,
    /// or the time of the pass's snapshot.
    pub verified_through_us: i64,
    /// What `--repair` re-shipped.
    pub repair: Option<ReplayReport>,
    /// Rows whose content this pass hashed, on both sides together (the background verifier's
    /// cost: after its first pass, the rows that came since the last one).
    #[serde(skip)]
    pub hashed_rows: u64,
    /// Windows compared id by id this pass (not counting those whose result was remembered).
    #[serde(skip)]
    pub narrowed_windows: u64,
}

impl VerifyReport {
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.altered.is_empty()
            && self.unlisted == 0
    }
}

/// Verifies; with `repair`, re-ships the missing events. A pass that gave way to a migration is
/// tried again until `options.wait` has passed.
pub async fn verify(
    config: &Config,
    sink: &ClickHouseSink,
    options: &Options,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let mut report = loop {
        match compare(config, sink, options, &mut Memory::default(), true).await {
            Err(e) if e.yielded() && started.elapsed() < options.wait => {
                info!(error = %e, "verify gave way; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => break other?,
        }
    };
    if options.repair && !report.missing.is_empty() {
        report.repair =
            Some(reship::reship_ids(config, sink, &report.missing, options.wait).await?);
    }
    Ok(report)
}
