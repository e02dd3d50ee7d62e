//! Local LoRA training of a real LLM, plain or DP-SGD, and the [`Learner`] a federated client
//! runs with it.
//!
//! The frozen base is shared: every [`LlmLearner`] of one process holds an `Arc` of one
//! [`LlmTrainer`], and each round's working model is a clone of its module, whose base tensors
//! are reference-counted, not copied. 100 virtual SmolLM2 clients hold one base.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use fedlora_dp::GaussianNoise;
use fedlora_protocol::{AdapterSpec, FlatAdapter, TrainConfig};
use rand::rngs::ChaCha20Rng;
use rand::Rng;

use super::data::{LlmData, TokenExample};
use super::llama::LlamaLm;
use super::Llm;
use crate::adapter::{adapter_spec, extract_adapter, load_adapter};
use crate::dp_sgd::DpSgdConfig;
use crate::error::TrainError;
use crate::learner::Learner;
use crate::lora::LoraConfig;
use crate::quant::BaseDtype;
use crate::train::{EvalOutcome, TrainOutcome};

/// A real LLM with the federation's adapter, on an autodiff device.
#[derive(Debug)]
pub struct LlmTrainer {
    llm: Llm,
    lora: LoraConfig,
    spec: AdapterSpec,
    device: Device,
}

impl LlmTrainer {
    /// Loads the model at `path` with an adapter on `lora`'s targets (`A` seeded by `seed`,
    /// the same on every party) on the CPU autodiff backend. The adapter spec is bound to the
    /// model's identity ([`Llm::base_id`]).
    pub fn load(path: &Path, lora: &LoraConfig, seed: u64) -> Result<Self, TrainError> {
        Self::load_as(path, lora, seed, BaseDtype::F32)
    }

    /// [`load`](Self::load) with the frozen base kept as `base` (see [`crate::quant`]).
    pub fn load_as(
        path: &Path,
        lora: &LoraConfig,
        seed: u64,
        base: BaseDtype,
    ) -> Result<Self, TrainError> {
        let device = Device::flex().autodiff();
        let llm = super::load_as(path, Some(lora), seed, base, &device)?;
        let spec = adapter_spec(&llm.model, lora).with_base(llm.base_id.clone());
        Ok(Self {
            llm,
            lora: lora.clone(),
            spec,
            device,
        })
    }

    /// The adapter spec every upload and global adapter must have.
    pub fn spec(&self) -> &AdapterSpec {
        &self.spec
    }

    /// The autodiff device the trainer computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The loaded model, its tokenizer and identity.
    pub fn llm(&self) -> &Llm {
        &self.llm
    }

    /// The seeded initial adapter (`A` random, `B` zero): global version 0.
    pub fn initial_adapter(&self) -> FlatAdapter {
        let a = extract_adapter(&self.llm.model, &self.lora);
        FlatAdapter::new(self.spec.clone(), a.values().to_vec()).expect("same layout")
    }

    /// The model with `adapter` loaded (refused unless its spec, model identity included, is
    /// this trainer's).
    ///
    /// A rank slice of this trainer's adapter ([`fedlora_protocol::rank`]) is loaded too: the
    /// model then trains that rank.
    pub fn model_with(&self, adapter: &FlatAdapter) -> Result<LlamaLm, TrainError> {
        let mut plain_spec = adapter_spec(&self.llm.model, &self.lora);
        if adapter.spec().hash() != self.spec.hash() {
            let r = fedlora_protocol::rank::spec_rank(adapter.spec())?;
            let want = fedlora_protocol::rank::slice_spec(&self.spec, r)?;
            fedlora_protocol::check_spec(&want.hash(), &adapter.spec().hash())?;
            plain_spec = fedlora_protocol::rank::slice_spec(&plain_spec, r)?;
        }
        let plain = FlatAdapter::new(plain_spec, adapter.values().to_vec())?;
        load_adapter(self.llm.model.clone(), &self.lora, &plain)
    }

    fn finish(
        &self,
        model: &LlamaLm,
        global: &FlatAdapter,
        loss: (f64, usize),
        examples: usize,
        steps: u32,
        t0: Instant,
    ) -> Result<TrainOutcome, TrainError> {
        let local = FlatAdapter::new(
            global.spec().clone(),
            extract_adapter(model, &self.lora).values().to_vec(),
        )?;
        TrainOutcome::finish(&local, global, loss, examples, steps, t0)
    }

