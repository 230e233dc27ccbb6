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

const SLOT: &str = "bench_relay";
const RECV_SLOT: &str = "bench_recvlogical";

struct Bench {
    pg: PgServer,
    ch: ClickHouseServer,
    events: u64,
    relay_bin: std::path::PathBuf,
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
    let bench = Bench {
        pg: PgServer::start(version)?,
        ch: ClickHouseServer::start()?,
        events,
        relay_bin,
    };
    bench.pg.create_database("bench")?;
    bench.relay(&["setup"], &[])?;
    if std::env::var("BENCH_ONLY").as_deref() == Ok("steady") {
        // Only the steady-load CPU figure, merged into bench/results.json.
        let cpu = median(
            &(0..runs)
                .map(|_| bench.steady())
                .collect::<Result<Vec<_>>>()?,
        );
        println!("relay_cpu_s_per_million_events_steady_2000 {cpu:.2}");
        let path = harness::workspace_root().join("bench/results.json");
        let mut json: serde_json::Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| serde_json::json!({"results": {}}));
        json["results"]["relay_cpu_s_per_million_events_steady_2000"] = cpu.into();
        std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
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
        // BENCH_VERIFY_PAIRS interleaved off/on pairs (at least 3 by default).
        for (overhead, full) in bench.verify_figures(env_or("BENCH_VERIFY_PAIRS", runs.max(3)))? {
            push("verify_overhead".into(), overhead);
            push("verify_full_seconds".into(), full);
        }
    }
    for run in (0..runs).filter(|_| !only_verify) {
        eprintln!("bench: run {}/{runs}", run + 1);
        for (shape, per_tx) in [("", events), ("_single_tx", 1)] {
            let d = bench.drain(per_tx)?;
            push(format!("wal_limit_events_per_s{shape}"), d.wal);
            push(format!("relay_events_per_s{shape}"), d.relay);
            push(format!("relay_to_wal_ratio{shape}"), d.relay / d.wal);
            push(format!("relay_peak_rss_mb{shape}"), d.rss);
            push(format!("relay_cpu_s_per_million_events{shape}"), d.cpu);
            for (during, (busy, waiting)) in
                [("wal_limit", d.walsender_wal), ("relay", d.walsender_relay)]
            {
                push(format!("walsender_busy_during_{during}{shape}"), busy);
                push(
                    format!("walsender_cpu_wait_during_{during}{shape}"),
                    waiting,
                );
            }
        }
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
        // One off/on pair per run: BENCH_RUNS interleaved pairs.
        for (overhead, full) in bench.verify_figures(1)? {
            push("verify_overhead".into(), overhead);
            push("verify_full_seconds".into(), full);
        }
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
    if let Some(v) = samples.get("verify_overhead") {
        let lowest = v.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        results.insert("verify_overhead_min".into(), lowest);
        results.insert("verify_overhead_max".into(), highest);
        results.insert("verify_overhead_pairs".into(), v.len() as f64);
    }
    // Peak memory: the worst run, not the median.
    for key in ["relay_peak_rss_mb", "relay_peak_rss_mb_single_tx"]
        .into_iter()
        .filter(|k| samples.contains_key(*k))
    {
        results.insert(key.into(), samples[key].iter().cloned().fold(0.0, f64::max));
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
    for (suffix, wait_ms) in [("", None), ("_lowlat", Some("50"))]
        .into_iter()
        .filter(|_| !only_verify)
    {
        let (p50, p99, inserts) = bench.latency(wait_ms)?;
        results.insert(format!("latency_p50_ms{suffix}"), p50);
        results.insert(format!("latency_p99_ms{suffix}"), p99);
        results.insert(format!("inserts_per_s{suffix}"), inserts);
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
        // Setup with this commit's relay, whichever build runs: its schema is a superset.
        let bin = match args.first() {
            Some(&"setup") => harness::workspace_root().join("target/release/outbox-relay"),
            _ => self.relay_bin.clone(),
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

    /// Fresh slots for pg_recvlogical and the relay, an empty event table, then the backlog.
    fn prepare_backlog(&self, per_tx: u64) -> Result<u64> {
        self.sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots;
             TRUNCATE event_outbox;
             SELECT 1 FROM pg_create_logical_replication_slot('{SLOT}', 'pgoutput');
             SELECT 1 FROM pg_create_logical_replication_slot('{RECV_SLOT}', 'pgoutput');"
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

    /// PostgreSQL's own decoding rate and the relay's rate into ClickHouse over the same backlog.
    fn drain(&self, per_tx: u64) -> Result<Drain> {
        let end = self.prepare_backlog(per_tx)?;
        let end_text = format!("{:X}/{:X}", end >> 32, end & 0xffff_ffff);

        let started = Instant::now();
        let mut recv = Command::new(self.pg.bin_dir().join("pg_recvlogical"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.pg.port().to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-d",
                "bench",
                "--slot",
                RECV_SLOT,
                "--start",
                "--no-loop",
                "-f",
                "/dev/null",
            ])
            .args([
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=event_outbox_pub",
            ])
            .args(["-o", "binary=true", "-E", &end_text])
            .stderr(Stdio::null())
            .spawn()?;
        let mut walsender_wal = WalsenderCpu::default();
        let status = loop {
            if let Some(status) = recv.try_wait()? {
                break status;
            }
            walsender_wal.sample(self, RECV_SLOT);
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            bail!("pg_recvlogical failed: {status}");
        }
        let wal = self.events as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        // Confirmations every 100 ms, so the drain's end is seen within 100 ms.
        let mut child = self
            .relay_command(&["run"], &[("RELAY_STATUS_INTERVAL_MS", "100")])
            .stderr(Stdio::null())
            .spawn()?;
        let mut usage = (0.0, 0.0);
        let mut walsender_relay = WalsenderCpu::default();
        loop {
            usage = proc_usage(&child).unwrap_or(usage);
            walsender_relay.sample(self, SLOT);
            let confirmed = self.sql(&format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
            ))?;
            if parse_lsn(confirmed.trim()) >= end {
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                let _ = child.kill();
                bail!("relay did not drain the backlog in 600 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let relay = self.events as f64 / started.elapsed().as_secs_f64();
        stop(&mut child);
        let count: u64 = self
            .ch
            .query("SELECT count() FROM bench.event_log")?
            .trim()
            .parse()?;
        if count != self.events {
            bail!("ClickHouse has {count} rows, expected {}", self.events);
        }
        let (rss, cpu_s) = usage;
        Ok(Drain {
            wal,
            relay,
            rss,
            cpu: cpu_s / (self.events as f64 / 1e6),
            walsender_wal: walsender_wal.shares(),
            walsender_relay: walsender_relay.shares(),
        })
    }

    /// `verify_overhead`: the share of the relay's rate lost to a background verifier checking
    /// every second with no grace period, against the same run with the verifier off, for each
    /// of `pairs` pairs of runs (off then on, then on then off, alternating, so a drift of the
    /// machine's speed does not favour one side). The
    /// verifier only compares what the relay has passed (it waits for the slot to pass its
    /// snapshot), so a backlog written up front would keep it idle until the end: here the
    /// events arrive in 10 chunks (1,000-event transactions), each published once the relay
    /// confirmed the previous one, so verifier passes over the growing table run while later
    /// chunks are published and shipped. `verify_full_seconds`: then, with the table complete, a
    /// full `outbox-relay verify` of the whole outbox beside the running relay, once per pair.
    fn verify_figures(&self, pairs: usize) -> Result<Vec<(f64, f64)>> {
        let interval = std::env::var("BENCH_VERIFY_INTERVAL_S").unwrap_or_else(|_| "1".into());
        let off_settings = [("RELAY_VERIFY_INTERVAL_S", "0")];
        let on_settings = [
            ("RELAY_VERIFY_INTERVAL_S", interval.as_str()),
            ("RELAY_VERIFY_GRACE_S", "0"),
        ];
        let mut figures = Vec::new();
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
                "bench: verify pair {}/{pairs}: {off:.0} ev/s without the verifier, {on:.0} with \
                 it ({:.3}), full verify {full:.2} s",
                pair + 1,
                (off - on) / off
            );
            figures.push(((off - on) / off, full));
        }
        Ok(figures)
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
        self.sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots;
             TRUNCATE event_outbox;
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
        let publisher = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                let sql = format!(
                    "INSERT INTO event_outbox (event_type, event_context)
                     SELECT 'steady', json_build_object('n', g) FROM generate_series(1, {PER_TX}) g"
                );
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                for _ in 0..txs {
                    tick.tick().await;
                    client.execute(&sql, &[]).await?;
                }
                anyhow::Ok(())
            })
        });
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

    /// Commit-to-visible latency at a steady 10,000 events/s (100-event transactions every
    /// 10 ms) for 20 s, and ClickHouse inserts per second, read from ClickHouse itself.
    ///
    /// The publisher notes when each transaction committed; a watcher counts the rows in
    /// ClickHouse every few milliseconds. Transactions arrive in commit order, so transaction k is
    /// visible once the count reaches 100 (k + 1).
    fn latency(&self, max_wait_ms: Option<&str>) -> Result<(f64, f64, f64)> {
        const PER_TX: u64 = 100;
        const TXS: usize = 2_000;
        self.sql(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots; TRUNCATE event_outbox;
             SELECT 1 FROM pg_create_logical_replication_slot('{SLOT}', 'pgoutput');"
        ))?;
        self.ch.query("TRUNCATE TABLE bench.event_log")?;
        let extra: Vec<(&str, &str)> = max_wait_ms
            .map(|ms| {
                vec![
                    ("RELAY_BATCH_MAX_WAIT_MS", ms),
                    ("RELAY_STATUS_INTERVAL_MS", ms),
                ]
            })
            .unwrap_or_default();
        let mut child = self
            .relay_command(&["run"], &extra)
            .stderr(Stdio::null())
            .spawn()?;
        let url = self.pg.url("bench");
        let started = Instant::now();
        let publisher = std::thread::spawn(move || -> Result<Vec<Instant>> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                let sql = format!(
                    "INSERT INTO event_outbox (event_type, event_context)
                     SELECT 'latency', json_build_object('n', g) FROM generate_series(1, {PER_TX}) g"
                );
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let mut committed = Vec::with_capacity(TXS);
                for _ in 0..TXS {
                    tick.tick().await;
                    client.execute(&sql, &[]).await?;
                    committed.push(Instant::now());
                }
                anyhow::Ok(committed)
            })
        });
        let total = PER_TX * TXS as u64;
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
                    .find(|(_, c)| *c >= PER_TX * (k as u64 + 1))
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
        sentry_trace: None,
    }
}

