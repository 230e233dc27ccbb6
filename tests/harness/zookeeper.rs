//! A standalone ZooKeeper of a test's own (Debian's `zookeeper` package, 3.8, which
//! `tools/bootstrap.sh` installs): the Keeper of a [`ClickHouseCluster`](crate::ClickHouseCluster)
//! for chDB's KeeperMap tables.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::{PORT_ATTEMPTS, TempDir, free_port, start_ready, tail};

/// Debian's jar; its manifest's `Class-Path` names the jars it needs in /usr/share/java.
const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";
/// A logger for ZooKeeper's slf4j (from `libslf4j-java`, a dependency of the package): the
/// server's log goes to stderr, hence to `zookeeper.log`.
const SLF4J_SIMPLE_JAR: &str = "/usr/share/java/slf4j-simple.jar";

/// A standalone ZooKeeper on 127.0.0.1 (a free client port, a temp dataDir, no admin server),
/// killed by pid when dropped.
pub struct ZooKeeper {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl ZooKeeper {
    /// Starts ZooKeeper and waits until it serves requests (`srvr` names a mode, `conf` our
    /// dataDir). Fails saying how to install it when Java or the package is missing
    /// (`RELAY_TEST_ZOOKEEPER_CLASSPATH` overrides the classpath, `RELAY_TEST_JAVA` the java
    /// binary).
    pub fn start() -> Result<ZooKeeper> {
        let mut zk = ZooKeeper {
            port: free_port()?,
            dir: TempDir::new("relay_zk")?,
            child: None,
        };
        let mut attempt = 0;
        loop {
            match zk.spawn() {
                Err(e)
                    if attempt < PORT_ATTEMPTS
                        && tail(&zk.log()).contains("Address already in use") =>
                {
                    attempt += 1;
                    eprintln!("ZooKeeper did not start, trying another port: {e:#}");
                    zk.port = free_port()?;
                }
                other => return other.map(|()| zk),
            }
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.0.join("zookeeper.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.0.join("data")
    }

    fn spawn(&mut self) -> Result<()> {
        let (java, classpath) = installation()?;
        std::fs::create_dir_all(self.data_dir())?;
        let config = self.dir.0.join("zoo.cfg");
        std::fs::write(
            &config,
            format!(
                "tickTime=500\n\
                 initLimit=10\n\
                 syncLimit=5\n\
                 dataDir={data}\n\
                 clientPort={port}\n\
                 clientPortAddress=127.0.0.1\n\
                 maxClientCnxns=0\n\
                 admin.enableServer=false\n\
                 4lw.commands.whitelist=*\n\
                 forceSync=no\n\
                 preAllocSize=4096\n",
                data = self.data_dir().display(),
                port = self.port
            ),
        )?;
        let log = std::fs::File::create(self.log())?;
        let child = Command::new(&java)
            .args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
            .arg("-cp")
            .arg(&classpath)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("run {}", java.display()))?;
        let data_dir = self.data_dir().display().to_string();
        let ready = start_ready(child, "ZooKeeper", &self.log(), || {
            // Ours (another test's server may hold the port): `conf` names our dataDir.
            four_letter(self.port, "srvr").is_ok_and(|s| s.contains("Mode: standalone"))
                && four_letter(self.port, "conf").is_ok_and(|c| c.contains(&data_dir))
        });
        self.child = Some(ready?);
        Ok(())
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, a client's connect string.
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The answer to a four-letter word (`ruok`, `srvr`, `mntr`, `cons`, ...).
    pub fn four_letter(&self, word: &str) -> Result<String> {
        four_letter(self.port, word)
    }

    /// SIGKILL by pid (a Keeper outage); [`ZooKeeper::restart`] starts it again with its data.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts again on the same port with the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// (java, classpath), or an error saying how to install what is missing.
fn installation() -> Result<(PathBuf, String)> {
    let java = match std::env::var_os("RELAY_TEST_JAVA") {
        Some(java) => PathBuf::from(java),
        None => find_in_path("java").with_context(|| {
            "java is not installed: ZooKeeper needs a JRE. Run `make bootstrap` as root (or \
             with passwordless sudo), or `apt-get install default-jre-headless zookeeper`"
        })?,
    };
    if let Ok(classpath) = std::env::var("RELAY_TEST_ZOOKEEPER_CLASSPATH") {
        return Ok((java, classpath));
    }
    if !Path::new(ZOOKEEPER_JAR).exists() {
        bail!(
            "ZooKeeper is not installed ({ZOOKEEPER_JAR} is missing): the cluster tests need it \
             for KeeperMap. Run `make bootstrap` as root (or with passwordless sudo), or \
             `apt-get install zookeeper` (Debian/Ubuntu); or set RELAY_TEST_ZOOKEEPER_CLASSPATH"
        );
    }
    let mut classpath = ZOOKEEPER_JAR.to_string();
    if Path::new(SLF4J_SIMPLE_JAR).exists() {
        classpath.push(':');
        classpath.push_str(SLF4J_SIMPLE_JAR);
    }
    Ok((java, classpath))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn four_letter(port: u16, word: &str) -> Result<String> {
    let address = ([127, 0, 0, 1], port).into();
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(word.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zookeeper_starts_answers_and_stops() {
        let mut zk = ZooKeeper::start().expect("start ZooKeeper");
        assert_eq!(zk.four_letter("ruok").unwrap(), "imok");
        assert!(
            zk.four_letter("srvr")
                .unwrap()
                .contains("Zookeeper version: 3.")
        );
        let port = zk.port();
        zk.kill().unwrap();
        assert!(
            four_letter(port, "ruok").is_err(),
            "killed ZooKeeper answers"
        );
        zk.restart().unwrap();
        assert_eq!(zk.four_letter("ruok").unwrap(), "imok");
    }
}
