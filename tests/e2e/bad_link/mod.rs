//! Devices on bad links (the two tests run at the same time, each spending most of its time
//! waiting on its link):
//! - [`lossy_link`]: an in-process UDP proxy that drops and delays datagrams, with a cut past the
//!   QUIC idle timeout in the middle of an upload;
//! - [`netem`]: the `fedlora client` process in a network namespace behind a veth pair with
//!   `tc netem`, whose link goes down past the idle timeout.

mod lossy_link;
mod netem;
