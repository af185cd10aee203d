//! Lease scenarios with simulated time: a client `LeaseMachine` talks to the gateway's
//! `LeaseBook` through a simulated link that can drop requests, lose answers, delay both and be
//! cut. Every message crosses the link as CBOR (encoded and decoded again), and time only moves
//! when the harness moves it, so each scenario runs in microseconds and repeats exactly for a
//! given seed.

mod common;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::PortsPolicy;
use fwnp_proto::codec;
use fwnp_proto::gateway::request::{ConnectionState, CoreConfig, Effect, Peer, RequestCore, Step};
use fwnp_proto::gateway::{LifetimePolicy, OpenOutcome, PolicyFacts};
use fwnp_proto::lease::{
    FIRST_RETRY_DELAY, LeaseEvent, LeaseMachine, LeaseState, MAX_RETRY_DELAY, REQUEST_TIMEOUT,
    ReopenCause, renewal_window,
};
use fwnp_proto::link::{Ending, Reconnect, TransportTimers};
use fwnp_proto::{
    Capabilities, Common, Denied, EpochChanged, Granted, Hello, LeaseId, Message, Opening,
    PortRange, Protocol, Released, ResultCode, RevokeReason, Target,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HOST: &str = "fwnp://host/web-01";
const HOST_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
/// The gateway's wall clock at simulation start, Unix milliseconds.
const GATEWAY_CLOCK_START_MS: u64 = 1_700_000_000_000;

fn tcp_opening(port: u16) -> Opening {
    Opening {
        target: Target::Ports {
            protocol: Protocol::Tcp,
            ports: PortRange::single(port),
        },
        host: fwnp_proto::HostAddresses::Default,
        family: None,
        remotes: Vec::new(),
    }
}

/// Passes a message through the codec, as the real link does.
fn over_the_wire(message: &Message) -> Message {
    codec::decode(&codec::encode(message)).expect("a message this crate built decodes")
}

/// The gateway side: the real request core (lease book, Hello rules, replay memory) with a
/// simulated policy; its kernel and store effects always succeed.
struct SimGateway {
    core: RequestCore,
    epoch: u64,
    decide: PortsPolicy,
    /// The state of the host's current connection.
    connection: ConnectionState,
    /// Answers to give instead of processing the next requests (Denied with a code).
    scripted_denials: VecDeque<(ResultCode, Option<u32>)>,
    /// When set, Renew answers are refused with this code (the lease itself is untouched).
    refuse_renewals: Option<ResultCode>,
    rng: StdRng,
    t0: Instant,
}

const HOST_ADDRESSES: [IpAddr; 1] = [HOST_ADDR];

fn core_config(epoch: u64) -> CoreConfig {
    CoreConfig {
        epoch,
        max_streams: 16,
        kill_connections: false,
    }
}

impl SimGateway {
    fn new(seed: u64, t0: Instant) -> Self {
        let mut gateway = SimGateway {
            core: RequestCore::new(core_config(0xE0)),
            epoch: 0xE0,
            decide: PortsPolicy {
                lifetime: LifetimePolicy {
                    min: 60,
                    max: 3600,
                    default: 600,
                },
                max_leases: Some(16),
            },
            connection: ConnectionState::default(),
            scripted_denials: VecDeque::new(),
            refuse_renewals: None,
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            t0,
        };
        gateway.connect(t0);
        gateway
    }

    fn now_ms(&self, now: Instant) -> u64 {
        let elapsed = u64::try_from(now.duration_since(self.t0).as_millis()).unwrap_or(u64::MAX);
        GATEWAY_CLOCK_START_MS + elapsed
    }

    /// A new connection: its Hello goes through the core, which must welcome it.
    fn connect(&mut self, now: Instant) {
        self.connection = ConnectionState::default();
        let hello = Message::Hello(Hello {
            common: Common {
                request_id: Some(0),
                critical: Vec::new(),
            },
            versions: vec![1],
            capabilities: Capabilities(Capabilities::NOTICES),
            software: None,
        });
        let answer = self.handle(now, &hello);
        assert!(
            matches!(answer, Message::Welcome(ref w) if w.epoch == self.epoch),
            "{answer:?}"
        );
    }

    /// The gateway restarts without its state: empty book, new epoch.
    fn lose_state(&mut self) {
        self.epoch += 1;
        self.core = RequestCore::new(core_config(self.epoch));
    }

    fn denied(request_id: Option<u64>, code: ResultCode, retry_after: Option<u32>) -> Message {
        Message::Denied(Denied {
            common: Common {
                request_id,
                critical: Vec::new(),
            },
            code,
            reason: Some(code.name().to_string()),
            retry_after,
            lease: None,
            unsupported: Vec::new(),
        })
    }

    fn handle(&mut self, now: Instant, request: &Message) -> Message {
        let now_ms = self.now_ms(now);
        self.core.expire_due(now_ms);
        let request_id = request.common().request_id;
        if let Some((code, retry_after)) = self.scripted_denials.pop_front() {
            return Self::denied(request_id, code, retry_after);
        }
        if let (Message::Renew(_), Some(code)) = (request, self.refuse_renewals) {
            return Self::denied(request_id, code, None);
        }
        let peer = Peer {
            identity: Some(HOST),
            no_identity: "",
            remote: SocketAddr::new(HOST_ADDR, 40_000),
            addresses: &HOST_ADDRESSES,
        };
        let step = self.core.handle(
            now_ms,
            self.connection,
            &peer,
            &codec::encode(request),
            &self.decide,
            &mut self.rng,
        );
        let answer = match step {
            Step::Answer(answer) => answer,
            Step::Pending(pending) => self.core.finish(now_ms, pending, Ok(())),
        };
        for effect in &answer.effects {
            if let Effect::Welcomed { .. } = effect {
                self.connection.welcomed = true;
            }
        }
        answer.message
    }
}

/// What travels to the client: an answer on a request stream or a notice.
#[derive(Debug, Clone)]
enum ToClient {
    Answer(Message),
    Notice(Message),
}

/// The simulated link between host and gateway.
#[derive(Default)]
struct Link {
    /// One-way delay.
    delay: Duration,
    /// Requests vanish on the way to the gateway.
    drop_requests: bool,
    /// The gateway processes requests but its answers vanish.
    drop_answers: bool,
    /// The connection is down: nothing can be sent, and in-flight items are gone.
    cut: bool,
    /// Random faults: each item is lost with this probability and delayed by up to
    /// `max_extra_delay` more, drawn from this RNG.
    chaos: Option<(StdRng, f64, Duration)>,
    to_gateway: Vec<(Instant, Message)>,
    to_client: Vec<(Instant, ToClient)>,
}

impl Link {
    /// When an item sent at `now` arrives, or `None` if it is lost.
    fn arrival(&mut self, now: Instant) -> Option<Instant> {
        let base = now + self.delay;
        match &mut self.chaos {
            None => Some(base),
            Some((rng, loss, max_extra)) => {
                if rng.random_bool(*loss) {
                    None
                } else {
                    Some(base + max_extra.mul_f64(rng.random_range(0.0..=1.0)))
                }
            }
        }
    }

    fn next_delivery(&self) -> Option<Instant> {
        self.to_gateway
            .iter()
            .map(|(t, _)| *t)
            .chain(self.to_client.iter().map(|(t, _)| *t))
            .min()
    }

    fn take_due<T>(queue: &mut Vec<(Instant, T)>, now: Instant) -> Vec<T> {
        let mut due = Vec::new();
        let mut kept = Vec::new();
        for (at, item) in queue.drain(..) {
            if at <= now {
                due.push((at, item))
            } else {
                kept.push((at, item))
            }
        }
        *queue = kept;
        due.sort_by_key(|(at, _)| *at);
        due.into_iter().map(|(_, item)| item).collect()
    }
}

/// The whole scenario: one client machine, one gateway, one link, one clock.
struct Sim {
    now: Instant,
    t0: Instant,
    client: LeaseMachine,
    gateway: SimGateway,
    link: Link,
    rng: StdRng,
    /// Every request the client produced, with the time it was produced.
    sent: Vec<(Instant, Message)>,
    /// Every request that reached the gateway.
    received: Vec<(Instant, Message)>,
    /// Every event the client reported.
    events: Vec<(Instant, LeaseEvent)>,
    /// Check after every step that the mirror stays within the gateway's lease; scenarios in
    /// which the gateway forgets or revokes a lease on purpose turn it off.
    check_mirror: bool,
}

impl Sim {
    fn new(seed: u64) -> Self {
        Self::with_opening(seed, tcp_opening(8080), None)
    }

    fn with_opening(seed: u64, opening: Opening, lifetime: Option<u32>) -> Self {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let client = LeaseMachine::new(t0, opening, lifetime, None, &mut rng);
        Sim {
            now: t0,
            t0,
            client,
            gateway: SimGateway::new(seed, t0),
            link: Link {
                delay: Duration::from_millis(20),
                ..Link::default()
            },
            rng,
            sent: Vec::new(),
            received: Vec::new(),
            events: Vec::new(),
            check_mirror: true,
        }
    }

    fn at(&self, secs: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(secs)
    }

    /// Does everything due at `self.now`, until nothing more is.
    fn process_now(&mut self) {
        let now = self.now;
        for _ in 0..1000 {
            let mut progressed = false;
            if self.client.poll_timeout().is_some_and(|t| t <= now) {
                self.client.handle_timeout(now, &mut self.rng);
            }
            while let Some(request) = self.client.poll_transmit(now) {
                progressed = true;
                self.sent.push((now, request.clone()));
                if self.link.cut {
                    // The agent cannot send: the request fails at once.
                    self.client.connection_lost(now, &mut self.rng);
                } else if !self.link.drop_requests
                    && let Some(at) = self.link.arrival(now)
                {
                    self.link.to_gateway.push((at, over_the_wire(&request)));
                }
            }
            for request in Link::take_due(&mut self.link.to_gateway, now) {
                progressed = true;
                self.received.push((now, request.clone()));
                let answer = self.gateway.handle(now, &request);
                if !self.link.drop_answers
                    && !self.link.cut
                    && let Some(at) = self.link.arrival(now)
                {
                    let answer = ToClient::Answer(over_the_wire(&answer));
                    self.link.to_client.push((at, answer));
                }
            }
            for item in Link::take_due(&mut self.link.to_client, now) {
                progressed = true;
                match item {
                    ToClient::Answer(answer) => {
                        self.client.handle_answer(now, &answer, &mut self.rng)
                    }
                    ToClient::Notice(notice) => self.client.handle_notice(now, &notice),
                }
            }
            while let Some(event) = self.client.poll_event() {
                progressed = true;
                self.events.push((now, event));
            }
            if !progressed {
                return;
            }
        }
        panic!("no quiescence at {:?}", now - self.t0);
    }

    /// The mirror never outlives the gateway's lease: whatever the client holds, the gateway
    /// holds too, until at least the client's local expiry.
    fn check_mirror_within_gateway_lease(&self) {
        if !self.check_mirror {
            return;
        }
        let Some(lease) = self.client.lease() else {
            return;
        };
        let at_gateway = self
            .gateway
            .core
            .book()
            .get(&lease.id)
            .expect("the gateway holds the mirrored lease");
        assert!(
            at_gateway.expires_ms >= self.gateway.now_ms(lease.expires_at),
            "mirror expiry {:?} beyond the gateway's",
            lease.expires_at - self.t0
        );
    }

    /// Runs the simulation until `until`, jumping from one deadline to the next.
    fn run_until(&mut self, until: Instant) {
        for _ in 0..1_000_000 {
            self.process_now();
            self.check_mirror_within_gateway_lease();
            let next = [self.client.poll_timeout(), self.link.next_delivery()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(next) if next <= until => {
                    // A deadline at or before now that processing did not clear would loop.
                    assert!(
                        next > self.now,
                        "deadline {:?} does not advance",
                        next - self.t0
                    );
                    self.now = next;
                }
                _ => {
                    self.now = until;
                    self.process_now();
                    return;
                }
            }
        }
        panic!("simulation did not reach its end");
    }

    fn run_for(&mut self, secs: f64) {
        let until = self.now + Duration::from_secs_f64(secs);
        self.run_until(until);
    }

    /// The gateway pushes a notice to the client.
    fn push_notice(&mut self, notice: Message) {
        let at = self.now + self.link.delay;
        self.link
            .to_client
            .push((at, ToClient::Notice(over_the_wire(&notice))));
    }

    /// The connection goes down: in-flight items are lost and the client is told.
    fn cut(&mut self) {
        self.link.cut = true;
        self.link.to_gateway.clear();
        self.link.to_client.clear();
        self.client.connection_lost(self.now, &mut self.rng);
    }

    fn sent_of(&self, kind: fn(&Message) -> bool) -> Vec<Instant> {
        self.sent
            .iter()
            .filter(|(_, m)| kind(m))
            .map(|(t, _)| *t)
            .collect()
    }

    fn events_matching(&self, kind: fn(&LeaseEvent) -> bool) -> Vec<(Instant, LeaseEvent)> {
        self.events
            .iter()
            .filter(|(_, e)| kind(e))
            .cloned()
            .collect()
    }

    fn granted_lease(&self) -> LeaseId {
        self.client.lease_id().expect("a lease is held")
    }
}

fn is_open(m: &Message) -> bool {
    matches!(m, Message::Open(_))
}
fn is_renew(m: &Message) -> bool {
    matches!(m, Message::Renew(_))
}
fn is_release(m: &Message) -> bool {
    matches!(m, Message::Release(_))
}
fn is_expired(e: &LeaseEvent) -> bool {
    matches!(e, LeaseEvent::Expired { .. })
}
fn is_granted(e: &LeaseEvent) -> bool {
    matches!(e, LeaseEvent::Granted { .. })
}

fn secs_between(a: Instant, b: Instant) -> f64 {
    b.duration_since(a).as_secs_f64()
}

#[test]
fn first_open_is_granted_and_mirrors_the_gateway() {
    let mut sim = Sim::new(1);
    sim.run_for(1.0);
    assert_eq!(sim.client.state(), LeaseState::Active);
    let lease = sim.client.lease().expect("granted").clone();
    let at_gateway = sim
        .gateway
        .core
        .book()
        .get(&lease.id)
        .expect("the gateway holds it");
    assert_eq!(lease.grants, at_gateway.grants);
    assert_eq!(lease.lifetime, 600);
    assert_eq!(lease.renew_after, 300);
    assert_eq!(lease.epoch, sim.gateway.epoch);
    // Local expiry counts from the send (t0), the gateway's from its receipt 20 ms later:
    // the mirror never outlives the gateway's lease.
    assert_eq!(lease.expires_at, sim.t0 + Duration::from_secs(600));
    assert_eq!(at_gateway.expires_ms, GATEWAY_CLOCK_START_MS + 20 + 600_000);
    assert_eq!(sim.client.ignored_messages(), 0);
}

#[test]
fn renewals_fall_inside_the_window_for_many_seeds() {
    let mut renew_offsets = Vec::new();
    for seed in 0..200 {
        let mut sim = Sim::new(seed);
        sim.run_for(3000.0);
        assert_eq!(sim.client.state(), LeaseState::Active, "seed {seed}");
        assert!(sim.events_matching(is_expired).is_empty(), "seed {seed}");
        // Each Granted or Renewed is followed by a Renew in [t + H, t + H + L/8], t being the
        // instant its request was sent (spec 11.8), which its local expiry t + L tells.
        let renews = sim.sent_of(is_renew);
        let grants: Vec<(Instant, Instant, u32, u32)> = sim
            .events
            .iter()
            .filter_map(|(at, e)| match e {
                LeaseEvent::Granted { lease, .. } | LeaseEvent::Renewed { lease } => {
                    let sent = lease.expires_at - Duration::from_secs(u64::from(lease.lifetime));
                    Some((*at, sent, lease.lifetime, lease.renew_after))
                }
                _ => None,
            })
            .collect();
        assert!(
            grants.len() >= 5,
            "seed {seed}: only {} grants in 3000 s",
            grants.len()
        );
        for (at, t, lifetime, hint) in grants {
            assert!(t < at, "seed {seed}: sent before it was answered");
            let Some(&renew) = renews.iter().find(|&&r| r > at) else {
                continue;
            };
            let (start, end) = renewal_window(lifetime, hint);
            assert_eq!(
                (start, end),
                (Duration::from_secs(300), Duration::from_secs(375))
            );
            assert!(
                renew >= t + start && renew <= t + end,
                "seed {seed}: renew outside window"
            );
            renew_offsets.push(renew.duration_since(t));
        }
    }
    // The jitter is real: the instants spread over the window rather than sitting at one point.
    let min = renew_offsets.iter().min().copied().unwrap_or_default();
    let max = renew_offsets.iter().max().copied().unwrap_or_default();
    assert!(
        max - min > Duration::from_secs(60),
        "spread {:?}",
        max - min
    );
    let mut distinct = renew_offsets.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > renew_offsets.len() * 9 / 10);
}

