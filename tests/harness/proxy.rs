//! A round-robin TCP proxy: each accepted connection is piped to the next backend in turn, as a
//! dumb L4 load balancer or ClickHouse Cloud's one endpoint spreads connections over replicas.
//! Threads and `std::net` only; stopped (every thread joined) when dropped.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

/// How long the proxy waits for a backend's TCP handshake (a stopped process's kernel still
/// completes it; a dead one refuses at once).
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the proxy does when the backend whose turn it is refuses the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRefused {
    /// Close the client's connection (a dumb L4 balancer without health checks): the client
    /// sees its connection closed before any answer.
    Close,
    /// Try the next backends in turn, closing the client's connection only when all refuse
    /// (a balancer that skips a dead node).
    Skip,
}

/// The proxy's counters, per backend in the order given to [`RoundRobinProxy::start`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    /// Client connections piped to each backend.
    pub piped: Vec<usize>,
    /// Connection attempts each backend refused (or did not accept within 5 s).
    pub refused: Vec<usize>,
    /// Client connections closed because no backend took them.
    pub dropped: usize,
}

struct Shared {
    backends: Vec<SocketAddr>,
    on_refused: OnRefused,
    /// The backend the next client connection goes to (modulo their number).
    cursor: AtomicUsize,
    piped: Vec<AtomicUsize>,
    refused: Vec<AtomicUsize>,
    dropped: AtomicUsize,
    stopping: AtomicBool,
    /// Both sockets of each live connection, to shut them down when the proxy stops.
    live: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    next_id: AtomicU64,
    /// The threads piping connections (finished ones are pruned as new ones start).
    pipes: Mutex<Vec<JoinHandle<()>>>,
}

