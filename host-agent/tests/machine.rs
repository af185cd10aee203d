//! The agent's decisions in simulated time: the [`AgentMachine`] is given inputs and a clock
//! that only these tests move, and what it asks for (requests to the gateway, mirror orders,
//! answers and events for callers) is checked. A scripted gateway answers its requests. No
//! sockets, no sleeping, no kernel: every run is the same.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnp_agent::config::AgentConfig;
use fwnp_agent::machine::{
    Action, AfterDrop, AgentMachine, ConnId, IDLE_TICK, Input, Key, OPEN_WAIT, Peer, REOPEN_SPREAD,
    SPREAD_REOPENS_ABOVE,
};
use fwnp_agent::mirror::MirrorError;
use fwnp_agent::ports::{CallerProcess, PortNotOwned, ProcFs};
use fwnp_proto::lease::Attempt;
use fwnp_proto::local::{DenialCode, EventKind, LocalCode, LocalMessage, Status, Watch};
use fwnp_proto::{
    AppInfo, Capabilities, Common, Denied, Epoch, EpochChanged, Grant, Granted, HostAddresses,
    LeaseId, LeaseInfo, Leases, Limits, List, Message, Open, Opening, PortRange, Protocol, Release,
    Released, Renew, ResultCode, Target, Welcome,
};
use rand::SeedableRng;

const EPOCH: Epoch = 0x5c21_97ed_0000_0001;
const NEW_EPOCH: Epoch = 0x5c21_97ed_0000_0002;
const HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const LIFETIME: u32 = 300;
const APP: ConnId = 7;
/// The gateways of the configurations below.
const GATEWAY_A: &str = "198.51.100.1:4433";
const GATEWAY_B: &str = "198.51.100.2:4433";

/// Two gateways of one cluster.
const CLUSTER: &str = r#"state_dir = "/var/lib/fwnp-agent"
[gateway]
addresses = ["198.51.100.1:4433", "198.51.100.2:4433"]
certificate = "/etc/fwnp/pki/h.pem"
key = "/etc/fwnp/pki/h.key"
ca = "/etc/fwnp/pki/ca.pem"
[local]
verify_port_owner = false
"#;

const VERIFYING: &str = r#"state_dir = "/var/lib/fwnp-agent"
[gateway]
address = "198.51.100.1:4433"
server_name = "198.51.100.1"
certificate = "/etc/fwnp/pki/h.pem"
key = "/etc/fwnp/pki/h.key"
ca = "/etc/fwnp/pki/ca.pem"
[local]
port_owner_grace = "2s"
owner_check_interval = "10s"
"#;

const CONFIG: &str = r#"state_dir = "/var/lib/fwnp-agent"
[gateway]
address = "198.51.100.1:4433"
server_name = "198.51.100.1"
certificate = "/etc/fwnp/pki/h.pem"
key = "/etc/fwnp/pki/h.key"
ca = "/etc/fwnp/pki/ca.pem"
[local]
verify_port_owner = false
earlier_run_grace = "30s"
idle_timeout = "60s"
"#;

/// A machine, its simulated clock, and a scripted gateway's lease numbering.
struct Sim {
    machine: AgentMachine,
    now: Instant,
    next_lease: u8,
    /// The latest attempt of each key's requests, from the machine's sends.
    attempts: HashMap<Key, Attempt>,
}

impl Sim {
    fn new() -> Sim {
        Sim::with(CONFIG)
    }

    fn with(text: &str) -> Sim {
        let config = AgentConfig::parse(text, "agent.toml").expect("the test's configuration");
        let now = Instant::now();
        let rng = rand::rngs::StdRng::seed_from_u64(14);
        Sim {
            machine: AgentMachine::new(Arc::new(config), rng, now),
            now,
            next_lease: 1,
            attempts: HashMap::new(),
        }
    }

    fn input(&mut self, input: Input) -> Vec<Action> {
        self.machine.handle(input, self.now);
        self.actions()
    }

    fn actions(&mut self) -> Vec<Action> {
        let actions: Vec<Action> = std::iter::from_fn(|| self.machine.poll_action()).collect();
        for action in &actions {
            if let Action::Send { key, attempt, .. } = action {
                self.attempts.insert(*key, *attempt);
            }
        }
        actions
    }

    /// The latest attempt sent for `key`.
    fn attempt(&self, key: Key) -> Attempt {
        *self
            .attempts
            .get(&key)
            .expect("a request was sent for the key")
    }

    /// Gives the machine `result` as the outcome of the latest attempt sent for `key`.
    fn answer(&mut self, key: Key, result: Result<Message, String>) -> Vec<Action> {
        let attempt = self.attempt(key);
        self.input(Input::Answer {
            key,
            attempt,
            result,
        })
    }

    /// Moves the clock to `now + by`, waking the machine whenever it asked to be woken on the
    /// way; returns everything it asked for meanwhile.
    fn advance(&mut self, by: Duration) -> Vec<Action> {
        let end = self.now + by;
        let mut out = Vec::new();
        for _ in 0..100_000 {
            let wake = self.machine.poll_timeout(self.now);
            if wake > end {
                break;
            }
            self.now = wake.max(self.now);
            self.machine.handle_timeout(self.now);
            out.extend(self.actions());
        }
        self.now = end;
        self.machine.handle_timeout(self.now);
        out.extend(self.actions());
        out
    }

    /// Moves the clock as [`Sim::advance`] does, but stops at the first request to the
    /// gateway (at most `limit` later), which is returned with everything asked for meanwhile.
    /// A second caller (`APP + 1`) connects and asks for tcp/8080: its Open, sent to the
    /// gateway at once.
    fn second_caller_asks_for_8080(&mut self) -> (Key, Message) {
        self.connect_caller(APP + 1);
        let actions = self.input(Input::Request {
            conn: APP + 1,
            message: open_request(30, 8080),
        });
        single_send(&actions)
    }

    /// The caller's Open of tcp/8080, made while the Release of `lease` (request `released`,
    /// message `release`) is on its way: held back, two seconds on still, until that Release is
    /// answered Released; then sent.
    fn open_of_8080_after_the_release(&mut self, released: Key, release: &Message, lease: LeaseId) {
        let actions = self.input(Input::Request {
            conn: APP,
            message: open_request(5, 8080),
        });
        assert!(sends(&actions).is_empty(), "{actions:?}");
        let actions = self.advance(Duration::from_secs(2));
        assert!(sends(&actions).is_empty(), "{actions:?}");
        let actions = self.answer(
            released,
            Ok(Message::Released(Released {
                common: release.common().clone(),
                lease,
            })),
        );
        let (_, open) = single_send(&actions);
        assert!(
            matches!(&open, Message::Open(o) if o.opening == opening(8080)),
            "{open:?}"
        );
    }

    fn until_send(&mut self, limit: Duration) -> (Key, Message, Vec<Action>) {
        let end = self.now + limit;
        let mut out = Vec::new();
        for _ in 0..100_000 {
            let wake = self.machine.poll_timeout(self.now);
            assert!(wake <= end, "nothing sent within {limit:?}: {out:?}");
            self.now = wake.max(self.now);
            self.machine.handle_timeout(self.now);
            out.extend(self.actions());
            if let Some((key, request)) = sends(&out).into_iter().next() {
                assert_eq!(sends(&out).len(), 1, "{out:?}");
                return (key, request, out);
            }
        }
        panic!("the machine kept waking without sending: {out:?}");
    }

    /// A machine connected under [`EPOCH`], with the caller [`APP`] watching its leases and
    /// holding tcp/8080, granted and mirrored: the machine, the lease and its key.
    fn holding_a_lease() -> (Sim, LeaseId, Key) {
        let mut sim = Sim::new();
        sim.link_up(EPOCH, Vec::new());
        sim.connect_caller(APP);
        let lease = sim.fresh_lease();
        let key = sim.open_granted(APP, 8080, lease, EPOCH);
        (sim, lease, key)
    }

    /// A machine connected under [`EPOCH`], whose caller [`APP`] asked for tcp/8080 (request
    /// 3): the machine, and the key and Open of the request sent to the gateway.
    fn asking_for_8080() -> (Sim, Key, Message) {
        let mut sim = Sim::new();
        sim.link_up(EPOCH, Vec::new());
        sim.connect_caller(APP);
        let actions = sim.input(Input::Request {
            conn: APP,
            message: open_request(3, 8080),
        });
        let (key, request) = single_send(&actions);
        assert!(matches!(request, Message::Open(_)), "{request:?}");
        (sim, key, request)
    }

    /// The caller `conn` opens tcp/8080 asking `lifetime` seconds; the gateway grants that as
    /// `lease` under [`EPOCH`]; the mirror takes it, under the key it names. Returns that key,
    /// and what the machine did once the mirror took it.
    fn open_for_lifetime(
        &mut self,
        conn: ConnId,
        lifetime: u32,
        lease: LeaseId,
    ) -> (Key, Vec<Action>) {
        let actions = self.input(Input::Request {
            conn,
            message: open_request_for(100 + conn, 8080, lifetime),
        });
        let (key, request) = single_send(&actions);
        let actions = self.answer(key, Ok(granted_for(&request, lease, 8080, EPOCH, lifetime)));
        let holder = match &mirror_holds(&actions)[..] {
            [(holder, Some(held))] if *held == lease => *holder,
            other => panic!("expected the lease held in the mirror, got {other:?} in {actions:?}"),
        };
        let landed = self.input(Input::MirrorLanded {
            key: holder,
            lease,
            result: Ok(()),
        });
        (holder, landed)
    }

    /// The link to the gateway ends, for `reason`.
    fn link_down(&mut self, reason: &str) -> Vec<Action> {
        self.input(Input::LinkDown {
            reason: reason.into(),
        })
    }

    fn link_up(&mut self, epoch: Epoch, listed: Vec<LeaseInfo>) -> Vec<Action> {
        self.link_up_at(GATEWAY_A, epoch, listed)
    }

    /// The link comes up to gateway A with `welcome`, which lists nothing under its epoch.
    fn link_up_welcomed(&mut self, welcome: Welcome) -> Vec<Action> {
        let epoch = welcome.epoch;
        self.input(Input::LinkUp {
            gateway: GATEWAY_A.into(),
            welcome: Box::new(welcome),
            leases: Some(Leases {
                common: Common::default(),
                leases: Vec::new(),
                epoch,
            }),
        })
    }

    fn link_up_at(&mut self, gateway: &str, epoch: Epoch, listed: Vec<LeaseInfo>) -> Vec<Action> {
        self.input(Input::LinkUp {
            gateway: gateway.into(),
            welcome: Box::new(welcome(epoch)),
            leases: Some(Leases {
                common: Common::default(),
                leases: listed,
                epoch,
            }),
        })
    }

    fn connect_caller(&mut self, conn: ConnId) {
        let actions = self.input(Input::CallerConnected { conn, peer: peer() });
        assert!(actions.is_empty(), "{actions:?}");
        let actions = self.input(Input::Request {
            conn,
            message: LocalMessage::Watch(Watch {
                common: common(1),
                lease: None,
            }),
        });
        assert!(
            matches!(
                &actions[..],
                [Action::Reply {
                    message: LocalMessage::Watching(_),
                    ..
                }]
            ),
            "{actions:?}"
        );
    }

    fn fresh_lease(&mut self) -> LeaseId {
        let id = LeaseId([self.next_lease; 16]);
        self.next_lease += 1;
        id
    }

    /// The caller `conn` opens tcp/`port`; the gateway grants it as `lease` under `epoch`; the
    /// mirror takes it. Returns the key it is held under (that of the lease it joined, when
    /// another caller holds `lease` already).
    fn open_granted(&mut self, conn: ConnId, port: u16, lease: LeaseId, epoch: Epoch) -> Key {
        self.open_granted_for(conn, port, lease, epoch, LIFETIME)
    }

    /// As [`Sim::open_granted`], the gateway granting `lifetime` seconds.
    fn open_granted_for(
        &mut self,
        conn: ConnId,
        port: u16,
        lease: LeaseId,
        epoch: Epoch,
        lifetime: u32,
    ) -> Key {
        let actions = self.input(Input::Request {
            conn,
            message: open_request(10 + u64::from(port), port),
        });
        let (key, request) = single_send(&actions);
        assert!(matches!(request, Message::Open(_)), "{request:?}");
        let granted = granted_for(&request, lease, port, epoch, lifetime);
        let actions = self.answer(key, Ok(granted));
        let key = match &mirror_holds(&actions)[..] {
            [(holder, Some(held))] if *held == lease => *holder,
            other => panic!("expected the lease held in the mirror, got {other:?} in {actions:?}"),
        };
        let actions = self.input(Input::MirrorLanded {
            key,
            lease,
            result: Ok(()),
        });
        match &actions[..] {
            [
                Action::Reply {
                    conn: to,
                    message: LocalMessage::Wire(Message::Granted(g)),
                },
            ] => {
                assert_eq!((*to, g.lease), (conn, lease));
                assert_eq!(g.common.request_id, Some(10 + u64::from(port)));
            }
            other => panic!("expected the Granted for the caller, got {other:?}"),
        }
        key
    }
}

