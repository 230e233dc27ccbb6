//! A ClickHouse server of a test's own (the `chdb-core` wheel's embedded listeners, run by
//! `tools/clickhouse_server.py`), or a shared external one. The nodes of a
//! [`ClickHouseCluster`](crate::ClickHouseCluster) are such servers with further config.xml
//! elements.

use std::io::Read;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::{
    PORT_ATTEMPTS, TempDir, free_port, python, signal, start_ready, stop_or_cont, tail,
    workspace_root,
};

/// A ClickHouse server (chdb-core's embedded listeners) of the test's own, or (with
/// `RELAY_TEST_CLICKHOUSE_URL` set, e.g. a clickhouse-server service container) a shared external
/// one, where `kill` and `restart` are unavailable.
pub struct ClickHouseServer {
    /// (`http://host:port`, user, password) of an external server.
    external: Option<(String, String, String)>,
    http_port: u16,
    tcp_port: u16,
    dir: TempDir,
    /// Further `<user>` elements of users.xml ([`ClickHouseServer::start_with_users`]).
    users: Option<String>,
    /// Further top-level elements of config.xml (a cluster node's `<remote_servers>`, ...).
    config_extra: Option<String>,
    child: Option<Child>,
    /// SIGSTOPped by [`ClickHouseServer::stop`] and not continued since.
    stopped: bool,
}

impl ClickHouseServer {
    /// Starts the server and waits until `/ping` answers.
    pub fn start() -> Result<ClickHouseServer> {
        if let Ok(raw) = std::env::var("RELAY_TEST_CLICKHOUSE_URL") {
            let url = url::Url::parse(&raw).context("RELAY_TEST_CLICKHOUSE_URL")?;
            let server = ClickHouseServer {
                external: Some((
                    format!(
                        "{}://{}:{}",
                        url.scheme(),
                        url.host_str().unwrap_or("127.0.0.1"),
                        url.port_or_known_default().unwrap_or(8123)
                    ),
                    if url.username().is_empty() {
                        "default".into()
                    } else {
                        url.username().into()
                    },
                    url.password().unwrap_or_default().into(),
                )),
                http_port: url.port_or_known_default().unwrap_or(8123),
                tcp_port: 0,
                dir: TempDir::new("relay_ch_external")?,
                users: None,
                config_extra: None,
                child: None,
                stopped: false,
            };
            server.query("SELECT 1")?;
            return Ok(server);
        }
        ClickHouseServer::start_on(free_port()?, free_port()?, None)
    }

    /// A local server with further users: `users` holds `<user>` elements of users.xml, such
    /// as `<name><password>pw</password><grants><query>GRANT SELECT ON db.t</query></grants>
    /// ...</name>` (chDB enforces grants; it has no storage for `CREATE USER`). None (the test
    /// skips, saying why) with an external server, whose users are its own.
    pub fn start_with_users(users: &str) -> Result<Option<ClickHouseServer>> {
        if std::env::var("RELAY_TEST_CLICKHOUSE_URL").is_ok() {
            return Ok(None);
        }
        ClickHouseServer::start_on(free_port()?, free_port()?, Some(users.to_string())).map(Some)
    }

    /// Starts a local server on these ports, or on others when one of them is taken.
    fn start_on(http_port: u16, tcp_port: u16, users: Option<String>) -> Result<ClickHouseServer> {
        let mut server = ClickHouseServer::local(http_port, tcp_port, users, None)?;
        let mut attempt = 0;
        loop {
            match server.spawn() {
                // Another process took a chosen port before the server bound it.
                Err(e)
                    if attempt < PORT_ATTEMPTS
                        && tail(&server.dir.0.join("server.log")).contains("already in use") =>
                {
                    attempt += 1;
                    eprintln!("ClickHouse did not start, trying other ports: {e:#}");
                    server.http_port = free_port()?;
                    server.tcp_port = free_port()?;
                }
                other => return other.map(|()| server),
            }
        }
    }

    fn local(
        http_port: u16,
        tcp_port: u16,
        users: Option<String>,
        config_extra: Option<String>,
    ) -> Result<ClickHouseServer> {
        Ok(ClickHouseServer {
            external: None,
            http_port,
            tcp_port,
            dir: TempDir::new("relay_ch")?,
            users,
            config_extra,
            child: None,
            stopped: false,
        })
    }

