//! The end-to-end tests of the `fedlora` package, in one test binary: one build and link
//! instead of one per file, and the tests that mostly wait (bad links, timeouts, child
//! processes) run beside the ones that compute. `memory_bound` stays its own binary: it
//! measures its process's memory, which other tests in the same process would distort.
//!
//! Run one file's tests with a filter, e.g. `cargo test --release --test e2e crash_recovery::`.

#[path = "../common/mod.rs"]
mod common;

mod bad_link;
mod ci_script;
mod cli_first_hour;
mod cli_llm;
mod cli_simulate;
mod crash_recovery;
mod e2e_async;
mod e2e_async_secure;
mod e2e_client_dp;
mod e2e_enroll;
mod e2e_llm;
mod e2e_quic;
mod e2e_sdk;
mod e2e_secagg;
mod e2e_strategies;
mod scale_out;
