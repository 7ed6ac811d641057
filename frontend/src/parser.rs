//! Layer 1: Dockerfile text → AST nodes with line ranges.
//!
//! Follows BuildKit's `frontend/dockerfile/parser` behaviour: parser directives (`# syntax=`,
//! `# escape=`, `# check=`) before anything else, a byte-order mark, CRLF, line continuations
//! with the escape token (comment and blank lines inside a continuation are skipped), flags
//! (`--x=y`) split off every instruction, JSON (exec) versus shell forms, and heredocs for
//! RUN, COPY and ADD (also under ONBUILD). Arguments stay unexpanded here: expansion depends
//! on ARG and ENV state and happens when the graph is built.

use serde::Serialize;

use crate::error::{Error, ErrorKind, Location};
use crate::expand::{Lexer, NoVariables};

/// A here-document attached to an instruction (`RUN <<EOF`, `COPY <<EOF /dest`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Heredoc {
    /// The delimiter word, quotes removed (`EOF`).
    pub name: String,
    /// The file descriptor written before `<<` (`3<<EOF`), 0 when none.
    pub file_descriptor: u32,
    /// Whether variables in the content are expanded (false when the delimiter was quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from the content and the delimiter line.
    pub chomp: bool,
    /// The lines between the instruction and the delimiter, line endings kept.
    pub content: String,
}

impl Heredoc {
    /// The content as it is used: with leading tabs removed from each line for `<<-`.
    pub fn effective_content(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        let mut out = String::with_capacity(self.content.len());
        for line in self.content.split_inclusive('\n') {
            out.push_str(line.trim_start_matches('\t'));
        }
        out
    }
}

/// One instruction as parsed: its command word, flags, and arguments, not yet typed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The instruction word, lower-cased (`run`).
    pub command: String,
    /// The instruction as written, continuations joined (used in messages and history).
    pub original: String,
    /// The `--name[=value]` words before the arguments, dashes kept.
    pub flags: Vec<String>,
    /// The arguments, split as BuildKit splits them for this instruction. For ENV and LABEL
    /// they come in triples: key, value, and `=` or `""` (the old `KEY value` form).
    pub arguments: Vec<String>,
    /// The arguments were a JSON array (exec form).
    pub json: bool,
    /// The trigger of an ONBUILD.
    pub subcommand: Option<Box<Node>>,
    /// Here-documents, in the order their markers appear.
    pub heredocs: Vec<Heredoc>,
    /// The lines the instruction spans, heredoc bodies included.
    pub location: Location,
    /// The comment lines right above the instruction.
    pub comments: Vec<String>,
}

impl Node {
    /// BuildKit's s-expression dump of the node: `(copy ["--from=a"] "src" "/dst")`.
    pub fn dump(&self) -> String {
        let mut out = String::from("(");
        out.push_str(&self.dump_inner());
        out.push(')');
        out
    }

    fn dump_inner(&self) -> String {
        let mut out = self.command.clone();
        if !self.flags.is_empty() {
            let quoted: Vec<String> = self.flags.iter().map(|flag| go_quote(flag)).collect();
            out.push_str(&format!(" [{}]", quoted.join(" ")));
        }
        if let Some(subcommand) = &self.subcommand {
            out.push_str(&format!(" ({})", subcommand.dump_inner()));
        }
        for argument in &self.arguments {
            out.push(' ');
            out.push_str(&go_quote(argument));
        }
        out
    }
}

/// The parser directives found at the top of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Directives {
    /// The escape and line-continuation token: `\` unless `# escape=` says a backtick.
    pub escape_token: char,
    /// `# syntax=` as written, if present.
    pub syntax: Option<String>,
    /// `# check=` as written, if present.
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Self {
            escape_token: '\\',
            syntax: None,
            check: None,
        }
    }
}

/// A non-fatal finding of the parser.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// Where it was found.
    pub location: Location,
    /// What it is.
    pub message: String,
}

/// A parsed Dockerfile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Dockerfile {
    /// The parser directives.
    pub directives: Directives,
    /// Every instruction, in file order.
    pub nodes: Vec<Node>,
    /// Non-fatal findings (empty continuation lines).
    pub warnings: Vec<Warning>,
}

impl Dockerfile {
    /// BuildKit's dump of every instruction, one s-expression a line.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&node.dump());
            out.push('\n');
        }
        out
    }
}

