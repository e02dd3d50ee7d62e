//! fedlora on a device: the client's command line (the adapter and model flags every party
//! shares, the workload they load, one federated client) as a library, so that the full
//! `fedlora` CLI and the small `fedlora-device` binary run the same code.
//!
//! The `fedlora-device` binary links only this crate, the client SDK and the protocol: nothing
//! of the coordinator, the simulations or the plots.

pub mod client;
pub mod enroll;
pub mod logging;
pub mod model_args;
pub mod workload;

/// An error in the user's input: reported with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The process exit code of a failed command: 2 for a usage or input error (a flag, a file,
/// a config value to fix), 3 for a credential failure that waiting cannot heal (unknown CA, bad
/// signature, wrong server name, a revoked certificate), 1 for any other runtime failure.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    use fedlora_client::error::ClientError;
    use fedlora_protocol::RefusalCode;
    use fedlora_train::TrainError;
    if e.downcast_ref::<UsageError>().is_some() {
        return 2;
    }
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Tls(_)) => 3,
        Some(ClientError::Enroll(..)) => 3,
        Some(ClientError::Refused(r)) if r.code == RefusalCode::Revoked => 3,
        Some(
            ClientError::Config(_)
            | ClientError::Data(_)
            | ClientError::ModelFile(_)
            | ClientError::Unsupported(_),
        ) => 2,
        Some(_) => 1,
        // the training engine's errors (a model or data file the user named) read the same
        None => match e.downcast_ref::<fedlora_train::TrainError>() {
            Some(
                TrainError::Config(_)
                | TrainError::Data(_)
                | TrainError::ModelFile(_)
                | TrainError::Unsupported(_),
            ) => 2,
            _ => 1,
        },
    }
}

/// The accountant a flag names: `rdp` or `pld` (a usage error otherwise).
pub fn parse_accountant(s: &str) -> anyhow::Result<fedlora_dp::Accountant> {
    match s {
        "rdp" => Ok(fedlora_dp::Accountant::Rdp),
        "pld" => Ok(fedlora_dp::Accountant::Pld),
        other => Err(UsageError(format!("unknown accountant `{other}` (rdp, pld)")).into()),
    }
}

/// Parses a duration: a plain number of seconds (`600`, `0.5`), or a duration with units
/// (`30s`, `5m`, `1h 30m`, `250ms`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    if let Ok(secs) = s.trim().parse::<f64>() {
        return if secs.is_finite() && secs > 0.0 {
            Ok(std::time::Duration::from_secs_f64(secs))
        } else {
            Err(format!("`{s}` must be a positive duration"))
        };
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}`: {e} (write seconds, or e.g. 30s, 5m, 1h)"))
}

/// Peak resident set size of this process, MiB (Linux `VmHWM`; 0 where unavailable).
pub use fedlora_train::bench::peak_rss_mib;

/// Every address of a comma-separated list of HOST:PORT (each name with all it resolves to),
/// in order, without repeats; at least one.
pub fn resolve_all(flag: &str, list: &str) -> Result<Vec<std::net::SocketAddr>, UsageError> {
    let mut out = Vec::new();
    for one in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addrs = std::net::ToSocketAddrs::to_socket_addrs(one)
            .map_err(|e| UsageError(format!("{flag} {one}: {e}")))?;
        for a in addrs {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    if out.is_empty() {
        return Err(UsageError(format!("{flag} {list} resolves to nothing")));
    }
    Ok(out)
}

/// The socket address a `--coordinator HOST:PORT` flag names (a usage error otherwise).
pub fn resolve(flag: &str, addr: &str) -> Result<std::net::SocketAddr, UsageError> {
    std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| UsageError(format!("{flag} {addr}: {e}")))?
        .next()
        .ok_or_else(|| UsageError(format!("{flag} {addr} resolves to nothing")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coordinator_list_gives_every_address_in_order_once() {
        let got = resolve_all(
            "--coordinator",
            "127.0.0.1:4433, 127.0.0.1:4434,127.0.0.1:4433,",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "127.0.0.1:4433".parse().unwrap(),
                "127.0.0.1:4434".parse().unwrap()
            ]
        );
        // a name stands for everything it resolves to (here, from the hosts file)
        let local = resolve_all("--coordinator", "localhost:4433").unwrap();
        assert!(local
            .iter()
            .all(|a| a.port() == 4433 && a.ip().is_loopback()));
        assert!(resolve_all("--coordinator", " , ").is_err());
        assert!(resolve_all("--coordinator", "127.0.0.1").is_err());
    }
}
