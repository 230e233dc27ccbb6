//! `outbox-relay`: a thin command line over the `relay` library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use relay::Config;
use relay::config::LogFormat;
use tokio::sync::watch;

// Standard output and error that a closed pipe does not crash: `outbox-relay verify | head -1`
// or `status | grep -q ...` close the pipe early, and std's println! panics on the broken pipe
// (exit 101 and a backtrace). These shadow std's macros in this file: output stops quietly at
// the first failed write and the command finishes with its own exit code (docs/operations.md,
// "Exit codes"). SIGPIPE stays ignored, so a server connection closed under a write is an error
// the relay reports, not a silent death.
macro_rules! println {
    () => {
        $crate::write_line(false, format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::write_line(false, format_args!($($arg)*))
    };
}
macro_rules! eprintln {
    ($($arg:tt)*) => {
        $crate::write_line(true, format_args!($($arg)*))
    };
}

/// Writes a line on stdout (`stderr` false) or stderr; after a write fails (the reader is
/// gone), that stream is left alone for the rest of the run.
fn write_line(stderr: bool, line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    static CLOSED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
    let closed = &CLOSED[usize::from(stderr)];
    if closed.load(Ordering::Relaxed) {
        return;
    }
    let written = if stderr {
        let mut err = std::io::stderr().lock();
        err.write_fmt(line).and_then(|()| err.write_all(b"\n"))
    } else {
        let mut out = std::io::stdout().lock();
        out.write_fmt(line).and_then(|()| out.write_all(b"\n"))
    };
    if written.is_err() {
        closed.store(true, Ordering::Relaxed);
    }
}

/// Streams a transactional outbox from a PostgreSQL pgoutput slot into ClickHouse.
///
/// Settings come from the TOML file given with --config (or RELAY_CONFIG) and from RELAY_*
/// environment variables, which win; see docs/configuration.md.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short, env = "RELAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the outbox table, publication, slot and ClickHouse table if missing (idempotent).
    /// Exit 6 when the publication exists without the outbox (the fix is printed); 1 when an
    /// existing ClickHouse table's columns or engine do not fit.
    Setup {
        /// Print the DDL for both servers instead of applying it.
        #[arg(long)]
        print_sql: bool,
        /// Create the slot again although the relay shipped from it before (it was dropped or
        /// lost): events committed in between are then re-shipped with `replay` (setup prints
        /// the command). See docs/operations.md, "Lost slot".
        #[arg(long)]
        recreate_slot: bool,
    },
    /// Stream the outbox into ClickHouse until SIGTERM/SIGINT (exit 0; 5 when ClickHouse did not
    /// accept the batch in hand within shutdown_timeout_ms: it was not confirmed, nothing is lost).
    Run,
    /// Ask a running relay's /readyz (at metrics_addr): exit 0 when ready, 1 otherwise. For
    /// container health checks where no HTTP client is installed.
    Health,
    /// Show the slot's position and lag, and whether ClickHouse answers. Exit 0 when both are
    /// fine, 3 when the slot is missing or lost, 6 when the publication does not cover the outbox, 4 when ClickHouse does not answer.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Re-ship every event committed after a saved LSN that ClickHouse does not hold (after
    /// ClickHouse lost data). Runs beside the live relay; safe to repeat.
    Replay {
        /// The saved position, e.g. a confirmed_flush_lsn or a checkpoint's confirmed_lsn;
        /// 0/0 re-ships everything the outbox still holds. A position past the server's WAL or
        /// before the oldest checkpoint exits 2, naming the current position.
        #[arg(long)]
        from_lsn: pgoutput::Lsn,
        /// Count what would be re-shipped; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for the live relay to pass replay's starting point.
        #[arg(long, default_value_t = 300)]
        wait_s: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Prove that ClickHouse holds every event the outbox holds exactly once and as published
    /// (for this outbox's source), window by window, and list the exact missing, extra and
    /// altered event ids.
    ///
    /// Exit codes: 0 complete, 1 differences found (after --repair: found, missing ones
    /// re-shipped; run again to confirm), 2 could not check (a server, the configuration, a bad
    /// --from-lsn, the relay not passing the snapshot within --wait-s, a migration kept it from
    /// locking the outbox that long).
    Verify {
        /// Only events with an event_date_time from this time on: RFC 3339 or an age like 6h;
        /// default: every event the outbox holds, whatever its time.
        #[arg(long)]
        since: Option<String>,
        /// Only events committed after this WAL position (as `replay --from-lsn` chooses
        /// them); a position past the server's WAL is refused.
        #[arg(long)]
        from_lsn: Option<pgoutput::Lsn>,
        /// End of the range (exclusive): RFC 3339 or an age; default: no end.
        #[arg(long)]
        until: Option<String>,
        /// Window width in seconds (default: verify_window_s).
        #[arg(long)]
        window_s: Option<u64>,
        /// Re-ship the missing events through the replay path (exactly once); extras are only
        /// reported, never deleted.
        #[arg(long)]
        repair: bool,
        /// How long to wait for the live relay to pass verify's snapshot (and to try again
        /// after giving way to a migration that waited on verify's locks).
        #[arg(long, default_value_t = 60)]
        wait_s: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Events ClickHouse refused, kept in PostgreSQL with the error.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Show the dead letters with their errors.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters to ClickHouse again (after fixing them with UPDATE); those accepted
    /// are marked shipped (kept until the outbox retention, then purged). Exit 7 when
    /// ClickHouse refused any of them again.
    Retry {
        /// Only this event.
        #[arg(long)]
        event_id: Option<String>,
    },
    /// Delete dead letters without shipping them.
    Purge {
        /// Only this event.
        #[arg(long, required_unless_present = "all")]
        event_id: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("outbox-relay: configuration error: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    init_logging(&config);
    let _sentry = init_sentry(&config);
    // One thread: the relay is one pipeline whose steps hand each message to the next; on one
    // thread that is a queue push, not a cross-thread wake-up (futex) per message.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let format = config.log_format;
    if let Command::Verify { .. } = &cli.command {
        return match runtime.block_on(verify(cli.command, config)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                report_fatal(format, "verify could not check", &e);
                ExitCode::from(2)
            }
        };
    }
    let code = match runtime.block_on(execute(cli.command, config)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report_fatal(format, "", &e);
            ExitCode::from(exit_code(&e))
        }
    };
    // Tasks still waiting on a server (a hung ClickHouse after a bounded shutdown) must not
    // hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// The error and its causes, `a: b: c` ([`relay::error_chain`]).
fn error_chain(e: &anyhow::Error) -> String {
    relay::error_chain(e.as_ref())
}

/// Reports the error a command stops on, once: an ERROR event with `log_format = "json"` (one
/// record for the log pipeline), else a plain `outbox-relay: ...` line (multi-line messages,
/// such as a table's problems, stay readable).
fn report_fatal(format: LogFormat, what: &str, e: &anyhow::Error) {
    let message = error_chain(e);
    match format {
        LogFormat::Json if what.is_empty() => {
            tracing::error!(error = message, "outbox-relay failed")
        }
        LogFormat::Json => tracing::error!(error = message, "{what}"),
        LogFormat::Pretty if what.is_empty() => eprintln!("outbox-relay: {message}"),
        LogFormat::Pretty => eprintln!("outbox-relay: {what}: {message}"),
    }
}

/// The exit code of a command that failed (docs/operations.md, "Exit codes"): 2 when the input
/// is wrong and nothing was done (a position the server cannot have), 6 when `setup` finds the
/// publication not covering the outbox, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    use relay::ops::setup::SetupError;
    for cause in e.chain() {
        if cause
            .downcast_ref::<relay::ops::positions::PositionError>()
            .is_some_and(|p| p.is_bad_input())
        {
            return EXIT_BAD_INPUT;
        }
        if let Some(SetupError::Uncovered(_)) = cause.downcast_ref::<SetupError>() {
            return relay::ops::status::EXIT_PUBLICATION_PROBLEM;
        }
    }
    1
}

/// A command's input cannot be right (a setting, an argument, a position past the server's
/// WAL): nothing was done.
const EXIT_BAD_INPUT: u8 = 2;

/// `dead-letters retry`: ClickHouse refused some dead letters again (they stay dead letters;
/// `dead-letters list` shows why).
const EXIT_REFUSED_AGAIN: u8 = 7;

/// `run` stopped on SIGTERM/SIGINT but ClickHouse had not accepted the last batch within
/// `shutdown_timeout_ms`: nothing past ClickHouse was confirmed; the next start ships it.
const EXIT_SHUTDOWN_TIMEOUT: u8 = 5;

/// Runs the command; `Ok` carries the exit code (docs/operations.md, "Exit codes").
async fn execute(command: Command, config: Config) -> anyhow::Result<u8> {
    match command {
        Command::Setup {
            print_sql: true, ..
        } => {
            println!(
                "-- PostgreSQL\n{}",
                relay::store::schema::postgres_ddl(&config)
            );
            println!(
                "-- ClickHouse\n{}",
                relay::store::schema::clickhouse_ddl(&config)
            );
            Ok(0)
        }
        Command::Setup {
            print_sql: false,
            recreate_slot,
        } => {
            let report = relay::ops::setup::setup(&config, recreate_slot)
                .await
                .context("setup failed")?;
            if let Some(from) = &report.replay_from {
                println!(
                    "The slot was created again. Events committed since the last checkpoint are \
                     not in its stream: once `outbox-relay run` is streaming, re-ship them with\n  \
                     outbox-relay replay --from-lsn {from}"
                );
            }
            if let Some(note) = &report.failover_note {
                println!("Failover: {note}");
            }
            if !report.coverage_watch {
                println!(
                    "Coverage watch: not installed (creating an event trigger needs a superuser). \
                     Without it, a table swapped in as the outbox and out again between two of \
                     the relay's checks (5 s) is not seen; run `outbox-relay setup` once as a \
                     superuser to install it (docs/guarantees.md)"
                );
            }
            tracing::info!(
                outbox = %format!("{}.{}", config.outbox_schema, config.outbox_table),
                publication = %config.publication,
                slot = %config.slot,
                slot_created = report.slot_created,
                coverage_watch = report.coverage_watch,
                clickhouse_table = %config.clickhouse_table,
                "setup complete"
            );
            Ok(0)
        }
        Command::Run => run(config).await,
        Command::Health => health(&config).await.map(|()| 0),
        Command::Status { json } => {
            let status = relay::ops::status::status(&config)
                .await
                .context("cannot read the slot's status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(status.exit_code())
        }
        Command::Replay {
            from_lsn,
            dry_run,
            wait_s,
            json,
        } => {
            let sink = clickhouse_sink(&config).await?;
            let report = relay::ops::replay::replay(
                &config,
                &sink,
                from_lsn,
                std::time::Duration::from_secs(wait_s),
                dry_run,
            )
            .await
            .context("replay failed")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "replay from {from_lsn}: {} outbox events committed after the checkpoint at {}, \
                     {} already in ClickHouse, {} re-shipped{}, {} dead letters",
                    report.candidates,
                    report
                        .checkpoint_snapshot_lsn
                        .as_deref()
                        .unwrap_or("(whole outbox)"),
                    report.already_there,
                    report.shipped,
                    if dry_run { " (dry run)" } else { "" },
                    report.dead_letters
                );
            }
            Ok(0)
        }
        Command::DeadLetters { action } => dead_letters(&config, action).await,
        Command::Verify { .. } => anyhow::bail!("verify is run by main"),
    }
}

/// `outbox-relay verify`: Ok(true) when complete, Ok(false) when differences were found.
async fn verify(command: Command, config: Config) -> anyhow::Result<bool> {
    use relay::ops::verify::{self, Options};
    let Command::Verify {
        since,
        from_lsn,
        until,
        window_s,
        repair,
        wait_s,
        json,
    } = command
    else {
        anyhow::bail!("not a verify command");
    };
    let now = relay::metrics::unix_now_us();
    let window_s = window_s.unwrap_or(config.verify_window_s);
    anyhow::ensure!(window_s >= 1, "--window-s must be at least 1");
    let time = |flag: &str, text: &Option<String>| -> anyhow::Result<Option<i64>> {
        text.as_deref()
            .map(|t| verify::parse_time(t, now).map_err(|e| anyhow::anyhow!("{flag}: {e}")))
            .transpose()
    };
    // The outbox's CHECK allows times from 1900-01-01 to 2300-01-01.
    let range = match (time("--since", &since)?, time("--until", &until)?) {
        (None, None) => None,
        (from, until) => Some((
            from.unwrap_or(-2_208_988_800_000_000),
            until.unwrap_or(10_413_792_000_000_000),
        )),
    };
    let sink = clickhouse_sink(&config).await?;
    let options = Options {
        range,
        from_lsn,
        window_us: window_s as i64 * 1_000_000,
        wait: std::time::Duration::from_secs(wait_s),
        repair,
    };
    let started = std::time::Instant::now();
    let report = verify::verify(&config, &sink, &options).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(report.complete());
    }
    let what = match (&options.range, &report.proof_start) {
        (Some(_), _) => format!("events from {} to {}", report.from, report.until),
        (None, None) => "every event the outbox holds".to_string(),
        (None, Some(p)) => format!(
            "every event the outbox holds committed after checkpoint {} of {} ({})",
            p.checkpoint_lsn, p.recorded_at, p.why
        ),
    };
    println!(
        "source {}: {what}, in {} windows of {} s: {} outbox events, {} ClickHouse rows, \
         {} missing, {} extra, {} altered ({:.1} s)",
        report.source,
        report.windows,
        report.window_seconds,
        report.outbox_events,
        report.clickhouse_rows,
        report.missing.len(),
        report.extra.len(),
        report.altered.len(),
        started.elapsed().as_secs_f64()
    );
    for w in &report.differing_windows {
        println!(
            "window {} .. {}: {} outbox events, {} ClickHouse rows: {} missing, {} extra, {} \
             altered",
            w.from, w.until, w.outbox_events, w.clickhouse_rows, w.missing, w.extra, w.altered
        );
    }
    for id in &report.missing {
        println!("missing {id}");
    }
    for e in &report.extra {
        println!("extra {} ({} rows, {})", e.event_id, e.rows, e.kind);
    }
    for id in &report.altered {
        println!(
            "altered {id} (ClickHouse holds other content than the outbox: docs/operations.md, \"Verifying completeness\")"
        );
    }
    if report.unlisted > 0 {
        println!(
            "{} more differences are not listed (at most {} missing and {} of each other kind \
             are): run verify again after a repair",
            report.unlisted,
            verify::MAX_MISSING,
            verify::MAX_OTHER
        );
    }
    if report.outside_proof > 0 {
        println!(
            "{} ClickHouse rows of this source belong to events the outbox no longer holds \
             (purged): outside the proof",
            report.outside_proof
        );
    }
    for (source, rows) in &report.other_sources {
        println!("other source {source:?}: {rows} rows (not checked here)");
    }
    if let Some(r) = &report.repair {
        println!(
            "repair: {} missing events re-shipped, {} were there already, {} dead letters; \
             extras and altered events are not touched",
            r.shipped, r.already_there, r.dead_letters
        );
    }
    if report.complete() {
        println!("complete: every outbox event is in ClickHouse exactly once, as published");
    }
    Ok(report.complete())
}

