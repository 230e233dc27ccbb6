//! The one row mapping: from the outbox table's pgoutput tuples to [`EventRow`]s (the live
//! stream), and from outbox rows read with SQL ([`SqlLayout`]: replay, dead-letter retry)
//! through the same [`OutboxLayout`]: which tuple column holds which field (learnt from each
//! Relation message, so added or reordered columns are picked up), and how each PostgreSQL
//! value, in text or binary format, becomes a ClickHouse value.

use pgoutput::{Column, Relation, TupleData};
use tokio_postgres::Client;

use crate::event::{EventRow, OwnedEventRow, fnv1a, parse_uuid};
use crate::pg::{PgError, quote_pg_ident};

/// PostgreSQL type OIDs the outbox columns may have.
mod oid {
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const INT8: u32 = 20;
    pub const TEXT: u32 = 25;
    pub const VARCHAR: u32 = 1043;
    pub const JSON: u32 = 114;
    pub const JSONB: u32 = 3802;
    pub const UUID: u32 = 2950;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
}

/// The 64-bit transaction id (xid8) of outbox row `o`'s inserting transaction, for
/// `pg_visible_in_snapshot`. xmin is a 32-bit xid: add the epoch of the current snapshot's xmax
/// (the previous one when xmin's low bits are ahead of it).
pub(crate) const ROW_XID8: &str =
    "(((pg_snapshot_xmax(pg_current_snapshot())::text::int8 >> 32) << 32)
                 + o.xmin::text::int8
                 - CASE WHEN o.xmin::text::int8
                             > (pg_snapshot_xmax(pg_current_snapshot())::text::int8 & 4294967295)
                        THEN 4294967296 ELSE 0 END)::text::xid8";

/// The outbox table's layout does not fit the relay.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "outbox table {table} has no column {column:?}; the relay needs event_id, event_type, \
         event_date_time, environment, event_context and metadata_version (see migrations/postgres)"
    )]
    MissingColumn { table: String, column: &'static str },
    #[error(
        "outbox column {table}.{column} has type oid {type_oid}, which the relay cannot ship; \
         expected {expected}"
    )]
    WrongType {
        table: String,
        column: &'static str,
        type_oid: u32,
        expected: &'static str,
    },
    #[error("relation message is malformed: {0}")]
    Decode(#[from] pgoutput::DecodeError),
}

/// One outbox row that cannot become an event row.
#[derive(Debug, thiserror::Error)]
#[error("outbox column {column}: {problem}")]
pub struct RowError {
    pub column: &'static str,
    pub problem: String,
}

#[derive(Debug, Clone, Copy)]
struct Field {
    index: usize,
    type_oid: u32,
}

/// Where each event field sits in the outbox table's tuples.
#[derive(Debug, Clone)]
pub struct OutboxLayout {
    event_id: Field,
    event_type: Field,
    event_date_time: Field,
    environment: Field,
    event_context: Field,
    metadata_version: Field,
    /// Optional: the publisher's trace (`sentry-trace` or W3C `traceparent` value).
    sentry_trace: Option<Field>,
}

impl OutboxLayout {
    /// Reads the layout from the outbox table's Relation message.
    pub fn from_relation(relation: &Relation) -> Result<OutboxLayout, SchemaError> {
        let table = format!("{}.{}", relation.namespace()?, relation.name()?);
        let columns = relation
            .columns
            .iter()
            .map(|c| Ok((c.name()?, c.type_oid)))
            .collect::<Result<Vec<(&str, u32)>, pgoutput::DecodeError>>()?;
        Self::from_columns(&table, &columns)
    }

    /// The layout of a table with these columns (name, type oid), in tuple order: what a
    /// Relation message says, or what `pg_attribute` says for rows read with SQL
    /// ([`OutboxLayout::row`] then reads them as text tuples).
    pub fn from_columns(table: &str, columns: &[(&str, u32)]) -> Result<OutboxLayout, SchemaError> {
        let table = table.to_string();
        let names = columns.iter().map(|(n, _)| *n).collect::<Vec<&str>>();
        let field = |column: &'static str, allowed: &[u32], expected: &'static str| {
            let index = names.iter().position(|n| *n == column).ok_or_else(|| {
                SchemaError::MissingColumn {
                    table: table.clone(),
                    column,
                }
            })?;
            let type_oid = columns[index].1;
            if !allowed.contains(&type_oid) {
                return Err(SchemaError::WrongType {
                    table: table.clone(),
                    column,
                    type_oid,
                    expected,
                });
            }
            Ok(Field { index, type_oid })
        };
        let text = [oid::TEXT, oid::VARCHAR];
        Ok(OutboxLayout {
            event_id: field("event_id", &[oid::UUID], "uuid")?,
            event_type: field("event_type", &text, "text or varchar")?,
            event_date_time: field(
                "event_date_time",
                &[oid::TIMESTAMPTZ, oid::TIMESTAMP],
                "timestamptz",
            )?,
            environment: field("environment", &text, "text or varchar")?,
            event_context: field(
                "event_context",
                &[oid::JSON, oid::JSONB, oid::TEXT],
                "json, jsonb or text",
            )?,
            metadata_version: field(
                "metadata_version",
                &[oid::INT8, oid::INT4, oid::INT2],
                "bigint, integer or smallint",
            )?,
            sentry_trace: match names.contains(&"sentry_trace") {
                true => Some(field("sentry_trace", &text, "text or varchar")?),
                false => None,
            },
        })
    }

