//! `fwnp-load`: the FWNP load generator. Many simulated hosts, each with its own certificate and
//! QUIC connection, send an open/renew/release mix to a real `fwnp-gateway` and the tool reports
//! what the gateway sustained and how long each answer took.
//!
//! It sets everything up itself: a throw-away CA and certificates, a policy that allows the
//! simulated hosts, and the gateway process with its SQLite store, or with `--store etcd` a
//! three-member etcd cluster started for the run; with `--netns` the gateway runs in a fresh
//! network namespace with its nftables filter on, so every grant goes through the kernel as in
//! production. Output is a table, or one JSON object with `--json`.
//!
//! ```text
//! fwnp-load --hosts 200 --duration 20s                 closed loop: as fast as the gateway goes
//! fwnp-load --rate 1000 --duration 30s                 open loop at 1,000 requests/s
//! fwnp-load --netns --prefill 1000000 --duration 0s    a million live leases, then memory
//! fwnp-load --netns --prefill 1000000 --restart        the same, then a restart until ready
//! fwnp-load --netns --mix 100,0,0 --baseline           beside a bare QUIC server, alternating
//! fwnp-load --netns --baseline --store sqlite,etcd     and on both stores, and etcd alone
//! ```
#![forbid(unsafe_code)]
// The report is one `json!` literal, deeper than the macro's default recursion allows.
#![recursion_limit = "256"]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use fwnp_gateway::api::TimeBuckets;
use fwnp_proto::codec::{decode, encode};
use fwnp_proto::{
    Capabilities, Common, Hello, LeaseId, Message, Open, Opening, PortRange, Protocol, Release,
    Renew, ResultCode, Target,
};
use fwnp_trust::pki;
use fwnp_trust::tls::{ClientOptions, client_config};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::json;

// The gateway's and the baseline's allocator: the generator's allocations per request cost less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Drives a real fwnp-gateway with simulated hosts and reports throughput and latency.
#[derive(Debug, Parser, Clone)]
#[command(version, about)]
struct Args {
    /// Simulated hosts, each with its own certificate and QUIC connection.
    #[arg(long, default_value_t = 100)]
    hosts: usize,
    /// Requests per second for an open loop; without it, a closed loop as fast as answers come.
    #[arg(long)]
    rate: Option<u64>,
    /// Requests in flight per host in the closed loop.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// How long to measure.
    #[arg(long, default_value = "20s", value_parser = fwnp_proto::duration::parse_argument)]
    duration: Duration,
    /// Percentages of open, renew and release in the mix.
    #[arg(long, default_value = "60,30,10")]
    mix: String,
    /// Open this many leases before measuring (spread over the hosts), e.g. to measure memory.
    #[arg(long, default_value_t = 0)]
    prefill: u64,
    /// Lifetime asked for each lease, in seconds.
    #[arg(long, default_value_t = 3600)]
    lifetime: u32,
    /// Run the gateway in a fresh network namespace with its nftables filter on (needs root).
    #[arg(long)]
    netns: bool,
    /// The fwnp-gateway binary (default: beside this one).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep the working directory (certificates, configs, store, gateway log).
    #[arg(long)]
    keep: bool,
    /// Run the gateway on these CPUs only (`taskset -c` syntax, e.g. `0` or `0,1`), so that
    /// it and this generator do not compete for the same cores.
    #[arg(long)]
    gateway_cpus: Option<String>,
    /// Run this generator on these CPUs only (same syntax).
    #[arg(long)]
    cpus: Option<String>,
    /// Worker threads of the gateway's runtime (default: one per core).
    #[arg(long)]
    gateway_threads: Option<usize>,
    /// Worker threads of this generator's runtime (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Memory per idle connection: connect the hosts (each says Hello), hold them for
    /// `--duration` without a request, and report the gateway's memory before and after, per
    /// connection, and how many connections are still up at the end.
    #[arg(long, conflicts_with_all = ["rate", "prefill", "flood_hosts"])]
    idle: bool,
    /// Flood isolation: this many hosts send as fast as they can (`--concurrency` requests in
    /// flight each) while the others keep the open loop's `--rate`. The others are measured
    /// twice in one run, first without the flood and then with it.
    #[arg(long, default_value_t = 0, requires = "rate")]
    flood_hosts: usize,
    /// Measure the ceiling beside FWNP in the same run: a bare QUIC server (`fwnp-baseline`,
    /// beside this binary) with the gateway's own TLS and transport settings that answers each
    /// request with a fixed answer the size of a Granted, without policy, kernel or store. The
    /// same hosts, certificates, connections, concurrency or rate and message sizes go to each
    /// in turn, baseline first, alternating `--phases` times so that the machine's drift
    /// affects both; each side is measured for `--duration` in all.
    #[arg(long, conflicts_with_all = ["idle", "flood_hosts"])]
    baseline: bool,
    /// Restart time: after `--prefill`, stop the gateway (SIGTERM) and start it again on the
    /// same store, and report how long it took from its start until it answered a Hello (it
    /// listens once its leases are restored and, with `--netns`, back in the kernel), its
    /// memory then and `--restart-later` seconds after, and whether a lease of the prefill is
    /// renewed.
    #[arg(long, requires = "prefill", conflicts_with_all = ["idle", "rate", "flood_hosts", "baseline"])]
    restart: bool,
    /// With `--restart`: seconds after the restarted gateway is ready at which its memory is
    /// measured again, with no request in between (memory the restore freed may reach the
    /// system only later).
    #[arg(long, value_delimiter = ',', default_values_t = [10, 30], requires = "restart")]
    restart_later: Vec<u64>,
    /// With `--baseline` or several stores: how many phases each side's `--duration` is split
    /// into (2 by default).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    phases: Option<u32>,
    /// Where the gateway keeps its leases: `sqlite` (its own database), `etcd` (a three-member
    /// etcd cluster started for the run in a network namespace of its own, joined to the
    /// gateway's by a link; needs root), or both, `sqlite,etcd`: a gateway on each, measured in
    /// alternating phases as with `--baseline` (which they combine with), and reported side by
    /// side with etcd's figures over SQLite's. With etcd, the cluster's own write ceiling is
    /// measured in the same phases (`--etcd-writers`).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [StoreKind::Sqlite])]
    store: Vec<StoreKind>,
    /// With `--store etcd`: the etcd-alone writer's transactions in flight, one measurement per
    /// number given. Each transaction has the gateway's shape for a full batch of opens: 48
    /// lease keys written only while absent, with the byte size of a lease the gateway wrote in
    /// this run, and the hosts' counter keys.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8], value_parser = clap::value_parser!(u32).range(1..=64))]
    etcd_writers: Vec<u32>,
    /// The policy's rate limit per host: this many requests per second, and as many at once
    /// (its `[rate_limit]`; without it the gateway's built-in limit applies). A request refused
    /// as rate-limited makes its slot of the closed loop wait the answer's retry-after.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    host_rate_limit: Option<u32>,
}

/// A lease store the gateway can be measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// The gateway's own SQLite database.
    Sqlite,
    /// A three-member etcd cluster started for the run.
    Etcd,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Etcd => "etcd",
        }
    }

    /// The stem of the gateway's configuration, log, state directory and admin socket in the
    /// working directory: the first store's gateway keeps the names it always had.
    fn stem(self, first: bool) -> String {
        if first {
            "gateway".to_owned()
        } else {
            format!("gateway-{}", self.name())
        }
    }
}

/// The key prefix of the gateway's keys in etcd.
const ETCD_PREFIX: &str = "/fwnp-load";

/// The key prefix of the etcd-alone writer's keys, beside the gateway's.
const ETCD_CEILING_PREFIX: &str = "/fwnp-load-ceiling";

#[derive(Debug, Clone, Copy)]
struct Mix {
    open: u32,
    renew: u32,
}

fn parse_mix(text: &str) -> Result<Mix, String> {
    let parts: Vec<u32> = text
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("--mix {text:?}: three numbers"))
        })
        .collect::<Result<_, _>>()?;
    match parts[..] {
        [open, renew, release] if open + renew + release == 100 && open > 0 => {
            Ok(Mix { open, renew })
        }
        _ => Err(format!(
            "--mix {text:?}: open,renew,release percentages adding up to 100, open > 0"
        )),
    }
}

/// The gateway process; killed on drop.
struct Gateway {
    child: Child,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Stops the server as its service manager would (SIGTERM) and waits for it to exit, for
    /// at most `patience`; then kills it.
    fn stop(&mut self, patience: Duration) -> Result<(), Box<dyn std::error::Error>> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        Err(format!("the server did not stop within {patience:?} of SIGTERM").into())
    }

    fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of(&format!("/proc/{}/stat", self.child.id()))
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

struct Host {
    connection: quinn::Connection,
    address: IpAddr,
    next_port: AtomicU64,
    /// The leases granted to the host, for its renews and releases: a lock held only to push
    /// or take one, never across an await.
    held: std::sync::Mutex<Vec<LeaseId>>,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    granted: AtomicU64,
    renewed: AtomicU64,
    released: AtomicU64,
    denied: AtomicU64,
    /// Among the denied: refused as rate-limited.
    rate_limited: AtomicU64,
    /// Waits of a closed loop's slot for a Denied's retry-after, and their time in all.
    retry_after_waits: AtomicU64,
    retry_after_waited_us: AtomicU64,
    /// Closed loop: requests in flight at the end of a phase, answered after it (counted with
    /// the phase's, whose time and CPU were read at its end).
    after_end: AtomicU64,
    failed: AtomicU64,
    /// The answers' sizes, summed.
    answer_bytes: AtomicU64,
    /// Why requests failed, by error text.
    failures: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counters {
    /// The failures by reason, as a JSON object.
    fn failures_json(&self) -> serde_json::Value {
        self.failures
            .lock()
            .map(|f| json!(*f))
            .unwrap_or(serde_json::Value::Null)
    }

    /// Adds these counts to `total`'s.
    fn add_to(&self, total: &Counters) {
        let pairs = [
            (&self.sent, &total.sent),
            (&self.granted, &total.granted),
            (&self.renewed, &total.renewed),
            (&self.released, &total.released),
            (&self.denied, &total.denied),
            (&self.rate_limited, &total.rate_limited),
            (&self.retry_after_waits, &total.retry_after_waits),
            (&self.retry_after_waited_us, &total.retry_after_waited_us),
            (&self.after_end, &total.after_end),
            (&self.failed, &total.failed),
            (&self.answer_bytes, &total.answer_bytes),
        ];
        for (mine, theirs) in pairs {
            theirs.fetch_add(mine.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let failures =
            std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()));
        let mut total = total.failures.lock().unwrap_or_else(|e| e.into_inner());
        for (reason, n) in failures {
            *total.entry(reason).or_default() += n;
        }
    }

    /// The waits for a retry-after, as a JSON object.
    fn retry_after_json(&self) -> serde_json::Value {
        json!({
            "waits": self.retry_after_waits.load(Ordering::Relaxed),
            "waited_s": self.retry_after_waited_us.load(Ordering::Relaxed) as f64 / 1e6,
        })
    }

    /// The answers' mean size in bytes.
    fn answer_bytes_mean(&self) -> f64 {
        self.answer_bytes.load(Ordering::Relaxed) as f64 / self.answered().max(1) as f64
    }

    fn answered(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
            + self.renewed.load(Ordering::Relaxed)
            + self.released.load(Ordering::Relaxed)
            + self.denied.load(Ordering::Relaxed)
    }
}

enum Kind {
    Open,
    Renew,
    Release,
}

fn host_address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        200 + (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ))
}

