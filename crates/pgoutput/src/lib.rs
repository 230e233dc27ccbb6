//! A pure decoder for PostgreSQL's `pgoutput` logical replication messages: bytes in, messages
//! out. No I/O, no global state, and no panics on any input.
//!
//! Each XLogData payload of a `START_REPLICATION ... LOGICAL` stream using `pgoutput` is one
//! message. Values and names are zero-copy [`Bytes`] slices of the input.
//!
//! ```
//! use bytes::Bytes;
//! use pgoutput::{Lsn, Message};
//!
//! // Begin: final LSN 0/16B3748, commit time, xid 731.
//! let mut raw = vec![b'B'];
//! raw.extend_from_slice(&0x16B3748u64.to_be_bytes());
//! raw.extend_from_slice(&0i64.to_be_bytes());
//! raw.extend_from_slice(&731u32.to_be_bytes());
//! match pgoutput::decode(Bytes::from(raw)).unwrap() {
//!     Message::Begin(begin) => {
//!         assert_eq!(begin.final_lsn, Lsn(0x16B3748));
//!         assert_eq!(begin.final_lsn.to_string(), "0/16B3748");
//!         assert_eq!(begin.xid, 731);
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// A WAL position (log sequence number), shown as PostgreSQL shows it: `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// The text is not an LSN in `X/X` hex form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an LSN (expected hex X/X, e.g. 16/B374D848)")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// PostgreSQL timestamp (microseconds since 2000-01-01) to Unix microseconds.
pub fn pg_to_unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS)
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message tag {0:?}")]
    UnknownMessage(char),
    #[error("{message} message truncated at byte {offset} while reading {field}")]
    Truncated {
        message: &'static str,
        field: &'static str,
        offset: usize,
    },
    #[error("{message} message: {field} at byte {offset} is invalid: {problem}")]
    Invalid {
        message: &'static str,
        field: &'static str,
        offset: usize,
        problem: &'static str,
    },
    #[error("{message} message has {extra} unexpected trailing bytes")]
    TrailingBytes { message: &'static str, extra: usize },
}

