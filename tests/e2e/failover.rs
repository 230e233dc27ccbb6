//! PostgreSQL failover (issue 14): a primary and a streaming standby (PostgreSQL 18, failover
//! slot synchronized to the standby), the relay given both hosts. The primary is killed with
//! SIGKILL at a random moment under 4 publishers and the standby promoted; the relay must find the
//! promoted standby on its own, resume from the synchronized slot and ship exactly the new
//! primary's outbox (set equality, no duplicate rows without FINAL).
//!
//! `RELAY_TEST_FAILOVER_ROUNDS` sets the rounds of `kill9_primary_under_publishers` (default 1;
//! the acceptance run uses 10). Each round prints the time from the promotion to the first batch
//! shipped from the new primary; the last prints p50 and max.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{relay_bin, wait_until};
use harness::{ClickHouseServer, PgPair, PgServer, PgVersion};
use rand::Rng;

const VERSION: PgVersion = PgVersion::V18;

/// One primary+standby pair, its database and ClickHouse database, the relay's settings (the
/// slot's name among them).
struct Setup {
    pair: PgPair,
    db: String,
    ch_db: String,
    env: Vec<(String, String)>,
}

fn skip_reason() -> Option<String> {
    skip_reason_for(VERSION)
}

fn skip_reason_for(version: PgVersion) -> Option<String> {
    if std::env::var("RELAY_TEST_POSTGRES_URL").is_ok() {
        return Some("an external PostgreSQL cannot be failed over".into());
    }
    PgPair::available(version)
}

impl Setup {
    fn start(ch: &ClickHouseServer, keep_standby_slots_setting: bool) -> Setup {
        Setup::start_with(VERSION, ch, keep_standby_slots_setting, &[])
    }

