//! Adapters as data: an ordered list of named tensors ([`AdapterSpec`]) and their values as one
//! flat `f32` buffer ([`FlatAdapter`]).
//!
//! # Wire layout
//! Every tensor is stored **row-major** in the order the spec lists it. LoRA factors use the
//! PyTorch/PEFT convention: `A` is `[r, d_in]` and `B` is `[d_out, r]`, so `ΔW = B·A` is
//! `[d_out, d_in]`. The client crate is the one place that converts from burn's own layout.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ProtocolError;

/// Name and shape of one tensor of an adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Dotted path of the tensor, e.g. `blocks.0.attn.q.lora_a`.
    pub name: String,
    /// Shape, row-major.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of scalar values in the tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The SHA-256 of an [`AdapterSpec`]'s canonical encoding.
pub type SpecHash = [u8; 32];

/// Ordered tensor names and shapes of an adapter, the identity of the base model it adapts,
/// and the hash that identifies them.
///
/// Two adapters can be subtracted, averaged or applied to each other only if their specs hash the
/// same. The hash covers names, shapes, order and, when set, the base model's identity (so a
/// client holding another base with the same shapes is refused).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterSpec {
    tensors: Vec<TensorSpec>,
    #[serde(default)]
    base: Option<String>,
}

impl AdapterSpec {
    /// A spec from tensors in their wire order. Names must be unique and shapes non-empty.
    pub fn new(tensors: Vec<TensorSpec>) -> Result<Self, ProtocolError> {
        let mut names = std::collections::BTreeSet::new();
        for t in &tensors {
            if !names.insert(t.name.as_str()) {
                return Err(ProtocolError::InvalidSpec(format!(
                    "duplicate tensor name `{}`",
                    t.name
                )));
            }
            if t.shape.is_empty() || t.numel() == 0 {
                return Err(ProtocolError::InvalidSpec(format!(
                    "tensor `{}` has an empty shape",
                    t.name
                )));
            }
        }
        Ok(Self {
            tensors,
            base: None,
        })
    }

    /// The same spec bound to a base model: `id` names it exactly (fedlora uses a SHA-256 of
    /// the model file, e.g. `sha256:…`), and enters the hash.
    pub fn with_base(mut self, id: impl Into<String>) -> Self {
        self.base = Some(id.into());
        self
    }

    /// The base model's identity, if the spec is bound to one.
    pub fn base(&self) -> Option<&str> {
        self.base.as_deref()
    }

    /// The tensors, in wire order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Total number of scalar values over all tensors.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// SHA-256 over a canonical encoding: for each tensor, the name length (u32 LE), the name
    /// bytes, the rank (u32 LE), then every dimension (u64 LE).
    pub fn hash(&self) -> SpecHash {
        let mut h = Sha256::new();
        h.update(b"fedlora-adapter-spec-v1");
        for t in &self.tensors {
            h.update((t.name.len() as u32).to_le_bytes());
            h.update(t.name.as_bytes());
            h.update((t.shape.len() as u32).to_le_bytes());
            for d in &t.shape {
                h.update((*d as u64).to_le_bytes());
            }
        }
        if let Some(base) = &self.base {
            h.update(b"base");
            h.update((base.len() as u32).to_le_bytes());
            h.update(base.as_bytes());
        }
        h.finalize().into()
    }

    /// Short hex form of the hash (first 8 bytes), for logs and errors.
    pub fn short_hash(&self) -> String {
        hex::encode(&self.hash()[..8])
    }

    /// `(offset, len)` of each tensor in the flat buffer, in wire order.
    pub fn offsets(&self) -> Vec<(usize, usize)> {
        let mut off = 0;
        self.tensors
            .iter()
            .map(|t| {
                let n = t.numel();
                let r = (off, n);
                off += n;
                r
            })
            .collect()
    }
}

/// An adapter's values as one flat `f32` buffer laid out as its [`AdapterSpec`] says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlatAdapter {
    spec: AdapterSpec,
    values: Vec<f32>,
}

impl FlatAdapter {
    /// Wraps `values`; fails if their count differs from the spec's.
    pub fn new(spec: AdapterSpec, values: Vec<f32>) -> Result<Self, ProtocolError> {
        if values.len() != spec.numel() {
            return Err(ProtocolError::ShapeMismatch {
                expected: spec.numel(),
                got: values.len(),
            });
        }
        Ok(Self { spec, values })
    }

    /// All zeros for `spec`.
    pub fn zeros(spec: AdapterSpec) -> Self {
        let n = spec.numel();
        Self {
            spec,
            values: vec![0.0; n],
        }
    }

