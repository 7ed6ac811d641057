//! rbuild's sandbox: builds the OCI runtime spec for a process and runs it in isolated Linux
//! namespaces on an overlayfs root. This is the only crate allowed `unsafe`, and all syscalls
//! live in its `sys` module.
//!
//! It knows nothing of Dockerfiles or caches. The runtime arrives with the sandbox issue; for
//! now this crate holds only its contract.
