//! Variable expansion and word splitting, following BuildKit's `shell` package rules.
//!
//! This module owns what BuildKit's `frontend/dockerfile/shell` lexer does to one word of a
//! Dockerfile instruction: quote removal, the escape token, `$name` and `${name...}`
//! substitutions (`:-`, `-`, `:+`, `+`, `:?`, `?`, `#`, `##`, `%`, `%%`, `/`, `//`), and
//! splitting the result into words on unquoted whitespace. It never runs a shell and knows
//! nothing about which instruction the word came from; the parser decides which words to
//! expand and with which [`Lexer`] options.
//!
//! Where BuildKit's behaviour is odd but observable, rbuild follows it (see the comments at
//! each place). It departs from BuildKit in three ways, all on inputs BuildKit mishandles:
//! - substitutions nested deeper than [`MAX_NESTING_DEPTH`] are rejected instead of
//!   recursing without bound;
//! - `${name` cut off at the end of the word reports a missing `}` rather than an
//!   "unsupported modifier" naming the end-of-input marker;
//! - word splitting keeps the text before a `${name:-...}` in the same word. BuildKit's
//!   current lexer shares one word buffer across nesting levels, so by its code
//!   `ProcessWords("a${x:-b}")` gives `["b"]`; `ProcessWord` is unaffected and gives `ab`,
//!   as rbuild does in both.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::LazyLock;

use regex::Regex;

/// How deep `${...}` substitutions may nest inside each other before expansion fails.
///
/// BuildKit has no limit and recurses once per level; a hostile word such as
/// `${a:-${a:-...}}` nested ten thousand times would exhaust the stack.
pub const MAX_NESTING_DEPTH: usize = 256;

/// Where expansion looks variables up. `None` = unset, `Some("")` = set but empty.
///
/// Names are compared exactly, as BuildKit does on Unix (`EqualEnvKeys` is `==` there;
/// only Windows compares case-insensitively).
pub trait VariableLookup {
    /// The value of the variable called `name`, or `None` when it is not set.
    fn lookup(&self, name: &str) -> Option<&str>;
}

/// A [`VariableLookup`] with no variables: every name is unset.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoVariables;

impl VariableLookup for NoVariables {
    fn lookup(&self, _name: &str) -> Option<&str> {
        None
    }
}

impl VariableLookup for BTreeMap<String, String> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl<S: std::hash::BuildHasher> VariableLookup for HashMap<String, String, S> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

/// An ordered environment, as a Dockerfile builds it: the last pair with the name wins.
impl VariableLookup for [(String, String)] {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// An ordered environment, as a Dockerfile builds it: the last pair with the name wins.
impl VariableLookup for Vec<(String, String)> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.as_slice().lookup(name)
    }
}

impl<T: VariableLookup + ?Sized> VariableLookup for &T {
    fn lookup(&self, name: &str) -> Option<&str> {
        (**self).lookup(name)
    }
}

/// The result of [`Lexer::expand_word_with_matches`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The expanded word, quotes removed (unless the lexer keeps them), not split.
    pub value: String,
    /// Names that were looked up and were set (even if set to the empty string).
    pub matched: BTreeSet<String>,
    /// Names that were looked up and were not set.
    pub unmatched: BTreeSet<String>,
}

/// Why a word could not be expanded. Every message names the whole word, as BuildKit's
/// `failed to process "WORD": ...` does.
#[derive(Debug, thiserror::Error)]
pub enum ExpandError {
    /// `${` without its closing `}` (also `${name` at the end of the word).
    #[error("failed to process {word:?}: syntax error: missing '}}'")]
    MissingClosingBrace {
        /// The word being expanded.
        word: String,
    },
    /// `${name/pattern` without the `/` that ends the pattern.
    #[error("failed to process {word:?}: syntax error: missing '/' in ${{}}")]
    MissingPatternSlash {
        /// The word being expanded.
        word: String,
    },
    /// `${}`, `${{...}`, `${:...}`.
    #[error("failed to process {word:?}: syntax error: bad substitution")]
    BadSubstitution {
        /// The word being expanded.
        word: String,
    },
    /// A modifier BuildKit does not support, such as `${name:=word}` or `${name:#word}`.
    #[error("failed to process {word:?}: unsupported modifier ({modifier}) in substitution")]
    UnsupportedModifier {
        /// The word being expanded.
        word: String,
        /// The modifier as written, e.g. `:=`.
        modifier: String,
    },
    /// A `'` without its closing `'`.
    #[error(
        "failed to process {word:?}: unexpected end of statement while looking for matching single-quote"
    )]
    UnterminatedSingleQuote {
        /// The word being expanded.
        word: String,
    },
    /// A `"` without its closing `"`.
    #[error(
        "failed to process {word:?}: unexpected end of statement while looking for matching double-quote"
    )]
    UnterminatedDoubleQuote {
        /// The word being expanded.
        word: String,
    },
    /// `${name?message}` with `name` unset, or `${name:?message}` with `name` unset or empty.
    #[error("failed to process {word:?}: {name}: {message}")]
    RequiredVariable {
        /// The word being expanded.
        word: String,
        /// The variable that had to be set.
        name: String,
        /// The expanded message from the word, or BuildKit's default
        /// (`is not allowed to be unset` / `is not allowed to be empty`).
        message: String,
    },
    /// A `\` in a `#`, `%` or `/` pattern that escapes something other than `*`, `?`, `\`,
    /// `}` or `/`.
    #[error(
        "failed to process {word:?}: invalid pattern ({pattern}) in substitution: {}",
        describe_escape(.escaped)
    )]
    InvalidPatternEscape {
        /// The word being expanded.
        word: String,
        /// The pattern after expansion.
        pattern: String,
        /// The escaped character, or `None` for a `\` at the end of the pattern.
        escaped: Option<char>,
    },
    /// A pattern whose regular expression is too large to build.
    #[error("failed to process {word:?}: invalid pattern ({pattern}) in substitution")]
    PatternTooLarge {
        /// The word being expanded.
        word: String,
        /// The pattern after expansion.
        pattern: String,
        /// Why the regular expression could not be built.
        #[source]
        source: regex::Error,
    },
    /// Substitutions nested deeper than [`MAX_NESTING_DEPTH`].
    #[error("failed to process {word:?}: substitutions nested more than {limit} levels deep")]
    NestingTooDeep {
        /// The word being expanded.
        word: String,
        /// The limit that was exceeded.
        limit: usize,
    },
}