/// The nodes of the ClickHouse cluster, as `status` prints them.
fn print_cluster(c: &relay::sink::ClusterStatus) {
    println!(
        "clickhouse cluster   {}: {} of {} replicas answered",
        c.cluster,
        c.nodes.len(),
        c.replicas
    );
    for n in &c.nodes {
        let delay = n
            .replication_delay_s
            .map(|d| format!(", replication delay {d} s"))
            .unwrap_or_default();
        match &n.engine {
            Some(engine) => println!("  node {}  table {engine}{delay}", n.node),
            None => println!("  node {}  table MISSING: run `outbox-relay setup`", n.node),
        }
    }
}

/// The sink of `replay` and `dead-letters retry`: rows marked with (and checks limited to) this
/// outbox's source, as the live relay writes them.
async fn clickhouse_sink(config: &Config) -> anyhow::Result<relay::sink::ClickHouseSink> {
    let writer = format!("{}-tool", config.slot);
    let sink = relay::sink::ClickHouseSink::from_config(config, &writer);
    let pg = relay::pg::connect(config.postgres()).await?;
    let source = relay::pg::source_identity(&pg, config).await?;
    let sink = sink.with_source(source);
    // Learns the table's shape on a cluster (replicated or not: how rows are counted).
    if sink.cluster().is_some() {
        sink.check_table().await?;
    }
    Ok(sink)
}

