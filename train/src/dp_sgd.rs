//! DP-SGD on the LoRA parameters of a [`DpModel`]: the byte-level [`Lm`] or a real LLM
//! ([`crate::llm::llama::LlamaLm`]).
//!
//! # Guarantee
//! Each step Poisson-samples the client's training windows with rate q (every window
//! independently; a large sample is processed in chunks, never truncated), computes every
//! sampled example's gradient of its own loss with respect to the trainable adapter tensors, clips
//! each example's gradient to L2 norm ≤ C **jointly over all adapter tensors**, sums, adds
//! N(0, σ²C²) to every coordinate and divides by the expected batch size q·n. With the base model
//! frozen, this is the Poisson-subsampled Gaussian mechanism with noise multiplier σ under
//! add/remove-one-example neighbours; [`fedlora_dp`] accounts it. The sampling RNG and the noise
//! must come from the OS CSPRNG in deployments (the SDK does that); seeds are for tests and
//! simulations only.
//!
//! # Per-example gradients in one backward pass
//! burn has no vmap. Each adapter tensor is expanded into a fresh leaf of shape
//! `[batch, …]` (one copy per example) and used with batched matmuls
//! ([`LoraLinear::forward_per_example`](crate::lora::LoraLinear::forward_per_example)); the sum
//! of the per-example losses is differentiated once, and each copy's gradient is exactly that
//! example's gradient. LoRA keeps the copies small.

use burn::tensor::{Device, Tensor, TensorData};
use fedlora_dp::GaussianNoise;
use rand::{Rng, RngExt};

use crate::model::ExampleAdapters;
pub use crate::trainable::{adapter_params, to_gradients_params, AdapterParam, DpModel};

/// The DP-SGD parameters of one local training run.
#[derive(Clone, Debug, PartialEq)]
pub struct DpSgdConfig {
    /// Per-example L2 clip norm C (over all adapter tensors jointly). `f64::INFINITY` disables
    /// clipping (then there is no privacy).
    pub clip_norm: f64,
    /// Noise multiplier σ: the noise std is σ·C.
    pub noise_multiplier: f64,
    /// Expected batch size q·n: the divisor of the noisy sum, and q = this / n.
    pub expected_batch: usize,
    /// Largest number of examples per backward pass (memory bound), examples.
    pub max_chunk: usize,
    /// `Some(L)`: also release each step's training loss through the Gaussian mechanism
    /// ([`fedlora_dp::noisy_clipped_sum`]: per-example losses clipped to [0, L], summed over
    /// the step's Poisson batch, noise σ·L), which the ledger must record as multiplier σ/√2.
    /// `None` (the default): the loss is not released.
    pub loss_clip: Option<f64>,
    /// **Privacy audits only** (never set by the SDK): Dirac gradient canaries, as indexes into
    /// the flat adapter ([`crate::adapter::extract_adapter`]'s layout). Each is one more example
    /// of this client whose clipped gradient is `C·e_k`: every step samples it with the same
    /// rate q as the real examples and adds `C` to coordinate `k` of the sum before the noise,
    /// so the mechanism the ledger accounts is unchanged (an example whose gradient the auditor
    /// chose). Empty (the default everywhere else): nothing is added and no randomness drawn.
    pub dirac_canaries: Vec<usize>,
}

/// `batch` copies of an adapter tensor as a fresh autodiff leaf `[batch, …]`, tracked when the
/// tensor is trainable: each copy's gradient is then exactly one example's gradient.
pub fn per_example_copies(t: Tensor<2>, batch: usize) -> Tensor<3> {
    let train = t.is_require_grad();
    let rep = t
        .inner()
        .unsqueeze_dim::<3>(0)
        .repeat_dim(0, batch)
        .autodiff();
    if train {
        rep.require_grad()
    } else {
        rep
    }
}

/// Per-example gradients of each example's mean loss with respect to every trainable adapter
/// tensor, in one backward pass. Returns, in [`adapter_params`] order, tensors `[batch, …]`
/// (inner backend), and the per-example losses.
pub fn per_example_grads<M: DpModel>(
    lm: &M,
    windows: &[&M::Example],
    device: &Device,
) -> (Vec<Tensor<3>>, Vec<f32>) {
    let b = windows.len();
    let mut map = ExampleAdapters::new();
    let mut leaves: Vec<Tensor<3>> = Vec::new();
    for (path, l) in lm.lora_layers() {
        let a = per_example_copies(l.lora_a.as_ref().expect("adapter").val(), b);
        let bb = per_example_copies(l.lora_b.as_ref().expect("adapter").val(), b);
        for t in [&a, &bb] {
            if t.is_require_grad() {
                leaves.push(t.clone());
            }
        }
        map.insert(path, (a, bb));
    }
    let per = lm.example_losses(windows, Some(&map), device);
    let losses = per
        .clone()
        .inner()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32");
    let grads = per.sum().backward();
    let g = leaves
        .iter()
        .map(|t| t.grad(&grads).expect("leaf has a gradient"))
        .collect();
    (g, losses)
}

