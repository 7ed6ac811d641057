//! Per-step overhead of the sandbox: what a RUN step costs before its command does anything.
//!
#![allow(missing_docs)] // criterion's macros generate undocumented functions
//! - `run /bin/true`: spawn the helper, namespaces, overlay mount over a busybox snapshot,
//!   Docker's mounts, seccomp, capabilities, exec, wait, unmount — with a fresh upper dir
//!   every time, as a RUN step has.
//! - `run + commit`: the same with `touch /stamp`, then the upper dir made into a gzip layer
//!   in a content store (the whole cost of a small RUN step but the cache bookkeeping).
//!
//! Needs root and Debian's busybox-static (`testdata/busybox-rootfs.sh`). This bench binary is
//! also the sandbox helper, so its `main` hands over to the executor first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group};
use rbuild_cache::ContentStore;
use rbuild_cache::apply::{ApplyOptions, WhiteoutMode, apply_layer};
use rbuild_cache::layer::{LayerOptions, LayerSource, create_layer};
use rbuild_executor::sandbox::{self, Output, RunOptions};
use rbuild_executor::spec::{DEFAULT_PATH, Process, RootFs, RunSpec};

fn busybox_snapshot(directory: &Path) -> PathBuf {
    let tar = directory.join("busybox.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/busybox-rootfs.sh");
    let status = Command::new("sh")
        .arg(script)
        .arg(&tar)
        .status()
        .expect("sh runs");
    assert!(
        status.success(),
        "busybox-rootfs.sh needs Debian's busybox-static"
    );
    let snapshot = directory.join("snapshot");
    std::fs::create_dir_all(&snapshot).unwrap();
    let file = std::fs::File::open(&tar).unwrap();
    apply_layer(file, &snapshot, &ApplyOptions::new(WhiteoutMode::Overlay)).unwrap();
    snapshot
}

fn run_once(lower: &Path, scratch: &Path, args: &[&str]) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let step = scratch.join(format!("step-{}", COUNTER.fetch_add(1, Ordering::Relaxed)));
    let (upper, work) = (step.join("upper"), step.join("work"));
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let process = Process {
        args: args.iter().map(|arg| arg.to_string()).collect(),
        env: vec![format!("PATH={DEFAULT_PATH}")],
        cwd: "/".to_string(),
        user: String::new(),
    };
    let spec = RunSpec::new(
        RootFs::Overlay {
            lower: vec![lower.to_path_buf()],
            upper,
            work,
        },
        process,
    );
    let mut options = RunOptions::with_current_exe().unwrap();
    options.stdout = Output::Null;
    options.stderr = Output::Null;
    let result = sandbox::run(&spec, options).unwrap();
    assert!(result.success());
    step
}

fn sandbox_overhead(criterion: &mut Criterion) {
    let directory = tempfile::tempdir().unwrap();
    let lower = busybox_snapshot(directory.path());
    let scratch = directory.path().join("steps");
    let store = ContentStore::open(&directory.path().join("store")).unwrap();
    let mut group = criterion.benchmark_group("sandbox");
    group.sample_size(50);
    group.bench_function("run /bin/true", |bencher| {
        bencher.iter(|| {
            let step = run_once(&lower, &scratch, &["/bin/true"]);
            std::fs::remove_dir_all(step).unwrap();
        })
    });
    group.bench_function("run touch + commit layer", |bencher| {
        bencher.iter(|| {
            let step = run_once(&lower, &scratch, &["/bin/touch", "/stamp"]);
            let options = LayerOptions {
                source: LayerSource::OverlayUpper,
                ..LayerOptions::default()
            };
            create_layer(&step.join("upper"), &options, &store).unwrap();
            std::fs::remove_dir_all(step).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, sandbox_overhead);

fn main() {
    // The sandbox helper is this binary re-executed.
    rbuild_executor::init::run_if_requested();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
