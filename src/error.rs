//! One error type for the whole core. Every message says what went wrong, where (the file or the
//! argument), and, where there is one, what to do about it; the wasm edge turns it into a rejected
//! promise carrying the same text. Warnings (a rounding merge) go through `log` and are shown
//! by the edges ([`show_warnings`]).

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

/// Shows this crate's warnings (what PEFT gives with `warnings.warn`: a merge into a quantized
/// base rounds, ...) through `show`, once per process; other crates' log records stay quiet.
/// The edges call it: the CLI prints to stderr, the wasm engine to the console.
pub fn show_warnings(show: fn(&str)) {
    struct Warnings(fn(&str));
    impl log::Log for Warnings {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::Level::Warn && metadata.target().starts_with(env!("CARGO_CRATE_NAME"))
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                (self.0)(&format!("warning: {}", record.args()));
            }
        }
        fn flush(&self) {}
    }
    // leaked once: the logger lives as long as the process (log's `std` feature would rebuild
    // every crate that logs)
    if log::set_logger(Box::leak(Box::new(Warnings(show)))).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}
