//! The relay's state as numbers, for `/metrics` and `/readyz`.
//!
//! `/metrics` is encoded by the `prometheus-client` crate, in the text format the scraper asks
//! for ([`Format`]): OpenMetrics 1.0 when its `Accept` header names it (Prometheus does), the
//! Prometheus text format 0.0.4 otherwise (`curl`). Counters and histograms are the crate's own
//! (atomics; a histogram takes its short lock once per batch, never per event); the relay's other
//! state is plain atomics, read by `/readyz` too, and turned into gauges when a scrape asks
//! ([`Metrics::render`]).

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

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

/// Everything `/metrics` shows.
///
/// The pipeline updates it once per batch (counters by `inc_by`, the three histograms by one
/// `observe` each), never per event; the gauges are computed from these fields at scrape time.
pub struct Metrics {
    pub events_shipped: Counter,
    pub batches_shipped: Counter,
    pub batch_rows: Histogram,
    pub batch_bytes: Histogram,
    pub batch_seconds: Histogram,
    /// One series per [`CLICKHOUSE_ERROR_KINDS`], all present from the start.
    clickhouse_errors: Family<[(&'static str, &'static str); 1], Counter>,
    pub postgres_errors: Counter,
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
    pub http_refused: Counter,
    /// Failed accepts on the HTTP endpoint (e.g. out of file descriptors).
    pub http_accept_errors: Counter,
    /// The background verifier's findings (crates/relay/src/ops/verify/).
    pub verify: VerifyGauges,
}

impl Default for Metrics {
    fn default() -> Self {
        const ROWS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6];
        const BYTES: &[f64] = &[1e3, 1e4, 1e5, 1e6, 1e7, 1e8];
        const SECONDS: &[f64] = &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let clickhouse_errors = Family::default();
        for kind in CLICKHOUSE_ERROR_KINDS {
            drop(clickhouse_errors.get_or_create(&[("kind", kind)]));
        }
        Metrics {
            events_shipped: Counter::default(),
            batches_shipped: Counter::default(),
            batch_rows: Histogram::new(ROWS.iter().copied()),
            batch_bytes: Histogram::new(BYTES.iter().copied()),
            batch_seconds: Histogram::new(SECONDS.iter().copied()),
            clickhouse_errors,
            postgres_errors: Counter::default(),
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
            http_refused: Counter::default(),
            http_accept_errors: Counter::default(),
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
        self.events_shipped.inc_by(rows);
        self.batches_shipped.inc();
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
        let kind = CLICKHOUSE_ERROR_KINDS
            .into_iter()
            .find(|k| *k == kind)
            .unwrap_or(CLICKHOUSE_ERROR_KINDS[CLICKHOUSE_ERROR_KINDS.len() - 1]);
        self.clickhouse_errors
            .get_or_create(&[("kind", kind)])
            .inc();
    }

