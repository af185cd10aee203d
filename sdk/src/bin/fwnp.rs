//! `fwnp`: ask the host's FWNP agent for inbound openings from the shell, for programs that do
//! not link the SDK. `fwnp open tcp/8080 -- CMD` holds the opening exactly as long as CMD runs.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, Subcommand, ValueEnum};
use fwnp_sdk::{
    AgentStatus, Client, Error, Family, Grant, Lease, LeaseEvent, LeaseId, LeaseSummary, Opening,
};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

/// Exit status: success.
const EXIT_OK: u8 = 0;
/// Exit status: the agent or the gateway refused.
const EXIT_DENIED: u8 = 1;
/// Exit status: bad usage (clap's own code for argument errors).
const EXIT_USAGE: u8 = 2;
/// Exit status: the agent's socket cannot be reached.
const EXIT_AGENT_UNAVAILABLE: u8 = 3;
/// Exit status: the agent cannot reach the gateway.
const EXIT_GATEWAY_UNREACHABLE: u8 = 4;
/// Exit status: the conversation with the agent failed (connection lost, bad answer, timeout).
const EXIT_AGENT_FAILED: u8 = 5;
/// Exit status: the lease ended (revoked, expired, lost) while `fwnp open` held it without a
/// command.
const EXIT_LEASE_ENDED: u8 = 6;
/// Exit status: the command could not be run (as a shell reports it).
const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit status: the command was not found (as a shell reports it).
const EXIT_NOT_FOUND: u8 = 127;

/// How long a command that must stop gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

const AFTER_HELP: &str = "\
How it works:
  The host agent (fwnp-agent) asks the gateway for the opening, mirrors it in this host's
  firewall once granted, and renews it for as long as this command holds it. When fwnp
  releases the lease, or exits in any way (its connection to the agent closes), the opening
  is closed on the gateway and on the host. If the agent goes away instead (killed,
  restarted), the opening stays until its expiry and fwnp asks the agent for it again as soon
  as the agent is back, which keeps it open.

Exit status:
  0    success
  1    refused by the agent or the gateway (the reason is printed)
  2    bad usage, or an opening that breaks the protocol's rules (port 0, bad prefix...)
  3    the agent's socket cannot be reached (is fwnp-agent running? see --socket)
  4    the agent cannot reach the gateway (for `status`: the agent is not connected)
  5    the conversation with the agent failed (connection lost, bad answer, timeout)
  6    `fwnp open` without a command: the lease ended (revoked, expired, lost)
  N    `fwnp open ... -- CMD`: CMD's own exit status; 128+S if CMD died of signal S;
       126 if CMD could not be executed, 127 if it was not found. A CMD that exits with 0
       before the grant gives the Open's outcome instead (1 if it was refused)

Environment:
  FWNP_AGENT_SOCKET   the agent's socket (default /run/fwnp/agent.sock); --socket wins

Examples:
  fwnp open tcp/8080 -- python3 -m http.server 8080
  fwnp open tcp/8443 --for 10m --from 198.51.100.0/24 --name demo
  fwnp open --app https -- nginx -g 'daemon off;'
  fwnp leases
  fwnp status --json";

