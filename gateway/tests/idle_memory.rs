//! What an idle host connection costs the gateway's heap, counted by a global allocator of this
//! test binary only. The gateway (its service, QUIC endpoint and TLS) runs in this process; the
//! hosts run in a second one (this binary started again with `FWNP_IDLE_HOSTS` set), so that the
//! count is the gateway's alone. The count is taken at the steps the hosts report (once the
//! last packets of the step have been handled), so that it does not depend on how fast the
//! machine is.
//!
//! One host connects and says Hello first: the base, so that what the first connection sets up
//! once (the gateway's tables, lazily built state) is not counted as the others' cost. Then the
//! others complete their handshakes, then they say Hello; the figures per connection are
//! printed by phase.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fwnp_proto::alloc_count::live;

mod common;
use common::{Client, GatewayOptions, POLICY, TestGateway};
use fwnp_testkit::process::ProcessGuard;
use fwnp_trust::tls::ClientTlsFiles;

fwnp_proto::count_allocations!();

/// Set in the hosts' process: the gateway's address, the PKI's directory and how many hosts.
const HOSTS_ENV: &str = "FWNP_IDLE_HOSTS";

/// Idle hosts measured (besides the first, which is the base).
const HOSTS: usize = 100;

/// What one idle connection may keep on the gateway's heap, everything included: QUIC and TLS
/// state, the connection's tasks and the gateway's session. With path MTU discovery on, each
/// connection's send buffer grew to two packets' worth once its MTU rose above 1,200 bytes, and
/// the connection's task kept room for two timers inline: 33,300 bytes here. Without them, about
/// 32,000, of which the connection's task was 1,700 bytes, sized for its handshake's state for
/// the whole life of the connection; with the handshake's state boxed and freed once the
/// connection is up, 30,750-30,890 bytes. The TLS record layer's keys (which QUIC never uses)
/// and the next key phase's packet keys, built only once they are used, took 1,000 and 730
/// bytes more off: 29,140-29,200 bytes, once 29,570 on a busy machine (the rest is quinn's and
/// rustls' own state, which no setting reaches: README "Measuring"). The bound leaves about 800
/// bytes of margin above the usual figure.
const MAX_BYTES_PER_CONNECTION: f64 = 29.25 * 1024.0;

/// The live bytes once they have stopped changing: the last packets of a step (acknowledgements,
/// the end of a request stream) may still be on their way when the hosts report it. Bounded
/// well within the gateway's Hello timeout (10 s), which runs for the hosts that have completed
/// their handshake and not yet said Hello.
fn settled() -> i64 {
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut last = live();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = live();
        if now.abs_diff(last) < 4096 || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn main() -> ExitCode {
    if let Ok(setup) = std::env::var(HOSTS_ENV) {
        return hosts_process(&setup);
    }
    // This binary has no test harness: it answers `--list` and name filters as one would.
    const NAME: &str = "an_idle_connection_keeps_at_most_29_25_kib_of_the_gateway_heap";
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if arguments.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = arguments.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())) {
        println!("running 0 tests");
        return ExitCode::SUCCESS;
    }
    an_idle_connection_keeps_at_most_29_25_kib_of_the_gateway_heap();
    println!("test {NAME} ... ok");
    ExitCode::SUCCESS
}

