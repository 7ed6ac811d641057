//! rbuild's storage: the sha256 content store in OCI layout, the image store (tags), the cache
//! index (cache key → layer), context checksums (blake3 with a stat cache), safe layer diff and
//! apply, snapshots, prune and du.
//!
//! It never touches the network or namespaces. The store itself arrives with the store issue;
//! for now this crate holds only its contract.
#![forbid(unsafe_code)]
