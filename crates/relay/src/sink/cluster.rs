//! The table on a ClickHouse cluster (`clickhouse_cluster`): several replicas, maybe several
//! shards, reached through one URL (a node, a load balancer, ClickHouse Cloud's endpoint), where
//! each connection may land on another node. What exactly once needs there, besides the
//! one-server argument (docs/guarantees.md):
//!
//! - **What ClickHouse holds** is read from every committed part of every replica
//!   ([`ClickHouseSink::parts_everywhere`]: `clusterAllReplicas`), so a part one replica has and
//!   another has not fetched yet is seen; what is counted (verify) is every row once
//!   ([`ClickHouseSink::rows_once`]: one replica per shard read with
//!   `select_sequential_consistency` on a replicated table, the union of the nodes when each
//!   node's table is its own).
//! - **Leftover inserts** of an earlier session are stopped on every replica (`KILL QUERY ON
//!   CLUSTER` where distributed DDL runs) and waited for until no replica runs one
//!   ([`ClickHouseSink::stop_inflight`]); every insert is bounded by `max_execution_time`
//!   (`clickhouse_timeout_ms`), which bounds that wait.
//! - **An insert acknowledged is durable**: on a replicated table, written with
//!   `insert_quorum = 'auto'` (a majority of the shard's replicas) and
//!   `insert_quorum_parallel = 1`.
//! - **A relay that lost the slot never writes after another took over**: each session claims
//!   the next epoch of the fence, a KeeperMap table (`<table>_fence`) in the cluster's Keeper,
//!   and every insert of the live path keeps its rows only while the fence's epoch is the one it
//!   claimed (`INSERT ... SELECT ... FROM input() WHERE (SELECT max(epoch) ...) = <epoch>`,
//!   evaluated when the insert starts; an insert started before the claim is one of the
//!   leftovers the next session stops). Without a fence table on every node the relay warns and
//!   runs without it.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use super::{COLUMNS, ClickHouseSink, SinkError};

/// Bound on a cluster-wide read's wait for one node (`receive_timeout`): a node that stopped
/// answering makes the read fail, naming it, within about this long.
const NODE_TIMEOUT_S: u64 = 30;

/// A node's name in answers read from every node: its host and native port (`hostName()` alone
/// is the same for servers sharing a machine).
pub const NODE: &str = "concat(hostName(), ':', toString(tcpPort()))";

/// How often the wait for leftover inserts looks again.
const LEFTOVER_POLL: Duration = Duration::from_millis(250);

/// The RowBinary columns the relay writes, as `input()` reads them (types as they are sent).
const INPUT_STRUCTURE: &str = "event_id UUID, event_type String, \
    event_date_time DateTime64(6, 'UTC'), environment String, event_context String, \
    metadata_version UInt64, commit_lsn UInt64, tx_seq UInt32, xid UInt64, trace_id String, \
    source String";

/// The cluster a sink's table lives on, and what the sink learnt of it.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    /// 0: not known yet; 1: each node's table is its own (plain MergeTree); 2: replicated.
    replicated: AtomicU8,
    /// The fence epoch this writer claimed (0: no fence).
    epoch: AtomicU64,
}