#[test]
fn lost_answers_are_retried_with_doubling_jittered_capped_delays() {
    for seed in 0..20 {
        let mut sim = Sim::new(seed);
        sim.link.drop_answers = true;
        sim.run_for(1200.0);
        let opens = sim.sent_of(is_open);
        assert!(opens.len() > 12, "seed {seed}: {} attempts", opens.len());
        for (n, pair) in opens.windows(2).enumerate() {
            // The answer is awaited 5 s, then the retry waits min(2^n, 60) s +-20 %.
            let gap = pair[1].duration_since(pair[0]);
            let base = (FIRST_RETRY_DELAY * 2u32.pow(n.min(10) as u32)).min(MAX_RETRY_DELAY);
            let low = REQUEST_TIMEOUT + base.mul_f64(0.8);
            let high = REQUEST_TIMEOUT + base.mul_f64(1.2);
            assert!(
                gap >= low && gap <= high,
                "seed {seed} retry {n}: {gap:?} not in [{low:?}, {high:?}]"
            );
        }
        // Every attempt is the same request, unanswered: it carries the same id (spec 15).
        let mut ids: Vec<u64> = sim
            .sent
            .iter()
            .filter_map(|(_, m)| m.common().request_id)
            .collect();
        assert_eq!(ids.len(), sim.sent.len());
        ids.dedup();
        assert_eq!(ids.len(), 1, "seed {seed}");
        // The gateway extended one lease each time instead of creating duplicates.
        assert_eq!(sim.gateway.core.book().len(), 1);
        // Once the answers come through, the lease is granted and the backoff starts over.
        sim.link.drop_answers = false;
        sim.run_for(120.0);
        assert_eq!(sim.client.state(), LeaseState::Active, "seed {seed}");
        assert_eq!(sim.gateway.core.book().lease_count(HOST), 1);
    }
}