fn free_udp_port() -> std::io::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Writes the CA, the hosts' certificates, the policy and a configuration per server: one
/// gateway per store in `stores` (each on its port, with its own state, admin socket and
/// nftables table) and, with `--baseline`, the bare server's.
fn write_setup(
    dir: &Path,
    args: &Args,
    stores: &[(StoreKind, u16)],
    baseline_port: u16,
    etcd_endpoints: &[String],
) -> Result<(), Box<dyn std::error::Error>> {
    let ca = dir.join("pki");
    pki::init_ca(&ca, "fwnp-load CA", pki::Validity::days(2))?;
    pki::issue_gateway(
        &ca,
        "gateway",
        &["gateway.load".to_owned()],
        &[],
        pki::Validity::days(2),
    )?;
    for i in 0..args.hosts {
        pki::issue_host(
            &ca,
            &format!("load-{i}"),
            &[host_address(i)],
            &[],
            &[],
            pki::Validity::days(2),
        )?;
    }
    let per_host = (args.prefill / args.hosts.max(1) as u64 + 100_000).min(u64::from(u32::MAX));
    let rate_limit = args
        .host_rate_limit
        .map(|n| format!("[rate_limit]\nrequests_per_second = {n}\nburst = {n}\n\n"))
        .unwrap_or_default();
    std::fs::write(
        dir.join("policy.toml"),
        format!(
            "[defaults]\nlifetime = \"1h\"\nmin_lifetime = \"10s\"\nmax_lifetime = \"2h\"\nmax_leases = {per_host}\n\n\
             {rate_limit}[[group]]\nname = \"load\"\nidentities = [\"fwnp://host/load-*\"]\n\n\
             [[rule]]\nname = \"load-any-tcp\"\ngroups = [\"load\"]\nallow = [\"tcp/*\"]\n"
        ),
    )?;
    // Gateways that share a namespace each program a table of their own.
    let filter = |table: &str| {
        if args.netns {
            format!(
                "[filter]\nenabled = true\ntable = \"{table}\"\nprotected = [\"10.200.0.0/14\"]\n"
            )
        } else {
            "[filter]\nenabled = false\n".to_owned()
        }
    };
    // Every simulated host connects from the same address: the gateway's limit of handshakes per
    // source address would refuse most of them. Everything else is the gateway's default, the
    // request streams per connection too: each costs memory on every connection, idle or not.
    let config = |port: u16, stem: &str, filter: &str, store: &str| {
        format!(
            "listen = [\"127.0.0.1:{port}\"]\ncertificate = \"{ca}/gateway.pem\"\nkey = \"{ca}/gateway.key\"\n\
             ca = \"{ca}/ca.pem\"\npolicy = \"{d}/policy.toml\"\nstate_dir = \"{d}/{stem}-state\"\n\
             admin_socket = \"{d}/{stem}-admin.sock\"\n{filter}\n[limits]\n\
             handshakes_per_source_per_second = 1000000\nhandshake_burst_per_source = 1000000\n{store}",
            ca = ca.display(),
            d = dir.display(),
        )
    };
    for (i, (store, port)) in stores.iter().enumerate() {
        let stem = store.stem(i == 0);
        let section = match store {
            StoreKind::Sqlite => String::new(),
            StoreKind::Etcd => format!(
                "\n[store]\nbackend = \"etcd\"\nendpoints = {endpoints:?}\nprefix = \"{ETCD_PREFIX}\"\n\
                 site = \"load\"\n",
                endpoints = etcd_endpoints,
            ),
        };
        let table = match store {
            StoreKind::Sqlite => "fwnp",
            StoreKind::Etcd => "fwnpetcd",
        };
        std::fs::write(
            dir.join(format!("{stem}.toml")),
            config(*port, &stem, &filter(table), &section),
        )?;
    }
    // The baseline reads the same file but for its port and state directory: the same
    // certificates, limits and transport.
    if args.baseline {
        std::fs::write(
            dir.join("baseline.toml"),
            config(baseline_port, "baseline", &filter("fwnpbase"), ""),
        )?;
    }
    Ok(())
}

fn request(kind: &Kind, host: &Host, lease: Option<LeaseId>, lifetime: u32, id: u64) -> Message {
    let common = Common {
        request_id: Some(id),
        critical: Vec::new(),
    };
    match (kind, lease) {
        (Kind::Renew, Some(lease)) => Message::Renew(Renew {
            common,
            lease,
            lifetime: Some(lifetime),
        }),
        (Kind::Release, Some(lease)) => Message::Release(Release { common, lease }),
        _ => {
            let port = 1 + (host.next_port.fetch_add(1, Ordering::Relaxed) % 65_535) as u16;
            Message::Open(Open {
                common,
                opening: Opening {
                    target: Target::Ports {
                        protocol: Protocol::Tcp,
                        ports: PortRange::single(port),
                    },
                    host: fwnp_proto::HostAddresses::One(host.address),
                    family: None,
                    remotes: Vec::new(),
                },
                lifetime: Some(lifetime),
                app: None,
            })
        }
    }
}

async fn exchange(connection: &quinn::Connection, msg: &Message) -> Result<Message, String> {
    exchange_sized(connection, msg)
        .await
        .map(|(answer, _)| answer)
}

/// One request and its answer, with the answer's size in bytes.
async fn exchange_sized(
    connection: &quinn::Connection,
    msg: &Message,
) -> Result<(Message, usize), String> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    // The encoding handed over as it is: `write_all` would copy it into a buffer of its own.
    send.write_chunk(encode(msg).into())
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let bytes = recv
        .read_to_end(fwnp_proto::MAX_MESSAGE_SIZE)
        .await
        .map_err(|e| e.to_string())?;
    decode(&bytes)
        .map(|answer| (answer, bytes.len()))
        .map_err(|e| e.to_string())
}

/// What became of one request.
enum Outcome {
    /// Answered, with how long the host is asked to wait before its next request: a Denied's
    /// retry-after.
    Answered { retry_after: Option<Duration> },
    /// Unanswered, or answered with something that is not a message.
    Failed,
}

impl Outcome {
    fn answered(&self) -> bool {
        matches!(self, Outcome::Answered { .. })
    }
}

/// The wait before retrying a request refused as rate-limited without a retry-after: the first
/// retry delay of the protocol's retry rule.
const RATE_LIMITED_DEFAULT_WAIT: Duration = Duration::from_secs(1);

/// One request of the mix against one host, counted into `counters`.
async fn one(
    host: &Host,
    mix: Mix,
    lifetime: u32,
    counters: &Counters,
    rng: &mut rand::rngs::StdRng,
) -> Outcome {
    counters.count(ask(host, mix, lifetime, rng).await)
}

/// A request's answer as the generator classifies it, and its size in bytes.
enum Answer {
    Granted(usize),
    Renewed(usize),
    Released(usize),
    Denied {
        bytes: usize,
        code: ResultCode,
        retry_after: Option<u32>,
    },
    /// Any other message.
    Other(usize),
    /// Unanswered or undecodable, and why.
    Failed(String),
}

/// One request of the mix against one host, and its answer.
async fn ask(host: &Host, mix: Mix, lifetime: u32, rng: &mut rand::rngs::StdRng) -> Answer {
    let roll = rng.random_range(0..100);
    let kind = if roll < mix.open {
        Kind::Open
    } else if roll < mix.open + mix.renew {
        Kind::Renew
    } else {
        Kind::Release
    };
    let lease = match kind {
        Kind::Open => None,
        Kind::Renew | Kind::Release => {
            let mut held = host.held.lock().unwrap_or_else(|e| e.into_inner());
            if held.is_empty() {
                None
            } else {
                let i = rng.random_range(0..held.len());
                Some(if matches!(kind, Kind::Release) {
                    held.swap_remove(i)
                } else {
                    held[i]
                })
            }
        }
    };
    let kind = if lease.is_none() { Kind::Open } else { kind };
    let msg = request(&kind, host, lease, lifetime, rng.random());
    match exchange_sized(&host.connection, &msg).await {
        Ok((Message::Granted(g), bytes)) => {
            if matches!(kind, Kind::Open) {
                host.held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(g.lease);
                Answer::Granted(bytes)
            } else {
                Answer::Renewed(bytes)
            }
        }
        Ok((Message::Released(_), bytes)) => Answer::Released(bytes),
        Ok((Message::Denied(d), bytes)) => Answer::Denied {
            bytes,
            code: d.code,
            retry_after: d.retry_after,
        },
        Ok((_, bytes)) => Answer::Other(bytes),
        Err(e) => Answer::Failed(e),
    }
}

impl Counters {
    /// Counts a request and its answer, and says whether the host is asked to wait.
    fn count(&self, answer: Answer) -> Outcome {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let (bytes, retry_after) = match answer {
            Answer::Granted(bytes) => {
                self.granted.fetch_add(1, Ordering::Relaxed);
                (bytes, None)
            }
            Answer::Renewed(bytes) => {
                self.renewed.fetch_add(1, Ordering::Relaxed);
                (bytes, None)
            }
            Answer::Released(bytes) => {
                self.released.fetch_add(1, Ordering::Relaxed);
                (bytes, None)
            }
            Answer::Denied {
                bytes,
                code,
                retry_after,
            } => {
                self.denied.fetch_add(1, Ordering::Relaxed);
                let given = retry_after.map(|secs| Duration::from_secs(u64::from(secs)));
                if code == ResultCode::RateLimited {
                    self.rate_limited.fetch_add(1, Ordering::Relaxed);
                    (bytes, Some(given.unwrap_or(RATE_LIMITED_DEFAULT_WAIT)))
                } else {
                    (bytes, given)
                }
            }
            Answer::Other(bytes) => {
                self.denied.fetch_add(1, Ordering::Relaxed);
                (bytes, None)
            }
            Answer::Failed(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut failures) = self.failures.lock() {
                    *failures.entry(e).or_default() += 1;
                }
                return Outcome::Failed;
            }
        };
        self.answer_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Outcome::Answered { retry_after }
    }
}

