//! fedlora dp