    /// Turns one inserted tuple into an event row, borrowing its strings; `(commit_lsn,
    /// tx_seq, xid)` say where it came from (see [`EventRow`]).
    pub fn row<'a>(
        &self,
        tuple: &'a TupleData,
        (commit_lsn, tx_seq, xid): (u64, u32, u64),
    ) -> Result<EventRow<'a>, RowError> {
        Ok(EventRow {
            event_id: uuid(value(tuple, self.event_id, "event_id")?)?,
            event_type: text(value(tuple, self.event_type, "event_type")?),
            event_date_time_us: timestamp(value(tuple, self.event_date_time, "event_date_time")?)?,
            environment: text(value(tuple, self.environment, "environment")?),
            event_context: json(value(tuple, self.event_context, "event_context")?),
            metadata_version: version(value(tuple, self.metadata_version, "metadata_version")?)?,
            commit_lsn,
            tx_seq,
            xid,
            sentry_trace: self
                .sentry_trace
                .and_then(|f| match tuple.columns.get(f.index) {
                    Some(Column::Text(b) | Column::Binary(b)) => Some(b.as_ref()),
                    _ => None,
                }),
        })
    }
}

/// The outbox table's columns as `pg_attribute` lists them, for reading its rows with SQL and
/// turning them into event rows through the same [`OutboxLayout`] as the live stream: every
/// column is read as text (with `TimeZone` UTC and `DateStyle` ISO, as on the replication
/// connection), so a column type the live path accepts is read the same way here.
pub struct SqlLayout {
    layout: Result<OutboxLayout, crate::outbox::SchemaError>,
    columns: Vec<(String, u32)>,
    /// `o."col"::text, ...` in column order, then the row's xid8 ([`ROW_XID8`]) as text.
    pub select: String,
}

impl SqlLayout {
    /// Reads the columns of the table `table` (a quoted, qualified name: the outbox table, or
    /// one that was) and sets the connection's `TimeZone` and `DateStyle`.
    pub async fn read_table(client: &Client, table: &str) -> Result<SqlLayout, PgError> {
        client
            .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'")
            .await
            .map_err(PgError::query("session settings"))?;
        let rows = client
            .query(
                "SELECT attname::text, atttypid::int8 FROM pg_attribute
                  WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                  ORDER BY attnum",
                &[&table],
            )
            .await
            .map_err(PgError::query("outbox columns"))?;
        let columns: Vec<(String, u32)> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u32))
            .collect();
        let named: Vec<(&str, u32)> = columns.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let layout = OutboxLayout::from_columns(table, &named);
        let select = columns
            .iter()
            .map(|(n, _)| format!("o.{}::text", quote_pg_ident(n)))
            .chain([format!("({ROW_XID8})::text")])
            .collect::<Vec<_>>()
            .join(", ");
        Ok(SqlLayout {
            layout,
            columns,
            select,
        })
    }

    /// One row selected with [`SqlLayout::select`] as an event row, or why it cannot be one
    /// with its values by column name.
    pub fn event(
        &self,
        row: &tokio_postgres::Row,
    ) -> Result<OwnedEventRow, (String, serde_json::Value)> {
        let columns = (0..self.columns.len())
            .map(|i| match row.try_get::<_, Option<String>>(i) {
                Ok(Some(text)) => pgoutput::Column::Text(text.into()),
                _ => pgoutput::Column::Null,
            })
            .collect();
        let tuple = pgoutput::TupleData { columns };
        let xid = row
            .try_get::<_, Option<String>>(self.columns.len())
            .ok()
            .flatten()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        let mapped = match &self.layout {
            Ok(layout) => layout
                .row(&tuple, (0, 0, xid))
                .map(|r| OwnedEventRow::new(&r))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        mapped.map_err(|why| (why, crate::outbox::raw_values(&self.columns, &tuple)))
    }

    /// The id an unmappable row is kept under: its event_id when readable, else one derived
    /// from its values.
    pub fn fallback_id(&self, raw: &serde_json::Value) -> [u8; 16] {
        if let Some(id) = raw
            .get("event_id")
            .and_then(|v| v.as_str())
            .and_then(parse_uuid)
        {
            return id;
        }
        let text = raw.to_string();
        let (a, b) = (fnv1a(text.as_bytes()), fnv1a(format!("{text}#").as_bytes()));
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&a.to_be_bytes());
        id[8..].copy_from_slice(&b.to_be_bytes());
        id
    }
}

