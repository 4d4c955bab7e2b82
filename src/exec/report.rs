//! Cargo-style status lines and indicatif bars for running steps.
//!
//! On a terminal, bars show each running step (items or iterations, ETA)
//! and lines are printed above them; otherwise (CI, pipes) only the lines
//! are printed, with a throttled `Progress` line per running step, so logs
//! stay readable and still show that a long step is alive.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Progress;

/// Prints status lines and owns the progress bars.
#[derive(Clone)]
pub struct Reporter {
    multi: MultiProgress,
    tty: bool,
    quiet: bool,
}

impl Reporter {
    /// A reporter on stderr.
    pub fn new(quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal() && !quiet;
        let multi = if tty {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        };
        Reporter { multi, tty, quiet }
    }

    /// Prints `   {verb} {rest}` with the verb right-aligned like cargo.
    pub fn line(&self, verb: &str, rest: &str) {
        if self.quiet {
            return;
        }
        let text = format!("{verb:>12} {rest}");
        if self.tty {
            let _ = self.multi.println(text);
        } else {
            eprintln!("{text}");
        }
    }

    /// A bar for a running step.
    pub fn bar(&self, step: &str) -> Progress {
        if self.quiet {
            return Progress::hidden();
        }
        if !self.tty {
            return Progress::plain(step, super::progress::plain_interval());
        }
        let bar = self.multi.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12.cyan.bold} [{bar:25}] {pos}/{len} {msg} {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(step.to_string());
        Progress::from_bar(bar)
    }

    /// Removes a finished step's bar.
    pub fn finish(&self, p: &Progress) {
        p.finish_and_clear();
    }
}
