//! What every end-to-end test shares: a real PostgreSQL and ClickHouse, the relay binary run as a
//! child process with its configuration in the environment, and readers of both sides.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use harness::{ClickHouseServer, PgServer, PgVersion};

/// A file's scenarios as tests: those under `each_postgres` run on PostgreSQL 15 and 18
/// (modules `pg15`, `pg18`); those under `clickhouse_only`, whose subject is ClickHouse or the
/// relay process, not PostgreSQL's replication, run on 18 alone (in `pg18`).
#[macro_export]
macro_rules! scenarios {
    (
        each_postgres: [$($each:ident),* $(,)?]
        $(, clickhouse_only: [$($one:ident),* $(,)?])? $(,)?
    ) => {
        mod pg15 {
            $( #[test] fn $each() { super::$each(harness::PgVersion::V15) } )*
        }
        mod pg18 {
            $( #[test] fn $each() { super::$each(harness::PgVersion::V18) } )*
            $($( #[test] fn $one() { super::$one(harness::PgVersion::V18) } )*)?
        }
    };
}

/// A PostgreSQL cluster and a ClickHouse server of this test's own (or databases and a slot of
/// its own on external servers), with setup done.
pub struct Fixture {
    pub pg: PgServer,
    pub ch: ClickHouseServer,
    pub db: String,
    pub ch_db: String,
    pub slot: String,
    pub env: Vec<(String, String)>,
}

impl Fixture {
    /// Starts both servers, creates a database on each and runs `outbox-relay setup`.
    pub fn start(version: PgVersion, extra_env: &[(&str, &str)]) -> Fixture {
        Fixture::start_on(
            PgServer::start(version).expect("start PostgreSQL"),
            extra_env,
        )
    }

    /// Like [`start`](Self::start), on a PostgreSQL server the test started itself (e.g. with
    /// TLS); `RELAY_POSTGRES_URL` may be overridden in `extra_env` (`{db}`: the database).
    pub fn start_on(pg: PgServer, extra_env: &[(&str, &str)]) -> Fixture {
        let fixture = Fixture::start_on_without_setup(pg, extra_env);
        let out = fixture.relay(&["setup"]);
        assert!(out.status.success(), "setup failed: {}", stderr(&out));
        fixture
    }

    /// Like [`start`](Self::start), without `outbox-relay setup`: the test runs it when it wants
    /// (e.g. after an application's own migration made the outbox table).
    pub fn start_without_setup(version: PgVersion, extra_env: &[(&str, &str)]) -> Fixture {
        Fixture::start_on_without_setup(
            PgServer::start(version).expect("start PostgreSQL"),
            extra_env,
        )
    }

    fn start_on_without_setup(pg: PgServer, extra_env: &[(&str, &str)]) -> Fixture {
        let ch = ClickHouseServer::start().expect("start ClickHouse");
        // Names of this test's own, so tests can share an external server.
        let ch_db = harness::unique_name("analytics");
        Fixture::on_servers(pg, ch, ch_db, extra_env)
    }

    /// Like [`start_on`](Self::start_on), with a ClickHouse server the test started itself
    /// and the name of the ClickHouse database to use there (known before the server starts,
    /// e.g. for a user's grants).
    pub fn start_on_servers(
        pg: PgServer,
        ch: ClickHouseServer,
        ch_db: String,
        extra_env: &[(&str, &str)],
    ) -> Fixture {
        let fixture = Fixture::on_servers(pg, ch, ch_db, extra_env);
        let out = fixture.relay(&["setup"]);
        assert!(out.status.success(), "setup failed: {}", stderr(&out));
        fixture
    }

    fn on_servers(
        pg: PgServer,
        ch: ClickHouseServer,
        ch_db: String,
        extra_env: &[(&str, &str)],
    ) -> Fixture {
        let db = harness::unique_name("app");
        pg.create_database(&db).expect("create database");
        let slot = harness::unique_name("slot");
        let mut env = vec![
            ("RELAY_POSTGRES_URL".to_string(), pg.url(&db)),
            ("RELAY_CLICKHOUSE_URL".to_string(), ch.url(&ch_db)),
            ("RELAY_SLOT".to_string(), slot.clone()),
            ("RELAY_BATCH_MAX_WAIT_MS".to_string(), "200".to_string()),
            ("RELAY_STATUS_INTERVAL_MS".to_string(), "100".to_string()),
            ("RELAY_RETRY_INITIAL_MS".to_string(), "100".to_string()),
            ("RELAY_RETRY_MAX_MS".to_string(), "1000".to_string()),
            ("RELAY_ENVIRONMENT".to_string(), "test".to_string()),
            ("RELAY_LOG_LEVEL".to_string(), "info".to_string()),
            // Tests run side by side: no fixed port. The metrics test sets its own.
            ("RELAY_METRICS_ADDR".to_string(), String::new()),
        ];
        for (k, v) in extra_env {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.replace("{db}", &db)));
        }
        Fixture {
            pg,
            ch,
            db,
            ch_db,
            slot,
            env,
        }
    }

    /// Moves the fixture to new databases and a new slot on the same servers (dropping the old
    /// slot, which would keep WAL) and runs `setup` there: a new round of a long test without
    /// starting servers again.
    pub fn fresh_databases(&mut self) {
        let _ = self.pg.psql(
            &self.db,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE database = current_database() AND NOT active",
        );
        self.db = harness::unique_name("app");
        self.pg.create_database(&self.db).expect("create database");
        self.ch_db = harness::unique_name("analytics");
        self.slot = harness::unique_name("slot");
        let (pg_url, ch_url, slot) = (
            self.pg.url(&self.db),
            self.ch.url(&self.ch_db),
            self.slot.clone(),
        );
        self.set_env("RELAY_POSTGRES_URL", &pg_url);
        self.set_env("RELAY_CLICKHOUSE_URL", &ch_url);
        self.set_env("RELAY_SLOT", &slot);
        let out = self.relay(&["setup"]);
        assert!(out.status.success(), "setup failed: {}", stderr(&out));
    }

    /// The value of a setting in the relay's environment.
    pub fn env_value(&self, key: &str) -> String {
        let found = self.env.iter().find(|(k, _)| k == key);
        found.map(|(_, v)| v.clone()).unwrap_or_default()
    }

    /// Sets a setting for the relays started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Runs `outbox-relay ARGS` to completion.
    pub fn relay(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run outbox-relay")
    }

    fn command(&self, args: &[&str]) -> Command {
        relay_command(&self.env, args)
    }

    /// Starts `outbox-relay run` in the background; its log goes to a file in the test's dir.
    pub fn spawn_relay(&self) -> RelayProcess {
        self.spawn_relay_with(&[])
    }

    /// Runs `outbox-relay ARGS` to completion with some settings changed.
    pub fn relay_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied());
        cmd.output().expect("run outbox-relay")
    }

    /// [`Fixture::spawn_relay`] with some settings changed (another outbox, slot, server).
    pub fn spawn_relay_with(&self, env: &[(&str, &str)]) -> RelayProcess {
        let mut cmd = self.command(&["run"]);
        cmd.envs(env.iter().copied());
        RelayProcess::spawn(cmd)
    }

    /// Runs SQL on the application database, returning psql's unaligned output.
    /// Waits until the relay recorded a checkpoint past the last event ClickHouse holds: its
    /// snapshot sees every event shipped so far.
    pub fn wait_for_checkpoint(&self, relay: &RelayProcess) {
        let last: u64 = self
            .ch("SELECT max(commit_lsn) FROM {db}.event_log")
            .trim()
            .parse()
            .expect("max(commit_lsn)");
        let recorded = wait_until(Duration::from_secs(60), || {
            self.sql(&format!(
                "SELECT count(*) FROM event_outbox_checkpoints
                  WHERE confirmed_lsn > '{:X}/{:X}'::pg_lsn",
                last >> 32,
                last & 0xffff_ffff
            ))
            .trim()
                != "0"
        });
        assert!(recorded, "no checkpoint past {last}\n{}", relay.log());
    }

    pub fn sql(&self, sql: &str) -> String {
        self.pg
            .psql(&self.db, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:#}"))
    }

    /// Runs a ClickHouse query in the events database, returning the TSV body.
    pub fn ch(&self, sql: &str) -> String {
        self.ch
            .query(&sql.replace("{db}", &self.ch_db))
            .unwrap_or_else(|e| panic!("{sql}: {e:#}"))
    }

    pub fn ch_count(&self) -> u64 {
        self.ch("SELECT count() FROM {db}.event_log")
            .trim()
            .parse()
            .unwrap()
    }

    /// The set of event_ids ClickHouse holds, and how many rows it holds.
    pub fn ch_ids(&self) -> (HashSet<String>, u64) {
        // In pages: a response is read into memory whole.
        const PAGE: usize = 200_000;
        let (mut ids, mut rows) = (HashSet::new(), 0);
        for page in 0.. {
            let body = self.ch(&format!(
                "SELECT toString(event_id) FROM {{db}}.event_log ORDER BY event_id, commit_lsn, tx_seq
                  LIMIT {PAGE} OFFSET {}",
                page * PAGE
            ));
            let n = body.lines().count();
            rows += n as u64;
            ids.extend(body.lines().map(str::to_string));
            if n < PAGE {
                break;
            }
        }
        (ids, rows)
    }

    /// uniqExact(event_id) in ClickHouse.
    pub fn ch_unique(&self) -> u64 {
        self.ch("SELECT uniqExact(event_id) FROM {db}.event_log")
            .trim()
            .parse()
            .unwrap()
    }

    /// The set of event_ids in the outbox table.
    pub fn pg_ids(&self) -> HashSet<String> {
        self.sql("SELECT event_id FROM event_outbox")
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The slot's confirmed_flush_lsn, as a number.
    pub fn confirmed_lsn(&self) -> u64 {
        parse_lsn(
            self.sql(&format!(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
                self.slot
            ))
            .trim(),
        )
    }

    pub fn current_lsn(&self) -> u64 {
        parse_lsn(self.sql("SELECT pg_current_wal_lsn()").trim())
    }

    /// Waits until ClickHouse holds `n` rows, or panics with the relay log after `timeout`.
    pub fn wait_for_rows(&self, n: u64, timeout: Duration, relay: Option<&RelayProcess>) {
        let ok = wait_until(timeout, || self.ch_count() >= n);
        if !ok {
            panic!(
                "ClickHouse has {} rows, expected {n} within {timeout:?}\nrelay log:\n{}",
                self.ch_count(),
                relay.map(|r| r.log()).unwrap_or_default()
            );
        }
    }

    /// `outbox-relay status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.relay(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Publishes `n` events, `per_tx` per transaction, server-side for speed.
    pub fn publish(&self, n: u64, per_tx: u64, event_type: &str) {
        let sql = format!(
            "DO $$
             DECLARE i bigint := 0;
             BEGIN
               WHILE i < {n} LOOP
                 INSERT INTO event_outbox (event_type, event_context)
                 SELECT '{event_type}', json_build_object('n', g, 'tx', i)
                   FROM generate_series(i, least(i + {per_tx}, {n}) - 1) g;
                 COMMIT;
                 i := i + {per_tx};
               END LOOP;
             END $$;"
        );
        self.sql(&sql);
    }
}

/// `outbox-relay ARGS` with exactly these settings (and `PATH`, `HOME`) in its environment.
pub fn relay_command(env: &[(String, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(relay_bin());
    cmd.args(args).env_clear();
    for key in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// GET `http://addr/path`: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(10))
        .call()
    {
        Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// `127.0.0.1:<port>` with a port free a moment ago (for the relay's metrics endpoint).
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    format!("127.0.0.1:{port}")
}

/// GET `http://addr/metrics`: the body when it answers 200.
pub fn scrape(addr: &str) -> Option<String> {
    let (code, body) = http_get(addr, "/metrics");
    (code == 200).then_some(body)
}

/// GET `http://addr/metrics` with `Accept: accept`: (Content-Type, body).
pub fn scrape_as(addr: &str, accept: &str) -> (String, String) {
    let resp = ureq::get(&format!("http://{addr}/metrics"))
        .set("Accept", accept)
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap();
    let content_type = resp.header("Content-Type").unwrap_or_default().to_string();
    (content_type, resp.into_string().unwrap())
}

/// The value of an unlabelled series in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
        .parse()
        .unwrap()
}

impl Drop for Fixture {
    /// On a shared external server, frees what this test made (slots are cluster-wide and pin
    /// WAL). A local server is thrown away whole.
    fn drop(&mut self) {
        if self.pg.is_external() {
            let _ = self.pg.psql(
                "postgres",
                &format!(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{}';
                     DROP DATABASE IF EXISTS \"{}\" WITH (FORCE);",
                    self.slot, self.db
                ),
            );
        }
        if self.ch.is_external() {
            let _ = self
                .ch
                .query(&format!("DROP DATABASE IF EXISTS {}", self.ch_db));
        }
    }
}

/// The relay running in the background; killed by pid when dropped.
pub struct RelayProcess {
    pub child: Child,
    log: PathBuf,
}

impl RelayProcess {
    /// Starts `outbox-relay run` with exactly these settings; its log goes to a file in the
    /// temp directory (removed when dropped).
    pub fn start(env: &[(String, String)]) -> RelayProcess {
        RelayProcess::spawn(relay_command(env, &["run"]))
    }

    fn spawn(mut cmd: Command) -> RelayProcess {
        let log = tempfile_path("relay-log");
        let file = std::fs::File::create(&log).expect("relay log file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn outbox-relay run");
        RelayProcess { child, log }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        self.child.wait().expect("wait for relay")
    }

    /// SIGKILL, then waits for the exit.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL, then waits for the exit, keeping the log for reading.
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn signal(pid: i32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Polls `cond` until it holds or `timeout` passes (polling an observable outcome, not a sleep
/// standing in for one).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {s:?}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `outbox-relay` binary built by `cargo build -p outbox-relay` (make test does that).
pub fn relay_bin() -> PathBuf {
    if let Ok(path) = std::env::var("OUTBOX_RELAY_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")));
    let bin = target.join("debug/outbox-relay");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p outbox-relay` first (`make test` does)",
        bin.display()
    );
    bin
}

fn tempfile_path(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(harness::unique_name(prefix))
}
