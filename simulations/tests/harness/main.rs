//! The simulation harness's integration tests, in one test binary (one build and link; the
//! long audit runs beside the sweeps): privacy audits, the example configs, a round of a few
//! hundred QUIC clients, sweeps and their sharding, and simulated time.
//!
//! Run one file's tests with a filter, e.g. `cargo test --release -p fedlora-simulations --test
//! harness audit::`.

mod audit;
mod example_configs;
mod load;
mod sweeps;
mod timed;
