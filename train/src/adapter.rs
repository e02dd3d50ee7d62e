//! Adapters out of and into burn modules, as named flat `f32` buffers.
//!
//! Works on any burn [`Module`] that uses [`LoraLinear`](crate::lora::LoraLinear): the adapter is
//! every float parameter whose name is `lora_a` or `lora_b` (or only `lora_b` with FFA-LoRA), in
//! the module's visiting order, named by its dotted path (e.g. `blocks.0.q.lora_b`). `A` and `B`
//! are already stored in the wire layout, so values are copied as they are.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};
use fedlora_protocol::{check_spec, AdapterSpec, FlatAdapter, TensorSpec};

use crate::error::TrainError;
use crate::lora::LoraConfig;

/// One named tensor: dotted path, shape, row-major values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Which float parameters [`collect_named`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamedFilter {
    /// Every float parameter.
    All,
    /// Everything but adapter tensors (`lora_a`, `lora_b`).
    Base,
    /// Adapter tensors with these final path components.
    Adapter(&'static [&'static str]),
}

impl NamedFilter {
    fn keep(&self, last: &str) -> bool {
        let is_lora = last == "lora_a" || last == "lora_b";
        match self {
            NamedFilter::All => true,
            NamedFilter::Base => !is_lora,
            NamedFilter::Adapter(names) => names.contains(&last),
        }
    }

    /// The adapter filter for `lora` (what is trained and uploaded).
    pub fn adapter_of(lora: &LoraConfig) -> Self {
        if lora.freeze_a {
            NamedFilter::Adapter(&["lora_b"])
        } else {
            NamedFilter::Adapter(&["lora_a", "lora_b"])
        }
    }
}

struct Collector {
    filter: NamedFilter,
    out: Vec<NamedTensor>,
}

impl ModuleVisitor for Collector {
    fn visit_float_with_path<const D: usize>(
        &mut self,
        path: &[String],
        _id: ParamId,
        tensor: &Tensor<D>,
    ) {
        let last = path.last().map(String::as_str).unwrap_or("");
        if self.filter.keep(last) {
            let data = tensor.to_data();
            let shape = data.shape().to_vec();
            let values = data
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("float tensor converts to f32");
            self.out.push((path.join("."), shape, values));
        }
    }
}

/// Path-tracking visitor wrapper: burn calls `visit_float`; we add the path ourselves.
struct PathVisitor<V> {
    path: Vec<String>,
    inner: V,
}

impl ModuleVisitor for PathVisitor<Collector> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.inner.visit_float_with_path(&self.path, param.id, &t);
    }
}

/// Named float parameters of `module` that pass `filter`, in visiting order.
pub fn collect_named<M: Module>(module: &M, filter: NamedFilter) -> Vec<NamedTensor> {
    let mut v = PathVisitor {
        path: Vec::new(),
        inner: Collector {
            filter,
            out: Vec::new(),
        },
    };
    module.visit(&mut v);
    v.inner.out
}

struct Assigner<'a> {
    path: Vec<String>,
    named: std::collections::HashMap<&'a str, &'a NamedTensor>,
    used: usize,
    error: Option<String>,
    /// Loading a rank slice ([`fedlora_protocol::rank`]): LoRA factors take the slice's
    /// shapes, and frozen factors not given (FFA-LoRA's `A`) are cut to the same rank.
    slice_rank: Option<usize>,
}

/// `current` with its LoRA rank dimension set to `r` (rows of `lora_a`, columns of `lora_b`).
fn sliced_shape(last: &str, current: &[usize], r: usize) -> Option<Vec<usize>> {
    let mut s = current.to_vec();
    match (last, s.len()) {
        ("lora_a", 2) => s[0] = r,
        ("lora_b", 2) => s[1] = r,
        _ => return None,
    }
    Some(s)
}

