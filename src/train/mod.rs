//! train (in progress)
pub mod checkpoint;
pub mod metrics;
pub mod plot;