/// The noisy, clipped, averaged gradient of one DP-SGD step over the sampled `windows`, in
/// [`adapter_params`] order (2-D, inner backend), plus the per-example pre-clip norms and losses.
pub fn dp_gradient<M: DpModel>(
    lm: &M,
    windows: &[&M::Example],
    cfg: &DpSgdConfig,
    noise: &mut GaussianNoise,
    device: &Device,
) -> (Vec<Tensor<2>>, Vec<f64>, Vec<f32>) {
    dp_gradient_with_canaries(lm, windows, &[], cfg, noise, device)
}

/// [`dp_gradient`] with the step's sampled Dirac canaries `canaries` ((tensor index in
/// [`adapter_params`] order, row-major offset) pairs, from [`crate::trainable::flat_positions`]):
/// each adds the clip norm `C` to its coordinate of the clipped sum, before the noise. Only the
/// privacy audit passes any (see [`DpSgdConfig::dirac_canaries`]).
pub fn dp_gradient_with_canaries<M: DpModel>(
    lm: &M,
    windows: &[&M::Example],
    canaries: &[(usize, usize)],
    cfg: &DpSgdConfig,
    noise: &mut GaussianNoise,
    device: &Device,
) -> (Vec<Tensor<2>>, Vec<f64>, Vec<f32>) {
    let params = adapter_params(lm);
    let inner = device.clone().inner();
    let mut sums: Vec<Tensor<2>> = params
        .iter()
        .map(|p| Tensor::<2>::zeros(p.value.dims(), &inner))
        .collect();
    let mut norms = Vec::new();
    let mut losses = Vec::new();
    for chunk in windows.chunks(cfg.max_chunk.max(1)) {
        let (grads, l) = per_example_grads(lm, chunk, device);
        losses.extend(l);
        norms.extend(accumulate_clipped(&mut sums, grads, cfg.clip_norm));
    }
    add_dirac(&mut sums, canaries, cfg.clip_norm);
    (noisy_mean(sums, cfg, noise), norms, losses)
}

/// Adds `clip_norm` at each (tensor, row-major offset) of `canaries` to `sums`: the clipped
/// gradients of Dirac canary examples (each of L2 norm exactly C). Positions outside a tensor
/// are ignored.
pub fn add_dirac(sums: &mut [Tensor<2>], canaries: &[(usize, usize)], clip_norm: f64) {
    if canaries.is_empty() || !clip_norm.is_finite() {
        return;
    }
    for (j, s) in sums.iter_mut().enumerate() {
        let dims = s.dims();
        let mut add = vec![0f32; dims[0] * dims[1]];
        let mut any = false;
        for &(_, off) in canaries.iter().filter(|(t, _)| *t == j) {
            if let Some(v) = add.get_mut(off) {
                *v += clip_norm as f32;
                any = true;
            }
        }
        if any {
            let device = s.device();
            *s = s.clone() + Tensor::<2>::from_data(TensorData::new(add, dims), &device);
        }
    }
}

/// Clips each example's gradient to L2 norm ≤ `clip_norm` **jointly** over all tensors and adds
/// it to `sums`. `grads[j]` is `[batch, r, c]` (example `i`'s gradient of tensor `j` at index
/// `i`), `sums[j]` is `[r, c]`; all on the inner (non-autodiff) backend. Returns the pre-clip
/// norms. This is the sensitivity-bounding step every DP-SGD trainer in fedlora shares.
pub fn accumulate_clipped(
    sums: &mut [Tensor<2>],
    grads: Vec<Tensor<3>>,
    clip_norm: f64,
) -> Vec<f64> {
    let Some(first) = grads.first() else {
        return Vec::new();
    };
    let b = first.dims()[0];
    let inner = first.device();
    let mut sq = Tensor::<1>::zeros([b], &inner);
    for g in &grads {
        sq = sq
            + g.clone()
                .powf_scalar(2.0)
                .sum_dim(2)
                .sum_dim(1)
                .reshape([b]);
    }
    let n: Vec<f64> = sq
        .sqrt()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32")
        .into_iter()
        .map(f64::from)
        .collect();
    let factors: Vec<f32> = n
        .iter()
        .map(|&x| fedlora_dp::mechanism::clip_factor(x, clip_norm) as f32)
        .collect();
    let f = Tensor::<1>::from_data(TensorData::new(factors, [b]), &inner).reshape([b, 1, 1]);
    for (s, g) in sums.iter_mut().zip(grads) {
        let [_, r, c] = g.dims();
        *s = s.clone() + (g * f.clone()).sum_dim(0).reshape([r, c]);
    }
    n
}

