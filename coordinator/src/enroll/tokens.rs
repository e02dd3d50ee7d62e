//! One-time enrollment tokens: made offline (`fedlora certs token`), stored only as SHA-256
//! hashes with their expiry in a file of the certificate directory (`enroll-tokens.txt`, one
//! `HASH EXPIRES_UNIX_S` per line). The coordinator holds sled's lock while it runs, so the
//! offline command writes this file; the coordinator records each token's use in its sled.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use rand::{RngExt, SeedableRng};

use crate::error::{CoordinatorError, Result};
use fedlora_protocol::enroll::token_hash;

/// The token file's name in a certificate directory.
pub const TOKEN_FILE: &str = "enroll-tokens.txt";

/// Makes `count` tokens valid for `ttl_s` seconds from `now_s` (Unix seconds), appends their
/// hashes to `file` (created with mode 0600) and returns the tokens: shown once, never stored.
pub fn issue_tokens(file: &Path, count: usize, ttl_s: u64, now_s: u64) -> Result<Vec<String>> {
    let mut rng = rand::rngs::ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| CoordinatorError::Config(format!("the OS random source: {e}")))?;
    let tokens: Vec<String> = (0..count)
        .map(|_| {
            let bytes: [u8; 20] = rng.random();
            format!("fl-{}", hex::encode(bytes))
        })
        .collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(file)?;
    for t in &tokens {
        writeln!(f, "{} {}", token_hash(t), now_s.saturating_add(ttl_s))?;
    }
    f.sync_all()?;
    Ok(tokens)
}

/// The token file: hash → expiry (Unix seconds). A missing file holds no tokens; a malformed
/// line is an error that names it.
pub fn load_tokens(file: &Path) -> Result<BTreeMap<String, u64>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || {
            CoordinatorError::Config(format!(
                "{}:{}: expected `SHA256_HEX EXPIRES_UNIX_S`",
                file.display(),
                i + 1
            ))
        };
        let (h, exp) = line.split_once(' ').ok_or_else(bad)?;
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        out.insert(h.to_string(), exp.trim().parse().map_err(|_| bad())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hashes_are_stored_and_tokens_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(TOKEN_FILE);
        let t = issue_tokens(&f, 3, 3600, 1_000).unwrap();
        assert_eq!(t.len(), 3);
        assert!(t[0] != t[1] && t[1] != t[2]);
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(t.iter().all(|tok| !text.contains(tok.as_str())));
        let loaded = load_tokens(&f).unwrap();
        assert_eq!(loaded.get(&token_hash(&t[1])), Some(&4_600));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        std::fs::write(&f, "nothex 12\n").unwrap();
        assert!(load_tokens(&f).is_err());
        assert!(load_tokens(&dir.path().join("none")).unwrap().is_empty());
    }
}
