//! `.dockerignore` files and COPY/ADD `--exclude` patterns, with the semantics of moby's
//! `patternmatcher` package and its `ignorefile` reader, as BuildKit applies them to a build
//! context.
//!
//! Every step moby takes is observable in which files reach a build, so each is reproduced:
//!
//! 1. **Reading a `.dockerignore`** (`ignorefile.ReadAll`): lines split on `\n` with one
//!    trailing `\r` dropped; a UTF-8 BOM is stripped from the first line only; a line whose first
//!    byte is `#` is a comment (`  # x` is a pattern); the rest is trimmed, an optional leading
//!    `!` is split off and the remainder trimmed again, cleaned like Go's `filepath.Clean`, and
//!    one leading `/` removed. A line of 64 KiB or more fails the read, as Go's `bufio.Scanner`
//!    does.
//! 2. **Compiling a list** (`patternmatcher.New`, also used directly for `--exclude`): each
//!    pattern is trimmed (empty ones are dropped), cleaned with its `!` still attached, and the
//!    `!` split off; `!` alone is an error. The pattern must be valid for Go's `filepath.Match`.
//!    `--exclude=/foo` keeps its leading `/` and so never matches a context-relative path.
//! 3. **Matching**: a pattern without glob characters compares the whole path; one ending in
//!    `**` compares a prefix and one starting with `**` a suffix (byte-wise, as moby slices
//!    strings); anything else becomes a regular expression, built moby's way: `*` is `[^/]*`,
//!    `?` is `[^/]`, `**` is `(.*/)?` (any number of directories, including none), `\x` is
//!    passed on as the regular-expression escape `\x`, `.+()|{}$` are quoted, and every other
//!    character, `[`, `]` and `^` included, is copied verbatim. The result is a Go regular
//!    expression, so Go's syntax decides what a pattern means even where it differs from
//!    `filepath.Match`: `[^a]` negates but `[!a]` is the class of `!` and `a`; `[[:alpha:]]`,
//!    `[\d]` and `\pL` are classes; `a^b*` never matches because `^` is an anchor; `[?]` becomes
//!    `[[^/]]`, the class `[`, `^`, `/` followed by a literal `]`; a reversed range `[z-a]` passes
//!    `filepath.Match` but not Go's regexp compiler. This module parses that Go expression and
//!    re-emits it in the `regex` crate's syntax, spelling out every construct whose meaning the
//!    two engines do not share (Go's `\d`, `\s`, `\w`, `\b` and POSIX classes are ASCII-only;
//!    `\Q…\E`, octal escapes and `&&`/`--`/`~~` inside classes differ), so both engines answer
//!    alike. The `regex` crate runs in time linear in the path, like Go's.
//! 4. **Deciding** (`MatchesOrParentMatches`): patterns are applied in order; an ordinary pattern
//!    that matches the path *or any of its parent directories* excludes it, a later `!` pattern
//!    that matches re-includes it, and the last pattern that applies wins.
//!
//! BuildKit's context walker (fsutil) uses a cheaper variant, `MatchesUsingParentResults`, that
//! carries each directory's per-pattern results down to its children; it can disagree with
//! step 4 when an exception names a parent of a later pattern's match. Both are offered:
//! [`IgnoreMatcher::is_excluded`] for the first and [`IgnoreMatcher::is_excluded_in_walk`] with
//! [`ParentMatches`] for the second. [`IgnoreMatcher::can_skip_directory`] is fsutil's rule for
//! pruning an excluded directory.
//!
//! Where rbuild is stricter than moby: moby compiles a pattern's regular expression on first
//! use, so a pattern that passes `filepath.Match` but not Go's regexp compiler (`[z-a]`,
//! `[Local-Only]`, `\e`) fails only when a path reaches it; here it fails up front. A pattern
//! whose compiled program exceeds [`PATTERN_PROGRAM_LIMIT`] is refused rather than compiled.
//!
//! `globset` is not used: its `[!a]`, `{a,b}` and `**` rules differ from moby's, and moby's
//! quirks (Go regexp classes, the `^` anchor, byte-wise prefix and suffix tests) cannot be
//! expressed in it.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use regex::{Regex, RegexBuilder};

/// The longest `.dockerignore` line moby reads: Go's `bufio.Scanner` holds a line and its `\n`
/// in a 64 KiB buffer and fails the whole read with `bufio.ErrTooLong` beyond that.
pub const MAX_LINE_BYTES: usize = 64 * 1024 - 1;

/// Upper bound, in bytes of compiled program, for one pattern's regular expression. Matching
/// costs time proportional to program size × path length, so this bounds the cost of hostile
/// patterns (thousands of `**`). Ordinary patterns use a few kilobytes; roughly 300 `**` fit.
pub const PATTERN_PROGRAM_LIMIT: usize = 1 << 20;

/// Characters that make fsutil treat an exception pattern as a wildcard, which turns off the
/// pruning of excluded directories (fsutil `NewFilterFS`).
const WILDCARD_CHARS: &[char] = &['*', '[', ']', '?', '^', '\\'];

/// A class that matches nothing: what a Go literal or class made only of surrogate code points
/// can match in valid UTF-8.
const NO_CHARACTER: &str = r"[^\x{0}-\x{10FFFF}]";

/// Why a `.dockerignore` or `--exclude` pattern list was rejected.
#[derive(Debug, thiserror::Error)]
pub enum IgnoreError {
    /// A `!` with nothing after it (moby: `illegal exclusion pattern: "!"`).
    #[error("illegal exclusion pattern \"!\"{}", AtLine(*.line))]
    LoneExclamation {
        /// 1-based `.dockerignore` line, when the pattern came from one.
        line: Option<usize>,
    },
    /// The pattern is not valid glob or regular-expression syntax.
    #[error("invalid pattern {}{}", Shown(.pattern), AtLine(*.line))]
    InvalidPattern {
        /// The pattern as written (trimmed).
        pattern: String,
        /// 1-based `.dockerignore` line, when the pattern came from one.
        line: Option<usize>,
        /// What is wrong with it.
        #[source]
        reason: PatternSyntax,
    },
    /// The pattern's compiled program would exceed [`PATTERN_PROGRAM_LIMIT`].
    #[error(
        "pattern {}{} is too complex: its program exceeds {limit} bytes",
        Shown(.pattern),
        AtLine(*.line)
    )]
    TooComplex {
        /// The pattern as written (trimmed).
        pattern: String,
        /// 1-based `.dockerignore` line, when the pattern came from one.
        line: Option<usize>,
        /// The limit that was exceeded, in bytes.
        limit: usize,
    },
    /// The regular-expression engine refused the translated pattern. Not expected: every
    /// construct moby can produce is translated or rejected with [`IgnoreError::InvalidPattern`].
    #[error("pattern {}{} cannot be compiled", Shown(.pattern), AtLine(*.line))]
    Unsupported {
        /// The pattern as written (trimmed).
        pattern: String,
        /// 1-based `.dockerignore` line, when the pattern came from one.
        line: Option<usize>,
        /// The engine's complaint.
        #[source]
        source: regex::Error,
    },
    /// A `.dockerignore` line longer than moby's reader accepts ([`MAX_LINE_BYTES`]).
    #[error(".dockerignore line {line} is {length} bytes long, over the limit of {limit}", limit = MAX_LINE_BYTES)]
    LineTooLong {
        /// 1-based line number.
        line: usize,
        /// Its length in bytes, without the `\n`.
        length: usize,
    },
}

/// The syntax problem in an invalid pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternSyntax {
    /// A `\` with nothing after it.
    #[error("the pattern ends with a lone backslash")]
    TrailingBackslash,
    /// A `[` whose class never closes.
    #[error("a character class is missing its closing ]")]
    UnclosedClass,
    /// A class that is empty or places `-` or `]` where a character must be (`[]`, `[-a]`,
    /// `[a-]`, `[a-b-c]`), as Go's `filepath.Match` defines it.
    #[error("a character class is empty or has a misplaced - or ]")]
    MisplacedInClass,
    /// An escape Go's regexp syntax does not know (`\e`, `\1`, `\x4`, `\b` in a class).
    #[error("invalid escape sequence {escape}")]
    InvalidEscape {
        /// The escape as written.
        escape: String,
    },
    /// A reversed range (`z-a`) or an unknown named class (`[:foo:]`, `\p{Foo}`).
    #[error("invalid character class range {range}")]
    InvalidClassRange {
        /// The range or class name as written.
        range: String,
    },
}

/// Renders ` on line N` when a line is known.
struct AtLine(Option<usize>);

impl fmt::Display for AtLine {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(formatter, " on line {line}"),
            None => Ok(()),
        }
    }
}

/// Quotes a pattern for a message, cut short so that a hostile pattern cannot flood the output.
struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN_CHARS: usize = 120;
        match self.0.char_indices().nth(SHOWN_CHARS) {
            Some((cut, _)) => write!(formatter, "{:?}…", &self.0[..cut]),
            None => write!(formatter, "{:?}", self.0),
        }
    }
}

