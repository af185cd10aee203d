//! The agent's core: one task that owns every lease machine, the local connections and the
//! state of the link, and takes its inputs from one channel (requests of applications, answers
//! and notices from the gateway, the mirror's and the port check's results). Owning everything
//! in one place keeps the order of decisions simple: nothing is shared, nothing is locked.
//!
//! Each application lease is a [`LeaseMachine`] owned by the local connection that opened it.
//! The core sends what a machine wants to send (each request on its own stream, through a small
//! task), feeds it the answers, notices and epochs it sees, wakes it at its
//! [`LeaseMachine::poll_timeout`], and turns its events into mirror changes and Event frames.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnp_proto::lease::{GrantedLease, LeaseEvent, LeaseMachine, LeaseState};
use fwnp_proto::local::{
    DenialCode, Event, EventKind, LocalCode, LocalDenied, LocalMessage, StatusAnswer, Watching,
    encode_frame,
};
use fwnp_proto::{
    AppInfo, Common, Epoch, Granted, LeaseId, LeaseInfo, Leases, Message, Open, PortRange,
    Protocol, Released, ResultCode, Target,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::config::AgentConfig;
use crate::link::{ExchangeError, GatewayEvent, exchange};
use crate::mirror::{Mirror, MirrorError, elements_of};
use crate::ports::{CallerProcess, PortNotOwned, ProcFs};
use crate::server::Outbox;

/// How long an application's Open waits for the gateway's answer (across retries) before the
/// agent answers gateway-unreachable and gives up on it.
pub const OPEN_WAIT: Duration = Duration::from_secs(20);

/// While the gateway is unreachable, due requests wait; the core still wakes this often for
/// the machines' expiries.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// How often the core looks for idle local connections.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

/// A local connection's number.
pub type ConnId = u64;

/// Who is at the other end of a local connection, from its peer credentials and `/proc`.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The process id, when the kernel gave one.
    pub pid: Option<u32>,
    /// That very process (not just its pid), while it is still running as it was when it
    /// connected; `None` when it could not be pinned down, and then no port is verified as its.
    pub process: Option<CallerProcess>,
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Whether it may use the agent.
    pub authorized: bool,
    /// What goes into the Open's application information.
    pub app: AppInfo,
}

/// Everything the core reacts to.
#[derive(Debug)]
pub enum CoreInput {
    /// From the link.
    Gateway(GatewayEvent),
    /// The answer (or failure) of a request a machine sent.
    Answer {
        /// The machine.
        key: u64,
        /// The request's id: a failure reported after the machine sent the request again
        /// (on a newer connection) is not that new request's.
        request_id: Option<u64>,
        /// The answer.
        result: Result<Message, String>,
    },
    /// A new local connection.
    LocalConnected {
        /// Its number.
        conn: ConnId,
        /// Who it is.
        peer: Peer,
        /// Where its outgoing frames go.
        out: Outbox,
    },
    /// A request frame of a local connection.
    LocalRequest {
        /// The connection.
        conn: ConnId,
        /// The request.
        message: LocalMessage,
        /// Held until the core is done with the request: the connection's reader takes one
        /// per request, so a client cannot queue more than a few.
        permit: OwnedSemaphorePermit,
    },
    /// A local connection closed.
    LocalClosed {
        /// The connection.
        conn: ConnId,
    },
    /// The port check of an Open finished.
    OwnerChecked {
        /// The connection.
        conn: ConnId,
        /// The Open.
        open: Box<Open>,
        /// The holder's pid, or why the port is not the caller's.
        result: Result<u32, PortNotOwned>,
        /// The process the check was for.
        caller: CallerProcess,
        /// The request's permit (see `LocalRequest`).
        permit: OwnedSemaphorePermit,
    },
    /// The ports of a lease granted for an application id were checked (only then is it
    /// mirrored and answered).
    GrantsChecked {
        /// The machine.
        key: u64,
        /// The lease as granted.
        lease: Box<GrantedLease>,
        /// The lease it replaces, after a re-open.
        replaces: Option<LeaseId>,
        /// The ports checked, or why they are not the caller's.
        result: Result<Vec<(Protocol, PortRange)>, PortNotOwned>,
    },
    /// A verified lease's port is no longer its caller's (checked before a renewal or re-open,
    /// or by the periodic check): the lease ends.
    OwnerLost {
        /// The machine.
        key: u64,
        /// Why.
        reason: PortNotOwned,
    },
    /// A periodic check of every verified lease finished.
    OwnerSweepDone,
    /// The mirror took (or refused) a lease's elements.
    MirrorLanded {
        /// The machine.
        key: u64,
        /// The lease.
        lease: LeaseId,
        /// The outcome.
        result: Result<(), MirrorError>,
    },
    /// The mirror removed a released lease's elements; the Release requests can be answered.
    MirrorReleased {
        /// The connection that asked.
        conn: ConnId,
        /// The requests to answer.
        requests: Vec<(u64, LeaseId)>,
    },
    /// Release everything and stop.
    Shutdown(oneshot::Sender<()>),
}

/// A lease of an earlier run of the agent that the gateway still listed when this run first
/// connected. Its application lost its connection when that run ended.
struct EarlierLease {
    /// The mirror's holder number for its elements.
    holder: u64,
    lease: LeaseId,
    expires_at: Instant,
}

/// The state of the link as the core sees it.
enum LinkState {
    Down,
    Up { connection: quinn::Connection },
}

/// One application lease.
struct Held {
    conn: Option<ConnId>,
    machine: LeaseMachine,
    app: AppInfo,
    /// The application's Open awaiting its Granted, with its deadline.
    open_request: Option<(u64, Instant)>,
    /// Every lease id this lease had (re-opens give new ones); the last is the current one.
    ids: Vec<LeaseId>,
    /// Whether the mirror holds elements for this lease (under its key).
    mirrored: bool,
    /// This machine replaces another whose lease the gateway forgot.
    reopen_of: Option<LeaseId>,
    /// Release requests of the application (request id, the lease id it named), answered once
    /// the mirror let go.
    release_requests: Vec<(u64, LeaseId)>,
    /// The lifetime the application asked for.
    lifetime: Option<u32>,
    /// The verified caller and the ports checked again before each renewal and re-open and
    /// periodically; `None` when ports are not verified.
    owner: Option<Owner>,
    /// Why the agent ended the lease itself, told in the terminal event.
    ended_by_agent: Option<PortNotOwned>,
}

