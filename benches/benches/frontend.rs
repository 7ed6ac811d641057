//! Frontend benches: parsing and planning Dockerfiles.
#![allow(missing_docs)] // criterion's macros generate undocumented functions
//!
//! `cargo bench -p rbuild-benches --bench frontend` measures
//! - the whole BuildKit corpus (33 files) parsed to ASTs,
//! - a generated 2,000-instruction, 20-stage Dockerfile parsed, typed and planned into the graph.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rbuild_frontend::{NoImages, PlanOptions, plan};

fn corpus() -> Vec<String> {
    let folder =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/conformance/buildkit/testfiles");
    let mut texts: Vec<String> = std::fs::read_dir(folder)
        .expect("corpus folder")
        .map(|entry| {
            std::fs::read_to_string(entry.expect("entry").path().join("Dockerfile"))
                .expect("Dockerfile")
        })
        .collect();
    texts.sort();
    texts
}

/// A large multi-stage Dockerfile: every stage copies from the previous one.
fn large_dockerfile() -> String {
    let mut text =
        String::from("# syntax=docker/dockerfile:1\nARG BASE=busybox:latest\nARG VERSION=1.0\n");
    for stage in 0..20 {
        text.push_str(&format!("FROM ${{BASE}} AS stage{stage}\nARG VERSION\nENV STAGE={stage} HOME=/root\nWORKDIR /work/$STAGE\n"));
        if stage > 0 {
            text.push_str(&format!("COPY --from=stage{} /work /previous\n", stage - 1));
        }
        for step in 0..95 {
            match step % 5 {
                0 => text.push_str(&format!(
                    "RUN --mount=type=cache,target=/cache echo {step} $VERSION > file{step}\n"
                )),
                1 => text.push_str(&format!("COPY --chown=1:1 src/{step} ./dest/\n")),
                2 => text.push_str(&format!("LABEL step{step}=\"value ${{STAGE}}\"\n")),
                3 => text.push_str(&format!("RUN <<EOF\necho {step}\necho $HOME\nEOF\n")),
                _ => text.push_str(&format!("ENV VALUE{step}=${{STAGE:-none}}-{step}\n")),
            }
        }
    }
    text
}

fn benches(criterion: &mut Criterion) {
    let texts = corpus();
    let bytes: usize = texts.iter().map(String::len).sum();
    let mut group = criterion.benchmark_group("parse");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("buildkit corpus (33 files)", |bencher| {
        bencher.iter(|| {
            for text in &texts {
                black_box(rbuild_frontend::parser::parse(black_box(text)).expect("corpus parses"));
            }
        });
    });
    group.finish();

    let large = large_dockerfile();
    let options = PlanOptions::default();
    let mut group = criterion.benchmark_group("plan");
    group.throughput(Throughput::Bytes(large.len() as u64));
    group.bench_function("2000 instructions, 20 stages", |bencher| {
        bencher.iter(|| black_box(plan(black_box(&large), &options, &NoImages).expect("plans")));
    });
    group.finish();
}

criterion_group!(frontend, benches);
criterion_main!(frontend);
