//! `BENCH_ONLY=differing`: the relay's memory and CPU while its background verifier keeps
//! finding a window that differs (issue 27), and the CLI's verify and repair of that window.
//!
//! `BENCH_DIFFERING_EVENTS` (3,000,000) events are published with an `event_date_time` spread
//! over past hours, `BENCH_DIFFERING_WINDOW_ROWS` (30,000) a one-hour window, and shipped by a
//! relay without a verifier. Then, for each count D of `BENCH_DIFFERING_DELETED` (1000; a
//! comma-separated list for several rounds), two runs of `BENCH_DIFFERING_SECONDS` (300), each
//! a fresh relay with the verifier every 10 s (grace 5 s) while a publisher streams
//! `BENCH_DIFFERING_RATE` (1,500) events/s: A with ClickHouse complete (the baseline), B after D
//! rows of one window (another window each round, with at least 2 D rows) were deleted in
//! ClickHouse. Then, beside B's relay, `verify --json` must name exactly those D, `verify
//! --repair` re-ships them, a second `verify` finds the table complete, and ClickHouse holds
//! every outbox id exactly once. Figures, never assertions (bench/README.md).

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{
    Bench, SLOT, cpu_seconds, env_or, git_commit, merge_result, parse_lsn, steady_publisher, stop,
};

const HOUR_US: i64 = 3_600_000_000;
/// The relay's settings in runs A and B.
const VERIFY_SETTINGS: &[(&str, &str)] = &[
    ("RELAY_VERIFY_INTERVAL_S", "10"),
    ("RELAY_VERIFY_GRACE_S", "5"),
    ("RELAY_VERIFY_WINDOW_S", "3600"),
    ("RELAY_VERIFY_REPAIR", "false"),
];

/// One streamed run's figures; the relay still runs (the caller stops it).
struct Run {
    relay: Child,
    /// Largest VmRSS sampled every 250 ms, and VmHWM at the end (MB).
    sampled_rss_mb: f64,
    hwm_mb: f64,
    /// The relay's CPU seconds (user + system) from its start to the last streamed event
    /// confirmed.
    cpu_s: f64,
    streamed: u64,
    /// Passes that logged the deleted window as differing.
    found_passes: u64,
    /// Passes that could not check (`verify_errors_total`) and the `missing_events` gauge.
    errors: f64,
    missing_gauge: f64,
    seconds: f64,
}

impl Run {
    fn cpu_per_million(&self) -> f64 {
        self.cpu_s / (self.streamed as f64 / 1e6)
    }
}

/// The window layout of the load: rows per one-hour window, oldest first (window k is round
/// k's, with at least 2 D_k rows), and the start of the first window (Unix µs, on the hour).
struct Layout {
    rows: Vec<u64>,
    base_us: i64,
}

impl Layout {
    fn new(events: u64, per_window: u64, deleted: &[u64]) -> Layout {
        let mut rows: Vec<u64> = deleted.iter().map(|d| per_window.max(2 * d)).collect();
        let mut left = events.saturating_sub(rows.iter().sum());
        while left > 0 {
            let n = left.min(per_window);
            rows.push(n);
            left -= n;
        }
        let now_us = relay::metrics::unix_now_us();
        // Two hours of room before the current hour, where the streamed events go.
        let base_us = (now_us / HOUR_US - rows.len() as i64 - 2) * HOUR_US;
        Layout { rows, base_us }
    }

    fn window_start(&self, w: usize) -> i64 {
        self.base_us + w as i64 * HOUR_US
    }
}

