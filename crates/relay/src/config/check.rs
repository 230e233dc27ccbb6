//! Checks of a loaded configuration and of the environment it came from: every problem names
//! the setting and its variable, and what to do.

use super::{ClickHouseTarget, Config, ConfigError, SETTINGS, invalid};
use crate::pgtls::{Target, TlsParamError};

/// `postgres_url` parsed, its TLS files read; a problem names the setting.
fn postgres_target(url: &str) -> Result<Target, ConfigError> {
    Target::parse(url).map_err(|e| match e {
        TlsParamError::Invalid(e) => {
            invalid("postgres_url", format!("is not a PostgreSQL URL: {e}"))
        }
        e => invalid("postgres_url", e.to_string()),
    })
}

impl Config {
    /// Checks every setting; yields the targets `postgres_url` and `clickhouse_url` name.
    pub(super) fn validate(&self) -> Result<(Target, ClickHouseTarget), ConfigError> {
        let targets = self.check_targets()?;
        self.check_names()?;
        self.check_numbers()?;
        self.check_endpoints()?;
        Ok(targets)
    }

    /// The URLs, their TLS files, and the ClickHouse database and table names they make: the
    /// targets, parsed (the only place `postgres_url` and `clickhouse_url` are).
    fn check_targets(&self) -> Result<(Target, ClickHouseTarget), ConfigError> {
        if self.postgres_url.trim().is_empty() {
            return Err(invalid(
                "postgres_url",
                "is required, e.g. postgres://relay:secret@db:5432/app",
            ));
        }
        check_postgres_url_userinfo(&self.postgres_url)?;
        let postgres = postgres_target(&self.postgres_url)?;
        // Parses the URL and reads the CA bundle and client certificate, if any: a file that is
        // missing or not PEM stops the relay here, naming the setting.
        let clickhouse = ClickHouseTarget::from_config(self)?;
        check_identifier("clickhouse_url", &clickhouse.database).map_err(|_| {
            invalid(
                "clickhouse_url",
                format!(
                    "database {:?} (the URL's path, percent-decoded) must be 1 to 63 bytes \
                     without control characters",
                    clickhouse.database
                ),
            )
        })?;
        let file_name = clickhouse_file_name_len(&clickhouse.database)
            + clickhouse_file_name_len(&self.clickhouse_table);
        if file_name > CLICKHOUSE_MAX_FILE_NAME {
            return Err(invalid(
                "clickhouse_table",
                format!(
                    "{:?} in database {:?} is too long for ClickHouse: it keeps a table under a \
                     file name made of both names, every byte outside A-Z, a-z, 0-9 and _ taking \
                     3, and {file_name} is more than its {CLICKHOUSE_MAX_FILE_NAME}; choose a \
                     shorter table or database name",
                    self.clickhouse_table, clickhouse.database
                ),
            ));
        }
        Ok((postgres, clickhouse))
    }

