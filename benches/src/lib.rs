//! Shared helpers for rbuild benches.
