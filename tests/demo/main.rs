//! `make demo`: a local PostgreSQL and ClickHouse, `outbox-relay setup` and `run`, a few thousand
//! events published in many transactions the way an application would, and what landed.
//! Everything it starts is stopped (by pid) before it exits.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use harness::{ClickHouseServer, PgServer, PgVersion};

const TRANSACTIONS: usize = 500;
const EVENT_TYPES: [&str; 4] = [
    "user.login",
    "order.created",
    "payment.failed",
    "audit.export",
];

fn main() -> Result<()> {
    let version = *PgVersion::available()
        .last()
        .context("no PostgreSQL found: run `bash tools/bootstrap.sh`")?;
    println!("== starting PostgreSQL {version:?} and ClickHouse (local, 127.0.0.1)");
    let pg = PgServer::start(version)?;
    let ch = ClickHouseServer::start()?;
    pg.create_database("app")?;
    let metrics_addr = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    );
    let env = [
        ("RELAY_POSTGRES_URL", pg.url("app")),
        ("RELAY_CLICKHOUSE_URL", ch.url("analytics")),
        ("RELAY_ENVIRONMENT", "demo".to_string()),
        ("RELAY_BATCH_MAX_WAIT_MS", "500".to_string()),
        ("RELAY_METRICS_ADDR", metrics_addr.clone()),
    ];
    let relay = |args: &[&str]| {
        let mut cmd = Command::new(relay_bin());
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd
    };

    println!("== outbox-relay setup");
    let status = relay(&["setup"]).status()?;
    if !status.success() {
        bail!("outbox-relay setup failed ({status})");
    }

    std::fs::create_dir_all(".demo")?;
    let log_path = PathBuf::from(".demo/relay.log");
    println!("== outbox-relay run (log: {})", log_path.display());
    let mut child = relay(&["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;

    let published = publish(&pg.url("app"))?;
    println!("== published {published} events in {TRANSACTIONS} transactions (+1 rolled back)");

    let started = Instant::now();
    let count = || -> Result<u64> {
        Ok(ch
            .query("SELECT count() FROM analytics.event_log")?
            .trim()
            .parse()?)
    };
    while count()? < published as u64 {
        if started.elapsed() > Duration::from_secs(60) {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = child.kill();
            bail!(
                "only {} of {published} events arrived in 60 s; relay log:\n{log}",
                count()?
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "== all {published} events in ClickHouse {} ms after the last commit\n",
        started.elapsed().as_millis()
    );

    println!("-- events per type (ClickHouse)");
    print!(
        "{}",
        ch.query(
            "SELECT event_type, count() AS events, uniqExact(event_id) AS distinct_ids, \
                    uniqExact(commit_lsn) AS transactions \
               FROM analytics.event_log GROUP BY event_type ORDER BY event_type \
             FORMAT PrettyCompactMonoBlock"
        )?
    );
    println!("-- inserts ClickHouse received (one per batch)");
    print!(
        "{}",
        ch.query(
            "SELECT max(max_block_number) AS inserts, sum(rows) AS rows FROM system.parts \
              WHERE database = 'analytics' AND table = 'event_log' AND active \
             FORMAT PrettyCompactMonoBlock"
        )?
    );
    println!("-- a sample row");
    print!(
        "{}",
        ch.query(
            "SELECT * FROM analytics.event_log ORDER BY commit_lsn, tx_seq LIMIT 1 \
             FORMAT Vertical"
        )?
    );
    // The relay reports its position every status interval: wait for the slot to catch up.
    let caught_up = || -> Result<bool> {
        let out = relay(&["status", "--json"]).output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(status["caught_up"] == true)
    };
    let started = Instant::now();
    while !caught_up()? && started.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("-- outbox-relay status");
    let status = relay(&["status"]).output()?;
    print!("{}", String::from_utf8_lossy(&status.stdout));

    println!("-- a few of http://{metrics_addr}/metrics");
    let metrics = ureq::get(&format!("http://{metrics_addr}/metrics"))
        .call()?
        .into_string()?;
    for line in metrics.lines().filter(|l| {
        [
            "outbox_relay_events_shipped_total ",
            "outbox_relay_batches_shipped_total ",
            "outbox_relay_lag_bytes ",
            "outbox_relay_lag_seconds ",
            "outbox_relay_slot_active ",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    }) {
        println!("{line}");
    }

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let exit = child.wait()?;
    println!("== relay stopped ({exit}); stopping PostgreSQL and ClickHouse");
    if !exit.success() {
        bail!("the relay did not exit cleanly on SIGTERM: {exit}");
    }
    Ok(())
}

/// Publishes like an application: each transaction changes business data and inserts its
/// events with the plain INSERT, committed together.
fn publish(url: &str) -> Result<usize> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, total numeric)")
            .await?;
        let mut published = 0;
        for i in 0..TRANSACTIONS {
            let tx = client.transaction().await?;
            tx.execute("INSERT INTO orders (total) VALUES ($1::text::numeric)", &[&format!("{i}.50")])
                .await?;
            for j in 0..10 {
                let event_type = EVENT_TYPES[(i + j) % EVENT_TYPES.len()];
                let context = serde_json::json!({"order": i, "line": j, "source": "demo"});
                tx.execute(
                    "INSERT INTO event_outbox (event_type, event_context) VALUES ($1, $2::text::json)",
                    &[&event_type, &context.to_string()],
                )
                .await?;
                published += 1;
            }
            tx.commit().await?;
        }
        // A rolled-back transaction: its event never reaches ClickHouse.
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO event_outbox (event_type, event_context) VALUES ('never.shipped', '{}')",
            &[],
        )
        .await?;
        tx.rollback().await?;
        anyhow::Ok(published)
    })
}

fn relay_bin() -> PathBuf {
    std::env::var("OUTBOX_RELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/outbox-relay"
            ))
        })
}