    /// The exposition of everything above, in `format`, at Unix µs `now_unix_us`.
    ///
    /// The registry is built for each scrape (a list of handles, cheap next to a scrape every
    /// few seconds) rather than kept with gauges set before encoding or a custom collector: its
    /// counters and histograms are clones of the live ones (shared atomics), and every gauge is
    /// a constant computed here from the relay's own state (the atomics `/readyz` reads too)
    /// and `now`. So no gauge keeps a second copy of a value, two scrapes at once cannot
    /// interleave "set, then encode", and tests render at a chosen `now`.
    ///
    /// Fails only if the crate refuses a value; every value here is encodable (integers within
    /// i64, finite floats), so `/metrics` answers 500 then rather than a partial exposition.
    pub fn render(&self, now_unix_us: i64, format: Format) -> Result<String, fmt::Error> {
        let registry = self.registry(now_unix_us);
        let mut out = String::with_capacity(8192);
        match format {
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?
            }
        }
        Ok(out)
    }

    fn registry(&self, now_unix_us: i64) -> Registry {
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let confirmed = self.confirmed_lsn.load(Relaxed);
        let server = self.server_wal_lsn.load(Relaxed);
        let pending = self.pending_since_us.load(Relaxed);
        let slot_lag = self.slot_lag_bytes.load(Relaxed);
        let mut r = Registry::with_prefix("outbox_relay");
        // prometheus-client appends `_total` to counters, the unit to names registered with
        // one, and a full stop to the help text.
        r.register(
            "events_shipped",
            "Events written to ClickHouse",
            self.events_shipped.clone(),
        );
        r.register(
            "batches_shipped",
            "Batches (ClickHouse inserts) accepted",
            self.batches_shipped.clone(),
        );
        r.register(
            "confirmed_lsn",
            "WAL position last confirmed to the slot, as a number",
            gauge(confirmed),
        );
        r.register_with_unit(
            "lag",
            "WAL bytes between PostgreSQL's current position and the slot's confirmed one",
            Unit::Bytes,
            if slot_lag >= 0 {
                ConstGauge::new(slot_lag)
            } else {
                gauge(server.saturating_sub(confirmed))
            },
        );
        r.register_with_unit(
            "lag",
            "Age of the oldest committed event not yet in ClickHouse (0 when none)",
            Unit::Seconds,
            ConstGauge::new(if pending == 0 {
                0.0
            } else {
                (now_unix_us - pending).max(0) as f64 / 1e6
            }),
        );
        self.register_health(&mut r);
        self.register_batches(&mut r);
        self.verify.register(&mut r);
        r
    }

    /// Sessions, servers, dead letters, the endpoint, the state.
    fn register_health(&self, r: &mut Registry) {
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        r.register(
            "slot_active",
            "1 while a replication session streams from the slot",
            ConstGauge::new(i64::from(self.replicating.load(Relaxed))),
        );
        r.register(
            "postgres_up",
            "1 while PostgreSQL answers the relay's periodic slot query",
            ConstGauge::new(i64::from(self.postgres_up.load(Relaxed))),
        );
        r.register(
            "dead_letters",
            "Events in the dead-letter table",
            gauge(self.dead_letters.load(Relaxed)),
        );
        r.register(
            "postgres_errors",
            "Replication sessions ended by a PostgreSQL error",
            self.postgres_errors.clone(),
        );
        r.register(
            "http_connections_refused",
            "Connections to this endpoint closed at once because it served its maximum already",
            self.http_refused.clone(),
        );
        r.register(
            "http_accept_errors",
            "Connections this endpoint failed to accept (e.g. out of file descriptors)",
            self.http_accept_errors.clone(),
        );
        r.register(
            "clickhouse_errors",
            "ClickHouse failures by kind",
            self.clickhouse_errors.clone(),
        );
        let state = self.state();
        r.register(
            "state",
            "Why the relay is (not) shipping: 1 for the current state",
            OneHot {
                label: "state",
                values: State::ALL.map(State::name).to_vec(),
                current: State::ALL.iter().position(|s| *s == state),
            },
        );
        let wal_status = self.slot_wal_status.load(Relaxed) as usize;
        if wal_status < WAL_STATUSES.len() {
            r.register(
                "slot_wal_status",
                "The slot's wal_status in PostgreSQL: 1 for the current one",
                OneHot {
                    label: "wal_status",
                    values: WAL_STATUSES.to_vec(),
                    current: Some(wal_status),
                },
            );
        }
    }

    /// The shipped batches' histograms.
    fn register_batches(&self, r: &mut Registry) {
        r.register(
            "batch_rows",
            "Rows per shipped batch",
            self.batch_rows.clone(),
        );
        r.register_with_unit(
            "batch",
            "RowBinary bytes per shipped batch",
            Unit::Bytes,
            self.batch_bytes.clone(),
        );
        r.register_with_unit(
            "batch_flush",
            "Time ClickHouse took to accept a batch",
            Unit::Seconds,
            self.batch_seconds.clone(),
        );
    }
}

/// The text formats `/metrics` is served in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (ends with `# EOF`; counters' `# TYPE` lines name the family
    /// without `_total`).
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it lists
    /// `application/openmetrics-text` (without `q=0`), as Prometheus does by default; otherwise
    /// (none, `*/*`, `text/plain`) the Prometheus text format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let wants_openmetrics = accept.unwrap_or_default().split(',').any(|range| {
            let mut params = range.split(';').map(str::trim);
            params
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                && !params.any(|p| {
                    p.split_once('=').is_some_and(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("q")
                            && v.trim().parse::<f64>().is_ok_and(|q| q <= 0.0)
                    })
                })
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// A gauge family with one series per value of `label`, in that order: 1 for the current value,
/// 0 for the others (a `Family` would encode in hash order and keep state between scrapes).
#[derive(Debug)]
struct OneHot {
    label: &'static str,
    values: Vec<&'static str>,
    current: Option<usize>,
}

