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

use fwnp_proto::lease::{LeaseEvent, LeaseMachine, LeaseState};
use fwnp_proto::local::{
    DenialCode, Event, EventKind, LocalCode, LocalDenied, LocalMessage, StatusAnswer, Watching,
    encode_frame,
};
use fwnp_proto::{
    AppInfo, Common, Epoch, Granted, LeaseId, LeaseInfo, Leases, Message, Open, Released,
    ResultCode, Target,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::AgentConfig;
use crate::link::{ExchangeError, GatewayEvent, exchange};
use crate::mirror::{Mirror, MirrorError, elements_of};
use crate::ports::{PortNotOwned, ProcFs};

/// How long an application's Open waits for the gateway's answer (across retries) before the
/// agent answers gateway-unreachable and gives up on it.
pub const OPEN_WAIT: Duration = Duration::from_secs(20);

/// While the gateway is unreachable, due requests wait; the core still wakes this often for
/// the machines' expiries.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// A local connection's number.
pub type ConnId = u64;

/// Who is at the other end of a local connection, from its peer credentials and `/proc`.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The process id, when the kernel gave one.
    pub pid: Option<u32>,
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
        out: mpsc::UnboundedSender<Vec<u8>>,
    },
    /// A request frame of a local connection.
    LocalRequest {
        /// The connection.
        conn: ConnId,
        /// The request.
        message: LocalMessage,
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
    },
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
}

struct LocalConn {
    peer: Peer,
    out: mpsc::UnboundedSender<Vec<u8>>,
    /// Watches: `None` for all of the connection's leases, else one lease.
    watches: Vec<Option<LeaseId>>,
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
        }
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
        if matches!(self.link, LinkState::Down) {
            // Due sends wait for the link; do not spin on them.
            next = next.max(now + IDLE_TICK);
        }
        next
    }

    fn on_timer(&mut self, now: Instant) {
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
            CoreInput::Gateway(GatewayEvent::Disconnected { reason }) => {
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
            CoreInput::Answer { key, result } => {
                if let Some(held) = self.leases.get_mut(&key) {
                    match result {
                        Ok(answer) => held.machine.handle_answer(now, &answer, &mut self.rng),
                        Err(e) => {
                            debug!(key, "request failed: {e}");
                            held.machine.connection_lost(now, &mut self.rng);
                        }
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
                        watches: Vec::new(),
                    },
                );
            }
            CoreInput::LocalRequest { conn, message } => self.on_request(conn, message, now),
            CoreInput::LocalClosed { conn } => self.on_closed(conn, now),
            CoreInput::OwnerChecked { conn, open, result } => match result {
                Ok(pid) => {
                    debug!(conn, holder = pid, "port owner verified");
                    self.start_open(conn, *open, now);
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
        if let LinkState::Up { connection } = &self.link
            && let Some(request) = request
        {
            let connection = connection.clone();
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let result = exchange(&connection, &request).await;
                if let Err(ExchangeError::Timeout(after)) = &result {
                    // A gateway that leaves a request unanswered this long is gone (killed, or
                    // the path is broken): do not wait for the idle timeout, reconnect now.
                    warn!("no answer from the gateway within {after:?}; reconnecting");
                    connection.close(0u32.into(), b"request timed out");
                }
                let result = result.map_err(|e| e.to_string());
                let _ = tx.send(CoreInput::Answer { key, result });
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
                if let Some(lease) = known {
                    self.emit(key, lease, EventKind::Released, None, None, None, None);
                }
            }
            other => debug!(?other, "lease event"),
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

    fn on_request(&mut self, conn: ConnId, message: LocalMessage, now: Instant) {
        let Some(local) = self.conns.get(&conn) else {
            return;
        };
        let request_id = message.request_id().unwrap_or(0);
        if !local.peer.authorized {
            let reason = format!(
                "uid {} (gid {}) may not use the FWNP agent; see allowed_users and allowed_groups in its configuration",
                local.peer.uid, local.peer.gid
            );
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
            LocalMessage::Wire(Message::Open(open)) => self.on_open(conn, open, now),
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
                if let Some(local) = self.conns.get_mut(&conn) {
                    local.watches.push(watch.lease);
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

    fn on_open(&mut self, conn: ConnId, mut open: Open, now: Instant) {
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
        // What the application says about itself is replaced by what the kernel says.
        open.app = Some(local.peer.app.clone());
        let pid = local.peer.pid;
        match (&open.opening.target, pid) {
            (Target::Ports { protocol, ports }, Some(pid))
                if self.config.local.verify_port_owner =>
            {
                let (protocol, ports) = (*protocol, *ports);
                let procfs = self.procfs.clone();
                let grace = self.config.local.port_owner_grace;
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let result = procfs.verify(pid, protocol, ports, grace).await;
                    let _ = tx.send(CoreInput::OwnerChecked {
                        conn,
                        open: Box::new(open),
                        result,
                    });
                });
            }
            (Target::Ports { .. }, None) if self.config.local.verify_port_owner => {
                self.deny(
                    conn,
                    request_id,
                    DenialCode::Local(LocalCode::PortNotOwned),
                    "the caller's process id is unknown, so the port's owner cannot be verified"
                        .into(),
                    None,
                );
            }
            // An application id names ports only the gateway knows: nothing to verify here.
            _ => self.start_open(conn, open, now),
        }
    }

    fn start_open(&mut self, conn: ConnId, open: Open, now: Instant) {
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
            let _ = local.out.send(encode_frame(&message));
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
        let watched = local
            .watches
            .iter()
            .any(|w| w.is_none_or(|id| held.ids.contains(&id)));
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
        let _ = local.out.send(encode_frame(&LocalMessage::Event(event)));
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
                Ok(Some(CoreInput::Answer { key, result })) => {
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