/// Ask the host's FWNP agent for inbound openings of this host's firewall and the gateway's.
#[derive(Debug, Parser)]
#[command(name = "fwnp", version, after_help = AFTER_HELP)]
struct Cli {
    /// The agent's socket [default: $FWNP_AGENT_SOCKET, else /run/fwnp/agent.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open a port (or an application) and hold it while CMD runs, or until interrupted
    #[command(after_help = OPEN_HELP)]
    Open(Box<OpenArgs>),
    /// List the live leases the agent reports, with their time left
    Leases {
        /// Print JSON for machines instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Release a lease by its id (the agent allows this for leases of this connection only)
    Release {
        /// The lease id: 32 hexadecimal digits, as `fwnp leases` shows it
        #[arg(value_name = "ID", value_parser = parse_lease_id)]
        id: LeaseId,
    },
    /// Show the agent's state: its gateway, connection, epoch, mirror mode and identity
    Status {
        /// Print JSON for machines
        #[arg(long)]
        json: bool,
    },
}

const OPEN_HELP: &str = "\
With CMD: CMD starts at once, while the opening is asked for (so that it can bind the port:
the agent may check that the port belongs to the asking process or its children). If the
request is refused, CMD is stopped (SIGTERM) and fwnp exits 1. Once granted, the lease is held
while CMD runs and released when CMD exits; fwnp exits with CMD's status. SIGTERM and SIGHUP
sent to fwnp are passed on to CMD; SIGINT is not (Ctrl-C in a terminal reaches CMD directly).
Lease events (renewed, revoked...) are reported on stderr. If the lease ends while CMD runs
(revoked by the gateway, expired), fwnp reports it and by default lets CMD run on (the port is
closed); --on-end stop sends CMD a SIGTERM instead.

Without CMD: the lease is printed on stdout once granted, held until SIGINT or SIGTERM, then
released; fwnp exits 0, or 6 if the lease ends before (revoked, expired, lost).

Without --address the opening covers every address of the host, IPv4 and IPv6, in one lease;
--family 4 or 6 keeps one family, and --address (repeatable) names the addresses to open.

Examples:
  fwnp open tcp/8080 -- ./server --port 8080
  fwnp open tcp/8080 --family 6 -- ./server --port 8080
  fwnp open tcp/8443 --address 192.0.2.10 --address 2001:db8::10
  fwnp open udp/60000-60010 --for 1h
  fwnp open tcp/22 --from 198.51.100.0/24 --from 2001:db8::/32 --address 2001:db8::10
  fwnp open --app https --on-end stop -- caddy run";

#[derive(Debug, clap::Args)]
struct OpenArgs {
    /// What to open: PROTOCOL/PORT or PROTOCOL/FIRST-LAST (tcp, udp, sctp, udplite)
    #[arg(value_name = "PROTOCOL/PORT", required_unless_present = "app", conflicts_with = "app",
          value_parser = parse_opening)]
    spec: Option<Opening>,

    /// Open an application from the gateway's catalogue instead (such as https)
    #[arg(long, value_name = "ID")]
    app: Option<String>,

    /// Lifetime to ask for, such as 90s, 10m, 2h [default: the gateway's policy]; the agent
    /// renews the lease while it is held
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    lifetime: Option<Duration>,

    /// Only this remote prefix may connect (repeatable), such as 198.51.100.0/24
    #[arg(long = "from", value_name = "PREFIX")]
    from: Vec<String>,

    /// A host address to open (repeatable, at most 16) [default: every address of the host,
    /// both families]
    #[arg(long, value_name = "IP")]
    address: Vec<IpAddr>,

    /// Open only the host's addresses of this family: 4 (IPv4) or 6 (IPv6)
    #[arg(long, value_name = "4|6", value_parser = parse_family)]
    family: Option<Family>,

    /// Application name for the gateway's audit trail [default: CMD's name]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// What to do with CMD when the lease ends while CMD runs
    #[arg(long, value_enum, default_value_t = OnEnd::Report)]
    on_end: OnEnd,

    /// Start CMD only once the opening is granted (the default starts it at once)
    #[arg(long)]
    after_grant: bool,

    /// Print the lease as JSON on stdout (without CMD)
    #[arg(long)]
    json: bool,

    /// The command to run while the opening is held, after `--`
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// What `fwnp open -- CMD` does when the lease ends before CMD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnEnd {
    /// Report it on stderr and let CMD run on
    Report,
    /// Report it and send CMD a SIGTERM
    Stop,
}

fn parse_opening(text: &str) -> Result<Opening, String> {
    text.parse::<Opening>().map_err(|e| e.to_string())
}

