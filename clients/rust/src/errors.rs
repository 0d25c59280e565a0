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
    /// REVISION_COMPACTED of a resume into another incarnation: the
    /// revision, the incarnation it named, and the sidecar's.
    pub const REQUESTED_REVISION: &str = "requestedRevision";
    /// See [`REQUESTED_REVISION`].
    pub const REQUESTED_INCARNATION: &str = "requestedIncarnation";
    /// See [`REQUESTED_REVISION`].
    pub const INCARNATION: &str = "incarnation";
    /// INVALID_ARGUMENT: the first field named in `BadRequest`.
    pub const FIELD: &str = "field";
    /// ETAG_MISMATCH made by [`Client::retarget_server`](crate::Client::retarget_server)
    /// giving up: how often it tried.
    pub const ATTEMPTS: &str = "attempts";
}

/// A status with its details decoded; absent details are `None`.
///
/// Every [`Error`] that came from a call (or that the client made in place
/// of one) carries one; [`Error::details`] returns it.
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
    /// Whether tonic made the status from a transport error (a dropped or
    /// refused connection) rather than the sidecar sending it.
    pub transport: bool,
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
            // A status the server sent never has a source; one tonic built
            // from an I/O or HTTP/2 error always does.
            transport: std::error::Error::source(status).is_some(),
        }
    }

    /// A client-made error in the sidecar's terms: `code` with an
    /// `ErrorInfo` of [`DOMAIN`], `reason` and `metadata`, so callers
    /// handle it like the same error from the sidecar.
    pub fn new(code: Code, reason: &str, message: impl Into<String>) -> ErrorDetails {
        ErrorDetails {
            code,
            message: message.into(),
            error_info: Some(ErrorInfo {
                reason: reason.to_owned(),
                domain: DOMAIN.to_owned(),
                metadata: Default::default(),
            }),
            bad_request: None,
            precondition_failure: None,
            transport: false,
        }
    }

    /// Adds an `ErrorInfo` metadata entry.
    pub fn with_metadata(mut self, key: &str, value: impl Into<String>) -> ErrorDetails {
        if let Some(info) = self.error_info.as_mut() {
            info.metadata.insert(key.to_owned(), value.into());
        }
        self
    }

    /// Adds a `BadRequest` field violation.
    pub fn with_field_violation(mut self, field: &str, description: &str) -> ErrorDetails {
        self.bad_request
            .get_or_insert_with(|| BadRequest::new(Vec::new()))
            .add_violation(field, description);
        self
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

    /// `PreconditionFailure` violations as (type, subject, description).
    pub fn precondition_violations(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.precondition_failure
            .iter()
            .flat_map(|p| p.violations.iter())
            .map(|v| {
                (
                    v.r#type.as_str(),
                    v.subject.as_str(),
                    v.description.as_str(),
                )
            })
    }

    /// Whether this is a connmeta error with this `ErrorInfo` reason.
    pub fn has_reason(&self, reason: &str) -> bool {
        self.error_info
            .as_ref()
            .is_some_and(|i| i.reason == reason && i.domain == DOMAIN)
    }

    /// The status again, details encoded (for a caller that speaks tonic).
    pub fn to_status(&self) -> Status {
        let mut details = tonic_types::ErrorDetails::new();
        if let Some(info) = &self.error_info {
            details.set_error_info(&info.reason, &info.domain, info.metadata.clone());
        }
        if let Some(b) = &self.bad_request {
            details.set_bad_request(b.field_violations.clone());
        }
        if let Some(p) = &self.precondition_failure {
            details.set_precondition_failure(p.violations.clone());
        }
        Status::with_error_details(self.code, self.message.clone(), details)
    }
}

impl std::fmt::Display for ErrorDetails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.code)?;
        if let Some(reason) = self.reason() {
            write!(f, " ({reason})")?;
        }
        write!(f, ": {}", self.message)?;
        for (field, description) in self.field_violations() {
            write!(f, "; {field}: {description}")?;
        }
        for (_, subject, description) in self.precondition_violations() {
            write!(f, "; {subject}: {description}")?;
        }
        Ok(())
    }
}

