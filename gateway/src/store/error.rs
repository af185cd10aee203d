//! The store's error type.

use std::path::PathBuf;

use fwnp_proto::LeaseId;

/// Everything that can go wrong in the store. Every variant names what failed, so the daemon
/// can log it precisely and an operator can act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite refused an operation; `op` says which one.
    #[error("store: {op}: {source}")]
    Sqlite {
        /// What the store was doing, e.g. "insert lease" or "query audit".
        op: &'static str,
        /// SQLite's own error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer gateway whose schema this one does not know.
    #[error(
        "the store's schema version is {found} but this gateway supports at most {supported}: \
         run the newer fwnp-gateway that wrote it, or restore a backup"
    )]
    SchemaTooNew {
        /// The version recorded in the database.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// A row or a meta value cannot be decoded: the database was damaged or edited by hand.
    #[error("the store is corrupt: {what}")]
    Corrupt {
        /// What could not be decoded, and where.
        what: String,
    },
    /// The writer thread is gone (the store was closed, or the thread died).
    #[error("the store's writer has stopped")]
    WriterStopped,
    /// Fire-and-forget writes were refused because too many operations are queued.
    #[error("the store's write queue holds {pending} operations, more than its limit")]
    Overloaded {
        /// Operations waiting when the write was refused.
        pending: usize,
    },
    /// A file-system operation on the state directory failed.
    #[error("store: {op} {}: {source}", path.display())]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A lease with this id is already stored.
    #[error("lease {id} already exists in the store")]
    DuplicateLease {
        /// The lease.
        id: LeaseId,
    },
    /// A renewal or an end named a lease that is not stored or no longer live.
    #[error("lease {id} is not a live lease in the store")]
    LeaseNotLive {
        /// The lease.
        id: LeaseId,
    },
    /// A value handed to the store cannot be stored (a time beyond 2^63 milliseconds).
    #[error("the store cannot hold {what}")]
    InvalidInput {
        /// What was refused.
        what: String,
    },
}

impl StoreError {
    pub(crate) fn sqlite(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| match source {
            // A column of the wrong type, or a value out of range, is damage, not an SQL error.
            rusqlite::Error::InvalidColumnType(index, name, ty) => StoreError::Corrupt {
                what: format!("{op}: column {index} ({name}) holds a value of type {ty}"),
            },
            rusqlite::Error::IntegralValueOutOfRange(index, value) => StoreError::Corrupt {
                what: format!("{op}: column {index} holds {value}, out of range"),
            },
            rusqlite::Error::FromSqlConversionFailure(index, ty, err) => StoreError::Corrupt {
                what: format!("{op}: column {index} ({ty}): {err}"),
            },
            source => StoreError::Sqlite { op, source },
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> StoreError {
        StoreError::Corrupt { what: what.into() }
    }

    /// A copy of this error for each caller of a failed group commit (SQLite's errors are not
    /// `Clone`; the code and message are what matter).
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Sqlite { op, source } => StoreError::Sqlite {
                op,
                source: match source {
                    rusqlite::Error::SqliteFailure(code, message) => {
                        rusqlite::Error::SqliteFailure(*code, message.clone())
                    }
                    other => rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                        Some(other.to_string()),
                    ),
                },
            },
            StoreError::SchemaTooNew { found, supported } => StoreError::SchemaTooNew {
                found: *found,
                supported: *supported,
            },
            StoreError::Corrupt { what } => StoreError::Corrupt { what: what.clone() },
            StoreError::WriterStopped => StoreError::WriterStopped,
            StoreError::Overloaded { pending } => StoreError::Overloaded { pending: *pending },
            StoreError::Io { op, path, source } => StoreError::Io {
                op,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::DuplicateLease { id } => StoreError::DuplicateLease { id: *id },
            StoreError::LeaseNotLive { id } => StoreError::LeaseNotLive { id: *id },
            StoreError::InvalidInput { what } => StoreError::InvalidInput { what: what.clone() },
        }
    }
}