/// A round-robin TCP proxy on 127.0.0.1 (see the module's doc).
pub struct RoundRobinProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl RoundRobinProxy {
    /// Listens on a free port of 127.0.0.1 and pipes each accepted connection to the next of
    /// `backends` (the first connection to the first backend).
    pub fn start(backends: Vec<SocketAddr>, on_refused: OnRefused) -> Result<RoundRobinProxy> {
        ensure!(!backends.is_empty(), "a proxy needs at least one backend");
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            piped: backends.iter().map(|_| AtomicUsize::new(0)).collect(),
            refused: backends.iter().map(|_| AtomicUsize::new(0)).collect(),
            backends,
            on_refused,
            cursor: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            pipes: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(RoundRobinProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://default:@127.0.0.1:PORT/database`, for HTTP backends such as ClickHouse nodes.
    pub fn url(&self, database: &str) -> String {
        format!("http://default:@127.0.0.1:{}/{database}", self.addr.port())
    }

    pub fn backends(&self) -> &[SocketAddr] {
        &self.shared.backends
    }

    /// The counters so far.
    pub fn counts(&self) -> ProxyCounts {
        let load = |v: &[AtomicUsize]| v.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        ProxyCounts {
            piped: load(&self.shared.piped),
            refused: load(&self.shared.refused),
            dropped: self.shared.dropped.load(Ordering::SeqCst),
        }
    }

    /// Client connections open now.
    pub fn live_connections(&self) -> usize {
        lock(&self.shared.live).len()
    }

    /// Zeroes the counters (the rotation goes on where it was).
    pub fn reset_counts(&self) {
        for c in self.shared.piped.iter().chain(&self.shared.refused) {
            c.store(0, Ordering::SeqCst);
        }
        self.shared.dropped.store(0, Ordering::SeqCst);
    }
}

impl Drop for RoundRobinProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor's blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (client, backend) in lock(&self.shared.live).values() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = backend.shutdown(Shutdown::Both);
        }
        let pipes = std::mem::take(&mut *lock(&self.shared.pipes));
        for pipe in pipes {
            let _ = pipe.join();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let Some(backend) = connect_backend(shared) else {
            shared.dropped.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let pipe = {
            let shared = Arc::clone(shared);
            std::thread::Builder::new()
                .name("proxy-pipe".into())
                .spawn(move || pipe(&shared, client, backend))
        };
        let mut pipes = lock(&shared.pipes);
        pipes.retain(|p| !p.is_finished());
        if let Ok(pipe) = pipe {
            pipes.push(pipe);
        }
    }
}

/// The backend whose turn it is, or with [`OnRefused::Skip`] the next that accepts.
fn connect_backend(shared: &Shared) -> Option<TcpStream> {
    let n = shared.backends.len();
    let tries = match shared.on_refused {
        OnRefused::Close => 1,
        OnRefused::Skip => n,
    };
    for _ in 0..tries {
        let i = shared.cursor.fetch_add(1, Ordering::SeqCst) % n;
        match TcpStream::connect_timeout(&shared.backends[i], BACKEND_CONNECT_TIMEOUT) {
            Ok(backend) => {
                shared.piped[i].fetch_add(1, Ordering::SeqCst);
                return Some(backend);
            }
            Err(_) => {
                shared.refused[i].fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    None
}

/// Copies both ways until both sides are done (or the proxy shuts the sockets down).
fn pipe(shared: &Shared, client: TcpStream, backend: TcpStream) {
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let (Ok(client_w), Ok(backend_w), Ok(client_k), Ok(backend_k)) = (
        client.try_clone(),
        backend.try_clone(),
        client.try_clone(),
        backend.try_clone(),
    ) else {
        return;
    };
    lock(&shared.live).insert(id, (client_k, backend_k));
    // The proxy may have begun stopping before this connection was registered.
    if shared.stopping.load(Ordering::SeqCst) {
        let _ = client.shutdown(Shutdown::Both);
        let _ = backend.shutdown(Shutdown::Both);
    }
    std::thread::scope(|s| {
        s.spawn(|| copy_then_close(&client, &backend_w));
        copy_then_close(&backend, &client_w);
    });
    lock(&shared.live).remove(&id);
}

/// Copies `from` into `to` until `from` ends, then ends `to`'s writing side.
fn copy_then_close(mut from: &TcpStream, mut to: &TcpStream) {
    let copied = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    if copied.is_err() {
        // A reset on one side: reset the other too rather than leave it half open.
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A server that answers each connection with `name:` and then echoes what it reads.
    struct Echo {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Echo {
        fn start(name: &'static str) -> Echo {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    std::thread::scope(|s| {
                        for conn in listener.incoming() {
                            if stop.load(Ordering::SeqCst) {
                                return;
                            }
                            let mut conn = conn.unwrap();
                            s.spawn(move || {
                                conn.write_all(format!("{name}:").as_bytes()).unwrap();
                                let mut back = conn.try_clone().unwrap();
                                let _ = io::copy(&mut conn, &mut back);
                            });
                        }
                    })
                })
            };
            Echo {
                addr,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            let _ = self.thread.take().map(JoinHandle::join);
        }
    }

    /// An address nothing listens on (a dead node: connections are refused).
    fn refusing() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Sends `msg` through a new connection and returns all that comes back ("" when the
    /// proxy closed the connection: writing may fail then, and reading ends or is reset).
    fn exchange(proxy: &RoundRobinProxy, msg: &str) -> String {
        let mut conn = TcpStream::connect(proxy.addr()).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = conn.write_all(msg.as_bytes());
        let _ = conn.shutdown(Shutdown::Write);
        let mut answer = Vec::new();
        match conn.read_to_end(&mut answer) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("reading through the proxy: {e}"),
        }
        String::from_utf8(answer).unwrap()
    }

    #[test]
    fn connections_go_to_each_backend_in_turn() {
        let echoes = [Echo::start("a"), Echo::start("b"), Echo::start("c")];
        let proxy =
            RoundRobinProxy::start(echoes.iter().map(|e| e.addr).collect(), OnRefused::Close)
                .unwrap();
        let answers: Vec<String> = (0..7).map(|i| exchange(&proxy, &i.to_string())).collect();
        assert_eq!(
            answers,
            ["a:0", "b:1", "c:2", "a:3", "b:4", "c:5", "a:6"].map(String::from)
        );
        assert_eq!(
            proxy.counts(),
            ProxyCounts {
                piped: vec![3, 2, 2],
                refused: vec![0, 0, 0],
                dropped: 0
            }
        );
        // A large exchange, both ways at once.
        let big = "x".repeat(4 << 20);
        assert_eq!(exchange(&proxy, &big), format!("b:{big}"));
        proxy.reset_counts();
        assert_eq!(proxy.counts().piped, vec![0, 0, 0]);
    }

    #[test]
    fn a_refusing_backend_closes_the_client_or_is_skipped() {
        let (a, c) = (Echo::start("a"), Echo::start("c"));
        let backends = vec![a.addr, refusing(), c.addr];

        let close = RoundRobinProxy::start(backends.clone(), OnRefused::Close).unwrap();
        let answers: Vec<String> = (0..4).map(|i| exchange(&close, &i.to_string())).collect();
        assert_eq!(answers, ["a:0", "", "c:2", "a:3"].map(String::from));
        assert_eq!(
            close.counts(),
            ProxyCounts {
                piped: vec![2, 0, 1],
                refused: vec![0, 1, 0],
                dropped: 1
            }
        );

        let skip = RoundRobinProxy::start(backends, OnRefused::Skip).unwrap();
        let answers: Vec<String> = (0..4).map(|i| exchange(&skip, &i.to_string())).collect();
        assert_eq!(answers, ["a:0", "c:1", "a:2", "c:3"].map(String::from));
        assert_eq!(
            skip.counts(),
            ProxyCounts {
                piped: vec![2, 0, 2],
                refused: vec![0, 2, 0],
                dropped: 0
            }
        );

        let none = RoundRobinProxy::start(vec![refusing(), refusing()], OnRefused::Skip).unwrap();
        assert_eq!(exchange(&none, "x"), "");
        assert_eq!(none.counts().dropped, 1);
    }

    #[test]
    fn drop_closes_live_connections_and_the_port() {
        let a = Echo::start("a");
        let proxy = RoundRobinProxy::start(vec![a.addr], OnRefused::Close).unwrap();
        let addr = proxy.addr();
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut greeting = [0u8; 2];
        conn.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"a:");
        assert_eq!(proxy.live_connections(), 1);
        drop(proxy);
        // The connection was open both ways: only the proxy's shutdown ends it.
        let mut rest = Vec::new();
        assert_eq!(conn.read_to_end(&mut rest).unwrap_or(0), 0);
        assert!(TcpStream::connect(addr).is_err(), "the proxy still listens");
    }
}
