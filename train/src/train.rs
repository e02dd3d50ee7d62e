//! Local training: pretraining the public base model, and the per-round LoRA trainer a client
//! runs on its own data.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use fedlora_protocol::{AdapterSpec, FlatAdapter, TrainConfig};
use rand::Rng;

use crate::adapter::{adapter_spec, assign_named, collect_named, extract_adapter, load_adapter};
use crate::adapter::{NamedFilter, NamedTensor};
pub use crate::dp_sgd::LossRelease;
use crate::error::TrainError;
pub use crate::local_run::{local_optimizer, LocalRun};
use crate::lora::LoraConfig;
use crate::model::{windows_tensor, Lm, LmConfig};
use crate::trainable::DpModel;

/// Settings of base-model pretraining.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PretrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Windows per step.
    pub batch_size: usize,
    /// Peak Adam learning rate (linear warm-up over 5% of steps, then cosine decay to 10%).
    pub learning_rate: f64,
    /// Seed of batch sampling.
    pub seed: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 1500,
            batch_size: 32,
            learning_rate: 3e-3,
            seed: 1,
        }
    }
}

impl PretrainConfig {
    fn lr_at(&self, step: usize) -> f64 {
        let warm = (self.steps / 20).max(1);
        if step < warm {
            return self.learning_rate * (step + 1) as f64 / warm as f64;
        }
        let p = (step - warm) as f64 / (self.steps - warm).max(1) as f64;
        self.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
    }
}

/// Picks `k` distinct indices of `0..n` uniformly (all of them if `k ≥ n`).
pub fn sample_batch<R: Rng + ?Sized>(rng: &mut R, n: usize, k: usize) -> Vec<usize> {
    rand::seq::index::sample(rng, n, k.min(n)).into_vec()
}

/// Trains the base model (no adapter; every weight trainable) on `text`, cut into windows of
/// `context + 1` bytes. `on_step(step, loss, tokens_per_s)` is called after every step.
pub fn pretrain(
    config: &LmConfig,
    text: &[u8],
    pcfg: &PretrainConfig,
    device: &Device,
    mut on_step: impl FnMut(usize, f64, f64),
) -> Result<Lm, TrainError> {
    if config.lora.is_some() {
        return Err(TrainError::Config(
            "pretraining trains the base model: the config must have no adapter".into(),
        ));
    }
    let windows = crate::data::windows(text, config.context + 1);
    if windows.len() < pcfg.batch_size {
        return Err(TrainError::Data("pretraining text is too short".into()));
    }
    let mut rng = <rand::rngs::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(pcfg.seed);
    let mut lm = config.init(device);
    let mut opt = AdamConfig::new().init();
    for step in 0..pcfg.steps {
        let t0 = Instant::now();
        let idx = sample_batch(&mut rng, windows.len(), pcfg.batch_size);
        let batch: Vec<&[u8]> = idx.iter().map(|&i| windows[i].as_slice()).collect();
        let loss = lm.loss(windows_tensor(&batch, device));
        let value = loss.clone().into_scalar::<f32>() as f64;
        let grads = GradientsParams::from_grads(loss.backward(), &lm);
        lm = opt.step(pcfg.lr_at(step), lm, grads);
        let tokens = (batch.len() * config.context) as f64;
        on_step(step, value, tokens / t0.elapsed().as_secs_f64());
    }
    Ok(lm)
}

/// Saves a base model with burn's recorder (burnpack file).
pub fn save_base(lm: Lm, path: &Path) -> Result<(), TrainError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    lm.save_file(path)
        .map_err(|e| TrainError::Storage(format!("saving {}: {e:?}", path.display())))
}