    /// A local server on exactly these ports with further config.xml elements (a cluster
    /// node, whose ports the other nodes' config names): one attempt; the error (which holds
    /// the log's tail) says "already in use" when another process took a port.
    pub(crate) fn start_node(
        http_port: u16,
        tcp_port: u16,
        config_extra: String,
    ) -> Result<ClickHouseServer> {
        let mut server = ClickHouseServer::local(http_port, tcp_port, None, Some(config_extra))?;
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.0.join("server.log"))?;
        let mut command = Command::new(python()?);
        command
            .arg(workspace_root().join("tools/clickhouse_server.py"))
            .args(["--http-port", &self.http_port.to_string()])
            .args(["--tcp-port", &self.tcp_port.to_string()])
            .arg("--dir")
            .arg(&self.dir.0);
        if let Some(users) = &self.users {
            let path = self.dir.0.join("more_users.xml");
            std::fs::write(&path, users)?;
            command.arg("--users").arg(path);
        }
        if let Some(extra) = &self.config_extra {
            let path = self.dir.0.join("config_extra.xml");
            std::fs::write(&path, extra)?;
            command.arg("--config-extra").arg(path);
        }
        let child = command.stdout(log.try_clone()?).stderr(log).spawn()?;
        // Ours, not another test's server that took the HTTP port first: it names our TCP port.
        let probe = format!(
            "http://127.0.0.1:{}/?query=SELECT%20tcpPort()",
            self.http_port
        );
        let tcp_port = self.tcp_port.to_string();
        let ready = start_ready(child, "ClickHouse", &self.dir.0.join("server.log"), || {
            ureq::get(&probe)
                .timeout(Duration::from_secs(2))
                .call()
                .is_ok_and(|r| r.into_string().is_ok_and(|b| b.trim() == tcp_port))
        });
        self.child = Some(ready?);
        Ok(())
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The native protocol's port (0 for an external server).
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// The server process's id while it runs (None when killed, or external).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP by pid, returning once the kernel shows it stopped: the server keeps its
    /// sockets (connections are accepted by the kernel) and answers nothing, as a frozen VM.
    /// [`ClickHouseServer::cont`] resumes it.
    pub fn stop(&mut self) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("ClickHouse is not running here (killed, or external)");
        };
        stop_or_cont(pid, true)?;
        self.stopped = true;
        Ok(())
    }

    /// SIGCONT by pid after [`ClickHouseServer::stop`].
    pub fn cont(&mut self) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("ClickHouse is not running here (killed, or external)");
        };
        stop_or_cont(pid, false)?;
        self.stopped = false;
        Ok(())
    }

    /// SIGSTOPped and not continued since.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// `http://default:@127.0.0.1:PORT/database`
    pub fn url(&self, database: &str) -> String {
        match &self.external {
            Some((base, user, password)) => {
                let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
                format!("{scheme}://{user}:{password}@{rest}/{database}")
            }
            None => format!("http://default:@127.0.0.1:{}/{database}", self.http_port),
        }
    }

    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    /// Runs a query over HTTP and returns the body (an error carries ClickHouse's message).
    pub fn query(&self, sql: &str) -> Result<String> {
        self.query_with_timeout(sql, Duration::from_secs(60))
    }

    /// [`ClickHouseServer::query`] with a timeout of the whole request. An exception
    /// ClickHouse reports after it began sending rows (HTTP 200, then `__exception__` and the
    /// message in the body, as a `clusterAllReplicas` query whose last node fails) is an error
    /// too, carrying the body.
    pub fn query_with_timeout(&self, sql: &str, timeout: Duration) -> Result<String> {
        let (url, user, password) = match &self.external {
            Some((base, user, password)) => (format!("{base}/"), user.as_str(), password.as_str()),
            None => (
                format!("http://127.0.0.1:{}/", self.http_port),
                "default",
                "",
            ),
        };
        match ureq::post(&url)
            .timeout(timeout)
            .set("X-ClickHouse-User", user)
            .set("X-ClickHouse-Key", password)
            .send_string(sql)
        {
            Ok(resp) => {
                // Read what came even when the stream breaks off (as after such an exception).
                let mut body = String::new();
                let read = resp.into_reader().read_to_string(&mut body);
                if body.contains("\n__exception__\n") {
                    bail!("ClickHouse 200, then an exception in the body: {body}");
                }
                read?;
                Ok(body)
            }
            Err(ureq::Error::Status(code, resp)) => {
                bail!(
                    "ClickHouse {code}: {}",
                    resp.into_string().unwrap_or_default()
                )
            }
            Err(e) => Err(e.into()),
        }
    }

    /// SIGKILL by pid (the server ignores SIGTERM).
    pub fn kill(&mut self) -> Result<()> {
        if self.external.is_some() {
            bail!("cannot kill an external ClickHouse (RELAY_TEST_CLICKHOUSE_URL)");
        }
        if let Some(mut child) = self.child.take() {
            if let Ok(Some(status)) = child.try_wait() {
                // Not killed by the harness: a crash, whose log is about to be removed with
                // the directory.
                eprintln!(
                    "ClickHouse (pid {}, HTTP port {}) had exited by itself ({status}); the \
                     end of its log:\n{}",
                    child.id(),
                    self.http_port,
                    tail(&self.dir.0.join("server.log"))
                );
                return Ok(());
            }
            if self.stopped {
                signal(child.id(), "CONT");
                self.stopped = false;
            }
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts again with the same data and ports.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A port another test's server took between `free_port` and the bind: the server starts
    /// on another one, and the harness never mistakes the other server for its own.
    #[test]
    fn a_taken_port_is_never_mistaken_for_our_server() {
        let first = ClickHouseServer::start().unwrap();
        let second =
            ClickHouseServer::start_on(first.http_port, free_port().unwrap(), None).unwrap();
        assert_ne!(second.http_port, first.http_port);
        assert_eq!(
            second.query("SELECT tcpPort()").unwrap().trim(),
            second.tcp_port.to_string()
        );
        second.query("CREATE DATABASE only_in_second").unwrap();
        assert!(
            first
                .query("SHOW DATABASES")
                .unwrap()
                .lines()
                .all(|d| d != "only_in_second")
        );
    }

    #[test]
    fn clickhouse_keeps_data_across_restart() {
        let started = Instant::now();
        let mut ch = ClickHouseServer::start().unwrap();
        println!("ClickHouse started in {:?}", started.elapsed());
        ch.query("CREATE TABLE t (j JSON) ENGINE = MergeTree ORDER BY tuple()")
            .unwrap();
        ch.query(r#"INSERT INTO t VALUES ('{"a": 1}')"#).unwrap();
        ch.kill().unwrap();
        assert!(ch.query("SELECT 1").is_err(), "killed server still answers");
        ch.restart().unwrap();
        assert_eq!(ch.query("SELECT j.a FROM t").unwrap().trim(), "1");
        assert!(
            ch.query("SELECT nonsense(")
                .unwrap_err()
                .to_string()
                .contains("ClickHouse 400")
        );
    }
}
