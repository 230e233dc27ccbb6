//! What the relay loop keeps in PostgreSQL beside the slot: checkpoints (for operators and
//! replay) and dead letters, and the check that the publication still covers the outbox.
//! [`PgStore`] keeps them in the tables `outbox-relay setup` creates; the loop's tests in memory.

use pgoutput::Lsn;
use tracing::{debug, warn};

use super::RelayError;
use crate::config::Config;
use crate::event::OwnedEventRow;
use crate::ops::replay;
use crate::pg::{self, PgError};
use crate::store::deadletter;

/// The PostgreSQL-side tables of the relay loop.
pub trait Store: Send + Sync {
    /// Records a checkpoint at `confirmed` after `rows` shipped; a failure to write it only
    /// warns. Fails when the publication's coverage changed.
    fn checkpoint(
        &self,
        confirmed: Lsn,
        rows: u64,
    ) -> impl std::future::Future<Output = Result<(), RelayError>> + Send;

    /// Keeps a row the sink refused, with why; whether it was new.
    fn dead_letter(
        &self,
        row: &OwnedEventRow,
        error: &str,
    ) -> impl std::future::Future<Output = Result<bool, PgError>> + Send;

    /// Keeps an outbox row that cannot become an event, with its WAL position, its values and
    /// why; whether it was new.
    fn unmapped(
        &self,
        id: &[u8; 16],
        position: (Lsn, u32),
        raw: &serde_json::Value,
        why: &str,
    ) -> impl std::future::Future<Output = Result<bool, PgError>> + Send;

    /// Fails when the outbox's inserts are no longer streamed as when the session started.
    fn check_coverage(&self) -> impl std::future::Future<Output = Result<(), RelayError>> + Send;
}

/// The relay's tables in PostgreSQL, over the session's SQL connection.
pub struct PgStore<'a> {
    pub sql: tokio_postgres::Client,
    pub config: &'a Config,
    /// The publication's coverage of the outbox table when the session started
    /// ([`pg::coverage`]); checked again periodically and with every checkpoint.
    pub coverage: String,
}

impl PgStore<'_> {
    fn coverage_changed(&self) -> RelayError {
        RelayError::Uncovered(format!(
            "publication {:?} or outbox table {:?}.{:?} changed while streaming (dropped and \
             created again, swapped, taken out of the publication): PostgreSQL may have skipped \
             outbox inserts; the next session re-ships them from the outbox table",
            self.config.publication, self.config.outbox_schema, self.config.outbox_table
        ))
    }
}

impl Store for PgStore<'_> {
    /// See [`replay::record_checkpoint`].
    async fn checkpoint(&self, confirmed: Lsn, rows: u64) -> Result<(), RelayError> {
        let sql = &self.sql;
        match replay::record_checkpoint(sql, self.config, confirmed, rows, &self.coverage).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.coverage_changed()),
            // PostgreSQL going away: the session's failure says so, once.
            Err(e) if sql.is_closed() => {
                debug!(error = %e, "cannot record a checkpoint; shipping goes on");
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "cannot record a checkpoint; shipping goes on");
                Ok(())
            }
        }
    }

    async fn dead_letter(&self, row: &OwnedEventRow, error: &str) -> Result<bool, PgError> {
        deadletter::record(&self.sql, self.config, row, error).await
    }

    async fn unmapped(
        &self,
        id: &[u8; 16],
        (commit_lsn, tx_seq): (Lsn, u32),
        raw: &serde_json::Value,
        why: &str,
    ) -> Result<bool, PgError> {
        deadletter::record_unmapped(&self.sql, self.config, id, (commit_lsn.0, tx_seq), raw, why)
            .await
    }

    async fn check_coverage(&self) -> Result<(), RelayError> {
        match pg::coverage(&self.sql, self.config).await? {
            pg::Coverage::Covered { fingerprint } if fingerprint == self.coverage => Ok(()),
            pg::Coverage::Covered { .. } => Err(self.coverage_changed()),
            pg::Coverage::Uncovered(why) => Err(RelayError::Uncovered(why)),
        }
    }
}