impl Cluster {
    pub fn new(name: &str) -> Cluster {
        Cluster {
            name: name.to_string(),
            replicated: AtomicU8::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    fn replicated(&self) -> bool {
        self.replicated.load(Relaxed) == 2
    }
}

/// `'text'` with backslashes and quotes escaped, for a ClickHouse string literal.
pub fn quote_ch_literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The fence table of event table `table`.
pub fn fence_table(table: &str) -> String {
    format!("{table}_fence")
}

impl ClickHouseSink {
    /// The FROM of a query that counts each row once: the table; on a cluster, one replica a
    /// shard (replicated: it then reads with `select_sequential_consistency`), or the union of
    /// the nodes when each node's table is its own.
    pub fn rows_once(&self) -> String {
        match &self.cluster {
            None => super::TABLE.into(),
            Some(c) if c.replicated() => self.cluster_table("cluster", c),
            Some(c) => self.cluster_table("clusterAllReplicas", c),
        }
    }

    /// The FROM of a query about what ClickHouse holds at all: every committed part of every
    /// replica (`clusterAllReplicas`); the table on one server.
    pub fn parts_everywhere(&self) -> String {
        match &self.cluster {
            None => super::TABLE.into(),
            Some(c) => self.cluster_table("clusterAllReplicas", c),
        }
    }

    /// A system table (`system.processes`) on every node of the cluster, or on this server.
    pub fn system_everywhere(&self, table: &str) -> String {
        match &self.cluster {
            None => format!("system.{table}"),
            Some(c) => format!(
                "clusterAllReplicas({}, system.{table})",
                quote_ch_literal(&c.name)
            ),
        }
    }

    fn cluster_table(&self, function: &str, c: &Cluster) -> String {
        format!(
            "{function}({}, currentDatabase(), {})",
            quote_ch_literal(&c.name),
            quote_ch_literal(&self.table)
        )
    }

    /// Settings of every query on a cluster: each node's answer bounded, and a replicated
    /// table read only from a replica that has every part written with a quorum.
    pub(super) fn cluster_settings(
        &self,
        query: clickhouse::query::Query,
    ) -> clickhouse::query::Query {
        let Some(c) = &self.cluster else {
            return query;
        };
        let query = query
            .with_setting("receive_timeout", NODE_TIMEOUT_S.to_string())
            .with_setting("connect_timeout_with_failover_ms", "1000")
            // A node that accepts connections but does not answer (a frozen VM, SIGSTOP) fails
            // the read within seconds, not after three 10 s handshakes.
            .with_setting("handshake_timeout_ms", "2000")
            .with_setting("connections_with_failover_max_tries", "2");
        match c.replicated() {
            true => query.with_setting("select_sequential_consistency", "1"),
            false => query,
        }
    }

    /// The table on every node of the cluster: the same columns and engine everywhere (each
    /// node's answer named), and whether it replicates. A plain MergeTree on each node (the
    /// test harness) is taken with a warning: the relay then reads the union of the nodes.
    pub(super) async fn check_cluster_table(&self) -> Result<(), SinkError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let here = format!(
            "database = {} AND {{}} = {{table_name:String}}",
            quote_ch_literal(&self.database)
        );
        let sql = format!(
            "SELECT n.host, any(t.engine), arrayStringConcat(arraySort(groupArray(col.c)), ', ')
               FROM (SELECT DISTINCT {NODE} AS host FROM {one}) n
               LEFT JOIN (SELECT {NODE} AS host, engine FROM {tables} WHERE {t}) t
                 ON n.host = t.host
               LEFT JOIN (SELECT {NODE} AS host, concat(name, ' ', type) AS c
                            FROM {columns} WHERE {c}) col
                 ON n.host = col.host
              GROUP BY n.host ORDER BY n.host",
            one = self.system_everywhere("one"),
            tables = self.system_everywhere("tables"),
            columns = self.system_everywhere("columns"),
            t = here.replace("{}", "name"),
            c = here.replace("{}", "table"),
        );
        let nodes: Vec<(String, String, String)> = self.fetch_all(&sql).await?;
        let problems = cluster_problems(&nodes);
        if !problems.is_empty() {
            return Err(SinkError::Table {
                table: self.table.clone(),
                problems,
            });
        }
        let engine = nodes.first().map(|n| n.1.as_str()).unwrap_or_default();
        let replicated = engine.starts_with("Replicated") || engine.starts_with("Shared");
        if !replicated {
            tracing::warn!(
                cluster = %c.name, engine,
                "the table does not replicate on cluster {}: the relay reads what the nodes hold \
                 together (each node's rows are its own); a replicated table (`outbox-relay \
                 setup`, docs/operations.md, \"ClickHouse clusters\") is what production wants",
                c.name
            );
        }
        c.replicated.store(if replicated { 2 } else { 1 }, Relaxed);
        Ok(())
    }

    /// The inserts of an earlier session of this writer stopped on every replica: `KILL QUERY
    /// ON CLUSTER` where distributed DDL runs, then a wait until no replica runs one (each
    /// insert ends within `max_execution_time` anyway). A node that does not answer makes it
    /// fail, naming the node.
    pub(super) async fn stop_inflight_everywhere(&self) -> Result<(), SinkError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let kill = format!(
            "KILL QUERY ON CLUSTER {} WHERE startsWith(query_id, {}) ASYNC FORMAT Null
             SETTINGS distributed_ddl_task_timeout = 10",
            quote_ch_literal(&c.name),
            quote_ch_literal(&self.query_prefix)
        );
        if let Err(e) = self.execute(&kill).await {
            tracing::debug!(error = %e, "KILL QUERY ON CLUSTER failed; waiting for the inserts instead");
        }
        let sql = format!(
            "SELECT {NODE}, query_id FROM {} WHERE startsWith(query_id, {})",
            self.system_everywhere("processes"),
            quote_ch_literal(&self.query_prefix)
        );
        let deadline = Instant::now() + self.timeout + Duration::from_secs(NODE_TIMEOUT_S);
        loop {
            let running: Vec<(String, String)> = self.fetch_all(&sql).await?;
            if running.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let hosts: Vec<&str> = running.iter().map(|(h, _)| h.as_str()).collect();
                return Err(SinkError::query(
                    &sql,
                    clickhouse::error::Error::Custom(format!(
                        "inserts of an earlier session still run on {} past their \
                         max_execution_time: the relay waits for them before it reads what \
                         ClickHouse holds",
                        hosts.join(", ")
                    )),
                ));
            }
            tokio::time::sleep(LEFTOVER_POLL).await;
        }
    }

    /// Claims the next epoch of the fence for this source (when the fence table is on every
    /// node): from then on an insert of an older session keeps no row.
    pub(super) async fn claim_fence(&self) -> Result<(), SinkError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        c.epoch.store(0, Relaxed);
        let fence = fence_table(&self.table);
        // Nodes without the fence table: every node minus those holding it (Int64, never
        // Nullable: the scalar subquery is wrapped).
        let present: Vec<i64> = self
            .fetch_all(&format!(
                "SELECT toInt64(ifNull((SELECT count() FROM {}), 0)) - toInt64(countDistinct({NODE}))
                   FROM {} WHERE database = {} AND name = {}",
                self.system_everywhere("one"),
                self.system_everywhere("tables"),
                quote_ch_literal(&self.database),
                quote_ch_literal(&fence),
            ))
            .await?;
        if present.first().copied().unwrap_or(1) != 0 {
            tracing::warn!(
                fence = %fence,
                "no fence table on every node of the cluster: a relay that lost the slot (a \
                 frozen VM, a stopped container) could write after another took over; \
                 `outbox-relay setup` creates it where the cluster has Keeper \
                 (docs/operations.md, \"ClickHouse clusters\")"
            );
            return Ok(());
        }
        for _ in 0..5 {
            let next = self.fence_epoch().await? + 1;
            let claim = format!(
                "INSERT INTO {} (key, source, epoch, holder, claimed_at)
                 SELECT {}, {}, {next}, {}, now64(3)
                 SETTINGS keeper_map_strict_mode = 1",
                super::quote_ch_ident(&fence),
                quote_ch_literal(&format!("{}#{next}", self.source)),
                quote_ch_literal(&self.source),
                quote_ch_literal(&self.query_prefix),
            );
            match self.execute(&claim).await {
                Ok(_) => {
                    c.epoch.store(next, Relaxed);
                    tracing::info!(epoch = next, "fence claimed");
                    return Ok(());
                }
                // Another relay claimed that epoch first (KeeperMap's strict mode refuses the
                // key: "already exists", or Keeper's "Node exists"): read again.
                Err(e) if claimed_first(&e.to_string()) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(SinkError::query(
            "fence claim",
            clickhouse::error::Error::Custom(
                "other relays keep claiming the fence: is another relay running on this slot?"
                    .into(),
            ),
        ))
    }

    async fn fence_epoch(&self) -> Result<u64, SinkError> {
        let sql = format!(
            "SELECT max(epoch) FROM {} WHERE source = {{source:String}}",
            super::quote_ch_ident(&fence_table(&self.table))
        );
        Ok(self
            .fetch_all::<u64>(&sql)
            .await?
            .first()
            .copied()
            .unwrap_or(0))
    }

    /// After an insert under the fence: fails when another relay claimed a newer epoch (the
    /// insert kept nothing; this relay lost the slot).
    pub(super) async fn check_fence(&self) -> Result<(), SinkError> {
        let Some(mine) = self.epoch().filter(|e| *e > 0) else {
            return Ok(());
        };
        let now = self.fence_epoch().await?;
        if now == mine {
            return Ok(());
        }
        Err(SinkError::Fenced { mine, now })
    }

    pub(super) fn epoch(&self) -> Option<u64> {
        self.cluster.as_ref().map(|c| c.epoch.load(Relaxed))
    }

    /// The insert statement: plain, or, under the fence, keeping its rows only while the
    /// fence's epoch is this writer's.
    pub(super) fn insert_statement(&self) -> String {
        match self.epoch().filter(|e| *e > 0) {
            None => format!("INSERT INTO {} ({COLUMNS}) FORMAT RowBinary", super::TABLE),
            Some(epoch) => format!(
                "INSERT INTO {} ({COLUMNS}) SELECT * FROM input({}) WHERE
                   (SELECT max(epoch) FROM {} WHERE source = {{source:String}}) = {epoch}
                 FORMAT RowBinary",
                super::TABLE,
                quote_ch_literal(INPUT_STRUCTURE),
                super::quote_ch_ident(&fence_table(&self.table))
            ),
        }
    }

    /// Settings of every insert on a cluster: bounded by `max_execution_time` (so a leftover
    /// one ends), written with a quorum on a replicated table.
    pub(super) fn insert_settings(&self) -> Vec<(&'static str, String)> {
        let Some(c) = &self.cluster else {
            return Vec::new();
        };
        let mut settings = vec![
            (
                "max_execution_time",
                self.timeout.as_secs().max(1).to_string(),
            ),
            ("param_source", self.source.clone()),
        ];
        if c.replicated() {
            settings.extend([
                ("insert_quorum", "auto".to_string()),
                ("insert_quorum_parallel", "1".to_string()),
                (
                    "insert_quorum_timeout",
                    self.timeout.as_millis().to_string(),
                ),
            ]);
        }
        settings
    }
}