#[test]
fn renewal_retries_are_capped_by_the_time_left() {
    for seed in 0..20 {
        let mut sim = Sim::with_opening(seed, tcp_opening(8080), Some(120));
        sim.run_for(1.0);
        let expires_at = sim.client.expires_at().expect("granted");
        sim.link.drop_requests = true;
        sim.run_for(200.0);
        let renews = sim.sent_of(is_renew);
        assert!(renews.len() >= 3, "seed {seed}");
        for pair in renews.windows(2) {
            // A retry never waits longer than 1.2 x the time left when the previous failed.
            let failed_at = pair[0] + REQUEST_TIMEOUT;
            let left = expires_at.saturating_duration_since(failed_at);
            let waited = pair[1].duration_since(failed_at);
            assert!(
                waited <= left.mul_f64(1.2),
                "seed {seed}: waited {waited:?}, left {left:?}"
            );
        }
        assert!(
            renews.iter().all(|&t| t < expires_at),
            "seed {seed}: renew sent after expiry"
        );
    }
}

#[test]
fn expiry_while_the_gateway_is_unreachable_happens_exactly_at_expiry() {
    for seed in 0..20 {
        let mut sim = Sim::new(seed);
        sim.run_for(10.0);
        let lease = sim.client.lease().expect("granted").clone();
        sim.cut();
        // Just before expiry the mirror still holds the lease and no Expired was reported.
        sim.run_until(lease.expires_at - Duration::from_millis(1));
        assert!(
            sim.events_matching(is_expired).is_empty(),
            "seed {seed}: expired early"
        );
        assert_eq!(sim.client.lease_id(), Some(lease.id));
        assert!(matches!(
            sim.client.state(),
            LeaseState::Renewing | LeaseState::Active
        ));
        sim.run_until(lease.expires_at + Duration::from_secs(600));
        let expired = sim.events_matching(is_expired);
        assert_eq!(expired.len(), 1, "seed {seed}");
        assert_eq!(
            expired[0].0, lease.expires_at,
            "seed {seed}: expiry not exact"
        );
        assert_eq!(expired[0].1, LeaseEvent::Expired { lease: lease.id });
        assert_eq!(sim.client.state(), LeaseState::Expired);
        assert_eq!(sim.client.lease(), None);
        assert!(sim.client.is_finished());
        assert_eq!(sim.client.poll_timeout(), None);
        // Retries went on until the expiry and stopped there.
        let renews = sim.sent_of(is_renew);
        assert!(renews.len() >= 5, "seed {seed}: {} attempts", renews.len());
        assert!(renews.iter().all(|&t| t < lease.expires_at));
    }
}

