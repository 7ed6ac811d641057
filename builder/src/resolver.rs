//! Base images for the planner: the frontend asks through its `ImageResolver` seam, and this
//! answers from the local image store, pulling an image the store lacks from its registry
//! when asked to (a build; never a dry run). Such a pull is lazy: the manifest and config
//! now, each layer when a step needs its files.

use std::sync::Mutex;

use rbuild_cache::{Image, Reference, Store};
use rbuild_frontend::Platform;
use rbuild_frontend::graph::{BaseImageConfig, ImageResolver};

use crate::registry::RegistryError;

/// Resolves base images from a store, when there is one.
pub struct StoreImages<'a> {
    store: Option<&'a Store>,
    pull: bool,
    pull_failures: Mutex<Vec<(String, RegistryError)>>,
}

impl<'a> StoreImages<'a> {
    /// Resolves from `store`; with none, nothing resolves.
    pub fn new(store: Option<&'a Store>) -> Self {
        Self {
            store,
            pull: false,
            pull_failures: Mutex::new(Vec::new()),
        }
    }

    /// Resolves from `store`, pulling what it lacks from the registry.
    pub fn pulling(store: &'a Store) -> Self {
        Self {
            pull: true,
            ..Self::new(Some(store))
        }
    }

    /// The pulls that failed: (reference as written, why).
    pub fn take_pull_failures(&self) -> Vec<(String, RegistryError)> {
        std::mem::take(&mut *self.pull_failures.lock().expect("not poisoned"))
    }

    /// The image `reference` names in the store.
    pub fn lookup(&self, reference: &str) -> Option<Image> {
        let store = self.store?;
        // As a full reference, never read as an image id; `find` takes the exact name first
        // (a pull by an index's digest), then a record of that manifest digest.
        let reference = Reference::parse(reference).ok()?;
        let record = store
            .find(&reference.to_string())
            .ok()?
            .into_iter()
            .next()?;
        store.image(&record.target).ok()
    }
}

impl ImageResolver for StoreImages<'_> {
    fn resolve(&self, reference: &str, platform: &Platform) -> Option<BaseImageConfig> {
        let image = match self.lookup(reference) {
            Some(image) => image,
            None if self.pull => {
                let store = self.store?;
                let parsed = Reference::parse(reference).ok()?;
                let mut failures = self.pull_failures.lock().expect("not poisoned");
                // Several stages may name the same image: one failed pull is enough.
                if failures.iter().any(|(failed, _)| failed == reference) {
                    return None;
                }
                match crate::registry::pull_lazily(store, &parsed, platform) {
                    Ok(target) => store.image(&target).ok()?,
                    Err(error) => {
                        failures.push((reference.to_string(), error));
                        return None;
                    }
                }
            }
            None => return None,
        };
        let config: serde_json::Value = serde_json::from_slice(&image.config_bytes).ok()?;
        if config["os"].as_str().is_some_and(|os| os != platform.os)
            || config["architecture"]
                .as_str()
                .is_some_and(|arch| arch != platform.architecture)
        {
            return None;
        }
        let section = &config["config"];
        Some(BaseImageConfig {
            env: env_pairs(&section["Env"]),
            working_dir: non_empty(&section["WorkingDir"]),
            user: non_empty(&section["User"]),
            shell: section["Shell"]
                .as_array()
                .map(|_| strings(&section["Shell"])),
            onbuild: strings(&section["OnBuild"]),
        })
    }
}

/// The strings of a JSON array in an image config (`Cmd`, `Env`, ...); anything else is empty.
pub fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// An image config's `Env` as (name, value) pairs; an entry without `=` has an empty value.
pub fn env_pairs(value: &serde_json::Value) -> Vec<(String, String)> {
    strings(value)
        .into_iter()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) => (key.to_string(), value.to_string()),
            None => (pair, String::new()),
        })
        .collect()
}

/// A string field of an image config, when set and not empty.
pub fn non_empty(value: &serde_json::Value) -> Option<String> {
    value
        .as_str()
        .filter(|text| !text.is_empty())
        .map(str::to_string)
}