/// Loads a base model saved by [`save_base`] and returns its named weights.
pub fn load_base(config: &LmConfig, path: &Path) -> Result<Vec<NamedTensor>, TrainError> {
    let plain = LmConfig {
        lora: None,
        ..config.clone()
    };
    let lm = plain
        .init(&Device::flex())
        .try_load_file(path)
        .map_err(|e| TrainError::Storage(format!("loading base {}: {e:?}", path.display())))?;
    Ok(collect_named(&lm, NamedFilter::All))
}

/// The seeded initial adapter of `config` (`A` random from `config.seed`, `B` zero): the
/// federation's global version 0. It does not depend on the base weights.
pub fn initial_adapter(config: &LmConfig) -> Result<FlatAdapter, TrainError> {
    let lora = config
        .lora
        .as_ref()
        .ok_or_else(|| TrainError::Config("the config has no adapter".into()))?;
    lora.validate(crate::model::LM_TARGETS)?;
    Ok(extract_adapter(
        &config.init(&Device::flex().autodiff()),
        lora,
    ))
}

/// The local non-private run every trainer shares: `cfg.local_steps` Adam steps on `model`,
/// each on `cfg.batch_size` examples of `train` sampled uniformly without replacement by `rng`,
/// minimising the batch mean of the examples' losses ([`DpModel::example_losses`]) plus
/// FedProx's `μ/2·‖w − w_start‖²` when `cfg.proximal_mu` > 0 ([`crate::proximal`]). Returns
/// the trained model, the sum of the steps' losses and the steps taken (fewer than planned
/// when the round's [`crate::step_gate`] closes).
pub fn plain_train_steps<M, T, R>(
    mut model: M,
    train: &[T],
    cfg: &TrainConfig,
    rng: &mut R,
    device: &Device,
) -> LocalRun<M>
where
    M: DpModel + Module,
    T: std::borrow::Borrow<M::Example>,
    R: Rng + ?Sized,
{
    let mut opt = local_optimizer(cfg.optimizer);
    let mut loss_sum = 0.0;
    let mut steps = 0;
    let anchor = crate::proximal::anchor(&model, cfg.proximal_mu);
    for _ in 0..cfg.local_steps {
        if !crate::step_gate::proceed() {
            break;
        }
        steps += 1;
        let idx = sample_batch(rng, train.len(), cfg.batch_size as usize);
        let batch: Vec<&M::Example> = idx.iter().map(|&i| train[i].borrow()).collect();
        let loss = model.example_losses(&batch, None, device).mean();
        loss_sum += loss.clone().into_scalar::<f32>() as f64;
        let grads = match &anchor {
            None => GradientsParams::from_grads(loss.backward(), &model),
            Some(anchor) => {
                let g = loss.backward();
                let gs = crate::trainable::adapter_params(&model)
                    .into_iter()
                    .map(|p| p.value.grad(&g).expect("trainable adapter tensor"))
                    .collect();
                let gs = crate::proximal::add_proximal(gs, &model, anchor, cfg.proximal_mu);
                crate::trainable::to_gradients_params(&model, gs)
            }
        };
        model = opt.step(cfg.learning_rate, model, grads);
    }
    LocalRun {
        model,
        loss: (loss_sum, steps as usize),
        steps,
        released: None,
    }
}

/// What one round of local training produced.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// `local − global`, in the federation's adapter spec.
    pub delta: FlatAdapter,
    /// Mean training loss over the steps, nats per byte.
    pub train_loss: f64,
    /// Number of local training examples (windows).
    pub examples: usize,
    /// Steps taken.
    pub steps: usize,
    /// Wall time of training, seconds.
    pub secs: f64,
    /// DP training with [`DpSgdConfig::loss_clip`](crate::dp_sgd::DpSgdConfig::loss_clip):
    /// the mean over steps of the noised clipped loss sums ÷ expected batch, nats per byte —
    /// the only training loss a DP client may send. `None` otherwise.
    pub released_loss: Option<f64>,
}