#[test]
fn revocation_is_terminal() {
    let mut sim = Sim::new(3);
    sim.run_for(10.0);
    sim.check_mirror = false;
    let id = sim.granted_lease();
    let lease = sim
        .gateway
        .core
        .book_mut()
        .revoke(&id)
        .expect("the gateway holds it");
    sim.push_notice(Message::Revoked(
        lease.to_revoked(RevokeReason::Operator, Some("maintenance".into())),
    ));
    let sent_before = sim.sent.len();
    sim.run_for(5000.0);
    assert_eq!(
        sim.client.state(),
        LeaseState::Revoked(RevokeReason::Operator)
    );
    let revoked: Vec<_> = sim.events_matching(|e| matches!(e, LeaseEvent::Revoked { .. }));
    assert_eq!(
        revoked[0].1,
        LeaseEvent::Revoked {
            lease: id,
            reason: RevokeReason::Operator,
            text: Some("maintenance".into())
        }
    );
    assert_eq!(sim.client.lease(), None);
    assert_eq!(sim.sent.len(), sent_before, "no re-open after a revocation");
    assert!(sim.client.is_finished());
}

#[test]
fn a_revoked_notice_for_another_lease_is_ignored() {
    let mut sim = Sim::new(4);
    sim.run_for(10.0);
    let other = LeaseId([0xAB; 16]);
    sim.push_notice(Message::Revoked(fwnp_proto::Revoked {
        common: Common::default(),
        lease: other,
        reason: RevokeReason::PolicyChanged,
        text: None,
    }));
    sim.run_for(1.0);
    assert_eq!(sim.client.state(), LeaseState::Active);
    assert_eq!(sim.client.ignored_messages(), 1);
}

#[test]
fn epoch_change_reopens_and_keeps_the_mirror_until_the_answer() {
    let mut sim = Sim::new(5);
    sim.run_for(100.0);
    sim.check_mirror = false;
    let old = sim.client.lease().expect("granted").clone();
    sim.gateway.lose_state();
    let new_epoch = sim.gateway.epoch;
    sim.push_notice(Message::EpochChanged(EpochChanged {
        common: Common::default(),
        epoch: new_epoch,
    }));
    let notice_at = sim.now + sim.link.delay;
    // Stop right after the notice: the re-open is in flight, the old lease still mirrored.
    sim.run_until(notice_at);
    assert_eq!(sim.client.state(), LeaseState::Reopening);
    assert_eq!(sim.client.lease_id(), Some(old.id));
    let opens = sim.sent_of(is_open);
    assert_eq!(
        opens.last(),
        Some(&notice_at),
        "the fresh Open goes out at once"
    );
    sim.run_for(1.0);
    assert_eq!(sim.client.state(), LeaseState::Active);
    let new = sim.client.lease().expect("re-granted").clone();
    assert_ne!(new.id, old.id);
    assert_eq!(new.epoch, new_epoch);
    assert!(sim.gateway.core.book().get(&new.id).is_some());
    let reopening = sim.events_matching(|e| matches!(e, LeaseEvent::Reopening { .. }));
    assert_eq!(
        reopening[0].1,
        LeaseEvent::Reopening {
            previous: old.id,
            cause: ReopenCause::EpochChanged {
                old: old.epoch,
                new: new_epoch
            }
        }
    );
    let granted = sim.events_matching(is_granted);
    assert!(matches!(&granted[1].1, LeaseEvent::Granted { replaces: Some(r), .. } if *r == old.id));
}

#[test]
fn epoch_change_while_unreachable_keeps_the_mirror_only_until_the_old_expiry() {
    let mut sim = Sim::new(6);
    sim.run_for(100.0);
    let old = sim.client.lease().expect("granted").clone();
    sim.cut();
    sim.client.epoch_observed(sim.now, old.epoch + 1);
    sim.run_until(old.expires_at - Duration::from_millis(1));
    assert_eq!(sim.client.state(), LeaseState::Reopening);
    assert_eq!(sim.client.lease_id(), Some(old.id));
    sim.run_for(10.0);
    assert_eq!(sim.client.state(), LeaseState::Expired);
    assert_eq!(sim.events_matching(is_expired)[0].0, old.expires_at);
    // The same epoch again changes nothing.
    let mut calm = Sim::new(6);
    calm.run_for(100.0);
    let epoch = calm.client.lease().expect("granted").epoch;
    calm.client.epoch_observed(calm.now, epoch);
    assert_eq!(calm.client.state(), LeaseState::Active);
}

#[test]
fn release_is_local_at_once_and_reaches_the_gateway() {
    let mut sim = Sim::new(7);
    sim.run_for(50.0);
    let id = sim.granted_lease();
    let now = sim.now;
    sim.client.release(now);
    // Locally released before anything is sent or answered.
    assert_eq!(sim.client.state(), LeaseState::Released);
    assert_eq!(sim.client.lease(), None);
    assert_eq!(
        sim.client.poll_event(),
        Some(LeaseEvent::Released { lease: Some(id) })
    );
    sim.run_for(1.0);
    assert_eq!(sim.sent_of(is_release), vec![now]);
    assert!(sim.gateway.core.book().get(&id).is_none());
    assert!(sim.client.is_finished());
    assert_eq!(sim.client.poll_timeout(), None);
}

#[test]
fn a_lost_release_is_retried_until_the_old_expiry_at_most() {
    let mut sim = Sim::new(8);
    sim.run_for(50.0);
    let lease = sim.client.lease().expect("granted").clone();
    sim.link.drop_requests = true;
    let now = sim.now;
    sim.client.release(now);
    sim.run_for(2000.0);
    let releases = sim.sent_of(is_release);
    assert!(releases.len() > 5);
    assert!(releases.iter().all(|&t| t < lease.expires_at));
    assert!(sim.client.is_finished());
    // The gateway still holds it: its own expiry ends it.
    let now_ms = sim.gateway.now_ms(sim.now);
    assert_eq!(sim.gateway.core.book_mut().expire_due(now_ms).len(), 1);
}