    /// Refuses examples holding a token id past the model's vocabulary (made by a tokenizer
    /// that does not belong to this model): a typed error before any step, instead of the NaN
    /// loss such a target would give.
    fn check_vocabulary(&self, examples: &[TokenExample]) -> Result<(), TrainError> {
        let vocab = self.llm.model.vocab_size();
        match examples
            .iter()
            .flat_map(|e| &e.ids)
            .find(|&&t| t as usize >= vocab)
        {
            Some(bad) => Err(TrainError::Data(format!(
                "token id {bad} is outside the model's vocabulary of {vocab} ids: the examples \
                 were tokenized with a tokenizer that does not match this model"
            ))),
            None => Ok(()),
        }
    }

    /// `cfg.local_steps` Adam steps from `global`, each on `cfg.batch_size` examples sampled
    /// uniformly without replacement by `rng`; returns the delta.
    pub fn train<R: Rng + ?Sized>(
        &self,
        global: &FlatAdapter,
        train: &[TokenExample],
        cfg: &TrainConfig,
        rng: &mut R,
    ) -> Result<TrainOutcome, TrainError> {
        if train.is_empty() {
            return Err(TrainError::Data("no training examples".into()));
        }
        self.check_vocabulary(train)?;
        let t0 = Instant::now();
        let model = self.model_with(global)?;
        // each example's mean over its scored tokens, averaged over the batch (one window or
        // conversation counts once, as in DP-SGD)
        let run = crate::train::plain_train_steps(model, train, cfg, rng, &self.device);
        self.finish(&run.model, global, run.loss, train.len(), run.steps, t0)
    }

    /// DP-SGD from `global` (see [`crate::dp_sgd`]): Poisson sampling of examples at rate
    /// `dp.expected_batch / n`, each example's gradient clipped to `dp.clip_norm`, Gaussian
    /// noise σ·C. The DP unit is one example: one text window or one conversation.
    pub fn train_dp<R: Rng + ?Sized>(
        &self,
        global: &FlatAdapter,
        train: &[TokenExample],
        cfg: &TrainConfig,
        dp: &DpSgdConfig,
        rng: &mut R,
        noise: &mut GaussianNoise,
    ) -> Result<TrainOutcome, TrainError> {
        if train.is_empty() {
            return Err(TrainError::Data("no training examples".into()));
        }
        self.check_vocabulary(train)?;
        let t0 = Instant::now();
        let model = self.model_with(global)?;
        let run = crate::dp_sgd::dp_train_steps(model, train, cfg, dp, rng, noise, &self.device);
        let mut out = self.finish(&run.model, global, run.loss, train.len(), run.steps, t0)?;
        out.released_loss = run.released;
        Ok(out)
    }

    /// Held-out NLL per scored token of `adapter` on `examples`, in batches of 4.
    pub fn evaluate(
        &self,
        adapter: &FlatAdapter,
        examples: &[TokenExample],
    ) -> Result<EvalOutcome, TrainError> {
        if examples.is_empty() {
            return Err(TrainError::Data("no evaluation examples".into()));
        }
        self.check_vocabulary(examples)?;
        let model = self.model_with(adapter)?.valid();
        let inner = self.device.clone().inner();
        let (mut nll, mut count) = (0f64, 0f64);
        for chunk in examples.chunks(4) {
            let refs: Vec<&TokenExample> = chunk.iter().collect();
            let (n, c) = model.example_nll(&refs, None, &inner);
            nll += f64::from(n.sum().into_scalar::<f32>());
            count += f64::from(c.sum().into_scalar::<f32>());
        }
        Ok(EvalOutcome {
            loss: nll / count.max(1.0),
            tokens: count as u64,
            accuracy: None,
        })
    }
}

/// A real LLM on a client's examples; many learners share one [`LlmTrainer`] (one base).
#[derive(Clone, Debug)]
pub struct LlmLearner {
    /// The shared frozen base with the federation's adapter layout.
    pub trainer: Arc<LlmTrainer>,
    /// The client's examples.
    pub data: LlmData,
}

impl Learner for LlmLearner {
    fn spec(&self) -> &AdapterSpec {
        self.trainer.spec()
    }

    fn train_examples(&self) -> usize {
        self.data.train.len()
    }

    fn train(
        &self,
        global: &FlatAdapter,
        cfg: &TrainConfig,
        rng: &mut ChaCha20Rng,
    ) -> Result<TrainOutcome, TrainError> {
        self.trainer.train(global, &self.data.train, cfg, rng)
    }

    fn train_dp(
        &self,
        global: &FlatAdapter,
        cfg: &TrainConfig,
        dp: &DpSgdConfig,
        rng: &mut ChaCha20Rng,
        noise: &mut GaussianNoise,
    ) -> Result<TrainOutcome, TrainError> {
        self.trainer
            .train_dp(global, &self.data.train, cfg, dp, rng, noise)
    }

    fn evaluate(&self, adapter: &FlatAdapter) -> Result<EvalOutcome, TrainError> {
        self.trainer.evaluate(adapter, &self.data.test)
    }
}
