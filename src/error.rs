//! One error type for the whole core. Every message says what went wrong, where (the file or the
//! argument), and, where there is one, what to do about it; the wasm edge turns it into a rejected
//! promise carrying the same text.

use std::fmt;

/// The error of every fallible operation in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file's content is wrong: `file` names it, `message` says what is wrong.
    #[error("{file}: {message}")]
    File { file: String, message: String },
    /// A file could not be read or written.
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// An argument or an option is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The tensor backend failed (device lost, out of memory, read-back failed).
    #[error("tensor backend: {0}")]
    Backend(String),
}

impl Error {
    /// An error about the content of `file`.
    pub fn file(file: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::File { file: file.into(), message: message.to_string() }
    }

    /// An error about an argument or option.
    pub fn invalid(message: impl fmt::Display) -> Self {
        Error::Invalid(message.to_string())
    }

    /// A failed read or write of `file`.
    pub fn io(file: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io { file: file.to_string(), source }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
