//! What every local training loop shares (the plain one in [`crate::train`], DP-SGD's in
//! [`crate::dp_sgd`]): the optimizer a round's config names and what a run returns.

/// The optimizer `kind` names (fresh state: clients start each round's local run anew).
pub fn local_optimizer(kind: fedlora_protocol::LocalOptimizer) -> burn::optim::ModuleOptimizer {
    match kind {
        fedlora_protocol::LocalOptimizer::Adam => burn::optim::AdamConfig::new().init(),
        fedlora_protocol::LocalOptimizer::Sgd => burn::optim::SgdConfig::new().init(),
    }
}

/// What a shared local training loop ran: the trained model, its loss sum and count (never
/// sent), the steps taken, and the released (noised) loss when DP asks for one.
pub struct LocalRun<M> {
    /// The trained model.
    pub model: M,
    /// The sum of the losses and their count (steps, or examples under DP-SGD).
    pub loss: (f64, usize),
    /// Steps taken (fewer than planned when the round's step gate closed).
    pub steps: u32,
    /// The released training loss, nats per unit (DP with a loss clip only).
    pub released: Option<f64>,
}