/// A slot of a closed loop waits `retry_after` before its next request, as a host told to wait
/// does, but not beyond `end`, where its measurement stops.
async fn wait_retry_after(retry_after: Duration, end: Instant, counters: &Counters) {
    let started = Instant::now();
    tokio::time::sleep_until(
        started
            .checked_add(retry_after)
            .unwrap_or(end)
            .min(end)
            .into(),
    )
    .await;
    counters.retry_after_waits.fetch_add(1, Ordering::Relaxed);
    counters
        .retry_after_waited_us
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
}

/// Latency histograms in microseconds, up to a minute: from the scheduled (open loop) or
/// actual (closed loop) start of each request to its answer, how late each request started
/// after its schedule, and from its actual start (open loop only).
#[derive(Clone)]
struct Histograms {
    latency: Arc<std::sync::Mutex<Histogram<u64>>>,
    lateness: Arc<std::sync::Mutex<Histogram<u64>>>,
    from_start: Arc<std::sync::Mutex<Histogram<u64>>>,
}

impl Histograms {
    fn new() -> Result<Self, hdrhistogram::CreationError> {
        let new = || {
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map(|h| Arc::new(std::sync::Mutex::new(h)))
        };
        Ok(Histograms {
            latency: new()?,
            lateness: new()?,
            from_start: new()?,
        })
    }
}

/// The open loop: requests to `hosts` in turn at `rate` per second from `started` to `end`,
/// whatever the answers do, and latency counted from the scheduled time, so a slow gateway
/// cannot hide its queueing. The schedule is kept by a thread of its own sleeping to the
/// microsecond: the runtime's timers tick in whole milliseconds and would add up to one to
/// every request's latency. How late each request still started is measured on its own.
#[allow(clippy::too_many_arguments)]
async fn open_loop(
    hosts: Vec<Arc<Host>>,
    rate: u64,
    started: Instant,
    end: Instant,
    mix: Mix,
    lifetime: u32,
    counters: Arc<Counters>,
    histograms: Histograms,
) -> Result<(), Box<dyn std::error::Error>> {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let runtime = tokio::runtime::Handle::current();
    let dispatcher = std::thread::Builder::new()
        .name("fwnp-load-schedule".into())
        .spawn(move || {
            let mut tasks = Vec::new();
            let mut n: u64 = 0;
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            loop {
                let scheduled = started + interval.mul_f64(n as f64);
                if scheduled >= end {
                    break;
                }
                std::thread::sleep(scheduled.saturating_duration_since(Instant::now()));
                let host = hosts[(n as usize) % hosts.len()].clone();
                let counters = counters.clone();
                let Histograms {
                    latency,
                    lateness,
                    from_start,
                } = histograms.clone();
                let seed = rng.random();
                tasks.push(runtime.spawn(async move {
                    let start = Instant::now();
                    let _ = lateness
                        .lock()
                        .map(|mut h| h.record(start.duration_since(scheduled).as_micros() as u64));
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    if one(&host, mix, lifetime, &counters, &mut rng)
                        .await
                        .answered()
                    {
                        let _ = latency
                            .lock()
                            .map(|mut h| h.record(scheduled.elapsed().as_micros() as u64));
                        let _ = from_start
                            .lock()
                            .map(|mut h| h.record(start.elapsed().as_micros() as u64));
                    }
                }));
                n += 1;
            }
            tasks
        })?;
    let tasks = tokio::task::spawn_blocking(move || dispatcher.join())
        .await?
        .map_err(|_| "the schedule thread panicked")?;
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// Time measured, CPU used, the generator's context switches and the hosts' datagrams, summed
/// over a side's phases.
#[derive(Debug)]
struct Usage {
    secs: f64,
    server_cpu: Option<f64>,
    generator_cpu: Option<f64>,
    /// Voluntary and involuntary: a worker that parks for want of work and wakes again is two.
    generator_context_switches: Option<u64>,
    /// UDP datagrams sent to the server and received from it.
    datagrams: (u64, u64),
}

impl Default for Usage {
    fn default() -> Self {
        Usage {
            secs: 0.0,
            server_cpu: Some(0.0),
            generator_cpu: Some(0.0),
            generator_context_switches: Some(0),
            datagrams: (0, 0),
        }
    }
}

impl Usage {
    /// Cores the server and the generator used on average while measured.
    fn cores(&self) -> (Option<f64>, Option<f64>) {
        let secs = self.secs.max(1e-9);
        (
            self.server_cpu.map(|c| c / secs),
            self.generator_cpu.map(|c| c / secs),
        )
    }

    /// What the generator spent per request sent, and the datagrams each way per answered
    /// request: the same client doing the same work per request should cost the same against
    /// either server, so these say how much of a difference is the client's.
    fn per_request_json(&self, counters: &Counters) -> serde_json::Value {
        let sent = counters.sent.load(Ordering::Relaxed).max(1) as f64;
        let answered = counters.answered().max(1) as f64;
        json!({
            "generator_cpu_us": self.generator_cpu.map(|c| c * 1e6 / sent),
            "generator_context_switches": self.generator_context_switches.map(|n| n as f64 / sent),
            "datagrams_to_server": self.datagrams.0 as f64 / answered,
            "datagrams_from_server": self.datagrams.1 as f64 / answered,
        })
    }
}

/// This process's context switches so far, voluntary and involuntary, over all its threads.
fn context_switches() -> Option<u64> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok()?;
    u64::try_from(usage.voluntary_context_switches() + usage.involuntary_context_switches()).ok()
}

/// One measuring phase: the closed loop (`--concurrency` requests in flight per host) or the
/// open loop (`--rate`) for `duration`.
struct Phase<'a> {
    args: &'a Args,
    mix: Mix,
    duration: Duration,
}

impl Phase<'_> {
    /// Runs the phase against `hosts` (connected to `server`), counting into `counters` and
    /// `histograms` and adding its time and CPU to `usage`.
    async fn run(
        &self,
        server: &Gateway,
        hosts: &[Arc<Host>],
        counters: &Arc<Counters>,
        histograms: &Histograms,
        usage: &mut Usage,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let before = Reading::now(server, hosts);
        let started = before.at;
        let end = started + self.duration;
        let (mix, lifetime) = (self.mix, self.args.lifetime);
        let after = match self.args.rate {
            None => {
                let mut tasks = Vec::new();
                for (h, host) in hosts.iter().enumerate() {
                    for c in 0..self.args.concurrency {
                        let host = host.clone();
                        let counters = counters.clone();
                        let histogram = histograms.latency.clone();
                        tasks.push(tokio::spawn(async move {
                            let mut rng =
                                rand::rngs::StdRng::seed_from_u64((h * 1000 + c) as u64 + 7);
                            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                                .expect("valid bounds");
                            // The slot's own counts, added to the side's at the end: counters
                            // every slot updated at each request moved their cache line
                            // between the cores at each request.
                            let mine = Counters::default();
                            while Instant::now() < end {
                                let t = Instant::now();
                                let outcome = one(&host, mix, lifetime, &mine, &mut rng).await;
                                let answered = Instant::now();
                                if outcome.answered() {
                                    let _ = local.record((answered - t).as_micros() as u64);
                                }
                                if answered > end {
                                    mine.after_end.fetch_add(1, Ordering::Relaxed);
                                }
                                // Outside the latency: the host waits as told.
                                if let Outcome::Answered {
                                    retry_after: Some(wait),
                                } = outcome
                                {
                                    wait_retry_after(wait, end, &mine).await;
                                }
                            }
                            mine.add_to(&counters);
                            let _ = histogram.lock().map(|mut h| h.add(&local));
                        }));
                    }
                }
                // The phase's time, CPU and datagrams are read at its end, while the slots
                // finish the requests they have in flight: a request lost and sent again by
                // QUIC took seconds, and the idle wait for it counted in the phase's time.
                let joined = async {
                    for t in tasks {
                        let _ = t.await;
                    }
                };
                let (at_end, ()) = tokio::join!(
                    async {
                        tokio::time::sleep_until(end.into()).await;
                        Reading::now(server, hosts)
                    },
                    joined
                );
                at_end
            }
            Some(rate) => {
                open_loop(
                    hosts.to_vec(),
                    rate,
                    started,
                    end,
                    mix,
                    lifetime,
                    counters.clone(),
                    histograms.clone(),
                )
                .await?;
                Reading::now(server, hosts)
            }
        };
        usage.add(&before, &after);
        Ok(())
    }
}

/// What a phase's usage is read from, at its start and at its end.
struct Reading {
    at: Instant,
    server_cpu: Option<f64>,
    generator_cpu: Option<f64>,
    context_switches: Option<u64>,
    datagrams: (u64, u64),
}

impl Reading {
    fn now(server: &Gateway, hosts: &[Arc<Host>]) -> Self {
        Reading {
            at: Instant::now(),
            server_cpu: server.cpu_seconds(),
            generator_cpu: cpu_seconds_of("/proc/self/stat"),
            context_switches: context_switches(),
            datagrams: datagrams(hosts),
        }
    }
}

impl Usage {
    /// Adds a phase's usage, between two readings.
    fn add(&mut self, before: &Reading, after: &Reading) {
        self.secs += after.at.duration_since(before.at).as_secs_f64();
        let spent = |after: Option<f64>, before: Option<f64>, sum: Option<f64>| {
            after.zip(before).zip(sum).map(|((a, b), s)| s + (a - b))
        };
        self.server_cpu = spent(after.server_cpu, before.server_cpu, self.server_cpu);
        self.generator_cpu = spent(
            after.generator_cpu,
            before.generator_cpu,
            self.generator_cpu,
        );
        self.generator_context_switches = after
            .context_switches
            .zip(before.context_switches)
            .zip(self.generator_context_switches)
            .map(|((after, before), sum)| sum + after.saturating_sub(before));
        self.datagrams.0 += after.datagrams.0.saturating_sub(before.datagrams.0);
        self.datagrams.1 += after.datagrams.1.saturating_sub(before.datagrams.1);
    }
}

/// The gateway's status (`fwnpctl status --json`, from beside the gateway binary), or `None`
/// when it cannot be had: the report then goes without it.
fn gateway_status(gateway_bin: &Path, admin_socket: &Path) -> Option<serde_json::Value> {
    let output = Command::new(gateway_bin.with_file_name("fwnpctl"))
        .arg("--admin")
        .arg(admin_socket)
        .args(["--json", "status"])
        .output()
        .ok()?;
    serde_json::from_slice(&output.stdout).ok()
}