/// What went wrong, sorted by what a caller does about it. The variants
/// follow the `ErrorInfo` reason (see [`reason`]) and, for a status
/// without one, the status code; each carries the decoded [`ErrorDetails`].
///
/// Errors the client makes itself take the same shape: an update that
/// changes nothing is [`Error::InvalidArgument`] with a field violation, a
/// read-modify-write that lost every race is [`Error::EtagMismatch`] with
/// `ErrorInfo` `ETAG_MISMATCH`, never a bare status.
///
/// ```
/// # async fn demo(client: &connmeta::Client) -> Result<(), connmeta::Error> {
/// match client.get("4c9e1a52-8d0f-4f49-a1b4-5c0f4b8f9f00").await {
///     Ok(record) => println!("{record:?}"),
///     Err(connmeta::Error::NotFound(_)) => println!("no such connection"),
///     Err(connmeta::Error::InvalidArgument(d)) => {
///         for (field, why) in d.field_violations() {
///             println!("{field}: {why}");
///         }
///     }
///     Err(e) => return Err(e),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// NOT_FOUND (`CONNECTION_NOT_FOUND`): no connection has that id.
    #[error("{0}")]
    NotFound(Box<ErrorDetails>),
    /// FAILED_PRECONDITION (`CONNECTION_OPEN`): the server is open, its
    /// target cannot change now; `PreconditionFailure` says which.
    #[error("{0}")]
    ConnectionOpen(Box<ErrorDetails>),
    /// ABORTED (`ETAG_MISMATCH`): the record changed since its etag was
    /// read; read again and retry.
    #[error("{0}")]
    EtagMismatch(Box<ErrorDetails>),
    /// OUT_OF_RANGE (`REVISION_COMPACTED`): the revision is no longer in the
    /// history, or belongs to another incarnation; list again.
    #[error("{0}")]
    Compacted(Box<ErrorDetails>),
    /// RESOURCE_EXHAUSTED (`WATCHER_TOO_SLOW`): the watch fell too far
    /// behind; resume after metadata [`meta::LAST_REVISION`].
    #[error("{0}")]
    WatcherTooSlow(Box<ErrorDetails>),
    /// INVALID_ARGUMENT: `BadRequest` names the fields
    /// ([`ErrorDetails::field_violations`]).
    #[error("{0}")]
    InvalidArgument(Box<ErrorDetails>),
    /// PERMISSION_DENIED: the caller's identity may not call the method
    /// (metadata [`meta::METHOD`]).
    #[error("{0}")]
    PermissionDenied(Box<ErrorDetails>),
    /// UNAUTHENTICATED: the policy needs an identity and the call had none.
    #[error("{0}")]
    Unauthenticated(Box<ErrorDetails>),
    /// The sidecar could not be reached or is shutting down (UNAVAILABLE,
    /// `SHUTTING_DOWN`, or a transport error tonic reported under another
    /// code): retry with backoff.
    #[error("{0}")]
    Unavailable(Box<ErrorDetails>),
    /// Any other status (ALREADY_EXISTS, INTERNAL, DEADLINE_EXCEEDED, ...).
    #[error("{0}")]
    Other(Box<ErrorDetails>),
    /// Dialing failed before any call: a bad target or TLS file.
    #[error(transparent)]
    Connect(#[from] crate::ConnectError),
}

impl Error {
    /// Sorts details into their variant: by `ErrorInfo` reason first, then
    /// by code.
    pub fn from_details(d: ErrorDetails) -> Error {
        type Make = fn(Box<ErrorDetails>) -> Error;
        let reason = d
            .error_info
            .as_ref()
            .filter(|i| i.domain == DOMAIN)
            .map(|i| i.reason.as_str());
        let by_reason: Option<Make> = match reason {
            Some(reason::CONNECTION_NOT_FOUND) => Some(Error::NotFound),
            Some(reason::CONNECTION_OPEN) => Some(Error::ConnectionOpen),
            Some(reason::ETAG_MISMATCH) => Some(Error::EtagMismatch),
            Some(reason::REVISION_COMPACTED) => Some(Error::Compacted),
            Some(reason::WATCHER_TOO_SLOW) => Some(Error::WatcherTooSlow),
            Some(reason::INVALID_ARGUMENT) => Some(Error::InvalidArgument),
            Some(reason::PERMISSION_DENIED) => Some(Error::PermissionDenied),
            Some(reason::UNAUTHENTICATED) => Some(Error::Unauthenticated),
            Some(reason::SHUTTING_DOWN) => Some(Error::Unavailable),
            _ => None,
        };
        let by_code: Make = match d.code {
            _ if d.transport => Error::Unavailable,
            Code::NotFound => Error::NotFound,
            Code::InvalidArgument => Error::InvalidArgument,
            Code::PermissionDenied => Error::PermissionDenied,
            Code::Unauthenticated => Error::Unauthenticated,
            Code::Unavailable => Error::Unavailable,
            _ => Error::Other,
        };
        by_reason.unwrap_or(by_code)(Box::new(d))
    }

