//! Text data: the tiny Shakespeare corpus split by speaking role (as LEAF does), and a client's
//! own text cut into training examples.
//!
//! **A training example is one non-overlapping window of `context + 1` bytes** of a client's text
//! (inputs are the first `context` bytes, targets the last `context`). This is the unit that
//! example-level differential privacy protects.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::TrainError;

/// The corpus shipped in the repository (see `data/README.md` for source and licence).
pub const SHAKESPEARE: &str = include_str!("../../data/tiny_shakespeare.txt");

/// Roles with at least this many bytes of speech become federated clients; all other roles are
/// the public pretraining corpus, so the base model never sees a client's text.
pub const CLIENT_ROLE_MIN_BYTES: usize = 10_000;

/// Share of a client's windows held out for evaluation (taken from the end of its text).
pub const TEST_FRACTION: f64 = 0.1;

/// Most test windows a client keeps (bounds evaluation cost), windows.
pub const MAX_TEST_WINDOWS: usize = 48;

/// A speaking role's text.
#[derive(Clone, Debug)]
pub struct Role {
    /// Speaker name as written in the corpus.
    pub name: String,
    /// Everything the role says, speeches joined by newlines.
    pub text: String,
}

/// Splits the corpus into roles. Each speech block is `NAME:` on one line followed by its lines.
pub fn parse_roles(corpus: &str) -> Vec<Role> {
    let mut by_role: BTreeMap<&str, String> = BTreeMap::new();
    for block in corpus.split("\n\n") {
        let mut lines = block.lines();
        let Some(head) = lines.next() else { continue };
        let Some(name) = head.strip_suffix(':') else {
            continue;
        };
        let text = by_role.entry(name).or_default();
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
    }
    by_role
        .into_iter()
        .map(|(name, text)| Role {
            name: name.to_string(),
            text,
        })
        .collect()
}

/// The corpus split into federated client roles and the disjoint public pretraining text.
#[derive(Clone, Debug)]
pub struct RoleSplit {
    /// Client roles, largest first (ties by name): client `i` is `clients[i]`.
    pub clients: Vec<Role>,
    /// Text of every other role, for pretraining the base model.
    pub public_text: String,
}

/// Splits `corpus` by role: roles with ≥ [`CLIENT_ROLE_MIN_BYTES`] are clients, the rest public.
pub fn split_roles(corpus: &str) -> RoleSplit {
    let mut clients = Vec::new();
    let mut public_text = String::new();
    for r in parse_roles(corpus) {
        if r.text.len() >= CLIENT_ROLE_MIN_BYTES {
            clients.push(r);
        } else {
            public_text.push_str(&r.text);
        }
    }
    clients.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.name.cmp(&b.name)));
    RoleSplit {
        clients,
        public_text,
    }
}

/// Cuts `bytes` into non-overlapping windows of `len` bytes (the tail shorter than `len` is
/// dropped).
pub fn windows(bytes: &[u8], len: usize) -> Vec<Vec<u8>> {
    bytes.chunks_exact(len).map(<[u8]>::to_vec).collect()
}

/// One client's examples: training windows and held-out test windows.
#[derive(Clone, Debug)]
pub struct ClientData {
    /// Name of the data source (role or file).
    pub name: String,
    /// Training examples, each `context + 1` bytes.
    pub train: Vec<Vec<u8>>,
    /// Held-out examples, each `context + 1` bytes.
    pub test: Vec<Vec<u8>>,
}

impl ClientData {
    /// Cuts `text` into windows of `context + 1` bytes; the last [`TEST_FRACTION`] (at least one,
    /// at most [`MAX_TEST_WINDOWS`]) is held out.
    pub fn from_text(name: &str, text: &[u8], context: usize) -> Result<Self, TrainError> {
        let mut w = windows(text, context + 1);
        if w.len() < 2 {
            return Err(TrainError::Data(format!(
                "{name}: {} bytes is too short for two windows of {} bytes",
                text.len(),
                context + 1
            )));
        }
        let n_test = ((w.len() as f64 * TEST_FRACTION).ceil() as usize).clamp(1, MAX_TEST_WINDOWS);
        let test = w.split_off(w.len() - n_test);
        Ok(Self {
            name: name.to_string(),
            train: w,
            test,
        })
    }

    /// Reads a UTF-8 or binary text file as a client's data.
    pub fn from_file(path: &Path, context: usize) -> Result<Self, TrainError> {
        let bytes = std::fs::read(path).map_err(|e| {
            TrainError::Data(format!("cannot read the data file {}: {e}", path.display()))
        })?;
        Self::from_text(&path.display().to_string(), &bytes, context)
    }

    /// The `i`-th demo client: the `i`-th largest speaking role of the shipped corpus.
    pub fn demo_client(i: usize, context: usize) -> Result<Self, TrainError> {
        let split = split_roles(SHAKESPEARE);
        let n = split.clients.len();
        let role = split.clients.get(i).ok_or_else(|| {
            TrainError::Data(format!("demo client index {i} out of range (0..{n})"))
        })?;
        Self::from_text(&role.name, role.text.as_bytes(), context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_split_is_disjoint_and_non_iid() {
        let s = split_roles(SHAKESPEARE);
        assert_eq!(s.clients.len(), 36, "36 roles speak at least 10,000 bytes");
        assert_eq!(s.clients[0].name, "GLOUCESTER");
        // no client speech appears in the public text (checked on a long line of each client)
        for c in &s.clients {
            let line = c.text.lines().max_by_key(|l| l.len()).unwrap();
            assert!(line.len() > 40);
            let in_clients = s.clients.iter().filter(|o| o.text.contains(line)).count();
            if in_clients == 1 {
                assert!(!s.public_text.contains(line), "{}: {line}", c.name);
            }
        }
        let total: usize =
            s.clients.iter().map(|c| c.text.len()).sum::<usize>() + s.public_text.len();
        assert!(total > 1_000_000);
    }

    #[test]
    fn windows_do_not_overlap_and_test_is_held_out() {
        let d = ClientData::demo_client(3, 64).unwrap();
        assert!(d.train.iter().chain(&d.test).all(|w| w.len() == 65));
        assert!(!d.test.is_empty() && d.test.len() <= MAX_TEST_WINDOWS);
        let text = split_roles(SHAKESPEARE).clients[3].text.clone();
        let joined: Vec<u8> = d.train.iter().chain(&d.test).flatten().copied().collect();
        assert_eq!(&text.as_bytes()[..joined.len()], &joined[..]);
        assert!(ClientData::from_text("x", b"short", 64).is_err());
    }
}
