//! The error type of the training, inference and evaluation code.

use std::path::PathBuf;

/// Everything that can go wrong in [`crate::train`].
///
/// Messages are one line: what was expected, then what was found, naming the
/// file or parameter involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed (shape mismatch inside Candle, device error).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Two inputs that must agree in shape do not.
    #[error("{what}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Which input (e.g. `labels of dice_ce_loss`).
        what: String,
        /// The shape that was required.
        expected: Vec<usize>,
        /// The shape that was given.
        found: Vec<usize>,
    },
    /// A configuration value is out of range.
    #[error("`{param}`: {message}")]
    Param {
        /// The parameter name as written in YAML (e.g. `overlap`).
        param: String,
        /// What was wrong, with the value found.
        message: String,
    },
    /// The loss became NaN or infinite: the step stops rather than caching a broken model.
    #[error(
        "loss is {value} at iteration {iteration}: training diverged\n\nhint: lower `lr`, \
         enable `grad_clip`, or check the labels of the case in this batch ({case})"
    )]
    NonFiniteLoss {
        /// The iteration (0-based) whose loss was not finite.
        iteration: usize,
        /// The value (NaN or ±inf).
        value: f32,
        /// The case the batch was drawn from.
        case: String,
    },
    /// The patch sampler found no voxel to centre a patch on.
    #[error(
        "case `{case}`: no voxel to centre a patch on (no foreground and no image > {threshold})"
    )]
    NoSamplingLocation {
        /// The case id.
        case: String,
        /// The `image_threshold` in use.
        threshold: f32,
    },
    /// Reading or writing a file failed.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what was expected.
    #[error("`{path}`: {message}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// Expected vs found.
        message: String,
    },
    /// The user cancelled (Ctrl-C).
    #[error("cancelled")]
    Cancelled,
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, TrainError>;

/// Builds a [`TrainError::Param`].
pub(crate) fn param_err(param: &str, message: impl Into<String>) -> TrainError {
    TrainError::Param {
        param: param.to_string(),
        message: message.into(),
    }
}
