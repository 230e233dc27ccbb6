//! The relay's state as numbers, for `/metrics` (Prometheus text format) and `/readyz`.
//!
//! Plain atomics updated by the pipeline; rendering reads them without locks.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// ClickHouse failures, by kind, as counted in `outbox_relay_clickhouse_errors_total`.
pub const CLICKHOUSE_ERROR_KINDS: [&str; 4] = ["network", "timeout", "server", "other"];

/// Why the relay is (not) shipping, as `outbox_relay_state{state="..."}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Before the first session streams.
    Starting = 0,
    /// A replication session streams and ships.
    Streaming = 1,
    /// ClickHouse failed; waiting for it to answer again.
    WaitingForClickHouse = 2,
    /// PostgreSQL (or the replication connection) failed; waiting for it to answer again.
    WaitingForPostgres = 3,
    /// The publication does not (or no longer) cover the outbox table; waiting for a fix.
    WaitingForPublication = 4,
    /// A permanent error stopped the relay.
    StoppedOnError = 5,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Starting,
        State::Streaming,
        State::WaitingForClickHouse,
        State::WaitingForPostgres,
        State::WaitingForPublication,
        State::StoppedOnError,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Streaming => "streaming",
            State::WaitingForClickHouse => "waiting_for_clickhouse",
            State::WaitingForPostgres => "waiting_for_postgres",
            State::WaitingForPublication => "waiting_for_publication",
            State::StoppedOnError => "stopped_on_error",
        }
    }
}

/// The slot's `wal_status` values, as `outbox_relay_slot_wal_status{wal_status="..."}` shows them.
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

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
    /// Commit time (Unix µs) of the oldest committed event not yet in ClickHouse; 0 when none.
    /// Kept across failed sessions; while no session streams, the PostgreSQL watcher fills it
    /// from the outbox table (see `pipeline::watch_postgres`).
    pub pending_since_us: AtomicI64,
    /// Commit time (Unix µs) of the last transaction shipped; 0 before the first.
    pub last_shipped_commit_us: AtomicI64,
    /// WAL bytes between PostgreSQL's current position and the slot's confirmed one, as
    /// PostgreSQL last said; -1 before it first answered.
    pub slot_lag_bytes: AtomicI64,
    /// The slot's `wal_status` as PostgreSQL last said (index into [`WAL_STATUSES`]; 255: unknown).
    pub slot_wal_status: AtomicU8,
    /// The last query of the PostgreSQL watcher succeeded.
    pub postgres_up: AtomicBool,
    /// [`State`] as a number.
    state: AtomicU8,
    /// A replication session is streaming.
    pub replicating: AtomicBool,
    /// Rows in the dead-letter table (always 0 until dead letters exist).
    pub dead_letters: AtomicU64,
    /// When ClickHouse last answered (an insert accepted, a check answered), Unix µs; 0: never.
    pub clickhouse_ok_at_us: AtomicI64,
    /// Why ClickHouse failed, when it failed after it last answered.
    clickhouse_failure: Mutex<Option<String>>,
    /// Connections to the HTTP endpoint refused because it served its maximum already.
    pub http_refused: AtomicU64,
    /// Failed accepts on the HTTP endpoint (e.g. out of file descriptors).
    pub http_accept_errors: AtomicU64,
    /// The background verifier's findings (crates/relay/src/ops/verify.rs).
    pub verify: VerifyGauges,
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
            last_shipped_commit_us: AtomicI64::new(0),
            slot_lag_bytes: AtomicI64::new(-1),
            slot_wal_status: AtomicU8::new(u8::MAX),
            postgres_up: AtomicBool::new(false),
            state: AtomicU8::new(State::Starting as u8),
            replicating: AtomicBool::new(false),
            dead_letters: AtomicU64::new(0),
            clickhouse_ok_at_us: AtomicI64::new(0),
            clickhouse_failure: Mutex::new(None),
            http_refused: AtomicU64::new(0),
            http_accept_errors: AtomicU64::new(0),
            verify: Default::default(),
        }
    }
}

impl Metrics {
    pub fn set_state(&self, state: State) {
        self.state.store(state as u8, Relaxed);
    }

    pub fn state(&self) -> State {
        let n = self.state.load(Relaxed);
        State::ALL
            .into_iter()
            .find(|s| *s as u8 == n)
            .unwrap_or(State::Starting)
    }