impl TrainOutcome {
    /// The outcome of a local run from `global` that ended at `local`: `loss_sum` over
    /// `loss_count` losses (steps or examples), `examples` training examples, `steps` steps,
    /// timed from `started`.
    pub fn finish(
        local: &FlatAdapter,
        global: &FlatAdapter,
        (loss_sum, loss_count): (f64, usize),
        examples: usize,
        steps: u32,
        started: Instant,
    ) -> Result<Self, TrainError> {
        Ok(Self {
            delta: local.delta_from(global)?,
            train_loss: loss_sum / loss_count.max(1) as f64,
            examples,
            steps: steps as usize,
            secs: started.elapsed().as_secs_f64(),
            released_loss: None,
        })
    }
}

/// Held-out loss of an adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalOutcome {
    /// Mean next-byte cross-entropy, nats per byte.
    pub loss: f64,
    /// Number of predicted bytes (examples, for classifiers).
    pub tokens: u64,
    /// Share of predictions that are right (next byte by argmax; class for classifiers), where
    /// the model computes it.
    pub accuracy: Option<f64>,
}

impl EvalOutcome {
    /// Perplexity per byte, `exp(loss)`.
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// The per-round LoRA trainer of one client: a frozen base plus the federation's adapter.
#[derive(Clone, Debug)]
pub struct LocalTrainer {
    config: LmConfig,
    lora: LoraConfig,
    model: Lm,
    spec: AdapterSpec,
    device: Device,
}

impl LocalTrainer {
    /// A trainer for `config` (which must have an adapter) over the base weights `base`
    /// (from [`load_base`]), on an autodiff `device`.
    pub fn new(config: LmConfig, base: &[NamedTensor], device: Device) -> Result<Self, TrainError> {
        let lora = config
            .lora
            .clone()
            .ok_or_else(|| TrainError::Config("the trainer needs a LoRA config".into()))?;
        lora.validate(crate::model::LM_TARGETS)?;
        let model = assign_named(config.init(&device), base)?;
        let spec = adapter_spec(&model, &lora);
        Ok(Self {
            config,
            lora,
            model,
            spec,
            device,
        })
    }

    /// The adapter spec every upload and global adapter must have.
    pub fn spec(&self) -> &AdapterSpec {
        &self.spec
    }

    /// The device the trainer trains on (autodiff).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The model configuration.
    pub fn config(&self) -> &LmConfig {
        &self.config
    }

    /// The seeded initial adapter (`A` random, `B` zero): global version 0.
    pub fn initial_adapter(&self) -> FlatAdapter {
        extract_adapter(&self.model, &self.lora)
    }

    /// The model with `adapter` loaded (refused on a spec mismatch).
    pub fn model_with(&self, adapter: &FlatAdapter) -> Result<Lm, TrainError> {
        load_adapter(self.model.clone(), &self.lora, adapter)
    }

    /// Trains from `global` on `train` windows for `cfg.local_steps` Adam steps of
    /// `cfg.batch_size` windows sampled uniformly without replacement by `rng`, and returns the
    /// delta. `rng` is the caller's: seeded in tests and simulations, the OS CSPRNG in
    /// deployments — never a seed from the coordinator.
    pub fn train<R: Rng + ?Sized>(
        &self,
        global: &FlatAdapter,
        train: &[Vec<u8>],
        cfg: &TrainConfig,
        rng: &mut R,
    ) -> Result<TrainOutcome, TrainError> {
        if train.is_empty() {
            return Err(TrainError::Data("no training windows".into()));
        }
        let t0 = Instant::now();
        let model = self.model_with(global)?;
        let run = plain_train_steps(model, train, cfg, rng, &self.device);
        let local = extract_adapter(&run.model, &self.lora);
        TrainOutcome::finish(&local, global, run.loss, train.len(), run.steps, t0)
    }