/// A compiled list of ignore patterns. Cloning is cheap (one reference count), and the matcher
/// can be shared across threads.
#[derive(Clone, Debug)]
pub struct IgnoreMatcher {
    inner: Arc<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    patterns: Vec<Pattern>,
    /// `!` + cleaned text for exceptions, the cleaned text otherwise.
    display: Vec<String>,
    has_exceptions: bool,
    /// Exceptions with trailing `/**` or `/*` removed, when none has another wildcard
    /// character; `None` when some has one, which rules out pruning.
    exception_stems: Option<Vec<String>>,
}

#[derive(Debug)]
struct Pattern {
    /// The pattern after trimming and cleaning, without its `!`.
    cleaned: String,
    exception: bool,
    test: PathTest,
}

/// How one pattern tests a path; moby's `exactMatch`, `prefixMatch`, `suffixMatch` and
/// `regexpMatch`.
#[derive(Debug)]
enum PathTest {
    /// The path equals the pattern.
    Whole,
    /// The path starts with the pattern minus its trailing `**`.
    Prefix,
    /// The path ends with the pattern minus its leading `**`, or is that minus a leading `/`.
    Suffix,
    Expression(Regex),
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        let pattern = self.cleaned.as_bytes();
        let bytes = path.as_bytes();
        match &self.test {
            PathTest::Whole => bytes == pattern,
            PathTest::Prefix => bytes.starts_with(&pattern[..pattern.len() - 2]),
            PathTest::Suffix => {
                // Byte offsets, as in moby: a leading BOM (which its scanner skips) puts the cut
                // inside a character, and that is kept.
                let suffix = &pattern[2..];
                bytes.ends_with(suffix) || (suffix.first() == Some(&b'/') && bytes == &suffix[1..])
            }
            PathTest::Expression(expression) => expression.is_match(path),
        }
    }

    /// Whether the pattern matches `parent` or one of the directories above it, as moby's
    /// `MatchesOrParentMatches` tests them: every prefix of `parent` that ends before a `/`,
    /// then `parent` itself.
    fn matches_a_parent(&self, parent: &str) -> bool {
        if parent == "." {
            return false;
        }
        parent
            .match_indices('/')
            .any(|(end, _)| self.matches(&parent[..end]))
            || self.matches(parent)
    }
}

/// A directory's per-pattern results, which BuildKit's context walker hands down to the
/// directory's children (moby `MatchInfo`). The default value means "nothing known", which
/// entries directly below the context root use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentMatches {
    matched: Vec<bool>,
}

impl IgnoreMatcher {
    /// Parses the text of a `.dockerignore` file.
    pub fn from_dockerignore(text: &str) -> Result<Self, IgnoreError> {
        let lines = read_dockerignore(text)?;
        Self::compile(
            lines
                .iter()
                .map(|(pattern, line)| (pattern.as_str(), Some(*line))),
        )
    }

    /// Compiles a list of patterns, as given to COPY `--exclude`; each may start with `!`.
    pub fn from_patterns<I, S>(patterns: I) -> Result<Self, IgnoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns: Vec<S> = patterns.into_iter().collect();
        Self::compile(patterns.iter().map(|pattern| (pattern.as_ref(), None)))
    }

    fn compile<'a>(
        entries: impl Iterator<Item = (&'a str, Option<usize>)>,
    ) -> Result<Self, IgnoreError> {
        let mut patterns = Vec::new();
        for (text, line) in entries {
            if let Some(pattern) = compile_pattern(text, line)? {
                patterns.push(pattern);
            }
        }
        let display = patterns
            .iter()
            .map(|pattern| {
                if pattern.exception {
                    format!("!{}", pattern.cleaned)
                } else {
                    pattern.cleaned.clone()
                }
            })
            .collect();
        let has_exceptions = patterns.iter().any(|pattern| pattern.exception);
        let exception_stems = patterns
            .iter()
            .filter(|pattern| pattern.exception)
            .map(|pattern| {
                let stem = without_trailing_glob(&pattern.cleaned);
                (!stem.contains(WILDCARD_CHARS)).then(|| stem.to_owned())
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Compiled {
                patterns,
                display,
                has_exceptions,
                exception_stems,
            }),
        })
    }

    /// Whether a context-relative path (`a/b/c.txt`: `/`-separated, no leading `./`) is
    /// excluded, its parent directories considered (moby `MatchesOrParentMatches`). The context
    /// root (`""` or `"."`) is never excluded.
    pub fn is_excluded(&self, relative_path: &str) -> bool {
        if relative_path.is_empty() || relative_path == "." {
            return false;
        }
        self.decide(relative_path, &ParentMatches::default(), None)
    }

    /// BuildKit's walker rule (moby `MatchesUsingParentResults`): whether `relative_path` is
    /// excluded, given the [`ParentMatches`] of its directory from
    /// [`IgnoreMatcher::directory_in_walk`] (the default value for entries at the root).
    /// A pattern that matched the directory counts as matching everything below it, and the
    /// other patterns are tested against the path alone. This differs from
    /// [`IgnoreMatcher::is_excluded`] only when a pattern was not evaluated for the directory
    /// because an earlier pattern had already decided it, e.g. `["a/d", "!a"]`, where the
    /// walker keeps `a/d` excluded but `is_excluded("a/d")` is false.
    pub fn is_excluded_in_walk(&self, relative_path: &str, parent: &ParentMatches) -> bool {
        self.decide(relative_path, parent, None)
    }

    /// Like [`IgnoreMatcher::is_excluded_in_walk`] for a directory, also returning the results
    /// to hand to the entries inside it.
    pub fn directory_in_walk(
        &self,
        relative_dir: &str,
        parent: &ParentMatches,
    ) -> (bool, ParentMatches) {
        let mut matched = Vec::with_capacity(self.inner.patterns.len());
        let excluded = self.decide(relative_dir, parent, Some(&mut matched));
        (excluded, ParentMatches { matched })
    }

    /// Whether a walker that found `relative_dir` excluded may skip everything below it: true
    /// when there are no exceptions, or when every exception is free of wildcards (a trailing
    /// `/*` or `/**` aside) and none lies inside `relative_dir` (fsutil's rule, which BuildKit
    /// applies to the build context). An exception like `!*.md` rules out all pruning.
    pub fn can_skip_directory(&self, relative_dir: &str) -> bool {
        if !self.inner.has_exceptions {
            return true;
        }
        let Some(stems) = &self.inner.exception_stems else {
            return false;
        };
        // fsutil asks whether `stem + "/"` starts with `dir + "/"`.
        !stems.iter().any(|stem| {
            stem.strip_prefix(relative_dir)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    /// The patterns as cleaned, in order, exceptions with their leading `!`; empty patterns
    /// are left out. For digests and display.
    pub fn patterns(&self) -> &[String] {
        &self.inner.display
    }

    /// Whether there are no patterns at all, so that nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.inner.patterns.is_empty()
    }

    /// Whether any pattern is a `!` exception (moby `Exclusions`).
    pub fn has_exceptions(&self) -> bool {
        self.inner.has_exceptions
    }

    /// moby's decision loop. With an empty `parent` it is `MatchesOrParentMatches`; with a
    /// directory's results it is `MatchesUsingParentResults`. `record` collects per-pattern
    /// results for the children of a directory.
    fn decide(
        &self,
        path: &str,
        parent: &ParentMatches,
        mut record: Option<&mut Vec<bool>>,
    ) -> bool {
        let patterns = &self.inner.patterns;
        // moby rejects results of the wrong length; treating them as unknown gives the
        // `MatchesOrParentMatches` answer instead of a wrong one.
        let inherited =
            (parent.matched.len() == patterns.len()).then_some(parent.matched.as_slice());
        let parent_dir = match inherited {
            Some(_) => Cow::Borrowed("."),
            None => parent_dir(path),
        };
        let mut excluded = false;
        for (index, pattern) in patterns.iter().enumerate() {
            let mut matched = inherited.is_some_and(|results| results[index]);
            // A pattern that cannot change the outcome (an ordinary pattern once excluded, an
            // exception while included) is not evaluated, and is recorded as not matching.
            if !matched && pattern.exception == excluded {
                matched = pattern.matches(path) || pattern.matches_a_parent(&parent_dir);
            }
            if let Some(record) = record.as_deref_mut() {
                record.push(matched);
            }
            if matched {
                excluded = !pattern.exception;
            }
        }
        excluded
    }
}

/// Splits a `.dockerignore` into its patterns with their 1-based line numbers (moby
/// `ignorefile.ReadAll`).
fn read_dockerignore(text: &str) -> Result<Vec<(String, usize)>, IgnoreError> {
    let mut patterns = Vec::new();
    if text.is_empty() {
        return Ok(patterns);
    }
    // bufio.ScanLines: no empty token after a final '\n'.
    let body = text.strip_suffix('\n').unwrap_or(text);
    for (index, raw) in body.split('\n').enumerate() {
        let line = index + 1;
        if raw.len() > MAX_LINE_BYTES {
            return Err(IgnoreError::LineTooLong {
                line,
                length: raw.len(),
            });
        }
        let mut pattern = raw.strip_suffix('\r').unwrap_or(raw);
        if index == 0 {
            pattern = pattern.strip_prefix('\u{FEFF}').unwrap_or(pattern);
        }
        // Comments are recognised before trimming: "  # x" is a pattern.
        if pattern.starts_with('#') {
            continue;
        }
        let pattern = pattern.trim();
        if pattern.is_empty() {
            continue;
        }
        let (exception, rest) = match pattern.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, pattern),
        };
        let mut cleaned = if rest.is_empty() {
            String::new()
        } else {
            let cleaned = clean_path(rest);
            match cleaned.strip_prefix('/') {
                Some(relative) if !relative.is_empty() => relative.to_owned(),
                _ => cleaned,
            }
        };
        if exception {
            cleaned.insert(0, '!');
        }
        patterns.push((cleaned, line));
    }
    Ok(patterns)
}