    fn start_with(
        version: PgVersion,
        ch: &ClickHouseServer,
        keep_standby_slots_setting: bool,
        extra_env: &[(&str, &str)],
    ) -> Setup {
        let dbname = !extra_env.contains(&("NO_DBNAME_IN_PRIMARY_CONNINFO", "1"));
        // Settings of the standby's own (not the relay's): `STANDBY_CONF` in `extra_env`.
        let standby_conf = extra_env
            .iter()
            .find(|(k, _)| *k == "STANDBY_CONF")
            .map(|(_, v)| *v)
            .unwrap_or_default();
        let pair = PgPair::start_with_standby_conf(
            version,
            keep_standby_slots_setting,
            dbname,
            standby_conf,
        )
        .expect("primary + standby");
        let db = harness::unique_name("app");
        pair.primary.create_database(&db).expect("create database");
        // Commands reach the standby's copy of the database (`status` asks each standby).
        pair.wait_for_standby()
            .expect("the standby replays the new database");
        let ch_db = harness::unique_name("analytics");
        let slot = harness::unique_name("slot");
        let url = format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}",
            pair.primary.port(),
            pair.standby.port()
        );
        let env = [
            ("RELAY_POSTGRES_URL", url.as_str()),
            ("RELAY_CLICKHOUSE_URL", &ch.url(&ch_db)),
            ("RELAY_SLOT", &slot),
            ("RELAY_BATCH_MAX_WAIT_MS", "200"),
            ("RELAY_STATUS_INTERVAL_MS", "100"),
            ("RELAY_RETRY_INITIAL_MS", "100"),
            ("RELAY_RETRY_MAX_MS", "500"),
            ("RELAY_ENVIRONMENT", "test"),
            ("RELAY_LOG_LEVEL", "info"),
            ("RELAY_METRICS_ADDR", ""),
        ]
        .iter()
        .chain(extra_env)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let setup = Setup {
            pair,
            db,
            ch_db,
            env,
        };
        let out = setup.relay(&["setup"]);
        assert!(out.status.success(), "setup: {}", common::stderr(&out));
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let failover =
            version.has_failover_slots() && !extra_env.contains(&("RELAY_SLOT_FAILOVER", "false"));
        assert!(
            !failover || said.contains("is a failover slot"),
            "setup should say the slot is a failover slot and what standbys need: {said}"
        );
        setup
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(relay_bin());
        cmd.args(args).env_clear();
        for key in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn relay(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run outbox-relay")
    }

    fn spawn_relay(&self, log: &std::path::Path) -> Relay {
        let file = std::fs::File::create(log).expect("relay log");
        Relay(
            self.command(&["run"])
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .expect("spawn outbox-relay run"),
        )
    }

    /// Waits until `status` says the standby is ready for failover (its copy of the slot synced
    /// and persistent), reading nothing but `status --json`, as docs/operations.md tells
    /// operators to.
    fn wait_synced(&self) {
        // The first sync of a slot can take minutes on a loaded machine (the standby keeps it
        // temporary until the primary's slot moved past what the standby reserved). The
        // primary's slot moves its catalog_xmin on a running-transactions record, which
        // PostgreSQL writes every 15 s by itself: writing one at each look only hastens what
        // happens anyway (the relay and `status` are not told).
        let ok = wait_until(Duration::from_secs(300), || {
            let _ = self
                .pair
                .primary
                .psql("postgres", "SELECT pg_log_standby_snapshot()");
            let standby = self.standby_status();
            standby["ready_for_failover"] == true && standby["failover_state"] == "ready"
        });
        let status = String::from_utf8_lossy(&self.relay(&["status"]).stdout).into_owned();
        assert!(
            ok,
            "the standby did not become ready for failover:\n{status}"
        );
    }

    /// The standby's entry of `status --json` (null when status printed no JSON).
    fn standby_status(&self) -> serde_json::Value {
        let out = self.relay(&["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|status| status["standbys"][0].clone())
            .unwrap_or_default()
    }

    fn ch(&self, ch: &ClickHouseServer, sql: &str) -> String {
        ch.query(&sql.replace("{db}", &self.ch_db))
            .unwrap_or_else(|e| panic!("{sql}: {e:#}"))
    }

    fn ch_count(&self, ch: &ClickHouseServer) -> u64 {
        self.ch(ch, "SELECT count() FROM {db}.event_log")
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// The ids ClickHouse holds and its row count, read in pages (one response is read into
    /// memory whole, and a fast machine publishes hundreds of thousands of rows per round).
    fn ch_ids(&self, ch: &ClickHouseServer) -> (HashSet<String>, u64) {
        const PAGE: usize = 100_000;
        let (mut ids, mut rows) = (HashSet::new(), 0);
        for page in 0.. {
            let body = self.ch(
                ch,
                &format!(
                    "SELECT toString(event_id) FROM {{db}}.event_log
                      ORDER BY event_id, commit_lsn, tx_seq LIMIT {PAGE} OFFSET {}",
                    page * PAGE
                ),
            );
            let n = body.lines().count();
            rows += n as u64;
            ids.extend(body.lines().map(str::to_string));
            if n < PAGE {
                break;
            }
        }
        (ids, rows)
    }

    fn pg_ids(&self, pg: &PgServer) -> HashSet<String> {
        pg.psql(&self.db, "SELECT event_id FROM event_outbox")
            .expect("outbox ids")
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn url_for_publishers(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write&connect_timeout=2",
            self.pair.primary.port(),
            self.pair.standby.port(),
            self.db
        )
    }
}

/// Publishers inserting 1-5 row transactions through a multi-host URL (read-write), each
/// recording the event ids of the commits PostgreSQL acknowledged.
struct Publishers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<HashSet<String>>>,
    count: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Publishers {
    fn start(n: usize, url: String) -> Publishers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let count = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|p| {
                let (stop, acked, count, url) =
                    (stop.clone(), acked.clone(), count.clone(), url.clone());
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    runtime.block_on(publish(p, &url, &stop, &acked, &count));
                })
            })
            .collect();
        Publishers {
            stop,
            acked,
            count,
            threads,
        }
    }

    fn acked_count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn stop(self) -> HashSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("publisher thread");
        }
        Arc::try_unwrap(self.acked)
            .map(|m| m.into_inner().unwrap_or_default())
            .unwrap_or_default()
    }
}