impl ExpandError {
    /// The word whose expansion failed.
    pub fn word(&self) -> &str {
        match self {
            Self::MissingClosingBrace { word }
            | Self::MissingPatternSlash { word }
            | Self::BadSubstitution { word }
            | Self::UnsupportedModifier { word, .. }
            | Self::UnterminatedSingleQuote { word }
            | Self::UnterminatedDoubleQuote { word }
            | Self::RequiredVariable { word, .. }
            | Self::InvalidPatternEscape { word, .. }
            | Self::PatternTooLarge { word, .. }
            | Self::NestingTooDeep { word, .. } => word,
        }
    }
}

fn describe_escape(escaped: &Option<char>) -> String {
    match escaped {
        Some(character) => format!("invalid escape '\\{character}'"),
        None => "invalid escape '\\' at end of pattern".to_owned(),
    }
}

/// Expands variables in, and splits, the words of Dockerfile instructions with BuildKit's
/// rules (BuildKit's `shell.Lex`).
#[derive(Clone, Debug)]
pub struct Lexer {
    escape_token: char,
    raw_quotes: bool,
    raw_escapes: bool,
    skip_unset_variables: bool,
    skip_process_quotes: bool,
}

impl Default for Lexer {
    /// A lexer with the default escape token, `\`, and no options.
    fn default() -> Self {
        Self::new('\\')
    }
}

impl Lexer {
    /// A lexer using `escape_token`: `\` by default, or a backtick when the Dockerfile's
    /// `escape` parser directive says so.
    pub fn new(escape_token: char) -> Self {
        Self {
            escape_token,
            raw_quotes: false,
            raw_escapes: false,
            skip_unset_variables: false,
            skip_process_quotes: false,
        }
    }

    /// The escape token this lexer was made with.
    pub fn escape_token(&self) -> char {
        self.escape_token
    }

    /// Keep quote characters in the output (BuildKit's `RawQuotes`); their contents are
    /// still processed as quoted text.
    #[must_use]
    pub fn with_raw_quotes(mut self, on: bool) -> Self {
        self.raw_quotes = on;
        self
    }

    /// Keep escape tokens in the output (BuildKit's `RawEscapes`); the escaped character
    /// still loses its special meaning.
    #[must_use]
    pub fn with_raw_escapes(mut self, on: bool) -> Self {
        self.raw_escapes = on;
        self
    }

    /// Leave substitutions of unset variables as written (BuildKit's `SkipUnsetEnv`), e.g.
    /// for text a shell will expand later.
    #[must_use]
    pub fn with_skip_unset_variables(mut self, on: bool) -> Self {
        self.skip_unset_variables = on;
        self
    }

    /// Treat `'` and `"` as ordinary characters (BuildKit's `SkipProcessQuotes`), as
    /// BuildKit does when expanding heredoc bodies.
    #[must_use]
    pub fn with_skip_process_quotes(mut self, on: bool) -> Self {
        self.skip_process_quotes = on;
        self
    }

    /// Expands one word (as ENV/ARG/COPY/WORKDIR etc. do): quotes removed, no splitting.
    ///
    /// # Errors
    ///
    /// Fails on a malformed substitution, an unterminated quote, an unsupported modifier, an
    /// invalid pattern, a `${name?message}` whose variable is unset (or, with `:`, empty), or
    /// nesting deeper than [`MAX_NESTING_DEPTH`].
    pub fn expand_word(
        &self,
        word: &str,
        variables: &dyn VariableLookup,
    ) -> Result<String, ExpandError> {
        Ok(self.run(word, variables)?.value)
    }

    /// Like [`Lexer::expand_word`], and also returns the names of the variables that were
    /// referenced and were set (BuildKit's `ProcessWordWithMatches`) and those referenced
    /// but unset.
    ///
    /// Every substitution in the word is evaluated, including the alternatives of
    /// `${name:-word}` that end up unused, so their variables are reported too.
    ///
    /// # Errors
    ///
    /// Fails on a malformed substitution, an unterminated quote, an unsupported modifier, an
    /// invalid pattern, a `${name?message}` whose variable is unset (or, with `:`, empty), or
    /// nesting deeper than [`MAX_NESTING_DEPTH`].
    pub fn expand_word_with_matches(
        &self,
        word: &str,
        variables: &dyn VariableLookup,
    ) -> Result<Expansion, ExpandError> {
        let outcome = self.run(word, variables)?;
        Ok(Expansion {
            value: outcome.value,
            matched: outcome.matched,
            unmatched: outcome.unmatched,
        })
    }

    /// Expands and splits into words on unquoted whitespace, as BuildKit's `ProcessWords`
    /// (used for EXPOSE, VOLUME, etc. and heredoc detection).
    ///
    /// Whitespace from unquoted substitutions splits words too; quoted empty strings do not
    /// produce empty words.
    ///
    /// # Errors
    ///
    /// Fails on a malformed substitution, an unterminated quote, an unsupported modifier, an
    /// invalid pattern, a `${name?message}` whose variable is unset (or, with `:`, empty), or
    /// nesting deeper than [`MAX_NESTING_DEPTH`].
    pub fn expand_words(
        &self,
        word: &str,
        variables: &dyn VariableLookup,
    ) -> Result<Vec<String>, ExpandError> {
        Ok(self.run(word, variables)?.words)
    }

    fn run(&self, word: &str, variables: &dyn VariableLookup) -> Result<Outcome, ExpandError> {
        let mut expander = Expander {
            lexer: self,
            scanner: Scanner::new(word),
            variables,
            raw_escapes: self.raw_escapes,
            depth: 0,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        match expander.process_until(None, self.raw_escapes) {
            Ok((value, words)) => Ok(Outcome {
                value,
                words,
                matched: expander.matched,
                unmatched: expander.unmatched,
            }),
            Err(fault) => Err(fault.into_error(word)),
        }
    }
}

struct Outcome {
    value: String,
    words: Vec<String>,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

/// An expansion failure before it is tied to the word it happened in.
enum Fault {
    MissingClosingBrace,
    MissingPatternSlash,
    BadSubstitution,
    UnsupportedModifier(String),
    UnterminatedSingleQuote,
    UnterminatedDoubleQuote,
    RequiredVariable {
        name: String,
        message: String,
    },
    InvalidPatternEscape {
        pattern: String,
        escaped: Option<char>,
    },
    PatternTooLarge {
        pattern: String,
        source: regex::Error,
    },
    NestingTooDeep,
}

impl Fault {
    fn into_error(self, word: &str) -> ExpandError {
        let word = word.to_owned();
        match self {
            Self::MissingClosingBrace => ExpandError::MissingClosingBrace { word },
            Self::MissingPatternSlash => ExpandError::MissingPatternSlash { word },
            Self::BadSubstitution => ExpandError::BadSubstitution { word },
            Self::UnsupportedModifier(modifier) => {
                ExpandError::UnsupportedModifier { word, modifier }
            }
            Self::UnterminatedSingleQuote => ExpandError::UnterminatedSingleQuote { word },
            Self::UnterminatedDoubleQuote => ExpandError::UnterminatedDoubleQuote { word },
            Self::RequiredVariable { name, message } => ExpandError::RequiredVariable {
                word,
                name,
                message,
            },
            Self::InvalidPatternEscape { pattern, escaped } => ExpandError::InvalidPatternEscape {
                word,
                pattern,
                escaped,
            },
            Self::PatternTooLarge { pattern, source } => ExpandError::PatternTooLarge {
                word,
                pattern,
                source,
            },
            Self::NestingTooDeep => ExpandError::NestingTooDeep {
                word,
                limit: MAX_NESTING_DEPTH,
            },
        }
    }
}

/// Reads a word one character at a time.
struct Scanner<'a> {
    text: &'a str,
    position: usize,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Self {
        // BuildKit reads words with Go's text/scanner, which drops a byte order mark at
        // the very start of its input.
        let position = if text.starts_with('\u{feff}') {
            '\u{feff}'.len_utf8()
        } else {
            0
        };
        Self { text, position }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.position..].chars().next()
    }