/// Compiles one pattern the way moby's `New` does; `None` for a blank one.
fn compile_pattern(text: &str, line: Option<usize>) -> Result<Option<Pattern>, IgnoreError> {
    let written = text.trim();
    if written.is_empty() {
        return Ok(None);
    }
    // moby cleans before splitting off the '!', so "!./a" keeps its "./".
    let cleaned = clean_path(written);
    let (exception, cleaned) = match cleaned.strip_prefix('!') {
        Some("") => return Err(IgnoreError::LoneExclamation { line }),
        Some(rest) => (true, rest.to_owned()),
        None => (false, cleaned),
    };
    let invalid = |reason| IgnoreError::InvalidPattern {
        pattern: written.to_owned(),
        line,
        reason,
    };
    check_glob_syntax(&cleaned).map_err(invalid)?;
    let (shape, go_expression) = moby_expression(&cleaned);
    let test = match shape {
        Shape::Whole => PathTest::Whole,
        Shape::Prefix => PathTest::Prefix,
        Shape::Suffix => PathTest::Suffix,
        Shape::Expression => {
            let expression = go_expression_to_rust(&go_expression).map_err(invalid)?;
            let compiled = RegexBuilder::new(&expression)
                .size_limit(PATTERN_PROGRAM_LIMIT)
                .build()
                .map_err(|source| match source {
                    regex::Error::CompiledTooBig(limit) => IgnoreError::TooComplex {
                        pattern: written.to_owned(),
                        line,
                        limit,
                    },
                    source => IgnoreError::Unsupported {
                        pattern: written.to_owned(),
                        line,
                        source,
                    },
                })?;
            PathTest::Expression(compiled)
        }
    };
    Ok(Some(Pattern {
        cleaned,
        exception,
        test,
    }))
}

/// fsutil's `patternWithoutTrailingGlob`.
fn without_trailing_glob(pattern: &str) -> &str {
    let pattern = pattern.strip_suffix("/**").unwrap_or(pattern);
    pattern.strip_suffix("/*").unwrap_or(pattern)
}

/// Lexical path cleaning with the rules of Go's `filepath.Clean` on Unix: repeated `/`
/// collapse, `.` elements go, `..` removes the element before it (or is kept at the start of a
/// relative path, dropped at the root), no trailing `/` but for the root, and `""` is `"."`.
fn clean_path(path: &str) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    let bytes = path.as_bytes();
    let rooted = bytes[0] == b'/';
    let mut out = String::with_capacity(path.len());
    let mut read = 0;
    // Length of `out` that a `..` may not back up past.
    let mut floor = 0;
    if rooted {
        out.push('/');
        read = 1;
        floor = 1;
    }
    let separator_or_end = |at: usize| at == bytes.len() || bytes[at] == b'/';
    while read < bytes.len() {
        // An empty element or a ".": skip one byte.
        if bytes[read] == b'/' || (bytes[read] == b'.' && separator_or_end(read + 1)) {
            read += 1;
        } else if bytes[read] == b'.'
            && bytes.get(read + 1) == Some(&b'.')
            && separator_or_end(read + 2)
        {
            read += 2;
            if out.len() > floor {
                let mut keep = out.len() - 1;
                while keep > floor && out.as_bytes()[keep] != b'/' {
                    keep -= 1;
                }
                out.truncate(keep);
            } else if !rooted {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str("..");
                floor = out.len();
            }
        } else {
            if out.len() != usize::from(rooted) {
                out.push('/');
            }
            let start = read;
            while read < bytes.len() && bytes[read] != b'/' {
                read += 1;
            }
            out.push_str(&path[start..read]);
        }
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// Go's `filepath.Dir`: everything before the last `/`, cleaned; `"."` when there is no `/`.
/// Borrows in the common case of an already clean path.
fn parent_dir(path: &str) -> Cow<'_, str> {
    let Some(last) = path.rfind('/') else {
        return Cow::Borrowed(".");
    };
    let parent = &path[..last];
    let clean = !parent.is_empty()
        && !parent.ends_with('/')
        && parent
            .split('/')
            .enumerate()
            .all(|(index, element)| match element {
                "" => index == 0,
                "." | ".." => false,
                _ => true,
            });
    if clean {
        Cow::Borrowed(parent)
    } else {
        Cow::Owned(clean_path(&path[..=last]))
    }
}

/// The checks Go's `filepath.Match` makes on a pattern, which moby's `New` runs it through:
/// the pattern is cut into chunks at each `*` outside a class, and every chunk must parse.
fn check_glob_syntax(pattern: &str) -> Result<(), PatternSyntax> {
    let mut rest = pattern.as_bytes();
    while !rest.is_empty() {
        while let Some(after) = rest.strip_prefix(b"*") {
            rest = after;
        }
        let end = glob_chunk_end(rest);
        check_glob_chunk(&rest[..end])?;
        rest = &rest[end..];
    }
    Ok(())
}

/// Where the chunk at the start of `pattern` ends: at the first `*` outside `[...]`, as Go's
/// `scanChunk` finds it (a `\` hides the next byte; brackets are not nested).
fn glob_chunk_end(pattern: &[u8]) -> usize {
    let mut in_class = false;
    let mut at = 0;
    while at < pattern.len() {
        match pattern[at] {
            b'\\' if at + 1 < pattern.len() => at += 1,
            b'[' => in_class = true,
            b']' => in_class = false,
            b'*' if !in_class => break,
            _ => {}
        }
        at += 1;
    }
    at
}

/// Go's `matchChunk`, reduced to its syntax errors.
fn check_glob_chunk(chunk: &[u8]) -> Result<(), PatternSyntax> {
    let mut at = 0;
    while at < chunk.len() {
        match chunk[at] {
            b'[' => {
                at += 1;
                if chunk.get(at) == Some(&b'^') {
                    at += 1;
                }
                let mut ranges = 0;
                loop {
                    if ranges > 0 && chunk.get(at) == Some(&b']') {
                        at += 1;
                        break;
                    }
                    at = glob_class_char_end(chunk, at)?;
                    if chunk[at] == b'-' {
                        at = glob_class_char_end(chunk, at + 1)?;
                    }
                    ranges += 1;
                }
            }
            b'\\' => {
                if at + 1 == chunk.len() {
                    return Err(PatternSyntax::TrailingBackslash);
                }
                at += 2;
            }
            _ => at += 1,
        }
    }
    Ok(())
}

/// Go's `getEsc`: one class character (possibly `\`-escaped) at `at`, which must be followed
/// by more of the chunk. Returns where it ends.
fn glob_class_char_end(chunk: &[u8], mut at: usize) -> Result<usize, PatternSyntax> {
    match chunk.get(at) {
        None => return Err(PatternSyntax::UnclosedClass),
        Some(b'-' | b']') => return Err(PatternSyntax::MisplacedInClass),
        Some(b'\\') => {
            at += 1;
            if at == chunk.len() {
                return Err(PatternSyntax::UnclosedClass);
            }
        }
        Some(_) => {}
    }
    at += utf8_width(chunk[at]);
    if at >= chunk.len() {
        return Err(PatternSyntax::UnclosedClass);
    }
    Ok(at)
}

/// Length of the UTF-8 sequence that starts with `lead`.
fn utf8_width(lead: u8) -> usize {
    match lead {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// moby's match types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Whole,
    Prefix,
    Suffix,
    Expression,
}

/// moby's `Pattern.compile` for `/`-separated paths: the pattern's shape and the Go regular
/// expression it builds (only meaningful for [`Shape::Expression`]).
fn moby_expression(pattern: &str) -> (Shape, String) {
    // moby walks the pattern with Go's text/scanner, which skips a BOM at the very start.
    let body = pattern.strip_prefix('\u{FEFF}').unwrap_or(pattern);
    let mut chars = body.chars().peekable();
    let mut expression = String::with_capacity(body.len() * 2 + 2);
    expression.push('^');
    let mut shape = Shape::Whole;
    let mut first = true;
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                // "**/" counts as "**".
                if chars.peek() == Some(&'/') {
                    chars.next();
                }
                if chars.peek().is_some() {
                    expression.push_str("(.*/)?");
                    shape = Shape::Expression;
                } else if shape == Shape::Whole {
                    shape = Shape::Prefix;
                } else {
                    expression.push_str(".*");
                    shape = Shape::Expression;
                }
                if first {
                    shape = Shape::Suffix;
                }
            }
            '*' => {
                expression.push_str("[^/]*");
                shape = Shape::Expression;
            }
            '?' => {
                expression.push_str("[^/]");
                shape = Shape::Expression;
            }
            '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' => {
                expression.push('\\');
                expression.push(c);
            }
            '\\' => match chars.next() {
                Some(escaped) => {
                    expression.push('\\');
                    expression.push(escaped);
                    shape = Shape::Expression;
                }
                None => expression.push('\\'),
            },
            '[' | ']' => {
                expression.push(c);
                shape = Shape::Expression;
            }
            _ => expression.push(c),
        }
        first = false;
    }
    if shape == Shape::Expression {
        expression.push('$');
    }
    (shape, expression)
}

