//! Outages seen truthfully and left quickly (issue 18), against real servers: under a steady
//! load, ClickHouse killed for 20 s, or PostgreSQL stopped for 20 s. During the outage `/metrics`
//! shows the lag growing and the state gauge says what the relay waits for; once the server is
//! back, the first batch reaches ClickHouse within 2 s although the backoff (500 ms doubling to
//! 30 s) would wait far longer: the relay probes the failed server while it waits. Every event
//! arrives exactly once, and the log has no ERROR line for these routine events.
//!
//! Runnable on its own: `make test TEST_FILTER='binary(outages)'`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Fixture, RelayProcess, free_addr, metric, scrape, wait_until};
use harness::PgVersion;

const LONG: Duration = Duration::from_secs(180);
const OUTAGE: Duration = Duration::from_secs(20);
/// The first batch after the server is back ships within this time.
const RECOVERY: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq)]
enum Server {
    ClickHouse,
    Postgres,
}

#[test]
fn clickhouse_killed_for_20_s_under_load() {
    outage_under_load(PgVersion::V15, Server::ClickHouse);
}

#[test]
fn postgres_stopped_for_20_s_under_load() {
    outage_under_load(PgVersion::V15, Server::Postgres);
}

/// `outbox_relay_state{state="..."}` that reads 1, if any.
fn state(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("outbox_relay_state{state=\"")?;
        let (name, value) = rest.split_once("\"} ")?;
        (value == "1").then(|| name.to_string())
    })
}

/// About 2,000 events/s (100 per transaction, 20 transactions a second) until `stop`; failures
/// while PostgreSQL is down are expected: it reconnects.
fn load(url: &str, stop: &AtomicBool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = None;
        while !stop.load(Ordering::Relaxed) {
            if client
                .as_ref()
                .is_none_or(|c: &tokio_postgres::Client| c.is_closed())
            {
                client = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                    Ok((c, connection)) => {
                        tokio::spawn(connection);
                        Some(c)
                    }
                    Err(_) => None,
                };
            }
            if let Some(c) = &client {
                let _ = c
                    .batch_execute(
                        "INSERT INTO event_outbox (event_type, event_context)
                         SELECT 'load', json_build_object('n', g) FROM generate_series(1, 100) g",
                    )
                    .await;
            }
            // Pacing of the load, not synchronisation.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

fn outage_under_load(v: PgVersion, server: Server) {
    let addr = free_addr();
    let mut f = Fixture::start(
        v,
        &[
            ("RELAY_METRICS_ADDR", &addr),
            // Production-like waits: without probes, the relay would come back up to 16 s
            // after a 20 s outage.
            ("RELAY_RETRY_INITIAL_MS", "500"),
            ("RELAY_RETRY_MAX_MS", "30000"),
            // Batches end by time (every 500 ms, part of the 2 s allowed for the first batch)
            // under the load, so a batch is open nearly all the time and the events committed
            // right before the fault are usually not shipped yet.
            ("RELAY_BATCH_MAX_ROWS", "1000000"),
            ("RELAY_BATCH_MAX_WAIT_MS", "500"),
        ],
    );
    let external = match server {
        Server::ClickHouse => f.ch.is_external(),
        Server::Postgres => f.pg.is_external(),
    };
    if external {
        return println!("skipped: an external server cannot be stopped from here");
    }
    let relay = f.spawn_relay();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // About 2,000 events/s: 100 per transaction, 20 transactions a second. Failures while
        // PostgreSQL is down are expected and ignored.
        let (url, stop_ref) = (f.pg.url(&f.db), &stop);
        s.spawn(move || load(&url, stop_ref));
        // Stops the load however the scope ends (a failed assertion included).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let streaming = wait_until(LONG, || {
            scrape(&addr).and_then(|m| state(&m)).as_deref() == Some("streaming")
                && f.ch_count() > 0
        });
        assert!(streaming, "the relay does not stream\n{}", relay.log());
        run_outage(&mut f, &relay, &addr, server);
    });
    // Every event once.
    let committed: u64 = f
        .sql("SELECT count(*) FROM event_outbox")
        .trim()
        .parse()
        .unwrap();
    let arrived = wait_until(LONG, || f.ch_unique() >= committed);
    assert!(
        arrived,
        "{} of {committed} events arrived\n{}",
        f.ch_unique(),
        relay.log()
    );
    let counts = f.ch("SELECT count(), uniqExact(event_id) FROM {db}.event_log");
    let (count, unique) = counts.trim().split_once('\t').unwrap();
    assert_eq!(count, unique, "duplicates in ClickHouse (count, uniqExact)");
    assert_eq!(f.pg_ids(), f.ch_ids().0, "the event_id sets differ");
    let log = relay.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("ERROR"))
        .collect();
    assert!(
        errors.is_empty(),
        "ERROR lines for a routine outage:\n{}",
        errors.join("\n")
    );
    let failures = log.matches("relay session failed").count();
    println!("{committed} events, each exactly once; {failures} `relay session failed` lines");
}