/// Parses Dockerfile bytes (UTF-8, optionally with a byte-order mark).
pub fn parse_bytes(bytes: &[u8]) -> Result<Dockerfile, Error> {
    let text = std::str::from_utf8(bytes).map_err(|error| {
        let line = bytes[..error.valid_up_to()]
            .iter()
            .filter(|byte| **byte == b'\n')
            .count()
            + 1;
        Error::at_line(ErrorKind::NotUtf8, Location::line(line))
    })?;
    parse(text)
}

/// Parses Dockerfile text.
pub fn parse(text: &str) -> Result<Dockerfile, Error> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut directive_parser = DirectiveParser::default();
    let mut directives = Directives::default();
    let mut nodes = Vec::new();
    let mut warnings = Vec::new();
    let mut comments: Vec<String> = Vec::new();
    let mut index = 0;
    let mut current_line = 0;

    while index < lines.len() {
        let raw = lines[index];
        index += 1;
        if is_comment(raw) {
            let comment = raw.trim_start().trim_start_matches('#').trim().to_string();
            if comment.is_empty() {
                comments.clear();
            } else {
                comments.push(comment);
            }
        }
        let line = trim_newline(raw).trim_start();
        current_line += 1;
        if directive_parser
            .parse_line(line, &mut directives)
            .map_err(|kind| Error::at_line(kind, Location::line(current_line)))?
        {
            comments.pop();
        }
        let line = if is_comment(line) { "" } else { line };
        let start_line = current_line;
        let (content, mut end_of_line) = trim_continuation(line, directives.escape_token);
        if end_of_line && content.is_empty() {
            continue;
        }
        let mut joined = content.to_string();
        let mut has_empty_continuation = false;
        while !end_of_line && index < lines.len() {
            let raw = lines[index];
            index += 1;
            current_line += 1;
            let line = trim_newline(raw);
            if is_comment(line) {
                continue;
            }
            if line.trim_start().is_empty() {
                has_empty_continuation = true;
                continue;
            }
            let (content, end) = trim_continuation(line, directives.escape_token);
            end_of_line = end;
            joined.push_str(content);
        }
        if has_empty_continuation {
            warnings.push(Warning {
                location: Location::new(start_line, current_line),
                message: format!("empty continuation line found in: {joined}"),
            });
        }

        let mut node = node_from_line(&joined, directives.escape_token).map_err(|kind| {
            Error::at(
                kind,
                Location::new(start_line, current_line),
                joined.as_str(),
            )
        })?;

        if node.can_contain_heredoc() && joined.contains("<<") {
            let markers = heredocs_from_line(&joined).map_err(|kind| {
                Error::at(
                    kind,
                    Location::new(start_line, current_line),
                    joined.as_str(),
                )
            })?;
            let mut heredocs = Vec::with_capacity(markers.len());
            for mut heredoc in markers {
                let mut terminated = false;
                while index < lines.len() {
                    let raw = lines[index];
                    index += 1;
                    current_line += 1;
                    let mut candidate = trim_newline(raw);
                    if heredoc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == heredoc.name {
                        terminated = true;
                        break;
                    }
                    heredoc.content.push_str(raw);
                }
                if !terminated {
                    return Err(Error::at(
                        ErrorKind::UnterminatedHeredoc(heredoc.name),
                        Location::new(start_line, current_line),
                        joined.as_str(),
                    ));
                }
                heredocs.push(heredoc);
            }
            match node.subcommand.as_mut() {
                Some(trigger) if node.command == "onbuild" => trigger.heredocs = heredocs,
                _ => node.heredocs = heredocs,
            }
        }
        node.location = Location::new(start_line, current_line);
        node.comments = std::mem::take(&mut comments);
        nodes.push(node);
    }

    if nodes.is_empty() {
        return Err(Error::at_line(
            ErrorKind::NoInstructions,
            Location::line(current_line.max(1)),
        ));
    }
    Ok(Dockerfile {
        directives,
        nodes,
        warnings,
    })
}

/// Finds parser directives: `#` then `name = value` on the first lines, before any
/// instruction, blank line, or other comment.
#[derive(Default)]
struct DirectiveParser {
    done: bool,
    seen: Vec<String>,
}