/// Translates a Go regular expression (RE2 syntax with Go's `Perl` flags, as `regexp.Compile`
/// parses it) into the `regex` crate's syntax with the same meaning. Covers what moby's
/// expressions can contain: literals, `\` escapes of every kind Go knows, classes, `.`, `^`,
/// `$`, and the groups and repetitions moby itself writes.
fn go_expression_to_rust(go: &str) -> Result<String, PatternSyntax> {
    let mut out = String::with_capacity(go.len() * 2);
    let mut rest = go;
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        match c {
            // Without Go's multi-line flag these anchor the whole text.
            '^' => out.push_str(r"\A"),
            '$' => out.push_str(r"\z"),
            // Same meaning in both (`.` stops at '\n' in both). moby quotes `+`, `|` and
            // parentheses in patterns, so these come only from its own `(.*/)?`, `.*`, `[^/]*`.
            '.' | '(' | ')' | '*' | '?' | '+' | '|' => out.push(c),
            '[' => rest = translate_class(rest, &mut out)?,
            '\\' => rest = translate_escape(rest, &mut out)?,
            // Includes a lone `]`, `{` and `}`, which Go reads as literals here.
            _ => push_literal(&mut out, c),
        }
    }
    Ok(out)
}

/// Translates the escape whose backslash precedes `rest`, outside a class; returns what follows.
fn translate_escape<'a>(rest: &'a str, out: &mut String) -> Result<&'a str, PatternSyntax> {
    let Some(c) = rest.chars().next() else {
        return Err(PatternSyntax::TrailingBackslash);
    };
    let after = &rest[c.len_utf8()..];
    match c {
        'A' => out.push_str(r"\A"),
        'z' => out.push_str(r"\z"),
        // Go's word boundaries are ASCII-only.
        'b' => out.push_str(r"(?-u:\b)"),
        'B' => out.push_str(r"(?-u:\B)"),
        'Q' => {
            // Everything up to `\E` (or the end, moby's `$` included) is literal.
            let (literal, tail) = after.split_once(r"\E").unwrap_or((after, ""));
            for c in literal.chars() {
                push_literal(out, c);
            }
            return Ok(tail);
        }
        'p' | 'P' => {
            let (class, tail) = unicode_class(rest)?;
            let set = ClassSet {
                ranges: Vec::new(),
                unicode: vec![class],
            };
            push_class(out, false, &set);
            return Ok(tail);
        }
        'd' | 'D' | 's' | 'S' | 'w' | 'W' => {
            let set = ClassSet {
                ranges: perl_class(c),
                unicode: Vec::new(),
            };
            push_class(out, false, &set);
        }
        _ => {
            let (code, tail) = escaped_char(rest)?;
            match char::from_u32(code) {
                Some(c) => push_literal(out, c),
                None => out.push_str(NO_CHARACTER),
            }
            return Ok(tail);
        }
    }
    Ok(after)
}

/// The contents of one character class.
#[derive(Debug, Default)]
struct ClassSet {
    /// Inclusive code point ranges.
    ranges: Vec<(u32, u32)>,
    /// Unicode classes by name; `true` when negated.
    unicode: Vec<(bool, String)>,
}

/// Translates the class whose `[` precedes `rest` (Go's `parseClass`); returns what follows.
fn translate_class<'a>(rest: &'a str, out: &mut String) -> Result<&'a str, PatternSyntax> {
    let (negated, mut rest) = match rest.strip_prefix('^') {
        Some(after) => (true, after),
        None => (false, rest),
    };
    let mut set = ClassSet::default();
    let mut first = true;
    loop {
        if rest.is_empty() {
            return Err(PatternSyntax::UnclosedClass);
        }
        // A `]` right after `[` or `[^` is a literal.
        if !first && rest.starts_with(']') {
            rest = &rest[1..];
            break;
        }
        first = false;
        // Go looks for the first ":]" anywhere further on, even past this class's end.
        let posix_end = if rest.len() > 2 && rest.starts_with("[:") {
            rest[2..].find(":]")
        } else {
            None
        };
        if let Some(end) = posix_end {
            let name = &rest[..end + 4];
            let ranges = posix_class(name).ok_or_else(|| PatternSyntax::InvalidClassRange {
                range: name.to_owned(),
            })?;
            set.ranges.extend(ranges);
            rest = &rest[end + 4..];
            continue;
        }
        if let Some(after) = rest.strip_prefix('\\') {
            if after.starts_with(['p', 'P']) {
                let (class, tail) = unicode_class(after)?;
                set.unicode.push(class);
                rest = tail;
                continue;
            }
            if let Some(c @ ('d' | 'D' | 's' | 'S' | 'w' | 'W')) = after.chars().next() {
                set.ranges.extend(perl_class(c));
                rest = &after[1..];
                continue;
            }
        }
        let start = rest;
        let (low, after) = class_char(rest)?;
        rest = after;
        let mut high = low;
        // "a-]" is `a` and `-`.
        if rest.len() >= 2 && rest.starts_with('-') && !rest[1..].starts_with(']') {
            let (end, after) = class_char(&rest[1..])?;
            rest = after;
            high = end;
            if high < low {
                return Err(PatternSyntax::InvalidClassRange {
                    range: start[..start.len() - rest.len()].to_owned(),
                });
            }
        }
        set.ranges.push((low, high));
    }
    push_class(out, negated, &set);
    Ok(rest)
}

/// One class member, escaped or not (Go's `parseClassChar`).
fn class_char(rest: &str) -> Result<(u32, &str), PatternSyntax> {
    match rest.chars().next() {
        None => Err(PatternSyntax::UnclosedClass),
        Some('\\') => escaped_char(&rest[1..]),
        Some(c) => Ok((u32::from(c), &rest[c.len_utf8()..])),
    }
}

/// A single-character escape whose backslash precedes `rest` (Go's `parseEscape`).
fn escaped_char(rest: &str) -> Result<(u32, &str), PatternSyntax> {
    let Some(c) = rest.chars().next() else {
        return Err(PatternSyntax::TrailingBackslash);
    };
    let after = &rest[c.len_utf8()..];
    let invalid = || PatternSyntax::InvalidEscape {
        escape: format!("\\{c}"),
    };
    let octal_digit = |text: &str| {
        text.as_bytes()
            .first()
            .copied()
            .filter(|digit| (b'0'..=b'7').contains(digit))
    };
    match c {
        // A lone non-zero digit would be a backreference, which Go does not support.
        '1'..='7' if octal_digit(after).is_none() => Err(invalid()),
        '0'..='7' => {
            let mut value = u32::from(c) - u32::from('0');
            let mut tail = after;
            for _ in 0..2 {
                let Some(digit) = octal_digit(tail) else {
                    break;
                };
                value = value * 8 + u32::from(digit - b'0');
                tail = &tail[1..];
            }
            Ok((value, tail))
        }
        'x' => hex_escape(after).ok_or_else(invalid),
        'a' => Ok((0x07, after)),
        'f' => Ok((0x0C, after)),
        'n' => Ok((0x0A, after)),
        'r' => Ok((0x0D, after)),
        't' => Ok((0x09, after)),
        'v' => Ok((0x0B, after)),
        // Escaped ASCII punctuation (and `_`) stands for itself.
        c if c.is_ascii() && !c.is_ascii_alphanumeric() => Ok((u32::from(c), after)),
        _ => Err(invalid()),
    }
}

/// `\xHH` or `\x{H...}` after the `x`.
fn hex_escape(rest: &str) -> Option<(u32, &str)> {
    let c = rest.chars().next()?;
    let after = &rest[c.len_utf8()..];
    if c == '{' {
        let end = after.find('}')?;
        let digits = &after[..end];
        if digits.is_empty() {
            return None;
        }
        let mut value: u32 = 0;
        for digit in digits.chars() {
            value = value * 16 + digit.to_digit(16)?;
            if value > u32::from(char::MAX) {
                return None;
            }
        }
        return Some((value, &after[end + 1..]));
    }
    let low = after.chars().next()?;
    let value = c.to_digit(16)? * 16 + low.to_digit(16)?;
    Some((value, &after[low.len_utf8()..]))
}

