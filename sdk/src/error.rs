//! [`Error`]: everything that can go wrong between an application and the host agent.

use std::path::PathBuf;
use std::time::Duration;

use fwnp_proto::local::{DenialCode, LocalCode, LocalDenied};
use fwnp_proto::{LeaseId, ResultCode};

use crate::opening::OpeningError;

/// What went wrong, precise enough to act on.
///
/// Refusals (a Denied answer from the agent or, through it, the gateway) come as the variants
/// an application most often acts on ([`Error::RateLimited`], [`Error::QuotaExceeded`],
/// [`Error::DeniedByPolicy`], [`Error::AddressMismatch`], [`Error::PortNotOwned`],
/// [`Error::AgentNotAuthorized`], [`Error::GatewayUnreachable`]) or as [`Error::Denied`] with
/// the code for the others. [`Error::code`], [`Error::reason`], [`Error::is_transient`] and
/// [`Error::retry_after`] work on all of them.
///
/// ```no_run
/// use std::time::Duration;
/// use fwnp_sdk::{Client, Error, Opening};
///
/// # async fn example() -> Result<(), Error> {
/// let client = Client::connect().await?;
/// let lease = loop {
///     match client.open(Opening::tcp(8080)).await {
///         Ok(lease) => break lease,
///         Err(e) if e.is_transient() => {
///             tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_secs(1))).await
///         }
///         Err(Error::DeniedByPolicy { reason }) => {
///             eprintln!("the operator's policy does not allow it: {}", reason.unwrap_or_default());
///             return Ok(());
///         }
///         Err(e) => return Err(e),
///     }
/// };
/// # drop(lease);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The opening was not sent: it breaks a rule of the protocol. Correct it.
    #[error("invalid opening: {0}")]
    InvalidOpening(#[from] OpeningError),

    /// The agent implements an older version of the local API than this library needs
    /// ([`crate::REQUIRED_API_VERSION`]); [`crate::Client::connect`] checks it. Update the agent.
    #[error(
        "the host agent implements local API version {api_version}, this library needs version \
         {required} or later: update fwnp-agent"
    )]
    AgentTooOld {
        /// The version the agent states (1 when it does not say).
        api_version: u64,
        /// The version this library needs.
        required: u64,
    },

    /// The agent's socket could not be reached: it does not exist, nobody listens on it, or
    /// this user may not open it.
    #[error(
        "cannot reach the FWNP host agent at {}: {source} (is fwnp-agent running? \
         FWNP_AGENT_SOCKET overrides the socket path)",
        path.display()
    )]
    AgentUnavailable {
        /// The socket path tried.
        path: PathBuf,
        /// Why the connection failed.
        source: std::io::Error,
    },

    /// Local code 1024: the agent does not let this user (uid and groups) use it; its
    /// configuration names who may.
    #[error(
        "the host agent does not let this user ask for openings{}",
        fmt_reason(reason)
    )]
    AgentNotAuthorized {
        /// The agent's explanation.
        reason: Option<String>,
    },

    /// Local code 1025: the port is bound by another process (the reason names it), or by
    /// nobody; bind it first, from this process or one of its children.
    #[error("the port is not bound by this process{}", fmt_reason(reason))]
    PortNotOwned {
        /// The agent's explanation, naming who binds the port.
        reason: Option<String>,
    },

    /// Local code 1026: the agent has no connection to the gateway and could not ask. Retry
    /// later; [`Error::is_transient`] is true.
    #[error("the host agent cannot reach the gateway{}", fmt_reason(reason))]
    GatewayUnreachable {
        /// The agent's explanation.
        reason: Option<String>,
    },

    /// Result code 10: too many requests; retry after the delay given.
    #[error("rate limited{}{}", fmt_retry(retry_after), fmt_reason(reason))]
    RateLimited {
        /// How long to wait before trying again, when the gateway said.
        retry_after: Option<Duration>,
        /// The gateway's explanation.
        reason: Option<String>,
    },

    /// Result code 9: the host holds as many leases as the policy allows; release one first.
    #[error("lease quota exceeded{}", fmt_reason(reason))]
    QuotaExceeded {
        /// The gateway's explanation.
        reason: Option<String>,
    },

    /// Result code 7: the gateway's policy does not allow this opening; the reason names the
    /// rule.
    #[error("denied by policy{}", fmt_reason(reason))]
    DeniedByPolicy {
        /// The gateway's explanation.
        reason: Option<String>,
    },

    /// Result code 6: a host address asked is not one this host holds, or the host holds no
    /// address of the family the opening concerns (its family, or its remote prefixes').
    #[error(
        "address mismatch: an address asked is not this host's, or the host has none of the family asked{}",
        fmt_reason(reason)
    )]
    AddressMismatch {
        /// The gateway's explanation.
        reason: Option<String>,
    },

    /// Any other refusal, with its code: a wire result code (not-authorized, no-resources,
    /// unknown-application, unknown-lease...) or a local one (unknown-local-lease).
    #[error("denied ({code}){}{}", fmt_retry(retry_after), fmt_reason(reason))]
    Denied {
        /// The code.
        code: DenialCode,
        /// The explanation given.
        reason: Option<String>,
        /// How long to wait before trying again, when given.
        retry_after: Option<Duration>,
        /// The lease the request named, when given.
        lease: Option<LeaseId>,
    },

    /// A refusal with a code this library does not know: a local code a newer agent added, or
    /// a result code added to the protocol later. The request was refused, with no meaning
    /// beyond that (the local API's Section 12.3): not retried, the connection kept.
    #[error("denied (code {code}){}", fmt_reason(reason))]
    UnknownDenial {
        /// The code's number.
        code: u64,
        /// The explanation given.
        reason: Option<String>,
    },

    /// Reading from or writing to the agent's socket failed.
    #[error("talking to the host agent failed: {0}")]
    Io(#[from] std::io::Error),

    /// The agent sent something this library cannot read, or an answer of the wrong kind.
    #[error("the host agent broke the local API: {0}")]
    Protocol(String),

    /// The connection to the agent is closed (the agent stopped or restarted). Leases held
    /// through it are over: the agent releases them when the connection closes. Connect again
    /// and reopen.
    #[error("the connection to the host agent is closed")]
    Closed,

    /// No answer came in time.
    #[error("the host agent did not answer the {request} request within {after:?}")]
    Timeout {
        /// Which request.
        request: &'static str,
        /// How long was waited.
        after: Duration,
    },
}

