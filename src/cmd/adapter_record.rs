//! What a coordinator's data directory records about the adapter it trains (`adapter.json`),
//! so that `fedlora export --peft` and `fedlora eval --data-dir` ask only for what the
//! directory cannot know: where the model file lies on this machine. The file's hash is then
//! checked against the one the federation trained on.
//!
//! The record is trusted as the data directory is: it catches a wrong or moved model file, not
//! a directory someone tampered with (whoever can write it can also rewrite the store).

use std::path::{Path, PathBuf};

use fedlora_device::model_args::ModelArgs;
use fedlora_protocol::AdapterSpec;
use serde::{Deserialize, Serialize};

use super::UsageError;

/// The record's file name inside a data directory.
pub(crate) const FILE: &str = "adapter.json";

/// The adapter a data directory's federation trains.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AdapterRecord {
    /// The model and adapter flags the coordinator ran with (paths made absolute).
    pub model: ModelArgs,
    /// The adapter spec's hash, hex: it binds the tensor names and shapes and the base model's
    /// identity.
    pub spec_hash: String,
    /// The base model's identity (`sha256:` and the model file's SHA-256) for a real LLM.
    pub base_id: Option<String>,
}

impl AdapterRecord {
    /// The record of a coordinator started with `model` serving `spec`.
    pub(crate) fn new(model: &ModelArgs, spec: &AdapterSpec) -> Self {
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut model = model.clone();
        model.base = absolute(&model.base);
        model.model = model.model.as_deref().map(absolute);
        Self {
            model,
            spec_hash: hex::encode(spec.hash()),
            base_id: spec.base().map(str::to_string),
        }
    }

    /// The model file to load: `given` (the user's `--model`) or the recorded path.
    pub(crate) fn model_path(&self, given: Option<&Path>) -> anyhow::Result<PathBuf> {
        match (given, &self.model.model) {
            (Some(p), _) => Ok(p.to_path_buf()),
            (None, Some(p)) if p.is_file() || p.is_dir() => Ok(p.clone()),
            (None, Some(p)) => Err(UsageError(format!(
                "the federation trained on {} ({}), which is not at that path here: give \
                 --model with the same file",
                p.display(),
                self.base_id.as_deref().unwrap_or("no recorded hash")
            ))
            .into()),
            (None, None) => Err(UsageError(
                "this federation trained the byte-level model, not a real LLM".into(),
            )
            .into()),
        }
    }

    /// Checks that `spec` (made from the model file the user pointed at, with the recorded
    /// adapter flags) is the one the federation trained.
    pub(crate) fn check(&self, spec: &AdapterSpec, path: &Path) -> anyhow::Result<()> {
        if hex::encode(spec.hash()) == self.spec_hash {
            return Ok(());
        }
        let got = spec.base().unwrap_or("none");
        let want = self.base_id.as_deref().unwrap_or("none");
        Err(UsageError(if got != want {
            format!(
                "{} is not the model this federation trained on: its identity is {got}, the \
                 data directory records {want}",
                path.display()
            )
        } else {
            format!(
                "the adapter made from {} with the recorded flags ({}) does not match the \
                 data directory's adapter",
                path.display(),
                self.model.describe()
            )
        })
        .into())
    }
}

/// Reads `dir`'s record; `None` when the directory has none (a coordinator older than the
/// record, or one that never started).
pub(crate) fn read(dir: &Path) -> anyhow::Result<Option<AdapterRecord>> {
    let path = dir.join(FILE);
    match std::fs::metadata(&path) {
        Ok(m) if !m.is_file() || m.len() > 1 << 20 => {
            return Err(UsageError(format!(
                "{}: not an adapter record (not a regular file of at most 1 MiB)",
                path.display()
            ))
            .into())
        }
        _ => {}
    }
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
            UsageError(format!("{}: not an adapter record: {e}", path.display()))
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(UsageError(format!("cannot read {}: {e}", path.display())).into()),
    }
}

/// Writes `record` into `dir` whole (a temporary file, fsynced, renamed over the old one, and
/// the directory fsynced), so a crash leaves the old record or the new one.
pub(crate) fn write(dir: &Path, record: &AdapterRecord) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(record)?;
    fedlora_client::durable::replace_file(&dir.join(FILE), &bytes)?;
    Ok(())
}

/// The adapter flags the user typed, when they differ from the record: a usage error naming
/// both (flags left at their defaults are taken from the record).
pub(crate) fn refuse_other_flags(given: &ModelArgs, record: &AdapterRecord) -> anyhow::Result<()> {
    let defaults = ModelArgs::byte_level(given.base.clone());
    let typed = given.rank != defaults.rank
        || given.alpha != defaults.alpha
        || !given.targets.is_empty()
        || given.ffa;
    let r = &record.model;
    if typed
        && (given.rank != r.rank
            || given.alpha != r.alpha
            || given.ffa != r.ffa
            || (!given.targets.is_empty() && given.targets != r.targets))
    {
        return Err(UsageError(format!(
            "the data directory records the adapter flags `{}`; leave the adapter flags out (or \
             give the same ones)",
            r.describe()
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_a_round_trip_and_checks_the_spec() {
        let dir = tempfile::tempdir().unwrap();
        let spec = AdapterSpec::new(vec![fedlora_protocol::TensorSpec {
            name: "a".into(),
            shape: vec![2, 3],
        }])
        .unwrap()
        .with_base("sha256:00");
        let mut args = ModelArgs::byte_level(PathBuf::from("m"));
        args.model = Some(PathBuf::from("model.gguf"));
        let rec = AdapterRecord::new(&args, &spec);
        assert!(rec.model.model.as_ref().unwrap().is_absolute());
        write(dir.path(), &rec).unwrap();
        let back = read(dir.path()).unwrap().unwrap();
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&rec).unwrap()
        );
        assert!(read(&dir.path().join("none")).unwrap().is_none());
        rec.check(&spec, Path::new("x")).unwrap();
        let other = spec.clone().with_base("sha256:11");
        let e = rec.check(&other, Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("sha256:11") && e.contains("sha256:00"), "{e}");
        // flags typed on the command line must agree with the record
        let mut typed = ModelArgs::byte_level(PathBuf::from("m"));
        refuse_other_flags(&typed, &rec).unwrap();
        typed.rank = 4;
        assert!(refuse_other_flags(&typed, &rec).is_err());
    }
}
