//! `fedlora status` and `fedlora export`.

use std::path::PathBuf;

use clap::Args;
use fedlora_coordinator::status::report;
use fedlora_coordinator::store::{RoundStatus, Store};

use super::UsageError;

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The coordinator's state directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: StatusArgs) -> anyhow::Result<()> {
    let r = match Store::open_existing(&a.data_dir) {
        Ok(store) => report(&store)?,
        // a running coordinator holds the store: read the snapshot it keeps current
        Err(e) if Store::is_locked(&e) => fedlora_coordinator::status::read_snapshot(&a.data_dir)
            .map_err(|s| {
            anyhow::anyhow!("{e}; and its status snapshot could not be read: {s}")
        })?,
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
    }
    for e in &r.evals {
        println!(
            "version {}: held-out loss {:.4} nats/byte over {} bytes from {} clients",
            e.version, e.loss, e.tokens, e.reports
        );
    }
    println!("{} clients seen", r.clients.len());
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// The coordinator's state directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Export the global adapter committed by this round (default: the latest version).
    #[arg(long)]
    round: Option<u64>,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
}

pub(crate) fn export(a: ExportArgs) -> anyhow::Result<()> {
    let store = Store::open_existing(&a.data_dir).map_err(|e| {
        if Store::is_locked(&e) {
            anyhow::anyhow!("{e}: export from a stopped coordinator's directory (or a copy)")
        } else {
            UsageError(e.to_string()).into()
        }
    })?;
    let version = match a.round {
        None => None,
        Some(n) => match store.round(n)?.map(|r| r.status) {
            Some(RoundStatus::Committed { version }) => Some(version),
            Some(_) => return Err(UsageError(format!("round {n} did not commit")).into()),
            None => return Err(UsageError(format!("no round {n}")).into()),
        },
    };
    let v = fedlora_coordinator::export::export_safetensors(&store, version, &a.out)?;
    println!("wrote global version {v} to {}", a.out.display());
    Ok(())
}
