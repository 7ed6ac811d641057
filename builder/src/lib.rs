//! rbuild's builder: the solver that schedules the build graph, cache keys, exporters, the
//! registry client, progress, and the `rbuild` command line.
//!
//! It never parses Dockerfile text itself (that is the frontend's) and never touches a
//! namespace (that is the executor's). Today it plans builds (`rbuild build --dry-run`) against
//! the local image store and runs the image commands; the solver and sandbox arrive with
//! their issues.
#![forbid(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod options;
pub mod resolver;
