//! What both servers' harnesses share: names and directories of a test's own, free ports,
//! the Python of `.venv`, signals by pid and the wait for a starting server.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub(crate) const STARTUP: Duration = Duration::from_secs(60);

/// How many times a server's first start tries other ports when the chosen one was taken.
pub(crate) const PORT_ATTEMPTS: u32 = 5;

/// The repository root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// A name no other test in this machine's run uses: `prefix_pid_counter_nanos`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh directory under [`data_temp_dir`], removed by [`TempDir`]'s drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(prefix: &str) -> Result<TempDir> {
        let path = data_temp_dir()?.join(unique_name(prefix));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn python() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("RELAY_TEST_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let p = workspace_root().join(".venv/bin/python");
    if !p.exists() {
        bail!(
            "{} is missing: run `bash tools/bootstrap.sh` (make test and make demo do)",
            p.display()
        );
    }
    Ok(p)
}

pub(crate) fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// The state letters (`R`, `S`, `T` for stopped, ...) of each thread of a process, from
/// `/proc/PID/task/*/stat`.
pub(crate) fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            // `tid (comm) S ...`: comm may hold spaces and parentheses.
            stat.rsplit_once(')')?.1.trim_start().chars().next()
        })
        .collect()
}

/// Sends SIGSTOP or SIGCONT and waits (up to 10 s) until the kernel shows every thread of the
/// process stopped, or none stopped (a group stop completes thread by thread: a busy server
/// may still answer a request in between).
pub(crate) fn stop_or_cont(pid: u32, stop: bool) -> Result<()> {
    signal(pid, if stop { "STOP" } else { "CONT" });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let states = thread_states(pid);
        let stopped = |s: &char| *s == 'T' || *s == 't';
        let done = if stop {
            !states.is_empty() && states.iter().all(stopped)
        } else {
            !states.iter().any(stopped)
        };
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "process {pid} is not {} after SIG{} (its threads' states: {states:?})",
                if stop { "stopped" } else { "running" },
                if stop { "STOP" } else { "CONT" }
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `ready` until it holds; fails with the log's tail if the server exits or takes longer
/// than [`STARTUP`].
pub(crate) fn wait_ready(
    child: &mut Child,
    what: &str,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let started = Instant::now();
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().ok().flatten() {
            bail!("{what} exited during start ({status}):\n{}", tail(log));
        }
        if started.elapsed() > STARTUP {
            bail!("{what} did not become ready in {STARTUP:?}:\n{}", tail(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`wait_ready`] for a server this process may kill: stopped (and reaped) when it does not
/// become ready, handed back when it does.
pub(crate) fn start_ready(
    mut child: Child,
    what: &str,
    log: &Path,
    ready: impl FnMut() -> bool,
) -> Result<Child> {
    match wait_ready(&mut child, what, log, ready) {
        Ok(()) => Ok(child),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

pub(crate) fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Where the servers a test starts keep their data: `RELAY_TEST_TMPDIR` when set; else
/// `/dev/shm` when it is a directory anyone may enter and write with at least
/// [`MEMORY_DIR_MIN_FREE_KIB`] free; else [`shared_temp_dir`]. In memory, a test's initdb, WAL
/// and ClickHouse parts cost no disk writes: initdb took 0.8 s there and 2.2 s on this
/// machine's disk, and the suite's system time was a third of its CPU time before.
pub(crate) fn data_temp_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("RELAY_TEST_TMPDIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.is_dir() || (is_root() && !traversable_by_others(&dir)) {
            bail!(
                "RELAY_TEST_TMPDIR ({}) is not a directory the postgres user can enter: create \
                 it, make it world-searchable (chmod o+x), or unset it",
                dir.display()
            );
        }
        return Ok(dir);
    }
    let memory = Path::new("/dev/shm");
    let usable = std::fs::metadata(memory).is_ok_and(|m| m.is_dir() && m.mode() & 0o003 == 0o003)
        && free_kib(memory).is_some_and(|kib| kib >= MEMORY_DIR_MIN_FREE_KIB);
    if usable {
        return Ok(memory.to_path_buf());
    }
    shared_temp_dir()
}

/// The space `/dev/shm` must have free for the test servers' data to go there (the largest
/// test, a 500 MB transaction, writes about 2 GB of WAL and spill files).
pub(crate) const MEMORY_DIR_MIN_FREE_KIB: u64 = 6 * 1024 * 1024;

/// Free space of the file system holding `dir`, from `df -Pk` (None when it cannot tell).
fn free_kib(dir: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

/// The temp directory, if the `postgres` user can reach it, else `/tmp` (a private `TMPDIR`,
/// as `mktemp -d` makes, would hide the data directory from the server).
pub(crate) fn shared_temp_dir() -> Result<PathBuf> {
    [std::env::temp_dir(), PathBuf::from("/tmp")]
        .into_iter()
        .find(|d| !is_root() || traversable_by_others(d))
        .ok_or_else(|| {
            anyhow!(
                "neither TMPDIR ({}) nor /tmp can be entered by the postgres user: \
                 make one of them world-searchable (chmod o+x)",
                std::env::temp_dir().display()
            )
        })
}

pub(crate) fn traversable_by_others(path: &Path) -> bool {
    path.ancestors()
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.mode() & 0o001 != 0))
}

pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
