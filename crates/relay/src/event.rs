//! The row model: one outbox event as the relay ships it, borrowed from the decoded WAL message
//! ([`EventRow`]) or owned ([`OwnedEventRow`], for rows that outlive it: re-sends, replay, dead
//! letters), its RowBinary encoding, and the ids and hashes around it.

/// One event as it goes to ClickHouse, borrowing its strings from the decoded WAL message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRow<'a> {
    /// The UUID's 16 bytes in their usual (big-endian) order.
    pub event_id: [u8; 16],
    pub event_type: &'a [u8],
    /// Microseconds since the Unix epoch, UTC.
    pub event_date_time_us: i64,
    pub environment: &'a [u8],
    /// The JSON text exactly as published.
    pub event_context: &'a [u8],
    pub metadata_version: u64,
    /// Commit LSN of the PostgreSQL transaction that published the event.
    pub commit_lsn: u64,
    /// Position of the event within that transaction, from 0.
    pub tx_seq: u32,
    /// The 64-bit id (xid8) of the PostgreSQL transaction that published the event: its
    /// top-level transaction on the live stream, the outbox row's `xmin` when read with SQL
    /// (replay); 0 when not known. `verify` tells with it which rows a PostgreSQL snapshot sees
    /// ([`widen_xid`]).
    pub xid: u64,
    /// The publisher's trace, as recorded in the optional `sentry_trace` outbox column.
    pub sentry_trace: Option<&'a [u8]>,
}

impl EventRow<'_> {
    /// Appends the row in ClickHouse's RowBinary format, in [`COLUMNS`] order.
    pub fn encode(&self, out: &mut Vec<u8>) {
        // UUID: two little-endian u64 halves, high half first.
        out.extend(self.event_id[..8].iter().rev());
        out.extend(self.event_id[8..].iter().rev());
        put_string(out, self.event_type);
        out.extend_from_slice(&self.event_date_time_us.to_le_bytes());
        put_string(out, self.environment);
        put_string(out, self.event_context);
        out.extend_from_slice(&self.metadata_version.to_le_bytes());
        out.extend_from_slice(&self.commit_lsn.to_le_bytes());
        out.extend_from_slice(&self.tx_seq.to_le_bytes());
        out.extend_from_slice(&self.xid.to_le_bytes());
        put_string(out, self.trace_id().unwrap_or_default().as_bytes());
    }

    /// The 32-hex-digit trace id of [`Self::sentry_trace`], from either a `sentry-trace` value
    /// (`trace-span[-sampled]`) or a W3C `traceparent` (`00-trace-span-flags`).
    pub fn trace_id(&self) -> Option<&str> {
        let text = std::str::from_utf8(self.sentry_trace?).ok()?.trim();
        let text = text.strip_prefix("00-").unwrap_or(text);
        let id = text.get(..32)?;
        id.bytes().all(|b| b.is_ascii_hexdigit()).then_some(id)
    }

    /// The trace as a `sentry-trace` header value, for continuing it.
    pub fn sentry_trace_header(&self) -> Option<String> {
        let text = std::str::from_utf8(self.sentry_trace?).ok()?.trim();
        match text.strip_prefix("00-") {
            // traceparent: 00-trace-span-flags -> trace-span-sampled
            Some(rest) => {
                let mut parts = rest.split('-');
                let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
                let sampled = u8::from_str_radix(flags, 16).ok()? & 1;
                Some(format!("{trace}-{span}-{sampled}"))
            }
            None => Some(text.to_string()),
        }
    }
}

/// An [`EventRow`] that owns its strings: kept in memory by careful batches, dead letters and
/// replay, where rows outlive the WAL message they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedEventRow {
    pub event_id: [u8; 16],
    pub event_type: Vec<u8>,
    pub event_date_time_us: i64,
    pub environment: Vec<u8>,
    pub event_context: Vec<u8>,
    pub metadata_version: u64,
    pub commit_lsn: u64,
    pub tx_seq: u32,
    pub xid: u64,
    pub sentry_trace: Option<Vec<u8>>,
}

impl OwnedEventRow {
    pub fn new(row: &EventRow<'_>) -> OwnedEventRow {
        OwnedEventRow {
            event_id: row.event_id,
            event_type: row.event_type.to_vec(),
            event_date_time_us: row.event_date_time_us,
            environment: row.environment.to_vec(),
            event_context: row.event_context.to_vec(),
            metadata_version: row.metadata_version,
            commit_lsn: row.commit_lsn,
            tx_seq: row.tx_seq,
            xid: row.xid,
            sentry_trace: row.sentry_trace.map(<[u8]>::to_vec),
        }
    }