    /// Records the slot as PostgreSQL describes it.
    pub fn slot_seen(&self, lag_bytes: Option<i64>, wal_status: Option<&str>) {
        self.slot_lag_bytes
            .store(lag_bytes.unwrap_or(0).max(0), Relaxed);
        let status = wal_status
            .and_then(|w| WAL_STATUSES.iter().position(|s| *s == w))
            .map_or(u8::MAX, |i| i as u8);
        self.slot_wal_status.store(status, Relaxed);
    }

    /// Notes that the events up to a commit at `commit_time_us` (Unix µs) are not in
    /// ClickHouse yet; the oldest such commit is kept.
    pub fn pending(&self, commit_time_us: i64) {
        let _ = self
            .pending_since_us
            .compare_exchange(0, commit_time_us, Relaxed, Relaxed);
    }

    /// Records a shipped batch: its rows, RowBinary bytes and the time ClickHouse took.
    pub fn batch_shipped(&self, rows: u64, bytes: u64, flush: Duration) {
        self.events_shipped.fetch_add(rows, Relaxed);
        self.batches_shipped.fetch_add(1, Relaxed);
        self.batch_rows.observe(rows as f64);
        self.batch_bytes.observe(bytes as f64);
        self.batch_seconds.observe(flush.as_secs_f64());
        self.clickhouse_answered(unix_now_us());
    }

    /// Records that ClickHouse answered (at Unix µs `now`).
    pub fn clickhouse_answered(&self, now_unix_us: i64) {
        self.clickhouse_ok_at_us.store(now_unix_us, Relaxed);
        if let Ok(mut failure) = self.clickhouse_failure.lock() {
            *failure = None;
        }
    }

    /// Records that ClickHouse failed, and why.
    pub fn clickhouse_failed(&self, error: String) {
        if let Ok(mut failure) = self.clickhouse_failure.lock() {
            *failure = Some(error);
        }
    }