impl EncodeMetric for OneHot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (i, value) in self.values.iter().enumerate() {
            encoder
                .encode_family(&[(self.label, *value)])?
                .encode_gauge(&i64::from(Some(i) == self.current))?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
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
    /// Events ClickHouse holds with other content than the outbox's.
    pub altered: AtomicU64,
    /// Passes that could not check (a server down, the relay behind).
    pub errors: Counter,
    /// Passes that gave way to a session waiting on their locks (a migration), not checked.
    pub yielded: Counter,
}

impl Default for VerifyGauges {
    fn default() -> Self {
        VerifyGauges {
            verified_through_us: AtomicI64::new(0),
            missing: AtomicU64::new(0),
            extra: AtomicU64::new(0),
            altered: AtomicU64::new(0),
            errors: Counter::default(),
            yielded: Counter::default(),
        }
    }
}

impl VerifyGauges {
    fn register(&self, r: &mut Registry) {
        r.register_with_unit(
            "verified_through",
            "Unix time up to which every outbox event is proven in ClickHouse exactly once (0: not yet)",
            Unit::Seconds,
            ConstGauge::new(self.verified_through_us.load(Relaxed) as f64 / 1e6),
        );
        let gauge =
            |v: &AtomicU64| ConstGauge::new(i64::try_from(v.load(Relaxed)).unwrap_or(i64::MAX));
        r.register(
            "missing_events",
            "Outbox events the last verification found missing in ClickHouse",
            gauge(&self.missing),
        );
        r.register(
            "extra_events",
            "Event ids the last verification found in ClickHouse more than once or not in the outbox",
            gauge(&self.extra),
        );
        r.register(
            "altered_events",
            "Event ids the last verification found in ClickHouse with other content than the outbox's",
            gauge(&self.altered),
        );
        r.register(
            "verify_errors",
            "Verification passes that could not check",
            self.errors.clone(),
        );
        r.register(
            "verify_yielded",
            "Verification passes that gave way to a session waiting on their locks (a migration): not checked",
            self.yielded.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The samples of an exposition: `name{labels}` (labels sorted, `le` as a number, so
    /// `le="1"`, `le="1.0"` and `le="1e+06"` compare by value) to value.
    fn samples(text: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut labels: Vec<String> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap();
                    let v = v.trim_matches('"');
                    match (k, v.parse::<f64>()) {
                        ("le", Ok(n)) => format!("le={n}"),
                        _ => format!("{k}={v}"),
                    }
                })
                .collect();
            labels.sort();
            let key = format!("{name}{{{}}}", labels.join(","));
            let value = if value == "+Inf" {
                f64::INFINITY
            } else {
                value.parse().unwrap()
            };
            assert!(out.insert(key, value).is_none(), "{line} twice");
        }
        out
    }

    fn shipped() -> Metrics {
        let m = Metrics::default();
        m.batch_shipped(250, 20_000, Duration::from_millis(30));
        m.batch_shipped(5, 400, Duration::from_millis(3));
        m.clickhouse_error("timeout");
        m.clickhouse_error("no such kind");
        m.confirmed_lsn.store(100, Relaxed);
        m.server_wal_lsn.store(160, Relaxed);
        m
    }