impl DirectiveParser {
    /// Returns whether `line` was a directive (so it is not kept as a comment).
    fn parse_line(&mut self, line: &str, directives: &mut Directives) -> Result<bool, ErrorKind> {
        if self.done {
            return Ok(false);
        }
        let Some(rest) = line.strip_prefix('#') else {
            self.done = true;
            return Ok(false);
        };
        let Some((name, value)) = split_directive(rest.trim_start()) else {
            self.done = true;
            return Ok(false);
        };
        let name = name.to_ascii_lowercase();
        if !matches!(name.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(false);
        }
        if self.seen.contains(&name) {
            return Err(ErrorKind::DuplicateDirective(name));
        }
        self.seen.push(name.clone());
        match name.as_str() {
            "escape" => {
                if value != "`" && value != "\\" {
                    return Err(ErrorKind::InvalidEscapeToken(value.to_string()));
                }
                directives.escape_token = value.chars().next().unwrap_or('\\');
            }
            "syntax" => directives.syntax = Some(value.to_string()),
            _ => directives.check = Some(value.to_string()),
        }
        Ok(true)
    }
}

/// Matches `^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`.
fn split_directive(text: &str) -> Option<(&str, &str)> {
    let name_end = text
        .char_indices()
        .find(|(_, c)| !c.is_ascii_alphanumeric())
        .map_or(text.len(), |(index, _)| index);
    let name = &text[..name_end];
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let value = text[name_end..].trim_start().strip_prefix('=')?.trim();
    if value.is_empty() {
        return None;
    }
    Some((name, value))
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

fn trim_newline(line: &str) -> &str {
    line.trim_end_matches(['\r', '\n'])
}

/// BuildKit's continuation rule: the escape token, then only spaces and tabs, ends a line
/// that continues — unless the token is itself escaped (`\\` at the end does not continue).
fn trim_continuation(line: &str, escape_token: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    let Some(before) = trimmed.strip_suffix(escape_token) else {
        return (line, true);
    };
    if before.is_empty() || !before.ends_with(escape_token) {
        (before, false)
    } else {
        (line, true)
    }
}

/// Splits the command word and flags off a joined line and parses the arguments as this
/// instruction's rules say.
fn node_from_line(line: &str, escape_token: char) -> Result<Node, ErrorKind> {
    let trimmed = line.trim();
    let (command, rest) = match trimmed.find(is_go_whitespace) {
        Some(position) => (
            &trimmed[..position],
            trimmed[position..].trim_start_matches(is_go_whitespace),
        ),
        None => (trimmed, ""),
    };
    let command = command.to_lowercase();
    let (rest, flags) = extract_flags(rest);
    let rest = rest.trim();
    let mut node = Node {
        command: command.clone(),
        original: trimmed.to_string(),
        flags,
        arguments: Vec::new(),
        json: false,
        subcommand: None,
        heredocs: Vec::new(),
        location: Location::line(1),
        comments: Vec::new(),
    };
    match command.as_str() {
        "add" | "copy" | "volume" => {
            if let Some(values) = parse_json(rest)? {
                node.arguments = values;
                node.json = true;
            } else {
                node.arguments = split_whitespace(rest);
            }
        }
        "cmd" | "entrypoint" | "run" | "shell" => parse_maybe_json(rest, &mut node)?,
        "arg" => node.arguments = parse_words(rest, escape_token),
        "env" => node.arguments = parse_name_value(rest, "ENV", escape_token)?,
        "label" => node.arguments = parse_name_value(rest, "LABEL", escape_token)?,
        "expose" | "from" => node.arguments = split_whitespace(rest),
        "healthcheck" => {
            let kind_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            if kind_end > 0 {
                node.arguments.push(rest[..kind_end].to_string());
                let command_text = rest[kind_end..].trim_start();
                let mut command_node = node.clone();
                command_node.arguments.clear();
                parse_maybe_json(command_text, &mut command_node)?;
                node.arguments.extend(command_node.arguments);
                node.json = command_node.json;
            }
        }
        "maintainer" | "stopsignal" | "user" | "workdir" if !rest.is_empty() => {
            node.arguments.push(rest.to_string());
        }
        "onbuild" if !rest.is_empty() => {
            node.subcommand = Some(Box::new(node_from_line(rest, escape_token)?));
        }
        // Unknown instructions keep no arguments; the instruction layer reports them.
        _ => {}
    }
    Ok(node)
}

impl Node {
    fn can_contain_heredoc(&self) -> bool {
        let node = match (&self.subcommand, self.command.as_str()) {
            (Some(trigger), "onbuild") => trigger,
            _ => self,
        };
        matches!(node.command.as_str(), "run" | "copy" | "add") && !node.json
    }
}

/// Go's `unicode.IsSpace` for the separators BuildKit's `[\t\v\f\r ]+` regex splits on.
fn is_go_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\u{0b}' | '\u{0c}' | '\r' | ' ')
}