    pub fn as_row(&self) -> EventRow<'_> {
        EventRow {
            event_id: self.event_id,
            event_type: &self.event_type,
            event_date_time_us: self.event_date_time_us,
            environment: &self.environment,
            event_context: &self.event_context,
            metadata_version: self.metadata_version,
            commit_lsn: self.commit_lsn,
            tx_seq: self.tx_seq,
            xid: self.xid,
            sentry_trace: self.sentry_trace.as_deref(),
        }
    }

    /// The event id in its usual text form.
    pub fn event_id_text(&self) -> String {
        uuid_text(&self.event_id)
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` for 16 bytes.
pub fn uuid_text(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A RowBinary string: its length as a LEB128 varint, then its bytes.
pub(crate) fn put_string(out: &mut Vec<u8>, value: &[u8]) {
    let mut len = value.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(value);
}

/// 16 bytes from `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The 64-bit transaction id (xid8) whose low 32 bits are `xid`, nearest to `reference` (a
/// recent xid8 of the same server): PostgreSQL keeps every live transaction within 2^31 of the
/// next one, and the replication stream sends 32-bit xids.
pub fn widen_xid(xid: u32, reference: u64) -> u64 {
    let candidate = (reference & !0xffff_ffff) | u64::from(xid);
    if candidate > reference.saturating_add(1 << 31) && candidate >= 1 << 32 {
        candidate - (1 << 32)
    } else if candidate.saturating_add(1 << 31) < reference {
        candidate + (1 << 32)
    } else {
        candidate
    }
}

/// FNV-1a, for content-derived deduplication tokens.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_rowbinary() {
        let row = EventRow {
            event_id: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            event_type: b"a",
            event_date_time_us: 1,
            environment: b"",
            event_context: &[b'x'; 200],
            metadata_version: 2,
            commit_lsn: 3,
            tx_seq: 4,
            xid: 5,
            sentry_trace: None,
        };
        let mut out = Vec::new();
        row.encode(&mut out);
        assert_eq!(
            &out[..16],
            &[7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8]
        );
        assert_eq!(&out[16..18], &[1, b'a']);
        assert_eq!(&out[18..26], &1i64.to_le_bytes());
        assert_eq!(out[26], 0);
        assert_eq!(&out[27..29], &[200 | 0x80, 1]);
        assert_eq!(&out[29 + 200 + 8 + 8 + 4..][..8], &5u64.to_le_bytes());
        assert_eq!(out.len(), 29 + 200 + 8 + 8 + 4 + 8 + 1);
    }

    #[test]
    fn trace_ids() {
        let sentry = b"771a43a4192642f0b136d5159a501700-a1b2c3d4e5f60718-1";
        let w3c = b"00-771a43a4192642f0b136d5159a501700-a1b2c3d4e5f60718-01";
        for raw in [&sentry[..], &w3c[..]] {
            let row = EventRow {
                event_id: [0; 16],
                event_type: b"",
                event_date_time_us: 0,
                environment: b"",
                event_context: b"{}",
                metadata_version: 1,
                commit_lsn: 0,
                tx_seq: 0,
                xid: 0,
                sentry_trace: Some(raw),
            };
            assert_eq!(row.trace_id(), Some("771a43a4192642f0b136d5159a501700"));
            assert_eq!(
                row.sentry_trace_header().as_deref(),
                Some("771a43a4192642f0b136d5159a501700-a1b2c3d4e5f60718-1")
            );
        }
    }

    #[test]
    fn xids_widen_to_the_nearest_epoch() {
        let e = 7u64 << 32;
        assert_eq!(widen_xid(100, e + 200), e + 100);
        assert_eq!(widen_xid(300, e + 200), e + 300);
        // Just past the epoch's start, an xid from the end of the previous epoch.
        assert_eq!(widen_xid(u32::MAX - 5, e + 10), e - 6);
        // Near the epoch's end, an xid of the next epoch.
        assert_eq!(widen_xid(3, e + u64::from(u32::MAX) - 2), e + (1 << 32) + 3);
        // Epoch 0 never goes below zero.
        assert_eq!(widen_xid(u32::MAX, 10), u64::from(u32::MAX));
        for (x, r) in [(5u32, 3u64), (1 << 31, 1), (0, (1 << 33) + 5)] {
            let w = widen_xid(x, r);
            assert_eq!(w as u32, x);
            assert!(w.abs_diff(r) <= 1 << 31 || r < 1 << 31, "{x} {r} {w}");
        }
    }

    #[test]
    fn uuids_round_trip() {
        let id = [
            0x55, 0x0e, 0x84, 0x00, 0xe2, 0x9b, 0x41, 0xd4, 0xa7, 0x16, 0x44, 0x66, 0x55, 0x44,
            0x00, 0x00,
        ];
        let text = crate::event::uuid_text(&id);
        assert_eq!(text, "550e8400-e29b-41d4-a716-446655440000");
        assert_eq!(parse_uuid(&text), Some(id));
        assert_eq!(parse_uuid("550e8400"), None);
        assert_eq!(parse_uuid("zz0e8400-e29b-41d4-a716-446655440000"), None);
    }
}