/// Kernel batches and store transactions between two status snapshots: how many, how many
/// changes or operations each held on average, and the time spent in them.
fn batching(
    before: Option<&serde_json::Value>,
    after: Option<&serde_json::Value>,
) -> serde_json::Value {
    let (Some(before), Some(after)) = (before, after) else {
        return serde_json::Value::Null;
    };
    let delta = |path: &[&str]| {
        let get = |v: &serde_json::Value| {
            path.iter()
                .try_fold(v, |v, k| v.get(k))
                .and_then(serde_json::Value::as_u64)
        };
        get(after)
            .zip(get(before))
            .map(|(a, b)| a.saturating_sub(b))
    };
    let per = |n: Option<u64>, d: Option<u64>| {
        n.zip(d.filter(|d| *d > 0))
            .map(|(n, d)| n as f64 / d as f64)
    };
    let (batches, changes) = (delta(&["filter", "batches"]), delta(&["filter", "changes"]));
    let (transactions, ops) = (
        delta(&["store_writer", "transactions"]),
        delta(&["store_writer", "ops"]),
    );
    let stage = |buckets: &str| {
        let spread = |v: &serde_json::Value| {
            serde_json::from_value::<TimeBuckets>(v.get("request_path")?.get(buckets)?.clone()).ok()
        };
        let quantile = |q: f64| {
            spread(before)
                .zip(spread(after))
                .and_then(|(b, a)| bucket_quantile_us(&b, &a, q))
                .map(|us| us / 1e3)
        };
        json!({"p50": quantile(0.5), "p99": quantile(0.99)})
    };
    json!({
        "kernel_batches": batches,
        "kernel_changes_per_batch": per(changes, batches),
        "kernel_busy_s": delta(&["filter", "batch_time_us"]).map(|us| us as f64 / 1e6),
        "store_transactions": transactions,
        "store_ops_per_transaction": per(ops, transactions),
        "store_busy_s": delta(&["store_writer", "busy_us"]).map(|us| us as f64 / 1e6),
        // Where requests stood in line: the mean wait of each stage over the run, and of a
        // store job in the writer's queue before its transaction began.
        "store_queue_ms_per_job": per(delta(&["store_writer", "queue_wait_us"]), delta(&["store_writer", "jobs"])).map(|us| us / 1e3),
        // The checkpoints that start the WAL over, which every commit waits for: how many in
        // the run, their mean, and the longest since the gateway started.
        "store_wal_restarts": delta(&["store_writer", "wal_restarts"]),
        "store_wal_restart_ms_mean": per(delta(&["store_writer", "wal_restart_us"]), delta(&["store_writer", "wal_restarts"])).map(|us| us / 1e3),
        "store_wal_restart_ms_longest": after.get("store_writer").and_then(|w| w.get("longest_wal_restart_us")).and_then(serde_json::Value::as_u64).map(|us| us as f64 / 1e3),
        "lock_wait_ms_mean": per(delta(&["request_path", "lock_wait_us"]), delta(&["request_path", "lock_waits"])).map(|us| us / 1e3),
        "kernel_wait_ms_mean": per(delta(&["request_path", "kernel_wait_us"]), delta(&["request_path", "kernel_waits"])).map(|us| us / 1e3),
        "store_wait_ms_mean": per(delta(&["request_path", "store_wait_us"]), delta(&["request_path", "store_waits"])).map(|us| us / 1e3),
        // And the tail of each wait, from the gateway's own histograms: which stage the slow
        // requests were slow in, and how much of the generator's latency the gateway's handling
        // of a grant accounts for.
        "stage_quantiles_ms": {
            "lock": stage("lock_wait_buckets"),
            "kernel": stage("kernel_wait_buckets"),
            "store": stage("store_wait_buckets"),
            "grant": stage("grant_latency_buckets"),
        },
    })
}

/// The quantile `q`, in microseconds, of the times a gateway histogram counted between two
/// readings of its cumulative buckets, interpolated linearly within the bucket it falls in, as
/// Prometheus's `histogram_quantile` does; in the unbounded last bucket, its lower bound. `None`
/// if nothing was counted in between or the readings do not match.
fn bucket_quantile_us(before: &TimeBuckets, after: &TimeBuckets, q: f64) -> Option<f64> {
    let bounds = &after.le_us;
    let (b, a) = (&before.counts, &after.counts);
    if before.le_us != *bounds || a.len() != bounds.len() || b.len() != bounds.len() {
        return None;
    }
    let counts: Vec<u64> = a.iter().zip(b).map(|(a, b)| a.saturating_sub(*b)).collect();
    let total = *counts.last()?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let i = counts.iter().position(|&c| c as f64 >= rank)?;
    let (lower, below) = match i {
        0 => (0.0, 0),
        _ => (bounds[i - 1] as f64, counts[i - 1]),
    };
    if bounds[i] == u64::MAX {
        return Some(lower);
    }
    let within = (counts[i] - below) as f64;
    Some(lower + (bounds[i] as f64 - lower) * (rank - below as f64) / within)
}

