//! A ClickHouse "cluster" of chDB servers: N local servers whose config.xml declares them the
//! shards × replicas of one cluster in `<remote_servers>`, with `{shard}`/`{replica}` macros and,
//! optionally, a [`ZooKeeper`](crate::ZooKeeper) as Keeper (for KeeperMap tables).
//!
//! chDB cannot replicate (ReplicatedMergeTree tables stay read-only, `ON CLUSTER` DDL is refused):
//! the replicas of a shard never fetch from each other, each keeps what it was sent (the worst
//! case of replication lag, in which the union of the nodes is the truth). Between the nodes,
//! `clusterAllReplicas`, `cluster`, `remote` and Distributed tables work.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::ClickHouseServer;
use crate::proxy::{OnRefused, RoundRobinProxy};
use crate::util::PORT_ATTEMPTS;

/// The shape of a cluster: its name, shards × replicas, and the Keeper its nodes use.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The cluster's name in `<remote_servers>` (and the `{cluster}` macro).
    pub name: String,
    pub shards: usize,
    pub replicas: usize,
    /// A Keeper's `host:port` ([`ZooKeeper::connect_string`](crate::ZooKeeper::connect_string)):
    /// the nodes' `<zookeeper>`, with `<keeper_map_path_prefix>` [`KEEPER_MAP_PREFIX`].
    pub zookeeper: Option<String>,
}

impl ClusterSpec {
    /// `shards` × `replicas` nodes named `name`, without a Keeper.
    pub fn new(name: &str, shards: usize, replicas: usize) -> ClusterSpec {
        ClusterSpec {
            name: name.to_string(),
            shards,
            replicas,
            zookeeper: None,
        }
    }

    /// The nodes use this Keeper (`host:port`).
    pub fn with_zookeeper(mut self, connect_string: &str) -> ClusterSpec {
        self.zookeeper = Some(connect_string.to_string());
        self
    }
}

/// Where KeeperMap tables keep their data in the Keeper (`<keeper_map_path_prefix>`):
/// `KeeperMap('/x')` lives at `/keeper_map_tables/x`.
pub const KEEPER_MAP_PREFIX: &str = "/keeper_map_tables";

/// One node: a chDB server with its place in the cluster.
pub struct ClickHouseNode {
    server: ClickHouseServer,
    shard: usize,
    replica: usize,
}

impl ClickHouseNode {
    /// 1-based, as `system.clusters.shard_num` and the `{shard}` macro.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// 1-based, as `system.clusters.replica_num`.
    pub fn replica(&self) -> usize {
        self.replica
    }

    /// The `{replica}` macro: `s{shard}r{replica}`, unique in the cluster.
    pub fn replica_name(&self) -> String {
        replica_name(self.shard, self.replica)
    }

    /// `http://default:@127.0.0.1:PORT/database`
    pub fn url(&self, database: &str) -> String {
        self.server.url(database)
    }

    pub fn http_port(&self) -> u16 {
        self.server.http_port()
    }

    pub fn tcp_port(&self) -> u16 {
        self.server.tcp_port()
    }

    /// `127.0.0.1:TCP_PORT`, as `remote()` takes it and `system.clusters` names the node.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.server.tcp_port())
    }

    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Runs a query on this node alone, over HTTP (60 s timeout).
    pub fn query(&self, sql: &str) -> Result<String> {
        self.server.query(sql)
    }

    pub fn query_with_timeout(&self, sql: &str, timeout: Duration) -> Result<String> {
        self.server.query_with_timeout(sql, timeout)
    }

    /// SIGKILL by pid (SIGCONT first when stopped).
    pub fn kill(&mut self) -> Result<()> {
        self.server.kill()
    }

    /// SIGSTOP by pid: connections are still accepted by the kernel, nothing answers.
    pub fn stop(&mut self) -> Result<()> {
        self.server.stop()
    }

    /// SIGCONT by pid.
    pub fn cont(&mut self) -> Result<()> {
        self.server.cont()
    }

    pub fn is_stopped(&self) -> bool {
        self.server.is_stopped()
    }

    /// Whether the process runs (neither killed nor stopped).
    pub fn is_up(&self) -> bool {
        self.server.pid().is_some() && !self.server.is_stopped()
    }

    /// Kills the node if it runs and starts it again with its data, on its ports (which the
    /// other nodes' config names: fails if another process took one meanwhile).
    pub fn restart(&mut self) -> Result<()> {
        self.server.restart()
    }

    /// The server, for what the node's methods do not cover.
    pub fn server(&self) -> &ClickHouseServer {
        &self.server
    }
}