/// A tuple's values by column name (columns as name and type oid), as JSON strings: text as it
/// is, binary values of text, json, uuid and integer types read, others as `\\x` hex; NULL as
/// null. What a dead letter keeps of a row that cannot become an event row.
pub fn raw_values(columns: &[(String, u32)], tuple: &TupleData) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (i, column) in tuple.columns.iter().enumerate() {
        let (name, type_oid) = columns
            .get(i)
            .cloned()
            .unwrap_or_else(|| (format!("column_{i}"), 0));
        let value = match column {
            Column::Text(b) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
            Column::Binary(b) => serde_json::Value::String(binary_text(type_oid, b)),
            Column::Null => serde_json::Value::Null,
            Column::UnchangedToast => serde_json::Value::String("(unchanged toast)".into()),
        };
        out.insert(name, value);
    }
    serde_json::Value::Object(out)
}

/// A binary value as text, for people reading a dead letter.
fn binary_text(type_oid: u32, bytes: &[u8]) -> String {
    let hex = || {
        format!(
            "\\x{}",
            bytes.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )
    };
    let utf8 = |b: &[u8]| std::str::from_utf8(b).map(str::to_string).ok();
    let value = match type_oid {
        oid::TEXT | oid::VARCHAR | oid::JSON => utf8(bytes),
        oid::JSONB => bytes.split_first().and_then(|(_, rest)| utf8(rest)),
        oid::UUID => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|id| crate::event::uuid_text(&id)),
        oid::INT2 | oid::INT4 | oid::INT8 => match bytes.len() {
            2 => <[u8; 2]>::try_from(bytes)
                .ok()
                .map(|b| i16::from_be_bytes(b).to_string()),
            4 => <[u8; 4]>::try_from(bytes)
                .ok()
                .map(|b| i32::from_be_bytes(b).to_string()),
            8 => <[u8; 8]>::try_from(bytes)
                .ok()
                .map(|b| i64::from_be_bytes(b).to_string()),
            _ => None,
        },
        _ => None,
    };
    value.unwrap_or_else(hex)
}

/// The event id of a row that cannot become an event row: its `event_id` column when that
/// reads as a UUID, else one made of its WAL position (commit LSN, `ffffffff`, position), so
/// that the dead letter still has a key of its own.
pub fn fallback_event_id(
    columns: &[(String, u32)],
    tuple: &TupleData,
    commit_lsn: u64,
    tx_seq: u32,
) -> [u8; 16] {
    let from_column = columns
        .iter()
        .position(|(n, _)| n == "event_id")
        .and_then(|i| {
            let (binary, bytes) = match tuple.columns.get(i)? {
                Column::Text(b) => (false, b.as_ref()),
                Column::Binary(b) => (true, b.as_ref()),
                _ => return None,
            };
            uuid(Value {
                column: "event_id",
                type_oid: oid::UUID,
                binary,
                bytes,
            })
            .ok()
        });
    from_column.unwrap_or_else(|| {
        let mut id = [0xffu8; 16];
        id[..8].copy_from_slice(&commit_lsn.to_be_bytes());
        id[12..].copy_from_slice(&tx_seq.to_be_bytes());
        id
    })
}

/// A column's raw value with what is needed to read it.
struct Value<'a> {
    column: &'static str,
    type_oid: u32,
    binary: bool,
    bytes: &'a [u8],
}

fn value<'a>(
    tuple: &'a TupleData,
    field: Field,
    column: &'static str,
) -> Result<Value<'a>, RowError> {
    let (binary, bytes) = match tuple.columns.get(field.index) {
        Some(Column::Text(b)) => (false, b.as_ref()),
        Some(Column::Binary(b)) => (true, b.as_ref()),
        Some(Column::Null) => return Err(problem(column, "is NULL")),
        Some(Column::UnchangedToast) => {
            return Err(problem(column, "was sent as an unchanged TOAST value"));
        }
        None => return Err(problem(column, "is missing from the tuple")),
    };
    Ok(Value {
        column,
        type_oid: field.type_oid,
        binary,
        bytes,
    })
}