/// The Gaussian mechanism on clipped sums: adds N(0, (σ·C)²) from `noise` to every coordinate
/// and divides by the expected batch size `q·n` (a fixed public number, so the division is
/// post-processing).
pub fn noisy_mean(
    sums: Vec<Tensor<2>>,
    cfg: &DpSgdConfig,
    noise: &mut GaussianNoise,
) -> Vec<Tensor<2>> {
    let std = cfg.noise_multiplier * cfg.clip_norm;
    sums.into_iter()
        .map(|s| {
            let dims = s.dims();
            let s = if std > 0.0 && std.is_finite() {
                let z = noise.sample(dims[0] * dims[1]);
                let device = s.device();
                s + Tensor::<2>::from_data(TensorData::new(z, dims), &device)
            } else {
                s
            };
            s.div_scalar(cfg.expected_batch.max(1) as f64)
        })
        .collect()
}

/// Accumulates the released (noised) training loss of DP steps (see
/// [`crate::train::TrainOutcome::released_loss`]).
#[derive(Default)]
pub struct LossRelease {
    sum: f64,
    steps: usize,
}

impl LossRelease {
    /// Releases one step's loss if `dp` asks for it: the per-example `losses` of the step's
    /// batch, clipped, summed and noised with `noise`'s stream, ÷ the expected batch.
    pub fn step(
        &mut self,
        dp: &DpSgdConfig,
        losses: impl IntoIterator<Item = f64>,
        noise: &mut fedlora_dp::GaussianNoise,
    ) {
        if let Some(l) = dp.loss_clip {
            let s = fedlora_dp::noisy_clipped_sum(losses, l, dp.noise_multiplier, noise);
            self.sum += s / dp.expected_batch.max(1) as f64;
            self.steps += 1;
        }
    }

    /// The mean released loss over the steps, if any was released.
    pub fn mean(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.sum / self.steps as f64)
    }
}

/// The local DP-SGD run every trainer shares: `cfg.local_steps` Adam steps on `model` (whose
/// only trainable tensors are its adapter's), each on a Poisson sample of `train` at rate
/// `q = dp.expected_batch / n` drawn from `rng`, with the clipped, noised gradient of
/// [`dp_gradient`] (noise from `noise`), plus FedProx's proximal gradient after the noise when
/// `cfg.proximal_mu` > 0 (post-processing). Returns the trained model, the per-example loss sum
/// and count (never sent), the steps taken (fewer when the round's [`crate::step_gate`]
/// closes: the accountant was charged for all of them, so stopping early only releases less),
/// and the released loss if `dp.loss_clip` asks for one.
pub fn dp_train_steps<M, T, R>(
    mut model: M,
    train: &[T],
    cfg: &fedlora_protocol::TrainConfig,
    dp: &DpSgdConfig,
    rng: &mut R,
    noise: &mut GaussianNoise,
    device: &Device,
) -> crate::local_run::LocalRun<M>
where
    M: DpModel + burn::module::Module,
    T: std::borrow::Borrow<M::Example>,
    R: Rng + ?Sized,
{
    let q = (dp.expected_batch as f64 / train.len().max(1) as f64).min(1.0);
    let mut opt = crate::local_run::local_optimizer(cfg.optimizer);
    let (mut loss_sum, mut loss_n) = (0.0, 0usize);
    let mut release = LossRelease::default();
    let anchor = crate::proximal::anchor(&model, cfg.proximal_mu);
    let canaries = crate::trainable::flat_positions(&model, &dp.dirac_canaries);
    let mut steps = 0;
    for _ in 0..cfg.local_steps {
        if !crate::step_gate::proceed() {
            break;
        }
        steps += 1;
        let idx = poisson_sample(rng, train.len(), q);
        let batch: Vec<&M::Example> = idx.iter().map(|&i| train[i].borrow()).collect();
        // the audit's Dirac canaries, each Poisson-sampled at the same rate q
        let sampled: Vec<(usize, usize)> = canaries
            .iter()
            .copied()
            .filter(|_| rng.random::<f64>() < q)
            .collect();
        let (grads, _, losses) =
            dp_gradient_with_canaries(&model, &batch, &sampled, dp, noise, device);
        loss_sum += losses.iter().map(|l| f64::from(*l)).sum::<f64>();
        loss_n += losses.len();
        release.step(dp, losses.iter().map(|l| f64::from(*l)), noise);
        // FedProx: the data-independent proximal gradient, after clipping and noise
        let grads = match &anchor {
            Some(a) => crate::proximal::add_proximal(grads, &model, a, cfg.proximal_mu),
            None => grads,
        };
        let gp = to_gradients_params(&model, grads);
        model = opt.step(cfg.learning_rate, model, gp);
    }
    crate::local_run::LocalRun {
        model,
        loss: (loss_sum, loss_n),
        steps,
        released: release.mean(),
    }
}