/// The latency quantiles reported (with the maximum).
const LATENCY_QUANTILES: &[(&str, f64)] =
    &[("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)];

/// The named quantiles and the maximum of a histogram of microseconds, in milliseconds.
fn quantiles_ms(h: &Histogram<u64>, quantiles: &[(&str, f64)]) -> serde_json::Value {
    let ms = |us: u64| json!(us as f64 / 1000.0);
    let mut out: serde_json::Map<String, serde_json::Value> = quantiles
        .iter()
        .map(|(name, q)| (name.to_string(), ms(h.value_at_quantile(*q))))
        .collect();
    out.insert("max".into(), ms(h.max()));
    serde_json::Value::Object(out)
}

/// The hosts' connections that are closed, counted by reason.
fn closed_connections(hosts: &[Arc<Host>]) -> serde_json::Value {
    let mut reasons = std::collections::BTreeMap::<String, u64>::new();
    for host in hosts {
        if let Some(reason) = host.connection.close_reason() {
            *reasons.entry(reason.to_string()).or_default() += 1;
        }
    }
    json!(reasons)
}

/// UDP datagrams sent and received over every host's connection so far.
fn datagrams(hosts: &[Arc<Host>]) -> (u64, u64) {
    hosts.iter().fold((0, 0), |(tx, rx), h| {
        let stats = h.connection.stats();
        (tx + stats.udp_tx.datagrams, rx + stats.udp_rx.datagrams)
    })
}

/// User plus system CPU time of a process, from its `/proc/PID/stat`.
fn cpu_seconds_of(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)?;
    Some((utime + stime) as f64 / ticks as f64)
}

/// Parses a CPU list such as `0`, `0,1` or `0-3` into CPU numbers.
fn parse_cpus(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let bad = || format!("CPU list {text:?}: numbers and ranges such as 0,2-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if b < a {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    Ok(cpus)
}

/// Pins this process (all threads created after the call) to `cpus`.
fn pin_self(cpus: &[usize]) -> Result<(), String> {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| format!("pinning to {cpus:?}: {e}"))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(cpus) = &args.cpus {
        // Before the runtime exists, so that every worker thread inherits the mask.
        if let Err(e) = parse_cpus(cpus).and_then(|c| pin_self(&c)) {
            eprintln!("fwnp-load: --cpus: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    if let Some(cpus) = &args.gateway_cpus
        && let Err(e) = parse_cpus(cpus)
    {
        eprintln!("fwnp-load: --gateway-cpus: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fwnp-load: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fwnp-load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Starts `bin --config CONFIG` (the gateway or the baseline server) in the namespace if there
/// is one, on `--gateway-cpus` with `--gateway-threads`, its standard error to `log`.
fn spawn_server(
    args: &Args,
    namespace: Option<&fwnp_testkit::netns::Netns>,
    bin: &Path,
    config: &Path,
    log: &Path,
) -> Result<Gateway, Box<dyn std::error::Error>> {
    let log = std::fs::File::create(log)?;
    let mut command = match namespace {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name()]);
            c
        }
        None => Command::new("env"),
    };
    // `ip netns exec`, `env` and `taskset` all exec what follows, so the child's pid is the
    // server's own (for its RSS and CPU time).
    if let Some(cpus) = &args.gateway_cpus {
        command.args(["taskset", "-c", cpus]);
    }
    command.arg(bin);
    if let Some(threads) = args.gateway_threads {
        command.env("TOKIO_WORKER_THREADS", threads.max(1).to_string());
    }
    command
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    Ok(Gateway {
        child: command.spawn()?,
    })
}

/// How long one attempt of the first host to connect may take: this bounds how late a
/// restart's ready time can be read.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects host `i` to the server at `addr` and says Hello. The first host retries until
/// `deadline` while the server starts; `log` is named when it never answers.
async fn connect_host(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: SocketAddr,
    i: usize,
    deadline: Instant,
    log: &Path,
) -> Result<Arc<Host>, Box<dyn std::error::Error>> {
    let connection = loop {
        let attempt = async {
            let connection = endpoint
                .connect_with(config.clone(), addr, "gateway.load")?
                .await?;
            let hello = Message::Hello(Hello {
                common: Common::default(),
                versions: vec![fwnp_proto::VERSION],
                capabilities: Capabilities(Capabilities::ALL),
                software: Some("fwnp-load".into()),
            });
            match exchange(&connection, &hello).await? {
                Message::Welcome(_) => Ok::<_, Box<dyn std::error::Error>>(connection),
                other => Err(format!("Hello answered with {other:?}").into()),
            }
        };
        // A handshake sent before the server listens is lost, and QUIC's retransmissions back
        // off (1, 2, 4 ... s) until the idle timeout: without a bound of its own, the first
        // host's attempt made a moment too early would wait 30 s and hide when the server
        // became ready. The others connect to a server that answers, however slowly.
        let attempt = async {
            if i != 0 {
                return attempt.await;
            }
            match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                Ok(result) => result,
                Err(_) => Err(format!("no Welcome within {ATTEMPT_TIMEOUT:?}").into()),
            }
        };
        match attempt.await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                if i == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                return Err(e);
            }
            Err(e) => {
                return Err(format!(
                    "the server did not answer in 30 s: {e} (see {})",
                    log.display()
                )
                .into());
            }
        }
    };
    Ok(Arc::new(Host {
        connection,
        address: host_address(i),
        next_port: AtomicU64::new(0),
        held: std::sync::Mutex::new(Vec::new()),
    }))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mix = parse_mix(&args.mix)?;
    if args.hosts == 0 || args.hosts > 1 << 18 {
        return Err("--hosts: 1 to 262144".into());
    }
    if args.netns && !nix_is_root() {
        return Err("--netns needs root (network namespaces and nftables)".into());
    }
    let stores = args.store.clone();
    if stores.is_empty() || (1..stores.len()).any(|i| stores[..i].contains(&stores[i])) {
        return Err("--store: sqlite, etcd or sqlite,etcd, each store once".into());
    }
    let several_stores = stores.len() > 1;
    if several_stores && (args.idle || args.flood_hosts > 0 || args.prefill > 0) {
        return Err(
            "--store with several stores: not with --idle, --flood-hosts or --prefill".into(),
        );
    }
    let alternating = args.baseline || several_stores;
    if args.phases.is_some() && !alternating {
        return Err("--phases: only with --baseline or several stores".into());
    }
    let phases = args.phases.unwrap_or(2);
    let uses_etcd = stores.contains(&StoreKind::Etcd);
    if uses_etcd {
        etcd_available()?;
    }
    let dir = std::env::temp_dir().join(format!("fwnp-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ports: Vec<(StoreKind, u16)> = stores
        .iter()
        .map(|s| free_udp_port().map(|p| (*s, p)))
        .collect::<Result<_, _>>()?;
    let baseline_port = free_udp_port()?;

    let gateway_bin = match &args.gateway_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("fwnp-gateway"),
    };
    // etcd's members live in a namespace of their own, joined by a link to the gateways': with
    // etcd the gateways have a namespace even without `--netns` (then without their filter).
    let namespace = if args.netns || uses_etcd {
        Some(fwnp_testkit::netns::Netns::new("fwload")?)
    } else {
        None
    };
    let (cluster, etcd_endpoints) = match &namespace {
        Some(ns) if uses_etcd => {
            eprintln!("fwnp-load: starting three etcd members");
            let mut cluster = fwnp_testkit::etcd::EtcdCluster::start("load")?;
            let endpoints = cluster.connect(ns)?;
            (Some(cluster), endpoints)
        }
        _ => (None, Vec::new()),
    };
    eprintln!(
        "fwnp-load: making {} host certificates in {}",
        args.hosts,
        dir.display()
    );
    write_setup(&dir, &args, &ports, baseline_port, &etcd_endpoints)?;
    let mut servers = Vec::new();
    for (i, (store, _)) in ports.iter().enumerate() {
        let stem = store.stem(i == 0);
        servers.push(spawn_server(
            &args,
            namespace.as_ref(),
            &gateway_bin,
            &dir.join(format!("{stem}.toml")),
            &dir.join(format!("{stem}.log")),
        )?);
    }
    let mut servers = servers.into_iter();
    let mut gateway = servers.next().ok_or("no store")?;
    // The baseline server where the gateway runs, on the same CPUs and threads.
    let baseline_server = if args.baseline {
        Some(spawn_server(
            &args,
            namespace.as_ref(),
            &gateway_bin.with_file_name("fwnp-baseline"),
            &dir.join("baseline.toml"),
            &dir.join("baseline.log"),
        )?)
    } else {
        None
    };

    // The client's UDP socket must live where the gateway listens: in its namespace.
    let socket = match &namespace {
        Some(ns) => ns.run(|| UdpSocket::bind("127.0.0.1:0"))?,
        None => UdpSocket::bind("127.0.0.1:0")?,
    };
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let gateway_addr = SocketAddr::from(([127, 0, 0, 1], ports[0].1));
    let ca_dir = dir.join("pki");
    let ca_roots = fwnp_trust::tls::load_ca_certificates(&ca_dir.join("ca.pem"))?;

    // Wait for the gateway to listen, then connect every host.
    let mut hosts = Vec::with_capacity(args.hosts);
    let mut client_configs = Vec::with_capacity(args.hosts);
    let deadline = Instant::now() + Duration::from_secs(30);
    // The gateway's memory once it serves its first host, the base of the memory per connection.
    let mut rss_first = None;
    let connect_started = Instant::now();
    for i in 0..args.hosts {
        let chain = fwnp_trust::tls::load_certificates(&ca_dir.join(format!("load-{i}.pem")))?;
        let key = fwnp_trust::tls::load_private_key(&ca_dir.join(format!("load-{i}.key")))?;
        let config = client_config(chain, key, &ca_roots, &ClientOptions::default())?;
        let log = dir.join("gateway.log");
        hosts.push(connect_host(&endpoint, &config, gateway_addr, i, deadline, &log).await?);
        client_configs.push(config);
        if i == 0 {
            rss_first = gateway.rss_kib();
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    // The same hosts, each with its own connection, to the baseline server and to the gateways
    // on the other stores.
    let mut baseline_hosts = Vec::new();
    if baseline_server.is_some() {
        let addr = SocketAddr::from(([127, 0, 0, 1], baseline_port));
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = dir.join("baseline.log");
        for (i, config) in client_configs.iter().enumerate() {
            baseline_hosts.push(connect_host(&endpoint, config, addr, i, deadline, &log).await?);
        }
    }
    let mut others = Vec::new();
    for ((kind, port), server) in ports[1..].iter().zip(servers) {
        let addr = SocketAddr::from(([127, 0, 0, 1], *port));
        let deadline = Instant::now() + Duration::from_secs(30);
        let stem = kind.stem(false);
        let log = dir.join(format!("{stem}.log"));
        let mut other_hosts = Vec::new();
        for (i, config) in client_configs.iter().enumerate() {
            other_hosts.push(connect_host(&endpoint, config, addr, i, deadline, &log).await?);
        }
        others.push(OtherStore {
            kind: *kind,
            server,
            admin_socket: dir.join(format!("{stem}-admin.sock")),
            hosts: other_hosts,
            counters: Arc::new(Counters::default()),
            histograms: Histograms::new()?,
            usage: Usage::default(),
        });
    }
    let mut ceiling = match (&namespace, uses_etcd) {
        (Some(_), true) => Some(EtcdCeiling::new(
            etcd_endpoints.clone(),
            args.hosts,
            &args.etcd_writers,
        )?),
        _ => None,
    };
    let rss_idle = gateway.rss_kib();
    if args.idle {
        // Idle hosts only keep their connection alive (keep-alive PINGs), as real agents do.
        tokio::time::sleep(args.duration).await;
        let rss_held = gateway.rss_kib();
        let alive = hosts
            .iter()
            .filter(|h| h.connection.close_reason().is_none())
            .count();
        let others = args.hosts.saturating_sub(1).max(1) as f64;
        let per_connection = |rss: Option<u64>| {
            rss.zip(rss_first)
                .map(|(a, b)| a.saturating_sub(b) as f64 / others)
        };
        let report = json!({
            "mode": "idle",
            "hosts": args.hosts,
            "kernel_filter": args.netns,
            "connect_s": connect_secs,
            "held_s": args.duration.as_secs_f64(),
            "connections_alive_at_end": alive,
            "connections_closed": closed_connections(&hosts),
            "gateway_rss_kib": { "first_host": rss_first, "all_connected": rss_idle, "end": rss_held },
            // (RSS with every host connected - RSS with the first one) / (hosts - 1).
            "gateway_kib_per_connection": { "all_connected": per_connection(rss_idle), "end": per_connection(rss_held) },
            "load_average": load_average(),
        });
        print_report(&args, &report)?;
        drop(gateway);
        drop(namespace);
        if !args.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(());
    }

    // Prefill: opens only, as fast as the gateway takes them.
    let prefill_started = Instant::now();
    if args.prefill > 0 {
        let counters = Arc::new(Counters::default());
        let remaining = Arc::new(AtomicU64::new(args.prefill));
        let mut tasks = Vec::new();
        for (h, host) in hosts.iter().enumerate() {
            for c in 0..args.concurrency {
                let host = host.clone();
                let counters = counters.clone();
                let remaining = remaining.clone();
                let lifetime = args.lifetime;
                tasks.push(tokio::spawn(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64((h * 1000 + c) as u64);
                    let only_open = Mix {
                        open: 100,
                        renew: 0,
                    };
                    while remaining
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
                        .is_ok()
                    {
                        match one(&host, only_open, lifetime, &counters, &mut rng).await {
                            Outcome::Answered {
                                retry_after: Some(wait),
                            } => {
                                let end = Instant::now()
                                    .checked_add(wait)
                                    .unwrap_or_else(Instant::now);
                                wait_retry_after(wait, end, &counters).await;
                            }
                            Outcome::Answered { retry_after: None } => {}
                            Outcome::Failed => break,
                        }
                    }
                }));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        let secs = prefill_started.elapsed().as_secs_f64();
        eprintln!(
            "fwnp-load: prefill: {} granted in {secs:.1} s ({:.0}/s), {} denied, {} failed",
            counters.granted.load(Ordering::Relaxed),
            counters.granted.load(Ordering::Relaxed) as f64 / secs,
            counters.denied.load(Ordering::Relaxed),
            counters.failed.load(Ordering::Relaxed),
        );
    }
    let prefill_secs = prefill_started.elapsed().as_secs_f64();
    let rss_after_prefill = gateway.rss_kib();

    if args.restart {
        let stop_started = Instant::now();
        gateway.stop(Duration::from_secs(120))?;
        let stop_secs = stop_started.elapsed().as_secs_f64();
        let load_before = load_average();
        let restarted = Instant::now();
        gateway = spawn_server(
            &args,
            namespace.as_ref(),
            &gateway_bin,
            &dir.join("gateway.toml"),
            &dir.join("gateway-restarted.log"),
        )?;
        let log = dir.join("gateway-restarted.log");
        let deadline = Instant::now() + Duration::from_secs(300);
        let host = connect_host(
            &endpoint,
            &client_configs[0],
            gateway_addr,
            0,
            deadline,
            &log,
        )
        .await?;
        let ready_secs = restarted.elapsed().as_secs_f64();
        let rss_restarted = gateway.rss_kib();
        // A lease of the prefill, renewed through the restarted gateway: it was restored.
        let lease = hosts[0]
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .copied();
        let renewed = match lease {
            Some(lease) => {
                let renew = request(&Kind::Renew, &host, Some(lease), args.lifetime, 1);
                matches!(exchange(&host.connection, &renew).await, Ok(Message::Granted(g)) if g.lease == lease)
            }
            None => false,
        };
        // Memory the restore freed may be handed back to the system some time after it is
        // freed: measured again later, with no request in between, to tell the two apart.
        let mut rss_later = serde_json::Map::new();
        let mut later = args.restart_later.clone();
        later.sort_unstable();
        for after in later {
            let at = restarted + Duration::from_secs_f64(ready_secs) + Duration::from_secs(after);
            tokio::time::sleep_until(at.into()).await;
            rss_later.insert(format!("{after}s"), json!(gateway.rss_kib()));
        }
        let report = json!({
            "mode": "restart",
            "hosts": args.hosts,
            "kernel_filter": args.netns,
            "prefill": { "leases": args.prefill, "seconds": prefill_secs, "grants_per_s": args.prefill as f64 / prefill_secs.max(1e-9) },
            "restart": {
                "stop_s": stop_secs,
                // From the new process's start to its Welcome to the first host.
                "ready_s": ready_secs,
                "prefilled_lease_renewed": renewed,
                "load_average_at_start": load_before,
            },
            "gateway_rss_kib": { "idle": rss_idle, "after_prefill": rss_after_prefill, "after_restart": rss_restarted, "after_restart_later": rss_later },
            "load_average": load_average(),
        });
        eprintln!(
            "fwnp-load: restart: ready in {ready_secs:.2} s (load {})",
            load_before.as_deref().unwrap_or("?")
        );
        print_report(&args, &report)?;
        drop(gateway);
        drop(namespace);
        if !args.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(());
    }

    // Flood isolation: first the other hosts alone at the offered rate, as the reference.
    let flood_hosts = args.flood_hosts.min(args.hosts.saturating_sub(1));
    let (flooders, steady) = hosts.split_at(flood_hosts);
    let flood_baseline = match args.rate {
        Some(rate) if flood_hosts > 0 => {
            let counters = Arc::new(Counters::default());
            let histograms = Histograms::new()?;
            let started = Instant::now();
            open_loop(
                steady.to_vec(),
                rate,
                started,
                started + args.duration,
                mix,
                args.lifetime,
                counters.clone(),
                histograms.clone(),
            )
            .await?;
            Some((counters, histograms))
        }
        _ => None,
    };

    // Measurement.
    let counters = Arc::new(Counters::default());
    let histograms = Histograms::new()?;
    let Histograms {
        latency: histogram,
        lateness,
        from_start,
    } = histograms.clone();
    let datagrams_before = datagrams(&hosts);
    let status_before = gateway_status(&gateway_bin, &dir.join("gateway-admin.sock"));
    let end = Instant::now() + args.duration;
    let mut tasks = Vec::new();
    // The flooding hosts: as fast as answers come, rate-limited or not, until the end.
    let flood_counters = Arc::new(Counters::default());
    for (h, host) in flooders.iter().enumerate() {
        for c in 0..args.concurrency {
            let host = host.clone();
            let counters = flood_counters.clone();
            let lifetime = args.lifetime;
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64((h * 1000 + c) as u64 + 11);
                while Instant::now() < end {
                    one(&host, mix, lifetime, &counters, &mut rng).await;
                }
            }));
        }
    }
    // FWNP alone, or alternating with the baseline (baseline first) in phases of equal length.
    let mut usage = Usage::default();
    let baseline_counters = Arc::new(Counters::default());
    let baseline_histograms = Histograms::new()?;
    let mut baseline_usage = Usage::default();
    let other_status_before: Vec<_> = others
        .iter()
        .map(|o| gateway_status(&gateway_bin, &o.admin_socket))
        .collect();
    if alternating {
        // Each side in turn (the baseline first, then each store, then etcd alone), in phases
        // of equal length.
        let phase = Phase {
            args: &args,
            mix,
            duration: args.duration / phases,
        };
        for _ in 0..phases {
            if let Some(server) = &baseline_server {
                phase
                    .run(
                        server,
                        &baseline_hosts,
                        &baseline_counters,
                        &baseline_histograms,
                        &mut baseline_usage,
                    )
                    .await?;
            }
            phase
                .run(&gateway, &hosts, &counters, &histograms, &mut usage)
                .await?;
            for other in &mut others {
                phase
                    .run(
                        &other.server,
                        &other.hosts,
                        &other.counters,
                        &other.histograms,
                        &mut other.usage,
                    )
                    .await?;
            }
            if let (Some(ceiling), Some(ns)) = (&mut ceiling, &namespace) {
                ceiling.measure(ns, phase.duration)?;
            }
        }
    } else {
        let phase = Phase {
            args: &args,
            mix,
            duration: args.duration,
        };
        phase
            .run(&gateway, steady, &counters, &histograms, &mut usage)
            .await?;
        if let (Some(ceiling), Some(ns)) = (&mut ceiling, &namespace) {
            ceiling.measure(ns, args.duration)?;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = usage.secs.max(1e-9);
    let datagrams_after = datagrams(&hosts);
    let status_after = gateway_status(&gateway_bin, &dir.join("gateway-admin.sock"));
    let other_status_after: Vec<_> = others
        .iter()
        .map(|o| gateway_status(&gateway_bin, &o.admin_socket))
        .collect();
    let rss_end = gateway.rss_kib();
    // Cores used while measuring: how much of the machine each side took.
    let (gateway_cores, load_cores) = usage.cores();
    let snapshot = |m: &std::sync::Mutex<Histogram<u64>>| {
        m.lock()
            .map(|h| h.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    };
    let answered = counters.answered();
    let p99 = |h: &Histogram<u64>| h.value_at_quantile(0.99) as f64 / 1000.0;
    let flood = flood_baseline.map(|(baseline, baseline_histograms)| {
        let without = snapshot(&baseline_histograms.latency);
        let with = snapshot(&histogram);
        json!({
            "flood_hosts": flood_hosts,
            "requests_in_flight_per_flood_host": args.concurrency,
            // The other hosts at the offered rate: first alone, then beside the flood, as long.
            "others_without_flood": {
                "answered": baseline.answered(),
                "failed": baseline.failed.load(Ordering::Relaxed),
                "failures_by_reason": baseline.failures_json(),
                "rate_limited": baseline.rate_limited.load(Ordering::Relaxed),
                "latency_ms": quantiles_ms(&without, &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]),
            },
            "others_with_flood": {
                "answered": answered,
                "failed": counters.failed.load(Ordering::Relaxed),
                "rate_limited": counters.rate_limited.load(Ordering::Relaxed),
                "latency_ms": quantiles_ms(&with, &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]),
            },
            "others_p99_with_over_without": p99(&with) / p99(&without).max(1e-3),
            "flood": {
                "sent": flood_counters.sent.load(Ordering::Relaxed),
                "answered_per_s": flood_counters.answered() as f64 / secs,
                "rate_limited": flood_counters.rate_limited.load(Ordering::Relaxed),
                "failed": flood_counters.failed.load(Ordering::Relaxed),
                "failures_by_reason": flood_counters.failures_json(),
            },
        })
    });
    // With --baseline: the bare QUIC server, measured in the phases between FWNP's, and FWNP's
    // figures over its.
    let (baseline, fwnp_over_baseline) = if baseline_server.is_some() {
        let baseline_secs = baseline_usage.secs.max(1e-9);
        let baseline_latency = snapshot(&baseline_histograms.latency);
        let fwnp_latency = snapshot(&histogram);
        let (server_cores, generator_cores) = baseline_usage.cores();
        let baseline_rate = baseline_counters.answered() as f64 / baseline_secs;
        let ratio = |q: f64| {
            fwnp_latency.value_at_quantile(q) as f64
                / baseline_latency.value_at_quantile(q).max(1) as f64
        };
        (
            json!({
                "phases": phases,
                "duration_s": baseline_secs,
                "sent": baseline_counters.sent.load(Ordering::Relaxed),
                "answered_per_s": baseline_rate,
                "answered_after_end": baseline_counters.after_end.load(Ordering::Relaxed),
                "failed": baseline_counters.failed.load(Ordering::Relaxed),
                "answer_bytes_mean": baseline_counters.answer_bytes_mean(),
                "failures_by_reason": baseline_counters.failures_json(),
                "latency_ms": quantiles_ms(&baseline_latency, LATENCY_QUANTILES),
                "cpu_cores_used": { "server": server_cores, "generator": generator_cores },
                // UDP datagrams each way per answered request, as the hosts' QUIC stacks
                // counted them in the baseline's phases.
                "datagrams_per_request": {
                    "to_server": baseline_usage.datagrams.0 as f64 / baseline_counters.answered().max(1) as f64,
                    "from_server": baseline_usage.datagrams.1 as f64 / baseline_counters.answered().max(1) as f64,
                },
                "per_request": baseline_usage.per_request_json(&baseline_counters),
            }),
            json!({
                "answered_per_s": answered as f64 / secs / baseline_rate.max(1e-9),
                "p50": ratio(0.5),
                "p90": ratio(0.9),
                "p99": ratio(0.99),
                "max": fwnp_latency.max() as f64 / baseline_latency.max().max(1) as f64,
            }),
        )
    } else {
        (serde_json::Value::Null, serde_json::Value::Null)
    };
    // Every store's gateway, the first as the figures above give it, each beside the
    // baseline when there is one; then each other store's figures over the first's.
    let baseline_side = baseline_server.is_some().then(|| {
        (
            baseline_counters.answered() as f64 / baseline_usage.secs.max(1e-9),
            snapshot(&baseline_histograms.latency),
        )
    });
    let first_latency = snapshot(&histogram);
    let first = StoreSide {
        kind: stores[0],
        counters: &counters,
        latency: &first_latency,
        usage: &usage,
        status: (status_before.as_ref(), status_after.as_ref()),
    };
    let mut store_sides = serde_json::Map::new();
    let mut store_ratios = serde_json::Map::new();
    store_sides.insert(stores[0].name().into(), first.json(baseline_side.as_ref()));
    for (i, other) in others.iter().enumerate() {
        let latency = snapshot(&other.histograms.latency);
        let side = StoreSide {
            kind: other.kind,
            counters: &other.counters,
            latency: &latency,
            usage: &other.usage,
            status: (
                other_status_before[i].as_ref(),
                other_status_after[i].as_ref(),
            ),
        };
        store_sides.insert(other.kind.name().into(), side.json(baseline_side.as_ref()));
        store_ratios.insert(
            format!("{}_over_{}", other.kind.name(), stores[0].name()),
            side.over(&first),
        );
    }
    // What the etcd cluster holds at the end: the gateway's grants went through it.
    let etcd_keys = match (&namespace, uses_etcd) {
        (Some(ns), true) => Some(etcd_key_counts(ns, &etcd_endpoints)?),
        _ => None,
    };
    let report = json!({
        "mode": if args.rate.is_some() { "open-loop" } else { "closed-loop" },
        "target_rate": args.rate,
        "hosts": args.hosts,
        "concurrency_per_host": args.concurrency,
        "kernel_filter": args.netns,
        "duration_s": secs,
        "sent": counters.sent.load(Ordering::Relaxed),
        "answered_per_s": answered as f64 / secs,
        "grants_per_s": counters.granted.load(Ordering::Relaxed) as f64 / secs,
        "granted": counters.granted.load(Ordering::Relaxed),
        "renewed": counters.renewed.load(Ordering::Relaxed),
        "released": counters.released.load(Ordering::Relaxed),
        "denied": counters.denied.load(Ordering::Relaxed),
        "rate_limited": counters.rate_limited.load(Ordering::Relaxed),
        // The closed loop's waits for a Denied's retry-after (a slot waits at most until the
        // end of its phase), outside the latency.
        "retry_after": counters.retry_after_json(),
        // Closed loop: requests in flight at the end of a phase, answered after its time and
        // CPU were read (counted with it: at most the slots' number per phase).
        "answered_after_end": counters.after_end.load(Ordering::Relaxed),
        "failed": counters.failed.load(Ordering::Relaxed),
        "failures_by_reason": counters.failures_json(),
        "answer_bytes_mean": counters.answer_bytes_mean(),
        // Hosts whose connection the gateway or QUIC closed, by reason, at the end.
        "connections_closed": closed_connections(&hosts),
        "latency_ms": quantiles_ms(&snapshot(&histogram), LATENCY_QUANTILES),
        // Open loop only: how long after its scheduled time each request started, which the
        // latency includes; the generator's share, not the gateway's.
        "schedule_lateness_ms": args.rate.map(|_| quantiles_ms(&snapshot(&lateness), &[("p50", 0.5), ("p99", 0.99)])),
        // Open loop only, for diagnosis: latency counted from when each request actually
        // started rather than from its schedule, so without the generator's own lateness. The
        // figure to quote is `latency_ms`.
        "latency_from_start_ms": args.rate.map(|_| quantiles_ms(&snapshot(&from_start), &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)])),
        "prefill": { "leases": args.prefill, "seconds": prefill_secs, "grants_per_s": args.prefill as f64 / prefill_secs.max(1e-9) },
        "cpu_cores_used": { "gateway": gateway_cores, "generator": load_cores },
        // The generator's CPU and context switches per request, and the datagrams per request
        // of the measured hosts (the flood's aside), as the baseline reports them.
        "per_request": usage.per_request_json(&counters),
        "pinning": { "gateway_cpus": args.gateway_cpus, "generator_cpus": args.cpus },
        "threads": { "gateway": args.gateway_threads, "generator": args.threads },
        "load_average": load_average(),
        "flood_isolation": flood,
        // With --baseline: the ceiling, from the same run, and FWNP over it (rate: the higher
        // the better, at most about 1; latency: the lower the better, at least about 1).
        "baseline": baseline,
        "fwnp_over_baseline": fwnp_over_baseline,
        // The store of the figures above, every store measured (each in the same phases) and
        // each other store's figures over the first's (rates: the higher the better).
        "store": stores[0].name(),
        "stores": store_sides,
        "store_ratios": store_ratios,
        // With etcd: the cluster's own write ceiling in the same phases, and the keys it holds
        // at the end.
        "etcd_ceiling": ceiling.as_ref().map(EtcdCeiling::json),
        "etcd_keys_at_end": etcd_keys,
        "gateway_rss_kib": { "idle": rss_idle, "after_prefill": rss_after_prefill, "end": rss_end },
        // How the gateway batched while measuring, from its status before and after.
        "gateway_batching": batching(status_before.as_ref(), status_after.as_ref()),
        // UDP datagrams each way per answered request, as the hosts' QUIC stacks counted them.
        "datagrams_per_request": {
            "to_gateway": (datagrams_after.0 - datagrams_before.0) as f64 / answered.max(1) as f64,
            "from_gateway": (datagrams_after.1 - datagrams_before.1) as f64 / answered.max(1) as f64,
        },
    });
    print_report(&args, &report)?;
    if alternating || uses_etcd {
        print_comparison(&report);
    }
    drop(baseline_server);
    drop(gateway);
    drop(others);
    drop(cluster);
    drop(namespace);
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// The sides beside each other on standard error, for the eye (the report has it all): the
/// baseline, each store's gateway, etcd alone, and the ratios.
fn print_comparison(report: &serde_json::Value) {
    let line = |name: &str, side: &serde_json::Value| {
        let ms = |q: &str| side["latency_ms"][q].as_f64().unwrap_or(f64::NAN);
        let per = |k: &str| side["per_request"][k].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "fwnp-load: {name:<12} {:>9.0} answers/s   p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   max {:.3} ms   \
             per request: datagrams {:.2} to, {:.2} from; generator {:.2} us CPU, {:.3} context switches",
            side["answered_per_s"].as_f64().unwrap_or(f64::NAN),
            ms("p50"),
            ms("p90"),
            ms("p99"),
            ms("max"),
            per("datagrams_to_server"),
            per("datagrams_from_server"),
            per("generator_cpu_us"),
            per("generator_context_switches"),
        );
    };
    if !report["baseline"].is_null() {
        line("baseline", &report["baseline"]);
    }
    let stores = report["stores"].as_object().cloned().unwrap_or_default();
    for (name, side) in &stores {
        line(&format!("FWNP {name}"), side);
    }
    if let Some(levels) = report["etcd_ceiling"]["levels"].as_array() {
        for level in levels {
            let ms = |q: &str| {
                level["transaction_latency_ms"][q]
                    .as_f64()
                    .unwrap_or(f64::NAN)
            };
            let reads = if level["reads_before_each"] == 0 {
                ""
            } else {
                ", each after 2 reads"
            };
            eprintln!(
                "fwnp-load: etcd alone, {} transaction(s) of {} in flight{reads}: {:>7.0} lease puts/s   p50 {:.3} ms   p99 {:.3} ms",
                level["transactions_in_flight"],
                report["etcd_ceiling"]["lease_puts_per_transaction"],
                level["lease_puts_per_s"].as_f64().unwrap_or(f64::NAN),
                ms("p50"),
                ms("p99"),
            );
        }
    }
    for (name, side) in &stores {
        let ratio = &side["over_baseline"];
        if ratio.is_null() {
            continue;
        }
        let r = |k: &str| ratio[k].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "fwnp-load: FWNP {name}/baseline: rate {:.2}x   p50 {:.2}x   p90 {:.2}x   p99 {:.2}x   max {:.2}x",
            r("answered_per_s"),
            r("p50"),
            r("p90"),
            r("p99"),
            r("max"),
        );
    }
    for (name, ratio) in report["store_ratios"].as_object().into_iter().flatten() {
        let r = |k: &str| ratio[k].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "fwnp-load: {name}: grants {:.2}x   answers {:.2}x   p50 {:.2}x   p99 {:.2}x   max {:.2}x",
            r("grants_per_s"),
            r("answered_per_s"),
            r("p50"),
            r("p99"),
            r("max"),
        );
    }
}

