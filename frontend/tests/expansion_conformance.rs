//! Runs BuildKit's own expansion tables (`testdata/conformance/buildkit/envVarTest` and
//! `wordsTest`, from moby/buildkit `frontend/dockerfile/shell`) against
//! [`rbuild_frontend::expand`], parsing them as BuildKit's `lex_test.go` does.
//!
//! Every row is run and every failure is collected before asserting, so one run shows all
//! the rows that disagree.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use rbuild_frontend::expand::{Lexer, VariableLookup};

fn conformance_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/conformance/buildkit")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// Splits `KEY=VALUE` as BuildKit's `EnvsFromSlice` does: at the first `=`, the value kept
/// exactly (trailing spaces matter); no `=` means set but empty.
fn environment_entry(entry: &str) -> (String, String) {
    match entry.split_once('=') {
        Some((key, value)) => (key.to_owned(), value.to_owned()),
        None => (entry.to_owned(), String::new()),
    }
}

/// The ordered list, and the same variables as hash and tree maps, so every lookup kind
/// sees each row (BuildKit runs each row against both a list and a map).
fn lookups(environment: &[(String, String)]) -> Vec<(&'static str, Box<dyn VariableLookup>)> {
    vec![
        ("list", Box::new(environment.to_vec())),
        (
            "hash map",
            Box::new(environment.iter().cloned().collect::<HashMap<_, _>>()),
        ),
        (
            "tree map",
            Box::new(environment.iter().cloned().collect::<BTreeMap<_, _>>()),
        ),
    ]
}

#[test]
fn envvar_test_rows_expand_as_in_buildkit() {
    let text = conformance_file("envVarTest");
    let environment: Vec<(String, String)> = ["PWD=/home", "SHELL=bash", "KOREAN=한국어", "NULL="]
        .into_iter()
        .map(environment_entry)
        .collect();
    let lookups = lookups(&environment);
    let lexer = Lexer::new('\\');

    let mut rows = 0;
    let mut failed_rows = 0;
    let mut skipped_windows_rows = 0;
    let mut failures = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.starts_with('#') {
            continue;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        let [platform, source, expected] = fields[..] else {
            failed_rows += 1;
            failures.push(format!(
                "line {line_number}: expected 3 fields separated by |, got {line:?}"
            ));
            continue;
        };
        let (platform, source, expected) = (platform.trim(), source.trim(), expected.trim());
        match platform {
            "A" | "U" => {}
            "W" => {
                skipped_windows_rows += 1;
                continue;
            }
            other => {
                failures.push(format!("line {line_number}: unknown platform {other:?}"));
                continue;
            }
        }
        rows += 1;
        let mut row_failed = false;
        for (kind, variables) in &lookups {
            let outcome = lexer.expand_word(source, variables.as_ref());
            let passed = match &outcome {
                Ok(value) => expected != "error" && value == expected,
                Err(_) => expected == "error",
            };
            if !passed {
                row_failed = true;
                failures.push(format!(
                    "line {line_number} ({kind}): {source:?} gave {outcome:?}, expected {expected:?}"
                ));
            }
        }
        if row_failed {
            failed_rows += 1;
        }
    }

    println!(
        "envVarTest: {} of {rows} rows passed ({skipped_windows_rows} Windows rows skipped)",
        rows - failed_rows
    );
    assert!(rows > 0, "envVarTest has no A or U rows");
    assert!(
        failures.is_empty(),
        "{} envVarTest failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn words_test_rows_split_as_in_buildkit() {
    let text = conformance_file("wordsTest");
    let lexer = Lexer::new('\\');

    // BuildKit's test also means to rerun the file with raw quotes and skip-unset on, but
    // its second pass reads from the already exhausted file and so checks nothing; the
    // expected words only hold for the default options.
    let mut environment: Vec<(String, String)> = Vec::new();
    let mut rows = 0;
    let mut failed_rows = 0;
    let mut failures = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.starts_with('#') {
            continue;
        }
        if let Some(entry) = line.strip_prefix("ENV ") {
            environment.push(environment_entry(entry.trim_start_matches(' ')));
            continue;
        }
        rows += 1;
        let fields: Vec<&str> = line.split('|').collect();
        let [source, expected] = fields[..] else {
            failed_rows += 1;
            failures.push(format!(
                "line {line_number}: expected exactly one | in {line:?}"
            ));
            continue;
        };
        let source = source.trim();
        let expected: Vec<&str> = expected.trim_start_matches(' ').split(',').collect();
        let mut row_failed = false;
        for (kind, variables) in &lookups(&environment) {
            let words = match lexer.expand_words(source, variables.as_ref()) {
                Ok(words) => words,
                Err(_) => vec!["error".to_owned()],
            };
            if words != expected {
                row_failed = true;
                failures.push(format!(
                    "line {line_number} ({kind}): {source:?} gave {words:?}, expected {expected:?}"
                ));
            }
        }
        if row_failed {
            failed_rows += 1;
        }
    }

    println!("wordsTest: {} of {rows} rows passed", rows - failed_rows);
    assert!(rows > 0, "wordsTest has no rows");
    assert!(
        failures.is_empty(),
        "{} wordsTest failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
