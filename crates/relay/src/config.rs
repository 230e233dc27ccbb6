//! Configuration: a TOML file plus `RELAY_*` environment variables (12-factor), validated once at
//! start so that every later error is about the servers, not about the settings.
//!
//! Every setting has the same name in the file and, upper-cased with the `RELAY_` prefix, in the
//! environment: `batch_max_rows` in the file is `RELAY_BATCH_MAX_ROWS` in the environment. The
//! environment wins over the file. `SENTRY_DSN` is read without the prefix, as Sentry documents it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

mod check;
mod clickhouse_target;

pub use clickhouse_target::{ClickHouseTarget, DEFAULT_TIMEOUT, tls_config};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Every setting the relay reads, with its default. The configuration reference in
/// `docs/configuration.md` lists the same names; a test keeps the two in step.
///
/// A configuration from [`Config::load`] or [`Config::from_figment`] (or one built in code and
/// passed through [`Config::validated`]) also carries its targets, parsed once:
/// [`Config::postgres`] and [`Config::clickhouse`]. Changing `postgres_url`, `clickhouse_url` or
/// the ClickHouse TLS settings afterwards does not change them: validate again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// PostgreSQL connection URL or key=value string; the user needs the REPLICATION attribute.
    pub postgres_url: String,
    /// ClickHouse HTTP URL: `http://user:password@host:8123/database`.
    pub clickhouse_url: String,
    /// Logical replication slot (pgoutput) the relay streams from.
    pub slot: String,
    /// `setup` creates the slot as a failover slot on PostgreSQL 17+, so that standbys with
    /// `sync_replication_slots = on` keep a copy of it and the relay resumes there after a
    /// failover (ignored before 17, which has no failover slots).
    pub slot_failover: bool,
    /// When the slot is missing on a server promoted from a standby (PostgreSQL 15/16, or a slot
    /// that was not synced), create it there and re-ship the events committed since the last
    /// checkpoint from the outbox table; off: stop with the commands to run.
    pub failover_recovery: bool,
    /// Publication that publishes the outbox table's inserts.
    pub publication: String,
    /// Schema of the outbox table.
    pub outbox_schema: String,
    /// Name of the outbox table.
    pub outbox_table: String,
    /// ClickHouse table the events land in.
    pub clickhouse_table: String,
    /// The ClickHouse cluster (of `system.clusters`; `default` on ClickHouse Cloud) the table
    /// lives on; empty: one server.
    pub clickhouse_cluster: String,
    /// The identity written into ClickHouse's `source` column; empty derives it from PostgreSQL
    /// (`pg:<system identifier>/<database>/<schema>.<table>`).
    pub source_id: String,
    /// Default of the outbox's `environment` column, applied by `outbox-relay setup`.
    pub environment: String,
    /// A batch is flushed once it holds at least this many rows (at a transaction boundary).
    pub batch_max_rows: usize,
    /// A batch is flushed once its encoded rows reach this many bytes (at a transaction boundary).
    pub batch_max_bytes: usize,
    /// A batch is flushed this long after its first row, at the next transaction boundary.
    pub batch_max_wait_ms: u64,
    /// How often the relay reports its confirmed position to PostgreSQL at most.
    pub status_interval_ms: u64,
    /// First delay before reconnecting after an error; doubles up to `retry_max_ms`, each wait
    /// drawn from [¾, 1] of that (while the failed server does not answer, the relay waits for it).
    pub retry_initial_ms: u64,
    /// Longest delay between reconnect attempts.
    pub retry_max_ms: u64,
    /// Longest ClickHouse may take to take a chunk of an insert, to answer an insert, or to answer
    /// a query; past it the session fails and is retried (a silent network, a stuck server).
    pub clickhouse_timeout_ms: u64,
    /// PEM bundle of CA certificates trusted for an `https://` ClickHouse, beside the system's
    /// trust store and the built-in (webpki) roots; empty: none.
    pub clickhouse_ca_file: String,
    /// PEM client certificate (chain) presented to an `https://` ClickHouse; empty: none.
    pub clickhouse_client_cert: String,
    /// PEM private key of `clickhouse_client_cert`.
    pub clickhouse_client_key: String,
    /// How insert bodies and query answers travel: `lz4` (ClickHouse's own compressed blocks,
    /// the default) or `none`.
    pub clickhouse_compression: ClickHouseCompression,
    /// Shipped outbox rows older than this are deleted by the relay (0 keeps them forever).
    pub outbox_retention_hours: u64,
    /// How often the relay deletes expired outbox rows.
    pub purge_interval_s: u64,
    /// Longest a graceful stop (SIGTERM/SIGINT) may take to flush; past it the relay exits
    /// without confirming what ClickHouse has not accepted (the next start ships it).
    pub shutdown_timeout_ms: u64,
    /// How often the background verifier compares the outbox with ClickHouse; 0 turns it off.
    pub verify_interval_s: u64,
    /// How long after `run` starts the background verifier's first pass comes, and how long
    /// a pass waits for the relay to pass its snapshot (at least 30 s).
    pub verify_grace_s: u64,
    /// Width of the `event_date_time` windows compared by count and checksum.
    pub verify_window_s: u64,
    /// Retired in 0.3 (the background verifier compares every event the outbox holds): still
    /// accepted, ignored with a warning.
    pub verify_lookback_hours: Option<u64>,
    /// Re-ship missing events found by the background verifier (extras are only reported).
    pub verify_repair: bool,
    /// `pretty` (for people) or `json` (for log pipelines).
    pub log_format: LogFormat,
    /// A tracing filter: `info`, `relay=debug,info`, ...
    pub log_level: String,
    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoint; empty turns it off.
    pub metrics_addr: String,
    /// Sentry DSN (`SENTRY_DSN`); Sentry is off when unset.
    pub sentry_dsn: Option<String>,
    /// Share of batches traced as Sentry transactions, 0.0 to 1.0.
    pub sentry_traces_sample_rate: f32,
    /// `postgres_url` and `clickhouse_url` parsed, their TLS files read: set by validation.
    #[serde(skip)]
    pub(crate) targets: Option<Targets>,
}

