//! The ClickHouse side: one `INSERT ... FORMAT RowBinary` per batch, rows encoded straight from
//! the decoded WAL bytes into the insert's buffer and streamed (lz4) while the batch fills.

use std::time::Duration;

use clickhouse::Client;
use clickhouse::insert_formatted::BufInsertFormatted;

use crate::config::{ClickHouseCompression, ClickHouseTarget, Config, DEFAULT_TIMEOUT, tls_config};
use crate::event::{EventRow, OwnedEventRow, put_string};
pub use describe::describe;

mod cluster;
mod describe;
pub mod engine;
mod error;
#[cfg(test)]
pub mod memory;
pub mod resend;

pub use cluster::{Cluster, ClusterStatus, NodeStatus, fence_table, quote_ch_literal};
pub use error::{Failure, SinkError};

/// Where the relay writes events: the boundary between the relay loop and ClickHouse.
///
/// The live path streams each batch into one open insert ([`Sink::begin`], rows encoded into it
/// as they are decoded, no owned batch); exactly once comes from the fence
/// ([`Sink::stop_inflight`]) and the presence check ([`Sink::present`]) a session runs before
/// streaming. Re-sends (refused rows, replay, dead-letter retry) insert rows held in memory
/// ([`Sink::insert_rows`]), with a deduplication token where the same insert may be repeated.
/// [`ClickHouseSink`] is the implementation; `sink::memory` (tests) another, with faults.
pub trait Sink: Clone + Send + Sync + 'static {
    /// An open insert: rows written into it are visible all together once it commits.
    type Insert: Insert;

    /// Opens the insert of a new batch. Nothing is visible until [`Insert::commit`]; dropping
    /// the insert aborts it.
    fn begin(&self) -> Self::Insert;

    /// Inserts rows held in memory in one all-or-nothing insert. With a `token` (derived from
    /// the rows' content), a repeat of the same insert is dropped.
    fn insert_rows(
        &self,
        rows: &[OwnedEventRow],
        token: Option<&str>,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;

    /// The fence: stops the inserts an earlier session of this writer may have left running
    /// and waits until they are gone.
    fn stop_inflight(&self) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;

    /// Which events from commit LSN `from` on the sink already holds.
    fn present(
        &self,
        from: u64,
    ) -> impl std::future::Future<Output = Result<Present, SinkError>> + Send;

    /// Which of `ids` (UUID text) the sink holds.
    fn existing_ids(
        &self,
        ids: &[String],
    ) -> impl std::future::Future<Output = Result<Vec<String>, SinkError>> + Send;
}

/// One batch's open insert (see [`Sink::begin`]).
pub trait Insert: Send {
    /// Adds a row.
    fn write(
        &mut self,
        row: &EventRow<'_>,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;
    /// Rows written so far.
    fn rows(&self) -> u64;
    /// RowBinary bytes written so far (before compression).
    fn bytes(&self) -> u64;
    /// Ends the insert and waits for the sink to accept it.
    fn commit(self) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;
}

impl Sink for ClickHouseSink {
    type Insert = BatchInsert;

    fn begin(&self) -> BatchInsert {
        ClickHouseSink::begin(self)
    }

    async fn insert_rows(
        &self,
        rows: &[OwnedEventRow],
        token: Option<&str>,
    ) -> Result<(), SinkError> {
        ClickHouseSink::insert_rows(self, rows, token).await
    }

    async fn stop_inflight(&self) -> Result<(), SinkError> {
        ClickHouseSink::stop_inflight(self).await
    }

    async fn present(&self, from: u64) -> Result<Present, SinkError> {
        ClickHouseSink::present(self, from).await
    }

    async fn existing_ids(&self, ids: &[String]) -> Result<Vec<String>, SinkError> {
        ClickHouseSink::existing_ids(self, ids).await
    }
}

impl Insert for BatchInsert {
    async fn write(&mut self, row: &EventRow<'_>) -> Result<(), SinkError> {
        BatchInsert::write(self, row).await
    }

