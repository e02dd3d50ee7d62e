//! fedlora coordinator