    /// DP-SGD from `global` on `train` windows: `cfg.local_steps` Adam steps, each on a Poisson
    /// sample (rate `dp.expected_batch / n`, drawn from `rng`) with per-example clipping to
    /// `dp.clip_norm` and Gaussian noise from `noise` (see [`crate::dp_sgd`] for the guarantee).
    /// `rng` and `noise` must come from the OS CSPRNG in deployments.
    pub fn train_dp<R: Rng + ?Sized>(
        &self,
        global: &FlatAdapter,
        train: &[Vec<u8>],
        cfg: &TrainConfig,
        dp: &crate::dp_sgd::DpSgdConfig,
        rng: &mut R,
        noise: &mut fedlora_dp::GaussianNoise,
    ) -> Result<TrainOutcome, TrainError> {
        if train.is_empty() {
            return Err(TrainError::Data("no training windows".into()));
        }
        let t0 = Instant::now();
        let model = self.model_with(global)?;
        let run = crate::dp_sgd::dp_train_steps(model, train, cfg, dp, rng, noise, &self.device);
        let local = extract_adapter(&run.model, &self.lora);
        let mut out = TrainOutcome::finish(&local, global, run.loss, train.len(), run.steps, t0)?;
        out.released_loss = run.released;
        Ok(out)
    }

