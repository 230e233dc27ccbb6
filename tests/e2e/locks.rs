//! Never in the application's way (issue 24, point 1): whatever the relay runs on the outbox
//! (`verify`, the background verifier, the purge) gives way to a migration that queues behind
//! its locks, so the application's INSERTs never wait behind the relay.
//!
//! A migrator watches `pg_locks` and runs its `ALTER TABLE` (an `ADD COLUMN`, then a rewriting
//! `ALTER COLUMN ... TYPE`) the moment one of the relay's sessions holds a lock on the outbox,
//! while an application INSERTs every 20 ms with `statement_timeout = 2s` and a window differs
//! (verify's passes last longest then). No INSERT may wait a second, no migration five; the
//! work that gave way completes afterwards.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Fixture, RelayProcess, http_get, metric, wait_until};
use harness::PgVersion;

scenarios!(
    each_postgres: [
        migrations_never_wait_behind_the_relay,
    ],
);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// The application: an INSERT every 20 ms, each allowed 2 s; the longest it took.
struct App {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, u64)>,
}

impl App {
    fn start(url: String) -> App {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            runtime().block_on(async {
                let client = connect(&url).await;
                client
                    .batch_execute("SET statement_timeout = '2s'")
                    .await
                    .unwrap();
                let (mut longest, mut inserts) = (Duration::ZERO, 0);
                while !stopping.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    client
                        .batch_execute(
                            "INSERT INTO event_outbox (event_type, event_context)
                             VALUES ('app', '{}')",
                        )
                        .await
                        .unwrap_or_else(|e| {
                            panic!(
                                "an application INSERT failed after {:?}: {e}",
                                started.elapsed()
                            )
                        });
                    longest = longest.max(started.elapsed());
                    inserts += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (longest, inserts)
            })
        });
        App { stop, thread }
    }

    /// Stops it: (the longest INSERT, how many).
    fn stop(self) -> (Duration, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("the application's INSERTs failed")
    }
}