#[test]
fn release_while_the_open_is_in_flight_gives_the_lease_back() {
    let mut sim = Sim::new(9);
    sim.link.delay = Duration::from_millis(500);
    sim.run_until(sim.at(0.1));
    assert_eq!(sim.sent_of(is_open).len(), 1);
    let now = sim.now;
    sim.client.release(now);
    assert_eq!(
        sim.client.poll_event(),
        Some(LeaseEvent::Released { lease: None })
    );
    sim.run_for(5.0);
    // The Granted that arrived after the release was answered with a Release.
    assert_eq!(sim.sent_of(is_release).len(), 1);
    assert!(sim.gateway.core.book().is_empty());
    assert!(sim.events_matching(is_granted).is_empty());
    assert!(sim.client.is_finished());
}

#[test]
fn unknown_lease_on_renew_reopens_once() {
    let mut sim = Sim::new(10);
    sim.run_for(10.0);
    sim.check_mirror = false;
    let old = sim.granted_lease();
    // The gateway forgot the lease without telling (same epoch).
    sim.gateway.core.book_mut().revoke(&old).expect("held");
    sim.run_for(400.0);
    assert_eq!(sim.client.state(), LeaseState::Active);
    let new = sim.granted_lease();
    assert_ne!(new, old);
    assert_eq!(sim.sent_of(is_open).len(), 2, "exactly one fresh Open");
    let reopening = sim.events_matching(|e| matches!(e, LeaseEvent::Reopening { .. }));
    assert_eq!(
        reopening.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        vec![LeaseEvent::Reopening {
            previous: old,
            cause: ReopenCause::UnknownLease
        }]
    );
    assert!(matches!(
        sim.events_matching(is_granted).last(),
        Some((_, LeaseEvent::Granted { replaces: Some(r), .. })) if *r == old
    ));
}

#[test]
fn a_denied_reopen_is_reported_lost() {
    let mut sim = Sim::new(11);
    sim.run_for(10.0);
    sim.check_mirror = false;
    let old = sim.granted_lease();
    sim.gateway.core.book_mut().revoke(&old).expect("held");
    // The Renew meets unknown-lease; the re-open then meets a quota of zero.
    sim.gateway.decide.max_leases = Some(0);
    sim.run_for(400.0);
    assert_eq!(
        sim.client.state(),
        LeaseState::Lost(ResultCode::QuotaExceeded)
    );
    let lost = sim.events_matching(|e| matches!(e, LeaseEvent::Lost { .. }));
    assert!(
        matches!(&lost[0].1, LeaseEvent::Lost { previous, code: ResultCode::QuotaExceeded, .. } if *previous == old)
    );
    assert_eq!(sim.client.lease(), None);
    assert_eq!(sim.sent_of(is_open).len(), 2, "one re-open, no more");
}

#[test]
fn rate_limited_retry_after_is_honoured() {
    for seed in 0..20 {
        let mut sim = Sim::new(seed);
        sim.run_for(1.0);
        let renew_at = sim.client.renew_at().expect("scheduled");
        sim.gateway
            .scripted_denials
            .push_back((ResultCode::RateLimited, Some(30)));
        sim.run_until(renew_at + Duration::from_secs(100));
        let renews = sim.sent_of(is_renew);
        assert_eq!(renews.len(), 2, "seed {seed}");
        // The Denied arrived 40 ms after the first Renew; the retry waits at least 30 s more.
        let denied_at = renews[0] + Duration::from_millis(40);
        assert!(secs_between(denied_at, renews[1]) >= 30.0, "seed {seed}");
        assert!(
            secs_between(denied_at, renews[1]) <= 30.0 + 1e-9,
            "seed {seed}"
        );
        assert_eq!(sim.client.state(), LeaseState::Active);
    }
}

#[test]
fn no_resources_is_retried_on_the_backoff_schedule() {
    let mut sim = Sim::new(12);
    sim.run_for(1.0);
    let renew_at = sim.client.renew_at().expect("scheduled");
    for _ in 0..3 {
        sim.gateway
            .scripted_denials
            .push_back((ResultCode::NoResources, None));
    }
    sim.run_until(renew_at + Duration::from_secs(100));
    let renews = sim.sent_of(is_renew);
    assert_eq!(renews.len(), 4);
    for (n, pair) in renews.windows(2).enumerate() {
        let base = FIRST_RETRY_DELAY * 2u32.pow(n as u32);
        let gap = pair[1].duration_since(pair[0]) - Duration::from_millis(40);
        assert!(
            gap >= base.mul_f64(0.8) && gap <= base.mul_f64(1.2),
            "retry {n}: {gap:?}"
        );
    }
    assert_eq!(sim.client.state(), LeaseState::Active);
}

/// A first Open that is refused is not retried by the machine, whatever the code: the refusal,
/// with its retry-after, goes back to whoever asked, who decides whether to wait (spec 11.9
/// retries only the Opens asked on the host's behalf).
#[test]
fn a_denial_of_the_first_open_fails_it_without_retry() {
    for (code, retry_after) in [
        (ResultCode::DeniedByPolicy, None),
        (ResultCode::RateLimited, Some(30)),
        (ResultCode::NoResources, Some(30)),
    ] {
        let mut sim = Sim::new(13);
        sim.gateway.scripted_denials.push_back((code, retry_after));
        sim.run_for(1000.0);
        assert_eq!(sim.client.state(), LeaseState::Failed(code));
        assert_eq!(sim.sent_of(is_open).len(), 1);
        assert_eq!(
            sim.events
                .iter()
                .map(|(_, e)| e.clone())
                .collect::<Vec<_>>(),
            vec![LeaseEvent::Denied {
                code,
                reason: Some(code.name().into()),
                retry_after
            }]
        );
        assert!(sim.client.is_finished());
    }
}

#[test]
fn a_refused_renewal_keeps_the_lease_until_expiry() {
    let mut sim = Sim::new(14);
    sim.run_for(10.0);
    let lease = sim.client.lease().expect("granted").clone();
    sim.gateway.refuse_renewals = Some(ResultCode::DeniedByPolicy);
    sim.run_for(2000.0);
    assert_eq!(sim.sent_of(is_renew).len(), 1, "no retry after a refusal");
    let refused = sim.events_matching(|e| matches!(e, LeaseEvent::RenewRefused { .. }));
    assert_eq!(refused.len(), 1);
    assert_eq!(sim.events_matching(is_expired)[0].0, lease.expires_at);
}