/// A gateway on another store than the first, measured in the same phases.
struct OtherStore {
    kind: StoreKind,
    server: Gateway,
    admin_socket: PathBuf,
    hosts: Vec<Arc<Host>>,
    counters: Arc<Counters>,
    histograms: Histograms,
    usage: Usage,
}

/// One store's gateway as measured, for the report.
struct StoreSide<'a> {
    kind: StoreKind,
    counters: &'a Counters,
    latency: &'a Histogram<u64>,
    usage: &'a Usage,
    /// Its status before and after the measurement.
    status: (Option<&'a serde_json::Value>, Option<&'a serde_json::Value>),
}

impl StoreSide<'_> {
    fn answered_per_s(&self) -> f64 {
        self.counters.answered() as f64 / self.usage.secs.max(1e-9)
    }

    fn grants_per_s(&self) -> f64 {
        self.counters.granted.load(Ordering::Relaxed) as f64 / self.usage.secs.max(1e-9)
    }

    /// Its figures, and over the baseline's (rate, latency histogram) when there is one.
    fn json(&self, baseline: Option<&(f64, Histogram<u64>)>) -> serde_json::Value {
        let (gateway_cores, generator_cores) = self.usage.cores();
        let over_baseline = baseline.map(|(rate, latency)| {
            let ratio = |q: f64| {
                self.latency.value_at_quantile(q) as f64
                    / latency.value_at_quantile(q).max(1) as f64
            };
            json!({
                "answered_per_s": self.answered_per_s() / rate.max(1e-9),
                "p50": ratio(0.5),
                "p90": ratio(0.9),
                "p99": ratio(0.99),
                "max": self.latency.max() as f64 / latency.max().max(1) as f64,
            })
        });
        json!({
            "store": self.kind.name(),
            "duration_s": self.usage.secs,
            "sent": self.counters.sent.load(Ordering::Relaxed),
            "answered_per_s": self.answered_per_s(),
            "grants_per_s": self.grants_per_s(),
            "granted": self.counters.granted.load(Ordering::Relaxed),
            "renewed": self.counters.renewed.load(Ordering::Relaxed),
            "released": self.counters.released.load(Ordering::Relaxed),
            "denied": self.counters.denied.load(Ordering::Relaxed),
            "rate_limited": self.counters.rate_limited.load(Ordering::Relaxed),
            "retry_after": self.counters.retry_after_json(),
            "answered_after_end": self.counters.after_end.load(Ordering::Relaxed),
            "failed": self.counters.failed.load(Ordering::Relaxed),
            "failures_by_reason": self.counters.failures_json(),
            "latency_ms": quantiles_ms(self.latency, LATENCY_QUANTILES),
            "cpu_cores_used": { "gateway": gateway_cores, "generator": generator_cores },
            "per_request": self.usage.per_request_json(self.counters),
            "gateway_batching": batching(self.status.0, self.status.1),
            "over_baseline": over_baseline,
        })
    }

    /// Its figures over `other`'s.
    fn over(&self, other: &StoreSide<'_>) -> serde_json::Value {
        let ratio = |q: f64| {
            self.latency.value_at_quantile(q) as f64
                / other.latency.value_at_quantile(q).max(1) as f64
        };
        json!({
            "grants_per_s": self.grants_per_s() / other.grants_per_s().max(1e-9),
            "answered_per_s": self.answered_per_s() / other.answered_per_s().max(1e-9),
            "p50": ratio(0.5),
            "p90": ratio(0.9),
            "p99": ratio(0.99),
            "max": self.latency.max() as f64 / other.latency.max().max(1) as f64,
        })
    }
}

