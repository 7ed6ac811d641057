//! rbuild's storage: the sha256 content store in OCI layout, the image store (tags), the cache
//! index (cache key → layer), safe layer creation and application, OCI and Docker archives,
//! prune and du.
//!
//! It never touches the network or namespaces.
#![forbid(unsafe_code)]

pub mod apply;
pub mod archive;
pub mod cache_index;
pub mod compression;
pub mod content;
pub mod context;
pub mod digest;
pub mod gc;
pub mod layer;
pub mod reference;
pub mod snapshot;
pub mod sources;
pub mod store;
pub mod time;

pub use content::{BlobInfo, BlobWriter, ContentError, ContentStore};
pub use digest::Digest;
pub use reference::Reference;
pub use sources::BlobSource;
pub use store::{Image, ImageRecord, Store, StoreError, Target};
