//! A small HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (a replication session is streaming and ClickHouse answers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::sink::ClickHouseSink;

/// Binds `addr`; fails at start (not later) when the address is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, sink: ClickHouseSink) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, sink) = (metrics.clone(), sink.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &metrics, &sink).await {
                debug!(error = %e, "metrics connection failed");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    metrics: &Metrics,
    sink: &ClickHouseSink,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("request timed out"))??;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics.render(unix_now_us()),
        ),
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        (b"GET", b"/readyz") => ready(metrics, sink).await,
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

async fn ready(metrics: &Metrics, sink: &ClickHouseSink) -> (&'static str, &'static str, String) {
    let replicating = metrics.replicating.load(Relaxed);
    let clickhouse = match tokio::time::timeout(Duration::from_secs(2), sink.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s".to_string()),
    };
    match (replicating, clickhouse) {
        (true, Ok(())) => ("200 OK", "text/plain", "ready\n".into()),
        (false, ch) => (
            "503 Service Unavailable",
            "text/plain",
            format!(
                "not replicating (see the relay's log){}\n",
                ch.err()
                    .map(|e| format!("; ClickHouse: {e}"))
                    .unwrap_or_default()
            ),
        ),
        (true, Err(e)) => (
            "503 Service Unavailable",
            "text/plain",
            format!("ClickHouse unreachable: {e}\n"),
        ),
    }
}

pub(crate) fn unix_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}