async fn publish(
    p: usize,
    url: &str,
    stop: &AtomicBool,
    acked: &Mutex<HashSet<String>>,
    count: &AtomicU64,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        else {
            // The failover window: no primary yet. Try again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let rows = 1 + (i % 5) as i32;
            let result = async {
                let tx = client.transaction().await?;
                let ids = tx
                    .query(
                        "INSERT INTO event_outbox (event_type, event_context)
                         SELECT 'failover', json_build_object('p', $1::int, 'i', $2::bigint, 'r', g)
                           FROM generate_series(1, $3::int) g
                         RETURNING event_id::text",
                        &[&(p as i32), &(i as i64), &rows],
                    )
                    .await?;
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>(ids)
            }
            .await;
            match result {
                Ok(ids) => {
                    let mut set = acked.lock().expect("acked");
                    for row in ids {
                        set.insert(row.get::<_, String>(0));
                    }
                    count.fetch_add(rows as u64, Ordering::Relaxed);
                }
                // The primary went away (its commit may or may not have happened): reconnect.
                Err(_) => break,
            }
        }
    }
}

/// The relay child process, killed by pid when dropped (also when a test panics).
struct Relay(Child);

impl Relay {
    fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.0.try_wait()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGTERM, then waits for the exit.
fn stop_relay(mut relay: Relay) {
    let _ = Command::new("kill")
        .args(["-TERM", &relay.0.id().to_string()])
        .status();
    let _ = relay.0.wait();
}

fn relay_log_path() -> std::path::PathBuf {
    std::env::temp_dir().join(harness::unique_name("relay-failover-log"))
}

/// Kills the primary, waits until the relay's session on it failed (its open insert dropped, so
/// nothing more arrives from the old primary), promotes the standby and returns (ClickHouse rows
/// before the promotion, when the promotion finished).
fn fail_over(s: &mut Setup, ch: &ClickHouseServer, log: &dyn Fn() -> String) -> (u64, Instant) {
    let failed = |l: &str| l.matches("relay session failed").count();
    let failures = failed(&log());
    s.pair.primary.kill().expect("kill -9 the primary");
    assert!(
        wait_until(Duration::from_secs(180), || failed(&log()) > failures),
        "the relay did not notice the primary's death\nrelay log:\n{}",
        log()
    );
    let before = s.ch_count(ch);
    s.pair.standby.promote().expect("promote the standby");
    (before, Instant::now())
}

/// Waits until ClickHouse holds exactly the new primary's outbox (as a set, each row once), and
/// every commit a publisher saw acknowledged.
fn assert_exact(s: &Setup, ch: &ClickHouseServer, acked: &HashSet<String>, log: &str) {
    let pg = s.pg_ids(&s.pair.standby);
    let caught_up = wait_until(Duration::from_secs(120), || {
        s.ch_count(ch) >= pg.len() as u64
    });
    let (ids, rows) = s.ch_ids(ch);
    assert!(
        caught_up,
        "ClickHouse has {rows} rows, the new primary's outbox {}\nrelay log:\n{log}",
        pg.len()
    );
    let missing = pg.difference(&ids).count();
    let extra = ids.difference(&pg).count();
    assert_eq!(
        (missing, extra, rows),
        (0, 0, pg.len() as u64),
        "ClickHouse vs the new primary's outbox: missing, not in the outbox, rows (duplicates \
         without FINAL)\nrelay log:\n{log}"
    );
    let lost_acked = acked.difference(&pg).count();
    assert_eq!(
        lost_acked, 0,
        "acknowledged commits missing after the failover"
    );
}

#[test]
fn kill9_primary_under_publishers() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP kill9_primary_under_publishers: {why}");
        return;
    }
    let rounds: usize = std::env::var("RELAY_TEST_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let ch = ClickHouseServer::start().expect("start ClickHouse");
    let mut rng = rand::rng();
    let mut times = Vec::new();
    for round in 1..=rounds {
        let mut s = Setup::start(&ch, false);
        let log_path = relay_log_path();
        let relay = s.spawn_relay(&log_path);
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let publishers = Publishers::start(4, s.url_for_publishers());
        // Something shipped, then the slot synced to the standby.
        assert!(
            wait_until(Duration::from_secs(180), || s.ch_count(&ch) > 0),
            "nothing shipped before the failover\n{}",
            log()
        );
        s.wait_synced();
        // A random moment: after a random number of further acknowledged rows.
        let at = publishers.acked_count() + rng.random_range(50..3_000);
        assert!(wait_until(Duration::from_secs(180), || publishers
            .acked_count()
            >= at));
        let (before, promoted) = fail_over(&mut s, &ch, &log);
        // The first batch shipped from the new primary: ClickHouse grows past what it held.
        assert!(
            wait_until(Duration::from_secs(180), || s.ch_count(&ch) > before),
            "nothing shipped from the promoted standby within 180 s\nrelay log:\n{}",
            log()
        );
        let took = promoted.elapsed();
        times.push(took);
        // Publishers go on against the new primary for a while.
        let after = publishers.acked_count() + 500;
        assert!(
            wait_until(Duration::from_secs(180), || publishers.acked_count()
                >= after),
            "publishers did not reach the new primary"
        );
        let acked = publishers.stop();
        assert_exact(&s, &ch, &acked, &log());
        stop_relay(relay);
        let _ = std::fs::remove_file(&log_path);
        eprintln!(
            "round {round}/{rounds}: killed after {at} acknowledged rows, {} rows exact; \
             promotion to first batch from the new primary: {} ms",
            acked.len(),
            took.as_millis()
        );
    }
    times.sort();
    eprintln!(
        "failover over {rounds} rounds: promotion to first batch from the new primary p50 {} ms, \
         max {} ms",
        times[times.len() / 2].as_millis(),
        times[times.len() - 1].as_millis()
    );
}

