//! ClickHouse's errors, classified once where they are made ([`Failure`]): what the relay can do
//! about each is a match on that, never a search in the error's text.

use super::describe;

/// What the relay can do about a failed ClickHouse request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// ClickHouse refused a value of the rows themselves (a value its column cannot hold, a
    /// constraint): sending them again never succeeds, so each refused row becomes a dead letter
    /// and the rest ships.
    Refused,
    /// The server did not answer, timed out, is overloaded or restarting: tried again.
    Unavailable,
    /// The table, a column, the database, the credentials or a grant is wrong: an operator must
    /// act; tried again meanwhile (the error says what to fix).
    Configuration,
    /// Anything else: tried again.
    Unknown,
}

/// ClickHouse error codes that mean "this value does not fit": CANNOT_PARSE_TEXT (6),
/// CANNOT_PARSE_INPUT_ASSERTION_FAILED (27), CANNOT_PARSE_DATE (38), CANNOT_PARSE_DATETIME (41),
/// TYPE_MISMATCH (53), ARGUMENT_OUT_OF_BOUND (69), CANNOT_CONVERT_TYPE (70),
/// CANNOT_PARSE_NUMBER (72), INCORRECT_DATA (117), TOO_LARGE_STRING_SIZE (131),
/// VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE (321), TOO_DEEP_RECURSION (306), CANNOT_PARSE_UUID (376),
/// VIOLATED_CONSTRAINT (469: a `CONSTRAINT ... CHECK` the team added to the table refuses a row).
pub const REFUSED_CODES: &[u32] = &[6, 27, 38, 41, 53, 69, 70, 72, 117, 131, 306, 321, 376, 469];

/// Codes of a table, database, column, user or grant that is wrong: NO_SUCH_COLUMN_IN_TABLE (16),
/// UNKNOWN_TABLE (60), UNKNOWN_DATABASE (81), UNKNOWN_USER (192), REQUIRED_PASSWORD (194),
/// WRONG_PASSWORD (193), READONLY (164), ACCESS_DENIED (497), AUTHENTICATION_FAILED (516).
pub const CONFIGURATION_CODES: &[u32] = &[16, 60, 81, 164, 192, 193, 194, 497, 516];

/// Codes of a server that cannot serve now: TIMEOUT_EXCEEDED (159), TOO_MANY_SIMULTANEOUS_QUERIES
/// (202), SOCKET_TIMEOUT (209), NETWORK_ERROR (210), MEMORY_LIMIT_EXCEEDED (241), TOO_MANY_PARTS
/// (252), ABORTED (236), TABLE_IS_READ_ONLY (242), UNKNOWN_STATUS_OF_INSERT (319),
/// QUERY_WAS_CANCELLED (394), ALL_CONNECTION_TRIES_FAILED (279), KEEPER_EXCEPTION (999).
pub const UNAVAILABLE_CODES: &[u32] = &[159, 202, 209, 210, 236, 241, 242, 252, 279, 319, 394, 999];

impl Failure {
    /// The class of a client error: its kind, or for a server's answer, its code.
    pub fn of(error: &clickhouse::error::Error) -> Failure {
        use clickhouse::error::Error;
        match error {
            Error::Network(_) | Error::TimedOut => Failure::Unavailable,
            Error::BadResponse(text) => match code(text) {
                Some(c) if REFUSED_CODES.contains(&c) => Failure::Refused,
                Some(c) if CONFIGURATION_CODES.contains(&c) => Failure::Configuration,
                Some(c) if UNAVAILABLE_CODES.contains(&c) => Failure::Unavailable,
                _ => Failure::Unknown,
            },
            _ => Failure::Unknown,
        }
    }
}

/// ClickHouse's exception code in its answer (`Code: 117. DB::Exception: ...`).
fn code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

/// Errors from ClickHouse; every one of them leaves the slot where it was.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("ClickHouse insert into {table} failed: {}", describe(.source))]
    Insert {
        table: String,
        failure: Failure,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("ClickHouse query failed: {} (query: {query})", describe(.source))]
    Query {
        query: String,
        failure: Failure,
        #[source]
        source: clickhouse::error::Error,
    },
    /// The table cannot take the relay's rows as they are written; retrying does not help.
    #[error(
        "ClickHouse table {table} does not match what the relay writes:\n  {}\nRun `outbox-relay \
         setup` for a missing `source` column (it adds it); otherwise point clickhouse_table at \
         a table with these types (schema: `outbox-relay setup --print-sql`) or ALTER the columns",
        problems.join("\n  ")
    )]
    Table {
        table: String,
        problems: Vec<String>,
    },
    /// Another relay claimed the fence after this one (it holds the slot now): this relay's
    /// inserts keep nothing from then on (`sink/cluster.rs`).
    #[error(
        "another relay took over writing this outbox into ClickHouse (fence epoch {now}, this \
         relay's {mine}): this relay lost the slot and writes nothing more; it waits for the slot"
    )]
    Fenced { mine: u64, now: u64 },
    /// The table's engine, sorting key or TTL would merge, drop or change rows after the relay
    /// confirmed them ([`super::engine::engine_problems`]); retrying does not help.
    #[error(
        "ClickHouse table {table} does not match what the relay writes:\n  {}\nNothing was \
         written to it. A table of the relay's own shape: `outbox-relay setup --print-sql`; \
         moving the rows over: docs/operations.md, \"An existing ClickHouse table\"",
        problems.join("\n  ")
    )]
    Engine {
        table: String,
        problems: Vec<String>,
    },
}

