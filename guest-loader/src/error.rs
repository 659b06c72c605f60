//! The one error type of the crate.

use alloc::string::String;
use core::fmt;

/// What went wrong, broadly; the message says exactly what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The image is not of a kind this crate can load.
    UnknownImage,
    /// The file ends before data its own headers describe.
    Truncated,
    /// A header field is invalid or inconsistent.
    Malformed,
    /// The image is valid but needs something this loader does not do.
    Unsupported,
    /// The image does not fit the guest memory map (or a requested range is
    /// not guest RAM / is reserved for the hypervisor).
    NoRoom,
    /// The caller's input (command line, memory map, ...) is unusable.
    BadInput,
}

/// A load failure with a message for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    /// Broad category, for callers that want to react programmatically.
    pub kind: ErrorKind,
    /// Complete human-readable description, e.g. `bzImage truncated: header
    /// says 14123008 bytes of kernel, file has 12000000`.
    pub msg: String,
}

impl LoadError {
    pub(crate) fn new(kind: ErrorKind, msg: String) -> Self {
        LoadError { kind, msg }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl core::error::Error for LoadError {}

/// `err!(Kind, "fmt", args..)` builds an `Err(LoadError)`.
macro_rules! err {
    ($kind:ident, $($arg:tt)*) => {
        Err($crate::error::LoadError::new(
            $crate::error::ErrorKind::$kind,
            alloc::format!($($arg)*),
        ))
    };
}
pub(crate) use err;