#[test]
fn failover_in_the_middle_of_a_200k_row_transaction() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP failover_in_the_middle_of_a_200k_row_transaction: {why}");
        return;
    }
    let ch = ClickHouseServer::start().expect("start ClickHouse");
    let mut s = Setup::start(&ch, false);
    let log_path = relay_log_path();
    let relay = s.spawn_relay(&log_path);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    s.pair
        .primary
        .psql(
            &s.db,
            "INSERT INTO event_outbox (event_type, event_context)
             SELECT 'small', json_build_object('n', g) FROM generate_series(1, 100) g",
        )
        .expect("small transaction");
    assert!(wait_until(Duration::from_secs(180), || s.ch_count(&ch) >= 100));
    s.wait_synced();
    s.pair
        .primary
        .psql(
            &s.db,
            "INSERT INTO event_outbox (event_type, event_context)
             SELECT 'big', json_build_object('n', g) FROM generate_series(1, 200000) g",
        )
        .expect("200,000-row transaction");
    // The relay is receiving the big transaction (not yet shipped: a batch ends only at a
    // transaction boundary) when the primary dies.
    let (before, _) = fail_over(&mut s, &ch, &log);
    assert!(
        before < 200_100,
        "the big transaction was shipped before the kill ({before} rows): no failover in its \
         middle"
    );
    s.pair
        .standby
        .psql(
            &s.db,
            "INSERT INTO event_outbox (event_type, event_context)
             SELECT 'after', json_build_object('n', g) FROM generate_series(1, 10) g",
        )
        .expect("a transaction on the new primary");
    assert_exact(&s, &ch, &HashSet::new(), &log());
    let pg = s.pg_ids(&s.pair.standby).len();
    eprintln!(
        "200,000-row transaction across a failover: {pg} rows exact (ClickHouse held {before} at the kill)"
    );
    stop_relay(relay);
    let _ = std::fs::remove_file(&log_path);
}