impl ModuleMapper for Assigner<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.join(".");
        let last = self.path.last().map(String::as_str).unwrap_or("");
        let current = param.val().dims().to_vec();
        let sliced = self
            .slice_rank
            .and_then(|r| sliced_shape(last, &current, r));
        let Some((_, shape, values)) = self.named.get(key.as_str()).copied() else {
            // a frozen factor of a rank slice: keep its first r components
            return match sliced {
                Some(want) if want != current => param.map(move |old| {
                    let req = old.is_require_grad();
                    let ranges: [std::ops::Range<usize>; D] = std::array::from_fn(|i| 0..want[i]);
                    old.slice(ranges).set_require_grad(req)
                }),
                _ => param,
            };
        };
        if &current != shape && sliced.as_ref() != Some(shape) {
            self.error = Some(format!(
                "tensor `{key}` has shape {current:?}, the values are for {shape:?}"
            ));
            return param;
        }
        self.used += 1;
        let values = values.clone();
        let shape = shape.clone();
        param.map(move |old| {
            let req = old.is_require_grad();
            Tensor::<D>::from_data(TensorData::new(values, shape), &old.device())
                .set_require_grad(req)
        })
    }
}

/// Replaces the parameters of `module` named in `named` (by dotted path). Every name must exist
/// with the same shape; parameter ids (and so optimizer state) are kept.
pub fn assign_named<M: Module>(module: M, named: &[NamedTensor]) -> Result<M, TrainError> {
    assign_named_sliced(module, named, None)
}

/// [`assign_named`] for a rank slice: LoRA factors may have rank `slice_rank` instead of the
/// module's, and frozen factors that `named` does not give are cut to that rank.
fn assign_named_sliced<M: Module>(
    module: M,
    named: &[NamedTensor],
    slice_rank: Option<usize>,
) -> Result<M, TrainError> {
    let mut a = Assigner {
        path: Vec::new(),
        named: named.iter().map(|t| (t.0.as_str(), t)).collect(),
        used: 0,
        error: None,
        slice_rank,
    };
    let module = module.map(&mut a);
    if let Some(e) = a.error {
        return Err(TrainError::Model(e));
    }
    if a.used != named.len() {
        return Err(TrainError::Model(format!(
            "{} of {} tensors matched a parameter of the model",
            a.used,
            named.len()
        )));
    }
    Ok(module)
}

/// The adapter spec of `module` under `lora` (trainable adapter tensors, in order).
pub fn adapter_spec<M: Module>(module: &M, lora: &LoraConfig) -> AdapterSpec {
    let tensors = collect_named(module, NamedFilter::adapter_of(lora))
        .into_iter()
        .map(|(name, shape, _)| TensorSpec { name, shape })
        .collect();
    AdapterSpec::new(tensors).expect("module paths are unique")
}

/// The adapter of `module` as one flat buffer.
pub fn extract_adapter<M: Module>(module: &M, lora: &LoraConfig) -> FlatAdapter {
    let named = collect_named(module, NamedFilter::adapter_of(lora));
    let spec = AdapterSpec::new(
        named
            .iter()
            .map(|(n, s, _)| TensorSpec {
                name: n.clone(),
                shape: s.clone(),
            })
            .collect(),
    )
    .expect("module paths are unique");
    let values = named.into_iter().flat_map(|t| t.2).collect();
    FlatAdapter::new(spec, values).expect("sizes match by construction")
}

