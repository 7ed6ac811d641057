//! The distribution client: pull and push images between an OCI registry and the store.
//!
//! `auth` answers a registry's 401 challenges (anonymous, Basic, Bearer tokens) with the
//! credentials of the Docker config or of the credential helper it names (run by `helper`);
//! `client` speaks HTTP to one repository (endpoint, errors, retries); `pull` and `push` move
//! images.

pub mod auth;
pub mod client;
pub mod helper;
pub mod pull;
pub mod push;

pub use client::{RegistryError, set_insecure_registries};
pub use pull::{fetch_layers, fetch_missing, pull, pull_lazily};
pub use push::push;