fn common(request_id: u64) -> Common {
    Common {
        request_id: Some(request_id),
        critical: Vec::new(),
    }
}

fn welcome(epoch: Epoch) -> Welcome {
    Welcome {
        common: common(0),
        version: 1,
        capabilities: Capabilities(Capabilities::ALL),
        limits: Limits {
            max_message_size: fwnp_proto::MAX_MESSAGE_SIZE as u32,
            max_streams: 16,
            min_lifetime: 1,
            max_lifetime: 3600,
            max_leases: None,
        },
        epoch,
        time_ms: 1_000,
        identity: "fwnp://host/web-01".into(),
        addresses: vec![HOST],
    }
}

fn peer() -> Peer {
    Peer {
        pid: Some(4242),
        process: None,
        uid: 1000,
        gid: 1000,
        authorized: true,
        app: AppInfo {
            name: Some("web".into()),
            ..AppInfo::default()
        },
    }
}

fn opening(port: u16) -> Opening {
    Opening {
        target: Target::Ports {
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
        },
        host: HostAddresses::Default,
        family: None,
        remotes: Vec::new(),
    }
}

/// The caller `conn`, connected from this test's own process (whose ports can be verified).
fn connect_this_process(sim: &mut Sim, conn: ConnId) -> Vec<Action> {
    let me = CallerProcess::identify(&ProcFs::default(), std::process::id(), None)
        .expect("this test's own process");
    sim.input(Input::CallerConnected {
        conn,
        peer: Peer {
            process: Some(me),
            ..peer()
        },
    })
}

/// An Open of the application id `web` for [`LIFETIME`].
fn open_app_request(request_id: u64) -> LocalMessage {
    LocalMessage::Wire(Message::Open(Open {
        common: common(request_id),
        opening: Opening {
            target: Target::App("web".into()),
            ..opening(0)
        },
        lifetime: Some(LIFETIME),
        app: None,
    }))
}

fn open_request(request_id: u64, port: u16) -> LocalMessage {
    open_request_for(request_id, port, LIFETIME)
}

/// An Open of tcp/`port` asking `lifetime` seconds.
fn open_request_for(request_id: u64, port: u16, lifetime: u32) -> LocalMessage {
    LocalMessage::Wire(Message::Open(Open {
        common: common(request_id),
        opening: opening(port),
        lifetime: Some(lifetime),
        app: None,
    }))
}

/// A Release of `lease`.
fn release_request(request_id: u64, lease: LeaseId) -> LocalMessage {
    LocalMessage::Wire(Message::Release(Release {
        common: common(request_id),
        lease,
    }))
}

/// The callers answered Released, with the request ids answered.
fn released_answers(actions: &[Action]) -> Vec<(ConnId, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply {
                conn,
                message: LocalMessage::Wire(Message::Released(r)),
            } => Some((*conn, r.common.request_id.unwrap_or(0))),
            _ => None,
        })
        .collect()
}

fn grant(port: u16) -> Grant {
    Grant {
        protocol: Protocol::Tcp,
        ports: PortRange::single(port),
        host: HOST,
        remotes: Vec::new(),
        app: None,
    }
}

/// The scripted gateway's grant of `request` (an Open or a Renew).
fn granted(request: &Message, lease: LeaseId, port: u16, epoch: Epoch) -> Message {
    granted_for(request, lease, port, epoch, LIFETIME)
}

/// The scripted gateway's grant of `request` for `lifetime` seconds, renewed after half.
fn granted_for(
    request: &Message,
    lease: LeaseId,
    port: u16,
    epoch: Epoch,
    lifetime: u32,
) -> Message {
    Message::Granted(Granted {
        common: common(request.common().request_id.unwrap_or(0)),
        lease,
        grants: vec![grant(port)],
        lifetime,
        expires_ms: 1_000 + u64::from(lifetime) * 1_000,
        renew_after: lifetime / 2,
        epoch,
        narrowed: false,
    })
}

fn listed(lease: LeaseId, port: u16, remaining: u32) -> LeaseInfo {
    LeaseInfo {
        lease,
        grants: vec![grant(port)],
        remaining,
        expires_ms: 1_000 + u64::from(remaining) * 1_000,
        app: None,
    }
}

fn sends(actions: &[Action]) -> Vec<(Key, Message)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { key, request, .. } => Some((*key, request.clone())),
            _ => None,
        })
        .collect()
}

/// The leases `actions` release at the gateway.
fn releases(actions: &[Action]) -> Vec<LeaseId> {
    sends(actions)
        .into_iter()
        .filter_map(|(_, request)| match request {
            Message::Release(release) => Some(release.lease),
            _ => None,
        })
        .collect()
}

fn single_send(actions: &[Action]) -> (Key, Message) {
    match &sends(actions)[..] {
        [one] => one.clone(),
        other => panic!("expected one request to the gateway, got {other:?} in {actions:?}"),
    }
}

fn mirror_holds(actions: &[Action]) -> Vec<(Key, Option<LeaseId>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::MirrorHold {
                holder, confirm, ..
            } => Some((*holder, *confirm)),
            _ => None,
        })
        .collect()
}

fn mirror_drops(actions: &[Action]) -> Vec<Key> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::MirrorDrop { holder, .. } => Some(*holder),
            _ => None,
        })
        .collect()
}

fn events(actions: &[Action]) -> Vec<(ConnId, fwnp_proto::local::Event)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply {
                conn,
                message: LocalMessage::Event(e),
            } => Some((*conn, e.clone())),
            _ => None,
        })
        .collect()
}

fn denials(actions: &[Action]) -> Vec<(ConnId, fwnp_proto::local::LocalDenied)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply {
                conn,
                message: LocalMessage::Denied(d),
            } => Some((*conn, d.clone())),
            _ => None,
        })
        .collect()
}

/// A lease is held when the link goes down: the caller hears the gateway is unreachable, no
/// renewal is sent while there is no link, and when the link is back under the same epoch with
/// the lease still listed, nothing is opened again and the renewal goes out on the schedule the
/// list gives (spec 11.7, 11.8): from half of what it says is left.
#[test]
fn reconnect_resumes_renewals_without_reopening() {
    let (mut sim, lease, key) = Sim::holding_a_lease();

    let actions = sim.link_down("idle timeout");
    match &events(&actions)[..] {
        [(APP, e)] => {
            assert_eq!((e.kind, e.lease), (EventKind::GatewayUnreachable, lease));
            assert!(e.reason.as_deref().unwrap_or("").contains("idle timeout"));
        }
        other => panic!("expected gateway-unreachable, got {other:?}"),
    }

    // Past the renewal window: nothing can go out, nothing ends.
    let actions = sim.advance(Duration::from_secs(u64::from(LIFETIME) - 60));
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    assert!(events(&actions).is_empty(), "{actions:?}");

    let listed_at = sim.now;
    let actions = sim.link_up(EPOCH, vec![listed(lease, 8080, 60)]);
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Record { epoch: EPOCH, .. })),
        "{actions:?}"
    );
    let (to, request, _) = sim.until_send(Duration::from_secs(60));
    assert_eq!(to, key);
    let Message::Renew(renew) = &request else {
        panic!("expected a renewal, got {request:?}");
    };
    assert_eq!(renew.lease, lease);
    let after = sim.now - listed_at;
    assert!(
        after >= Duration::from_secs(30) && after <= Duration::from_millis(37_500),
        "renewed {after:?} after the list"
    );

    let actions = sim.answer(key, Ok(granted(&request, lease, 8080, EPOCH)));
    assert_eq!(mirror_holds(&actions), vec![(key, None)]);
    match &events(&actions)[..] {
        [(APP, e)] => {
            assert_eq!((e.kind, e.lease), (EventKind::Renewed, lease));
            assert_eq!(e.expires_in_ms, Some(u64::from(LIFETIME) * 1_000));
        }
        other => panic!("expected renewed, got {other:?}"),
    }
}

/// A request in flight when the link drops fails with it; on the next connection it is sent
/// again (and the late failure of the first one is not counted against the second).
#[test]
fn a_request_lost_with_the_link_is_sent_again_on_the_next() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    let (_, first, _) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
    assert!(matches!(first, Message::Renew(_)), "{first:?}");
    let first_attempt = sim.attempt(key);

    sim.link_down("reset");
    let actions = sim.link_up(EPOCH, vec![listed(lease, 8080, 30)]);
    let (_, second) = single_send(&actions);
    assert!(matches!(second, Message::Renew(_)), "{second:?}");
    // The same request, unanswered, goes again under its id (spec 15), as another attempt.
    assert_eq!(first.common().request_id, second.common().request_id);
    assert_ne!(sim.attempt(key), first_attempt);

    // The first exchange's failure arrives late: nothing is sent a third time.
    let actions = sim.input(Input::Answer {
        key,
        attempt: first_attempt,
        result: Err("connection lost".into()),
    });
    assert!(sends(&actions).is_empty(), "{actions:?}");
    let actions = sim.answer(key, Ok(granted(&second, lease, 8080, EPOCH)));
    assert_eq!(events(&actions)[0].1.kind, EventKind::Renewed);
}

/// A reconnection's list shows a lease the host holds with more time left than the host reckoned
/// from its Granted: the lease is kept on the list's terms (spec 11.7, 11.8), not on its
/// Granted's.
#[test]
fn a_lease_a_reconnection_lists_is_kept_on_what_the_list_says_is_left() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    sim.link_down("idle timeout");
    // Before the renewal window of the Granted, [150 s, 187.5 s].
    sim.advance(Duration::from_secs(100));
    let listed_at = sim.now;
    let actions = sim.link_up(EPOCH, vec![listed(lease, 8080, 261)]);
    assert_kept_as_listed(&mut sim, (key, lease), listed_at, 261, &actions);
}

/// The list asked for after a discarded notice is reconciled the same way: a lease it shows
/// with more time left than the host reckoned is kept on the list's terms (spec 11.7, 11.8).
#[test]
fn a_lease_the_list_after_a_discarded_notice_shows_is_kept_on_its_terms() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    sim.advance(Duration::from_secs(100));
    let actions = sim.input(Input::NoticeDiscarded {
        reason: "an undecodable notice".into(),
    });
    let request_id = single_list(&actions);
    sim.advance(Duration::from_millis(40));
    let listed_at = sim.now;
    let actions = sim.input(Input::Listed {
        request_id,
        result: Ok(Message::Leases(Leases {
            common: common(request_id),
            leases: vec![listed(lease, 8080, 261)],
            epoch: EPOCH,
        })),
    });
    assert_kept_as_listed(&mut sim, (key, lease), listed_at, 261, &actions);
}

/// A list that shows a lease with the time the host reckoned it has left, but for the list's
/// rounding down to whole seconds and a little more, is no news: the caller is told nothing.
#[test]
fn a_lease_listed_with_the_time_the_host_reckoned_is_no_news() {
    let (mut sim, lease, _) = Sim::holding_a_lease();
    sim.link_down("idle timeout");
    sim.advance(Duration::from_millis(100_400));
    // 1.6 s less than the host reckoned.
    let left = LIFETIME - 102;
    let actions = sim.link_up(EPOCH, vec![listed(lease, 8080, left)]);
    assert!(events(&actions).is_empty(), "{actions:?}");
    assert!(sends(&actions).is_empty(), "{actions:?}");
}

