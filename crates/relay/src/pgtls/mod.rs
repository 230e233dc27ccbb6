//! TLS to PostgreSQL with libpq's meaning of `sslmode`, `sslrootcert`, `sslcert`, `sslkey` and
//! `channel_binding`, for both the SQL connections (tokio-postgres) and the replication
//! connection (pgwire-replication). In three parts:
//!
//! - [`conninfo`]: the connection string. [`Target::parse`], called once when the configuration
//!   loads ([`crate::Config::postgres`]), is the one place that reads the TLS parameters out of
//!   `postgres_url` (URL or key=value form); it yields the tokio-postgres
//!   [`Config`](tokio_postgres::Config) without them and a [`PgTls`], which holds the contents
//!   of the files they name, read then.
//! - [`tls`]: [`PgTls`], the parameters resolved as libpq resolves them, builds the SQL
//!   connections' connector (tokio-postgres-rustls over our rustls configuration: verify-ca
//!   and verify-full need a certificate verifier of our own) and the replication connection's
//!   [`TlsConfig`](pgwire_replication::TlsConfig).
//! - [`problems`]: TLS failures of either connection, explained: what is wrong, what to set.
//!
//! The files the parameters name are read with [`crate::tls`], which the ClickHouse side
//! shares, and so are the words of a certificate problem.

pub mod conninfo;
pub mod error;
pub mod problems;
pub mod tls;

pub use conninfo::{MULTI_HOST_CONNECT_TIMEOUT, Target, host_of, nth_host, split};
pub use error::TlsParamError;
pub use tls::{PgTls, Seen, SslMode, TlsParams, is_unix_socket};
