//! What a federated client trains: any model with a LoRA adapter and local data, behind one
//! trait, plus the per-round steps every client runs the same way (local training with the
//! round's seeds, encoding the update with error feedback).
//!
//! The QUIC client (`fedlora_client::sdk::FederatedClient`) and the simulation harness's in-process
//! virtual clients both call [`local_update`] and [`encode_update`], so a simulated round and a
//! deployed one run the same code with the same seeds.

use fedlora_dp::GaussianNoise;
use fedlora_protocol::{AdapterSpec, Codec, CodecContext, ErrorFeedback, FlatAdapter, TrainConfig};
use rand::rngs::ChaCha20Rng;
use rand::SeedableRng;

use crate::data::ClientData;
use crate::dp_sgd::DpSgdConfig;
use crate::error::TrainError;
use crate::train::{EvalOutcome, LocalTrainer, TrainOutcome};

/// A model with a LoRA adapter and the local data it trains on.
///
/// Implement it for your own burn model (see `examples/custom_model.rs` and the simulations'
/// tabular task) to take part in a federation with the SDK.
pub trait Learner: Send + Sync {
    /// The adapter spec every global adapter and upload has.
    fn spec(&self) -> &AdapterSpec;

    /// Number of local training examples (the unit example-level DP protects).
    fn train_examples(&self) -> usize;

    /// Non-private local training from `global` for `cfg.local_steps` steps of `cfg.batch_size`
    /// examples, sampled by `rng`; returns the delta `local − global`.
    fn train(
        &self,
        global: &FlatAdapter,
        cfg: &TrainConfig,
        rng: &mut ChaCha20Rng,
    ) -> Result<TrainOutcome, TrainError>;

    /// DP-SGD from `global` (Poisson sampling with `rng`, per-example clipping, noise from
    /// `noise`); the implementation documents its guarantee.
    fn train_dp(
        &self,
        global: &FlatAdapter,
        cfg: &TrainConfig,
        dp: &DpSgdConfig,
        rng: &mut ChaCha20Rng,
        noise: &mut GaussianNoise,
    ) -> Result<TrainOutcome, TrainError>;

    /// Held-out evaluation of `adapter` on the client's test data.
    fn evaluate(&self, adapter: &FlatAdapter) -> Result<EvalOutcome, TrainError>;
}

/// fedlora's byte-level LM on a client's text.
#[derive(Clone, Debug)]
pub struct LmLearner {
    /// The frozen base with the federation's adapter layout.
    pub trainer: LocalTrainer,
    /// The client's windows.
    pub data: ClientData,
}

impl Learner for LmLearner {
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

/// A ChaCha20 RNG seeded from the OS CSPRNG (what deployments use for sampling, noise, masks).
pub fn os_rng() -> Result<ChaCha20Rng, TrainError> {
    ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| TrainError::Config(format!("OS RNG: {e}")))
}

/// Seeds of a client's randomness. `None` (deployments) draws everything from the OS CSPRNG;
/// fixed seeds are for tests and simulations, where a run must replay exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientSeeds {
    /// Batch sampling and codec rounding: round `r` uses `sampling ⊕ r` (codec: `⊕ 0xC0DEC`).
    pub sampling: Option<u64>,
    /// DP noise: round `r` uses `noise ⊕ r`.
    pub noise: Option<u64>,
}

impl ClientSeeds {
    /// The batch-sampling RNG of `round`.
    pub fn sampling_rng(&self, round: u64) -> Result<ChaCha20Rng, TrainError> {
        match self.sampling {
            Some(s) => Ok(ChaCha20Rng::seed_from_u64(s ^ round)),
            None => os_rng(),
        }
    }

    /// The codec's rounding RNG of `round`.
    pub fn codec_rng(&self, round: u64) -> Result<ChaCha20Rng, TrainError> {
        match self.sampling {
            Some(s) => Ok(ChaCha20Rng::seed_from_u64(s ^ round ^ 0xC0DEC)),
            None => os_rng(),
        }
    }