/// Checks that `held` (a key and its lease), shown by a list received at `listed_at` with
/// `remaining` seconds left, is kept on the list's terms, as spec 11.8 says for a lease learned
/// from Leases (t the list's receipt, L `remaining`, H = L/2): `actions`, the machine's answer
/// to the list, open nothing, tell the caller the moved expiry (Event renewed) and hold its
/// host-table entry until t + L, and its next Renew goes at a random instant of
/// [t + L/2, t + L/2 + L/8].
fn assert_kept_as_listed(
    sim: &mut Sim,
    (key, lease): (Key, LeaseId),
    listed_at: Instant,
    remaining: u32,
    actions: &[Action],
) {
    assert!(sends(actions).is_empty(), "{actions:?}");
    let left = Duration::from_secs(u64::from(remaining));
    // The caller hears of the moved expiry.
    let renewed: Vec<Option<u64>> = events(actions)
        .into_iter()
        .filter(|(conn, e)| *conn == APP && e.lease == lease && e.kind == EventKind::Renewed)
        .map(|(_, e)| e.expires_in_ms)
        .collect();
    assert_eq!(
        renewed,
        vec![Some(u64::from(remaining) * 1000)],
        "{actions:?}"
    );
    let held_until: Vec<Instant> = actions
        .iter()
        .filter_map(|a| match a {
            Action::MirrorHold {
                holder,
                expires_at,
                confirm: None,
                ..
            } if *holder == key => Some(*expires_at),
            _ => None,
        })
        .collect();
    assert_eq!(held_until, vec![listed_at + left], "{actions:?}");
    let (to, request, on_the_way) = sim.until_send(left);
    assert_eq!(to, key);
    assert!(
        matches!(&request, Message::Renew(renew) if renew.lease == lease),
        "{request:?}"
    );
    assert!(mirror_drops(&on_the_way).is_empty(), "{on_the_way:?}");
    let after = sim.now - listed_at;
    assert!(
        after >= left / 2 && after <= left / 2 + left / 8,
        "renewed {after:?} after the list"
    );
}

/// Back under the same epoch, a lease the gateway no longer lists (it expired there while the
/// link was down) is opened again at once; the caller hears it was re-opened under a new id,
/// and the host table holds the new grants under the same holder.
#[test]
fn reconnect_reopens_a_lease_the_gateway_forgot() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    sim.link_down("reset");
    sim.advance(Duration::from_secs(10));

    // The gateway's list lacks the lease: it is opened again (spec 11.10, Reopening), and its
    // mirror stays until the new grant replaces it.
    let actions = sim.link_up(EPOCH, Vec::new());
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    let (to, request) = single_send(&actions);
    assert_eq!(to, key);
    assert!(matches!(request, Message::Open(_)), "{request:?}");

    let new = sim.fresh_lease();
    let actions = sim.answer(key, Ok(granted(&request, new, 8080, EPOCH)));
    assert_eq!(mirror_holds(&actions), vec![(key, Some(new))]);
    match &events(&actions)[..] {
        [(APP, e)] => {
            assert_eq!(e.kind, EventKind::Reopened);
            assert_eq!((e.lease, e.new_lease), (lease, Some(new)));
        }
        other => panic!("expected reopened, got {other:?}"),
    }
    // Answered already: the mirror's confirmation answers nobody again.
    let actions = sim.input(Input::MirrorLanded {
        key,
        lease: new,
        result: Ok(()),
    });
    assert!(actions.is_empty(), "{actions:?}");
}

/// The gateway revokes a lease while the host's table is still taking it, before its Open was
/// answered: the Open is refused at once, not after its wait as if the gateway were silent.
#[test]
fn an_open_whose_lease_is_revoked_before_it_took_effect_is_refused_at_once() {
    let (mut sim, key, request) = Sim::asking_for_8080();
    let lease = sim.fresh_lease();
    let actions = sim.answer(key, Ok(granted(&request, lease, 8080, EPOCH)));
    assert_eq!(mirror_holds(&actions), vec![(key, Some(lease))]);
    sim.input(Input::Notice(Message::Revoked(fwnp_proto::Revoked {
        common: Common::default(),
        lease,
        reason: fwnp_proto::RevokeReason::Operator,
        text: None,
    })));
    let actions = sim.input(Input::MirrorLanded {
        key,
        lease,
        result: Ok(()),
    });
    match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.code, DenialCode::Wire(ResultCode::DeniedByPolicy));
            assert_eq!(d.common.request_id, Some(3));
        }
        other => panic!("expected a refusal at once, got {other:?}"),
    }
    let actions = sim.advance(fwnp_agent::machine::OPEN_WAIT + IDLE_TICK);
    assert!(denials(&actions).is_empty(), "answered once: {actions:?}");
}

/// A lease the gateway's list lacks is opened again, and its retries stop at its expiry (spec
/// 11.9): a gateway that never grants it again leaves the caller with an expired lease and
/// nothing mirrored, not with an Open retried for ever.
#[test]
fn a_lease_the_gateway_forgot_and_never_grants_again_expires() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    sim.link_down("reset");
    sim.advance(Duration::from_secs(10));
    let actions = sim.link_up(EPOCH, Vec::new());
    let (_, request) = single_send(&actions);
    assert!(matches!(request, Message::Open(_)), "{request:?}");
    // No answer ever comes: retries go on until the lease's expiry, then it ends.
    let actions = sim.advance(Duration::from_secs(u64::from(LIFETIME)));
    assert!(!sends(&actions).is_empty(), "the Open is retried meanwhile");
    assert_eq!(mirror_drops(&actions), vec![key], "{actions:?}");
    match &events(&actions)[..] {
        [.., (APP, e)] => {
            assert_eq!((e.kind, e.lease), (EventKind::Expired, lease), "{e:?}");
        }
        other => panic!("expected expired, got {other:?}"),
    }
    let after = sim.advance(Duration::from_secs(600));
    assert!(sends(&after).is_empty(), "nothing more is sent: {after:?}");
}

/// The gateway announces a new epoch (it lost its leases): every lease is opened again (spec:
/// a fresh Open of the same opening), the old one stays mirrored until the new one is granted,
/// and the caller hears re-opened with the new id.
#[test]
fn epoch_change_reopens_every_lease() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    let first = sim.fresh_lease();
    let second = sim.fresh_lease();
    let key1 = sim.open_granted(APP, 8080, first, EPOCH);
    let key2 = sim.open_granted(APP, 8443, second, EPOCH);

    let actions = sim.input(Input::Notice(Message::EpochChanged(EpochChanged {
        common: Common::default(),
        epoch: NEW_EPOCH,
    })));
    let mut reopened = sends(&actions);
    reopened.sort_by_key(|(k, _)| *k);
    assert_eq!(reopened.len(), 2, "{actions:?}");
    assert!(
        reopened.iter().all(|(_, m)| matches!(m, Message::Open(_))),
        "{reopened:?}"
    );
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");

    for ((key, request), (old, port)) in reopened.into_iter().zip([(first, 8080), (second, 8443)]) {
        let new = sim.fresh_lease();
        let actions = sim.answer(key, Ok(granted(&request, new, port, NEW_EPOCH)));
        assert_eq!(mirror_holds(&actions), vec![(key, Some(new))]);
        match &events(&actions)[..] {
            [(APP, e)] => {
                assert_eq!(e.kind, EventKind::Reopened);
                assert_eq!((e.lease, e.new_lease), (old, Some(new)));
            }
            other => panic!("expected reopened, got {other:?}"),
        }
    }
    assert_ne!(key1, key2);

    // Status reports the new epoch.
    let actions = sim.input(Input::Request {
        conn: APP,
        message: LocalMessage::Status(Status { common: common(99) }),
    });
    match &actions[..] {
        [
            Action::Reply {
                message: LocalMessage::StatusAnswer(s),
                ..
            },
        ] => {
            assert_eq!(s.epoch, Some(NEW_EPOCH));
            assert_eq!(s.leases, 2);
            assert!(s.connected);
        }
        other => panic!("expected a status answer, got {other:?}"),
    }
}

/// A reconnection that finds another epoch in the Welcome re-opens as the notice does.
#[test]
fn a_new_epoch_in_the_welcome_reopens_the_lease() {
    let (mut sim, _, key) = Sim::holding_a_lease();
    sim.link_down("gateway restarted");
    let actions = sim.link_up(NEW_EPOCH, Vec::new());
    let (to, request) = single_send(&actions);
    assert_eq!(to, key);
    assert!(matches!(request, Message::Open(_)), "{request:?}");
    let new = sim.fresh_lease();
    let actions = sim.answer(key, Ok(granted(&request, new, 8080, NEW_EPOCH)));
    let reopened: Vec<_> = events(&actions)
        .into_iter()
        .filter(|(_, e)| e.kind == EventKind::Reopened)
        .collect();
    assert_eq!(reopened.len(), 1, "{actions:?}");
    assert_eq!(reopened[0].1.new_lease, Some(new));
}

/// The gateway's state is replaced between a reconnection's Welcome and its List: the List's
/// epoch is the newer one, and a lease of the old epoch is opened again (spec 12), although the
/// Welcome still carried the lease's epoch.
#[test]
fn a_new_epoch_in_the_list_reopens_the_lease() {
    let (mut sim, _, key) = Sim::holding_a_lease();
    sim.link_down("gateway restarted");
    let actions = sim.input(Input::LinkUp {
        gateway: GATEWAY_A.into(),
        welcome: Box::new(welcome(EPOCH)),
        leases: Some(Leases {
            common: Common::default(),
            leases: Vec::new(),
            epoch: NEW_EPOCH,
        }),
    });
    let (to, request) = single_send(&actions);
    assert_eq!(to, key);
    assert!(matches!(request, Message::Open(_)), "{request:?}");
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    let new = sim.fresh_lease();
    let actions = sim.answer(key, Ok(granted(&request, new, 8080, NEW_EPOCH)));
    assert_eq!(mirror_holds(&actions), vec![(key, Some(new))]);
}

/// A gateway that will not list the host's leases on a reconnection (its list would not fit in
/// an answer, or it rate-limits): the connection stays, and what the host holds is asked for
/// again with Open (spec 5.4); the mirror keeps the lease meanwhile, and the Open's Granted of
/// the same lease keeps it going.
#[test]
fn without_a_list_what_the_host_holds_is_opened_again() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    sim.link_down("reset");
    let actions = sim.input(Input::LinkUp {
        gateway: GATEWAY_A.into(),
        welcome: Box::new(welcome(EPOCH)),
        leases: None,
    });
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    let (to, request) = single_send(&actions);
    assert_eq!(to, key);
    assert!(matches!(request, Message::Open(_)), "{request:?}");
    let actions = sim.answer(key, Ok(granted(&request, lease, 8080, EPOCH)));
    assert_eq!(mirror_holds(&actions), vec![(key, Some(lease))]);
    assert!(
        !events(&actions).iter().any(|(_, e)| matches!(
            e.kind,
            EventKind::Lost | EventKind::Expired | EventKind::Revoked
        )),
        "{actions:?}"
    );
}

/// A reconnection's list shows a lease no application holds (its Release was lost with the old
/// connection): it is released (spec 11.7). The leases the host holds stay as they are.
#[test]
fn a_listed_lease_no_application_holds_is_released_on_a_reconnection() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    let kept = sim.fresh_lease();
    sim.open_granted(APP, 8080, kept, EPOCH);
    let stray = sim.fresh_lease();
    sim.link_down("reset");
    let actions = sim.link_up(EPOCH, vec![listed(kept, 8080, 20), listed(stray, 9090, 20)]);
    assert_eq!(releases(&actions), vec![stray]);
    assert_eq!(sends(&actions).len(), 1, "{actions:?}");
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
}

/// The Release of a lease a reconnection's list shows and no application holds is on its way
/// when a caller asks for the same opening: its Open waits for the Release's answer (local API
/// 9.1), and goes once it came.
#[test]
fn an_open_waits_for_the_release_of_a_listed_lease_no_application_holds() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    let stray = sim.fresh_lease();
    sim.link_down("reset");
    let actions = sim.link_up(EPOCH, vec![listed(stray, 8080, 200)]);
    let (released, release) = single_send(&actions);
    assert!(
        matches!(&release, Message::Release(r) if r.lease == stray),
        "{release:?}"
    );

    sim.open_of_8080_after_the_release(released, &release, stray);
}

