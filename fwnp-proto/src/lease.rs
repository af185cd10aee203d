//! The client's lease state machine: one [`LeaseMachine`] per opening a host holds.
//!
//! The machine asks for a lease (Open), renews it inside the renewal window the gateway's hint
//! defines, retries with exponential backoff when answers are lost, re-opens when the gateway
//! forgot the lease (unknown-lease, or a new epoch), and ends in exactly one of the terminal
//! states: released, expired, revoked, failed (the Open was denied) or lost (the re-open was
//! denied).
//!
//! Like `quinn-proto`'s connection, it does no IO and reads no clock. Its owner (the host agent)
//! drives it:
//!
//! - [`LeaseMachine::poll_transmit`] gives the next request to send, if one is due; each request
//!   goes on its own stream and carries a fresh request id, except the retry of an unanswered
//!   request, which carries that request's id again (spec 15), and [`LeaseMachine::in_flight`]
//!   names the attempt, so that a late failure of an earlier attempt is told from its retry's;
//! - [`LeaseMachine::handle_answer`] takes the answer of that stream (Granted, Denied, Released),
//!   [`LeaseMachine::handle_notice`] a notice (Revoked, EpochChanged);
//! - [`LeaseMachine::poll_timeout`] says when to call [`LeaseMachine::handle_timeout`] next;
//! - [`LeaseMachine::poll_event`] tells what happened, for the application and for the host's
//!   mirror of the lease (add on Granted, refresh on Renewed, remove on the terminal events);
//! - [`LeaseMachine::release`], [`LeaseMachine::connection_lost`],
//!   [`LeaseMachine::reconnected`], [`LeaseMachine::epoch_observed`], [`LeaseMachine::listed`]
//!   and [`LeaseMachine::not_listed`] report what the owner learned.
//!
//! The schedule follows the protocol's rules: after a Granted at `t` with lifetime `L` and hint
//! `H`, renew at a uniformly random instant of `[t + H, t + H + L/8]`, never later than
//! `t + 7L/8`; wait [`REQUEST_TIMEOUT`] for an answer; on a lost answer, a lost connection or a
//! transient denial retry after [`FIRST_RETRY_DELAY`], doubling each time, capped at
//! [`MAX_RETRY_DELAY`] and at the time left before expiry, each delay jittered by
//! +-[`RETRY_JITTER`], a rate-limited answer's retry-after being the least delay; keep trying
//! until the lease expires. A first Open refused for now (`rate-limited`, `no-resources`) is not
//! retried: the refusal is the machine's answer ([`LeaseEvent::Denied`], with its
//! retry-after), as spec 11.9 retries only the Opens asked on the host's behalf. A
//! `hello-required` answer is no failure of the request: it goes again a second later (or on
//! the new connection its owner makes), and the backoff does not grow. A retry waiting for its
//! delay goes at once when a new connection comes up ([`LeaseMachine::reconnected`]): the delay
//! was for a gateway to talk to. When that connection comes is [`crate::link`]'s business.
//!
//! The local expiry is counted from the moment the request was *sent*, not answered: the
//! gateway granted the lease after that moment, so the host's mirror never outlives the
//! gateway's lease.
//!
//! The owner also tells the machine what it learns from the connection: every epoch it sees
//! (Welcome after a reconnect, Granted or Leases of other leases, EpochChanged) goes to
//! [`LeaseMachine::epoch_observed`]; a closed connection to [`LeaseMachine::connection_lost`].
//! GoingAway and Welcome are the owner's business, not the machine's.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use fwnp_proto::lease::{LeaseEvent, LeaseMachine, LeaseState};
//! use fwnp_proto::{Common, Granted, HostAddresses, LeaseId, Message, Opening, PortRange, Protocol, Target};
//! use rand::{SeedableRng, rngs::StdRng};
//!
//! let mut rng = StdRng::seed_from_u64(1);
//! let opening = Opening {
//!     target: Target::Ports { protocol: Protocol::Tcp, ports: PortRange::single(8080) },
//!     host: HostAddresses::Default,
//!     family: None,
//!     remotes: Vec::new(),
//! };
//! let start = Instant::now();
//! let mut lease = LeaseMachine::new(start, opening, Some(600), None, &mut rng);
//!
//! // The Open is due at once; the owner sends it on a new stream.
//! let Some(Message::Open(open)) = lease.poll_transmit(start) else { unreachable!() };
//!
//! // The gateway's answer comes back 30 ms later.
//! let answered = start + Duration::from_millis(30);
//! let granted = Message::Granted(Granted {
//!     common: Common { request_id: open.common.request_id, critical: Vec::new() },
//!     lease: LeaseId([7; 16]),
//!     grants: Vec::new(),
//!     lifetime: 600,
//!     expires_ms: 1_700_000_600_000,
//!     renew_after: 300,
//!     epoch: 42,
//!     narrowed: false,
//! });
//! lease.handle_answer(answered, &granted, &mut rng);
//! assert_eq!(lease.state(), LeaseState::Active);
//! assert!(matches!(lease.poll_event(), Some(LeaseEvent::Granted { .. })));
//! assert_eq!(lease.expires_at(), Some(start + Duration::from_secs(600)));
//!
//! // Nothing to send until the renewal instant, somewhere in [t + 300 s, t + 375 s], t being
//! // the instant the Open was sent (spec 11.8).
//! let renew_at = lease.poll_timeout().unwrap();
//! assert!(renew_at >= start + Duration::from_secs(300));
//! assert!(renew_at <= start + Duration::from_secs(375));
//! assert!(lease.poll_transmit(renew_at - Duration::from_millis(1)).is_none());
//! lease.handle_timeout(renew_at, &mut rng);
//! assert!(matches!(lease.poll_transmit(renew_at), Some(Message::Renew(_))));
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::message::{
    AppInfo, Common, Denied, Epoch, Grant, Granted, LeaseId, Message, Open, Opening, Release,
    Renew, ResultCode, RevokeReason, Revoked,
};

/// How long a Revoked notice for a lease id not yet known is remembered (spec 5.3: at least
/// 10 s), in case the Granted that names it comes after it.
pub const EARLY_REVOKED_KEPT: Duration = Duration::from_secs(30);

/// The most such notices one machine remembers: an Open grants one lease.
const MAX_EARLY_REVOKED: usize = 8;

/// How long an answer is awaited before the request counts as lost.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The delay before the first retry of a failed request.
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The longest delay between two attempts.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// The relative jitter applied to every retry delay: each delay is multiplied by a factor drawn
/// uniformly from `[1 - RETRY_JITTER, 1 + RETRY_JITTER]`.
pub const RETRY_JITTER: f64 = 0.2;

/// Where a lease machine stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseState {
    /// The first Open is being sent or retried; nothing is granted yet.
    Requesting,
    /// A lease is held; the next Renew is scheduled (or, after a refused renewal, the lease
    /// runs to its expiry).
    Active,
    /// A Renew is in flight or waiting to be retried; the lease is still held.
    Renewing,
    /// The gateway forgot the lease (unknown-lease or a new epoch): a fresh Open of the same
    /// opening is in flight or waiting to be retried. The old lease stays mirrored until its
    /// expiry.
    Reopening,
    /// Released by the owner (terminal). A Release may still be in flight.
    Released,
    /// The lease reached its expiry without being renewed (terminal).
    Expired,
    /// The gateway revoked the lease (terminal; no automatic re-open).
    Revoked(RevokeReason),
    /// The first Open was denied with a non-transient code (terminal).
    Failed(ResultCode),
    /// The lease was gone at the gateway and its re-open was denied (terminal).
    Lost(ResultCode),
}

impl LeaseState {
    /// Whether the machine reached one of its final states.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            LeaseState::Requesting
                | LeaseState::Active
                | LeaseState::Renewing
                | LeaseState::Reopening
        )
    }
}

