//! What a federation trains, as the commands see it: the byte-level model on byte windows, or a
//! real LLM (`--model`) on token windows or chat conversations. One place builds the initial
//! adapter, the clients' learners and the pooled held-out evaluation for both.

use std::path::Path;
use std::sync::Arc;

use fedlora_protocol::FlatAdapter;
use fedlora_train::data::ClientData;
use fedlora_train::learner::{Learner, LmLearner};
use fedlora_train::llm::data::{LlmData, TokenExample};
use fedlora_train::llm::trainer::{LlmLearner, LlmTrainer};
use fedlora_train::train::LocalTrainer;

use crate::model_args::ModelArgs;

/// Default tokens per window of a real LLM's training examples.
pub const DEFAULT_LLM_CONTEXT: usize = 128;

/// The model a command trains.
pub enum Workload {
    /// The byte-level LM over the committed base checkpoint.
    Bytes(Box<LocalTrainer>),
    /// A real LLM; one loaded base shared by every client of the process.
    Llm {
        /// The shared trainer.
        trainer: Arc<LlmTrainer>,
        /// Tokens per training window.
        context: usize,
    },
}

/// A held-out evaluation of a global adapter: NLL per byte or per token.
pub type HeldOut = Box<dyn Fn(&FlatAdapter) -> anyhow::Result<f64> + Send + Sync>;

impl Workload {
    /// Loads what `model` names (the byte-level base, or `--model`).
    pub fn load(model: &ModelArgs) -> anyhow::Result<Self> {
        match &model.model {
            None => Ok(Self::Bytes(Box::new(model.trainer()?))),
            Some(path) => {
                let lora = model.lora()?;
                let trainer = LlmTrainer::load_as(path, &lora, 0, model.base_dtype)?;
                let context = model.context.unwrap_or(DEFAULT_LLM_CONTEXT);
                if context == 0 || context >= trainer.llm().config.max_position_embeddings {
                    return Err(crate::UsageError(format!(
                        "--context must be in 1..{}, not {context}",
                        trainer.llm().config.max_position_embeddings
                    ))
                    .into());
                }
                Ok(Self::Llm {
                    trainer: Arc::new(trainer),
                    context,
                })
            }
        }
    }

    /// Global version 0.
    pub fn initial_adapter(&self) -> FlatAdapter {
        match self {
            Self::Bytes(t) => t.initial_adapter(),
            Self::Llm { trainer, .. } => trainer.initial_adapter(),
        }
    }

    /// A client's learner on its data: `file` (text; `.jsonl` chat data with --model), or the
    /// `index`-th demo role.
    pub fn learner(
        &self,
        file: Option<&Path>,
        index: Option<usize>,
    ) -> anyhow::Result<Arc<dyn Learner>> {
        let missing = || crate::UsageError("give --data FILE or --client-index I".into());
        Ok(match self {
            Self::Bytes(trainer) => {
                let ctx = trainer.config().context;
                let data = match (file, index) {
                    (Some(p), _) => ClientData::from_file(p, ctx)?,
                    (None, Some(i)) => ClientData::demo_client(i, ctx)?,
                    (None, None) => return Err(missing().into()),
                };
                Arc::new(LmLearner {
                    trainer: (**trainer).clone(),
                    data,
                })
            }
            Self::Llm { trainer, context } => {
                let tok = &trainer.llm().tokenizer;
                let data = match (file, index) {
                    (Some(p), _) => LlmData::from_file(p, tok, *context)?,
                    (None, Some(i)) => LlmData::demo_client(i, tok, *context)?,
                    (None, None) => return Err(missing().into()),
                };
                Arc::new(LlmLearner {
                    trainer: trainer.clone(),
                    data,
                })
            }
        })
    }

