//! Upload payloads, behind their own small interface so that object storage can follow:
//! [`FilePayloads`] (content-addressed files in the data directory, for the sled store) and
//! the PostgreSQL store's table ([`super::postgres`]).
//!
//! A payload is named by (round, SHA-256 of its bytes): a second write of a name is a no-op
//! (the bytes are the same), so a refused re-send can never overwrite an accepted payload.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::codec::{storage, write_file_atomically};
use crate::error::Result;

/// `syncfs(2)` of the file system that holds `dir`.
#[cfg(target_os = "linux")]
fn syncfs(dir: &std::fs::File) -> std::io::Result<()> {
    rustix::fs::syncfs(dir).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn syncfs(_dir: &std::fs::File) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "syncfs is Linux's (group sync is not chosen elsewhere)",
    ))
}

/// Where upload payloads live.
pub trait PayloadStore: Send + Sync {
    /// Writes `bytes` under (round, digest) unless that name is there; durable after
    /// [`PayloadStore::sync`] of its round.
    fn put(&self, round: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<()>;

    /// Makes every payload written so far for `rounds` durable.
    fn sync(&self, rounds: &BTreeSet<u64>) -> Result<()>;

    /// A payload's bytes, checked against its digest (`None`: none of that name).
    fn get(&self, round: u64, digest: &[u8; 32]) -> Result<Option<Vec<u8>>>;

    /// Whether a payload of that name is there and matches its digest.
    fn verify(&self, round: u64, digest: &[u8; 32]) -> Result<bool>;

    /// Deletes every payload of `round`.
    fn drop_round(&self, round: u64) -> Result<()>;

    /// Deletes every payload except `keep`'s, which are of round `open` (`None`: delete all).
    fn retain(&self, open: Option<u64>, keep: &BTreeSet<[u8; 32]>) -> Result<()>;
}

/// Payload files: `DIR/rROUND/DIGEST.bin` (hex digest), written to a temp file and renamed.
///
/// **Group sync** (Linux 5.8 and later): a file is not fsynced by its writer;
/// [`PayloadStore::sync`] is one `syncfs(2)` of the file system that holds `DIR`, which makes
/// every file written so far durable, contents, renames and directories together, so a group
/// commit costs one sync for all of its payloads instead of one fsync each (the writers'
/// fsyncs, two at a time on the blocking pool, held 4,000 small uploads to about 1,000
/// acknowledgements a second). `syncfs` reports a write-back error of that file system since
/// `DIR` was opened, and `DIR` is opened before the first payload is written. A write-back
/// error is reported once, and the pages that failed are dropped: after one, a file written
/// before it may be on disk in name only, and a later `syncfs` would succeed. So the first
/// failed sync fails this store for good (every later `put` and `sync` is an error until the
/// coordinator restarts, when files without a durable record are deleted and every record's
/// file is checked against its digest), as PostgreSQL does after a failed fsync. `syncfs` also
/// writes whatever else is dirty on that file system: a coordinator whose data directory
/// shares a disk with heavy writers pays for their data at each group commit. Older kernels
/// (whose `syncfs` reports no errors) and other systems fsync each file before its rename, and
/// `sync` fsyncs the round directories.
pub struct FilePayloads {
    dir: PathBuf,
    /// `Some` with group sync.
    group: Option<GroupSync>,
}

/// The state of group sync.
struct GroupSync {
    /// `DIR`, opened before the first payload is written (what `syncfs` syncs).
    opened: std::sync::OnceLock<std::fs::File>,
    /// A sync failed: nothing written here can be made durable any more.
    failed: std::sync::atomic::AtomicBool,
}

/// Whether this kernel's `syncfs` reports write-back errors (Linux 5.8 and later).
fn group_sync_available() -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (5, 8)
}

impl FilePayloads {
    /// Payloads under `dir` (created on first write).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            group: group_sync_available().then(|| GroupSync {
                opened: std::sync::OnceLock::new(),
                failed: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    fn path(&self, round: u64, digest: &[u8; 32]) -> PathBuf {
        // named by the content's hash: nothing a peer chooses names a file
        self.dir
            .join(format!("r{round}"))
            .join(format!("{}.bin", hex::encode(digest)))
    }

