//! libfwnp: the FWNP SDK for programs not written in Rust. A C ABI (`include/fwnp.h`) over the
//! Rust SDK (`fwnp-sdk`), so that a server in C, C++, Go, Python (ctypes/cffi), Java (JNA/FFM)
//! or Node can hold an opening of the host's firewall for as long as it serves, exactly as a
//! Rust program does: it asks the local host agent over its Unix socket, never the gateway.
//!
//! Built as `libfwnp.so` and `libfwnp.a`. Each client owns a small runtime (one thread, named
//! `fwnp`) that keeps its connection to the agent and its leases' events; every function
//! blocks the calling thread until its answer. Handles are opaque; every function that can fail
//! returns an [`fwnp_code`] and leaves the reason in [`fwnp_last_error`]; every allocation has
//! its own `fwnp_*_free`; no panic crosses into C (each entry point catches it and returns
//! [`fwnp_code::FWNP_ERR_PANIC`]).
//!
//! The header is generated from this file by cbindgen (`tests/header.rs` fails when the
//! committed header and the code differ); `fwnp.pc.in` and `install.sh` install the library,
//! the header and a pkg-config file.
// The exported names follow C's conventions, which the header shows as they are here.
#![allow(non_camel_case_types)]
// The exported functions need `#[unsafe(no_mangle)]`, an unsafe attribute: it is the only
// unsafe of this module (its functions' names are this library's own, prefixed `fwnp_`, so they
// cannot clash with another symbol). Every unsafe block is in `ptr`.
#![allow(unsafe_code)]

mod ptr;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{CString, c_char, c_int, c_void};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fwnp_sdk::{
    DenialCode, Error, Family, Lease, LeaseEvent, LeaseId, LocalCode, Opening, Remote, ResultCode,
};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

use crate::ptr::UserData;

/// What a function of this library returns: `FWNP_OK` (0), a refusal with the number of its
/// code (the FWNP result codes 1 to 14 and the local API's codes 1024 to 1027), or one of the
/// library's own errors (negative). [`fwnp_last_error`] says more.
///
/// ```c
/// fwnp_code rc = fwnp_client_open(client, opening, &lease);
/// if (rc == FWNP_RATE_LIMITED || rc == FWNP_GATEWAY_UNREACHABLE) {
///     // transient: try again later
/// } else if (rc != FWNP_OK) {
///     fprintf(stderr, "fwnp: %s\n", fwnp_last_error());
/// }
/// ```
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fwnp_code {
    /// Success.
    FWNP_OK = 0,
    /// 1: the gateway and the agent share no protocol version.
    FWNP_UNSUPPORTED_VERSION = 1,
    /// 2: the request was not well formed.
    FWNP_MALFORMED_REQUEST = 2,
    /// 3: a critical option was not understood.
    FWNP_UNSUPPORTED_OPTION = 3,
    /// 4: an option is malformed (a bad prefix, a reversed range).
    FWNP_MALFORMED_OPTION = 4,
    /// 5: this host may not make this request.
    FWNP_NOT_AUTHORIZED = 5,
    /// 6: an address asked is not the host's, or the host has none of the family asked.
    FWNP_ADDRESS_MISMATCH = 6,
    /// 7: the gateway's policy does not allow the opening; the error text names the rule.
    FWNP_DENIED_BY_POLICY = 7,
    /// 8: the gateway or the agent is out of resources; try again later.
    FWNP_NO_RESOURCES = 8,
    /// 9: the host holds as many leases as the policy allows.
    FWNP_QUOTA_EXCEEDED = 9,
    /// 10: too many requests; try again later.
    FWNP_RATE_LIMITED = 10,
    /// 11: no such lease at the gateway.
    FWNP_UNKNOWN_LEASE = 11,
    /// 12: the lifetime asked is beyond the protocol's maximum.
    FWNP_LIFETIME_OUT_OF_RANGE = 12,
    /// 13: the application id is not in the gateway's catalogue.
    FWNP_UNKNOWN_APPLICATION = 13,
    /// 14: the gateway wanted a Hello first.
    FWNP_HELLO_REQUIRED = 14,
    /// 1024: the agent does not let this user ask for openings.
    FWNP_AGENT_NOT_AUTHORIZED = 1024,
    /// 1025: the port is not bound by this process (or by nobody): bind it before opening.
    FWNP_PORT_NOT_OWNED = 1025,
    /// 1026: the agent cannot reach the gateway; try again later.
    FWNP_GATEWAY_UNREACHABLE = 1026,
    /// 1027: the agent holds no such lease for this connection.
    FWNP_UNKNOWN_LOCAL_LEASE = 1027,
    /// A required pointer argument was NULL.
    FWNP_ERR_NULL_POINTER = -1,
    /// An argument is out of range or not valid UTF-8.
    FWNP_ERR_INVALID_ARGUMENT = -2,
    /// The library failed internally (a Rust panic, caught); the handle used may be unusable.
    FWNP_ERR_PANIC = -3,
    /// The library's thread could not be started.
    FWNP_ERR_RUNTIME = -4,
    /// The agent's socket could not be reached (is fwnp-agent running? `FWNP_AGENT_SOCKET`).
    FWNP_ERR_AGENT_UNAVAILABLE = -5,
    /// The agent implements an older local API version than this library needs.
    FWNP_ERR_AGENT_TOO_OLD = -6,
    /// The opening breaks a rule of the protocol; it was not sent.
    FWNP_ERR_INVALID_OPENING = -7,
    /// Reading from or writing to the agent's socket failed.
    FWNP_ERR_IO = -8,
    /// The agent sent something this library cannot read.
    FWNP_ERR_PROTOCOL = -9,
    /// The connection to the agent is closed (the agent stopped); its leases are over.
    FWNP_ERR_CLOSED = -10,
    /// The agent did not answer in time (see [`fwnp_client_set_timeout_ms`]).
    FWNP_ERR_TIMEOUT = -11,
    /// [`fwnp_lease_next_event`]: no event is waiting.
    FWNP_ERR_NO_EVENT = -12,
    /// A refusal with a code this version of the library does not name (one a newer agent or
    /// gateway added): [`fwnp_last_denial_code`] has its number, [`fwnp_last_denial_reason`]
    /// its reason, and the error text both. Take it as a refusal of the request; do not retry it
    /// on that account.
    FWNP_ERR_DENIED = -13,
    /// A blocking function was called from a callback, on the library's own thread.
    FWNP_ERR_WRONG_THREAD = -14,
    /// An error of the SDK this version of the library does not name; the error text says it.
    FWNP_ERR_OTHER = -15,
}

