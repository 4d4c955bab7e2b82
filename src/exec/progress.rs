//! Progress reporting and cooperative cancellation handed to steps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A step's progress: an indicatif bar on a terminal; otherwise (CI, Slurm,
/// `nohup`) a plain `Progress` line on stderr at most every
/// [`plain_interval`], so a log shows that a long step is alive and how far.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: indicatif::ProgressBar,
    plain: Option<Arc<PlainLine>>,
}

/// The throttled text form of a progress bar.
#[derive(Debug)]
struct PlainLine {
    step: String,
    interval: Duration,
    started: Instant,
    last: Mutex<Option<Instant>>,
}

/// Seconds between plain progress lines: `TSDISTILL_PROGRESS_SECS`, default 30.
pub fn plain_interval() -> Duration {
    let secs = std::env::var("TSDISTILL_PROGRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

impl Progress {
    /// A progress handle that prints nothing (tests, library use).
    pub fn hidden() -> Self {
        Progress {
            bar: indicatif::ProgressBar::hidden(),
            plain: None,
        }
    }
    /// Wraps an indicatif bar.
    pub fn from_bar(bar: indicatif::ProgressBar) -> Self {
        Progress { bar, plain: None }
    }
    /// Prints throttled `Progress` lines for `step` instead of drawing a bar.
    pub fn plain(step: &str, interval: Duration) -> Self {
        Progress {
            bar: indicatif::ProgressBar::hidden(),
            plain: Some(Arc::new(PlainLine {
                step: step.to_string(),
                interval,
                started: Instant::now(),
                last: Mutex::new(None),
            })),
        }
    }
    /// Sets the total amount of work (items, iterations).
    pub fn set_total(&self, n: u64) {
        self.bar.set_length(n)
    }
    /// Advances by `n`.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        self.maybe_print();
    }
    /// Sets the position.
    pub fn set_position(&self, n: u64) {
        self.bar.set_position(n);
        self.maybe_print();
    }
    /// Shows a short message (e.g. `loss 0.412`).
    pub fn set_message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
        self.maybe_print();
    }

    fn maybe_print(&self) {
        let Some(p) = &self.plain else { return };
        let now = Instant::now();
        let mut last = p.last.lock().unwrap_or_else(|e| e.into_inner());
        let due = match *last {
            None => now.duration_since(p.started) >= p.interval,
            Some(t) => now.duration_since(t) >= p.interval,
        };
        if !due {
            return;
        }
        *last = Some(now);
        let total = self.bar.length().unwrap_or(0);
        let msg = self.bar.message();
        let elapsed = humantime::format_duration(Duration::from_secs(
            now.duration_since(p.started).as_secs(),
        ));
        let pos = self.bar.position();
        let sep = if msg.is_empty() { "" } else { ", " };
        let eta = if pos > 0 && total > pos {
            let secs =
                now.duration_since(p.started).as_secs_f64() / pos as f64 * (total - pos) as f64;
            format!(
                ", {} left",
                humantime::format_duration(Duration::from_secs(secs.round() as u64))
            )
        } else {
            String::new()
        };
        eprintln!(
            "{:>12} {} {pos}/{total}{sep}{msg} ({elapsed} elapsed{eta})",
            "Progress", p.step,
        );
    }
}
impl Progress {
    /// Clears the bar when its step is done.
    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear()
    }
}