/// The servers a validated configuration names, parsed once and shared by every connection.
#[derive(Debug, Clone)]
pub(crate) struct Targets {
    postgres: Arc<crate::pgtls::Target>,
    clickhouse: Arc<ClickHouseTarget>,
}

/// How data travels over ClickHouse's HTTP interface (`clickhouse_compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClickHouseCompression {
    /// ClickHouse's LZ4 blocks: about a third of the bytes on the network, some CPU on both sides.
    #[default]
    Lz4,
    /// Plain RowBinary: less CPU for the relay and ClickHouse, more bytes on the network.
    None,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            postgres_url: String::new(),
            clickhouse_url: String::new(),
            slot: "event_outbox_slot".into(),
            slot_failover: true,
            failover_recovery: false,
            publication: "event_outbox_pub".into(),
            outbox_schema: "public".into(),
            outbox_table: "event_outbox".into(),
            clickhouse_table: "event_log".into(),
            clickhouse_cluster: String::new(),
            source_id: String::new(),
            environment: "production".into(),
            batch_max_rows: 100_000,
            batch_max_bytes: 64 * 1024 * 1024,
            batch_max_wait_ms: 1_000,
            status_interval_ms: 1_000,
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
            clickhouse_timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
            clickhouse_ca_file: String::new(),
            clickhouse_client_cert: String::new(),
            clickhouse_client_key: String::new(),
            clickhouse_compression: ClickHouseCompression::Lz4,
            outbox_retention_hours: 72,
            purge_interval_s: 60,
            shutdown_timeout_ms: 10_000,
            verify_interval_s: 300,
            verify_grace_s: 60,
            verify_window_s: 3600,
            verify_lookback_hours: None,
            verify_repair: false,
            log_format: LogFormat::Pretty,
            log_level: "info".into(),
            metrics_addr: "127.0.0.1:9898".into(),
            sentry_dsn: None,
            sentry_traces_sample_rate: 1.0,
            targets: None,
        }
    }
}

