//! nanogpt: a GPT-2 training system — data preparation, training (CPU fp32 reference
//! engine), evaluation and sampling — in one binary.
//!
//! Module map: [`model`] (sizes, parameter layout, init, FLOPs), [`engine`] (the engine
//! contract and the CPU engine), [`optim`] (AdamW settings, LR schedule), [`config`]
//! (train/sample configuration), [`data`] (prepare and load token files), [`tokenizer`]
//! (GPT-2 BPE and character vocabularies), [`train`] (training loop, checkpoints, metrics),
//! [`sample`] (generation with a KV cache), [`dist`] (multi-process data-parallel training).
pub mod bench;
pub mod cli;
pub mod config;
pub mod cuda;
pub mod data;
pub mod dist;
pub mod doctor;
pub mod engine;
pub mod fsutil;
pub mod hub;
pub mod interop;
pub mod model;
pub mod optim;
pub mod rng;
pub mod sample;
pub mod tokenizer;
pub mod train;