/// What happened to a lease, from [`fwnp_event_get_kind`]. The numbers 1 to 8 are the local API's
/// event kinds; a kind this library does not know is never delivered.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fwnp_event_kind {
    /// The agent renewed the lease ([`fwnp_event_get_expires_in_ms`]: time left).
    FWNP_EVENT_RENEWED = 1,
    /// The gateway revoked the lease: the opening is closed (terminal).
    FWNP_EVENT_REVOKED = 2,
    /// Renewals failed until the lease's end: the opening is closed (terminal).
    FWNP_EVENT_EXPIRED = 3,
    /// The lease ended without being released: the gateway forgot it and reopening failed, or
    /// the port is no longer this process's (terminal).
    FWNP_EVENT_LOST = 4,
    /// The lease was released (terminal).
    FWNP_EVENT_RELEASED = 5,
    /// The gateway lost the lease and the agent opened it again under a new id
    /// ([`fwnp_event_get_new_lease_id`]); the opening stayed.
    FWNP_EVENT_REOPENED = 6,
    /// The agent cannot reach the gateway; the lease stays valid until its expiry.
    FWNP_EVENT_GATEWAY_UNREACHABLE = 7,
    /// The gateway refused to renew the lease; it stays valid until its expiry
    /// ([`fwnp_event_get_expires_in_ms`]), then `FWNP_EVENT_EXPIRED` follows.
    FWNP_EVENT_RENEWAL_REFUSED = 8,
    /// The connection to the agent closed: nobody renews the lease any more (terminal for this
    /// handle). Connect again and open the same opening.
    FWNP_EVENT_DISCONNECTED = 64,
}

/// A transport protocol, for [`fwnp_opening_ports`]: the IP protocol numbers.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum fwnp_protocol {
    /// TCP.
    FWNP_TCP = 6,
    /// UDP.
    FWNP_UDP = 17,
    /// SCTP.
    FWNP_SCTP = 132,
}

/// The size of a buffer that holds a lease id as text: 32 hexadecimal digits and a NUL.
pub const FWNP_LEASE_ID_SIZE: usize = 33;

/// Called with each event of a lease once set by [`fwnp_lease_set_callback`]: `user_data` as
/// given there, `event` valid only during the call (the library frees it after; copy what you
/// keep). It runs on the library's own thread, never the caller's: it must return quickly and
/// must not call the blocking functions (open, release) or free the lease or its client.
pub type fwnp_event_callback =
    Option<extern "C" fn(user_data: *mut c_void, event: *const fwnp_event)>;

/// An error on its way to C: the code and the text for [`fwnp_last_error`].
#[derive(Debug)]
pub(crate) struct Failure {
    code: fwnp_code,
    message: String,
    /// A refusal's code number and reason, for [`fwnp_last_denial_code`] and
    /// [`fwnp_last_denial_reason`].
    denial: Option<(u64, Option<String>)>,
}

impl Failure {
    fn new(code: fwnp_code, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            denial: None,
        }
    }

    pub(crate) fn null(what: &str) -> Failure {
        Failure::new(fwnp_code::FWNP_ERR_NULL_POINTER, format!("{what} is NULL"))
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(fwnp_code::FWNP_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        let message = error.to_string();
        let code = match &error {
            _ if error.is_denied() => error.code().map_or(fwnp_code::FWNP_ERR_DENIED, denial),
            Error::AgentTooOld { .. } => fwnp_code::FWNP_ERR_AGENT_TOO_OLD,
            Error::InvalidOpening(_) => fwnp_code::FWNP_ERR_INVALID_OPENING,
            Error::AgentUnavailable { .. } => fwnp_code::FWNP_ERR_AGENT_UNAVAILABLE,
            Error::Io(_) => fwnp_code::FWNP_ERR_IO,
            Error::Protocol(_) => fwnp_code::FWNP_ERR_PROTOCOL,
            Error::Closed => fwnp_code::FWNP_ERR_CLOSED,
            Error::Timeout { .. } => fwnp_code::FWNP_ERR_TIMEOUT,
            _ => fwnp_code::FWNP_ERR_OTHER,
        };
        let denial = error
            .code_number()
            .map(|number| (number, error.reason().map(str::to_owned)));
        Failure {
            code,
            message,
            denial,
        }
    }
}

/// The code of a refusal: its own number when this library names it.
fn denial(code: DenialCode) -> fwnp_code {
    use fwnp_code::*;
    match code {
        DenialCode::Wire(code) => match code {
            ResultCode::UnsupportedVersion => FWNP_UNSUPPORTED_VERSION,
            ResultCode::MalformedRequest => FWNP_MALFORMED_REQUEST,
            ResultCode::UnsupportedOption => FWNP_UNSUPPORTED_OPTION,
            ResultCode::MalformedOption => FWNP_MALFORMED_OPTION,
            ResultCode::NotAuthorized => FWNP_NOT_AUTHORIZED,
            ResultCode::AddressMismatch => FWNP_ADDRESS_MISMATCH,
            ResultCode::DeniedByPolicy => FWNP_DENIED_BY_POLICY,
            ResultCode::NoResources => FWNP_NO_RESOURCES,
            ResultCode::QuotaExceeded => FWNP_QUOTA_EXCEEDED,
            ResultCode::RateLimited => FWNP_RATE_LIMITED,
            ResultCode::UnknownLease => FWNP_UNKNOWN_LEASE,
            ResultCode::LifetimeOutOfRange => FWNP_LIFETIME_OUT_OF_RANGE,
            ResultCode::UnknownApplication => FWNP_UNKNOWN_APPLICATION,
            ResultCode::HelloRequired => FWNP_HELLO_REQUIRED,
            #[allow(unreachable_patterns)]
            _ => FWNP_ERR_DENIED,
        },
        DenialCode::Local(code) => match code {
            LocalCode::AgentNotAuthorized => FWNP_AGENT_NOT_AUTHORIZED,
            LocalCode::PortNotOwned => FWNP_PORT_NOT_OWNED,
            LocalCode::GatewayUnreachable => FWNP_GATEWAY_UNREACHABLE,
            LocalCode::UnknownLocalLease => FWNP_UNKNOWN_LOCAL_LEASE,
            _ => FWNP_ERR_DENIED,
        },
    }
}

