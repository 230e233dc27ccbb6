//! Reading the application's tables without ever standing in its way.
//!
//! A statement that reads the outbox holds a lock on it until its transaction ends (an
//! `ACCESS SHARE` lock for a `SELECT`, `ROW EXCLUSIVE` for the purge's `DELETE`). A migration's
//! `ALTER TABLE` queues behind that lock, and every application `INSERT` then queues behind the
//! `ALTER`: the application stops writing for as long as the relay's transaction lasts. So
//! everything the relay runs on the outbox (verify's snapshot, replay, repair, the purge) runs
//! on a [`Guarded`] connection: a watchdog on a connection of its own looks every
//! [`WATCH_INTERVAL`] for any session waiting on a lock the guarded connection holds, and when
//! it finds one, it ends the guarded connection's session (`pg_terminate_backend`, which also
//! ends a transaction idle between statements) and the work fails with
//! [`PgError::Yielded`]: the caller tries again later. A guarded connection also never waits
//! long for a lock itself (`lock_timeout`).

use std::future::Future;
use std::time::Duration;

use tokio_postgres::Client;

use super::PgError;

/// How often the watchdog looks for sessions waiting on the guarded connection's locks: an
/// application statement waits at most about this long behind a migration queued behind the
/// relay.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// The guarded connection's `lock_timeout`: it gives up waiting for a lock after this long.
pub const LOCK_TIMEOUT: &str = "5s";

/// A connection for work on the application's tables, and the watchdog that makes it give way.
pub struct Guarded {
    /// The connection to do the work on. After the work yielded its session is gone: open a
    /// new [`Guarded`] to try again.
    pub client: Client,
    pid: i32,
    watchdog: Client,
}

/// A session that waited on a lock of the guarded connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiter {
    pub pid: i32,
    /// Its statement (empty when the relay's role may not see other roles' statements).
    pub query: String,
    /// The lock it waited for (`AccessExclusiveLock on public.event_outbox`).
    pub lock: String,
}

impl std::fmt::Display for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PostgreSQL session {} waited for {}",
            self.pid, self.lock
        )?;
        if !self.query.is_empty() {
            let query: String = self.query.split_whitespace().collect::<Vec<_>>().join(" ");
            let short: String = query.chars().take(120).collect();
            write!(
                f,
                " ({short}{})",
                if short.len() < query.len() { "..." } else { "" }
            )?;
        }
        Ok(())
    }
}

impl Guarded {
    /// Opens the work connection (with `lock_timeout`, named `outbox-relay <work>` in
    /// `pg_stat_activity`) and its watchdog's to the primary of `target`.
    pub async fn connect(target: &crate::pgtls::Target, work: &str) -> Result<Guarded, PgError> {
        let client = super::connect(target).await?;
        let row = client
            .query_one(
                "SELECT pg_backend_pid(), set_config('lock_timeout', $1, false),
                        set_config('application_name', $2, false)",
                &[&LOCK_TIMEOUT, &format!("outbox-relay {work}")],
            )
            .await
            .map_err(PgError::query("session settings"))?;
        let pid: i32 = row.get(0);
        let watchdog = super::connect(target).await?;
        watchdog
            .execute(
                "SELECT set_config('application_name', $1, false)",
                &[&format!("outbox-relay {work} watchdog")],
            )
            .await
            .map_err(PgError::query("session settings"))?;
        Ok(Guarded {
            client,
            pid,
            watchdog,
        })
    }

    /// The work connection and the watchdog's handle, borrowed apart so that the work may use
    /// the connection mutably (transactions) while the watchdog looks on.
    pub fn split(&mut self) -> (&mut Client, GuardHandle<'_>) {
        (
            &mut self.client,
            GuardHandle {
                client: &self.watchdog,
                pid: self.pid,
            },
        )
    }
}

/// The watchdog's side of a [`Guarded`] connection.
pub struct GuardHandle<'a> {
    client: &'a Client,
    pid: i32,
}

impl GuardHandle<'_> {
    /// Runs `work` (on [`Guarded::client`]) while the watchdog looks out for sessions waiting on
    /// its locks; fails with [`PgError::Yielded`] (the work dropped, the session ended) when one
    /// does.
    pub async fn run<T, E: From<PgError>>(
        &self,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let watchdog = self;
        tokio::select! {
            biased;
            waiter = watchdog.waiter() => {
                let waiter = waiter?;
                // Ends the transaction (and its locks) whatever the session is doing: running a
                // statement, or idle between two.
                let _ = watchdog
                    .client
                    .execute("SELECT pg_terminate_backend($1)", &[&watchdog.pid])
                    .await;
                Err(PgError::Yielded(waiter).into())
            }
            result = work => result,
        }
    }

    /// Resolves with the first session found waiting on a lock the guarded connection holds.
    async fn waiter(&self) -> Result<Waiter, PgError> {
        let mut every = tokio::time::interval(WATCH_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            // pg_locks is readable by every role (pg_stat_activity's statements only by the
            // same role or pg_read_all_stats); pg_blocking_pids only for the few that wait.
            let row = self
                .client
                .query_opt(
                    "SELECT w.pid, coalesce(a.query, ''),
                            w.mode || ' on ' || coalesce(w.relation::regclass::text, w.locktype)
                       FROM (SELECT pid, mode, relation, locktype FROM pg_locks
                              WHERE NOT granted OFFSET 0) w
                       LEFT JOIN pg_stat_activity a ON a.pid = w.pid
                      WHERE $1 = ANY(pg_blocking_pids(w.pid))
                      LIMIT 1",
                    &[&self.pid],
                )
                .await
                .map_err(PgError::query("lock watch"))?;
            if let Some(row) = row {
                return Ok(Waiter {
                    pid: row.get(0),
                    query: row.get(1),
                    lock: row.get(2),
                });
            }
        }
    }
}
