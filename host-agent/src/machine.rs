//! The agent's decisions without IO: [`AgentMachine`] takes inputs (requests of callers with
//! what the kernel says about them, the gateway's answers and notices, the link going up and
//! down, the results of the mirror and of port checks) and the time as an argument, and gives
//! back [`Action`]s for a driver to carry out (send this request to the gateway, hold or drop
//! these grants in the host table, answer this caller, check these ports) and the time it wants
//! to be woken at. It reads no clock, opens no socket and starts no task, so that every decision
//! can be tested in simulated time; [`crate::core`] is the driver that does the IO.
//!
//! It lives in this crate rather than in `fwnp-proto` because its inputs carry the agent's own
//! facts: the caller's process as the kernel pinned it down ([`CallerProcess`]), why a port is
//! not the caller's ([`PortNotOwned`]), the mirror's failures and the agent's configuration.
//!
//! Each lease is a [`LeaseMachine`] held for its callers: the machine sends what a lease machine
//! wants to send, feeds it the answers, notices and epochs it sees, wakes it at its
//! [`LeaseMachine::poll_timeout`], and turns its events into mirror changes and Event messages.
//! A caller is anything that asks for openings on behalf of a process (today a connection of the
//! local API): its requests and answers are typed messages, never frames. A front end of
//! another protocol is one more source of callers: it gives each client a [`ConnId`] of its
//! own (unique across front ends), says who it is with [`Input::CallerConnected`], turns its
//! requests into [`Input::Request`] (an Open, a Release, a List), turns the [`Action::Reply`]s
//! for that number back into its own protocol, and ends with [`Input::CallerClosed`], which
//! releases whatever the client still holds.
//!
//! The gateway merges an Open into a live lease of the host that grants exactly what the Open
//! resolves to (spec 11.3): callers asking for the same opening get the same lease id. The
//! machine holds such a lease once, for all of them (local API 9.1): one lease machine, one
//! renewal schedule asking the largest lifetime a current holder opened with, one holder of its
//! elements in the mirror; each caller's hold ends with its Release or its connection, and the
//! lease is released at the gateway when the last one lets go. A caller holds a lease once,
//! however many of its Opens the gateway merged into it: a Release of its id ends that hold
//! (local API 5.2). A Release at the gateway and an Open the gateway may answer with the same
//! lease are never on their way together (see `may_be_granted`), whoever the Release is for:
//! a lease no caller holds any more, one granted to an Open whose callers all let go, one of an
//! earlier run and one the gateway lists that nobody holds are all let go the same way
//! (`unheld`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnp_proto::lease::{Attempt, GrantedLease, LeaseEvent, LeaseMachine, LeaseState};
use fwnp_proto::local::{
    DenialCode, Event, EventKind, LocalCode, LocalDenied, LocalMessage, StatusAnswer, Watching,
};
use fwnp_proto::{
    AppInfo, Capabilities, Common, Epoch, Grant, Granted, LeaseId, LeaseInfo, Leases, Message,
    Open, Opening, PortRange, Protocol, Released, ResultCode, Target, Welcome,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tracing::{debug, info, warn};

use crate::config::AgentConfig;
use crate::mirror::MirrorError;
use crate::ports::{CallerProcess, PortNotOwned};

/// How long an application's Open waits for the gateway's answer (across retries) before the
/// agent answers gateway-unreachable and gives up on it; for an application id, the grace its
/// ports have to be bound comes on top.
pub const OPEN_WAIT: Duration = Duration::from_secs(20);

/// While the gateway is unreachable, due requests wait; the machine still wakes this often for
/// the leases' expiries.
pub const IDLE_TICK: Duration = Duration::from_millis(250);

/// How often the machine looks for idle callers.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

/// Above this many leases to open again at once after an epoch change, their Opens are spread
/// out (spec 12: "if it holds many leases"); this many or fewer go at once.
pub const SPREAD_REOPENS_ABOVE: usize = 8;

/// The longest a spread re-open waits. Never more than an eighth of what is left of its lease
/// either, so that the wait does not cost the lease its retries before it runs out.
pub const REOPEN_SPREAD: Duration = Duration::from_secs(3);

/// A caller's number: a local connection, or a client of another front end.
pub type ConnId = u64;

/// The number of one lease held for callers (kept across re-opens under new lease ids), or of
/// a lease of an earlier run; the mirror holds elements under it.
pub type Key = u64;

/// Who a caller is, from its peer credentials and `/proc`.
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

/// The ports a lease's caller must still own, and the process that must own them.
#[derive(Debug, Clone)]
pub struct PortCheck {
    /// The caller.
    pub caller: CallerProcess,
    /// The ports.
    pub targets: Vec<(Protocol, PortRange)>,
}

/// Everything the machine reacts to, besides the passing of time.
#[derive(Debug)]
pub enum Input {
    /// A connection to the gateway was established: its Welcome and the leases it listed.
    LinkUp {
        /// Which of the configured gateways answered (`HOST:PORT`): another one than before,
        /// under the same epoch, is a failover within one cluster.
        gateway: String,
        /// The gateway's Welcome.
        welcome: Box<Welcome>,
        /// The leases the gateway holds for this host, if it listed them.
        leases: Option<Leases>,
    },
    /// An attempt to connect failed.
    LinkFailed {
        /// Why.
        reason: String,
    },
    /// The connection to the gateway ended.
    LinkDown {
        /// Why.
        reason: String,
    },
    /// A notice the gateway pushed (EpochChanged, Revoked, GoingAway).
    Notice(Message),
    /// A notice was discarded: one of a known type that did not decode, or one too long to
    /// read (spec 5.3); or one was lost on its way: its stream was reset by the gateway, or did
    /// not end in time. Whatever it said (a Revoked, an EpochChanged) is learnt by asking for
    /// the list of leases.
    NoticeDiscarded {
        /// What was wrong with it.
        reason: String,
    },
    /// The answer (or failure) of the List of [`Action::List`].
    Listed {
        /// The List's request id.
        request_id: u64,
        /// The answer, or why none came.
        result: Result<Message, String>,
    },
    /// No configured gateway is left to connect to: each refused the protocol versions the
    /// agent speaks (spec 13, unsupported-version). The link does not try again until the
    /// agent restarts.
    NoGatewayLeft {
        /// Which gateways refused which versions, for Status and the applications' refusals.
        reason: String,
    },
    /// The answer (or failure) of a request sent for [`Action::Send`].
    Answer {
        /// The lease.
        key: Key,
        /// The attempt, as [`Action::Send`] named it: a failure reported after the machine sent
        /// the request again (on a newer connection, under the same request id) is not the
        /// newer attempt's.
        attempt: Attempt,
        /// The answer, or why none came.
        result: Result<Message, String>,
    },
    /// A new caller.
    CallerConnected {
        /// Its number.
        conn: ConnId,
        /// Who it is.
        peer: Peer,
    },
    /// A request of a caller.
    Request {
        /// The caller.
        conn: ConnId,
        /// The request.
        message: LocalMessage,
    },
    /// A caller went away: the leases held for it are released.
    CallerClosed {
        /// The caller.
        conn: ConnId,
    },
    /// The port check of [`Action::CheckOwner`] finished.
    OwnerChecked {
        /// The caller.
        conn: ConnId,
        /// The Open.
        open: Box<Open>,
        /// The holder's pid, or why the port is not the caller's.
        result: Result<u32, PortNotOwned>,
        /// The process the check was for.
        caller: CallerProcess,
    },
    /// The ports of a lease granted for an application id were checked ([`Action::CheckGrants`];
    /// only then is it mirrored and answered).
    GrantsChecked {
        /// The lease.
        key: Key,
        /// The lease as granted.
        lease: Box<GrantedLease>,
        /// The lease it replaces, after a re-open.
        replaces: Option<LeaseId>,
        /// The ports checked.
        targets: Vec<(Protocol, PortRange)>,
        /// The callers whose ports they are not, and why.
        lost: Vec<(ConnId, PortNotOwned)>,
    },
    /// A verified lease's port is no longer its caller's (checked before a renewal or re-open,
    /// or by the periodic check): the caller's hold ends, and with the last one the lease.
    OwnerLost {
        /// The lease.
        key: Key,
        /// The caller.
        conn: ConnId,
        /// Why.
        reason: PortNotOwned,
    },
    /// A periodic check of every verified lease ([`Action::SweepOwners`]) finished.
    OwnerSweepDone,
    /// The mirror took (or refused) a lease's grants ([`Action::MirrorHold`] with `confirm`).
    MirrorLanded {
        /// The lease.
        key: Key,
        /// The lease id.
        lease: LeaseId,
        /// The outcome.
        result: Result<(), MirrorError>,
    },
    /// The mirror removed a released lease's grants ([`Action::MirrorDrop`] with an answer to
    /// give): the Release requests can be answered.
    MirrorReleased {
        /// The caller that asked.
        conn: ConnId,
        /// The requests to answer: request id and the lease id named.
        requests: Vec<(u64, LeaseId)>,
    },
}

/// What to do after a released lease's grants left the mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterDrop {
    /// The lease, for the log should the removal fail.
    pub lease: LeaseId,
    /// The Release requests to answer then, through [`Input::MirrorReleased`].
    pub answer: Option<(ConnId, Vec<(u64, LeaseId)>)>,
}

/// What the machine asks its driver to do.
#[derive(Debug)]
pub enum Action {
    /// Send `request` to the gateway on a stream of its own, and give the answer back as
    /// [`Input::Answer`]. The callers' ports in `verify_first` are checked before (at once,
    /// without grace): each caller whose ports they no longer are comes back as
    /// [`Input::OwnerLost`], and when that is every one of them, nothing is sent.
    Send {
        /// The lease.
        key: Key,
        /// The request.
        request: Message,
        /// Which attempt this is, to give back with its answer.
        attempt: Attempt,
        /// The checks to pass first, each for one caller holding the lease.
        verify_first: Vec<(ConnId, PortCheck)>,
    },
    /// Send `request`, a List, to the gateway on a stream of its own, and give the answer back
    /// as [`Input::Listed`].
    List {
        /// The request.
        request: Message,
    },
    /// Give a caller this message (an answer to one of its requests, or an Event).
    Reply {
        /// The caller.
        conn: ConnId,
        /// The message.
        message: LocalMessage,
    },
    /// Close a caller's connection: it was idle too long.
    Close {
        /// The caller.
        conn: ConnId,
    },
    /// Check that the port of an Open is bound by the caller, waiting up to `grace` for it to
    /// bind; the result comes back as [`Input::OwnerChecked`].
    CheckOwner {
        /// The caller.
        conn: ConnId,
        /// The Open.
        open: Box<Open>,
        /// The process.
        caller: CallerProcess,
        /// The protocol.
        protocol: Protocol,
        /// The ports.
        ports: PortRange,
        /// How long the caller may take to bind.
        grace: Duration,
    },
    /// Check the ports of a lease granted for an application id, for each caller holding it;
    /// the result comes back as [`Input::GrantsChecked`] with `lease` and `replaces`.
    CheckGrants {
        /// The lease.
        key: Key,
        /// The lease as granted.
        lease: Box<GrantedLease>,
        /// The lease it replaces.
        replaces: Option<LeaseId>,
        /// The ports granted.
        targets: Vec<(Protocol, PortRange)>,
        /// The processes that must hold them, one per caller.
        callers: Vec<(ConnId, CallerProcess)>,
        /// How long the callers may take to bind.
        grace: Duration,
    },
    /// Check every verified lease's ports (at once, without grace), for each caller holding it:
    /// each failure comes back as [`Input::OwnerLost`], the end as [`Input::OwnerSweepDone`].
    SweepOwners {
        /// The leases and their callers.
        leases: Vec<(Key, ConnId, PortCheck)>,
    },
    /// Make `holder` hold these grants' elements in the host table until `expires_at`; with
    /// `confirm`, the outcome comes back as [`Input::MirrorLanded`] for that lease id.
    MirrorHold {
        /// The holder.
        holder: Key,
        /// The grants.
        grants: Vec<Grant>,
        /// Until when.
        expires_at: Instant,
        /// The lease id to confirm.
        confirm: Option<LeaseId>,
    },
    /// Let go of everything `holder` holds in the host table.
    MirrorDrop {
        /// The holder.
        holder: Key,
        /// What to do once removed.
        then: Option<AfterDrop>,
    },
    /// Make these holders the whole host table (the first connection since start).
    MirrorReconcile {
        /// Each holder's grants and expiry.
        holders: Vec<(Key, Vec<Grant>, Instant)>,
    },
    /// Record the gateway's epoch and the host's identity in the state file.
    Record {
        /// The epoch.
        epoch: Epoch,
        /// The identity.
        identity: String,
    },
}