/// Runs `n` migrations (an `ADD COLUMN`, then a rewriting `ALTER COLUMN ... TYPE`), each the
/// moment a session named `application_name` holds a lock on
/// the outbox (within `deadline` in all); the longest one took.
fn migrate_under(
    f: &Fixture,
    (phase, application_name): (&str, &str),
    n: usize,
    deadline: Duration,
) -> Duration {
    let rt = runtime();
    rt.block_on(async {
        let client = connect(&f.pg.url(&f.db)).await;
        let started = Instant::now();
        let mut longest = Duration::ZERO;
        for i in 0..n {
            loop {
                assert!(
                    started.elapsed() < deadline,
                    "after {i} migrations, no session named {application_name:?} held a lock on \
                     the outbox within {deadline:?}"
                );
                let held = client
                    .query_opt(
                        "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                          WHERE l.relation = 'event_outbox'::regclass AND l.granted
                            AND a.application_name = $1 LIMIT 1",
                        &[&application_name],
                    )
                    .await
                    .unwrap();
                if held.is_some() {
                    break;
                }

                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let column = format!("note_{phase}_{i}");
            let ddl = format!(
                "ALTER TABLE event_outbox ADD COLUMN {column} text;
                 ALTER TABLE event_outbox ALTER COLUMN {column} TYPE integer USING NULL"
            );
            // Two statements, each waiting behind the relay's lock if it did not give way.
            for statement in ddl.split(';') {
                let began = Instant::now();
                client.batch_execute(statement).await.unwrap();
                longest = longest.max(began.elapsed());
            }
        }
        longest
    })
}

/// Publishes `n` events in transactions of 5,000 and waits until they are in ClickHouse.
fn fill(f: &Fixture, relay: &RelayProcess, n: u64) {
    f.publish(n, 5_000, "fill");
    f.wait_for_rows(n, Duration::from_secs(240), Some(relay));
}

/// Deletes a tenth of the events in ClickHouse: their window differs.
fn lose_some(f: &Fixture) -> u64 {
    f.ch(
        "ALTER TABLE {db}.event_log DELETE WHERE event_type = 'fill' AND tx_seq % 10 = 3
         SETTINGS mutations_sync = 1",
    );
    f.sql("SELECT count(*) FROM event_outbox WHERE event_type = 'fill'")
        .trim()
        .parse::<u64>()
        .unwrap()
        - f.ch("SELECT count() FROM {db}.event_log WHERE event_type = 'fill'")
            .trim()
            .parse::<u64>()
            .unwrap()
}

fn assert_unhindered(what: &str, app: App, migration: Duration) {
    let (insert, inserts) = app.stop();
    println!(
        "{what}: longest INSERT {insert:?} ({inserts} INSERTs), longest migration step {migration:?}"
    );
    assert!(
        insert < Duration::from_secs(1),
        "{what}: an INSERT waited {insert:?}"
    );
    assert!(
        migration < Duration::from_secs(5),
        "{what}: a migration waited {migration:?}"
    );
}

fn migrations_never_wait_behind_the_relay(v: PgVersion) {
    let f = Fixture::start(v, &[("RELAY_VERIFY_INTERVAL_S", "0")]);
    let relay = f.spawn_relay();
    fill(&f, &relay, 60_000);
    let lost = lose_some(&f);
    let url = f.pg.url(&f.db);

    // 1. `outbox-relay verify`, run again and again: each run gives way and tries again.
    let app = App::start(url.clone());
    let done = Arc::new(AtomicBool::new(false));
    let verifying = {
        let (done, f_relay) = (done.clone(), common::relay_bin());
        let env = f.env.clone();
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let out = std::process::Command::new(&f_relay)
                    .args(["verify", "--json", "--wait-s", "60"])
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .output()
                    .unwrap();
                runs.push(out);
            }
            runs
        })
    };
    let migration = migrate_under(
        &f,
        ("cli", "outbox-relay verify"),
        4,
        Duration::from_secs(120),
    );
    done.store(true, Ordering::Relaxed);
    let runs = verifying.join().unwrap();
    assert_unhindered("verify", app, migration);
    let mut gave_way = 0;
    for out in &runs {
        let log = String::from_utf8_lossy(&out.stderr);
        gave_way += log.matches("verify gave way").count();
        assert_eq!(out.status.code(), Some(1), "verify could not check:\n{log}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["missing"].as_array().unwrap().len() as u64,
            lost,
            "{report}"
        );
    }
    assert!(
        gave_way >= 1,
        "no verify run gave way: the test did not collide"
    );

    // 2. The background verifier, every second.
    drop(relay);
    let addr = format!("127.0.0.1:{}", free_port());
    let relay = f.spawn_relay_with(&[
        ("RELAY_VERIFY_INTERVAL_S", "1"),
        ("RELAY_VERIFY_GRACE_S", "1"),
        ("RELAY_METRICS_ADDR", addr.as_str()),
    ]);
    let app = App::start(url.clone());
    let migration = migrate_under(
        &f,
        ("background", "outbox-relay verify"),
        4,
        Duration::from_secs(120),
    );
    assert_unhindered("background verifier", app, migration);
    // The passes that gave way are counted; the next one checks and finds the loss.
    let checked = wait_until(Duration::from_secs(60), || {
        let (_, body) = http_get(&addr, "/metrics");
        metric(&body, "outbox_relay_verify_yielded_total") >= 1.0
            && metric(&body, "outbox_relay_missing_events") == lost as f64
    });
    assert!(
        checked,
        "{}\n{}",
        http_get(&addr, "/metrics").1,
        relay.log()
    );

    // 3. The purge, deleting what checkpoints made two hours old see.
    drop(relay);
    let relay = f.spawn_relay_with(&[
        ("RELAY_OUTBOX_RETENTION_HOURS", "1"),
        ("RELAY_PURGE_INTERVAL_S", "1"),
    ]);
    f.sql("UPDATE event_outbox_checkpoints SET recorded_at = recorded_at - interval '2 hours'");
    let app = App::start(url);
    let migration = migrate_under(
        &f,
        ("purge", "outbox-relay purge"),
        3,
        Duration::from_secs(120),
    );
    assert_unhindered("purge", app, migration);
    // A rewrite gives every outbox row the migration's xid: the purge keeps them until a
    // checkpoint taken after it is older than the retention (docs/operations.md, "Outbox
    // retention"). So: events after the migrations, shipped and checkpointed, that checkpoint
    // made old; the purge that gave way then deletes, and never failed for the migrations.
    f.sql(
        "INSERT INTO event_outbox (event_type, event_context)
         SELECT 'after', '{}' FROM generate_series(1, 20)",
    );
    let shipped = wait_until(Duration::from_secs(60), || {
        f.ch("SELECT count() FROM {db}.event_log WHERE event_type = 'after'")
            .trim()
            == "20"
    });
    assert!(
        shipped,
        "the events after the migrations never shipped\n{}",
        relay.log()
    );
    f.wait_for_checkpoint(&relay);
    f.sql("UPDATE event_outbox_checkpoints SET recorded_at = recorded_at - interval '2 hours'");
    let purged = wait_until(Duration::from_secs(60), || {
        relay.log().contains("outbox purged")
    });
    let log = relay.log();
    assert!(purged, "the purge never ran\n{log}");
    assert!(!log.contains("outbox purge failed"), "{log}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
