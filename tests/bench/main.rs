//! `make bench`: outbox-relay side by side with PostgreSQL's own decoding speed, ClickHouse's
//! insert speed and a SKIP LOCKED polling outbox, on local servers. Prints a table and writes
//! bench/results.json (medians of BENCH_RUNS runs). See bench/README.md.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use harness::{ClickHouseServer, PgServer, PgVersion};
use relay::config::ClickHouseTarget;
use relay::event::EventRow;
use relay::sink::ClickHouseSink;

mod differing;

const SLOT: &str = "bench_relay";
const RECV_SLOT: &str = "bench_recvlogical";
/// The low-latency profile of docs/configuration.md, as the relay's environment.
const LOW_LATENCY: &[(&str, &str)] = &[("RELAY_BATCH_MAX_WAIT_MS", "20")];
/// Created before a backlog is written; every drain of it starts on a copy of one of these.
const SLOT_BASE: &str = "bench_relay_base";
const RECV_SLOT_BASE: &str = "bench_recvlogical_base";

struct Bench {
    pg: PgServer,
    ch: ClickHouseServer,
    events: u64,
    relay_bin: std::path::PathBuf,
    clickhouse_pid: Option<u32>,
    /// The bench's own SQL connection to the `bench` database, for polling.
    runtime: tokio::runtime::Runtime,
    probe: tokio_postgres::Client,
}

