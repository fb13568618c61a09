//! Progress bars for long work (indicatif), drawn on standard error and hidden when it is not a
//! terminal, so logs and CI output stay clean.

use culprit_models::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A [`Progress`] that draws a bar and keeps the log lines it is given.
pub struct Bar {
    bar: Option<ProgressBar>,
    quiet: bool,
    /// Log lines received so far.
    pub log: Vec<String>,
}

impl Bar {
    /// A bar; `quiet` hides it.
    pub fn new(quiet: bool) -> Self {
        Self { bar: None, quiet, log: Vec::new() }
    }
}

impl Progress for Bar {
    fn begin(&mut self, phase: &str, total: u64) {
        let bar = if self.quiet { ProgressBar::hidden() } else { ProgressBar::new(total) };
        if !self.quiet {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(phase.to_string());
        self.bar = Some(bar);
    }

    fn advance(&mut self, done: u64, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(message.to_string());
        }
    }

    fn log(&mut self, line: &str) {
        self.log.push(line.to_string());
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
