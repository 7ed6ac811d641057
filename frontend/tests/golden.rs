//! Golden tests: every case folder under `testdata/{parse,parse-errors,plan,plan-errors}/`
//! holds a `Dockerfile` and the text the frontend must produce for it.
//!
//! - `parse/NAME/expected`: BuildKit's dump, then one `heredoc` line per here-document, the
//!   parser directives, one `location` line per instruction and any parser warnings.
//! - `parse-errors/NAME/expected-error`: the rendered error of parsing and typing the file.
//! - `plan/NAME/expected`: `BuildGraph::describe()`, then a `same digest:` line for each group
//!   of steps that are one piece of work. An optional `options` file sets the plan options.
//! - `plan-errors/NAME/expected-error`: the rendered planning error (with optional `options`).
//!
//! `options` lines are `build-arg KEY=VALUE`, `target NAME`, `target-platform P` and
//! `build-platform P`; both platforms default to `linux/amd64` so goldens do not depend on the
//! host. Run with `RBUILD_BLESS=1` to rewrite the expected files from what the frontend does,
//! then read every rewritten file: a golden records correct behaviour, not current behaviour.
//! Blessing also rewrites cases whose expected text records behaviour the frontend does not
//! have yet, so check `git diff testdata/` before keeping what it wrote.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use rbuild_frontend::graph::{BuildGraph, NoImages, PlanOptions, Platform, plan};
use rbuild_frontend::instructions::parse_instructions;
use rbuild_frontend::parser::{Dockerfile, parse_bytes};

/// What a case produced: the text to compare, or why no text could be produced.
type Outcome = Result<String, String>;

#[test]
fn parse_goldens() {
    check_folder("parse", "expected", 20, |case| {
        let source = fs::read(case.join("Dockerfile")).map_err(|error| error.to_string())?;
        match parse_bytes(&source) {
            Ok(parsed) => Ok(describe_parse(&parsed)),
            Err(error) => Err(format!("failed to parse:\n{}", render(&error, &source))),
        }
    })
}

#[test]
fn parse_error_goldens() {
    check_folder("parse-errors", "expected-error", 15, |case| {
        let source = fs::read(case.join("Dockerfile")).map_err(|error| error.to_string())?;
        let result =
            parse_bytes(&source).and_then(|parsed| parse_instructions(&parsed).map(|_| parsed));
        match result {
            Ok(parsed) => Err(format!(
                "parsed but must fail:\n{}",
                describe_parse(&parsed)
            )),
            Err(error) => Ok(render(&error, &source)),
        }
    })
}

#[test]
fn plan_goldens() {
    check_folder("plan", "expected", 19, |case| {
        let (source, options) = read_plan_case(case)?;
        match plan(&source, &options, &NoImages) {
            Ok(graph) => Ok(describe_plan(&graph)),
            Err(error) => Err(format!(
                "failed to plan:\n{}",
                error.render("Dockerfile", &source)
            )),
        }
    })
}

#[test]
fn plan_error_goldens() {
    check_folder("plan-errors", "expected-error", 11, |case| {
        let (source, options) = read_plan_case(case)?;
        match plan(&source, &options, &NoImages) {
            Ok(graph) => Err(format!("planned but must fail:\n{}", describe_plan(&graph))),
            Err(error) => Ok(error.render("Dockerfile", &source)),
        }
    })
}

fn testdata(folder: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(folder)
}

fn blessing() -> bool {
    std::env::var_os("RBUILD_BLESS").is_some_and(|value| value == "1")
}

