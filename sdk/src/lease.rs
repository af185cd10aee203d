//! [`Lease`]: an opening the gateway granted, held for as long as the value lives.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use fwnp_proto::local::DenialCode;
use fwnp_proto::{Epoch, Grant, LeaseId};
use tokio::sync::mpsc;

use crate::client::ClientRef;
use crate::error::Error;

/// Something that happened to a [`Lease`], from [`Lease::next_event`].
///
/// The agent renews the lease by itself; these events tell the application how that goes.
/// [`LeaseEvent::is_terminal`] tells whether the opening is over.
///
/// ```
/// use fwnp_sdk::LeaseEvent;
/// assert!(LeaseEvent::Expired.is_terminal());
/// assert!(!LeaseEvent::GatewayUnreachable { reason: None }.is_terminal());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// The agent renewed the lease; it now lasts until `expires` (this host's clock).
    Renewed {
        /// The new expiry, as [`Lease::expires`] now reports it.
        expires: Instant,
    },
    /// The gateway revoked the lease (an operator, a policy change, a revoked credential):
    /// the opening is closed and is not reopened.
    Revoked {
        /// The explanation given.
        reason: Option<String>,
        /// The code given, if any.
        code: Option<DenialCode>,
    },
    /// The lease expired because renewals failed until its end: the opening is closed.
    Expired,
    /// The gateway forgot the lease (it lost its state) and opening it again failed.
    Lost {
        /// The explanation given.
        reason: Option<String>,
        /// Why reopening failed, if said.
        code: Option<DenialCode>,
    },
    /// The agent released the lease (at someone's request): the opening is closed.
    Released,
    /// The gateway lost its state and the agent opened the lease again: it now has a new id,
    /// which [`Lease::id`] reports from now on. The opening stayed in place.
    Reopened {
        /// The id it had.
        old: LeaseId,
        /// The id it has now.
        new: LeaseId,
    },
    /// Renewals are failing because the agent cannot reach the gateway. The lease stays valid
    /// until [`Lease::expires`]; the agent keeps trying.
    GatewayUnreachable {
        /// The explanation given.
        reason: Option<String>,
    },
    /// The gateway refused to renew the lease (for example, the host's credential is no longer
    /// authorized). The agent does not ask again: the lease stays valid until `expires`, then
    /// [`LeaseEvent::Expired`] follows. An application that still needs the opening can open it
    /// again, which the gateway judges afresh.
    ///
    /// ```
    /// use fwnp_sdk::LeaseEvent;
    /// let event = LeaseEvent::RenewalRefused {
    ///     expires: std::time::Instant::now(),
    ///     reason: Some("not authorized".into()),
    ///     code: None,
    /// };
    /// assert!(!event.is_terminal());
    /// ```
    RenewalRefused {
        /// When the lease ends (this host's clock), as [`Lease::expires`] reports it.
        expires: Instant,
        /// The explanation given.
        reason: Option<String>,
        /// The gateway's code.
        code: Option<DenialCode>,
    },
    /// The connection to the agent closed (the agent stopped or died). This application no
    /// longer holds the lease: nobody renews it, and its opening stays only until the agent
    /// releases it or it expires. Connect again and open the same opening: an agent restarted
    /// within its grace period gives the same lease back, so the opening never closes.
    Disconnected,
}

impl LeaseEvent {
    /// Whether the opening is over after this event.
    ///
    /// ```
    /// use fwnp_sdk::LeaseEvent;
    /// assert!(LeaseEvent::Revoked { reason: None, code: None }.is_terminal());
    /// assert!(!LeaseEvent::Renewed { expires: std::time::Instant::now() }.is_terminal());
    /// ```
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            LeaseEvent::Revoked { .. }
                | LeaseEvent::Expired
                | LeaseEvent::Lost { .. }
                | LeaseEvent::Released
                | LeaseEvent::Disconnected
        )
    }
}

impl fmt::Display for LeaseEvent {
    /// One line for people: `renewed, 299 s left`, `revoked: operator`...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with = |f: &mut fmt::Formatter<'_>, what: &str, reason: &Option<String>| match reason {
            Some(reason) => write!(f, "{what}: {reason}"),
            None => f.write_str(what),
        };
        match self {
            LeaseEvent::Renewed { expires } => write!(
                f,
                "renewed, {} s left",
                expires.saturating_duration_since(Instant::now()).as_secs()
            ),
            LeaseEvent::Revoked { reason, .. } => with(f, "revoked by the gateway", reason),
            LeaseEvent::Expired => f.write_str("expired (renewals failed until the end)"),
            LeaseEvent::Lost { reason, .. } => with(
                f,
                "lost (the gateway forgot it and reopening failed)",
                reason,
            ),
            LeaseEvent::Released => f.write_str("released"),
            LeaseEvent::Reopened { old, new } => {
                write!(f, "reopened after a gateway restart: {old} is now {new}")
            }
            LeaseEvent::GatewayUnreachable { reason } => with(
                f,
                "gateway unreachable, renewals failing (still open until expiry)",
                reason,
            ),
            LeaseEvent::RenewalRefused {
                expires, reason, ..
            } => {
                let left = expires.saturating_duration_since(Instant::now()).as_secs();
                with(
                    f,
                    &format!("renewal refused by the gateway (still open, {left} s left)"),
                    reason,
                )
            }
            LeaseEvent::Disconnected => f.write_str(
                "the connection to the host agent closed: the lease is no longer held (its \
                     opening stays until the agent releases it or it expires)",
            ),
        }
    }
}

