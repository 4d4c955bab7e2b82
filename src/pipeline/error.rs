//! Pipeline errors: every one names the file, line and column it is about.

use std::fmt;
use std::path::PathBuf;

/// A position in a pipeline file (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The pipeline file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// Something wrong with a pipeline: where, what, and what to do about it.
#[derive(Debug, Clone)]
pub struct PipelineError {
    /// Where in the file; `None` for command-line overrides and I/O.
    pub location: Option<Location>,
    /// One line: what was expected vs found.
    pub message: String,
    /// What the user can do, when there is something.
    pub hint: Option<String>,
}

impl PipelineError {
    /// An error at a location.
    pub fn at(location: Location, message: impl Into<String>) -> Self {
        PipelineError {
            location: Some(location),
            message: message.into(),
            hint: None,
        }
    }
    /// An error with no location (command line, I/O).
    pub fn bare(message: impl Into<String>) -> Self {
        PipelineError {
            location: None,
            message: message.into(),
            hint: None,
        }
    }
    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n\nhint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PipelineError {}

/// "did you mean `x`?" for a misspelt name, when one candidate is close.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!("did you mean `{c}`?"))
}
