//! The background verifier inside `run`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tracing::{info, warn};

use super::{Memory, Options, RESWEEP_ROWS_PER_S, VerifyError, VerifyReport, compare};
use crate::config::Config;
use crate::pg;
use crate::reship;
use crate::sink::ClickHouseSink;

/// The background verifier of `run`: every `verify_interval_s`, verifies every event the
/// outbox holds, hashing only the rows that came since the last pass (see [`Memory`]).
pub async fn verify_forever(config: Config, gauges: Arc<crate::metrics::Metrics>) {
    if config.verify_lookback_hours.is_some() {
        warn!(
            "verify_lookback_hours is no longer used: the background verifier compares every \
             event the outbox holds (docs/guarantees.md, \"What `verify` proves\"); remove it"
        );
    }
    if config.verify_interval_s == 0 {
        return;
    }
    let grace = Duration::from_secs(config.verify_grace_s);
    // The first pass after one grace period: the relay has started streaming by then.
    tokio::time::sleep(grace.min(Duration::from_secs(config.verify_interval_s))).await;
    let mut every = tokio::time::interval(Duration::from_secs(config.verify_interval_s));
    // A pass longer than the interval is followed by one a full interval later, not by
    // back-to-back catch-up passes.
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sink: Option<ClickHouseSink> = None;
    let mut memory = Memory::new(RESWEEP_ROWS_PER_S.saturating_mul(config.verify_interval_s));
    loop {
        every.tick().await;
        let gauges = &gauges.verify;
        match verify_pass(&config, &mut sink, &mut memory).await {
            Ok(mut report) => {
                for w in &report.differing_windows {
                    warn!(
                        from = %w.from, until = %w.until, missing = w.missing, extra = w.extra,
                        altered = w.altered, outbox_events = w.outbox_events,
                        clickhouse_rows = w.clickhouse_rows,
                        "verify: window differs between the outbox and ClickHouse; see `outbox-relay verify`"
                    );
                }
                // Repaired after the differing windows are logged, so the log shows the loss
                // before its repair.
                if config.verify_repair
                    && !report.missing.is_empty()
                    && let Some(sink) = &sink
                {
                    let wait = Duration::from_secs(config.verify_grace_s.max(30));
                    match reship::reship_ids(&config, sink, &report.missing, wait).await {
                        Ok(r) => report.repair = Some(r),
                        Err(e) => warn!(error = %e, "verify: repair failed; will try again"),
                    }
                }
                gauges
                    .verified_through_us
                    .store(report.verified_through_us, Relaxed);
                let repaired = report.repair.as_ref().map_or(0, |r| r.shipped);
                let missing = report.missing.len() as u64 + report.unlisted;
                gauges
                    .missing
                    .store(missing.saturating_sub(repaired), Relaxed);
                gauges.extra.store(report.extra.len() as u64, Relaxed);
                gauges.altered.store(report.altered.len() as u64, Relaxed);
                if let Some(r) = &report.repair {
                    info!(
                        shipped = r.shipped,
                        already_there = r.already_there,
                        "verify: missing events re-shipped"
                    );
                }
            }
            Err(e) if e.yielded() => {
                gauges.yielded.inc();
                info!(
                    error = %e,
                    "verify pass gave way to a migration: not checked; the next pass checks it"
                );
            }
            Err(e) => {
                gauges.errors.inc();
                warn!(error = %e, "verify pass could not check; will try again");
            }
        }
    }
}

/// One background pass (public for tests: `run` calls it from [`verify_forever`]): every event
/// the outbox holds, in windows of `verify_window_s`, reusing what `memory` vouches for.
pub async fn verify_pass(
    config: &Config,
    sink: &mut Option<ClickHouseSink>,
    memory: &mut Memory,
) -> Result<VerifyReport, VerifyError> {
    if sink.is_none() {
        let client = pg::connect(config.postgres()).await?;
        let source = pg::source_identity(&client, config).await?;
        let writer = format!("{}-verify", config.slot);
        let made = ClickHouseSink::from_config(config, &writer).with_source(source);
        if made.cluster().is_some() {
            made.check_table().await?;
        }
        *sink = Some(made);
    }
    let Some(sink) = sink.as_ref() else {
        return Err(VerifyError::Range("no ClickHouse sink".into()));
    };
    let options = Options {
        range: None,
        from_lsn: None,
        window_us: config.verify_window_s as i64 * 1_000_000,
        wait: Duration::from_secs(config.verify_grace_s.max(30)),
        // verify_forever repairs after logging.
        repair: false,
    };
    compare(config, sink, &options, memory, false).await
}