#[test]
fn answers_that_do_not_belong_are_ignored_and_counted() {
    let mut sim = Sim::new(15);
    sim.run_for(10.0);
    let lease = sim.client.lease().expect("granted").clone();
    let now = sim.now;
    let stray_granted = Message::Granted(Granted {
        common: Common {
            request_id: Some(42),
            critical: Vec::new(),
        },
        lease: LeaseId([9; 16]),
        grants: Vec::new(),
        lifetime: 1,
        expires_ms: 0,
        renew_after: 0,
        epoch: 0,
        narrowed: false,
    });
    let stray_released = Message::Released(Released {
        common: Common::default(),
        lease: lease.id,
    });
    let stray_open = sim.sent[0].1.clone();
    for stray in [&stray_granted, &stray_released, &stray_open] {
        sim.client.handle_answer(now, stray, &mut sim.rng);
    }
    sim.client.handle_notice(now, &stray_open);
    assert_eq!(sim.client.ignored_messages(), 4);
    assert_eq!(sim.client.lease(), Some(&lease));
    assert_eq!(sim.client.state(), LeaseState::Active);
    // A Granted for another lease answering our Renew (right request id) is ignored too.
    let mut sim = Sim::new(16);
    sim.run_for(10.0);
    let renew_at = sim.client.renew_at().expect("scheduled");
    sim.link.drop_requests = true;
    sim.run_until(renew_at);
    let (_, renew) = sim.sent.last().cloned().expect("renew sent");
    let Message::Granted(mut wrong) = stray_granted else {
        unreachable!()
    };
    wrong.common.request_id = renew.common().request_id;
    let now = sim.now;
    sim.client
        .handle_answer(now, &Message::Granted(wrong), &mut sim.rng);
    assert_eq!(sim.client.ignored_messages(), 1);
    assert_eq!(sim.client.state(), LeaseState::Renewing);
}

#[test]
fn idempotent_reopen_through_the_link_returns_the_same_lease() {
    // Two machines asking for the same opening from the same host get the same lease.
    let mut sim = Sim::new(17);
    sim.run_for(1.0);
    let first = sim.granted_lease();
    let mut rng = StdRng::seed_from_u64(99);
    let mut second = LeaseMachine::new(sim.now, tcp_opening(8080), None, None, &mut rng);
    let open = second.poll_transmit(sim.now).expect("open due");
    let answer = sim.gateway.handle(sim.now, &over_the_wire(&open));
    second.handle_answer(sim.now, &over_the_wire(&answer), &mut rng);
    assert_eq!(second.lease_id(), Some(first));
    assert_eq!(sim.gateway.core.book().lease_count(HOST), 1);
    let grants = sim
        .gateway
        .core
        .book()
        .get(&first)
        .expect("held")
        .grants
        .clone();
    let now_ms = sim.gateway.now_ms(sim.now);
    let lifetime = sim.gateway.decide.lifetime;
    assert!(matches!(
        sim.gateway.core.book_mut().open(
            now_ms,
            HOST,
            &match open {
                Message::Open(o) => o,
                _ => unreachable!(),
            },
            &PolicyFacts {
                grants,
                grants_narrowed: false,
                lifetime,
                max_leases: Some(1),
            },
            &mut rng,
        ),
        Ok(OpenOutcome::Extended { .. })
    ));
}

#[test]
fn a_connection_lost_during_a_renew_retries_without_waiting_for_the_timeout() {
    for seed in 0..20 {
        let mut sim = Sim::new(seed);
        sim.link.delay = Duration::from_millis(200);
        sim.run_for(1.0);
        let renew_at = sim.client.renew_at().expect("scheduled");
        // The Renew leaves, then the connection drops before its answer.
        sim.run_until(renew_at + Duration::from_millis(100));
        assert_eq!(sim.client.state(), LeaseState::Renewing);
        sim.cut();
        let lost_at = sim.now;
        let retry_at = sim.client.poll_timeout().expect("a retry is scheduled");
        let delay = retry_at.duration_since(lost_at);
        assert!(delay >= FIRST_RETRY_DELAY.mul_f64(0.8) && delay <= FIRST_RETRY_DELAY.mul_f64(1.2));
        // The connection comes back before the retry: the renewal goes through.
        sim.link.cut = false;
        sim.run_for(5.0);
        assert_eq!(sim.client.state(), LeaseState::Active, "seed {seed}");
        assert_eq!(sim.sent_of(is_renew).len(), 2);
        assert!(
            sim.events_matching(|e| matches!(e, LeaseEvent::Renewed { .. }))
                .len()
                == 1
        );
    }
}

#[test]
fn under_random_loss_and_delay_the_mirror_never_outlives_the_gateway_lease() {
    let mut expiries = 0;
    for seed in 0..100 {
        let mut sim = Sim::new(seed);
        sim.link.chaos = Some((
            StdRng::seed_from_u64(seed + 1000),
            0.3,
            Duration::from_secs(2),
        ));
        // Three hours; the invariant is checked after every step of the simulation.
        sim.run_for(3.0 * 3600.0);
        for (at, event) in &sim.events {
            if let LeaseEvent::Expired { .. } = event {
                expiries += 1;
                // An expiry only ever happens at the exact local expiry, never earlier.
                let last_grant = sim
                    .events
                    .iter()
                    .rev()
                    .find_map(|(_, e)| match e {
                        LeaseEvent::Granted { lease, .. } | LeaseEvent::Renewed { lease } => {
                            Some(lease.expires_at)
                        }
                        _ => None,
                    })
                    .expect("granted before expiring");
                assert_eq!(*at, last_grant, "seed {seed}");
            }
        }
        // Only one lease at the gateway at any time: retries extended it instead of duplicating.
        assert!(sim.gateway.core.book().len() <= 1, "seed {seed}");
        // Every request that went out for the live lease was answered or retried in time.
        let renews = sim.sent_of(is_renew);
        assert!(
            renews.len() >= 30 || sim.client.state() == LeaseState::Expired,
            "seed {seed}"
        );
    }
    // With 30 % loss each way a few leases may expire; most must survive three hours.
    assert!(expiries <= 10, "{expiries} expiries out of 100 runs");
}

// ---------------------------------------------------------------------------------------------
// Gateway restarts: the connection's timers, stateless resets and reconnection, in simulated
// time.

/// What crosses the network in the restart scenarios, tagged with the gateway run of the
/// connection it belongs to.
#[derive(Debug, Clone)]
enum Packet {
    /// A request (or, without one, a keep-alive PING) on the way to the gateway.
    ToGateway { run: u32, request: Option<Message> },
    /// An answer (or, without one, the acknowledgement of a PING) on the way to the client.
    ToClient { run: u32, answer: Option<Message> },
    /// A stateless reset for a connection of an earlier run.
    Reset { run: u32 },
    /// The first packet of connection attempt number `attempt`.
    Initial { attempt: u64 },
    /// Attempt `attempt` completed its handshake, Hello and List.
    Established { attempt: u64 },
}

/// The client's connection, as far as its timers go.
struct SimConnection {
    /// The gateway run it was made with.
    run: u32,
    timers: TransportTimers,
    last_sent: Instant,
    last_heard: Instant,
}