    fn next(&mut self) -> Option<char> {
        let character = self.peek()?;
        self.position += character.len_utf8();
        Some(character)
    }

    fn at_end(&self) -> bool {
        self.position >= self.text.len()
    }
}

/// Collects the words of a top-level expansion, as BuildKit's `wordsStruct` does.
#[derive(Default)]
struct Words {
    current: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    /// An unquoted character: whitespace ends the current word.
    fn add_char(&mut self, character: char) {
        if !character.is_whitespace() {
            self.add_raw_char(character);
        } else if self.in_word && !self.current.is_empty() {
            self.words.push(std::mem::take(&mut self.current));
            self.in_word = false;
        }
    }

    fn add_raw_char(&mut self, character: char) {
        self.current.push(character);
        self.in_word = true;
    }

    /// The value of an unquoted substitution: split like unquoted text.
    fn add_string(&mut self, text: &str) {
        for character in text.chars() {
            self.add_char(character);
        }
    }

    /// The contents of quotes: never split.
    fn add_raw_string(&mut self, text: &str) {
        self.current.push_str(text);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        // An empty current word is dropped even after `""`: BuildKit never yields empty
        // words.
        if !self.current.is_empty() {
            self.words.push(self.current);
        }
        self.words
    }
}

struct Expander<'a> {
    lexer: &'a Lexer,
    scanner: Scanner<'a>,
    variables: &'a dyn VariableLookup,
    /// Whether escape tokens are kept; on inside `#`, `%` and `/` patterns so the pattern
    /// can tell an escaped `*` from a wildcard.
    raw_escapes: bool,
    depth: usize,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

impl<'a> Expander<'a> {
    /// Processes text up to `stop` (consumed) or, without one, to the end of the word.
    fn process_until(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), Fault> {
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let outcome = self.process_until_inner(stop);
        self.raw_escapes = saved;
        outcome
    }