#[test]
fn promoted_standby_waiting_for_a_missing_standby_slot_is_named() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP promoted_standby_waiting_for_a_missing_standby_slot_is_named: {why}");
        return;
    }
    let ch = ClickHouseServer::start().expect("start ClickHouse");
    // The standby keeps the primary's synchronized_standby_slots, as pg_basebackup copied it.
    let mut s = Setup::start(&ch, true);
    let log_path = relay_log_path();
    let relay = s.spawn_relay(&log_path);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    s.pair
        .primary
        .psql(
            &s.db,
            "INSERT INTO event_outbox (event_type, event_context) VALUES ('one', '{}')",
        )
        .expect("insert");
    assert!(wait_until(Duration::from_secs(180), || s.ch_count(&ch) >= 1));
    s.wait_synced();
    fail_over(&mut s, &ch, &log);
    s.pair
        .standby
        .psql(
            &s.db,
            "INSERT INTO event_outbox (event_type, event_context) VALUES ('two', '{}')",
        )
        .expect("insert on the new primary");
    assert!(
        wait_until(Duration::from_secs(180), || log().contains(
            "names physical slot(s) relay_test_standby that do not exist"
        )),
        "the relay should name the missing standby slot\nrelay log:\n{}",
        log()
    );
    // The operator's fix, as the message says: the relay then resumes on its own.
    s.pair
        .standby
        .psql(
            "postgres",
            "ALTER SYSTEM SET synchronized_standby_slots = ''; SELECT pg_reload_conf();",
        )
        .expect("clear synchronized_standby_slots");
    assert_exact(&s, &ch, &HashSet::new(), &log());
    stop_relay(relay);
    let _ = std::fs::remove_file(&log_path);
}

#[test]
fn a_slot_not_synced_before_the_failover_stops_the_relay_with_the_commands() {
    // PostgreSQL 18, a slot created without failover: never synchronized to the standby.
    slot_missing_after_failover_stops(VERSION, &[("RELAY_SLOT_FAILOVER", "false")]);
}

#[test]
fn pg15_failover_without_recovery_stops_the_relay_with_the_commands() {
    // PostgreSQL 15 has no failover slots.
    slot_missing_after_failover_stops(PgVersion::V15, &[]);
}

fn slot_missing_after_failover_stops(version: PgVersion, env: &[(&str, &str)]) {
    if let Some(why) = skip_reason_for(version) {
        eprintln!("SKIP slot missing after a failover on {version:?}: {why}");
        return;
    }
    let ch = ClickHouseServer::start().expect("start ClickHouse");
    let mut s = Setup::start_with(version, &ch, false, env);
    let log_path = relay_log_path();
    let mut relay = s.spawn_relay(&log_path);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    s.pair
        .primary
        .psql(
            &s.db,
            "INSERT INTO event_outbox (event_type, event_context) VALUES ('one', '{}')",
        )
        .expect("insert");
    assert!(wait_until(Duration::from_secs(180), || s.ch_count(&ch) >= 1));
    let status = String::from_utf8_lossy(&s.relay(&["status"]).stdout).into_owned();
    assert!(
        status.contains("slot MISSING"),
        "status should show the slot missing on the standby:\n{status}"
    );
    let expected = if version.has_failover_slots() {
        "slot_not_failover"
    } else {
        "no_failover_slots"
    };
    let standby = s.standby_status();
    assert_eq!(standby["failover_state"], expected, "{standby:#}");
    assert_eq!(standby["ready_for_failover"], false, "{standby:#}");
    fail_over(&mut s, &ch, &log);
    let exited = wait_until(Duration::from_secs(180), || {
        relay.try_wait().ok().flatten().is_some()
    });
    let log = log();
    assert!(
        exited
            && log.contains("which was promoted from a standby")
            && log.contains("--recreate-slot")
            && log.contains("failover_recovery = true"),
        "the relay should stop, naming the unsynced slot and the commands\nrelay log:\n{log}"
    );
    let _ = std::fs::remove_file(&log_path);
}