thread_local! {
    /// The text of the last error of this thread's last call.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    /// The code number and reason of the refusal of this thread's last call, if it was one.
    static LAST_DENIAL: RefCell<Option<(u64, Option<CString>)>> = const { RefCell::new(None) };
}

/// A text for C: a NUL inside would cut it, so it is shown as a space instead.
fn c_text(text: &str) -> CString {
    CString::new(text.replace('\0', " ")).unwrap_or_default()
}

fn set_last_error(message: String) {
    let text = c_text(&message);
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
}

fn set_last_denial(denial: Option<(u64, Option<String>)>) {
    let denial = denial.map(|(code, reason)| (code, reason.as_deref().map(c_text)));
    LAST_DENIAL.with(|last| *last.borrow_mut() = denial);
}

/// Runs one entry point: clears the last error, catches any panic, turns the outcome into a
/// code and the last error's text.
fn guard(function: &str, body: impl FnOnce() -> Result<(), Failure>) -> fwnp_code {
    set_last_error(String::new());
    set_last_denial(None);
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => fwnp_code::FWNP_OK,
        Ok(Err(failure)) => {
            set_last_error(format!("{function}: {}", failure.message));
            set_last_denial(failure.denial);
            failure.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".to_owned());
            set_last_error(format!(
                "{function}: internal error in libfwnp ({what}); the handle may be unusable"
            ));
            fwnp_code::FWNP_ERR_PANIC
        }
    }
}

/// Runs an entry point that cannot report an error (a free, an accessor): a panic gives
/// `fallback`.
fn quiet<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// The text of the last error on this thread: what the last call of a `fwnp_` function on this
/// thread that returned an error said, or an empty string after one that succeeded. Never
/// NULL. The pointer stays valid until the next call of a `fwnp_` function on the same thread
/// (other than this one); copy the text to keep it.
///
/// ```c
/// if (fwnp_client_connect(NULL, &client) != FWNP_OK) {
///     fprintf(stderr, "fwnp: %s\n", fwnp_last_error());
/// }
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_last_error() -> *const c_char {
    quiet(c"".as_ptr(), || {
        LAST_ERROR.with(|last| last.borrow().as_ptr())
    })
}

/// The number of the code of the refusal the last call of a `fwnp_` function on this thread
/// returned, whether this library names it or not (`FWNP_ERR_DENIED`); 0 after a call that was
/// not refused.
///
/// ```c
/// fwnp_code rc = fwnp_client_open(client, opening, &lease);
/// if (rc == FWNP_ERR_DENIED) {
///     const char *reason = fwnp_last_denial_reason();
///     fprintf(stderr, "refused with code %lld: %s\n", (long long) fwnp_last_denial_code(),
///             reason ? reason : "no reason given");
/// }
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_last_denial_code() -> u64 {
    quiet(0, || {
        LAST_DENIAL.with(|last| last.borrow().as_ref().map_or(0, |d| d.0))
    })
}

/// The reason given with the refusal the last call of a `fwnp_` function on this thread
/// returned; NULL when it was not refused or no reason was given. Valid as
/// [`fwnp_last_error`]'s text is: until the next call of a `fwnp_` function on this thread
/// (other than these three).
///
/// ```c
/// if (fwnp_client_open(client, opening, &lease) == FWNP_DENIED_BY_POLICY) {
///     const char *reason = fwnp_last_denial_reason();
///     fprintf(stderr, "not allowed: %s\n", reason ? reason : "(no reason)");
/// }
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_last_denial_reason() -> *const c_char {
    quiet(std::ptr::null(), || {
        LAST_DENIAL.with(|last| {
            last.borrow()
                .as_ref()
                .and_then(|(_, reason)| reason.as_ref())
                .map_or(std::ptr::null(), |r| r.as_ptr())
        })
    })
}

/// The runtime of a client and of the leases opened through it; it stops (its thread joined)
/// when the client and all its leases are freed.
#[derive(Debug)]
struct Shared {
    runtime: Option<Runtime>,
}

impl Shared {
    fn new() -> Result<Shared, Failure> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fwnp")
            .enable_all()
            .build()
            .map_err(|e| {
                Failure::new(
                    fwnp_code::FWNP_ERR_RUNTIME,
                    format!("cannot start the library's thread: {e}"),
                )
            })?;
        Ok(Shared {
            runtime: Some(runtime),
        })
    }

    /// Runs `future` to its end on the calling thread. Refused on the library's own thread (a
    /// callback), where waiting would stop the very thread that must answer.
    fn block_on<T>(&self, future: impl Future<Output = T>) -> Result<T, Failure> {
        may_block()?;
        match &self.runtime {
            Some(runtime) => Ok(runtime.block_on(future)),
            None => Err(Failure::new(
                fwnp_code::FWNP_ERR_RUNTIME,
                "the library's thread is stopped",
            )),
        }
    }

    fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) {
        if let Some(runtime) = &self.runtime {
            runtime.spawn(future);
        }
    }
}

/// Refuses to wait on the library's own thread (a callback), where waiting would stop the very
/// thread that must answer.
fn may_block() -> Result<(), Failure> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Failure::new(
            fwnp_code::FWNP_ERR_WRONG_THREAD,
            "called from a callback (the library's own thread); call it from another thread",
        ));
    }
    Ok(())
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Freed from a callback despite the header: the thread cannot join itself.
                runtime.shutdown_background();
            } else {
                // Joins the library's thread, so that nothing of it outlives the last handle.
                drop(runtime);
            }
        }
    }
}

