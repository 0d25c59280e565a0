//! Decoding the google.rpc error details every connmeta error carries.

use tonic::{Code, Status};
use tonic_types::StatusExt;
pub use tonic_types::{
    BadRequest, ErrorInfo, FieldViolation, PreconditionFailure, PreconditionViolation,
};

/// The `ErrorInfo` domain of every error the sidecar raises.
pub const DOMAIN: &str = "connmeta.v1";

/// `ErrorInfo` reasons, with the status code each comes with.
pub mod reason {
    /// NOT_FOUND.
    pub const CONNECTION_NOT_FOUND: &str = "CONNECTION_NOT_FOUND";
    /// INVALID_ARGUMENT, with `BadRequest`.
    pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
    /// ABORTED.
    pub const ETAG_MISMATCH: &str = "ETAG_MISMATCH";
    /// FAILED_PRECONDITION, with `PreconditionFailure`.
    pub const CONNECTION_OPEN: &str = "CONNECTION_OPEN";
    /// OUT_OF_RANGE.
    pub const REVISION_COMPACTED: &str = "REVISION_COMPACTED";
    /// RESOURCE_EXHAUSTED.
    pub const WATCHER_TOO_SLOW: &str = "WATCHER_TOO_SLOW";
    /// UNAVAILABLE.
    pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";
    /// PERMISSION_DENIED: the caller's identity may not call the method
    /// (authorization policy, or a write over plaintext TCP).
    pub const PERMISSION_DENIED: &str = "PERMISSION_DENIED";
    /// UNAUTHENTICATED: the policy needs an identity and the call had none.
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
}

/// `ErrorInfo` metadata keys of the watch and authorization errors.
pub mod meta {
    /// REVISION_COMPACTED: the oldest revision still retained.
    pub const OLDEST_REVISION: &str = "oldestRevision";
    /// WATCHER_TOO_SLOW: the last revision sent; resume after it.
    pub const LAST_REVISION: &str = "lastRevision";
    /// PERMISSION_DENIED, UNAUTHENTICATED: the full method name.
    pub const METHOD: &str = "method";
}

/// A status with its details decoded; absent details are `None`.
#[derive(Clone, Debug)]
pub struct ErrorDetails {
    /// The gRPC status code.
    pub code: Code,
    /// The status message.
    pub message: String,
    /// Why it failed: reason, domain and metadata.
    pub error_info: Option<ErrorInfo>,
    /// Which request fields were wrong (INVALID_ARGUMENT).
    pub bad_request: Option<BadRequest>,
    /// Which precondition failed (FAILED_PRECONDITION).
    pub precondition_failure: Option<PreconditionFailure>,
}

impl ErrorDetails {
    /// Decodes `status`'s `grpc-status-details-bin`. Detail types this
    /// client does not know are skipped: a newer server may add some.
    pub fn from_status(status: &Status) -> ErrorDetails {
        let details = status.get_error_details();
        ErrorDetails {
            code: status.code(),
            message: status.message().to_owned(),
            error_info: details.error_info().cloned(),
            bad_request: details.bad_request().cloned(),
            precondition_failure: details.precondition_failure().cloned(),
        }
    }

    /// The `ErrorInfo` reason, if the error has one.
    pub fn reason(&self) -> Option<&str> {
        self.error_info.as_ref().map(|i| i.reason.as_str())
    }

    /// An `ErrorInfo` metadata value.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.error_info
            .as_ref()?
            .metadata
            .get(key)
            .map(String::as_str)
    }

    /// An `ErrorInfo` metadata value parsed as a revision.
    pub fn revision(&self, key: &str) -> Option<i64> {
        self.metadata(key)?.parse().ok()
    }

    /// `BadRequest` field violations as (field path, description).
    pub fn field_violations(&self) -> impl Iterator<Item = (&str, &str)> {
        self.bad_request
            .iter()
            .flat_map(|b| b.field_violations.iter())
            .map(|v| (v.field.as_str(), v.description.as_str()))
    }
}

/// Whether `status` is a connmeta error with this `ErrorInfo` reason (one
/// of the [`reason`] constants).
pub fn is_reason(status: &Status, reason: &str) -> bool {
    ErrorDetails::from_status(status)
        .error_info
        .is_some_and(|i| i.reason == reason && i.domain == DOMAIN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tonic_types::ErrorDetails as Details;

    #[test]
    fn decodes_error_info_and_bad_request() {
        let mut details = Details::with_error_info(
            reason::INVALID_ARGUMENT,
            DOMAIN,
            HashMap::from([("field".to_owned(), "address.port".to_owned())]),
        );
        details.add_bad_request_violation("address.port", "must be 1-65535, got 70000");
        let status = Status::with_error_details(Code::InvalidArgument, "bad port", details);

        let d = ErrorDetails::from_status(&status);
        assert_eq!(d.code, Code::InvalidArgument);
        assert_eq!(d.reason(), Some(reason::INVALID_ARGUMENT));
        assert_eq!(d.metadata("field"), Some("address.port"));
        assert_eq!(
            d.field_violations().collect::<Vec<_>>(),
            [("address.port", "must be 1-65535, got 70000")]
        );
        assert!(is_reason(&status, reason::INVALID_ARGUMENT));
        assert!(!is_reason(&status, reason::ETAG_MISMATCH));
    }

    #[test]
    fn decodes_revisions_and_tolerates_missing_details() {
        let details = Details::with_error_info(
            reason::WATCHER_TOO_SLOW,
            DOMAIN,
            HashMap::from([(meta::LAST_REVISION.to_owned(), "42".to_owned())]),
        );
        let status = Status::with_error_details(Code::ResourceExhausted, "too slow", details);
        assert_eq!(
            ErrorDetails::from_status(&status).revision(meta::LAST_REVISION),
            Some(42)
        );

        let plain = ErrorDetails::from_status(&Status::unavailable("connection reset"));
        assert_eq!(plain.reason(), None);
        assert!(plain.bad_request.is_none() && plain.precondition_failure.is_none());
    }
}
