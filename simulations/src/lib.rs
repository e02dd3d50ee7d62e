//! fedlora simulation harness (in progress): data partitions for virtual clients. The sweep
//! runner, reports and plots are not built yet; see the project's issues.

pub mod partition;
