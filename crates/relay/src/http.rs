//! The HTTP endpoint: `/metrics` (OpenMetrics or Prometheus text, as the scraper's `Accept`
//! asks: [`Format`]), `/healthz` (the process is alive) and `/readyz`
//! (a replication session is streaming and ClickHouse answered recently).
//!
//! Served by hyper on a thread and runtime of its own, so that no request (or flood of them)
//! takes time from the replication loop, and bounded: at most [`MAX_CONNECTIONS`] connections at
//! once (more are answered 503 and closed at once), each must send its request head within
//! [`HEADER_READ_TIMEOUT`] and is closed after one request or [`CONNECTION_TIMEOUT`]. Every answer
//! comes from [`Metrics`] in memory: `/readyz` sends no query to ClickHouse; [`check_clickhouse`]
//! keeps the answer fresh with one `SELECT 1` every [`CLICKHOUSE_CHECK_INTERVAL`] while no insert
//! succeeded meanwhile.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::metrics::{Format, Metrics, unix_now_us};
use crate::sink::ClickHouseSink;

/// Connections served at once; more are answered 503 and closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection must send its whole request head within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it is doing (one request per connection).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`check_clickhouse`] asks ClickHouse `SELECT 1` when no insert succeeded meanwhile.
pub const CLICKHOUSE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// `/readyz` fails when ClickHouse has not answered (an insert or a check) for this long.
pub const CLICKHOUSE_READY_WINDOW: Duration = Duration::from_secs(30);

/// The answer to a refused connection, written without waiting.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 38\r\nConnection: close\r\n\r\ntoo many connections to the endpoint\r\n";

/// Binds `addr` (fails at start, not later, when the address is taken) and serves the endpoint
/// on a thread of its own until the process exits.
pub fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("http-endpoint".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, metrics).await,
                    Err(e) => warn!(error = %e, "the HTTP endpoint cannot start"),
                }
            })
        })?;
    Ok(())
}

/// Serves on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, max_connections = MAX_CONNECTIONS, "serving /metrics, /healthz, /readyz");
    }
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(16 * 1024);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors (EMFILE) and the like: the pending connection stays
                // in the backlog, so accepting again at once would spin. Wait a little.
                metrics.http_accept_errors.inc();
                debug!(error = %e, "HTTP endpoint: accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.http_refused.inc();
            let _ = stream.try_write(BUSY);
            continue;
        };
        let connection = builder.serve_connection(
            TokioIo::new(stream),
            service_fn({
                let metrics = metrics.clone();
                move |request| {
                    let response = answer(&request, &metrics);
                    async move { Ok::<_, Infallible>(response) }
                }
            }),
        );
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "HTTP endpoint: connection failed"),
                Err(_) => debug!("HTTP endpoint: connection closed after {CONNECTION_TIMEOUT:?}"),
            }
        });
    }
}

fn answer(request: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let format = Format::from_accept(
                request
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            match metrics.render(unix_now_us(), format) {
                Ok(text) => (StatusCode::OK, format.content_type(), text),
                Err(e) => {
                    warn!(error = %e, "/metrics: the exposition could not be encoded");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "the metrics could not be encoded (see the relay's log)\n".into(),
                    )
                }
            }
        }
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") => {
            match metrics.readiness(unix_now_us(), CLICKHOUSE_READY_WINDOW) {
                Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_string()),
                Err(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{why}\n"),
                ),
            }
        }
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Keeps `/readyz`'s view of ClickHouse fresh: every [`CLICKHOUSE_CHECK_INTERVAL`] in which no
/// insert succeeded, one `SELECT 1` (bounded by the interval). Runs until dropped.
pub async fn check_clickhouse(metrics: Arc<Metrics>, sink: ClickHouseSink) {
    let interval_us = CLICKHOUSE_CHECK_INTERVAL.as_micros() as i64;
    loop {
        if unix_now_us() - metrics.clickhouse_ok_at_us.load(Relaxed) >= interval_us {
            match tokio::time::timeout(CLICKHOUSE_CHECK_INTERVAL, sink.ping()).await {
                Ok(Ok(())) => metrics.clickhouse_answered(unix_now_us()),
                Ok(Err(e)) => metrics.clickhouse_failed(e.to_string()),
                Err(_) => metrics.clickhouse_failed(format!(
                    "no answer to SELECT 1 within {} s",
                    CLICKHOUSE_CHECK_INTERVAL.as_secs()
                )),
            }
        }
        tokio::time::sleep(CLICKHOUSE_CHECK_INTERVAL).await;
    }
}