    /// Mean held-out next-byte loss of `adapter` on `windows` (no gradients).
    pub fn evaluate(
        &self,
        adapter: &FlatAdapter,
        windows: &[Vec<u8>],
    ) -> Result<EvalOutcome, TrainError> {
        let model = self.model_with(adapter)?.valid();
        evaluate_model(&model, windows, &self.device.clone().inner())
    }
}

/// Mean next-byte loss of `model` on `windows`, in chunks of 32 windows.
pub fn evaluate_model(
    model: &Lm,
    windows: &[Vec<u8>],
    device: &Device,
) -> Result<EvalOutcome, TrainError> {
    if windows.is_empty() {
        return Err(TrainError::Data("no evaluation windows".into()));
    }
    let mut sum = 0.0;
    let mut hits = 0.0;
    let mut count = 0usize;
    let to_vec = |t: Tensor<1>| {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32")
    };
    for chunk in windows.chunks(32) {
        let batch: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        let (loss, acc) = model.loss_and_accuracy(windows_tensor(&batch, device));
        let v = to_vec(loss);
        sum += v.iter().map(|x| *x as f64).sum::<f64>();
        hits += to_vec(acc).iter().map(|x| *x as f64).sum::<f64>();
        count += v.len();
    }
    let per_window = windows[0].len() - 1;
    Ok(EvalOutcome {
        loss: sum / count as f64,
        tokens: (count * per_window) as u64,
        accuracy: Some(hits / count as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ClientData;
    use rand::SeedableRng;

    fn tiny() -> LmConfig {
        LmConfig::new()
            .with_d_model(32)
            .with_n_layers(1)
            .with_n_heads(2)
            .with_d_ff(64)
            .with_context(16)
    }

    /// A trainer of the tiny LM over a random frozen base.
    fn tiny_trainer() -> LocalTrainer {
        let device = Device::flex().autodiff();
        let base_cfg = LmConfig {
            lora: None,
            ..tiny()
        };
        let base = collect_named(&base_cfg.init(&device), NamedFilter::All);
        LocalTrainer::new(tiny(), &base, device).unwrap()
    }

    #[test]
    fn local_training_lowers_training_loss_and_returns_a_delta_in_spec() {
        let trainer = tiny_trainer();
        let data = ClientData::demo_client(5, 16).unwrap();
        let g = trainer.initial_adapter();
        let before = trainer.evaluate(&g, &data.train[..64]).unwrap();
        let cfg = TrainConfig {
            local_steps: 30,
            batch_size: 16,
            learning_rate: 1e-2,
            ..Default::default()
        };
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
        let out = trainer.train(&g, &data.train, &cfg, &mut rng).unwrap();
        assert_eq!(out.delta.spec(), trainer.spec());
        let mut local = g.clone();
        local.apply_delta(&out.delta).unwrap();
        let after = trainer.evaluate(&local, &data.train[..64]).unwrap();
        assert!(
            after.loss < before.loss,
            "{} -> {}",
            before.loss,
            after.loss
        );
        // same seed, same delta: training is deterministic given the caller's RNG
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
        let again = trainer.train(&g, &data.train, &cfg, &mut rng).unwrap();
        assert_eq!(again.delta, out.delta);
    }

    #[test]
    fn a_dp_trainer_releases_its_loss_only_when_asked_clipped_to_the_bound() {
        let trainer = tiny_trainer();
        let data = ClientData::demo_client(5, 16).unwrap();
        let train = &data.train[..8];
        let g = trainer.initial_adapter();
        let cfg = TrainConfig {
            local_steps: 3,
            batch_size: 8,
            learning_rate: 1e-3,
            ..Default::default()
        };
        // q = 8/8 = 1 (every example every step) and σ = 0, so the release is checkable
        let dp = |loss_clip| crate::dp_sgd::DpSgdConfig {
            clip_norm: 1.0,
            noise_multiplier: 0.0,
            expected_batch: 8,
            max_chunk: 8,
            loss_clip,
            dirac_canaries: Vec::new(),
        };
        let run = |loss_clip| {
            let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
            let mut noise = fedlora_dp::GaussianNoise::seeded(0.0, 4);
            trainer
                .train_dp(&g, train, &cfg, &dp(loss_clip), &mut rng, &mut noise)
                .unwrap()
        };
        assert_eq!(run(None).released_loss, None, "nothing released by default");
        let wide = run(Some(1e9));
        let released = wide.released_loss.unwrap();
        assert!(
            (released - wide.train_loss).abs() < 1e-5 * wide.train_loss,
            "{released} vs {}",
            wide.train_loss
        );
        // every per-example loss (≈ ln 256 nats/byte untrained) is clipped to L = 0.1
        let tight = run(Some(0.1)).released_loss.unwrap();
        assert!((tight - 0.1).abs() < 1e-9, "{tight}");
    }

    use fedlora_dp::l2_norm as norm;

    /// The proximal gradient is exactly μ(w − anchor), and FedProx's term keeps the local
    /// adapter near the global one: the same run with a large μ moves it much less, plain and
    /// under DP-SGD (where the term is added after the noise).
    #[test]
    fn fed_prox_adds_mu_times_the_distance_and_keeps_the_delta_small() {
        let trainer = tiny_trainer();
        let g = trainer.initial_adapter();
        let model = trainer.model_with(&g).unwrap();
        let params = crate::trainable::adapter_params(&model);
        let anchor: Vec<burn::tensor::Tensor<2>> = params
            .iter()
            .map(|p| p.value.clone().inner().sub_scalar(0.5))
            .collect();
        let zeros: Vec<burn::tensor::Tensor<2>> = params
            .iter()
            .map(|p| p.value.clone().inner().zeros_like())
            .collect();
        for g in crate::proximal::add_proximal(zeros, &model, &anchor, 0.2) {
            let v = g
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap();
            assert!(v.iter().all(|x| (x - 0.1).abs() < 1e-6), "{:?}", &v[..4]);
        }
        assert!(crate::proximal::anchor(&model, 0.0).is_none());

        let data = ClientData::demo_client(5, 16).unwrap();
        let cfg = |mu| TrainConfig {
            local_steps: 20,
            batch_size: 8,
            learning_rate: 1e-2,
            proximal_mu: mu,
            ..Default::default()
        };
        let run = |mu| {
            let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
            trainer.train(&g, &data.train, &cfg(mu), &mut rng).unwrap()
        };
        let (free, prox) = (
            norm(run(0.0).delta.values()),
            norm(run(50.0).delta.values()),
        );
        assert!(prox < 0.5 * free, "FedProx {prox} vs plain {free}");
        let dp = crate::dp_sgd::DpSgdConfig {
            clip_norm: 1.0,
            noise_multiplier: 0.5,
            expected_batch: 8,
            max_chunk: 8,
            loss_clip: None,
            dirac_canaries: Vec::new(),
        };
        let run_dp = |mu| {
            let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
            let mut noise = fedlora_dp::GaussianNoise::seeded(0.5, 4);
            trainer
                .train_dp(&g, &data.train[..64], &cfg(mu), &dp, &mut rng, &mut noise)
                .unwrap()
        };
        let (free, prox) = (
            norm(run_dp(0.0).delta.values()),
            norm(run_dp(50.0).delta.values()),
        );
        assert!(prox < 0.5 * free, "DP FedProx {prox} vs DP plain {free}");
    }

    /// A client assigned rank r trains the global adapter's first r components only: the
    /// learner loads the slice (FFA-LoRA's frozen A is cut too), and `local_update` returns the
    /// delta zero-padded to the federation's spec.
    #[test]
    fn a_rank_slice_trains_its_components_and_comes_back_zero_padded() {
        use crate::learner::{local_update, ClientSeeds, LmLearner};
        use fedlora_protocol::rank;
        for freeze_a in [false, true] {
            let device = Device::flex().autodiff();
            let cfg = LmConfig {
                lora: Some(
                    crate::lora::LoraConfig::new()
                        .with_rank(4)
                        .with_freeze_a(freeze_a)
                        .with_targets(vec!["q".into(), "v".into()]),
                ),
                ..tiny()
            };
            let base_cfg = LmConfig {
                lora: None,
                ..tiny()
            };
            let base = collect_named(&base_cfg.init(&device), NamedFilter::All);
            let trainer = LocalTrainer::new(cfg, &base, device).unwrap();
            let g = trainer.initial_adapter();
            let sliced = rank::slice(&g, 2).unwrap();
            let m = trainer.model_with(&sliced).unwrap();
            assert_eq!(m.blocks[0].q.lora_a.as_ref().unwrap().val().dims()[0], 2);
            assert_eq!(m.blocks[0].q.lora_b.as_ref().unwrap().val().dims()[1], 2);
            assert_eq!(crate::adapter::extract_adapter(&m, &trainer.lora), sliced);
            let learner = LmLearner {
                trainer: trainer.clone(),
                data: ClientData::demo_client(5, 16).unwrap(),
            };
            let tc = TrainConfig {
                local_steps: 5,
                batch_size: 8,
                learning_rate: 1e-2,
                ..Default::default()
            };
            let seeds = ClientSeeds {
                sampling: Some(1),
                noise: Some(2),
            };
            let out = local_update(&learner, &sliced, &tc, None, &seeds, 1).unwrap();
            assert_eq!(out.delta.spec(), trainer.spec());
            let comp = rank::components(trainer.spec()).unwrap();
            let (mut low, mut high) = (0.0f64, 0.0f64);
            for (v, j) in out.delta.values().iter().zip(comp) {
                if j < 2 {
                    low += f64::from(v.abs());
                } else {
                    high += f64::from(v.abs());
                }
            }
            assert!(low > 0.0, "the slice trained (freeze_a {freeze_a})");
            assert_eq!(high, 0.0, "padding is zero (freeze_a {freeze_a})");
        }
    }

    #[test]
    fn clip_update_bounds_the_norm_and_keeps_small_updates() {
        let v: Vec<f32> = (0..100).map(|i| (i as f32 * 0.3).sin()).collect();
        let c = crate::learner::clip_update(&v, 1.0);
        assert!((norm(&c) - 1.0).abs() < 1e-6 && norm(&v) > 1.0);
        let small: Vec<f32> = v.iter().map(|x| x * 0.01).collect();
        assert_eq!(crate::learner::clip_update(&small, 1.0), small);
    }
}