    fn process_until_inner(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), Fault> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(character) = self.scanner.peek() {
            if Some(character) == stop {
                self.scanner.next();
                return Ok((result, words.finish()));
            }
            if character == '$' {
                let value = self.dollar()?;
                result.push_str(&value);
                words.add_string(&value);
                continue;
            }
            if !self.lexer.skip_process_quotes && (character == '\'' || character == '"') {
                let value = if character == '\'' {
                    self.single_quote()?
                } else {
                    self.double_quote()?
                };
                result.push_str(&value);
                words.add_raw_string(&value);
                continue;
            }
            self.scanner.next();
            if character == self.lexer.escape_token {
                if self.raw_escapes {
                    words.add_raw_char(character);
                    result.push(character);
                }
                // An escape token at the very end escapes nothing and disappears.
                let Some(escaped) = self.scanner.next() else {
                    break;
                };
                words.add_raw_char(escaped);
                result.push(escaped);
            } else {
                words.add_char(character);
                result.push(character);
            }
        }
        match stop {
            Some('/') => Err(Fault::MissingPatternSlash),
            Some(_) => Err(Fault::MissingClosingBrace),
            None => Ok((result, words.finish())),
        }
    }

    /// Processes the text inside `${...}` up to `stop`, one nesting level deeper.
    fn nested(&mut self, stop: char, raw_escapes: bool) -> Result<String, Fault> {
        if self.depth >= MAX_NESTING_DEPTH {
            return Err(Fault::NestingTooDeep);
        }
        self.depth += 1;
        let outcome = self.process_until(Some(stop), raw_escapes);
        self.depth -= 1;
        match outcome {
            Ok((value, _)) => Ok(value),
            Err(Fault::NestingTooDeep) => Err(Fault::NestingTooDeep),
            // Whatever went wrong inside, running out of word means the `${` was never
            // closed, and BuildKit reports that instead.
            Err(_) if self.scanner.at_end() => Err(if stop == '/' {
                Fault::MissingPatternSlash
            } else {
                Fault::MissingClosingBrace
            }),
            Err(fault) => Err(fault),
        }
    }

    /// Everything between single quotes is literal; there is no way to escape a `'`.
    fn single_quote(&mut self) -> Result<String, Fault> {
        let mut result = String::new();
        self.scanner.next();
        if self.lexer.raw_quotes {
            result.push('\'');
        }
        loop {
            match self.scanner.next() {
                None => return Err(Fault::UnterminatedSingleQuote),
                Some('\'') => {
                    if self.lexer.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(character) => result.push(character),
            }
        }
    }

    /// Inside double quotes only `$` is special, and the escape token escapes only `"`, `$`
    /// and itself; before anything else it stays as written.
    fn double_quote(&mut self) -> Result<String, Fault> {
        let mut result = String::new();
        self.scanner.next();
        if self.lexer.raw_quotes {
            result.push('"');
        }
        loop {
            match self.scanner.peek() {
                None => return Err(Fault::UnterminatedDoubleQuote),
                Some('"') => {
                    self.scanner.next();
                    if self.lexer.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.dollar()?;
                    result.push_str(&value);
                }
                Some(_) => {
                    let Some(mut character) = self.scanner.next() else {
                        return Err(Fault::UnterminatedDoubleQuote);
                    };
                    if character == self.lexer.escape_token {
                        // With raw escapes on, an escape token before an ordinary character
                        // is written twice: once as the kept escape, once as itself. This
                        // is what BuildKit does.
                        if self.raw_escapes {
                            result.push(character);
                        }
                        match self.scanner.peek() {
                            None => continue,
                            Some(next)
                                if next == '"'
                                    || next == '$'
                                    || next == self.lexer.escape_token =>
                            {
                                self.scanner.next();
                                character = next;
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(character);
                }
            }
        }
    }

    fn lookup(&mut self, name: &str) -> Option<&'a str> {
        let value = self.variables.lookup(name);
        let seen = if value.is_some() {
            &mut self.matched
        } else {
            &mut self.unmatched
        };
        if !seen.contains(name) {
            seen.insert(name.to_owned());
        }
        value
    }

    /// A `$` substitution, the scanner at the `$`.
    fn dollar(&mut self) -> Result<String, Fault> {
        self.scanner.next();
        if self.scanner.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_owned());
            }
            return Ok(match self.lookup(&name) {
                Some(value) => value.to_owned(),
                None if self.lexer.skip_unset_variables => format!("${name}"),
                None => String::new(),
            });
        }
        self.scanner.next();
        match self.scanner.peek() {
            None => return Err(Fault::MissingClosingBrace),
            Some('{' | '}' | ':') => return Err(Fault::BadSubstitution),
            Some(_) => {}
        }
        let name = self.name();
        match self.scanner.next() {
            // BuildKit reports "unsupported modifier" with Go's end-of-input marker here;
            // a missing brace is what actually went wrong.
            None => Err(Fault::MissingClosingBrace),
            Some('}') => Ok(match self.lookup(&name) {
                Some(value) => value.to_owned(),
                None if self.lexer.skip_unset_variables => format!("${{{name}}}"),
                None => String::new(),
            }),
            Some(':') => {
                let modifier = self.scanner.next();
                self.modifier(&name, modifier, true)
            }
            Some(modifier @ ('+' | '-' | '?' | '#' | '%')) => {
                self.modifier(&name, Some(modifier), false)
            }
            Some('/') => self.replace(&name),
            Some(other) => Err(Fault::UnsupportedModifier(other.to_string())),
        }
    }

    /// `${name[:]MODIFIER word}`, the scanner after the modifier. `null_is_unset` is the
    /// `:` form, which treats an empty value as unset.
    fn modifier(
        &mut self,
        name: &str,
        modifier: Option<char>,
        null_is_unset: bool,
    ) -> Result<String, Fault> {
        let mut written = String::new();
        if null_is_unset {
            written.push(':');
        }
        written.extend(modifier);
        let is_pattern = matches!(modifier, Some('#' | '%'));
        // `${name:#word}` and `${name:%word}` are rejected before the word is read.
        if null_is_unset && is_pattern {
            return Err(Fault::UnsupportedModifier(written));
        }
        // The word is expanded whether or not it is used, so `${SET:-${UNSET?}}` fails.
        let word = self.nested('}', is_pattern)?;
        let value = self.lookup(name);
        if self.lexer.skip_unset_variables && value.is_none() {
            // Even modifiers that would be rejected below are passed through.
            return Ok(format!("${{{name}{written}{word}}}"));
        }
        let is_null = value.is_none_or(|value| null_is_unset && value.is_empty());
        match modifier {
            Some('-') => Ok(if is_null {
                word
            } else {
                value.unwrap_or_default().to_owned()
            }),
            Some('+') => Ok(if is_null { String::new() } else { word }),
            Some('?') => match value {
                None => Err(Fault::RequiredVariable {
                    name: name.to_owned(),
                    message: message_or(word, "is not allowed to be unset"),
                }),
                Some("") if null_is_unset => Err(Fault::RequiredVariable {
                    name: name.to_owned(),
                    message: message_or(word, "is not allowed to be empty"),
                }),
                Some(value) => Ok(value.to_owned()),
            },
            Some(kind @ ('#' | '%')) => {
                let value = value.unwrap_or_default();
                // A doubled modifier asks for the longest match. BuildKit looks at the
                // expanded word, so `${v#$P}` with P=`#x` is a longest match of `x`.
                let (pattern, longest) = match word.strip_prefix(kind) {
                    Some(rest) => (rest, true),
                    None => (word.as_str(), false),
                };
                if kind == '#' {
                    trim_prefix(pattern, value, longest)
                } else {
                    trim_suffix(pattern, value, longest)
                }
            }
            _ => Err(Fault::UnsupportedModifier(written)),
        }
    }

    /// `${name/pattern/replacement}` and `${name//pattern/replacement}`, the scanner after
    /// the first `/`.
    fn replace(&mut self, name: &str) -> Result<String, Fault> {
        let replace_all = self.scanner.peek() == Some('/');
        if replace_all {
            self.scanner.next();
        }
        let pattern = self.nested('/', true)?;
        let replacement = self.nested('}', true)?;
        let value = self.lookup(name);
        let Some(value) = value else {
            if self.lexer.skip_unset_variables {
                // BuildKit writes a single `/` back even for `//`, turning a replace-all
                // into a replace-first for whoever expands the text later.
                return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
            }
            return Ok(String::new());
        };
        let regex = shell_pattern_regex(&pattern, true, false)?;
        if replace_all {
            return Ok(replace_every(&regex, value, &replacement));
        }
        // Replacing the first match inserts the replacement literally, while replacing
        // every match expands `$0`/`${0}` in it to the match (Go's `ReplaceAllString`).
        Ok(match regex.find(value) {
            Some(found) => {
                let mut out = String::with_capacity(value.len() + replacement.len());
                out.push_str(&value[..found.start()]);
                out.push_str(&replacement);
                out.push_str(&value[found.end()..]);
                out
            }
            None => value.to_owned(),
        })
    }

    /// A variable name: a run of digits (positional parameter), one special-parameter
    /// character, or letters, digits and `_`. Empty when none of these follows.
    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(character) = self.scanner.peek() {
            if name.is_empty() && is_digit(character) {
                while let Some(digit) = self.scanner.peek().filter(|c| is_digit(*c)) {
                    self.scanner.next();
                    name.push(digit);
                }
                return name;
            }
            if name.is_empty() && is_special_parameter(character) {
                self.scanner.next();
                name.push(character);
                return name;
            }
            if !is_name_character(character) {
                break;
            }
            self.scanner.next();
            name.push(character);
        }
        name
    }
}

fn message_or(word: String, default: &str) -> String {
    if word.is_empty() {
        default.to_owned()
    } else {
        word
    }
}