fn run_outage(f: &mut Fixture, relay: &RelayProcess, addr: &str, server: Server) {
    let expected_state = match server {
        Server::ClickHouse => "waiting_for_clickhouse",
        Server::Postgres => "waiting_for_postgres",
    };
    // An event committed right before the fault (the open batch holds it for up to 500 ms).
    f.sql("INSERT INTO event_outbox (event_type, event_context) VALUES ('before_fault', '{}')");
    let started = Instant::now();
    match server {
        Server::ClickHouse => f.ch.kill().expect("kill ClickHouse"),
        Server::Postgres => f.pg.stop().expect("stop PostgreSQL"),
    }
    let shipped_total = || {
        scrape(addr)
            .map(|m| metric(&m, "outbox_relay_events_shipped_total"))
            .unwrap_or_default()
    };
    // During the outage: the lag grows and the state says why.
    let mut samples = Vec::new();
    while started.elapsed() < OUTAGE {
        if let Some(m) = scrape(addr) {
            samples.push((
                started.elapsed(),
                metric(&m, "outbox_relay_lag_seconds"),
                metric(&m, "outbox_relay_lag_bytes"),
                state(&m).unwrap_or_default(),
            ));
        }
        // The sampling period of the observation, not synchronisation.
        std::thread::sleep(Duration::from_millis(500));
    }
    for (at, lag_s, lag_b, state) in samples.iter().step_by(4) {
        println!(
            "{:>5.1} s into the outage: lag {lag_s:.1} s, {lag_b} bytes, state {state}",
            at.as_secs_f64()
        );
    }
    let late: Vec<_> = samples
        .iter()
        .filter(|(at, ..)| *at >= Duration::from_secs(5))
        .collect();
    assert!(!late.is_empty(), "no /metrics sample during the outage");
    assert!(
        late.iter().all(|(.., s)| s == expected_state),
        "the state gauge did not say {expected_state}: {samples:?}\n{}",
        relay.log()
    );
    let (first, last) = (late[0], late[late.len() - 1]);
    let lag_grew = last.1 >= 15.0 && last.1 > first.1 + 10.0;
    // The server back: the first batch within RECOVERY.
    let shipped = shipped_total();
    let back;
    match server {
        Server::ClickHouse => {
            f.ch.restart().expect("restart ClickHouse");
            back = Instant::now();
            assert!(
                lag_grew,
                "lag seconds did not grow during the outage: {samples:?}\n{}",
                relay.log()
            );
            assert!(
                last.2 > first.2,
                "lag bytes did not grow while PostgreSQL took writes: {samples:?}"
            );
        }
        Server::Postgres => {
            // Nothing commits while PostgreSQL is down: the lag is the age of events committed
            // before the stop that ClickHouse does not hold. The relay may have shipped them
            // all (its batch deadline came before the stream's end): then the truth is 0.
            let in_clickhouse = f.ch_count();
            let stopped_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            f.pg.restart().expect("restart PostgreSQL");
            back = Instant::now();
            let committed: u64 = f
                .sql(&format!(
                    "SELECT count(*) FROM event_outbox WHERE event_date_time < to_timestamp({stopped_at})"
                ))
                .trim()
                .parse()
                .unwrap();
            if in_clickhouse >= committed {
                println!(
                    "the relay shipped all {committed} events before the stream ended: lag 0 is the truth"
                );
                assert!(
                    late.iter().all(|s| s.1 == 0.0),
                    "lag seconds above 0 with every committed event in ClickHouse: {samples:?}"
                );
            } else {
                println!(
                    "{} committed events were not shipped when PostgreSQL stopped",
                    committed - in_clickhouse
                );
                assert!(
                    lag_grew,
                    "lag seconds did not grow during the outage: {samples:?}\n{}",
                    relay.log()
                );
            }
        }
    }
    let shipped_again = wait_until(LONG, || shipped_total() > shipped);
    let recovery = back.elapsed();
    assert!(
        shipped_again,
        "nothing shipped after the server came back\n{}",
        relay.log()
    );
    println!(
        "first batch after the server answered: {:.2} s",
        recovery.as_secs_f64()
    );
    assert!(
        recovery <= RECOVERY,
        "the first batch shipped {recovery:?} after the server was back (limit {RECOVERY:?})\n{}",
        relay.log()
    );
    let streaming = wait_until(LONG, || {
        scrape(addr).and_then(|m| state(&m)).as_deref() == Some("streaming")
    });
    assert!(
        streaming,
        "the state gauge did not return to streaming\n{}",
        relay.log()
    );
    let drained = wait_until(LONG, || {
        scrape(addr).is_some_and(|m| metric(&m, "outbox_relay_lag_seconds") < 5.0)
    });
    assert!(
        drained,
        "lag seconds did not fall after recovery\n{}",
        relay.log()
    );
}