    /// `/readyz`: Ok when a replication session is streaming and ClickHouse answered within
    /// `window` without failing since; otherwise what is wrong. Reads memory only.
    pub fn readiness(&self, now_unix_us: i64, window: Duration) -> Result<(), String> {
        let failure = self
            .clickhouse_failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .map(|e| format!("ClickHouse unreachable: {e}"));
        let ok_at = self.clickhouse_ok_at_us.load(Relaxed);
        let stale = (ok_at == 0 || now_unix_us - ok_at > window.as_micros() as i64).then(|| {
            format!(
                "ClickHouse has not answered for {} s (it is checked every few seconds; see the relay's log)",
                if ok_at == 0 {
                    "more than ".to_string() + &window.as_secs().to_string()
                } else {
                    ((now_unix_us - ok_at) / 1_000_000).to_string()
                }
            )
        });
        let clickhouse = failure.or(stale);
        match (self.replicating.load(Relaxed), clickhouse) {
            (true, None) => Ok(()),
            (true, Some(ch)) => Err(ch),
            (false, ch) => Err(format!(
                "not replicating (see the relay's log){}",
                ch.map(|e| format!("; {e}")).unwrap_or_default()
            )),
        }
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
        let slot_lag = self.slot_lag_bytes.load(Relaxed);
        gauge(
            "outbox_relay_lag_bytes",
            "gauge",
            "WAL bytes between PostgreSQL's current position and the slot's confirmed one.",
            if slot_lag >= 0 {
                slot_lag.to_string()
            } else {
                server.saturating_sub(confirmed).to_string()
            },
        );
        gauge(
            "outbox_relay_lag_seconds",
            "gauge",
            "Age of the oldest committed event not yet in ClickHouse (0 when none).",
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
            "outbox_relay_postgres_up",
            "gauge",
            "1 while PostgreSQL answers the relay's periodic slot query.",
            u8::from(self.postgres_up.load(Relaxed)).to_string(),
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
        gauge(
            "outbox_relay_http_connections_refused_total",
            "counter",
            "Connections to this endpoint closed at once because it served its maximum already.",
            self.http_refused.load(Relaxed).to_string(),
        );
        gauge(
            "outbox_relay_http_accept_errors_total",
            "counter",
            "Connections this endpoint failed to accept (e.g. out of file descriptors).",
            self.http_accept_errors.load(Relaxed).to_string(),
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
        let state = self.state();
        let _ = writeln!(
            out,
            "# HELP outbox_relay_state Why the relay is (not) shipping: 1 for the current state.\n\
             # TYPE outbox_relay_state gauge"
        );
        for s in State::ALL {
            let _ = writeln!(
                out,
                "outbox_relay_state{{state=\"{}\"}} {}",
                s.name(),
                u8::from(s == state)
            );
        }
        let wal_status = self.slot_wal_status.load(Relaxed) as usize;
        if wal_status < WAL_STATUSES.len() {
            let _ = writeln!(
                out,
                "# HELP outbox_relay_slot_wal_status The slot's wal_status in PostgreSQL: 1 for the current one.\n\
                 # TYPE outbox_relay_slot_wal_status gauge"
            );
            for (i, s) in WAL_STATUSES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "outbox_relay_slot_wal_status{{wal_status=\"{s}\"}} {}",
                    u8::from(i == wal_status)
                );
            }
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
        self.verify.render(&mut out);
        out
    }
}

/// Now, in Unix microseconds.
pub fn unix_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// What the background verifier publishes on `/metrics`.
#[derive(Debug)]
pub struct VerifyGauges {
    /// Unix µs up to which the stream is proven complete; 0 before the first pass.
    pub verified_through_us: AtomicI64,
    pub missing: AtomicU64,
    pub extra: AtomicU64,
    /// Passes that could not check (a server down, the relay behind).
    pub errors: AtomicU64,
}

impl Default for VerifyGauges {
    fn default() -> Self {
        VerifyGauges {
            verified_through_us: AtomicI64::new(0),
            missing: AtomicU64::new(0),
            extra: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }
}

impl VerifyGauges {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        for (name, kind, help, value) in [
            (
                "outbox_relay_verified_through_seconds",
                "gauge",
                "Unix time up to which every outbox event is proven in ClickHouse exactly once (0: not yet).",
                format!("{:.6}", self.verified_through_us.load(Relaxed) as f64 / 1e6),
            ),
            (
                "outbox_relay_missing_events",
                "gauge",
                "Outbox events the last verification found missing in ClickHouse.",
                self.missing.load(Relaxed).to_string(),
            ),
            (
                "outbox_relay_extra_events",
                "gauge",
                "Event ids the last verification found in ClickHouse more than once or not in the outbox.",
                self.extra.load(Relaxed).to_string(),
            ),
            (
                "outbox_relay_verify_errors_total",
                "counter",
                "Verification passes that could not check.",
                self.errors.load(Relaxed).to_string(),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
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
            "outbox_relay_state{state=\"starting\"} 1",
            "outbox_relay_state{state=\"streaming\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn lag_and_state_from_postgres_view() {
        let m = Metrics::default();
        m.confirmed_lsn.store(100, Relaxed);
        m.server_wal_lsn.store(160, Relaxed);
        m.slot_seen(Some(18_000_000), Some("extended"));
        m.pending(5_000_000);
        m.pending(7_000_000); // the oldest stays
        m.set_state(State::WaitingForClickHouse);
        let text = m.render(25_000_000);
        for line in [
            "outbox_relay_lag_bytes 18000000",
            "outbox_relay_lag_seconds 20.000",
            "outbox_relay_state{state=\"waiting_for_clickhouse\"} 1",
            "outbox_relay_state{state=\"streaming\"} 0",
            "outbox_relay_slot_wal_status{wal_status=\"extended\"} 1",
            "outbox_relay_slot_wal_status{wal_status=\"reserved\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn readiness_from_memory() {
        let m = Metrics::default();
        let window = Duration::from_secs(30);
        let err = m.readiness(100_000_000, window).unwrap_err();
        assert!(err.starts_with("not replicating"), "{err}");
        m.replicating.store(true, Relaxed);
        let err = m.readiness(100_000_000, window).unwrap_err();
        assert!(err.contains("ClickHouse has not answered"), "{err}");
        m.clickhouse_answered(100_000_000);
        assert_eq!(m.readiness(129_000_000, window), Ok(()));
        let err = m.readiness(131_000_000, window).unwrap_err();
        assert!(err.contains("not answered for 31 s"), "{err}");
        m.clickhouse_failed("connection refused".into());
        let err = m.readiness(101_000_000, window).unwrap_err();
        assert_eq!(err, "ClickHouse unreachable: connection refused");
        m.clickhouse_answered(102_000_000);
        assert_eq!(m.readiness(103_000_000, window), Ok(()));
    }
}
