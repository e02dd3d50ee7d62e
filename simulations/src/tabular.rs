//! The tabular task: Breast Cancer Wisconsin (Diagnostic) classification with a small MLP whose
//! layers carry LoRA adapters — the non-text case of the sweeps.
//!
//! 569 tumours, 30 features, label 1 = benign. A seeded stratified 20 % is the global test set;
//! features are standardised with the training rows' mean and standard deviation. The frozen base
//! MLP (30 → hidden → hidden → 1) is drawn from a fixed seed and is the same for every client
//! and run (a stand-in for a public pretrained model); only the adapters train.
//!
//! # DP guarantee of [`TabularLearner::train_dp`]
//! One example is one patient row. Each step Poisson-samples the client's rows with rate q,
//! computes every sampled row's gradient with respect to the trainable adapter tensors (one
//! backward pass over per-example adapter copies), clips it to L2 ≤ C jointly over all tensors,
//! sums, adds N(0, σ²C²) per coordinate and divides by q·n — the same mechanism and code as the
//! LM ([`fedlora_train::dp_sgd`]): example-level (add/remove one row) DP, accounted by
//! [`fedlora_dp`] for the Poisson-subsampled Gaussian.

use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::{Device, Tensor, TensorData};
use fedlora_dp::GaussianNoise;
use fedlora_protocol::{AdapterSpec, FlatAdapter, TrainConfig};
use fedlora_train::adapter::{adapter_spec, assign_named, extract_adapter, load_adapter};
use fedlora_train::dp_sgd::{DpModel, DpSgdConfig};
use fedlora_train::learner::Learner;
use fedlora_train::lora::{LoraConfig, LoraLinear, LoraLinearConfig};
use fedlora_train::model::ExampleAdapters;
use fedlora_train::train::{EvalOutcome, TrainOutcome};
use fedlora_train::TrainError;
use rand::rngs::ChaCha20Rng;
use rand::{RngExt, SeedableRng};

use crate::error::SimError;

/// The dataset shipped in the repository (see `data/README.md`).
pub const BCW_CSV: &str = include_str!("../../data/breast_cancer_wisconsin_diagnostic.csv");

/// Number of features.
pub const FEATURES: usize = 30;

/// Seed of the fixed test split and of the frozen base weights.
const DATA_SEED: u64 = 0xBC3;

/// Standardised rows and labels.
#[derive(Clone, Debug, Default)]
pub struct Rows {
    /// Row-major features, `len × FEATURES`.
    pub x: Vec<f32>,
    /// Labels (0 malignant, 1 benign).
    pub y: Vec<f32>,
}

impl Rows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Appends one row laid out as [`Rows::examples`] does (features, then the label).
    pub fn push(&mut self, example: &[f32]) {
        self.x.extend_from_slice(&example[..FEATURES]);
        self.y.push(example[FEATURES]);
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The rows at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Rows {
        let mut r = Rows::default();
        for &i in idx {
            r.x.extend_from_slice(&self.x[i * FEATURES..(i + 1) * FEATURES]);
            r.y.push(self.y[i]);
        }
        r
    }

    /// Each row as one training example: its `FEATURES` values, then its label.
    pub fn examples(&self) -> Vec<Vec<f32>> {
        (0..self.len())
            .map(|i| {
                let mut e = self.x[i * FEATURES..(i + 1) * FEATURES].to_vec();
                e.push(self.y[i]);
                e
            })
            .collect()
    }

    fn tensors(&self, idx: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
        let s = self.select(idx);
        let n = s.len();
        (
            Tensor::from_data(TensorData::new(s.x, [n, FEATURES]), device),
            Tensor::from_data(TensorData::new(s.y, [n, 1]), device),
        )
    }
}

/// The training rows (to be partitioned) and the global test rows.
#[derive(Clone, Debug)]
pub struct BcwData {
    /// Training rows.
    pub train: Rows,
    /// Held-out rows (stratified 20 %).
    pub test: Rows,
}

