//! A ClickHouse server of a test's own (the `chdb-core` wheel's embedded listeners, run by
//! `tools/clickhouse_server.py`), or a shared external one.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::{PORT_ATTEMPTS, TempDir, free_port, python, tail, wait_ready, workspace_root};

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
    child: Option<Child>,
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
                child: None,
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
        let mut server = ClickHouseServer {
            external: None,
            http_port,
            tcp_port,
            dir: TempDir::new("relay_ch")?,
            users,
            child: None,
        };
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
        let mut child = command.stdout(log.try_clone()?).stderr(log).spawn()?;
        // Ours, not another test's server that took the HTTP port first: it names our TCP port.
        let probe = format!(
            "http://127.0.0.1:{}/?query=SELECT%20tcpPort()",
            self.http_port
        );
        let tcp_port = self.tcp_port.to_string();
        let ready = wait_ready(
            &mut child,
            "ClickHouse",
            &self.dir.0.join("server.log"),
            || {
                ureq::get(&probe)
                    .timeout(Duration::from_secs(2))
                    .call()
                    .is_ok_and(|r| r.into_string().is_ok_and(|b| b.trim() == tcp_port))
            },
        );
        match ready {
            Ok(()) => self.child = Some(child),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
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
        let (url, user, password) = match &self.external {
            Some((base, user, password)) => (format!("{base}/"), user.as_str(), password.as_str()),
            None => (
                format!("http://127.0.0.1:{}/", self.http_port),
                "default",
                "",
            ),
        };
        match ureq::post(&url)
            .timeout(Duration::from_secs(60))
            .set("X-ClickHouse-User", user)
            .set("X-ClickHouse-Key", password)
            .send_string(sql)
        {
            Ok(resp) => Ok(resp.into_string()?),
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