/// (peak RSS in MB, CPU seconds) of a running child, from /proc.
/// One drain of the backlog: events per second of `pg_recvlogical` (the WAL limit) and of the
/// relay, the relay's peak RSS (MB) and CPU seconds per million events, and how the walsender
/// spent its time serving each.
struct Drain {
    wal: f64,
    relay: f64,
    rss: f64,
    cpu: f64,
    /// (running, waiting for a CPU) shares, see [`WalsenderCpu::shares`].
    walsender_wal: (f64, f64),
    walsender_relay: (f64, f64),
}

/// The CPU time of the walsender serving a slot, and its time waiting for a CPU, sampled while
/// a consumer drains it.
#[derive(Default)]
struct WalsenderCpu {
    pid: Option<u32>,
    first: Option<(Instant, (f64, f64))>,
    last: Option<(Instant, (f64, f64))>,
}

impl WalsenderCpu {
    fn sample(&mut self, bench: &Bench, slot: &str) {
        if self.pid.is_none() {
            let pid = bench.sql(&format!(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ));
            self.pid = pid.ok().and_then(|p| p.trim().parse().ok());
        }
        if let Some(times) = self.pid.and_then(sched_seconds) {
            let now = (Instant::now(), times);
            self.first.get_or_insert(now);
            self.last = Some(now);
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

/// (seconds on a CPU, seconds runnable but waiting for one) of a process, from the scheduler.
fn sched_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let mut fields = stat.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some((fields.next()?? / 1e9, fields.next()?? / 1e9))
}

/// User plus system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn proc_usage(child: &Child) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()?;
    Some((hwm_kb / 1024.0, cpu_seconds(child.id())?))
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
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
