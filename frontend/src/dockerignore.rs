//! `.dockerignore` and `--exclude` patterns, following moby's patternmatcher rules.
