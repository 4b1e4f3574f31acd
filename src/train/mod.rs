//! Training: the loop (`trainer`), checkpoints ([`checkpoint`]), metrics log
//! ([`metrics`]) and the loss-curve plot ([`plot`]).
pub mod checkpoint;
pub mod metrics;
pub mod plot;
mod trainer;

pub use trainer::{train, TrainSummary};