/// The special parameters of POSIX shell (XCU 2.5.2); never set in a Dockerfile.
fn is_special_parameter(character: char) -> bool {
    matches!(character, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')
}

fn is_name_character(character: char) -> bool {
    character == '_' || is_letter(character) || is_digit(character)
}

/// Go's `unicode.IsLetter`: general category L. (Rust's `char::is_alphabetic` also
/// accepts letter numbers and some marks.)
fn is_letter(character: char) -> bool {
    static LETTER: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\A\p{L}\z").expect("a valid Unicode class"));
    if character.is_ascii() {
        return character.is_ascii_alphabetic();
    }
    LETTER.is_match(character.encode_utf8(&mut [0; 4]))
}

/// Go's `unicode.IsDigit`: general category Nd. (Rust's `char::is_numeric` also accepts
/// `²`, `½` and other numbers.)
fn is_digit(character: char) -> bool {
    static DIGIT: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\A\p{Nd}\z").expect("a valid Unicode class"));
    if character.is_ascii() {
        return character.is_ascii_digit();
    }
    DIGIT.is_match(character.encode_utf8(&mut [0; 4]))
}

/// Turns a shell pattern into a regular expression the way BuildKit does: `*` is any run
/// of characters (the shortest or the longest), `?` any one character, `\` escapes `*`, `?`
/// and `\`, and a `\` before `}` or `/` only kept that character from ending the `${}`.
/// There are no bracket expressions: `[` and `]` match themselves. The escape is always
/// `\`, whatever the Dockerfile's escape token, and `.` never matches a newline.
fn shell_pattern_regex(pattern: &str, greedy: bool, anchored: bool) -> Result<Regex, Fault> {
    let mut characters = pattern.chars().peekable();
    // Go's text/scanner, which BuildKit reads patterns with, drops a leading byte order mark.
    characters.next_if_eq(&'\u{feff}');
    let mut expression = String::with_capacity(pattern.len() + 8);
    if anchored {
        expression.push('^');
    }
    let any_run = if greedy { ".*" } else { ".*?" };
    let mut literal = [0; 4];
    while let Some(character) = characters.next() {
        match character {
            '*' => expression.push_str(any_run),
            '?' => expression.push('.'),
            '\\' => {
                if matches!(characters.peek(), Some('}' | '/')) {
                    continue;
                }
                match characters.next() {
                    Some(escaped @ ('*' | '?' | '\\')) => {
                        expression.push('\\');
                        expression.push(escaped);
                    }
                    escaped => {
                        return Err(Fault::InvalidPatternEscape {
                            pattern: pattern.to_owned(),
                            escaped,
                        });
                    }
                }
            }
            other => expression.push_str(&regex::escape(other.encode_utf8(&mut literal))),
        }
    }
    Regex::new(&expression).map_err(|source| Fault::PatternTooLarge {
        pattern: pattern.to_owned(),
        source,
    })
}

/// `${name#pattern}` and `${name##pattern}`: removes the shortest (longest) prefix of
/// `value` that `pattern` matches.
fn trim_prefix(pattern: &str, value: &str, longest: bool) -> Result<String, Fault> {
    let regex = shell_pattern_regex(pattern, longest, true)?;
    Ok(match regex.find(value) {
        Some(found) => value[found.end()..].to_owned(),
        None => value.to_owned(),
    })
}

/// `${name%pattern}` and `${name%%pattern}`: removes the shortest (longest) suffix of
/// `value` that `pattern` matches. Like BuildKit, reverses both and trims a prefix, since
/// a leftmost regular-expression match cannot find the shortest suffix.
fn trim_suffix(pattern: &str, value: &str, longest: bool) -> Result<String, Fault> {
    let reversed_value: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &reversed_value, longest)?;
    Ok(trimmed.chars().rev().collect())
}

/// Reverses a pattern, keeping each `\x` escape pair in order.
fn reverse_pattern(pattern: &str) -> String {
    let mut units: Vec<&str> = Vec::new();
    let mut rest = pattern;
    while let Some(first) = rest.chars().next() {
        let mut length = first.len_utf8();
        if first == '\\' {
            length += rest[length..].chars().next().map_or(0, char::len_utf8);
        }
        let (unit, tail) = rest.split_at(length);
        units.push(unit);
        rest = tail;
    }
    units.into_iter().rev().collect()
}

/// Replaces every match of `regex` in `value` the way Go's `Regexp.ReplaceAllString` does:
/// an empty match right after a match is skipped, and `$0`/`${0}` in the replacement stand
/// for the match (`$$` for `$`; other `$name`s for nothing).
fn replace_every(regex: &Regex, value: &str, replacement: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut last_match_end = 0;
    let mut search_from = 0;
    while search_from <= value.len() {
        let Some(found) = regex.find_at(value, search_from) else {
            break;
        };
        out.push_str(&value[last_match_end..found.start()]);
        if found.end() > last_match_end || found.start() == 0 {
            expand_replacement(&mut out, replacement, found.as_str());
        }
        last_match_end = found.end();
        let width = value[search_from..]
            .chars()
            .next()
            .map_or(0, char::len_utf8);
        search_from = if search_from + width > found.end() {
            search_from + width
        } else if search_from + 1 > found.end() {
            search_from + 1
        } else {
            found.end()
        };
    }
    out.push_str(&value[last_match_end..]);
    out
}

/// Go's `Regexp.Expand` for an expression with no groups: only group 0 (the whole match)
/// exists.
fn expand_replacement(out: &mut String, template: &str, whole_match: &str) {
    let mut rest = template;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        rest = &rest[dollar + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        match group_reference(rest) {
            Some((name, after)) => {
                if name == "0" {
                    out.push_str(whole_match);
                }
                rest = after;
            }
            None => out.push('$'),
        }
    }
    out.push_str(rest);
}