fn parse_family(text: &str) -> Result<Family, String> {
    match text {
        "4" | "ipv4" => Ok(Family::Ipv4),
        "6" | "ipv6" => Ok(Family::Ipv6),
        _ => Err("a family is 4 (IPv4) or 6 (IPv6)".to_owned()),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    fwnp_proto::duration::parse_argument(text)
        .map_err(|e| format!("{e} (examples: 90s, 10m, 2h, 1h30m)"))
}

fn parse_lease_id(text: &str) -> Result<LeaseId, String> {
    text.parse::<LeaseId>().map_err(|e| e.to_string())
}

impl OpenArgs {
    fn opening(&self) -> Opening {
        let mut opening = match (&self.spec, &self.app) {
            (Some(spec), _) => spec.clone(),
            (None, Some(app)) => Opening::app(app.clone()),
            // clap requires one of them.
            (None, None) => Opening::tcp(0),
        };
        for prefix in &self.from {
            opening = opening.from(prefix.as_str());
        }
        if let Some(lifetime) = self.lifetime {
            opening = opening.lifetime(lifetime);
        }
        opening = opening.addresses(self.address.iter().copied());
        if let Some(family) = self.family {
            opening = opening.family(family);
        }
        let name = self.name.clone().or_else(|| {
            self.command.first().map(|cmd| {
                std::path::Path::new(cmd)
                    .file_name()
                    .map_or_else(|| cmd.clone(), |n| n.to_string_lossy().into_owned())
            })
        });
        if let Some(name) = name {
            opening = opening.name(name);
        }
        opening
    }
}

/// The exit status that tells what went wrong.
fn exit_code(error: &Error) -> u8 {
    match error {
        Error::InvalidOpening(_) => EXIT_USAGE,
        Error::AgentUnavailable { .. } => EXIT_AGENT_UNAVAILABLE,
        Error::GatewayUnreachable { .. } => EXIT_GATEWAY_UNREACHABLE,
        e if e.is_denied() => EXIT_DENIED,
        _ => EXIT_AGENT_FAILED,
    }
}

/// A child's status as a shell reports it: its code, or 128 + the signal that killed it.
fn status_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from((128 + signal) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

fn fail(error: &Error) -> u8 {
    eprintln!("fwnp: {error}");
    exit_code(error)
}

fn grants_text(grants: &[Grant]) -> String {
    grants
        .iter()
        .map(Grant::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn grant_json(grant: &Grant) -> serde_json::Value {
    json!({
        "protocol": grant.protocol.name(),
        "first_port": grant.ports.first,
        "last_port": grant.ports.last,
        "host": grant.host.to_string(),
        "remotes": grant.remotes.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "app": grant.app,
    })
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `1h02m`, `4m05s`, `12s`: time left for people.
fn time_left(d: Duration) -> String {
    let secs = d.as_secs();
    match (secs / 3600, secs % 3600 / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

fn print_lease(lease: &Lease, json: bool) {
    if json {
        let value = json!({
            "id": lease.id().to_string(),
            "grants": lease.grants().iter().map(grant_json).collect::<Vec<_>>(),
            "lifetime_secs": lease.lifetime().as_secs(),
            "expires_at_unix_ms": unix_ms(lease.gateway_expires()),
            "epoch": format!("{:016x}", lease.epoch()),
            "narrowed": lease.narrowed(),
        });
        println!("{value}");
    } else {
        println!(
            "lease {}: {} for {}{} (renewed by the agent while held)",
            lease.id(),
            grants_text(lease.grants()),
            time_left(lease.lifetime()),
            if lease.narrowed() {
                ", narrowed by policy"
            } else {
                ""
            },
        );
    }
}

async fn connect(socket: &Option<PathBuf>) -> Result<Client, Error> {
    match socket {
        Some(path) => Client::connect_to(path).await,
        None => Client::connect().await,
    }
}

/// Signals `fwnp open` handles itself.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Received {
    Interrupt,
    Terminate,
    Hangup,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> Received {
        tokio::select! {
            _ = self.interrupt.recv() => Received::Interrupt,
            _ = self.terminate.recv() => Received::Terminate,
            _ = self.hangup.recv() => Received::Hangup,
        }
    }
}

fn send_signal(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return; // Already reaped.
    };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`]; returns CMD's status.
async fn stop_child(child: &mut tokio::process::Child) -> u8 {
    send_signal(child, nix::sys::signal::Signal::SIGTERM);
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(status)) => status_code(status),
        _ => {
            let _ = child.start_kill();
            child.wait().await.map_or(1, status_code)
        }
    }
}

async fn release(lease: Lease) {
    let id = lease.id();
    if let Err(e) = lease.release().await {
        // Closing the connection, as fwnp does next, makes the agent release it anyway.
        eprintln!("fwnp: releasing lease {id}: {e}");
    }
}

fn report(lease_id: LeaseId, event: &LeaseEvent) {
    eprintln!("fwnp: lease {lease_id}: {event}");
}

async fn open(socket: &Option<PathBuf>, args: OpenArgs) -> u8 {
    let opening = args.opening();
    if let Err(e) = opening.check() {
        eprintln!("fwnp: invalid opening {opening}: {e}");
        return EXIT_USAGE;
    }
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fwnp: cannot handle signals: {e}");
            return EXIT_AGENT_FAILED;
        }
    };
    let client = match connect(socket).await {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    if args.command.is_empty() {
        return hold(client, socket, opening, args.json, &mut signals).await;
    }
    run_command(client, socket, opening, &args, &mut signals).await
}

/// A [`reattach`] under way.
type Reattaching<'a> = std::pin::Pin<Box<dyn Future<Output = Option<(Client, Lease)>> + 'a>>;

/// How often `fwnp open` looks for a restarted agent after losing its own.
const REATTACH_INTERVAL: Duration = Duration::from_millis(250);

/// After the agent went away (killed, restarted): the lease is no longer held by anyone, but its
/// opening stays in both kernels until its expiry. Until then, connect to the agent again as
/// soon as it is back and ask for the same opening: a restarted agent gives the lease of its
/// earlier run back to whoever asks for it again within its grace period, so the opening never
/// closes. `None` once the lease has expired with no agent to ask.
async fn reattach(
    socket: &Option<PathBuf>,
    opening: &Opening,
    lease_id: LeaseId,
    expires: Instant,
) -> Option<(Client, Lease)> {
    eprintln!(
        "fwnp: lease {lease_id}: the host agent went away; the opening stays until its expiry in \
         {} (nobody renews it meanwhile); asking again as soon as the agent is back",
        time_left(expires.saturating_duration_since(Instant::now()))
    );
    while Instant::now() < expires {
        if let Ok(client) = connect(socket).await
            && let Ok(lease) = client.open(opening.clone()).await
        {
            eprintln!(
                "fwnp: re-attached to the host agent: lease {}: {} for {}",
                lease.id(),
                grants_text(lease.grants()),
                time_left(lease.lifetime())
            );
            return Some((client, lease));
        }
        tokio::time::sleep(REATTACH_INTERVAL).await;
    }
    eprintln!("fwnp: lease {lease_id}: expired with no host agent to renew it");
    None
}

/// `fwnp open` without CMD: hold until SIGINT or SIGTERM.
async fn hold(
    mut client: Client,
    socket: &Option<PathBuf>,
    opening: Opening,
    json: bool,
    signals: &mut Signals,
) -> u8 {
    let mut lease = tokio::select! {
        result = client.open(opening.clone()) => match result {
            Ok(lease) => lease,
            Err(e) => return fail(&e),
        },
        // Interrupted while waiting: nothing held yet (a late grant is released by the SDK
        // when the connection closes).
        _ = signals.recv() => return EXIT_OK,
    };
    print_lease(&lease, json);
    loop {
        tokio::select! {
            received = signals.recv() => {
                if received == Received::Hangup {
                    continue;
                }
                release(lease).await;
                return EXIT_OK;
            }
            event = lease.next_event() => match event {
                Some(LeaseEvent::Disconnected) => {
                    let attached = tokio::select! {
                        attached = reattach(socket, &opening, lease.id(), lease.expires()) => attached,
                        _ = signals.recv() => return EXIT_OK,
                    };
                    match attached {
                        Some((new_client, new_lease)) => {
                            (client, lease) = (new_client, new_lease);
                        }
                        None => return EXIT_LEASE_ENDED,
                    }
                }
                Some(event) => {
                    report(lease.id(), &event);
                    if event.is_terminal() {
                        return EXIT_LEASE_ENDED;
                    }
                }
                None => return EXIT_LEASE_ENDED,
            },
        }
        // The client the lease came from must live as long as the lease.
        let _ = &client;
    }
}

fn spawn(command: &[String]) -> Result<tokio::process::Child, u8> {
    let (program, args) = command.split_first().ok_or(EXIT_USAGE)?;
    tokio::process::Command::new(program)
        .args(args)
        .spawn()
        .map_err(|e| {
            eprintln!("fwnp: cannot run {program}: {e}");
            match e.kind() {
                std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_EXECUTE,
            }
        })
}

/// Passes SIGTERM and SIGHUP on to CMD; SIGINT reaches CMD from the terminal by itself.
fn forward(child: &tokio::process::Child, received: Received) {
    match received {
        Received::Terminate => send_signal(child, nix::sys::signal::Signal::SIGTERM),
        Received::Hangup => send_signal(child, nix::sys::signal::Signal::SIGHUP),
        Received::Interrupt => {}
    }
}

/// `fwnp open ... -- CMD`.
async fn run_command(
    client: Client,
    socket: &Option<PathBuf>,
    opening: Opening,
    args: &OpenArgs,
    signals: &mut Signals,
) -> u8 {
    let mut early_child = None;
    if !args.after_grant {
        match spawn(&args.command) {
            Ok(child) => early_child = Some(child),
            Err(code) => return code,
        }
    }
    let request = client.open(opening.clone());
    tokio::pin!(request);
    let lease = loop {
        let child_exit = async {
            match early_child.as_mut() {
                Some(child) => child.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut request => match result {
                Ok(lease) => break lease,
                Err(e) => {
                    let code = fail(&e);
                    if let Some(child) = early_child.as_mut() {
                        eprintln!("fwnp: stopping {} (no opening)", args.command[0]);
                        stop_child(child).await;
                    }
                    return code;
                }
            },
            status = child_exit => {
                eprintln!("fwnp: {} exited before the opening was granted", args.command[0]);
                let code = status.map_or(EXIT_AGENT_FAILED, status_code);
                if code != EXIT_OK {
                    return code;
                }
                // CMD succeeded, but a success must not hide that nothing was opened: the
                // answer to the Open decides (a grant that comes now is released at once).
                return match (&mut request).await {
                    Ok(lease) => {
                        release(lease).await;
                        EXIT_OK
                    }
                    Err(e) => fail(&e),
                };
            }
            received = signals.recv() => {
                match early_child.as_ref() {
                    Some(child) => forward(child, received),
                    None if received != Received::Hangup => return EXIT_OK,
                    None => {}
                }
            }
        }
    };
    let lease_id = lease.id();
    eprintln!(
        "fwnp: lease {lease_id}: {} for {}, held while {} runs",
        grants_text(lease.grants()),
        time_left(lease.lifetime()),
        args.command[0]
    );
    let mut child = match early_child {
        Some(child) => child,
        None => match spawn(&args.command) {
            Ok(child) => child,
            Err(code) => {
                release(lease).await;
                return code;
            }
        },
    };
    let mut lease = Some(lease);
    let mut lease_id = lease_id;
    // The connection to a restarted agent, which holds the lease asked for again.
    let mut reattached_client: Option<Client> = None;
    // Set while looking for a restarted agent (see `reattach`); CMD runs on meanwhile.
    let mut reattaching: Option<Reattaching<'_>> = None;
    loop {
        let event = async {
            match lease.as_mut() {
                Some(lease) => lease.next_event().await,
                None => std::future::pending().await,
            }
        };
        let attached = async {
            match reattaching.as_mut() {
                Some(attempt) => attempt.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => {
                let code = status.map_or(EXIT_AGENT_FAILED, status_code);
                if let Some(lease) = lease.take() {
                    release(lease).await;
                }
                return code;
            }
            received = signals.recv() => forward(&child, received),
            attached = attached => {
                reattaching = None;
                match attached {
                    Some((new_client, new_lease)) => {
                        lease_id = new_lease.id();
                        reattached_client = Some(new_client);
                        lease = Some(new_lease);
                    }
                    None => {
                        if args.on_end == OnEnd::Stop {
                            eprintln!("fwnp: stopping {} (--on-end stop)", args.command[0]);
                            send_signal(&child, nix::sys::signal::Signal::SIGTERM);
                        }
                    }
                }
            }
            event = event => match event {
                Some(LeaseEvent::Disconnected) => {
                    if let Some(gone) = lease.take() {
                        reattaching = Some(Box::pin(reattach(
                            socket,
                            &opening,
                            gone.id(),
                            gone.expires(),
                        )));
                    }
                }
                Some(event) => {
                    report(lease_id, &event);
                    if event.is_terminal() && args.on_end == OnEnd::Stop {
                        eprintln!("fwnp: stopping {} (--on-end stop)", args.command[0]);
                        send_signal(&child, nix::sys::signal::Signal::SIGTERM);
                    }
                }
                // The lease is over and reported; keep waiting for CMD.
                None => lease = None,
            },
        }
        // The client the lease came from must live as long as the lease.
        let _ = (&client, &reattached_client);
    }
}
async fn leases(socket: &Option<PathBuf>, json: bool) -> u8 {
    let client = match connect(socket).await {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    let leases = match client.leases().await {
        Ok(leases) => leases,
        Err(e) => return fail(&e),
    };
    if json {
        let list: Vec<serde_json::Value> = leases.iter().map(summary_json).collect();
        println!("{}", serde_json::Value::Array(list));
        return EXIT_OK;
    }
    if leases.is_empty() {
        println!("no live leases");
        return EXIT_OK;
    }
    println!("{:<32}  {:>9}  {:<40}  APP", "ID", "TIME LEFT", "OPENING");
    for lease in &leases {
        // The agent records the application's command line, which can be long.
        let app = lease
            .app
            .as_ref()
            .map(|a| {
                let name: String = a.name.as_deref().unwrap_or("-").chars().take(60).collect();
                a.pid
                    .map_or(name.clone(), |pid| format!("pid {pid} {name}"))
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<32}  {:>9}  {:<40}  {}",
            lease.id.to_string(),
            time_left(lease.remaining),
            grants_text(&lease.grants),
            app
        );
    }
    EXIT_OK
}

fn summary_json(lease: &LeaseSummary) -> serde_json::Value {
    json!({
        "id": lease.id.to_string(),
        "grants": lease.grants.iter().map(grant_json).collect::<Vec<_>>(),
        "remaining_secs": lease.remaining.as_secs(),
        "expires_at_unix_ms": unix_ms(lease.expires_at),
        "app": lease.app.as_ref().map(|a| json!({
            "name": a.name, "executable": a.executable, "uid": a.uid, "pid": a.pid,
        })),
    })
}

fn status_json(status: &AgentStatus) -> serde_json::Value {
    json!({
        "agent_version": status.agent_version,
        "gateway": status.gateway,
        "connected": status.connected,
        "epoch": status.epoch.map(|e| format!("{e:016x}")),
        "mirror_mode": status.mirror_mode,
        "identity": status.identity,
        "leases": status.leases,
        "last_error": status.last_error,
        "api_version": status.api_version,
    })
}

async fn status(socket: &Option<PathBuf>, json: bool) -> u8 {
    let client = match connect(socket).await {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    let started = Instant::now();
    let status = match client.status().await {
        Ok(status) => status,
        Err(e) => return fail(&e),
    };
    if json {
        println!("{}", status_json(&status));
    } else {
        println!(
            "agent:     {} at {} (answered in {} ms)",
            status.agent_version,
            client.socket_path().display(),
            started.elapsed().as_millis()
        );
        match (status.connected, &status.last_error) {
            (true, _) => println!("gateway:   {} (connected)", status.gateway),
            (false, Some(why)) => {
                println!("gateway:   {} (NOT connected: {why})", status.gateway)
            }
            (false, None) => println!("gateway:   {} (NOT connected)", status.gateway),
        }
        println!(
            "epoch:     {}",
            status
                .epoch
                .map_or_else(|| "unknown".to_owned(), |e| format!("{e:016x}"))
        );
        println!("mirror:    {}", status.mirror_mode);
        println!(
            "identity:  {}",
            status.identity.as_deref().unwrap_or("unknown")
        );
        println!("leases:    {}", status.leases);
        println!("local API: version {}", status.api_version);
    }
    if status.connected {
        EXIT_OK
    } else {
        EXIT_GATEWAY_UNREACHABLE
    }
}

async fn release_by_id(socket: &Option<PathBuf>, id: LeaseId) -> u8 {
    let client = match connect(socket).await {
        Ok(client) => client,
        Err(e) => return fail(&e),
    };
    match client.release(id).await {
        Ok(()) => {
            println!("released {id}");
            EXIT_OK
        }
        Err(e) => {
            let code = fail(&e);
            if e.code()
                == Some(fwnp_sdk::DenialCode::Local(
                    fwnp_sdk::LocalCode::UnknownLocalLease,
                ))
            {
                eprintln!(
                    "fwnp: a lease is released by the program that holds it; stop that program \
                     (its leases are released when it exits), or ask the operator \
                     (fwnpctl revoke {id})"
                );
            }
            code
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Open(args) => open(&cli.socket, *args).await,
        Command::Leases { json } => leases(&cli.socket, json).await,
        Command::Release { id } => release_by_id(&cli.socket, id).await,
        Command::Status { json } => status(&cli.socket, json).await,
    };
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("fwnp").chain(args.iter().copied()))
    }

    fn open_args(args: &[&str]) -> OpenArgs {
        match parse(args).unwrap().command {
            Command::Open(open) => *open,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn open_with_options_and_command() {
        let args = open_args(&[
            "open",
            "tcp/8080",
            "--for",
            "10m",
            "--from",
            "198.51.100.0/24",
            "--from",
            "203.0.113.0/24",
            "--",
            "/usr/bin/python3",
            "-m",
            "http.server",
        ]);
        assert_eq!(args.lifetime, Some(Duration::from_secs(600)));
        assert_eq!(args.command, ["/usr/bin/python3", "-m", "http.server"]);
        let opening = args.opening();
        assert_eq!(
            opening,
            Opening::tcp(8080)
                .from("198.51.100.0/24")
                .from("203.0.113.0/24")
                .lifetime(Duration::from_secs(600))
                .name("python3")
        );
        assert!(opening.check().is_ok());
        assert_eq!(args.on_end, OnEnd::Report);
        assert!(!args.after_grant);
    }

    #[test]
    fn open_an_application() {
        let args = open_args(&[
            "open", "--app", "https", "--on-end", "stop", "--name", "web",
        ]);
        assert_eq!(args.opening(), Opening::app("https").name("web"));
        assert_eq!(args.on_end, OnEnd::Stop);
        // CMD-less: no default name.
        assert_eq!(open_args(&["open", "udp/53"]).opening(), Opening::udp(53));
    }

    #[test]
    fn open_several_addresses_or_one_family() {
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        let args = open_args(&[
            "open",
            "tcp/8443",
            "--address",
            "192.0.2.10",
            "--address",
            "2001:db8::10",
        ]);
        assert_eq!(args.opening(), Opening::tcp(8443).address(v4).address(v6));
        assert!(args.opening().check().is_ok());
        let args = open_args(&["open", "tcp/8080", "--family", "6"]);
        assert_eq!(args.opening(), Opening::tcp(8080).family(Family::Ipv6));
        let args = open_args(&[
            "open",
            "tcp/8080",
            "--family",
            "4",
            "--address",
            "192.0.2.10",
        ]);
        assert_eq!(
            args.opening(),
            Opening::tcp(8080).address(v4).family(Family::Ipv4)
        );
        // The same address twice is caught before the agent is asked.
        let twice = open_args(&[
            "open",
            "tcp/80",
            "--address",
            "192.0.2.10",
            "--address",
            "192.0.2.10",
        ]);
        assert!(twice.opening().check().is_err());
    }

    #[test]
    fn open_usage_errors() {
        // Neither an opening nor --app; both; a bad spec; a bad duration; a bad address.
        for bad in [
            &["open"][..],
            &["open", "tcp/80", "--app", "https"],
            &["open", "icmp/1"],
            &["open", "tcp/80", "--for", "ten minutes"],
            &["open", "tcp/80", "--address", "host.example"],
            &["open", "tcp/80", "--family", "5"],
            &["open", "tcp/80", "--on-end", "explode"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), i32::from(EXIT_USAGE), "{bad:?}");
        }
        // A well-formed spec that breaks a rule is caught by the check, before the agent.
        assert!(open_args(&["open", "tcp/0"]).opening().check().is_err());
        assert!(
            open_args(&["open", "tcp/80", "--from", "10.0.0.1/8"])
                .opening()
                .check()
                .is_err()
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn other_commands() {
        assert!(matches!(
            parse(&["leases", "--json"]).unwrap().command,
            Command::Leases { json: true }
        ));
        assert!(matches!(
            parse(&["status"]).unwrap().command,
            Command::Status { json: false }
        ));
        let cli = parse(&[
            "--socket",
            "/tmp/a.sock",
            "release",
            "00112233445566778899aabbccddeeff",
        ])
        .unwrap();
        assert_eq!(cli.socket, Some(PathBuf::from("/tmp/a.sock")));
        assert!(matches!(cli.command, Command::Release { id } if id.0[1] == 0x11));
        assert!(parse(&["release", "xyz"]).is_err());
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let help = Cli::try_parse_from(["fwnp", "--help"])
            .unwrap_err()
            .to_string();
        for line in ["3    the agent's socket", "128+S", "FWNP_AGENT_SOCKET"] {
            assert!(help.contains(line), "{line} missing from --help");
        }
    }

    #[test]
    fn errors_map_to_exit_codes() {
        use fwnp_sdk::{DenialCode, ResultCode};
        let unavailable = Error::AgentUnavailable {
            path: "/x".into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        assert_eq!(exit_code(&unavailable), EXIT_AGENT_UNAVAILABLE);
        assert_eq!(
            exit_code(&Error::GatewayUnreachable { reason: None }),
            EXIT_GATEWAY_UNREACHABLE
        );
        assert_eq!(
            exit_code(&Error::DeniedByPolicy { reason: None }),
            EXIT_DENIED
        );
        assert_eq!(
            exit_code(&Error::PortNotOwned { reason: None }),
            EXIT_DENIED
        );
        assert_eq!(
            exit_code(&Error::Denied {
                code: DenialCode::Wire(ResultCode::UnknownApplication),
                reason: None,
                retry_after: None,
                lease: None
            }),
            EXIT_DENIED
        );
        assert_eq!(exit_code(&Error::Closed), EXIT_AGENT_FAILED);
        assert_eq!(
            exit_code(&Error::InvalidOpening(
                "tcp".parse::<Opening>().unwrap_err()
            )),
            EXIT_USAGE
        );
    }

    #[test]
    fn child_status_as_a_shell_reports_it() {
        assert_eq!(status_code(ExitStatus::from_raw(7 << 8)), 7);
        // Killed by SIGTERM (15).
        assert_eq!(status_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(time_left(Duration::from_secs(3725)), "1h02m");
        assert_eq!(time_left(Duration::from_secs(245)), "4m05s");
        assert_eq!(time_left(Duration::from_secs(9)), "9s");
    }
}