/// Runs a `dead-letters` command; `Ok` carries the exit code.
async fn dead_letters(config: &Config, action: DeadLetterAction) -> anyhow::Result<u8> {
    use relay::store::deadletter;
    match action {
        DeadLetterAction::List { json } => {
            let letters = deadletter::list(config)
                .await
                .context("cannot list dead letters")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
                return Ok(0);
            }
            println!("{} dead letters", letters.len());
            for d in &letters {
                println!(
                    "{}  lsn {} seq {}  {}  {}  attempts {}\n    {}",
                    d.event_id,
                    d.commit_lsn,
                    d.tx_seq,
                    d.event_type,
                    d.event_date_time,
                    d.attempts,
                    d.error.lines().next().unwrap_or_default()
                );
            }
        }
        DeadLetterAction::Retry { event_id } => {
            let sink = clickhouse_sink(config).await?;
            let report = deadletter::retry(config, &sink, event_id.as_deref())
                .await
                .context("dead-letter retry failed")?;
            println!(
                "{} shipped, {} were already in ClickHouse, {} refused again (see `dead-letters list`)",
                report.shipped, report.already_there, report.refused
            );
            if report.refused > 0 {
                return Ok(EXIT_REFUSED_AGAIN);
            }
        }
        DeadLetterAction::Purge { event_id, .. } => {
            let n = deadletter::purge(config, event_id.as_deref())
                .await
                .context("dead-letter purge failed")?;
            println!("{n} dead letters deleted");
        }
    }
    Ok(0)
}

