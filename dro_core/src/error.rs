//! The one error type of the crate. Every failure of [`crate::solve`] and of the
//! [`crate::Loss`] constructors is a value of it; nothing in the crate panics on
//! user input.

/// An error that names the argument at fault and, where there is one, the
/// first offending index.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DroError {
    /// A bad argument: `arg` is its name in the public API (`xi`, `eps`,
    /// `groups`, `support`, `loss`, `k`, `x`, `y`, `slopes`, `intercepts`,
    /// `lo`, `hi`, `threads`).
    #[error("{arg}: {msg}")]
    InvalidArgument {
        /// The name of the argument, as the Python API spells it.
        arg: &'static str,
        /// What is wrong and, where it applies, at which index.
        msg: String,
    },
    /// The rayon thread pool for a `threads = Some(n)` call could not be built.
    #[error("threads: could not build a thread pool: {0}")]
    ThreadPool(String),
}

impl DroError {
    pub(crate) fn arg(arg: &'static str, msg: impl Into<String>) -> Self {
        DroError::InvalidArgument { arg, msg: msg.into() }
    }

    /// The argument this error is about (`"threads"` for a thread-pool failure).
    pub fn argument(&self) -> &'static str {
        match self {
            DroError::InvalidArgument { arg, .. } => arg,
            DroError::ThreadPool(_) => "threads",
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, DroError>;

/// The index of the first element that is not finite, if any.
pub(crate) fn first_non_finite(v: &[f64]) -> Option<usize> {
    v.iter().position(|x| !x.is_finite())
}

pub(crate) fn check_finite(arg: &'static str, v: &[f64]) -> Result<()> {
    match first_non_finite(v) {
        Some(i) => Err(DroError::arg(arg, format!("must be finite, but element {i} is {}", v[i]))),
        None => Ok(()),
    }
}
