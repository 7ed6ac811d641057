//! BuildKit's parser corpus: every file in `testfiles/` parses to the instructions in its
//! `result` dump, and every file in `testfiles-negative/` is rejected.

use std::fs;
use std::path::{Path, PathBuf};

use rbuild_frontend::parser::parse_bytes;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/conformance/buildkit")
}

fn cases(folder: &str) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = fs::read_dir(corpus().join(folder))
        .unwrap_or_else(|error| panic!("reading {folder}: {error}"))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    cases.sort();
    cases
}

#[test]
fn every_buildkit_testfile_parses_to_its_result() {
    let cases = cases("testfiles");
    assert_eq!(cases.len(), 33, "the corpus has 33 must-parse files");
    let mut failures = Vec::new();
    for case in &cases {
        let dockerfile = fs::read(case.join("Dockerfile")).expect("Dockerfile");
        let expected = fs::read_to_string(case.join("result")).expect("result");
        match parse_bytes(&dockerfile) {
            Ok(parsed) => {
                let actual = parsed.dump();
                if actual.trim_end() != expected.trim_end() {
                    failures.push(format!(
                        "{}:\n--- expected\n{expected}--- actual\n{actual}",
                        case.display()
                    ));
                }
            }
            Err(error) => failures.push(format!("{}: failed to parse: {error}", case.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} files differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn every_buildkit_negative_testfile_is_rejected() {
    let cases = cases("testfiles-negative");
    assert_eq!(cases.len(), 4, "the corpus has 4 must-fail files");
    for case in &cases {
        let dockerfile = fs::read(case.join("Dockerfile")).expect("Dockerfile");
        let result = parse_bytes(&dockerfile).and_then(|parsed| {
            rbuild_frontend::instructions::parse_instructions(&parsed).map(|_| parsed)
        });
        assert!(result.is_err(), "{} parsed but must fail", case.display());
    }
}