    fn rows(&self) -> u64 {
        BatchInsert::rows(self)
    }

    fn bytes(&self) -> u64 {
        BatchInsert::bytes(self)
    }

    async fn commit(self) -> Result<(), SinkError> {
        BatchInsert::commit(self).await
    }
}

/// The ClickHouse columns the relay writes, in RowBinary order.
pub const COLUMNS: &str = "event_id, event_type, event_date_time, environment, event_context, \
                           metadata_version, commit_lsn, tx_seq, xid, trace_id, source";

/// What each written column may be in an existing table: the types whose RowBinary encoding is
/// the one [`EventRow::encode`] writes (a `String` can be `LowCardinality`, the time zone of a
/// `DateTime64(6)` only changes how it is shown). Anything else would be misread, so
/// [`ClickHouseSink::check_table`] refuses it.
pub const COLUMN_TYPES: &[(&str, &[&str])] = &[
    ("event_id", &["UUID"]),
    ("event_type", &["LowCardinality(String)", "String"]),
    (
        "event_date_time",
        &["DateTime64(6, 'UTC')", "DateTime64(6)", "DateTime64(6, *)"],
    ),
    ("environment", &["LowCardinality(String)", "String"]),
    ("event_context", &["String", "JSON", "JSON(*)"]),
    ("metadata_version", &["UInt64"]),
    ("commit_lsn", &["UInt64"]),
    ("tx_seq", &["UInt32"]),
    ("xid", &["UInt64"]),
    ("trace_id", &["String", "LowCardinality(String)"]),
    ("source", &["LowCardinality(String)", "String"]),
];

/// Whether a ClickHouse type name matches a pattern of [`COLUMN_TYPES`] (`*` at the end of a
/// pattern matches any rest, e.g. a time zone).
fn type_matches(found: &str, pattern: &str) -> bool {
    match pattern.strip_suffix("*)") {
        Some(prefix) => found.starts_with(prefix) && found.ends_with(')'),
        None => found == pattern,
    }
}

/// The differences between an existing table's columns and what the relay writes, one line per
/// column: empty when the relay can write into it. Extra columns are fine (ClickHouse fills them
/// with their defaults).
pub fn table_mismatches(columns: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, allowed) in COLUMN_TYPES {
        match columns.iter().find(|(n, _)| n == name) {
            None => problems.push(format!(
                "column {name}: expected {}, found none",
                allowed[0]
            )),
            Some((_, found)) if !allowed.iter().any(|p| type_matches(found, p)) => {
                problems.push(format!(
                    "column {name}: expected {}, found {found}",
                    allowed.join(" or ")
                ))
            }
            Some(_) => {}
        }
    }
    problems
}

/// TCP keepalive on ClickHouse connections (as the clickhouse crate's own client sets).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Idle pooled connections are closed after this; ClickHouse closes them after 3 s (10 s in
/// newer versions).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

impl ClickHouseTarget {
    /// A client for this endpoint; `with_database` false gives one for `CREATE DATABASE`.
    pub fn client(&self, with_database: bool) -> Client {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_keepalive(Some(TCP_KEEPALIVE));
        let builder =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .clone();
        // `tls` is None from `parse` alone: the system's and the built-in roots, no files.
        let tls = match &self.tls {
            Some(tls) => Some(tls.as_ref().clone()),
            None if self.url.starts_with("https://") => tls_config("", "", "").ok(),
            None => None,
        };
        let client = match tls {
            Some(tls) => {
                http.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_only()
                    .enable_http1()
                    .wrap_connector(http);
                Client::with_http_client(builder.build(https))
            }
            // http://, or (never with ring) no TLS available: requests to https:// then fail
            // saying the scheme is not http.
            None => Client::with_http_client(builder.build(http)),
        };
        let client = client
            .with_url(&self.url)
            .with_user(&self.user)
            .with_password(&self.password)
            .with_compression(match self.compression {
                ClickHouseCompression::Lz4 => clickhouse::Compression::Lz4,
                ClickHouseCompression::None => clickhouse::Compression::None,
            });
        if with_database {
            client.with_database(&self.database)
        } else {
            client
        }
    }
}