impl BcwData {
    /// Parses the shipped CSV, splits off a stratified 20 % test set with a fixed seed and
    /// standardises with the training statistics.
    pub fn load() -> Result<Self, SimError> {
        let mut rows: Vec<(Vec<f32>, f32)> = Vec::new();
        for (i, line) in BCW_CSV.lines().skip(1).enumerate() {
            let v: Vec<f32> = line
                .split(',')
                .map(|s| s.trim().parse::<f32>())
                .collect::<Result<_, _>>()
                .map_err(|e| SimError::Data(format!("BCW line {}: {e}", i + 2)))?;
            if v.len() != FEATURES + 1 {
                return Err(SimError::Data(format!(
                    "BCW line {}: {} fields",
                    i + 2,
                    v.len()
                )));
            }
            rows.push((v[..FEATURES].to_vec(), v[FEATURES]));
        }
        let mut rng = ChaCha20Rng::seed_from_u64(DATA_SEED);
        let (mut train_idx, mut test_idx) = (Vec::new(), Vec::new());
        for label in [0.0f32, 1.0] {
            let mut idx: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].1 == label).collect();
            rand::seq::SliceRandom::shuffle(idx.as_mut_slice(), &mut rng);
            let k = idx.len() / 5;
            test_idx.extend_from_slice(&idx[..k]);
            train_idx.extend_from_slice(&idx[k..]);
        }
        train_idx.sort_unstable();
        test_idx.sort_unstable();
        let mut mean = [0f64; FEATURES];
        let mut sd = [0f64; FEATURES];
        for &i in &train_idx {
            for (m, v) in mean.iter_mut().zip(&rows[i].0) {
                *m += f64::from(*v);
            }
        }
        mean.iter_mut().for_each(|m| *m /= train_idx.len() as f64);
        for &i in &train_idx {
            for ((s, m), v) in sd.iter_mut().zip(&mean).zip(&rows[i].0) {
                *s += (f64::from(*v) - m).powi(2);
            }
        }
        sd.iter_mut()
            .for_each(|s| *s = (*s / train_idx.len() as f64).sqrt().max(1e-9));
        let build = |idx: &[usize]| {
            let mut r = Rows::default();
            for &i in idx {
                for ((v, m), s) in rows[i].0.iter().zip(&mean).zip(&sd) {
                    r.x.push(((f64::from(*v) - m) / s) as f32);
                }
                r.y.push(rows[i].1);
            }
            r
        };
        Ok(Self {
            train: build(&train_idx),
            test: build(&test_idx),
        })
    }

    /// Training labels as class indices (for the Dirichlet split).
    pub fn train_labels(&self) -> Vec<usize> {
        self.train.y.iter().map(|&y| y as usize).collect()
    }

    /// For hyper-parameter tuning: a stratified 20 % of the training rows (fixed seed) becomes
    /// the held-out set, the rest stays training data, and the test rows are not used at all.
    /// The validation rows stand for public data no client holds.
    pub fn validation_split(self) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(DATA_SEED ^ 0x7A11D);
        let (mut keep, mut val) = (Vec::new(), Vec::new());
        for label in [0.0f32, 1.0] {
            let mut idx: Vec<usize> = (0..self.train.len())
                .filter(|&i| self.train.y[i] == label)
                .collect();
            rand::seq::SliceRandom::shuffle(idx.as_mut_slice(), &mut rng);
            let k = idx.len() / 5;
            val.extend_from_slice(&idx[..k]);
            keep.extend_from_slice(&idx[k..]);
        }
        keep.sort_unstable();
        val.sort_unstable();
        Self {
            test: self.train.select(&val),
            train: self.train.select(&keep),
        }
    }
}

/// The classifier: three [`LoraLinear`] layers (adapters on all three by default).
#[derive(Module, Debug)]
pub struct Mlp {
    /// Input projection.
    pub fc1: LoraLinear,
    /// Hidden projection.
    pub fc2: LoraLinear,
    /// Output logit.
    pub out: LoraLinear,
}