fn split_whitespace(rest: &str) -> Vec<String> {
    if rest.is_empty() {
        return Vec::new();
    }
    rest.split(is_go_whitespace)
        .filter(|word| !word.is_empty())
        .map(str::to_string)
        .collect()
}

fn parse_maybe_json(rest: &str, node: &mut Node) -> Result<(), ErrorKind> {
    if rest.is_empty() {
        return Ok(());
    }
    if let Some(values) = parse_json(rest)? {
        node.arguments = values;
        node.json = true;
    } else {
        node.arguments = vec![rest.to_string()];
    }
    Ok(())
}

/// A JSON array of strings, or `None` when the text is not a JSON array at all.
fn parse_json(rest: &str) -> Result<Option<Vec<String>>, ErrorKind> {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return Ok(None);
    }
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(rest)
    else {
        return Ok(None);
    };
    items
        .into_iter()
        .map(|item| match item {
            serde_json::Value::String(text) => Ok(text),
            _ => Err(ErrorKind::JsonNotStrings),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Splits words on whitespace, keeping quotes and escapes (they are removed at expansion).
fn parse_words(rest: &str, escape_token: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(char),
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut blank_ok = false;
    let mut phase = Phase::Spaces;
    let mut position = 0;
    while position <= chars.len() {
        let at_end = position == chars.len();
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if chars[position].is_whitespace() {
                position += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if at_end {
            if blank_ok || !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            break;
        }
        let mut c = chars[position];
        match phase {
            Phase::Word => {
                if c.is_whitespace() {
                    phase = Phase::Spaces;
                    if blank_ok || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    word.clear();
                    blank_ok = false;
                    position += 1;
                    continue;
                }
                if c == '\'' || c == '"' {
                    blank_ok = true;
                    phase = Phase::Quote(c);
                }
                if c == escape_token {
                    if position + 1 == chars.len() {
                        position += 1;
                        continue;
                    }
                    word.push(c);
                    position += 1;
                    c = chars[position];
                }
                word.push(c);
            }
            Phase::Quote(quote) => {
                if c == quote {
                    phase = Phase::Word;
                }
                if c == escape_token && quote != '\'' {
                    if position + 1 == chars.len() {
                        phase = Phase::Word;
                        position += 1;
                        continue;
                    }
                    position += 1;
                    word.push(c);
                    c = chars[position];
                }
                word.push(c);
            }
            Phase::Spaces => {}
        }
        position += 1;
    }
    words
}

/// ENV and LABEL: `KEY value` (old form, the rest of the line is the value) or
/// `k=v k2="v 2"`; returns (key, value, separator) triples flattened.
fn parse_name_value(
    rest: &str,
    instruction: &'static str,
    escape_token: char,
) -> Result<Vec<String>, ErrorKind> {
    let words = parse_words(rest, escape_token);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        let mut parts = rest.splitn(2, is_go_whitespace);
        let key = parts.next().unwrap_or_default();
        let value = parts
            .next()
            .map(|value| value.trim_start_matches(is_go_whitespace))
            .ok_or(ErrorKind::NameValueMissingValue(instruction))?;
        return Ok(vec![key.to_string(), value.to_string(), String::new()]);
    }
    let mut out = Vec::with_capacity(words.len() * 3);
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(ErrorKind::NameValueMissingEquals(word));
        };
        out.extend([key.to_string(), value.to_string(), "=".to_string()]);
    }
    Ok(out)
}

