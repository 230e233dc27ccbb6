//! The loop that keeps a session alive: a failed session is followed by another, after a wait
//! for the server that failed, with the mode (streaming or re-sending) carried over. Generic over
//! [`Sessions`] so that the loop's tests drive this very code (`loop_tests.rs`).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Mode, RelayError};
use crate::config::Config;
use crate::metrics::{Metrics, State};

/// What the loop ([`drive`]) asks of the world around it.
pub(crate) trait Sessions {
    /// Runs one session until shutdown (`Ok`) or an error; `shipped` counts its batches.
    fn session(
        &self,
        mode: &mut Mode,
        shipped: &mut u64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = Result<(), RelayError>> + Send;

    /// What the relay does about a failed session's error by itself (moving a slot past WAL
    /// PostgreSQL cannot decode, creating a slot lost in a failover): the error the loop then
    /// handles.
    fn recover(&self, error: RelayError) -> impl std::future::Future<Output = RelayError> + Send;

    /// The wait after a transient failure, probing the server `state` names: `true` when it
    /// was down and answers again, `false` after `delay` otherwise.
    fn wait_for(
        &self,
        state: State,
        delay: Duration,
    ) -> impl std::future::Future<Output = bool> + Send;
}

/// Runs sessions until one ends on shutdown (`Ok`) or with a permanent error. Transient errors
/// are retried when the server that failed answers again, or after a [`Backoff`] wait when it
/// answers all along.
pub(crate) async fn drive(
    sessions: &impl Sessions,
    config: &Config,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let mut backoff = Backoff::new(config);
    let mut mode = Mode::Streaming;
    loop {
        let started = Instant::now();
        let mut shipped_batches = 0;
        let result = sessions
            .session(&mut mode, &mut shipped_batches, shutdown)
            .await;
        metrics.replicating.store(false, Relaxed);
        let e = match result {
            Ok(()) => return Ok(()),
            Err(RelayError::ClickHouse(e)) => {
                metrics.clickhouse_error(e.kind());
                metrics.clickhouse_failed(e.to_string());
                RelayError::ClickHouse(e)
            }
            Err(e) => {
                metrics.postgres_errors.inc();
                e
            }
        };
        let e = sessions.recover(e).await;
        if !e.is_transient() {
            return Err(e);
        }
        if shipped_batches > 0 || started.elapsed() > backoff.max {
            backoff.reset();
        }
        let delay = backoff.next();
        let state = e.waiting_state();
        metrics.set_state(state);
        warn!(error = %e, state = state.name(), retry_in_ms = delay.as_millis() as u64,
            "relay session failed; nothing was confirmed past ClickHouse, retrying \
             (once the server answers again if it is down)");
        tokio::select! {
            back = sessions.wait_for(state, delay) => {
                if back {
                    info!(state = state.name(), "the server answers again: reconnecting");
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        }
    }
}

/// Exponential backoff with jitter: the n-th wait in a row is drawn uniformly from
/// [¾·d, d], d = `retry_initial_ms` · 2^(n-1) capped at `retry_max_ms` (so each wait is
/// 1.5 to 2.7 times the one before until the cap).
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(config: &Config) -> Backoff {
        Backoff {
            initial: Duration::from_millis(config.retry_initial_ms),
            max: Duration::from_millis(config.retry_max_ms),
            attempt: 0,
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next(&mut self) -> Duration {
        let nominal = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt += 1;
        nominal.mul_f64(rand::random_range(JITTER..=1.0))
    }
}

/// The shortest wait, as a fraction of the nominal one.
const JITTER: f64 = 0.75;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let config = Config {
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
            ..Config::default()
        };
        for _ in 0..200 {
            let mut backoff = Backoff::new(&config);
            let mut previous: Option<Duration> = None;
            for n in 0..12u32 {
                let nominal = Duration::from_millis((500u64 << n).min(60_000));
                let wait = backoff.next();
                assert!(
                    wait >= nominal.mul_f64(JITTER) && wait <= nominal,
                    "wait {n}: {wait:?} outside [3/4, 1] x {nominal:?}"
                );
                if let Some(previous) = previous
                    && nominal < Duration::from_millis(60_000)
                {
                    let ratio = wait.as_secs_f64() / previous.as_secs_f64();
                    assert!(
                        (1.5..=2.67).contains(&ratio),
                        "wait {n}: {ratio}x the one before"
                    );
                }
                previous = Some(wait);
            }
            backoff.reset();
            assert!(backoff.next() <= Duration::from_millis(500));
        }
    }
}