/// Which events ClickHouse already holds past a position: for each commit LSN, the ranges of
/// `tx_seq` present. A session that restarts from the slot's confirmed LSN skips these rows, so
/// a batch that reached ClickHouse before its confirm did (or partly reached it) is not doubled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Present {
    ranges: std::collections::BTreeMap<u64, Vec<(u32, u32)>>,
}

impl Present {
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u32, u32)>) -> Present {
        let mut present = Present::default();
        for (lsn, lo, hi) in ranges {
            present.ranges.entry(lsn).or_default().push((lo, hi));
        }
        present
    }

    /// Whether the event at `tx_seq` of the transaction committed at `commit_lsn` is there.
    pub fn contains(&self, commit_lsn: u64, tx_seq: u32) -> bool {
        self.ranges
            .get(&commit_lsn)
            .is_some_and(|r| r.iter().any(|&(lo, hi)| lo <= tx_seq && tx_seq <= hi))
    }

    /// Rows covered.
    pub fn rows(&self) -> u64 {
        self.ranges
            .values()
            .flatten()
            .map(|&(lo, hi)| u64::from(hi - lo) + 1)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The highest commit LSN present: past it the check is over.
    pub fn last_commit_lsn(&self) -> Option<u64> {
        self.ranges.keys().next_back().copied()
    }
}

/// Writes batches into one ClickHouse table.
#[derive(Clone)]
pub struct ClickHouseSink {
    client: Client,
    table: String,
    /// Every insert's `query_id` starts with this, so a new session can find and stop the
    /// inserts a previous one left running.
    query_prefix: String,
    /// Bound on each step of an insert and on each query.
    timeout: Duration,
    /// Which PostgreSQL outbox this sink's rows come from (`source` column): the restart check
    /// and replay look only at rows of this source, so several relays can share a table.
    source: String,
    /// The table's database (the URL's).
    database: String,
    /// The cluster the table lives on (`clickhouse_cluster`), shared by the sink's clones.
    cluster: Option<std::sync::Arc<Cluster>>,
}

impl ClickHouseSink {
    /// A sink writing into `table`; `writer` names who writes (the slot), for query ids.
    pub fn new(target: &ClickHouseTarget, table: &str, writer: &str) -> ClickHouseSink {
        ClickHouseSink {
            client: target.client(true),
            table: table.to_string(),
            query_prefix: format!("outbox-relay:{writer}:"),
            timeout: DEFAULT_TIMEOUT,
            source: String::new(),
            database: target.database.clone(),
            cluster: None,
        }
    }

    /// A sink whose table lives on this cluster (see `sink/cluster.rs`).
    pub fn with_cluster(mut self, cluster: &str) -> ClickHouseSink {
        self.cluster = (!cluster.is_empty()).then(|| std::sync::Arc::new(Cluster::new(cluster)));
        self
    }