/// A lease of an earlier run of the agent that the gateway still listed when this run first
/// connected. Its application lost its connection when that run ended.
struct EarlierLease {
    /// The mirror's holder number for its elements, and the lease's key once it is released.
    holder: Key,
    /// The lease as listed then.
    lease: GrantedLease,
}

/// One lease held for callers: asked for by one caller's Open, then held by every caller
/// whose Open the gateway merged into it.
struct Held {
    machine: LeaseMachine,
    /// Who holds it: the Opens not answered yet, each on its own, and each caller whose Open
    /// was answered, once.
    holders: Vec<Holder>,
    /// Whether the mirror holds elements for this lease (under its key).
    mirrored: bool,
    /// A re-open after an epoch change that waits until then, so that many leases are not
    /// asked for again all at the same instant (spec 12).
    reopen_at: Option<Instant>,
    /// The last holder let go then, while an Open was outstanding that the gateway may answer
    /// with this lease: its Release waits for that answer (see `may_be_granted`).
    unheld_since: Option<Instant>,
    /// The grants of the lease being released at the gateway, until the Release is answered:
    /// an Open the gateway may answer with this lease waits for that.
    releasing: Option<Vec<Grant>>,
    /// Its Open waits for the answer to the Release of a lease it may be answered with.
    waits_for_release: bool,
}

impl Held {
    /// Until when the re-open of this lease waits, if it still does at `now`.
    fn reopen_deferred(&self, now: Instant) -> Option<Instant> {
        self.reopen_at
            .filter(|at| *at > now && self.machine.state() == LeaseState::Reopening)
    }

    /// Whether its Open (a first one, or a re-open) is on its way, due or waiting for a retry.
    fn opening(&self) -> bool {
        matches!(
            self.machine.state(),
            LeaseState::Requesting | LeaseState::Reopening
        )
    }

    /// The callers that hold it, each once.
    fn callers(&self) -> Vec<ConnId> {
        let mut conns: Vec<ConnId> = self
            .holders
            .iter()
            .filter(|h| h.open.is_none())
            .map(|h| h.conn)
            .collect();
        conns.sort_unstable();
        conns.dedup();
        conns
    }

    /// The lifetime and the application information the lease is asked for with, from its
    /// holders: the largest lifetime one of them opened with (for one that asked none, what its
    /// Open was granted), and the information of the earliest of them.
    fn asked(&self) -> (Option<u32>, Option<AppInfo>) {
        let lifetime = self.holders.iter().filter_map(Holder::lifetime).max();
        let app = self.holders.first().and_then(|h| h.app.clone());
        (lifetime, app)
    }

    /// The ports to check again for each holder whose ports are verified.
    fn checks(&self) -> Vec<(ConnId, PortCheck)> {
        self.holders
            .iter()
            .filter_map(|h| {
                let owner = h.owner.as_ref()?;
                (!owner.targets.is_empty()).then(|| (h.conn, owner.check()))
            })
            .collect()
    }
}

/// One caller's hold of a lease.
struct Holder {
    conn: ConnId,
    /// The lifetime its Open asked (the largest of its Opens'), `None` when it asked none.
    asked: Option<u32>,
    /// The lifetime the gateway granted its Open.
    granted: Option<u32>,
    /// What its Open told the gateway about it.
    app: Option<AppInfo>,
    /// Its Open, until it is answered.
    open: Option<PendingOpen>,
    /// Every lease id the caller knows the lease by (re-opens give new ones); the last is the
    /// current one, which its events name.
    ids: Vec<LeaseId>,
    /// The verified caller and the ports checked again before each renewal and re-open and
    /// periodically; `None` when ports are not verified.
    owner: Option<Owner>,
}

impl Holder {
    /// The lifetime it holds the lease for: the one it asked, else the one it was granted.
    fn lifetime(&self) -> Option<u32> {
        self.asked.or(self.granted)
    }

    /// The lease was granted as `lease`: the caller knows it by that id from now on, and an
    /// Open of its not answered yet was granted that.
    fn learnt(&mut self, lease: &GrantedLease) {
        if !self.ids.contains(&lease.id) {
            self.ids.push(lease.id);
        }
        if let Some(open) = self.open.as_mut()
            && open.granted.is_none()
        {
            open.granted = Some(lease.clone());
            self.granted = Some(lease.lifetime);
        }
    }
}

/// An Open of a caller awaiting its answer.
struct PendingOpen {
    request_id: u64,
    /// When the caller is answered gateway-unreachable if nothing came.
    deadline: Instant,
    /// The lease as the gateway granted it to this very Open (its answer's lifetime, expiry
    /// and hint), once granted.
    granted: Option<GrantedLease>,
}

/// How a caller lets go of a lease.
enum LetGo {
    /// It asked, with this Release (request id, the lease id it named).
    Release(u64, LeaseId),
    /// Its connection closed.
    Closed,
    /// Its port is no longer its own.
    Unowned(PortNotOwned),
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

impl Owner {
    fn check(&self) -> PortCheck {
        PortCheck {
            caller: self.caller.clone(),
            targets: self.targets.clone(),
        }
    }
}

struct Caller {
    peer: Peer,
    /// Watches of all the caller's leases.
    watch_all: bool,
    /// Watches of one lease each.
    watches: HashSet<LeaseId>,
    /// The last request, for the idle timeout.
    last_request: Instant,
    /// Whether the machine asked for the connection to be closed.
    closing: bool,
}

/// The agent's decisions; see the module's documentation.
pub struct AgentMachine {
    config: Arc<AgentConfig>,
    rng: StdRng,
    link_up: bool,
    epoch: Option<Epoch>,
    identity: Option<String>,
    /// What the gateway's last Welcome offered (its capability bits, the host's allowed
    /// addresses and the largest request it accepts): an Open using more, or larger, is
    /// refused here (spec Sections 14 and 5.4).
    offered: Option<Offered>,
    /// The gateway of the current or the last connection.
    gateway: Option<String>,
    synced_once: bool,
    /// Leases of an earlier run, until `earlier_run_until`: then those no caller asked for
    /// again are released, as a lease no caller holds any more is (`unheld`).
    earlier_run: Vec<EarlierLease>,
    earlier_run_until: Option<Instant>,
    conns: HashMap<ConnId, Caller>,
    leases: HashMap<Key, Held>,
    /// The leases no caller holds whose Release waits for Opens (`Held::unheld_since`).
    release_waits: HashSet<Key>,
    /// The Opens that wait for a Release (`Held::waits_for_release`).
    open_waits: HashSet<Key>,
    /// The leases whose Release is on its way (`Held::releasing`).
    releasing: HashSet<Key>,
    next_key: Key,
    /// The next periodic check of verified leases' ports, and whether one is running.
    next_owner_sweep: Instant,
    owner_sweep_running: bool,
    /// The next look for idle callers.
    next_idle_sweep: Instant,
    /// Why the link is down, for Status: the last failed attempt or ended connection.
    last_link_error: Option<String>,
    /// Why no gateway is left to connect to, once every one refused the agent's versions.
    no_gateway_left: Option<String>,
    /// The List asked for after a discarded or lost notice and not answered yet: its request
    /// id and when it was asked for.
    listing: Option<(u64, Instant)>,
    /// Another notice was discarded or lost while that List was on its way: list again after
    /// it.
    list_again: bool,
    /// Stopping: every lease was released, and a request that fails ends its lease.
    stopping: bool,
    actions: VecDeque<Action>,
}

impl std::fmt::Debug for AgentMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMachine")
            .field("leases", &self.leases.len())
            .field("conns", &self.conns.len())
            .finish()
    }
}

impl AgentMachine {
    /// A machine started at `now`, its retry jitter drawn from `rng` (seeded for tests).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use std::time::Instant;
    /// use fwnp_agent::config::AgentConfig;
    /// use fwnp_agent::machine::{Action, AgentMachine, Input, Peer};
    /// use fwnp_proto::local::{DenialCode, LocalCode, LocalMessage};
    /// use fwnp_proto::{AppInfo, Common, Message, Open, Opening, PortRange, Protocol, Target};
    /// use rand::SeedableRng;
    ///
    /// let config = AgentConfig::parse(
    ///     "state_dir = \"/var/lib/fwnp-agent\"\n[gateway]\naddress = \"gw.example.org:4433\"\n\
    ///      server_name = \"gw.example.org\"\ncertificate = \"/c.pem\"\nkey = \"/k.pem\"\n\
    ///      ca = \"/ca.pem\"\n[local]\nverify_port_owner = false\n",
    ///     "agent.toml",
    /// )
    /// .unwrap();
    /// let now = Instant::now();
    /// let mut machine =
    ///     AgentMachine::new(Arc::new(config), rand::rngs::StdRng::seed_from_u64(1), now);
    /// let peer = Peer { pid: Some(42), process: None, uid: 1000, gid: 1000, authorized: true, app: AppInfo::default() };
    /// machine.handle(Input::CallerConnected { conn: 1, peer }, now);
    /// let open = Open {
    ///     common: Common { request_id: Some(5), critical: vec![] },
    ///     opening: Opening {
    ///         target: Target::Ports { protocol: Protocol::Tcp, ports: PortRange::single(8080) },
    ///         host: Default::default(),
    ///         family: None,
    ///         remotes: vec![],
    ///     },
    ///     lifetime: None,
    ///     app: None,
    /// };
    /// machine.handle(Input::Request { conn: 1, message: LocalMessage::Wire(Message::Open(open)) }, now);
    /// // No gateway yet: the caller is answered gateway-unreachable at once.
    /// match machine.poll_action() {
    ///     Some(Action::Reply { conn: 1, message: LocalMessage::Denied(denied) }) => {
    ///         assert_eq!(denied.code, DenialCode::Local(LocalCode::GatewayUnreachable));
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// ```
    pub fn new(config: Arc<AgentConfig>, rng: StdRng, now: Instant) -> Self {
        AgentMachine {
            config,
            rng,
            link_up: false,
            epoch: None,
            identity: None,
            offered: None,
            gateway: None,
            synced_once: false,
            earlier_run: Vec::new(),
            earlier_run_until: None,
            conns: HashMap::new(),
            leases: HashMap::new(),
            release_waits: HashSet::new(),
            open_waits: HashSet::new(),
            releasing: HashSet::new(),
            next_key: 1,
            next_owner_sweep: now,
            owner_sweep_running: false,
            next_idle_sweep: now,
            last_link_error: None,
            no_gateway_left: None,
            listing: None,
            list_again: false,
            stopping: false,
            actions: VecDeque::new(),
        }
    }

