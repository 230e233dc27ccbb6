//! The relay's state as numbers, for `/metrics` (Prometheus text format) and `/readyz`.
//!
//! Plain atomics updated by the pipeline; rendering reads them without locks.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// ClickHouse failures, by kind, as counted in `outbox_relay_clickhouse_errors_total`.
pub const CLICKHOUSE_ERROR_KINDS: [&str; 4] = ["network", "timeout", "server", "other"];

/// A histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_micro: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_micro.fetch_add((value * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}\n{name}_count {count}",
            self.sum_micro.load(Relaxed) as f64 / 1e6
        );
    }
}

/// Everything `/metrics` shows.
pub struct Metrics {
    pub events_shipped: AtomicU64,
    pub batches_shipped: AtomicU64,
    pub batch_rows: Histogram,
    pub batch_bytes: Histogram,
    pub batch_seconds: Histogram,
    clickhouse_errors: [AtomicU64; 4],
    pub postgres_errors: AtomicU64,
    /// Last position confirmed to the slot.
    pub confirmed_lsn: AtomicU64,
    /// Highest WAL position the server reported.
    pub server_wal_lsn: AtomicU64,
    /// Commit time (Unix µs) of the oldest transaction not yet confirmed; 0 when none.
    pub pending_since_us: AtomicI64,
    /// A replication session is streaming.
    pub replicating: AtomicBool,
    /// Rows in the dead-letter table (always 0 until dead letters exist).
    pub dead_letters: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        const ROWS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];
        const BYTES: &[f64] = &[1e3, 1e4, 1e5, 1e6, 1e7, 1e8];
        const SECONDS: &[f64] = &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        Metrics {
            events_shipped: AtomicU64::new(0),
            batches_shipped: AtomicU64::new(0),
            batch_rows: Histogram::new(ROWS),
            batch_bytes: Histogram::new(BYTES),
            batch_seconds: Histogram::new(SECONDS),
            clickhouse_errors: Default::default(),
            postgres_errors: AtomicU64::new(0),
            confirmed_lsn: AtomicU64::new(0),
            server_wal_lsn: AtomicU64::new(0),
            pending_since_us: AtomicI64::new(0),
            replicating: AtomicBool::new(false),
            dead_letters: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Records a shipped batch: its rows, RowBinary bytes and the time ClickHouse took.
    pub fn batch_shipped(&self, rows: u64, bytes: u64, flush: Duration) {
        self.events_shipped.fetch_add(rows, Relaxed);
        self.batches_shipped.fetch_add(1, Relaxed);
        self.batch_rows.observe(rows as f64);
        self.batch_bytes.observe(bytes as f64);
        self.batch_seconds.observe(flush.as_secs_f64());
    }

    /// Counts a ClickHouse failure under one of [`CLICKHOUSE_ERROR_KINDS`].
    pub fn clickhouse_error(&self, kind: &str) {
        let i = CLICKHOUSE_ERROR_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(CLICKHOUSE_ERROR_KINDS.len() - 1);
        self.clickhouse_errors[i].fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, now_unix_us: i64) -> String {
        let mut out = String::with_capacity(4096);
        let mut gauge = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let confirmed = self.confirmed_lsn.load(Relaxed);
        let server = self.server_wal_lsn.load(Relaxed);
        let pending = self.pending_since_us.load(Relaxed);
        gauge(
            "outbox_relay_events_shipped_total",
            "counter",
            "Events written to ClickHouse.",
            self.events_shipped.load(Relaxed).to_string(),
        );
        gauge(
            "outbox_relay_batches_shipped_total",
            "counter",
            "Batches (ClickHouse inserts) accepted.",
            self.batches_shipped.load(Relaxed).to_string(),
        );
        gauge(
            "outbox_relay_confirmed_lsn",
            "gauge",
            "WAL position last confirmed to the slot, as a number.",
            confirmed.to_string(),
        );
        gauge(
            "outbox_relay_lag_bytes",
            "gauge",
            "WAL bytes between the server's reported position and the confirmed one.",
            server.saturating_sub(confirmed).to_string(),
        );
        gauge(
            "outbox_relay_lag_seconds",
            "gauge",
            "Age of the oldest committed transaction not yet in ClickHouse (0 when none).",
            if pending == 0 {
                "0".into()
            } else {
                format!("{:.3}", (now_unix_us - pending).max(0) as f64 / 1e6)
            },
        );
        gauge(
            "outbox_relay_slot_active",
            "gauge",
            "1 while a replication session streams from the slot.",
            u8::from(self.replicating.load(Relaxed)).to_string(),
        );
        gauge(
            "outbox_relay_dead_letters",
            "gauge",
            "Events in the dead-letter table.",
            self.dead_letters.load(Relaxed).to_string(),
        );
        gauge(
            "outbox_relay_postgres_errors_total",
            "counter",
            "Replication sessions ended by a PostgreSQL error.",
            self.postgres_errors.load(Relaxed).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP outbox_relay_clickhouse_errors_total ClickHouse failures by kind.\n\
             # TYPE outbox_relay_clickhouse_errors_total counter"
        );
        for (kind, n) in CLICKHOUSE_ERROR_KINDS.iter().zip(&self.clickhouse_errors) {
            let _ = writeln!(
                out,
                "outbox_relay_clickhouse_errors_total{{kind=\"{kind}\"}} {}",
                n.load(Relaxed)
            );
        }
        self.batch_rows.render(
            &mut out,
            "outbox_relay_batch_rows",
            "Rows per shipped batch.",
        );
        self.batch_bytes.render(
            &mut out,
            "outbox_relay_batch_bytes",
            "RowBinary bytes per shipped batch.",
        );
        self.batch_seconds.render(
            &mut out,
            "outbox_relay_batch_flush_seconds",
            "Time ClickHouse took to accept a batch.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.batch_shipped(250, 20_000, Duration::from_millis(30));
        m.batch_shipped(5, 400, Duration::from_millis(3));
        m.clickhouse_error("timeout");
        m.confirmed_lsn.store(100, Relaxed);
        m.server_wal_lsn.store(160, Relaxed);
        let text = m.render(0);
        for line in [
            "outbox_relay_events_shipped_total 255",
            "outbox_relay_batches_shipped_total 2",
            "outbox_relay_lag_bytes 60",
            "outbox_relay_lag_seconds 0",
            "outbox_relay_clickhouse_errors_total{kind=\"timeout\"} 1",
            "outbox_relay_batch_rows_bucket{le=\"10\"} 1",
            "outbox_relay_batch_rows_bucket{le=\"1000\"} 2",
            "outbox_relay_batch_rows_bucket{le=\"+Inf\"} 2",
            "outbox_relay_batch_flush_seconds_sum 0.033",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
