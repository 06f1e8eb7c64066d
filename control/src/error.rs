//! The control plane's errors, mapped to gRPC status codes in one place.

use tonic::Status;

/// Why an Admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad input; the message names the flag and the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such flag or flag set.
    #[error("{0}")]
    NotFound(String),
    /// It exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The expected revision does not match (a stale write).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller's credential does not cover this flag set.
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit would be exceeded (flags per set).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The store failed.
    #[error("storage: {0}")]
    Storage(String),
    /// The database cannot be reached; the write did not happen.
    #[error("{0}")]
    Unavailable(String),
    /// The data directory holds no store, and nobody asked for a new mesh.
    #[error(
        "{0} holds no flagmesh store: start with --init to create a new mesh (a new history that every hub and PoP will refuse until an operator adopts it), or point --data-dir at the existing store"
    )]
    NotInitialised(String),
}

impl From<sled::Error> for ControlError {
    fn from(e: sled::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

impl From<prost::DecodeError> for ControlError {
    fn from(e: prost::DecodeError) -> Self {
        Self::Storage(format!("corrupt record: {e}"))
    }
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::InvalidArgument(m) => Status::invalid_argument(m),
            ControlError::NotFound(m) => Status::not_found(m),
            ControlError::AlreadyExists(m) => Status::already_exists(m),
            ControlError::FailedPrecondition(m) => Status::failed_precondition(m),
            ControlError::PermissionDenied(m) => Status::permission_denied(m),
            ControlError::ResourceExhausted(m) => Status::resource_exhausted(m),
            e @ ControlError::NotInitialised(_) => Status::failed_precondition(e.to_string()),
            ControlError::Unavailable(m) => Status::unavailable(m),
            ControlError::Storage(m) => {
                tracing::error!(error = %m, "storage failure");
                Status::internal("the control plane's store failed; see its logs")
            }
        }
    }
}
