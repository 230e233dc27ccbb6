//! The HTTP endpoint under load, against real servers: while the relay ships a stream of events,
//! 500 trickling connections (one byte a second, never a whole request) and 500 concurrent
//! /readyz requests. The relay keeps shipping, /healthz answers, its descriptors and its
//! ClickHouse connections stay bounded, and it does not spin.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Fixture, http_get, wait_until};
use harness::PgVersion;

const LONG: Duration = Duration::from_secs(120);
/// The relay's fd limit during the load, as in the report this test answers.
const RELAY_NOFILE: u32 = 128;
/// The endpoint's connection limit (relay::http::MAX_CONNECTIONS, written out so that raising it
/// there fails here).
const MAX_CONNECTIONS: usize = 64;

#[test]
fn endpoint_stays_bounded_under_load() {
    raise_own_nofile(2_500);
    let addr = common::free_addr();
    let f = Fixture::start(
        PgVersion::V15,
        &[
            ("RELAY_METRICS_ADDR", &addr),
            ("RELAY_BATCH_MAX_WAIT_MS", "100"),
        ],
    );
    let mut relay = f.spawn_relay();
    let pid = relay.pid();
    f.publish(100, 10, "warmup");
    f.wait_for_rows(100, LONG, Some(&relay));
    assert!(
        wait_until(LONG, || http_get(&addr, "/readyz").0 == 200),
        "never ready: {:?}\n{}",
        http_get(&addr, "/readyz"),
        relay.log()
    );
    let limited = std::process::Command::new("prlimit")
        .args([
            format!("--pid={pid}"),
            format!("--nofile={RELAY_NOFILE}:{RELAY_NOFILE}"),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !limited {
        println!("prlimit unavailable: the relay keeps its own fd limit");
    }
    let ch_port = f.ch.http_port();
    let baseline_fds = count_fds(pid);
    let before = f.ch_count();
    let cpu_before = cpu_ticks(pid);
    let started = Instant::now();
    let stop = AtomicBool::new(false);

    let (monitor, published, trickle, burst, health) = std::thread::scope(|s| {
        let monitor = s.spawn(|| {
            let (mut max_fds, mut max_ch) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                max_fds = max_fds.max(count_fds(pid));
                max_ch = max_ch.max(clickhouse_sockets(pid, ch_port));
                std::thread::sleep(Duration::from_millis(20));
            }
            (max_fds, max_ch)
        });
        let publisher = s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                f.publish(100, 10, "during_load");
                n += 100;
            }
            n
        });
        let trickle = s.spawn(|| trickle(&addr, 500, 8));
        // 500 /readyz at once while the trickle holds the endpoint, then 500 more after it.
        let burst = s.spawn(|| readyz_burst(&addr, 500));
        // /healthz while both run: the first answer, and how many of the tries got one.
        let health = s.spawn(|| {
            let (mut first_ok, mut ok, mut tries) = (None, 0, 0);
            let deadline = Instant::now() + Duration::from_secs(12);
            while Instant::now() < deadline {
                tries += 1;
                if http_get_within(&addr, "/healthz", Duration::from_secs(2)) == Some(200) {
                    ok += 1;
                    first_ok.get_or_insert(started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (first_ok, ok, tries)
        });
        let trickle = trickle.join().unwrap();
        let burst = (burst.join().unwrap(), readyz_burst(&addr, 500));
        let health = health.join().unwrap();
        let shipped_during = f.ch_count() - before;
        stop.store(true, Ordering::Relaxed);
        (
            monitor.join().unwrap(),
            (publisher.join().unwrap(), shipped_during),
            trickle,
            burst,
            health,
        )
    });
    let wall = started.elapsed();
    let cpu = (cpu_ticks(pid) - cpu_before) as f64 / 100.0;
    let ((max_fds, max_ch), (published, shipped_during)) = (monitor, published);
    println!(
        "load for {wall:.1?}: relay fds baseline {baseline_fds}, max {max_fds} (limit {RELAY_NOFILE}); \
         max ClickHouse connections {max_ch}; events published {published}, shipped during the load \
         {shipped_during}; relay CPU {cpu:.2} s ({:.0}%)\n\
         trickle: {} opened, {} answered 503 at once, {} closed by the server, {} still open at the end\n\
         /readyz burst during the trickle: {:?}\n\
         /readyz burst after it: {:?}\n\
         /healthz: first 200 after {:?}, {} of {} tries answered 200",
        100.0 * cpu / wall.as_secs_f64(),
        trickle.opened,
        trickle.busy,
        trickle.closed,
        trickle.open_at_end,
        burst.0,
        burst.1,
        health.0,
        health.1,
        health.2,
    );
    assert!(relay.is_running(), "relay died:\n{}", relay.log());
    assert!(shipped_during > 0, "nothing shipped during the load");
    f.wait_for_rows(100 + published, LONG, Some(&relay));
    assert!(
        health.0.is_some_and(|t| t < Duration::from_secs(8)),
        "/healthz never answered during the load: {health:?}"
    );
    assert!(
        max_fds <= baseline_fds + MAX_CONNECTIONS + 16,
        "relay fds went to {max_fds} (baseline {baseline_fds})"
    );
    assert!(max_ch <= 8, "{max_ch} ClickHouse connections");
    assert_eq!(trickle.open_at_end, 0, "trickling connections kept open");
    for burst in [&burst.0, &burst.1] {
        assert_eq!(
            burst.unanswered, 0,
            "/readyz requests left hanging: {burst:?}"
        );
        assert_eq!(burst.not_ready, 0, "/readyz said not ready: {burst:?}");
        assert!(burst.ok + burst.busy >= 400, "{burst:?}");
    }
    assert!(
        burst.1.ok >= 100,
        "/readyz after the trickle: {:?}",
        burst.1
    );
    assert!(
        cpu < 0.5 * wall.as_secs_f64(),
        "the relay used {cpu:.2} s of CPU in {wall:.1?}"
    );
    // Afterwards the endpoint is whole again.
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    relay.kill_now();
}

#[derive(Debug, Default)]
struct Trickle {
    opened: usize,
    busy: usize,
    closed: usize,
    open_at_end: usize,
}

/// `n` connections that each send one byte of a request head a second for `seconds` seconds.
fn trickle(addr: &str, n: usize, seconds: usize) -> Trickle {
    let request = b"GET /metrics HTTP/1.1\r\nHost: relay\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut report = Trickle::default();
    let mut streams: Vec<Option<TcpStream>> = Vec::new();
    for _ in 0..n {
        if let Ok(s) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
            let _ = s.set_nonblocking(true);
            streams.push(Some(s));
        }
    }
    report.opened = streams.len();
    for tick in 0..seconds {
        let next = Instant::now() + Duration::from_secs(1);
        for slot in streams.iter_mut() {
            let Some(s) = slot else { continue };
            let mut buf = [0u8; 256];
            let gone = match s.read(&mut buf) {
                Ok(0) => Some(false),
                Ok(_) => Some(true),
                Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                Err(_) => Some(false),
            };
            if let Some(answered) = gone {
                if answered {
                    report.busy += 1;
                } else {
                    report.closed += 1;
                }
                *slot = None;
                continue;
            }
            let _ = s.write(&request[tick..tick + 1]);
        }
        // Pacing of the load itself, not synchronisation.
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    report.open_at_end = streams.iter().flatten().count();
    report
}

#[derive(Debug, Default)]
struct Burst {
    ok: usize,
    /// 503 from the connection limit.
    busy: usize,
    /// 503 from /readyz itself.
    not_ready: usize,
    closed: usize,
    unanswered: usize,
    slowest: Duration,
}

/// `n` /readyz requests sent at once, then their answers read.
fn readyz_burst(addr: &str, n: usize) -> Burst {
    let started = Instant::now();
    let mut pending: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    let mut report = Burst::default();
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: relay\r\n\r\n");
                let _ = s.set_nonblocking(true);
                pending.push((s, Vec::new()));
            }
            Err(_) => report.closed += 1,
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain_mut(|(s, got)| {
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    Err(_) => break,
                }
            }
            report.slowest = report.slowest.max(started.elapsed());
            if got.starts_with(b"HTTP/1.1 200") {
                report.ok += 1;
            } else if got.starts_with(b"HTTP/1.1 503") {
                if String::from_utf8_lossy(got).contains("too many connections") {
                    report.busy += 1;
                } else {
                    report.not_ready += 1;
                }
            } else {
                report.closed += 1;
            }
            false
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    report.unanswered = pending.len();
    report
}

/// The status of GET `path`, or None without an answer within `timeout`.
fn http_get_within(addr: &str, path: &str, timeout: Duration) -> Option<u16> {
    match ureq::get(&format!("http://{addr}{path}"))
        .timeout(timeout)
        .call()
    {
        Ok(resp) => Some(resp.status()),
        Err(ureq::Error::Status(code, _)) => Some(code),
        Err(_) => None,
    }
}

fn count_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The process's TCP sockets connected to `port` on 127.0.0.1 (its fds matched with
/// /proc/net/tcp by inode).
fn clickhouse_sockets(pid: i32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let remote = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .filter(|cols| cols.len() > 9 && cols[2].ends_with(&remote) && inodes.contains(&cols[9]))
        .count()
}

/// utime + stime of `pid`, in clock ticks (1/100 s).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let field = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// The test opens about 1000 sockets at once: raise its own soft fd limit when it is lower.
fn raise_own_nofile(want: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if soft < want {
        let ok = std::process::Command::new("prlimit")
            .args([
                format!("--pid={}", std::process::id()),
                format!("--nofile={want}:{want}"),
            ])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "cannot raise the test's fd limit to {want} (it is {soft})"
        );
    }
}