/// A reconnection's list shows a lease no application holds while a caller's Open of the same
/// opening is on its way (its Granted, perhaps of that lease, lost with the connection): the
/// lease's Release waits for the Open's answer. Answered with that lease, the caller holds it
/// and nothing is released; answered with another, the Release goes then.
#[test]
fn a_listed_lease_no_application_holds_waits_for_an_open_that_may_be_answered_with_it() {
    for answered_with_it in [true, false] {
        let (mut sim, key, _) = Sim::asking_for_8080();
        let stray = sim.fresh_lease();
        sim.link_down("reset");
        let actions = sim.link_up(EPOCH, vec![listed(stray, 8080, 200)]);
        let (to, open) = single_send(&actions);
        assert_eq!(to, key);
        assert!(matches!(open, Message::Open(_)), "{open:?}");

        let lease = match answered_with_it {
            true => stray,
            false => sim.fresh_lease(),
        };
        let actions = sim.answer(key, Ok(granted(&open, lease, 8080, EPOCH)));
        assert_eq!(mirror_holds(&actions), vec![(key, Some(lease))]);
        if answered_with_it {
            assert!(sends(&actions).is_empty(), "{actions:?}");
        } else {
            assert_eq!(releases(&actions), vec![stray], "{actions:?}");
            let (released, release) = single_send(&actions);
            sim.answer(
                released,
                Ok(Message::Released(Released {
                    common: release.common().clone(),
                    lease: stray,
                })),
            );
        }
        let actions = sim.input(Input::MirrorLanded {
            key,
            lease,
            result: Ok(()),
        });
        assert!(
            matches!(&actions[..], [Action::Reply { conn: APP, message: LocalMessage::Wire(Message::Granted(g)) }] if g.lease == lease),
            "{actions:?}"
        );
        let actions = sim.advance(OPEN_WAIT * 2);
        assert!(releases(&actions).is_empty(), "{actions:?}");
        let (to, renew, _) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
        assert_eq!(to, key);
        assert!(matches!(renew, Message::Renew(Renew { lease: l, .. }) if l == lease));
    }
}

/// The gateway refuses a renewal for good: the caller hears renewal-refused with the code and
/// the time left; the lease stays mirrored until its expiry, then ends (event expired, mirror
/// dropped) and nothing more is sent.
#[test]
fn a_refused_renewal_ends_the_lease_at_its_expiry() {
    let (mut sim, lease, key) = Sim::holding_a_lease();

    let (_, renew, actions) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
    assert!(events(&actions).is_empty(), "{actions:?}");
    assert!(matches!(renew, Message::Renew(_)), "{renew:?}");
    let sent_at = sim.now;
    let actions = sim.answer(
        key,
        Ok(Message::Denied(Denied {
            common: common(renew.common().request_id.unwrap_or(0)),
            code: ResultCode::NotAuthorized,
            reason: Some("this gateway renews nothing".into()),
            retry_after: None,
            lease: Some(lease),
            unsupported: Vec::new(),
        })),
    );
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    let refused = match &events(&actions)[..] {
        [(APP, e)] => e.clone(),
        other => panic!("expected renewal-refused, got {other:?}"),
    };
    assert_eq!(refused.kind, EventKind::RenewalRefused);
    assert_eq!(refused.lease, lease);
    assert_eq!(
        refused.code,
        Some(DenialCode::Wire(ResultCode::NotAuthorized))
    );
    assert_eq!(
        refused.reason.as_deref(),
        Some("this gateway renews nothing")
    );
    let left = refused.expires_in_ms.expect("the time left");
    assert!(left > 0 && left <= u64::from(LIFETIME) * 1_000, "{left}");

    let actions = sim.advance(Duration::from_millis(left) + IDLE_TICK);
    assert!(
        sends(&actions).is_empty(),
        "no renewal after a refusal: {actions:?}"
    );
    assert_eq!(mirror_drops(&actions), vec![key], "{actions:?}");
    let ended: Vec<_> = events(&actions).into_iter().map(|(_, e)| e.kind).collect();
    assert_eq!(ended, vec![EventKind::Expired]);
    assert!(sim.now >= sent_at + Duration::from_millis(left));

    // Nothing of it is listed any more.
    let actions = sim.input(Input::Request {
        conn: APP,
        message: LocalMessage::Wire(Message::List(List { common: common(50) })),
    });
    match &actions[..] {
        [
            Action::Reply {
                message: LocalMessage::Wire(Message::Leases(l)),
                ..
            },
        ] => assert!(l.leases.is_empty(), "{l:?}"),
        other => panic!("expected the list, got {other:?}"),
    }
    assert!(!sim.machine.holds_leases());
}

/// The first connection of a run finds leases of an earlier run: the host table is made to
/// hold exactly those (each under a holder of its own); a caller that asks for the same
/// opening again within the grace period and is given the same lease keeps it; at the end of
/// the grace period the others are released at the gateway, and every earlier holder lets go
/// of the host table (the reclaimed lease stays under its caller's holder).
#[test]
fn leases_of_an_earlier_run_are_kept_for_callers_that_ask_again_and_released_otherwise() {
    let mut sim = Sim::new();
    let kept = sim.fresh_lease();
    let orphan = sim.fresh_lease();
    let actions = sim.link_up(
        EPOCH,
        vec![listed(kept, 8080, 200), listed(orphan, 9090, 200)],
    );
    let reconciled = actions
        .iter()
        .find_map(|a| match a {
            Action::MirrorReconcile { holders } => Some(holders.clone()),
            _ => None,
        })
        .expect("the host table reconciled on the first connection");
    assert_eq!(reconciled.len(), 2, "{reconciled:?}");
    let earlier_holders: Vec<Key> = reconciled.iter().map(|(h, _, _)| *h).collect();
    assert_eq!(reconciled[0].1, vec![grant(8080)]);
    assert_eq!(reconciled[1].1, vec![grant(9090)]);
    assert!(sends(&actions).is_empty(), "{actions:?}");

    sim.advance(Duration::from_secs(5));
    sim.connect_caller(APP);
    let key = sim.open_granted(APP, 8080, kept, EPOCH);
    assert!(!earlier_holders.contains(&key));

    // Before the end of the grace period nothing is released.
    let actions = sim.advance(Duration::from_secs(20));
    assert!(sends(&actions).is_empty(), "{actions:?}");

    let (released, release, actions) = sim.until_send(Duration::from_secs(10));
    assert_eq!(releases(&actions), vec![orphan]);
    let mut dropped = mirror_drops(&actions);
    dropped.sort_unstable();
    assert_eq!(dropped, earlier_holders);
    assert!(!dropped.contains(&key));
    sim.answer(
        released,
        Ok(Message::Released(Released {
            common: release.common().clone(),
            lease: orphan,
        })),
    );
    // The reclaimed lease is the caller's: it is renewed as its own.
    let (to, renew, _) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
    assert_eq!(to, key);
    assert!(matches!(renew, Message::Renew(Renew { lease, .. }) if lease == kept));
}

/// A lease of an earlier run that the gateway revokes during the grace period leaves the host's
/// table at once (spec 8.12), not when the grace ends; it is not released afterwards.
#[test]
fn a_revoked_lease_of_an_earlier_run_leaves_the_host_table_at_once() {
    let mut sim = Sim::new();
    let revoked = sim.fresh_lease();
    let actions = sim.link_up(EPOCH, vec![listed(revoked, 8080, 200)]);
    let holder = actions
        .iter()
        .find_map(|a| match a {
            Action::MirrorReconcile { holders } => Some(holders[0].0),
            _ => None,
        })
        .expect("the host table reconciled on the first connection");
    let actions = sim.input(Input::Notice(Message::Revoked(fwnp_proto::Revoked {
        common: Common::default(),
        lease: revoked,
        reason: fwnp_proto::RevokeReason::Operator,
        text: None,
    })));
    assert_eq!(mirror_drops(&actions), vec![holder]);
    let actions = sim.advance(Duration::from_secs(60));
    assert!(
        sends(&actions).is_empty(),
        "nothing to release: {actions:?}"
    );
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
}

/// The end of an earlier run's grace period lets its lease go in the host table, but its
/// Release waits for an Open in flight that the gateway may be answering with it: answered with
/// it, the lease is the caller's, renewed as its own and never released.
#[test]
fn the_earlier_run_waits_for_an_open_in_flight() {
    let mut sim = Sim::new();
    let earlier = sim.fresh_lease();
    sim.link_up(EPOCH, vec![listed(earlier, 8080, 600)]);
    sim.connect_caller(APP);
    sim.advance(Duration::from_secs(29));
    let actions = sim.input(Input::Request {
        conn: APP,
        message: open_request(5, 8080),
    });
    let (key, request) = single_send(&actions);

    // The grace period is over, but the Open is unanswered: the earlier lease leaves the host
    // table, and its Release waits.
    let actions = sim.advance(Duration::from_secs(2));
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert_eq!(mirror_drops(&actions).len(), 1, "{actions:?}");
    assert!(!mirror_drops(&actions).contains(&key));
    // The gateway gives the caller that very lease: it is the caller's, and not released.
    let actions = sim.answer(key, Ok(granted(&request, earlier, 8080, EPOCH)));
    assert_eq!(mirror_holds(&actions), vec![(key, Some(earlier))]);
    assert!(sends(&actions).is_empty(), "{actions:?}");
    sim.input(Input::MirrorLanded {
        key,
        lease: earlier,
        result: Ok(()),
    });
    let actions = sim.advance(OPEN_WAIT * 2);
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    let (to, renew, _) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
    assert_eq!(to, key);
    assert!(matches!(renew, Message::Renew(Renew { lease, .. }) if lease == earlier));
}

/// The Release of an earlier run's lease is on its way when a caller asks for the same
/// opening: its Open waits for the Release's answer, so that the gateway cannot merge it into
/// the lease it is ending (local API 9.1), and goes once it came.
#[test]
fn an_open_waits_for_the_release_of_an_earlier_run_lease() {
    let mut sim = Sim::new();
    let earlier = sim.fresh_lease();
    sim.link_up(EPOCH, vec![listed(earlier, 8080, 600)]);
    sim.connect_caller(APP);
    let (released, release, _) = sim.until_send(Duration::from_secs(31));
    assert!(
        matches!(&release, Message::Release(r) if r.lease == earlier),
        "{release:?}"
    );

    sim.open_of_8080_after_the_release(released, &release, earlier);
}

/// With the link down at the end of the grace period, an earlier run's lease cannot be
/// released: it is let go in the host table and left to expire at the gateway.
#[test]
fn an_earlier_run_lease_is_left_to_expire_when_the_gateway_is_unreachable() {
    let mut sim = Sim::new();
    let earlier = sim.fresh_lease();
    sim.link_up(EPOCH, vec![listed(earlier, 8080, 600)]);
    sim.link_down("reset");
    let actions = sim.advance(Duration::from_secs(31));
    assert_eq!(mirror_drops(&actions).len(), 1, "{actions:?}");
    assert!(sends(&actions).is_empty(), "{actions:?}");
}

/// An Open without a link is refused at once, gateway-unreachable.
#[test]
fn an_open_without_a_link_is_refused() {
    let mut sim = Sim::new();
    sim.connect_caller(APP);
    let actions = sim.input(Input::Request {
        conn: APP,
        message: open_request(3, 8080),
    });
    match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.code, DenialCode::Local(LocalCode::GatewayUnreachable));
            assert_eq!(d.common.request_id, Some(3));
        }
        other => panic!("expected gateway-unreachable, got {other:?}"),
    }
    assert!(sends(&actions).is_empty());
}

/// An Open that uses what the gateway's Welcome did not offer (spec 14) is refused by the agent
/// as the gateway would refuse it, and never sent: a port range to a gateway without
/// PORT_RANGES is unsupported-option, another's address without THIRD_PARTY address-mismatch.
#[test]
fn an_open_using_what_the_gateway_does_not_offer_is_refused_without_being_sent() {
    let mut sim = Sim::new();
    let mut offered = welcome(EPOCH);
    offered.capabilities = Capabilities(Capabilities::NOTICES | Capabilities::REMOTE_PREFIXES);
    sim.link_up_welcomed(offered);
    sim.connect_caller(APP);
    let ask = |sim: &mut Sim, request_id, opening: Opening| {
        sim.input(Input::Request {
            conn: APP,
            message: LocalMessage::Wire(Message::Open(Open {
                common: common(request_id),
                opening,
                lifetime: None,
                app: None,
            })),
        })
    };
    let mut range = opening(8080);
    range.target = Target::Ports {
        protocol: Protocol::Tcp,
        ports: PortRange {
            first: 8080,
            last: 8090,
        },
    };
    let actions = ask(&mut sim, 3, range);
    assert!(sends(&actions).is_empty(), "{actions:?}");
    match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.code, DenialCode::Wire(ResultCode::UnsupportedOption));
            assert!(
                d.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("port ranges")),
                "{d:?}"
            );
        }
        other => panic!("expected unsupported-option, got {other:?}"),
    }
    let mut elsewhere = opening(8080);
    elsewhere.host = HostAddresses::One("192.0.2.99".parse().unwrap());
    let actions = ask(&mut sim, 4, elsewhere);
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert!(
        matches!(&denials(&actions)[..], [(APP, d)] if d.code == DenialCode::Wire(ResultCode::AddressMismatch)),
        "{actions:?}"
    );
    // What it offers goes out.
    let actions = ask(&mut sim, 5, opening(8080));
    assert!(matches!(single_send(&actions).1, Message::Open(_)));
}

