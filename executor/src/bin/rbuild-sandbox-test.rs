//! A small driver of the sandbox, for its tests and for measuring it by hand. It is also the
//! sandbox helper of the executor's integration tests (`init::run_if_requested`).
//!
//! ```text
//! rbuild-sandbox-test run ROOTFS CMD...   run CMD on an overlay over ROOTFS, print the result
//! rbuild-sandbox-test bench ROOTFS N [--no-seccomp] [--host-network]
//!                                         run /bin/true N times, print milliseconds per run
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use rbuild_executor::init;
use rbuild_executor::sandbox::{self, Output, RunOptions};
use rbuild_executor::spec::{DEFAULT_PATH, Network, Process, RootFs, RunSpec};

/// A fresh upper and work directory next to each other, removed on drop.
struct Snapshot {
    directory: PathBuf,
}

impl Snapshot {
    fn new(index: usize) -> std::io::Result<Self> {
        let directory = std::env::temp_dir().join(format!(
            "rbuild-sandbox-test-{}-{index}",
            std::process::id()
        ));
        std::fs::create_dir_all(directory.join("upper"))?;
        std::fs::create_dir_all(directory.join("work"))?;
        Ok(Self { directory })
    }

    fn rootfs(&self, lower: &Path) -> RootFs {
        RootFs::Overlay {
            lower: vec![lower.to_path_buf()],
            upper: self.directory.join("upper"),
            work: self.directory.join("work"),
        }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn spec(rootfs: RootFs, args: Vec<String>) -> RunSpec {
    RunSpec::new(
        rootfs,
        Process {
            args,
            env: vec![format!("PATH={DEFAULT_PATH}")],
            cwd: "/".to_string(),
            user: String::new(),
        },
    )
}

fn main() -> ExitCode {
    init::run_if_requested();

    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") if args.len() >= 3 => {
            let lower = PathBuf::from(&args[1]);
            let snapshot = match Snapshot::new(0) {
                Ok(snapshot) => snapshot,
                Err(error) => {
                    eprintln!("cannot make the upper directory: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let spec = spec(snapshot.rootfs(&lower), args[2..].to_vec());
            let options = match RunOptions::with_current_exe() {
                Ok(options) => options,
                Err(error) => {
                    eprintln!("{error}");
                    return ExitCode::FAILURE;
                }
            };
            match sandbox::run(&spec, options) {
                Ok(result) => {
                    eprintln!("{result:?}");
                    ExitCode::from(result.exit_code.clamp(0, 255) as u8)
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::from(error.exit_code().unwrap_or(125).clamp(0, 255) as u8)
                }
            }
        }
        Some("bench")
            if args.len() >= 3
                && args[3..]
                    .iter()
                    .all(|flag| flag == "--no-seccomp" || flag == "--host-network") =>
        {
            let seccomp = !args[3..].iter().any(|flag| flag == "--no-seccomp");
            let host_network = args[3..].iter().any(|flag| flag == "--host-network");
            let lower = PathBuf::from(&args[1]);
            let Ok(count) = args[2].parse::<usize>() else {
                eprintln!("bench: N must be a number");
                return ExitCode::FAILURE;
            };
            let mut total = std::time::Duration::ZERO;
            for index in 0..count {
                let snapshot = match Snapshot::new(index) {
                    Ok(snapshot) => snapshot,
                    Err(error) => {
                        eprintln!("cannot make the upper directory: {error}");
                        return ExitCode::FAILURE;
                    }
                };
                let mut spec = spec(snapshot.rootfs(&lower), vec!["/bin/true".to_string()]);
                spec.seccomp = seccomp;
                if host_network {
                    spec.network = Network::Host;
                }
                let mut options = match RunOptions::with_current_exe() {
                    Ok(options) => options,
                    Err(error) => {
                        eprintln!("{error}");
                        return ExitCode::FAILURE;
                    }
                };
                options.stdout = Output::Null;
                let start = Instant::now();
                let result = sandbox::run(&spec, options);
                total += start.elapsed();
                match result {
                    Ok(result) if result.success() => {}
                    other => {
                        eprintln!("run {index} failed: {other:?}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            println!(
                "{count} runs of /bin/true{}{}: {:.2} ms/run",
                if seccomp { "" } else { " without seccomp" },
                if host_network {
                    " with the host network"
                } else {
                    ""
                },
                total.as_secs_f64() * 1000.0 / count as f64
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: rbuild-sandbox-test run ROOTFS CMD... | bench ROOTFS N [--no-seccomp]"
            );
            ExitCode::from(2)
        }
    }
}