impl Mlp {
    /// The MLP with `hidden` units and adapters from `lora` on the layers it targets (`fc1`,
    /// `fc2`, `out`); base weights are drawn from a fixed seed, so every client has the same
    /// frozen base.
    pub fn new(hidden: usize, lora: &LoraConfig, device: &Device) -> Result<Self, TrainError> {
        let layer = |name: &str, i, o, seed| {
            LoraLinearConfig::new(i, o)
                .with_lora(lora.targets(name).then(|| lora.clone()))
                .with_a_seed(seed)
                .init(device)
        };
        let m = Self {
            fc1: layer("fc1", FEATURES, hidden, 11),
            fc2: layer("fc2", hidden, hidden, 12),
            out: layer("out", hidden, 1, 13),
        };
        // replace burn's (global-RNG) base init by a seeded one, identical in every thread
        let mut rng = ChaCha20Rng::seed_from_u64(DATA_SEED);
        let mut base = Vec::new();
        for (name, i, o) in [
            ("fc1", FEATURES, hidden),
            ("fc2", hidden, hidden),
            ("out", hidden, 1),
        ] {
            let bound = (1.0 / i as f64).sqrt() * 3f64.sqrt();
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            };
            base.push((format!("{name}.weight"), vec![i, o], draw(i * o)));
            base.push((format!("{name}.bias"), vec![o], draw(o)));
        }
        Ok(lora.freeze_base(assign_named(m, &base)?))
    }

    fn layers(&self) -> [(&'static str, &LoraLinear); 3] {
        [("fc1", &self.fc1), ("fc2", &self.fc2), ("out", &self.out)]
    }

    /// Logits `[batch, 1]` of standardised features `[batch, 30]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = relu(self.fc1.forward(x));
        let h = relu(self.fc2.forward(h));
        self.out.forward(h)
    }

    fn forward_per_example(&self, x: Tensor<3>, per: &ExampleAdapters) -> Tensor<3> {
        let get = |n: &str| per.get(n).cloned();
        let h = relu(self.fc1.forward_per_example(x, get("fc1")));
        let h = relu(self.fc2.forward_per_example(h, get("fc2")));
        self.out.forward_per_example(h, get("out"))
    }
}

/// Per-example binary cross-entropy from logits, `[batch]`-shaped `[batch, 1]`.
/// DP-SGD and plain training through the client SDK's shared loops: one example is one patient
/// row (`FEATURES` values, then the label).
impl DpModel for Mlp {
    type Example = [f32];

    fn lora_layers(&self) -> Vec<(String, &LoraLinear)> {
        self.layers()
            .into_iter()
            .filter(|(_, l)| l.has_adapter())
            .map(|(n, l)| (n.to_string(), l))
            .collect()
    }

    fn example_losses(
        &self,
        examples: &[&[f32]],
        per: Option<&ExampleAdapters>,
        device: &Device,
    ) -> Tensor<1> {
        let b = examples.len();
        let mut x = Vec::with_capacity(b * FEATURES);
        let mut y = Vec::with_capacity(b);
        for e in examples {
            x.extend_from_slice(&e[..FEATURES]);
            y.push(e[FEATURES]);
        }
        let x = Tensor::<2>::from_data(TensorData::new(x, [b, FEATURES]), device);
        let y = Tensor::<2>::from_data(TensorData::new(y, [b, 1]), device);
        let logits = match per {
            None => self.forward(x),
            Some(per) => self
                .forward_per_example(x.unsqueeze_dim::<3>(1), per)
                .reshape([b, 1]),
        };
        bce(logits, y).reshape([b])
    }
}

fn bce(logits: Tensor<2>, y: Tensor<2>) -> Tensor<2> {
    let pos = log_sigmoid(logits.clone());
    let neg = log_sigmoid(logits.neg());
    (y.clone() * pos + (y.neg() + 1.0) * neg).neg()
}

/// The shared, read-only part of every tabular client: the frozen model and the test rows.
#[derive(Debug)]
pub struct TabularModel {
    model: Mlp,
    lora: LoraConfig,
    spec: AdapterSpec,
    device: Device,
    test: Rows,
}

impl TabularModel {
    /// The model with `hidden` units and adapters from `lora`, evaluated on `test`.
    pub fn new(hidden: usize, lora: LoraConfig, test: Rows) -> Result<Self, TrainError> {
        let device = Device::flex().autodiff();
        let model = Mlp::new(hidden, &lora, &device)?;
        let spec = adapter_spec(&model, &lora);
        Ok(Self {
            model,
            lora,
            spec,
            device,
            test,
        })
    }

    /// The device the model trains on (autodiff).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The adapter spec.
    pub fn spec(&self) -> &AdapterSpec {
        &self.spec
    }

