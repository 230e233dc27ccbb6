//! The decoder on real pgoutput bytes, captured from PostgreSQL 15 by `fixtures/capture.sh`.

use bytes::Bytes;
use pgoutput::{Column, DecodeError, Decoder, Lsn, Message, OldTuple, decode};

struct Captured {
    lsn: Lsn,
    xid: u32,
    data: Bytes,
}

fn load(name: &str) -> Vec<Captured> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let mut parts = line.split(' ');
            let lsn = parts.next().unwrap().parse().unwrap();
            let xid = parts.next().unwrap().parse().unwrap();
            let hex = parts.next().unwrap();
            let data = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>();
            Captured {
                lsn,
                xid,
                data: Bytes::from(data),
            }
        })
        .collect()
}

fn decode_all(name: &str) -> Vec<(Captured, Message)> {
    let mut decoder = Decoder::new();
    load(name)
        .into_iter()
        .map(|c| {
            let m = decoder
                .decode(c.data.clone())
                .unwrap_or_else(|e| panic!("{name} at {}: {e}", c.lsn));
            (c, m)
        })
        .collect()
}

fn text(column: &Column) -> &[u8] {
    match column {
        Column::Text(b) | Column::Binary(b) => b,
        other => panic!("not a value: {other:?}"),
    }
}

/// Outbox inserts: (event_type, tuple) in WAL order.
fn outbox_inserts(messages: &[(Captured, Message)]) -> Vec<Vec<Column>> {
    let outbox = messages
        .iter()
        .find_map(|(_, m)| match m {
            Message::Relation(r) if r.name().unwrap() == "event_outbox" => Some(r.id),
            _ => None,
        })
        .expect("a Relation for event_outbox");
    messages
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Insert(i) if i.relation_id == outbox => Some(i.tuple.columns.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn binary_protocol_1() {
    let messages = decode_all("proto1_binary.hex");
    let relation = messages
        .iter()
        .find_map(|(_, m)| match m {
            Message::Relation(r) if r.name().unwrap() == "event_outbox" => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(relation.namespace().unwrap(), "public");
    let columns: Vec<(&str, u32)> = relation
        .columns
        .iter()
        .map(|c| (c.name().unwrap(), c.type_oid))
        .collect();
    assert_eq!(
        columns,
        [
            ("event_id", 2950),
            ("event_type", 25),
            ("event_date_time", 1184),
            ("environment", 25),
            ("event_context", 114),
            ("metadata_version", 20)
        ]
    );
    assert!(relation.columns[0].is_key());
    assert!(!relation.columns[1].is_key());

    let inserts = outbox_inserts(&messages);
    let types: Vec<&[u8]> = inserts.iter().map(|t| text(&t[1])).collect();
    assert_eq!(types, [&b"user.login"[..], b"", b"kept", b"large"]);
    let first = &inserts[0];
    assert!(first.iter().all(|c| matches!(c, Column::Binary(_))));
    assert_eq!(
        text(&first[0]),
        [
            0x8c, 0x1e, 0x7f, 0x7e, 0x2f, 0x6b, 0x4a, 0x43, 0x9d, 0x5e, 0x0a, 0x1b, 0x2c, 0x3d,
            0x4e, 0x5f
        ]
    );
    // timestamptz: microseconds since 2000-01-01 UTC, big-endian.
    let micros = i64::from_be_bytes(text(&first[2]).try_into().unwrap());
    assert_eq!(pgoutput::pg_to_unix_micros(micros), 1_795_601_472_345_678);
    assert_eq!(text(&first[3]), b"staging");
    // json's binary form is its text, exactly as written.
    assert_eq!(
        std::str::from_utf8(text(&first[4])).unwrap(),
        r#"{"user": {"id": 42, "name": "Zoë ✓"}, "ok": true}"#
    );
    assert_eq!(text(&first[5]), 7i64.to_be_bytes());
    // The TOASTed 5 kB context arrives whole on insert.
    assert!(text(&inserts[3][4]).len() > 5000);
}

#[test]
fn transactions_and_other_messages() {
    let messages = decode_all("proto1_binary.hex");
    let mut open: Option<(u32, Lsn)> = None;
    let mut kinds = String::new();
    for (captured, message) in &messages {
        match message {
            Message::Begin(b) => {
                assert!(open.is_none(), "nested Begin");
                assert_eq!(b.xid, captured.xid);
                open = Some((b.xid, b.final_lsn));
            }
            Message::Commit(c) => {
                let (_, final_lsn) = open.take().expect("Commit without Begin");
                assert_eq!(c.commit_lsn, final_lsn);
                assert!(c.end_lsn > c.commit_lsn);
            }
            Message::Message(m) if !m.transactional => {}
            _ => assert!(open.is_some(), "{message:?} outside a transaction"),
        }
        kinds.push(match message {
            Message::Begin(_) => 'B',
            Message::Commit(_) => 'C',
            Message::Relation(_) => 'R',
            Message::Insert(_) => 'I',
            Message::Update(_) => 'U',
            Message::Delete(_) => 'D',
            Message::Truncate(_) => 'T',
            Message::Message(_) => 'M',
            _ => '?',
        });
    }
    assert_eq!(kinds.matches('B').count(), kinds.matches('C').count());
    assert!(!kinds.contains('?'), "{kinds}");
    // The savepoint's rolled-back insert never appears.
    for (captured, _) in &messages {
        let raw = &captured.data;
        assert!(!raw.windows(11).any(|w| w == b"rolled_back"));
    }
    let update_with_toast = messages.iter().find_map(|(_, m)| match m {
        Message::Update(u) if u.new.columns.contains(&Column::UnchangedToast) => Some(u),
        _ => None,
    });
    let update = update_with_toast.expect("an update leaving a TOASTed value unchanged");
    assert!(
        update.old.is_none(),
        "default replica identity, key unchanged: no old tuple"
    );
    let full = messages.iter().find_map(|(_, m)| match m {
        Message::Update(u) if u.old.is_some() => Some(u),
        _ => None,
    });
    assert!(
        matches!(full.unwrap().old, Some(OldTuple::Row(_))),
        "REPLICA IDENTITY FULL sends the old row"
    );
    let deletes: Vec<&OldTuple> = messages
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Delete(d) => Some(&d.old),
            _ => None,
        })
        .collect();
    assert!(matches!(deletes[0], OldTuple::Row(t) if text(&t.columns[0]) == 1i32.to_be_bytes()));
    assert!(matches!(deletes[1], OldTuple::Key(t) if t.columns[2] == Column::Null));
    let truncate = messages
        .iter()
        .find_map(|(_, m)| match m {
            Message::Truncate(t) => Some(t),
            _ => None,
        })
        .unwrap();
    assert_eq!(truncate.relation_ids.len(), 1);
    let logical: Vec<(bool, &[u8], &[u8])> = messages
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Message(m) => Some((m.transactional, &m.prefix[..], &m.content[..])),
            _ => None,
        })
        .collect();
    assert_eq!(
        logical,
        [
            (true, &b"relay"[..], &b"hello"[..]),
            (false, b"relay", b"non-transactional")
        ]
    );
}