/// The part of a lease that the connection's task keeps current.
#[derive(Debug)]
pub(crate) struct LeaseShared {
    /// Tells the handles of one lease id apart (opening the same thing twice gives the same
    /// lease id twice).
    pub(crate) handle: u64,
    state: Mutex<LeaseState>,
}

#[derive(Debug)]
struct LeaseState {
    id: LeaseId,
    expires: Instant,
    gateway_expires: SystemTime,
    /// The terminal event, once there was one (or the lease was released).
    ended: Option<LeaseEvent>,
}

impl LeaseShared {
    pub(crate) fn new(
        handle: u64,
        id: LeaseId,
        expires: Instant,
        gateway_expires: SystemTime,
    ) -> Self {
        LeaseShared {
            handle,
            state: Mutex::new(LeaseState {
                id,
                expires,
                gateway_expires,
                ended: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LeaseState> {
        // A panic while holding this lock cannot leave the plain values inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn id(&self) -> LeaseId {
        self.lock().id
    }

    pub(crate) fn set_id(&self, id: LeaseId) {
        self.lock().id = id;
    }

    pub(crate) fn set_expires_in(&self, left: Duration) -> Instant {
        let mut state = self.lock();
        let now = Instant::now();
        state.expires = now + left;
        state.gateway_expires = SystemTime::now() + left;
        state.expires
    }

    pub(crate) fn expires(&self) -> Instant {
        self.lock().expires
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.lock().ended.is_some()
    }

    /// Marks the lease over; returns false if it already was.
    pub(crate) fn end(&self, event: LeaseEvent) -> bool {
        let mut state = self.lock();
        if state.ended.is_some() {
            return false;
        }
        state.ended = Some(event);
        true
    }
}

/// An opening granted by the gateway, mirrored on this host and renewed by the agent for as
/// long as this value lives.
///
/// Get one from [`crate::Client::open`]. End it with [`Lease::release`], or by dropping it:
/// `Drop` asks the agent to release it without blocking (and the agent also releases every
/// lease of a connection that closes, so no opening outlives its application).
///
/// Times: [`Lease::expires`] is an [`Instant`] on this host's monotonic clock, measured from when
/// the request was sent, so it is never later than the gateway's own expiry; it moves forward
/// with every renewal. [`Lease::gateway_expires`] is the gateway's expiry as a wall-clock time.
///
/// ```no_run
/// use std::time::Duration;
/// use fwnp_sdk::{Client, LeaseEvent, Opening};
///
/// # async fn example() -> Result<(), fwnp_sdk::Error> {
/// let client = Client::connect().await?;
/// let mut lease = client.open(Opening::tcp(8080).lifetime(Duration::from_secs(600))).await?;
/// println!("lease {} grants {:?} for {:?}", lease.id(), lease.grants(), lease.lifetime());
/// while let Some(event) = lease.next_event().await {
///     eprintln!("lease {}: {event}", lease.id());
///     if event.is_terminal() {
///         break;
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Lease {
    shared: Arc<LeaseShared>,
    grants: Vec<Grant>,
    lifetime: Duration,
    renew_after: Duration,
    epoch: Epoch,
    narrowed: bool,
    events: mpsc::UnboundedReceiver<LeaseEvent>,
    client: ClientRef,
    released: bool,
}

/// What a Granted answer told about a new lease.
#[derive(Debug)]
pub(crate) struct GrantedLease {
    pub(crate) grants: Vec<Grant>,
    pub(crate) lifetime: Duration,
    pub(crate) renew_after: Duration,
    pub(crate) epoch: Epoch,
    pub(crate) narrowed: bool,
}

impl Lease {
    pub(crate) fn new(
        shared: Arc<LeaseShared>,
        granted: GrantedLease,
        events: mpsc::UnboundedReceiver<LeaseEvent>,
        client: ClientRef,
    ) -> Self {
        Lease {
            shared,
            grants: granted.grants,
            lifetime: granted.lifetime,
            renew_after: granted.renew_after,
            epoch: granted.epoch,
            narrowed: granted.narrowed,
            events,
            client,
            released: false,
        }
    }

    /// The lease's id, as the gateway and `fwnpctl` know it. It changes only after a
    /// [`LeaseEvent::Reopened`].
    ///
    /// ```no_run
    /// # async fn f(lease: fwnp_sdk::Lease) {
    /// println!("holding lease {}", lease.id());
    /// # }
    /// ```
    pub fn id(&self) -> LeaseId {
        self.shared.id()
    }

    /// What the gateway granted: one entry per protocol, port range and host address, each with
    /// the remote prefixes allowed. An opening without address has an entry on each address of
    /// the host (IPv4 and IPv6 alike); an application id expands to its catalogue entries here.
    ///
    /// ```no_run
    /// # async fn f(lease: fwnp_sdk::Lease) {
    /// for grant in lease.grants() {
    ///     println!("{}/{} on {}", grant.protocol, grant.ports, grant.host);
    /// }
    /// # }
    /// ```
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// The lifetime granted (the gateway's policy may have clamped what was asked).
    ///
    /// ```no_run
    /// # async fn f(lease: fwnp_sdk::Lease) {
    /// println!("granted for {:?}", lease.lifetime());
    /// # }
    /// ```
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// When the lease ends unless renewed, on this host's monotonic clock (see the type's
    /// documentation). It moves forward with every renewal.
    ///
    /// ```no_run
    /// # async fn f(lease: fwnp_sdk::Lease) {
    /// let left = lease.expires().saturating_duration_since(std::time::Instant::now());
    /// println!("{} s left", left.as_secs());
    /// # }
    /// ```
    pub fn expires(&self) -> Instant {
        self.shared.lock().expires
    }

    /// When the lease ends unless renewed, as the gateway's wall-clock time (from the Granted
    /// answer, then updated from each renewal's time left).
    ///
    /// ```no_run
    /// # async fn f(lease: fwnp_sdk::Lease) {
    /// println!("expires at {:?}", lease.gateway_expires());
    /// # }
    /// ```
    pub fn gateway_expires(&self) -> SystemTime {
        self.shared.lock().gateway_expires
    }

    /// The gateway's hint of when to renew, from the Granted answer. The agent renews by
    /// itself; this is for information.
    ///
    /// ```no_run
    /// # async fn f(lease: fwnp_sdk::Lease) {
    /// println!("renewed about every {:?}", lease.renew_after());
    /// # }
    /// ```
    pub fn renew_after(&self) -> Duration {
        self.renew_after
    }

    /// The gateway's epoch when the lease was granted.
    ///
    /// ```no_run
    /// # async fn f(lease: fwnp_sdk::Lease) {
    /// println!("epoch {:016x}", lease.epoch());
    /// # }
    /// ```
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Whether the grant is narrower than what was asked (a shorter lifetime, fewer ports or
    /// prefixes).
    ///
    /// ```no_run
    /// # async fn f(lease: fwnp_sdk::Lease) {
    /// if lease.narrowed() {
    ///     eprintln!("granted less than asked: {:?}", lease.grants());
    /// }
    /// # }
    /// ```
    pub fn narrowed(&self) -> bool {
        self.narrowed
    }

    /// Whether the opening is still in place: no terminal event has happened.
    ///
    /// ```no_run
    /// # async fn f(lease: fwnp_sdk::Lease) {
    /// assert!(lease.is_active());
    /// # }
    /// ```
    pub fn is_active(&self) -> bool {
        !self.shared.is_ended()
    }

    /// The next thing that happens to the lease. Returns `None` once a terminal event has been
    /// returned (or the lease's connection is gone and every event was read). Cancel-safe, so it
    /// can sit in a `tokio::select!`.
    ///
    /// ```no_run
    /// # async fn f(mut lease: fwnp_sdk::Lease) {
    /// tokio::select! {
    ///     Some(event) = lease.next_event() => eprintln!("{event}"),
    ///     _ = tokio::signal::ctrl_c() => {}
    /// }
    /// # }
    /// ```
    pub async fn next_event(&mut self) -> Option<LeaseEvent> {
        self.events.recv().await
    }

    /// Releases the lease now: the agent removes its mirror and tells the gateway, which
    /// closes the opening. Returns once the agent answered. A lease that already ended
    /// (revoked, expired), or that the agent no longer knew, is over either way and gives
    /// `Ok(())`.
    ///
    /// This ends this handle only. When another handle of the same client has the same lease
    /// (the same opening opened twice: the gateway merged the Opens into one lease), the
    /// opening stays for that one, and this returns at once without asking the agent: the
    /// connection holds the lease once, until its last handle goes. Likewise the agent keeps
    /// the opening while another application holds the same lease. [`crate::Client::release`]
    /// ends every handle of an id.
    ///
    /// ```no_run
    /// use fwnp_sdk::{Client, Opening};
    /// # async fn f() -> Result<(), fwnp_sdk::Error> {
    /// let client = Client::connect().await?;
    /// let first = client.open(Opening::tcp(8080)).await?;
    /// let second = client.open(Opening::tcp(8080)).await?;
    /// first.release().await?;
    /// assert!(second.is_active());
    /// second.release().await?; // now the agent releases it
    /// # Ok(())
    /// # }
    /// ```
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        if self.shared.is_ended() {
            // Its route went with the terminal event; nothing is left to release.
            return Ok(());
        }
        self.client.release_handle(self.shared.clone()).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.released {
            // Non-blocking: the request goes through the connection task's queue. If the task
            // is gone, the connection is closed and the agent has released the lease already.
            self.client.release_on_drop(self.shared.clone());
        }
    }
}
