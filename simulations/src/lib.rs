//! fedlora simulations
