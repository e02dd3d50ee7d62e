//! Durable replacement of a state-directory file: what guards a privacy promise (the unmask
//! record, the client-level DP record, the pending upload, the device's certificate) is on disk
//! before what it guards leaves the device.

use std::io::Write;
use std::path::Path;

use crate::error::ClientError;

/// Replaces `path` with `bytes` so that a crash at any point leaves the old content or the new,
/// and once this returns the new content survives a power loss: a temp file beside it, written
/// and fsynced, renamed over `path`, then the directory fsynced (the rename itself is then on
/// disk). Creates the directory if needed.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Fsyncs a directory, so the renames and creations in it are durable (a no-op where a
/// directory cannot be opened for that, as on Windows).
fn sync_dir(dir: &Path) -> Result<(), ClientError> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_file_holds_the_new_bytes_and_no_temp_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("record.json");
        replace_file(&path, b"old").unwrap();
        replace_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("record.json")]);
    }
}