/// Whether etcd's members can be started here: root for their namespace, and `etcd` installed.
fn etcd_available() -> Result<(), String> {
    if !nix_is_root() {
        return Err("--store etcd needs root: the etcd members run in a network namespace".into());
    }
    let runs = |tool: &str, arg: &str| {
        Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if runs("etcd", "--version") && runs("etcdctl", "version") {
        Ok(())
    } else {
        Err(
            "--store etcd needs etcd and etcdctl (Debian's etcd-server and etcd-client, which \
             scripts/deps.sh installs)"
                .into(),
        )
    }
}

/// Runs `f` with an etcd client on a thread inside `ns` (its connections are made there), on a
/// runtime of that thread's own.
fn with_etcd<T, F, Fut>(
    ns: &fwnp_testkit::netns::Netns,
    endpoints: &[String],
    f: F,
) -> Result<T, String>
where
    T: Send,
    F: FnOnce(etcd_client::Client) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    tokio::task::block_in_place(|| {
        ns.run(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("etcd client runtime: {e}"))?;
            runtime.block_on(async {
                let client = etcd_client::Client::connect(endpoints, None)
                    .await
                    .map_err(|e| format!("etcd at {endpoints:?}: {e}"))?;
                f(client).await
            })
        })
    })
}

/// How many lease keys and host counter keys the gateway's prefix holds in etcd.
fn etcd_key_counts(
    ns: &fwnp_testkit::netns::Netns,
    endpoints: &[String],
) -> Result<serde_json::Value, String> {
    with_etcd(ns, endpoints, |client| async move {
        let mut counts = serde_json::Map::new();
        for what in ["leases", "hosts"] {
            let count = client
                .kv_client()
                .get(
                    format!("{ETCD_PREFIX}/{what}/"),
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only(),
                    ),
                )
                .await
                .map_err(|e| format!("counting etcd's {what} keys: {e}"))?
                .count();
            counts.insert(what.into(), json!(count));
        }
        Ok(serde_json::Value::Object(counts))
    })
}

