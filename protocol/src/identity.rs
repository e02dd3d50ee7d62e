//! Who a client is, and which names may be one.
//!
//! A client id is the common name of the client's TLS certificate. It names files (uploads,
//! partial uploads), log fields and status entries on the coordinator, so it is checked
//! against a strict alphabet before it names anything ([`validate_client_id`]): whatever a
//! certificate issuer (the federation CA, or an enrollment service's intermediate) puts in a
//! common name, no id can be a path (`../x`, `/x`, `a/b`), a hidden or special name (`.`, `..`),
//! or carry control characters into a log line.

use crate::error::ProtocolError;
use crate::limits::MAX_ID_LEN;

/// A client's identity: the common name of its TLS certificate.
pub type ClientId = String;

/// Checks that `id` may be a client id: 1 to [`MAX_ID_LEN`] bytes of ASCII letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit (so never `.`, `..`, a path, a hidden
/// file or an option-like `-x`). `certs init` ids (`client-N`) and enrolled device ids
/// (`device-<hex>`) pass.
pub fn validate_client_id(id: &str) -> Result<(), ProtocolError> {
    let bad = |why: &str| {
        ProtocolError::InvalidValue(format!(
            "client id {:?} {why}: a client id is 1 to {MAX_ID_LEN} ASCII letters, digits, \
             `-`, `_` or `.`, starting with a letter or digit",
            // the id as printed is bounded and escaped: it came from a peer
            id.chars().take(MAX_ID_LEN).collect::<String>()
        ))
    };
    if id.is_empty() {
        return Err(bad("is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(bad(&format!("is {} bytes long", id.len())));
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("does not start with a letter or digit"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(bad(&format!("contains {c:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_name_a_path_or_forge_a_log_line_are_refused() {
        for ok in [
            "client-0",
            "client-12",
            "device-3f9a0c11d2e4",
            "a",
            "node_7.lab",
        ] {
            assert!(validate_client_id(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_ID_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            "../../x",
            "../../../checkpoints/v3",
            "/etc/passwd",
            "a/b",
            "a\\b",
            ".hidden",
            "-rf",
            "client 0",
            "client-0\nINFO forged line",
            "clïent",
            "c\0",
            long.as_str(),
        ] {
            let e = validate_client_id(bad).unwrap_err();
            assert!(
                matches!(e, ProtocolError::InvalidValue(_)),
                "{bad:?}: {e:?}"
            );
        }
        assert!(validate_client_id(&"a".repeat(MAX_ID_LEN)).is_ok());
    }
}