    /// `DIR`, created and opened once; an error once a sync failed.
    fn opened<'a>(&self, g: &'a GroupSync) -> Result<&'a std::fs::File> {
        if g.failed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(storage(format!(
                "a sync of {} failed before: payloads written since the coordinator started \
                 may not be on disk; restart the coordinator",
                self.dir.display()
            )));
        }
        if let Some(f) = g.opened.get() {
            return Ok(f);
        }
        std::fs::create_dir_all(&self.dir)?;
        let f = std::fs::File::open(&self.dir)?;
        Ok(g.opened.get_or_init(|| f))
    }
}

impl PayloadStore for FilePayloads {
    fn put(&self, round: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<()> {
        let path = self.path(round, digest);
        match &self.group {
            Some(g) => {
                // opened before the write: a write-back error of this file shows at the sync
                self.opened(g)?;
                if path.exists() {
                    return Ok(());
                }
                write_file_atomically(&path, bytes, false)
            }
            None if path.exists() => Ok(()),
            None => write_file_atomically(&path, bytes, true),
        }
    }

    fn sync(&self, rounds: &BTreeSet<u64>) -> Result<()> {
        if rounds.is_empty() {
            return Ok(());
        }
        match &self.group {
            Some(g) => {
                let dir = self.opened(g)?;
                if let Err(e) = syncfs(dir) {
                    g.failed.store(true, std::sync::atomic::Ordering::Release);
                    return Err(storage(format!(
                        "syncing {} failed ({e}): this store takes no more uploads; restart \
                         the coordinator",
                        self.dir.display()
                    )));
                }
                Ok(())
            }
            None => {
                for r in rounds {
                    std::fs::File::open(self.dir.join(format!("r{r}")))?.sync_all()?;
                }
                std::fs::File::open(&self.dir)?.sync_all()?;
                Ok(())
            }
        }
    }

    fn get(&self, round: u64, digest: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        let p = self.path(round, digest);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(storage(format!("upload {}: {e}", p.display()))),
        };
        if Sha256::digest(&bytes).as_slice() != digest {
            return Err(storage(format!(
                "upload {} does not match its digest",
                p.display()
            )));
        }
        Ok(Some(bytes))
    }

    fn verify(&self, round: u64, digest: &[u8; 32]) -> Result<bool> {
        Ok(matches!(self.get(round, digest), Ok(Some(_))))
    }

    fn drop_round(&self, round: u64) -> Result<()> {
        let d = self.dir.join(format!("r{round}"));
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
        Ok(())
    }

    fn retain(&self, open: Option<u64>, keep: &BTreeSet<[u8; 32]>) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        let named: BTreeSet<String> = keep
            .iter()
            .map(|d| format!("{}.bin", hex::encode(d)))
            .collect();
        for d in std::fs::read_dir(&self.dir)? {
            let d = d?;
            let name = d.file_name().to_string_lossy().to_string();
            let round = name.strip_prefix('r').and_then(|r| r.parse::<u64>().ok());
            if !d.file_type()?.is_dir() {
                std::fs::remove_file(d.path())?;
                continue;
            }
            if round.is_none() || round != open {
                std::fs::remove_dir_all(d.path())?;
                continue;
            }
            for f in std::fs::read_dir(d.path())? {
                let f = f?;
                if !named.contains(f.file_name().to_string_lossy().as_ref()) {
                    std::fs::remove_file(f.path())?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a failed sync a file written before it may be on disk in name only, and a later
    /// `syncfs` would not say so: the store refuses every later write and sync.
    #[test]
    fn a_failed_group_sync_fails_the_store_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let p = FilePayloads::new(dir.path());
        let digest: [u8; 32] = Sha256::digest(b"x").into();
        p.put(1, &digest, b"x").unwrap();
        p.sync(&BTreeSet::from([1])).unwrap();
        assert_eq!(p.get(1, &digest).unwrap().as_deref(), Some(&b"x"[..]));
        let Some(g) = &p.group else {
            // an old kernel or another system: each file is fsynced by its writer
            assert!(!group_sync_available());
            return;
        };
        g.failed.store(true, std::sync::atomic::Ordering::Release);
        let other: [u8; 32] = Sha256::digest(b"y").into();
        assert!(
            p.put(1, &other, b"y").is_err(),
            "written after a failed sync"
        );
        assert!(
            p.put(1, &digest, b"x").is_err(),
            "an existing name after a failed sync"
        );
        assert!(p.sync(&BTreeSet::from([1])).is_err());
    }
}
