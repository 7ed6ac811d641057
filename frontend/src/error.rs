//! Frontend errors: every error a user can cause in a Dockerfile carries the lines it came from,
//! and renders as `Dockerfile:12: COPY --chwon=1 a /b: unknown flag: --chwon`, then a `hint:`
//! where one helps, then the offending lines.

use std::fmt;

use crate::expand::ExpandError;

/// Lines of the Dockerfile an instruction or error spans: 1-based and inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Location {
    /// First line (1-based).
    pub start_line: usize,
    /// Last line (1-based, inclusive); equal to `start_line` for one-line instructions.
    pub end_line: usize,
}

impl Location {
    /// A location covering the lines `start_line..=end_line`.
    pub fn new(start_line: usize, end_line: usize) -> Self {
        Self {
            start_line,
            end_line: end_line.max(start_line),
        }
    }

    /// A location of one line.
    pub fn line(line: usize) -> Self {
        Self::new(line, line)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.start_line)
    }
}

/// What is wrong with a Dockerfile (or with the options it was planned with).
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// The text is not UTF-8.
    #[error("the Dockerfile is not valid UTF-8")]
    NotUtf8,
    /// The file holds no instruction at all.
    #[error("file with no instructions")]
    NoInstructions,
    /// A parser directive appears twice.
    #[error("only one {0} parser directive can be used")]
    DuplicateDirective(String),
    /// `# escape=` names something other than `\` or a backtick.
    #[error("invalid escape token '{0}' does not match ` or \\")]
    InvalidEscapeToken(String),
    /// `# check=` could not be understood.
    #[error("invalid check directive {0:?}: {1}")]
    InvalidCheckDirective(String, &'static str),
    /// A JSON array holds something other than strings.
    #[error("when using JSON array syntax, arrays must be comprised of strings only")]
    JsonNotStrings,
    /// `ENV`/`LABEL` in the old `KEY value` form lacks the value.
    #[error("{0} must have two arguments")]
    NameValueMissingValue(&'static str),
    /// `ENV`/`LABEL` in the `k=v` form holds a word without `=`.
    #[error("syntax error - can't find = in {0:?}, must be of the form: name=value")]
    NameValueMissingEquals(String),
    /// A heredoc is never closed by its delimiter.
    #[error("unterminated heredoc {0:?}")]
    UnterminatedHeredoc(String),
    /// The heredoc marker could not be lexed.
    #[error("invalid heredoc marker")]
    HeredocLexing(#[source] Box<ExpandError>),
    /// An instruction that does not exist.
    #[error("unknown instruction: {instruction}")]
    UnknownInstruction {
        /// The instruction word as written.
        instruction: String,
        /// The closest known instruction, if one is close.
        suggestion: Option<&'static str>,
    },
    /// A flag the instruction does not take.
    #[error("unknown flag: --{flag}")]
    UnknownFlag {
        /// The flag name without dashes.
        flag: String,
        /// The closest flag this instruction takes, if one is close.
        suggestion: Option<&'static str>,
    },
    /// A flag given twice where only one is allowed.
    #[error("duplicate flag specified: --{0}")]
    DuplicateFlag(String),
    /// A flag needs a value and has none, or a boolean flag has a non-boolean value.
    #[error("invalid value for --{flag}: {problem}")]
    InvalidFlagValue {
        /// The flag name without dashes.
        flag: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// An instruction has the wrong number or shape of arguments.
    #[error("{0}")]
    Arguments(String),
    /// ONBUILD of an instruction that cannot be a trigger.
    #[error("{0} isn't allowed as an ONBUILD trigger")]
    OnbuildNotAllowed(String),
    /// An instruction other than ARG comes before the first FROM.
    #[error("no build stage in current context: {0} must come after FROM")]
    InstructionBeforeFrom(String),
    /// A stage name with characters BuildKit rejects.
    #[error(
        "invalid name for build stage: {0:?}, name can't start with a number or contain symbols"
    )]
    InvalidStageName(String),
    /// Two stages with one name.
    #[error("duplicate stage name {0:?}")]
    DuplicateStageName(String),
    /// `--target` names no stage.
    #[error("target stage {0:?} could not be found")]
    UnknownTarget(String),
    /// `--from=N` with N beyond the stages defined so far.
    #[error("invalid stage index {index}: only {available} stage(s) defined before this one")]
    StageIndexOutOfRange {
        /// The index given.
        index: usize,
        /// How many stages precede the reference.
        available: usize,
    },
    /// `COPY --from` or `RUN --mount=from=` naming a stage defined later in the file.
    #[error("{}", if *mount {
        format!("cannot mount from stage {reference:?} to {current:?}, stage needs to be defined before current command")
    } else {
        format!("cannot copy from stage {reference:?}, it needs to be defined before current stage {current:?}")
    })]
    StageDefinedLater {
        /// The `--from` value as given.
        reference: String,
        /// The stage that reads it.
        current: String,
        /// Whether a RUN mount (not a COPY) reads it.
        mount: bool,
    },
    /// Stages that depend on each other in a loop.
    #[error("circular dependency detected on stage: {0}")]
    CircularDependency(String),
    /// `FROM` expands to nothing.
    #[error("base name ({0}) should not be blank")]
    BlankBaseName(String),
    /// Variable expansion failed.
    #[error("{0}")]
    Expansion(#[source] Box<ExpandError>),
    /// A `--build-arg` that is not `KEY=VALUE` or `KEY`.
    #[error("invalid build argument {0:?}: expected KEY=VALUE or KEY")]
    InvalidBuildArg(String),
    /// A `--platform` value that is not `os[/arch[/variant]]`.
    #[error("invalid platform {0:?}: expected os[/arch[/variant]]")]
    InvalidPlatform(String),
}