/// Why a held lease is being opened again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReopenCause {
    /// A Renew was answered unknown-lease.
    UnknownLease,
    /// A List of the gateway (on a new connection, under the same epoch) no longer shows it.
    NotListed,
    /// The gateway's epoch changed (it lost its lease state).
    EpochChanged {
        /// The epoch the lease was granted under.
        old: Epoch,
        /// The epoch observed.
        new: Epoch,
    },
}

/// A lease as the client holds it: what the mirror installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedLease {
    /// The lease id chosen by the gateway.
    pub id: LeaseId,
    /// What was granted.
    pub grants: Vec<Grant>,
    /// The lifetime granted, in seconds.
    pub lifetime: u32,
    /// The gateway's renew-after hint, in seconds.
    pub renew_after: u32,
    /// The local expiry: the moment the granting request was sent plus the lifetime. The
    /// mirror must not hold the lease past it.
    pub expires_at: Instant,
    /// The expiry on the gateway's clock, Unix milliseconds.
    pub expires_ms: u64,
    /// The gateway epoch the lease was granted under.
    pub epoch: Epoch,
    /// Whether the gateway granted less than asked.
    pub narrowed: bool,
    /// When the granting answer arrived.
    pub granted_at: Instant,
}

/// What happened to a lease, for the application and the mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// A lease was granted: the mirror adds it. `replaces` names the lease it takes the place of
    /// after a re-open (the mirror removes that one).
    Granted {
        /// The lease.
        lease: GrantedLease,
        /// The previous lease id, when this grant is the answer to a re-open.
        replaces: Option<LeaseId>,
    },
    /// The lease was renewed: the mirror refreshes its expiry (and its grants, if they changed).
    Renewed {
        /// The lease after renewal.
        lease: GrantedLease,
    },
    /// The first Open was denied for good (state [`LeaseState::Failed`]).
    Denied {
        /// Why.
        code: ResultCode,
        /// The gateway's reason text.
        reason: Option<String>,
        /// The gateway's retry-after hint, in seconds.
        retry_after: Option<u32>,
    },
    /// A Renew was denied for good with a code other than unknown-lease: the lease stays
    /// mirrored until its expiry, then [`LeaseEvent::Expired`] follows. No further renewal is
    /// attempted.
    RenewRefused {
        /// The lease.
        lease: LeaseId,
        /// Why.
        code: ResultCode,
        /// The gateway's reason text.
        reason: Option<String>,
    },
    /// The gateway forgot the lease; a fresh Open of the same opening follows. The mirror keeps
    /// the old lease until its expiry.
    Reopening {
        /// The lease the gateway forgot.
        previous: LeaseId,
        /// Why the lease is opened again.
        cause: ReopenCause,
    },
    /// The re-open was denied (state [`LeaseState::Lost`]): the mirror removes the lease.
    Lost {
        /// The lease that was lost.
        previous: LeaseId,
        /// Why the re-open was denied.
        code: ResultCode,
        /// The gateway's reason text.
        reason: Option<String>,
    },
    /// The lease reached its local expiry: the mirror removes it.
    Expired {
        /// The lease.
        lease: LeaseId,
    },
    /// The gateway revoked the lease: the mirror removes it.
    Revoked {
        /// The lease.
        lease: LeaseId,
        /// Why.
        reason: RevokeReason,
        /// The gateway's explanation.
        text: Option<String>,
    },
    /// The owner released the lease: the mirror removes it now. `lease` is `None` when nothing
    /// was granted yet.
    Released {
        /// The lease released, if one was held.
        lease: Option<LeaseId>,
    },
}

/// Which request is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    Open,
    Renew,
    Release,
}

/// One sending of a request. A retry of an unanswered request carries the request id of the
/// attempt before it (spec 15), so the id does not tell the attempts apart; this does. Its owner
/// gets it from [`LeaseMachine::in_flight`] when it sends the request, and compares it when the
/// failure of an exchange reaches it, which may be after a newer attempt went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attempt(u64);

/// The request sent and not answered yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: RequestKind,
    request_id: u64,
    attempt: Attempt,
    sent_at: Instant,
    deadline: Instant,
    /// The lease a Renew or Release names.
    lease: Option<LeaseId>,
}

/// A Release still to deliver after the lease was released locally.
#[derive(Debug, Clone, Copy)]
struct Releasing {
    lease: LeaseId,
    /// Retries stop here: past the old expiry the gateway drops the lease by itself.
    until: Instant,
}

/// The client's state machine for one opening. See the [module documentation](self).
#[derive(Debug)]
pub struct LeaseMachine {
    opening: Opening,
    asked_lifetime: Option<u32>,
    app: Option<AppInfo>,
    state: LeaseState,
    /// The lease held, while the mirror should hold it.
    lease: Option<GrantedLease>,
    /// When the next request is due; `None` while one is in flight or nothing is to be sent.
    send_at: Option<Instant>,
    pending: Option<Pending>,
    releasing: Option<Releasing>,
    /// Released while an Open was in flight: a lease it yields is released at once.
    release_on_grant: bool,
    /// Failed attempts since the last success, for the backoff.
    attempt: u32,
    /// A retry-after the gateway asked for: no retry before it, not even on a new connection.
    not_before: Option<Instant>,
    next_request_id: u64,
    /// The request that went unanswered last, whose id its retry reuses (spec 15) if it asks
    /// the same thing: same type and same lease (the rest of a request does not change between
    /// attempts).
    unanswered: Option<(RequestKind, Option<LeaseId>, u64)>,
    /// Attempts sent so far; the next one's [`Attempt`].
    attempts: u64,
    /// The gateway refused to renew the lease for good: it is held, as the gateway holds it,
    /// until its expiry, and neither renewed nor opened again meanwhile.
    renewal_refused: bool,
    /// Revoked notices for lease ids this machine did not know, heard while an Open was on its
    /// way: the Granted that names one may come after its notice (spec 5.3). Bounded, and each
    /// kept [`EARLY_REVOKED_KEPT`].
    early_revoked: VecDeque<(Instant, Revoked)>,
    events: VecDeque<LeaseEvent>,
    ignored: u64,
}

impl LeaseMachine {
    /// A machine that asks for `opening` with `lifetime` (seconds; `None` for the policy's
    /// default), telling `app` for the audit trail. The first Open is due at `now`.
    ///
    /// The request ids of this machine start at a random value drawn from `rng` and count up,
    /// so machines sharing a connection do not reuse each other's ids.
    pub fn new<R: Rng + ?Sized>(
        now: Instant,
        opening: Opening,
        lifetime: Option<u32>,
        app: Option<AppInfo>,
        rng: &mut R,
    ) -> Self {
        LeaseMachine {
            opening,
            asked_lifetime: lifetime,
            app,
            state: LeaseState::Requesting,
            lease: None,
            send_at: Some(now),
            pending: None,
            releasing: None,
            release_on_grant: false,
            attempt: 0,
            not_before: None,
            next_request_id: rng.random(),
            unanswered: None,
            attempts: 0,
            renewal_refused: false,
            early_revoked: VecDeque::new(),
            events: VecDeque::new(),
            ignored: 0,
        }
    }