fn fmt_reason(reason: &Option<String>) -> String {
    reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}

fn fmt_retry(retry: &Option<Duration>) -> String {
    retry
        .map(|d| format!(" (retry after {} s)", d.as_secs()))
        .unwrap_or_default()
}

impl Error {
    /// The denial code behind a refusal; `None` for errors that are not refusals and for a
    /// code this library does not know ([`Error::code_number`] has its number).
    ///
    /// ```
    /// use fwnp_sdk::{DenialCode, LocalCode};
    /// use fwnp_sdk::Error;
    /// let e = Error::PortNotOwned { reason: None };
    /// assert_eq!(e.code(), Some(DenialCode::Local(LocalCode::PortNotOwned)));
    /// assert_eq!(Error::Closed.code(), None);
    /// ```
    pub fn code(&self) -> Option<DenialCode> {
        Some(match self {
            Error::AgentNotAuthorized { .. } => DenialCode::Local(LocalCode::AgentNotAuthorized),
            Error::PortNotOwned { .. } => DenialCode::Local(LocalCode::PortNotOwned),
            Error::GatewayUnreachable { .. } => DenialCode::Local(LocalCode::GatewayUnreachable),
            Error::RateLimited { .. } => DenialCode::Wire(ResultCode::RateLimited),
            Error::QuotaExceeded { .. } => DenialCode::Wire(ResultCode::QuotaExceeded),
            Error::DeniedByPolicy { .. } => DenialCode::Wire(ResultCode::DeniedByPolicy),
            Error::AddressMismatch { .. } => DenialCode::Wire(ResultCode::AddressMismatch),
            Error::Denied { code, .. } => *code,
            _ => return None,
        })
    }

