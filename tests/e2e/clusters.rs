//! ClickHouse clusters (issue 23) on real servers: chDB nodes declared as one cluster
//! (`remote_servers`, macros), a ZooKeeper as the cluster's Keeper (the fence is a KeeperMap
//! table), and a round-robin TCP proxy in front as the one endpoint the relay knows (a load
//! balancer, ClickHouse Cloud's endpoint: each connection may land on another node).
//!
//! chDB cannot replicate (its ReplicatedMergeTree stays read-only) nor run `ON CLUSTER`, so each
//! node's table is its own plain MergeTree, made on each node from `setup --print-sql` the way
//! docs/operations.md tells an operator whose cluster refuses `ON CLUSTER`; exactly once then
//! means that the nodes together hold every event once. That is the harder case for the relay:
//! a row lives on one node only, wherever its insert landed, and the restart check must read
//! every node. What replication adds (quorum inserts, a replica that has not fetched a part
//! yet) is not reproducible here; docs/operations.md says what rests on what.
//!
//! Every scenario ends with the same check: the union of the nodes holds each committed event
//! exactly once, and no other row ([`Cluster::assert_exactly_once`]).
//!
//! Knobs (the defaults keep `make test` short; the figures are in the comments):
//! `RELAY_TEST_SEED` (3023), `RELAY_TEST_CLUSTER_ROUNDS` (kill -9 rounds while publishing, 15),
//! `RELAY_TEST_CLUSTER_EVENTS` (events published over those rounds, 70,000),
//! `RELAY_TEST_CLUSTER_BIG_TX` (rows of one transaction killed across rounds, 20,000; the issue:
//! 200,000) and `RELAY_TEST_CLUSTER_BIG_ROUNDS` (3; the issue: 10).
//! `RELAY_TEST_CLUSTER_ONE_NODE=1` runs the relays without `clickhouse_cluster` (the one-server
//! restart check): the kill rounds then leave duplicates, which is what these tests catch.
//! `RELAY_TEST_CLUSTER_NO_FENCE=1` leaves the fence table out: the frozen relay's late
//! inserts then land beside its successor's.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{RelayProcess, parse_lsn, relay_command, stderr, wait_until};
use harness::{
    ClickHouseCluster, ClusterSpec, OnRefused, PgServer, PgVersion, RoundRobinProxy, ZooKeeper,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CLUSTER: &str = "relay_cluster";
const LONG: Duration = Duration::from_secs(180);

fn env_number(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_flag(key: &str) -> bool {
    std::env::var(key).is_ok_and(|v| v == "1")
}

fn seed() -> u64 {
    env_number("RELAY_TEST_SEED", 3023)
}

/// PostgreSQL, a ZooKeeper, chDB nodes declared as cluster `relay_cluster` with the relay's
/// tables on each node, and the proxy in front of them.
struct Cluster {
    pg: PgServer,
    ch_db: String,
    /// Dropped before the nodes (fields drop in order).
    proxy: RoundRobinProxy,
    nodes: ClickHouseCluster,
    _zookeeper: ZooKeeper,
}

/// One outbox (a database of its own on the PostgreSQL server: a source of its own) and the
/// relay settings that ship it through the proxy.
struct Source {
    db: String,
    slot: String,
    env: Vec<(String, String)>,
}

impl Cluster {
    fn start(shards: usize, replicas: usize) -> Cluster {
        let zookeeper = ZooKeeper::start().expect("start ZooKeeper");
        let nodes = ClickHouseCluster::start(
            ClusterSpec::new(CLUSTER, shards, replicas).with_zookeeper(&zookeeper.connect_string()),
        )
        .expect("start the ClickHouse cluster");
        let proxy = nodes.proxy(OnRefused::Close).expect("start the proxy");
        let cluster = Cluster {
            pg: PgServer::start(PgVersion::V18).expect("start PostgreSQL"),
            ch_db: harness::unique_name("analytics"),
            proxy,
            nodes,
            _zookeeper: zookeeper,
        };
        cluster.make_tables();
        cluster
    }

    /// The relay's ClickHouse DDL for the cluster (`setup --print-sql`), run on each node
    /// without `ON CLUSTER` and with a plain MergeTree (chDB cannot replicate); the fence table
    /// shares one Keeper path, so every node sees one fence.
    fn make_tables(&self) {
        let mut env = self.base_env("unused", "unused");
        env.retain(|(k, _)| k != "RELAY_CLICKHOUSE_CLUSTER");
        env.push(("RELAY_CLICKHOUSE_CLUSTER".into(), CLUSTER.into()));
        let out = relay_command(&env, &["setup", "--print-sql"])
            .output()
            .expect("run setup --print-sql");
        assert!(out.status.success(), "{}", stderr(&out));
        let printed = String::from_utf8(out.stdout).unwrap();
        let clickhouse = printed
            .split("-- ClickHouse\n")
            .nth(1)
            .expect("setup --print-sql prints the ClickHouse DDL");
        let replicated =
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')";
        assert!(
            clickhouse.contains(replicated) && clickhouse.contains("KeeperMap("),
            "on a cluster, setup makes a replicated table and the fence:\n{clickhouse}"
        );
        let db = &self.ch_db;
        self.nodes
            .on_each(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .expect("create the database on each node");
        for statement in clickhouse.split(";\n") {
            if !statement
                .lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with("--"))
                || (env_flag("RELAY_TEST_CLUSTER_NO_FENCE") && statement.contains("KeeperMap"))
            {
                continue;
            }
            let statement = statement
                .replace(&format!(" ON CLUSTER '{CLUSTER}'"), "")
                .replace(replicated, "MergeTree")
                .replace(
                    "TABLE IF NOT EXISTS `",
                    &format!("TABLE IF NOT EXISTS `{db}`.`"),
                )
                .replace("ALTER TABLE `", &format!("ALTER TABLE `{db}`.`"));
            self.nodes
                .on_each(&statement)
                .unwrap_or_else(|e| panic!("{statement}: {e:#}"));
        }
    }

    fn base_env(&self, db: &str, slot: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("RELAY_POSTGRES_URL", self.pg.url(db)),
            ("RELAY_CLICKHOUSE_URL", self.proxy.url(&self.ch_db)),
            ("RELAY_CLICKHOUSE_CLUSTER", CLUSTER.to_string()),
            ("RELAY_SLOT", slot.to_string()),
            ("RELAY_BATCH_MAX_WAIT_MS", "200".into()),
            ("RELAY_STATUS_INTERVAL_MS", "100".into()),
            ("RELAY_RETRY_INITIAL_MS", "100".into()),
            ("RELAY_RETRY_MAX_MS", "1000".into()),
            // Leftover inserts end within this (max_execution_time), and a stuck one fails.
            ("RELAY_CLICKHOUSE_TIMEOUT_MS", "10000".into()),
            ("RELAY_ENVIRONMENT", "test".into()),
            ("RELAY_LOG_LEVEL", "info".into()),
            ("RELAY_METRICS_ADDR", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if env_flag("RELAY_TEST_CLUSTER_ONE_NODE") {
            env.retain(|(k, _)| k != "RELAY_CLICKHOUSE_CLUSTER");
        }
        env
    }

    /// A new outbox database and slot, with `outbox-relay setup` run for it (which finds the
    /// table on every node and creates nothing in ClickHouse).
    fn source(&self, extra: &[(&str, &str)]) -> Source {
        let db = harness::unique_name("app");
        self.pg.create_database(&db).expect("create database");
        let slot = harness::unique_name("slot");
        let mut env = self.base_env(&db, &slot);
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.to_string()));
        }
        let source = Source { db, slot, env };
        let out = source.relay(&["setup"]);
        assert!(out.status.success(), "setup failed: {}", stderr(&out));
        source
    }

    fn sql(&self, source: &Source, sql: &str) -> String {
        self.pg
            .psql(&source.db, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:#}"))
    }

    /// A query over every node's table (`{all}`: the union), run on a node that is up.
    fn union(&self, sql: &str) -> String {
        let sql = sql.replace("{all}", &format!("{{all:{}.event_log}}", self.ch_db));
        self.nodes
            .union_query(&sql)
            .unwrap_or_else(|e| panic!("{sql}: {e:#}"))
    }

    fn union_count(&self, filter: &str) -> u64 {
        self.union(&format!("SELECT count() FROM {{all}} WHERE {filter}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Rows per node, in node order.
    fn per_node(&self) -> Vec<u64> {
        self.nodes
            .per_node(&format!("SELECT count() FROM {}.event_log", self.ch_db))
            .into_iter()
            .map(|r| r.expect("count on a node").trim().parse().unwrap())
            .collect()
    }

    /// Every event of `source`'s outbox once in the union of the nodes, and nothing else of
    /// that source: the set of ids equal, the row count equal to it.
    fn assert_exactly_once(&self, source: &Source) {
        let expected: HashSet<String> = self
            .sql(source, "SELECT event_id FROM event_outbox")
            .lines()
            .map(str::to_string)
            .collect();
        let filter = format!("source LIKE '%/{}/%'", source.db);
        let body = self.union(&format!(
            "SELECT toString(event_id) FROM {{all}} WHERE {filter}"
        ));
        let rows: Vec<&str> = body.lines().collect();
        let held: HashSet<String> = rows.iter().map(|s| s.to_string()).collect();
        let missing = expected.difference(&held).count();
        let extra = held.difference(&expected).count();
        assert!(
            missing == 0 && extra == 0 && rows.len() == expected.len(),
            "{} events in the outbox; the nodes hold {} rows of them ({} distinct): {missing} \
             missing, {extra} not in the outbox, {} duplicates (per node: {:?})",
            expected.len(),
            rows.len(),
            held.len(),
            rows.len() - held.len(),
            self.per_node()
        );
    }

    /// Waits until the union holds every event of the outbox once the relay shipped them all
    /// (its slot confirmed past the current WAL end).
    fn wait_shipped(&self, source: &Source, relay: &RelayProcess) {
        let end = parse_lsn(self.sql(source, "SELECT pg_current_wal_lsn()").trim());
        let confirmed = wait_until(LONG, || {
            let lsn = self.sql(
                source,
                &format!(
                    "SELECT coalesce(confirmed_flush_lsn, '0/0') FROM pg_replication_slots
                      WHERE slot_name = '{}'",
                    source.slot
                ),
            );
            parse_lsn(lsn.trim()) >= end
        });
        assert!(
            confirmed,
            "the relay never confirmed the WAL end\n{}",
            relay.log()
        );
    }
}

impl Source {
    fn relay(&self, args: &[&str]) -> std::process::Output {
        relay_command(&self.env, args)
            .output()
            .expect("run outbox-relay")
    }

    fn spawn(&self) -> RelayProcess {
        RelayProcess::start(&self.env)
    }
}

/// Publishes `n` events in transactions of 1 to 40 rows (seeded), from a thread of its own
/// (a psql call commits a few hundred of them in a loop).
fn publisher<'s>(
    scope: &'s std::thread::Scope<'s, '_>,
    pg: &'s PgServer,
    db: &'s str,
    n: u64,
    seed: u64,
) -> std::thread::ScopedJoinHandle<'s, ()> {
    scope.spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut published = 0;
        while published < n {
            let mut sizes = Vec::new();
            let mut chunk = 0;
            while chunk < 500 && published + chunk < n {
                let size = rng.random_range(1..=40).min(n - published - chunk);
                sizes.push(size.to_string());
                chunk += size;
            }
            pg.psql(db, &publish_sql(published, &sizes))
                .expect("publish");
            published += chunk;
        }
    })
}