/// `\pX`, `\p{Name}`, `\p{^Name}` or the `\P` forms, with `rest` starting at the `p` or `P`
/// (Go's `parseUnicodeClass`). Returns `(negated, name)` and what follows.
fn unicode_class(rest: &str) -> Result<((bool, String), &str), PatternSyntax> {
    let negated = rest.starts_with('P');
    let after = &rest[1..];
    let (name, tail) = match after.strip_prefix('{') {
        Some(braced) => match braced.find('}') {
            Some(end) => (&braced[..end], &braced[end + 1..]),
            None => {
                return Err(PatternSyntax::InvalidClassRange {
                    range: format!("\\{rest}"),
                });
            }
        },
        None => match after.chars().next() {
            Some(c) => after.split_at(c.len_utf8()),
            None => ("", ""),
        },
    };
    let (negated, name) = match name.strip_prefix('^') {
        Some(name) => (!negated, name),
        None => (negated, name),
    };
    // Go knows "Any" and its category and script tables, whose names are capitalised; the
    // regex crate matches names loosely, so keep to Go's spelling before asking it. Only the
    // one-letter form can come from a pattern (moby quotes `{`), and Go's one-letter names are
    // exactly the general categories.
    let well_formed = if after.starts_with('{') {
        name.starts_with(|c: char| c.is_ascii_uppercase())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    } else {
        matches!(name, "C" | "L" | "M" | "N" | "P" | "S" | "Z")
    };
    if !well_formed || Regex::new(&format!(r"\p{{{name}}}")).is_err() {
        return Err(PatternSyntax::InvalidClassRange {
            range: format!("\\{}", &rest[..rest.len() - tail.len()]),
        });
    }
    Ok(((negated, name.to_owned()), tail))
}