    /// The table's database.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The cluster the table lives on, if any.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_deref()
    }

    /// Marks every row written with `source` and limits every check to that source's rows.
    pub fn with_source(mut self, source: String) -> ClickHouseSink {
        self.source = source;
        self
    }

    /// The source identity rows are written with.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A query with the server-side parameters every query of the sink may use: [`TABLE`]
    /// (`{table:Identifier}`), the name as a value (`{table_name:String}`) and [`OURS`].
    /// ClickHouse substitutes them itself, so no name or value is quoted into SQL text by hand.
    /// An `Identifier` parameter is taken as sent, without the unescaping of a `String` one
    /// (which the client's `param` does): it goes as a plain setting.
    fn query(&self, sql: &str) -> clickhouse::query::Query {
        let query = self
            .client
            .query(sql)
            .with_setting("param_table", &self.table)
            .param("table_name", &self.table)
            .param("source", &self.source);
        self.cluster_settings(query)
    }

    /// Compares the table's columns with what the relay writes (see [`table_mismatches`]).
    pub async fn check_table(&self) -> Result<(), SinkError> {
        let query = "SELECT name, type FROM system.columns
                      WHERE database = currentDatabase() AND table = {table_name:String}";
        let request = self.query(query).fetch_all::<(String, String)>();
        let columns = self.bounded(query, request).await?;
        if columns.is_empty() {
            return Err(SinkError::Table {
                table: self.table.clone(),
                problems: vec!["the table does not exist: run `outbox-relay setup`".into()],
            });
        }
        let problems = table_mismatches(&columns);
        if let Some((_, found)) = columns
            .iter()
            .find(|(name, found)| name == "event_context" && found.starts_with("JSON"))
        {
            tracing::warn!(
                table = %self.table,
                column_type = %found,
                "event_context is a {found} column: ClickHouse keeps its reading of each \
                 document, not the published text, and refuses some valid documents (they \
                 become dead letters); run `outbox-relay setup` to make it String \
                 (docs/operations.md, upgrading from 0.1)"
            );
        }
        if problems.is_empty() {
            self.check_engine().await?;
            self.check_cluster_table().await
        } else {
            Err(SinkError::Table {
                table: self.table.clone(),
                problems,
            })
        }
    }

    /// Refuses a table whose engine, sorting key or TTL would merge, drop or change the relay's
    /// rows after they were confirmed ([`engine::engine_problems`]). Nothing to check (Ok) when
    /// the table does not exist: [`ClickHouseSink::check_table`] says so.
    pub async fn check_engine(&self) -> Result<(), SinkError> {
        let query = "SELECT engine, engine_full, sorting_key, create_table_query FROM system.tables
                      WHERE database = currentDatabase() AND name = {table_name:String}";
        let request = self
            .query(query)
            .fetch_all::<(String, String, String, String)>();
        let Some((engine, engine_full, sorting_key, create)) =
            self.bounded(query, request).await?.into_iter().next()
        else {
            return Ok(());
        };
        let problems = engine::engine_problems(&engine, &engine_full, &sorting_key, &create);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SinkError::Engine {
                table: self.table.clone(),
                problems,
            })
        }
    }

    /// The sink the configuration describes (its ClickHouse target, table,
    /// `clickhouse_timeout_ms`); `writer` names who writes, for query ids.
    pub fn from_config(config: &Config, writer: &str) -> ClickHouseSink {
        ClickHouseSink::new(config.clickhouse(), &config.clickhouse_table, writer)
            .with_timeout(config.clickhouse_timeout())
            .with_cluster(&config.clickhouse_cluster)
    }

    /// Bounds each step of an insert (taking a chunk, answering at the end) and each query
    /// (300 s by default): past it the call fails with a timeout instead of waiting on a silent
    /// network forever.
    pub fn with_timeout(mut self, timeout: Duration) -> ClickHouseSink {
        self.timeout = timeout;
        self
    }

    /// Runs `request` (a query named `query` in errors) within the timeout.
    async fn bounded<T>(
        &self,
        query: &str,
        request: impl std::future::Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, SinkError> {
        let result = tokio::time::timeout(self.timeout, request)
            .await
            .unwrap_or(Err(clickhouse::error::Error::TimedOut));
        result.map_err(|source| SinkError::query(query, source))
    }

    fn query_id(&self) -> String {
        format!("{}{:016x}", self.query_prefix, rand::random::<u64>())
    }

    /// An insert of RowBinary rows into the table, with the settings every insert carries.
    fn insert(&self) -> clickhouse::insert_formatted::InsertFormatted {
        // event_context is written as a RowBinary string: a String column (0.2) keeps it byte
        // for byte; the setting lets a 0.1 table's JSON column parse it.
        let mut insert = self
            .client
            .insert_formatted_with(self.insert_statement())
            .with_setting("param_table", &self.table)
            .with_setting("input_format_binary_read_json_as_string", "1")
            .with_setting("query_id", self.query_id())
            .with_timeouts(Some(self.timeout), Some(self.timeout));
        for (name, value) in self.insert_settings() {
            insert = insert.with_setting(name, value);
        }
        insert
    }

    /// Opens the insert of a new batch. Nothing is visible in ClickHouse until
    /// [`BatchInsert::commit`]; dropping the batch aborts it.
    pub fn begin(&self) -> BatchInsert {
        let insert = self.insert().buffered();
        let mut source = Vec::with_capacity(self.source.len() + 2);
        put_string(&mut source, self.source.as_bytes());
        BatchInsert {
            fenced: self.epoch().is_some_and(|e| e > 0).then(|| self.clone()),
            insert,
            source,
            table: self.table.clone(),
            scratch: Vec::with_capacity(1024),
            rows: 0,
            bytes: 0,
        }
    }

    /// Inserts rows held in memory in one insert (one block, so all or nothing). With a `token`
    /// (derived from the rows' content), ClickHouse drops a repeat of the same insert.
    pub async fn insert_rows(
        &self,
        rows: &[OwnedEventRow],
        token: Option<&str>,
    ) -> Result<(), SinkError> {
        let mut data = Vec::with_capacity(rows.len() * 128);
        for row in rows {
            row.as_row().encode(&mut data);
            put_string(&mut data, self.source.as_bytes());
        }
        let mut insert = self
            .insert()
            .with_setting("max_insert_block_size", (rows.len() + 1).to_string());
        if let Some(token) = token {
            insert = insert.with_setting("insert_deduplication_token", token);
        }
        let error = |source| SinkError::insert(&self.table, source);
        insert.send(data.into()).await.map_err(error)?;
        insert.end().await.map_err(error)?;
        self.check_fence().await
    }

    /// Stops the inserts an earlier session of this writer may have left running (a relay
    /// killed mid-insert, a connection cut while ClickHouse still works on it), and waits until
    /// they are gone: after this, what ClickHouse holds no longer changes behind our back.
    /// On a cluster, first claims the fence, then stops them on every replica
    /// (`sink/cluster.rs`).
    pub async fn stop_inflight(&self) -> Result<(), SinkError> {
        self.claim_fence().await?;
        let query = "KILL QUERY WHERE startsWith(query_id, {prefix:String}) SYNC FORMAT Null";
        let request = self
            .client
            .query(query)
            .param("prefix", &self.query_prefix)
            .execute();
        self.bounded(query, request).await?;
        self.stop_inflight_everywhere().await
    }

    /// Which events from commit LSN `from` on ClickHouse already holds (see [`Present`]).
    pub async fn present(&self, from: u64) -> Result<Present, SinkError> {
        let query = format!(
            "SELECT commit_lsn, min(tx_seq), max(tx_seq) FROM (
                 SELECT commit_lsn, tx_seq,
                        toInt64(tx_seq) - row_number() OVER (PARTITION BY commit_lsn ORDER BY tx_seq) AS island
                   FROM (SELECT DISTINCT commit_lsn, tx_seq FROM {} WHERE commit_lsn >= {from} AND {OURS}))
              GROUP BY commit_lsn, island ORDER BY commit_lsn, 2",
            self.parts_everywhere()
        );
        let request = self.query(&query).fetch_all::<(u64, u32, u32)>();
        let ranges = self.bounded(&query, request).await?;
        Ok(Present::from_ranges(ranges))
    }

    /// Which of `ids` (UUID text) the table holds.
    pub async fn existing_ids(&self, ids: &[String]) -> Result<Vec<String>, SinkError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // The ids go through the client's binding (`?`, an array literal): a list of thousands
        // is too long for a server-side parameter, which travels in the URL.
        let query = format!(
            "SELECT DISTINCT toString(event_id) FROM {} WHERE event_id IN ? AND {OURS}",
            self.parts_everywhere()
        );
        let request = self.query(&query).bind(ids).fetch_all::<String>();
        let named = format!("SELECT ... WHERE event_id IN ({} ids)", ids.len());
        self.bounded(&named, request).await
    }

    /// Runs a query and reads all its rows, within the timeout. The query may name the table as
    /// [`TABLE`] and filter the sink's rows with [`OURS`].
    pub async fn fetch_all<T>(&self, query: &str) -> Result<Vec<T>, SinkError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        let request = self.query(query).fetch_all::<T>();
        self.bounded(query, request).await
    }

    /// Runs a query and reads its rows one at a time (each within the timeout), for results too
    /// large to hold: memory stays that of one chunk of the response.
    pub fn cursor<T: clickhouse::Row>(&self, query: &str) -> Result<Cursor<T>, SinkError> {
        let error = |source| SinkError::query(query, source);
        Ok(Cursor {
            rows: self.query(query).fetch::<T>().map_err(error)?,
            query: query.into(),
            timeout: self.timeout,
        })
    }

    /// Runs a statement that returns nothing (DDL).
    pub async fn execute(&self, query: &str) -> Result<(), SinkError> {
        self.bounded(query, self.client.query(query).execute())
            .await
    }

    /// `SELECT 1`: is the server there and does it accept our credentials?
    pub async fn ping(&self) -> Result<(), SinkError> {
        let query = "SELECT 1";
        let request = self.client.query(query).fetch_one::<u8>();
        self.bounded(query, request).await.map(|_| ())
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

pub(crate) async fn execute(client: &Client, query: &str) -> Result<(), SinkError> {
    client
        .query(query)
        .execute()
        .await
        .map_err(|source| SinkError::query(query, source))
}

/// The sink's table in a query run through [`ClickHouseSink::fetch_all`] (a server-side
/// parameter, see [`ClickHouseSink::query`]).
pub const TABLE: &str = "{table:Identifier}";

/// `source IN (<ours>, '')`: rows of the sink's source, and rows written before sources existed
/// (an upgraded table, where one relay wrote everything), in a query run through
/// [`ClickHouseSink::fetch_all`].
pub const OURS: &str = "source IN ({source:String}, '')";

/// `` `name` `` with backquotes escaped, for ClickHouse identifiers in DDL, which `setup
/// --print-sql` prints for people to run (queries use server-side parameters instead).
pub fn quote_ch_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// The rows of a query, read as they arrive ([`ClickHouseSink::cursor`]).
pub struct Cursor<T: clickhouse::Row> {
    rows: clickhouse::query::RowCursor<T>,
    query: String,
    timeout: Duration,
}

impl<T: clickhouse::RowOwned + clickhouse::RowRead> Cursor<T> {
    /// The next row; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<T>, SinkError> {
        let result = tokio::time::timeout(self.timeout, self.rows.next())
            .await
            .unwrap_or(Err(clickhouse::error::Error::TimedOut));
        result.map_err(|source| SinkError::query(&self.query, source))
    }
}

