//! The dp crate's one error type.

/// Errors of the privacy layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DpError {
    /// A parameter is outside its domain (q ∉ (0, 1], σ ≤ 0, δ ∉ (0, 1), zero steps …).
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// An event the accountant cannot analyse.
    #[error("unsupported event: {0}")]
    Unsupported(String),
    /// The planned spending would exceed the budget.
    #[error("privacy budget exceeded: {spent:.4} spent + this round → {would_be:.4} > target ε {target}")]
    BudgetExceeded {
        /// ε spent so far.
        spent: f64,
        /// ε after the refused spending.
        would_be: f64,
        /// The target ε.
        target: f64,
    },
    /// No noise multiplier reaches the target (it would need σ above the search bound).
    #[error("cannot reach ε = {target} with σ ≤ {max_sigma}")]
    Unreachable {
        /// Target ε.
        target: f64,
        /// Largest σ tried.
        max_sigma: f64,
    },
    /// The OS random number generator failed.
    #[error("OS randomness: {0}")]
    Rng(String),
}
