//! Variable expansion and word splitting, following BuildKit's `shell` package rules.
