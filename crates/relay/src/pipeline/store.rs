//! What the relay loop keeps in PostgreSQL beside the slot: checkpoints (for operators and
//! replay) and dead letters, and the check that the publication still covers the outbox.
//! [`PgStore`] keeps them in the tables `outbox-relay setup` creates; the loop's tests in memory.

use pgoutput::Lsn;
use tracing::{debug, warn};

use super::RelayError;
use crate::config::Config;
use crate::event::OwnedEventRow;
use crate::pg::PgError;
use crate::store::checkpoint;
use crate::store::coverage;
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

    /// Fails when the outbox's inserts are no longer streamed as when the session started
    /// (recording the window from `confirmed` on for the next session to re-ship).
    fn check_coverage(
        &self,
        confirmed: Lsn,
    ) -> impl std::future::Future<Output = Result<(), RelayError>> + Send;

    /// A Relation message of a table with the outbox's name, `relation_id`, at `lsn`: fails
    /// when it is not a table this session saw covered (swapped in and published between two
    /// checks: its earlier rows were skipped), after recording the window from `confirmed` on
    /// with that table, for the next session to re-ship.
    fn outbox_relation(
        &self,
        relation_id: u32,
        lsn: Lsn,
        confirmed: Lsn,
    ) -> impl std::future::Future<Output = Result<(), RelayError>> + Send;
}

/// The relay's tables in PostgreSQL, over the session's SQL connection.
pub struct PgStore<'a> {
    pub sql: tokio_postgres::Client,
    pub config: &'a Config,
    /// The publication's coverage of the outbox table when the session started
    /// ([`coverage::coverage`]); checked again periodically and with every checkpoint.
    pub coverage: String,
    /// The tables (by oid) that were the outbox table in this session's view: the covered one
    /// and those a coverage replay re-ships from. A Relation message of another table with the
    /// outbox's name means a table was swapped in and published between two checks.
    pub outbox_tables: Vec<u32>,
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
    /// See [`checkpoint::record_checkpoint`].
    async fn checkpoint(&self, confirmed: Lsn, rows: u64) -> Result<(), RelayError> {
        let sql = &self.sql;
        match checkpoint::record_checkpoint(sql, self.config, confirmed, rows, &self.coverage).await
        {
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

    async fn check_coverage(&self, confirmed: Lsn) -> Result<(), RelayError> {
        match coverage::coverage(&self.sql, self.config).await? {
            coverage::Coverage::Covered { fingerprint } if fingerprint == self.coverage => Ok(()),
            coverage::Coverage::Covered { .. } => Err(self.coverage_changed()),
            coverage::Coverage::Uncovered { why, table } => {
                let mut tables = self.outbox_tables.clone();
                tables.extend(table);
                Err(uncovered(&self.sql, self.config, confirmed, &tables, why).await)
            }
        }
    }

    async fn outbox_relation(
        &self,
        relation_id: u32,
        lsn: Lsn,
        confirmed: Lsn,
    ) -> Result<(), RelayError> {
        if self.outbox_tables.contains(&relation_id) {
            return Ok(());
        }
        let mut tables = self.outbox_tables.clone();
        tables.push(relation_id);
        checkpoint::record_pending(&self.sql, self.config, confirmed, &tables).await?;
        warn!(
            table_oid = relation_id, wal_lsn = %lsn, from_lsn = %confirmed,
            "another table of the outbox's name appears in the stream (swapped in and published \
             between two coverage checks): its rows written before it was published were \
             skipped by PostgreSQL; the next session re-ships them from that table"
        );
        Err(self.coverage_changed())
    }
}

/// The outbox is not covered: PostgreSQL skips its inserts from now until it is again. Records
/// the window from `from` as pending with `tables` (the tables of the outbox's name seen so far,
/// [`checkpoint::record_pending`] adds the newest checkpoint's), so that whatever coverage comes
/// back (even the same one, after a table swapped in and out again) re-ships what was skipped.
pub(super) async fn uncovered(
    sql: &tokio_postgres::Client,
    config: &Config,
    from: Lsn,
    tables: &[u32],
    why: String,
) -> RelayError {
    match checkpoint::record_pending(sql, config, from, tables).await {
        Ok(()) => RelayError::Uncovered(why),
        // Still not covered, which is what the operator must fix first; recorded next time.
        Err(e) => {
            RelayError::Uncovered(format!("{why} (the window could not be recorded yet: {e})"))
        }
    }
}