pub(super) fn run(bench: &Bench) -> Result<()> {
    let events: u64 = env_or("BENCH_DIFFERING_EVENTS", 3_000_000);
    let seconds: u64 = env_or("BENCH_DIFFERING_SECONDS", 300);
    let rate: u64 = env_or("BENCH_DIFFERING_RATE", 1_500);
    let per_window: u64 = env_or("BENCH_DIFFERING_WINDOW_ROWS", 30_000);
    let deleted: Vec<u64> = std::env::var("BENCH_DIFFERING_DELETED")
        .unwrap_or_else(|_| "1000".into())
        .split(',')
        .map(|d| {
            d.trim()
                .parse()
                .context("BENCH_DIFFERING_DELETED: counts, comma-separated")
        })
        .collect::<Result<_>>()?;
    let layout = Layout::new(events, per_window, &deleted);
    eprintln!(
        "bench: differing: {} events in {} one-hour windows, {seconds} s runs at {rate} events/s, \
         deleting {deleted:?}",
        layout.rows.iter().sum::<u64>(),
        layout.rows.len()
    );
    let loaded = Instant::now();
    load(bench, &layout)?;
    eprintln!(
        "bench: differing: loaded and shipped in {:.0} s",
        loaded.elapsed().as_secs_f64()
    );
    for (round, &d) in deleted.iter().enumerate() {
        let suffix = match d {
            1_000 => String::new(),
            d if d % 1_000 == 0 => format!("_{}k", d / 1_000),
            d => format!("_{d}"),
        };
        let figures = round_figures(bench, &layout, round, d, seconds, rate)?;
        println!();
        for (key, value) in &figures {
            let key = format!("{key}{suffix}");
            println!("{key:<52} {value:>12.2}");
            merge_result(&key, *value)?;
        }
    }
    // The commit measured, beside the figures.
    let path = harness::workspace_root().join("bench/results.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    json["differing_commit"] = git_commit().into();
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("\nmerged into {}", path.display());
    Ok(())
}

/// The load: an empty outbox and table, a fresh slot, the layout's events published in
/// 10,000-event transactions while a relay without a verifier ships them.
fn load(bench: &Bench, layout: &Layout) -> Result<()> {
    bench.sql(&format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots;
         TRUNCATE event_outbox;
         SELECT 1 FROM pg_create_logical_replication_slot('{SLOT}', 'pgoutput');"
    ))?;
    bench.ch.query("TRUNCATE TABLE bench.event_log")?;
    let mut relay = bench
        .relay_command(&["run"], &[("RELAY_VERIFY_INTERVAL_S", "0")])
        .stderr(Stdio::null())
        .spawn()?;
    let counts = layout
        .rows
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let published = bench.sql(&format!(
        "SET synchronous_commit = off;
         DO $$
         DECLARE
           counts int8[] := ARRAY[{counts}]::int8[];
           base timestamptz := to_timestamp({base});
           w int; c int8; i int8;
         BEGIN
           FOR w IN 1..array_length(counts, 1) LOOP
             c := counts[w]; i := 0;
             WHILE i < c LOOP
               INSERT INTO event_outbox (event_type, event_date_time, event_context)
               SELECT 'bench.' || (g % 8),
                      base + make_interval(hours => w - 1, secs => (g * 3600000000 / c) / 1e6),
                      json_build_object('n', g, 'user', 'u' || (g % 1000), 'ok', true)
                 FROM generate_series(i, least(i + 10000, c) - 1) g;
               COMMIT;
               i := i + 10000;
             END LOOP;
           END LOOP;
         END $$;",
        base = layout.base_us / 1_000_000
    ));
    let shipped = published.and_then(|_| wait_until_shipped(bench, Duration::from_secs(3600)));
    stop(&mut relay);
    shipped?;
    let (rows, outbox) = (ch_count(bench)?, outbox_count(bench)?);
    if rows != outbox {
        bail!("after the load ClickHouse holds {rows} rows, the outbox {outbox}");
    }
    Ok(())
}