fn problem(column: &'static str, problem: impl Into<String>) -> RowError {
    RowError {
        column,
        problem: problem.into(),
    }
}

fn text(v: Value<'_>) -> &[u8] {
    v.bytes
}

fn json(v: Value<'_>) -> &[u8] {
    // jsonb's binary format is a version byte (1) followed by the JSON text.
    match (v.type_oid, v.binary, v.bytes.split_first()) {
        (oid::JSONB, true, Some((1, rest))) => rest,
        _ => v.bytes,
    }
}

fn uuid(v: Value<'_>) -> Result<[u8; 16], RowError> {
    if v.binary {
        return v
            .bytes
            .try_into()
            .map_err(|_| problem(v.column, format!("uuid has {} bytes", v.bytes.len())));
    }
    let hex: Vec<u8> = v.bytes.iter().copied().filter(|b| *b != b'-').collect();
    let mut out = [0u8; 16];
    if hex.len() != 32 {
        return Err(problem(v.column, "is not a uuid"));
    }
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| problem(v.column, "is not a uuid"))?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| problem(v.column, "is not a uuid"))?;
    }
    Ok(out)
}

fn version(v: Value<'_>) -> Result<u64, RowError> {
    let n: i64 = if v.binary {
        match v.bytes.len() {
            8 => i64::from_be_bytes(v.bytes.try_into().expect("8 bytes")),
            4 => i32::from_be_bytes(v.bytes.try_into().expect("4 bytes")).into(),
            2 => i16::from_be_bytes(v.bytes.try_into().expect("2 bytes")).into(),
            n => return Err(problem(v.column, format!("integer has {n} bytes"))),
        }
    } else {
        std::str::from_utf8(v.bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| problem(v.column, "is not an integer"))?
    };
    u64::try_from(n).map_err(|_| problem(v.column, format!("{n} is negative")))
}

fn timestamp(v: Value<'_>) -> Result<i64, RowError> {
    if v.binary {
        let us = i64::from_be_bytes(
            v.bytes
                .try_into()
                .map_err(|_| problem(v.column, "timestamp is not 8 bytes"))?,
        );
        if us == i64::MAX || us == i64::MIN {
            return Err(problem(v.column, "is infinity"));
        }
        return us
            .checked_add(pgoutput::PG_EPOCH_UNIX_MICROS)
            .ok_or_else(|| problem(v.column, "is out of range"));
    }
    parse_text_timestamp(v.bytes).ok_or_else(|| {
        problem(
            v.column,
            format!(
                "{:?} is not an ISO timestamp in UTC",
                String::from_utf8_lossy(v.bytes)
            ),
        )
    })
}

/// Parses `YYYY-MM-DD HH:MM:SS[.ffffff][+00[:00]]` (DateStyle ISO, TimeZone UTC, which the relay
/// sets on its replication connection) into Unix microseconds.
fn parse_text_timestamp(raw: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(raw).ok()?;
    let (date, rest) = s.split_once(' ')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (time, offset_s) = match rest.find(['+', '-']) {
        Some(i) => (&rest[..i], offset_seconds(&rest[i..])?),
        None => (rest, 0),
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let (h, mi, sec): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = format!("{frac:0<6}").parse().ok()?;
    let days = days_from_civil(y, m, day)?;
    Some(((days * 86_400 + h * 3_600 + mi * 60 + sec - offset_s) * 1_000_000) + micros)
}

fn offset_seconds(s: &str) -> Option<i64> {
    let sign = if s.starts_with('-') { -1 } else { 1 };
    let mut parts = s[1..].split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    let sec: i64 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    Some(sign * (h * 3_600 + m * 60 + sec))
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> Option<i64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_timestamps() {
        assert_eq!(parse_text_timestamp(b"1970-01-01 00:00:00+00"), Some(0));
        assert_eq!(
            parse_text_timestamp(b"2000-01-01 00:00:00.5+00"),
            Some(pgoutput::PG_EPOCH_UNIX_MICROS + 500_000)
        );
        assert_eq!(
            parse_text_timestamp(b"2026-11-25 03:23:21.123456+00"),
            Some(1_795_577_001_123_456)
        );
        assert_eq!(
            parse_text_timestamp(b"2026-11-25 05:23:21.123456+02"),
            Some(1_795_577_001_123_456)
        );
        assert_eq!(parse_text_timestamp(b"infinity"), None);
    }
}
