//! Settings the relay must honour exactly or refuse at start, and the small failures that used to
//! pass silently, against real servers: names of every legal kind, `status`'s exit codes and
//! JSON, unknown `RELAY_*` variables, concurrent setups, a hot standby whose metrics address is
//! taken, and the purge of a backdated event.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Fixture, http_get, relay_bin, stderr, wait_until};
use harness::PgVersion;

const LONG: Duration = Duration::from_secs(120);

scenarios!(
    each_postgres: [
        names_of_every_kind_ship_exactly_once,
        status_exit_codes_and_strict_json,
        concurrent_setups_all_succeed,
        backdated_event_is_kept_for_the_retention_and_replayed,
    ],
    clickhouse_only: [
        hot_standby_with_the_metrics_address_taken_waits_and_takes_over,
    ],
);

/// xorshift; the seed comes from RELAY_TEST_SEED or the clock, and is printed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("RELAY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
            | 1;
        println!("name seed {seed} (rerun with RELAY_TEST_SEED={seed})");
        Rng(seed)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    /// A name PostgreSQL and ClickHouse accept quoted: mixed case, quotes, spaces, punctuation,
    /// Unicode, 1 to 63 bytes; every third one as long as it can be.
    fn name(&mut self) -> String {
        self.name_up_to(63)
    }

    /// As [`Rng::name`], at most `limit` bytes (ClickHouse's names share one file-name budget).
    fn name_up_to(&mut self, limit: usize) -> String {
        const CHARS: &[&str] = &[
            "a", "Z", "q", "M", "0", "7", "_", " ", "\"", "'", "`", "\\", ",", ".", "-", "$", "é",
            "Ü", "✓", "事", "🦀",
        ];
        let max = if self.below(3) == 0 {
            limit
        } else {
            1 + self.below(limit)
        };
        let mut name = String::new();
        loop {
            let c = CHARS[self.below(CHARS.len())];
            if name.len() + c.len() > max {
                break;
            }
            name.push_str(c);
        }
        if name.is_empty() { "x".into() } else { name }
    }
}

fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn ch_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One set of names for the relay.
#[derive(Debug, Clone)]
struct Names {
    publication: String,
    schema: String,
    table: String,
    ch_database: String,
    ch_table: String,
}