#[test]
fn pg15_failover_with_recovery_under_publishers_is_exact() {
    let version = PgVersion::V15;
    if let Some(why) = skip_reason_for(version) {
        eprintln!("SKIP pg15_failover_with_recovery_under_publishers_is_exact: {why}");
        return;
    }
    let ch = ClickHouseServer::start().expect("start ClickHouse");
    let mut rng = rand::rng();
    let mut s = Setup::start_with(version, &ch, false, &[("RELAY_FAILOVER_RECOVERY", "true")]);
    let log_path = relay_log_path();
    let relay = s.spawn_relay(&log_path);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let publishers = Publishers::start(4, s.url_for_publishers());
    assert!(
        wait_until(Duration::from_secs(180), || s.ch_count(&ch) > 0),
        "nothing shipped before the failover\n{}",
        log()
    );
    let at = publishers.acked_count() + rng.random_range(50..3_000);
    assert!(wait_until(Duration::from_secs(180), || publishers
        .acked_count()
        >= at));
    let (before, _) = fail_over(&mut s, &ch, &log);
    assert!(
        wait_until(Duration::from_secs(180), || s.ch_count(&ch) > before),
        "nothing shipped from the promoted standby within 180 s\nrelay log:\n{}",
        log()
    );
    let after = publishers.acked_count() + 500;
    assert!(
        wait_until(Duration::from_secs(180), || publishers.acked_count()
            >= after),
        "publishers did not reach the new primary"
    );
    let acked = publishers.stop();
    assert_exact(&s, &ch, &acked, &log());
    let log = log();
    assert!(
        log.contains("failover_recovery: creating the slot"),
        "the relay should have recovered the slot\nrelay log:\n{log}"
    );
    eprintln!(
        "PostgreSQL 15 failover with failover_recovery: killed after {at} acknowledged rows, {} \
         rows exact",
        acked.len()
    );
    stop_relay(relay);
    let _ = std::fs::remove_file(&log_path);
}

