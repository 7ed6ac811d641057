//! rbuild's frontend: Dockerfile text → AST with line spans → typed instructions → build graph.
//!
//! Owns parsing (parser directives, escapes, line continuations, JSON and shell forms,
//! heredocs), variable expansion with BuildKit's rules, `.dockerignore` patterns, and the
//! lowering of stages and steps into a petgraph DAG whose every step carries a deterministic
//! digest of its definition and its [`Location`] in the Dockerfile.
//!
//! It does no I/O beyond reading the Dockerfile text it is handed, never uses tokio, and
//! runs nothing.
#![forbid(unsafe_code)]

pub mod dockerignore;
pub mod error;
pub mod expand;
pub mod graph;
pub mod instructions;
pub mod parser;

pub use error::{Error, ErrorKind, Location};
pub use graph::{BuildGraph, ImageResolver, NoImages, PlanOptions, Platform, plan};