/// A node of the cluster as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct NodeStatus {
    /// `host:port` (native port) as the node names itself.
    pub node: String,
    /// The table's engine there (None: no such table).
    pub engine: Option<String>,
    /// How far its replica of the table is behind (`system.replicas.absolute_delay`), on a
    /// replicated table.
    pub replication_delay_s: Option<u64>,
}

/// The cluster's nodes as `status` shows them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ClusterStatus {
    pub cluster: String,
    /// Replicas the cluster declares (`system.clusters`).
    pub replicas: u64,
    /// The nodes that answered.
    pub nodes: Vec<NodeStatus>,
}

impl ClickHouseSink {
    /// Each node of the cluster that answers: the table there, its engine and replication
    /// delay; and how many the cluster declares (those missing did not answer).
    pub async fn cluster_status(&self) -> Result<Option<ClusterStatus>, SinkError> {
        let Some(c) = &self.cluster else {
            return Ok(None);
        };
        let skip = "SETTINGS skip_unavailable_shards = 1";
        let here = format!(
            "database = {} AND {{}} = {{table_name:String}}",
            quote_ch_literal(&self.database)
        );
        let replicas: Vec<u64> = self
            .fetch_all(&format!(
                "SELECT count() FROM system.clusters WHERE cluster = {}",
                quote_ch_literal(&c.name)
            ))
            .await?;
        let answered: Vec<String> = self
            .fetch_all(&format!(
                "SELECT DISTINCT {NODE} FROM {} ORDER BY 1 {skip}",
                self.system_everywhere("one")
            ))
            .await?;
        let engines: Vec<(String, String)> = self
            .fetch_all(&format!(
                "SELECT {NODE}, engine FROM {} WHERE {} {skip}",
                self.system_everywhere("tables"),
                here.replace("{}", "name")
            ))
            .await?;
        let delays: Vec<(String, u64)> = self
            .fetch_all(&format!(
                "SELECT {NODE}, toUInt64(absolute_delay) FROM {} WHERE {} {skip}",
                self.system_everywhere("replicas"),
                here.replace("{}", "table")
            ))
            .await?;
        let find = |node: &str| engines.iter().find(|(n, _)| n == node).map(|e| e.1.clone());
        let delay = |node: &str| delays.iter().find(|(n, _)| n == node).map(|d| d.1);
        Ok(Some(ClusterStatus {
            cluster: c.name.clone(),
            replicas: replicas.first().copied().unwrap_or_default(),
            nodes: answered
                .iter()
                .map(|node| NodeStatus {
                    node: node.clone(),
                    engine: find(node),
                    replication_delay_s: delay(node),
                })
                .collect(),
        }))
    }
}