    /// A machine whose jitter comes from the operating system's randomness.
    pub fn from_os_rng(config: Arc<AgentConfig>, now: Instant) -> Self {
        Self::new(config, StdRng::from_os_rng(), now)
    }

    /// The next thing to do, in the order decided.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether any lease is still held (after [`AgentMachine::shutdown`]: whether Releases are
    /// still awaited).
    pub fn holds_leases(&self) -> bool {
        !self.leases.is_empty()
    }

    /// The earliest local expiry of the leases held: the link bounds its reconnection delays
    /// and handshakes by it.
    pub fn earliest_expiry(&self) -> Option<Instant> {
        self.leases
            .values()
            .filter(|h| !h.machine.state().is_terminal())
            .filter_map(|h| h.machine.expires_at())
            .min()
    }

    /// When the machine wants [`AgentMachine::handle_timeout`] to be called next.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let mut next = now + Duration::from_secs(3600);
        for held in self.leases.values() {
            let wake = match held.reopen_deferred(now) {
                // Its Open is due for the lease machine, which would have it sent now.
                Some(at) => Some(held.machine.expires_at().map_or(at, |e| e.min(at))),
                // The same, until a Release is answered, which is an input of its own.
                None if held.waits_for_release => held.machine.expires_at(),
                None => held.machine.poll_timeout(),
            };
            if let Some(t) = wake {
                next = next.min(t);
            }
            for open in held.holders.iter().filter_map(|h| h.open.as_ref()) {
                next = next.min(open.deadline);
            }
            if let Some(since) = held.unheld_since {
                next = next.min(since + OPEN_WAIT);
            }
        }
        if let Some(until) = self.earlier_run_until {
            next = next.min(until);
        }
        if !self.conns.is_empty() {
            next = next.min(self.next_idle_sweep);
        }
        let verified = |h: &Held| h.holders.iter().any(|x| x.owner.is_some());
        if !self.owner_sweep_running && self.leases.values().any(verified) {
            next = next.min(self.next_owner_sweep);
        }
        if !self.link_up {
            // Due sends wait for the link; do not spin on them.
            next = next.max(now + IDLE_TICK);
        }
        next
    }

    /// Acts on whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_idle_sweep {
            self.close_idle(now);
        }
        if now >= self.next_owner_sweep && !self.owner_sweep_running {
            self.sweep_owners(now);
        }
        if self.earlier_run_until.is_some_and(|until| until <= now) {
            self.end_earlier_run(now);
        }
        let keys: Vec<Key> = self.leases.keys().copied().collect();
        for key in keys {
            let Some(held) = self.leases.get_mut(&key) else {
                continue;
            };
            if held.machine.poll_timeout().is_some_and(|t| t <= now) {
                held.machine.handle_timeout(now, &mut self.rng);
            }
            let is_late = |h: &Holder| h.open.as_ref().is_some_and(|o| now >= o.deadline);
            let (late, waiting): (Vec<Holder>, Vec<Holder>) = match held.holders.iter().any(is_late)
            {
                true => std::mem::take(&mut held.holders)
                    .into_iter()
                    .partition(is_late),
                false => (Vec::new(), std::mem::take(&mut held.holders)),
            };
            held.holders = waiting;
            let none_left = held.holders.is_empty();
            for holder in &late {
                if let Some(open) = &holder.open {
                    self.deny(
                        holder.conn,
                        open.request_id,
                        DenialCode::Local(LocalCode::GatewayUnreachable),
                        "the gateway did not answer the request in time".into(),
                        None,
                    );
                }
            }
            if !late.is_empty() && none_left {
                self.unheld(key, None, now);
            }
            self.drive(key, now);
        }
        self.settle(now);
    }

    /// Acts on `input`, received at `now`.
    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::LinkUp {
                gateway,
                welcome,
                leases,
            } => self.on_connected(gateway, *welcome, leases, now),
            Input::Notice(notice) => self.on_notice(notice, now),
            Input::NoticeDiscarded { reason } => {
                debug!("a notice was discarded or lost ({reason}); asking for the list of leases");
                self.ask_list(now);
            }
            Input::Listed { request_id, result } => self.on_listed(request_id, result, now),
            Input::LinkFailed { reason } => {
                self.last_link_error = Some(reason);
            }
            Input::NoGatewayLeft { reason } => self.on_no_gateway_left(reason, now),
            Input::LinkDown { reason } => self.on_disconnected(reason),
            Input::Answer {
                key,
                attempt,
                result,
            } => {
                if self.stopping && result.is_err() {
                    // Nobody will send it again: the lease ends at its expiry at the gateway.
                    self.leases.remove(&key);
                    return;
                }
                if let Some(held) = self.leases.get_mut(&key) {
                    match result {
                        Ok(answer) => held.machine.handle_answer(now, &answer, &mut self.rng),
                        Err(e) if held.machine.in_flight() == Some(attempt) => {
                            debug!(key, "request failed: {e}");
                            held.machine.connection_lost(now, &mut self.rng);
                        }
                        Err(e) => debug!(key, "an earlier request failed: {e}"),
                    }
                    self.drive(key, now);
                }
            }
            Input::CallerConnected { conn, peer } => {
                self.conns.insert(
                    conn,
                    Caller {
                        peer,
                        watch_all: false,
                        watches: HashSet::new(),
                        last_request: now,
                        closing: false,
                    },
                );
            }
            Input::Request { conn, message } => self.on_request(conn, message, now),
            Input::CallerClosed { conn } => self.on_closed(conn, now),
            Input::OwnerChecked {
                conn,
                open,
                result,
                caller,
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
            Input::MirrorLanded { key, lease, result } => {
                self.on_mirror_landed(key, lease, result, now)
            }
            Input::GrantsChecked {
                key,
                lease,
                replaces,
                targets,
                lost,
            } => self.on_grants_checked(key, *lease, replaces, targets, lost, now),
            Input::OwnerLost { key, conn, reason } => {
                self.let_go(key, conn, LetGo::Unowned(reason), now)
            }
            Input::OwnerSweepDone => {
                self.owner_sweep_running = false;
                self.next_owner_sweep = now + self.config.local.owner_check_interval;
            }
            Input::MirrorReleased { conn, requests } => self.answer_released(conn, requests),
        }
        self.settle(now);
    }

    /// Stopping: every lease is released (its caller is not told), and the earlier run's
    /// leases no caller took are released too. Answers still come in through
    /// [`AgentMachine::handle`] until [`AgentMachine::holds_leases`] says none is left.
    pub fn shutdown(&mut self, now: Instant) {
        self.stopping = true;
        let keys: Vec<Key> = self.leases.keys().copied().collect();
        info!(leases = keys.len(), "stopping: releasing every lease");
        self.release_waits.clear();
        self.open_waits.clear();
        self.releasing.clear();
        for key in &keys {
            if let Some(held) = self.leases.get_mut(key) {
                held.holders.clear();
                held.unheld_since = None;
                held.machine.release(now);
            }
            self.drive(*key, now);
        }
        self.end_earlier_run(now);
    }

    // -----------------------------------------------------------------------------------------
    // The link

    fn on_disconnected(&mut self, reason: String) {
        self.last_link_error = Some(format!("the connection ended: {reason}"));
        self.link_up = false;
        // The next connection lists the leases before anything else.
        self.listing = None;
        self.list_again = false;
        debug!(%reason, "link down");
        let keys: Vec<Key> = self.leases.keys().copied().collect();
        for key in keys {
            let live = self.leases.get(&key).is_some_and(|h| {
                !h.machine.state().is_terminal() && h.machine.lease_id().is_some()
            });
            if live {
                self.tell(
                    key,
                    EventKind::GatewayUnreachable,
                    None,
                    Some(format!("connection to the gateway lost: {reason}")),
                    None,
                    None,
                );
            }
        }
    }

    fn on_connected(
        &mut self,
        gateway: String,
        welcome: Welcome,
        listed: Option<Leases>,
        now: Instant,
    ) {
        self.last_link_error = None;
        self.no_gateway_left = None;
        // The List went after the Welcome: if the gateway's state was replaced between the two,
        // its epoch is the newer one, and the leases it lists are of that state (spec 12).
        let epoch = listed.as_ref().map_or(welcome.epoch, |l| l.epoch);
        if epoch != welcome.epoch {
            info!(
                welcome = format_args!("{:016x}", welcome.epoch),
                list = format_args!("{epoch:016x}"),
                "the gateway's epoch changed between its Welcome and its List"
            );
        }
        // Another gateway of the same cluster (the same epoch) holds the same leases: a
        // failover, not a loss.
        let failover = self.synced_once
            && self.epoch == Some(epoch)
            && self.gateway.as_ref().is_some_and(|g| *g != gateway);
        if failover {
            info!(
                from = self.gateway.as_deref().unwrap_or_default(),
                to = %gateway,
                "now connected to another gateway of the cluster: renewing every lease there"
            );
        }
        self.gateway = Some(gateway);
        if let Some(old) = self.epoch
            && old != epoch
        {
            warn!(
                old = format_args!("{old:016x}"),
                new = format_args!("{:016x}", epoch),
                "the gateway's epoch changed: it lost its leases; re-requesting what applications hold"
            );
        }
        self.epoch = Some(epoch);
        self.identity = Some(welcome.identity.clone());
        self.offered = Some(Offered {
            capabilities: welcome.capabilities,
            addresses: welcome.addresses.clone(),
            max_request: usize::try_from(welcome.limits.max_message_size).unwrap_or(usize::MAX),
        });
        self.link_up = true;
        self.actions.push_back(Action::Record {
            epoch,
            identity: welcome.identity.clone(),
        });

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
                    Some((*key, lease.grants.clone(), lease.expires_at))
                })
                .collect();
            for listed in listed.into_iter().flat_map(|l| l.leases) {
                // A lease of an earlier run: held under a number of its own until it ends.
                let holder = self.next_key;
                self.next_key += 1;
                let lease = listed_lease(&listed, epoch, now);
                holders.push((holder, lease.grants.clone(), lease.expires_at));
                self.earlier_run.push(EarlierLease { holder, lease });
            }
            if !self.earlier_run.is_empty() {
                info!(
                    leases = self.earlier_run.len(),
                    grace = ?self.config.local.earlier_run_grace,
                    "the gateway holds leases of an earlier run; those no application asks for again will be released"
                );
                self.earlier_run_until = Some(now + self.config.local.earlier_run_grace);
            }
            self.actions.push_back(Action::MirrorReconcile { holders });
        } else if failover {
            // The new gateway's list may lag the cluster's by a moment, so a lease it does not
            // show yet is not taken as forgotten: every lease is renewed there at once, and
            // only an unknown-lease answer to that Renew opens it again. Until then both
            // kernels keep their elements with their own timeouts, so no opening closes.
            for held in self.leases.values_mut() {
                held.machine.renew_now(now);
            }
        } else {
            // A reconnection under the same epoch: the list went before any other request.
            // Without a list, every lease counts as not listed: it is asked for again with Open,
            // which the gateway answers with the same lease while it holds it (spec 5.4, 11.3).
            let shown = listed.as_ref().map_or(&[][..], |l| l.leases.as_slice());
            self.reconcile_listed(shown, epoch, now, now);
            self.release_unheld(listed.as_ref(), epoch, now);
        }
        self.observe_epoch(epoch, None, now);
        let keys: Vec<Key> = self.leases.keys().copied().collect();
        for key in keys {
            if let Some(held) = self.leases.get_mut(&key) {
                // Requests lost with the old connection, and retries waiting for a gateway,
                // go on this one now.
                held.machine.reconnected(now, &mut self.rng);
            }
            self.drive(key, now);
        }
    }

    /// Reconciles the leases of `epoch` with the gateway's list, `shown`, received at `now`
    /// (spec 11.7): of those granted or renewed by `asked_at`, when the list was asked for (a
    /// later one may be missing from it, or shown with what was left before, only because the
    /// list was made first).
    ///
    /// A lease the list shows is kept, its expiry and next renewal reckoned from what the list
    /// says is left, as for a lease without a hint (spec 11.8); the host table's entry follows
    /// a changed expiry, and the applications holding it hear of one moved by two seconds or
    /// more (Event renewed). A lease the list does not show (it expired or ended there) is opened
    /// again at once (Reopening, spec 11.10); its mirror stays until a new grant replaces it,
    /// or until its expiry, where retries stop.
    fn reconcile_listed(
        &mut self,
        shown: &[LeaseInfo],
        epoch: Epoch,
        asked_at: Instant,
        now: Instant,
    ) {
        let at_gateway: HashMap<LeaseId, &LeaseInfo> =
            shown.iter().map(|info| (info.lease, info)).collect();
        let mut moved = Vec::new();
        for (key, held) in self.leases.iter_mut() {
            if !matches!(
                held.machine.state(),
                LeaseState::Active | LeaseState::Renewing
            ) {
                continue;
            }
            let Some((id, expiry_before)) = held
                .machine
                .lease()
                .filter(|l| l.epoch == epoch && l.granted_at <= asked_at)
                .map(|l| (l.id, l.expires_at))
            else {
                continue;
            };
            let Some(info) = at_gateway.get(&id) else {
                held.machine.not_listed(now);
                continue;
            };
            held.machine
                .listed(now, info.remaining, info.expires_ms, &mut self.rng);
            let Some(lease) = held.machine.lease() else {
                continue;
            };
            if held.mirrored && lease.expires_at != expiry_before {
                self.actions.push_back(Action::MirrorHold {
                    holder: *key,
                    grants: lease.grants.clone(),
                    expires_at: lease.expires_at,
                    confirm: None,
                });
            }
            // `remaining` is rounded down to whole seconds, and the host reckons from when it
            // sent its request: a move of less than two seconds is that, not news for the
            // applications.
            let moved_by = lease
                .expires_at
                .saturating_duration_since(expiry_before)
                .max(expiry_before.saturating_duration_since(lease.expires_at));
            if moved_by >= Duration::from_secs(2) {
                moved.push((*key, lease.expires_at.saturating_duration_since(now)));
            }
        }
        for (key, expires_in) in moved {
            self.tell(key, EventKind::Renewed, Some(expires_in), None, None, None);
        }
    }

    /// Tells every lease machine but `except`'s the gateway's epoch. When more than
    /// [`SPREAD_REOPENS_ABOVE`] leases are to be opened again because of it, each re-open waits
    /// a random while, up to [`REOPEN_SPREAD`] or an eighth of what is left of its lease, so that
    /// their Opens do not reach the gateway all at once (spec 12).
    fn observe_epoch(&mut self, epoch: Epoch, except: Option<Key>, now: Instant) {
        let mut reopening = Vec::new();
        for (key, held) in self.leases.iter_mut() {
            if Some(*key) == except {
                continue;
            }
            let before = held.machine.state();
            held.machine.epoch_observed(now, epoch);
            if before != LeaseState::Reopening && held.machine.state() == LeaseState::Reopening {
                reopening.push(*key);
            }
        }
        if reopening.len() <= SPREAD_REOPENS_ABOVE {
            return;
        }
        info!(
            leases = reopening.len(),
            "spreading the re-opens over up to {REOPEN_SPREAD:?}"
        );
        // In key order, so that a seeded machine draws the same wait for the same lease.
        reopening.sort_unstable();
        for key in reopening {
            let Some(held) = self.leases.get_mut(&key) else {
                continue;
            };
            let left = held
                .machine
                .expires_at()
                .map_or(Duration::ZERO, |e| e.saturating_duration_since(now));
            let longest = REOPEN_SPREAD.min(left / 8);
            let wait = longest.mul_f64(rand::Rng::random_range(&mut self.rng, 0.0..=1.0));
            held.reopen_at = Some(now + wait);
        }
    }

    fn on_notice(&mut self, notice: Message, now: Instant) {
        if let Message::EpochChanged(changed) = &notice {
            self.epoch = Some(changed.epoch);
            self.observe_epoch(changed.epoch, None, now);
        }
        // A lease of an earlier run is mirrored under a holder of its own until the grace
        // ends; revoked, its opening is removed now (spec 8.12), whoever else holds it.
        if let Message::Revoked(revoked) = &notice {
            let (ended, kept): (Vec<EarlierLease>, Vec<EarlierLease>) =
                std::mem::take(&mut self.earlier_run)
                    .into_iter()
                    .partition(|e| e.lease.id == revoked.lease);
            self.earlier_run = kept;
            for earlier in ended {
                info!(lease = %earlier.lease.id, "a lease of an earlier run was revoked");
                self.actions.push_back(Action::MirrorDrop {
                    holder: earlier.holder,
                    then: None,
                });
            }
        }
        let keys: Vec<Key> = self.leases.keys().copied().collect();
        for key in keys {
            if let Some(held) = self.leases.get_mut(&key) {
                held.machine.handle_notice(now, &notice);
            }
            self.drive(key, now);
        }
    }

    /// Asks the gateway for the list of leases, to learn what a discarded or lost notice said
    /// (spec 5.3): one List at a time, and one more after it when others were discarded or lost
    /// meanwhile, however many. Without a link nothing is asked: the next connection lists
    /// first anyway.
    fn ask_list(&mut self, now: Instant) {
        if !self.link_up {
            return;
        }
        if self.listing.is_some() {
            self.list_again = true;
            return;
        }
        let request_id = rand::Rng::random(&mut self.rng);
        self.listing = Some((request_id, now));
        self.actions.push_back(Action::List {
            request: Message::List(fwnp_proto::List {
                common: common(request_id),
            }),
        });
    }

    /// The gateway's list after a discarded or lost notice, reconciled as after a reconnection
    /// (spec 11.7): a new epoch re-opens every lease; a lease the list shows is renewed on what
    /// it says is left; one it does not show is opened again; one no application holds is
    /// released.
    fn on_listed(&mut self, request_id: u64, result: Result<Message, String>, now: Instant) {
        let Some((_, asked_at)) = self.listing.filter(|(asked, _)| *asked == request_id) else {
            return;
        };
        self.listing = None;
        match result {
            Ok(Message::Leases(listed)) => {
                let epoch = listed.epoch;
                if self.epoch != Some(epoch) {
                    warn!(
                        old = ?self.epoch.map(|e| format!("{e:016x}")),
                        new = format_args!("{epoch:016x}"),
                        "the gateway's list carries a new epoch: it lost its leases; re-requesting what applications hold"
                    );
                    self.epoch = Some(epoch);
                    self.observe_epoch(epoch, None, now);
                }
                self.reconcile_listed(&listed.leases, epoch, asked_at, now);
                self.release_unheld(Some(&listed), epoch, now);
                let keys: Vec<Key> = self.leases.keys().copied().collect();
                for key in keys {
                    self.drive(key, now);
                }
            }
            Ok(other) => warn!(
                "the gateway answered List with {}: what the discarded notice said is not known",
                other.message_type().name()
            ),
            Err(e) => warn!("List failed ({e}): what the discarded notice said is not known"),
        }
        if std::mem::take(&mut self.list_again) {
            self.ask_list(now);
        }
    }

    /// Every configured gateway refused the agent's versions: nothing will connect until the
    /// agent restarts, so the Opens waiting for a gateway are refused now with that reason, as
    /// later ones will be.
    fn on_no_gateway_left(&mut self, reason: String, now: Instant) {
        self.last_link_error = Some(reason.clone());
        self.no_gateway_left = Some(reason.clone());
        let waiting: Vec<Key> = self
            .leases
            .iter()
            .filter(|(_, h)| h.machine.state() == LeaseState::Requesting)
            .map(|(k, _)| *k)
            .collect();
        for key in waiting {
            let Some(held) = self.leases.get_mut(&key) else {
                continue;
            };
            let refused = std::mem::take(&mut held.holders);
            held.machine.release(now);
            for holder in refused {
                if let Some(open) = holder.open {
                    self.deny(
                        holder.conn,
                        open.request_id,
                        DenialCode::Wire(ResultCode::UnsupportedVersion),
                        reason.clone(),
                        None,
                    );
                }
            }
            self.drive(key, now);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Lease machines

    /// Sends what the lease machine wants to send, and acts on its events.
    fn drive(&mut self, key: Key, now: Instant) {
        // A lease no caller holds is not opened again, nor an Open of nobody's retried: it is
        // released instead (its Open in flight, if any, is awaited, see `unheld`).
        let abandoned = self.leases.get(&key).is_some_and(|h| {
            h.holders.is_empty() && h.opening() && h.machine.in_flight().is_none()
        });
        if abandoned {
            self.release_lease(key, now);
        }
        // An Open the gateway may answer with a lease whose Release is on its way waits for the
        // Release's answer (see `may_be_granted`); one already sent is not called back.
        let blocked = self
            .leases
            .get(&key)
            .is_some_and(|h| h.opening() && h.machine.in_flight().is_none())
            && self.release_blocks(key);
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        held.waits_for_release = blocked;
        match blocked {
            true => self.open_waits.insert(key),
            false => self.open_waits.remove(&key),
        };
        let mut events = Vec::new();
        while let Some(event) = held.machine.poll_event() {
            events.push(event);
        }
        let deferred = held.reopen_deferred(now).is_some();
        if !deferred {
            held.reopen_at = None;
        }
        let mut request = match self.link_up && !deferred && !blocked {
            true => held.machine.poll_transmit(now),
            false => None,
        };
        // An Open sent later than the application asked (a re-open, a retry on a new
        // connection) is checked against the Welcome in force then (spec 14): refused here, as
        // the gateway would refuse it, without using what it does not offer.
        if let Some(Message::Open(open)) = &request
            && let Some((code, reason)) = self.unoffered(&open.opening)
        {
            let refusal = Message::Denied(fwnp_proto::Denied {
                common: open.common.clone(),
                code,
                reason: Some(reason),
                retry_after: None,
                lease: None,
                unsupported: Vec::new(),
            });
            if let Some(held) = self.leases.get_mut(&key) {
                held.machine.handle_answer(now, &refusal, &mut self.rng);
            }
            request = None;
        }
        // A lease granted to an Open given up meanwhile is given back, unless it is one other
        // callers hold: the gateway merged that Open into their lease.
        if let Some(Message::Release(release)) = &request
            && self.shared(key, release.lease)
        {
            debug!(lease = %release.lease, "lease held for other applications; not released at the gateway");
            let answer = Message::Released(Released {
                common: release.common.clone(),
                lease: release.lease,
            });
            if let Some(held) = self.leases.get_mut(&key) {
                held.machine.handle_answer(now, &answer, &mut self.rng);
            }
            request = None;
        }
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        while let Some(event) = held.machine.poll_event() {
            events.push(event);
        }
        // A renewal, or a re-open of a lease the gateway forgot, keeps the opening going: the
        // port must still be each holder's (its program may have closed it, and another bound
        // it since).
        let recheck = match &request {
            Some(Message::Renew(_)) => true,
            Some(Message::Open(_)) => held.holders.iter().any(|h| !h.ids.is_empty()),
            _ => false,
        };
        let verify_first = match recheck {
            true => held.checks(),
            false => Vec::new(),
        };
        // The Release of a lease granted after its Open was given up: what it grants is not
        // known, so every Open waits for it.
        if matches!(request, Some(Message::Release(_))) && held.releasing.is_none() {
            held.releasing = Some(Vec::new());
            self.releasing.insert(key);
        }
        if let Some(request) = request
            && let Some(attempt) = held.machine.in_flight()
        {
            self.actions.push_back(Action::Send {
                key,
                request,
                attempt,
                verify_first,
            });
        }
        for event in events {
            self.on_event(key, event, now);
        }
        if let Some(held) = self.leases.get(&key)
            && held.machine.is_finished()
            && held.holders.iter().all(|h| h.open.is_none())
        {
            self.leases.remove(&key);
            self.release_waits.remove(&key);
            self.open_waits.remove(&key);
            self.releasing.remove(&key);
        }
    }

    fn on_event(&mut self, key: Key, event: LeaseEvent, now: Instant) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        match event {
            LeaseEvent::Granted { lease, replaces } => {
                let callers: Vec<(ConnId, CallerProcess)> = held
                    .holders
                    .iter()
                    .filter_map(|h| {
                        let owner = h.owner.as_ref().filter(|o| o.by_grants)?;
                        Some((h.conn, owner.caller.clone()))
                    })
                    .collect();
                if !callers.is_empty() {
                    // An application id's ports are known only now: nothing is mirrored or
                    // answered before they are checked as a port request's would be.
                    let mut targets: Vec<(Protocol, PortRange)> =
                        lease.grants.iter().map(|g| (g.protocol, g.ports)).collect();
                    targets.sort_unstable_by_key(|(p, r)| (p.number(), r.first, r.last));
                    targets.dedup();
                    // The first grant may wait for the application to bind, as a port
                    // request does; a re-open's ports are bound already.
                    let grace = match held.holders.iter().any(|h| h.open.is_some()) {
                        true => self.config.local.port_owner_grace,
                        false => Duration::ZERO,
                    };
                    self.actions.push_back(Action::CheckGrants {
                        key,
                        lease: Box::new(lease),
                        replaces,
                        targets,
                        callers,
                        grace,
                    });
                    return;
                }
                self.mirror_granted(key, lease, replaces, now);
            }
            LeaseEvent::Renewed { lease } => {
                self.actions.push_back(Action::MirrorHold {
                    holder: key,
                    grants: lease.grants.clone(),
                    expires_at: lease.expires_at,
                    confirm: None,
                });
                held.mirrored = true;
                let expires_in = lease.expires_at.saturating_duration_since(now);
                self.tell(key, EventKind::Renewed, Some(expires_in), None, None, None);
                if self.epoch != Some(lease.epoch) {
                    self.epoch_seen(lease.epoch, key, now);
                }
            }
            LeaseEvent::Denied {
                code,
                reason,
                retry_after,
            } => {
                for holder in std::mem::take(&mut held.holders) {
                    let Some(open) = holder.open else { continue };
                    self.reply(
                        holder.conn,
                        LocalMessage::Denied(LocalDenied {
                            common: common(open.request_id),
                            code: DenialCode::Wire(code),
                            reason: reason.clone(),
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
                self.tell(
                    key,
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
            LeaseEvent::Lost { code, reason, .. } => {
                self.forget_mirror(key);
                self.tell(
                    key,
                    EventKind::Lost,
                    None,
                    reason,
                    Some(DenialCode::Wire(code)),
                    None,
                );
            }
            LeaseEvent::Expired { .. } => {
                self.forget_mirror(key);
                self.tell(key, EventKind::Expired, None, None, None, None);
            }
            LeaseEvent::Revoked { reason, text, .. } => {
                self.forget_mirror(key);
                let text = text.unwrap_or_else(|| format!("{reason:?}"));
                self.tell(key, EventKind::Revoked, None, Some(text), None, None);
            }
            // Each holder was told when it let go (`let_go`); the elements go now, if they are
            // still there (a lease released because the host table refused it, or stopping).
            LeaseEvent::Released { .. } => self.forget_mirror(key),
            other => debug!(?other, "lease event"),
        }
    }

    fn answer_released(&mut self, conn: ConnId, requests: Vec<(u64, LeaseId)>) {
        for (request_id, lease) in requests {
            self.reply(
                conn,
                LocalMessage::Wire(Message::Released(Released {
                    common: common(request_id),
                    lease,
                })),
            );
        }
    }

    /// Mirrors a granted lease; each Open it answers is answered once the host's table holds
    /// it. A lease that another of the machine's leases holds already is the gateway's merge of
    /// this Open into that lease (spec 11.3): it joins that one, or takes it over when no
    /// caller holds that one any more (its Release waits for this answer, see `unheld`). A
    /// lease granted to an Open whose callers all gave up is let go as the last holder's is.
    fn mirror_granted(
        &mut self,
        key: Key,
        lease: GrantedLease,
        replaces: Option<LeaseId>,
        now: Instant,
    ) {
        let merged_into = self
            .leases
            .iter()
            .find(|(k, h)| {
                **k != key
                    && matches!(h.machine.state(), LeaseState::Active | LeaseState::Renewing)
                    && h.machine.lease_id() == Some(lease.id)
            })
            .map(|(k, h)| (*k, h.holders.is_empty()));
        match merged_into {
            Some((into, false)) => {
                self.merge(key, into, lease, replaces, now);
                return;
            }
            Some((into, true)) => {
                // Nothing of it is in the host table any more, and nothing was sent for it
                // since its last holder let go but perhaps a Renew, whose answer is not needed.
                debug!(lease = %lease.id, "a lease no application held any more was granted again; it is not released");
                self.leases.remove(&into);
                self.release_waits.remove(&into);
                self.open_waits.remove(&into);
                self.releasing.remove(&into);
            }
            None => {}
        }
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        if held.holders.is_empty() {
            self.unheld(key, None, now);
            return;
        }
        // Under the same holder, a re-opened lease's elements replace the old ones.
        self.actions.push_back(Action::MirrorHold {
            holder: key,
            grants: lease.grants.clone(),
            expires_at: lease.expires_at,
            confirm: Some(lease.id),
        });
        held.mirrored = true;
        if replaces.is_some() {
            // Named by the id each holder knew it by: the new one is not theirs yet.
            let expires_in = lease.expires_at.saturating_duration_since(now);
            self.tell(
                key,
                EventKind::Reopened,
                Some(expires_in),
                None,
                None,
                Some(lease.id),
            );
        }
        if let Some(held) = self.leases.get_mut(&key) {
            for holder in &mut held.holders {
                holder.learnt(&lease);
            }
        }
        if self.epoch != Some(lease.epoch) {
            self.epoch_seen(lease.epoch, key, now);
        }
    }

    /// The Open (or re-open) of `from` was granted the lease `into` holds: its holders join
    /// `into`'s, whose machine renews the lease for all of them from now on, asking the largest
    /// lifetime one of them opened with; the lease's expiry is the later of the two grants'
    /// (the gateway's, spec 11.3), and the holders of `into` are told when it moved.
    fn merge(
        &mut self,
        from: Key,
        into: Key,
        lease: GrantedLease,
        replaces: Option<LeaseId>,
        now: Instant,
    ) {
        let Some(mut joining) = self.leases.remove(&from) else {
            return;
        };
        self.open_waits.remove(&from);
        self.release_waits.remove(&from);
        info!(lease = %lease.id, "an Open was merged into a lease held already; it is held for both");
        let Some(held) = self.leases.get_mut(&into) else {
            return;
        };
        let extended = held.machine.extend(now, &lease, &mut self.rng);
        held.unheld_since = None;
        self.release_waits.remove(&into);
        let expires_at = held.machine.expires_at().unwrap_or(lease.expires_at);
        let expires_in = expires_at.saturating_duration_since(now);
        let told_before = held.callers();
        // The re-open of `from` ends as a re-open does, for its own holders.
        if replaces.is_some() {
            let told: Vec<(ConnId, Vec<LeaseId>)> = joining
                .holders
                .iter()
                .filter(|h| h.open.is_none())
                .map(|h| (h.conn, h.ids.clone()))
                .collect();
            for (conn, ids) in told {
                self.emit(
                    conn,
                    &ids,
                    EventKind::Reopened,
                    Some(expires_in),
                    None,
                    None,
                    Some(lease.id),
                );
            }
        }
        for holder in &mut joining.holders {
            holder.learnt(&lease);
        }
        let Some(held) = self.leases.get_mut(&into) else {
            return;
        };
        let waiting = joining.holders.iter().any(|h| h.open.is_some());
        held.holders.append(&mut joining.holders);
        let (lifetime, app) = held.asked();
        held.machine.set_asked(lifetime, app);
        self.actions.push_back(Action::MirrorHold {
            holder: into,
            grants: lease.grants.clone(),
            expires_at,
            confirm: waiting.then_some(lease.id),
        });
        held.mirrored = true;
        // After the hold under `into`, so that the elements they share never leave the table.
        if joining.mirrored {
            self.actions.push_back(Action::MirrorDrop {
                holder: from,
                then: None,
            });
        }
        if extended {
            for conn in told_before {
                let ids = self.ids_of(into, conn);
                self.emit(
                    conn,
                    &ids,
                    EventKind::Renewed,
                    Some(expires_in),
                    None,
                    None,
                    None,
                );
            }
        }
        if self.epoch != Some(lease.epoch) {
            self.epoch_seen(lease.epoch, into, now);
        }
    }

    /// The ports of an application id's grant were checked: mirrored for the holders whose
    /// ports they are; the others' holds end, and the lease with the last one.
    fn on_grants_checked(
        &mut self,
        key: Key,
        lease: GrantedLease,
        replaces: Option<LeaseId>,
        targets: Vec<(Protocol, PortRange)>,
        lost: Vec<(ConnId, PortNotOwned)>,
        now: Instant,
    ) {
        let Some(held) = self.leases.get(&key) else {
            return;
        };
        // Ended meanwhile (released, revoked, timed out): nothing to mirror.
        if held.machine.lease().is_none_or(|l| l.id != lease.id) {
            return;
        }
        // Told under the id they knew: the one granted now never was theirs.
        for (conn, reason) in lost {
            self.let_go(key, conn, LetGo::Unowned(reason), now);
        }
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        if held.holders.is_empty() || held.machine.state().is_terminal() {
            return;
        }
        for owner in held.holders.iter_mut().filter_map(|h| h.owner.as_mut()) {
            owner.targets = targets.clone();
        }
        self.mirror_granted(key, lease, replaces, now);
    }

    /// `conn` lets go of the lease `key`: its hold ends (with a Release, only the part its
    /// answered Opens made; otherwise its Opens still waiting too), it is told so, and when no
    /// one else holds the lease, the lease goes (`unheld`). A Release is answered once the
    /// lease's elements left the host table, or at once when others still hold them.
    fn let_go(&mut self, key: Key, conn: ConnId, how: LetGo, now: Instant) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        let releasing_only_answered = matches!(how, LetGo::Release(..));
        let (gone, kept): (Vec<Holder>, Vec<Holder>) = std::mem::take(&mut held.holders)
            .into_iter()
            .partition(|h| h.conn == conn && (h.open.is_none() || !releasing_only_answered));
        held.holders = kept;
        if gone.is_empty() {
            return;
        }
        let lease = held.machine.lease_id();
        let none_left = held.holders.is_empty();
        let known = gone
            .iter()
            .find(|h| h.open.is_none())
            .map(|h| h.ids.clone());
        let mut answer = None;
        match how {
            LetGo::Release(request_id, named) => {
                info!(conn, ?lease, "released by its application");
                if let Some(ids) = &known {
                    self.emit(conn, ids, EventKind::Released, None, None, None, None);
                }
                answer = Some((conn, vec![(request_id, named)]));
            }
            LetGo::Closed => {}
            LetGo::Unowned(reason) => {
                warn!(
                    conn,
                    ?lease,
                    "ending an application's hold of a lease: {reason}"
                );
                let code = match reason {
                    PortNotOwned::Unreadable(_) => DenialCode::Wire(ResultCode::NoResources),
                    _ => DenialCode::Local(LocalCode::PortNotOwned),
                };
                for open in gone.iter().filter_map(|h| h.open.as_ref()) {
                    self.deny(conn, open.request_id, code, reason.to_string(), None);
                }
                if let Some(ids) = &known {
                    self.emit(
                        conn,
                        ids,
                        EventKind::Lost,
                        None,
                        Some(reason.to_string()),
                        Some(code),
                        None,
                    );
                }
            }
        }
        if none_left {
            self.unheld(key, answer, now);
        } else {
            if let Some(held) = self.leases.get_mut(&key) {
                let (lifetime, app) = held.asked();
                held.machine.set_asked(lifetime, app);
            }
            if let Some((conn, requests)) = answer {
                self.answer_released(conn, requests);
            }
        }
        self.drive(key, now);
    }

    /// No caller holds the lease `key` any more: its elements leave the host table (then
    /// `answer` is given), and it is released at the gateway, unless an Open that the gateway
    /// may answer with this lease is outstanding (see `may_be_granted`): then the Release
    /// waits for that Open's answer, at most [`OPEN_WAIT`], and is not sent at all if the
    /// answer is this lease, whose new holder it is then. A lease whose own Open is on its way
    /// (every caller gave it up) waits for that answer: what it grants is let go then.
    fn unheld(&mut self, key: Key, answer: Option<(ConnId, Vec<(u64, LeaseId)>)>, now: Instant) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        let lease = held.machine.lease().map(|l| (l.id, l.grants.clone()));
        let live = matches!(
            held.machine.state(),
            LeaseState::Active | LeaseState::Renewing
        );
        match std::mem::take(&mut held.mirrored) {
            true => self.actions.push_back(Action::MirrorDrop {
                holder: key,
                then: Some(AfterDrop {
                    lease: lease.as_ref().map_or(LeaseId([0; 16]), |(id, _)| *id),
                    answer,
                }),
            }),
            false => {
                if let Some((conn, requests)) = answer {
                    self.answer_released(conn, requests);
                }
            }
        }
        if self.stopping {
            self.release_lease(key, now);
            return;
        }
        let Some(held) = self.leases.get(&key) else {
            return;
        };
        if held.opening() && held.machine.in_flight().is_some() {
            // Its answer is awaited: the lease it grants, if any, is this lease then, and is let
            // go as this one would be now (`mirror_granted`).
            debug!(
                key,
                "no application holds the lease; its Open on its way is awaited"
            );
            return;
        }
        if let Some((id, grants)) = lease
            && live
            && self.open_outstanding(key, id, &grants)
        {
            debug!(lease = %id, "no application holds the lease; its Release waits for an Open that may be answered with it");
            if let Some(held) = self.leases.get_mut(&key) {
                held.unheld_since = Some(now);
            }
            self.release_waits.insert(key);
            return;
        }
        self.release_lease(key, now);
    }

    /// Releases the lease `key` at the gateway (the machine sends the Release and retries it).
    fn release_lease(&mut self, key: Key, now: Instant) {
        self.release_waits.remove(&key);
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        held.unheld_since = None;
        held.releasing = held.machine.lease().map(|l| l.grants.clone());
        if held.releasing.is_some() {
            self.releasing.insert(key);
        }
        held.machine.release(now);
    }

    /// Ends the waits that are over: the Release of a lease no caller holds, once no Open the
    /// gateway may answer with it is outstanding (or [`OPEN_WAIT`] passed); an Open waiting for
    /// a Release, once no such Release is on its way.
    fn settle(&mut self, now: Instant) {
        let waiting: Vec<Key> = self.release_waits.iter().copied().collect();
        for key in waiting {
            let Some(held) = self.leases.get(&key) else {
                self.release_waits.remove(&key);
                continue;
            };
            let Some(since) = held.unheld_since.filter(|_| held.holders.is_empty()) else {
                self.release_waits.remove(&key);
                if let Some(held) = self.leases.get_mut(&key) {
                    held.unheld_since = None;
                }
                continue;
            };
            let live = matches!(
                held.machine.state(),
                LeaseState::Active | LeaseState::Renewing
            );
            let outstanding = match held.machine.lease() {
                Some(lease) if live => {
                    let (id, grants) = (lease.id, lease.grants.clone());
                    self.open_outstanding(key, id, &grants)
                }
                _ => false,
            };
            if !outstanding || now >= since + OPEN_WAIT {
                self.release_lease(key, now);
                self.drive(key, now);
            }
        }
        let waiting: Vec<Key> = self.open_waits.iter().copied().collect();
        for key in waiting {
            if !self.release_blocks(key) {
                self.drive(key, now);
            }
        }
    }

    /// Whether an Open the gateway may answer with the lease `id` (granting `grants`) is
    /// outstanding, other than `key`'s own: one on its way, due or awaiting a retry, or one
    /// answered with `id` whose ports are still being checked before it joins `key`.
    fn open_outstanding(&self, key: Key, id: LeaseId, grants: &[Grant]) -> bool {
        self.leases.iter().any(|(k, h)| {
            *k != key
                && ((h.opening() && may_be_granted(h.machine.opening(), grants))
                    || (!h.machine.state().is_terminal() && h.machine.lease_id() == Some(id)))
        })
    }

    /// Whether the Open of `key` must wait: the Release of a lease the gateway may answer it
    /// with is on its way.
    fn release_blocks(&self, key: Key) -> bool {
        let Some(opening) = self.leases.get(&key).map(|h| h.machine.opening()) else {
            return false;
        };
        self.releasing.iter().filter(|k| **k != key).any(|k| {
            self.leases.get(k).is_some_and(|h| {
                !h.machine.is_finished()
                    && h.releasing
                        .as_ref()
                        .is_some_and(|grants| may_be_granted(opening, grants))
            })
        })
    }

    /// Whether a machine other than `key` holds `lease` live.
    fn shared(&self, key: Key, lease: LeaseId) -> bool {
        self.leases.iter().any(|(k, h)| {
            *k != key && !h.machine.state().is_terminal() && h.machine.lease_id() == Some(lease)
        })
    }

    /// The lease ids `conn` knows the lease `key` by.
    fn ids_of(&self, key: Key, conn: ConnId) -> Vec<LeaseId> {
        self.leases
            .get(&key)
            .and_then(|h| {
                h.holders
                    .iter()
                    .find(|x| x.conn == conn && x.open.is_none())
            })
            .map(|h| h.ids.clone())
            .unwrap_or_default()
    }

    /// Asks for the ports of every verified lease to be checked again; a lease whose port is
    /// no longer its caller's ends.
    fn sweep_owners(&mut self, now: Instant) {
        self.next_owner_sweep = now + self.config.local.owner_check_interval;
        let leases: Vec<(Key, ConnId, PortCheck)> = self
            .leases
            .iter()
            .filter(|(_, h)| matches!(h.machine.state(), LeaseState::Active | LeaseState::Renewing))
            .flat_map(|(k, h)| {
                h.checks()
                    .into_iter()
                    .map(|(conn, check)| (*k, conn, check))
            })
            .collect();
        if leases.is_empty() {
            return;
        }
        self.owner_sweep_running = true;
        self.actions.push_back(Action::SweepOwners { leases });
    }

    /// Closes callers that hold no lease and sent nothing for the idle timeout.
    fn close_idle(&mut self, now: Instant) {
        self.next_idle_sweep = now + IDLE_SWEEP;
        let idle = self.config.local.idle_timeout;
        let busy: HashSet<ConnId> = self
            .leases
            .values()
            .flat_map(|h| h.holders.iter().map(|x| x.conn))
            .collect();
        for (conn, local) in &mut self.conns {
            if !busy.contains(conn)
                && now.saturating_duration_since(local.last_request) >= idle
                && !local.closing
            {
                debug!(conn, "closing an idle local connection");
                local.closing = true;
                self.actions.push_back(Action::Close { conn: *conn });
            }
        }
    }

    /// Ends the grace period of the earlier run's leases: each is let go in the host table, and
    /// released at the gateway as a lease no caller holds any more is (`unheld`), unless a
    /// caller asked for the same opening again and the gateway gave it this very lease.
    fn end_earlier_run(&mut self, now: Instant) {
        self.earlier_run_until = None;
        for earlier in std::mem::take(&mut self.earlier_run) {
            let lease = earlier.lease.id;
            // A caller's machine holds it now: the mirror keeps the elements under that
            // machine's number, and the lease is that caller's.
            let taken = self
                .leases
                .values()
                .any(|h| !h.machine.state().is_terminal() && h.machine.lease_id() == Some(lease));
            let release = match () {
                _ if taken => {
                    debug!(%lease, "a lease of an earlier run was asked for again; it stays");
                    false
                }
                _ if earlier.lease.expires_at <= now => false,
                _ if !self.link_up => {
                    warn!(%lease, "cannot release a lease of an earlier run: the gateway is unreachable; it stays open there until it expires");
                    false
                }
                _ => true,
            };
            match release {
                // Its elements leave the host table there.
                true => {
                    self.adopt_unheld(earlier.holder, earlier.lease, true, now);
                    self.drive(earlier.holder, now);
                }
                false => self.actions.push_back(Action::MirrorDrop {
                    holder: earlier.holder,
                    then: None,
                }),
            }
        }
    }

    /// Releases the leases the gateway's list shows that no application holds any more (spec
    /// 11.7): one whose Release was lost with the old connection, say. Each goes as a lease no
    /// caller holds any more does (`unheld`): an Open on its way may have been granted it, its
    /// answer lost, and its retry may be answered with it again.
    fn release_unheld(&mut self, listed: Option<&Leases>, epoch: Epoch, now: Instant) {
        let Some(listed) = listed.filter(|l| l.epoch == epoch) else {
            return;
        };
        if !self.link_up {
            return;
        }
        let held: HashSet<LeaseId> = self
            .leases
            .values()
            .filter_map(|h| h.machine.lease_id().or(h.machine.releasing()))
            .chain(self.earlier_run.iter().map(|e| e.lease.id))
            .collect();
        for unheld in listed.leases.iter().filter(|l| !held.contains(&l.lease)) {
            info!(lease = %unheld.lease, "the gateway lists a lease no application holds; releasing it");
            let key = self.next_key;
            self.next_key += 1;
            self.adopt_unheld(key, listed_lease(unheld, epoch, now), false, now);
        }
    }

    /// Takes a lease the gateway holds for the host but no caller does (one of an earlier run,
    /// or one its list shows) as the lease `key`, its elements in the host table under that key
    /// when `mirrored`, and lets it go as one whose last holder let go (`unheld`): its Release
    /// is ordered against the Opens that may be answered with it (see `may_be_granted`) as
    /// every Release is. The caller drives it.
    fn adopt_unheld(&mut self, key: Key, lease: GrantedLease, mirrored: bool, now: Instant) {
        let opening = opening_of(&lease.grants);
        let machine = LeaseMachine::adopt(now, opening, lease, &mut self.rng);
        self.leases.insert(
            key,
            Held {
                machine,
                holders: Vec::new(),
                mirrored,
                reopen_at: None,
                unheld_since: None,
                releasing: None,
                waits_for_release: false,
            },
        );
        self.unheld(key, None, now);
    }

    /// The refusal the gateway would give an Open of `opening` because it uses a feature the
    /// Welcome in force does not offer (spec 14): unsupported-option, or address-mismatch for a
    /// third-party address; `None` when it uses none (or no Welcome came yet).
    fn unoffered(&self, opening: &Opening) -> Option<(ResultCode, String)> {
        let offered = self.offered.as_ref()?;
        let missing = opening.capabilities_used(&offered.addresses) & !offered.capabilities.0;
        if missing == 0 {
            return None;
        }
        let code = if missing == Capabilities::THIRD_PARTY {
            ResultCode::AddressMismatch
        } else {
            ResultCode::UnsupportedOption
        };
        Some((
            code,
            format!(
                "the gateway does not offer {} (capabilities 0x{missing:02x} are not in its Welcome)",
                capability_names(missing)
            ),
        ))
    }

    fn epoch_seen(&mut self, epoch: Epoch, from: Key, now: Instant) {
        self.epoch = Some(epoch);
        self.observe_epoch(epoch, Some(from), now);
    }

    fn forget_mirror(&mut self, key: Key) {
        if let Some(held) = self.leases.get_mut(&key)
            && std::mem::take(&mut held.mirrored)
        {
            self.actions.push_back(Action::MirrorDrop {
                holder: key,
                then: None,
            });
        }
    }

    fn on_mirror_landed(
        &mut self,
        key: Key,
        lease: LeaseId,
        result: Result<(), MirrorError>,
        now: Instant,
    ) {
        let Some(held) = self.leases.get_mut(&key) else {
            return;
        };
        let current = held.machine.lease().filter(|l| l.id == lease).cloned();
        // The Opens this hold answers: those granted this lease and not answered yet.
        let (answering, others): (Vec<Holder>, Vec<Holder>) = std::mem::take(&mut held.holders)
            .into_iter()
            .partition(|h| {
                h.open
                    .as_ref()
                    .and_then(|o| o.granted.as_ref())
                    .is_some_and(|g| g.id == lease)
            });
        held.holders = others;
        if answering.is_empty() {
            if let Err(e) = result {
                warn!(%lease, "the host table refused a lease: {e}");
            }
            return;
        }
        let Some(current) = current else {
            // The lease ended between its Granted and the host table's answer (a Revoked
            // notice, perhaps one that overtook the Granted): the Open is answered now, not
            // left to run out its wait as if the gateway had not answered.
            let state = held.machine.state();
            if !state.is_terminal() {
                held.holders.extend(answering);
                return;
            }
            let (code, reason) = match state {
                LeaseState::Revoked(why) => (
                    ResultCode::DeniedByPolicy,
                    format!("the gateway revoked the lease before it took effect ({why:?})"),
                ),
                _ => (
                    ResultCode::NoResources,
                    "the lease ended before it took effect".to_owned(),
                ),
            };
            for holder in answering {
                if let Some(open) = holder.open {
                    self.deny(
                        holder.conn,
                        open.request_id,
                        DenialCode::Wire(code),
                        reason.clone(),
                        None,
                    );
                }
            }
            return;
        };
        if let Err(e) = result {
            warn!(%lease, "the host table refused a granted lease: {e}");
            let none_left = held.holders.is_empty();
            for holder in answering {
                if let Some(open) = holder.open {
                    self.deny(
                        holder.conn,
                        open.request_id,
                        DenialCode::Wire(ResultCode::NoResources),
                        format!("the host's firewall did not take the opening: {e}"),
                        None,
                    );
                }
            }
            if none_left {
                self.unheld(key, None, now);
            }
            self.drive(key, now);
            return;
        }
        for mut holder in answering {
            let Some(open) = holder.open.take() else {
                continue;
            };
            let granted = open.granted.unwrap_or_else(|| current.clone());
            info!(
                %lease,
                app = ?holder.app.as_ref().and_then(|a| a.name.as_deref()),
                pid = ?holder.app.as_ref().and_then(|a| a.pid),
                grants = ?granted.grants,
                lifetime = granted.lifetime,
                "granted and mirrored"
            );
            let answer = Granted {
                common: common(open.request_id),
                lease: granted.id,
                grants: granted.grants.clone(),
                lifetime: granted.lifetime,
                expires_ms: granted.expires_ms,
                renew_after: granted.renew_after,
                epoch: granted.epoch,
                narrowed: granted.narrowed,
            };
            let conn = holder.conn;
            self.reply(conn, LocalMessage::Wire(Message::Granted(answer)));
            // The gateway gave the lease the later of its expiry and this Open's (spec 11.3):
            // an application whose Open joined a longer lease learns how long it really lasts.
            if current.expires_at > granted.expires_at {
                let expires_in = current.expires_at.saturating_duration_since(now);
                self.emit(
                    conn,
                    &holder.ids,
                    EventKind::Renewed,
                    Some(expires_in),
                    None,
                    None,
                    None,
                );
            }
            // A caller holds a lease once: an answered Open of the same caller joins its hold.
            let Some(held) = self.leases.get_mut(&key) else {
                return;
            };
            match held
                .holders
                .iter_mut()
                .find(|h| h.conn == conn && h.open.is_none())
            {
                Some(hold) => {
                    hold.asked = hold.lifetime().max(holder.lifetime());
                    for id in holder.ids {
                        if !hold.ids.contains(&id) {
                            hold.ids.push(id);
                        }
                    }
                    if hold.owner.is_none() {
                        hold.owner = holder.owner;
                    }
                }
                None => held.holders.push(holder),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Callers

    fn on_request(&mut self, conn: ConnId, message: LocalMessage, now: Instant) {
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
            LocalMessage::Wire(Message::Open(open)) => self.on_open(conn, open, now),
            LocalMessage::Wire(Message::Release(release)) => {
                let found = self.leases.iter().find(|(_, h)| {
                    !h.machine.state().is_terminal()
                        && h.holders.iter().any(|x| {
                            x.conn == conn && x.open.is_none() && x.ids.contains(&release.lease)
                        })
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
                // The caller's hold ends, however many of its Opens the gateway merged into
                // the lease (local API 5.2): it holds the lease once.
                self.let_go(key, conn, LetGo::Release(request_id, release.lease), now);
            }
            LocalMessage::Wire(Message::List(_)) => self.on_list(conn, request_id, now),
            LocalMessage::Watch(watch) => {
                let max = self.config.local.max_watches;
                let Some(local) = self.conns.get_mut(&conn) else {
                    return;
                };
                match watch.lease {
                    None => local.watch_all = true,
                    Some(lease) if local.watches.contains(&lease) => {}
                    Some(_) if local.watches.len() + usize::from(local.watch_all) >= max => {
                        self.reply(
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
                self.reply(
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
                    .filter(|h| {
                        !h.machine.state().is_terminal()
                            && h.machine.lease().is_some()
                            && !h.holders.is_empty()
                    })
                    .count();
                let answer = StatusAnswer {
                    common: common(request_id),
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                    gateway: match (&self.gateway, self.link_up) {
                        (Some(gateway), true) => gateway.clone(),
                        _ => {
                            fwnp_proto::codec::reason_text(&self.config.gateway.gateways.describe())
                        }
                    },
                    connected: self.link_up,
                    epoch: self.epoch,
                    mirror_mode: self.config.mirror.mode.name().to_owned(),
                    identity: self.identity.clone(),
                    leases: live as u64,
                    last_error: match self.link_up {
                        true => None,
                        false => Some(
                            self.last_link_error
                                .clone()
                                .unwrap_or_else(|| "no connection attempt has ended yet".into()),
                        ),
                    },
                    api_version: Some(fwnp_proto::local::API_VERSION),
                };
                self.reply(conn, LocalMessage::StatusAnswer(answer));
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

    fn on_list(&mut self, conn: ConnId, request_id: u64, now: Instant) {
        let leases = self
            .leases
            .values()
            .filter(|h| !h.machine.state().is_terminal())
            .filter_map(|h| {
                let lease = h.machine.lease()?;
                let holder = h.holders.iter().find(|x| x.open.is_none())?;
                Some(LeaseInfo {
                    lease: lease.id,
                    grants: lease.grants.clone(),
                    remaining: u32::try_from(
                        lease.expires_at.saturating_duration_since(now).as_secs(),
                    )
                    .unwrap_or(u32::MAX),
                    expires_ms: lease.expires_ms,
                    app: Some(holder.app.clone().unwrap_or_default()),
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
            self.reply(
                conn,
                LocalMessage::Denied(LocalDenied {
                    common: common(request_id),
                    code: DenialCode::Wire(ResultCode::NoResources),
                    reason: Some("the list of leases does not fit in one answer".to_owned()),
                    retry_after: Some(60),
                    lease: None,
                    unsupported: Vec::new(),
                }),
            );
            return;
        }
        self.reply(conn, LocalMessage::Wire(Message::Leases(answer)));
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
        // A client may not use what the gateway did not offer (spec Section 14); the gateway
        // would answer the same, and the application learns it without a round trip.
        if let Some((code, reason)) = self.unoffered(&open.opening) {
            self.deny(conn, request_id, DenialCode::Wire(code), reason, None);
            return;
        }
        let Some(local) = self.conns.get(&conn) else {
            return;
        };
        let held = self
            .leases
            .values()
            .filter(|h| {
                !h.machine.state().is_terminal() && h.holders.iter().any(|x| x.conn == conn)
            })
            .count();
        if held >= self.config.local.max_leases_per_connection {
            let reason =
                format!("this connection holds {held} leases already (max_leases_per_connection)");
            self.reply(
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
        // Only what the operator lets the agent tell (spec Section 10).
        open.app = self.config.local.app_info.keep(app);
        // No request larger than the gateway accepts (spec 5.4): what the agent adds (the
        // application's information, a request id of its own) may push an Open the
        // application sent whole over it. Without the information, if that is enough.
        if let Some(offered) = &self.offered {
            let size = |open: &Open| {
                let mut largest = open.clone();
                largest.common.request_id = Some(u64::MAX);
                fwnp_proto::codec::encode(&Message::Open(largest)).len()
            };
            let mut bytes = size(&open);
            if bytes > offered.max_request && open.app.is_some() {
                open.app = None;
                bytes = size(&open);
            }
            if bytes > offered.max_request {
                let max = offered.max_request;
                self.deny(
                    conn,
                    request_id,
                    DenialCode::Wire(ResultCode::MalformedRequest),
                    format!(
                        "the Open would be {bytes} bytes, more than the {max} the gateway accepts"
                    ),
                    None,
                );
                return;
            }
        }
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
                self.actions.push_back(Action::CheckOwner {
                    conn,
                    open: Box::new(open),
                    caller,
                    protocol,
                    ports,
                    grace: self.config.local.port_owner_grace,
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
        if !self.link_up {
            let (code, reason) = match &self.no_gateway_left {
                Some(reason) => (
                    DenialCode::Wire(ResultCode::UnsupportedVersion),
                    reason.clone(),
                ),
                None => (
                    DenialCode::Local(LocalCode::GatewayUnreachable),
                    format!(
                        "no connection to the gateway {}",
                        self.config.gateway.gateways.describe()
                    ),
                ),
            };
            self.deny(conn, request_id, code, reason, None);
            return;
        }
        // None goes as no application information at all, not as an empty map.
        let machine = LeaseMachine::new(
            now,
            open.opening,
            open.lifetime,
            open.app.clone(),
            &mut self.rng,
        );
        // An application id's ports are checked once granted, and the check may wait for the
        // application to bind: the Open's wait runs that long more.
        let wait = match owner.as_ref().is_some_and(|o| o.by_grants) {
            true => OPEN_WAIT + self.config.local.port_owner_grace,
            false => OPEN_WAIT,
        };
        let key = self.next_key;
        self.next_key += 1;
        self.leases.insert(
            key,
            Held {
                machine,
                holders: vec![Holder {
                    conn,
                    asked: open.lifetime,
                    granted: None,
                    app: open.app,
                    open: Some(PendingOpen {
                        request_id,
                        deadline: now + wait,
                        granted: None,
                    }),
                    ids: Vec::new(),
                    owner,
                }],
                mirrored: false,
                reopen_at: None,
                unheld_since: None,
                releasing: None,
                waits_for_release: false,
            },
        );
        self.drive(key, now);
    }

    fn on_closed(&mut self, conn: ConnId, now: Instant) {
        self.conns.remove(&conn);
        let keys: Vec<Key> = self
            .leases
            .iter()
            .filter(|(_, h)| h.holders.iter().any(|x| x.conn == conn))
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
            self.let_go(key, conn, LetGo::Closed, now);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Output

    fn reply(&mut self, conn: ConnId, mut message: LocalMessage) {
        if self.conns.contains_key(&conn) {
            fit_reasons(&mut message);
            self.actions.push_back(Action::Reply { conn, message });
        }
    }

    fn deny(
        &mut self,
        conn: ConnId,
        request_id: u64,
        code: DenialCode,
        reason: String,
        lease: Option<LeaseId>,
    ) {
        self.reply(
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

    /// Gives an Event about the lease `key` to each caller holding it, named by the id that
    /// caller knows it by.
    fn tell(
        &mut self,
        key: Key,
        kind: EventKind,
        expires_in: Option<Duration>,
        reason: Option<String>,
        code: Option<DenialCode>,
        new_lease: Option<LeaseId>,
    ) {
        let Some(held) = self.leases.get(&key) else {
            return;
        };
        for conn in held.callers() {
            let ids = self.ids_of(key, conn);
            self.emit(
                conn,
                &ids,
                kind,
                expires_in,
                reason.clone(),
                code,
                new_lease,
            );
        }
    }

    /// Gives an Event to the watches of `conn`, about the lease it knows by `ids` (named by the
    /// last of them).
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        conn: ConnId,
        ids: &[LeaseId],
        kind: EventKind,
        expires_in: Option<Duration>,
        reason: Option<String>,
        code: Option<DenialCode>,
        new_lease: Option<LeaseId>,
    ) {
        let Some(&lease) = ids.last() else {
            return;
        };
        let Some(local) = self.conns.get(&conn) else {
            return;
        };
        let watched = local.watch_all || ids.iter().any(|id| local.watches.contains(id));
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
        self.reply(conn, LocalMessage::Event(event));
    }
}

/// Whether the gateway may answer an Open of `opening` with a live lease that grants `grants`
/// (empty: grants not known, which may be anything).
///
/// The gateway merges an Open into a live lease of the host whose grants are exactly those the Open
/// resolves to (spec 11.3). So when an application releases a lease while another's Open of the
/// same opening is on its way, the gateway may merge the Open into the lease and then end it with
/// the Release, or the other way round: the application that asked would hold a lease the gateway
/// ended. The machine therefore never has a Release and such an Open at the gateway at once (but
/// when stopping): a lease no caller holds (any more, or ever: one of an earlier run, one a list
/// shows, one granted to an Open given up) is released only once no Open that may be answered with
/// it is outstanding (and when one is answered with it, its caller holds it, and nothing is
/// released); an Open that may be answered with a lease whose Release is on its way goes once the
/// Release is answered. Which Opens may be answered with a lease cannot be told exactly (the policy
/// may narrow an Open, an opening without addresses resolves to the host's), so this errs on the
/// side of waiting: an Open of the same application id, or of the same protocol with a port range
/// holding every port of the lease, may be.
fn may_be_granted(opening: &Opening, grants: &[Grant]) -> bool {
    grants.iter().all(|grant| match &opening.target {
        Target::Ports { protocol, ports } => {
            grant.app.is_none()
                && grant.protocol == *protocol
                && ports.first <= grant.ports.first
                && grant.ports.last <= ports.last
        }
        Target::App(id) => grant.app.as_ref() == Some(id),
    })
}

/// A lease the gateway's list shows, as held from `now`: what is left of it is its lifetime.
fn listed_lease(info: &LeaseInfo, epoch: Epoch, now: Instant) -> GrantedLease {
    GrantedLease {
        id: info.lease,
        grants: info.grants.clone(),
        lifetime: info.remaining,
        renew_after: info.remaining / 2,
        expires_at: now + Duration::from_secs(u64::from(info.remaining)),
        expires_ms: info.expires_ms,
        epoch,
        narrowed: false,
        granted_at: now,
    }
}

/// An opening that would be answered with a lease granting `grants`, for the machine of a
/// lease no Open of this run obtained. It is never sent: a lease no caller holds is not opened
/// again (`drive` releases it instead), and an Open answered with it takes it over with its own
/// opening (`mirror_granted`).
fn opening_of(grants: &[Grant]) -> Opening {
    let target = match grants.first() {
        Some(Grant { app: Some(id), .. }) => Target::App(id.clone()),
        Some(grant) => Target::Ports {
            protocol: grant.protocol,
            ports: grant.ports,
        },
        None => Target::Ports {
            protocol: Protocol::Tcp,
            ports: PortRange::single(0),
        },
    };
    Opening {
        target,
        host: Default::default(),
        family: None,
        remotes: Vec::new(),
    }
}

/// Cuts the texts a caller is given to the 512 bytes the local API allows them (local API 3,
/// 6.1, 7.2): reasons are made of what the agent met (gateways' names, QUIC close texts, kernel
/// errors), whose length nothing bounds.
fn fit_reasons(message: &mut LocalMessage) {
    let text = match message {
        LocalMessage::Denied(denied) => &mut denied.reason,
        LocalMessage::Wire(Message::Denied(denied)) => &mut denied.reason,
        LocalMessage::Event(event) => &mut event.reason,
        LocalMessage::StatusAnswer(status) => &mut status.last_error,
        _ => return,
    };
    if let Some(text) = text {
        *text = fwnp_proto::codec::reason_text(text);
    }
}

fn common(request_id: u64) -> Common {
    Common {
        request_id: Some(request_id),
        critical: Vec::new(),
    }
}

/// The names of the capability bits in `bits` (spec Section 14), for a refusal's reason.
fn capability_names(bits: u64) -> String {
    [
        (Capabilities::PORT_RANGES, "port ranges"),
        (Capabilities::REMOTE_PREFIXES, "remote prefixes"),
        (Capabilities::APPLICATIONS, "application ids"),
        (Capabilities::NOTICES, "notices"),
        (Capabilities::THIRD_PARTY, "third-party requests"),
    ]
    .iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|(_, name)| *name)
    .collect::<Vec<_>>()
    .join(", ")
}

/// What the gateway's Welcome offered this host.
#[derive(Debug, Clone)]
struct Offered {
    capabilities: Capabilities,
    addresses: Vec<std::net::IpAddr>,
    /// The largest request it accepts (limits key 1).
    max_request: usize,
}