    /// A machine for a lease that no Open of its own obtained but that the gateway lists for the
    /// host (spec 11.7): one of an earlier run of the client, or one its owner let go of whose
    /// Release was lost. It is Active, holding `lease`, whose expiry and next renewal are
    /// reckoned as [`listed`](Self::listed) does, from what is left of it at `now`; `opening` is
    /// what a re-open would ask for.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use fwnp_proto::lease::{GrantedLease, LeaseMachine, LeaseState};
    /// use fwnp_proto::{LeaseId, Message, Opening, PortRange, Protocol, Target};
    /// let now = Instant::now();
    /// let opening = Opening {
    ///     target: Target::Ports { protocol: Protocol::Tcp, ports: PortRange::single(8080) },
    ///     host: Default::default(),
    ///     family: None,
    ///     remotes: vec![],
    /// };
    /// let lease = GrantedLease {
    ///     id: LeaseId([7; 16]),
    ///     grants: vec![],
    ///     lifetime: 60,
    ///     renew_after: 30,
    ///     expires_at: now + Duration::from_secs(60),
    ///     expires_ms: 1_700_000_060_000,
    ///     epoch: 1,
    ///     narrowed: false,
    ///     granted_at: now,
    /// };
    /// let mut machine = LeaseMachine::adopt(now, opening, lease, &mut rand::rng());
    /// assert_eq!(machine.state(), LeaseState::Active);
    /// machine.release(now);
    /// let release = machine.poll_transmit(now);
    /// assert!(matches!(release, Some(Message::Release(r)) if r.lease == LeaseId([7; 16])));
    /// ```
    pub fn adopt<R: Rng + ?Sized>(
        now: Instant,
        opening: Opening,
        lease: GrantedLease,
        rng: &mut R,
    ) -> Self {
        let left = lease.expires_at.saturating_duration_since(now);
        let remaining = u32::try_from(left.as_secs()).unwrap_or(u32::MAX);
        let expires_ms = lease.expires_ms;
        let mut machine = LeaseMachine::new(now, opening, None, None, rng);
        machine.state = LeaseState::Active;
        machine.send_at = None;
        machine.lease = Some(lease);
        machine.listed(now, remaining, expires_ms, rng);
        machine
    }

    /// The opening this machine asks for.
    pub fn opening(&self) -> &Opening {
        &self.opening
    }

    /// Where the machine stands.
    pub fn state(&self) -> LeaseState {
        self.state
    }

    /// The lease the mirror should hold now, if any: present in Active, Renewing and Reopening
    /// (the old lease, until its expiry), absent otherwise.
    pub fn lease(&self) -> Option<&GrantedLease> {
        self.lease.as_ref()
    }

    /// The id of the lease held, if any.
    pub fn lease_id(&self) -> Option<LeaseId> {
        self.lease.as_ref().map(|l| l.id)
    }

    /// What the held lease grants (empty when none is held).
    pub fn grants(&self) -> &[Grant] {
        self.lease.as_ref().map_or(&[], |l| l.grants.as_slice())
    }

    /// The local expiry of the held lease, if any.
    pub fn expires_at(&self) -> Option<Instant> {
        self.lease.as_ref().map(|l| l.expires_at)
    }

    /// The lease whose Release is still to deliver or awaits its answer, if any.
    pub fn releasing(&self) -> Option<LeaseId> {
        self.releasing.map(|r| r.lease)
    }

    /// When the next Renew is scheduled, while the lease is Active and renewable.
    pub fn renew_at(&self) -> Option<Instant> {
        match self.state {
            LeaseState::Active => self.send_at,
            _ => None,
        }
    }

    /// How many answers and notices were ignored because they did not belong to this machine
    /// (a wrong request id or lease id, an unexpected type, nothing in flight).
    pub fn ignored_messages(&self) -> u64 {
        self.ignored
    }

    /// Whether the machine is terminal and has nothing left to send or wait for: its owner may
    /// drop it.
    pub fn is_finished(&self) -> bool {
        self.state.is_terminal()
            && self.pending.is_none()
            && self.send_at.is_none()
            && self.events.is_empty()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<LeaseEvent> {
        self.events.pop_front()
    }

    /// The next deadline at which [`handle_timeout`](Self::handle_timeout) (or, for a due
    /// request, [`poll_transmit`](Self::poll_transmit)) has work: the renewal time, a retry, an
    /// answer timeout, the lease's expiry or the end of Release retries.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        consider(self.send_at);
        consider(self.pending.map(|p| p.deadline));
        if !self.state.is_terminal() {
            consider(self.expires_at());
        }
        consider(self.releasing.map(|r| r.until));
        next
    }

