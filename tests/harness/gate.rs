//! A network fault between two running processes: [`TcpGate`], a TCP forwarder to a server on a
//! port of its own that a test can cut, stall and reopen while both ends keep running.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// A TCP forwarder on a free port of 127.0.0.1 to an upstream server: clients connect to
/// [`addr`](Self::addr) instead of the server. [`cut`](Self::cut) resets every connection
/// through the gate and refuses new ones (the port is closed), [`stall`](Self::stall) keeps the
/// connections open but lets nothing through (a silent network), [`reopen`](Self::reopen)
/// listens again on the same port. Dropping the gate cuts it.
pub struct TcpGate {
    addr: String,
    upstream: String,
    /// The accept loop while the gate listens: its stop flag and thread.
    accepting: Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
    /// Both ends of every connection forwarded since the last cut.
    connections: Arc<Mutex<Vec<TcpStream>>>,
    /// While set, nothing passes in either direction (from each connection's next chunk on).
    stalled: Arc<AtomicBool>,
}

impl TcpGate {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `upstream`
    /// (`host:port`).
    pub fn open(upstream: &str) -> Result<TcpGate> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the gate")?;
        let gate = TcpGate {
            addr: listener.local_addr()?.to_string(),
            upstream: upstream.to_string(),
            accepting: Mutex::new(None),
            connections: Arc::default(),
            stalled: Arc::default(),
        };
        *lock(&gate.accepting) = Some(gate.serve(listener));
        Ok(gate)
    }

    /// `127.0.0.1:PORT`: where clients connect instead of the upstream.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Listens again on the same port after a [`cut`](Self::cut); nothing when it listens.
    pub fn reopen(&self) -> Result<()> {
        let mut accepting = lock(&self.accepting);
        if accepting.is_none() {
            // std sets SO_REUSEADDR, so the port is free again at once.
            let listener =
                TcpListener::bind(&self.addr).with_context(|| format!("reopen {}", self.addr))?;
            *accepting = Some(self.serve(listener));
        }
        Ok(())
    }

    /// Keeps every connection open but lets nothing through, until the next cut.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Stops listening (new connections are refused) and resets every connection through the
    /// gate; ends a stall.
    pub fn cut(&self) {
        if let Some((stop, accept)) = lock(&self.accepting).take() {
            stop.store(true, Ordering::SeqCst);
            // Wakes the accept loop, which sees the flag and drops the listener.
            let _ = TcpStream::connect(&self.addr);
            let _ = accept.join();
        }
        for conn in lock(&self.connections).drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
        self.stalled.store(false, Ordering::SeqCst);
    }

    /// The accept loop on `listener`: each client is paired with a new connection to the
    /// upstream (a client the upstream refuses is dropped).
    fn serve(&self, listener: TcpListener) -> (Arc<AtomicBool>, JoinHandle<()>) {
        let stop = Arc::new(AtomicBool::new(false));
        let (upstream, connections, stopped, stalled) = (
            self.upstream.clone(),
            self.connections.clone(),
            stop.clone(),
            self.stalled.clone(),
        );
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(&upstream)) else {
                    continue;
                };
                let clones = || -> std::io::Result<_> {
                    Ok([
                        client.try_clone()?,
                        server.try_clone()?,
                        client.try_clone()?,
                        server.try_clone()?,
                    ])
                };
                let Ok([held_client, held_server, to_client, to_server]) = clones() else {
                    continue;
                };
                lock(&connections).extend([held_client, held_server]);
                forward(client, to_server, stalled.clone());
                forward(server, to_client, stalled.clone());
            }
        });
        (stop, accept)
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The guarded value; a thread that panicked holding the lock left nothing half changed here.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Copies `from` to `to` on a thread of its own until either side ends, then ends both; holds
/// the data while `stalled` is set.
fn forward(mut from: TcpStream, mut to: TcpStream, stalled: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            while stalled.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;

    /// A server echoing what each connection sends; its address.
    fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0; 1024];
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        if conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Whether `ping` comes back within `wait` (`false` when the connection stays silent).
    fn echoes(conn: &mut TcpStream, wait: Duration) -> bool {
        conn.set_read_timeout(Some(wait)).unwrap();
        conn.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        match conn.read_exact(&mut buf) {
            Ok(()) => &buf == b"ping",
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(e) => panic!("the connection failed: {e}"),
        }
    }

    /// Whether the peer ended or reset the connection (a silent one is not ended).
    fn ended(conn: &mut TcpStream) -> bool {
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match conn.read(&mut [0; 16]) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }

    #[test]
    fn a_cut_resets_connections_and_refuses_new_ones_until_reopened() {
        let gate = TcpGate::open(&echo_server()).unwrap();
        let mut conn = TcpStream::connect(gate.addr()).unwrap();
        assert!(echoes(&mut conn, Duration::from_secs(10)));

        gate.cut();
        assert!(ended(&mut conn), "a connection survived the cut");
        let refused = TcpStream::connect(gate.addr()).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

        gate.reopen().unwrap();
        gate.reopen().unwrap();
        let mut conn = TcpStream::connect(gate.addr()).unwrap();
        assert!(echoes(&mut conn, Duration::from_secs(10)));
    }

    #[test]
    fn a_stalled_gate_passes_nothing_until_the_cut() {
        let gate = TcpGate::open(&echo_server()).unwrap();
        let mut conn = TcpStream::connect(gate.addr()).unwrap();
        assert!(echoes(&mut conn, Duration::from_secs(10)));

        gate.stall();
        assert!(
            !echoes(&mut conn, Duration::from_millis(500)),
            "data passed a stalled gate"
        );
        gate.cut();
        assert!(ended(&mut conn), "a stalled connection survived the cut");
        gate.reopen().unwrap();
        let mut conn = TcpStream::connect(gate.addr()).unwrap();
        assert!(echoes(&mut conn, Duration::from_secs(10)), "still stalled");
    }
}