/// An Open the agent sends on its own (here a re-open after a reconnection whose list misses the
/// lease) is checked against the Welcome then in force: a port range the gateway no longer
/// offers is not sent, and the lease is lost (spec 14).
#[test]
fn a_reopen_using_what_the_gateway_no_longer_offers_is_not_sent() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    let mut range = opening(8080);
    range.target = Target::Ports {
        protocol: Protocol::Tcp,
        ports: PortRange {
            first: 8080,
            last: 8090,
        },
    };
    let actions = sim.input(Input::Request {
        conn: APP,
        message: LocalMessage::Wire(Message::Open(Open {
            common: common(3),
            opening: range,
            lifetime: None,
            app: None,
        })),
    });
    let (key, request) = single_send(&actions);
    let lease = sim.fresh_lease();
    sim.answer(key, Ok(granted(&request, lease, 8080, EPOCH)));
    sim.input(Input::MirrorLanded {
        key,
        lease,
        result: Ok(()),
    });
    sim.link_down("reset");
    let mut narrower = welcome(EPOCH);
    narrower.capabilities = Capabilities(Capabilities::NOTICES);
    let actions = sim.link_up_welcomed(narrower);
    assert!(sends(&actions).is_empty(), "{actions:?}");
    match &events(&actions)[..] {
        [(APP, e)] => {
            assert_eq!(e.kind, EventKind::Lost, "{e:?}");
            assert_eq!(
                e.code,
                Some(DenialCode::Wire(ResultCode::UnsupportedOption))
            );
        }
        other => panic!("expected the lease lost, got {other:?}"),
    }
    assert_eq!(mirror_drops(&actions), vec![key]);
}

/// No request larger than the gateway's Welcome says it accepts (spec 5.4): an Open that the
/// application information the agent adds would push over the limit goes without it, and one
/// over the limit even so is refused by the agent.
#[test]
fn an_open_is_kept_within_the_size_the_gateway_accepts() {
    let size = |app: Option<AppInfo>| {
        fwnp_proto::codec::encode(&Message::Open(Open {
            common: common(u64::MAX),
            opening: opening(8080),
            lifetime: Some(LIFETIME),
            app,
        }))
        .len()
    };
    let with_app = size(Some(peer().app));
    let bare = size(None);
    assert!(with_app > bare);
    for (max, sent) in [(with_app, true), (bare, true), (bare - 1, false)] {
        let mut sim = Sim::new();
        let mut limited = welcome(EPOCH);
        limited.limits.max_message_size = max as u32;
        sim.link_up_welcomed(limited);
        sim.connect_caller(APP);
        let actions = sim.input(Input::Request {
            conn: APP,
            message: open_request(3, 8080),
        });
        if sent {
            let (_, request) = single_send(&actions);
            let Message::Open(open) = &request else {
                panic!("{request:?}");
            };
            assert!(
                fwnp_proto::codec::encode(&request).len() <= max,
                "{request:?} in {max}"
            );
            assert_eq!(open.app.is_some(), max == with_app, "limit {max}");
        } else {
            assert!(sends(&actions).is_empty(), "{actions:?}");
            assert!(
                matches!(&denials(&actions)[..], [(APP, d)] if d.code == DenialCode::Wire(ResultCode::MalformedRequest)),
                "{actions:?}"
            );
        }
    }
}

/// An Open the gateway never answers is refused gateway-unreachable after the Open's wait, and
/// a lease granted after that is released, never mirrored.
#[test]
fn an_unanswered_open_is_refused_after_its_wait() {
    let (mut sim, _, _) = Sim::asking_for_8080();
    sim.link_down("reset");
    let actions = sim.advance(fwnp_agent::machine::OPEN_WAIT + IDLE_TICK);
    match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.code, DenialCode::Local(LocalCode::GatewayUnreachable));
            assert_eq!(d.common.request_id, Some(3));
        }
        other => panic!("expected gateway-unreachable, got {other:?}"),
    }
    assert!(mirror_holds(&actions).is_empty());
}

/// The texts a caller is given stay within the local API's 512 bytes, however long what they
/// are made of: here the list of thirty configured gateways an Open is refused with while none
/// is connected, and the Status's last error.
#[test]
fn texts_given_to_callers_fit_the_local_api() {
    let names: Vec<String> = (0..30)
        .map(|n| format!("\"gateway-{n:02}.a-rather-long-site-name.example.org:4433\""))
        .collect();
    let config = CONFIG.replace(
        "address = \"198.51.100.1:4433\"",
        &format!("addresses = [{}]", names.join(", ")),
    );
    let mut sim = Sim::with(&config);
    sim.input(Input::LinkFailed {
        reason: "x".repeat(2000),
    });
    sim.connect_caller(APP);
    let actions = sim.input(Input::Request {
        conn: APP,
        message: open_request(3, 8080),
    });
    let reason = match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.code, DenialCode::Local(LocalCode::GatewayUnreachable));
            d.reason.clone().expect("a reason")
        }
        other => panic!("expected gateway-unreachable, got {other:?}"),
    };
    assert!(
        reason.starts_with("no connection to the gateway"),
        "{reason}"
    );
    assert_eq!(reason.len(), 512);
    let actions = sim.input(Input::Request {
        conn: APP,
        message: LocalMessage::Status(Status { common: common(4) }),
    });
    let status = actions
        .iter()
        .find_map(|a| match a {
            Action::Reply {
                message: LocalMessage::StatusAnswer(s),
                ..
            } => Some(s.clone()),
            _ => None,
        })
        .expect("a StatusAnswer");
    assert_eq!(status.last_error.map(|e| e.len()), Some(512));
    // What the agent sends, a client's decoder takes.
    for action in &actions {
        if let Action::Reply { message, .. } = action {
            let body = fwnp_proto::local::encode_body(message);
            fwnp_proto::local::decode_frame_body(&body).expect("a valid frame");
        }
    }
}

/// Two callers hold the same lease (the gateway merged their identical openings): the first
/// to let go is answered at once, the elements staying in the host table for the other, and no
/// Release reaches the gateway; the last one's going drops the elements and releases the lease.
#[test]
fn a_shared_lease_is_released_at_the_gateway_by_its_last_holder() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    sim.connect_caller(APP + 1);
    let lease = sim.fresh_lease();
    let first = sim.open_granted(APP, 8080, lease, EPOCH);
    sim.open_granted(APP + 1, 8080, lease, EPOCH);

    let actions = sim.input(Input::Request {
        conn: APP,
        message: release_request(40, lease),
    });
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    assert_eq!(released_answers(&actions), vec![(APP, 40)]);
    match &events(&actions)[..] {
        [(APP, e)] => assert_eq!((e.kind, e.lease), (EventKind::Released, lease)),
        other => panic!("expected released for the first caller only, got {other:?}"),
    }

    let actions = sim.input(Input::CallerClosed { conn: APP + 1 });
    assert_eq!(mirror_drops(&actions), vec![first], "{actions:?}");
    let (key, request) = single_send(&actions);
    assert_eq!(key, first);
    assert!(matches!(request, Message::Release(Release { lease: l, .. }) if l == lease));
    sim.answer(
        key,
        Ok(Message::Released(Released {
            common: request.common().clone(),
            lease,
        })),
    );
    assert!(!sim.machine.holds_leases());
}

/// Two callers hold one lease, the first opened it for 600 s, the second 10 s later for 60 s
/// (the gateway merged its Open into the lease, whose expiry it kept). The lease is renewed on
/// one schedule, each Renew asking 600 s, and each renewal is told to both; the second caller
/// learns at once, after its Granted, that the lease lasts 590 s more, not 60. Once the first
/// lets go, the Renews ask 60 s.
#[test]
fn a_merged_lease_is_renewed_once_for_the_longest_lifetime_its_holders_asked() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    sim.connect_caller(APP + 1);
    let lease = sim.fresh_lease();
    let (holder, _) = sim.open_for_lifetime(APP, 600, lease);
    sim.advance(Duration::from_secs(10));
    let (_, landed) = sim.open_for_lifetime(APP + 1, 60, lease);
    match &landed[..] {
        [
            Action::Reply {
                conn: granted_to,
                message: LocalMessage::Wire(Message::Granted(g)),
            },
            Action::Reply {
                conn: told,
                message: LocalMessage::Event(e),
            },
        ] => {
            assert_eq!((*granted_to, g.lease, g.lifetime), (APP + 1, lease, 60));
            assert_eq!(
                (*told, e.kind, e.lease),
                (APP + 1, EventKind::Renewed, lease)
            );
            assert_eq!(e.expires_in_ms, Some(590_000));
        }
        other => panic!("expected the Granted, then the lease's real expiry: {other:?}"),
    }

    let start = sim.now;
    let mut renewed_at = Vec::new();
    while sim.now < start + Duration::from_secs(1200) {
        let (key, request, _) = sim.until_send(Duration::from_secs(600));
        let Message::Renew(renew) = &request else {
            panic!("expected a renewal, got {request:?}");
        };
        assert_eq!((key, renew.lifetime), (holder, Some(600)), "{request:?}");
        renewed_at.push(sim.now);
        let actions = sim.answer(key, Ok(granted_for(&request, lease, 8080, EPOCH, 600)));
        let told: Vec<_> = events(&actions)
            .into_iter()
            .map(|(conn, e)| (conn, e.kind, e.expires_in_ms))
            .collect();
        let renewed = Some(600_000);
        assert_eq!(
            told,
            vec![
                (APP, EventKind::Renewed, renewed),
                (APP + 1, EventKind::Renewed, renewed)
            ]
        );
    }
    // One schedule: a renewal per half lifetime (the window of spec 11.8), never two.
    assert!(renewed_at.len() >= 3, "{renewed_at:?}");
    for pair in renewed_at.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_secs(300),
            "{renewed_at:?}"
        );
    }

    let actions = sim.input(Input::Request {
        conn: APP,
        message: release_request(40, lease),
    });
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert_eq!(released_answers(&actions), vec![(APP, 40)]);
    let (key, request, _) = sim.until_send(Duration::from_secs(600));
    assert!(
        matches!(
            request,
            Message::Renew(Renew {
                lifetime: Some(60),
                ..
            })
        ),
        "{request:?}"
    );
    assert_eq!(key, holder);
}

/// The first caller opened the lease for 60 s; the second one's Open, 10 s later, asked 600 s,
/// and the gateway extended the lease to that. The first caller is told the lease's new
/// expiry, and the lease is renewed on the schedule of the later grant, asking 600 s.
#[test]
fn an_open_merged_into_a_shorter_lease_extends_it_for_every_holder() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    sim.connect_caller(APP + 1);
    let lease = sim.fresh_lease();
    let (holder, _) = sim.open_for_lifetime(APP, 60, lease);
    sim.advance(Duration::from_secs(10));
    let joined_at = sim.now;
    let actions = sim.input(Input::Request {
        conn: APP + 1,
        message: open_request_for(30, 8080, 600),
    });
    let (key, request) = single_send(&actions);
    let actions = sim.answer(key, Ok(granted_for(&request, lease, 8080, EPOCH, 600)));
    match &events(&actions)[..] {
        [(APP, e)] => {
            assert_eq!((e.kind, e.lease), (EventKind::Renewed, lease));
            assert_eq!(e.expires_in_ms, Some(600_000));
        }
        other => panic!("expected the first caller told the new expiry, got {other:?}"),
    }
    assert_eq!(mirror_holds(&actions), vec![(holder, Some(lease))]);
    let landed = sim.input(Input::MirrorLanded {
        key: holder,
        lease,
        result: Ok(()),
    });
    assert!(
        events(&landed).is_empty(),
        "its own grant is the expiry: {landed:?}"
    );

    let (key, request, _) = sim.until_send(Duration::from_secs(600));
    assert_eq!(key, holder);
    assert!(
        matches!(
            request,
            Message::Renew(Renew {
                lifetime: Some(600),
                ..
            })
        ),
        "{request:?}"
    );
    assert!(
        sim.now >= joined_at + Duration::from_secs(300),
        "renewed after {:?}",
        sim.now - joined_at
    );
}