/// Each variant: setup, run, 60 events in 7 transactions; ClickHouse holds each exactly once.
fn names_of_every_kind_ship_exactly_once(v: PgVersion) {
    let mut f = Fixture::start(v, &[]);
    let base_url = f.env_value("RELAY_CLICKHOUSE_URL");
    let ch_base = base_url.rsplit_once('/').unwrap().0.to_string();
    let mut rng = Rng::new();
    let a60 = "a".repeat(60);
    let fixed = [
        Names {
            // What a configuration parser might take for something else, or trim.
            publication: " [list] ".into(),
            schema: " \"q\" ".into(),
            table: "true".into(),
            ch_database: " 42".into(),
            ch_table: " `".into(),
        },
        Names {
            publication: "UpPub".into(),
            schema: "public".into(),
            table: "MixedCase".into(),
            ch_database: "Analytics".into(),
            ch_table: "EventLog".into(),
        },
        Names {
            publication: "with \"quote\" and 'apostrophe', comma".into(),
            schema: "Sch ema".into(),
            table: "out box \"x\"".into(),
            ch_database: "db with space".into(),
            ch_table: "tab`le \\ 'q'".into(),
        },
        Names {
            publication: "p".repeat(63),
            schema: "public".into(),
            table: a60.clone(),
            ch_database: "d".repeat(63),
            ch_table: "t".repeat(63),
        },
        Names {
            publication: "Zoë ✓ 事件".into(),
            schema: "事件".into(),
            table: "b".repeat(63),
            ch_database: "Zoë".into(),
            ch_table: "事件 ✓".into(),
        },
        Names {
            // 62 bytes of two-byte characters: the derived names' cut lands mid-character.
            publication: "é".repeat(31),
            schema: "public".into(),
            table: "é".repeat(31),
            // ClickHouse's longest file name: 186 + 18 = 204.
            ch_database: "é".repeat(31),
            ch_table: "é".repeat(3),
        },
    ];
    let mut variants: Vec<Names> = fixed.to_vec();
    let mut seen: HashSet<String> = variants.iter().map(|n| n.publication.clone()).collect();
    while variants.len() < fixed.len() + 10 {
        let names = Names {
            publication: rng.name(),
            schema: rng.name(),
            table: rng.name(),
            ch_database: rng.name_up_to(30),
            ch_table: rng.name_up_to(30),
        };
        // Each variant has its own publication (and table): a second setup would keep the first.
        if seen.insert(names.publication.clone()) && seen.insert(names.table.clone()) {
            variants.push(names);
        }
    }
    for (i, names) in variants.iter().enumerate() {
        println!("variant {i}: {names:?}");
        f.set_env("RELAY_SLOT", &format!("{}_{i}", f.slot));
        f.set_env("RELAY_PUBLICATION", &names.publication);
        f.set_env("RELAY_OUTBOX_SCHEMA", &names.schema);
        f.set_env("RELAY_OUTBOX_TABLE", &names.table);
        f.set_env("RELAY_CLICKHOUSE_TABLE", &names.ch_table);
        f.set_env(
            "RELAY_CLICKHOUSE_URL",
            &format!("{ch_base}/{}", percent_encode(&names.ch_database)),
        );
        let file_name = relay::config::clickhouse_file_name_len(&names.ch_database)
            + relay::config::clickhouse_file_name_len(&names.ch_table);
        let out = f.relay(&["setup"]);
        if file_name > relay::config::CLICKHOUSE_MAX_FILE_NAME {
            // Too long for ClickHouse's file names: refused before anything is done.
            assert_eq!(out.status.code(), Some(2), "variant {i}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("RELAY_CLICKHOUSE_TABLE"),
                "{}",
                stderr(&out)
            );
            println!("variant {i}: refused (ClickHouse file name of {file_name} bytes)");
            continue;
        }
        if names.ch_database == "." || names.ch_database == ".." {
            // A URL path cannot hold them (they would become `default`): refused.
            assert_eq!(out.status.code(), Some(2), "variant {i}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("RELAY_CLICKHOUSE_URL"),
                "{}",
                stderr(&out)
            );
            println!("variant {i}: refused (database {:?})", names.ch_database);
            continue;
        }
        assert!(
            out.status.success(),
            "variant {i} {names:?}: setup failed: {}",
            stderr(&out)
        );
        let relay = f.spawn_relay();
        let table = format!("{}.{}", pg_ident(&names.schema), pg_ident(&names.table));
        for tx in 0..7 {
            f.sql(&format!(
                "INSERT INTO {table} (event_type, event_context)
                 SELECT 'v{i}', json_build_object('n', g) FROM generate_series(1, {}) g",
                if tx < 6 { 9 } else { 6 }
            ));
        }
        let ch_table = format!(
            "{}.{}",
            ch_ident(&names.ch_database),
            ch_ident(&names.ch_table)
        );
        let counts = || {
            f.ch.query(&format!(
                "SELECT count(), uniqExact(event_id) FROM {ch_table} FORMAT TSV"
            ))
            .map(|body| body.trim().to_string())
            .unwrap_or_else(|e| format!("{e:#}"))
        };
        let arrived = wait_until(LONG, || counts() == "60\t60");
        assert!(
            arrived,
            "variant {i} {names:?}: ClickHouse (count, uniqExact) = {:?}, expected 60 each\n{:?}\n{}",
            counts(),
            f.ch.query("SELECT database, name, hex(database), hex(name) FROM system.tables WHERE database NOT IN ('system', 'INFORMATION_SCHEMA', 'information_schema') FORMAT TSV"),
            relay.log()
        );
        let status = relay.terminate();
        assert!(status.success(), "variant {i}: relay exit {status:?}");
        assert_eq!(counts(), "60\t60", "variant {i} {names:?}: after stop");
    }

    // What PostgreSQL (or ClickHouse) cannot hold is refused when the configuration is read,
    // naming the setting.
    for (key, value) in [
        ("RELAY_PUBLICATION", "event_outbox_pub"),
        ("RELAY_OUTBOX_SCHEMA", "public"),
        ("RELAY_OUTBOX_TABLE", "event_outbox"),
        ("RELAY_CLICKHOUSE_TABLE", "event_log"),
        ("RELAY_CLICKHOUSE_URL", base_url.as_str()),
    ] {
        f.set_env(key, value);
    }
    let long_db_url = format!("{ch_base}/{}", percent_encode(&"é".repeat(31)));
    for (variable, value, extra) in [
        ("RELAY_SLOT", "UpSlot".to_string(), None),
        ("RELAY_SLOT", "slot-1".to_string(), None),
        ("RELAY_SLOT", "s".repeat(64), None),
        ("RELAY_PUBLICATION", "p".repeat(64), None),
        ("RELAY_OUTBOX_TABLE", "é".repeat(32), None),
        ("RELAY_OUTBOX_SCHEMA", "a\tb".to_string(), None),
        (
            "RELAY_CLICKHOUSE_TABLE",
            "é".repeat(4),
            Some(("RELAY_CLICKHOUSE_URL", long_db_url.as_str())),
        ),
    ] {
        let mut cmd = Command::new(relay_bin());
        cmd.arg("setup").env_clear();
        cmd.envs(f.env.iter().map(|(k, v)| (k, v)));
        cmd.env(variable, &value);
        if let Some((k, v)) = extra {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run outbox-relay");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{variable}={value:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(variable),
            "{variable}={value:?}: {}",
            stderr(&out)
        );
    }
}