async fn run(config: Config) -> anyhow::Result<u8> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    let relay = relay::Relay::new(config.clone())?;
    let http = config
        .metrics_addr()
        .map(|addr| tokio::spawn(serve_metrics(addr, relay.metrics())));
    let check = tokio::spawn(relay::http::check_clickhouse(
        relay.metrics(),
        relay.sink().clone(),
    ));
    let verifier = tokio::spawn(relay::ops::verify::verify_forever(
        config.clone(),
        relay.metrics(),
    ));
    let grace = config.shutdown_timeout();
    let purge = tokio::spawn(relay::ops::purge::purge_forever(config));
    // A graceful stop gets `shutdown_timeout_ms` from the signal on; past it the session is
    // dropped: its open insert is aborted and nothing it did not get accepted is confirmed.
    let mut stop_seen = stop_rx.clone();
    let bound = async move {
        if stop_seen.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    let outcome = tokio::select! {
        result = relay.run(stop_rx) => Some(result),
        () = bound => None,
    };
    purge.abort();
    verifier.abort();
    check.abort();
    if let Some(http) = http {
        http.abort();
    }
    match outcome {
        Some(result) => result.context("the relay stopped").map(|()| 0),
        None => {
            tracing::warn!(
                shutdown_timeout_ms = grace.as_millis() as u64,
                "shutdown_timeout_ms passed before ClickHouse accepted the batch in hand: \
                 exiting without confirming it; the slot stays where ClickHouse is, so the next \
                 start ships it (nothing is lost)"
            );
            Ok(EXIT_SHUTDOWN_TIMEOUT)
        }
    }
}

