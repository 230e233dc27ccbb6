//! A publisher's trace, recorded in the outbox row, reaches ClickHouse (`trace_id`) and the
//! shipped batch's Sentry transaction (the real sentry SDK, with a transport that keeps the
//! envelopes in memory). The relay runs in-process here so the test can own Sentry's transport.

mod common;

use std::time::Duration;

use common::Fixture;
use harness::PgVersion;
use sentry::protocol::{Context, EnvelopeItem, Value};

const TRACE: &str = "771a43a4192642f0b136d5159a501700";

#[test]
fn batch_transaction_continues_the_publishers_trace() {
    let f = Fixture::start(PgVersion::V15, &[]);
    f.sql(&format!(
        "INSERT INTO event_outbox (event_type, event_context, sentry_trace)
         VALUES ('traced', '{{}}', '{TRACE}-a1b2c3d4e5f60718-1');
         INSERT INTO event_outbox (event_type, event_context) VALUES ('untraced', '{{}}');"
    ));
    let mut config = relay::Config::default();
    config.postgres_url = f.pg.url(&f.db);
    config.clickhouse_url = f.ch.url(&f.ch_db);
    config.slot = f.slot.clone();
    config.batch_max_wait_ms = 100;
    config.status_interval_ms = 100;
    config.metrics_addr = String::new();
    let config = config.validated().expect("a valid configuration");
    let options = sentry::ClientOptions::new().traces_sample_rate(1.0);
    let envelopes = sentry::test::with_captured_envelopes_options(
        || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let relay = relay::Relay::new(config).unwrap();
                let (stop, stopped) = tokio::sync::watch::channel(false);
                let run = relay.run(stopped);
                tokio::pin!(run);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                while f.ch_count() < 2 {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "events did not arrive"
                    );
                    tokio::select! {
                        result = &mut run => panic!("relay stopped: {result:?}"),
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
                stop.send(true).unwrap();
                run.await.unwrap();
            });
        },
        options,
    );

    assert_eq!(
        f.ch("SELECT event_type, trace_id FROM {db}.event_log ORDER BY event_type FORMAT TSV"),
        format!("traced\t{TRACE}\nuntraced\t\n")
    );

    let transactions: Vec<_> = envelopes
        .iter()
        .flat_map(|e| e.items())
        .filter_map(|item| match item {
            EnvelopeItem::Transaction(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert!(!transactions.is_empty(), "no Sentry transaction captured");
    let batch = transactions
        .iter()
        .find(|t| t.name.as_deref() == Some("outbox-relay batch"))
        .expect("a batch transaction");
    let Some(Context::Trace(trace)) = batch.contexts.get("trace") else {
        panic!("no trace context: {batch:?}");
    };
    assert_eq!(
        trace.trace_id.to_string(),
        TRACE,
        "continues the publisher's trace"
    );
    assert_eq!(
        trace
            .data
            .get("linked_trace_ids")
            .or_else(|| batch.extra.get("linked_trace_ids")),
        Some(&Value::from(vec![TRACE.to_string()])),
        "{batch:?}"
    );
    let ops: Vec<&str> = batch
        .spans
        .iter()
        .map(|s| s.op.as_deref().unwrap_or(""))
        .collect();
    for op in ["relay.decode", "db.clickhouse.insert", "relay.confirm"] {
        assert!(ops.contains(&op), "span {op} missing: {ops:?}");
    }
}