#[test]
fn text_protocol_1() {
    let messages = decode_all("proto1_text.hex");
    let inserts = outbox_inserts(&messages);
    let first = &inserts[0];
    assert!(first.iter().all(|c| matches!(c, Column::Text(_))));
    assert_eq!(text(&first[0]), b"8c1e7f7e-2f6b-4a43-9d5e-0a1b2c3d4e5f");
    assert!(text(&first[2]).starts_with(b"2026-11-25 "));
    assert_eq!(text(&first[5]), b"7");
}

#[test]
fn streamed_transactions_protocol_2() {
    let messages = decode_all("proto2_stream.hex");
    let mut in_block: Option<u32> = None;
    let mut streamed_inserts = 0;
    let (mut commits, mut aborts) = (Vec::new(), Vec::new());
    for (_, message) in &messages {
        match message {
            Message::StreamStart(s) => in_block = Some(s.xid),
            Message::StreamStop => in_block = None,
            Message::Insert(i) => match in_block {
                Some(xid) => {
                    assert_eq!(i.xid, Some(xid), "changes in a block carry its xid");
                    streamed_inserts += 1;
                }
                None => assert_eq!(i.xid, None),
            },
            Message::StreamCommit(c) => {
                assert!(c.end_lsn > c.commit_lsn);
                commits.push(c.xid);
            }
            Message::StreamAbort(a) => {
                assert_eq!(a.xid, a.subxid, "a top-level abort");
                aborts.push(a.xid);
            }
            _ => {}
        }
    }
    assert_eq!(commits.len(), 1);
    assert_eq!(aborts.len(), 1);
    assert_ne!(commits, aborts);
    assert!(streamed_inserts > 1000, "{streamed_inserts}");
    // The plain transaction after the streamed ones decodes without xids.
    assert!(matches!(messages.last().unwrap().1, Message::Commit(_)));
}

/// Every proper prefix of every real message is an error, never a panic.
#[test]
fn truncated_messages_are_errors() {
    for name in ["proto1_binary.hex", "proto1_text.hex"] {
        for captured in load(name) {
            for len in 0..captured.data.len() {
                let prefix = captured.data.slice(..len);
                assert!(
                    decode(prefix).is_err(),
                    "{name} at {}: a {len}-byte prefix decoded",
                    captured.lsn
                );
            }
        }
    }
}

#[test]
fn errors_say_what_and_where() {
    assert_eq!(
        decode(Bytes::from_static(b"Z")),
        Err(DecodeError::UnknownMessage('Z'))
    );
    assert_eq!(decode(Bytes::new()), Err(DecodeError::Empty));
    let insert = load("proto1_binary.hex")
        .into_iter()
        .find(|c| c.data[0] == b'I')
        .unwrap();
    let err = decode(insert.data.slice(..20)).unwrap_err().to_string();
    assert!(err.starts_with("Insert message truncated at byte"), "{err}");
    let mut extra = insert.data.to_vec();
    extra.push(0);
    assert!(matches!(
        decode(Bytes::from(extra)),
        Err(DecodeError::TrailingBytes {
            message: "Insert",
            extra: 1
        })
    ));
}

#[test]
fn lsn_text_form() {
    let lsn: Lsn = "16/B374D848".parse().unwrap();
    assert_eq!(lsn, Lsn(0x16_B374_D848));
    assert_eq!(lsn.to_string(), "16/B374D848");
    assert!("16B374D848".parse::<Lsn>().is_err());
    assert!("x/1".parse::<Lsn>().is_err());
}