/// A connection to the host agent (opaque). Made by [`fwnp_client_connect`], freed by
/// [`fwnp_client_free`]. One client may be used from several threads at once; its leases may
/// outlive it (the connection stays open until the last of them is freed).
#[derive(Debug)]
pub struct fwnp_client {
    client: fwnp_sdk::Client,
    shared: Arc<Shared>,
}

/// Connects to the host agent: at `socket_path`, or, when it is NULL, at `$FWNP_AGENT_SOCKET`
/// if set, else `/run/fwnp/agent.sock`. Checks that this user may use the agent and that the
/// agent's local API version is one this library works with. On success `*out` is the new
/// client, to free with [`fwnp_client_free`]; on error `*out` is left as it was.
///
/// ```c
/// fwnp_client *client = NULL;
/// if (fwnp_client_connect(NULL, &client) != FWNP_OK) {
///     fprintf(stderr, "%s\n", fwnp_last_error());
///     return 1;
/// }
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_client_connect(
    socket_path: *const c_char,
    out: *mut *mut fwnp_client,
) -> fwnp_code {
    guard("fwnp_client_connect", || {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let path = ptr::opt_str(socket_path, "socket_path")?.map(str::to_owned);
        let shared = Arc::new(Shared::new()?);
        let client = shared.block_on(async move {
            match path {
                Some(path) => fwnp_sdk::Client::connect_to(path).await,
                None => fwnp_sdk::Client::connect().await,
            }
        })??;
        ptr::write_out(out, ptr::into_handle(fwnp_client { client, shared }), "out")
    })
}

/// Sets how long each later request of `client` (open, release) waits for the agent's answer
/// before failing with `FWNP_ERR_TIMEOUT`; 60 000 ms unless set. 0 is refused. Not to be called
/// while another call on the same client runs.
///
/// ```c
/// fwnp_client_set_timeout_ms(client, 5000);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_client_set_timeout_ms(
    client: *mut fwnp_client,
    timeout_ms: u32,
) -> fwnp_code {
    guard("fwnp_client_set_timeout_ms", || {
        let client = ptr::handle_mut(client, "client")?;
        if timeout_ms == 0 {
            return Err(Failure::invalid("a timeout of 0 ms"));
        }
        client.client = client
            .client
            .clone()
            .with_request_timeout(Duration::from_millis(u64::from(timeout_ms)));
        Ok(())
    })
}

/// Frees a client. Its leases stay valid (each keeps the connection) until they are freed;
/// once the client and all its leases are freed, the connection closes (the agent releases
/// whatever is still held) and the library's thread ends. NULL is ignored.
///
/// ```c
/// fwnp_client_free(client);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_client_free(client: *mut fwnp_client) {
    quiet((), || drop(ptr::take_handle(client)));
}

/// What to open (opaque): a port, a port range or an application id, with options. Made by
/// [`fwnp_opening_ports`] or [`fwnp_opening_app`], changed by the `fwnp_opening_set_*` and
/// `fwnp_opening_add_*` functions (from one thread at a time), freed by [`fwnp_opening_free`].
/// Opening it does not consume it.
#[derive(Debug)]
pub struct fwnp_opening {
    opening: Opening,
}

impl fwnp_opening {
    fn change(&mut self, f: impl FnOnce(Opening) -> Opening) {
        self.opening = f(self.opening.clone());
    }
}

/// An opening of the ports `first` to `last` (one port when equal) of `protocol`, one of
/// `FWNP_TCP`, `FWNP_UDP` and `FWNP_SCTP` (an integer, so that any value C passes is checked
/// rather than trusted). Without options it covers every address of the host, from anywhere
/// the gateway's policy allows, for the lifetime the policy chooses.
///
/// ```c
/// fwnp_opening *opening = NULL;
/// fwnp_opening_ports(FWNP_TCP, 8080, 8080, &opening);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_opening_ports(
    protocol: i32,
    first: u16,
    last: u16,
    out: *mut *mut fwnp_opening,
) -> fwnp_code {
    guard("fwnp_opening_ports", || {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let protocol = match protocol {
            6 => fwnp_sdk::Protocol::Tcp,
            17 => fwnp_sdk::Protocol::Udp,
            132 => fwnp_sdk::Protocol::Sctp,
            other => return Err(Failure::invalid(format!("protocol {other}"))),
        };
        let opening = Opening::protocol(protocol, first, last);
        ptr::write_out(out, ptr::into_handle(fwnp_opening { opening }), "out")
    })
}

/// An opening of an application of the gateway's catalogue, by its id (`"https"`...): the
/// gateway knows its ports.
///
/// ```c
/// fwnp_opening *opening = NULL;
/// fwnp_opening_app("https", &opening);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_opening_app(id: *const c_char, out: *mut *mut fwnp_opening) -> fwnp_code {
    guard("fwnp_opening_app", || {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let opening = Opening::app(ptr::str_arg(id, "id")?);
        ptr::write_out(out, ptr::into_handle(fwnp_opening { opening }), "out")
    })
}

/// Asks for a lifetime of `seconds` (rounded as the protocol requires; the gateway's policy
/// may shorten it). The agent renews the lease for as long as it is held.
///
/// ```c
/// fwnp_opening_set_lifetime(opening, 300);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_opening_set_lifetime(opening: *mut fwnp_opening, seconds: u32) -> fwnp_code {
    guard("fwnp_opening_set_lifetime", || {
        let opening = ptr::handle_mut(opening, "opening")?;
        opening.change(|o| o.lifetime(Duration::from_secs(u64::from(seconds))));
        Ok(())
    })
}

/// Admits only sources in `prefix` (`"198.51.100.0/24"`, `"2001:db8::/32"`, or one address);
/// may be called several times. A prefix with host bits set is refused here, with
/// `FWNP_ERR_INVALID_OPENING`.
///
/// ```c
/// fwnp_opening_add_remote(opening, "198.51.100.0/24");
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_opening_add_remote(
    opening: *mut fwnp_opening,
    prefix: *const c_char,
) -> fwnp_code {
    guard("fwnp_opening_add_remote", || {
        let opening = ptr::handle_mut(opening, "opening")?;
        let remote = Remote::from(ptr::str_arg(prefix, "prefix")?);
        let prefix = remote
            .prefix()
            .map_err(|e| Failure::new(fwnp_code::FWNP_ERR_INVALID_OPENING, e.to_string()))?;
        opening.change(|o| o.from(prefix));
        Ok(())
    })
}