    /// The initial adapter (seeded `A`, zero `B`).
    pub fn initial_adapter(&self) -> FlatAdapter {
        extract_adapter(&self.model, &self.lora)
    }

    pub(crate) fn with(&self, adapter: &FlatAdapter) -> Result<Mlp, TrainError> {
        load_adapter(self.model.clone(), &self.lora, adapter)
    }

    /// Mean BCE loss and accuracy of `adapter` on `rows`.
    pub fn evaluate_rows(
        &self,
        adapter: &FlatAdapter,
        rows: &Rows,
    ) -> Result<(f64, f64), TrainError> {
        if rows.is_empty() {
            return Err(TrainError::Data("no evaluation rows".into()));
        }
        let m = self.with(adapter)?.valid();
        let inner = self.device.clone().inner();
        let idx: Vec<usize> = (0..rows.len()).collect();
        let (x, y) = rows.tensors(&idx, &inner);
        let logits = m.forward(x);
        let loss = bce(logits.clone(), y.clone()).mean().into_scalar::<f32>();
        let acc = logits
            .greater_elem(0.0)
            .float()
            .equal(y)
            .float()
            .mean()
            .into_scalar::<f32>();
        Ok((f64::from(loss), f64::from(acc)))
    }

    /// Each example's loss (binary cross-entropy, nats) under `adapter`; examples are rows as
    /// [`Rows::examples`] lays them out.
    pub fn example_losses(
        &self,
        adapter: &FlatAdapter,
        examples: &[Vec<f32>],
    ) -> Result<Vec<f64>, TrainError> {
        let m = self.with(adapter)?;
        let refs: Vec<&[f32]> = examples.iter().map(Vec::as_slice).collect();
        let inner = self.device.clone();
        let l = m.example_losses(&refs, None, &inner);
        Ok(l.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| TrainError::Model(format!("{e:?}")))?
            .into_iter()
            .map(f64::from)
            .collect())
    }

    /// Each example's margin `(2y − 1)·logit` under `adapter` (positive: its own label is the
    /// more likely one); examples as [`Rows::examples`] lays them out.
    pub fn example_margins(
        &self,
        adapter: &FlatAdapter,
        examples: &[Vec<f32>],
    ) -> Result<Vec<f64>, TrainError> {
        let m = self.with(adapter)?;
        let b = examples.len();
        let mut x = Vec::with_capacity(b * FEATURES);
        for e in examples {
            x.extend_from_slice(&e[..FEATURES]);
        }
        let x = Tensor::<2>::from_data(TensorData::new(x, [b, FEATURES]), &self.device);
        let logits: Vec<f32> = m
            .forward(x)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| TrainError::Model(format!("{e:?}")))?;
        Ok(logits
            .iter()
            .zip(examples)
            .map(|(&l, e)| f64::from(l) * if e[FEATURES] > 0.5 { 1.0 } else { -1.0 })
            .collect())
    }

    /// Loss and accuracy on the global test set.
    pub fn evaluate_test(&self, adapter: &FlatAdapter) -> Result<(f64, f64), TrainError> {
        self.evaluate_rows(adapter, &self.test)
    }
}

/// One client of the tabular task: the shared model and its own rows.
#[derive(Clone, Debug)]
pub struct TabularLearner {
    /// Shared model.
    pub model: Arc<TabularModel>,
    /// This client's training rows.
    pub rows: Rows,
}

impl Learner for TabularLearner {
    fn spec(&self) -> &AdapterSpec {
        self.model.spec()
    }

    fn train_examples(&self) -> usize {
        self.rows.len()
    }

    fn train(
        &self,
        global: &FlatAdapter,
        cfg: &TrainConfig,
        rng: &mut ChaCha20Rng,
    ) -> Result<TrainOutcome, TrainError> {
        if self.rows.is_empty() {
            return Err(TrainError::Data("no training rows".into()));
        }
        let t0 = Instant::now();
        let m = self.model.with(global)?;
        let examples = self.rows.examples();
        let run =
            fedlora_train::train::plain_train_steps(m, &examples, cfg, rng, &self.model.device);
        let local = extract_adapter(&run.model, &self.model.lora);
        TrainOutcome::finish(&local, global, run.loss, self.rows.len(), run.steps, t0)
    }

