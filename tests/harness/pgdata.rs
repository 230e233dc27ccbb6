//! A new cluster's data directory, as `initdb -U postgres --auth=trust --no-sync -E UTF8` makes
//! it, copied from a template made once per set of binaries instead of running initdb for every
//! test: initdb cost 0.8 s of CPU in memory (2.2 s on disk) for each of the ~350 servers a
//! `make test` starts, a copy and `pg_resetwal` about 0.15 s. Each copy gets a system identifier
//! of its own, as a cluster made by initdb has (the relay names a source by it).
//!
//! The templates live beside the servers' data ([`data_temp_dir`]), named after the binaries
//! (size and modification time of `postgres`, which a copy keeps) and the user they run as, and
//! are kept for later runs; a template is complete when its directory exists (made elsewhere, then renamed).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::postgres::as_user;
use crate::util::{data_temp_dir, unique_name};

/// Makes `data` (which must not exist) a fresh cluster's data directory for the binaries in
/// `bin`, owned by `run_as` when given.
pub(crate) fn init_data_dir(bin: &Path, data: &Path, run_as: Option<(u32, u32)>) -> Result<()> {
    let template = template(bin, run_as)?;
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&template)
        .arg(data)
        .status()
        .context("cp -a of the template data directory")?;
    if !copied.success() {
        bail!("cp -a {} {} failed", template.display(), data.display());
    }
    let control = data.join("global/pg_control");
    let mut bytes = std::fs::read(&control).with_context(|| control.display().to_string())?;
    set_system_identifier(&mut bytes, fresh_identifier())?;
    std::fs::write(&control, &bytes)?;
    // The WAL's page headers carry the old identifier: a new WAL from the control file.
    let mut reset = Command::new(bin.join("pg_resetwal"));
    reset.arg("-f").arg("-D").arg(data).stdout(Stdio::null());
    let out = as_user(&mut reset, run_as).output()?;
    if !out.status.success() {
        bail!(
            "pg_resetwal failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The template's data directory, made by initdb when this run is the first to need it.
fn template(bin: &Path, run_as: Option<(u32, u32)>) -> Result<PathBuf> {
    let postgres = std::fs::metadata(bin.join("postgres"))
        .with_context(|| format!("{}/postgres", bin.display()))?;
    let key = twox_hash::XxHash3_64::oneshot(
        format!("{}|{}|{run_as:?}", postgres.size(), postgres.mtime()).as_bytes(),
    );
    let root = data_temp_dir()?;
    let template = root.join(format!("relay_pg_template_{key:016x}"));
    if template.join("data/global/pg_control").exists() {
        return Ok(template.join("data"));
    }
    let building = root.join(unique_name("relay_pg_template_new"));
    std::fs::create_dir_all(&building)?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(&building, Some(uid), Some(gid))?;
    }
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
        .arg("-D")
        .arg(building.join("data"))
        .stdout(Stdio::null());
    let out = as_user(&mut initdb, run_as).output()?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&building);
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Another test may have made it meanwhile: theirs stays, ours goes.
    if std::fs::rename(&building, &template).is_err() {
        let _ = std::fs::remove_dir_all(&building);
    }
    Ok(template.join("data"))
}

/// A system identifier no other cluster here has: initdb's recipe (seconds, microseconds,
/// process id) plus a counter.
fn fresh_identifier() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let name = unique_name("sysid");
    (now.as_secs() << 32)
        | (u64::from(now.subsec_micros()) << 12)
            ^ twox_hash::XxHash3_64::oneshot(name.as_bytes()) & 0xFFF_FFFF
}

/// Writes `identifier` into a `pg_control` file's contents: the first field of ControlFileData,
/// whose CRC-32C (over the fields before it) follows the last field; the CRC's place differs by
/// version and is found as the one offset where the stored CRC matches.
fn set_system_identifier(control: &mut [u8], identifier: u64) -> Result<()> {
    let stored = |c: &[u8], at: usize| u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
    let places: Vec<usize> = (8..control.len().min(1024).saturating_sub(4))
        .step_by(4)
        .filter(|&at| crc32c(&control[..at]) == stored(control, at))
        .collect();
    let [at] = places[..] else {
        bail!("pg_control: the CRC's place is not unique ({places:?})");
    };
    control[..8].copy_from_slice(&identifier.to_le_bytes());
    let crc = crc32c(&control[..at]);
    control[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// CRC-32C (Castagnoli), as PostgreSQL's pg_crc32c.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn the_identifier_is_written_and_the_crc_follows() {
        let mut control = vec![0u8; 8192];
        control[8..40].copy_from_slice(&[7u8; 32]);
        let crc = crc32c(&control[..292]);
        control[292..296].copy_from_slice(&crc.to_le_bytes());
        set_system_identifier(&mut control, 42).unwrap();
        assert_eq!(&control[..8], &42u64.to_le_bytes());
        assert_eq!(crc32c(&control[..292]).to_le_bytes(), control[292..296]);
        assert!(set_system_identifier(&mut vec![0u8; 8192], 1).is_err());
    }
}