/// Loads `adapter` into `module`. Refused with [`TrainError::Protocol`] (spec mismatch) unless
/// the adapter's spec hash equals the module's, or is the module's adapter cut to a lower rank
/// ([`fedlora_protocol::rank::slice_spec`]): then the module's LoRA factors take the slice's
/// rank (frozen factors, such as FFA-LoRA's `A`, are cut to it), so the module trains a
/// rank-r adapter with the module's scaling α / R.
pub fn load_adapter<M: Module>(
    module: M,
    lora: &LoraConfig,
    adapter: &FlatAdapter,
) -> Result<M, TrainError> {
    let full = adapter_spec(&module, lora);
    let (spec, slice_rank) = if full.hash() == adapter.spec().hash() {
        (full, None)
    } else {
        // a rank slice of this module's adapter (heterogeneous ranks), or a foreign adapter
        let slice = fedlora_protocol::rank::spec_rank(adapter.spec())
            .and_then(|r| Ok((fedlora_protocol::rank::slice_spec(&full, r)?, r)));
        match slice {
            Ok((s, r)) if s.hash() == adapter.spec().hash() => (s, Some(r)),
            _ => {
                check_spec(&full.hash(), &adapter.spec().hash())?;
                (full, None)
            }
        }
    };
    let named: Vec<NamedTensor> = spec
        .tensors()
        .iter()
        .zip(spec.offsets())
        .map(|(t, (off, len))| {
            (
                t.name.clone(),
                t.shape.clone(),
                adapter.values()[off..off + len].to_vec(),
            )
        })
        .collect();
    assign_named_sliced(module, &named, slice_rank)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LmConfig;
    use burn::tensor::Device;

    fn cfg(freeze_a: bool) -> LmConfig {
        LmConfig::new()
            .with_d_model(16)
            .with_n_layers(2)
            .with_n_heads(2)
            .with_d_ff(32)
            .with_context(8)
            .with_lora(Some(
                LoraConfig::new()
                    .with_rank(2)
                    .with_freeze_a(freeze_a)
                    .with_targets(vec!["q".into(), "v".into(), "fc1".into()]),
            ))
    }

    #[test]
    fn spec_names_and_shapes_in_wire_layout() {
        let c = cfg(false);
        let lm = c.init(&Device::flex());
        let spec = adapter_spec(&lm, c.lora.as_ref().unwrap());
        let names: Vec<_> = spec.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names[0], "blocks.0.q.lora_a");
        assert_eq!(names[1], "blocks.0.q.lora_b");
        assert_eq!(names.len(), 2 * 3 * 2);
        assert_eq!(spec.tensors()[0].shape, vec![2, 16]); // A: [r, d_in]
        let fc1_b = spec
            .tensors()
            .iter()
            .find(|t| t.name == "blocks.1.fc1.lora_b")
            .unwrap();
        assert_eq!(fc1_b.shape, vec![32, 2]); // B: [d_out, r]
                                              // FFA-LoRA uploads only B: half of the tensors
        let c2 = cfg(true);
        let spec2 = adapter_spec(&c2.init(&Device::flex()), c2.lora.as_ref().unwrap());
        assert_eq!(spec2.tensors().len(), 6);
        assert_ne!(spec.hash(), spec2.hash());
    }

    #[test]
    fn adapter_round_trip_is_lossless() {
        let c = cfg(false);
        let lora = c.lora.clone().unwrap();
        let device = Device::flex().autodiff();
        let lm = c.init(&device);
        let spec = adapter_spec(&lm, &lora);
        let values: Vec<f32> = (0..spec.numel())
            .map(|i| (i as f32 * 0.731).sin())
            .collect();
        let adapter = FlatAdapter::new(spec, values).unwrap();
        let lm = load_adapter(lm, &lora, &adapter).unwrap();
        let back = extract_adapter(&lm, &lora);
        assert_eq!(back, adapter);
        // still trainable after loading
        let b = &lm.blocks[0].q.lora_b.as_ref().unwrap().val();
        assert!(b.is_require_grad());
        assert!(!lm.blocks[0].q.weight.val().is_require_grad());
    }

    #[test]
    fn wrong_spec_adapter_is_refused() {
        let c = cfg(false);
        let lora = c.lora.clone().unwrap();
        let lm = c.init(&Device::flex());
        let other = cfg(true);
        let other_lm = other.init(&Device::flex());
        let foreign = extract_adapter(&other_lm, other.lora.as_ref().unwrap());
        let err = load_adapter(lm, &lora, &foreign).unwrap_err();
        assert!(err.to_string().contains("spec mismatch"), "{err}");
    }
}