/// Opens on the host address `address` only (may be called several times for several
/// addresses); without it the opening covers every address of the host.
///
/// ```c
/// fwnp_opening_add_address(opening, "192.0.2.10");
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_opening_add_address(
    opening: *mut fwnp_opening,
    address: *const c_char,
) -> fwnp_code {
    guard("fwnp_opening_add_address", || {
        let opening = ptr::handle_mut(opening, "opening")?;
        let text = ptr::str_arg(address, "address")?;
        let address: std::net::IpAddr = text
            .parse()
            .map_err(|_| Failure::invalid(format!("{text:?} is not an IP address")))?;
        opening.change(|o| o.address(address));
        Ok(())
    })
}

/// Opens for one address family only: 4 (IPv4) or 6 (IPv6).
///
/// ```c
/// fwnp_opening_set_family(opening, 6);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_opening_set_family(opening: *mut fwnp_opening, family: c_int) -> fwnp_code {
    guard("fwnp_opening_set_family", || {
        let opening = ptr::handle_mut(opening, "opening")?;
        let family = match family {
            4 => Family::Ipv4,
            6 => Family::Ipv6,
            other => return Err(Failure::invalid(format!("family {other} (4 or 6)"))),
        };
        opening.change(|o| o.family(family));
        Ok(())
    })
}

/// Names the application to the gateway's audit trail (its own label, as the application
/// claims it; the agent adds what the kernel says of the process).
///
/// ```c
/// fwnp_opening_set_name(opening, "inventory");
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_opening_set_name(
    opening: *mut fwnp_opening,
    name: *const c_char,
) -> fwnp_code {
    guard("fwnp_opening_set_name", || {
        let opening = ptr::handle_mut(opening, "opening")?;
        let name = ptr::str_arg(name, "name")?.to_owned();
        opening.change(|o| o.name(name));
        Ok(())
    })
}

/// Frees an opening. NULL is ignored.
///
/// ```c
/// fwnp_opening_free(opening);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_opening_free(opening: *mut fwnp_opening) {
    quiet((), || drop(ptr::take_handle(opening)));
}

/// What C sees of a lease that changes with its events.
#[derive(Debug)]
struct View {
    id: LeaseId,
    expires: Instant,
    active: bool,
}

type Callback = (extern "C" fn(*mut c_void, *const fwnp_event), UserData);

/// Where a lease's events wait for C.
#[derive(Debug)]
struct Sink {
    state: Mutex<SinkState>,
    /// Readable while an event waits: holds one byte exactly when the queue is not empty.
    reader: UnixStream,
    writer: UnixStream,
}