/// The gateway's group commit, in full batches of opens, to etcd alone: transactions of
/// [`CEILING_BATCH`] lease keys, each written only while absent (the insert's comparison), with
/// the bytes of a lease the gateway wrote in this run, and a counter key for each distinct host
/// among them, as the gateway writes them. Closed loop, a given number of transactions in
/// flight, without the gateway's reads before each transaction; and once more with them, one
/// transaction at a time as the gateway commits (its lease keys read in one round trip, then
/// its hosts' counters in another), which is the most a gateway's one store writer can get.
struct EtcdCeiling {
    endpoints: Vec<String>,
    hosts: usize,
    levels: Vec<CeilingLevel>,
    /// The next lease number: every key written is new.
    next: Arc<AtomicU64>,
    /// A lease's value as the gateway wrote it (the first one read), and whether it was one.
    value: Option<(Arc<Vec<u8>>, bool)>,
}

/// Lease keys per transaction of the etcd-alone writer: a full batch of the gateway's.
const CEILING_BATCH: u64 = 48;

/// A value the size of a load host's lease, for when the gateway has written none to copy.
const CEILING_FALLBACK_VALUE: usize = 160;

/// The etcd-alone writer's figures at one number of transactions in flight.
struct CeilingLevel {
    in_flight: u32,
    /// Whether each transaction comes after the gateway's two reads (their time included).
    reads_before: bool,
    secs: f64,
    transactions: u64,
    failures: std::collections::BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

impl EtcdCeiling {
    fn new(
        endpoints: Vec<String>,
        hosts: usize,
        in_flight: &[u32],
    ) -> Result<Self, hdrhistogram::CreationError> {
        let levels = in_flight
            .iter()
            .map(|&n| (n, false))
            .chain([(1, true)])
            .map(|(n, reads_before)| {
                Ok(CeilingLevel {
                    in_flight: n,
                    reads_before,
                    secs: 0.0,
                    transactions: 0,
                    failures: Default::default(),
                    latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
                })
            })
            .collect::<Result<_, hdrhistogram::CreationError>>()?;
        Ok(EtcdCeiling {
            endpoints,
            hosts: hosts.max(1),
            levels,
            next: Arc::new(AtomicU64::new(0)),
            value: None,
        })
    }

    /// Measures every level for its share of `duration`, from inside `ns` (where the gateways
    /// reach etcd, over the same link).
    fn measure(
        &mut self,
        ns: &fwnp_testkit::netns::Netns,
        duration: Duration,
    ) -> Result<(), String> {
        let share = duration / self.levels.len().max(1) as u32;
        let endpoints = self.endpoints.clone();
        let (hosts, next) = (self.hosts as u64, self.next.clone());
        let known = self.value.clone();
        let levels = &mut self.levels;
        let value = with_etcd(ns, &endpoints, |client| async move {
            let value = match known {
                Some(value) => value,
                None => {
                    let mut kv = client.kv_client();
                    let sample = kv
                        .get(
                            format!("{ETCD_PREFIX}/leases/"),
                            Some(etcd_client::GetOptions::new().with_prefix().with_limit(1)),
                        )
                        .await
                        .map_err(|e| format!("reading a lease from etcd: {e}"))?;
                    match sample.kvs().first() {
                        Some(kv) => (Arc::new(kv.value().to_vec()), true),
                        None => (Arc::new(vec![0xa5; CEILING_FALLBACK_VALUE]), false),
                    }
                }
            };
            for level in levels.iter_mut() {
                let started = Instant::now();
                let end = started + share;
                let mut writers = Vec::new();
                for _ in 0..level.in_flight {
                    let kv = client.kv_client();
                    let (value, next) = (value.0.clone(), next.clone());
                    writers.push(tokio::spawn(ceiling_writer(
                        kv,
                        value,
                        next,
                        hosts,
                        level.reads_before,
                        end,
                    )));
                }
                for writer in writers {
                    let (transactions, failures, latency) =
                        writer.await.map_err(|e| format!("etcd writer: {e}"))?;
                    level.transactions += transactions;
                    for (reason, n) in failures {
                        *level.failures.entry(reason).or_default() += n;
                    }
                    level
                        .latency
                        .add(&latency)
                        .map_err(|e| format!("etcd writer's histogram: {e}"))?;
                }
                level.secs += started.elapsed().as_secs_f64();
            }
            Ok(value)
        })?;
        self.value = Some(value);
        Ok(())
    }

    fn json(&self) -> serde_json::Value {
        let levels: Vec<serde_json::Value> = self
            .levels
            .iter()
            .map(|level| {
                let secs = level.secs.max(1e-9);
                json!({
                    "transactions_in_flight": level.in_flight,
                    "reads_before_each": if level.reads_before { 2 } else { 0 },
                    "duration_s": level.secs,
                    "transactions": level.transactions,
                    "transactions_per_s": level.transactions as f64 / secs,
                    "lease_puts_per_s": (level.transactions * CEILING_BATCH) as f64 / secs,
                    "failures_by_reason": level.failures,
                    "transaction_latency_ms": quantiles_ms(&level.latency, LATENCY_QUANTILES),
                })
            })
            .collect();
        json!({
            "lease_puts_per_transaction": CEILING_BATCH,
            "host_counter_puts_per_transaction": (self.hosts as u64).min(CEILING_BATCH),
            "value_bytes": self.value.as_ref().map(|(v, _)| v.len()),
            "value_is_a_gateway_lease": self.value.as_ref().map(|(_, real)| *real),
            "levels": levels,
        })
    }
}

/// One etcd-alone writer: transactions one after the other until `end`, each after the
/// gateway's reads of its keys when `reads_before`; how many committed, the failures by reason,
/// and their latencies (with the reads) in microseconds.
async fn ceiling_writer(
    mut kv: etcd_client::KvClient,
    value: Arc<Vec<u8>>,
    next: Arc<AtomicU64>,
    hosts: u64,
    reads_before: bool,
    end: Instant,
) -> (u64, std::collections::BTreeMap<String, u64>, Histogram<u64>) {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut failures = std::collections::BTreeMap::<String, u64>::new();
    let mut committed = 0;
    while Instant::now() < end {
        let first = next.fetch_add(CEILING_BATCH, Ordering::Relaxed);
        let mut compares = Vec::with_capacity(CEILING_BATCH as usize);
        let mut writes = Vec::with_capacity(2 * CEILING_BATCH as usize);
        let mut counters = std::collections::BTreeSet::new();
        let mut lease_reads = Vec::new();
        let mut counter_reads = Vec::new();
        for n in first..first + CEILING_BATCH {
            // The gateway's key: a lease id of 16 bytes in hex.
            let key = format!("{ETCD_CEILING_PREFIX}/leases/{:032x}", u128::from(n));
            compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
            lease_reads.push(TxnOp::get(key.clone(), None));
            writes.push(TxnOp::put(key, value.as_slice(), None));
            counters.insert(n % hosts);
        }
        for host in counters {
            let key = format!("{ETCD_CEILING_PREFIX}/hosts/fwnp://host/load-{host}");
            counter_reads.push(TxnOp::get(key.clone(), None));
            writes.push(TxnOp::put(key, (first / hosts + 1).to_string(), None));
        }
        let started = Instant::now();
        if reads_before {
            let mut read = async |reads: Vec<TxnOp>| kv.txn(Txn::new().and_then(reads)).await;
            if let Err(e) = read(lease_reads).await {
                *failures.entry(e.to_string()).or_default() += 1;
                continue;
            }
            if let Err(e) = read(counter_reads).await {
                *failures.entry(e.to_string()).or_default() += 1;
                continue;
            }
        }
        match kv.txn(Txn::new().when(compares).and_then(writes)).await {
            Ok(response) if response.succeeded() => {
                committed += 1;
                let _ = latency.record(started.elapsed().as_micros() as u64);
            }
            Ok(_) => *failures.entry("comparison failed".into()).or_default() += 1,
            Err(e) => *failures.entry(e.to_string()).or_default() += 1,
        }
    }
    (committed, failures, latency)
}

fn print_report(args: &Args, report: &serde_json::Value) -> Result<(), serde_json::Error> {
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

/// The machine's load average over 1, 5 and 15 minutes: figures measured on a busy machine
/// say so.
fn load_average() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn nix_is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[cfg(test)]
mod tests {
    use super::{TimeBuckets, bucket_quantile_us};

    #[test]
    fn a_quantile_is_read_from_the_buckets_counted_between_two_readings() {
        let le_us = vec![100, 200, 400, u64::MAX];
        let before = TimeBuckets {
            le_us: le_us.clone(),
            counts: vec![10, 10, 10, 10],
        };
        // In between: 50 at most 100 µs, 40 more at most 200, 9 at most 400, one beyond.
        let after = TimeBuckets {
            le_us,
            counts: vec![60, 100, 109, 110],
        };
        assert_eq!(bucket_quantile_us(&before, &after, 0.5), Some(100.0));
        // The 90th of 100 is the last of the second bucket, the 99th the last of the third; the
        // 95th is the fifth of the third's nine, five ninths of the way through it.
        assert_eq!(bucket_quantile_us(&before, &after, 0.9), Some(200.0));
        assert_eq!(bucket_quantile_us(&before, &after, 0.99), Some(400.0));
        let p95 = bucket_quantile_us(&before, &after, 0.95).expect("p95");
        assert!((p95 - (200.0 + 200.0 * 5.0 / 9.0)).abs() < 1e-9, "{p95}");
        // The last one lies beyond every bound: the last bound is all that is known.
        assert_eq!(bucket_quantile_us(&before, &after, 1.0), Some(400.0));
        // Nothing counted in between, or readings of other bounds: no quantile.
        assert_eq!(bucket_quantile_us(&after, &after, 0.5), None);
        let other = TimeBuckets {
            le_us: vec![100, u64::MAX],
            counts: vec![0, 0],
        };
        assert_eq!(bucket_quantile_us(&other, &after, 0.5), None);
    }
}