/// A DO block committing transactions of `sizes` rows, numbered from `from`.
fn publish_sql(from: u64, sizes: &[String]) -> String {
    format!(
        "DO $$
         DECLARE n bigint := {from}; size int;
         BEGIN
           FOREACH size IN ARRAY ARRAY[{}]::int[] LOOP
             INSERT INTO event_outbox (event_type, event_context)
             SELECT 'stream', json_build_object('n', g)
               FROM generate_series(n, n + size - 1) g;
             COMMIT;
             n := n + size;
           END LOOP;
         END $$",
        sizes.join(",")
    )
}

/// 1 shard × 3 nodes behind the round-robin proxy: 15 rounds of kill -9 while a publisher
/// writes 70,000 events in small transactions, each kill when the union has grown by a seeded
/// share of the round's events; then one large transaction shipped across rounds of kill -9,
/// each when a seeded share of its rows reached an insert. Every event once in the union;
/// `replay` from the start adds nothing.
#[test]
fn kill9_rounds_behind_a_round_robin_proxy() {
    let cluster = Cluster::start(1, 3);
    let source = cluster.source(&[]);
    let mut rng = StdRng::seed_from_u64(seed());
    let rounds = env_number("RELAY_TEST_CLUSTER_ROUNDS", 15);
    let events = env_number("RELAY_TEST_CLUSTER_EVENTS", 70_000);
    let per_round = events / rounds;
    let stream = "event_type = 'stream'";
    let mut logs = Vec::new();
    for round in 0..rounds {
        let before = cluster.union_count(stream);
        std::thread::scope(|scope| {
            publisher(scope, &cluster.pg, &source.db, per_round, rng.random());
            let relay = source.spawn();
            let kill_at = before + rng.random_range(1..=per_round);
            let grew = wait_until(LONG, || cluster.union_count(stream) >= kill_at);
            assert!(
                grew,
                "round {round}: never reached {kill_at}\n{}",
                relay.log()
            );
            logs.push(relay.log());
            relay.kill9();
        });
    }

    // One transaction, killed across rounds: each kill once an insert took a seeded share of
    // it (ClickHouse's own count of the rows it read).
    let big = env_number("RELAY_TEST_CLUSTER_BIG_TX", 20_000);
    let big_rounds = env_number("RELAY_TEST_CLUSTER_BIG_ROUNDS", 3);
    cluster.sql(
        &source,
        &format!(
            "INSERT INTO event_outbox (event_type, event_context)
             SELECT 'big', json_build_object('n', g) FROM generate_series(1, {big}) g"
        ),
    );
    let reading = format!(
        "SELECT max(read_rows) FROM clusterAllReplicas('{CLUSTER}', system.processes)
          WHERE startsWith(query_id, 'outbox-relay:') AND query_kind = 'Insert'"
    );
    for round in 0..big_rounds {
        let relay = source.spawn();
        let share = rng.random_range(1..=big);
        let reached = wait_until(LONG, || {
            cluster.union_count("event_type = 'big'") == big
                || cluster
                    .nodes
                    .union_query(&reading)
                    .is_ok_and(|r| r.trim().parse::<u64>().unwrap_or(0) >= share)
        });
        assert!(reached, "big round {round}\n{}", relay.log());
        logs.push(relay.log());
        relay.kill9();
    }

    let relay = source.spawn();
    cluster.wait_shipped(&source, &relay);
    logs.push(relay.log());
    // Figures, not assertions: what cluster mode costs (compare RELAY_TEST_CLUSTER_ONE_NODE=1).
    eprintln!(
        "restart check ms (median of {} sessions): {}; insert ms per batch (median of {} \
         batches): {}",
        logged(&logs, "restart_check_ms").len(),
        median(logged(&logs, "restart_check_ms")),
        logged(&logs, "flush_ms").len(),
        median(logged(&logs, "flush_ms")),
    );
    cluster.assert_exactly_once(&source);
    let spread = cluster.per_node();
    assert!(
        spread.iter().filter(|n| **n > 0).count() >= 2,
        "the proxy spread the inserts over the nodes: {spread:?}"
    );
    // Replay from the start finds every event on some node and writes nothing.
    let out = source.relay(&["replay", "--from-lsn", "0/0", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    cluster.assert_exactly_once(&source);
    assert_eq!(relay.terminate().code(), Some(0));
    eprintln!("rows per node: {spread:?}");
}

/// A node killed with -9 and another stopped (SIGSTOP) while the relay inserts: the relay holds
/// the slot while it cannot read every node (the error names the node), and once the node is
/// back, the union holds every event once.
#[test]
fn a_node_killed_or_stopped_during_inserts() {
    let mut cluster = Cluster::start(1, 3);
    let source = cluster.source(&[]);
    let nodes = cluster_status(&source);
    assert_eq!(nodes["cluster"], CLUSTER, "{nodes}");
    assert_eq!(nodes["nodes"].as_array().map(Vec::len), Some(3), "{nodes}");
    let mut relay = source.spawn();
    let mut rng = StdRng::seed_from_u64(seed() ^ 1);
    for (round, node) in [(0, 1), (1, 2)] {
        let stopping = round == 1;
        let port = cluster.nodes.node(node).tcp_port().to_string();
        std::thread::scope(|scope| {
            publisher(scope, &cluster.pg, &source.db, 3_000, rng.random());
            // During inserts: the node goes once the relay is shipping.
            let before = cluster.union_count("1");
            let grew = wait_until(LONG, || cluster.union_count("1") > before + 300);
            assert!(grew, "round {round}: never shipped\n{}", relay.log());
            if stopping {
                cluster.nodes.node_mut(node).stop().expect("SIGSTOP a node");
            } else {
                cluster.nodes.node_mut(node).kill().expect("kill -9 a node");
            }
        });
        if !stopping {
            // status shows the nodes that answer, beside the replicas the cluster declares.
            let nodes = cluster_status(&source);
            assert_eq!(nodes["replicas"], 3, "{nodes}");
            let answered = nodes["nodes"].as_array().expect("nodes");
            assert_eq!(answered.len(), 2, "{nodes}");
            assert!(
                answered.iter().all(|n| n["engine"] == "MergeTree"
                    && !n["node"]
                        .as_str()
                        .unwrap_or_default()
                        .ends_with(&format!(":{port}"))),
                "{nodes}"
            );
        }
        // During a restart check: the relay killed and started again while the node is
        // down cannot read what that node holds, so it waits, naming the node.
        relay.kill_now();
        relay = source.spawn();
        let named = wait_until(LONG, || relay.log().contains(&port));
        assert!(
            named,
            "round {round}: no error naming the node's port {port}\n{}",
            relay.log()
        );
        if stopping {
            cluster
                .nodes
                .node_mut(node)
                .cont()
                .expect("SIGCONT the node");
        } else {
            cluster
                .nodes
                .node_mut(node)
                .restart()
                .expect("restart the node");
        }
        cluster.wait_shipped(&source, &relay);
        cluster.assert_exactly_once(&source);
    }
    assert_eq!(relay.terminate().code(), Some(0));
}

/// A zombie: relay A frozen (SIGSTOP) past `wal_sender_timeout` while its insert is open,
/// relay B takes the slot and ships; A thawed goes on writing what it had read. The fence
/// keeps A's late inserts out (A says it was fenced), and the union holds every event once.
#[test]
fn a_frozen_relay_is_fenced_after_another_takes_over() {
    let cluster = Cluster::start(1, 3);
    // Long batches: A's insert is open most of the time, so the freeze catches one.
    let source = cluster.source(&[("RELAY_BATCH_MAX_WAIT_MS", "1500")]);
    cluster.sql(
        &source,
        "ALTER SYSTEM SET wal_sender_timeout = '2s'; SELECT pg_reload_conf()",
    );
    let (stop, published) = (AtomicBool::new(false), AtomicU64::new(0));
    let mut fenced = 0;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let sizes: Vec<String> = vec!["5".into(); 10];
            while !stop.load(Ordering::Relaxed) {
                let from = published.fetch_add(50, Ordering::Relaxed);
                cluster.sql(&source, &publish_sql(from, &sizes));
            }
        });
        for round in 0..3 {
            let mut a = source.spawn();
            let before = cluster.union_count("1");
            let shipping = wait_until(LONG, || cluster.union_count("1") > before + 50);
            assert!(shipping, "round {round}: A never shipped\n{}", a.log());
            signal(a.pid(), "STOP");
            // PostgreSQL ends A's walsender after wal_sender_timeout: the slot is free.
            let freed = wait_until(LONG, || {
                cluster
                    .sql(
                        &source,
                        &format!(
                            "SELECT active FROM pg_replication_slots WHERE slot_name = '{}'",
                            source.slot
                        ),
                    )
                    .trim()
                    == "f"
            });
            assert!(freed, "round {round}: A's walsender never ended");
            let b = source.spawn();
            let took_over = cluster.union_count("1");
            let shipping = wait_until(LONG, || cluster.union_count("1") > took_over + 50);
            assert!(shipping, "round {round}: B never shipped\n{}", b.log());
            let a_log = a.log().len();
            signal(a.pid(), "CONT");
            // A finds out: its insert was stopped or fenced, or the slot is B's.
            let noticed = wait_until(LONG, || {
                let log = a.log();
                let after = &log[a_log..];
                after.contains("fence epoch") || after.contains("is in use")
            });
            assert!(noticed, "round {round}: A never noticed\n{}", a.log());
            fenced += a.log()[a_log..].matches("another relay took over").count();
            a.kill_now();
            b.kill9();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let relay = source.spawn();
    cluster.wait_shipped(&source, &relay);
    cluster.assert_exactly_once(&source);
    assert_eq!(relay.terminate().code(), Some(0));
    eprintln!(
        "{} events; A's inserts fenced in {fenced} rounds",
        published.load(Ordering::Relaxed)
    );
}

/// Two shards (one node each) and two sources (two outbox databases, a relay each) writing into
/// one table through the proxy, each relay killed with -9 in rounds: each source's events once
/// in the union, the fences apart (one epoch per source).
#[test]
fn two_shards_two_sources() {
    let cluster = Cluster::start(2, 1);
    let sources = [cluster.source(&[]), cluster.source(&[])];
    let mut rng = StdRng::seed_from_u64(seed() ^ 2);
    for round in 0..4 {
        let before = cluster.union_count("1");
        std::thread::scope(|scope| {
            for s in &sources {
                publisher(scope, &cluster.pg, &s.db, 2_000, rng.random());
            }
            let relays: Vec<_> = sources.iter().map(Source::spawn).collect();
            let kill_at = before + rng.random_range(100..2_000);
            let grew = wait_until(LONG, || cluster.union_count("1") >= kill_at);
            assert!(grew, "round {round}: {}", relays[0].log());
            for relay in relays {
                relay.kill9();
            }
        });
    }
    for source in &sources {
        let relay = source.spawn();
        cluster.wait_shipped(source, &relay);
        cluster.assert_exactly_once(source);
        assert_eq!(relay.terminate().code(), Some(0));
    }
    let fences = cluster.nodes.node(0).query(&format!(
        "SELECT count(DISTINCT source) FROM {}.event_log_fence",
        cluster.ch_db
    ));
    if !env_flag("RELAY_TEST_CLUSTER_NO_FENCE") {
        assert_eq!(fences.expect("the fence").trim(), "2");
    }
    let spread = cluster.per_node();
    assert!(
        spread.iter().all(|n| *n > 0),
        "both shards hold rows: {spread:?}"
    );
}

/// setup on a cluster checks every node: a node without the table, and a node whose table has
/// another engine, are named (setup exits 1; where ON CLUSTER cannot run, as on chDB, it says
/// what to run on each node); with every node right again, setup succeeds.
#[test]
fn setup_names_the_node_without_the_table_or_with_another_engine() {
    let cluster = Cluster::start(1, 3);
    let source = cluster.source(&[]);
    let db = &cluster.ch_db;
    let port = |i: usize| format!(":{}", cluster.nodes.node(i).tcp_port());
    let show = |i: usize| {
        cluster
            .nodes
            .node(i)
            .query(&format!("SHOW CREATE TABLE {db}.event_log FORMAT TSVRaw"))
            .expect("SHOW CREATE TABLE")
    };
    let create = show(2);
    cluster
        .nodes
        .node(2)
        .query(&format!("DROP TABLE {db}.event_log SYNC"))
        .expect("drop the table on one node");
    let out = source.relay(&["setup"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}: the table does not exist there", port(2)))
            && err.contains("--print-sql"),
        "{err}"
    );
    // Another engine on node 1 (a plain Log table with the same columns).
    cluster.nodes.node(2).query(&create).expect("create again");
    cluster
        .nodes
        .node(1)
        .query(&format!(
            "RENAME TABLE {db}.event_log TO {db}.event_log_kept"
        ))
        .expect("keep the table aside");
    cluster
        .nodes
        .node(1)
        .query(&format!(
            "CREATE TABLE {db}.event_log AS {db}.event_log_kept ENGINE = Log"
        ))
        .expect("another engine on one node");
    let out = source.relay(&["setup"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&port(1)) && err.contains("Log"), "{err}");
    cluster
        .nodes
        .node(1)
        .query(&format!("DROP TABLE {db}.event_log SYNC"))
        .expect("drop the Log table");
    cluster
        .nodes
        .node(1)
        .query(&format!(
            "RENAME TABLE {db}.event_log_kept TO {db}.event_log"
        ))
        .expect("the table back");
    let out = source.relay(&["setup"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// verify on a cluster: a row deleted on the one node that held it is missing (exit 1, named);
/// `verify --repair` ships it again; verify then proves the outbox complete (exit 0).
#[test]
fn verify_finds_and_repairs_a_row_deleted_on_one_node() {
    let cluster = Cluster::start(1, 3);
    let source = cluster.source(&[]);
    let relay = source.spawn();
    std::thread::scope(|scope| {
        publisher(scope, &cluster.pg, &source.db, 600, seed());
    });
    cluster.wait_shipped(&source, &relay);
    // The node holding most rows loses three of them.
    let spread = cluster.per_node();
    let node = (0..spread.len()).max_by_key(|i| spread[*i]).unwrap();
    let lost = cluster
        .nodes
        .node(node)
        .query(&format!(
            "SELECT toString(event_id) FROM {}.event_log ORDER BY event_id LIMIT 3",
            cluster.ch_db
        ))
        .unwrap();
    let mut lost: Vec<&str> = lost.lines().collect();
    lost.sort();
    cluster
        .nodes
        .node(node)
        .query(&format!(
            "ALTER TABLE {}.event_log DELETE WHERE toString(event_id) IN ('{}')
             SETTINGS mutations_sync = 2",
            cluster.ch_db,
            lost.join("','")
        ))
        .expect("delete on one node");
    let out = source.relay(&["verify", "--json", "--wait-s", "60"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut missing: Vec<String> = report["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap_or_default().to_string())
        .collect();
    missing.sort();
    assert_eq!(missing, lost, "{report}");
    let out = source.relay(&["verify", "--repair", "--json", "--wait-s", "60"]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}",
        stderr(&out)
    );
    let out = source.relay(&["verify", "--json", "--wait-s", "60"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    cluster.assert_exactly_once(&source);
    assert_eq!(relay.terminate().code(), Some(0));
}

/// The values of `key=` in the relays' logs.
fn logged(logs: &[String], key: &str) -> Vec<u64> {
    let key = format!("{key}=");
    logs.iter()
        .flat_map(|log| log.split_whitespace())
        .filter_map(|word| word.strip_prefix(key.as_str())?.parse().ok())
        .collect()
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// `status --json`'s `clickhouse_cluster`: the nodes that answered and the replicas declared.
fn cluster_status(source: &Source) -> serde_json::Value {
    let out = source.relay(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json: {e}: {}", stderr(&out)));
    eprintln!("status: {status}");
    status["clickhouse_cluster"].clone()
}

fn signal(pid: i32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}
