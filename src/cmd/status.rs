//! `fedlora status` and `fedlora export`.

use std::path::PathBuf;

use clap::Args;
use fedlora_coordinator::status::report;
use fedlora_coordinator::store::{RoundStatus, Store, StoreLocation};

use super::UsageError;

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The coordinator's state directory.
    #[arg(long, required_unless_present = "store")]
    data_dir: Option<PathBuf>,
    /// The federation's PostgreSQL store (postgres://user@host:5432/database), read while
    /// coordinators run.
    #[arg(long)]
    store: Option<StoreLocation>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: StatusArgs) -> anyhow::Result<()> {
    let location = a.store.clone().unwrap_or_default();
    let dir = a.data_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let r = match Store::open_existing_at(&dir, &location) {
        Ok(store) => report(&store)?,
        // a running coordinator holds the store: read the snapshot it keeps current
        Err(e) if Store::is_locked(&e) => fedlora_coordinator::status::read_snapshot(&dir)
            .map_err(|s| anyhow::anyhow!("{e}; and its status snapshot could not be read: {s}"))?,
        Err(e) => return Err(UsageError(e.to_string()).into()),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let strategy = r
        .rounds
        .last()
        .map_or("-", |rr| rr.record.strategy.as_str());
    println!(
        "phase: {}, global version {}, strategy {strategy}",
        r.phase, r.global_version
    );
    if let Some(b) = &r.buffer {
        let hist: Vec<String> = b
            .staleness_histogram
            .iter()
            .enumerate()
            .map(|(t, n)| format!("τ={t}: {n}"))
            .collect();
        println!(
            "async: buffer {} of {} filled (commits with {} after the timeout), staleness {} up \
             to {}; counted updates by staleness: {}",
            b.filled,
            b.size,
            b.min,
            b.staleness,
            b.max_staleness,
            if hist.is_empty() {
                "none yet".to_string()
            } else {
                hist.join(", ")
            }
        );
    }
    println!(
        "{:>5} {:>10} {:>7} {:>12} {:>12} {:>10} {:>10}",
        "round", "status", "uploads", "bytes up", "bytes down", "train", "eval"
    );
    for rr in &r.rounds {
        let rec = &rr.record;
        let status = match &rec.status {
            RoundStatus::Open => "open".to_string(),
            RoundStatus::Committed { version } => format!("v{version}"),
            RoundStatus::Failed { .. } => "failed".to_string(),
        };
        let uploads = if rec.participants.is_empty() {
            rr.accepted_uploads.len()
        } else {
            rec.participants.len()
        };
        let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.4}"));
        println!(
            "{:>5} {:>10} {:>7} {:>12} {:>12} {:>10} {:>10}",
            rec.round,
            status,
            uploads,
            rec.bytes_up.values().sum::<u64>(),
            rec.bytes_down.values().sum::<u64>(),
            f(rec.train_loss),
            f(rr.eval_loss)
        );
        if let RoundStatus::Failed { reason } = &rec.status {
            println!("      failed: {reason}");
        }
        for (client, why) in &rec.declined {
            println!("      declined by {client}: {why}");
        }
    }
    for e in &r.evals {
        println!(
            "version {}: held-out loss {:.4} nats/byte over {} bytes from {} clients",
            e.version, e.loss, e.tokens, e.reports
        );
    }
    println!("{} clients seen", r.clients.len());
    if !r.frontends.is_empty() {
        // the database's clock, as the heartbeats were written
        let newest = r.frontends.iter().map(|f| f.seen_ms).max().unwrap_or(0);
        println!("{} front-ends:", r.frontends.len());
        for f in &r.frontends {
            println!(
                "  {} on {}{}, last heard {:.1} s before the newest heartbeat",
                f.id,
                f.listen,
                if f.driving {
                    " (drives the rounds)"
                } else {
                    ""
                },
                newest.saturating_sub(f.seen_ms) as f64 / 1e3
            );
        }
    }
    if !r.devices.is_empty() {
        println!("{} devices enrolled:", r.devices.len());
        for d in &r.devices {
            println!(
                "  {}: certificate until {} (Unix s), {} renewal(s), key {}",
                d.device_id,
                d.not_after_unix_s,
                d.renewals,
                &d.key_id[..16.min(d.key_id.len())]
            );
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// The coordinator's state directory.
    #[arg(long, required_unless_present_any = ["adapter", "store"])]
    data_dir: Option<PathBuf>,
    /// The federation's PostgreSQL store (postgres://user@host:5432/database); the adapter
    /// record (for --peft) is still read from --data-dir when given.
    #[arg(long, conflicts_with = "adapter")]
    store: Option<StoreLocation>,
    /// Export the global adapter committed by this round (default: the latest version).
    #[arg(long)]
    round: Option<u64>,
    /// Instead of a data directory: an adapter file written by `fedlora export --out` (with
    /// --peft).
    #[arg(long, conflicts_with_all = ["data_dir", "round"], requires = "peft")]
    adapter: Option<PathBuf>,
    /// Output safetensors file (fedlora's names and layout).
    #[arg(long, required_unless_present = "peft", conflicts_with = "peft")]
    out: Option<PathBuf>,
    /// Output a Hugging Face PEFT adapter directory (adapter_config.json,
    /// adapter_model.safetensors) that `PeftModel.from_pretrained` loads. With --data-dir the
    /// model and adapter flags come from the directory's record (--model only if the model
    /// file has moved; its hash is checked); with --adapter give --model and the adapter flags.
    #[arg(long)]
    peft: Option<PathBuf>,
    #[command(flatten)]
    model: super::model::ModelArgs,
}

/// An adapter file written by `fedlora export --out`, read in `spec`'s tensor order.
fn read_adapter_file(
    path: &std::path::Path,
    spec: &fedlora_protocol::AdapterSpec,
) -> anyhow::Result<fedlora_protocol::FlatAdapter> {
    let bytes = std::fs::read(path)
        .map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| UsageError(format!("{}: not a safetensors file: {e}", path.display())))?;
    let mut values = Vec::with_capacity(spec.numel());
    for t in spec.tensors() {
        let view = st.tensor(&t.name).map_err(|_| {
            UsageError(format!(
                "{}: no tensor `{}`: the file was not exported from this federation's adapter \
                 (check --model, --rank, --alpha, --targets)",
                path.display(),
                t.name
            ))
        })?;
        if view.shape() != t.shape.as_slice() || view.dtype() != safetensors::Dtype::F32 {
            return Err(UsageError(format!(
                "{}: tensor `{}` is {:?} {:?}, the adapter needs F32 {:?}",
                path.display(),
                t.name,
                view.dtype(),
                view.shape(),
                t.shape
            ))
            .into());
        }
        values.extend(
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    Ok(fedlora_protocol::FlatAdapter::new(spec.clone(), values)?)
}

/// The model flags and model file of an export or evaluation: from the data directory's
/// record when it has one (the user's `--model` only relocates the file), else from the
/// command line.
pub(crate) fn recorded_model(
    data_dir: Option<&std::path::Path>,
    given: &fedlora_device::model_args::ModelArgs,
) -> anyhow::Result<(
    fedlora_device::model_args::ModelArgs,
    PathBuf,
    Option<super::adapter_record::AdapterRecord>,
)> {
    let record = match data_dir {
        Some(d) => super::adapter_record::read(d)?,
        None => None,
    };
    match record {
        Some(r) => {
            super::adapter_record::refuse_other_flags(given, &r)?;
            let path = r.model_path(given.model.as_deref())?;
            Ok((r.model.clone(), path, Some(r)))
        }
        None => {
            let path = given.model.clone().ok_or_else(|| {
                UsageError(match data_dir {
                    Some(d) => format!(
                        "{} records no adapter (a coordinator before `adapter.json`): give                          --model and the federation's adapter flags",
                        d.display()
                    ),
                    None => "give --model: the real LLM the adapter was trained on".into(),
                })
            })?;
            Ok((given.clone(), path, None))
        }
    }
}

fn export_peft(a: &ExportArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let (args, model_path, record) = recorded_model(a.data_dir.as_deref(), &a.model)?;
    let model = &model_path;
    let lora = args.lora()?;
    let trainer =
        fedlora_train::llm::trainer::LlmTrainer::load_as(model, &lora, 0, args.base_dtype)?;
    if let Some(r) = &record {
        r.check(trainer.spec(), model)?;
    }
    let (what, adapter) = match &a.adapter {
        Some(file) => (
            file.display().to_string(),
            read_adapter_file(file, trainer.spec())?,
        ),
        None => {
            let store = open_stopped(a.data_dir.as_deref(), a.store.as_ref())?;
            let (v, adapter) = global_in(&store, a.round)?;
            (format!("global version {v}"), adapter)
        }
    };
    let lm = trainer.model_with(&adapter).map_err(|e| {
        UsageError(format!(
            "{e}: the adapter was not trained on this --model with these adapter flags"
        ))
    })?;
    fedlora_train::llm::peft::export(&lm, &lora, &model.display().to_string(), dir)?;
    println!("wrote {what} as a PEFT adapter to {}", dir.display());
    Ok(())
}

/// The global adapter a stopped coordinator's directory holds: the one committed by `round`,
/// or the latest.
pub(crate) fn global_of(
    dir: &std::path::Path,
    round: Option<u64>,
) -> anyhow::Result<(u64, fedlora_protocol::FlatAdapter)> {
    global_in(&open_stopped(Some(dir), None)?, round)
}

fn global_in(
    store: &Store,
    round: Option<u64>,
) -> anyhow::Result<(u64, fedlora_protocol::FlatAdapter)> {
    let version = committed_version(store, round)?;
    Ok(fedlora_coordinator::export::global_adapter(store, version)?)
}

/// The store of `--store` (a PostgreSQL store is read while coordinators run), else of a
/// stopped coordinator's `--data-dir`.
fn open_stopped(
    dir: Option<&std::path::Path>,
    store: Option<&StoreLocation>,
) -> anyhow::Result<Store> {
    let location = store.cloned().unwrap_or_default();
    let dir = dir.unwrap_or(std::path::Path::new("."));
    Store::open_existing_at(dir, &location).map_err(|e| {
        if Store::is_locked(&e) {
            anyhow::anyhow!("{e}: export from a stopped coordinator's directory (or a copy)")
        } else {
            UsageError(e.to_string()).into()
        }
    })
}

fn committed_version(store: &Store, round: Option<u64>) -> anyhow::Result<Option<u64>> {
    Ok(match round {
        None => None,
        Some(n) => match store.round(n)?.map(|r| r.status) {
            Some(RoundStatus::Committed { version }) => Some(version),
            Some(_) => return Err(UsageError(format!("round {n} did not commit")).into()),
            None => return Err(UsageError(format!("no round {n}")).into()),
        },
    })
}

pub(crate) fn export(a: ExportArgs) -> anyhow::Result<()> {
    if let Some(dir) = &a.peft {
        return export_peft(&a, dir);
    }
    let Some(out) = &a.out else {
        return Err(UsageError("give --out FILE or --peft DIR".into()).into());
    };
    let store = open_stopped(a.data_dir.as_deref(), a.store.as_ref())?;
    let version = committed_version(&store, a.round)?;
    let v = fedlora_coordinator::export::export_safetensors(&store, version, out)?;
    println!("wrote global version {v} to {}", out.display());
    Ok(())
}
