//! Progress reporting and cooperative cancellation handed to steps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set when the user pressed Ctrl-C; long loops poll it and stop.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Asks everything holding this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    /// Whether a stop was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A step's progress line (an indicatif bar when attached to a terminal).
#[derive(Debug, Clone)]
pub struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    /// A progress handle that prints nothing (tests, library use).
    pub fn hidden() -> Self {
        Progress {
            bar: indicatif::ProgressBar::hidden(),
        }
    }
    /// Wraps an indicatif bar.
    pub fn from_bar(bar: indicatif::ProgressBar) -> Self {
        Progress { bar }
    }
    /// Sets the total amount of work (items, iterations).
    pub fn set_total(&self, n: u64) {
        self.bar.set_length(n)
    }
    /// Advances by `n`.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n)
    }
    /// Sets the position.
    pub fn set_position(&self, n: u64) {
        self.bar.set_position(n)
    }
    /// Shows a short message (e.g. `loss 0.412`).
    pub fn set_message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into())
    }
}

impl Progress {
    /// Clears the bar when its step is done.
    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear()
    }
}