/// A `name` or `{name}` after a `$` in a replacement (Go's `regexp` `extract`): the name and
/// the text after the reference.
fn group_reference(text: &str) -> Option<(&str, &str)> {
    let (braced, inner) = match text.strip_prefix('{') {
        Some(inner) => (true, inner),
        None => (false, text),
    };
    let length = inner
        .char_indices()
        .find(|(_, character)| !is_name_character(*character))
        .map_or(inner.len(), |(index, _)| index);
    if length == 0 {
        return None;
    }
    let (name, after) = inner.split_at(length);
    if braced {
        return after.strip_prefix('}').map(|after| (name, after));
    }
    Some((name, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variables(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn expand(word: &str, pairs: &[(&str, &str)]) -> Result<String, ExpandError> {
        Lexer::default().expand_word(word, &variables(pairs))
    }

    fn expanded(word: &str, pairs: &[(&str, &str)]) -> String {
        match expand(word, pairs) {
            Ok(value) => value,
            Err(error) => panic!("expanding {word:?} failed: {error}"),
        }
    }

    fn error(word: &str, pairs: &[(&str, &str)]) -> ExpandError {
        match expand(word, pairs) {
            Ok(value) => panic!("expanding {word:?} gave {value:?}, expected an error"),
            Err(error) => error,
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    const ENV: &[(&str, &str)] = &[("SET", "value"), ("EMPTY", "")];

    #[test]
    fn plain_and_braced_references() {
        assert_eq!(expanded("a$SET.b", ENV), "avalue.b");
        assert_eq!(expanded("a${SET}b", ENV), "avalueb");
        assert_eq!(expanded("a${UNSET}b$UNSET", ENV), "ab");
        assert_eq!(expanded("$", ENV), "$");
        assert_eq!(expanded("$.x", ENV), "$.x");
        assert_eq!(expanded("${SET}}", ENV), "value}");
    }

    #[test]
    fn default_modifiers() {
        assert_eq!(
            expanded("${SET:-w}|${EMPTY:-w}|${UNSET:-w}", ENV),
            "value|w|w"
        );
        assert_eq!(expanded("${SET-w}|${EMPTY-w}|${UNSET-w}", ENV), "value||w");
        assert_eq!(expanded("${UNSET:-${SET}x}", ENV), "valuex");
        assert_eq!(expanded("${UNSET:-a b}", ENV), "a b");
    }

    #[test]
    fn alternative_modifiers() {
        assert_eq!(expanded("${SET:+w}|${EMPTY:+w}|${UNSET:+w}", ENV), "w||");
        assert_eq!(expanded("${SET+w}|${EMPTY+w}|${UNSET+w}", ENV), "w|w|");
    }

    #[test]
    fn required_modifiers() {
        assert_eq!(
            expanded("${SET:?no}${SET?no}${EMPTY?no}", ENV),
            "valuevalue"
        );
        let unset = error("${UNSET?must set $SET}", ENV);
        assert_eq!(
            unset.to_string(),
            r#"failed to process "${UNSET?must set $SET}": UNSET: must set value"#
        );
        assert!(matches!(
            &unset,
            ExpandError::RequiredVariable { name, message, .. }
                if name == "UNSET" && message == "must set value"
        ));
        assert_eq!(
            error("${EMPTY:?}", ENV).to_string(),
            r#"failed to process "${EMPTY:?}": EMPTY: is not allowed to be empty"#
        );
        assert_eq!(
            error("${UNSET:?}", ENV).to_string(),
            r#"failed to process "${UNSET:?}": UNSET: is not allowed to be unset"#
        );
        // The unused alternative is still expanded, so its error surfaces.
        assert!(matches!(
            error("${SET:-${UNSET:?x}}", ENV),
            ExpandError::RequiredVariable { .. }
        ));
    }

    #[test]
    fn prefix_removal() {
        let env = &[("V", "xxyy"), ("P", "/usr/local/lib.so.1"), ("X", "x")];
        assert_eq!(expanded("${V#x}", env), "xyy");
        assert_eq!(expanded("${V#*x}", env), "xyy");
        assert_eq!(expanded("${V##*x}", env), "yy");
        assert_eq!(expanded("${V#*}", env), "xxyy");
        assert_eq!(expanded("${V##*}", env), "");
        assert_eq!(expanded("${V#?x}", env), "yy");
        assert_eq!(expanded("${V#y}", env), "xxyy");
        assert_eq!(expanded("${V#$X}", env), "xyy");
        assert_eq!(expanded("${V#}|${V##}", env), "xxyy|xxyy");
        assert_eq!(expanded("${P##*/}", env), "lib.so.1");
        assert_eq!(expanded("${P#/*/}", env), "local/lib.so.1");
        assert_eq!(expanded("${UNSET#x}", env), "");
    }

    #[test]
    fn suffix_removal() {
        let env = &[("V", "xxyy"), ("F", "archive.tar.gz"), ("S", "a***yy*")];
        assert_eq!(expanded("${V%y}", env), "xxy");
        assert_eq!(expanded("${V%y*}", env), "xxy");
        assert_eq!(expanded("${V%%y*}", env), "xx");
        assert_eq!(expanded("${V%x}", env), "xxyy");
        assert_eq!(expanded("${F%.*}", env), "archive.tar");
        assert_eq!(expanded("${F%%.*}", env), "archive");
        assert_eq!(expanded("${F%.t?r.gz}", env), "archive");
        assert_eq!(expanded(r"${S%%\**\*}", env), "a");
        assert_eq!(expanded("${V%}", env), "xxyy");
    }

    #[test]
    fn escaped_pattern_characters_are_literal() {
        let env = &[("V", "()[]{}^$.*?|\\x"), ("Q", "???y"), ("W", "a*b")];
        assert_eq!(expanded(r"${V#()[]{\}^$.\*\?|\\}", env), "x");
        assert_eq!(expanded(r"${Q#?\?}", env), "?y");
        assert_eq!(expanded(r"${W#*\*}", env), "b");
        // `\x` is not a valid escape in a pattern.
        assert!(matches!(
            error(r"${W#\x}", env),
            ExpandError::InvalidPatternEscape {
                escaped: Some('x'),
                ..
            }
        ));
        assert!(matches!(
            expand("${W#$B}", &[("W", "a"), ("B", "\\")]),
            Err(ExpandError::InvalidPatternEscape { escaped: None, .. })
        ));
    }

    #[test]
    fn brackets_are_not_glob_classes() {
        // BuildKit escapes `[` and `]`, so a bracket expression matches only itself.
        let env = &[("V", "abc"), ("B", "[ab]c")];
        assert_eq!(expanded("${V#[ab]}", env), "abc");
        assert_eq!(expanded("${B#[ab]}", env), "c");
        assert_eq!(expanded("${B%[a-z]c}", env), "[ab]c");
        assert_eq!(expanded("${B/[ab]/x}", env), "xc");
    }

    #[test]
    fn colon_pattern_modifiers_are_unsupported() {
        assert!(matches!(
            error("${SET:#v}", ENV),
            ExpandError::UnsupportedModifier { modifier, .. } if modifier == ":#"
        ));
        assert!(matches!(
            error("${SET:%v}", ENV),
            ExpandError::UnsupportedModifier { modifier, .. } if modifier == ":%"
        ));
        assert_eq!(
            error("${a:b}", ENV).to_string(),
            r#"failed to process "${a:b}": unsupported modifier (:b) in substitution"#
        );
        assert!(matches!(
            error("${SET:=v}", ENV),
            ExpandError::UnsupportedModifier { modifier, .. } if modifier == ":="
        ));
        assert!(matches!(
            error("${SET=v}", ENV),
            ExpandError::UnsupportedModifier { modifier, .. } if modifier == "="
        ));
    }

    #[test]
    fn replacement() {
        let env = &[
            ("F", "/foo*/*/*.txt"),
            ("N", "\\*/"),
            ("T", "/tmp/tmp/bar.txt"),
            ("U", "http://google.de"),
            ("D", "/tmp"),
        ];
        assert_eq!(
            expanded("${F/$N/.} - ${F//$N/.}", env),
            "/foo.*/*.txt - /foo..*.txt"
        );
        assert_eq!(
            expanded("${T/$D/} - ${T//$D/}", env),
            "/tmp/bar.txt - /bar.txt"
        );
        assert_eq!(expanded("${T/\\/tmp/}", env), "/tmp/bar.txt");
        assert_eq!(
            expanded("${U/http:\\/\\//https://}", env),
            "https://google.de"
        );
        assert_eq!(expanded("${T//\\//\\/}", env), "\\/tmp\\/tmp\\/bar.txt");
        assert_eq!(expanded("${T/?tmp/x}", env), "x/tmp/bar.txt");
        assert_eq!(expanded("${T/*tmp/x}", env), "x/bar.txt");
        assert_eq!(expanded("${T/nothing/x}", env), "/tmp/tmp/bar.txt");
        assert_eq!(expanded("${UNSET/a/b}", env), "");
        assert_eq!(expanded("${T///}", env), "/tmp/tmp/bar.txt");
        assert!(matches!(
            error("${T//ww}", env),
            ExpandError::MissingPatternSlash { .. }
        ));
        assert!(matches!(
            error("${T//}", env),
            ExpandError::MissingPatternSlash { .. }
        ));
    }

    #[test]
    fn replace_all_follows_go_empty_match_rules() {
        let env = &[("V", "abc"), ("E", "")];
        assert_eq!(expanded("${V/$E/-}", env), "-abc");
        assert_eq!(expanded("${V//$E/-}", env), "-a-b-c-");
        // `*` matches everything once; the empty match at the end abuts it and is skipped.
        assert_eq!(expanded("${V//*/x}", env), "x");
        assert_eq!(expanded("${V//b*/x}", env), "ax");
    }

    #[test]
    fn replace_all_expands_the_whole_match_reference() {
        let env = &[("V", "abc"), ("R", "[${0}$1$$$]")];
        // Only replace-all goes through Go's template expansion.
        assert_eq!(expanded(r"${V//b/[\$0]}", env), r"a[\b]c");
        assert_eq!(expanded("${V//b/$R}", env), "a[b$$]c");
        assert_eq!(expanded("${V/b/$R}", env), "a[${0}$1$$$]c");
        assert_eq!(expanded(r"${V/b/[\$0]}", env), r"a[\$0]c");
        assert_eq!(expanded(r"${V//b/\$.}", env), r"a\$.c");
    }

    #[test]
    fn quotes() {
        assert_eq!(
            expanded(r#"'$SET' "$SET" "a'b" 'a"b'"#, ENV),
            r#"$SET value a'b a"b"#
        );
        assert_eq!(expanded(r#""a\"b\$c\\d\e""#, ENV), r#"a"b$c\d\e"#);
        assert_eq!(expanded(r"'a\'", ENV), r"a\");
        assert!(matches!(
            error("'abc", ENV),
            ExpandError::UnterminatedSingleQuote { .. }
        ));
        assert!(matches!(
            error(r#""abc\""#, ENV),
            ExpandError::UnterminatedDoubleQuote { .. }
        ));
        assert_eq!(
            error("a\"b", ENV).to_string(),
            "failed to process \"a\\\"b\": unexpected end of statement while looking for matching double-quote"
        );
    }

    #[test]
    fn escape_token() {
        assert_eq!(expanded(r"a\$SET\ b\\", ENV), r"a$SET b\");
        assert_eq!(expanded(r"trailing\", ENV), "trailing");
        let backtick = Lexer::new('`');
        let env = variables(ENV);
        assert_eq!(
            backtick.expand_word(r"C:\dir`$SET", &env).unwrap(),
            r"C:\dir$SET"
        );
        assert_eq!(
            backtick.expand_word(r#""a`"b`c""#, &env).unwrap(),
            r#"a"b`c"#
        );
        assert_eq!(backtick.expand_word("a`", &env).unwrap(), "a");
        // Patterns always use `\`, whatever the escape token.
        let star = variables(&[("V", "a*b")]);
        assert_eq!(backtick.expand_word(r"${V#a\*}", &star).unwrap(), "b");
    }

    #[test]
    fn raw_quotes_and_escapes() {
        let env = variables(ENV);
        let raw_quotes = Lexer::default().with_raw_quotes(true);
        assert_eq!(
            raw_quotes.expand_word(r#"'$SET' "$SET""#, &env).unwrap(),
            r#"'$SET' "value""#
        );
        assert_eq!(
            raw_quotes.expand_words(r#"a"b c"d e"#, &env).unwrap(),
            vec![r#"a"b c"d"#, "e"]
        );
        let raw_escapes = Lexer::default().with_raw_escapes(true);
        assert_eq!(
            raw_escapes.expand_word(r"a\$SET\ b", &env).unwrap(),
            r"a\$SET\ b"
        );
        assert_eq!(
            raw_escapes.expand_word(r#""\$SET""#, &env).unwrap(),
            r"\$SET"
        );
        // Inside double quotes, a kept escape before an ordinary character doubles.
        assert_eq!(raw_escapes.expand_word(r#""a\b""#, &env).unwrap(), r"a\\b");
    }

    #[test]
    fn skip_unset_variables() {
        let lexer = Lexer::default().with_skip_unset_variables(true);
        let env = variables(&[("SET", "value"), ("EMPTY", "")]);
        let expand = |word: &str| lexer.expand_word(word, &env).unwrap();
        assert_eq!(
            expand("$SET $UNSET ${UNSET} $1 $@"),
            "value $UNSET ${UNSET} $1 $@"
        );
        assert_eq!(expand("${UNSET:-$SET}"), "${UNSET:-value}");
        assert_eq!(expand("${UNSET:?x}"), "${UNSET:?x}");
        assert_eq!(expand("${UNSET##*/}"), "${UNSET##*/}");
        assert_eq!(expand("${EMPTY:-d}"), "d");
        // BuildKit drops the second `/` of a replace-all it leaves alone.
        assert_eq!(expand("${UNSET//a/b}"), "${UNSET/a/b}");
        // Unsupported modifiers on unset variables pass through.
        assert_eq!(expand("${UNSET:=x}"), "${UNSET:=x}");
        assert!(lexer.expand_word("${SET:=x}", &env).is_err());
    }

    #[test]
    fn skip_process_quotes() {
        let lexer = Lexer::default().with_skip_process_quotes(true);
        let env = variables(ENV);
        assert_eq!(
            lexer.expand_word(r#"'$SET' "$SET"'"#, &env).unwrap(),
            r#"'value' "value"'"#
        );
        assert_eq!(
            lexer.expand_words(r#""a b""#, &env).unwrap(),
            vec![r#""a"#, r#"b""#]
        );
    }

    #[test]
    fn positional_and_special_parameters_are_empty() {
        for word in [
            "$1", "$@", "$*", "$#", "$?", "$-", "$$", "$!", "$0", "${10}", "$001",
        ] {
            assert_eq!(expanded(word, ENV), "", "{word}");
        }
        assert_eq!(expanded("$12ab", ENV), "ab");
        assert_eq!(expanded("$@@", ENV), "@");
        assert_eq!(expanded("${#:-d}", ENV), "d");
    }

    #[test]
    fn names_use_go_letter_and_digit_classes() {
        let env = &[("한국어", "k"), ("a", "A")];
        assert_eq!(expanded("$한국어!", env), "k!");
        // `²` is a number but not a decimal digit, so it ends the name.
        assert_eq!(expanded("$a²", env), "A²");
        // A leading non-ASCII decimal digit starts a positional parameter.
        assert_eq!(expanded("$٣x", env), "x");
    }

    #[test]
    fn bad_substitutions() {
        for word in ["${}", "${:}", "${:-a}", "${{a}", "x${}y"] {
            assert!(
                matches!(error(word, ENV), ExpandError::BadSubstitution { .. }),
                "{word}"
            );
        }
        for word in ["${", "${a", "${a:-b", "${a:-${b}", "${a:", "${a:-'x}"] {
            assert!(
                matches!(error(word, ENV), ExpandError::MissingClosingBrace { .. }),
                "{word}"
            );
        }
        assert!(matches!(
            error("${a.b}", ENV),
            ExpandError::UnsupportedModifier { modifier, .. } if modifier == "."
        ));
    }

    #[test]
    fn matches_record_every_lookup() {
        let env = variables(&[("FOO", "xxx"), ("BAR", "")]);
        let outcome = Lexer::default()
            .expand_word_with_matches("${FOO:-aaa} ${BAR:-bbb} ${BAZ:-${QUX}} $1", &env)
            .unwrap();
        assert_eq!(outcome.value, "xxx bbb  ");
        assert_eq!(outcome.matched, set(&["BAR", "FOO"]));
        assert_eq!(outcome.unmatched, set(&["1", "BAZ", "QUX"]));
        let plain = Lexer::default()
            .expand_word_with_matches("no variables", &env)
            .unwrap();
        assert!(plain.matched.is_empty() && plain.unmatched.is_empty());
    }

    #[test]
    fn word_splitting() {
        let env = variables(&[("S", " a  b "), ("E", "")]);
        let words = |word: &str| Lexer::default().expand_words(word, &env).unwrap();
        assert_eq!(words("x${S}y"), vec!["x", "a", "b", "y"]);
        assert_eq!(words(r#"x"${S}"y"#), vec!["x a  b y"]);
        assert_eq!(words(r#"a "" b $E"#), vec!["a", "b"]);
        assert_eq!(words(r"a\ b  c"), vec!["a b", "c"]);
        assert!(words("   ").is_empty());
        // The text before a nested substitution stays in its word.
        assert_eq!(words("ab${UNSET:-c d}e"), vec!["abc", "de"]);
    }

    #[test]
    fn lookups() {
        let pairs = variables(&[("A", "1"), ("B", "2"), ("A", "3")]);
        assert_eq!(pairs.lookup("A"), Some("3"));
        assert_eq!(pairs.as_slice().lookup("B"), Some("2"));
        assert_eq!(pairs.lookup("a"), None);
        let map: BTreeMap<String, String> = pairs.iter().cloned().collect();
        assert_eq!(map.lookup("A"), Some("3"));
        let hash: HashMap<String, String> = pairs.iter().cloned().collect();
        assert_eq!(hash.lookup("B"), Some("2"));
        assert_eq!(NoVariables.lookup("A"), None);
        let lexer = Lexer::default();
        assert_eq!(lexer.expand_word("$A$B", &pairs.as_slice()).unwrap(), "32");
        assert_eq!(lexer.expand_word("$A$B", &NoVariables).unwrap(), "");
    }

    #[test]
    fn leading_byte_order_mark_is_dropped() {
        assert_eq!(expanded("\u{feff}a\u{feff}", ENV), "a\u{feff}");
    }

    fn nested_defaults(levels: usize) -> String {
        format!("{}x{}", "${a:-".repeat(levels), "}".repeat(levels))
    }

    #[test]
    fn nesting_up_to_the_limit_works() {
        assert_eq!(expanded(&nested_defaults(MAX_NESTING_DEPTH), ENV), "x");
    }

    #[test]
    fn nesting_beyond_the_limit_is_an_error_not_a_stack_overflow() {
        for levels in [MAX_NESTING_DEPTH + 1, 10_000] {
            let word = nested_defaults(levels);
            let failure = error(&word, ENV);
            assert!(
                matches!(
                    failure,
                    ExpandError::NestingTooDeep {
                        limit: MAX_NESTING_DEPTH,
                        ..
                    }
                ),
                "{failure}"
            );
            assert_eq!(failure.word(), word);
        }
        let unterminated = "${a:-".repeat(10_000);
        assert!(matches!(
            error(&unterminated, ENV),
            ExpandError::NestingTooDeep { .. }
        ));
        let quoted = "\"${a:-".repeat(10_000);
        assert!(matches!(
            error(&quoted, ENV),
            ExpandError::NestingTooDeep { .. }
        ));
    }

    #[test]
    fn long_words_expand() {
        let env = &[("A", "a")];
        let word = "$A".repeat(200_000);
        assert_eq!(expanded(&word, env).len(), 200_000);
        let many_stars = format!("${{A#{}}}", "*".repeat(1_000));
        assert_eq!(expanded(&many_stars, env), "a");
        // Too many for a regular expression of bounded size: an error, not a hang.
        let too_many_stars = format!("${{A%{}}}", "*".repeat(100_000));
        assert!(matches!(
            error(&too_many_stars, env),
            ExpandError::PatternTooLarge { .. }
        ));
    }
}