    /// The names PostgreSQL and ClickHouse must accept.
    fn check_names(&self) -> Result<(), ConfigError> {
        for (setting, value) in [
            ("slot", &self.slot),
            ("publication", &self.publication),
            ("outbox_schema", &self.outbox_schema),
            ("outbox_table", &self.outbox_table),
            ("clickhouse_table", &self.clickhouse_table),
        ] {
            check_identifier(setting, value)?;
        }
        if !self.clickhouse_cluster.is_empty() {
            check_identifier("clickhouse_cluster", &self.clickhouse_cluster)?;
        }
        if !self
            .slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(invalid(
                "slot",
                format!(
                    "{:?}: PostgreSQL slot names may contain only lower-case letters, digits and _",
                    self.slot
                ),
            ));
        }
        Ok(())
    }

    /// The numbers' bounds.
    fn check_numbers(&self) -> Result<(), ConfigError> {
        for (setting, value, min) in [
            ("batch_max_rows", self.batch_max_rows as u64, 1),
            ("batch_max_bytes", self.batch_max_bytes as u64, 1024),
            ("batch_max_wait_ms", self.batch_max_wait_ms, 1),
            ("status_interval_ms", self.status_interval_ms, 10),
            ("retry_initial_ms", self.retry_initial_ms, 1),
            ("clickhouse_timeout_ms", self.clickhouse_timeout_ms, 100),
            ("purge_interval_s", self.purge_interval_s, 1),
            ("shutdown_timeout_ms", self.shutdown_timeout_ms, 100),
            ("verify_window_s", self.verify_window_s, 1),
        ] {
            if value < min {
                return Err(invalid(
                    setting,
                    format!("must be at least {min}, got {value}"),
                ));
            }
        }
        if self.retry_max_ms < self.retry_initial_ms {
            return Err(invalid(
                "retry_max_ms",
                format!(
                    "must be at least retry_initial_ms ({}), got {}",
                    self.retry_initial_ms, self.retry_max_ms
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.sentry_traces_sample_rate) {
            return Err(invalid(
                "sentry_traces_sample_rate",
                format!(
                    "must be between 0.0 and 1.0, got {}",
                    self.sentry_traces_sample_rate
                ),
            ));
        }
        Ok(())
    }

    /// The metrics address and the Sentry DSN.
    fn check_endpoints(&self) -> Result<(), ConfigError> {
        if !self.metrics_addr.is_empty() {
            self.metrics_addr
                .parse::<std::net::SocketAddr>()
                .map_err(|e| {
                    invalid(
                        "metrics_addr",
                        format!(
                            "{:?} is not an address like 0.0.0.0:9898 ({e}); empty turns the endpoint off",
                            self.metrics_addr
                        ),
                    )
                })?;
        }
        if let Some(dsn) = &self.sentry_dsn {
            dsn.parse::<sentry::types::Dsn>()
                .map_err(|e| invalid("sentry_dsn", format!("is not a Sentry DSN: {e}")))?;
        }
        Ok(())
    }
}

/// `RELAY_` variables that are not settings but are read by others: `RELAY_CONFIG` (the
/// command line's `--config`) and `RELAY_TEST_*` (the test suite's servers).
pub const OTHER_VARIABLES: &[&str] = &["RELAY_CONFIG"];
/// Prefixes of `RELAY_` variables the relay leaves alone.
pub const OTHER_PREFIXES: &[&str] = &["RELAY_TEST_"];

/// Refuses a `RELAY_*` variable that names no setting: a typo (`RELAY_BATCH_MAXROWS`) would
/// otherwise leave the default in force without a word.
pub fn check_environment(names: impl IntoIterator<Item = String>) -> Result<(), ConfigError> {
    for name in names {
        let Some(key) = name.strip_prefix("RELAY_") else {
            continue;
        };
        if OTHER_VARIABLES.contains(&name.as_str())
            || OTHER_PREFIXES.iter().any(|p| name.starts_with(p))
            || SETTINGS.iter().any(|s| s.eq_ignore_ascii_case(key))
        {
            continue;
        }
        let lower = key.to_ascii_lowercase();
        let closest = SETTINGS
            .iter()
            .map(|s| (edit_distance(s, &lower), *s))
            .min()
            .filter(|(d, s)| *d <= s.len() / 2);
        return Err(ConfigError::UnknownVariable {
            hint: closest
                .map(|(_, s)| format!(" (did you mean RELAY_{}?)", s.to_ascii_uppercase()))
                .unwrap_or_default(),
            variable: name,
        });
    }
    Ok(())
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(previous + 1).min(row[j] + 1);
        }
    }
    row[b.len()]
}

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Checks `log_level` the way tracing's `EnvFilter` reads it, with two differences that keep a
/// mistake from silencing the relay: `warning` means `warn`, and a bare word that is not a
/// level (which `EnvFilter` reads as a target name, turning every other log line off) is
/// refused.
pub fn normalize_log_level(filter: &str) -> Result<String, ConfigError> {
    let mut directives = Vec::new();
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target), level),
            None => (None, directive),
        };
        let level = if level.eq_ignore_ascii_case("warning") {
            "warn".to_string()
        } else {
            level.to_string()
        };
        let is_level = LEVELS.iter().any(|l| l.eq_ignore_ascii_case(&level));
        if target.is_none() && !is_level && !directive.contains(['[', ':']) {
            return Err(invalid(
                "log_level",
                format!(
                    "{directive:?} is not a level ({}); to filter by target write \
                     TARGET=LEVEL, e.g. relay=debug,info",
                    LEVELS.join(", ")
                ),
            ));
        }
        directives.push(match target {
            Some(target) => format!("{target}={level}"),
            None => level,
        });
    }
    let normalized = if directives.is_empty() {
        "info".to_string()
    } else {
        directives.join(",")
    };
    tracing_subscriber::EnvFilter::builder()
        .parse(&normalized)
        .map_err(|e| {
            invalid(
                "log_level",
                format!("{filter:?} is not a tracing filter ({e}); e.g. info or relay=debug,info"),
            )
        })?;
    Ok(normalized)
}

/// The most ClickHouse allows for the file-name forms of a table's database and name together
/// (255 bytes less the dots, a UUID and the `.sql.detached` suffix of a dropped table's file;
/// ClickHouse's `computeMaxTableNameLength`).
pub const CLICKHOUSE_MAX_FILE_NAME: usize = 204;

/// The length of a name as ClickHouse writes it in a file name (`escapeForFileName`: every byte
/// but ASCII letters, digits and `_` becomes `%XX`).
pub fn clickhouse_file_name_len(name: &str) -> usize {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' {
                1
            } else {
                3
            }
        })
        .sum()
}

/// An unencoded `@` in a URL's password makes the driver take the rest of the password for the
/// host, which then shows up in every connection error. Refused without echoing the URL.
fn check_postgres_url_userinfo(url: &str) -> Result<(), ConfigError> {
    let Some(rest) = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| url.strip_prefix(scheme))
    else {
        return Ok(());
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.matches('@').count() > 1 {
        return Err(invalid(
            "postgres_url",
            "has more than one @ before the host: percent-encode an @ in the user name or \
             password as %40 (e.g. postgres://relay:p%40ss@db:5432/app); the URL is not shown \
             because it holds a password",
        ));
    }
    Ok(())
}

fn check_identifier(setting: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 63 {
        return Err(invalid(
            setting,
            format!("{value:?} must be 1 to 63 bytes long"),
        ));
    }
    // Quotes, spaces, upper case and any Unicode are fine: every name is quoted where it is
    // used. Control characters (and NUL, which PostgreSQL cannot store) are not.
    if value.chars().any(char::is_control) {
        return Err(invalid(
            setting,
            format!("{value:?} must not contain control characters"),
        ));
    }
    Ok(())
}
