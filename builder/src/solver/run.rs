//! RUN steps: the sandbox over the stage's snapshots, output streamed to progress.

use super::mounts::MountInputs;
use super::*;

impl Solver {
    pub(super) fn run(
        &self,
        step: &Step,
        run: &RunOp,
        inputs: &MountInputs,
        layers: &[LayerRecord],
        id: usize,
    ) -> Result<Option<LayerRecord>, SolveError> {
        let lower = self.snapshot_directories(layers)?;
        let scratch = self.scratch_directory("run")?;
        let result = self.run_in(step, run, inputs, lower, &scratch, id);
        let _ = fs::remove_dir_all(&scratch);
        result
    }

    fn run_in(
        &self,
        step: &Step,
        run: &RunOp,
        inputs: &MountInputs,
        lower: Vec<PathBuf>,
        scratch: &Path,
        id: usize,
    ) -> Result<Option<LayerRecord>, SolveError> {
        let (upper, work) = (scratch.join("upper"), scratch.join("work"));
        for directory in [&upper, &work] {
            fs::create_dir_all(directory).map_err(io_error("create", directory))?;
        }
        let mut env: Vec<String> = run
            .env
            .iter()
            .chain(&run.proxy_env)
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        if !run.env.iter().any(|(key, _)| key == "PATH") {
            env.insert(0, format!("PATH={DEFAULT_PATH}"));
        }
        let process = Process {
            args: run.arguments.clone(),
            env,
            cwd: run.working_dir.clone(),
            user: run.user.clone().unwrap_or_default(),
        };
        let mut spec = RunSpec::new(
            RootFs::Overlay {
                lower,
                upper: upper.clone(),
                work,
            },
            process,
        );
        spec.network = match run.network {
            NetworkMode::None => Network::None,
            NetworkMode::Host => Network::Host,
            NetworkMode::Default => self.options.default_network,
        };
        // Held (cache locks, secret files) until the process is gone.
        let mut mounted = self.prepare_mounts(step, run, inputs, scratch)?;
        spec.process.env.append(&mut mounted.env);
        spec.mounts.append(&mut mounted.mounts);
        for script in &run.script_files {
            let file = scratch.join(format!("script-{}", spec.mounts.len()));
            fs::write(&file, &script.content).map_err(io_error("write", &file))?;
            fs::set_permissions(&file, fs::Permissions::from_mode(0o755))
                .map_err(io_error("chmod", &file))?;
            spec.mounts.push(Mount::Bind {
                source: file,
                destination: script.path.clone(),
                readonly: true,
            });
        }
        let started = Instant::now();
        let tail: Arc<Mutex<Vec<String>>> = Arc::default();
        let output = |progress: Progress, tail: Arc<Mutex<Vec<String>>>| {
            let mut pending = Vec::new();
            Output::Callback(Box::new(move |chunk: &[u8]| {
                pending.extend_from_slice(chunk);
                while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    progress.line(
                        id,
                        &format!("{:.3} {text}", started.elapsed().as_secs_f64()),
                    );
                    let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                    tail.push(text);
                    if tail.len() > 10 {
                        tail.remove(0);
                    }
                }
            }))
        };
        let mut run_options = RunOptions::with_current_exe()
            .map_err(|error| self.step_error(step, crate::commands::image::chain_text(&error)))?;
        run_options.stdout = output(self.progress.clone(), tail.clone());
        run_options.stderr = output(self.progress.clone(), tail.clone());
        let canceller = sandbox::Canceller::new();
        run_options.canceller = Some(canceller.clone());
        self.running
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .push(canceller.clone());
        if self.failed.load(Ordering::SeqCst) {
            canceller.cancel();
        }
        let result = sandbox::run(&spec, run_options);
        drop(mounted);
        self.running
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .retain(|running| !running.same_as(&canceller));
        if self.failed.load(Ordering::SeqCst) {
            return Err(SolveError::Cancelled);
        }
        match result {
            Ok(result) if result.success() => self.layer_from(&upper, LayerSource::OverlayUpper),
            Ok(result) => {
                let tail = tail.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
                let mut problem = format!(
                    "process {:?} did not complete successfully: exit code: {}",
                    run.arguments.join(" "),
                    result.exit_code
                );
                if result.oom_killed {
                    problem.push_str(" (out of memory)");
                }
                if !tail.is_empty() && !self.options.progress.prints_output() {
                    problem.push_str(&format!("\n{tail}"));
                }
                Err(self.step_error(step, problem))
            }
            Err(error) => Err(self.step_error(step, crate::commands::image::chain_text(&error))),
        }
    }
}
