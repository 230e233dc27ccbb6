//! What `verify` compares of each row, computed alike inside PostgreSQL and inside ClickHouse:
//! a 64-bit hash of the event as shipped (id, time, version, type, environment, context), and
//! the window and bucket a row falls in. Each is written once here, rendered for both servers.
//!
//! The hash is the first 8 bytes of the MD5 of one canonical text: the only digest both
//! servers have built in. `id|micros|version|len:type|len:environment|context`, lengths in
//! bytes, so no two events share a text. MD5 costs PostgreSQL about a microsecond a row, which
//! the background verifier pays only for the rows that came since its last pass.

/// SQL expressions for the fields a hash covers, on one server.
pub struct Fields {
    /// The event id as lowercase hyphenated text.
    pub id: String,
    /// `event_date_time` as Unix microseconds, as text.
    pub micros: String,
    pub version: String,
    pub event_type: String,
    pub environment: String,
    pub context: String,
}

impl Fields {
    /// The fields of row `a` of the outbox table or of the dead letters (PostgreSQL).
    pub fn postgres(a: &str) -> Fields {
        Fields {
            id: format!("{a}.event_id::text"),
            micros: format!("{}::text", pg_micros(&format!("{a}.event_date_time"))),
            version: format!("{a}.metadata_version::int8::text"),
            event_type: format!("{a}.event_type::text"),
            environment: format!("{a}.environment::text"),
            context: format!("{a}.event_context::text"),
        }
    }

    /// The fields of an `event_log` row (ClickHouse).
    pub fn clickhouse() -> Fields {
        Fields {
            id: "toString(event_id)".into(),
            micros: format!("toString({CH_MICROS})"),
            version: "toString(metadata_version)".into(),
            event_type: "toString(event_type)".into(),
            environment: "toString(environment)".into(),
            context: "toString(event_context)".into(),
        }
    }

    /// The canonical text's parts, with `len` giving a text's length in bytes.
    fn canonical(&self, len: impl Fn(&str) -> String) -> String {
        let bar = "'|'".to_string();
        [
            self.id.clone(),
            bar.clone(),
            self.micros.clone(),
            bar.clone(),
            self.version.clone(),
            bar.clone(),
            len(&self.event_type),
            "':'".into(),
            self.event_type.clone(),
            bar.clone(),
            len(&self.environment),
            "':'".into(),
            self.environment.clone(),
            bar,
            self.context.clone(),
        ]
        .join(", ")
    }

    /// PostgreSQL: the hash as int8 (md5's first 8 bytes, big-endian).
    pub fn pg_hash(&self) -> String {
        format!(
            "('x' || left(md5(concat({})), 16))::bit(64)::int8",
            self.canonical(|e| format!("octet_length({e})::text"))
        )
    }

    /// ClickHouse: the same Int64.
    pub fn ch_hash(&self) -> String {
        format!(
            "reinterpretAsInt64(reverse(substring(MD5(concat({})), 1, 8)))",
            self.canonical(|e| format!("toString(length({e}))"))
        )
    }
}

/// PostgreSQL: a timestamp(tz) expression as Unix microseconds (int8, exact).
pub fn pg_micros(ts: &str) -> String {
    format!("floor(extract(epoch FROM {ts}) * 1000000)::int8")
}

/// ClickHouse: `event_date_time` as Unix microseconds.
pub const CH_MICROS: &str = "toUnixTimestamp64Micro(event_date_time)";

/// PostgreSQL: the start (Unix µs) of the `width`-µs window holding `us`, windows aligned to
/// the epoch (times before 1970 included).
pub fn pg_window(us: &str, width: i64) -> String {
    format!("({us} - ((({us}) % {width}) + {width}) % {width})")
}

/// ClickHouse: the same.
pub fn ch_window(us: &str, width: i64) -> String {
    format!("({us} - positiveModulo({us}, toInt64({width})))")
}

/// PostgreSQL: the top `bits` bits of hash `h` as a number.
pub fn pg_bucket(h: &str, bits: u32) -> String {
    format!("(({h} >> {}) & {})", 64 - bits, (1i64 << bits) - 1)
}

/// ClickHouse: the same (a logical shift of the unsigned hash).
pub fn ch_bucket(h: &str, bits: u32) -> String {
    format!(
        "toInt64(bitAnd(bitShiftRight(reinterpretAsUInt64({h}), {}), {}))",
        64 - bits,
        (1u64 << bits) - 1
    )
}

/// A row both servers hash each pass before they are trusted: an id, a time before 1970, a
/// multi-byte type, an empty environment and a context with escapes. The fields are literals:
/// (PostgreSQL values, ClickHouse values).
pub const PROBE: [(&str, &str, &str); 6] = [
    (
        "event_id",
        "'00112233-4455-6677-8899-aabbccddeeff'::uuid",
        "toUUID('00112233-4455-6677-8899-aabbccddeeff')",
    ),
    ("event_type", "'probé.type'::text", "'probé.type'"),
    (
        "event_date_time",
        "'1969-07-20 20:17:40.123456+00'::timestamptz",
        "toDateTime64('1969-07-20 20:17:40.123456', 6, 'UTC')",
    ),
    ("environment", "''::text", "''"),
    (
        "event_context",
        r#"'{"a": [1, 2.50], "b": "\u00e9\n"}'::json"#,
        r#"'{"a": [1, 2.50], "b": "\\u00e9\\n"}'"#,
    ),
    ("metadata_version", "42::int8", "toUInt64(42)"),
];

/// PostgreSQL's hash of [`PROBE`].
pub fn pg_probe() -> String {
    let row: Vec<String> = PROBE
        .iter()
        .map(|(n, pg, _)| format!("{pg} AS {n}"))
        .collect();
    format!(
        "SELECT {} FROM (SELECT {}) a",
        Fields::postgres("a").pg_hash(),
        row.join(", ")
    )
}

/// ClickHouse's hash of [`PROBE`].
pub fn ch_probe() -> String {
    let row: Vec<String> = PROBE
        .iter()
        .map(|(n, _, ch)| format!("{ch} AS {n}"))
        .collect();
    format!(
        "SELECT {} FROM (SELECT {})",
        Fields::clickhouse().ch_hash(),
        row.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_renderings_hash_the_same_parts_in_the_same_order() {
        let pg = Fields::postgres("o").pg_hash();
        let ch = Fields::clickhouse().ch_hash();
        // The separators and the length prefixes appear alike.
        assert_eq!(pg.matches("'|'").count(), 5);
        assert_eq!(ch.matches("'|'").count(), 5);
        assert_eq!(pg.matches("':'").count(), 2);
        assert_eq!(ch.matches("':'").count(), 2);
        assert!(pg.contains("octet_length(o.event_type::text)"));
        assert!(ch.contains("length(toString(event_type))"));
    }
}