/// Splits the leading `--flag[=value]` words off the arguments. `--` alone ends the flags.
fn extract_flags(line: &str) -> (&str, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote(u8),
    }
    let bytes = line.as_bytes();
    let mut words = Vec::new();
    let mut word: Vec<u8> = Vec::new();
    let mut blank_ok = false;
    let mut phase = Phase::Spaces;
    let mut position = 0;
    while position <= bytes.len() {
        let at_end = position == bytes.len();
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            let c = bytes[position];
            if c.is_ascii_whitespace() || c == 0x0b {
                position += 1;
                continue;
            }
            if c != b'-' || position + 1 == bytes.len() || bytes[position + 1] != b'-' {
                return (&line[position..], words);
            }
            phase = Phase::Word;
        }
        if at_end {
            if word != b"--" && (blank_ok || !word.is_empty()) {
                words.push(String::from_utf8_lossy(&word).into_owned());
            }
            break;
        }
        let mut c = bytes[position];
        match phase {
            Phase::Word => {
                if c.is_ascii_whitespace() || c == 0x0b {
                    phase = Phase::Spaces;
                    if word == b"--" {
                        return (&line[position..], words);
                    }
                    if blank_ok || !word.is_empty() {
                        words.push(String::from_utf8_lossy(&word).into_owned());
                    }
                    word.clear();
                    blank_ok = false;
                    position += 1;
                    continue;
                }
                if c == b'\'' || c == b'"' {
                    phase = Phase::Quote(c);
                    blank_ok = true;
                    position += 1;
                    continue;
                }
                if c == b'\\' {
                    if position + 1 == bytes.len() {
                        position += 1;
                        continue;
                    }
                    position += 1;
                    c = bytes[position];
                }
                word.push(c);
            }
            Phase::Quote(quote) => {
                if c == quote {
                    phase = Phase::Word;
                    position += 1;
                    continue;
                }
                if c == b'\\' {
                    if position + 1 == bytes.len() {
                        phase = Phase::Word;
                        position += 1;
                        continue;
                    }
                    position += 1;
                    c = bytes[position];
                }
                word.push(c);
            }
            Phase::Spaces => {}
        }
        position += 1;
    }
    ("", words)
}

/// Finds `<<EOF`, `<<-EOF`, `3<<"EOF"` markers in an instruction line.
fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, ErrorKind> {
    let raw_lexer = Lexer::new('\\')
        .with_raw_quotes(true)
        .with_raw_escapes(true)
        .with_skip_unset_variables(true);
    // BuildKit ignores lexing errors here: what could not be split has no markers.
    let words = raw_lexer
        .expand_words(line, &NoVariables)
        .unwrap_or_default();
    let mut heredocs = Vec::new();
    for word in words {
        if let Some(heredoc) = parse_heredoc_marker(&word)? {
            heredocs.push(heredoc);
        }
    }
    Ok(heredocs)
}

/// Parses one word as a heredoc marker: `^(\d*)<<(-?)([^<]*)$`.
pub fn parse_heredoc_marker(word: &str) -> Result<Option<Heredoc>, ErrorKind> {
    let digits_end = word
        .char_indices()
        .find(|(_, c)| !c.is_ascii_digit())
        .map_or(word.len(), |(index, _)| index);
    let Some(after) = word[digits_end..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match after.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, after),
    };
    if rest.is_empty() || rest.contains('<') {
        return Ok(None);
    }
    let file_descriptor = word[..digits_end].parse::<u32>().unwrap_or(0);
    let lexer = Lexer::new('\\').with_skip_unset_variables(true);
    let words = lexer
        .expand_words(rest, &NoVariables)
        .map_err(|error| ErrorKind::HeredocLexing(Box::new(error)))?;
    let [name] = words.as_slice() else {
        return Ok(None);
    };
    let raw_words = lexer
        .clone()
        .with_raw_quotes(true)
        .expand_words(rest, &NoVariables)
        .map_err(|error| ErrorKind::HeredocLexing(Box::new(error)))?;
    let quote_count = |text: &str| text.matches(['\'', '"']).count();
    let expand = raw_words.len() == 1 && quote_count(name) == quote_count(&raw_words[0]);
    Ok(Some(Heredoc {
        name: name.clone(),
        file_descriptor,
        expand,
        chomp,
        content: String::new(),
    }))
}

