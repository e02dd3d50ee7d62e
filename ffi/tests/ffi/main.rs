//! The C boundary's integration tests, one binary (each binary costs a link on CI's two cores):
//! the committed header is current, and the C example runs a federated client end to end.

mod c_example;
mod header;