    /// The DP noise source of `round` with standard deviation `std`.
    pub fn noise(&self, round: u64, std: f64) -> Result<GaussianNoise, TrainError> {
        match self.noise {
            Some(s) => Ok(GaussianNoise::seeded(std, s ^ round)),
            None => GaussianNoise::from_os(std).map_err(|e| TrainError::Config(e.to_string())),
        }
    }
}

/// One round of local training: DP-SGD under `dp` (its noise std is σ·C), plain training
/// otherwise, with the round's RNGs from `seeds`.
///
/// `global` is the learner's adapter, or its rank slice ([`fedlora_protocol::rank`]) when the
/// coordinator assigned this client a lower rank: the learner then trains the slice, and the
/// returned delta is zero-padded back to the learner's (the federation's) spec.
pub fn local_update(
    learner: &dyn Learner,
    global: &FlatAdapter,
    cfg: &TrainConfig,
    dp: Option<&DpSgdConfig>,
    seeds: &ClientSeeds,
    round: u64,
) -> Result<TrainOutcome, TrainError> {
    let mut rng = seeds.sampling_rng(round)?;
    let mut out = match dp {
        None => learner.train(global, cfg, &mut rng)?,
        Some(dp) => {
            let mut noise = seeds.noise(round, dp.noise_multiplier * dp.clip_norm)?;
            learner.train_dp(global, cfg, dp, &mut rng, &mut noise)?
        }
    };
    if out.delta.spec().hash() != learner.spec().hash() {
        out.delta = fedlora_protocol::rank::pad(&out.delta, learner.spec())?;
    }
    Ok(out)
}

/// `values` scaled to L2 norm ≤ `bound` (unchanged when already within it): the client side of
/// norm-bounded updates ([`TrainConfig::max_update_norm`]), with the DP crate's clipping
/// ([`fedlora_dp::clip_l2`], norm in f64).
pub fn clip_update(values: &[f32], bound: f64) -> Vec<f32> {
    let mut v = values.to_vec();
    fedlora_dp::clip_l2(&mut v, bound);
    v
}

/// What [`encode_update`] produced.
#[derive(Clone, Debug)]
pub struct EncodedUpdate {
    /// The codec's payload.
    pub bytes: Vec<u8>,
    /// Values the codec clamped (modular codec), of `delta.len()`.
    pub clamped: u64,
}

/// Encodes `delta` with the round's codec. Sparsifying codecs use error feedback: `residual`
/// (the client's, created on first use or when its length does not fit) is added before
/// encoding and updated with what was not sent. The residual is computed from the already
/// noised delta, so under DP it is post-processing. With `max_norm` (norm-bounded updates),
/// the vector handed to the codec is first scaled to L2 norm ≤ `max_norm` ([`clip_update`]).
#[allow(clippy::too_many_arguments)]
pub fn encode_update(
    codec: &Codec,
    spec: &AdapterSpec,
    delta: &FlatAdapter,
    ctx: &CodecContext,
    weight: u64,
    rng: &mut ChaCha20Rng,
    residual: &mut Option<ErrorFeedback>,
    max_norm: Option<f64>,
) -> Result<EncodedUpdate, TrainError> {
    let clip = |v: &[f32]| match max_norm {
        Some(b) => clip_update(v, b),
        None => v.to_vec(),
    };
    if !codec.wants_error_feedback() {
        let (bytes, stats) = codec.encode_with(&clip(delta.values()), ctx, weight, rng);
        return Ok(EncodedUpdate {
            bytes,
            clamped: stats.clamped as u64,
        });
    }
    let n = delta.values().len();
    if residual.as_ref().is_none_or(|e| e.residual().len() != n) {
        *residual = Some(ErrorFeedback::new(n));
    }
    let ef = residual.as_mut().expect("set above");
    let comp = clip(&ef.compensate(delta.values()));
    let (bytes, stats) = codec.encode_with(&comp, ctx, weight, rng);
    let sent = Codec::decode(&bytes, spec, Some(codec), ctx)?;
    ef.update(&comp, sent.values());
    Ok(EncodedUpdate {
        bytes,
        clamped: stats.clamped as u64,
    })
}