/// An error in a Dockerfile, with where it happened.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.headline())]
pub struct Error {
    /// Lines of the Dockerfile the error is about, when it is about some.
    pub location: Option<Location>,
    /// The instruction as written (continuations joined), when the error is about one.
    pub instruction: Option<String>,
    /// What is wrong.
    #[source]
    pub kind: ErrorKind,
}

impl Error {
    /// An error with no place in the file (a bad option, an empty file).
    pub fn new(kind: ErrorKind) -> Self {
        Self {
            location: None,
            instruction: None,
            kind,
        }
    }

    /// An error at `location`, about the instruction written as `instruction`.
    pub fn at(kind: ErrorKind, location: Location, instruction: impl Into<String>) -> Self {
        Self {
            location: Some(location),
            instruction: Some(instruction.into()),
            kind,
        }
    }

    /// An error at `location` with no single instruction to name.
    pub fn at_line(kind: ErrorKind, location: Location) -> Self {
        Self {
            location: Some(location),
            instruction: None,
            kind,
        }
    }

    fn headline(&self) -> String {
        match &self.instruction {
            Some(instruction) => format!("{}: {}", shorten(instruction), self.kind),
            None => self.kind.to_string(),
        }
    }

    /// A hint that helps the user fix the error, if there is one.
    pub fn hint(&self) -> Option<String> {
        match &self.kind {
            ErrorKind::UnknownInstruction {
                suggestion: Some(name),
                ..
            } => Some(format!("did you mean {}?", name.to_uppercase())),
            ErrorKind::UnknownFlag {
                suggestion: Some(name),
                ..
            } => Some(format!("did you mean --{name}?")),
            ErrorKind::InstructionBeforeFrom(_) => {
                Some("only ARG and parser directives may precede the first FROM".to_string())
            }
            ErrorKind::InvalidStageName(_) => {
                Some("stage names are lower-case letters, digits, '-', '_' and '.', starting with a letter".to_string())
            }
            ErrorKind::StageDefinedLater { .. } => {
                Some("move the stage it names above this one".to_string())
            }
            ErrorKind::NameValueMissingValue(_) => Some("write KEY=VALUE, or KEY VALUE".to_string()),
            ErrorKind::UnterminatedHeredoc(name) => {
                Some(format!("end the heredoc with a line holding only {name}"))
            }
            _ => None,
        }
    }