#[test]
fn status_names_a_standby_without_dbname_in_primary_conninfo() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP status_names_a_standby_without_dbname_in_primary_conninfo: {why}");
        return;
    }
    let ch = ClickHouseServer::start().expect("start ClickHouse");
    let s = Setup::start_with(
        VERSION,
        &ch,
        false,
        &[("NO_DBNAME_IN_PRIMARY_CONNINFO", "1")],
    );
    let out = s.relay(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", common::stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["failover"], true, "{status:#}");
    let standby = &status["standbys"][0];
    assert_eq!(
        standby["host"],
        format!("127.0.0.1:{}", s.pair.standby.port())
    );
    assert_eq!(standby["in_recovery"], true, "{status:#}");
    let problems = standby["problems"].to_string();
    assert!(
        problems.contains("primary_conninfo has no dbname"),
        "status should name the missing dbname: {status:#}"
    );
}

/// A synced copy stays temporary until the primary's slot moved past what the standby reserved
/// for it, and PostgreSQL drops a temporary copy at promotion: `status` names that state (not
/// "synced"), then "ready" once the running relay moved the slot, and a failover waited for on
/// `status` alone succeeds, exactly once.
#[test]
fn status_names_a_temporary_copy_and_a_failover_waited_for_on_status_succeeds() {
    if let Some(why) = skip_reason() {
        eprintln!(
            "SKIP status_names_a_temporary_copy_and_a_failover_waited_for_on_status_succeeds: {why}"
        );
        return;
    }
    let ch = ClickHouseServer::start().expect("start ClickHouse");
    // Slot sync off at first: the standby copies the slot only after the transactions below.
    let mut s = Setup::start_with(
        VERSION,
        &ch,
        false,
        &[("STANDBY_CONF", "sync_replication_slots = off")],
    );
    let standby = s.standby_status();
    assert_eq!(
        standby["failover_state"], "sync_replication_slots_off",
        "{standby:#}"
    );
    // Transactions after the slot's creation, none of them decoded (no relay runs): the
    // primary's slot keeps its old catalog_xmin, behind what the standby will reserve.
    for n in 0..20 {
        s.pair
            .primary
            .psql(
                &s.db,
                &format!(
                    "INSERT INTO event_outbox (event_type, event_context) VALUES ('before', '{{\"n\": {n}}}')"
                ),
            )
            .expect("insert");
    }
    s.pair.wait_for_standby().expect("the standby replays them");
    s.pair
        .standby
        .psql(
            "postgres",
            "ALTER SYSTEM SET sync_replication_slots = on; SELECT pg_reload_conf();",
        )
        .expect("turn slot sync on");
    assert!(
        wait_until(
            Duration::from_secs(180),
            || s.standby_status()["slot_exists"] == true
        ),
        "the standby did not copy the slot: {:#}",
        s.standby_status()
    );
    let standby = s.standby_status();
    assert_eq!(
        (
            &standby["failover_state"],
            &standby["ready_for_failover"],
            &standby["synced"],
            &standby["temporary"]
        ),
        (
            &serde_json::json!("temporary"),
            &serde_json::json!(false),
            &serde_json::json!(true),
            &serde_json::json!(true)
        ),
        "{standby:#}"
    );
    let text = String::from_utf8_lossy(&s.relay(&["status"]).stdout).into_owned();
    assert!(
        text.contains("NOT READY for failover (temporary)")
            && text.contains("drops a temporary copy at promotion"),
        "{text}"
    );
    // The relay streams and confirms: the primary's slot moves on, the copy turns persistent.
    let log_path = relay_log_path();
    let relay = s.spawn_relay(&log_path);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let publishers = Publishers::start(2, s.url_for_publishers());
    s.wait_synced();
    let text = String::from_utf8_lossy(&s.relay(&["status"]).stdout).into_owned();
    assert!(text.contains("ready for failover: slot present"), "{text}");
    let at = publishers.acked_count() + 200;
    assert!(wait_until(Duration::from_secs(180), || publishers
        .acked_count()
        >= at));
    let (before, _) = fail_over(&mut s, &ch, &log);
    assert!(
        wait_until(Duration::from_secs(180), || s.ch_count(&ch) > before),
        "nothing shipped from the promoted standby within 180 s\nrelay log:\n{}",
        log()
    );
    let after = publishers.acked_count() + 200;
    assert!(
        wait_until(Duration::from_secs(180), || publishers.acked_count()
            >= after),
        "publishers did not reach the new primary"
    );
    let acked = publishers.stop();
    assert_exact(&s, &ch, &acked, &log());
    stop_relay(relay);
    let _ = std::fs::remove_file(&log_path);
}

/// A standby with wal_level = replica cannot synchronize slots (its log says "replication slot
/// synchronization requires wal_level >= logical"); `status` names that, not only "slot MISSING".
#[test]
fn status_names_a_standby_with_wal_level_replica() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIP status_names_a_standby_with_wal_level_replica: {why}");
        return;
    }
    let ch = ClickHouseServer::start().expect("start ClickHouse");
    let s = Setup::start_with(
        VERSION,
        &ch,
        false,
        &[("STANDBY_CONF", "wal_level = replica")],
    );
    let out = s.relay(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", common::stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let standby = &status["standbys"][0];
    assert_eq!(standby["in_recovery"], true, "{status:#}");
    assert_eq!(
        standby["failover_state"], "wal_level_below_logical",
        "{status:#}"
    );
    assert_eq!(standby["ready_for_failover"], false, "{status:#}");
    let text = String::from_utf8_lossy(&s.relay(&["status"]).stdout).into_owned();
    assert!(
        text.contains("NOT READY for failover (wal_level_below_logical)")
            && text.contains("wal_level is replica here"),
        "{text}"
    );
}
