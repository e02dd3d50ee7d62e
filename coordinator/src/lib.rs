//! fedlora coordinator: the QUIC + mutual-TLS service that runs FedAvg rounds, with its state in
//! sled and large payloads in files. It never links burn: adapters are named flat buffers.

pub mod aggregate;
pub mod certs;
pub mod config;
pub mod enroll;
pub mod error;
pub mod export;
pub mod faults;
pub mod metrics;
pub mod partial;
pub mod peer;
pub mod privacy_plan;
pub mod relay;
pub mod revocation;
pub mod running_sum;
pub mod secure;
pub mod secure_plan;
pub mod server;
pub mod socket;
pub mod status;
pub mod store;
pub mod tls;
pub mod wire;

pub use config::{CoordinatorConfig, TlsPaths};
pub use error::CoordinatorError;
pub use server::{Coordinator, Event};