#[derive(Debug, Default)]
struct SinkState {
    queue: VecDeque<fwnp_event>,
    callback: Option<Callback>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while the lock was held left plain data, still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sink {
    fn new() -> Result<Sink, Failure> {
        let io = |e: std::io::Error| {
            Failure::new(fwnp_code::FWNP_ERR_IO, format!("event descriptor: {e}"))
        };
        let (reader, writer) = UnixStream::pair().map_err(io)?;
        reader.set_nonblocking(true).map_err(io)?;
        writer.set_nonblocking(true).map_err(io)?;
        Ok(Sink {
            state: Mutex::new(SinkState::default()),
            reader,
            writer,
        })
    }

    fn push(&self, event: fwnp_event) {
        let mut state = lock(&self.state);
        if let Some((callback, user_data)) = state.callback {
            drop(state);
            callback(user_data.0, &event);
            return;
        }
        state.queue.push_back(event);
        if state.queue.len() == 1 {
            // The socket is empty (the queue was): one byte always fits.
            let _ = (&self.writer).write(&[1]);
        }
    }

    fn pop(&self) -> Option<fwnp_event> {
        let mut state = lock(&self.state);
        let event = state.queue.pop_front()?;
        if state.queue.is_empty() {
            let _ = (&self.reader).read(&mut [0u8; 1]);
        }
        Some(event)
    }
}

/// A release waiting for its answer.
type ReleaseReply = oneshot::Sender<Result<(), Error>>;

/// A lease the gateway granted (opaque), from [`fwnp_client_open`]. The opening stays while
/// the lease is held: the agent renews it. [`fwnp_lease_release`] ends it; [`fwnp_lease_free`]
/// frees the handle (releasing the lease if it was not). Its functions may be called from any
/// thread; its events come by [`fwnp_lease_event_fd`] and [`fwnp_lease_next_event`], or by
/// [`fwnp_lease_set_callback`].
#[derive(Debug)]
pub struct fwnp_lease {
    /// Closed by `fwnp_lease_free`, which makes the task drop (and so release) the lease.
    release: Mutex<Option<mpsc::UnboundedSender<ReleaseReply>>>,
    view: Arc<Mutex<View>>,
    sink: Arc<Sink>,
    shared: Arc<Shared>,
}

/// Holds `lease` on the library's thread: forwards its events to `sink` and releases it when
/// asked; dropping the sender drops the lease, which releases it.
async fn hold(
    mut lease: Lease,
    mut releases: mpsc::UnboundedReceiver<ReleaseReply>,
    view: Arc<Mutex<View>>,
    sink: Arc<Sink>,
) {
    let mut events_open = true;
    loop {
        tokio::select! {
            event = lease.next_event(), if events_open => match event {
                Some(event) => {
                    if let Some(event) = note(&view, event) {
                        sink.push(event);
                    }
                }
                None => events_open = false,
            },
            reply = releases.recv() => {
                if let Some(reply) = reply {
                    let result = lease.release().await;
                    lock(&view).active = false;
                    let _ = reply.send(result);
                }
                // Without a reply the handle was freed: dropping the lease releases it.
                return;
            }
        }
    }
}

/// Updates what C sees of the lease and returns the event to deliver (none for a kind this
/// library does not know).
fn note(view: &Mutex<View>, event: LeaseEvent) -> Option<fwnp_event> {
    let now = Instant::now();
    let mut view = lock(view);
    if event.is_terminal() {
        view.active = false;
    }
    let left = |expires: Instant| {
        u64::try_from(expires.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
    };
    let code = |code: Option<DenialCode>| {
        code.map_or(0, |c| i32::try_from(c.number()).unwrap_or(i32::MAX))
    };
    let mut out = fwnp_event {
        kind: fwnp_event_kind::FWNP_EVENT_RELEASED,
        code: 0,
        expires_in_ms: 0,
        reason: None,
        new_lease: None,
    };
    let reason =
        |reason: Option<String>| reason.and_then(|r| CString::new(r.replace('\0', " ")).ok());
    match event {
        LeaseEvent::Renewed { expires } => {
            view.expires = expires;
            out.kind = fwnp_event_kind::FWNP_EVENT_RENEWED;
            out.expires_in_ms = left(expires);
        }
        LeaseEvent::Revoked { reason: r, code: c } => {
            out.kind = fwnp_event_kind::FWNP_EVENT_REVOKED;
            out.reason = reason(r);
            out.code = code(c);
        }
        LeaseEvent::Expired => out.kind = fwnp_event_kind::FWNP_EVENT_EXPIRED,
        LeaseEvent::Lost { reason: r, code: c } => {
            out.kind = fwnp_event_kind::FWNP_EVENT_LOST;
            out.reason = reason(r);
            out.code = code(c);
        }
        LeaseEvent::Released => out.kind = fwnp_event_kind::FWNP_EVENT_RELEASED,
        LeaseEvent::Reopened { new, .. } => {
            view.id = new;
            out.kind = fwnp_event_kind::FWNP_EVENT_REOPENED;
            out.new_lease = Some(new);
        }
        LeaseEvent::GatewayUnreachable { reason: r } => {
            out.kind = fwnp_event_kind::FWNP_EVENT_GATEWAY_UNREACHABLE;
            out.reason = reason(r);
        }
        LeaseEvent::RenewalRefused {
            expires,
            reason: r,
            code: c,
        } => {
            view.expires = expires;
            out.kind = fwnp_event_kind::FWNP_EVENT_RENEWAL_REFUSED;
            out.expires_in_ms = left(expires);
            out.reason = reason(r);
            out.code = code(c);
        }
        LeaseEvent::Disconnected => out.kind = fwnp_event_kind::FWNP_EVENT_DISCONNECTED,
        _ => return None,
    }
    Some(out)
}

/// Asks the agent for `opening` and waits until the gateway granted it and the host's firewall
/// holds it (or a refusal, whose code is returned). The port must already be bound by this
/// process: the agent checks (`FWNP_PORT_NOT_OWNED`). On success `*out` is the lease, to free
/// with [`fwnp_lease_free`].
///
/// ```c
/// fwnp_lease *lease = NULL;
/// fwnp_code rc = fwnp_client_open(client, opening, &lease);
/// if (rc != FWNP_OK) {
///     fprintf(stderr, "not opened (%d): %s\n", rc, fwnp_last_error());
/// }
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_client_open(
    client: *const fwnp_client,
    opening: *const fwnp_opening,
    out: *mut *mut fwnp_lease,
) -> fwnp_code {
    guard("fwnp_client_open", || {
        let client = ptr::handle(client, "client")?;
        let opening = ptr::handle(opening, "opening")?.opening.clone();
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let sink = Arc::new(Sink::new()?);
        let sdk = client.client.clone();
        let lease = client
            .shared
            .block_on(async move { sdk.open(opening).await })??;
        let view = Arc::new(Mutex::new(View {
            id: lease.id(),
            expires: lease.expires(),
            active: true,
        }));
        let (release, releases) = mpsc::unbounded_channel();
        client
            .shared
            .spawn(hold(lease, releases, view.clone(), sink.clone()));
        let handle = fwnp_lease {
            release: Mutex::new(Some(release)),
            view,
            sink,
            shared: client.shared.clone(),
        };
        ptr::write_out(out, ptr::into_handle(handle), "out")
    })
}

/// Writes the lease's id (32 hexadecimal digits and a NUL) into `buf` of `len` bytes (at least
/// `FWNP_LEASE_ID_SIZE`). After `FWNP_EVENT_REOPENED` it is the new id.
///
/// ```c
/// char id[FWNP_LEASE_ID_SIZE];
/// fwnp_lease_id(lease, id, sizeof id);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_lease_id(
    lease: *const fwnp_lease,
    buf: *mut c_char,
    len: usize,
) -> fwnp_code {
    guard("fwnp_lease_id", || {
        let lease = ptr::handle(lease, "lease")?;
        let id = lock(&lease.view).id.to_string();
        ptr::write_text(buf, len, &id, "buf")
    })
}

/// Stores in `*out` the milliseconds left before the lease expires unless the agent renews it
/// (as of the last renewal; this host's clock).
///
/// ```c
/// uint64_t left;
/// fwnp_lease_expires_in_ms(lease, &left);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_lease_expires_in_ms(lease: *const fwnp_lease, out: *mut u64) -> fwnp_code {
    guard("fwnp_lease_expires_in_ms", || {
        let lease = ptr::handle(lease, "lease")?;
        let expires = lock(&lease.view).expires;
        let left = expires
            .saturating_duration_since(Instant::now())
            .as_millis();
        ptr::write_out(out, u64::try_from(left).unwrap_or(u64::MAX), "out")
    })
}

/// Stores in `*out` 1 while the lease is held, 0 once it is over (released, revoked, expired,
/// lost, or the agent's connection closed).
///
/// ```c
/// int active;
/// fwnp_lease_is_active(lease, &active);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_lease_is_active(lease: *const fwnp_lease, out: *mut c_int) -> fwnp_code {
    guard("fwnp_lease_is_active", || {
        let lease = ptr::handle(lease, "lease")?;
        let active = lock(&lease.view).active;
        ptr::write_out(out, c_int::from(active), "out")
    })
}