/// N chDB servers declared as one cluster (see the module's doc). Dropping it kills every node
/// by pid (continuing stopped ones first).
pub struct ClickHouseCluster {
    spec: ClusterSpec,
    nodes: Vec<ClickHouseNode>,
}

impl ClickHouseCluster {
    /// Chooses the ports of all nodes, then starts them (in parallel) and waits until each
    /// answers. When another process took a chosen port first, starts again on others.
    pub fn start(spec: ClusterSpec) -> Result<ClickHouseCluster> {
        ensure!(
            spec.shards > 0 && spec.replicas > 0,
            "a cluster needs at least one shard and one replica"
        );
        ensure!(
            !spec.name.is_empty()
                && spec
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "cluster name {:?}: letters, digits and _ only",
            spec.name
        );
        let mut attempt = 0;
        loop {
            let ports = distinct_free_ports(2 * spec.shards * spec.replicas)?;
            match start_nodes(&spec, &ports) {
                Ok(nodes) => return Ok(ClickHouseCluster { spec, nodes }),
                Err((e, true)) if attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    eprintln!("ClickHouse cluster did not start, trying other ports: {e:#}");
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// The cluster's name, as `clusterAllReplicas('NAME', ...)` takes it.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// All nodes, shard by shard, replica by replica.
    pub fn nodes(&self) -> &[ClickHouseNode] {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut [ClickHouseNode] {
        &mut self.nodes
    }

    /// The `i`-th node (0-based, in [`nodes`](Self::nodes)' order).
    pub fn node(&self, i: usize) -> &ClickHouseNode {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut ClickHouseNode {
        &mut self.nodes[i]
    }

    /// The nodes of one shard (1-based).
    pub fn shard(&self, shard: usize) -> impl Iterator<Item = &ClickHouseNode> {
        self.nodes.iter().filter(move |n| n.shard == shard)
    }

    /// The nodes' HTTP addresses, for a [`RoundRobinProxy`].
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .map(|n| SocketAddr::from(([127, 0, 0, 1], n.http_port())))
            .collect()
    }

    /// A round-robin proxy in front of every node's HTTP port (one endpoint for the cluster).
    pub fn proxy(&self, on_refused: OnRefused) -> Result<RoundRobinProxy> {
        RoundRobinProxy::start(self.http_addrs(), on_refused)
    }

    /// `sql` with `{all:db.t}` replaced by `clusterAllReplicas('NAME', db.t)` (every node's
    /// table: the union) and `{cluster}` by `'NAME'`.
    pub fn expand(&self, sql: &str) -> String {
        expand(&self.spec.name, sql)
    }

    /// Runs [`expand`](Self::expand)ed `sql` on the first node that is up, e.g.
    /// `union_query("SELECT count() FROM {all:db.t}")`: the rows of every node. Fails when a
    /// node does not answer (ClickHouse names it), as a real cluster's read would.
    pub fn union_query(&self, sql: &str) -> Result<String> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.is_up())
            .context("no node of the cluster is up")?;
        node.query(&self.expand(sql))
    }

    /// The same query on each node alone (e.g. per-node counts): one result per node.
    pub fn per_node(&self, sql: &str) -> Vec<Result<String>> {
        self.nodes.iter().map(|n| n.query(sql)).collect()
    }

    /// Runs `sql` on every node (e.g. the same CREATE TABLE, as `ON CLUSTER` would), failing
    /// with the first node's error.
    pub fn on_each(&self, sql: &str) -> Result<()> {
        for node in &self.nodes {
            node.query(sql)
                .with_context(|| format!("on node {}", node.replica_name()))?;
        }
        Ok(())
    }
}

fn expand(cluster: &str, sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(start) = rest.find("{all:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + "{all:".len()..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let _ = write!(
            out,
            "clusterAllReplicas('{cluster}', {})",
            after[..end].trim()
        );
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out.replace("{cluster}", &format!("'{cluster}'"))
}

fn replica_name(shard: usize, replica: usize) -> String {
    format!("s{shard}r{replica}")
}

/// `count` ports free at once (each listener held until all are chosen, so all differ).
fn distinct_free_ports(count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// The config.xml elements of one node: the cluster, its macros, the Keeper.
fn node_config(spec: &ClusterSpec, tcp_ports: &[u16], shard: usize, replica: usize) -> String {
    let mut xml = format!("<remote_servers><{}>", spec.name);
    for s in 0..spec.shards {
        // Real replicated tables copy among replicas themselves: a Distributed table writes
        // to one replica of a shard.
        xml.push_str("<shard><internal_replication>true</internal_replication>");
        for r in 0..spec.replicas {
            let _ = write!(
                xml,
                "<replica><host>127.0.0.1</host><port>{}</port></replica>",
                tcp_ports[s * spec.replicas + r]
            );
        }
        xml.push_str("</shard>");
    }
    let _ = write!(
        xml,
        "</{name}></remote_servers><macros><cluster>{name}</cluster><shard>{shard}</shard>\
         <replica>{replica}</replica></macros>",
        name = spec.name,
        replica = replica_name(shard, replica),
    );
    if let Some(zk) = &spec.zookeeper {
        let (host, port) = zk.rsplit_once(':').unwrap_or((zk.as_str(), "2181"));
        let _ = write!(
            xml,
            "<zookeeper><node><host>{host}</host><port>{port}</port></node>\
             <session_timeout_ms>10000</session_timeout_ms></zookeeper>\
             <keeper_map_path_prefix>{KEEPER_MAP_PREFIX}</keeper_map_path_prefix>"
        );
    }
    xml
}

/// Starts every node on these ports (HTTP ports first, then TCP ports); on failure, whether a
/// port was taken (the caller tries others). Started nodes are killed by their drop.
fn start_nodes(
    spec: &ClusterSpec,
    ports: &[u16],
) -> std::result::Result<Vec<ClickHouseNode>, (anyhow::Error, bool)> {
    let count = spec.shards * spec.replicas;
    let (http_ports, tcp_ports) = ports.split_at(count);
    let places: Vec<(usize, usize)> = (1..=spec.shards)
        .flat_map(|s| (1..=spec.replicas).map(move |r| (s, r)))
        .collect();
    let started: Vec<Result<ClickHouseServer>> = std::thread::scope(|scope| {
        let handles: Vec<_> = places
            .iter()
            .enumerate()
            .map(|(i, &(shard, replica))| {
                let config = node_config(spec, tcp_ports, shard, replica);
                let (http, tcp) = (http_ports[i], tcp_ports[i]);
                scope.spawn(move || ClickHouseServer::start_node(http, tcp, config))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("a node's start panicked")),
            })
            .collect()
    });
    let mut nodes = Vec::with_capacity(count);
    let mut first_error = None;
    for (result, &(shard, replica)) in started.into_iter().zip(&places) {
        match result {
            Ok(server) => nodes.push(ClickHouseNode {
                server,
                shard,
                replica,
            }),
            Err(e) => {
                let e = e.context(format!("node {}", replica_name(shard, replica)));
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        None => Ok(nodes),
        Some(e) => {
            let taken = format!("{e:#}").contains("already in use");
            Err((e, taken))
        }
    }
}

impl Drop for ClickHouseCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_config_declares_shards_replicas_macros_and_keeper() {
        let spec = ClusterSpec::new("c", 2, 2).with_zookeeper("127.0.0.1:2281");
        let xml = node_config(&spec, &[1, 2, 3, 4], 2, 1);
        assert_eq!(
            xml,
            "<remote_servers><c>\
             <shard><internal_replication>true</internal_replication>\
             <replica><host>127.0.0.1</host><port>1</port></replica>\
             <replica><host>127.0.0.1</host><port>2</port></replica></shard>\
             <shard><internal_replication>true</internal_replication>\
             <replica><host>127.0.0.1</host><port>3</port></replica>\
             <replica><host>127.0.0.1</host><port>4</port></replica></shard>\
             </c></remote_servers>\
             <macros><cluster>c</cluster><shard>2</shard><replica>s2r1</replica></macros>\
             <zookeeper><node><host>127.0.0.1</host><port>2281</port></node>\
             <session_timeout_ms>10000</session_timeout_ms></zookeeper>\
             <keeper_map_path_prefix>/keeper_map_tables</keeper_map_path_prefix>"
        );
    }

    #[test]
    fn expand_names_the_cluster() {
        assert_eq!(
            expand(
                "c",
                "SELECT count() FROM {all: d.t} WHERE x IN (SELECT y FROM {all:d.u})"
            ),
            "SELECT count() FROM clusterAllReplicas('c', d.t) \
             WHERE x IN (SELECT y FROM clusterAllReplicas('c', d.u))"
        );
        assert_eq!(
            expand(
                "c",
                "SELECT * FROM clusterAllReplicas({cluster}, system.one) -- {all:"
            ),
            "SELECT * FROM clusterAllReplicas('c', system.one) -- {all:"
        );
    }

    #[test]
    fn distinct_ports() {
        let ports = distinct_free_ports(12).unwrap();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 12);
    }
}