    fn train_dp(
        &self,
        global: &FlatAdapter,
        cfg: &TrainConfig,
        dp: &DpSgdConfig,
        rng: &mut ChaCha20Rng,
        noise: &mut GaussianNoise,
    ) -> Result<TrainOutcome, TrainError> {
        if self.rows.is_empty() {
            return Err(TrainError::Data("no training rows".into()));
        }
        let t0 = Instant::now();
        let m = self.model.with(global)?;
        let examples = self.rows.examples();
        let run = fedlora_train::dp_sgd::dp_train_steps(
            m,
            &examples,
            cfg,
            dp,
            rng,
            noise,
            &self.model.device,
        );
        let local = extract_adapter(&run.model, &self.model.lora);
        let mut out =
            TrainOutcome::finish(&local, global, run.loss, self.rows.len(), run.steps, t0)?;
        out.released_loss = run.released;
        Ok(out)
    }

    fn evaluate(&self, adapter: &FlatAdapter) -> Result<EvalOutcome, TrainError> {
        let (loss, acc) = self.model.evaluate_test(adapter)?;
        Ok(EvalOutcome {
            loss,
            tokens: self.model.test.len() as u64,
            accuracy: Some(acc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedlora_train::learner::{local_update, ClientSeeds};

    fn setup() -> (Arc<TabularModel>, BcwData) {
        let data = BcwData::load().unwrap();
        let lora = LoraConfig::new().with_rank(4).with_targets(vec![
            "fc1".into(),
            "fc2".into(),
            "out".into(),
        ]);
        let model = Arc::new(TabularModel::new(32, lora, data.test.clone()).unwrap());
        (model, data)
    }

    #[test]
    fn data_split_is_stratified_and_standardised() {
        let d = BcwData::load().unwrap();
        assert_eq!(d.train.len() + d.test.len(), 569);
        assert_eq!(d.test.len(), 212 / 5 + 357 / 5);
        let col0: f64 = (0..d.train.len())
            .map(|i| f64::from(d.train.x[i * FEATURES]))
            .sum::<f64>()
            / d.train.len() as f64;
        assert!(col0.abs() < 1e-4, "{col0}");
    }

    #[test]
    fn training_only_the_adapters_learns_the_task() {
        let (model, data) = setup();
        let learner = TabularLearner {
            model: model.clone(),
            rows: data.train.clone(),
        };
        let g = model.initial_adapter();
        let (_, before) = model.evaluate_test(&g).unwrap();
        let cfg = TrainConfig {
            local_steps: 100,
            batch_size: 32,
            learning_rate: 1e-2,
            ..Default::default()
        };
        let seeds = ClientSeeds {
            sampling: Some(1),
            noise: Some(2),
        };
        let out = local_update(&learner, &g, &cfg, None, &seeds, 1).unwrap();
        let mut after = g.clone();
        after.apply_delta(&out.delta).unwrap();
        let (_, acc) = model.evaluate_test(&after).unwrap();
        assert!(acc > 0.9 && acc > before, "accuracy {before} -> {acc}");
    }

    #[test]
    fn dp_step_without_noise_or_clipping_matches_the_plain_mean_gradient_step() {
        // with σ = 0, C = ∞ and q = 1 the DP step is plain full-batch SGD on the summed loss
        // divided by n: the same update as the mean loss
        let (model, data) = setup();
        let rows = data.train.select(&(0..40).collect::<Vec<_>>());
        let learner = TabularLearner {
            model: model.clone(),
            rows,
        };
        let g = model.initial_adapter();
        let cfg = TrainConfig {
            local_steps: 3,
            batch_size: 40,
            learning_rate: 1e-2,
            ..Default::default()
        };
        let dp = DpSgdConfig {
            clip_norm: f64::INFINITY,
            noise_multiplier: 0.0,
            expected_batch: 40,
            max_chunk: 16,
            loss_clip: None,
            dirac_canaries: Vec::new(),
        };
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        let mut noise = GaussianNoise::seeded(0.0, 0);
        let a = learner
            .train_dp(&g, &cfg, &dp, &mut rng, &mut noise)
            .unwrap();
        let b = learner.train(&g, &cfg, &mut rng).unwrap();
        let max = a
            .delta
            .values()
            .iter()
            .zip(b.delta.values())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-5, "max diff {max}");
    }
}