/// Stores in `*out` a file descriptor that is readable (for `poll`, `select`, `epoll`) while an
/// event of the lease waits for [`fwnp_lease_next_event`]. It belongs to the lease: do not read
/// it, write it or close it; it is closed by [`fwnp_lease_free`]. Events wait here unless a
/// callback is set.
///
/// ```c
/// int fd;
/// fwnp_lease_event_fd(lease, &fd);
/// struct pollfd p = { .fd = fd, .events = POLLIN };
/// if (poll(&p, 1, 1000) == 1) {
///     // an event waits: fwnp_lease_next_event
/// }
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_lease_event_fd(lease: *const fwnp_lease, out: *mut c_int) -> fwnp_code {
    guard("fwnp_lease_event_fd", || {
        let lease = ptr::handle(lease, "lease")?;
        ptr::write_out(out, lease.sink.reader.as_raw_fd(), "out")
    })
}

/// Takes the oldest waiting event of the lease without blocking: `FWNP_OK` with `*out` the
/// event (free it with [`fwnp_event_free`]), or `FWNP_ERR_NO_EVENT` when none waits.
///
/// ```c
/// fwnp_event *event = NULL;
/// while (fwnp_lease_next_event(lease, &event) == FWNP_OK) {
///     printf("event %d\n", fwnp_event_get_kind(event));
///     fwnp_event_free(event);
/// }
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_lease_next_event(
    lease: *const fwnp_lease,
    out: *mut *mut fwnp_event,
) -> fwnp_code {
    guard("fwnp_lease_next_event", || {
        let lease = ptr::handle(lease, "lease")?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        match lease.sink.pop() {
            Some(event) => ptr::write_out(out, ptr::into_handle(event), "out"),
            None => Err(Failure::new(
                fwnp_code::FWNP_ERR_NO_EVENT,
                "no event is waiting",
            )),
        }
    })
}

/// Delivers the lease's later events to `callback` (with `user_data`) instead of the queue of
/// [`fwnp_lease_next_event`]; events already queued stay there. NULL as `callback` goes back to
/// the queue. The callback runs on the library's own thread (see [`fwnp_event_callback`]).
///
/// ```c
/// static void on_event(void *user_data, const fwnp_event *event) {
///     if (fwnp_event_get_kind(event) == FWNP_EVENT_REVOKED) atomic_store((atomic_int *)user_data, 1);
/// }
/// fwnp_lease_set_callback(lease, on_event, &revoked);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_lease_set_callback(
    lease: *const fwnp_lease,
    callback: fwnp_event_callback,
    user_data: *mut c_void,
) -> fwnp_code {
    guard("fwnp_lease_set_callback", || {
        let lease = ptr::handle(lease, "lease")?;
        lock(&lease.sink.state).callback = callback.map(|f| (f, UserData(user_data)));
        Ok(())
    })
}

/// Releases the lease and waits until the agent removed it from the host's firewall and the
/// gateway's. Releasing a lease that is already over, or twice, succeeds. The handle stays
/// valid until [`fwnp_lease_free`]. When another lease handle of the same client has the same
/// lease id (the same opening opened twice: the gateway merged the Opens into one lease), this
/// handle ends alone, at once, and the opening stays for the other: the client's connection
/// holds the lease until its last handle of it is released.
///
/// ```c
/// if (fwnp_lease_release(lease) != FWNP_OK) fprintf(stderr, "%s\n", fwnp_last_error());
/// fwnp_lease_free(lease);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_lease_release(lease: *const fwnp_lease) -> fwnp_code {
    guard("fwnp_lease_release", || {
        let lease = ptr::handle(lease, "lease")?;
        // Before taking the sender: a refused call must leave the lease held.
        may_block()?;
        let Some(sender) = lock(&lease.release).take() else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        if sender.send(reply).is_err() {
            // The task is gone with the runtime: nothing is held any more.
            return Ok(());
        }
        match lease.shared.block_on(answer)? {
            Ok(result) => Ok(result?),
            Err(_) => Ok(()),
        }
    })
}

/// Frees a lease handle, releasing the lease if it was not released (without waiting for the
/// agent's answer), and closes its event descriptor. NULL is ignored.
///
/// ```c
/// fwnp_lease_free(lease);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_lease_free(lease: *mut fwnp_lease) {
    quiet((), || drop(ptr::take_handle(lease)));
}

/// An event of a lease (opaque), from [`fwnp_lease_next_event`] (freed by [`fwnp_event_free`])
/// or given to a callback (valid during the call). Its accessors never fail: given NULL they
/// return 0 or NULL.
#[derive(Debug)]
pub struct fwnp_event {
    kind: fwnp_event_kind,
    code: i32,
    expires_in_ms: u64,
    reason: Option<CString>,
    new_lease: Option<LeaseId>,
}

/// What happened.
///
/// ```c
/// if (fwnp_event_get_kind(event) == FWNP_EVENT_REVOKED) {
///     // stop serving
/// }
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_event_get_kind(event: *const fwnp_event) -> fwnp_event_kind {
    quiet(fwnp_event_kind::FWNP_EVENT_RELEASED, || {
        ptr::handle(event, "event").map_or(fwnp_event_kind::FWNP_EVENT_RELEASED, |e| e.kind)
    })
}

/// The code given with a revoked, lost or renewal-refused event (a [`fwnp_code`] number, such
/// as `FWNP_PORT_NOT_OWNED`), or 0.
///
/// ```c
/// int32_t code = fwnp_event_get_code(event);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_event_get_code(event: *const fwnp_event) -> i32 {
    quiet(0, || ptr::handle(event, "event").map_or(0, |e| e.code))
}

/// The time left, in milliseconds, given with a renewed or renewal-refused event, or 0.
///
/// ```c
/// uint64_t left = fwnp_event_get_expires_in_ms(event);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_event_get_expires_in_ms(event: *const fwnp_event) -> u64 {
    quiet(0, || {
        ptr::handle(event, "event").map_or(0, |e| e.expires_in_ms)
    })
}

/// The explanation given with the event, or NULL. The text lives as long as the event.
///
/// ```c
/// const char *why = fwnp_event_get_reason(event);
/// if (why) fprintf(stderr, "lease: %s\n", why);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_event_get_reason(event: *const fwnp_event) -> *const c_char {
    quiet(std::ptr::null(), || {
        ptr::handle(event, "event")
            .ok()
            .and_then(|e| e.reason.as_ref())
            .map_or(std::ptr::null(), |r| r.as_ptr())
    })
}

