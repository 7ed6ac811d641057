//! rbuild's sandbox: runs one process in isolated Linux namespaces on an overlayfs root, with
//! Docker's default capabilities, masked paths and seccomp profile, and cgroup limits.
//!
//! It knows nothing of Dockerfiles or caches: the builder hands it a [`spec::RunSpec`] and
//! gets back the exit status, with stdout and stderr streamed as they are produced. This is
//! the only crate allowed `unsafe`; every `unsafe` block says why it is sound.

pub mod capabilities;
pub mod cgroups;
pub mod init;
pub mod mounts;
pub mod network;
pub mod sandbox;
pub mod seccomp;
pub mod spec;
#[allow(unsafe_code)]
mod sys;
pub mod user;
