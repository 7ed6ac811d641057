//! Fingerprints: what went into a step's key, kept so that a miss can say what changed.

use std::collections::BTreeMap;

/// What went into a step's cache key, kept per step (by context, Dockerfile, stage and
/// position) so that a miss can say what changed since the last build.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Fingerprint {
    pub(super) instruction: String,
    pub(super) definition: String,
    pub(super) parent: String,
    /// (stage or image name, key) of what the step reads besides its parent.
    pub(super) inputs: Vec<(String, String)>,
    /// RUN's environment (build args and ENV).
    pub(super) env: Vec<String>,
    /// Context files read: path → mode and content hash (or link target).
    pub(super) files: BTreeMap<String, String>,
    /// The diff id of the layer the step made, if any: a COPY's next run links the files
    /// that did not change from its snapshot instead of copying them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) layer: Option<String>,
}

impl Fingerprint {
    /// Why `self` (now) misses where `previous` was built.
    pub(super) fn miss_reason(&self, previous: &Fingerprint) -> String {
        let list = |names: Vec<&String>| {
            let shown: Vec<&str> = names.iter().take(5).map(|name| name.as_str()).collect();
            let more = names.len().saturating_sub(5);
            if more > 0 {
                format!("{} and {more} more", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        if self.instruction != previous.instruction {
            return format!(
                "the instruction changed (was: {})",
                previous.instruction.lines().next().unwrap_or_default()
            );
        }
        let changed_files: Vec<&String> = self
            .files
            .iter()
            .filter(|(path, fingerprint)| {
                previous
                    .files
                    .get(*path)
                    .is_some_and(|old| old != *fingerprint)
            })
            .map(|(path, _)| path)
            .collect();
        let added: Vec<&String> = self
            .files
            .keys()
            .filter(|path| !previous.files.contains_key(*path))
            .collect();
        let removed: Vec<&String> = previous
            .files
            .keys()
            .filter(|path| !self.files.contains_key(*path))
            .collect();
        let mut reasons = Vec::new();
        if !changed_files.is_empty() {
            reasons.push(format!("file changed: {}", list(changed_files)));
        }
        if !added.is_empty() {
            reasons.push(format!("file added: {}", list(added)));
        }
        if !removed.is_empty() {
            reasons.push(format!("file removed: {}", list(removed)));
        }
        if !reasons.is_empty() {
            return reasons.join("; ");
        }
        if self.env != previous.env {
            let name = |item: &String| {
                item.split_once('=')
                    .map_or(item.clone(), |(name, _)| name.to_string())
            };
            let mut names: Vec<String> = self
                .env
                .iter()
                .filter(|item| !previous.env.contains(item))
                .chain(previous.env.iter().filter(|item| !self.env.contains(item)))
                .map(name)
                .collect();
            names.sort();
            names.dedup();
            return format!(
                "build argument or environment changed: {}",
                names.join(", ")
            );
        }
        if self.definition != previous.definition {
            return "the instruction's expansion changed (a variable, WORKDIR, USER, SHELL or --network)".to_string();
        }
        let changed_inputs: Vec<&String> = self
            .inputs
            .iter()
            .filter(|input| !previous.inputs.contains(input))
            .map(|(name, _)| name)
            .collect();
        if !changed_inputs.is_empty() {
            return format!("what it copies from changed: {}", list(changed_inputs));
        }
        if self.parent != previous.parent {
            return "the step it builds on changed".to_string();
        }
        "its cache record is gone (pruned)".to_string()
    }
}