    #[test]
    fn renders_prometheus_text() {
        let text = shipped().render(0, Format::Prometheus).unwrap();
        for line in [
            "# TYPE outbox_relay_events_shipped_total counter",
            "outbox_relay_events_shipped_total 255",
            "outbox_relay_batches_shipped_total 2",
            "outbox_relay_lag_bytes 60",
            "outbox_relay_lag_seconds 0.0",
            "outbox_relay_clickhouse_errors_total{kind=\"timeout\"} 1",
            "outbox_relay_clickhouse_errors_total{kind=\"other\"} 1",
            "outbox_relay_clickhouse_errors_total{kind=\"network\"} 0",
            "# TYPE outbox_relay_batch_rows histogram",
            "outbox_relay_batch_rows_bucket{le=\"1\"} 0",
            "outbox_relay_batch_rows_bucket{le=\"10\"} 1",
            "outbox_relay_batch_rows_bucket{le=\"1000\"} 2",
            "outbox_relay_batch_rows_bucket{le=\"+Inf\"} 2",
            "outbox_relay_batch_rows_sum 255.0",
            "outbox_relay_batch_flush_seconds_sum 0.033",
            "outbox_relay_state{state=\"starting\"} 1",
            "outbox_relay_state{state=\"streaming\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn renders_openmetrics_text() {
        let text = shipped().render(0, Format::OpenMetrics).unwrap();
        for line in [
            "# TYPE outbox_relay_events_shipped counter",
            "outbox_relay_events_shipped_total 255",
            "# TYPE outbox_relay_lag_seconds gauge",
            "# UNIT outbox_relay_lag_seconds seconds",
            "outbox_relay_lag_seconds 0.0",
            "outbox_relay_clickhouse_errors_total{kind=\"timeout\"} 1",
            "outbox_relay_batch_rows_bucket{le=\"10.0\"} 1",
            "outbox_relay_batch_rows_bucket{le=\"+Inf\"} 2",
            "# UNIT outbox_relay_batch_flush_seconds seconds",
            "outbox_relay_batch_flush_seconds_sum 0.033",
            "outbox_relay_state{state=\"starting\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("\n# EOF\n"), "{text}");
    }

    /// Every series `/metrics` showed when it was written by hand, under the same names and
    /// labels (dashboards and alert rules keep working), and both formats carry the same samples.
    #[test]
    fn both_formats_carry_the_same_series() {
        let m = shipped();
        m.slot_seen(Some(0), Some("reserved"));
        let open = samples(&m.render(7_000_000, Format::OpenMetrics).unwrap());
        let text = samples(&m.render(7_000_000, Format::Prometheus).unwrap());
        assert_eq!(open, text);
        let mut want: Vec<String> = [
            "events_shipped_total",
            "batches_shipped_total",
            "confirmed_lsn",
            "lag_bytes",
            "lag_seconds",
            "slot_active",
            "postgres_up",
            "dead_letters",
            "postgres_errors_total",
            "http_connections_refused_total",
            "http_accept_errors_total",
            "verified_through_seconds",
            "missing_events",
            "extra_events",
            "altered_events",
            "verify_errors_total",
            "verify_yielded_total",
        ]
        .iter()
        .map(|n| format!("outbox_relay_{n}{{}}"))
        .collect();
        for kind in CLICKHOUSE_ERROR_KINDS {
            want.push(format!(
                "outbox_relay_clickhouse_errors_total{{kind={kind}}}"
            ));
        }
        for s in State::ALL {
            want.push(format!("outbox_relay_state{{state={}}}", s.name()));
        }
        for s in WAL_STATUSES {
            want.push(format!("outbox_relay_slot_wal_status{{wal_status={s}}}"));
        }
        for (name, bounds) in [
            ("batch_rows", &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6][..]),
            ("batch_bytes", &[1e3, 1e4, 1e5, 1e6, 1e7, 1e8]),
            (
                "batch_flush_seconds",
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
        ] {
            for le in bounds.iter().chain([&f64::INFINITY]) {
                want.push(format!("outbox_relay_{name}_bucket{{le={le}}}"));
            }
            want.push(format!("outbox_relay_{name}_sum{{}}"));
            want.push(format!("outbox_relay_{name}_count{{}}"));
        }
        want.sort();
        assert_eq!(open.keys().cloned().collect::<Vec<_>>(), want);
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
        let text = m.render(25_000_000, Format::Prometheus).unwrap();
        for line in [
            "outbox_relay_lag_bytes 18000000",
            "outbox_relay_lag_seconds 20.0",
            "outbox_relay_state{state=\"waiting_for_clickhouse\"} 1",
            "outbox_relay_state{state=\"streaming\"} 0",
            "outbox_relay_slot_wal_status{wal_status=\"extended\"} 1",
            "outbox_relay_slot_wal_status{wal_status=\"reserved\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // Before PostgreSQL first told the slot's wal_status, the family is left out.
        let text = Metrics::default().render(0, Format::OpenMetrics).unwrap();
        assert!(!text.contains("outbox_relay_slot_wal_status"), "{text}");
    }

    #[test]
    fn format_from_accept() {
        // Prometheus 3's default scrape_protocols, then 2's.
        let prometheus3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,\
            application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;\
            escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
        let prometheus2 = "application/openmetrics-text;version=1.0.0,\
            application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, want) in [
            (Some(prometheus3), Format::OpenMetrics),
            (Some(prometheus2), Format::OpenMetrics),
            (Some("Application/OpenMetrics-Text"), Format::OpenMetrics),
            (None, Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain;version=0.0.4"), Format::Prometheus),
            (
                Some("application/openmetrics-text; q=0, text/plain"),
                Format::Prometheus,
            ),
        ] {
            assert_eq!(Format::from_accept(accept), want, "{accept:?}");
        }
        assert_eq!(
            Format::OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            Format::Prometheus.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
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
