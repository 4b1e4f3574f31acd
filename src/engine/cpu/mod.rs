//! CPU reference engine (fp32, deterministic, multi-threaded).
