//! The cluster harness (issue 23) and what chDB does as a cluster node, shown on real servers:
//! three chDB nodes declared as the replicas of one shard behind a round-robin proxy (spread,
//! the union through `clusterAllReplicas`, a node killed or stopped), two shards sharing a
//! KeeperMap table through ZooKeeper (a fence's epoch, an insert conditioned on it over HTTP),
//! and what chDB refuses or ignores of a replicated cluster's statements and settings. The
//! error texts are printed (`--nocapture`) and asserted.
//!
//! Runnable on its own: `cargo nextest run -p relay-tests --test cluster_harness`.

use std::time::{Duration, Instant};

use harness::{
    ClickHouseCluster, ClickHouseNode, ClusterSpec, KEEPER_MAP_PREFIX, OnRefused, ZooKeeper,
};

const CLUSTER: &str = "relay_cluster";
const DB: &str = "harness";
const LONG: Duration = Duration::from_secs(120);

/// POSTs `body` to `url` (a node or the proxy, query parameters included) on a connection of
/// its own; Ok(body) or Err("status: body").
fn post(url: &str, body: &[u8], timeout: Duration) -> Result<String, String> {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    match agent.post(url).send_bytes(body) {
        Ok(resp) => resp.into_string().map_err(|e| e.to_string()),
        Err(ureq::Error::Status(code, resp)) => Err(format!(
            "{code}: {}",
            resp.into_string().unwrap_or_default()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// `http://127.0.0.1:PORT/?query=SQL`
fn query_url(port: u16, sql: &str) -> String {
    let mut url = url::Url::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
    url.query_pairs_mut().append_pair("query", sql);
    url.to_string()
}

fn count(node: &ClickHouseNode, table: &str) -> u64 {
    node.query(&format!("SELECT count() FROM {table}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn err_text(result: anyhow::Result<String>) -> String {
    format!("{:#}", result.expect_err("the query should fail"))
}

/// 1 shard × 3 replicas behind the proxy: inserts spread, every node reads the union, the
/// restart check's primitives (`system.processes` of every node, `remote()` to one node), what
/// chDB refuses, and the errors of a killed and of a stopped node.
#[test]
fn three_replicas_of_one_shard_behind_a_proxy() {
    let mut cluster =
        ClickHouseCluster::start(ClusterSpec::new(CLUSTER, 1, 3)).expect("start the cluster");
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.tcp_port()).collect();

    // The declaration every node has: one shard, three replicas, macros of its own.
    for node in cluster.nodes() {
        let declared = node
            .query(&format!(
                "SELECT shard_num, replica_num, port FROM system.clusters \
                 WHERE cluster = '{CLUSTER}' ORDER BY replica_num"
            ))
            .unwrap();
        let expected: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("1\t{}\t{p}\n", i + 1))
            .collect();
        assert_eq!(declared, expected);
        assert_eq!(
            node.query("SELECT getMacro('shard'), getMacro('replica'), getMacro('cluster')")
                .unwrap(),
            format!("1\t{}\t{CLUSTER}\n", node.replica_name())
        );
    }

    // A plain MergeTree on each node separately (chDB cannot run ON CLUSTER).
    cluster.on_each(&format!("CREATE DATABASE {DB}")).unwrap();
    cluster
        .on_each(&format!(
            "CREATE TABLE {DB}.t (id UInt64, s String) ENGINE = MergeTree ORDER BY id"
        ))
        .unwrap();

    // Each insert through the proxy on a connection of its own: they go round the nodes.
    let proxy = cluster.proxy(OnRefused::Close).unwrap();
    for batch in 0..9u64 {
        let sql = format!(
            "INSERT INTO {DB}.t SELECT number, 'b{batch}' FROM numbers({}, 10)",
            batch * 10
        );
        post(&query_url(proxy.port(), &sql), b"", Duration::from_secs(30)).unwrap();
    }
    assert_eq!(proxy.counts().piped, vec![3, 3, 3]);
    let per_node: Vec<u64> = cluster
        .nodes()
        .iter()
        .map(|n| count(n, &format!("{DB}.t")))
        .collect();
    println!("90 rows through the proxy, per node: {per_node:?}");
    assert_eq!(per_node, vec![30, 30, 30]);
    // Any node reads the union.
    for node in cluster.nodes() {
        let sql = cluster.expand(&format!(
            "SELECT count(), uniqExact(id) FROM {{all:{DB}.t}}"
        ));
        assert_eq!(node.query(&sql).unwrap(), "90\t90\n");
    }
    assert_eq!(
        cluster
            .union_query(&format!("SELECT count() FROM {{all:{DB}.t}}"))
            .unwrap(),
        "90\n"
    );
    // The per-node split is visible: _shard_num is 1 for all (one shard); tcpPort() runs on
    // each node.
    assert_eq!(
        cluster
            .union_query(&format!(
                "SELECT tcpPort(), count() FROM {{all:{DB}.t}} GROUP BY 1 ORDER BY 1"
            ))
            .unwrap(),
        ports
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .iter()
            .map(|p| format!("{p}\t30\n"))
            .collect::<String>()
    );

    processes_of_every_node_and_kill(&cluster);

    // remote() reaches a given node.
    let third = cluster.node(2);
    assert_eq!(
        cluster
            .node(0)
            .query(&format!(
                "SELECT tcpPort() FROM remote('{}', system.one)",
                third.host_port()
            ))
            .unwrap()
            .trim(),
        third.tcp_port().to_string()
    );

    refused_and_ignored(&cluster);

    killed_node(&mut cluster);
    stopped_node(&mut cluster);
}

/// A query left running on node 2 found from node 0 through `clusterAllReplicas(...,
/// system.processes)`, then killed on its node; `KILL QUERY ON CLUSTER` is refused.
fn processes_of_every_node_and_kill(cluster: &ClickHouseCluster) {
    let target = cluster.node(1);
    let query_id = harness::unique_name("leftover");
    let url = format!(
        "{}&query_id={query_id}",
        query_url(
            target.http_port(),
            "SELECT sleepEachRow(0.5) FROM numbers(120) SETTINGS max_block_size = 1 FORMAT Null"
        )
    );
    let running = std::thread::spawn(move || post(&url, b"", Duration::from_secs(120)));
    let find = cluster.expand(&format!(
        "SELECT tcpPort(), getMacro('replica') FROM {{all:system.processes}} \
         WHERE query_id = '{query_id}'"
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        let found = cluster.node(0).query(&find).unwrap();
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        found,
        format!("{}\t{}\n", target.tcp_port(), target.replica_name()),
        "the leftover query, seen from node 0"
    );
    // What else every node's system.processes holds: chDB's own keep-alive query.
    println!(
        "system.processes of every node, but our query:\n{}",
        cluster
            .union_query(&format!(
                "SELECT tcpPort(), user, substring(query, 1, 80) FROM {{all:system.processes}} \
                 WHERE query_id != '{query_id}' AND query NOT LIKE '%system.processes%' \
                 ORDER BY 1"
            ))
            .unwrap()
    );

    let on_cluster = err_text(cluster.node(0).query(&format!(
        "KILL QUERY ON CLUSTER {CLUSTER} WHERE query_id = '{query_id}'"
    )));
    println!("KILL QUERY ON CLUSTER: {on_cluster}");
    assert!(
        on_cluster.contains("Replicated DDL queries are disabled. (QUERY_IS_PROHIBITED)"),
        "{on_cluster}"
    );
    // Killed on its node: the client's request ends with an error.
    let killed = target
        .query(&format!("KILL QUERY WHERE query_id = '{query_id}' SYNC"))
        .unwrap();
    println!("KILL QUERY ... SYNC on the node: {killed}");
    let outcome = running.join().unwrap();
    println!("the killed query's client: {outcome:?}");
    assert!(outcome.is_err_and(|e| e.contains("QUERY_WAS_CANCELLED")));
}

/// What chDB refuses (exact texts) and which settings of a replicated cluster it accepts on a
/// plain MergeTree.
fn refused_and_ignored(cluster: &ClickHouseCluster) {
    let node = cluster.node(0);
    let table = format!("{DB}.t");
    let before = count(node, &table);
    for settings in [
        "insert_quorum = 'auto', insert_quorum_parallel = 1",
        "insert_quorum = 2, insert_quorum_timeout = 1000",
        "insert_quorum = 'auto', insert_quorum_parallel = 0",
    ] {
        let sql = format!("INSERT INTO {table} SETTINGS {settings} VALUES (1000, 'quorum')");
        let result = node.query(&sql);
        println!("INSERT ... SETTINGS {settings}: {result:?}");
        result.unwrap();
    }
    assert_eq!(count(node, &table), before + 3, "each insert landed once");
    let consistent = node
        .query(&format!(
            "SELECT count() FROM {table} SETTINGS select_sequential_consistency = 1"
        ))
        .unwrap();
    println!("SELECT ... SETTINGS select_sequential_consistency = 1: {consistent:?}");
    assert_eq!(consistent.trim(), (before + 3).to_string());

    let sync = err_text(node.query(&format!("SYSTEM SYNC REPLICA {table}")));
    println!("SYSTEM SYNC REPLICA: {sync}");
    assert!(
        sync.contains("is not replicated. (BAD_ARGUMENTS)"),
        "{sync}"
    );
    let lightweight = err_text(node.query(&format!("SYSTEM SYNC REPLICA {table} LIGHTWEIGHT")));
    assert!(lightweight.contains("is not replicated"), "{lightweight}");
    let on_cluster = err_text(node.query(&format!(
        "CREATE TABLE {DB}.oc ON CLUSTER {CLUSTER} (id UInt64) ENGINE = MergeTree ORDER BY id"
    )));
    println!("CREATE TABLE ... ON CLUSTER: {on_cluster}");
    assert!(on_cluster.contains("Replicated DDL queries are disabled"));
    let replicated = err_text(node.query(&format!(
        "CREATE TABLE {DB}.rep (id UInt64) \
         ENGINE = ReplicatedMergeTree('/t/{{shard}}/rep', '{{replica}}') ORDER BY id"
    )));
    println!("ReplicatedMergeTree without a Keeper: {replicated}");
    // Back to 90 rows: the union assertions below count them.
    node.query(&format!(
        "DELETE FROM {table} WHERE s = 'quorum' SETTINGS mutations_sync = 2"
    ))
    .unwrap();
    assert_eq!(count(node, &table), before);
}

/// Node 3 killed with -9: a union read fails at once naming it; the proxy closes the
/// connections of its turn (or skips it); restarted, it has its rows.
fn killed_node(cluster: &mut ClickHouseCluster) {
    let union = format!("SELECT count() FROM {{all:{DB}.t}}");
    cluster.node_mut(2).kill().unwrap();
    let dead = cluster.node(2).host_port();
    let started = Instant::now();
    let error = err_text(cluster.union_query(&union));
    println!(
        "clusterAllReplicas with {dead} killed ({:?}): {error}",
        started.elapsed()
    );
    assert!(error.contains("ALL_CONNECTION_TRIES_FAILED"), "{error}");
    assert!(
        error.contains(&format!("Connection refused ({dead}")),
        "{error}"
    );
    // skip_unavailable_shards hides the dead replica: each replica is a shard to
    // clusterAllReplicas.
    let skipping = cluster
        .union_query(&format!("{union} SETTINGS skip_unavailable_shards = 1"))
        .unwrap();
    println!("... with skip_unavailable_shards = 1: {skipping:?} (the rows of two nodes)");
    assert_eq!(skipping, "60\n");

    for (on_refused, expected) in [(OnRefused::Close, 2), (OnRefused::Skip, 3)] {
        let proxy = cluster.proxy(on_refused).unwrap();
        let answered = (0..3)
            .map(|_| {
                post(
                    &query_url(proxy.port(), "SELECT 1"),
                    b"",
                    Duration::from_secs(10),
                )
            })
            .inspect(|r| {
                if let Err(e) = r {
                    println!("through the proxy ({on_refused:?}), to the killed node: {e}");
                }
            })
            .filter(Result::is_ok)
            .count();
        assert_eq!(answered, expected, "{on_refused:?}: {:?}", proxy.counts());
        assert_eq!(proxy.counts().refused, vec![0, 0, 1]);
    }

    cluster.node_mut(2).restart().unwrap();
    assert_eq!(count(cluster.node(2), &format!("{DB}.t")), 30);
    assert_eq!(cluster.union_query(&union).unwrap(), "90\n");
}

/// Node 2 stopped (SIGSTOP): the kernel still accepts connections, so a union read waits in
/// each of `connections_with_failover_max_tries` (3) tries: `handshake_timeout_ms` (10,000 by
/// default) on a new connection, 5 s on a pooled one (the ping that checks it: ClickHouse's
/// DBMS_DEFAULT_SYNC_REQUEST_TIMEOUT_SEC, no setting). 25-30 s by default
/// ([`stopped_node_with_default_settings`]).
fn stopped_node(cluster: &mut ClickHouseCluster) {
    let union = format!("SELECT count() FROM {{all:{DB}.t}}");
    cluster.node_mut(1).stop().unwrap();
    let stopped = cluster.node(1).host_port();
    // 3 s, or 7 s when the first try is the pooled connection; then 1 s (the pooled
    // connection was dropped).
    for (settings, low, high) in [
        ("handshake_timeout_ms = 1000", 2.5, 9.0),
        (
            "handshake_timeout_ms = 1000, connections_with_failover_max_tries = 1",
            0.8,
            3.0,
        ),
    ] {
        let started = Instant::now();
        let error = err_text(
            cluster
                .node(0)
                .query(&cluster.expand(&format!("{union} SETTINGS {settings}"))),
        );
        let took = started.elapsed().as_secs_f64();
        println!("clusterAllReplicas with {stopped} stopped, {settings}: {took:.2} s: {error}");
        assert!((low..high).contains(&took), "{took} s");
        assert!(
            error.contains(&format!(
                "Timeout exceeded while reading from socket (socket ({stopped}), \
                 receive timeout 1000 ms)"
            )),
            "{error}"
        );
    }
    // Through the proxy, a connection whose turn is the stopped node hangs: only the client's
    // own timeout ends it.
    let proxy = cluster.proxy(OnRefused::Close).unwrap();
    post(
        &query_url(proxy.port(), "SELECT 1"),
        b"",
        Duration::from_secs(2),
    )
    .unwrap();
    let started = Instant::now();
    let hung = post(
        &query_url(proxy.port(), "SELECT 1"),
        b"",
        Duration::from_secs(2),
    );
    println!(
        "through the proxy to the stopped node: {hung:?} after {:?}",
        started.elapsed()
    );
    assert!(hung.is_err());
    assert_eq!(proxy.counts().piped, vec![1, 1, 0]);
    drop(proxy);
    cluster.node_mut(1).cont().unwrap();
    assert_eq!(cluster.union_query(&union).unwrap(), "90\n");
}

/// With default settings, a union read with a SIGSTOPped node fails after 25-30 s (3 tries:
/// `sync_request_timeout` 5 s on a pooled connection, `handshake_timeout_ms` 10 s on a new one).
/// Long (about a minute): run with `--run-ignored all`.
#[test]
#[ignore = "takes a minute: the default timeouts of a read with a stopped node"]
fn stopped_node_with_default_settings() {
    let mut cluster =
        ClickHouseCluster::start(ClusterSpec::new(CLUSTER, 1, 2)).expect("start the cluster");
    println!(
        "defaults:\n{}",
        cluster
            .node(0)
            .query(
                "SELECT name, value FROM system.settings WHERE name IN ('handshake_timeout_ms', \
                 'connect_timeout_with_failover_ms', 'connections_with_failover_max_tries', \
                 'receive_timeout', 'connect_timeout', 'hedged_connection_timeout_ms', \
                 'receive_data_timeout_ms', 'use_hedged_requests', 'max_execution_time', \
                 'sync_request_timeout') ORDER BY name"
            )
            .unwrap()
    );
    let union = "SELECT count() FROM {all:system.one}";
    // A pooled connection to node 2 from this read.
    assert_eq!(cluster.union_query(union).unwrap(), "2\n");
    cluster.node_mut(1).stop().unwrap();
    for settings in ["", " SETTINGS max_execution_time = 2"] {
        let started = Instant::now();
        let error = err_text(
            cluster
                .node(0)
                .query_with_timeout(&cluster.expand(&format!("{union}{settings}")), LONG),
        );
        let took = started.elapsed();
        println!("defaults{settings}: {took:?}: {error}");
        // max_execution_time is checked after the tries: TIMEOUT_EXCEEDED, as late.
        assert!(
            error.contains("ALL_CONNECTION_TRIES_FAILED") || error.contains("TIMEOUT_EXCEEDED"),
            "{error}"
        );
        assert!(
            (Duration::from_secs(20)..Duration::from_secs(45)).contains(&took),
            "{took:?}"
        );
    }
}

/// Two shards of one replica sharing a KeeperMap table through ZooKeeper: a fence's epoch
/// claimed on one node is read and replaced from the other; an insert conditioned on it over
/// HTTP (`input()` with the rows in the body) lands only with the current epoch.
#[test]
fn keeper_map_shared_by_two_shards() {
    let mut zk = ZooKeeper::start().expect("start ZooKeeper");
    let cluster = ClickHouseCluster::start(
        ClusterSpec::new(CLUSTER, 2, 1).with_zookeeper(&zk.connect_string()),
    )
    .expect("start the cluster");
    let (a, b) = (cluster.node(0), cluster.node(1));
    assert_eq!(
        cluster
            .union_query("SELECT groupArray(getMacro('shard')) FROM {all:system.one}")
            .unwrap(),
        "['1','2']\n"
    );
    assert_eq!(
        a.query(&format!(
            "SELECT count() FROM cluster('{CLUSTER}', system.one)"
        ))
        .unwrap(),
        "2\n",
        "one replica of each shard"
    );

    cluster.on_each(&format!("CREATE DATABASE {DB}")).unwrap();
    cluster
        .on_each(&format!(
            "CREATE TABLE {DB}.fence (k String, epoch UInt64, holder String) \
             ENGINE = KeeperMap('/relay_fence') PRIMARY KEY k"
        ))
        .unwrap();
    cluster
        .on_each(&format!(
            "CREATE TABLE {DB}.t (id UInt64, s String) ENGINE = MergeTree ORDER BY id"
        ))
        .unwrap();
    println!(
        "ZooKeeper after CREATE: {}",
        zk.four_letter("mntr")
            .unwrap()
            .lines()
            .filter(|l| l.contains("znode_count") || l.contains("num_alive_connections"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Claimed on a, read on b; replaced from b, read on a.
    a.query(&format!("INSERT INTO {DB}.fence VALUES ('relay', 1, 'A')"))
        .unwrap();
    assert_eq!(
        b.query(&format!("SELECT epoch, holder FROM {DB}.fence"))
            .unwrap(),
        "1\tA\n"
    );
    // keeper_map_strict_mode: an insert of an existing key fails (a claim that loses a race).
    let strict = err_text(b.query(&format!(
        "INSERT INTO {DB}.fence SETTINGS keeper_map_strict_mode = 1 VALUES ('relay', 2, 'B')"
    )));
    println!("a strict insert of an existing key: {strict}");
    assert!(strict.contains("Node exists"), "{strict}");
    b.query(&format!(
        "ALTER TABLE {DB}.fence UPDATE epoch = 2, holder = 'B' WHERE k = 'relay' AND epoch = 1"
    ))
    .unwrap();
    assert_eq!(
        a.query(&format!("SELECT epoch, holder FROM {DB}.fence"))
            .unwrap(),
        "2\tB\n"
    );
    // A plain insert of an existing key overwrites it (not strict mode).
    b.query(&format!("INSERT INTO {DB}.fence VALUES ('relay', 3, 'B')"))
        .unwrap();
    assert_eq!(
        a.query(&format!("SELECT epoch FROM {DB}.fence")).unwrap(),
        "3\n"
    );

    // The fence in the insert: RowBinary rows in the body, the condition read from KeeperMap.
    let rows: Vec<u8> = [(1u64, "abc"), (2, "xy")]
        .iter()
        .flat_map(|(id, s)| {
            let mut row = id.to_le_bytes().to_vec();
            row.push(s.len() as u8);
            row.extend_from_slice(s.as_bytes());
            row
        })
        .collect();
    let fenced = |epoch: u64| {
        format!(
            "INSERT INTO {DB}.t SELECT * FROM input('id UInt64, s String') \
             WHERE (SELECT epoch FROM {DB}.fence WHERE k = 'relay') = {epoch} FORMAT RowBinary"
        )
    };
    let timeout = Duration::from_secs(30);
    let current = post(&query_url(a.http_port(), &fenced(3)), &rows, timeout);
    println!("fenced insert, current epoch: {current:?}");
    current.unwrap();
    assert_eq!(count(a, &format!("{DB}.t")), 2);
    let stale = post(&query_url(a.http_port(), &fenced(2)), &rows, timeout);
    println!("fenced insert, stale epoch: {stale:?} (no error, no rows)");
    stale.unwrap();
    assert_eq!(count(a, &format!("{DB}.t")), 2);
    let throwing = format!(
        "INSERT INTO {DB}.t SELECT * FROM input('id UInt64, s String') \
         WHERE throwIf((SELECT epoch FROM {DB}.fence WHERE k = 'relay') != 2, \
         'fenced: epoch moved on') = 0 FORMAT RowBinary"
    );
    let refused = post(&query_url(a.http_port(), &throwing), &rows, timeout).unwrap_err();
    println!("fenced insert with throwIf, stale epoch: {refused}");
    assert!(
        refused.contains("fenced: epoch moved on") && refused.contains("FUNCTION_THROW_IF"),
        "{refused}"
    );
    assert_eq!(count(a, &format!("{DB}.t")), 2);

    // ReplicatedMergeTree with a Keeper: created, then read-only (an insert retries for minutes,
    // insert_keeper_max_retries = 20 with backoffs up to 10 s, before it says so).
    a.query(&format!(
        "CREATE TABLE {DB}.rep (id UInt64) \
         ENGINE = ReplicatedMergeTree('/t/{{shard}}/rep', '{{replica}}') ORDER BY id"
    ))
    .unwrap();
    let read_only = err_text(a.query(&format!(
        "INSERT INTO {DB}.rep SETTINGS insert_keeper_max_retries = 0 VALUES (1)"
    )));
    println!("ReplicatedMergeTree insert: {read_only}");
    assert!(read_only.contains("TABLE_IS_READ_ONLY"), "{read_only}");

    // ZooKeeper down: what a fence reader sees, then the way back. A KeeperMap read retries
    // keeper_max_retries (10) times with backoffs from keeper_retry_initial_backoff_ms (100)
    // doubling to keeper_retry_max_backoff_ms (5000): 26.3 s by default; bounded here.
    zk.kill().unwrap();
    for (retries, low, high) in [(0, 0.0, 1.0), (3, 0.6, 2.0)] {
        let started = Instant::now();
        let down = err_text(b.query(&format!(
            "SELECT epoch FROM {DB}.fence SETTINGS keeper_max_retries = {retries}"
        )));
        let took = started.elapsed().as_secs_f64();
        println!(
            "KeeperMap read, ZooKeeper killed, keeper_max_retries = {retries}: {took:.2} s: {down}"
        );
        // The session's connection lost, or (once noticed) no connection to make.
        assert!(
            down.contains("All connection tries failed while connecting to ZooKeeper")
                || down.contains("Coordination error: Connection loss"),
            "{down}"
        );
        assert!((low..high).contains(&took), "{took} s");
    }
    // The fenced insert fails whole: no rows without the fence.
    let url = format!(
        "{}&keeper_max_retries=0",
        query_url(a.http_port(), &fenced(3))
    );
    let no_keeper = post(&url, &rows, timeout).unwrap_err();
    println!("fenced insert, ZooKeeper killed: {no_keeper}");
    assert!(no_keeper.contains("KEEPER_EXCEPTION"), "{no_keeper}");
    assert_eq!(count(a, &format!("{DB}.t")), 2);
    zk.restart().unwrap();
    let started = Instant::now();
    let back = loop {
        match b.query(&format!("SELECT epoch FROM {DB}.fence")) {
            Ok(epoch) => break epoch,
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("KeeperMap unreadable 60 s after ZooKeeper's restart: {e:#}"),
        }
    };
    println!(
        "KeeperMap readable again {:?} after ZooKeeper's restart",
        started.elapsed()
    );
    assert_eq!(back, "3\n");
    assert!(
        KEEPER_MAP_PREFIX.starts_with('/'),
        "KeeperMap('/relay_fence') is at {KEEPER_MAP_PREFIX}/relay_fence"
    );
}

/// 2 shards × 2 replicas: the declaration and macros of each node.
#[test]
fn two_shards_of_two_replicas() {
    let cluster =
        ClickHouseCluster::start(ClusterSpec::new("two_by_two", 2, 2)).expect("start the cluster");
    assert_eq!(
        cluster
            .union_query(
                "SELECT getMacro('shard'), getMacro('replica') FROM {all:system.one} ORDER BY 2"
            )
            .unwrap(),
        "1\ts1r1\n1\ts1r2\n2\ts2r1\n2\ts2r2\n"
    );
    assert_eq!(
        cluster
            .node(3)
            .query(
                "SELECT shard_num, replica_num, port FROM system.clusters \
                 WHERE cluster = 'two_by_two' ORDER BY shard_num, replica_num"
            )
            .unwrap(),
        cluster
            .nodes()
            .iter()
            .map(|n| format!("{}\t{}\t{}\n", n.shard(), n.replica(), n.tcp_port()))
            .collect::<String>()
    );
    assert_eq!(cluster.shard(2).count(), 2);
    // cluster() reads one replica of each shard.
    assert_eq!(
        cluster
            .node(0)
            .query("SELECT count() FROM cluster('two_by_two', system.one)")
            .unwrap(),
        "2\n"
    );
}