/// The names of every setting, as they appear in the file (and, upper-cased with `RELAY_`, in
/// the environment).
pub const SETTINGS: &[&str] = &[
    "postgres_url",
    "clickhouse_url",
    "slot",
    "slot_failover",
    "failover_recovery",
    "publication",
    "outbox_schema",
    "outbox_table",
    "clickhouse_table",
    "clickhouse_cluster",
    "source_id",
    "environment",
    "batch_max_rows",
    "batch_max_bytes",
    "batch_max_wait_ms",
    "status_interval_ms",
    "retry_initial_ms",
    "retry_max_ms",
    "clickhouse_timeout_ms",
    "clickhouse_ca_file",
    "clickhouse_client_cert",
    "clickhouse_client_key",
    "clickhouse_compression",
    "outbox_retention_hours",
    "purge_interval_s",
    "shutdown_timeout_ms",
    "verify_interval_s",
    "verify_grace_s",
    "verify_window_s",
    "verify_lookback_hours",
    "verify_repair",
    "log_format",
    "log_level",
    "metrics_addr",
    "sentry_dsn",
    "sentry_traces_sample_rate",
];

/// Settings that are text, read from the environment exactly as given.
const TEXT_SETTINGS: &[&str] = &[
    "postgres_url",
    "clickhouse_url",
    "slot",
    "publication",
    "outbox_schema",
    "outbox_table",
    "clickhouse_table",
    "clickhouse_cluster",
    "environment",
    "log_level",
    "metrics_addr",
];

/// A configuration that cannot be used, with the setting it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration: {0}")]
    Load(#[source] Box<figment::Error>),
    #[error("configuration file {0} does not exist")]
    MissingFile(String),
    #[error(
        "unknown environment variable {variable}: no setting has that name{hint}. Every \
         RELAY_ variable must name a setting (docs/configuration.md); unset it or fix the name"
    )]
    UnknownVariable { variable: String, hint: String },
    #[error("setting {setting} (env {env}): {problem}")]
    Invalid {
        setting: String,
        env: String,
        problem: String,
    },
}

pub(crate) fn invalid(setting: &str, problem: impl Into<String>) -> ConfigError {
    let setting = setting.to_ascii_lowercase();
    let env = if setting == "sentry_dsn" {
        "SENTRY_DSN".to_string()
    } else {
        format!("RELAY_{}", setting.to_ascii_uppercase())
    };
    ConfigError::Invalid {
        setting,
        env,
        problem: problem.into(),
    }
}

impl Config {
    /// Loads the defaults, then the TOML file (if given), then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        check_environment(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))?;
        Self::from_figment(Self::figment(file)?)
    }

    /// The layered sources, for callers (and tests) that add their own on top.
    pub fn figment(file: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.display().to_string()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let mut figment = figment.merge(Env::prefixed("RELAY_").filter(|key| {
            SETTINGS.iter().any(|s| key == *s) && !TEXT_SETTINGS.iter().any(|s| key == *s)
        }));
        // Text as is: figment would read `"x"` as x and `[x]` as a list, and trim spaces, so
        // a name would silently become another.
        for setting in TEXT_SETTINGS {
            let variable = format!("RELAY_{}", setting.to_ascii_uppercase());
            if let Some(value) = std::env::var_os(&variable) {
                let value = value
                    .into_string()
                    .map_err(|_| invalid(setting, "is not valid UTF-8"))?;
                figment = figment.merge(Serialized::default(setting, value));
            }
        }
        Ok(figment.merge(Env::raw().only(&["SENTRY_DSN"])))
    }

    /// Extracts and validates a configuration from any figment.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|e| match e.path.last() {
            // Name the setting the way the operator wrote it, with the source of the value.
            Some(key) => {
                let source = e
                    .metadata
                    .as_ref()
                    .map(|m| format!(" (from {})", m.name))
                    .unwrap_or_default();
                invalid(key, format!("{}{source}", e.kind))
            }
            None => ConfigError::Load(Box::new(e)),
        })?;
        config.validated()
    }

    /// Validates a configuration built in code (`load` and `from_figment` do this): checks every
    /// setting, normalizes `log_level`, and parses `postgres_url` and `clickhouse_url` into the
    /// targets every connection uses, reading their certificate and key files.
    pub fn validated(mut self) -> Result<Config, ConfigError> {
        self.log_level = normalize_log_level(&self.log_level)?;
        let (postgres, clickhouse) = self.validate()?;
        self.targets = Some(Targets {
            postgres: Arc::new(postgres),
            clickhouse: Arc::new(clickhouse),
        });
        Ok(self)
    }

    /// `postgres_url` parsed at validation, with its TLS files read.
    ///
    /// # Panics
    /// On a configuration that was not validated ([`Config::validated`]).
    pub fn postgres(&self) -> &Arc<crate::pgtls::Target> {
        &self.targets().postgres
    }

    /// `clickhouse_url` and the ClickHouse TLS settings parsed at validation, their files read.
    ///
    /// # Panics
    /// On a configuration that was not validated ([`Config::validated`]).
    pub fn clickhouse(&self) -> &Arc<ClickHouseTarget> {
        &self.targets().clickhouse
    }

    fn targets(&self) -> &Targets {
        self.targets.as_ref().expect(
            "a Config from Config::load or Config::from_figment, or passed through \
             Config::validated, which parse postgres_url and clickhouse_url",
        )
    }

    /// The metrics endpoint's address, if it is on.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr.parse().ok()
    }

    pub fn batch_max_wait(&self) -> Duration {
        Duration::from_millis(self.batch_max_wait_ms)
    }

    pub fn clickhouse_timeout(&self) -> Duration {
        Duration::from_millis(self.clickhouse_timeout_ms)
    }

    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.status_interval_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