impl SinkError {
    /// The kind counted in `outbox_relay_clickhouse_errors_total`.
    pub fn kind(&self) -> &'static str {
        let (SinkError::Insert { source, .. } | SinkError::Query { source, .. }) = self else {
            return "table";
        };
        match source {
            clickhouse::error::Error::Network(_) => "network",
            clickhouse::error::Error::TimedOut => "timeout",
            clickhouse::error::Error::BadResponse(_) => "server",
            _ => "other",
        }
    }

    /// An insert that failed, classified.
    pub fn insert(table: &str, source: clickhouse::error::Error) -> SinkError {
        SinkError::Insert {
            table: table.to_string(),
            failure: Failure::of(&source),
            source,
        }
    }

    /// A query that failed, classified.
    pub fn query(query: &str, source: clickhouse::error::Error) -> SinkError {
        SinkError::Query {
            query: query.to_string(),
            failure: Failure::of(&source),
            source,
        }
    }

    /// What can be done about it: a table or engine that does not fit is [`Failure::Configuration`].
    pub fn failure(&self) -> Failure {
        match self {
            SinkError::Insert { failure, .. } | SinkError::Query { failure, .. } => *failure,
            SinkError::Table { .. } | SinkError::Engine { .. } => Failure::Configuration,
            SinkError::Fenced { .. } => Failure::Unavailable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error;

    /// ClickHouse's own words (26.9) for each class.
    #[test]
    fn failures_are_classified_by_what_can_be_done() {
        let cases = [
            (
                "Code: 117. DB::Exception: Cannot parse JSON object here: {\"a\": 1, \"a\": 2}: \
                 (at row 3)\n: While executing BinaryRowInputFormat. (INCORRECT_DATA) (version \
                 26.9.2.1)",
                Failure::Refused,
            ),
            (
                "Code: 53. DB::Exception: Type mismatch in IN or VALUES section. (TYPE_MISMATCH)",
                Failure::Refused,
            ),
            (
                "Code: 469. DB::Exception: Constraint `c` for table default.event_log is \
                 violated at row 1. (VIOLATED_CONSTRAINT)",
                Failure::Refused,
            ),
            (
                "Code: 60. DB::Exception: Table default.event_log does not exist. \
                 (UNKNOWN_TABLE)",
                Failure::Configuration,
            ),
            (
                "Code: 497. DB::Exception: relay_ch: Not enough privileges. To execute this \
                 query, it's necessary to have the grant SELECT ON system.mutations. \
                 (ACCESS_DENIED)",
                Failure::Configuration,
            ),
            (
                "Code: 516. DB::Exception: relay: Authentication failed: password is \
                 incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)",
                Failure::Configuration,
            ),
            (
                "Code: 252. DB::Exception: Too many parts (3001). Merges are processing \
                 significantly slower than inserts. (TOO_MANY_PARTS)",
                Failure::Unavailable,
            ),
            (
                "Code: 241. DB::Exception: Memory limit (total) exceeded. \
                 (MEMORY_LIMIT_EXCEEDED)",
                Failure::Unavailable,
            ),
            (
                "Code: 62. DB::Exception: Syntax error: failed at position 1. (SYNTAX_ERROR)",
                Failure::Unknown,
            ),
            ("502 Bad Gateway", Failure::Unknown),
        ];
        for (text, failure) in cases {
            assert_eq!(
                Failure::of(&Error::BadResponse(text.into())),
                failure,
                "{text}"
            );
        }
        assert_eq!(
            Failure::of(&Error::Network("connection reset".into())),
            Failure::Unavailable
        );
        assert_eq!(Failure::of(&Error::TimedOut), Failure::Unavailable);
        assert_eq!(Failure::of(&Error::NotEnoughData), Failure::Unknown);
        let insert = SinkError::insert("t", Error::BadResponse(cases[0].0.into()));
        assert_eq!(insert.failure(), Failure::Refused);
    }
}