/// Go's `strconv.Quote`, which BuildKit's dump uses.
pub fn go_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{07}' => out.push_str("\\a"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0b}' => out.push_str("\\v"),
            ' ' => out.push(' '),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() || c.is_whitespace() || ('\u{80}'..='\u{9f}').contains(&c) => {
                if (c as u32) < 0x10000 {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(text: &str) -> String {
        parse(text).expect("parses").dump()
    }

    #[test]
    fn continuation_with_escaped_escape_does_not_continue() {
        assert_eq!(
            dump("FROM a\nENV C x\\\\\nENV D y\n"),
            "(from \"a\")\n(env \"C\" \"x\\\\\\\\\" \"\")\n(env \"D\" \"y\" \"\")\n"
        );
    }

    #[test]
    fn crlf_and_bom_are_accepted() {
        assert_eq!(
            dump("\u{feff}FROM a\r\nRUN echo \\\r\n  hi\r\n"),
            "(from \"a\")\n(run \"echo   hi\")\n"
        );
    }

    #[test]
    fn directives_only_at_the_top() {
        let parsed =
            parse("# syntax=docker/dockerfile:1\n# escape=`\n# check=skip=all\nFROM a\n").unwrap();
        assert_eq!(parsed.directives.escape_token, '`');
        assert_eq!(
            parsed.directives.syntax.as_deref(),
            Some("docker/dockerfile:1")
        );
        assert_eq!(parsed.directives.check.as_deref(), Some("skip=all"));
        let late = parse("FROM a\n# escape=`\nRUN x \\\n y\n").unwrap();
        assert_eq!(late.directives.escape_token, '\\');
        assert_eq!(late.nodes[1].arguments, vec!["x  y"]);
    }

    #[test]
    fn duplicate_and_invalid_directives_are_errors() {
        let error = parse("# escape=`\n# escape=\\\nFROM a\n").unwrap_err();
        assert!(matches!(error.kind, ErrorKind::DuplicateDirective(ref name) if name == "escape"));
        assert_eq!(error.location, Some(Location::line(2)));
        let error = parse("# escape=x\nFROM a\n").unwrap_err();
        assert!(matches!(error.kind, ErrorKind::InvalidEscapeToken(_)));
    }

    #[test]
    fn heredocs_are_collected_with_their_lines() {
        let parsed = parse(
            "FROM a\nRUN <<EOF bash\necho $HOME\nEOF\nCOPY <<-\"ONE\" 3<<TWO /dest/\n\tfirst\n\tONE\nsecond\nTWO\nCMD x\n",
        )
        .unwrap();
        let run = &parsed.nodes[1];
        assert_eq!(run.location, Location::new(2, 4));
        assert_eq!(run.heredocs.len(), 1);
        assert_eq!(run.heredocs[0].name, "EOF");
        assert!(run.heredocs[0].expand);
        assert_eq!(run.heredocs[0].content, "echo $HOME\n");
        let copy = &parsed.nodes[2];
        assert_eq!(copy.heredocs.len(), 2);
        assert_eq!(copy.heredocs[0].name, "ONE");
        assert!(copy.heredocs[0].chomp);
        assert!(!copy.heredocs[0].expand);
        assert_eq!(copy.heredocs[0].effective_content(), "first\n");
        assert_eq!(copy.heredocs[1].name, "TWO");
        assert_eq!(copy.heredocs[1].file_descriptor, 3);
        assert_eq!(copy.heredocs[1].content, "second\n");
        assert_eq!(copy.location, Location::new(5, 9));
        assert_eq!(parsed.nodes[3].location, Location::line(10));
    }

    #[test]
    fn heredoc_in_json_form_is_not_a_heredoc() {
        let parsed = parse("FROM a\nRUN [\"echo\", \"<<EOF\"]\nCMD x\n").unwrap();
        assert!(parsed.nodes[1].heredocs.is_empty());
        assert_eq!(parsed.nodes.len(), 3);
    }

    #[test]
    fn unterminated_heredoc_is_an_error() {
        let error = parse("FROM a\nRUN <<EOF\necho\n").unwrap_err();
        assert!(matches!(error.kind, ErrorKind::UnterminatedHeredoc(ref name) if name == "EOF"));
        assert_eq!(error.location, Some(Location::new(2, 3)));
    }

    #[test]
    fn onbuild_trigger_can_hold_a_heredoc() {
        let parsed = parse("FROM a\nONBUILD RUN <<EOF\necho hi\nEOF\n").unwrap();
        let trigger = parsed.nodes[1].subcommand.as_ref().unwrap();
        assert_eq!(trigger.heredocs[0].content, "echo hi\n");
    }

    #[test]
    fn nested_json_is_an_error() {
        let error = parse("CMD [\"a\", [\"b\"]]\n").unwrap_err();
        assert!(matches!(error.kind, ErrorKind::JsonNotStrings));
    }

    #[test]
    fn go_quote_matches_strconv_quote() {
        assert_eq!(go_quote("a\"b\\c\u{0}\t♥"), "\"a\\\"b\\\\c\\x00\\t♥\"");
        assert_eq!(go_quote("\u{a0}"), "\"\\u00a0\"");
    }
}
