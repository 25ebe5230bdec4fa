//! What the host offers a policy: logging, and reads within the scope under evaluation.
//!
//! In a component these call the gateway. Natively (under [`crate::testing`]) logs go to
//! standard error, and reads and counts answer from the fixture case being run.

use crate::model::{ReadError, StoredValue};

/// Severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected but handled.
    Warn,
    /// Something failed.
    Error,
}

/// Writes a line to the gateway's log, tagged with the scope and the policy digest.
pub fn log(level: LogLevel, message: &str) {
    imp::log(level, message)
}

/// Reads a key of the scope under evaluation; `Ok(None)` when it does not exist. The gateway
/// guards the write on what was read, so the write commits only if the key is unchanged.
pub fn read(key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
    imp::read(key)
}

/// Counts the keys of the scope under evaluation that start with `prefix`. Not guarded: see the
/// WIT documentation of `count`.
pub fn count(prefix: &[u8]) -> Result<u64, ReadError> {
    imp::count(prefix)
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::*;
    use crate::__private::wit::aq::governance::host as h;
    use crate::model::Bytes;

    pub fn log(level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => h::LogLevel::Trace,
            LogLevel::Debug => h::LogLevel::Debug,
            LogLevel::Info => h::LogLevel::Info,
            LogLevel::Warn => h::LogLevel::Warn,
            LogLevel::Error => h::LogLevel::Error,
        };
        h::log(level, message)
    }

    fn error(e: h::ReadError) -> ReadError {
        match e {
            h::ReadError::OutsideScope => ReadError::OutsideScope,
            h::ReadError::Unavailable => ReadError::Unavailable,
            h::ReadError::Failed(m) => ReadError::Failed(m),
        }
    }

    pub fn read(key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        h::read(key).map_err(error).map(|found| {
            found.map(|v| StoredValue { value: Bytes(v.value), mod_revision: v.mod_revision, lease: v.lease })
        })
    }

    pub fn count(prefix: &[u8]) -> Result<u64, ReadError> {
        h::count(prefix).map_err(error)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::*;
    use crate::testing::NATIVE_HOST;

    pub fn log(level: LogLevel, message: &str) {
        eprintln!("[policy {level:?}] {message}");
    }

    pub fn read(key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        NATIVE_HOST.with(|h| Ok(h.borrow().reads.get(key).cloned()))
    }

    pub fn count(prefix: &[u8]) -> Result<u64, ReadError> {
        NATIVE_HOST.with(|h| Ok(h.borrow().counts.get(prefix).copied().unwrap_or(0)))
    }
}
