//! rbuild's builder: the solver that schedules the build graph, cache keys, exporters, the
//! registry client, progress, and the `rbuild` command line.
//!
//! It never parses Dockerfile text itself (that is the frontend's) and never touches a
//! namespace (that is the executor's). It builds images with a first, sequential solver
//! (`solver`), plans them (`--dry-run`) against the local image store, and runs the image
//! commands and `rbuild run`.
#![forbid(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod export;
pub mod options;
pub mod registry;
pub mod resolver;
pub mod solver;
