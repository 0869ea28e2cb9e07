//! Progress bars on standard error for the long commands (sweeps, batched generation, benchmarks, model
//! import). indicatif draws them with rate and ETA, and hides them when standard error is not a terminal (or
//! `TERM` is unset or `dumb`), so logs, pipes and CI output stay free of escape codes.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// One bar (or spinner) on standard error.
pub struct Progress(ProgressBar);

impl Progress {
    /// A bar of `total` steps labelled `label`; `total` may be 0 until [`Progress::update`] knows it.
    pub fn new(label: &str, total: usize) -> Self {
        let bar = ProgressBar::new(total as u64);
        // The templates are constants; a parse failure would only lose the styling, never the run.
        let style =
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec:2}, {elapsed} elapsed, ETA {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>-");
        bar.set_style(style);
        bar.set_message(label.to_string());
        Progress(bar)
    }

    /// A spinner labelled `label` for a step whose length is unknown.
    pub fn spinner(label: &str) -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress(bar)
    }

    /// One more step done.
    pub fn tick(&mut self) {
        self.0.inc(1);
    }

    /// `done` of `total` steps done, for callbacks that report both.
    pub fn update(&mut self, done: usize, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
    }

    /// Stops the bar and leaves its last state on the terminal.
    pub fn finish(&self) {
        self.0.finish();
    }
}