/// What a lease's ports are verified against.
#[derive(Debug, Clone)]
struct Owner {
    caller: CallerProcess,
    /// The ports; empty for an application id until its grants were checked.
    targets: Vec<(Protocol, PortRange)>,
    /// An application id: every Granted's ports are checked before it is mirrored.
    by_grants: bool,
}

struct LocalConn {
    peer: Peer,
    out: Outbox,
    /// Watches of all the connection's leases.
    watch_all: bool,
    /// Watches of one lease each.
    watches: HashSet<LeaseId>,
    /// The last request, for the idle timeout.
    last_request: Instant,
}

/// The core's state.
pub struct Core {
    config: Arc<AgentConfig>,
    mirror: Mirror,
    procfs: ProcFs,
    tx: mpsc::UnboundedSender<CoreInput>,
    rng: StdRng,
    link: LinkState,
    epoch: Option<Epoch>,
    identity: Option<String>,
    synced_once: bool,
    /// Leases of an earlier run, until `earlier_run_until`: then those no application asked for
    /// again are released. The end waits for Opens in flight (their answer may be one of these
    /// leases), but not past `earlier_run_latest`.
    earlier_run: Vec<EarlierLease>,
    earlier_run_until: Option<Instant>,
    earlier_run_latest: Option<Instant>,
    conns: HashMap<ConnId, LocalConn>,
    leases: HashMap<u64, Held>,
    next_key: u64,
    /// The next periodic check of verified leases' ports, and whether one is running.
    next_owner_sweep: Instant,
    owner_sweep_running: bool,
    /// The next look for idle connections.
    next_idle_sweep: Instant,
    /// The earliest local expiry of the leases held, for the link's reconnection schedule.
    earliest_expiry: watch::Sender<Option<Instant>>,
    /// Why the link is down, for Status: the last failed attempt or ended connection.
    last_link_error: Option<String>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("leases", &self.leases.len())
            .field("conns", &self.conns.len())
            .finish()
    }
}

impl Core {
    /// A core; `tx` is the sending side of its own input channel (for the tasks it starts).
    pub fn new(
        config: Arc<AgentConfig>,
        mirror: Mirror,
        tx: mpsc::UnboundedSender<CoreInput>,
    ) -> Self {
        Core {
            config,
            mirror,
            procfs: ProcFs::default(),
            tx,
            rng: StdRng::from_os_rng(),
            link: LinkState::Down,
            epoch: None,
            identity: None,
            synced_once: false,
            earlier_run: Vec::new(),
            earlier_run_until: None,
            earlier_run_latest: None,
            conns: HashMap::new(),
            leases: HashMap::new(),
            next_key: 1,
            next_owner_sweep: Instant::now(),
            owner_sweep_running: false,
            next_idle_sweep: Instant::now(),
            earliest_expiry: watch::Sender::new(None),
            last_link_error: None,
        }
    }

    /// The earliest local expiry of the leases the core holds, kept current: the link bounds
    /// its reconnection delays and handshakes by it.
    pub fn earliest_expiry(&self) -> watch::Receiver<Option<Instant>> {
        self.earliest_expiry.subscribe()
    }