    /// Renders the error for a person: `FILE:LINE: INSTRUCTION: problem`, a `hint:` line
    /// where one helps, and the offending lines of `source` with their numbers.
    pub fn render(&self, file_name: &str, source: &str) -> String {
        let mut out = match self.location {
            Some(location) => format!("{file_name}:{}: {self}", location.start_line),
            None => format!("{file_name}: {self}"),
        };
        if let Some(hint) = self.hint() {
            out.push_str("\nhint: ");
            out.push_str(&hint);
        }
        if let Some(location) = self.location {
            let lines: Vec<&str> = source.lines().collect();
            let last = location
                .end_line
                .min(lines.len())
                .min(location.start_line + 9);
            if location.start_line >= 1 && location.start_line <= last {
                out.push('\n');
                for number in location.start_line..=last {
                    out.push_str(&format!("\n {number:>4} | {}", lines[number - 1]));
                }
                if last < location.end_line {
                    out.push_str("\n      | ...");
                }
            }
        }
        out
    }
}

/// Keeps long instructions readable in one-line messages.
fn shorten(instruction: &str) -> String {
    const LIMIT: usize = 80;
    let single_line: String = instruction
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if single_line.chars().count() <= LIMIT {
        return single_line;
    }
    let kept: String = single_line.chars().take(LIMIT).collect();
    format!("{kept}...")
}

/// The candidate closest to `word` (case-insensitive edit distance), if it is close enough to
/// be what the user meant.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_lowercase();
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|candidate| (edit_distance(&word, candidate), *candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Optimal-string-alignment distance: edits, with a swap of neighbours counting as one.
fn edit_distance(left: &str, right: &str) -> usize {
    let left: Vec<char> = left.chars().collect();
    let right: Vec<char> = right.chars().collect();
    let width = right.len() + 1;
    let mut table = vec![0usize; (left.len() + 1) * width];
    for i in 0..=left.len() {
        for j in 0..=right.len() {
            table[i * width + j] = if i == 0 || j == 0 {
                i + j
            } else {
                let cost = usize::from(left[i - 1] != right[j - 1]);
                let mut best = (table[(i - 1) * width + j] + 1)
                    .min(table[i * width + j - 1] + 1)
                    .min(table[(i - 1) * width + j - 1] + cost);
                if i > 1 && j > 1 && left[i - 1] == right[j - 2] && left[i - 2] == right[j - 1] {
                    best = best.min(table[(i - 2) * width + j - 2] + 1);
                }
                best
            };
        }
    }
    table[left.len() * width + right.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(suggest("chwon", &["chown", "chmod", "from"]), Some("chown"));
        assert_eq!(suggest("COPPY", &["copy", "cmd"]), Some("copy"));
        assert_eq!(suggest("zzzzzz", &["copy", "cmd"]), None);
    }

    #[test]
    fn renders_file_line_instruction_hint_and_source() {
        let source = "FROM busybox\nCOPY --chwon=1 a /b\n";
        let error = Error::at(
            ErrorKind::UnknownFlag {
                flag: "chwon".into(),
                suggestion: Some("chown"),
            },
            Location::line(2),
            "COPY --chwon=1 a /b",
        );
        let rendered = error.render("Dockerfile", source);
        assert!(rendered.starts_with(
            "Dockerfile:2: COPY --chwon=1 a /b: unknown flag: --chwon\nhint: did you mean --chown?"
        ));
        assert!(rendered.contains("   2 | COPY --chwon=1 a /b"));
        assert!(!rendered.contains("FROM busybox"));
    }
}