fn an_idle_connection_keeps_at_most_29_25_kib_of_the_gateway_heap() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let options = GatewayOptions {
        // Every host connects from 127.0.0.1 at once: no handshake limits.
        handshakes_per_source: Some((100_000, 100_000)),
        retry_above_handshakes: Some(100_000),
        ..GatewayOptions::default()
    };
    let gateway = runtime.block_on(TestGateway::start_with("idle-memory", POLICY, options));
    for i in 0..=HOSTS {
        gateway.pki.host(&format!("idle-{i}"), &[], &[], &[]);
    }
    let pki_dir = gateway
        .pki
        .file("ca.pem")
        .parent()
        .expect("the CA's directory")
        .to_path_buf();

    let mut hosts = ProcessGuard::spawn(
        Command::new(std::env::current_exe().expect("this test binary"))
            .env(
                HOSTS_ENV,
                format!("{} {} {}", gateway.addr, pki_dir.display(), HOSTS + 1),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    )
    .expect("start the hosts' process");
    let child = hosts.0.as_mut().expect("the hosts' process");
    let mut to_hosts = child.stdin.take().expect("the hosts' stdin");
    let from_hosts = child.stdout.take().expect("the hosts' stdout");
    let (lines, reports) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from_hosts).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut step = |expected: &str| {
        let line = reports
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("the hosts never reported {expected:?}: {e}"));
        assert_eq!(line, expected, "the hosts' report");
        let bytes = settled();
        // Tell the hosts to go on (ignored after the last step: they wait for the end of input).
        let _ = writeln!(to_hosts);
        bytes
    };

    let base = step("one welcomed");
    let handshaken = step("handshaken");
    let welcomed = step("welcomed");
    assert_eq!(
        gateway.service.sessions.count(),
        HOSTS + 1,
        "every host is connected"
    );
    drop(to_hosts);
    assert!(
        hosts
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "the hosts' process failed"
    );

    let per = |bytes: i64| bytes as f64 / HOSTS as f64;
    let handshake = per(handshaken - base);
    let hello = per(welcomed - handshaken);
    let total = per(welcomed - base);
    println!("handshake (QUIC, TLS, tasks)  {handshake:8.0} bytes per connection");
    println!("Hello and session             {hello:8.0} bytes per connection");
    println!("idle connection in all        {total:8.0} bytes per connection");
    assert!(
        total <= MAX_BYTES_PER_CONNECTION,
        "{total:.0} bytes per idle connection, more than {MAX_BYTES_PER_CONNECTION}"
    );
    drop(gateway);
    drop(runtime);
}

/// The hosts' process: connects the first host and says Hello, then the others (handshakes
/// first, then their Hellos), reporting each step on standard output and waiting for a line on
/// standard input before the next. Holds the connections until its input ends.
fn hosts_process(setup: &str) -> ExitCode {
    let mut parts = setup.split(' ');
    let (Some(addr), Some(dir), Some(count)) = (parts.next(), parts.next(), parts.next()) else {
        eprintln!("{HOSTS_ENV}: address, directory and count");
        return ExitCode::FAILURE;
    };
    let (Ok(addr), Ok(count)) = (addr.parse::<SocketAddr>(), count.parse::<usize>()) else {
        eprintln!("{HOSTS_ENV}: address, directory and count");
        return ExitCode::FAILURE;
    };
    let dir = PathBuf::from(dir);
    let files = |i: usize| ClientTlsFiles {
        cert: dir.join(format!("idle-{i}.pem")),
        key: dir.join(format!("idle-{i}.key")),
        ca: dir.join("ca.pem"),
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let stdin = std::io::stdin();
    let go_on = || {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).is_ok_and(|n| n > 0)
    };
    let started = std::time::Instant::now();
    let report = |what: &str| {
        eprintln!("hosts: {what} after {:?}", started.elapsed());
        println!("{what}");
        let _ = std::io::stdout().flush();
    };
    let first = runtime.block_on(async {
        let first = Client::connect(addr, &files(0)).await;
        first.hello().await;
        first
    });
    report("one welcomed");
    if !go_on() {
        return ExitCode::FAILURE;
    }
    let others = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 1..count {
            let files = files(i);
            tasks.spawn(async move { (i, Client::connect(addr, &files).await) });
        }
        let mut others: Vec<(usize, Client)> = tasks.join_all().await;
        others.sort_by_key(|(i, _)| *i);
        others
    });
    report("handshaken");
    if !go_on() {
        return ExitCode::FAILURE;
    }
    let others = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (_, client) in others {
            tasks.spawn(async move {
                client.hello().await;
                client
            });
        }
        tasks.join_all().await
    });
    report("welcomed");
    // Hold every connection until the gateway's side has counted and says so.
    while go_on() {}
    drop((first, others));
    drop(runtime);
    ExitCode::SUCCESS
}