    /// Runs until shut down or until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<CoreInput>) {
        loop {
            let now = Instant::now();
            let wake = self.next_wake(now);
            let input = tokio::select! {
                input = rx.recv() => input,
                _ = tokio::time::sleep_until(wake.into()) => {
                    self.on_timer(Instant::now());
                    continue;
                }
            };
            let Some(input) = input else { return };
            if let CoreInput::Shutdown(done) = input {
                self.shutdown(&mut rx).await;
                let _ = done.send(());
                return;
            }
            self.handle(input, Instant::now());
        }
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut next = now + Duration::from_secs(3600);
        let earliest = self
            .leases
            .values()
            .filter(|h| !h.machine.state().is_terminal())
            .filter_map(|h| h.machine.expires_at())
            .min();
        self.earliest_expiry.send_if_modified(|current| {
            let changed = *current != earliest;
            *current = earliest;
            changed
        });
        for held in self.leases.values() {
            if let Some(t) = held.machine.poll_timeout() {
                next = next.min(t);
            }
            if let Some((_, deadline)) = held.open_request {
                next = next.min(deadline);
            }
        }
        if let Some(until) = self.earlier_run_until {
            next = next.min(until);
        }
        if !self.conns.is_empty() {
            next = next.min(self.next_idle_sweep);
        }
        if !self.owner_sweep_running && self.leases.values().any(|h| h.owner.is_some()) {
            next = next.min(self.next_owner_sweep);
        }
        if matches!(self.link, LinkState::Down) {
            // Due sends wait for the link; do not spin on them.
            next = next.max(now + IDLE_TICK);
        }
        next
    }

    fn on_timer(&mut self, now: Instant) {
        if now >= self.next_idle_sweep {
            self.close_idle(now);
        }
        if now >= self.next_owner_sweep && !self.owner_sweep_running {
            self.sweep_owners(now);
        }
        if self.earlier_run_until.is_some_and(|until| until <= now) {
            let open_in_flight = self.leases.values().any(|h| h.open_request.is_some());
            if open_in_flight && self.earlier_run_latest.is_some_and(|latest| now < latest) {
                // The gateway may be extending one of these leases for that Open right now:
                // releasing it would end the lease it is about to grant.
                self.earlier_run_until = Some(now + IDLE_TICK);
            } else {
                // Nobody waits for these releases: each ends by itself (bounded by the
                // exchange's own timeout).
                drop(self.end_earlier_run(now));
            }
        }
        let keys: Vec<u64> = self.leases.keys().copied().collect();
        for key in keys {
            let Some(held) = self.leases.get_mut(&key) else {
                continue;
            };
            if held.machine.poll_timeout().is_some_and(|t| t <= now) {
                held.machine.handle_timeout(now, &mut self.rng);
            }
            if let Some((request_id, deadline)) = held.open_request
                && now >= deadline
            {
                held.open_request = None;
                held.machine.release(now);
                let conn = held.conn;
                if let Some(conn) = conn {
                    self.deny(
                        conn,
                        request_id,
                        DenialCode::Local(LocalCode::GatewayUnreachable),
                        "the gateway did not answer the request in time".into(),
                        None,
                    );
                }
            }
            self.drive(key, now);
        }
    }

    fn handle(&mut self, input: CoreInput, now: Instant) {
        match input {
            CoreInput::Gateway(GatewayEvent::Connected {
                connection,
                welcome,
                leases,
            }) => self.on_connected(connection, welcome, leases, now),
            CoreInput::Gateway(GatewayEvent::Notice(notice)) => self.on_notice(notice, now),
            CoreInput::Gateway(GatewayEvent::ConnectFailed { reason }) => {
                self.last_link_error = Some(reason);
            }
            CoreInput::Gateway(GatewayEvent::Disconnected { reason }) => {
                self.last_link_error = Some(format!("the connection ended: {reason}"));
                self.link = LinkState::Down;
                debug!(%reason, "link down");
                let keys: Vec<u64> = self.leases.keys().copied().collect();
                for key in keys {
                    let live = self.leases.get(&key).and_then(|h| {
                        (!h.machine.state().is_terminal())
                            .then(|| h.machine.lease_id())
                            .flatten()
                    });
                    if let Some(lease) = live {
                        self.emit(
                            key,
                            lease,
                            EventKind::GatewayUnreachable,
                            None,
                            Some(format!("connection to the gateway lost: {reason}")),
                            None,
                            None,
                        );
                    }
                }
            }
            CoreInput::Answer {
                key,
                request_id,
                result,
            } => {
                if let Some(held) = self.leases.get_mut(&key) {
                    match result {
                        Ok(answer) => held.machine.handle_answer(now, &answer, &mut self.rng),
                        Err(e) if held.machine.in_flight() == request_id => {
                            debug!(key, "request failed: {e}");
                            held.machine.connection_lost(now, &mut self.rng);
                        }
                        Err(e) => debug!(key, "an earlier request failed: {e}"),
                    }
                    self.drive(key, now);
                }
            }
            CoreInput::LocalConnected { conn, peer, out } => {
                self.conns.insert(
                    conn,
                    LocalConn {
                        peer,
                        out,
                        watch_all: false,
                        watches: HashSet::new(),
                        last_request: now,
                    },
                );
            }
            CoreInput::LocalRequest {
                conn,
                message,
                permit,
            } => self.on_request(conn, message, permit, now),
            CoreInput::LocalClosed { conn } => self.on_closed(conn, now),
            CoreInput::OwnerChecked {
                conn,
                open,
                result,
                caller,
                permit: _,
            } => match result {
                Ok(pid) => {
                    debug!(conn, holder = pid, "port owner verified");
                    let owner = match &open.opening.target {
                        Target::Ports { protocol, ports } => Some(Owner {
                            caller,
                            targets: vec![(*protocol, *ports)],
                            by_grants: false,
                        }),
                        Target::App(_) => None,
                    };
                    self.start_open(conn, *open, owner, now);
                }
                Err(e) => {
                    let request_id = open.common.request_id.unwrap_or(0);
                    info!(conn, "Open refused: {e}");
                    let code = match e {
                        PortNotOwned::Unreadable(_) => DenialCode::Wire(ResultCode::NoResources),
                        _ => DenialCode::Local(LocalCode::PortNotOwned),
                    };
                    self.deny(conn, request_id, code, e.to_string(), None);
                }
            },
            CoreInput::MirrorLanded { key, lease, result } => {
                self.on_mirror_landed(key, lease, result, now)
            }
            CoreInput::GrantsChecked {
                key,
                lease,
                replaces,
                result,
            } => self.on_grants_checked(key, *lease, replaces, result, now),
            CoreInput::OwnerLost { key, reason } => self.end_unowned(key, reason, now),
            CoreInput::OwnerSweepDone => {
                self.owner_sweep_running = false;
                self.next_owner_sweep = now + self.config.local.owner_check_interval;
            }
            CoreInput::MirrorReleased { conn, requests } => {
                for (request_id, lease) in requests {
                    self.send(
                        conn,
                        LocalMessage::Wire(Message::Released(Released {
                            common: common(request_id),
                            lease,
                        })),
                    );
                }
            }
            CoreInput::Shutdown(done) => {
                let _ = done.send(());
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // The link

    fn on_connected(
        &mut self,
        connection: quinn::Connection,
        welcome: fwnp_proto::Welcome,
        listed: Leases,
        now: Instant,
    ) {
        self.last_link_error = None;
        if let Some(old) = self.epoch
            && old != welcome.epoch
        {
            warn!(
                old = format_args!("{old:016x}"),
                new = format_args!("{:016x}", welcome.epoch),
                "the gateway's epoch changed: it lost its leases; re-requesting what applications hold"
            );
        }
        self.epoch = Some(welcome.epoch);
        self.identity = Some(welcome.identity.clone());
        self.link = LinkState::Up { connection };
        crate::state::record(&self.config.state_dir, welcome.epoch, &welcome.identity);

        let at_gateway: HashSet<LeaseId> = listed.leases.iter().map(|l| l.lease).collect();
        if !self.synced_once {
            // The first connection since start: the host table is made to match what the
            // gateway holds for this host. Openings of an earlier run stay for a grace period,
            // so that an application that asks again gets the same lease back without its
            // opening ever closing; then the agent releases the others.
            self.synced_once = true;
            let mut holders: Vec<_> = self
                .leases
                .iter()
                .filter_map(|(key, h)| {
                    let lease = h.machine.lease()?;
                    Some((*key, elements_of(&lease.grants), lease.expires_at))
                })
                .collect();
            for listed in &listed.leases {
                // A lease of an earlier run: held under a number of its own until it ends.
                let holder = self.next_key;
                self.next_key += 1;
                let expires_at = now + Duration::from_secs(u64::from(listed.remaining));
                holders.push((holder, elements_of(&listed.grants), expires_at));
                self.earlier_run.push(EarlierLease {
                    holder,
                    lease: listed.lease,
                    expires_at,
                });
            }
            if !self.earlier_run.is_empty() {
                info!(
                    leases = self.earlier_run.len(),
                    grace = ?self.config.local.earlier_run_grace,
                    "the gateway holds leases of an earlier run; those no application asks for again will be released"
                );
                let until = now + self.config.local.earlier_run_grace;
                self.earlier_run_until = Some(until);
                self.earlier_run_latest = Some(until + OPEN_WAIT);
            }
            let mirror = self.mirror.clone();
            tokio::spawn(async move {
                if let Err(e) = mirror.reconcile(holders).await {
                    warn!("reconciling the host table failed: {e}");
                }
            });
        } else {
            // A reconnection under the same epoch: a lease the gateway no longer lists (it
            // expired there while the link was down) is opened again at once by a fresh
            // machine; its mirror goes now.
            let forgotten: Vec<u64> = self
                .leases
                .iter()
                .filter(|(_, h)| {
                    matches!(h.machine.state(), LeaseState::Active | LeaseState::Renewing)
                        && h.machine.lease().is_some_and(|l| {
                            l.epoch == welcome.epoch && !at_gateway.contains(&l.id)
                        })
                })
                .map(|(k, _)| *k)
                .collect();
            for key in forgotten {
                self.replace_machine(key, now);
            }
        }
        let keys: Vec<u64> = self.leases.keys().copied().collect();
        for key in keys {
            if let Some(held) = self.leases.get_mut(&key) {
                held.machine.epoch_observed(now, welcome.epoch);
                // Requests lost with the old connection, and retries waiting for a gateway,
                // go on this one now.
                held.machine.reconnected(now, &mut self.rng);
            }
            self.drive(key, now);
        }
    }

    /// Replaces the machine of `key`, whose lease the gateway forgot, by a fresh one asking for
    /// the same opening.
    fn replace_machine(&mut self, key: u64, now: Instant) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        let Some(old) = held.machine.lease_id() else {
            return;
        };
        info!(%old, "the gateway no longer lists this lease; opening it again");
        let opening = held.machine.opening().clone();
        let lifetime = held.lifetime;
        held.machine = LeaseMachine::new(
            now,
            opening,
            lifetime,
            Some(held.app.clone()),
            &mut self.rng,
        );
        held.reopen_of = Some(old);
        if std::mem::take(&mut held.mirrored) {
            self.mirror.drop_lease(key, None);
        }
    }

    fn on_notice(&mut self, notice: Message, now: Instant) {
        if let Message::EpochChanged(changed) = &notice {
            self.epoch = Some(changed.epoch);
        }
        let keys: Vec<u64> = self.leases.keys().copied().collect();
        for key in keys {
            if let Some(held) = self.leases.get_mut(&key) {
                held.machine.handle_notice(now, &notice);
            }
            self.drive(key, now);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Machines

    /// Sends what the machine wants to send, and acts on its events.
    fn drive(&mut self, key: u64, now: Instant) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        let mut events = Vec::new();
        while let Some(event) = held.machine.poll_event() {
            events.push(event);
        }
        let mut request = match &self.link {
            LinkState::Up { .. } => held.machine.poll_transmit(now),
            LinkState::Down => None,
        };
        // The gateway merges identical openings of one host into one lease: when two
        // applications hold it, the one that lets go must not end it for the other.
        if let Some(Message::Release(release)) = &request
            && self.shared(key, release.lease)
        {
            debug!(lease = %release.lease, "lease still held by another application; not released at the gateway");
            let answer = Message::Released(Released {
                common: release.common.clone(),
                lease: release.lease,
            });
            if let Some(held) = self.leases.get_mut(&key) {
                held.machine.handle_answer(now, &answer, &mut self.rng);
                request = None;
            }
        }
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        while let Some(event) = held.machine.poll_event() {
            events.push(event);
        }
        // A renewal, or a re-open of a lease the gateway forgot, keeps the opening going: the
        // port must still be the caller's (its program may have closed it, and another bound
        // it since).
        let recheck = match &request {
            Some(Message::Renew(_)) => true,
            Some(Message::Open(_)) => held.reopen_of.is_some() || !held.ids.is_empty(),
            _ => false,
        };
        let recheck = held
            .owner
            .clone()
            .filter(|o| recheck && !o.targets.is_empty());
        if let LinkState::Up { connection } = &self.link
            && let Some(request) = request
        {
            let connection = connection.clone();
            let tx = self.tx.clone();
            let procfs = self.procfs.clone();
            let request_id = request.common().request_id;
            tokio::spawn(async move {
                if let Some(owner) = recheck
                    && let Err(reason) = procfs
                        .verify_all(&owner.caller, &owner.targets, Duration::ZERO)
                        .await
                {
                    let _ = tx.send(CoreInput::OwnerLost { key, reason });
                    return;
                }
                let result = exchange(&connection, &request).await;
                if let Err(ExchangeError::Timeout(after)) = &result {
                    // A gateway that leaves a request unanswered this long is gone (killed, or
                    // the path is broken): do not wait for the idle timeout, reconnect now.
                    warn!("no answer from the gateway within {after:?}; reconnecting");
                    connection.close(0u32.into(), b"request timed out");
                }
                let result = result.map_err(|e| e.to_string());
                let _ = tx.send(CoreInput::Answer {
                    key,
                    request_id,
                    result,
                });
            });
        }
        for event in events {
            self.on_event(key, event, now);
        }
        if let Some(held) = self.leases.get(&key)
            && held.machine.is_finished()
            && held.open_request.is_none()
            && held.release_requests.is_empty()
        {
            self.leases.remove(&key);
        }
    }

    fn on_event(&mut self, key: u64, event: LeaseEvent, now: Instant) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        match event {
            LeaseEvent::Granted { lease, replaces } => {
                let replaces = replaces.or(held.reopen_of.take());
                if let Some(owner) = held.owner.as_ref().filter(|o| o.by_grants) {
                    // An application id's ports are known only now: nothing is mirrored or
                    // answered before they are checked as a port request's would be.
                    let caller = owner.caller.clone();
                    let mut targets: Vec<(Protocol, PortRange)> =
                        lease.grants.iter().map(|g| (g.protocol, g.ports)).collect();
                    targets.sort_unstable_by_key(|(p, r)| (p.number(), r.first, r.last));
                    targets.dedup();
                    // The first grant may wait for the application to bind, as a port
                    // request does; a re-open's ports are bound already.
                    let grace = match held.open_request {
                        Some(_) => self.config.local.port_owner_grace,
                        None => Duration::ZERO,
                    };
                    let procfs = self.procfs.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let result = procfs
                            .verify_all(&caller, &targets, grace)
                            .await
                            .map(|()| targets);
                        let _ = tx.send(CoreInput::GrantsChecked {
                            key,
                            lease: Box::new(lease),
                            replaces,
                            result,
                        });
                    });
                    return;
                }
                self.mirror_granted(key, lease, replaces, now);
            }
            LeaseEvent::Renewed { lease } => {
                self.mirror
                    .hold(key, elements_of(&lease.grants), lease.expires_at, None);
                held.mirrored = true;
                let expires_in = lease.expires_at.saturating_duration_since(now);
                self.emit(
                    key,
                    lease.id,
                    EventKind::Renewed,
                    Some(expires_in),
                    None,
                    None,
                    None,
                );
                if self.epoch != Some(lease.epoch) {
                    self.epoch_seen(lease.epoch, key, now);
                }
            }
            LeaseEvent::Denied {
                code,
                reason,
                retry_after,
            } => {
                if let Some(old) = held.reopen_of.take() {
                    self.emit(
                        key,
                        old,
                        EventKind::Lost,
                        None,
                        reason,
                        Some(DenialCode::Wire(code)),
                        None,
                    );
                } else if let Some((request_id, _)) = held.open_request.take()
                    && let Some(conn) = held.conn
                {
                    self.send(
                        conn,
                        LocalMessage::Denied(LocalDenied {
                            common: common(request_id),
                            code: DenialCode::Wire(code),
                            reason,
                            retry_after,
                            lease: None,
                            unsupported: Vec::new(),
                        }),
                    );
                }
            }
            LeaseEvent::RenewRefused {
                lease,
                code,
                reason,
            } => {
                warn!(%lease, %code, ?reason, "the gateway refused a renewal; the lease ends at its expiry");
                let expires_in = held
                    .machine
                    .expires_at()
                    .map(|at| at.saturating_duration_since(now));
                self.emit(
                    key,
                    lease,
                    EventKind::RenewalRefused,
                    expires_in,
                    reason,
                    Some(DenialCode::Wire(code)),
                    None,
                );
            }
            LeaseEvent::Reopening { previous, cause } => {
                info!(%previous, ?cause, "the gateway forgot a lease; opening it again");
            }
            LeaseEvent::Lost {
                previous,
                code,
                reason,
            } => {
                self.forget_mirror(key);
                self.emit(
                    key,
                    previous,
                    EventKind::Lost,
                    None,
                    reason,
                    Some(DenialCode::Wire(code)),
                    None,
                );
            }
            LeaseEvent::Expired { lease } => {
                self.forget_mirror(key);
                self.emit(key, lease, EventKind::Expired, None, None, None, None);
            }
            LeaseEvent::Revoked {
                lease,
                reason,
                text,
            } => {
                self.forget_mirror(key);
                let text = text.unwrap_or_else(|| format!("{reason:?}"));
                self.emit(key, lease, EventKind::Revoked, None, Some(text), None, None);
            }
            LeaseEvent::Released { lease } => {
                let requests = std::mem::take(&mut held.release_requests);
                let conn = held.conn;
                let known = lease.or(held.ids.last().copied());
                let mirrored = std::mem::take(&mut held.mirrored);
                let answer_to = conn.filter(|_| !requests.is_empty()).map(|c| (c, requests));
                match mirrored {
                    true => {
                        let (done, removed) = oneshot::channel();
                        self.mirror.drop_lease(key, Some(done));
                        let m = known.unwrap_or(LeaseId([0; 16]));
                        let tx = self.tx.clone();
                        tokio::spawn(async move {
                            if let Ok(Err(e)) = removed.await {
                                warn!(lease = %m, "removing a released lease from the host table: {e}");
                            }
                            if let Some((conn, requests)) = answer_to {
                                let _ = tx.send(CoreInput::MirrorReleased { conn, requests });
                            }
                        });
                    }
                    false => {
                        if let Some((conn, requests)) = answer_to {
                            let _ = self.tx.send(CoreInput::MirrorReleased { conn, requests });
                        }
                    }
                }
                let ended_by_agent = self
                    .leases
                    .get_mut(&key)
                    .and_then(|h| h.ended_by_agent.take());
                match (known, ended_by_agent) {
                    // The application did not let go: its port stopped being its own.
                    (Some(lease), Some(reason)) => self.emit(
                        key,
                        lease,
                        EventKind::Lost,
                        None,
                        Some(reason.to_string()),
                        Some(DenialCode::Local(LocalCode::PortNotOwned)),
                        None,
                    ),
                    (Some(lease), None) => {
                        self.emit(key, lease, EventKind::Released, None, None, None, None)
                    }
                    (None, _) => {}
                }
            }
            other => debug!(?other, "lease event"),
        }
    }

    /// Mirrors a granted lease; the Granted goes to the application once the host's table
    /// holds it.
    fn mirror_granted(
        &mut self,
        key: u64,
        lease: GrantedLease,
        replaces: Option<LeaseId>,
        now: Instant,
    ) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        if !held.ids.contains(&lease.id) {
            held.ids.push(lease.id);
        }
        let tx = self.tx.clone();
        let (done, landed) = oneshot::channel();
        let lease_id = lease.id;
        tokio::spawn(async move {
            let result = landed.await.unwrap_or(Err(MirrorError::Stopped));
            let _ = tx.send(CoreInput::MirrorLanded {
                key,
                lease: lease_id,
                result,
            });
        });
        // Under the same holder, a re-opened lease's elements replace the old ones.
        self.mirror.hold(
            key,
            elements_of(&lease.grants),
            lease.expires_at,
            Some(done),
        );
        held.mirrored = true;
        if let Some(old) = replaces {
            let expires_in = lease.expires_at.saturating_duration_since(now);
            self.emit(
                key,
                old,
                EventKind::Reopened,
                Some(expires_in),
                None,
                None,
                Some(lease.id),
            );
        }
        if self.epoch != Some(lease.epoch) {
            self.epoch_seen(lease.epoch, key, now);
        }
    }

    /// The ports of an application id's grant were checked: mirrored, or the lease ends.
    fn on_grants_checked(
        &mut self,
        key: u64,
        lease: GrantedLease,
        replaces: Option<LeaseId>,
        result: Result<Vec<(Protocol, PortRange)>, PortNotOwned>,
        now: Instant,
    ) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        // Ended meanwhile (released, revoked, timed out): nothing to mirror.
        if held.machine.lease().is_none_or(|l| l.id != lease.id) {
            return;
        }
        match result {
            Ok(targets) => {
                if let Some(owner) = held.owner.as_mut() {
                    owner.targets = targets;
                }
                self.mirror_granted(key, lease, replaces, now);
            }
            Err(reason) => {
                // The application knows a re-opened lease by its old id.
                for id in [Some(lease.id), replaces].into_iter().flatten() {
                    if !held.ids.contains(&id) {
                        held.ids.push(id);
                    }
                }
                self.end_unowned(key, reason, now);
            }
        }
    }

    /// Ends a lease whose port is not (or no longer) its caller's: released at the gateway at
    /// once, its mirror removed; a pending Open is answered port-not-owned, a held lease ends
    /// with the event lost (code port-not-owned).
    fn end_unowned(&mut self, key: u64, reason: PortNotOwned, now: Instant) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        if held.machine.state().is_terminal() {
            return;
        }
        warn!(lease = ?held.machine.lease_id(), pid = ?held.app.pid, "ending a lease: {reason}");
        let code = match reason {
            PortNotOwned::Unreadable(_) => DenialCode::Wire(ResultCode::NoResources),
            _ => DenialCode::Local(LocalCode::PortNotOwned),
        };
        if let Some((request_id, _)) = held.open_request.take() {
            let conn = held.conn;
            held.machine.release(now);
            if let Some(conn) = conn {
                self.deny(conn, request_id, code, reason.to_string(), None);
            }
        } else {
            held.ended_by_agent = Some(reason);
            held.machine.release(now);
        }
        self.drive(key, now);
    }

    /// Checks the ports of every verified lease again, in one task; a lease whose port is no
    /// longer its caller's ends.
    fn sweep_owners(&mut self, now: Instant) {
        self.next_owner_sweep = now + self.config.local.owner_check_interval;
        let owned: Vec<(u64, Owner)> = self
            .leases
            .iter()
            .filter(|(_, h)| matches!(h.machine.state(), LeaseState::Active | LeaseState::Renewing))
            .filter_map(|(k, h)| {
                let owner = h.owner.as_ref()?;
                (!owner.targets.is_empty()).then(|| (*k, owner.clone()))
            })
            .collect();
        if owned.is_empty() {
            return;
        }
        self.owner_sweep_running = true;
        let procfs = self.procfs.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            for (key, owner) in owned {
                if let Err(reason) = procfs
                    .verify_all(&owner.caller, &owner.targets, Duration::ZERO)
                    .await
                {
                    let _ = tx.send(CoreInput::OwnerLost { key, reason });
                }
            }
            let _ = tx.send(CoreInput::OwnerSweepDone);
        });
    }

    /// Closes connections that hold no lease and sent nothing for the idle timeout.
    fn close_idle(&mut self, now: Instant) {
        self.next_idle_sweep = now + IDLE_SWEEP;
        let idle = self.config.local.idle_timeout;
        let busy: HashSet<ConnId> = self.leases.values().filter_map(|h| h.conn).collect();
        for (conn, local) in &self.conns {
            if !busy.contains(conn)
                && now.saturating_duration_since(local.last_request) >= idle
                && !local.out.is_closing()
            {
                debug!(conn, "closing an idle local connection");
                local.out.close();
            }
        }
    }

    /// Ends the grace period of the earlier run's leases: each is let go in the host table, and
    /// released at the gateway unless an application asked for the same opening again and the
    /// gateway gave it this very lease. Returns the release exchanges under way.
    fn end_earlier_run(&mut self, now: Instant) -> Vec<tokio::task::JoinHandle<()>> {
        self.earlier_run_until = None;
        self.earlier_run_latest = None;
        let mut releases = Vec::new();
        for earlier in std::mem::take(&mut self.earlier_run) {
            let lease = earlier.lease;
            // An application's machine holds it now: the mirror keeps the elements under that
            // machine's number, and the lease is that application's.
            let taken = self
                .leases
                .values()
                .any(|h| !h.machine.state().is_terminal() && h.machine.lease_id() == Some(lease));
            self.mirror.drop_lease(earlier.holder, None);
            if taken {
                debug!(%lease, "a lease of an earlier run was asked for again; it stays");
                continue;
            }
            if earlier.expires_at <= now {
                continue;
            }
            let LinkState::Up { connection } = &self.link else {
                warn!(%lease, "cannot release a lease of an earlier run: the gateway is unreachable; it stays open there until it expires");
                continue;
            };
            let connection = connection.clone();
            let request = Message::Release(fwnp_proto::Release {
                common: common(rand::Rng::random(&mut self.rng)),
                lease,
            });
            releases.push(tokio::spawn(async move {
                match exchange(&connection, &request).await {
                    Ok(Message::Released(_)) => {
                        info!(%lease, "released a lease of an earlier run that no application asked for again");
                    }
                    Ok(Message::Denied(d)) if d.code == ResultCode::UnknownLease => {
                        debug!(%lease, "a lease of an earlier run had already ended");
                    }
                    Ok(other) => {
                        warn!(%lease, ?other, "releasing a lease of an earlier run: unexpected answer; it stays open at the gateway until it expires");
                    }
                    Err(e) => {
                        warn!(%lease, "releasing a lease of an earlier run failed ({e}); it stays open at the gateway until it expires");
                    }
                }
            }));
        }
        releases
    }

    /// Whether a machine other than `key` holds `lease` live.
    fn shared(&self, key: u64, lease: LeaseId) -> bool {
        self.leases.iter().any(|(k, h)| {
            *k != key && !h.machine.state().is_terminal() && h.machine.lease_id() == Some(lease)
        })
    }

    fn epoch_seen(&mut self, epoch: Epoch, from: u64, now: Instant) {
        self.epoch = Some(epoch);
        let keys: Vec<u64> = self.leases.keys().copied().filter(|k| *k != from).collect();
        for key in keys {
            if let Some(held) = self.leases.get_mut(&key) {
                held.machine.epoch_observed(now, epoch);
            }
        }
    }

    fn forget_mirror(&mut self, key: u64) {
        if let Some(held) = self.leases.get_mut(&key)
            && std::mem::take(&mut held.mirrored)
        {
            self.mirror.drop_lease(key, None);
        }
    }

    fn on_mirror_landed(
        &mut self,
        key: u64,
        lease: LeaseId,
        result: Result<(), MirrorError>,
        now: Instant,
    ) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        let current = held.machine.lease().filter(|l| l.id == lease).cloned();
        let Some((request_id, _)) = held.open_request else {
            if let Err(e) = result {
                warn!(%lease, "the host table refused a lease: {e}");
            }
            return;
        };
        let Some(granted) = current else { return };
        held.open_request = None;
        let Some(conn) = held.conn else { return };
        match result {
            Ok(()) => {
                info!(
                    %lease,
                    app = ?held.app.name,
                    pid = ?held.app.pid,
                    grants = ?granted.grants,
                    lifetime = granted.lifetime,
                    "granted and mirrored"
                );
                let answer = Granted {
                    common: common(request_id),
                    lease: granted.id,
                    grants: granted.grants.clone(),
                    lifetime: granted.lifetime,
                    expires_ms: granted.expires_ms,
                    renew_after: granted.renew_after,
                    epoch: granted.epoch,
                    narrowed: granted.narrowed,
                };
                self.send(conn, LocalMessage::Wire(Message::Granted(answer)));
            }
            Err(e) => {
                warn!(%lease, "the host table refused a granted lease; releasing it: {e}");
                held.machine.release(now);
                self.deny(
                    conn,
                    request_id,
                    DenialCode::Wire(ResultCode::NoResources),
                    format!("the host's firewall did not take the opening: {e}"),
                    None,
                );
                self.drive(key, now);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Local connections

    fn on_request(
        &mut self,
        conn: ConnId,
        message: LocalMessage,
        permit: OwnedSemaphorePermit,
        now: Instant,
    ) {
        let Some(local) = self.conns.get_mut(&conn) else {
            return;
        };
        local.last_request = now;
        let request_id = message.request_id().unwrap_or(0);
        if !local.peer.authorized {
            // The server does not pass on such peers; should one get here, the same answer.
            let reason = crate::server::not_authorized_reason(&local.peer);
            self.deny(
                conn,
                request_id,
                DenialCode::Local(LocalCode::AgentNotAuthorized),
                reason,
                None,
            );
            return;
        }
        match message {
            LocalMessage::Wire(Message::Open(open)) => self.on_open(conn, open, permit, now),
            LocalMessage::Wire(Message::Release(release)) => {
                let found = self.leases.iter().find(|(_, h)| {
                    h.conn == Some(conn)
                        && h.ids.contains(&release.lease)
                        && !h.machine.state().is_terminal()
                });
                let Some((&key, _)) = found else {
                    self.deny(
                        conn,
                        request_id,
                        DenialCode::Local(LocalCode::UnknownLocalLease),
                        format!("this connection holds no live lease {}", release.lease),
                        Some(release.lease),
                    );
                    return;
                };
                if let Some(held) = self.leases.get_mut(&key) {
                    held.release_requests.push((request_id, release.lease));
                    held.machine.release(now);
                }
                self.drive(key, now);
            }
            LocalMessage::Wire(Message::List(_)) => {
                let leases = self
                    .leases
                    .values()
                    .filter(|h| !h.machine.state().is_terminal() && h.open_request.is_none())
                    .filter_map(|h| {
                        let lease = h.machine.lease()?;
                        Some(LeaseInfo {
                            lease: lease.id,
                            grants: lease.grants.clone(),
                            remaining: u32::try_from(
                                lease.expires_at.saturating_duration_since(now).as_secs(),
                            )
                            .unwrap_or(u32::MAX),
                            expires_ms: lease.expires_ms,
                            app: Some(h.app.clone()),
                        })
                    })
                    .collect();
                let mut answer = Leases {
                    common: common(request_id),
                    leases,
                    epoch: self.epoch.unwrap_or(0),
                };
                // The gateway's rule (spec 5.4), since a frame is bounded the same way: shed
                // application information from the end, and never send a partial list.
                if !fwnp_proto::codec::fit_leases(&mut answer) {
                    self.send(
                        conn,
                        LocalMessage::Denied(LocalDenied {
                            common: common(request_id),
                            code: DenialCode::Wire(ResultCode::NoResources),
                            reason: Some(
                                "the list of leases does not fit in one answer".to_owned(),
                            ),
                            retry_after: Some(60),
                            lease: None,
                            unsupported: Vec::new(),
                        }),
                    );
                    return;
                }
                self.send(conn, LocalMessage::Wire(Message::Leases(answer)));
            }
            LocalMessage::Watch(watch) => {
                let max = self.config.local.max_watches;
                let Some(local) = self.conns.get_mut(&conn) else {
                    return;
                };
                match watch.lease {
                    None => local.watch_all = true,
                    Some(lease) if local.watches.contains(&lease) => {}
                    Some(_) if local.watches.len() + usize::from(local.watch_all) >= max => {
                        self.send(
                            conn,
                            LocalMessage::Denied(LocalDenied {
                                common: common(request_id),
                                code: DenialCode::Wire(ResultCode::NoResources),
                                reason: Some(format!(
                                    "this connection has {max} watches already (max_watches)"
                                )),
                                retry_after: None,
                                lease: watch.lease,
                                unsupported: Vec::new(),
                            }),
                        );
                        return;
                    }
                    Some(lease) => {
                        local.watches.insert(lease);
                    }
                }
                self.send(
                    conn,
                    LocalMessage::Watching(Watching {
                        common: common(request_id),
                    }),
                );
            }
            LocalMessage::Status(_) => {
                let live = self
                    .leases
                    .values()
                    .filter(|h| !h.machine.state().is_terminal() && h.machine.lease().is_some())
                    .count();
                let answer = StatusAnswer {
                    common: common(request_id),
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                    gateway: self.config.gateway.address.clone(),
                    connected: matches!(self.link, LinkState::Up { .. }),
                    epoch: self.epoch,
                    mirror_mode: self.mirror.mode().name().to_owned(),
                    identity: self.identity.clone(),
                    leases: live as u64,
                    last_error: match self.link {
                        LinkState::Up { .. } => None,
                        LinkState::Down => Some(fit_status_reason(
                            self.last_link_error
                                .clone()
                                .unwrap_or_else(|| "no connection attempt has ended yet".into()),
                        )),
                    },
                    api_version: Some(fwnp_proto::local::API_VERSION),
                };
                self.send(conn, LocalMessage::StatusAnswer(answer));
            }
            other => {
                self.deny(
                    conn,
                    request_id,
                    DenialCode::Wire(ResultCode::MalformedRequest),
                    format!(
                        "message type {} is not a request of the local API",
                        other.type_number()
                    ),
                    None,
                );
            }
        }
    }

    fn on_open(
        &mut self,
        conn: ConnId,
        mut open: Open,
        permit: OwnedSemaphorePermit,
        now: Instant,
    ) {
        let request_id = open.common.request_id.unwrap_or(0);
        if let Err(e) = fwnp_proto::validate::validate_opening(&open.opening)
            .and_then(|()| fwnp_proto::validate::validate_lifetime(open.lifetime))
        {
            self.deny(
                conn,
                request_id,
                DenialCode::Wire(e.result_code()),
                e.to_string(),
                None,
            );
            return;
        }
        let Some(local) = self.conns.get(&conn) else {
            return;
        };
        let held = self
            .leases
            .values()
            .filter(|h| h.conn == Some(conn) && !h.machine.state().is_terminal())
            .count();
        if held >= self.config.local.max_leases_per_connection {
            let reason =
                format!("this connection holds {held} leases already (max_leases_per_connection)");
            self.send(
                conn,
                LocalMessage::Denied(LocalDenied {
                    common: common(request_id),
                    code: DenialCode::Wire(ResultCode::NoResources),
                    reason: Some(reason),
                    retry_after: Some(60),
                    lease: None,
                    unsupported: Vec::new(),
                }),
            );
            return;
        }
        // What the application says about itself is replaced by what the kernel says, but for
        // the name it gives itself: that label is carried (as its own claim, like every name)
        // in place of the command line, so that operators see the name the developer chose.
        let label = open.app.as_ref().and_then(|app| app.name.clone());
        let mut app = local.peer.app.clone();
        if label.is_some() {
            app.name = label;
        }
        open.app = Some(app);
        if !self.config.local.verify_port_owner {
            self.start_open(conn, open, None, now);
            return;
        }
        let Some(caller) = local.peer.process.clone() else {
            let reason = match local.peer.pid {
                Some(pid) => format!(
                    "the calling process (pid {pid}) exited before the agent could identify it, so the port's owner cannot be verified"
                ),
                None => "the caller's process id is unknown (another PID namespace?), so the port's owner cannot be verified".to_owned(),
            };
            self.deny(
                conn,
                request_id,
                DenialCode::Local(LocalCode::PortNotOwned),
                reason,
                None,
            );
            return;
        };
        match &open.opening.target {
            Target::Ports { protocol, ports } => {
                let (protocol, ports) = (*protocol, *ports);
                let procfs = self.procfs.clone();
                let grace = self.config.local.port_owner_grace;
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let result = procfs.verify(&caller, protocol, ports, grace).await;
                    let _ = tx.send(CoreInput::OwnerChecked {
                        conn,
                        open: Box::new(open),
                        result,
                        caller,
                        permit,
                    });
                });
            }
            // An application id's ports are learnt from the gateway's grants: they are checked
            // when the Granted arrives, before anything is mirrored or answered.
            Target::App(_) => {
                let owner = Owner {
                    caller,
                    targets: Vec::new(),
                    by_grants: true,
                };
                self.start_open(conn, open, Some(owner), now);
            }
        }
    }

    fn start_open(&mut self, conn: ConnId, open: Open, owner: Option<Owner>, now: Instant) {
        let request_id = open.common.request_id.unwrap_or(0);
        if !self.conns.contains_key(&conn) {
            return;
        }
        if !matches!(self.link, LinkState::Up { .. }) {
            let reason = format!(
                "no connection to the gateway {}",
                self.config.gateway.address
            );
            self.deny(
                conn,
                request_id,
                DenialCode::Local(LocalCode::GatewayUnreachable),
                reason,
                None,
            );
            return;
        }
        let app = open.app.clone().unwrap_or_default();
        let lifetime = open.lifetime;
        let machine = LeaseMachine::new(
            now,
            open.opening,
            open.lifetime,
            Some(app.clone()),
            &mut self.rng,
        );
        let key = self.next_key;
        self.next_key += 1;
        self.leases.insert(
            key,
            Held {
                conn: Some(conn),
                machine,
                app,
                open_request: Some((request_id, now + OPEN_WAIT)),
                ids: Vec::new(),
                mirrored: false,
                reopen_of: None,
                release_requests: Vec::new(),
                lifetime,
                owner,
                ended_by_agent: None,
            },
        );
        self.drive(key, now);
    }

    fn on_closed(&mut self, conn: ConnId, now: Instant) {
        self.conns.remove(&conn);
        let keys: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, h)| h.conn == Some(conn))
            .map(|(k, _)| *k)
            .collect();
        if !keys.is_empty() {
            info!(
                conn,
                leases = keys.len(),
                "application gone; releasing its leases"
            );
        }
        for key in keys {
            if let Some(held) = self.leases.get_mut(&key) {
                held.conn = None;
                held.open_request = None;
                held.release_requests.clear();
                held.machine.release(now);
            }
            self.drive(key, now);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Output

    fn send(&self, conn: ConnId, message: LocalMessage) {
        if let Some(local) = self.conns.get(&conn) {
            // A client that does not read is closed by its outbox; its leases go with it.
            local.out.send(encode_frame(&message));
        }
    }

    fn deny(
        &self,
        conn: ConnId,
        request_id: u64,
        code: DenialCode,
        reason: String,
        lease: Option<LeaseId>,
    ) {
        self.send(
            conn,
            LocalMessage::Denied(LocalDenied {
                common: common(request_id),
                code,
                reason: Some(reason),
                retry_after: None,
                lease,
                unsupported: Vec::new(),
            }),
        );
    }

    /// Sends an Event about the lease `lease` of machine `key` to the watches of its connection.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        key: u64,
        lease: LeaseId,
        kind: EventKind,
        expires_in: Option<Duration>,
        reason: Option<String>,
        code: Option<DenialCode>,
        new_lease: Option<LeaseId>,
    ) {
        let Some(held) = self.leases.get(&key) else {
            return;
        };
        let Some(conn) = held.conn else { return };
        let Some(local) = self.conns.get(&conn) else {
            return;
        };
        let watched = local.watch_all || held.ids.iter().any(|id| local.watches.contains(id));
        if !watched {
            return;
        }
        let event = Event {
            common: Common::default(),
            lease,
            kind,
            expires_in_ms: expires_in.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            reason,
            code,
            new_lease,
        };
        local.out.send(encode_frame(&LocalMessage::Event(event)));
    }

    async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<CoreInput>) {
        let now = Instant::now();
        let keys: Vec<u64> = self.leases.keys().copied().collect();
        info!(leases = keys.len(), "stopping: releasing every lease");
        for key in &keys {
            if let Some(held) = self.leases.get_mut(key) {
                held.conn = None;
                held.open_request = None;
                held.release_requests.clear();
                held.machine.release(now);
            }
            self.drive(*key, now);
        }
        let earlier_releases = self.end_earlier_run(now);
        // Give the Release requests a moment to reach the gateway.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.leases.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(CoreInput::Answer { key, result, .. })) => {
                    if let Some(held) = self.leases.get_mut(&key) {
                        match result {
                            Ok(answer) => {
                                held.machine
                                    .handle_answer(Instant::now(), &answer, &mut self.rng)
                            }
                            Err(_) => {
                                self.leases.remove(&key);
                                continue;
                            }
                        }
                    }
                    self.drive(key, Instant::now());
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        for release in earlier_releases {
            let _ = tokio::time::timeout_at(deadline, release).await;
        }
        self.mirror.shutdown().await;
    }
}

fn common(request_id: u64) -> Common {
    Common {
        request_id: Some(request_id),
        critical: Vec::new(),
    }
}

/// A reason cut to the local API's bound for texts (512 bytes), on a character boundary.
fn fit_status_reason(mut reason: String) -> String {
    const MAX: usize = 512;
    if reason.len() > MAX {
        let mut end = MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}
