//! `outbox-relay replay --from-lsn X`: re-ships every event committed after X that ClickHouse
//! does not hold, from the outbox table ([`crate::reship`], docs/guarantees.md, "Replay").

use std::time::Duration;

use pgoutput::Lsn;

use crate::config::Config;
use crate::ops::positions::{self, PositionError};
use crate::pg::{self, PgError};
use crate::reship::{self, ReshipError};
use crate::sink::ClickHouseSink;

pub use crate::reship::ReplayReport;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// `--from-lsn` is past the server's WAL or before the oldest checkpoint
    /// ([`positions::check_lsn`]).
    #[error("{0}")]
    Position(#[from] PositionError),
    #[error(transparent)]
    Reship(#[from] ReshipError),
}

impl From<PgError> for ReplayError {
    fn from(e: PgError) -> ReplayError {
        ReplayError::Reship(e.into())
    }
}

/// Re-ships every outbox row committed after `from` that ClickHouse does not hold. A `from`
/// past the server's WAL or before the oldest checkpoint is refused before anything is done
/// ([`ReplayError::Position`]).
pub async fn replay(
    config: &Config,
    sink: &ClickHouseSink,
    from: Lsn,
    wait: Duration,
    dry_run: bool,
) -> Result<ReplayReport, ReplayError> {
    let client = pg::connect(config.postgres()).await?;
    positions::check_lsn(&client, config, from).await?;
    drop(client);
    Ok(reship::replay_tables(config, sink, from, wait, dry_run, None).await?)
}