/// Go's Perl classes, which are ASCII-only (the regex crate's are Unicode-aware).
fn perl_class(name: char) -> Vec<(u32, u32)> {
    let ranges: &[(u32, u32)] = match name.to_ascii_lowercase() {
        'd' => &[(0x30, 0x39)],
        's' => &[(0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20)],
        _ => &[(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    };
    if name.is_ascii_uppercase() {
        complement(ranges)
    } else {
        ranges.to_vec()
    }
}

/// Go's POSIX classes, `[:name:]` or `[:^name:]`.
fn posix_class(name: &str) -> Option<Vec<(u32, u32)>> {
    let inner = name.strip_prefix("[:")?.strip_suffix(":]")?;
    let (negated, inner) = match inner.strip_prefix('^') {
        Some(inner) => (true, inner),
        None => (false, inner),
    };
    let ranges: &[(u32, u32)] = match inner {
        "alnum" => &[(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)],
        "alpha" => &[(0x41, 0x5A), (0x61, 0x7A)],
        "ascii" => &[(0x00, 0x7F)],
        "blank" => &[(0x09, 0x09), (0x20, 0x20)],
        "cntrl" => &[(0x00, 0x1F), (0x7F, 0x7F)],
        "digit" => &[(0x30, 0x39)],
        "graph" => &[(0x21, 0x7E)],
        "lower" => &[(0x61, 0x7A)],
        "print" => &[(0x20, 0x7E)],
        "punct" => &[(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)],
        "space" => &[(0x09, 0x0D), (0x20, 0x20)],
        "upper" => &[(0x41, 0x5A)],
        "word" => &[(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
        "xdigit" => &[(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)],
        _ => return None,
    };
    Some(if negated {
        complement(ranges)
    } else {
        ranges.to_vec()
    })
}

/// The code points not in `ranges` (sorted, disjoint).
fn complement(ranges: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    let mut next = 0;
    for &(low, high) in ranges {
        if low > next {
            out.push((next, low - 1));
        }
        next = high + 1;
    }
    if next <= u32::from(char::MAX) {
        out.push((next, u32::from(char::MAX)));
    }
    out
}

/// Writes a class in the regex crate's syntax. Members are written as `\x{...}` so that the
/// crate's nested classes and `&&`, `--`, `~~` operators, which Go does not have, never arise.
fn push_class(out: &mut String, negated: bool, set: &ClassSet) {
    // Surrogates cannot occur in a Rust string; leave them out of every range.
    let ranges: Vec<(u32, u32)> = set
        .ranges
        .iter()
        .flat_map(|&(low, high)| [(low, high.min(0xD7FF)), (low.max(0xE000), high)])
        .filter(|(low, high)| low <= high)
        .collect();
    if ranges.is_empty() && set.unicode.is_empty() {
        out.push_str(if negated { "(?s:.)" } else { NO_CHARACTER });
        return;
    }
    out.push('[');
    if negated {
        out.push('^');
    }
    for (low, high) in ranges {
        let _ = write!(out, r"\x{{{low:X}}}");
        if high > low {
            let _ = write!(out, r"-\x{{{high:X}}}");
        }
    }
    for (negated, name) in &set.unicode {
        let _ = write!(out, r"\{}{{{name}}}", if *negated { 'P' } else { 'p' });
    }
    out.push(']');
}

/// Writes one literal character, escaped unless it is plainly inert.
fn push_literal(out: &mut String, c: char) {
    if c.is_ascii_alphanumeric()
        || c == '_'
        || c == '/'
        || (!c.is_ascii() && !c.is_whitespace() && !c.is_control())
    {
        out.push(c);
    } else {
        let _ = write!(out, r"\x{{{:X}}}", u32::from(c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(patterns: &[&str]) -> IgnoreMatcher {
        IgnoreMatcher::from_patterns(patterns)
            .unwrap_or_else(|error| panic!("patterns {patterns:?} should compile: {error}"))
    }

    /// moby's `MatchesExact`: the path alone, no parent directories.
    fn matches_exact(matcher: &IgnoreMatcher, path: &str) -> bool {
        let mut excluded = false;
        for pattern in &matcher.inner.patterns {
            if pattern.exception == excluded && pattern.matches(path) {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Walks down to `path` the way moby's `MatchesUsingParentResults` test does: through each
    /// prefix of `filepath.Dir(path)`, carrying the results.
    fn walk_to(matcher: &IgnoreMatcher, path: &str) -> bool {
        let parent = parent_dir(path);
        let mut state = ParentMatches::default();
        if parent != "." {
            let ends = parent
                .match_indices('/')
                .map(|(end, _)| end)
                .chain([parent.len()]);
            for end in ends {
                state = matcher.directory_in_walk(&parent[..end], &state).1;
            }
        }
        matcher.is_excluded_in_walk(path, &state)
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Expect {
        /// No match.
        Fail,
        /// The path itself matches.
        Exact,
        /// Only a parent directory matches.
        Inexact,
    }
    use Expect::{Exact, Fail, Inexact};

    /// moby patternmatcher_test.go `TestMatches`, every row, plus the two non-Windows rows.
    const MOBY_MATCHES: &[(&str, &str, Expect)] = &[
        ("**", "file", Exact),
        ("**", "file/", Exact),
        ("**/", "file", Exact),
        ("**/", "file/", Exact),
        ("**", "/", Exact),
        ("**/", "/", Exact),
        ("**", "dir/file", Exact),
        ("**/", "dir/file", Exact),
        ("**", "dir/file/", Exact),
        ("**/", "dir/file/", Exact),
        ("**/**", "dir/file", Exact),
        ("**/**", "dir/file/", Exact),
        ("dir/**", "dir/file", Exact),
        ("dir/**", "dir/file/", Exact),
        ("dir/**", "dir/dir2/file", Exact),
        ("dir/**", "dir/dir2/file/", Exact),
        ("**/dir", "dir", Exact),
        ("**/dir", "dir/file", Inexact),
        ("**/dir2/*", "dir/dir2/file", Exact),
        ("**/dir2/*", "dir/dir2/file/", Inexact),
        ("**/dir2/**", "dir/dir2/dir3/file", Exact),
        ("**/dir2/**", "dir/dir2/dir3/file/", Exact),
        ("**file", "file", Exact),
        ("**file", "dir/file", Exact),
        ("**/file", "dir/file", Exact),
        ("**file", "dir/dir/file", Exact),
        ("**/file", "dir/dir/file", Exact),
        ("**/file*", "dir/dir/file", Exact),
        ("**/file*", "dir/dir/file.txt", Exact),
        ("**/file*txt", "dir/dir/file.txt", Exact),
        ("**/file*.txt", "dir/dir/file.txt", Exact),
        ("**/file*.txt*", "dir/dir/file.txt", Exact),
        ("**/**/*.txt", "dir/dir/file.txt", Exact),
        ("**/**/*.txt2", "dir/dir/file.txt", Fail),
        ("**/*.txt", "file.txt", Exact),
        ("**/**/*.txt", "file.txt", Exact),
        ("a**/*.txt", "a/file.txt", Exact),
        ("a**/*.txt", "a/dir/file.txt", Exact),
        ("a**/*.txt", "a/dir/dir/file.txt", Exact),
        ("a/*.txt", "a/dir/file.txt", Fail),
        ("a/*.txt", "a/file.txt", Exact),
        ("a/*.txt**", "a/file.txt", Exact),
        ("a[b-d]e", "ae", Fail),
        ("a[b-d]e", "ace", Exact),
        ("a[b-d]e", "aae", Fail),
        ("a[^b-d]e", "aze", Exact),
        (".*", ".foo", Exact),
        (".*", "foo", Fail),
        ("abc.def", "abcdef", Fail),
        ("abc.def", "abc.def", Exact),
        ("abc.def", "abcZdef", Fail),
        ("abc?def", "abcZdef", Exact),
        ("abc?def", "abcdef", Fail),
        ("**/foo/bar", "foo/bar", Exact),
        ("**/foo/bar", "dir/foo/bar", Exact),
        ("**/foo/bar", "dir/dir2/foo/bar", Exact),
        ("abc/**", "abc", Fail),
        ("abc/**", "abc/def", Exact),
        ("abc/**", "abc/def/ghi", Exact),
        ("**/.foo", ".foo", Exact),
        ("**/.foo", "bar.foo", Fail),
        ("a(b)c/def", "a(b)c/def", Exact),
        ("a(b)c/def", "a(b)c/xyz", Fail),
        ("a.|)$(}+{bc", "a.|)$(}+{bc", Exact),
        (
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            Exact,
        ),
        (
            "dist/*.whl",
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            Exact,
        ),
        ("a\\\\", "a\\", Exact),
        ("a\\*b", "a*b", Exact),
    ];

    /// moby `TestMatches` multi-pattern rows.
    const MOBY_MULTI_PATTERN: &[(&[&str], &str, bool)] = &[
        (&["**", "!util/docker/web"], "util/docker/web/foo", false),
        (
            &["**", "!util/docker/web", "util/docker/web/foo"],
            "util/docker/web/foo",
            true,
        ),
        (
            &[
                "**",
                "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            ],
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            false,
        ),
        (
            &["**", "!dist/*.whl"],
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            false,
        ),
    ];

    #[test]
    fn moby_matches_table_exact_or_parent_and_walk() {
        assert_eq!(MOBY_MATCHES.len(), 68);
        for &(pattern, path, expect) in MOBY_MATCHES {
            let matcher = matcher(&[pattern]);
            let context = format!("pattern {pattern:?}, path {path:?}");
            assert_eq!(
                matches_exact(&matcher, path),
                expect == Exact,
                "exact: {context}"
            );
            assert_eq!(
                matcher.is_excluded(path),
                expect != Fail,
                "or-parent: {context}"
            );
            assert_eq!(walk_to(&matcher, path), expect != Fail, "walk: {context}");
            assert_eq!(
                matcher.is_excluded_in_walk(path, &ParentMatches::default()),
                expect != Fail,
                "walk without context: {context}"
            );
        }
    }

    #[test]
    fn moby_multi_pattern_table() {
        for &(patterns, path, excluded) in MOBY_MULTI_PATTERN {
            let matcher = matcher(patterns);
            assert_eq!(
                matcher.is_excluded(path),
                excluded,
                "or-parent: {patterns:?} {path:?}"
            );
            assert_eq!(
                walk_to(&matcher, path),
                excluded,
                "walk: {patterns:?} {path:?}"
            );
        }
    }

    /// moby `TestMatch` (Go's own `filepath.Match` table), run through moby's package-level
    /// `Matches`: the text is cleaned, and `None` means the pattern must be rejected.
    const GO_MATCH_TABLE: &[(&str, &str, Option<bool>)] = &[
        ("abc", "abc", Some(true)),
        ("*", "abc", Some(true)),
        ("*c", "abc", Some(true)),
        ("a*", "a", Some(true)),
        ("a*", "abc", Some(true)),
        ("a*", "ab/c", Some(true)),
        ("a*/b", "abc/b", Some(true)),
        ("a*/b", "a/c/b", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxe/f", Some(true)),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Some(true)),
        ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Some(false)),
        ("a*b?c*x", "abxbbxdbxebxczzx", Some(true)),
        ("a*b?c*x", "abxbbxdbxebxczzy", Some(false)),
        ("ab[c]", "abc", Some(true)),
        ("ab[b-d]", "abc", Some(true)),
        ("ab[e-g]", "abc", Some(false)),
        ("ab[^c]", "abc", Some(false)),
        ("ab[^b-d]", "abc", Some(false)),
        ("ab[^e-g]", "abc", Some(true)),
        ("a\\*b", "a*b", Some(true)),
        ("a\\*b", "ab", Some(false)),
        ("a?b", "a☺b", Some(true)),
        ("a[^a]b", "a☺b", Some(true)),
        ("a???b", "a☺b", Some(false)),
        ("a[^a][^a][^a]b", "a☺b", Some(false)),
        ("[a-ζ]*", "α", Some(true)),
        ("*[a-ζ]", "A", Some(false)),
        ("a?b", "a/b", Some(false)),
        ("a*b", "a/b", Some(false)),
        ("[\\]a]", "]", Some(true)),
        ("[\\-]", "-", Some(true)),
        ("[x\\-]", "x", Some(true)),
        ("[x\\-]", "-", Some(true)),
        ("[x\\-]", "z", Some(false)),
        ("[\\-x]", "x", Some(true)),
        ("[\\-x]", "-", Some(true)),
        ("[\\-x]", "a", Some(false)),
        ("[]a]", "]", None),
        ("[-]", "-", None),
        ("[x-]", "x", None),
        ("[x-]", "-", None),
        ("[x-]", "z", None),
        ("[-x]", "x", None),
        ("[-x]", "-", None),
        ("[-x]", "a", None),
        ("\\", "a", None),
        ("[a-b-c]", "a", None),
        ("[", "a", None),
        ("[^", "a", None),
        ("[^bc", "a", None),
        ("a[", "a", None),
        ("a[", "ab", None),
        ("*x", "xxx", Some(true)),
    ];

    #[test]
    fn moby_filepath_match_table() {
        for &(pattern, text, expected) in GO_MATCH_TABLE {
            let compiled = IgnoreMatcher::from_patterns([pattern]);
            match expected {
                None => assert!(
                    matches!(compiled, Err(IgnoreError::InvalidPattern { .. })),
                    "{pattern:?} should be rejected, got {compiled:?}"
                ),
                Some(expected) => {
                    let matcher = compiled.unwrap_or_else(|error| panic!("{pattern:?}: {error}"));
                    let text = clean_path(text);
                    assert_eq!(
                        matcher.is_excluded(&text),
                        expected,
                        "pattern {pattern:?}, text {text:?}"
                    );
                }
            }
        }
    }

    /// moby `TestCompile`: shape, and the Go expression for the `regexpMatch` ones.
    const MOBY_COMPILE: &[(&str, Shape, &str)] = &[
        ("*", Shape::Expression, r"^[^/]*$"),
        ("file*", Shape::Expression, r"^file[^/]*$"),
        ("*file", Shape::Expression, r"^[^/]*file$"),
        ("a*/b", Shape::Expression, r"^a[^/]*/b$"),
        ("**", Shape::Suffix, ""),
        ("**/**", Shape::Expression, r"^(.*/)?.*$"),
        ("dir/**", Shape::Prefix, ""),
        ("**/dir", Shape::Suffix, ""),
        ("**/dir2/*", Shape::Expression, r"^(.*/)?dir2/[^/]*$"),
        ("**/dir2/**", Shape::Expression, r"^(.*/)?dir2/.*$"),
        ("**file", Shape::Suffix, ""),
        ("**/file*txt", Shape::Expression, r"^(.*/)?file[^/]*txt$"),
        (
            "**/**/*.txt",
            Shape::Expression,
            r"^(.*/)?(.*/)?[^/]*\.txt$",
        ),
        ("a[b-d]e", Shape::Expression, r"^a[b-d]e$"),
        (".*", Shape::Expression, r"^\.[^/]*$"),
        ("abc.def", Shape::Whole, ""),
        ("abc?def", Shape::Expression, r"^abc[^/]def$"),
        ("**/foo/bar", Shape::Suffix, ""),
        ("a(b)c/def", Shape::Whole, ""),
        ("a.|)$(}+{bc", Shape::Whole, ""),
        (
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            Shape::Whole,
            "",
        ),
    ];

    #[test]
    fn moby_compile_table() {
        for &(pattern, shape, expression) in MOBY_COMPILE {
            let (actual_shape, actual_expression) = moby_expression(&clean_path(pattern));
            assert_eq!(actual_shape, shape, "shape of {pattern:?}");
            if shape == Shape::Expression {
                assert_eq!(actual_expression, expression, "expression of {pattern:?}");
            }
        }
    }

    #[test]
    fn moby_clean_patterns_and_exclusions() {
        assert_eq!(matcher(&["docs", "config"]).patterns(), ["docs", "config"]);
        assert_eq!(
            matcher(&["docs", "config", ""]).patterns(),
            ["docs", "config"]
        );
        assert!(matcher(&["docs", "!docs/README.md"]).has_exceptions());
        assert!(matcher(&["docs", "  !docs/README.md"]).has_exceptions());
        assert!(matcher(&["docs", "!docs/README.md  "]).has_exceptions());
        assert!(!matcher(&["docs", "config"]).has_exceptions());
        assert!(matches!(
            IgnoreMatcher::from_patterns(["!"]),
            Err(IgnoreError::LoneExclamation { line: None })
        ));
        assert!(!matcher(&[]).is_excluded("any/path/there"));
        assert!(matcher(&[]).is_empty());
        assert!(matches!(
            IgnoreMatcher::from_patterns(["["]),
            Err(IgnoreError::InvalidPattern {
                reason: PatternSyntax::UnclosedClass,
                ..
            })
        ));
    }

    #[test]
    fn moby_single_folder_and_exception_cases() {
        // TestWildcardMatches .. TestExclusionPatternMatchesWholeDirectory.
        assert!(matcher(&["*"]).is_excluded("fileutils.go"));
        assert!(matcher(&["*.go"]).is_excluded("fileutils.go"));
        assert!(matcher(&["!fileutils.go", "*.go"]).is_excluded("fileutils.go"));
        assert!(!matcher(&["docs", "!docs/README.md"]).is_excluded("docs/README.md"));
        assert!(!matcher(&["docs/", "!docs/README.md"]).is_excluded("docs/README.md"));
        assert!(!matcher(&["docs/*", "!docs/README.md"]).is_excluded("docs/README.md"));
        assert!(!matcher(&["*.go", "!fileutils.go"]).is_excluded("fileutils.go"));
        assert!(!matcher(&["*.go"]).is_excluded("."));
        assert!(!matcher(&["**"]).is_excluded(""));
    }

    #[test]
    fn malformed_regexp_is_rejected_up_front() {
        // moby issue 52203: passes filepath.Match, fails Go's regexp compiler ("l-O" is a
        // reversed range), which moby only reports when a path is matched.
        let error = IgnoreMatcher::from_patterns(["[Local-Only]/"]).unwrap_err();
        match error {
            IgnoreError::InvalidPattern {
                pattern,
                reason: PatternSyntax::InvalidClassRange { range },
                ..
            } => {
                assert_eq!(pattern, "[Local-Only]/");
                assert_eq!(range, "l-O");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn ignorefile_read_all() {
        // moby ignorefile_test.go TestReadAll.
        let content = "test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\n!\n! ";
        let patterns: Vec<String> = read_dockerignore(content)
            .unwrap()
            .into_iter()
            .map(|(pattern, _)| pattern)
            .collect();
        assert_eq!(
            patterns,
            [
                "test1",
                "test2",
                "a/file/here",
                "lastfile",
                "!inverted/abs/path",
                "!",
                "!"
            ]
        );
        // moby's New then rejects the bare "!", which is on line 8.
        assert!(matches!(
            IgnoreMatcher::from_dockerignore(content),
            Err(IgnoreError::LoneExclamation { line: Some(8) })
        ));
        assert!(read_dockerignore("").unwrap().is_empty());
    }

    #[test]
    fn ignorefile_line_rules() {
        let text = "\u{FEFF}first\r\n  # not a comment\n# comment\r\n\t\n  spaced  \n/rooted/\n//double//slash/\n\
                    a/./b/../c\n! spaced/exception \n!/rooted\n/\n.\n\u{FEFF}second\nlast";
        let matcher = IgnoreMatcher::from_dockerignore(text).unwrap();
        assert_eq!(
            matcher.patterns(),
            [
                "first",
                "# not a comment",
                "spaced",
                "rooted",
                "double/slash",
                "a/c",
                "!spaced/exception",
                "!rooted",
                "/",
                ".",
                "\u{FEFF}second",
                "last",
            ]
        );
        assert!(matcher.is_excluded("first"));
        assert!(matcher.is_excluded("# not a comment"));
        assert!(!matcher.is_excluded("# comment"));
        assert!(matcher.is_excluded("spaced/file"));
        assert!(!matcher.is_excluded("spaced/exception"));
        // "!rooted" comes later and matches the directory, so nothing below it stays excluded.
        assert!(!matcher.is_excluded("rooted"));
        assert!(!matcher.is_excluded("rooted/sub/file"));
        assert!(matcher.is_excluded("double/slash/x"));
        assert!(matcher.is_excluded("a/c"));
        assert!(
            !matcher.is_excluded("second"),
            "only the first line loses its BOM"
        );
        // A CRLF file is read like an LF one.
        let crlf = IgnoreMatcher::from_dockerignore("a\r\nb\r\n").unwrap();
        assert_eq!(crlf.patterns(), ["a", "b"]);
    }

    #[test]
    fn dockerignore_and_exclude_differ_on_leading_slash() {
        // The reader strips a leading '/', New does not: `--exclude=/foo` never matches.
        assert!(
            IgnoreMatcher::from_dockerignore("/foo")
                .unwrap()
                .is_excluded("foo")
        );
        let exclude = matcher(&["/foo"]);
        assert_eq!(exclude.patterns(), ["/foo"]);
        assert!(!exclude.is_excluded("foo"));
        // "!/" cleans to "!" once New sees it.
        assert!(matches!(
            IgnoreMatcher::from_dockerignore("a\n!/"),
            Err(IgnoreError::LoneExclamation { line: Some(2) })
        ));
    }

    #[test]
    fn dockerignore_line_limit_follows_bufio() {
        let longest = "a".repeat(MAX_LINE_BYTES);
        assert!(IgnoreMatcher::from_dockerignore(&format!("{longest}\nb")).is_ok());
        let too_long = format!("x\n{longest}b\n");
        assert!(matches!(
            IgnoreMatcher::from_dockerignore(&too_long),
            Err(IgnoreError::LineTooLong { line: 2, length }) if length == MAX_LINE_BYTES + 1
        ));
    }

    #[test]
    fn clean_path_follows_go() {
        for (input, cleaned) in [
            ("", "."),
            (".", "."),
            ("./", "."),
            ("a/..", "."),
            ("..", ".."),
            ("../../a", "../../a"),
            ("a/../../b", "../b"),
            ("/..", "/"),
            ("/../a", "/a"),
            ("//a//b//", "/a/b"),
            ("a/./b/.", "a/b"),
            ("!./a", "!./a"),
            ("!a/../b", "b"),
            ("a/b/", "a/b"),
        ] {
            assert_eq!(clean_path(input), cleaned, "clean {input:?}");
        }
        assert_eq!(parent_dir("a/b/c"), "a/b");
        assert!(matches!(parent_dir("a/b/c"), Cow::Borrowed(_)));
        assert_eq!(parent_dir("c"), ".");
        assert_eq!(parent_dir("a/b/"), "a/b");
        assert_eq!(parent_dir("/a"), "/");
        assert_eq!(parent_dir("a//b/./c"), "a/b");
    }

    #[test]
    fn later_patterns_override_and_exceptions_reinclude() {
        let matcher =
            IgnoreMatcher::from_dockerignore("*.md\n!README*.md\nREADME-secret.md").unwrap();
        assert!(matcher.is_excluded("CHANGES.md"));
        assert!(!matcher.is_excluded("README.md"));
        assert!(!matcher.is_excluded("README-public.md"));
        assert!(matcher.is_excluded("README-secret.md"));
        assert!(
            !matcher.is_excluded("docs/CHANGES.md"),
            "* does not cross directories"
        );

        let matcher =
            IgnoreMatcher::from_dockerignore("node_modules\n!node_modules/keep/**").unwrap();
        assert!(matcher.is_excluded("node_modules"));
        assert!(matcher.is_excluded("node_modules/left/index.js"));
        assert!(!matcher.is_excluded("node_modules/keep/index.js"));
        assert!(!matcher.is_excluded("node_modules/keep/deep/er.js"));

        let matcher = IgnoreMatcher::from_dockerignore("**/*.log\n!important/**\n").unwrap();
        assert!(matcher.is_excluded("a/b/c.log"));
        assert!(matcher.is_excluded("top.log"));
        assert!(!matcher.is_excluded("important/x.log"));

        // Everything but the Dockerfile and src/.
        let matcher = IgnoreMatcher::from_dockerignore("*\n!Dockerfile\n!src").unwrap();
        assert!(matcher.is_excluded("README"));
        assert!(!matcher.is_excluded("Dockerfile"));
        assert!(!matcher.is_excluded("src/main.rs"));
        assert!(matcher.is_excluded("target/debug/app"));
    }

    #[test]
    fn walk_differs_from_or_parent_when_an_exception_names_a_parent() {
        let matcher = matcher(&["a/d", "!a"]);
        // MatchesOrParentMatches: "!a" matches the parent "a" and comes last.
        assert!(!matcher.is_excluded("a/d"));
        assert!(!matcher.is_excluded("a/d/f"));
        // The walker evaluated "!a" for "a" only while "a" was included, so it never applies.
        assert!(walk_to(&matcher, "a/d"));
        assert!(walk_to(&matcher, "a/d/f"));

        let matcher = self::matcher(&["p", "!p/c", "p"]);
        assert!(matcher.is_excluded("p/c"));
        assert!(!walk_to(&matcher, "p/c"));
    }

    #[test]
    fn walk_state_carries_parent_results() {
        let matcher = matcher(&["build", "!build/keep.txt"]);
        let (excluded, build) = matcher.directory_in_walk("build", &ParentMatches::default());
        assert!(excluded);
        assert_eq!(build.matched, [true, false]);
        assert!(matcher.is_excluded_in_walk("build/other", &build));
        assert!(!matcher.is_excluded_in_walk("build/keep.txt", &build));
        // Results from a matcher with a different number of patterns are ignored.
        let stranger = ParentMatches {
            matched: vec![true],
        };
        assert!(!matcher.is_excluded_in_walk("src/x", &stranger));
        assert!(matcher.is_excluded_in_walk("build/x", &stranger));
    }

    #[test]
    fn can_skip_directory_follows_fsutil() {
        let no_exceptions = matcher(&["node_modules", "*.tmp"]);
        assert!(no_exceptions.can_skip_directory("node_modules"));

        let keep = matcher(&["node_modules", "!node_modules/keep/**", "!other/*"]);
        assert!(!keep.can_skip_directory("node_modules"));
        assert!(!keep.can_skip_directory("node_modules/keep"));
        assert!(keep.can_skip_directory("node_modules/left"));
        assert!(
            keep.can_skip_directory("node"),
            "a name prefix is not a directory prefix"
        );
        assert!(!keep.can_skip_directory("other"));

        // An exception with a wildcard may match anywhere: no pruning at all.
        let wildcard = matcher(&["docs", "!*.md"]);
        assert!(!wildcard.can_skip_directory("docs"));
        let escaped = matcher(&["docs", "!docs\\/x"]);
        assert!(!escaped.can_skip_directory("docs"));

        // Pruning never hides a re-included file.
        let matcher = matcher(&["a", "!a/b/c"]);
        assert!(!matcher.can_skip_directory("a"));
        assert!(!matcher.can_skip_directory("a/b"));
        assert!(matcher.is_excluded("a/x"));
        assert!(matcher.can_skip_directory("a/x"));
        assert!(!matcher.is_excluded("a/b/c"));
    }

    #[test]
    fn go_regexp_semantics_leak_through() {
        // `^` is negation, `!` is not.
        assert!(matcher(&["a[^b]c"]).is_excluded("axc"));
        assert!(!matcher(&["a[!b]c"]).is_excluded("axc"));
        assert!(matcher(&["a[!b]c"]).is_excluded("a!c"));
        assert!(matcher(&["a[!b]c"]).is_excluded("abc"));
        // A raw `^` is an anchor in regexp patterns, a literal in exact ones.
        assert!(!matcher(&["a^b*"]).is_excluded("a^b"));
        assert!(matcher(&["a^b"]).is_excluded("a^b"));
        // `[?]` becomes `[[^/]]`: a class of '[', '^', '/' and then a literal ']'.
        let question = matcher(&["[?]"]);
        assert!(!question.is_excluded("?"));
        assert!(question.is_excluded("^]"));
        assert!(question.is_excluded("[]"));
        // Go's named and Perl classes are ASCII-only.
        assert!(matcher(&["[[:alpha:]]*"]).is_excluded("abc"));
        assert!(!matcher(&["[[:alpha:]]"]).is_excluded("é"));
        assert!(matcher(&["[[:^alpha:]]"]).is_excluded("é"));
        assert!(matcher(&["\\d"]).is_excluded("7"));
        assert!(!matcher(&["\\d"]).is_excluded("٣"));
        assert!(matcher(&["[\\w]x"]).is_excluded("_x"));
        assert!(matcher(&["\\pL*"]).is_excluded("été"));
        assert!(!matcher(&["\\PL"]).is_excluded("é"));
        assert!(matcher(&["[\\pN]"]).is_excluded("٣"));
        // `.` stops at a newline in both engines, so `**` cannot cross a directory name
        // containing one (a suffix-shaped pattern compares bytes and can).
        assert!(!matcher(&["**/*.txt"]).is_excluded("a\nb/c.txt"));
        assert!(matcher(&["**/c.txt"]).is_excluded("a\nb/c.txt"));
        assert!(matcher(&["a\\b*"]).is_excluded("a"));
        // \Q quotes up to \E, or to the end, swallowing moby's `$` anchor.
        assert!(matcher(&["a\\Q*?"]).is_excluded("a[^/]*[^/]$"));
        assert!(matcher(&["a\\Q*\\E*"]).is_excluded("a[^/]*xyz"));
        // Octal and hex escapes.
        assert!(matcher(&["a\\101*"]).is_excluded("aA"));
        assert!(matcher(&["a\\x41*"]).is_excluded("aA"));
        // The regex crate's class operators do not apply.
        assert!(matcher(&["[a&&b]"]).is_excluded("&"));
        assert!(matcher(&["[~~]"]).is_excluded("~"));
        assert!(matcher(&["[[]"]).is_excluded("["));
        // Errors Go's regexp compiler would raise.
        for (pattern, expected) in [
            ("[z-a]", "invalid character class range z-a"),
            ("[[:foo:]]", "invalid character class range [:foo:]"),
            ("\\pq", "invalid character class range \\pq"),
            ("\\pX", "invalid character class range \\pX"),
            // moby quotes the brace, so the braced form cannot be written.
            ("\\p{L}", "invalid character class range \\p\\"),
            ("a\\e", "invalid escape sequence \\e"),
            ("a\\1", "invalid escape sequence \\1"),
            ("[\\b]", "invalid escape sequence \\b"),
            ("a\\x4", "invalid escape sequence \\x"),
            ("[[:alpha:]", "a character class is missing its closing ]"),
        ] {
            match IgnoreMatcher::from_patterns([pattern]) {
                Err(IgnoreError::InvalidPattern { reason, .. }) => {
                    assert_eq!(reason.to_string(), expected, "{pattern:?}")
                }
                other => panic!("{pattern:?}: expected an invalid pattern, got {other:?}"),
            }
        }
    }

    #[test]
    fn go_expression_translation() {
        assert_eq!(
            go_expression_to_rust(r"^(.*/)?[^/]*\.txt$").unwrap(),
            r"\A(.*/)?[^\x{2F}]*\x{2E}txt\z"
        );
        assert_eq!(
            go_expression_to_rust(r"^a[^b-d]e$").unwrap(),
            r"\Aa[^\x{62}-\x{64}]e\z"
        );
        assert_eq!(go_expression_to_rust(r"\x{D800}").unwrap(), NO_CHARACTER);
        assert_eq!(go_expression_to_rust(r"[^\x{D800}]").unwrap(), "(?s:.)");
        assert_eq!(
            go_expression_to_rust(r"\s").unwrap(),
            r"[\x{9}-\x{A}\x{C}-\x{D}\x{20}]"
        );
    }

    #[test]
    fn byte_wise_suffix_after_a_bom() {
        // moby's scanner skips a leading BOM, so "\u{FEFF}**x" is a suffix pattern, but the
        // suffix is cut two bytes into the BOM's three.
        let matcher = matcher(&["\u{FEFF}**x"]);
        assert!(matcher.is_excluded("¿**x"), "U+00BF ends in the byte 0xBF");
        assert!(!matcher.is_excluded("x"));
    }

    #[test]
    fn hostile_patterns_are_bounded() {
        // Two hundred `**` compile and still answer correctly for a deep path.
        let deep = format!("{}x", "**/".repeat(200));
        let matcher =
            IgnoreMatcher::from_patterns([deep.as_str(), "**/**/a*b*c*d*e*f*g*/z"]).unwrap();
        assert!(matcher.is_excluded(&format!("{}x", "d/".repeat(300))));
        assert!(!matcher.is_excluded(&format!("{}y", "d/".repeat(300))));
        assert!(matcher.is_excluded(&format!("{}x/below", "d/".repeat(300))));

        // Thousands are refused instead of compiled.
        let huge = format!("{}x", "**/a".repeat(5000));
        match IgnoreMatcher::from_patterns([huge.as_str()]) {
            Err(error @ IgnoreError::TooComplex { .. }) => {
                assert!(
                    error.to_string().len() < 300,
                    "message quotes a bounded excerpt"
                );
            }
            other => panic!("expected TooComplex, got {other:?}"),
        }

        // Long literal patterns need no program at all.
        let literal = "a".repeat(100_000);
        let matcher = IgnoreMatcher::from_patterns([literal.as_str()]).unwrap();
        assert!(matcher.is_excluded(&format!("{literal}/file")));
    }

    #[test]
    fn error_messages_name_pattern_and_line() {
        let error = IgnoreMatcher::from_dockerignore("ok\n# c\nbad[\n").unwrap_err();
        assert_eq!(error.to_string(), "invalid pattern \"bad[\" on line 3");
        assert_eq!(
            std::error::Error::source(&error)
                .map(ToString::to_string)
                .as_deref(),
            Some("a character class is missing its closing ]")
        );
        let error = IgnoreMatcher::from_patterns(["!"]).unwrap_err();
        assert_eq!(error.to_string(), "illegal exclusion pattern \"!\"");
    }

    #[test]
    fn matcher_is_cheap_to_share() {
        fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
        assert_shareable::<IgnoreMatcher>();
        let matcher = matcher(&["*.o"]);
        let copy = matcher.clone();
        assert!(Arc::ptr_eq(&matcher.inner, &copy.inner));
        let handle = std::thread::spawn(move || copy.is_excluded("main.o"));
        assert!(handle.join().unwrap());
    }
}