/// Poisson sample of `0..n` with rate `q` (each index independently).
pub fn poisson_sample<R: Rng + ?Sized>(rng: &mut R, n: usize, q: f64) -> Vec<usize> {
    (0..n).filter(|_| rng.random::<f64>() < q).collect()
}

/// The model's adapter gradients from a plain (non-private) backward pass of the mean loss.
pub fn plain_gradient<M: DpModel>(
    lm: &M,
    windows: &[&M::Example],
    device: &Device,
) -> Vec<Tensor<2>> {
    let grads = lm.example_losses(windows, None, device).mean().backward();
    adapter_params(lm)
        .into_iter()
        .map(|p| p.value.grad(&grads).expect("trainable"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{collect_named, NamedFilter};
    use crate::lora::LoraConfig;
    use crate::model::{Lm, LmConfig};
    use crate::train::LocalTrainer;

    fn setup(freeze_a: bool) -> (Lm, Vec<Vec<u8>>, Device) {
        let cfg = LmConfig::new()
            .with_d_model(32)
            .with_n_layers(2)
            .with_n_heads(2)
            .with_d_ff(64)
            .with_context(16)
            .with_lora(Some(
                LoraConfig::new()
                    .with_rank(4)
                    .with_freeze_a(freeze_a)
                    .with_targets(vec!["q".into(), "v".into(), "fc1".into()]),
            ));
        let device = Device::flex().autodiff();
        let base = collect_named(
            &LmConfig {
                lora: None,
                ..cfg.clone()
            }
            .init(&device),
            NamedFilter::All,
        );
        let t = LocalTrainer::new(cfg, &base, device.clone()).unwrap();
        // give B non-zero values so that A has non-zero gradients too
        let mut g = t.initial_adapter();
        for (i, v) in g.values_mut().iter_mut().enumerate() {
            *v += ((i as f32) * 0.37).sin() * 0.05;
        }
        let lm = t.model_with(&g).unwrap();
        let data = crate::data::ClientData::demo_client(2, 16).unwrap();
        (lm, data.train[..6].to_vec(), device)
    }

    #[test]
    fn per_example_gradients_equal_single_example_backward_passes() {
        for freeze_a in [false, true] {
            let (lm, w, device) = setup(freeze_a);
            let refs: Vec<&[u8]> = w.iter().map(Vec::as_slice).collect();
            let (per, _) = per_example_grads(&lm, &refs, &device);
            let params = adapter_params(&lm);
            assert_eq!(per.len(), params.len());
            assert_eq!(params.len(), if freeze_a { 3 * 2 } else { 6 * 2 });
            let mut max_err = 0f32;
            for (i, one) in refs.iter().enumerate() {
                let single = plain_gradient(&lm, &[*one], &device);
                for (g_all, g1) in per.iter().zip(single) {
                    let [_, r, c] = g_all.dims();
                    let gi = g_all.clone().slice([i..i + 1, 0..r, 0..c]).reshape([r, c]);
                    let e = (gi - g1).abs().max().into_scalar::<f32>();
                    max_err = max_err.max(e);
                }
            }
            assert!(max_err <= 1e-5, "max abs diff {max_err}");
        }
    }

    /// A Dirac canary at flat index k lands on the coordinate `extract_adapter` puts at k, and
    /// adds exactly C ÷ expected batch there (σ = 0) and nothing anywhere else.
    #[test]
    fn dirac_canaries_add_the_clip_norm_at_their_flat_coordinate_only() {
        for freeze_a in [false, true] {
            let (lm, w, device) = setup(freeze_a);
            let names: &'static [&'static str] = if freeze_a {
                &["lora_b"]
            } else {
                &["lora_a", "lora_b"]
            };
            let named = collect_named(&lm, NamedFilter::Adapter(names));
            let mut starts = Vec::new();
            let mut at = 0;
            for (name, shape, _) in &named {
                starts.push((name.clone(), at));
                at += shape.iter().product::<usize>();
            }
            let k1 = starts[2].1 + 5;
            let k2 = at - 1;
            let pos = crate::trainable::flat_positions(&lm, &[k1, k2, at]);
            assert_eq!(pos.len(), 2, "the index past the adapter is dropped");
            let params = adapter_params(&lm);
            let name = |j: usize| format!("{}.{}", params[j].layer, params[j].name);
            assert_eq!((name(pos[0].0), pos[0].1), (starts[2].0.clone(), 5));
            let last = starts.last().unwrap();
            assert_eq!((name(pos[1].0), pos[1].1), (last.0.clone(), k2 - last.1));
            let refs: Vec<&[u8]> = w.iter().map(Vec::as_slice).collect();
            let cfg = DpSgdConfig {
                clip_norm: 0.5,
                noise_multiplier: 0.0,
                expected_batch: 4,
                max_chunk: 3,
                loss_clip: None,
                dirac_canaries: Vec::new(),
            };
            let mut noise = GaussianNoise::seeded(0.0, 1);
            let (g0, _, _) = dp_gradient(&lm, &refs, &cfg, &mut noise, &device);
            let (g1, _, _) = dp_gradient_with_canaries(&lm, &refs, &pos, &cfg, &mut noise, &device);
            for (j, (a, b)) in g0.into_iter().zip(g1).enumerate() {
                let d: Vec<f32> = (b - a).into_data().convert::<f32>().try_into_vec().unwrap();
                for (off, x) in d.iter().enumerate() {
                    let want = if pos.contains(&(j, off)) {
                        0.5 / 4.0
                    } else {
                        0.0
                    };
                    assert!(
                        (x - want).abs() < 1e-6,
                        "{} [{off}]: {x} vs {want}",
                        name(j)
                    );
                }
            }
        }
    }

    #[test]
    fn clipped_norms_bound_and_no_noise_no_clip_equals_plain_gradient() {
        let (lm, w, device) = setup(false);
        let refs: Vec<&[u8]> = w.iter().map(Vec::as_slice).collect();
        // σ = 0, C = ∞, expected batch = the batch: exactly the plain mean-loss gradient
        let cfg = DpSgdConfig {
            clip_norm: f64::INFINITY,
            noise_multiplier: 0.0,
            expected_batch: refs.len(),
            max_chunk: 4,
            loss_clip: None,
            dirac_canaries: Vec::new(),
        };
        let mut noise = GaussianNoise::seeded(0.0, 1);
        let (dp, norms, _) = dp_gradient(&lm, &refs, &cfg, &mut noise, &device);
        let plain = plain_gradient(&lm, &refs, &device);
        for (a, b) in dp.into_iter().zip(plain) {
            let e = (a - b).abs().max().into_scalar::<f32>();
            assert!(e <= 1e-6, "{e}");
        }
        // with a clip below every norm, each clipped per-example norm is ≤ C: the clipped sum
        // (no noise) has norm ≤ batch·C
        let c = norms.iter().cloned().fold(f64::INFINITY, f64::min) / 2.0;
        let cfg = DpSgdConfig {
            clip_norm: c,
            noise_multiplier: 0.0,
            expected_batch: 1,
            max_chunk: 6,
            loss_clip: None,
            dirac_canaries: Vec::new(),
        };
        for i in 0..refs.len() {
            let (g, _, _) = dp_gradient(&lm, &refs[i..i + 1], &cfg, &mut noise, &device);
            let sq: f32 = g
                .into_iter()
                .map(|t| t.powf_scalar(2.0).sum().into_scalar::<f32>())
                .sum();
            assert!(
                (sq.sqrt() as f64) <= c * (1.0 + 1e-5),
                "{} > {c}",
                sq.sqrt()
            );
            assert!(
                (sq.sqrt() as f64) >= c * (1.0 - 1e-4),
                "clipped to exactly C"
            );
        }
    }

    #[test]
    fn poisson_sampling_rate() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(5);
        let total: usize = (0..200)
            .map(|_| poisson_sample(&mut rng, 1000, 0.05).len())
            .sum();
        let mean = total as f64 / 200.0;
        // mean 50, std of the mean ≈ √(47.5/200) ≈ 0.49
        assert!((mean - 50.0).abs() < 2.5, "{mean}");
    }
}