/// One caller opened the same thing twice and holds both grants (the gateway merged them): it
/// holds the lease once (local API 5.2), so its Release of the id ends that hold, the lease is
/// released at the gateway, and a second Release of the id finds nothing to end.
#[test]
fn a_release_ends_every_open_of_its_caller_merged_into_the_lease() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    let lease = sim.fresh_lease();
    let first = sim.open_granted(APP, 8080, lease, EPOCH);
    sim.open_granted(APP, 8080, lease, EPOCH);

    let actions = sim.input(Input::Request {
        conn: APP,
        message: release_request(40, lease),
    });
    let (key, request) = single_send(&actions);
    assert_eq!(key, first);
    assert!(matches!(request, Message::Release(Release { lease: l, .. }) if l == lease));
    match &events(&actions)[..] {
        [(APP, e)] => assert_eq!((e.kind, e.lease), (EventKind::Released, lease)),
        other => panic!("expected one released event, got {other:?}"),
    }
    let after = actions
        .iter()
        .find_map(|a| match a {
            Action::MirrorDrop {
                holder,
                then: Some(after),
            } if *holder == first => Some(after.clone()),
            _ => None,
        })
        .expect("the elements dropped, the answer waiting for it");
    assert_eq!(
        after,
        AfterDrop {
            lease,
            answer: Some((APP, vec![(40, lease)]))
        }
    );

    let actions = sim.input(Input::Request {
        conn: APP,
        message: release_request(41, lease),
    });
    match &denials(&actions)[..] {
        [(APP, d)] => assert_eq!(d.code, DenialCode::Local(LocalCode::UnknownLocalLease)),
        other => panic!("expected unknown-local-lease, got {other:?}"),
    }
    assert!(sends(&actions).is_empty(), "{actions:?}");
}

/// A caller releases its lease while another caller's Open of the same opening is on its way
/// to the gateway, which may merge it into that lease. The lease's elements leave the host
/// table and the first caller is answered, but its Release waits for the Open's answer: that
/// is the lease, so the second caller holds it (under its Open's own key), nothing is released,
/// and its elements are back in the host table before it is answered. Its end, later, releases
/// the lease.
#[test]
fn a_release_waits_for_an_open_that_may_be_answered_with_its_lease() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    let (open_key, open) = sim.second_caller_asks_for_8080();

    let actions = sim.input(Input::Request {
        conn: APP,
        message: release_request(40, lease),
    });
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert_eq!(mirror_drops(&actions), vec![key]);
    let actions = sim.input(Input::MirrorReleased {
        conn: APP,
        requests: vec![(40, lease)],
    });
    assert_eq!(released_answers(&actions), vec![(APP, 40)]);

    let actions = sim.answer(open_key, Ok(granted(&open, lease, 8080, EPOCH)));
    assert_eq!(mirror_holds(&actions), vec![(open_key, Some(lease))]);
    assert!(sends(&actions).is_empty(), "{actions:?}");
    let actions = sim.input(Input::MirrorLanded {
        key: open_key,
        lease,
        result: Ok(()),
    });
    assert!(
        matches!(&actions[..], [Action::Reply { conn, message: LocalMessage::Wire(Message::Granted(g)) }] if *conn == APP + 1 && g.lease == lease),
        "{actions:?}"
    );

    // Still renewed, for the second caller; released when it goes.
    let (renewing, renew, _) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
    assert_eq!(renewing, open_key);
    assert!(matches!(renew, Message::Renew(Renew { lease: l, .. }) if l == lease));
    let actions = sim.answer(open_key, Ok(granted(&renew, lease, 8080, EPOCH)));
    assert!(
        events(&actions).iter().all(|(conn, _)| *conn == APP + 1),
        "{actions:?}"
    );
    let actions = sim.input(Input::CallerClosed { conn: APP + 1 });
    let (_, release) = single_send(&actions);
    assert!(matches!(release, Message::Release(Release { lease: l, .. }) if l == lease));
}

/// As above, but the gateway answers the Open with another lease: the waiting Release goes
/// then. A Release that waits for an Open never answered goes after the Open's wait.
#[test]
fn a_waiting_release_goes_once_the_open_is_answered_otherwise_or_not_at_all() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    let (open_key, open) = sim.second_caller_asks_for_8080();
    let actions = sim.input(Input::Request {
        conn: APP,
        message: release_request(40, lease),
    });
    assert!(sends(&actions).is_empty(), "{actions:?}");
    let other = sim.fresh_lease();
    let actions = sim.answer(open_key, Ok(granted(&open, other, 8080, EPOCH)));
    let (released, release) = single_send(&actions);
    assert_eq!(released, key);
    assert!(matches!(release, Message::Release(Release { lease: l, .. }) if l == lease));

    // Never answered: the Release waits no longer than an Open does.
    let (mut sim, lease, _) = Sim::holding_a_lease();
    sim.connect_caller(APP + 1);
    sim.input(Input::Request {
        conn: APP + 1,
        message: open_request(30, 8080),
    });
    let actions = sim.input(Input::Request {
        conn: APP,
        message: release_request(40, lease),
    });
    assert!(sends(&actions).is_empty(), "{actions:?}");
    let mut released = None;
    let started = sim.now;
    while released.is_none() {
        let (_, request, _) = sim.until_send(OPEN_WAIT + Duration::from_secs(1));
        if let Message::Release(r) = request {
            released = Some(r.lease);
        }
    }
    assert_eq!(released, Some(lease));
    assert!(sim.now <= started + OPEN_WAIT, "{:?}", sim.now - started);
}

/// A caller releases its lease, and the Release goes to the gateway; another caller then asks
/// for the same opening. Its Open waits for the Release's answer (without the machine spinning
/// meanwhile), so that the gateway cannot merge it into the lease it is ending.
#[test]
fn an_open_waits_for_the_release_of_a_lease_it_may_be_answered_with() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    let actions = sim.input(Input::Request {
        conn: APP,
        message: release_request(40, lease),
    });
    let (_, release) = single_send(&actions);
    assert!(matches!(release, Message::Release(Release { lease: l, .. }) if l == lease));

    sim.connect_caller(APP + 1);
    let actions = sim.input(Input::Request {
        conn: APP + 1,
        message: open_request(30, 8080),
    });
    assert!(sends(&actions).is_empty(), "{actions:?}");
    let actions = sim.advance(Duration::from_secs(2));
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert!(sim.machine.poll_timeout(sim.now) > sim.now);
    // Another opening does not wait.
    let actions = sim.input(Input::Request {
        conn: APP + 1,
        message: open_request(31, 8443),
    });
    assert_eq!(sends(&actions).len(), 1, "{actions:?}");

    let actions = sim.answer(
        key,
        Ok(Message::Released(Released {
            common: release.common().clone(),
            lease,
        })),
    );
    let (_, open) = single_send(&actions);
    assert!(
        matches!(&open, Message::Open(o) if o.opening == opening(8080)),
        "{open:?}"
    );
}

/// A caller goes away while its Open is on its way, and another caller's Open of the same
/// opening is on its way too. The lease the first Open is granted is given back, but only once
/// the second Open is answered: answered with that lease, the second caller holds it and
/// nothing is released; answered with another, the Release goes then.
#[test]
fn a_lease_granted_to_an_open_given_up_waits_for_an_open_that_may_be_answered_with_it() {
    for answered_with_it in [true, false] {
        let (mut sim, gone_key, gone_open) = Sim::asking_for_8080();
        sim.connect_caller(APP + 1);
        let actions = sim.input(Input::Request {
            conn: APP + 1,
            message: open_request(30, 8080),
        });
        let (key, open) = single_send(&actions);
        let actions = sim.input(Input::CallerClosed { conn: APP });
        assert!(sends(&actions).is_empty(), "{actions:?}");

        let lease = sim.fresh_lease();
        let actions = sim.answer(gone_key, Ok(granted(&gone_open, lease, 8080, EPOCH)));
        assert!(sends(&actions).is_empty(), "{actions:?}");
        assert!(mirror_holds(&actions).is_empty(), "{actions:?}");

        let answer = match answered_with_it {
            true => lease,
            false => sim.fresh_lease(),
        };
        let actions = sim.answer(key, Ok(granted(&open, answer, 8080, EPOCH)));
        assert_eq!(mirror_holds(&actions), vec![(key, Some(answer))]);
        if answered_with_it {
            assert!(sends(&actions).is_empty(), "{actions:?}");
        } else {
            assert_eq!(releases(&actions), vec![lease], "{actions:?}");
            let (released, release) = single_send(&actions);
            sim.answer(
                released,
                Ok(Message::Released(Released {
                    common: release.common().clone(),
                    lease,
                })),
            );
        }
        sim.input(Input::MirrorLanded {
            key,
            lease: answer,
            result: Ok(()),
        });
        let actions = sim.advance(OPEN_WAIT * 2);
        assert!(releases(&actions).is_empty(), "{actions:?}");
        let (to, renew, _) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
        assert_eq!(to, key);
        assert!(matches!(renew, Message::Renew(Renew { lease: l, .. }) if l == answer));
    }
}

/// A caller that holds no lease and sends nothing for the idle timeout is closed, once.
#[test]
fn an_idle_caller_is_closed_once() {
    let mut sim = Sim::new();
    sim.connect_caller(APP);
    let actions = sim.advance(Duration::from_secs(59));
    assert!(actions.is_empty(), "{actions:?}");
    let actions = sim.advance(Duration::from_secs(2));
    assert!(
        matches!(&actions[..], [Action::Close { conn: APP }]),
        "{actions:?}"
    );
    let actions = sim.advance(Duration::from_secs(10));
    assert!(actions.is_empty(), "{actions:?}");
}

/// Stopping releases every lease at the gateway without telling its caller; a Release that
/// fails ends the lease there, so the driver does not wait for it.
#[test]
fn shutdown_releases_every_lease() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    let a = sim.fresh_lease();
    let b = sim.fresh_lease();
    sim.open_granted(APP, 8080, a, EPOCH);
    sim.open_granted(APP, 8443, b, EPOCH);
    sim.machine.shutdown(sim.now);
    let actions = sim.actions();
    let released = sends(&actions);
    assert_eq!(released.len(), 2, "{actions:?}");
    assert!(events(&actions).is_empty(), "{actions:?}");
    for (key, request) in released {
        assert!(matches!(request, Message::Release(_)), "{request:?}");
        sim.answer(key, Err("connection lost".into()));
    }
    assert!(!sim.machine.holds_leases());
}

/// With ports verified: an Open waits for the check of its port (with the grace period) before
/// anything goes to the gateway; a port not the caller's is refused port-not-owned; a renewal
/// is checked first; a lease whose port the periodic check finds taken ends, released at the
/// gateway, its caller told lost (port-not-owned).
#[test]
fn verified_ports_are_checked_before_opening_renewing_and_periodically() {
    let mut sim = Sim::with(VERIFYING);
    sim.link_up(EPOCH, Vec::new());
    let me = CallerProcess::identify(&ProcFs::default(), std::process::id(), None)
        .expect("this test's own process");
    let actions = sim.input(Input::CallerConnected {
        conn: APP,
        peer: Peer {
            process: Some(me.clone()),
            ..peer()
        },
    });
    assert!(actions.is_empty(), "{actions:?}");
    sim.input(Input::Request {
        conn: APP,
        message: LocalMessage::Watch(Watch {
            common: common(1),
            lease: None,
        }),
    });

    // A port someone else binds: refused, nothing sent.
    let actions = sim.input(Input::Request {
        conn: APP,
        message: open_request(2, 8081),
    });
    let Some(Action::CheckOwner {
        open, grace, ports, ..
    }) = actions.into_iter().next()
    else {
        panic!("expected a port check first");
    };
    assert_eq!(
        (grace, ports),
        (Duration::from_secs(2), PortRange::single(8081))
    );
    let taken = PortNotOwned::Other {
        protocol: Protocol::Tcp,
        port: 8081,
        pid: 1,
        comm: "init".into(),
    };
    let actions = sim.input(Input::OwnerChecked {
        conn: APP,
        open,
        result: Err(taken.clone()),
        caller: me.clone(),
    });
    assert!(sends(&actions).is_empty(), "{actions:?}");
    match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.code, DenialCode::Local(LocalCode::PortNotOwned));
            assert_eq!(d.reason.as_deref(), Some(taken.to_string().as_str()));
        }
        other => panic!("expected port-not-owned, got {other:?}"),
    }

    // The caller's own port: opened once checked.
    let actions = sim.input(Input::Request {
        conn: APP,
        message: open_request(3, 8080),
    });
    let Some(Action::CheckOwner { open, .. }) = actions.into_iter().next() else {
        panic!("expected a port check first");
    };
    let actions = sim.input(Input::OwnerChecked {
        conn: APP,
        open,
        result: Ok(std::process::id()),
        caller: me.clone(),
    });
    let (key, request) = single_send(&actions);
    let lease = sim.fresh_lease();
    sim.answer(key, Ok(granted(&request, lease, 8080, EPOCH)));
    sim.input(Input::MirrorLanded {
        key,
        lease,
        result: Ok(()),
    });

    // The periodic check covers it.
    let actions = sim.advance(Duration::from_secs(10));
    let swept = actions
        .iter()
        .find_map(|a| match a {
            Action::SweepOwners { leases } => Some(leases.clone()),
            _ => None,
        })
        .expect("a periodic check");
    assert_eq!(swept.len(), 1);
    assert_eq!((swept[0].0, swept[0].1), (key, APP));
    assert_eq!(
        swept[0].2.targets,
        vec![(Protocol::Tcp, PortRange::single(8080))]
    );
    sim.input(Input::OwnerSweepDone);

    // The renewal is checked before it goes out.
    let (_, renew, actions) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
    let verify = actions.iter().find_map(|a| match a {
        Action::Send { verify_first, .. } => Some(verify_first.clone()),
        _ => None,
    });
    assert_eq!(
        verify.map(|c| c
            .into_iter()
            .map(|(conn, c)| (conn, c.targets))
            .collect::<Vec<_>>()),
        Some(vec![(APP, vec![(Protocol::Tcp, PortRange::single(8080))])])
    );
    sim.answer(key, Ok(granted(&renew, lease, 8080, EPOCH)));

    // Another process took the port: the lease ends.
    let actions = sim.input(Input::OwnerLost {
        key,
        conn: APP,
        reason: PortNotOwned::Other {
            protocol: Protocol::Tcp,
            port: 8080,
            pid: 1,
            comm: "init".into(),
        },
    });
    let (_, release) = single_send(&actions);
    assert!(matches!(release, Message::Release(Release { lease: l, .. }) if l == lease));
    assert_eq!(mirror_drops(&actions), vec![key]);
    match &events(&actions)[..] {
        [(APP, e)] => {
            assert_eq!((e.kind, e.lease), (EventKind::Lost, lease));
            assert_eq!(e.code, Some(DenialCode::Local(LocalCode::PortNotOwned)));
        }
        other => panic!("expected lost, got {other:?}"),
    }
}