/// One batch's insert, open while the batch fills.
pub struct BatchInsert {
    insert: BufInsertFormatted,
    /// The sink, when the insert is under the fence: checked again once it ends.
    fenced: Option<ClickHouseSink>,
    /// The `source` column's value, encoded once.
    source: Vec<u8>,
    table: String,
    scratch: Vec<u8>,
    rows: u64,
    bytes: u64,
}

impl BatchInsert {
    /// Adds a row; sends a compressed chunk when the buffer is full.
    pub async fn write(&mut self, row: &EventRow<'_>) -> Result<(), SinkError> {
        self.scratch.clear();
        row.encode(&mut self.scratch);
        self.scratch.extend_from_slice(&self.source);
        self.insert.write_buffered(&self.scratch);
        self.rows += 1;
        self.bytes += self.scratch.len() as u64;
        if self.insert.buf_len() >= self.insert.nominal_capacity() {
            self.insert.flush().await.map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// RowBinary bytes written so far (before compression).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Ends the insert and waits for ClickHouse to accept it.
    pub async fn commit(mut self) -> Result<(), SinkError> {
        self.insert.end().await.map_err(|e| self.error(e))?;
        match &self.fenced {
            Some(sink) => sink.check_fence().await,
            None => Ok(()),
        }
    }

    fn error(&self, source: clickhouse::error::Error) -> SinkError {
        SinkError::insert(&self.table, source)
    }
}
