//! The gateway's error type, and the one place that decides what a caller
//! may learn from it (the mapping to `tonic::Status`).
//!
//! Refused authentications are not errors: they are decisions
//! ([`crate::verify::Deny`]) returned as `Denial` messages and audited.
//! Errors are for what prevents the gateway from deciding at all.

use tonic::{Code, Status};

/// Errors of the gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller presented no usable client certificate identity.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// The caller's role may not use this API or act for this terminal.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A request field is missing or malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The named object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The object exists already.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The request is well formed but the state does not allow it (a
    /// step-up at a locked terminal, a token presented twice).
    #[error("failed precondition: {0}")]
    Precondition(String),
    /// Too many outstanding challenges or watchers.
    #[error("resource exhausted: {0}")]
    Exhausted(&'static str),
    /// The database failed; nothing was acknowledged.
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    /// A sled transaction failed.
    #[error("storage transaction: {0}")]
    Transaction(String),
    /// Making a write durable failed; nothing was acknowledged.
    #[error("durability: {0}")]
    Durability(#[from] std::io::Error),
    /// A stored record does not decode (corruption or a newer schema).
    #[error("stored record: {0}")]
    Corrupt(String),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Certificate generation or parsing for the service PKI failed.
    #[error("PKI: {0}")]
    Pki(String),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// A backup file is not whole, was altered, or cannot be restored
    /// here.
    #[error("backup: {0}")]
    Backup(String),
    /// A card or reader at the issuance station failed.
    #[error("card: {0}")]
    Card(#[from] pivgate_hw::Error),
    /// The gateway refused a call this process made as a client.
    #[error("the gateway answered {}: {}", .0.code(), .0.message())]
    Refused(Box<Status>),
}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        Error::Refused(Box::new(s))
    }
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match &e {
            Error::Unauthenticated(_) => Status::new(Code::Unauthenticated, e.to_string()),
            Error::PermissionDenied(_) => Status::new(Code::PermissionDenied, e.to_string()),
            Error::InvalidRequest(_) => Status::new(Code::InvalidArgument, e.to_string()),
            Error::NotFound(_) => Status::new(Code::NotFound, e.to_string()),
            Error::AlreadyExists(_) => Status::new(Code::AlreadyExists, e.to_string()),
            Error::Precondition(_) => Status::new(Code::FailedPrecondition, e.to_string()),
            Error::Exhausted(_) => Status::new(Code::ResourceExhausted, e.to_string()),
            // Internal details stay in the gateway's log.
            other => {
                tracing::error!(error = %other, "request failed");
                Status::new(Code::Unavailable, "the gateway could not complete the request")
            }
        }
    }
}

impl From<sled::transaction::TransactionError<Error>> for Error {
    fn from(e: sled::transaction::TransactionError<Error>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => Error::Storage(e),
        }
    }
}