/// One pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    /// Two-phase commit messages (protocol 3): tag and raw body, not interpreted.
    TwoPhase {
        tag: u8,
        body: Bytes,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01.
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: where streaming resumes after this transaction.
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Set inside a streamed transaction block (protocol 2+).
    pub xid: Option<u32>,
    pub id: u32,
    namespace: Bytes,
    name: Bytes,
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// Schema name (empty means `pg_catalog`, as pgoutput sends it).
    pub fn namespace(&self) -> Result<&str, DecodeError> {
        utf8(&self.namespace, "Relation", "namespace")
    }

    pub fn name(&self) -> Result<&str, DecodeError> {
        utf8(&self.name, "Relation", "name")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
    name: Bytes,
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl RelationColumn {
    pub fn name(&self) -> Result<&str, DecodeError> {
        utf8(&self.name, "Relation", "column name")
    }

    pub fn is_key(&self) -> bool {
        self.flags & 1 == 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    pub xid: Option<u32>,
    pub id: u32,
    pub namespace: Bytes,
    pub name: Bytes,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    Null,
    /// An unchanged TOASTed value (updates only): the value is not sent.
    UnchangedToast,
    /// Text format value.
    Text(Bytes),
    /// Binary format value (`binary 'true'`).
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TupleData {
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub tuple: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub xid: Option<u32>,
    pub relation_id: u32,
    /// The old key ('K') or old row ('O'), when the replica identity sends one.
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    Key(TupleData),
    Row(TupleData),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub xid: Option<u32>,
    /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
    pub options: u8,
    pub relation_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub xid: Option<u32>,
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: Bytes,
    pub content: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    pub first_segment: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
    /// Protocol 4 with parallel streaming only.
    pub abort_lsn: Option<Lsn>,
    pub abort_time: Option<i64>,
}

/// Decodes one message outside a streamed transaction block.
pub fn decode(data: Bytes) -> Result<Message, DecodeError> {
    decode_message(data, false)
}

/// A decoder that follows Stream Start / Stream Stop, so that changes inside a streamed block
/// (protocol 2+), which carry a leading xid, are read correctly. Still pure: no I/O.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Whether the last message opened a streamed block that is not closed yet.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    pub fn decode(&mut self, data: Bytes) -> Result<Message, DecodeError> {
        let message = decode_message(data, self.in_stream)?;
        match message {
            Message::StreamStart(_) => self.in_stream = true,
            Message::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }
}

fn decode_message(data: Bytes, in_stream: bool) -> Result<Message, DecodeError> {
    let tag = *data.first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        data,
        pos: 1,
        message: name_of(tag),
    };
    let xid = |r: &mut Reader| -> Result<Option<u32>, DecodeError> {
        if in_stream {
            r.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    };
    let message = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn("final_lsn")?,
            commit_time: r.i64("commit_time")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit_lsn")?,
            end_lsn: r.lsn("end_lsn")?,
            commit_time: r.i64("commit_time")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: r.lsn("commit_lsn")?,
            name: r.cstr("name")?,
        }),
        b'R' => {
            let xid = xid(&mut r)?;
            relation(&mut r, xid)?
        }
        b'Y' => Message::Type(Type {
            xid: xid(&mut r)?,
            id: r.u32("type id")?,
            namespace: r.cstr("namespace")?,
            name: r.cstr("name")?,
        }),
        b'I' => {
            let xid = xid(&mut r)?;
            let relation_id = r.u32("relation id")?;
            r.expect(b'N', "tuple marker")?;
            Message::Insert(Insert {
                xid,
                relation_id,
                tuple: r.tuple()?,
            })
        }
        b'U' => {
            let xid = xid(&mut r)?;
            update(&mut r, xid)?
        }
        b'D' => {
            let xid = xid(&mut r)?;
            let relation_id = r.u32("relation id")?;
            Message::Delete(Delete {
                xid,
                relation_id,
                old: r.old_tuple()?,
            })
        }
        b'T' => {
            let xid = xid(&mut r)?;
            truncate(&mut r, xid)?
        }
        b'M' => {
            let xid = xid(&mut r)?;
            logical_message(&mut r, xid)?
        }
        b'S' => Message::StreamStart(StreamStart {
            xid: r.u32("xid")?,
            first_segment: r.u8("first segment")? == 1,
        }),
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit_lsn")?,
            end_lsn: r.lsn("end_lsn")?,
            commit_time: r.i64("commit_time")?,
        }),
        b'A' => stream_abort(&mut r)?,
        b'b' | b'P' | b'K' | b'r' | b'p' => {
            let body = r.data.slice(1..);
            r.pos = r.data.len();
            Message::TwoPhase { tag, body }
        }
        other => return Err(DecodeError::UnknownMessage(char::from(other))),
    };
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes {
            message: r.message,
            extra: r.remaining(),
        });
    }
    Ok(message)
}

/// A Relation message's body (after its tag and, in a stream, its xid).
fn relation(r: &mut Reader, xid: Option<u32>) -> Result<Message, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.cstr("namespace")?;
    let name = r.cstr("name")?;
    let replica_identity = r.u8("replica identity")?;
    let n = r.u16("column count")?;
    let mut columns = Vec::with_capacity(usize::from(n).min(r.remaining()));
    for _ in 0..n {
        columns.push(RelationColumn {
            flags: r.u8("column flags")?,
            name: r.cstr("column name")?,
            type_oid: r.u32("column type")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Message::Relation(Relation {
        xid,
        id,
        namespace,
        name,
        replica_identity,
        columns,
    }))
}

/// An Update message's body.
fn update(r: &mut Reader, xid: Option<u32>) -> Result<Message, DecodeError> {
    let relation_id = r.u32("relation id")?;
    let old = match r.peek("tuple marker")? {
        b'K' | b'O' => Some(r.old_tuple()?),
        _ => None,
    };
    r.expect(b'N', "new tuple marker")?;
    Ok(Message::Update(Update {
        xid,
        relation_id,
        old,
        new: r.tuple()?,
    }))
}

/// A Truncate message's body.
fn truncate(r: &mut Reader, xid: Option<u32>) -> Result<Message, DecodeError> {
    let n = r.u32("relation count")?;
    let options = r.u8("options")?;
    let mut relation_ids = Vec::with_capacity((n as usize).min(r.remaining() / 4));
    for _ in 0..n {
        relation_ids.push(r.u32("relation id")?);
    }
    Ok(Message::Truncate(Truncate {
        xid,
        options,
        relation_ids,
    }))
}

/// A logical decoding message's body (`pg_logical_emit_message`).
fn logical_message(r: &mut Reader, xid: Option<u32>) -> Result<Message, DecodeError> {
    let flags = r.u8("flags")?;
    let lsn = r.lsn("lsn")?;
    let prefix = r.cstr("prefix")?;
    let len = r.u32("content length")? as usize;
    Ok(Message::Message(LogicalMessage {
        xid,
        transactional: flags & 1 == 1,
        lsn,
        prefix,
        content: r.bytes(len, "content")?,
    }))
}

/// A Stream Abort message's body (its abort LSN and time from protocol 4 on).
fn stream_abort(r: &mut Reader) -> Result<Message, DecodeError> {
    let xid = r.u32("xid")?;
    let subxid = r.u32("subxid")?;
    let (abort_lsn, abort_time) = if r.remaining() > 0 {
        (Some(r.lsn("abort_lsn")?), Some(r.i64("abort_time")?))
    } else {
        (None, None)
    };
    Ok(Message::StreamAbort(StreamAbort {
        xid,
        subxid,
        abort_lsn,
        abort_time,
    }))
}

fn name_of(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => "pgoutput",
    }
}

