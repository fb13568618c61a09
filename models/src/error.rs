//! Errors of the model crate.

/// What can go wrong building or training a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The configuration does not fit the data or is inconsistent.
    #[error("{0}")]
    Config(String),
    /// A convex model did not reach the gradient-norm target.
    #[error(
        "training did not converge: ‖∇L‖ = {gradient_norm:.3e} after {iterations} iterations, \
         target {tolerance:.1e} ({reason})"
    )]
    NotConverged {
        /// Iterations taken.
        iterations: usize,
        /// Gradient norm reached.
        gradient_norm: f64,
        /// Target.
        tolerance: f64,
        /// Why it stopped.
        reason: String,
    },
}