/// Whether a refused fence claim means another relay took that epoch first.
fn claimed_first(error: &str) -> bool {
    error.contains("already exists") || error.contains("Node exists")
}

/// What does not fit on the cluster's nodes: a node without the table, and nodes that differ
/// (engine, columns) from the first.
pub fn cluster_problems(nodes: &[(String, String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let reference = nodes.iter().find(|(_, engine, _)| !engine.is_empty());
    for (host, engine, columns) in nodes {
        if engine.is_empty() {
            problems.push(format!(
                "node {host}: the table does not exist there: run `outbox-relay setup` (ON \
                 CLUSTER), or against that node (docs/operations.md, \"ClickHouse clusters\")"
            ));
        } else if let Some((first, e, c)) = reference
            && (engine != e || columns != c)
        {
            problems.push(format!(
                "node {host}: the table differs from node {first}'s ({engine} with {columns}; \
                 there: {e} with {c})"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_without_the_table_or_with_another_are_named() {
        let node = |h: &str, e: &str, c: &str| (h.to_string(), e.to_string(), c.to_string());
        assert!(
            cluster_problems(&[node("a", "MergeTree", "x"), node("b", "MergeTree", "x")])
                .is_empty()
        );
        let found = cluster_problems(&[
            node("a", "MergeTree", "x"),
            node("b", "", ""),
            node("c", "ReplacingMergeTree", "x"),
        ]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("node b: the table does not exist"));
        assert!(found[1].starts_with("node c: the table differs from node a's"));
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(quote_ch_literal(r"a'b\c"), r"'a\'b\\c'");
    }
}
