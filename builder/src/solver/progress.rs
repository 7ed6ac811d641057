//! Build progress on stderr: BuildKit-like plain lines, or a live view of the running steps.
//!
//! Plain: `#N [stage k/n] INSTRUCTION`, every output line as `#N 0.123 text` (never clipped),
//! then `#N CACHED` or `#N DONE 0.3s`. Tty: one line per step (indicatif), a spinner with the
//! step's elapsed time and last output line while it runs, `CACHED`/`DONE 0.3s`/`ERROR` when it
//! ends; steps of independent stages run side by side.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Nothing but errors.
    Quiet,
    /// One line per event; output in full.
    Plain,
    /// A live view, redrawn in place.
    Tty,
}

impl ProgressMode {
    /// Whether step output reaches the terminal in full (so errors need not repeat it).
    pub fn prints_output(self) -> bool {
        self == ProgressMode::Plain
    }
}

/// The progress of one build, shared by the tasks running its steps.
#[derive(Clone)]
pub(crate) struct Progress {
    mode: ProgressMode,
    shared: Arc<Shared>,
}

struct Shared {
    counter: Mutex<usize>,
    live: Option<MultiProgress>,
    /// Running steps of the live view: id → (bar, the step's title).
    bars: Mutex<HashMap<usize, (ProgressBar, String)>>,
}

const WIDTH: usize = 100;

fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut clipped: String = text.chars().take(width.saturating_sub(1)).collect();
        clipped.push('…');
        clipped
    }
}

impl Progress {
    pub(crate) fn new(mode: ProgressMode) -> Self {
        let live = (mode == ProgressMode::Tty)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)));
        Progress {
            mode,
            shared: Arc::new(Shared {
                counter: Mutex::new(0),
                live,
                bars: Mutex::default(),
            }),
        }
    }

    /// A step starts: returns its number.
    pub(crate) fn start(&self, label: &str, instruction: &str) -> usize {
        let id = {
            let mut counter = self
                .shared
                .counter
                .lock()
                .unwrap_or_else(|error| error.into_inner());
            *counter += 1;
            *counter
        };
        let first = instruction.lines().next().unwrap_or_default();
        match (self.mode, &self.shared.live) {
            (ProgressMode::Plain, _) => eprintln!("#{id} {label} {first}"),
            (ProgressMode::Tty, Some(live)) => {
                let title = clip(&format!("{label} {first}"), WIDTH);
                let bar = live.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner:.blue} #{prefix} {msg} {elapsed:.dim}")
                        .expect("the template is valid"),
                );
                bar.set_prefix(id.to_string());
                bar.set_message(title.clone());
                bar.enable_steady_tick(Duration::from_millis(100));
                self.shared
                    .bars
                    .lock()
                    .unwrap_or_else(|error| error.into_inner())
                    .insert(id, (bar, title));
            }
            _ => {}
        }
        id
    }

    /// A line of a step's output (or any other event text).
    pub(crate) fn line(&self, id: usize, text: &str) {
        match self.mode {
            ProgressMode::Plain => eprintln!("#{id} {text}"),
            ProgressMode::Tty => {
                let bars = self
                    .shared
                    .bars
                    .lock()
                    .unwrap_or_else(|error| error.into_inner());
                if let Some((bar, title)) = bars.get(&id) {
                    bar.set_message(format!("{title}\n    {}", clip(text.trim_end(), WIDTH)));
                }
            }
            ProgressMode::Quiet => {}
        }
    }

    /// The step's result came from the cache.
    pub(crate) fn cached(&self, id: usize) {
        self.finish(id, "CACHED".to_string(), "{prefix:.dim} {msg:.dim}");
    }

    /// The step ran and finished.
    pub(crate) fn done(&self, id: usize, seconds: f64) {
        self.finish(id, format!("DONE {seconds:.1}s"), "{prefix:.green} {msg}");
    }

    /// The step failed.
    pub(crate) fn error(&self, id: usize) {
        self.finish(id, "ERROR".to_string(), "{prefix:.red} {msg}");
    }

    fn finish(&self, id: usize, status: String, template: &str) {
        match self.mode {
            ProgressMode::Plain => eprintln!("#{id} {status}"),
            ProgressMode::Tty => {
                let entry = self
                    .shared
                    .bars
                    .lock()
                    .unwrap_or_else(|error| error.into_inner())
                    .remove(&id);
                if let Some((bar, title)) = entry {
                    bar.set_style(
                        ProgressStyle::with_template(template).expect("the templates are valid"),
                    );
                    bar.set_prefix(format!("#{id}"));
                    bar.finish_with_message(format!("{title} {status}"));
                }
            }
            ProgressMode::Quiet => {}
        }
    }

    /// Ends the live view (steps still drawn stay as they are), so later lines print below it.
    pub(crate) fn close(&self) {
        let bars: Vec<(ProgressBar, String)> = self
            .shared
            .bars
            .lock()
            .unwrap_or_else(|error| error.into_inner())
            .drain()
            .map(|(_, entry)| entry)
            .collect();
        for (bar, title) in bars {
            bar.abandon_with_message(format!("{title} CANCELED"));
        }
    }
}