/// Waits until the slot confirmed the WAL written so far.
fn wait_until_shipped(bench: &Bench, timeout: Duration) -> Result<()> {
    let end = parse_lsn(bench.sql("SELECT pg_current_wal_insert_lsn()")?.trim());
    let started = Instant::now();
    let confirmed =
        format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'");
    while parse_lsn(bench.probe(&confirmed)?.trim()) < end {
        if started.elapsed() > timeout {
            bail!("the relay did not confirm {end:X} in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// One round: run A, D rows of window `round` deleted, run B, then the CLI's verify and repair
/// beside B's relay. The figures by key (without the round's suffix).
fn round_figures(
    bench: &Bench,
    layout: &Layout,
    round: usize,
    d: u64,
    seconds: u64,
    rate: u64,
) -> Result<Vec<(String, f64)>> {
    let mut a = streamed_run(bench, seconds, rate, "baseline")?;
    stop(&mut a.relay);
    print_run("baseline", &a);
    delete_rows(bench, layout, round, d)?;
    let mut b = streamed_run(bench, seconds, rate, "differing")?;
    print_run("differing", &b);
    let checked = check_and_repair(bench, d);
    stop(&mut b.relay);
    let checked = checked?;
    let (rows, unique, outbox) = counts(bench)?;
    eprintln!(
        "bench: differing: after the repair ClickHouse holds {rows} rows, {unique} ids; the \
         outbox {outbox}"
    );
    let mut figures = vec![
        ("verify_baseline_peak_rss_mb".to_string(), a.hwm_mb),
        ("verify_baseline_sampled_rss_mb".into(), a.sampled_rss_mb),
        (
            "verify_baseline_cpu_s_per_million_events".into(),
            a.cpu_per_million(),
        ),
        ("verify_baseline_passes_found".into(), a.found_passes as f64),
        ("verify_differing_peak_rss_mb".into(), b.hwm_mb),
        ("verify_differing_sampled_rss_mb".into(), b.sampled_rss_mb),
        (
            "verify_differing_cpu_s_per_million_events".into(),
            b.cpu_per_million(),
        ),
        (
            "verify_differing_cpu_ratio".into(),
            b.cpu_per_million() / a.cpu_per_million(),
        ),
        (
            "verify_differing_passes_found".into(),
            b.found_passes as f64,
        ),
        (
            "verify_differing_passes_expected".into(),
            (b.seconds / 10.0).floor(),
        ),
        ("verify_differing_pass_errors".into(), a.errors + b.errors),
        ("verify_differing_missing_gauge".into(), b.missing_gauge),
        ("verify_differing_deleted".into(), d as f64),
    ];
    figures.extend(checked);
    figures.extend([
        (
            "verify_differing_rows_after_repair_duplicates".to_string(),
            rows as f64 - unique as f64,
        ),
        (
            "verify_differing_rows_after_repair_missing".into(),
            outbox as f64 - unique as f64,
        ),
    ]);
    Ok(figures)
}

fn print_run(label: &str, r: &Run) {
    eprintln!(
        "bench: differing: {label} run: {} events streamed in {:.0} s, relay CPU {:.2} s \
         ({:.2} s per million), peak RSS {:.1} MB (VmHWM; sampled {:.1}), {} passes found a \
         differing window, {} pass errors, missing_events {}",
        r.streamed,
        r.seconds,
        r.cpu_s,
        r.cpu_per_million(),
        r.hwm_mb,
        r.sampled_rss_mb,
        r.found_passes,
        r.errors,
        r.missing_gauge
    );
}

/// Deletes the oldest `d` rows (by `event_date_time`, all distinct) of window `w` in ClickHouse.
fn delete_rows(bench: &Bench, layout: &Layout, w: usize, d: u64) -> Result<()> {
    let (from, until) = (layout.window_start(w), layout.window_start(w + 1));
    let in_window = |upto: i64| {
        format!(
            "event_date_time >= fromUnixTimestamp64Micro(toInt64({from}), 'UTC')
             AND event_date_time < fromUnixTimestamp64Micro(toInt64({upto}), 'UTC')"
        )
    };
    let count = |upto: i64| -> Result<u64> {
        Ok(bench
            .ch
            .query(&format!(
                "SELECT count() FROM bench.event_log WHERE {}",
                in_window(upto)
            ))?
            .trim()
            .parse()?)
    };
    let before = count(until)?;
    if before < 2 * d {
        bail!("window {w} holds {before} rows, fewer than twice the {d} to delete");
    }
    let cutoff: i64 = bench
        .ch
        .query(&format!(
            "SELECT toUnixTimestamp64Micro(event_date_time) FROM bench.event_log WHERE {}
              ORDER BY event_date_time LIMIT 1 OFFSET {d}",
            in_window(until)
        ))?
        .trim()
        .parse()?;
    if count(cutoff)? != d {
        bail!("window {w}: the rows before the cut are not exactly {d}");
    }
    bench.ch.query_with_timeout(
        &format!(
            "ALTER TABLE bench.event_log DELETE WHERE {} SETTINGS mutations_sync = 2",
            in_window(cutoff)
        ),
        Duration::from_secs(600),
    )?;
    let after = count(until)?;
    if before - after != d {
        bail!("window {w}: {before} rows before the delete, {after} after, not {d} fewer");
    }
    eprintln!(
        "bench: differing: deleted {d} of the {before} rows of window {w} ({}) in ClickHouse",
        relay::ops::verify::format_us(from)
    );
    Ok(())
}

/// A fresh relay with the verifier every 10 s while `rate` events/s are published for
/// `seconds`; sampled until it confirmed them.
fn streamed_run(bench: &Bench, seconds: u64, rate: u64, label: &str) -> Result<Run> {
    const TICK_MS: u64 = 10;
    let per_tx = (rate * TICK_MS / 1000).max(1);
    let txs = seconds * 1000 / TICK_MS;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!(
        "bench_differing_{}_{label}_{}.log",
        std::process::id(),
        relay::metrics::unix_now_us() / 1_000_000
    ));
    let mut env = vec![("RELAY_METRICS_ADDR", addr.as_str())];
    env.extend_from_slice(VERIFY_SETTINGS);
    let started = Instant::now();
    let mut relay = bench
        .relay_command(&["run"], &env)
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let pid = relay.id();
    let fail = |relay: &mut Child, e: anyhow::Error| -> anyhow::Error {
        stop(relay);
        e
    };
    let streaming_by = Instant::now() + Duration::from_secs(60);
    loop {
        let active = bench.probe(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{SLOT}' AND active"
        ));
        match active {
            Ok(a) if a.trim() == "1" => break,
            Ok(_) if Instant::now() < streaming_by => std::thread::sleep(Duration::from_millis(10)),
            Ok(_) => {
                return Err(fail(
                    &mut relay,
                    anyhow::anyhow!("the relay did not stream"),
                ));
            }
            Err(e) => return Err(fail(&mut relay, e)),
        }
    }
    let url = bench.pg.url("bench");
    let publisher = steady_publisher(url, "streamed", per_tx, TICK_MS, txs);
    let mut sampled_kb = 0u64;
    // The relay's CPU a minute into the stream (the first passes behind it), for the log.
    let publishing = Instant::now();
    let mut after_a_minute: Option<f64> = None;
    while !publisher.is_finished() {
        sampled_kb = sampled_kb.max(status_kb(pid, "VmRSS:").unwrap_or(0));
        if after_a_minute.is_none() && publishing.elapsed() >= Duration::from_secs(60) {
            after_a_minute = cpu_seconds(pid);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let publish_s = publishing.elapsed().as_secs_f64();
    let published = publisher.join().expect("publisher thread");
    let shipped = published.and_then(|_| wait_until_shipped(bench, Duration::from_secs(600)));
    if let Err(e) = shipped {
        return Err(fail(&mut relay, e));
    }
    sampled_kb = sampled_kb.max(status_kb(pid, "VmRSS:").unwrap_or(0));
    let cpu_s = cpu_seconds(pid).context("the relay's CPU")?;
    let hwm_kb = status_kb(pid, "VmHWM:").context("the relay's VmHWM")?;
    let seconds = started.elapsed().as_secs_f64();
    if let Some(c) = after_a_minute.filter(|_| publish_s > 90.0) {
        eprintln!(
            "bench: differing: {label} run: relay CPU {c:.2} s by a minute into the stream, \
             then {:.2} s per million events",
            (cpu_s - c) / ((publish_s - 60.0) * rate as f64 / 1e6)
        );
    }
    let metrics = scrape(&addr).unwrap_or_default();
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let mut text = String::new();
    std::fs::File::open(&log)?.read_to_string(&mut text)?;
    let found_passes = text.matches("window differs").count() as u64;
    Ok(Run {
        sampled_rss_mb: sampled_kb as f64 / 1024.0,
        hwm_mb: hwm_kb as f64 / 1024.0,
        cpu_s,
        streamed: per_tx * txs,
        found_passes,
        errors: gauge("outbox_relay_verify_errors_total"),
        missing_gauge: gauge("outbox_relay_missing_events"),
        seconds,
        relay,
    })
}

/// A `/proc/<pid>/status` field in kB.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

fn scrape(addr: &str) -> Result<String> {
    Ok(ureq::get(&format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(10))
        .call()?
        .into_string()?)
}

/// Beside the running relay: `verify --json` (the missing it names), `verify --repair`, and
/// `verify` once more.
fn check_and_repair(bench: &Bench, d: u64) -> Result<Vec<(String, f64)>> {
    let verify = |args: &[&str]| -> Result<(Option<i32>, serde_json::Value, f64)> {
        let started = Instant::now();
        let out = bench.relay_command(args, &[]).output()?;
        let seconds = started.elapsed().as_secs_f64();
        let json = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "outbox-relay {args:?} ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.code(), json, seconds))
    };
    let (code, report, seconds) = verify(&["verify", "--json", "--wait-s", "120"])?;
    let missing = report["missing"].as_array().map_or(0, Vec::len) as u64;
    let unlisted = report["unlisted"].as_u64().unwrap_or(0);
    let windows = report["differing_windows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let extra = report["extra"].as_array().map_or(0, Vec::len) as u64;
    let altered = report["altered"].as_array().map_or(0, Vec::len) as u64;
    eprintln!(
        "bench: differing: verify exit {code:?} in {seconds:.1} s: {missing} missing listed \
         ({d} deleted), {unlisted} unlisted, {extra} extra, {altered} altered, differing \
         windows {}",
        serde_json::Value::Array(windows.clone())
    );
    let (repair_code, repaired, repair_seconds) =
        verify(&["verify", "--repair", "--json", "--wait-s", "300"])?;
    let shipped = repaired["repair"]["shipped"].as_u64().unwrap_or(0);
    eprintln!(
        "bench: differing: verify --repair exit {repair_code:?} in {repair_seconds:.1} s: {} \
         missing found, {shipped} re-shipped, {} already there",
        repaired["missing"].as_array().map_or(0, Vec::len),
        repaired["repair"]["already_there"]
    );
    let (after_code, after, _) = verify(&["verify", "--json", "--wait-s", "120"])?;
    let complete = after_code == Some(0)
        && after["missing"].as_array().is_some_and(Vec::is_empty)
        && after["unlisted"].as_u64() == Some(0);
    eprintln!("bench: differing: verify after the repair: exit {after_code:?}");
    Ok(vec![
        ("verify_differing_reported_missing".into(), missing as f64),
        ("verify_differing_reported_unlisted".into(), unlisted as f64),
        (
            "verify_differing_reported_windows".into(),
            windows.len() as f64,
        ),
        (
            "verify_differing_reported_other".into(),
            (extra + altered) as f64,
        ),
        ("verify_differing_cli_seconds".into(), seconds),
        ("verify_differing_repaired".into(), shipped as f64),
        (
            "verify_differing_complete_after_repair".into(),
            if complete { 1.0 } else { 0.0 },
        ),
    ])
}

fn ch_count(bench: &Bench) -> Result<u64> {
    Ok(bench
        .ch
        .query("SELECT count() FROM bench.event_log")?
        .trim()
        .parse()?)
}

fn outbox_count(bench: &Bench) -> Result<u64> {
    Ok(bench
        .sql("SELECT count(*) FROM event_outbox")?
        .trim()
        .parse()?)
}

/// (ClickHouse rows, distinct ids in ClickHouse, outbox rows).
fn counts(bench: &Bench) -> Result<(u64, u64, u64)> {
    let text = bench
        .ch
        .query("SELECT count(), uniqExact(event_id) FROM bench.event_log")?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let rows = fields.next().context("count()")??;
    let unique = fields.next().context("uniqExact")??;
    Ok((rows, unique, outbox_count(bench)?))
}