/// The host table refuses a granted lease: the caller is refused no-resources (never told it
/// was granted) and the lease is released at the gateway.
#[test]
fn a_lease_the_host_table_refuses_is_released_and_refused() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    let actions = sim.input(Input::Request {
        conn: APP,
        message: open_request(8, 8080),
    });
    let (key, request) = single_send(&actions);
    let lease = sim.fresh_lease();
    sim.answer(key, Ok(granted(&request, lease, 8080, EPOCH)));
    let actions = sim.input(Input::MirrorLanded {
        key,
        lease,
        result: Err(MirrorError::Stopped),
    });
    match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.code, DenialCode::Wire(ResultCode::NoResources));
            assert_eq!(d.common.request_id, Some(8));
        }
        other => panic!("expected no-resources, got {other:?}"),
    }
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::Reply {
                message: LocalMessage::Wire(Message::Granted(_)),
                ..
            }
        )),
        "{actions:?}"
    );
    let (_, release) = single_send(&actions);
    assert!(matches!(release, Message::Release(Release { lease: l, .. }) if l == lease));
}

/// An application id's ports are learnt from its grants: they are checked (with the grace
/// period, for a first grant) before anything is mirrored or answered, and a grant for ports
/// the caller does not bind is released and refused port-not-owned.
#[test]
fn an_application_ids_grants_are_checked_before_they_are_mirrored() {
    let mut sim = Sim::with(VERIFYING);
    sim.link_up(EPOCH, Vec::new());
    connect_this_process(&mut sim, APP);
    let ask = |sim: &mut Sim, request_id: u64| {
        let actions = sim.input(Input::Request {
            conn: APP,
            message: open_app_request(request_id),
        });
        let (key, request) = single_send(&actions);
        let lease = sim.fresh_lease();
        let mut answer = granted(&request, lease, 8080, EPOCH);
        if let Message::Granted(g) = &mut answer {
            g.grants.push(grant(8443));
            g.grants.push(grant(8080));
        }
        let actions = sim.answer(key, Ok(answer));
        assert!(mirror_holds(&actions).is_empty(), "{actions:?}");
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Reply { .. })),
            "{actions:?}"
        );
        match actions.into_iter().next() {
            Some(Action::CheckGrants {
                key: k,
                lease: granted,
                replaces,
                targets,
                callers,
                grace,
            }) => {
                assert_eq!((k, granted.id, replaces), (key, lease, None));
                assert_eq!(grace, Duration::from_secs(2));
                assert_eq!(
                    targets,
                    vec![
                        (Protocol::Tcp, PortRange::single(8080)),
                        (Protocol::Tcp, PortRange::single(8443))
                    ]
                );
                assert_eq!(callers.len(), 1);
                assert_eq!(callers[0].0, APP);
                (key, granted, targets)
            }
            other => panic!("expected the grants' check, got {other:?}"),
        }
    };

    let (key, lease, targets) = ask(&mut sim, 20);
    let actions = sim.input(Input::GrantsChecked {
        key,
        lease: lease.clone(),
        replaces: None,
        targets,
        lost: Vec::new(),
    });
    assert_eq!(mirror_holds(&actions), vec![(key, Some(lease.id))]);

    let (key, lease, targets) = ask(&mut sim, 21);
    let actions = sim.input(Input::GrantsChecked {
        key,
        lease: lease.clone(),
        replaces: None,
        targets,
        lost: vec![(
            APP,
            PortNotOwned::Nobody {
                protocol: Protocol::Tcp,
                ports: PortRange::single(8443),
                waited: Duration::from_secs(2),
            },
        )],
    });
    assert!(mirror_holds(&actions).is_empty(), "{actions:?}");
    match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.code, DenialCode::Local(LocalCode::PortNotOwned));
            assert_eq!(d.common.request_id, Some(21));
        }
        other => panic!("expected port-not-owned, got {other:?}"),
    }
    let (_, release) = single_send(&actions);
    assert!(matches!(release, Message::Release(Release { lease: l, .. }) if l == lease.id));
}

/// An application id's lease is re-opened (a new epoch), and the new grant's ports are no
/// longer the caller's: the lease ends with the event lost, naming the id the application
/// knows, not the new one it was never told of (local API 6.3).
#[test]
fn a_reopened_application_lease_that_fails_its_check_is_lost_under_its_known_id() {
    let mut sim = Sim::with(VERIFYING);
    sim.link_up(EPOCH, Vec::new());
    connect_this_process(&mut sim, APP);
    sim.input(Input::Request {
        conn: APP,
        message: LocalMessage::Watch(Watch {
            common: common(1),
            lease: None,
        }),
    });
    let actions = sim.input(Input::Request {
        conn: APP,
        message: open_app_request(20),
    });
    let (key, request) = single_send(&actions);
    let first = sim.fresh_lease();
    let actions = sim.answer(key, Ok(granted(&request, first, 8080, EPOCH)));
    let Some(Action::CheckGrants { lease, targets, .. }) = actions.into_iter().next() else {
        panic!("the grants are checked first");
    };
    sim.input(Input::GrantsChecked {
        key,
        lease,
        replaces: None,
        targets,
        lost: Vec::new(),
    });
    let actions = sim.input(Input::MirrorLanded {
        key,
        lease: first,
        result: Ok(()),
    });
    assert!(
        actions.iter().any(|a| matches!(a, Action::Reply { message: LocalMessage::Wire(Message::Granted(g)), .. } if g.lease == first)),
        "{actions:?}"
    );

    // The gateway lost its state: the lease is opened again, and granted under a new id.
    sim.link_down("gateway restarted");
    let actions = sim.link_up(NEW_EPOCH, Vec::new());
    let (_, reopen) = single_send(&actions);
    let second = sim.fresh_lease();
    let actions = sim.answer(key, Ok(granted(&reopen, second, 8080, NEW_EPOCH)));
    let Some(Action::CheckGrants {
        lease,
        replaces,
        targets,
        ..
    }) = actions.into_iter().next()
    else {
        panic!("the re-open's grants are checked first");
    };
    assert_eq!(replaces, Some(first));
    let actions = sim.input(Input::GrantsChecked {
        key,
        lease,
        replaces,
        targets,
        lost: vec![(
            APP,
            PortNotOwned::Nobody {
                protocol: Protocol::Tcp,
                ports: PortRange::single(8080),
                waited: Duration::ZERO,
            },
        )],
    });
    match &events(&actions)[..] {
        [(APP, e)] => {
            assert_eq!(e.kind, EventKind::Lost, "{e:?}");
            assert_eq!(e.lease, first, "the id the application knows");
            assert_eq!(e.code, Some(DenialCode::Local(LocalCode::PortNotOwned)));
        }
        other => panic!("expected one lost event, got {other:?}"),
    }
}

/// An application id's ports are checked after the grant, with the grace the application has
/// to bind them: a grace longer than the Open's usual wait does not turn a granted Open into
/// gateway-unreachable while the check runs.
#[test]
fn an_application_ids_open_waits_out_the_grace_of_its_check() {
    let mut sim =
        Sim::with(&VERIFYING.replace("port_owner_grace = \"2s\"", "port_owner_grace = \"30s\""));
    sim.link_up(EPOCH, Vec::new());
    connect_this_process(&mut sim, APP);
    let actions = sim.input(Input::Request {
        conn: APP,
        message: open_app_request(20),
    });
    let (key, request) = single_send(&actions);
    let lease = sim.fresh_lease();
    let actions = sim.answer(key, Ok(granted(&request, lease, 8080, EPOCH)));
    let Some(Action::CheckGrants {
        lease: checked,
        targets,
        grace,
        ..
    }) = actions.into_iter().next()
    else {
        panic!("the grants are checked first");
    };
    assert_eq!(grace, Duration::from_secs(30));
    // The check takes 29 s: longer than the Open's usual wait, within the grace.
    let actions = sim.advance(Duration::from_secs(29));
    assert!(denials(&actions).is_empty(), "{actions:?}");
    sim.input(Input::GrantsChecked {
        key,
        lease: checked,
        replaces: None,
        targets,
        lost: Vec::new(),
    });
    let actions = sim.input(Input::MirrorLanded {
        key,
        lease,
        result: Ok(()),
    });
    assert!(
        actions.iter().any(|a| matches!(a, Action::Reply { message: LocalMessage::Wire(Message::Granted(g)), .. } if g.lease == lease)),
        "{actions:?}"
    );
}

fn status(sim: &mut Sim) -> fwnp_proto::local::StatusAnswer {
    let actions = sim.input(Input::Request {
        conn: APP,
        message: LocalMessage::Status(Status { common: common(99) }),
    });
    match actions.into_iter().next() {
        Some(Action::Reply {
            message: LocalMessage::StatusAnswer(s),
            ..
        }) => s,
        other => panic!("expected a status answer, got {other:?}"),
    }
}

/// The link moves to another gateway of the cluster (same epoch) long before any renewal is
/// due: every lease is renewed there at once, a lease its list does not show yet included, and
/// nothing is opened again nor dropped from the host table; the renewals' answers keep the
/// same lease ids. Status names the gateway now in use.
#[test]
fn failover_to_another_gateway_renews_every_lease_at_once_without_reopening() {
    let mut sim = Sim::with(CLUSTER);
    sim.link_up_at(GATEWAY_A, EPOCH, Vec::new());
    sim.connect_caller(APP);
    let first = sim.fresh_lease();
    let second = sim.fresh_lease();
    let key1 = sim.open_granted(APP, 8080, first, EPOCH);
    let key2 = sim.open_granted(APP, 8081, second, EPOCH);
    assert_eq!(status(&mut sim).gateway, GATEWAY_A);

    sim.advance(Duration::from_secs(5));
    let actions = sim.link_down("timed out");
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    sim.advance(Duration::from_secs(1));

    // The new gateway lists only the first lease so far (its view lags by a moment).
    let actions = sim.link_up_at(GATEWAY_B, EPOCH, vec![listed(first, 8080, 294)]);
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    let mut renewed: Vec<(Key, LeaseId)> = sends(&actions)
        .into_iter()
        .map(|(key, request)| match request {
            Message::Renew(renew) => (key, renew.lease),
            other => panic!("expected only renewals, got {other:?}"),
        })
        .collect();
    renewed.sort();
    let mut expected = vec![(key1, first), (key2, second)];
    expected.sort();
    assert_eq!(renewed, expected, "{actions:?}");
    assert_eq!(status(&mut sim).gateway, GATEWAY_B);

    for (key, request) in sends(&actions) {
        let (lease, port) = if key == key1 {
            (first, 8080)
        } else {
            (second, 8081)
        };
        let answer = sim.answer(key, Ok(granted(&request, lease, port, EPOCH)));
        assert_eq!(mirror_holds(&answer), vec![(key, None)], "{answer:?}");
        match &events(&answer)[..] {
            [(APP, e)] => assert_eq!((e.kind, e.lease), (EventKind::Renewed, lease)),
            other => panic!("expected renewed, got {other:?}"),
        }
    }
    // Renewed: the next renewal is a normal one, not another burst.
    let renewed_at = sim.now;
    let (_, next, _) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
    assert!(matches!(next, Message::Renew(_)), "{next:?}");
    assert!(
        sim.now - renewed_at >= Duration::from_secs(60),
        "renewed again after {:?}",
        sim.now - renewed_at
    );
}