    /// A client's learner on text handed over in memory (an app embedding the SDK): bytes for
    /// the byte-level model, UTF-8 for a real LLM.
    pub fn learner_from_text(&self, name: &str, text: &[u8]) -> anyhow::Result<Arc<dyn Learner>> {
        Ok(match self {
            Self::Bytes(trainer) => Arc::new(LmLearner {
                trainer: (**trainer).clone(),
                data: ClientData::from_text(name, text, trainer.config().context)?,
            }),
            Self::Llm { trainer, context } => {
                let text = std::str::from_utf8(text).map_err(|e| {
                    crate::UsageError(format!("{name}: a real LLM trains on UTF-8 text ({e})"))
                })?;
                Arc::new(LlmLearner {
                    trainer: trainer.clone(),
                    data: LlmData::from_text(name, &trainer.llm().tokenizer, text, *context)?,
                })
            }
        })
    }

    /// The learners of demo clients `0..n`, and the evaluation of a global adapter on their
    /// pooled held-out examples (token-weighted).
    pub fn demo(&self, n: usize) -> anyhow::Result<(Vec<Arc<dyn Learner>>, HeldOut)> {
        match self {
            Self::Bytes(trainer) => {
                let ctx = trainer.config().context;
                let datas = (0..n)
                    .map(|i| ClientData::demo_client(i, ctx))
                    .collect::<Result<Vec<_>, _>>()?;
                let test: Vec<Vec<u8>> =
                    datas.iter().flat_map(|d| d.test.iter().cloned()).collect();
                let t = (**trainer).clone();
                let held_out: HeldOut = Box::new(move |a| Ok(t.evaluate(a, &test)?.loss));
                let learners = datas
                    .into_iter()
                    .map(|data| {
                        Arc::new(LmLearner {
                            trainer: (**trainer).clone(),
                            data,
                        }) as Arc<dyn Learner>
                    })
                    .collect();
                Ok((learners, held_out))
            }
            Self::Llm { trainer, context } => {
                let tok = &trainer.llm().tokenizer;
                let datas = (0..n)
                    .map(|i| LlmData::demo_client(i, tok, *context))
                    .collect::<Result<Vec<_>, _>>()?;
                let test: Vec<TokenExample> =
                    datas.iter().flat_map(|d| d.test.iter().cloned()).collect();
                let t = trainer.clone();
                let held_out: HeldOut = Box::new(move |a| Ok(t.evaluate(a, &test)?.loss));
                let learners = datas
                    .into_iter()
                    .map(|data| {
                        Arc::new(LlmLearner {
                            trainer: trainer.clone(),
                            data,
                        }) as Arc<dyn Learner>
                    })
                    .collect();
                Ok((learners, held_out))
            }
        }
    }

    /// One learner holding the training examples of demo clients `0..n` together (the
    /// centralised reference); it has no held-out data of its own.
    pub fn pooled(&self, n: usize) -> anyhow::Result<Arc<dyn Learner>> {
        Ok(match self {
            Self::Bytes(trainer) => {
                let ctx = trainer.config().context;
                let mut train = Vec::new();
                for i in 0..n {
                    train.extend(ClientData::demo_client(i, ctx)?.train);
                }
                Arc::new(LmLearner {
                    trainer: (**trainer).clone(),
                    data: ClientData {
                        name: "pooled".into(),
                        train,
                        test: Vec::new(),
                    },
                })
            }
            Self::Llm { trainer, context } => {
                let tok = &trainer.llm().tokenizer;
                let mut train = Vec::new();
                for i in 0..n {
                    train.extend(LlmData::demo_client(i, tok, *context)?.train);
                }
                Arc::new(LlmLearner {
                    trainer: trainer.clone(),
                    data: LlmData {
                        name: "pooled".into(),
                        train,
                        test: Vec::new(),
                    },
                })
            }
        })
    }

    /// The unit of the held-out loss, for messages.
    pub fn unit(&self) -> &'static str {
        match self {
            Self::Bytes(_) => "nats/byte",
            Self::Llm { .. } => "nats/token",
        }
    }
}