    /// The spec.
    pub fn spec(&self) -> &AdapterSpec {
        &self.spec
    }

    /// The flat values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Mutable flat values.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Takes the values out.
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    /// The values of the tensor called `name`, if the spec has it.
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        let idx = self.spec.tensors.iter().position(|t| t.name == name)?;
        let (off, len) = self.spec.offsets()[idx];
        Some(&self.values[off..off + len])
    }

    /// Refuses `other` unless its spec hash equals ours.
    pub fn check_same_spec(&self, other: &AdapterSpec) -> Result<(), ProtocolError> {
        check_spec(&self.spec.hash(), &other.hash())
    }

    /// `self − base`, element-wise: the delta a client uploads.
    pub fn delta_from(&self, base: &FlatAdapter) -> Result<FlatAdapter, ProtocolError> {
        self.check_same_spec(base.spec())?;
        let values = self
            .values
            .iter()
            .zip(&base.values)
            .map(|(a, b)| a - b)
            .collect();
        Ok(FlatAdapter {
            spec: self.spec.clone(),
            values,
        })
    }

    /// `self += delta`, element-wise.
    pub fn apply_delta(&mut self, delta: &FlatAdapter) -> Result<(), ProtocolError> {
        self.check_same_spec(delta.spec())?;
        for (v, d) in self.values.iter_mut().zip(&delta.values) {
            *v += d;
        }
        Ok(())
    }
}

/// Refuses a spec hash that differs from the expected one, with both in the error.
pub fn check_spec(expected: &SpecHash, got: &SpecHash) -> Result<(), ProtocolError> {
    if expected != got {
        return Err(ProtocolError::SpecMismatch {
            expected: hex::encode(&expected[..8]),
            got: hex::encode(&got[..8]),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> AdapterSpec {
        AdapterSpec::new(vec![
            TensorSpec {
                name: "l0.q.lora_a".into(),
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "l0.q.lora_b".into(),
                shape: vec![4, 2],
            },
        ])
        .unwrap()
    }

    #[test]
    fn hash_depends_on_names_shapes_and_order() {
        let a = spec();
        let mut t = a.tensors().to_vec();
        t.swap(0, 1);
        let b = AdapterSpec::new(t.clone()).unwrap();
        assert_ne!(a.hash(), b.hash());
        t[0].shape = vec![8, 1];
        assert_ne!(b.hash(), AdapterSpec::new(t.clone()).unwrap().hash());
        t[0].name = "x".into();
        assert_ne!(b.hash(), AdapterSpec::new(t).unwrap().hash());
        assert_eq!(a.hash(), spec().hash());
    }

    #[test]
    fn the_base_models_identity_enters_the_hash() {
        let a = spec().with_base("sha256:aa");
        assert_ne!(a.hash(), spec().hash());
        assert_ne!(a.hash(), spec().with_base("sha256:ab").hash());
        assert_eq!(a.hash(), spec().with_base("sha256:aa").hash());
        assert_eq!(a.base(), Some("sha256:aa"));
        let d = FlatAdapter::zeros(a.clone());
        assert!(d.delta_from(&FlatAdapter::zeros(spec())).is_err());
    }

    #[test]
    fn duplicate_names_refused() {
        let t = TensorSpec {
            name: "a".into(),
            shape: vec![1],
        };
        assert!(AdapterSpec::new(vec![t.clone(), t]).is_err());
    }

    #[test]
    fn delta_then_apply_round_trips() {
        let s = spec();
        let base = FlatAdapter::new(s.clone(), (0..14).map(|i| i as f32 * 0.5).collect()).unwrap();
        let local = FlatAdapter::new(s, (0..14).map(|i| (i * i) as f32).collect()).unwrap();
        let d = local.delta_from(&base).unwrap();
        let mut back = base.clone();
        back.apply_delta(&d).unwrap();
        assert_eq!(back, local);
        assert_eq!(local.tensor("l0.q.lora_b").unwrap().len(), 8);
    }

    #[test]
    fn wrong_spec_refused() {
        let a = FlatAdapter::zeros(spec());
        let other = AdapterSpec::new(vec![TensorSpec {
            name: "z".into(),
            shape: vec![14],
        }])
        .unwrap();
        let b = FlatAdapter::zeros(other);
        let err = a.delta_from(&b).unwrap_err();
        assert!(matches!(err, ProtocolError::SpecMismatch { .. }), "{err}");
        assert!(FlatAdapter::new(spec(), vec![0.0; 3]).is_err());
    }
}