    /// Whether this is a refusal by the agent or the gateway (as opposed to a local mistake or
    /// a failure to talk to the agent).
    ///
    /// ```
    /// assert!(fwnp_sdk::Error::QuotaExceeded { reason: None }.is_denied());
    /// assert!(!fwnp_sdk::Error::Closed.is_denied());
    /// ```
    pub fn is_denied(&self) -> bool {
        self.code_number().is_some()
    }

    /// The number of the code behind a refusal, known to this library or not; `None` for
    /// errors that are not refusals.
    ///
    /// ```
    /// use fwnp_sdk::Error;
    /// let e = Error::UnknownDenial { code: 1099, reason: Some("maintenance".into()) };
    /// assert_eq!((e.code_number(), e.code()), (Some(1099), None));
    /// assert_eq!(Error::QuotaExceeded { reason: None }.code_number(), Some(9));
    /// ```
    pub fn code_number(&self) -> Option<u64> {
        match self {
            Error::UnknownDenial { code, .. } => Some(*code),
            other => other.code().map(DenialCode::number),
        }
    }

    /// The explanation the agent or gateway gave with a refusal.
    ///
    /// ```
    /// let e = fwnp_sdk::Error::DeniedByPolicy { reason: Some("rule web: tcp/80 only".into()) };
    /// assert_eq!(e.reason(), Some("rule web: tcp/80 only"));
    /// ```
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::AgentNotAuthorized { reason }
            | Error::PortNotOwned { reason }
            | Error::GatewayUnreachable { reason }
            | Error::RateLimited { reason, .. }
            | Error::QuotaExceeded { reason }
            | Error::DeniedByPolicy { reason }
            | Error::AddressMismatch { reason }
            | Error::Denied { reason, .. }
            | Error::UnknownDenial { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }

    /// Whether the same request may succeed later without change: rate limited, no resources
    /// at the gateway, or the gateway unreachable from the agent.
    ///
    /// ```
    /// use std::time::Duration;
    /// let e = fwnp_sdk::Error::RateLimited { retry_after: Some(Duration::from_secs(3)), reason: None };
    /// assert!(e.is_transient());
    /// assert!(!fwnp_sdk::Error::DeniedByPolicy { reason: None }.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self.code() {
            Some(DenialCode::Wire(code)) => code.is_transient(),
            Some(DenialCode::Local(LocalCode::GatewayUnreachable)) => true,
            _ => false,
        }
    }

    /// How long to wait before retrying, when the gateway said.
    ///
    /// ```
    /// use std::time::Duration;
    /// let e = fwnp_sdk::Error::RateLimited { retry_after: Some(Duration::from_secs(3)), reason: None };
    /// assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } | Error::Denied { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The error for a Denied answer.
    pub(crate) fn from_denied(d: LocalDenied) -> Error {
        let reason = d.reason;
        let retry_after = d.retry_after.map(|s| Duration::from_secs(u64::from(s)));
        match d.code {
            DenialCode::Local(LocalCode::AgentNotAuthorized) => {
                Error::AgentNotAuthorized { reason }
            }
            DenialCode::Local(LocalCode::PortNotOwned) => Error::PortNotOwned { reason },
            DenialCode::Local(LocalCode::GatewayUnreachable) => {
                Error::GatewayUnreachable { reason }
            }
            DenialCode::Wire(ResultCode::RateLimited) => Error::RateLimited {
                retry_after,
                reason,
            },
            DenialCode::Wire(ResultCode::QuotaExceeded) => Error::QuotaExceeded { reason },
            DenialCode::Wire(ResultCode::DeniedByPolicy) => Error::DeniedByPolicy { reason },
            DenialCode::Wire(ResultCode::AddressMismatch) => Error::AddressMismatch { reason },
            code => Error::Denied {
                code,
                reason,
                retry_after,
                lease: d.lease,
            },
        }
    }
}
