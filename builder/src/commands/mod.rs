//! One module a command; each takes validated options and returns how the process exits.

pub mod build;
pub mod image;
pub mod login;
pub mod registry;
pub mod run;
