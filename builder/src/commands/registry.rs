//! `rbuild pull` and `rbuild push`: move an image between a registry and the store under
//! `--root`. Progress goes to stderr, the manifest digest to stdout.

use std::path::Path;

use rbuild_cache::{Reference, Store};
use rbuild_frontend::Platform;

use super::image::fail;
use crate::cli::{PullArguments, PushArguments};
use crate::options::Status;

/// `rbuild pull [--platform P] REF`.
pub fn pull(root: &Path, arguments: &PullArguments) -> Status {
    let platform = match &arguments.platform {
        Some(text) => match Platform::parse(text) {
            Ok(platform) => platform,
            Err(_) => {
                eprintln!("error: invalid --platform {text:?}: expected os/arch[/variant]");
                return Status::Usage;
            }
        },
        None => Platform::host(),
    };
    let reference = match Reference::parse(&arguments.reference) {
        Ok(reference) => reference,
        Err(error) => return fail(&error),
    };
    let store = match Store::open(root) {
        Ok(store) => store,
        Err(error) => return fail(&error),
    };
    match crate::registry::pull(&store, &reference, &platform) {
        Ok(target) => {
            eprintln!("pulled {reference}");
            println!("{}", target.digest);
            Status::Success
        }
        Err(error) => fail(&error),
    }
}

/// `rbuild push REF`: the image named REF in the store, to the registry REF names.
pub fn push(root: &Path, arguments: &PushArguments) -> Status {
    let destination = match Reference::parse(&arguments.reference) {
        Ok(reference) => reference,
        Err(error) => return fail(&error),
    };
    let store = match Store::open(root) {
        Ok(store) => store,
        Err(error) => return fail(&error),
    };
    let record = match store.record(&destination) {
        Ok(Some(record)) => record,
        Ok(None) => {
            eprintln!("error: no such image: {}", arguments.reference);
            return Status::Failure;
        }
        Err(error) => return fail(&error),
    };
    let image = match store.image(&record.target) {
        Ok(image) => image,
        Err(error) => return fail(&error),
    };
    match crate::registry::push(&store, &image, &destination) {
        Ok(digest) => {
            eprintln!("pushed {destination}");
            println!("{digest}");
            Status::Success
        }
        Err(error) => fail(&error),
    }
}