/// Serves `/metrics`, `/healthz`, `/readyz`. While the address is taken (a hot standby beside
/// the relay it stands in for, on the same host) the relay keeps running without the endpoint,
/// warns, and takes the address as soon as it is free.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: std::sync::Arc<relay::metrics::Metrics>,
) {
    const RETRY: std::time::Duration = std::time::Duration::from_secs(2);
    let mut attempts: u64 = 0;
    loop {
        // The endpoint runs on a thread of its own once bound (relay::http::start).
        match relay::http::start(addr, metrics.clone()) {
            Ok(()) => return,
            Err(e) => {
                // Once, then about once a minute.
                if attempts.is_multiple_of(30) {
                    tracing::warn!(
                        %addr,
                        error = %e,
                        "cannot listen on metrics_addr (RELAY_METRICS_ADDR): /metrics, /healthz \
                         and /readyz are off until it is free (retrying every 2 s); streaming \
                         goes on. Set another address, or empty to turn the endpoint off"
                    );
                }
                attempts += 1;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

async fn health(config: &Config) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = config
        .metrics_addr()
        .context("metrics_addr (RELAY_METRICS_ADDR) is empty: the endpoint is off")?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .context("no answer within 5 s")?
    .with_context(|| format!("cannot reach the relay at {addr}"))?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
    if response.starts_with("HTTP/1.1 200") {
        println!("{body}");
        Ok(())
    } else {
        anyhow::bail!("not ready: {body}")
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop the relay with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn print_status(s: &relay::ops::status::Status) {
    let dash = || "-".to_string();
    println!("primary              {}", s.primary);
    println!("slot                 {}", s.slot);
    match &s.state {
        None => println!("exists               no (run `outbox-relay setup`)"),
        Some(st) => {
            println!(
                "active               {}{}",
                st.active,
                st.active_pid
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default()
            );
            println!(
                "confirmed_flush_lsn  {}",
                st.confirmed_flush_lsn.clone().unwrap_or_else(dash)
            );
            println!(
                "restart_lsn          {}",
                st.restart_lsn.clone().unwrap_or_else(dash)
            );
            println!("current_wal_lsn      {}", st.current_wal_lsn);
            println!(
                "lag_bytes            {}",
                st.lag_bytes.map(|v| v.to_string()).unwrap_or_else(dash)
            );
            println!(
                "retained_wal_bytes   {}",
                st.retained_wal_bytes
                    .map(|v| v.to_string())
                    .unwrap_or_else(dash)
            );
            println!(
                "wal_status           {}",
                st.wal_status.clone().unwrap_or_else(dash)
            );
            println!(
                "failover             {}",
                st.failover.map(|v| v.to_string()).unwrap_or_else(dash)
            );
        }
    }
    println!("caught_up            {}", s.caught_up);
    if let Some(problem) = &s.publication_problem {
        println!("publication          NOT COVERING THE OUTBOX: {problem}");
    }
    if let Some(from) = &s.pending_window_from {
        println!(
            "pending window       from {from}: events PostgreSQL may have skipped, re-shipped by the running relay"
        );
    }
    println!(
        "coverage_watch       {}",
        match s.coverage_watch {
            Some(true) => "installed".to_string(),
            Some(false) => "not installed (a swap in and out between two checks is not seen; \
                            setup as a superuser installs it)"
                .to_string(),
            None => dash(),
        }
    );
    println!(
        "last_checkpoint      {}",
        match (&s.last_checkpoint_lsn, &s.last_checkpoint_at) {
            (Some(lsn), Some(at)) => format!("{lsn} at {at}"),
            _ => dash(),
        }
    );
    println!(
        "dead_letters         {}",
        s.dead_letters.map(|n| n.to_string()).unwrap_or_else(dash)
    );
    match &s.verify {
        None => println!(
            "verified_through     - (no running relay's verifier answered at metrics_addr)"
        ),
        Some(v) => println!(
            "verified_through     {} ({} missing, {} extra events)",
            v.verified_through, v.missing_events, v.extra_events
        ),
    }
    match &s.clickhouse_error {
        None => println!("clickhouse           reachable"),
        Some(e) => println!("clickhouse           UNREACHABLE: {e}"),
    }
    if let Some(c) = &s.clickhouse_cluster {
        print_cluster(c);
    }
    for sb in &s.standbys {
        match &sb.error {
            Some(e) => println!("standby {}  UNREACHABLE: {e}", sb.host),
            None => println!(
                "standby {}  {}: slot {}, synced {}, temporary {}, behind {} bytes{}",
                sb.host,
                if sb.ready_for_failover {
                    "ready for failover".to_string()
                } else {
                    format!("NOT READY for failover ({})", sb.failover_state.name())
                },
                if sb.slot_exists == Some(true) {
                    "present"
                } else {
                    "MISSING"
                },
                sb.synced.map(|v| v.to_string()).unwrap_or_else(dash),
                sb.temporary.map(|v| v.to_string()).unwrap_or_else(dash),
                sb.behind_bytes.map(|v| v.to_string()).unwrap_or_else(dash),
                if sb.problems.is_empty() {
                    String::new()
                } else {
                    format!(": {}", sb.problems.join("; "))
                }
            ),
        }
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|e| {
        eprintln!(
            "outbox-relay: log_level {:?} is not a valid filter ({e}); using info",
            config.log_level
        );
        EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    // A closed stderr must not panic the relay (the layer would report it with eprintln!).
    let fmt = tracing_subscriber::fmt::layer()
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry =
        tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::filter::filter_fn(|m| {
                !is_replication_library_error(m)
            }));
    match config.log_format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
        LogFormat::Pretty => registry.with(fmt).init(),
    }
}

/// The replication library logs its own ERROR ("replication worker terminated with error") for
/// every cut connection, a PostgreSQL restart included; the same error reaches the relay, which
/// logs it once at the right level ("relay session failed ... retrying", or the error it stops
/// on). The library's line is left out so that a routine event is one line.
fn is_replication_library_error(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.target().starts_with("pgwire_replication")
        && *metadata.level() == tracing::Level::ERROR
}

fn init_sentry(config: &Config) -> Option<sentry::ClientInitGuard> {
    let dsn = config.sentry_dsn.as_deref()?;
    let options = sentry::ClientOptions::new()
        .dsn(dsn)
        .maybe_release(sentry::release_name!())
        .traces_sample_rate(config.sentry_traces_sample_rate);
    Some(sentry::init(options))
}