pub use check::{
    CLICKHOUSE_MAX_FILE_NAME, OTHER_PREFIXES, OTHER_VARIABLES, check_environment,
    clickhouse_file_name_len, normalize_log_level,
};

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    fn load(jail: &figment::Jail) -> Result<Config, ConfigError> {
        let _ = jail;
        Config::load(Some(Path::new("relay.toml")))
    }

    const MINIMAL: &str = r#"
        postgres_url = "postgres://relay@127.0.0.1:5432/app"
        clickhouse_url = "http://default:@127.0.0.1:8123/analytics"
    "#;

    #[test]
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("relay.toml", &format!("{MINIMAL}\nbatch_max_rows = 5000\n"))?;
            jail.set_env("RELAY_BATCH_MAX_WAIT_MS", "250");
            jail.set_env("RELAY_SLOT", "other_slot");
            jail.set_env("RELAY_TEST_SOMETHING_ELSE", "ignored");
            let config = load(jail).expect("valid");
            assert_eq!(config.batch_max_rows, 5000);
            assert_eq!(config.batch_max_wait_ms, 250);
            assert_eq!(config.slot, "other_slot");
            assert_eq!(config.clickhouse_table, "event_log");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_setting_and_its_variable() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("relay.toml", MINIMAL)?;
            jail.set_env("RELAY_BATCH_MAX_ROWS", "0");
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains("batch_max_rows"), "{message}");
            assert!(message.contains("RELAY_BATCH_MAX_ROWS"), "{message}");

            jail.set_env("RELAY_BATCH_MAX_ROWS", "many");
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains("batch_max_rows"), "{message}");

            jail.set_env("RELAY_BATCH_MAX_ROWS", "10");
            jail.set_env("RELAY_CLICKHOUSE_URL", "ftp://x");
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains("RELAY_CLICKHOUSE_URL"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn clickhouse_compression_is_lz4_or_none() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("relay.toml", MINIMAL)?;
            let config = load(jail).expect("valid");
            assert_eq!(config.clickhouse_compression, ClickHouseCompression::Lz4);
            assert_eq!(config.clickhouse().compression, ClickHouseCompression::Lz4);

            jail.set_env("RELAY_CLICKHOUSE_COMPRESSION", "none");
            let config = load(jail).expect("valid");
            assert_eq!(config.clickhouse_compression, ClickHouseCompression::None);
            assert_eq!(config.clickhouse().compression, ClickHouseCompression::None);

            jail.set_env("RELAY_CLICKHOUSE_COMPRESSION", "zstd");
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains("clickhouse_compression"), "{message}");
            assert!(
                message.contains("RELAY_CLICKHOUSE_COMPRESSION"),
                "{message}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("relay.toml", &format!("{MINIMAL}\nbatch_max_row = 5\n"))?;
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains("batch_max_row"), "{message}");
            Ok(())
        });
    }

    /// The PostgreSQL URL's user and password are percent-decoded as RFC 3986 says (tokio-postgres
    /// parses them; the replication connection takes them from there): `+` stays `+`.
    #[test]
    fn postgres_url_plus_stays_plus() {
        let pg: tokio_postgres::Config = "postgres://re+lay:p+w%2Bx%20y@127.0.0.1:5432/app"
            .parse()
            .unwrap();
        assert_eq!(pg.get_user(), Some("re+lay"));
        assert_eq!(pg.get_password(), Some(&b"p+w+x y"[..]));
    }

    #[test]
    fn unknown_relay_variables_are_refused_with_the_closest_setting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("relay.toml", MINIMAL)?;
            jail.set_env("RELAY_BATCH_MAXROWS", "5");
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains("RELAY_BATCH_MAXROWS"), "{message}");
            assert!(
                message.contains("did you mean RELAY_BATCH_MAX_ROWS"),
                "{message}"
            );
            Ok(())
        });
        // What the command line and the test suite read is not a typo.
        let known = [
            "RELAY_CONFIG",
            "RELAY_TEST_POSTGRES_URL",
            "RELAY_SLOT",
            "PATH",
        ];
        check_environment(known.map(String::from)).expect("known variables");
        let message = check_environment(["RELAY_ZZZ".to_string()])
            .unwrap_err()
            .to_string();
        assert!(!message.contains("did you mean"), "{message}");
    }

    #[test]
    fn log_levels() {
        assert_eq!(normalize_log_level("warning").unwrap(), "warn");
        assert_eq!(normalize_log_level("WARNING").unwrap(), "warn");
        assert_eq!(
            normalize_log_level("relay=warning, info").unwrap(),
            "relay=warn,info"
        );
        assert_eq!(
            normalize_log_level("relay::sink=debug").unwrap(),
            "relay::sink=debug"
        );
        for bad in ["verbose", "relay", "relay=loud"] {
            let message = normalize_log_level(bad).unwrap_err().to_string();
            assert!(message.contains("RELAY_LOG_LEVEL"), "{message}");
        }
    }

    #[test]
    fn names_postgres_accepts_are_accepted() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("relay.toml", MINIMAL)?;
            let long = "x".repeat(63);
            for name in [
                "UpPub",
                "with \"quote\"",
                "it's",
                "spa ce",
                "\"quoted\"",
                "[list]",
                "true",
                "42",
                " edge spaces ",
                "Zoë ✓",
                long.as_str(),
            ] {
                jail.set_env("RELAY_PUBLICATION", name);
                jail.set_env("RELAY_OUTBOX_TABLE", name);
                jail.set_env("RELAY_OUTBOX_SCHEMA", name);
                jail.set_env("RELAY_CLICKHOUSE_TABLE", name);
                let config = load(jail).unwrap_or_else(|e| panic!("{name:?}: {e}"));
                assert_eq!(config.publication, name);
                assert_eq!(config.outbox_table, name);
                assert_eq!(config.clickhouse_table, name);
            }
            for (setting, bad) in [
                ("RELAY_PUBLICATION", "x".repeat(64)),
                ("RELAY_OUTBOX_TABLE", "a\nb".to_string()),
                ("RELAY_SLOT", "UpSlot".to_string()),
                ("RELAY_SLOT", "s-lot".to_string()),
            ] {
                jail.set_env("RELAY_PUBLICATION", "p");
                jail.set_env("RELAY_OUTBOX_TABLE", "t");
                jail.set_env(setting, &bad);
                let message = load(jail).unwrap_err().to_string();
                assert!(message.contains(setting), "{bad:?}: {message}");
            }
            Ok(())
        });
    }

    #[test]
    fn clickhouse_database_is_percent_decoded() {
        let target = ClickHouseTarget::parse("http://u:p%40ss@h:8123/My%20DB%22%60").unwrap();
        assert_eq!(target.database, "My DB\"`");
        assert_eq!(target.password, "p@ss");
        for dots in [
            "http://h:8123/.",
            "http://h:8123/..",
            "http://h:8123/%2E",
            "http://h/%2e%2E/",
        ] {
            let message = ClickHouseTarget::parse(dots).unwrap_err().to_string();
            assert!(
                message.contains("RELAY_CLICKHOUSE_URL"),
                "{dots}: {message}"
            );
        }
    }

    #[test]
    fn an_unencoded_at_in_the_password_is_refused_without_showing_it() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("relay.toml", MINIMAL)?;
            jail.set_env("RELAY_POSTGRES_URL", "postgres://relay:se@cret@db:5432/app");
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains("RELAY_POSTGRES_URL"), "{message}");
            assert!(message.contains("%40"), "{message}");
            assert!(!message.contains("cret"), "{message}");
            jail.set_env(
                "RELAY_POSTGRES_URL",
                "postgres://relay:se%40cret@db:5432/app",
            );
            load(jail).expect("an encoded @ is fine");
            Ok(())
        });
    }

    /// The targets are parsed, and their files read, when the configuration loads: a bad
    /// `postgres_url` or an unreadable ClickHouse CA file stops the relay there, naming the
    /// setting; clones share what was read.
    #[test]
    fn targets_are_parsed_at_load() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("relay.toml", MINIMAL)?;
            let config = load(jail).expect("valid");
            assert_eq!(config.postgres().endpoint(0), "127.0.0.1:5432");
            assert_eq!(config.clickhouse().database, "analytics");
            let copy = config.clone();
            assert!(Arc::ptr_eq(config.postgres(), copy.postgres()));
            assert!(Arc::ptr_eq(config.clickhouse(), copy.clickhouse()));

            let setting = "setting postgres_url (env RELAY_POSTGRES_URL)";
            jail.set_env("RELAY_POSTGRES_URL", "postgres://relay@db:port/app");
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains(setting), "{message}");
            assert!(message.contains("is not a PostgreSQL URL"), "{message}");
            jail.set_env(
                "RELAY_POSTGRES_URL",
                "postgres://relay@db/app?sslmode=verify-full&sslrootcert=/nonexistent/root.crt",
            );
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains(setting), "{message}");
            assert!(message.contains("/nonexistent/root.crt"), "{message}");

            jail.set_env("RELAY_POSTGRES_URL", "postgres://relay@db/app");
            jail.set_env("RELAY_CLICKHOUSE_URL", "https://ch:8443/analytics");
            jail.set_env("RELAY_CLICKHOUSE_CA_FILE", "/nonexistent/ca.pem");
            let message = load(jail).unwrap_err().to_string();
            assert!(
                message.contains("setting clickhouse_ca_file (env RELAY_CLICKHOUSE_CA_FILE)"),
                "{message}"
            );
            assert!(message.contains("cannot read"), "{message}");
            Ok(())
        });
        // A configuration built in code gets its targets from `validated`.
        let config = Config {
            postgres_url: "host=db user=relay".into(),
            clickhouse_url: "http://ch:8123/analytics".into(),
            ..Config::default()
        };
        assert!(config.targets.is_none());
        let config = config.validated().expect("valid");
        assert_eq!(config.postgres().host(), "db");
    }

    #[test]
    fn missing_required_urls() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("relay.toml", "")?;
            let message = load(jail).unwrap_err().to_string();
            assert!(message.contains("RELAY_POSTGRES_URL"), "{message}");
            Ok(())
        });
    }
}

#[cfg(test)]
mod reference {
    use super::*;

    /// docs/configuration.md and deploy/outbox-relay.toml name every setting the code reads, and
    /// no other.
    #[test]
    fn reference_lists_every_setting() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        let doc = std::fs::read_to_string(format!("{root}/docs/configuration.md")).unwrap();
        let documented: Vec<&str> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        assert_eq!(
            documented, SETTINGS,
            "docs/configuration.md rows vs Config fields"
        );
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let fields: Vec<&String> = defaults.as_object().unwrap().keys().collect();
        let mut sorted_settings: Vec<&str> = SETTINGS.to_vec();
        sorted_settings.sort();
        let mut sorted_fields: Vec<&str> = fields.iter().map(|s| s.as_str()).collect();
        sorted_fields.sort();
        assert_eq!(sorted_fields, sorted_settings, "SETTINGS vs Config fields");

        let example = std::fs::read_to_string(format!("{root}/deploy/outbox-relay.toml")).unwrap();
        let parsed: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(&example))
            .extract()
            .expect("deploy/outbox-relay.toml is a valid configuration");
        assert_eq!(parsed.batch_max_rows, Config::default().batch_max_rows);
    }
}