    /// The next request to send, if one is due at `now`. The answer is awaited for
    /// [`REQUEST_TIMEOUT`]; if the owner cannot send it, it calls
    /// [`connection_lost`](Self::connection_lost) (or lets the timeout expire).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Message> {
        if self.pending.is_some() {
            return None;
        }
        let due = self.send_at?;
        if due > now {
            return None;
        }
        // Past the expiry nothing is worth sending; handle_timeout ends the lease.
        if !self.state.is_terminal() && self.expires_at().is_some_and(|e| now >= e) {
            return None;
        }
        let (kind, lease) = match self.state {
            LeaseState::Requesting | LeaseState::Reopening => (RequestKind::Open, None),
            LeaseState::Active | LeaseState::Renewing => {
                self.state = LeaseState::Renewing;
                (RequestKind::Renew, self.lease_id())
            }
            LeaseState::Released => match self.releasing {
                Some(r) if now < r.until => (RequestKind::Release, Some(r.lease)),
                _ => {
                    self.send_at = None;
                    self.releasing = None;
                    return None;
                }
            },
            _ => {
                self.send_at = None;
                return None;
            }
        };
        let request_id = match self.unanswered.take() {
            Some((k, l, id)) if k == kind && l == lease => id,
            _ => {
                let id = self.next_request_id;
                self.next_request_id = self.next_request_id.wrapping_add(1);
                id
            }
        };
        let attempt = Attempt(self.attempts);
        self.attempts = self.attempts.wrapping_add(1);
        let common = Common {
            request_id: Some(request_id),
            critical: Vec::new(),
        };
        let message = match (kind, lease) {
            (RequestKind::Open, _) => Message::Open(Open {
                common,
                opening: self.opening.clone(),
                lifetime: self.asked_lifetime,
                app: self.app.clone(),
            }),
            (RequestKind::Renew, Some(lease)) => Message::Renew(Renew {
                common,
                lease,
                lifetime: self.asked_lifetime,
            }),
            (RequestKind::Release, Some(lease)) => Message::Release(Release { common, lease }),
            // A Renew or Release always names a lease; without one there is nothing to send.
            _ => {
                self.send_at = None;
                return None;
            }
        };
        self.send_at = None;
        self.pending = Some(Pending {
            kind,
            request_id,
            attempt,
            sent_at: now,
            deadline: now + REQUEST_TIMEOUT,
            lease,
        });
        Some(message)
    }

    /// Processes the timers due at `now`: the lease's expiry, an answer timeout, the end of
    /// Release retries.
    pub fn handle_timeout<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) {
        if matches!(
            self.state,
            LeaseState::Active | LeaseState::Renewing | LeaseState::Reopening
        ) && let Some(lease) = &self.lease
            && now >= lease.expires_at
        {
            let id = lease.id;
            self.lease = None;
            self.pending = None;
            self.send_at = None;
            self.state = LeaseState::Expired;
            self.events.push_back(LeaseEvent::Expired { lease: id });
            return;
        }
        if let Some(r) = self.releasing
            && now >= r.until
        {
            self.releasing = None;
            self.pending = None;
            self.send_at = None;
        }
        if let Some(p) = self.pending
            && now >= p.deadline
        {
            self.request_failed(now, Unanswered::Yes, rng);
        }
    }

    /// Takes the answer to a request: Granted, Denied or Released. Anything that does not
    /// belong to the request in flight is ignored and counted.
    ///
    /// An answer whose request id differs from the request in flight is ignored; one without a
    /// request id is taken as the answer to the request in flight (its stream says so).
    pub fn handle_answer<R: Rng + ?Sized>(&mut self, now: Instant, answer: &Message, rng: &mut R) {
        let Some(pending) = self.pending else {
            self.ignored += 1;
            return;
        };
        if answer
            .common()
            .request_id
            .is_some_and(|id| id != pending.request_id)
        {
            self.ignored += 1;
            return;
        }
        match answer {
            Message::Granted(granted) => self.on_granted(now, pending, granted, rng),
            Message::Denied(denied) => self.on_denied(now, pending, denied, rng),
            Message::Released(released)
                if pending.kind == RequestKind::Release
                    && pending.lease == Some(released.lease) =>
            {
                self.pending = None;
                self.releasing = None;
                self.send_at = None;
            }
            _ => self.ignored += 1,
        }
    }

    /// Takes a notice: Revoked for this machine's lease ends it; EpochChanged is
    /// [`epoch_observed`](Self::epoch_observed). Others are ignored and counted.
    pub fn handle_notice(&mut self, now: Instant, notice: &Message) {
        match notice {
            Message::Revoked(revoked) => {
                let held = matches!(
                    self.state,
                    LeaseState::Active | LeaseState::Renewing | LeaseState::Reopening
                ) && self.lease_id() == Some(revoked.lease);
                if held {
                    self.lease = None;
                    self.pending = None;
                    self.send_at = None;
                    self.state = LeaseState::Revoked(revoked.reason);
                    self.events.push_back(LeaseEvent::Revoked {
                        lease: revoked.lease,
                        reason: revoked.reason,
                        text: revoked.text.clone(),
                    });
                } else if self.releasing.is_some_and(|r| r.lease == revoked.lease) {
                    // Already released locally; the gateway ended it too: stop the Release.
                    self.releasing = None;
                    self.pending = None;
                    self.send_at = None;
                } else if matches!(self.state, LeaseState::Requesting | LeaseState::Reopening) {
                    // Perhaps the lease the Open on its way is granting: remembered, so that a
                    // Granted naming it is taken as revoked at once.
                    self.early_revoked.retain(|(heard, _)| {
                        now.saturating_duration_since(*heard) < EARLY_REVOKED_KEPT
                    });
                    if self.early_revoked.len() == MAX_EARLY_REVOKED {
                        self.early_revoked.pop_front();
                    }
                    self.early_revoked.push_back((now, revoked.clone()));
                } else {
                    self.ignored += 1;
                }
            }
            Message::EpochChanged(changed) => self.epoch_observed(now, changed.epoch),
            _ => self.ignored += 1,
        }
    }

    /// The owner saw the gateway's epoch (in a Welcome, a Granted, a Leases answer or an
    /// EpochChanged notice). If a lease is held under another epoch, the gateway lost it: a
    /// fresh Open of the same opening is sent at once, and the old lease stays mirrored until
    /// its expiry. A lease whose renewal the gateway refused is left to its expiry.
    pub fn epoch_observed(&mut self, now: Instant, epoch: Epoch) {
        if !matches!(self.state, LeaseState::Active | LeaseState::Renewing) || self.renewal_refused
        {
            return;
        }
        let Some(lease) = &self.lease else { return };
        if lease.epoch != epoch {
            let cause = ReopenCause::EpochChanged {
                old: lease.epoch,
                new: epoch,
            };
            self.begin_reopen(now, cause);
        }
    }

    /// The gateway's List no longer shows the lease (spec 11.10, Reopening): a fresh Open of the
    /// opening is sent at once, retried per spec 11.9, and the lease stays until its expiry
    /// (then [`LeaseEvent::Expired`]) unless a Granted replaces it first. Only an Active or
    /// Renewing lease is concerned, and not one whose renewal the gateway refused.
    pub fn not_listed(&mut self, now: Instant) {
        if matches!(self.state, LeaseState::Active | LeaseState::Renewing) && !self.renewal_refused
        {
            self.begin_reopen(now, ReopenCause::NotListed);
        }
    }

    /// The gateway's List, received at `now`, shows the lease with `remaining` seconds left and
    /// the expiry `expires_ms` on its clock (spec 11.7): the lease is kept, and its expiry and
    /// next renewal are reckoned as spec 11.8 says for a lease learned from Leases, with
    /// `t = now`, `L = remaining` and no hint (`H = L/2`): it expires at `now + remaining`, and
    /// an Active lease is renewed at a random instant of `[t + L/2, t + 5L/8]`. A Renew on its
    /// way or waiting to be retried is left to go (its Granted schedules the next one), and a
    /// lease whose renewal the gateway refused is still not renewed. Any other state is left as
    /// it is.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use fwnp_proto::lease::LeaseMachine;
    /// use fwnp_proto::{Opening, PortRange, Protocol, Target};
    /// let now = Instant::now();
    /// let opening = Opening {
    ///     target: Target::Ports { protocol: Protocol::Tcp, ports: PortRange::single(8080) },
    ///     host: Default::default(),
    ///     family: None,
    ///     remotes: vec![],
    /// };
    /// let mut machine = LeaseMachine::new(now, opening, None, None, &mut rand::rng());
    /// machine.listed(now, 60, 1_700_000_060_000, &mut rand::rng()); // no lease yet
    /// assert_eq!(machine.expires_at(), None);
    /// ```
    pub fn listed<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        remaining: u32,
        expires_ms: u64,
        rng: &mut R,
    ) {
        if !matches!(self.state, LeaseState::Active | LeaseState::Renewing) {
            return;
        }
        let Some(lease) = self.lease.as_mut() else {
            return;
        };
        let left = Duration::from_secs(u64::from(remaining));
        lease.expires_at = now + left;
        lease.expires_ms = expires_ms;
        if self.state == LeaseState::Active && !self.renewal_refused {
            let (start, end) = window(left, left / 2);
            self.send_at = Some(now + start + random_part(end - start, rng));
        }
    }

    /// The connection carrying the request in flight was lost: the request counts as failed and
    /// is retried on the backoff schedule.
    pub fn connection_lost<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) {
        if self.pending.is_some() {
            self.request_failed(now, Unanswered::Yes, rng);
        }
    }

    /// The attempt in flight, if any: an owner that learns of the failure of an earlier attempt
    /// (its connection died) after [`reconnected`](Self::reconnected) sent the request again
    /// must not report that failure against the new attempt, which may carry the same request
    /// id.
    pub fn in_flight(&self) -> Option<Attempt> {
        self.pending.map(|p| p.attempt)
    }

    /// A new connection to the gateway is up. A request still in flight went on an earlier
    /// connection and its answer will not come: it counts as failed. A retry waiting for its
    /// backoff is due at once (but not before a retry-after the gateway asked for): the wait
    /// was for a gateway to talk to, and there is one again. A renewal scheduled for later
    /// stays where it is.
    pub fn reconnected<R: Rng + ?Sized>(&mut self, now: Instant, rng: &mut R) {
        if self.pending.is_some() {
            self.request_failed(now, Unanswered::Yes, rng);
        }
        if self.pending.is_none()
            && self.state != LeaseState::Active
            && let Some(at) = self.send_at
        {
            let earliest = self.not_before.map_or(now, |floor| floor.max(now));
            self.send_at = Some(at.min(earliest));
        }
    }

    /// The owner moved to another gateway of the same cluster (the same epoch): an Active
    /// lease is renewed at once, so that the new gateway confirms it (or answers
    /// `unknown-lease`, and the machine opens it again) long before it runs out. Any other
    /// state is left as it is: a request in flight or due already goes on the new connection
    /// through [`reconnected`](Self::reconnected).
    ///
    /// ```
    /// use std::time::Instant;
    /// use fwnp_proto::lease::{LeaseMachine, LeaseState};
    /// use fwnp_proto::{Opening, PortRange, Protocol, Target};
    /// let now = Instant::now();
    /// let opening = Opening {
    ///     target: Target::Ports { protocol: Protocol::Tcp, ports: PortRange::single(8080) },
    ///     host: Default::default(),
    ///     family: None,
    ///     remotes: vec![],
    /// };
    /// let mut machine = LeaseMachine::new(now, opening, None, None, &mut rand::rng());
    /// machine.renew_now(now); // not Active yet: nothing changes
    /// assert_eq!(machine.state(), LeaseState::Requesting);
    /// ```
    pub fn renew_now(&mut self, now: Instant) {
        if self.state == LeaseState::Active && self.pending.is_none() && !self.renewal_refused {
            let earliest = self.not_before.map_or(now, |floor| floor.max(now));
            self.send_at = Some(self.send_at.map_or(earliest, |at| at.min(earliest)));
        }
    }

    /// The lifetime later Renews and re-opens ask (`None`: the lifetime last granted for a
    /// Renew, the policy's default for an Open), and the application information a re-open
    /// tells. The owner changes them when the applications holding the lease change: several
    /// may hold one lease, the gateway having merged their identical Opens (spec 11.3).
    ///
    /// ```
    /// use std::time::Instant;
    /// use fwnp_proto::lease::LeaseMachine;
    /// use fwnp_proto::{Message, Opening, PortRange, Protocol, Target};
    /// let now = Instant::now();
    /// let opening = Opening {
    ///     target: Target::Ports { protocol: Protocol::Tcp, ports: PortRange::single(8080) },
    ///     host: Default::default(),
    ///     family: None,
    ///     remotes: vec![],
    /// };
    /// let mut machine = LeaseMachine::new(now, opening, Some(60), None, &mut rand::rng());
    /// machine.set_asked(Some(600), None);
    /// let Some(Message::Open(open)) = machine.poll_transmit(now) else { unreachable!() };
    /// assert_eq!(open.lifetime, Some(600));
    /// ```
    pub fn set_asked(&mut self, lifetime: Option<u32>, app: Option<AppInfo>) {
        self.asked_lifetime = lifetime;
        self.app = app;
    }

    /// Another Open was granted this machine's lease (the gateway merged it into the lease,
    /// spec 11.3) as `other`, which that Open's own machine computed: when `other` lasts longer,
    /// the lease now expires as it says, and an Active lease is renewed on its schedule instead
    /// (a renewal the gateway refused is asked again then: it has just granted the opening).
    /// A Renew in flight keeps its answer's say. Returns whether the expiry moved.
    pub fn extend<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        other: &GrantedLease,
        rng: &mut R,
    ) -> bool {
        if !matches!(self.state, LeaseState::Active | LeaseState::Renewing) {
            return false;
        }
        let Some(lease) = self.lease.as_mut() else {
            return false;
        };
        if lease.id != other.id || other.expires_at <= lease.expires_at {
            return false;
        }
        lease.expires_at = other.expires_at;
        lease.expires_ms = lease.expires_ms.max(other.expires_ms);
        lease.lifetime = other.lifetime;
        lease.renew_after = other.renew_after;
        // The gateway has just granted the opening again: a refusal to renew it no longer
        // stands.
        self.renewal_refused = false;
        if self.state == LeaseState::Active {
            let sent_at = other
                .expires_at
                .checked_sub(Duration::from_secs(u64::from(other.lifetime)))
                .unwrap_or(now);
            self.send_at = Some(renewal_instant(sent_at, other, rng).max(now));
        }
        true
    }

    /// The owner releases the opening. The lease is Released locally at once (the
    /// [`LeaseEvent::Released`] event tells the mirror to remove it); a Release is sent and
    /// retried until the old expiry at most.
    pub fn release(&mut self, now: Instant) {
        let previous = self.state;
        match previous {
            LeaseState::Requesting | LeaseState::Reopening => {
                // A lease the Open in flight may still yield must be released when it comes.
                let open_in_flight = self.pending.is_some_and(|p| p.kind == RequestKind::Open);
                self.release_on_grant = open_in_flight;
                if !open_in_flight {
                    self.pending = None;
                }
                self.send_at = None;
                // After unknown-lease or an epoch change the old lease is not at the gateway:
                // nothing to release there.
                let lease = self.lease.take().map(|l| l.id);
                self.state = LeaseState::Released;
                self.events.push_back(LeaseEvent::Released { lease });
            }
            LeaseState::Active | LeaseState::Renewing => {
                let Some(lease) = self.lease.take() else {
                    return;
                };
                self.pending = None;
                self.attempt = 0;
                self.releasing = Some(Releasing {
                    lease: lease.id,
                    until: lease.expires_at,
                });
                self.send_at = Some(now);
                self.state = LeaseState::Released;
                self.events.push_back(LeaseEvent::Released {
                    lease: Some(lease.id),
                });
            }
            _ => {}
        }
    }

    fn begin_reopen(&mut self, now: Instant, cause: ReopenCause) {
        let Some(lease) = &self.lease else { return };
        let previous = lease.id;
        self.pending = None;
        self.attempt = 0;
        self.state = LeaseState::Reopening;
        self.send_at = Some(now);
        self.events
            .push_back(LeaseEvent::Reopening { previous, cause });
    }

    fn on_granted<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        pending: Pending,
        granted: &Granted,
        rng: &mut R,
    ) {
        let fresh = GrantedLease {
            id: granted.lease,
            grants: granted.grants.clone(),
            lifetime: granted.lifetime,
            renew_after: granted.renew_after,
            expires_at: pending.sent_at + Duration::from_secs(u64::from(granted.lifetime)),
            expires_ms: granted.expires_ms,
            epoch: granted.epoch,
            narrowed: granted.narrowed,
            granted_at: now,
        };
        match (pending.kind, self.state) {
            (RequestKind::Open, LeaseState::Requesting | LeaseState::Reopening) => {
                let replaces = self.lease.take().map(|l| l.id);
                self.pending = None;
                self.attempt = 0;
                self.send_at = Some(renewal_instant(pending.sent_at, &fresh, rng).max(now));
                self.state = LeaseState::Active;
                self.lease = Some(fresh.clone());
                let id = fresh.id;
                self.events.push_back(LeaseEvent::Granted {
                    lease: fresh,
                    replaces,
                });
                let revoked_before = self.early_revoked.iter().position(|(heard, r)| {
                    r.lease == id && now.saturating_duration_since(*heard) < EARLY_REVOKED_KEPT
                });
                if let Some((_, revoked)) =
                    revoked_before.and_then(|at| self.early_revoked.remove(at))
                {
                    self.handle_notice(now, &Message::Revoked(revoked));
                }
                self.early_revoked.clear();
            }
            (RequestKind::Open, LeaseState::Released) if self.release_on_grant => {
                // Released while this Open was in flight: give the lease straight back.
                self.pending = None;
                self.release_on_grant = false;
                self.attempt = 0;
                self.releasing = Some(Releasing {
                    lease: fresh.id,
                    until: fresh.expires_at,
                });
                self.send_at = Some(now);
            }
            (RequestKind::Renew, LeaseState::Renewing) if pending.lease == Some(granted.lease) => {
                self.pending = None;
                self.attempt = 0;
                self.send_at = Some(renewal_instant(pending.sent_at, &fresh, rng).max(now));
                self.state = LeaseState::Active;
                self.lease = Some(fresh.clone());
                self.events.push_back(LeaseEvent::Renewed { lease: fresh });
            }
            _ => self.ignored += 1,
        }
    }

    fn on_denied<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        pending: Pending,
        denied: &Denied,
        rng: &mut R,
    ) {
        if let (Some(named), Some(asked)) = (denied.lease, pending.lease)
            && named != asked
        {
            self.ignored += 1;
            return;
        }
        // A first Open refused for now goes back to its application with the gateway's code
        // and retry-after (spec 11.9 retries only the Opens asked on the host's behalf): the
        // application knows whether waiting is worth it, and a retry-after of minutes would
        // outlast its wait anyway.
        let first_open = pending.kind == RequestKind::Open && self.state == LeaseState::Requesting;
        // hello-required: the connection's state is wrong, not the request. Its owner connects
        // again (and says Hello); the request goes then, or after a second, and the failure is
        // not counted (spec 11.9).
        if denied.code == ResultCode::HelloRequired {
            self.pending = None;
            self.unanswered = None;
            self.send_at = Some(now + FIRST_RETRY_DELAY);
            return;
        }
        if denied.code.is_transient() && !first_open {
            let retry_after = denied
                .retry_after
                .map(|s| Duration::from_secs(u64::from(s)));
            self.request_failed(now, Unanswered::No { retry_after }, rng);
            return;
        }
        self.pending = None;
        self.send_at = None;
        match (pending.kind, self.state) {
            (RequestKind::Open, LeaseState::Requesting) => {
                self.state = LeaseState::Failed(denied.code);
                self.events.push_back(LeaseEvent::Denied {
                    code: denied.code,
                    reason: denied.reason.clone(),
                    retry_after: denied.retry_after,
                });
            }
            (RequestKind::Open, LeaseState::Reopening) => {
                let previous = self.lease.take().map(|l| l.id);
                self.state = LeaseState::Lost(denied.code);
                if let Some(previous) = previous {
                    self.events.push_back(LeaseEvent::Lost {
                        previous,
                        code: denied.code,
                        reason: denied.reason.clone(),
                    });
                }
            }
            (RequestKind::Open, LeaseState::Released) => self.release_on_grant = false,
            (RequestKind::Renew, LeaseState::Renewing) => {
                if denied.code == ResultCode::UnknownLease {
                    self.begin_reopen(now, ReopenCause::UnknownLease);
                } else if let Some(lease) = &self.lease {
                    // The lease lives on at the gateway until its expiry; it is not renewed, nor
                    // opened again should a list or an epoch miss it.
                    self.state = LeaseState::Active;
                    self.renewal_refused = true;
                    self.events.push_back(LeaseEvent::RenewRefused {
                        lease: lease.id,
                        code: denied.code,
                        reason: denied.reason.clone(),
                    });
                }
            }
            // unknown-lease: already gone; anything else: the gateway's expiry ends it.
            (RequestKind::Release, _) => self.releasing = None,
            _ => self.ignored += 1,
        }
    }

    /// The request in flight failed (timeout, lost connection, transient denial): schedule the
    /// next attempt, or give up where there is nothing left to try for.
    fn request_failed<R: Rng + ?Sized>(&mut self, now: Instant, how: Unanswered, rng: &mut R) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let retry_after = match how {
            Unanswered::Yes => {
                self.unanswered = Some((pending.kind, pending.lease, pending.request_id));
                None
            }
            // An answered attempt is not retried under its id: a gateway that keeps recent
            // answers (spec 15) would give the same refusal again.
            Unanswered::No { retry_after } => {
                self.unanswered = None;
                retry_after
            }
        };
        let limit = match self.state {
            LeaseState::Requesting => None,
            LeaseState::Renewing | LeaseState::Reopening => self.expires_at(),
            LeaseState::Released if pending.kind == RequestKind::Release => match self.releasing {
                Some(r) => Some(r.until),
                None => return,
            },
            LeaseState::Released => {
                // An Open in flight at release time: its lease, if any, will expire by itself.
                self.release_on_grant = false;
                return;
            }
            _ => return,
        };
        let delay = retry_delay(
            self.attempt,
            limit.map(|l| l.saturating_duration_since(now)),
            rng,
        );
        let delay = retry_after.map_or(delay, |min| delay.max(min));
        self.attempt = self.attempt.saturating_add(1);
        self.not_before = retry_after.map(|min| now + min);
        self.send_at = Some(now + delay);
    }
}