/// After a failover the new gateway answers a lease's Renew with unknown-lease (it really
/// has not got it): that lease, and only that one, is opened again.
#[test]
fn failover_renewal_answered_unknown_lease_opens_that_lease_again() {
    let mut sim = Sim::with(CLUSTER);
    sim.link_up_at(GATEWAY_A, EPOCH, Vec::new());
    sim.connect_caller(APP);
    let lease = sim.fresh_lease();
    let key = sim.open_granted(APP, 8080, lease, EPOCH);
    sim.link_down("timed out");
    let actions = sim.link_up_at(GATEWAY_B, EPOCH, Vec::new());
    let (to, renew) = single_send(&actions);
    assert_eq!(to, key);
    assert!(matches!(renew, Message::Renew(_)), "{renew:?}");
    let actions = sim.answer(
        key,
        Ok(Message::Denied(Denied {
            common: common(renew.common().request_id.unwrap_or(0)),
            code: ResultCode::UnknownLease,
            reason: None,
            retry_after: None,
            lease: Some(lease),
            unsupported: Vec::new(),
        })),
    );
    let (to, open) = single_send(&actions);
    assert_eq!(to, key);
    assert!(matches!(open, Message::Open(_)), "{open:?}");
}

/// The other gateway welcomes the host under another epoch (not the same cluster's state):
/// every lease is opened again, as after any epoch change.
#[test]
fn failover_under_another_epoch_reopens_as_before() {
    let mut sim = Sim::with(CLUSTER);
    sim.link_up_at(GATEWAY_A, EPOCH, Vec::new());
    sim.connect_caller(APP);
    let lease = sim.fresh_lease();
    let key = sim.open_granted(APP, 8080, lease, EPOCH);
    sim.link_down("timed out");
    let actions = sim.link_up_at(GATEWAY_B, NEW_EPOCH, Vec::new());
    let (to, open) = single_send(&actions);
    assert_eq!(to, key);
    assert!(matches!(open, Message::Open(_)), "{open:?}");
}

/// Back on the same gateway under the same epoch, nothing is renewed before its time (the
/// gateway kept the leases and its kernel elements): only the failover renews at once.
#[test]
fn reconnecting_to_the_same_gateway_keeps_the_renewal_schedule() {
    let mut sim = Sim::with(CLUSTER);
    sim.link_up_at(GATEWAY_A, EPOCH, Vec::new());
    sim.connect_caller(APP);
    let lease = sim.fresh_lease();
    sim.open_granted(APP, 8080, lease, EPOCH);
    sim.link_down("reset");
    let actions = sim.link_up_at(GATEWAY_A, EPOCH, vec![listed(lease, 8080, 299)]);
    assert!(sends(&actions).is_empty(), "{actions:?}");
}

/// The gateway's epoch changes while the host holds many leases: their Opens are spread over a
/// few seconds instead of reaching the gateway all at once (spec 12), each lease's within an
/// eighth of what is left of it, and each lease is opened again exactly once.
#[test]
fn many_reopens_after_an_epoch_change_are_spread_over_seconds() {
    let mut sim = Sim::new();
    sim.link_up(EPOCH, Vec::new());
    sim.connect_caller(APP);
    // Half with the usual lifetime, half with 16 s: at most 3 s and 2 s of waiting.
    let short = 16;
    let mut longest_wait = HashMap::new();
    for i in 0..12u16 {
        let lease = sim.fresh_lease();
        let (port, lifetime) = match i % 2 {
            0 => (8000 + i, LIFETIME),
            _ => (9000 + i, short),
        };
        let key = sim.open_granted_for(APP, port, lease, EPOCH, lifetime);
        let wait = REOPEN_SPREAD.min(Duration::from_secs(u64::from(lifetime)) / 8);
        longest_wait.insert(key, wait);
    }
    assert!(longest_wait.len() > SPREAD_REOPENS_ABOVE);

    let changed = sim.now;
    let actions = sim.input(Input::Notice(Message::EpochChanged(EpochChanged {
        common: Common::default(),
        epoch: NEW_EPOCH,
    })));
    let mut reopened: Vec<(Key, Duration)> = sends(&actions)
        .into_iter()
        .map(|(key, _)| (key, Duration::ZERO))
        .collect();
    assert!(
        reopened.len() < longest_wait.len() / 2,
        "{} of {} re-opens went at once",
        reopened.len(),
        longest_wait.len()
    );
    while reopened.len() < longest_wait.len() {
        let left = (changed + REOPEN_SPREAD).saturating_duration_since(sim.now);
        let (key, request, _) = sim.until_send(left);
        assert!(matches!(request, Message::Open(_)), "{request:?}");
        reopened.push((key, sim.now - changed));
    }
    let mut keys: Vec<Key> = reopened.iter().map(|(key, _)| *key).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), longest_wait.len(), "{reopened:?}");
    for (key, after) in &reopened {
        assert!(
            after <= &longest_wait[key],
            "{key} re-opened {after:?} after the change"
        );
    }
    let first = reopened
        .iter()
        .map(|(_, after)| *after)
        .min()
        .unwrap_or_default();
    let last = reopened
        .iter()
        .map(|(_, after)| *after)
        .max()
        .unwrap_or_default();
    assert!(last - first >= Duration::from_millis(500), "{reopened:?}");
}

/// A notice the link discarded (it did not decode) makes the machine ask for the list of
/// leases (spec 5.3), once at a time, and reconcile it as after a reconnection (spec 11.7): a
/// lease the list lacks is opened again, but not one granted after the list was asked for; a
/// notice discarded meanwhile asks again after it, and a listed lease no application holds is
/// released once no Open is on its way.
#[test]
fn a_discarded_notice_asks_for_the_list_and_reconciles_it() {
    let (mut sim, kept, _) = Sim::holding_a_lease();
    let forgotten = sim.fresh_lease();
    let forgotten_key = sim.open_granted(APP, 8081, forgotten, EPOCH);
    sim.advance(Duration::from_secs(1));

    let actions = sim.input(Input::NoticeDiscarded {
        reason: "an undecodable notice".into(),
    });
    let request_id = single_list(&actions);
    // Another one while the List is on its way: nothing more now.
    let actions = sim.input(Input::NoticeDiscarded {
        reason: "a notice longer than 16384 bytes".into(),
    });
    assert!(actions.is_empty(), "{actions:?}");

    // Granted after the List was asked for: the list may not show it yet.
    sim.advance(Duration::from_millis(100));
    let later = sim.fresh_lease();
    sim.open_granted(APP, 8082, later, EPOCH);

    let actions = sim.input(Input::Listed {
        request_id,
        result: Ok(Message::Leases(Leases {
            common: common(request_id),
            leases: vec![listed(kept, 8080, 290)],
            epoch: EPOCH,
        })),
    });
    let (to, open) = single_send(&actions);
    assert_eq!(to, forgotten_key);
    assert!(matches!(open, Message::Open(_)), "{open:?}");
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    let request_id = single_list(&actions);
    let reopened = sim.fresh_lease();
    sim.answer(forgotten_key, Ok(granted(&open, reopened, 8081, EPOCH)));

    let stray = sim.fresh_lease();
    let actions = sim.input(Input::Listed {
        request_id,
        result: Ok(Message::Leases(Leases {
            common: common(request_id),
            leases: vec![
                listed(kept, 8080, 290),
                listed(reopened, 8081, 300),
                listed(later, 8082, 300),
                listed(stray, 9090, 290),
            ],
            epoch: EPOCH,
        })),
    });
    assert_eq!(releases(&actions), vec![stray], "{actions:?}");
    assert_eq!(sends(&actions).len(), 1, "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::List { .. })));
}

/// The request id of the one List among `actions`.
fn single_list(actions: &[Action]) -> u64 {
    let lists: Vec<&Message> = actions
        .iter()
        .filter_map(|a| match a {
            Action::List { request } => Some(request),
            _ => None,
        })
        .collect();
    match &lists[..] {
        [Message::List(list)] => list.common.request_id.expect("a request id"),
        _ => panic!("expected one List, got {actions:?}"),
    }
}

/// A List after a discarded notice that shows another epoch: the gateway lost its leases, and
/// every lease is opened again (spec 12).
#[test]
fn a_list_after_a_discarded_notice_with_a_new_epoch_reopens_the_leases() {
    let (mut sim, _, key) = Sim::holding_a_lease();
    let actions = sim.input(Input::NoticeDiscarded {
        reason: "an undecodable notice".into(),
    });
    let request_id = single_list(&actions);
    let actions = sim.input(Input::Listed {
        request_id,
        result: Ok(Message::Leases(Leases {
            common: common(request_id),
            leases: Vec::new(),
            epoch: NEW_EPOCH,
        })),
    });
    let (to, open) = single_send(&actions);
    assert_eq!(to, key);
    assert!(matches!(open, Message::Open(_)), "{open:?}");
    assert_eq!(status(&mut sim).epoch, Some(NEW_EPOCH));
}

/// Every configured gateway refused the agent's versions (unsupported-version) and the link
/// stopped: an Open waiting for the link is refused at once with that code and reason, and so
/// is every Open after it; Status says why the agent is not connected.
#[test]
fn when_no_gateway_is_left_opens_are_refused_with_unsupported_version() {
    let (mut sim, _, _) = Sim::asking_for_8080();
    sim.link_down("the gateway closed the connection");

    let reason = "every configured gateway refused the protocol versions this agent offers [1]";
    let actions = sim.input(Input::NoGatewayLeft {
        reason: reason.into(),
    });
    match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.common.request_id, Some(3));
            assert_eq!(d.code, DenialCode::Wire(ResultCode::UnsupportedVersion));
            assert_eq!(d.reason.as_deref(), Some(reason));
        }
        other => panic!("expected the waiting Open refused, got {other:?} in {actions:?}"),
    }
    let actions = sim.input(Input::Request {
        conn: APP,
        message: open_request(4, 8081),
    });
    match &denials(&actions)[..] {
        [(APP, d)] => {
            assert_eq!(d.common.request_id, Some(4));
            assert_eq!(d.code, DenialCode::Wire(ResultCode::UnsupportedVersion));
        }
        other => panic!("expected the Open refused, got {other:?}"),
    }
    let now = status(&mut sim);
    assert!(!now.connected);
    assert_eq!(now.last_error.as_deref(), Some(reason));
    let later = sim.advance(fwnp_agent::machine::OPEN_WAIT * 2);
    assert!(denials(&later).is_empty(), "answered once: {later:?}");
}

/// A caller gives up on its Open (no answer within its wait); the gateway's late answer is the
/// lease another caller holds (it merged the Open into it). That lease is not released: the
/// other caller still holds it.
#[test]
fn a_late_grant_of_a_lease_others_hold_is_not_released() {
    let (mut sim, lease, key) = Sim::holding_a_lease();
    let (late_key, open) = sim.second_caller_asks_for_8080();
    let actions = sim.advance(OPEN_WAIT);
    assert!(
        denials(&actions).iter().any(|(conn, d)| *conn == APP + 1
            && d.code == DenialCode::Local(LocalCode::GatewayUnreachable)),
        "{actions:?}"
    );
    let actions = sim.answer(late_key, Ok(granted(&open, lease, 8080, EPOCH)));
    assert!(sends(&actions).is_empty(), "{actions:?}");
    assert!(mirror_drops(&actions).is_empty(), "{actions:?}");
    let (renewing, renew, _) = sim.until_send(Duration::from_secs(u64::from(LIFETIME)));
    assert_eq!(renewing, key);
    assert!(matches!(renew, Message::Renew(Renew { lease: l, .. }) if l == lease));
}
