//! culprit's integration tests: one binary, one module per pipeline step.
//!
//! Tests that need the larger data sets in `../shared` skip with a printed reason when it is
//! absent. Run them with `cargo test --release` (the README's test command).

mod act;
mod architecture;
mod audit;
mod cli;
mod common;
mod curvature;
mod gradients;
mod library;
mod lm;
mod loaders;
mod query;
mod store;
mod training;
