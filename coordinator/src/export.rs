//! Export of a committed global adapter as safetensors, for use outside fedlora.

use std::path::Path;

use fedlora_protocol::{Codec, FlatAdapter};
use safetensors::tensor::{Dtype, TensorView};

use crate::error::{CoordinatorError, Result};
use crate::store::Store;

/// The global adapter of `version` (the latest when `None`) and its version number.
pub fn global_adapter(store: &Store, version: Option<u64>) -> Result<(u64, FlatAdapter)> {
    let (_, spec) = store.setup()?.ok_or_else(|| {
        CoordinatorError::Storage("the data directory holds no federation".into())
    })?;
    let version = match version {
        Some(v) => v,
        None => store.state()?.map(|s| s.global_version).unwrap_or_default(),
    };
    let adapter = Codec::decode(
        &store.checkpoint(version)?,
        &spec,
        Some(&Codec::DenseF32),
        &Default::default(),
    )?;
    Ok((version, adapter))
}

/// Writes global version `version` (the latest when `None`) to `out` as safetensors: one F32
/// tensor per adapter tensor, named as in the spec, in the wire layout (`A` `[r, d_in]`,
/// `B` `[d_out, r]`). Returns the version written.
pub fn export_safetensors(store: &Store, version: Option<u64>, out: &Path) -> Result<u64> {
    let (version, adapter) = global_adapter(store, version)?;
    let spec = adapter.spec().clone();
    let bytes: Vec<Vec<u8>> = spec
        .offsets()
        .iter()
        .map(|&(off, len)| {
            adapter.values()[off..off + len]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        })
        .collect();
    let views = spec
        .tensors()
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| CoordinatorError::Storage(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([
        ("fedlora_version".to_string(), version.to_string()),
        ("fedlora_spec".to_string(), spec.short_hash()),
        (
            "layout".to_string(),
            "lora_a [r, d_in], lora_b [d_out, r], row-major".to_string(),
        ),
    ]);
    safetensors::tensor::serialize_to_file(views, Some(meta), out)
        .map_err(|e| CoordinatorError::Storage(e.to_string()))?;
    Ok(version)
}