/// Whether a failed attempt went unanswered (timeout, reset stream, lost connection) or was
/// answered with a transient refusal.
#[derive(Debug, Clone, Copy)]
enum Unanswered {
    Yes,
    No { retry_after: Option<Duration> },
}

/// The window, as offsets from the Granted, in which a lease of `lifetime` seconds with the
/// gateway's hint `renew_after` is renewed: `[H, H + L/8]`, both ends capped at `7L/8` (spec
/// 11.8). A hint of 0 is a hint like any other: the window is the first eighth of the lifetime.
/// Only a lease learned from Leases has none; spec 11.8 takes half its lifetime then.
pub fn renewal_window(lifetime: u32, renew_after: u32) -> (Duration, Duration) {
    window(
        Duration::from_secs(u64::from(lifetime)),
        Duration::from_secs(u64::from(renew_after)),
    )
}

/// [`renewal_window`] for a lifetime and a hint that need not be whole seconds (half of an odd
/// `remaining` is not).
fn window(lifetime: Duration, hint: Duration) -> (Duration, Duration) {
    let latest = lifetime * 7 / 8;
    let start = hint.min(latest);
    let end = (hint + lifetime / 8).min(latest);
    (start, end)
}

/// A uniformly random instant of the renewal window of `lease`, whose granting request was
/// sent at `sent_at` (spec 11.8's t).
fn renewal_instant<R: Rng + ?Sized>(
    sent_at: Instant,
    lease: &GrantedLease,
    rng: &mut R,
) -> Instant {
    let (start, end) = renewal_window(lease.lifetime, lease.renew_after);
    sent_at + start + random_part(end - start, rng)
}