fn main() -> Result<()> {
    let runs: usize = env_or("BENCH_RUNS", 3);
    let events: u64 = env_or("BENCH_EVENTS", 1_000_000);
    let version = match std::env::var("BENCH_PG").as_deref() {
        Ok("18") => PgVersion::V18,
        _ => *PgVersion::available().first().context("no PostgreSQL")?,
    };
    // BENCH_RELAY_BIN: another build of the relay, to compare two commits in one session.
    let relay_bin = std::env::var_os("BENCH_RELAY_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| harness::workspace_root().join("target/release/outbox-relay"));
    if !relay_bin.exists() {
        bail!("{} missing: `make bench` builds it", relay_bin.display());
    }
    eprintln!("bench: PostgreSQL {version:?}, {events} events, {runs} runs");
    let pg = PgServer::start(version)?;
    let ch = ClickHouseServer::start()?;
    pg.create_database("bench")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (probe, conn) = runtime.block_on(tokio_postgres::connect(
        &pg.url("bench"),
        tokio_postgres::NoTls,
    ))?;
    runtime.spawn(conn);
    let bench = Bench {
        clickhouse_pid: clickhouse_pid(ch.http_port()),
        pg,
        ch,
        events,
        relay_bin,
        runtime,
        probe,
    };
    bench.relay(&["setup"], &[])?;
    if std::env::var("BENCH_ONLY").as_deref() == Ok("steady") {
        // Only the steady-load CPU figure, merged into bench/results.json.
        let cpu = median(
            &(0..runs)
                .map(|_| bench.steady())
                .collect::<Result<Vec<_>>>()?,
        );
        println!("relay_cpu_s_per_million_events_steady_2000 {cpu:.2}");
        merge_result("relay_cpu_s_per_million_events_steady_2000", cpu)?;
        return Ok(());
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("differing") {
        // The verifier finding a differing window (issue 27), merged into bench/results.json.
        return differing::run(&bench);
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("latency") {
        // Only the latency figures, merged into bench/results.json.
        for (key, value) in bench.latencies()? {
            merge_result(&key, value)?;
        }
        return Ok(());
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("callgrind") {
        // Instructions per event of single-event transactions, merged into bench/results.json.
        let n: u64 = env_or("BENCH_CALLGRIND_EVENTS", 20_000);
        let (per_event, file) = bench.callgrind_per_event(n)?;
        println!("relay_instructions_per_event_single_tx {per_event:.0}");
        println!("profile: callgrind_annotate {}", file.display());
        merge_result("relay_instructions_per_event_single_tx", per_event)?;
        return Ok(());
    }
    // BENCH_DRAIN_ONLY=1: the drain figures of each run only, printed, results.json untouched
    // (for comparing two builds with BENCH_RELAY_BIN).
    let drain_only = std::env::var("BENCH_DRAIN_ONLY").is_ok_and(|v| v == "1");

    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut push = |key: String, value: f64| samples.entry(key).or_default().push(value);
    // BENCH_ONLY=verify: only the verifier's figures (bench/README.md).
    let only_verify = std::env::var("BENCH_ONLY").as_deref() == Ok("verify");
    if only_verify {
        // BENCH_VERIFY_PAIRS interleaved off/on pairs (at least 3 by default), at each interval.
        bench.verify_figures(env_or("BENCH_VERIFY_PAIRS", runs.max(3)), &mut push)?;
    }
    // The drains: per backlog shape (and pinned, the deployment-shaped variant), one backlog
    // drained by pg_recvlogical and the relay in turn, BENCH_PAIRS times each.
    let pairs: usize = env_or("BENCH_PAIRS", 3).max(1);
    let pinned = match std::env::var("BENCH_PINNED").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => !drain_only,
    };
    let variants: &[Option<Pinning>] = &if pinned {
        vec![None, Some(Pinning::split()?)]
    } else {
        vec![None]
    };
    for pinning in variants.iter().filter(|_| !only_verify) {
        // BENCH_SHAPES=one or =single: only the one-transaction or the single-event backlog.
        let shapes = std::env::var("BENCH_SHAPES").unwrap_or_default();
        for (shape, per_tx) in [("", events), ("_single_tx", 1)]
            .into_iter()
            .filter(|(shape, _)| match shapes.as_str() {
                "one" => shape.is_empty(),
                "single" => !shape.is_empty(),
                _ => true,
            })
        {
            let shape = format!("{shape}{}", if pinning.is_some() { "_pinned" } else { "" });
            let pins = pinning.as_ref().map(|p| p.apply(&bench)).transpose()?;
            let drained = bench.drain_pairs(&shape, per_tx, pairs, pins.as_ref(), &mut push);
            if let Some(p) = &pins {
                p.release();
            }
            drained.with_context(|| format!("drain{shape}"))?;
        }
    }
    for run in (0..runs).filter(|_| !only_verify) {
        eprintln!("bench: run {}/{runs}", run + 1);
        if drain_only {
            continue;
        }
        push(
            "clickhouse_insert_limit_events_per_s".into(),
            bench.clickhouse_limit()?,
        );
        push(
            "polling_outbox_events_per_s".into(),
            bench.polling_outbox()?,
        );
        // One off/on pair per run and interval: BENCH_RUNS interleaved pairs.
        bench.verify_figures(1, &mut push)?;
    }
    let mut results: BTreeMap<String, f64> = samples
        .iter()
        .map(|(k, v)| (k.clone(), median(v)))
        .collect();
    if drain_only {
        for (k, v) in &samples {
            println!("{k:<44} {v:?}");
        }
        return Ok(());
    }
    // The verifier's overhead: the spread of its pairs too.
    for key in ["verify_overhead", "verify_overhead_1s"] {
        if let Some(v) = samples.get(key) {
            let lowest = v.iter().copied().fold(f64::INFINITY, f64::min);
            let highest = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            results.insert(format!("{key}_min"), lowest);
            results.insert(format!("{key}_max"), highest);
            results.insert(format!("{key}_pairs"), v.len() as f64);
        }
    }
    // The drains' figures with their spread over the pairs: `_min`, `_max` and `_spread`
    // ((max - min) / median); peak memory is the worst pair, not the median.
    for (key, values) in samples.iter().filter(|(k, _)| is_pair_figure(k)) {
        let min = values.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if key.starts_with("relay_peak_rss_mb") {
            results.insert(key.clone(), max);
        }
        results.insert(format!("{key}_min"), min);
        results.insert(format!("{key}_max"), max);
        results.insert(format!("{key}_spread"), (max - min) / median(values));
    }
    if !only_verify {
        results.insert(
            "relay_cpu_s_per_million_events_steady_2000".into(),
            median(
                &(0..runs)
                    .map(|_| bench.steady())
                    .collect::<Result<Vec<_>>>()?,
            ),
        );
    }
    if !only_verify {
        results.extend(bench.latencies()?);
    }

    println!("\n{:<44} {:>14}", "figure", "value");
    for (k, v) in &results {
        println!("{k:<44} {v:>14.2}");
    }
    if only_verify {
        // Merged into bench/results.json, with the commit they were measured at.
        let path = harness::workspace_root().join("bench/results.json");
        let mut json: serde_json::Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| serde_json::json!({"results": {}}));
        for (k, v) in &results {
            json["results"][k] = (*v).into();
        }
        json["verify_commit"] = git_commit().into();
        std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
        println!("\nmerged into {}", path.display());
        return Ok(());
    }
    let json = serde_json::json!({
        "results": results,
        "events": events,
        "runs": runs,
        "pairs": pairs,
        "postgres": format!("{version:?}"),
        "machine": machine(),
        "commit": git_commit(),
    });
    let path = harness::workspace_root().join("bench/results.json");
    std::fs::create_dir_all(path.parent().expect("bench/"))?;
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

impl Bench {
    fn relay(&self, args: &[&str], extra: &[(&str, &str)]) -> Result<()> {
        let out = self.relay_command(args, extra).output()?;
        if !out.status.success() {
            bail!(
                "outbox-relay {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn relay_command(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
        self.relay_command_of(&self.relay_bin, args, extra)
    }

    /// [`Bench::relay_command`] with the relay build `bin` (setup is always this commit's).
    fn relay_command_of(
        &self,
        bin: &std::path::Path,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> Command {
        // Setup with this commit's relay, whichever build runs: its schema is a superset.
        let bin = match args.first() {
            Some(&"setup") => harness::workspace_root().join("target/release/outbox-relay"),
            _ => bin.to_path_buf(),
        };
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("RELAY_POSTGRES_URL", self.pg.url("bench"))
            .env("RELAY_CLICKHOUSE_URL", self.ch.url("bench"))
            .env("RELAY_SLOT", SLOT)
            .env("RELAY_METRICS_ADDR", "")
            .env("RELAY_OUTBOX_RETENTION_HOURS", "0")
            .env("RELAY_LOG_LEVEL", "warn")
            .envs(extra.iter().copied());
        cmd
    }

    fn sql(&self, sql: &str) -> Result<String> {
        self.pg.psql("bench", sql)
    }

    /// The base slots of pg_recvlogical and the relay, an empty event table, then the backlog
    /// (`per_tx` events a transaction): returns the WAL position at its end. Every drain starts
    /// on a copy of a base slot, so each pair drains exactly this backlog.
    fn prepare_backlog(&self, per_tx: u64) -> Result<u64> {
        self.sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots;
             TRUNCATE event_outbox;
             SELECT 1 FROM pg_create_logical_replication_slot('{SLOT_BASE}', 'pgoutput');
             SELECT 1 FROM pg_create_logical_replication_slot('{RECV_SLOT_BASE}', 'pgoutput');"
        ))?;
        self.ch.query("TRUNCATE TABLE bench.event_log")?;
        self.publish(self.events, per_tx)?;
        // The insert position: with synchronous_commit off the write position may lag behind.
        Ok(parse_lsn(
            self.sql("SELECT pg_current_wal_insert_lsn()")?.trim(),
        ))
    }

    fn publish(&self, n: u64, per_tx: u64) -> Result<()> {
        self.sql(&format!(
            "SET synchronous_commit = off;
             DO $$
             DECLARE i bigint := 0;
             BEGIN
               WHILE i < {n} LOOP
                 INSERT INTO event_outbox (event_type, event_context)
                 SELECT 'bench.' || (g % 8), json_build_object('n', g, 'user', 'u' || (g % 1000), 'ok', true)
                   FROM generate_series(i, least(i + {per_tx}, {n}) - 1) g;
                 COMMIT;
                 i := i + {per_tx};
               END LOOP;
             END $$;"
        ))?;
        Ok(())
    }

    /// `slot`, fresh: a copy of `base` (at the backlog's start).
    fn fresh_slot(&self, slot: &str, base: &str) -> Result<()> {
        self.sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = '{slot}';
             SELECT 1 FROM pg_copy_logical_replication_slot('{base}', '{slot}');"
        ))?;
        Ok(())
    }

    /// One backlog of `per_tx`-event transactions, drained `pairs` times by pg_recvlogical (the
    /// ceiling) and the relay in turn: each pair's figures pushed under `{key}{shape}`.
    fn drain_pairs(
        &self,
        shape: &str,
        per_tx: u64,
        pairs: usize,
        pins: Option<&Pins>,
        push: &mut impl FnMut(String, f64),
    ) -> Result<()> {
        let end = self.prepare_backlog(per_tx)?;
        let millions = self.events as f64 / 1e6;
        for pair in 0..pairs {
            let wal = self.drain_recvlogical(end, pins)?;
            let relay = self.drain_relay(end, pins, &self.relay_bin)?;
            let relay_rate = self.push_relay_pass(&relay, &wal, shape, push);
            let wal_rate = self.events as f64 / wal.seconds;
            eprintln!(
                "bench: drain{shape} pair {}/{pairs}: pg_recvlogical {wal_rate:.0} ev/s, relay \
                 {relay_rate:.0} ev/s ({:.2})",
                pair + 1,
                relay_rate / wal_rate
            );
            // BENCH_COMPARE_BIN: another relay build drains the same backlog in every pair,
            // right after this one; its figures get the suffix `_cmp` (drain-only output).
            if let Some(other) = std::env::var_os("BENCH_COMPARE_BIN") {
                let cmp = self.drain_relay(end, pins, std::path::Path::new(&other))?;
                let cmp_rate = self.push_relay_pass(&cmp, &wal, &format!("{shape}_cmp"), push);
                eprintln!(
                    "bench: drain{shape} pair {}/{pairs}: compared build {cmp_rate:.0} ev/s ({:.2})",
                    pair + 1,
                    cmp_rate / wal_rate
                );
            }
            push(format!("wal_limit_events_per_s{shape}"), wal_rate);
            for (key, cpu) in [
                ("pg_recvlogical", wal.consumer_cpu),
                ("walsender_serving_wal_limit", wal.walsender_cpu),
            ] {
                push(
                    format!("{key}_cpu_s_per_million_events{shape}"),
                    cpu / millions,
                );
            }
            let (busy, waiting) = wal.shares;
            push(format!("walsender_busy_during_wal_limit{shape}"), busy);
            push(
                format!("walsender_cpu_wait_during_wal_limit{shape}"),
                waiting,
            );
        }
        Ok(())
    }

    /// A relay drain's figures against the same pair's `pg_recvlogical` drain, pushed under
    /// `{key}{suffix}`; returns the relay's events per second.
    fn push_relay_pass(
        &self,
        relay: &Pass,
        wal: &Pass,
        suffix: &str,
        push: &mut impl FnMut(String, f64),
    ) -> f64 {
        let millions = self.events as f64 / 1e6;
        let rate = self.events as f64 / relay.seconds;
        push(format!("relay_events_per_s{suffix}"), rate);
        push(
            format!("relay_to_wal_ratio{suffix}"),
            wal.seconds / relay.seconds,
        );
        push(format!("relay_peak_rss_mb{suffix}"), relay.rss_mb);
        for (key, cpu) in [
            ("relay", relay.consumer_cpu),
            ("walsender_serving_relay", relay.walsender_cpu),
            ("clickhouse", relay.clickhouse_cpu),
        ] {
            push(
                format!("{key}_cpu_s_per_million_events{suffix}"),
                cpu / millions,
            );
        }
        let (busy, waiting) = relay.shares;
        push(format!("walsender_busy_during_relay{suffix}"), busy);
        push(format!("walsender_cpu_wait_during_relay{suffix}"), waiting);
        rate
    }

    /// pg_recvlogical (pgoutput, proto 1, binary, to /dev/null) draining a fresh copy of the
    /// backlog's slot up to `end`: PostgreSQL's own decoding speed.
    fn drain_recvlogical(&self, end: u64, pins: Option<&Pins>) -> Result<Pass> {
        self.fresh_slot(RECV_SLOT, RECV_SLOT_BASE)?;
        let end_text = format!("{:X}/{:X}", end >> 32, end & 0xffff_ffff);
        let mut cmd = Command::new(self.pg.bin_dir().join("pg_recvlogical"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.pg.port().to_string()])
            .args(["-U", "postgres", "-d", "bench", "--slot", RECV_SLOT])
            .args(["--start", "--no-loop", "-f", "/dev/null"])
            .args(["-o", "proto_version=1"])
            .args(["-o", "publication_names=event_outbox_pub"])
            .args(["-o", "binary=true", "-E", &end_text]);
        let clickhouse = self.clickhouse_cpu();
        let started = Instant::now();
        let mut recv = on_cpus(cmd, pins).stderr(Stdio::null()).spawn()?;
        let mut usage = (0.0, 0.0);
        let mut walsender = WalsenderCpu::default();
        let status = loop {
            if let Some(status) = recv.try_wait()? {
                break status;
            }
            usage = proc_usage(recv.id()).unwrap_or(usage);
            walsender.sample(self, RECV_SLOT);
            std::thread::sleep(Duration::from_millis(10));
        };
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("pg_recvlogical failed: {status}");
        }
        Ok(Pass {
            seconds,
            consumer_cpu: usage.1,
            walsender_cpu: walsender.cpu,
            clickhouse_cpu: self.clickhouse_cpu() - clickhouse,
            rss_mb: usage.0,
            shares: walsender.shares(),
        })
    }

    /// `outbox-relay run` draining a fresh copy of the backlog's slot into an empty table, from
    /// its start until the slot's confirmed position reaches `end` (status interval 100 ms, so
    /// the end is seen promptly).
    fn drain_relay(&self, end: u64, pins: Option<&Pins>, bin: &std::path::Path) -> Result<Pass> {
        self.ch.query("TRUNCATE TABLE bench.event_log")?;
        self.fresh_slot(SLOT, SLOT_BASE)?;
        let cmd = self.relay_command_of(bin, &["run"], &[("RELAY_STATUS_INTERVAL_MS", "100")]);
        let clickhouse = self.clickhouse_cpu();
        let started = Instant::now();
        let mut child = on_cpus(cmd, pins).stderr(Stdio::null()).spawn()?;
        let mut usage = (0.0, 0.0);
        let mut walsender = WalsenderCpu::default();
        let confirmed = format!(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
        );
        loop {
            usage = proc_usage(child.id()).unwrap_or(usage);
            walsender.sample(self, SLOT);
            if parse_lsn(self.probe(&confirmed)?.trim()) >= end {
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                stop(&mut child);
                bail!("relay did not drain the backlog in 600 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let seconds = started.elapsed().as_secs_f64();
        let clickhouse = self.clickhouse_cpu() - clickhouse;
        stop(&mut child);
        let count: u64 = self
            .ch
            .query("SELECT count() FROM bench.event_log")?
            .trim()
            .parse()?;
        if count != self.events {
            bail!("ClickHouse has {count} rows, expected {}", self.events);
        }
        Ok(Pass {
            seconds,
            consumer_cpu: usage.1,
            walsender_cpu: walsender.cpu,
            clickhouse_cpu: clickhouse,
            rss_mb: usage.0,
            shares: walsender.shares(),
        })
    }

    /// `BENCH_ONLY=callgrind`: instructions the relay executes per event of single-event
    /// transactions, counted by valgrind's callgrind (repeatable on a noisy machine): the relay
    /// drains backlogs of `n` and `2n` such transactions, `(Ir(2n) - Ir(n)) / n` leaves out
    /// its start and stop. Batches of 10,000 rows and no deadline make the batches the same in
    /// every run. Returns (instructions per event, the 2n run's callgrind file).
    fn callgrind_per_event(&self, n: u64) -> Result<(f64, std::path::PathBuf)> {
        let mut counts = Vec::new();
        for size in [n, 2 * n] {
            self.sql(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots;
                 TRUNCATE event_outbox;
                 SELECT 1 FROM pg_create_logical_replication_slot('{SLOT}', 'pgoutput');"
            ))?;
            self.ch.query("TRUNCATE TABLE bench.event_log")?;
            self.publish(size, 1)?;
            let end = parse_lsn(self.sql("SELECT pg_current_wal_insert_lsn()")?.trim());
            let out = std::env::temp_dir()
                .join(format!("bench_callgrind_{}_{size}.out", std::process::id()));
            let cmd = self.relay_command(
                &["run"],
                &[
                    ("RELAY_STATUS_INTERVAL_MS", "100"),
                    ("RELAY_BATCH_MAX_ROWS", "10000"),
                    ("RELAY_BATCH_MAX_WAIT_MS", "3600000"),
                ],
            );
            let file = format!("--callgrind-out-file={}", out.display());
            let mut child = wrapped(&["valgrind", "--tool=callgrind", &file], cmd)
                .stderr(Stdio::null())
                .spawn()
                .context("valgrind (apt-get install valgrind)")?;
            let started = Instant::now();
            let confirmed = format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
            );
            while parse_lsn(self.probe(&confirmed)?.trim()) < end {
                if started.elapsed() > Duration::from_secs(1800) {
                    stop(&mut child);
                    bail!("the relay under callgrind did not drain {size} events in 1800 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            stop(&mut child);
            let text = std::fs::read_to_string(&out)
                .with_context(|| format!("callgrind's output {}", out.display()))?;
            let total: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("totals: "))
                .and_then(|t| t.split_whitespace().next()?.parse().ok())
                .context("no totals in callgrind's output")?;
            eprintln!("bench: callgrind: {total} instructions for {size} events");
            counts.push((total, out));
        }
        let (big, file) = counts.pop().context("two runs")?;
        let (small, _) = counts.pop().context("two runs")?;
        Ok((big.saturating_sub(small) as f64 / n as f64, file))
    }

    /// The ClickHouse server's CPU seconds so far (NaN for an external server).
    fn clickhouse_cpu(&self) -> f64 {
        self.clickhouse_pid
            .and_then(cpu_seconds)
            .unwrap_or(f64::NAN)
    }

    /// The first column of the first row of `sql`, over the bench's own SQL connection (cheaper
    /// than a psql process, which would start a backend each time, while drains are polled).
    fn probe(&self, sql: &str) -> Result<String> {
        let rows = self.runtime.block_on(self.probe.simple_query(sql))?;
        Ok(rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap_or_default())
    }

    /// `verify_overhead`: the share of the relay's rate lost to a background verifier checking
    /// every 10 s (`BENCH_VERIFY_INTERVAL_S`; 30 times as often as the default) with no grace
    /// period, against the same run with the verifier off, for each of `pairs` pairs of runs
    /// (off then on, then on then off, alternating, so a drift of the machine's speed does not
    /// favour one side); `verify_overhead_1s` the same every second (the stress figure). The
    /// verifier only compares what the relay has passed (it waits for the slot to pass its
    /// snapshot), so a backlog written up front would keep it idle until the end: here the
    /// events arrive in 10 chunks (1,000-event transactions), each published once the relay
    /// confirmed the previous one, so verifier passes over the growing table run while later
    /// chunks are published and shipped. `verify_full_seconds`: then, with the table complete, a
    /// full `outbox-relay verify` of the whole outbox beside the running relay, once per pair.
    fn verify_figures(&self, pairs: usize, push: &mut impl FnMut(String, f64)) -> Result<()> {
        let interval = std::env::var("BENCH_VERIFY_INTERVAL_S").unwrap_or_else(|_| "10".into());
        for (key, interval) in [
            ("verify_overhead", interval.as_str()),
            ("verify_overhead_1s", "1"),
        ] {
            let off_settings = [("RELAY_VERIFY_INTERVAL_S", "0")];
            let on_settings = [
                ("RELAY_VERIFY_INTERVAL_S", interval),
                ("RELAY_VERIFY_GRACE_S", "0"),
            ];
            for pair in 0..pairs {
                let (mut first, mut second) = (&off_settings[..], &on_settings[..]);
                if pair % 2 == 1 {
                    std::mem::swap(&mut first, &mut second);
                }
                let (a, mut relay) = self.chunked_rate(first)?;
                stop(&mut relay);
                let (b, relay) = self.chunked_rate(second)?;
                let (off, on) = if pair % 2 == 1 { (b, a) } else { (a, b) };
                let full = self.full_verify(relay)?;
                eprintln!(
                    "bench: verify every {interval} s, pair {}/{pairs}: {off:.0} ev/s without the \
                     verifier, {on:.0} with it ({:.3}), full verify {full:.2} s",
                    pair + 1,
                    (off - on) / off
                );
                push(key.into(), (off - on) / off);
                push("verify_full_seconds".into(), full);
            }
        }
        Ok(())
    }

    /// Wall time of `outbox-relay verify` over the whole (complete) outbox beside `relay`, which
    /// it then stops.
    fn full_verify(&self, mut relay: Child) -> Result<f64> {
        let started = Instant::now();
        let out = self
            .relay_command(&["verify", "--json", "--wait-s", "120"], &[])
            .output()?;
        let full = started.elapsed().as_secs_f64();
        stop(&mut relay);
        if out.status.code() != Some(0) {
            bail!(
                "verify of a complete table did not exit 0 ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(full)
    }

    /// `events` events published in 10 chunks, each once `outbox-relay run` (with `extra`
    /// settings) confirmed the previous one: (events/s from the first publish to the last
    /// confirmation, the relay, still running).
    fn chunked_rate(&self, extra: &[(&str, &str)]) -> Result<(f64, Child)> {
        // Each run starts from a checkpoint, and autovacuum stays off the outbox while it runs
        // (turned on again after): a checkpoint or a vacuum landing in one run of a pair and not
        // the other moved the rate by ±20%, more than what the pair measures.
        self.sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots;
             TRUNCATE event_outbox;
             ALTER TABLE event_outbox SET (autovacuum_enabled = false);
             CHECKPOINT;
             SELECT 1 FROM pg_create_logical_replication_slot('{SLOT}', 'pgoutput');"
        ))?;
        self.ch.query("TRUNCATE TABLE bench.event_log")?;
        let mut env = vec![("RELAY_STATUS_INTERVAL_MS", "100")];
        env.extend_from_slice(extra);
        let mut child = self
            .relay_command(&["run"], &env)
            .stderr(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        for _ in 0..10 {
            self.publish(self.events / 10, 1_000)?;
            let end = parse_lsn(self.sql("SELECT pg_current_wal_insert_lsn()")?.trim());
            loop {
                let confirmed = self.sql(&format!(
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                ))?;
                if parse_lsn(confirmed.trim()) >= end {
                    break;
                }
                if started.elapsed() > Duration::from_secs(900) {
                    stop(&mut child);
                    bail!("relay did not ship the chunks in 900 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.sql("ALTER TABLE event_outbox RESET (autovacuum_enabled)")?;
        Ok((
            (self.events / 10 * 10) as f64 / started.elapsed().as_secs_f64(),
            child,
        ))
    }

    /// The same kind of rows sent to ClickHouse by the simplest code: batches of 100,000.
    fn clickhouse_limit(&self) -> Result<f64> {
        self.ch.query("TRUNCATE TABLE bench.event_log")?;
        let target = ClickHouseTarget::parse(&self.ch.url("bench"))?;
        let sink = ClickHouseSink::new(&target, "event_log", "bench");
        let contexts: Vec<String> = (0..self.events)
            .map(|g| format!(r#"{{"n": {g}, "user": "u{}", "ok": true}}"#, g % 1000))
            .collect();
        let runtime = tokio::runtime::Runtime::new()?;
        let started = Instant::now();
        runtime.block_on(async {
            for chunk in contexts.chunks(100_000) {
                let mut insert = sink.begin();
                for (i, context) in chunk.iter().enumerate() {
                    insert.write(&row(i as u64, context)).await?;
                }
                insert.commit().await?;
            }
            anyhow::Ok(())
        })?;
        Ok(self.events as f64 / started.elapsed().as_secs_f64())
    }

    /// A SKIP LOCKED poller: claim 10,000 rows, insert them into ClickHouse, delete them, commit.
    fn polling_outbox(&self) -> Result<f64> {
        self.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots; TRUNCATE event_outbox;")?;
        self.ch.query("TRUNCATE TABLE bench.event_log")?;
        self.publish(self.events, 10_000)?;
        let target = ClickHouseTarget::parse(&self.ch.url("bench"))?;
        let sink = ClickHouseSink::new(&target, "event_log", "bench");
        let runtime = tokio::runtime::Runtime::new()?;
        let url = self.pg.url("bench");
        let started = Instant::now();
        let shipped = runtime.block_on(async {
            let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let mut shipped = 0u64;
            loop {
                let tx = client.transaction().await?;
                let rows = tx
                    .query(
                        "SELECT event_id::text, event_type, event_context::text FROM event_outbox
                          ORDER BY event_date_time LIMIT 10000 FOR UPDATE SKIP LOCKED",
                        &[],
                    )
                    .await?;
                if rows.is_empty() {
                    break;
                }
                let mut insert = sink.begin();
                let mut ids = Vec::with_capacity(rows.len());
                for (i, r) in rows.iter().enumerate() {
                    let context: &str = r.get(2);
                    insert.write(&row(i as u64, context)).await?;
                    ids.push(r.get::<_, String>(0));
                }
                insert.commit().await?;
                tx.execute(
                    "DELETE FROM event_outbox WHERE event_id = ANY($1::text[]::uuid[])",
                    &[&ids],
                )
                .await?;
                tx.commit().await?;
                shipped += rows.len() as u64;
            }
            anyhow::Ok(shipped)
        })?;
        if shipped != self.events {
            bail!("poller shipped {shipped} of {}", self.events);
        }
        Ok(self.events as f64 / started.elapsed().as_secs_f64())
    }

    /// The relay's CPU seconds per million events at a steady 2,000 events/s (20-event
    /// transactions every 10 ms) for BENCH_STEADY_S seconds (default 60), default settings,
    /// the HTTP endpoint on: per-batch, per-transaction and idle work, where a drain measures
    /// per-event work. CPU is counted from the first shipped rows to the last.
    fn steady(&self) -> Result<f64> {
        const PER_TX: u64 = 20;
        let seconds: u64 = env_or("BENCH_STEADY_S", 60);
        let txs = seconds * 100;
        self.sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots; TRUNCATE event_outbox;
             SELECT 1 FROM pg_create_logical_replication_slot('{SLOT}', 'pgoutput');"
        ))?;
        self.ch.query("TRUNCATE TABLE bench.event_log")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = self
            .relay_command(&["run"], &[("RELAY_METRICS_ADDR", &addr)])
            .stderr(Stdio::null())
            .spawn()?;
        let url = self.pg.url("bench");
        let publisher = steady_publisher(url, "steady", PER_TX, 10, txs);
        let total = PER_TX * txs;
        let count = || -> Result<u64> {
            Ok(self
                .ch
                .query("SELECT count() FROM bench.event_log")?
                .trim()
                .parse()?)
        };
        let deadline = Instant::now() + Duration::from_secs(seconds + 120);
        let mut first: Option<(u64, f64)> = None;
        let last = loop {
            let n = count()?;
            let cpu = cpu_seconds(child.id()).context("relay CPU")?;
            if first.is_none() && n > 0 {
                first = Some((n, cpu));
            }
            if n >= total {
                break (n, cpu);
            }
            if Instant::now() > deadline {
                bail!("steady run: {n} of {total} events arrived");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        publisher.join().expect("publisher thread")?;
        stop(&mut child);
        let (n0, c0) = first.context("no event arrived")?;
        let per_million = (last.1 - c0) / ((last.0 - n0) as f64 / 1e6);
        eprintln!(
            "bench: steady 2,000 events/s: {:.2} CPU s over {} events: {per_million:.2} s per million",
            last.1 - c0,
            last.0 - n0
        );
        Ok(per_million)
    }

    /// The latency figures: at 10,000 events/s (100-event transactions every 10 ms, keys without
    /// a rate) and 1,000 events/s (10-event transactions, `_1000`), with the default settings
    /// and the low-latency profile (`_lowlat`).
    fn latencies(&self) -> Result<BTreeMap<String, f64>> {
        let mut results = BTreeMap::new();
        for (rate, per_tx) in [("", 100), ("_1000", 10)] {
            for (profile, settings) in [("", &[][..]), ("_lowlat", LOW_LATENCY)] {
                let (p50, p99, inserts) = self.latency(per_tx, settings)?;
                eprintln!(
                    "bench: latency{rate}{profile}: p50 {p50:.0} ms, p99 {p99:.0} ms, \
                     {inserts:.1} inserts/s"
                );
                results.insert(format!("latency_p50_ms{rate}{profile}"), p50);
                results.insert(format!("latency_p99_ms{rate}{profile}"), p99);
                results.insert(format!("inserts_per_s{rate}{profile}"), inserts);
            }
        }
        Ok(results)
    }

    /// Commit-to-visible latency at a steady `per_tx` x 100 events/s (`per_tx`-event
    /// transactions every 10 ms) for 20 s with `settings`, and ClickHouse inserts per second,
    /// read from ClickHouse itself.
    ///
    /// The publisher notes when each transaction committed; a watcher counts the rows in
    /// ClickHouse every few milliseconds. Transactions arrive in commit order, so transaction k is
    /// visible once the count reaches `per_tx` (k + 1).
    fn latency(&self, per_tx: u64, settings: &[(&str, &str)]) -> Result<(f64, f64, f64)> {
        const TXS: usize = 2_000;
        self.sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots; TRUNCATE event_outbox;
             SELECT 1 FROM pg_create_logical_replication_slot('{SLOT}', 'pgoutput');"
        ))?;
        self.ch.query("TRUNCATE TABLE bench.event_log")?;
        let mut child = self
            .relay_command(&["run"], settings)
            .stderr(Stdio::null())
            .spawn()?;
        // Steady state only: publishing starts once the relay streams (its slot is active), so
        // the relay's start (connections, checks) is not counted as the first transactions'
        // latency; at 100 transactions a second a start of 0.3 s would otherwise be 30 of the
        // 2,000 transactions, more than the 1% the p99 leaves out.
        let streaming_by = Instant::now() + Duration::from_secs(60);
        while self
            .probe(&format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{SLOT}' AND active"
            ))?
            .trim()
            != "1"
        {
            if Instant::now() > streaming_by {
                stop(&mut child);
                bail!("latency run: the relay did not start streaming within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let url = self.pg.url("bench");
        let started = Instant::now();
        let publisher = steady_publisher(url, "latency", per_tx, 10, TXS as u64);
        let total = per_tx * TXS as u64;
        let mut seen: Vec<(Instant, u64)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let count: u64 = self
                .ch
                .query("SELECT count() FROM bench.event_log")?
                .trim()
                .parse()?;
            let now = Instant::now();
            if seen.last().is_none_or(|(_, c)| *c < count) {
                seen.push((now, count));
            }
            if count >= total {
                break;
            }
            if now > deadline {
                bail!("latency run: {count} of {total} events arrived");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let elapsed = started.elapsed().as_secs_f64();
        let committed = publisher.join().expect("publisher thread")?;
        let inserts = self.inserts_since_truncate()? as f64 / elapsed;
        stop(&mut child);
        let mut latencies: Vec<f64> = committed
            .iter()
            .enumerate()
            .map(|(k, at)| {
                let visible = seen
                    .iter()
                    .find(|(_, c)| *c >= per_tx * (k as u64 + 1))
                    .map(|(t, _)| *t)
                    .expect("every transaction was seen");
                visible.saturating_duration_since(*at).as_secs_f64() * 1000.0
            })
            .collect();
        latencies.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        Ok((pick(0.5), pick(0.99), inserts))
    }

    /// Inserts into the (truncated) table, counted by ClickHouse: each insert allocates the next
    /// block number, and merges keep the range.
    fn inserts_since_truncate(&self) -> Result<u64> {
        Ok(self
            .ch
            .query(
                "SELECT max(max_block_number) - min(min_block_number) + 1 FROM system.parts
                  WHERE database = 'bench' AND table = 'event_log' AND active",
            )?
            .trim()
            .parse()
            .unwrap_or(0))
    }
}

fn row(i: u64, context: &str) -> EventRow<'_> {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&i.to_be_bytes());
    EventRow {
        event_id: id,
        event_type: b"bench.0",
        event_date_time_us: 1_795_000_000_000_000,
        environment: b"production",
        event_context: context.as_bytes(),
        metadata_version: 1,
        commit_lsn: 0,
        tx_seq: i as u32,
        xid: 0,
        sentry_trace: None,
    }
}

/// One drain of the backlog by one consumer (pg_recvlogical or the relay).
struct Pass {
    seconds: f64,
    /// CPU seconds (user + system) during the drain: the consumer's, the walsender's serving it
    /// and the ClickHouse server's.
    consumer_cpu: f64,
    walsender_cpu: f64,
    clickhouse_cpu: f64,
    /// The consumer's peak RSS (MB).
    rss_mb: f64,
    /// (running, waiting for a CPU) shares of the walsender, see [`WalsenderCpu::shares`].
    shares: (f64, f64),
}

/// The CPU time of the walsender serving a slot, and its time waiting for a CPU, sampled while
/// a consumer drains it.
#[derive(Default)]
struct WalsenderCpu {
    pid: Option<u32>,
    first: Option<(Instant, (f64, f64))>,
    last: Option<(Instant, (f64, f64))>,
    /// Its user + system CPU seconds at the last sample (it starts with the consumer's
    /// connection, so this is all of its CPU).
    cpu: f64,
}

impl WalsenderCpu {
    fn sample(&mut self, bench: &Bench, slot: &str) {
        if self.pid.is_none() {
            let pid = bench.probe(&format!(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ));
            self.pid = pid.ok().and_then(|p| p.trim().parse().ok());
        }
        if let Some(times) = self.pid.and_then(sched_seconds) {
            let now = (Instant::now(), times);
            self.first.get_or_insert(now);
            self.last = Some(now);
        }
        if let Some(cpu) = self.pid.and_then(cpu_seconds) {
            self.cpu = cpu;
        }
    }

    /// Shares of the time between the first and the last sample the walsender spent running
    /// and runnable but waiting for a CPU; the rest it waited for its consumer or the WAL.
    fn shares(&self) -> (f64, f64) {
        match (self.first, self.last) {
            (Some((t0, (c0, w0))), Some((t1, (c1, w1)))) if t1 > t0 => {
                let wall = (t1 - t0).as_secs_f64();
                ((c1 - c0) / wall, (w1 - w0) / wall)
            }
            _ => (f64::NAN, f64::NAN),
        }
    }
}

/// The deployment-shaped variant (`_pinned`): PostgreSQL on the first CPU, ClickHouse and the
/// consumers (pg_recvlogical, the relay) on the second, a model of separate hosts.
struct Pinning {
    postgres: String,
    rest: String,
    all: String,
}

/// A pinning in force: undone by [`Pins::release`].
struct Pins {
    consumers: String,
    postmaster: u32,
    clickhouse: Option<u32>,
    all: String,
}

impl Pinning {
    fn split() -> Result<Pinning> {
        let cpus = std::thread::available_parallelism()?.get();
        if cpus < 2 {
            bail!("BENCH_PINNED needs 2 CPUs, this machine has {cpus}: set BENCH_PINNED=0");
        }
        Ok(Pinning {
            postgres: "0".into(),
            rest: format!("1-{}", cpus - 1),
            all: format!("0-{}", cpus - 1),
        })
    }

    /// Pins PostgreSQL's postmaster and its processes (backends started later inherit it) and
    /// the ClickHouse server.
    fn apply(&self, bench: &Bench) -> Result<Pins> {
        let backend: u32 = bench.probe("SELECT pg_backend_pid()")?.trim().parse()?;
        let postmaster = parent_pid(backend).context("the postmaster's pid")?;
        let pins = Pins {
            consumers: self.rest.clone(),
            postmaster,
            clickhouse: bench.clickhouse_pid,
            all: self.all.clone(),
        };
        pins.pin(&self.postgres, &self.rest)?;
        Ok(pins)
    }
}

impl Pins {
    fn pin(&self, postgres: &str, clickhouse: &str) -> Result<()> {
        let mut postgres_pids = children(self.postmaster);
        postgres_pids.push(self.postmaster);
        for pid in postgres_pids {
            set_affinity(pid, postgres)?;
        }
        if let Some(pid) = self.clickhouse {
            set_affinity(pid, clickhouse)?;
        }
        Ok(())
    }

    fn release(&self) {
        if let Err(e) = self.pin(&self.all, &self.all) {
            eprintln!("bench: cannot undo the pinning: {e:#}");
        }
    }
}

/// A thread publishing `txs` transactions of `per_tx` events of `event_type`, one every
/// `tick_ms` (a steady stream beside a measured relay); it returns when each committed.
fn steady_publisher(
    url: String,
    event_type: &'static str,
    per_tx: u64,
    tick_ms: u64,
    txs: u64,
) -> std::thread::JoinHandle<Result<Vec<Instant>>> {
    std::thread::spawn(move || -> Result<Vec<Instant>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let sql = format!(
                "INSERT INTO event_outbox (event_type, event_context)
                 SELECT '{event_type}', json_build_object('n', g) FROM generate_series(1, {per_tx}) g"
            );
            let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
            let mut committed = Vec::with_capacity(txs as usize);
            for _ in 0..txs {
                tick.tick().await;
                client.execute(&sql, &[]).await?;
                committed.push(Instant::now());
            }
            anyhow::Ok(committed)
        })
    })
}

/// All threads of `pid` on `cpus` (a taskset list).
fn set_affinity(pid: u32, cpus: &str) -> Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .context("taskset (util-linux)")?;
    // A process that ended meanwhile (a backend) is no error.
    if !out.status.success() && std::path::Path::new(&format!("/proc/{pid}")).exists() {
        bail!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `cmd`, run on the consumers' CPUs of `pins` (through taskset) when there are some.
fn on_cpus(cmd: Command, pins: Option<&Pins>) -> Command {
    match pins {
        Some(pins) => wrapped(&["taskset", "-c", &pins.consumers], cmd),
        None => cmd,
    }
}

/// `cmd` (its program, arguments and environment) run by `wrapper` (a program and its
/// arguments: `taskset -c 1`, `valgrind --tool=callgrind`).
fn wrapped(wrapper: &[&str], cmd: Command) -> Command {
    let mut outer = Command::new(wrapper[0]);
    outer
        .args(&wrapper[1..])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => outer.env(key, value),
            None => outer.env_remove(key),
        };
    }
    outer
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

fn parent_pid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| parent_pid(child) == Some(pid))
        .collect()
}

/// The pid of the local ClickHouse server listening on `http_port` (tools/clickhouse_server.py).
fn clickhouse_pid(http_port: u16) -> Option<u32> {
    let wanted = format!("--http-port\0{http_port}\0");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("clickhouse_server.py") && c.contains(&wanted)
            })
        })
}

/// Whether a result key is a drain figure reported with its spread over the pairs.
fn is_pair_figure(key: &str) -> bool {
    [
        "wal_limit_events_per_s",
        "relay_events_per_s",
        "relay_to_wal_ratio",
        "relay_peak_rss_mb",
        "_cpu_s_per_million_events",
    ]
    .iter()
    .any(|k| key.contains(k))
}

/// (seconds on a CPU, seconds runnable but waiting for one) of a process, from the scheduler.
fn sched_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let mut fields = stat.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some((fields.next()?? / 1e9, fields.next()?? / 1e9))
}

/// User plus system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// (peak RSS in MB, CPU seconds) of a running process, from /proc.
fn proc_usage(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()?;
    Some((hwm_kb / 1024.0, cpu_seconds(pid)?))
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// One figure written into bench/results.json, the others kept.
fn merge_result(key: &str, value: f64) -> Result<()> {
    let path = harness::workspace_root().join("bench/results.json");
    let mut json: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| serde_json::json!({"results": {}}));
    json["results"][key] = value.into();
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn parse_lsn(s: &str) -> u64 {
    s.split_once('/')
        .and_then(|(h, l)| {
            Some((u64::from_str_radix(h, 16).ok()? << 32) | u64::from_str_radix(l, 16).ok()?)
        })
        .unwrap_or(0)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_string))
        })
        .unwrap_or_default();
    format!(
        "{} cores, {cpu}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