/// Fails on a duplicate key anywhere in a JSON document (serde_json keeps the last silently).
struct StrictJson;

impl<'de> serde::Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StrictJson;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StrictJson, A::Error> {
                let mut keys = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !keys.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                    }
                    map.next_value::<StrictJson>()?;
                }
                Ok(StrictJson)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StrictJson, A::Error> {
                while seq.next_element::<StrictJson>()?.is_some() {}
                Ok(StrictJson)
            }
            fn visit_bool<E>(self, _: bool) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_i64<E>(self, _: i64) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_u64<E>(self, _: u64) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_f64<E>(self, _: f64) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_str<E>(self, _: &str) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
            fn visit_unit<E>(self) -> Result<StrictJson, E> {
                Ok(StrictJson)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `status --json` once parsed strictly, with its exit code.
fn status_json(f: &Fixture) -> (Option<i32>, serde_json::Value) {
    let out = f.relay(&["status", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if let Err(e) = serde_json::from_str::<StrictJson>(&text) {
        panic!(
            "status --json is not strict JSON ({e}):\n{text}\n{}",
            stderr(&out)
        );
    }
    (out.status.code(), serde_json::from_str(&text).unwrap())
}

/// 0 when all is well, 4 when ClickHouse does not answer, 3 when the slot is missing, 2 for an
/// unknown RELAY_ variable; the JSON never repeats a key.
fn status_exit_codes_and_strict_json(v: PgVersion) {
    let mut f = Fixture::start(v, &[]);
    let (code, json) = status_json(&f);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["slot"], f.slot.as_str());
    assert_eq!(json["exists"], true);

    let good_url = f.env_value("RELAY_CLICKHOUSE_URL");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    f.set_env(
        "RELAY_CLICKHOUSE_URL",
        &format!("http://default:@127.0.0.1:{port}/x"),
    );
    let (code, json) = status_json(&f);
    assert_eq!(code, Some(4), "ClickHouse unreachable: {json}");
    assert_eq!(json["clickhouse_reachable"], false);

    f.set_env("RELAY_CLICKHOUSE_URL", &good_url);
    f.sql(&format!("SELECT pg_drop_replication_slot('{}')", f.slot));
    let (code, json) = status_json(&f);
    assert_eq!(code, Some(3), "slot missing: {json}");
    assert_eq!(json["exists"], false);

    f.set_env("RELAY_BATCH_MAXROWS", "5");
    let out = f.relay(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("RELAY_BATCH_MAXROWS"), "{message}");
    assert!(message.contains("RELAY_BATCH_MAX_ROWS"), "{message}");
}

/// Three setups at once, on fresh names each round: all succeed, and the relay then ships.
fn concurrent_setups_all_succeed(v: PgVersion) {
    let mut f = Fixture::start(v, &[]);
    for round in 0..3 {
        f.set_env("RELAY_SLOT", &format!("{}_c{round}", f.slot));
        f.set_env("RELAY_PUBLICATION", &format!("conc_pub_{round}"));
        f.set_env("RELAY_OUTBOX_SCHEMA", &format!("conc_schema_{round}"));
        f.set_env("RELAY_OUTBOX_TABLE", &format!("conc_outbox_{round}"));
        let mut children = Vec::new();
        for _ in 0..3 {
            let mut cmd = Command::new(relay_bin());
            cmd.arg("setup")
                .env_clear()
                .envs(f.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            children.push(cmd.spawn().expect("spawn setup"));
        }
        for child in children {
            let out = child.wait_with_output().expect("wait for setup");
            assert!(
                out.status.success(),
                "round {round}: a concurrent setup failed: {}",
                stderr(&out)
            );
        }
        let relay = f.spawn_relay();
        f.sql(&format!(
            "INSERT INTO conc_schema_{round}.conc_outbox_{round} (event_type, event_context)
             SELECT 'c', json_build_object('n', g) FROM generate_series(1, 10) g"
        ));
        let expected = 10 * (round + 1);
        f.wait_for_rows(expected, LONG, Some(&relay));
        relay.terminate();
        assert_eq!(f.ch_unique(), expected);
        assert_eq!(f.ch_count(), expected);
    }
}

/// A second relay started with the first one's metrics address keeps running (and says why),
/// waits for the slot, and takes over when the first is killed; every event arrives once.
fn hot_standby_with_the_metrics_address_taken_waits_and_takes_over(v: PgVersion) {
    let mut f = Fixture::start(v, &[]);
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap().to_string();
    drop(probe);
    f.set_env("RELAY_METRICS_ADDR", &addr);
    // `warning` used to be read as a target name and silence every log line.
    f.set_env("RELAY_LOG_LEVEL", "warning");
    let first = f.spawn_relay();
    assert!(
        wait_until(LONG, || http_get(&addr, "/healthz").0 == 200),
        "{}",
        first.log()
    );
    // The first holds the slot before the second starts (else the second may take it first).
    let slot_active = format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}' AND active",
        f.slot
    );
    assert!(
        wait_until(LONG, || f.sql(&slot_active).trim() == "1"),
        "the first relay never took the slot\n{}",
        first.log()
    );
    let mut second = f.spawn_relay();
    let waiting = wait_until(LONG, || {
        let log = second.log();
        !second.is_running()
            || (log.contains("cannot listen on metrics_addr") && log.contains("is in use"))
    });
    assert!(
        waiting,
        "the standby does not say it waits\n{}",
        second.log()
    );
    assert!(second.is_running(), "the standby exited\n{}", second.log());
    f.publish(100, 10, "first");
    f.wait_for_rows(100, LONG, Some(&first));
    assert!(second.is_running(), "the standby exited\n{}", second.log());

    first.kill9();
    f.publish(100, 10, "second");
    f.wait_for_rows(200, LONG, Some(&second));
    assert!(
        wait_until(LONG, || http_get(&addr, "/healthz").0 == 200),
        "the standby never took the metrics address\n{}",
        second.log()
    );
    assert_eq!(f.ch_count(), 200);
    assert_eq!(f.ch_unique(), 200);
    assert_eq!(f.ch_ids().0, f.pg_ids());
}

/// An event the publisher backdated stays in the outbox as long as any other (the purge goes by
/// commit time, from the relay's checkpoints), and a replay re-ships it.
fn backdated_event_is_kept_for_the_retention_and_replayed(v: PgVersion) {
    let f = Fixture::start(
        v,
        &[
            ("RELAY_OUTBOX_RETENTION_HOURS", "1"),
            ("RELAY_PURGE_INTERVAL_S", "1"),
        ],
    );
    let relay = f.spawn_relay();
    f.sql("INSERT INTO event_outbox (event_type, event_context) VALUES ('old', '{}')");
    f.wait_for_rows(1, LONG, Some(&relay));
    assert!(wait_until(LONG, || {
        f.sql("SELECT count(*) FROM event_outbox_checkpoints")
            .trim()
            != "0"
    }));
    // That batch was shipped two hours ago, as far as the relay's records go.
    f.sql("UPDATE event_outbox_checkpoints SET recorded_at = recorded_at - interval '2 hours'");
    f.sql(
        "INSERT INTO event_outbox (event_type, event_date_time, event_context)
         VALUES ('backdated', '2001-01-01 00:00:00+00', '{}')",
    );
    f.wait_for_rows(2, LONG, Some(&relay));
    let count = |t: &str| {
        f.sql(&format!(
            "SELECT count(*) FROM event_outbox WHERE event_type = '{t}'"
        ))
        .trim()
        .to_string()
    };
    // The purge runs: the event committed before the old checkpoint goes ...
    assert!(
        wait_until(LONG, || count("old") == "0"),
        "the purge never deleted the row committed before the retention\n{}",
        relay.log()
    );
    // ... the backdated one, committed after it, stays.
    assert_eq!(count("backdated"), "1", "the backdated event was purged");

    // ClickHouse loses it; a replay finds it in the outbox and ships it again.
    f.ch("DELETE FROM {db}.event_log WHERE event_type = 'backdated'");
    assert_eq!(f.ch_count(), 1);
    let out = f.relay(&["replay", "--from-lsn", "0/0", "--json"]);
    assert!(out.status.success(), "replay: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["shipped"], 1, "{report}");
    let backdated = f.ch("SELECT count() FROM {db}.event_log WHERE event_type = 'backdated'");
    assert_eq!(backdated.trim(), "1");
}