/// Runs every case of `folder`, compares with (or, when blessing, writes) `expected_name`, and
/// fails listing every mismatch.
fn check_folder(folder: &str, expected_name: &str, minimum: usize, run: impl Fn(&Path) -> Outcome) {
    let root = testdata(folder);
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|error| panic!("reading {}: {error}", root.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= minimum,
        "{folder} has {} cases, expected at least {minimum}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let name = case
            .file_name()
            .expect("case name")
            .to_string_lossy()
            .into_owned();
        let expected_path = case.join(expected_name);
        let actual = match run(case) {
            Ok(actual) => actual,
            Err(problem) => {
                failures.push(format!("{folder}/{name}: {problem}"));
                continue;
            }
        };
        let expected = fs::read_to_string(&expected_path).ok();
        if expected.as_deref() == Some(actual.as_str()) {
            continue;
        }
        if blessing() {
            fs::write(&expected_path, &actual)
                .unwrap_or_else(|error| panic!("writing {}: {error}", expected_path.display()));
            eprintln!("blessed {folder}/{name}/{expected_name}");
            continue;
        }
        match expected {
            Some(expected) => failures.push(format!(
                "{folder}/{name}: {expected_name} differs (- expected, + actual):\n{}",
                diff(&expected, &actual)
            )),
            None => failures.push(format!(
                "{folder}/{name}: no {expected_name} (run with RBUILD_BLESS=1 to write it); actual:\n{actual}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {folder} cases fail:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

fn render(error: &rbuild_frontend::Error, source: &[u8]) -> String {
    error.render("Dockerfile", &String::from_utf8_lossy(source))
}

/// The parse golden text: dump, heredocs, directives, locations, warnings.
fn describe_parse(parsed: &Dockerfile) -> String {
    let mut out = parsed.dump();
    for node in &parsed.nodes {
        // An ONBUILD keeps the heredocs of its trigger on the trigger.
        let trigger_heredocs = node
            .subcommand
            .iter()
            .flat_map(|trigger| trigger.heredocs.iter());
        for heredoc in node.heredocs.iter().chain(trigger_heredocs) {
            writeln!(
                out,
                "heredoc {} {} fd={} expand={} chomp={} content={:?}",
                node.location.start_line,
                heredoc.name,
                heredoc.file_descriptor,
                heredoc.expand,
                heredoc.chomp,
                heredoc.content
            )
            .expect("writing to a string");
        }
    }
    let directives = &parsed.directives;
    writeln!(
        out,
        "directives escape={} syntax={} check={}",
        directives.escape_token,
        directives.syntax.as_deref().unwrap_or("-"),
        directives.check.as_deref().unwrap_or("-")
    )
    .expect("writing to a string");
    for node in &parsed.nodes {
        writeln!(
            out,
            "location {}-{}",
            node.location.start_line, node.location.end_line
        )
        .expect("writing to a string");
    }
    for warning in &parsed.warnings {
        writeln!(
            out,
            "warning {}-{}: {}",
            warning.location.start_line, warning.location.end_line, warning.message
        )
        .expect("writing to a string");
    }
    out
}

/// The plan golden text: `describe()`, then the groups of steps that share a digest.
fn describe_plan(graph: &BuildGraph) -> String {
    let mut out = graph.describe();
    let mut by_digest: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for stage in &graph.stages {
        for (position, step) in stage.steps.iter().enumerate() {
            by_digest
                .entry(step.digest.as_str())
                .or_default()
                .push(format!("{}:{}", stage.index, position + 1));
        }
    }
    let mut groups: Vec<Vec<String>> = by_digest
        .into_values()
        .filter(|steps| steps.len() > 1)
        .collect();
    groups.sort();
    for group in groups {
        writeln!(out, "same digest: {}", group.join(" ")).expect("writing to a string");
    }
    out
}

fn read_plan_case(case: &Path) -> Result<(String, PlanOptions), String> {
    let source = fs::read_to_string(case.join("Dockerfile")).map_err(|error| error.to_string())?;
    let linux_amd64 = Platform::parse("linux/amd64").expect("a valid platform");
    let mut options = PlanOptions {
        build_args: BTreeMap::new(),
        target: None,
        target_platform: linux_amd64.clone(),
        build_platform: linux_amd64,
    };
    let text = match fs::read_to_string(case.join("options")) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(format!("reading options: {error}")),
    };
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let value = value.trim();
        let platform =
            |text: &str| Platform::parse(text).map_err(|error| format!("options: {error}"));
        match key {
            "build-arg" => {
                let (name, arg) = value
                    .split_once('=')
                    .ok_or_else(|| format!("options: build-arg {value:?} is not KEY=VALUE"))?;
                options.build_args.insert(name.to_string(), arg.to_string());
            }
            "target" => options.target = Some(value.to_string()),
            "target-platform" => options.target_platform = platform(value)?,
            "build-platform" => options.build_platform = platform(value)?,
            other => return Err(format!("options: unknown option {other:?}")),
        }
    }
    Ok((source, options))
}

/// A line diff (longest common subsequence): ` ` kept, `-` only expected, `+` only actual.
fn diff(expected: &str, actual: &str) -> String {
    let old: Vec<&str> = expected.lines().collect();
    let new: Vec<&str> = actual.lines().collect();
    let mut common = vec![vec![0usize; new.len() + 1]; old.len() + 1];
    for i in (0..old.len()).rev() {
        for j in (0..new.len()).rev() {
            common[i][j] = if old[i] == new[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let mut out = String::new();
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        if i < old.len() && j < new.len() && old[i] == new[j] {
            writeln!(out, "  {}", old[i]).expect("writing to a string");
            i += 1;
            j += 1;
        } else if j < new.len() && (i == old.len() || common[i][j + 1] >= common[i + 1][j]) {
            writeln!(out, "+ {}", new[j]).expect("writing to a string");
            j += 1;
        } else {
            writeln!(out, "- {}", old[i]).expect("writing to a string");
            i += 1;
        }
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(the texts differ in their final newline)\n");
    }
    out
}
