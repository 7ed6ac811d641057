//! The distribution client: pull and push images between an OCI registry and the store.
//!
//! `auth` answers a registry's 401 challenges (anonymous, Basic, Bearer tokens) with the
//! credentials of the Docker config; the rest of the module speaks the distribution API.

pub mod auth;
