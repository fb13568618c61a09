//! The error types of culprit's library. Every variant names the file (and row, where one applies)
//! and the problem, so the CLI can print it as one line and exit with code 2. Numerical failures
//! of the curvature methods are their own type, [`CurvatureError`], carried by [`Error::Curvature`].

use std::path::{Path, PathBuf};

/// What can go wrong in culprit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data file is missing, malformed or does not fit the run.
    #[error("{}: {message}", path.display())]
    Data {
        /// The offending file.
        path: PathBuf,
        /// What is wrong, with the row where it applies.
        message: String,
    },
    /// A run directory is missing, incomplete or corrupted.
    #[error("{}: {message}", path.display())]
    Run {
        /// The offending file or directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Another process is writing the file (it holds the file's lock).
    #[error("{}: {message}", path.display())]
    Busy {
        /// The file being written.
        path: PathBuf,
        /// Who holds it.
        message: String,
    },
    /// The model does not fit the data, or training failed.
    #[error(transparent)]
    Model(#[from] culprit_models::ModelError),
    /// A curvature method failed numerically.
    #[error(transparent)]
    Curvature(#[from] CurvatureError),
    /// The command line asks for something inconsistent.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// A data error at `path`, optionally at a 1-based `row` (or record) of it.
    pub fn data(path: &Path, row: Option<usize>, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::Data {
            path: path.to_path_buf(),
            message: match row {
                Some(r) => format!("row {r}: {message}"),
                None => message,
            },
        }
    }

    /// A run-directory error.
    pub fn run(path: &Path, message: impl Into<String>) -> Self {
        Self::Run { path: path.to_path_buf(), message: message.into() }
    }

    /// Wraps an I/O error with the file it concerns.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io { path: path.to_path_buf(), source }
    }
}

/// culprit's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Numerical failures of curvature methods.
#[derive(Debug, thiserror::Error)]
pub enum CurvatureError {
    /// An iterative solver stopped above its tolerance.
    #[error(
        "{method} did not converge: relative residual {residual:.3e} after {iterations} iterations (tolerance {tolerance:.1e})"
    )]
    NotConverged {
        /// The method.
        method: String,
        /// Iterations used.
        iterations: usize,
        /// Residual reached.
        residual: f64,
        /// Target.
        tolerance: f64,
    },
    /// The operator is not positive definite where the method needs it to be.
    #[error("{method}: the curvature is not positive definite: {detail}")]
    NotPositiveDefinite {
        /// The method.
        method: String,
        /// What was seen.
        detail: String,
    },
    /// The model is too large for a dense method.
    #[error(
        "{method} builds a dense {params}×{params} matrix; it is for models up to {limit} parameters (use cg, kfac or ekfac)"
    )]
    TooLarge {
        /// The method.
        method: String,
        /// Parameters.
        params: usize,
        /// Limit.
        limit: usize,
    },
    /// A value that is not a finite number where one is needed.
    #[error("{what} is not finite ({value})")]
    NotFinite {
        /// What was computed.
        what: String,
        /// The value.
        value: f64,
    },
    /// Inconsistent parameters.
    #[error("{0}")]
    Config(String),
}