fn utf8<'a>(
    bytes: &'a Bytes,
    message: &'static str,
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|e| DecodeError::Invalid {
        message,
        field,
        offset: e.valid_up_to(),
        problem: "not UTF-8",
    })
}

/// A cursor over one message; every read checks the length first.
struct Reader {
    data: Bytes,
    pos: usize,
    message: &'static str,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                message: self.message,
                field,
                offset: self.pos,
            });
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.data[start..self.pos])
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.take(n, field)?;
        Ok(self.data.slice(self.pos - n..self.pos))
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn peek(&self, field: &'static str) -> Result<u8, DecodeError> {
        self.data
            .get(self.pos)
            .copied()
            .ok_or(DecodeError::Truncated {
                message: self.message,
                field,
                offset: self.pos,
            })
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array(field)?)))
    }

    fn expect(&mut self, want: u8, field: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos;
        if self.u8(field)? != want {
            return Err(DecodeError::Invalid {
                message: self.message,
                field,
                offset,
                problem: "unexpected marker",
            });
        }
        Ok(())
    }

    /// A NUL-terminated string, without its NUL.
    fn cstr(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let rest = &self.data[self.pos..];
        let len = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated {
                message: self.message,
                field,
                offset: self.data.len(),
            })?;
        let value = self.data.slice(self.pos..self.pos + len);
        self.pos += len + 1;
        Ok(value)
    }

    fn old_tuple(&mut self) -> Result<OldTuple, DecodeError> {
        let offset = self.pos;
        match self.u8("old tuple marker")? {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Row(self.tuple()?)),
            _ => Err(DecodeError::Invalid {
                message: self.message,
                field: "old tuple marker",
                offset,
                problem: "expected 'K' or 'O'",
            }),
        }
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let n = self.u16("column count")?;
        // Each column takes at least one byte: never reserve more than the input can hold.
        let mut columns = Vec::with_capacity(usize::from(n).min(self.remaining()));
        for _ in 0..n {
            let offset = self.pos;
            let column = match self.u8("column kind")? {
                b'n' => Column::Null,
                b'u' => Column::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32("column length")?;
                    let len = usize::try_from(len).map_err(|_| DecodeError::Invalid {
                        message: self.message,
                        field: "column length",
                        offset: self.pos - 4,
                        problem: "negative",
                    })?;
                    let value = self.bytes(len, "column value")?;
                    if kind == b't' {
                        Column::Text(value)
                    } else {
                        Column::Binary(value)
                    }
                }
                _ => {
                    return Err(DecodeError::Invalid {
                        message: self.message,
                        field: "column kind",
                        offset,
                        problem: "expected 'n', 'u', 't' or 'b'",
                    });
                }
            };
            columns.push(column);
        }
        Ok(TupleData { columns })
    }
}