/// A uniformly random duration of `[0, span]`.
fn random_part<R: Rng + ?Sized>(span: Duration, rng: &mut R) -> Duration {
    let span = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=span))
}

/// The un-jittered delay before retry number `attempt` (0 for the first retry): 1 s doubling,
/// capped at [`MAX_RETRY_DELAY`] and at `time_left` when the lease has an expiry.
pub fn retry_base_delay(attempt: u32, time_left: Option<Duration>) -> Duration {
    // 2^6 s is already above the cap; stopping the shift there avoids overflow.
    let doubled = FIRST_RETRY_DELAY * (1u32 << attempt.min(6));
    let capped = doubled.min(MAX_RETRY_DELAY);
    time_left.map_or(capped, |left| capped.min(left))
}

/// The jittered delay before retry number `attempt`.
fn retry_delay<R: Rng + ?Sized>(
    attempt: u32,
    time_left: Option<Duration>,
    rng: &mut R,
) -> Duration {
    let factor = rng.random_range((1.0 - RETRY_JITTER)..=(1.0 + RETRY_JITTER));
    retry_base_delay(attempt, time_left).mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// An opening of tcp/8080 on the host's addresses.
    fn tcp_8080() -> Opening {
        use crate::message::{HostAddresses, PortRange, Protocol, Target};
        Opening {
            target: Target::Ports {
                protocol: Protocol::Tcp,
                ports: PortRange::single(8080),
            },
            host: HostAddresses::Default,
            family: None,
            remotes: Vec::new(),
        }
    }

    /// The Granted of lease 7 for `lifetime` seconds (its hint half of it) that answers `open`.
    fn granted_7(open: &Open, lifetime: u32) -> Message {
        Message::Granted(Granted {
            common: Common {
                request_id: open.common.request_id,
                critical: Vec::new(),
            },
            lease: LeaseId([7; 16]),
            grants: Vec::new(),
            lifetime,
            expires_ms: 1_700_000_000_000 + u64::from(lifetime) * 1000,
            renew_after: lifetime / 2,
            epoch: 42,
            narrowed: false,
        })
    }

    /// A lease granted for 60 s, then to another Open (merged into it by the gateway) for
    /// 600 s 10 s later: the lease expires and is renewed as the later grant says; a grant that
    /// ends sooner, or one of another lease, changes nothing.
    #[test]
    fn a_merged_grant_that_lasts_longer_extends_the_lease() {
        let mut rng = StdRng::seed_from_u64(3);
        let start = Instant::now();
        let mut first = LeaseMachine::new(start, tcp_8080(), Some(60), None, &mut rng);
        let Some(Message::Open(open)) = first.poll_transmit(start) else {
            panic!("an Open is due");
        };
        first.handle_answer(start, &granted_7(&open, 60), &mut rng);
        let later = start + Duration::from_secs(10);
        let mut second = LeaseMachine::new(later, tcp_8080(), Some(600), None, &mut rng);
        let Some(Message::Open(open)) = second.poll_transmit(later) else {
            panic!("an Open is due");
        };
        second.handle_answer(later, &granted_7(&open, 600), &mut rng);
        let longer = second.lease().cloned().expect("granted");

        assert!(!second.extend(later, first.lease().expect("granted"), &mut rng));
        let mut other = longer.clone();
        other.id = LeaseId([8; 16]);
        assert!(!first.extend(later, &other, &mut rng));
        assert!(first.extend(later, &longer, &mut rng));
        assert_eq!(first.expires_at(), Some(later + Duration::from_secs(600)));
        let renew_at = first.renew_at().expect("a renewal is scheduled");
        assert!(renew_at >= later + Duration::from_secs(300), "{renew_at:?}");
        assert!(renew_at <= later + Duration::from_secs(375), "{renew_at:?}");
    }

    /// A renew-after of 0 is a hint like any other (spec 11.8): the lease is renewed within the
    /// first eighth of its lifetime, not from its half as a lease without a hint would be.
    #[test]
    fn a_renew_after_of_zero_renews_within_the_first_eighth() {
        assert_eq!(
            renewal_window(80, 0),
            (Duration::ZERO, Duration::from_secs(10))
        );
        let mut rng = StdRng::seed_from_u64(3);
        let start = Instant::now();
        for _ in 0..50 {
            let mut machine = LeaseMachine::new(start, tcp_8080(), Some(80), None, &mut rng);
            let Some(Message::Open(open)) = machine.poll_transmit(start) else {
                panic!("the Open is due at once");
            };
            let Message::Granted(mut granted) = granted_7(&open, 80) else {
                unreachable!()
            };
            granted.renew_after = 0;
            let answered = start + Duration::from_millis(10);
            machine.handle_answer(answered, &Message::Granted(granted), &mut rng);
            let renew_at = machine.renew_at().expect("a renewal is scheduled");
            assert!(
                renew_at >= answered && renew_at <= start + Duration::from_secs(10),
                "renewal {:?} after the Open",
                renew_at - start
            );
        }
    }

    /// A lease a List shows is kept on the List's terms (spec 11.7, 11.8): it expires at the
    /// List's receipt plus `remaining`, and is renewed from half of that, without the hint of its
    /// Granted; a Renew on its way is left to its answer, and a lease whose renewal was refused
    /// is not renewed because a List showed it.
    #[test]
    fn a_listed_lease_is_renewed_on_the_lists_terms() {
        let mut rng = StdRng::seed_from_u64(11);
        let start = Instant::now();
        let granted_at = |rng: &mut StdRng| {
            let mut machine = LeaseMachine::new(start, tcp_8080(), Some(600), None, rng);
            let Some(Message::Open(open)) = machine.poll_transmit(start) else {
                panic!("the Open is due at once");
            };
            machine.handle_answer(start, &granted_7(&open, 600), rng);
            machine
        };
        let listed_at = start + Duration::from_secs(100);
        for _ in 0..50 {
            let mut machine = granted_at(&mut rng);
            machine.listed(listed_at, 201, 1_700_000_301_000, &mut rng);
            let left = Duration::from_secs(201);
            assert_eq!(machine.expires_at(), Some(listed_at + left));
            assert_eq!(
                machine.lease().map(|l| l.expires_ms),
                Some(1_700_000_301_000)
            );
            let renew_at = machine.renew_at().expect("a renewal is scheduled");
            assert!(
                renew_at >= listed_at + left / 2 && renew_at <= listed_at + left * 5 / 8,
                "renewal {:?} after the List",
                renew_at - listed_at
            );
        }

        let mut renewing = granted_at(&mut rng);
        let renew_at = renewing.renew_at().expect("a renewal");
        let Some(Message::Renew(_)) = renewing.poll_transmit(renew_at) else {
            panic!("the Renew is due");
        };
        renewing.listed(renew_at, 300, 1_700_000_600_000, &mut rng);
        assert_eq!(renewing.state(), LeaseState::Renewing);
        assert!(renewing.in_flight().is_some(), "the Renew is still awaited");
        assert_eq!(
            renewing.expires_at(),
            Some(renew_at + Duration::from_secs(300))
        );

        let mut refused = granted_at(&mut rng);
        let renew_at = refused.renew_at().expect("a renewal");
        let Some(Message::Renew(renew)) = refused.poll_transmit(renew_at) else {
            panic!("the Renew is due");
        };
        let refusal = Message::Denied(Denied {
            common: renew.common.clone(),
            code: ResultCode::NotAuthorized,
            reason: None,
            retry_after: None,
            lease: None,
            unsupported: Vec::new(),
        });
        refused.handle_answer(renew_at, &refusal, &mut rng);
        refused.listed(renew_at, 200, 1_700_000_500_000, &mut rng);
        assert_eq!(refused.renew_at(), None, "renewed after a refusal");
        assert_eq!(
            refused.poll_transmit(renew_at + Duration::from_secs(150)),
            None
        );
    }

    /// A Revoked notice may come before the Granted that creates its lease (spec 5.3): the
    /// machine remembers it, and takes the Granted as revoked at once; nothing is renewed or
    /// opened again. A notice for another id changes nothing.
    #[test]
    fn a_revoked_notice_that_overtakes_its_granted_revokes_the_lease_it_names() {
        let mut rng = StdRng::seed_from_u64(9);
        let opening = tcp_8080();
        let revoked = |lease| {
            Message::Revoked(Revoked {
                common: Common::default(),
                lease,
                reason: RevokeReason::Operator,
                text: Some("by the operator".into()),
            })
        };
        for (notice_for, revoked_at_once) in [(LeaseId([7; 16]), true), (LeaseId([8; 16]), false)] {
            let sent = Instant::now();
            let mut lease = LeaseMachine::new(sent, opening.clone(), Some(600), None, &mut rng);
            let Some(Message::Open(open)) = lease.poll_transmit(sent) else {
                panic!("the Open is due at once");
            };
            lease.handle_notice(sent + Duration::from_millis(5), &revoked(notice_for));
            let granted = granted_7(&open, 600);
            lease.handle_answer(sent + Duration::from_millis(10), &granted, &mut rng);
            assert!(matches!(
                lease.poll_event(),
                Some(LeaseEvent::Granted { .. })
            ));
            if revoked_at_once {
                assert!(matches!(
                    lease.poll_event(),
                    Some(LeaseEvent::Revoked {
                        lease: LeaseId([7, ..]),
                        reason: RevokeReason::Operator,
                        ..
                    })
                ));
                assert_eq!(lease.state(), LeaseState::Revoked(RevokeReason::Operator));
                assert_eq!(
                    lease.poll_timeout(),
                    None,
                    "nothing renewed or opened again"
                );
            } else {
                assert!(lease.poll_event().is_none());
                assert_eq!(lease.state(), LeaseState::Active);
            }
        }
    }

    /// The renewal window counts from the instant the request was sent, not from its answer
    /// (spec 11.8): an answer that took half of a short lifetime to come leaves the renewal
    /// within t + 7L/8, before the local expiry at t + L.
    #[test]
    fn the_renewal_counts_from_the_request_sent_not_its_slow_answer() {
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let opening = tcp_8080();
            let sent = Instant::now();
            let mut lease = LeaseMachine::new(sent, opening, Some(10), None, &mut rng);
            let Some(Message::Open(open)) = lease.poll_transmit(sent) else {
                panic!("the Open is due at once");
            };
            let answered = sent + Duration::from_millis(4_900);
            let granted = granted_7(&open, 10);
            lease.handle_answer(answered, &granted, &mut rng);
            assert_eq!(lease.expires_at(), Some(sent + Duration::from_secs(10)));
            let renew_at = lease.poll_timeout().expect("a renewal is due");
            assert!(renew_at >= sent + Duration::from_secs(5), "seed {seed}");
            assert!(
                renew_at <= sent + Duration::from_millis(6_250),
                "seed {seed}: renewal {:?} after the send",
                renew_at - sent
            );
            assert!(renew_at >= answered, "never in the past");
        }
    }

    /// Spec 15: a request retried after an unanswered attempt (no answer in time, a lost
    /// connection) carries the id of that attempt; each attempt is told apart by its
    /// [`Attempt`]. A request retried after an answered, transient refusal is sent under a new
    /// id, and so is a different request.
    #[test]
    fn an_unanswered_request_is_retried_under_its_id_and_an_answered_one_under_a_new_id() {
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        let mut lease = LeaseMachine::new(t0, tcp_8080(), Some(60), None, &mut rng);
        let id = |m: &Message| m.common().request_id.expect("every request carries an id");
        let send = |lease: &mut LeaseMachine, rng: &mut StdRng, mut now: Instant| {
            for _ in 0..100 {
                if let Some(message) = lease.poll_transmit(now) {
                    return (now, message, lease.in_flight().expect("in flight"));
                }
                now = lease.poll_timeout().expect("something is due");
                lease.handle_timeout(now, rng);
            }
            panic!("nothing sent");
        };

        // The Open times out, then its connection is lost: both retries reuse its id.
        let (now, first, first_attempt) = send(&mut lease, &mut rng, t0);
        let (now, second, second_attempt) = send(&mut lease, &mut rng, now);
        assert!(now >= t0 + REQUEST_TIMEOUT, "retried after the timeout");
        assert_eq!(id(&second), id(&first));
        assert_ne!(second_attempt, first_attempt);
        lease.connection_lost(now, &mut rng);
        lease.reconnected(now, &mut rng);
        let (now, third, third_attempt) = send(&mut lease, &mut rng, now);
        assert_eq!(id(&third), id(&first));
        assert_ne!(third_attempt, second_attempt);

        // An answer to the third attempt: granted. The Renew is another request.
        let Message::Open(open) = &third else {
            panic!("{third:?}")
        };
        lease.handle_answer(now, &granted_7(open, 60), &mut rng);
        assert_eq!(lease.state(), LeaseState::Active);
        let (now, renew, _) = send(&mut lease, &mut rng, now);
        assert!(matches!(renew, Message::Renew(_)), "{renew:?}");
        assert_ne!(id(&renew), id(&first));

        // Refused no-resources: answered, so the retry is under a new id.
        let busy = Message::Denied(Denied {
            common: renew.common().clone(),
            code: ResultCode::NoResources,
            reason: None,
            retry_after: Some(1),
            lease: Some(LeaseId([7; 16])),
            unsupported: Vec::new(),
        });
        lease.handle_answer(now, &busy, &mut rng);
        let (_, retried, _) = send(&mut lease, &mut rng, now);
        assert!(matches!(retried, Message::Renew(_)), "{retried:?}");
        assert_ne!(id(&retried), id(&renew));
    }

    /// A renewal refused for good (not unknown-lease): the lease is held until its expiry, as
    /// the gateway holds it, and nothing brings it back meanwhile: neither a list that misses
    /// it, nor a new epoch, nor a move to another gateway of the cluster.
    #[test]
    fn a_lease_whose_renewal_was_refused_is_neither_renewed_nor_opened_again() {
        let mut rng = StdRng::seed_from_u64(5);
        let t0 = Instant::now();
        let mut lease = LeaseMachine::new(t0, tcp_8080(), Some(60), None, &mut rng);
        let Some(Message::Open(open)) = lease.poll_transmit(t0) else {
            panic!("the Open is due at once");
        };
        lease.handle_answer(t0, &granted_7(&open, 60), &mut rng);
        let renew_at = lease.renew_at().expect("a renewal");
        let renew = lease.poll_transmit(renew_at).expect("the Renew");
        let refusal = Message::Denied(Denied {
            common: renew.common().clone(),
            code: ResultCode::NotAuthorized,
            reason: None,
            retry_after: None,
            lease: Some(LeaseId([7; 16])),
            unsupported: Vec::new(),
        });
        lease.handle_answer(renew_at, &refusal, &mut rng);
        assert_eq!(lease.state(), LeaseState::Active);
        lease.not_listed(renew_at);
        lease.epoch_observed(renew_at, 43);
        lease.renew_now(renew_at);
        assert_eq!(lease.state(), LeaseState::Active);
        assert_eq!(lease.poll_transmit(renew_at), None, "nothing is sent");
        assert_eq!(
            lease.poll_timeout(),
            lease.expires_at(),
            "only the expiry is due"
        );
    }

    /// hello-required says the connection is wrong, not the request: the request goes again
    /// (after the owner connects again, or a second) and the failure is not counted in the
    /// backoff (spec 11.9).
    #[test]
    fn hello_required_is_retried_without_counting_a_failure() {
        let mut rng = StdRng::seed_from_u64(8);
        let t0 = Instant::now();
        let mut lease = LeaseMachine::new(t0, tcp_8080(), Some(60), None, &mut rng);
        let open = lease.poll_transmit(t0).expect("the Open");
        let hello_required = Message::Denied(Denied {
            common: open.common().clone(),
            code: ResultCode::HelloRequired,
            reason: None,
            retry_after: None,
            lease: None,
            unsupported: Vec::new(),
        });
        lease.handle_answer(t0, &hello_required, &mut rng);
        assert_eq!(lease.state(), LeaseState::Requesting);
        let again = t0 + FIRST_RETRY_DELAY;
        assert_eq!(lease.poll_timeout(), Some(again));
        assert!(lease.poll_transmit(again).is_some(), "sent again");
        // This attempt goes unanswered: its retry is the first of the backoff, about a second.
        let timed_out = again + REQUEST_TIMEOUT;
        lease.handle_timeout(timed_out, &mut rng);
        let retry = lease.poll_timeout().expect("a retry") - timed_out;
        assert!(
            retry >= FIRST_RETRY_DELAY.mul_f64(1.0 - RETRY_JITTER)
                && retry <= FIRST_RETRY_DELAY.mul_f64(1.0 + RETRY_JITTER),
            "{retry:?}"
        );
    }

    #[test]
    fn window_is_half_to_five_eighths_with_the_usual_hint() {
        let (start, end) = renewal_window(800, 400);
        assert_eq!(start, Duration::from_secs(400));
        assert_eq!(end, Duration::from_secs(500));
    }

    #[test]
    fn window_never_passes_seven_eighths() {
        let (start, end) = renewal_window(800, 790);
        assert_eq!(start, Duration::from_secs(700));
        assert_eq!(end, Duration::from_secs(700));
        let (start, end) = renewal_window(800, 650);
        assert_eq!(start, Duration::from_secs(650));
        assert_eq!(end, Duration::from_secs(700));
    }

    #[test]
    fn base_delay_doubles_and_caps() {
        let secs: Vec<u64> = (0..10)
            .map(|a| retry_base_delay(a, None).as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(retry_base_delay(u32::MAX, None), MAX_RETRY_DELAY);
        assert_eq!(
            retry_base_delay(5, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn jittered_delay_stays_within_twenty_percent() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..8 {
            let base = retry_base_delay(attempt, None);
            for _ in 0..200 {
                let d = retry_delay(attempt, None, &mut rng);
                assert!(
                    d >= base.mul_f64(0.8) && d <= base.mul_f64(1.2),
                    "{d:?} vs {base:?}"
                );
            }
        }
    }

    #[test]
    fn terminal_states() {
        assert!(!LeaseState::Requesting.is_terminal());
        assert!(!LeaseState::Reopening.is_terminal());
        assert!(LeaseState::Released.is_terminal());
        assert!(LeaseState::Lost(ResultCode::DeniedByPolicy).is_terminal());
    }
}