/// For `FWNP_EVENT_REOPENED`: writes the lease's new id into `buf` of `len` bytes (at least
/// `FWNP_LEASE_ID_SIZE`). Other kinds: `FWNP_ERR_INVALID_ARGUMENT`.
///
/// ```c
/// char id[FWNP_LEASE_ID_SIZE];
/// if (fwnp_event_get_new_lease_id(event, id, sizeof id) == FWNP_OK) printf("now %s\n", id);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_event_get_new_lease_id(
    event: *const fwnp_event,
    buf: *mut c_char,
    len: usize,
) -> fwnp_code {
    guard("fwnp_event_get_new_lease_id", || {
        let event = ptr::handle(event, "event")?;
        let id = event
            .new_lease
            .ok_or_else(|| Failure::invalid("only a reopened event carries a new lease id"))?;
        ptr::write_text(buf, len, &id.to_string(), "buf")
    })
}

/// Frees an event from [`fwnp_lease_next_event`] (not one given to a callback). NULL is
/// ignored.
///
/// ```c
/// fwnp_event_free(event);
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn fwnp_event_free(event: *mut fwnp_event) {
    quiet((), || drop(ptr::take_handle(event)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

    fn last_error() -> String {
        let text = fwnp_last_error();
        ptr::opt_str(text, "last error")
            .ok()
            .flatten()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn a_panic_in_an_entry_point_becomes_a_code_and_a_text() {
        let code = guard("fwnp_test", || panic!("boom {}", 7));
        assert_eq!(code, fwnp_code::FWNP_ERR_PANIC);
        let text = last_error();
        assert!(
            text.contains("fwnp_test") && text.contains("boom 7"),
            "{text}"
        );
        // The next call that succeeds clears it.
        assert_eq!(guard("fwnp_test", || Ok(())), fwnp_code::FWNP_OK);
        assert_eq!(last_error(), "");
        // An accessor that panics gives its fallback.
        assert_eq!(quiet(5, || -> i32 { panic!("accessor") }), 5);
    }

    #[test]
    fn null_pointers_and_bad_arguments_are_reported_not_dereferenced() {
        assert_eq!(
            fwnp_client_connect(std::ptr::null(), std::ptr::null_mut()),
            fwnp_code::FWNP_ERR_NULL_POINTER
        );
        assert!(last_error().contains("out is NULL"), "{}", last_error());
        let mut opening: *mut fwnp_opening = std::ptr::null_mut();
        assert_eq!(
            fwnp_opening_ports(fwnp_protocol::FWNP_TCP as i32, 8080, 8080, &mut opening),
            fwnp_code::FWNP_OK
        );
        assert!(!opening.is_null());
        assert_eq!(
            fwnp_opening_add_remote(opening, c"198.51.100.7/24".as_ptr()),
            fwnp_code::FWNP_ERR_INVALID_OPENING
        );
        assert!(last_error().contains("198.51.100.7/24"), "{}", last_error());
        assert_eq!(
            fwnp_opening_add_remote(opening, c"198.51.100.0/24".as_ptr()),
            fwnp_code::FWNP_OK
        );
        assert_eq!(
            fwnp_opening_set_family(opening, 5),
            fwnp_code::FWNP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            fwnp_opening_add_address(opening, c"not an address".as_ptr()),
            fwnp_code::FWNP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            fwnp_opening_set_name(opening, std::ptr::null()),
            fwnp_code::FWNP_ERR_NULL_POINTER
        );
        assert_eq!(fwnp_opening_set_lifetime(opening, 600), fwnp_code::FWNP_OK);
        let built = ptr::handle(opening, "opening").unwrap().opening.to_string();
        assert_eq!(built, "tcp/8080 from 198.51.100.0/24");
        fwnp_opening_free(opening);
        fwnp_opening_free(std::ptr::null_mut());
        assert_eq!(fwnp_event_get_code(std::ptr::null()), 0);
        assert!(fwnp_event_get_reason(std::ptr::null()).is_null());
    }

    #[test]
    fn a_short_buffer_is_refused() {
        let mut buf = [0 as c_char; 4];
        assert!(ptr::write_text(buf.as_mut_ptr(), buf.len(), "abcd", "buf").is_err());
        ptr::write_text(buf.as_mut_ptr(), buf.len(), "abc", "buf").unwrap();
        let text = ptr::opt_str(buf.as_ptr(), "buf").unwrap().unwrap();
        assert_eq!(text, "abc");
    }

    #[test]
    fn every_refusal_code_keeps_its_number() {
        for code in ResultCode::ALL {
            let code = DenialCode::Wire(code);
            assert_eq!(denial(code) as i64, code.number() as i64, "{code}");
        }
        for code in LocalCode::ALL {
            let code = DenialCode::Local(code);
            assert_eq!(denial(code) as i64, code.number() as i64, "{code}");
        }
    }

    #[test]
    fn the_event_descriptor_is_readable_exactly_while_an_event_waits() {
        let sink = Sink::new().unwrap();
        // What poll(2) says of the descriptor C is given.
        let readable = || {
            let mut fds = [PollFd::new(
                std::os::fd::AsFd::as_fd(&sink.reader),
                PollFlags::POLLIN,
            )];
            poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
        };
        assert!(!readable());
        let view = Mutex::new(View {
            id: LeaseId([1; 16]),
            expires: Instant::now(),
            active: true,
        });
        let renewed = LeaseEvent::Renewed {
            expires: Instant::now() + Duration::from_secs(30),
        };
        sink.push(note(&view, renewed).unwrap());
        sink.push(note(&view, LeaseEvent::Released).unwrap());
        assert!(readable());
        assert!(!lock(&view).active);
        let first = sink.pop().unwrap();
        assert_eq!(first.kind, fwnp_event_kind::FWNP_EVENT_RENEWED);
        assert!(first.expires_in_ms > 29_000 && first.expires_in_ms <= 30_000);
        assert!(readable());
        assert_eq!(
            sink.pop().unwrap().kind,
            fwnp_event_kind::FWNP_EVENT_RELEASED
        );
        assert!(!readable());
        assert!(sink.pop().is_none());
    }
}