/// One client lease machine, its link (connection timers, resets, reconnection schedule) and a
/// gateway that is down for a while and then restarts on the same state: its lease book and
/// epoch survive, its connections do not, and its reset secret does (it answers packets of its
/// earlier run's connections with a stateless reset the client accepts).
struct RestartSim {
    now: Instant,
    client: LeaseMachine,
    gateway: SimGateway,
    rng: StdRng,
    one_way: Duration,
    down_from: Instant,
    up_again: Instant,
    reconnect: Reconnect,
    connection: Option<SimConnection>,
    next_attempt: Option<Instant>,
    /// The attempt in progress: its number and when it is given up.
    attempt: Option<(u64, Instant)>,
    attempts: u64,
    packets: Vec<(Instant, Packet)>,
    events: Vec<(Instant, LeaseEvent)>,
    resets: u32,
}

impl RestartSim {
    /// A client asking for `lifetime` from a gateway whose policy allows it as its minimum,
    /// connected from the start with timers suited to that minimum.
    fn new(seed: u64, lifetime: u32, outage_after_grant: Duration, outage: Duration) -> Self {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let client = LeaseMachine::new(t0, tcp_opening(8080), Some(lifetime), None, &mut rng);
        let mut gateway = SimGateway::new(seed, t0);
        gateway.decide.lifetime = LifetimePolicy {
            min: lifetime,
            max: 3600,
            default: lifetime,
        };
        let one_way = Duration::from_millis(5);
        // The grant comes one round trip after the Open.
        let granted = t0 + 2 * one_way;
        let mut sim = RestartSim {
            now: t0,
            client,
            gateway,
            rng,
            one_way,
            down_from: granted + outage_after_grant,
            up_again: granted + outage_after_grant + outage,
            reconnect: Reconnect::new(),
            connection: Some(SimConnection {
                run: 0,
                timers: TransportTimers::for_min_lifetime(Some(lifetime)),
                last_sent: t0,
                last_heard: t0,
            }),
            next_attempt: None,
            attempt: None,
            attempts: 0,
            packets: Vec::new(),
            events: Vec::new(),
            resets: 0,
        };
        sim.reconnect.connected(t0);
        sim
    }

    fn gateway_up(&self, at: Instant) -> bool {
        at < self.down_from || at >= self.up_again
    }

    fn gateway_run(&self, at: Instant) -> u32 {
        u32::from(at >= self.up_again)
    }

    fn send(&mut self, packet: Packet) {
        let at = self.now + self.one_way;
        self.packets.push((at, packet));
    }

    fn lose_connection(&mut self, ending: Ending) {
        self.connection = None;
        self.client.connection_lost(self.now, &mut self.rng);
        let expiry = self.client.expires_at();
        self.next_attempt =
            Some(
                self.reconnect
                    .next_attempt(self.now, ending, expiry, &mut self.rng),
            );
    }

    fn deliver(&mut self, packet: Packet) {
        let now = self.now;
        match packet {
            Packet::ToGateway { run, request } => {
                if !self.gateway_up(now) {
                    return;
                }
                if self.gateway_run(now) != run {
                    self.send(Packet::Reset { run });
                    return;
                }
                let answer = request.map(|r| over_the_wire(&self.gateway.handle(now, &r)));
                self.send(Packet::ToClient { run, answer });
            }
            Packet::ToClient { run, answer } => {
                let Some(connection) = self.connection.as_mut().filter(|c| c.run == run) else {
                    return;
                };
                connection.last_heard = now;
                if let Some(answer) = answer {
                    self.client.handle_answer(now, &answer, &mut self.rng);
                }
            }
            Packet::Reset { run } => {
                if self.connection.as_ref().is_some_and(|c| c.run == run) {
                    self.resets += 1;
                    self.lose_connection(Ending::Reset);
                }
            }
            Packet::Initial { attempt } => {
                if self.gateway_up(now) {
                    // The rest of the handshake, Hello/Welcome and List/Leases: two more round
                    // trips and the way back.
                    let at = now + 5 * self.one_way;
                    self.packets.push((at, Packet::Established { attempt }));
                }
            }
            Packet::Established { attempt } => {
                if self.attempt.is_none_or(|(current, _)| current != attempt) {
                    return;
                }
                self.attempt = None;
                self.connection = Some(SimConnection {
                    run: self.gateway_run(now),
                    timers: TransportTimers::for_min_lifetime(Some(
                        self.gateway.decide.lifetime.min,
                    )),
                    last_sent: now,
                    last_heard: now,
                });
                self.reconnect.connected(now);
                self.gateway.connect(now);
                self.client.epoch_observed(now, self.gateway.epoch);
                self.client.reconnected(now, &mut self.rng);
            }
        }
    }

    fn process_now(&mut self) {
        let now = self.now;
        for _ in 0..1000 {
            let mut progressed = false;
            let due = Link::take_due(&mut self.packets, now);
            for packet in due {
                progressed = true;
                self.deliver(packet);
            }
            if let Some(connection) = &self.connection
                && now >= connection.last_heard + connection.timers.idle_timeout
            {
                progressed = true;
                self.lose_connection(Ending::Lost);
            }
            if let Some((_, give_up)) = self.attempt
                && now >= give_up
            {
                progressed = true;
                self.attempt = None;
                let expiry = self.client.expires_at();
                self.next_attempt =
                    Some(
                        self.reconnect
                            .next_attempt(now, Ending::Lost, expiry, &mut self.rng),
                    );
            }
            if self.connection.is_none()
                && self.attempt.is_none()
                && self.next_attempt.is_some_and(|at| at <= now)
            {
                progressed = true;
                self.next_attempt = None;
                self.attempts += 1;
                let timeout = Reconnect::handshake_timeout(now, self.client.expires_at());
                self.attempt = Some((self.attempts, now + timeout));
                self.send(Packet::Initial {
                    attempt: self.attempts,
                });
            }
            if self.client.poll_timeout().is_some_and(|t| t <= now) {
                self.client.handle_timeout(now, &mut self.rng);
            }
            if let Some(run) = self.connection.as_ref().map(|c| c.run) {
                while let Some(request) = self.client.poll_transmit(now) {
                    progressed = true;
                    self.send(Packet::ToGateway {
                        run,
                        request: Some(over_the_wire(&request)),
                    });
                    if let Some(connection) = self.connection.as_mut() {
                        connection.last_sent = now;
                    }
                }
                if let Some(connection) = self.connection.as_mut()
                    && now >= connection.last_sent + connection.timers.keep_alive
                {
                    progressed = true;
                    connection.last_sent = now;
                    self.send(Packet::ToGateway { run, request: None });
                }
            }
            while let Some(event) = self.client.poll_event() {
                progressed = true;
                self.events.push((now, event));
            }
            if !progressed {
                return;
            }
        }
        panic!("no quiescence");
    }

