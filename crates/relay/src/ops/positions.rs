//! WAL positions an operator gives a command (`replay --from-lsn`, `verify --from-lsn`): one
//! check, [`check_lsn`], so that a typo is an error naming the server's position instead of an
//! empty, successful run.

use pgoutput::Lsn;
use tokio_postgres::Client;

use crate::config::Config;
use crate::pg::PgError;
use crate::store::schema::checkpoints_table;

/// A position no command can start from, or the server's error while checking it.
///
/// Every variant but [`PositionError::Postgres`] means the input is wrong and nothing was done:
/// the CLI exits with 2 for them ([`PositionError::is_bad_input`]; docs/operations.md, "Exit
/// codes"). Wrap it as a `#[source]` (`#[error("{0}")] Position(#[from] PositionError)`), not
/// `transparent`, so that it stays in the error's chain, where the CLI looks for it.
#[derive(Debug, thiserror::Error)]
pub enum PositionError {
    /// Past the end of the server's WAL: no transaction committed there yet.
    #[error(
        "WAL position {lsn} is past the end of this server's WAL ({current}, \
         pg_current_wal_lsn()): nothing was committed there yet. A typo? Positions the relay \
         saw: `outbox-relay status` (confirmed_flush_lsn, last_checkpoint) and the confirmed_lsn \
         column of the checkpoints table; 0/0 means the whole outbox"
    )]
    PastWal { lsn: Lsn, current: Lsn },
    /// Before the oldest checkpoint the relay keeps: the outbox may no longer hold every event
    /// committed since (its rows are purged with the checkpoints).
    #[error(
        "WAL position {lsn} is before the oldest checkpoint kept for slot {slot:?} ({oldest}; \
         the server is at {current}): the outbox may no longer hold every event committed after \
         {lsn} (older rows were purged with their checkpoints, `outbox_retention_hours`). Use a \
         position from {oldest} on, or 0/0 for everything the outbox still holds"
    )]
    BeforeCheckpoints {
        lsn: Lsn,
        slot: String,
        oldest: Lsn,
        current: Lsn,
    },
    /// No checkpoint at all for the slot: nothing tells which outbox rows were committed after
    /// the position.
    #[error(
        "no checkpoint is kept for slot {slot:?} (run `outbox-relay setup`, which records the \
         first one; the server is at {current}): nothing tells which outbox events were \
         committed after {lsn}. Use 0/0 for everything the outbox holds"
    )]
    NoCheckpoint {
        lsn: Lsn,
        slot: String,
        current: Lsn,
    },
    #[error(transparent)]
    Postgres(#[from] PgError),
}

impl PositionError {
    /// Whether the position itself is wrong (exit code 2), not the server's answer.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, PositionError::Postgres(_))
    }
}

/// Checks a position a command is to start from: `0/0` (the whole outbox) always passes;
/// anything else must be at most the server's current WAL position (`pg_current_wal_lsn()`,
/// so `client` must be on the primary) and at or after the slot's oldest checkpoint
/// (`snapshot_lsn`), the oldest position replay can start from.
pub async fn check_lsn(client: &Client, config: &Config, lsn: Lsn) -> Result<(), PositionError> {
    let row = client
        .query_one(
            &format!(
                "SELECT pg_current_wal_lsn()::text,
                        (SELECT min(snapshot_lsn)::text FROM {} WHERE slot = $1)",
                checkpoints_table(config)
            ),
            &[&config.slot],
        )
        .await
        .map_err(PgError::query("WAL position check"))?;
    let current = parse(row.get(0))?;
    let oldest = row.get::<_, Option<String>>(1).map(parse).transpose()?;
    position_problem(config, lsn, current, oldest).map_or(Ok(()), Err)
}

/// The problem of starting from `lsn` when the server is at `current` and the slot's oldest
/// checkpoint at `oldest`, if any.
fn position_problem(
    config: &Config,
    lsn: Lsn,
    current: Lsn,
    oldest: Option<Lsn>,
) -> Option<PositionError> {
    if lsn == Lsn(0) {
        return None;
    }
    if lsn > current {
        return Some(PositionError::PastWal { lsn, current });
    }
    let slot = config.slot.clone();
    match oldest {
        None => Some(PositionError::NoCheckpoint { lsn, slot, current }),
        Some(oldest) if lsn < oldest => Some(PositionError::BeforeCheckpoints {
            lsn,
            slot,
            oldest,
            current,
        }),
        Some(_) => None,
    }
}

fn parse(text: String) -> Result<Lsn, PgError> {
    text.parse()
        .map_err(|_| PgError::NotReady(format!("PostgreSQL answered {text:?}, not a WAL position")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_past_the_wal_or_before_the_checkpoints_are_refused() {
        let config = Config::default();
        let (current, oldest) = (Lsn(0x2B10_EAA0), Some(Lsn(0x0100_0000)));
        let check = |lsn, oldest| position_problem(&config, Lsn(lsn), current, oldest);
        assert!(check(0, None).is_none(), "0/0: the whole outbox");
        assert!(check(0x2B10_EAA0, oldest).is_none());
        assert!(check(0x0100_0000, oldest).is_none());
        let past = check(0xFF_0000_0000, oldest).map(|e| e.to_string());
        assert!(
            past.as_deref()
                .is_some_and(|e| e.contains("FF/0 is past the end") && e.contains("(0/2B10EAA0")),
            "{past:?}"
        );
        let before = check(0x10, oldest).map(|e| e.to_string());
        assert!(
            before
                .as_deref()
                .is_some_and(|e| e.contains("0/10 is before the oldest checkpoint")
                    && e.contains("(0/1000000;")
                    && e.contains("0/0 for everything")),
            "{before:?}"
        );
        assert!(matches!(
            check(0x10, None),
            Some(PositionError::NoCheckpoint { .. })
        ));
        assert!(check(0x10, None).is_some_and(|e| e.is_bad_input()));
    }
}