    /// The decoded status; `None` for [`Error::Connect`].
    pub fn details(&self) -> Option<&ErrorDetails> {
        match self {
            Error::NotFound(d)
            | Error::ConnectionOpen(d)
            | Error::EtagMismatch(d)
            | Error::Compacted(d)
            | Error::WatcherTooSlow(d)
            | Error::InvalidArgument(d)
            | Error::PermissionDenied(d)
            | Error::Unauthenticated(d)
            | Error::Unavailable(d)
            | Error::Other(d) => Some(d),
            Error::Connect(_) => None,
        }
    }

    /// The status code (UNAVAILABLE for [`Error::Connect`]).
    pub fn code(&self) -> Code {
        self.details().map_or(Code::Unavailable, |d| d.code)
    }

    /// The `ErrorInfo` reason, if any.
    pub fn reason(&self) -> Option<&str> {
        self.details()?.reason()
    }

    /// Whether this is a connmeta error with this `ErrorInfo` reason.
    pub fn is_reason(&self, reason: &str) -> bool {
        self.details().is_some_and(|d| d.has_reason(reason))
    }

    /// Whether retrying the same call later may succeed without changing
    /// anything: [`Error::Unavailable`] and [`Error::Connect`] of a
    /// transport failure.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable(_) => true,
            Error::Connect(e) => matches!(e, crate::ConnectError::Transport(..)),
            _ => false,
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        Error::from_details(ErrorDetails::from_status(&status))
    }
}

impl From<Error> for Status {
    /// The status with its details, for code that speaks tonic.
    fn from(e: Error) -> Status {
        match e.details() {
            Some(d) => d.to_status(),
            None => Status::unavailable(e.to_string()),
        }
    }
}

/// Whether `status` is a connmeta error with this `ErrorInfo` reason (one
/// of the [`reason`] constants).
pub fn is_reason(status: &Status, reason: &str) -> bool {
    ErrorDetails::from_status(status).has_reason(reason)
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
    fn sorts_statuses_into_variants_and_back() {
        let open = Details::with_error_info(reason::CONNECTION_OPEN, DOMAIN, HashMap::new());
        let status = Status::with_error_details(Code::FailedPrecondition, "open", open);
        let e = Error::from(status);
        assert!(matches!(e, Error::ConnectionOpen(_)), "{e:?}");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.is_reason(reason::CONNECTION_OPEN));
        let back = Status::from(e);
        assert_eq!(back.code(), Code::FailedPrecondition);
        assert!(is_reason(&back, reason::CONNECTION_OPEN));

        // Another domain's reason does not count; the code decides.
        let foreign =
            Details::with_error_info(reason::CONNECTION_NOT_FOUND, "x.example", HashMap::new());
        let e = Error::from(Status::with_error_details(Code::Aborted, "x", foreign));
        assert!(matches!(e, Error::Other(_)), "{e:?}");
        assert!(matches!(
            Error::from(Status::not_found("gone")),
            Error::NotFound(_)
        ));

        // A status tonic made from a transport error is Unavailable,
        // whatever its code.
        let io = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed");
        let e = Error::from(Status::from_error(Box::new(io)));
        assert!(
            matches!(e, Error::Unavailable(_)) && e.is_transient(),
            "{e:?}"
        );
        assert!(!Error::from(Status::not_found("x")).is_transient());
    }

    #[test]
    fn client_made_errors_have_the_sidecars_shape() {
        let d = ErrorDetails::new(Code::InvalidArgument, reason::INVALID_ARGUMENT, "no field")
            .with_metadata(meta::FIELD, "update_mask")
            .with_field_violation("update_mask", "names no field");
        let status = d.to_status();
        let again = ErrorDetails::from_status(&status);
        assert!(again.has_reason(reason::INVALID_ARGUMENT));
        assert_eq!(again.metadata(meta::FIELD), Some("update_mask"));
        assert_eq!(
            again.field_violations().collect::<Vec<_>>(),
            [("update_mask", "names no field")]
        );
        assert!(matches!(Error::from(status), Error::InvalidArgument(_)));
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
