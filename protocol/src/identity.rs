//! Who a client is.

/// A client's identity: the common name of its TLS certificate.
pub type ClientId = String;