    fn next_deadline(&self) -> Option<Instant> {
        let connection = self
            .connection
            .as_ref()
            .map(|c| (c.last_heard + c.timers.idle_timeout).min(c.last_sent + c.timers.keep_alive));
        let waiting = self
            .next_attempt
            .filter(|_| self.connection.is_none() && self.attempt.is_none());
        // While there is no connection a due request waits for one; the agent's core wakes
        // every 250 ms meanwhile, for the expiries.
        let client = self.client.poll_timeout().map(|t| {
            if self.connection.is_none() {
                t.max(self.now + Duration::from_millis(250))
            } else {
                t
            }
        });
        [
            client,
            self.packets.iter().map(|(t, _)| *t).min(),
            self.attempt.map(|(_, give_up)| give_up),
            waiting,
            connection,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn run_until(&mut self, until: Instant) {
        for _ in 0..1_000_000 {
            self.process_now();
            match self.next_deadline() {
                Some(next) if next <= until => {
                    assert!(next > self.now, "a deadline does not advance");
                    self.now = next;
                }
                _ => {
                    self.now = until;
                    self.process_now();
                    return;
                }
            }
        }
        panic!("the simulation did not reach its end");
    }
}

#[test]
fn a_lease_of_ten_seconds_or_more_survives_a_three_second_gateway_restart() {
    let outage = Duration::from_secs(3);
    let mut runs = 0;
    for lifetime in [10u32, 11, 13, 16, 20, 30, 60, 120] {
        let lifetime_d = Duration::from_secs(u64::from(lifetime));
        // The outage starts anywhere in the first lifetime, on a grid of 1/50 of it (so also
        // just before, during and after the first renewal).
        for step in 0..50u32 {
            let after_grant = lifetime_d * step / 50;
            let seed = u64::from(lifetime) * 1000 + u64::from(step);
            let mut sim = RestartSim::new(seed, lifetime, after_grant, outage);
            let start = sim.now;
            sim.run_until(start + lifetime_d * 3 + outage);
            runs += 1;
            let context = format!(
                "lease of {lifetime} s, gateway down from {:?} to {:?} after the Open",
                sim.down_from - start,
                sim.up_again - start,
            );
            assert!(
                matches!(sim.events.first(), Some((_, LeaseEvent::Granted { .. }))),
                "{context}: {:?}",
                sim.events
            );
            let ended: Vec<_> = sim
                .events
                .iter()
                .filter(|(_, e)| {
                    !matches!(e, LeaseEvent::Granted { .. } | LeaseEvent::Renewed { .. })
                })
                .collect();
            assert!(ended.is_empty(), "{context}: {ended:?}");
            assert!(
                sim.client.state() == LeaseState::Active
                    || sim.client.state() == LeaseState::Renewing,
                "{context}: {:?}",
                sim.client.state()
            );
            let renewed_after_outage = sim
                .events
                .iter()
                .any(|(at, e)| matches!(e, LeaseEvent::Renewed { .. }) && *at >= sim.up_again);
            assert!(renewed_after_outage, "{context}: {:?}", sim.events);
        }
    }
    assert_eq!(runs, 400);
}

#[test]
fn a_ten_second_lease_and_a_restart_just_after_the_grant_renewed_on_time() {
    // A 10 s lease; the gateway dies 0.5 s after the grant and listens again 2.6 s after it.
    let mut sim = RestartSim::new(
        7,
        10,
        Duration::from_millis(500),
        Duration::from_millis(2100),
    );
    let start = sim.now;
    sim.run_until(start + Duration::from_secs(30));
    // The connection was declared dead by its idle timeout while the gateway was down (about a
    // second), and the client reconnected within a fraction of a second of the gateway's return.
    let renewals: Vec<f64> = sim
        .events
        .iter()
        .filter(|(_, e)| matches!(e, LeaseEvent::Renewed { .. }))
        .map(|(at, _)| secs_between(start, *at))
        .collect();
    assert!(renewals.len() >= 4, "{renewals:?} {:?}", sim.events);
    assert!(renewals[0] < 7.0, "{renewals:?}");
    assert!(sim.client.state() != LeaseState::Expired);
}

#[test]
fn a_restarted_gateway_answering_the_old_connection_with_a_reset_brings_an_immediate_reconnection()
{
    // The gateway is back before the idle timeout fires (a restart of 0.8 s with timers sized
    // for 60 s leases, idle 7.5 s): the next keep-alive meets the reset, and the client connects
    // at once.
    let mut sim = RestartSim::new(9, 60, Duration::from_secs(2), Duration::from_millis(800));
    let start = sim.now;
    sim.run_until(start + Duration::from_millis(5300));
    assert_eq!(sim.resets, 1);
    let connected = sim.connection.as_ref().expect("connected again");
    assert_eq!(connected.run, 1);
    assert!(
        connected.last_heard - sim.up_again
            <= TransportTimers::for_min_lifetime(Some(60)).keep_alive + Duration::from_millis(50)
    );
}

#[test]
fn a_renewal_lost_with_its_connection_is_sent_again_on_the_next_one_at_once() {
    let mut sim = Sim::new(3);
    sim.run_for(1.0);
    let renew_at = sim.client.renew_at().expect("scheduled");
    sim.run_until(renew_at + Duration::from_millis(10));
    assert_eq!(sim.client.state(), LeaseState::Renewing);
    let first = sim.client.in_flight().expect("the Renew is in flight");
    // The connection dies with the Renew on it; the backoff would wait about a second.
    sim.cut();
    assert!(sim.client.poll_timeout().expect("retry") > sim.now + Duration::from_millis(500));
    // 100 ms later a new connection is up: the Renew goes on it now.
    sim.run_for(0.1);
    sim.link.cut = false;
    sim.client.reconnected(sim.now, &mut sim.rng);
    let reconnected_at = sim.now;
    sim.process_now();
    let renews = sim.sent_of(is_renew);
    assert_eq!(renews.len(), 2);
    assert_eq!(renews[1], reconnected_at);
    // Another attempt of the same request, under the same request id (spec 15).
    assert_ne!(sim.client.in_flight(), Some(first));
    let ids: Vec<_> = sim
        .sent
        .iter()
        .filter(|(_, m)| is_renew(m))
        .map(|(_, m)| m.common().request_id)
        .collect();
    assert_eq!(ids[0], ids[1]);
    sim.run_for(1.0);
    assert_eq!(sim.client.state(), LeaseState::Active);
}

#[test]
fn a_reconnection_does_not_cut_short_a_retry_after_or_move_a_scheduled_renewal() {
    let mut sim = Sim::new(4);
    sim.run_for(1.0);
    let renew_at = sim.client.renew_at().expect("scheduled");
    sim.client.reconnected(sim.now, &mut sim.rng);
    assert_eq!(sim.client.renew_at(), Some(renew_at));
    // A rate-limited Renew with retry-after 20 s: a new connection does not make it earlier.
    sim.gateway
        .scripted_denials
        .push_back((ResultCode::RateLimited, Some(20)));
    sim.run_until(renew_at + Duration::from_millis(100));
    let retry = sim.client.poll_timeout().expect("a retry");
    assert!(retry >= renew_at + Duration::from_secs(20));
    sim.client.reconnected(sim.now, &mut sim.rng);
    assert_eq!(sim.client.poll_timeout(), Some(retry));
}
