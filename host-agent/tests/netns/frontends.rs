//! The NAT-PMP and PCP front ends with real clients: `natpmpc` (Debian package natpmpc), which
//! nobody here wrote, run in the host namespace by an application process (a child of this test
//! binary that listens on the ports), and a PCP MAP client written here from RFC 6887. Neither
//! is told where the agent is: they send to the default gateway, and the host table sends that
//! to the agent. Real traffic from the outside namespace proves each opening and each closing.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{ChildStdin, ChildStdout, Stdio};

use super::*;

/// The policy of these tests: TCP and UDP 7000-7999, at most three live leases.
const FRONTEND_POLICY: &str = r#"
[defaults]
lifetime = "60s"
min_lifetime = "1s"
max_lifetime = "1h"
max_leases = 3

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "mapped"
groups = ["hosts"]
allow = ["tcp/7000-7999", "udp/7000-7999"]
"#;

/// Whether `natpmpc` is installed (scripts/deps.sh installs it as root).
fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Starts a lab whose agent answers NAT-PMP, under [`FRONTEND_POLICY`].
fn natpmp_lab(label: &str) -> Lab {
    frontend_lab(label, &[], "[frontends]\nnatpmp = true\n")
}

/// Starts a lab with `frontends` in the agent's configuration, under [`FRONTEND_POLICY`].
fn frontend_lab(label: &str, echo_ports: &[u16], frontends: &str) -> Lab {
    let lab = Lab::with_local(label, echo_ports, frontends);
    std::fs::write(lab._dir.path().join("policy.toml"), FRONTEND_POLICY).expect("write policy");
    let mut stream =
        std::os::unix::net::UnixStream::connect(&lab.admin_socket).expect("admin socket");
    stream.set_read_timeout(Some(STEP)).expect("timeout");
    write!(
        stream,
        "POST /v1/policy/reload HTTP/1.1\r\nHost: fwnp\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("send the reload");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "reload: {response}");
    lab
}

/// The gateway's audit records, as its admin API gives them (JSON text).
fn audit(lab: &Lab) -> String {
    let mut stream =
        std::os::unix::net::UnixStream::connect(&lab.admin_socket).expect("admin socket");
    stream.set_read_timeout(Some(STEP)).expect("timeout");
    write!(
        stream,
        "GET /v1/audit?limit=100 HTTP/1.1\r\nHost: fwnp\r\nConnection: close\r\n\r\n"
    )
    .expect("ask for the audit trail");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "audit: {response}");
    response
}

/// An application in the host namespace: it serves echo on TCP and UDP ports (IPv4 and IPv6) and
/// runs the commands the test gives it, as its children.
struct Application {
    child: ProcessGuard,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Application {
    fn start(lab: &Lab, tcp: &[u16], udp: &[u16]) -> Application {
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", lab.topology.host().netns.name()])
            .arg(std::env::current_exe().expect("test binary"))
            .args([
                "frontends::helper_application",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FWNP_TEST_TCP", list(tcp))
            .env("FWNP_TEST_UDP", list(udp))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the application");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut app = Application {
            child: ProcessGuard(Some(child)),
            stdin,
            stdout,
        };
        app.line("READY");
        app
    }

    fn pid(&self) -> u32 {
        self.child.0.as_ref().map(|c| c.id()).expect("running")
    }

    /// What follows `prefix` on the first line of output that holds it.
    fn line(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let read = self
                .stdout
                .read_line(&mut line)
                .expect("read the application");
            assert!(read > 0, "the application ended before {prefix}");
            // libtest may print the test's name on the same line first.
            if let Some(at) = line.find(prefix) {
                return line[at + prefix.len()..].trim().to_owned();
            }
        }
    }

    /// Runs `command` as a child of the application; its exit code and output.
    fn run(&mut self, command: &str) -> (i32, String) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").expect("send the command");
        stdin.flush().expect("flush");
        let rest = self.line("DONE");
        let (code, output) = rest.split_once(' ').unwrap_or((&rest, ""));
        (code.parse().expect("an exit code"), output.to_owned())
    }
}

/// Not a test on its own: the application [`Application`] runs.
#[test]
#[ignore = "helper run by other tests in a child process"]
fn helper_application() {
    let (Ok(tcp), Ok(udp)) = (
        std::env::var("FWNP_TEST_TCP"),
        std::env::var("FWNP_TEST_UDP"),
    ) else {
        return;
    };
    let ports = |list: &str| -> Vec<u16> {
        list.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().expect("port"))
            .collect()
    };
    let mut held = Vec::new();
    for port in ports(&tcp) {
        let listener = std::net::TcpListener::bind(("::", port)).expect("bind TCP");
        held.push(std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(STEP));
                    let mut reader = match stream.try_clone() {
                        Ok(reader) => reader,
                        Err(_) => return,
                    };
                    let _ = std::io::copy(&mut reader, &mut stream);
                });
            }
        }));
    }
    for port in ports(&udp) {
        let socket = UdpSocket::bind(("::", port)).expect("bind UDP");
        held.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }));
    }
    println!("READY");
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((program, args)) = words.split_first() else {
            continue;
        };
        if *program == "ask-udp" {
            // `ask-udp ADDRESS HEX`: the application itself sends the datagram, so that it is
            // the owner of the request's source port; prints the answer in hex.
            let answer = match args {
                [to, request] => helper_ask_udp(to, request),
                _ => None,
            };
            match answer {
                Some(answer) => println!("DONE 0 {answer}"),
                None => println!("DONE 1 no answer"),
            }
            continue;
        }
        if *program == "ask-tcp" {
            // `ask-tcp ADDRESS HEX`: the application itself connects and sends the request, so
            // that it is the owner of the connection; prints what comes back until the other
            // end closes, in hex.
            let answer = match args {
                [to, request] => helper_ask_tcp(to, request),
                _ => None,
            };
            match answer {
                Some(answer) => println!("DONE 0 {answer}"),
                None => println!("DONE 1 no answer"),
            }
            continue;
        }
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the command");
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let output = child.wait_with_output().expect("its output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .replace('\n', " | ");
        println!("DONE {} {text}", output.status.code().unwrap_or(-1));
    }
}

/// Sends the datagram `request` (hex) to `to` and waits for one answer (hex).
fn helper_ask_udp(to: &str, request: &str) -> Option<String> {
    let to: SocketAddr = to.parse().ok()?;
    let request = (0..request.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(request.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let socket = UdpSocket::bind(any).ok()?;
    socket.connect(to).ok()?;
    socket.send(&request).ok()?;
    socket.set_read_timeout(Some(STEP)).ok()?;
    let mut buf = [0u8; 1100];
    let n = socket.recv(&mut buf).ok()?;
    Some(buf[..n].iter().map(|b| format!("{b:02x}")).collect())
}

/// Sends `request` (hex) on a TCP connection to `to` and reads the answer (hex) until the other
/// end closes.
fn helper_ask_tcp(to: &str, request: &str) -> Option<String> {
    let to: SocketAddr = to.parse().ok()?;
    let request = from_hex(request)?;
    let mut stream = std::net::TcpStream::connect_timeout(&to, STEP).ok()?;
    stream.set_read_timeout(Some(STEP)).ok()?;
    stream.write_all(&request).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    Some(to_hex(&answer))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The gateway's address as the host knows it: where its NAT-PMP requests go.
fn gateway_of(lab: &Lab) -> SocketAddr {
    SocketAddr::new(lab.topology.gateway_inside_v4, 5351)
}

/// Sends `request` from the host namespace to its gateway's port 5351; the answer, if any
/// comes within `within`.
fn ask_raw(lab: &Lab, request: &[u8], within: Duration) -> Option<Vec<u8>> {
    ask_raw_to(lab, None, gateway_of(lab), request, within)
}

/// The same, to `to`, from the host's address `from` (any when `None`).
fn ask_raw_to(
    lab: &Lab,
    from: Option<std::net::IpAddr>,
    to: SocketAddr,
    request: &[u8],
    within: Duration,
) -> Option<Vec<u8>> {
    lab.topology.host().netns.run(|| {
        let any: SocketAddr = match (from, to.is_ipv4()) {
            (Some(address), _) => SocketAddr::new(address, 0),
            (None, true) => "0.0.0.0:0".parse().ok()?,
            (None, false) => "[::]:0".parse().ok()?,
        };
        let socket = UdpSocket::bind(any).ok()?;
        socket.connect(to).ok()?;
        socket.send(request).ok()?;
        socket.set_read_timeout(Some(within)).ok()?;
        let mut buf = [0u8; 1100];
        let n = socket.recv(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    })
}

fn udp_reaches(lab: &Lab, port: u16, within: Duration) -> bool {
    lab::udp_roundtrip(&lab.topology.outside, lab.host_port(port), None, within)
}

#[test]
fn natpmpc_maps_refreshes_and_deletes_tcp_and_udp_ports() {
    if !lab::require_root("natpmpc_maps_refreshes_and_deletes_tcp_and_udp_ports") {
        return;
    }
    assert!(
        have("natpmpc"),
        "natpmpc is not installed (scripts/deps.sh installs it)"
    );
    let lab = natpmp_lab("natpmp");
    let mut app = Application::start(&lab, &[7100], &[7101]);
    assert!(!lab.outside_reaches(7100, REFUSED), "open before a mapping");
    assert!(
        !udp_reaches(&lab, 7101, REFUSED),
        "UDP open before a mapping"
    );

    // The external address: the host's own (FWNP does not translate).
    let (code, output) = app.run("natpmpc");
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains(&format!("Public IP address : {}", lab.topology.host().v4)),
        "{output}"
    );

    let (code, output) = app.run("natpmpc -a 7100 7100 tcp 60");
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("Mapped public port 7100 protocol TCP to local port 7100 liftime 60"),
        "{output}"
    );
    assert!(
        lab.outside_reaches(7100, FIRST_SYN),
        "TCP not open after the mapping"
    );
    // Another external port asked: the port actually granted is the internal one.
    let (code, output) = app.run("natpmpc -a 9999 7101 udp 60");
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("Mapped public port 7101 protocol UDP to local port 7101"),
        "{output}"
    );
    assert!(
        udp_reaches(&lab, 7101, STEP),
        "UDP not open after the mapping"
    );

    // The leases name the front end and the process that holds them.
    let leases = lab.client().list();
    assert_eq!(leases.leases.len(), 2, "{leases:?}");
    for lease in &leases.leases {
        let info = lease.app.clone().expect("application information");
        assert_eq!(info.name.as_deref(), Some("natpmpc via NAT-PMP"));
        assert_eq!(info.pid, Some(app.pid()));
        assert!(info.executable.is_some_and(|e| e.contains("netns")));
    }

    // The gateway's audit trail names the front end and the process.
    let trail = audit(&lab);
    assert!(trail.contains("natpmpc via NAT-PMP"), "{trail}");
    assert!(trail.contains(&app.pid().to_string()), "{trail}");

    // A refresh keeps the same lease.
    let (code, output) = app.run("natpmpc -a 7100 7100 tcp 60");
    assert_eq!(code, 0, "{output}");
    let after = lab.client().list();
    assert_eq!(after.leases.len(), 2);
    let ids = |l: &fwnp_proto::Leases| {
        let mut ids: Vec<_> = l.leases.iter().map(|l| l.lease).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&after), ids(&leases));

    // The operator revokes the TCP lease: the port closes, and natpmpc's next refresh is not
    // told the closed port is mapped but opens it again, under a new lease.
    let is_tcp_7100 = |l: &fwnp_proto::LeaseInfo| {
        l.grants
            .iter()
            .any(|g| g.protocol == Protocol::Tcp && g.ports.first == 7100)
    };
    let revoked = after
        .leases
        .iter()
        .find(|l| is_tcp_7100(l))
        .expect("the TCP lease")
        .lease;
    lab.revoke(&revoked.to_string());
    assert!(
        lab.eventually(STEP, || !lab.host_has(7100)),
        "the host's mirror outlived the revocation"
    );
    assert!(
        !lab.outside_reaches(7100, REFUSED),
        "TCP still open after the revocation"
    );
    let (code, output) = app.run("natpmpc -a 7100 7100 tcp 60");
    assert_eq!(code, 0, "{output}");
    assert!(
        lab.outside_reaches(7100, FIRST_SYN),
        "the refresh after the revocation did not open TCP again"
    );
    let reopened = lab.client().list();
    assert_eq!(reopened.leases.len(), 2, "{reopened:?}");
    let renewed = reopened
        .leases
        .iter()
        .find(|l| is_tcp_7100(l))
        .expect("a TCP lease again");
    assert_ne!(renewed.lease, revoked);

    // Lifetime 0 deletes: closed again, the other mapping stays.
    let (code, output) = app.run("natpmpc -a 7100 7100 tcp 0");
    assert_eq!(code, 0, "{output}");
    assert!(
        !lab.outside_reaches(7100, REFUSED),
        "TCP still open after the delete"
    );
    assert!(
        udp_reaches(&lab, 7101, STEP),
        "the UDP mapping went with the TCP one"
    );

    // The application's exit releases what it still holds.
    app.child.kill();
    assert!(
        lab.eventually(STEP, || !udp_reaches(
            &lab,
            7101,
            Duration::from_millis(300)
        )),
        "UDP still open after the application exited"
    );
    assert!(lab.eventually(STEP, || lab.client().list().leases.is_empty()));
}

#[test]
fn natpmp_refusals_get_natpmp_result_codes_and_the_agent_survives() {
    if !lab::require_root("natpmp_refusals_get_natpmp_result_codes_and_the_agent_survives") {
        return;
    }
    assert!(
        have("natpmpc"),
        "natpmpc is not installed (scripts/deps.sh installs it)"
    );
    let lab = natpmp_lab("natpmp-refusals");
    let mut app = Application::start(&lab, &[7200, 7201, 7202, 7203, 8000], &[]);
    let _other = Application::start(&lab, &[7300], &[]);

    // A port another process listens on: Not Authorized/Refused (2; natpmpc says -51).
    let (code, output) = app.run("natpmpc -a 7300 7300 tcp 60");
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("-51"), "{output}");
    assert!(!lab.outside_reaches(7300, REFUSED));

    // A port the policy does not allow: refused the same way.
    let (code, output) = app.run("natpmpc -a 8000 8000 tcp 60");
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("-51"), "{output}");

    // The quota (three live leases): the fourth is Out of Resources (4; natpmpc says -53).
    for port in [7200, 7201, 7202] {
        let (code, output) = app.run(&format!("natpmpc -a {port} {port} tcp 60"));
        assert_eq!(code, 0, "{output}");
    }
    let (code, output) = app.run("natpmpc -a 7203 7203 tcp 60");
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("-53"), "{output}");
    assert!(!lab.outside_reaches(7203, REFUSED));

    // Malformed requests: a wrong version and an unknown opcode get their result codes; a
    // truncated mapping request cannot be answered and is dropped.
    let answer = ask_raw(&lab, &[1, 0], STEP).expect("an answer to a wrong version");
    assert_eq!(answer[..4], [0, 128, 0, 1]);
    let answer = ask_raw(&lab, &[0, 9, 0, 0], STEP).expect("an answer to an unknown opcode");
    assert_eq!(answer[..4], [0, 137, 0, 5]);
    assert_eq!(ask_raw(&lab, &[0, 2, 0, 0, 0x1c], REFUSED), None);

    // And the agent still serves: port 0 with lifetime 0 deletes all this application's TCP
    // mappings.
    let (code, output) = app.run("natpmpc -a 0 0 tcp 0");
    assert_eq!(code, 0, "{output}");
    assert!(!lab.outside_reaches(7200, REFUSED));
    assert!(lab.eventually(STEP, || lab.client().list().leases.is_empty()));
    let (code, output) = app.run("natpmpc -a 7203 7203 tcp 60");
    assert_eq!(code, 0, "{output}");
    assert!(lab.outside_reaches(7203, FIRST_SYN));
}

/// A PCP MAP request (RFC 6887 sections 7.1, 11.1 and 13.3): `filters` are (address, prefix
/// length of that address's family).
fn pcp_map(
    nonce: [u8; 12],
    protocol: u8,
    port: u16,
    lifetime: u32,
    client: std::net::IpAddr,
    filters: &[(std::net::IpAddr, u8)],
) -> Vec<u8> {
    let mapped = |address: std::net::IpAddr| match address {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    let mut out = vec![2, 1, 0, 0];
    out.extend_from_slice(&lifetime.to_be_bytes());
    out.extend_from_slice(&mapped(client));
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&[protocol, 0, 0, 0]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&[0u8; 16]);
    for (address, len) in filters {
        let len = if address.is_ipv4() { len + 96 } else { *len };
        out.extend_from_slice(&[3, 0, 0, 20, 0, len, 0, 0]);
        out.extend_from_slice(&mapped(*address));
    }
    out
}

/// The result code, lifetime and (for MAP) assigned port of a PCP answer.
fn pcp_result(answer: &[u8]) -> (u8, u32, Option<u16>) {
    assert!(
        answer.len() >= 24 && answer[0] == 2 && answer[1] & 0x80 != 0,
        "{answer:?}"
    );
    let lifetime = u32::from_be_bytes([answer[4], answer[5], answer[6], answer[7]]);
    let port = answer.get(42..44).map(|p| u16::from_be_bytes([p[0], p[1]]));
    (answer[3], lifetime, port)
}

#[test]
fn a_pcp_client_maps_with_a_filter_refreshes_and_deletes() {
    if !lab::require_root("a_pcp_client_maps_with_a_filter_refreshes_and_deletes") {
        return;
    }
    let lab = frontend_lab(
        "pcp",
        &[7400, 7401, 7402, 7403, 8000],
        "[frontends]\npcp = true\n",
    );
    let host = lab.topology.host().v4;
    let outside = lab.topology.outside_v4;
    let nonce = [0x5a; 12];

    let announce = ask_raw(
        &lab,
        &{
            let mut a = vec![2, 0, 0, 0, 0, 0, 0, 0];
            a.extend_from_slice(&match host {
                std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                std::net::IpAddr::V6(v6) => v6.octets(),
            });
            a
        },
        STEP,
    )
    .expect("an answer to ANNOUNCE");
    assert_eq!(pcp_result(&announce).0, 0);
    assert_eq!(announce[1], 0x80);

    // MAP with a FILTER: only the outside's first address may connect.
    let answer = ask_raw(
        &lab,
        &pcp_map(nonce, 6, 7400, 60, host, &[(outside, 32)]),
        STEP,
    )
    .expect("an answer to MAP");
    assert_eq!(pcp_result(&answer), (0, 60, Some(7400)));
    assert_eq!(answer[24..36], nonce);
    let reach_from = |from, within| {
        lab::tcp_connects(
            &lab.topology.outside,
            lab.host_port(7400),
            Some(from),
            within,
        )
    };
    assert!(
        reach_from(outside, FIRST_SYN),
        "not open to the filtered peer"
    );
    assert!(
        !reach_from(lab.topology.outside_v4_alt, REFUSED),
        "open to a peer outside the FILTER"
    );
    let leases = lab.client().list();
    assert_eq!(leases.leases.len(), 1);
    let lease = &leases.leases[0];
    assert!(
        lease
            .app
            .as_ref()
            .and_then(|a| a.name.as_deref())
            .is_some_and(|n| n.ends_with(" via PCP")),
        "{lease:?}"
    );
    assert_eq!(lease.grants[0].remotes.len(), 1);

    // A refresh with the nonce keeps the lease; another nonce is another client's: refused.
    let answer = ask_raw(
        &lab,
        &pcp_map(nonce, 6, 7400, 60, host, &[(outside, 32)]),
        STEP,
    )
    .expect("an answer to the refresh");
    assert_eq!(pcp_result(&answer).0, 0);
    assert_eq!(lab.client().list().leases[0].lease, lease.lease);
    let answer = ask_raw(
        &lab,
        &pcp_map([1; 12], 6, 7400, 60, host, &[(outside, 32)]),
        STEP,
    )
    .expect("an answer to a stranger's refresh");
    assert_eq!(pcp_result(&answer).0, 2, "NOT_AUTHORIZED");

    // Lifetime 0 deletes it.
    let answer = ask_raw(&lab, &pcp_map(nonce, 6, 7400, 0, host, &[]), STEP)
        .expect("an answer to the delete");
    assert_eq!(pcp_result(&answer).0, 0);
    assert_eq!(pcp_result(&answer).1, 0);
    assert!(!reach_from(outside, REFUSED), "still open after the delete");
    assert!(lab.client().list().leases.is_empty());

    // Refusals, each with PCP's code, and the agent goes on serving.
    let code = |request: &[u8]| pcp_result(&ask_raw(&lab, request, STEP).expect("an answer")).0;
    assert_eq!(
        code(&pcp_map(nonce, 6, 8000, 60, host, &[])),
        2,
        "policy: NOT_AUTHORIZED"
    );
    // A port another process listens on: the client is another application (neither is the
    // other's ancestor), and the answer is NOT_AUTHORIZED; the port stays closed.
    let owner = Application::start(&lab, &[7350], &[]);
    let mut client = Application::start(&lab, &[], &[]);
    let request: String = pcp_map([0x33; 12], 6, 7350, 60, host, &[])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (status, answer) = client.run(&format!("ask-udp {} {request}", gateway_of(&lab)));
    assert_eq!(status, 0, "{answer}");
    let answer = (0..answer.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&answer[i..i + 2], 16).expect("hex"))
        .collect::<Vec<u8>>();
    assert_eq!(
        pcp_result(&answer).0,
        2,
        "another process's port: NOT_AUTHORIZED"
    );
    assert_eq!(answer[24..36], [0x33; 12]);
    assert!(
        !lab.outside_reaches(7350, REFUSED),
        "another process's port opened"
    );
    assert!(lab.client().list().leases.is_empty());
    drop(owner);
    assert_eq!(
        code(&pcp_map(
            nonce,
            6,
            7400,
            60,
            "192.0.2.99".parse().unwrap(),
            &[]
        )),
        12,
        "ADDRESS_MISMATCH"
    );
    assert_eq!(
        code(&pcp_map(nonce, 0, 7400, 60, host, &[])),
        9,
        "UNSUPP_PROTOCOL"
    );
    let request = pcp_map(nonce, 6, 7400, 60, host, &[]);
    assert_eq!(code(&request[..40]), 3, "MALFORMED_REQUEST");
    let mut wrong = request.clone();
    wrong[0] = 3;
    assert_eq!(code(&wrong), 1, "UNSUPP_VERSION");
    let mut unknown = request.clone();
    unknown[1] = 9;
    assert_eq!(code(&unknown), 4, "UNSUPP_OPCODE");
    let answer = ask_raw(&lab, &request, STEP).expect("still served");
    assert_eq!(pcp_result(&answer).0, 0);
    assert!(
        reach_from(lab.topology.outside_v4_alt, FIRST_SYN),
        "no FILTER: open to all"
    );

    // The quota (three live leases): the fourth is USER_EX_QUOTA.
    for port in [7401, 7402] {
        assert_eq!(code(&pcp_map(nonce, 6, port, 60, host, &[])), 0);
    }
    assert_eq!(
        code(&pcp_map(nonce, 6, 7403, 60, host, &[])),
        10,
        "USER_EX_QUOTA"
    );
    for port in [7401, 7402] {
        assert_eq!(code(&pcp_map(nonce, 6, port, 0, host, &[])), 0);
    }

    // A mapping its client does not refresh ends with the lifetime it was told (the gateway's
    // lease is renewed meanwhile, so only the front end ends it).
    let answer = ask_raw(&lab, &pcp_map(nonce, 6, 7400, 2, host, &[]), STEP)
        .expect("an answer to a short refresh");
    assert_eq!(pcp_result(&answer).1, 2);
    assert!(reach_from(outside, FIRST_SYN));
    assert!(
        lab.eventually(STEP, || lab.client().list().leases.is_empty()),
        "the mapping outlived its lifetime"
    );
    assert!(
        !reach_from(outside, REFUSED),
        "still open after the lifetime"
    );
}

/// [`pcp_map`] suggesting the external `port` and `address`, with the raw `options` after it.
fn pcp_map_suggesting(
    nonce: [u8; 12],
    internal: u16,
    client: std::net::IpAddr,
    port: u16,
    address: std::net::IpAddr,
    options: &[u8],
) -> Vec<u8> {
    let mut request = pcp_map(nonce, 6, internal, 60, client, &[]);
    request[42..44].copy_from_slice(&port.to_be_bytes());
    request[44..60].copy_from_slice(&match address {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    });
    request.extend_from_slice(options);
    request
}

#[test]
fn a_pcp_client_that_prefers_failure_gets_its_suggestion_or_nothing() {
    if !lab::require_root("a_pcp_client_that_prefers_failure_gets_its_suggestion_or_nothing") {
        return;
    }
    let lab = frontend_lab("pcp-prefer", &[7410], "[frontends]\npcp = true\n");
    let host = lab.topology.host().v4;
    let any: std::net::IpAddr = "0.0.0.0".parse().unwrap();
    let nonce = [0x4f; 12];
    let prefer_failure = [2, 0, 0, 0];
    let ask = |request: &[u8]| {
        let answer = ask_raw(&lab, request, STEP).expect("an answer");
        (pcp_result(&answer), answer)
    };

    // Another external port, or another external address, than FWNP gives (the internal port
    // on the host's address): CANNOT_PROVIDE_EXTERNAL, a long lifetime error, and no mapping.
    for (port, address) in [(7411, any), (7410, "198.51.100.200".parse().unwrap())] {
        let request = pcp_map_suggesting(nonce, 7410, host, port, address, &prefer_failure);
        let ((code, lifetime, _), answer) = ask(&request);
        assert_eq!(code, 11, "CANNOT_PROVIDE_EXTERNAL for {port} {address}");
        assert_eq!(lifetime, 1800);
        assert_eq!(
            answer[24..],
            request[24..],
            "the request's MAP part and options"
        );
        assert!(lab.client().list().leases.is_empty(), "a mapping was made");
        assert!(!lab.outside_reaches(7410, REFUSED), "open after a refusal");
    }

    // PREFER_FAILURE twice, or with data: MALFORMED_OPTION.
    for options in [
        [prefer_failure, prefer_failure].concat(),
        vec![2, 0, 0, 4, 0, 0, 0, 0],
    ] {
        let request = pcp_map_suggesting(nonce, 7410, host, 7410, any, &options);
        assert_eq!(ask(&request).0.0, 6, "MALFORMED_OPTION for {options:?}");
    }
    assert!(lab.client().list().leases.is_empty());

    // The suggestion FWNP can give, exactly: granted.
    let request = pcp_map_suggesting(nonce, 7410, host, 7410, host, &prefer_failure);
    assert_eq!(ask(&request).0, (0, 60, Some(7410)));
    assert!(
        lab.outside_reaches(7410, FIRST_SYN),
        "not open after the mapping"
    );

    // Without PREFER_FAILURE another suggestion is no obstacle: the internal port is given.
    let request = pcp_map_suggesting(nonce, 7410, host, 7411, any, &[]);
    assert_eq!(ask(&request).0, (0, 60, Some(7410)));
    let ((code, _, _), _) = ask(&pcp_map(nonce, 6, 7410, 0, host, &[]));
    assert_eq!(code, 0);
    assert!(
        !lab.outside_reaches(7410, REFUSED),
        "still open after the delete"
    );
}

/// Posts `body` to the UPnP control URL from the host namespace, as an AddPortMapping; the
/// answer's text.
fn post_soap(lab: &Lab, body: &[u8]) -> String {
    post_soap_as(lab, "AddPortMapping", body)
}

/// Posts `body` to the UPnP control URL from the host namespace, with the SOAPAction of
/// WANIPConnection's `action`; the answer's text.
fn post_soap_as(lab: &Lab, action: &str, body: &[u8]) -> String {
    let to = SocketAddr::new(lab.topology.host().v4, 49152);
    lab.topology.host().netns.run(|| {
        let mut stream = std::net::TcpStream::connect_timeout(&to, STEP).expect("connect");
        stream.set_read_timeout(Some(STEP)).expect("timeout");
        let head = format!(
            "POST /ctl/IPConn HTTP/1.1\r\nHost: {to}\r\nContent-Type: text/xml\r\nSOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#{action}\"\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).expect("send");
        // The agent may answer before reading all of an oversized body.
        let _ = stream.write_all(body);
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
}

#[test]
fn upnpc_discovers_the_agent_adds_lists_and_deletes_mappings() {
    if !lab::require_root("upnpc_discovers_the_agent_adds_lists_and_deletes_mappings") {
        return;
    }
    assert!(
        have("upnpc"),
        "upnpc is not installed (scripts/deps.sh installs miniupnpc)"
    );
    let lab = frontend_lab("upnp", &[], "[frontends]\nupnp = true\n");
    let host = lab.topology.host().v4;
    let mut app = Application::start(&lab, &[7500, 7501, 7502, 7503, 8000], &[]);
    assert!(!lab.outside_reaches(7500, REFUSED));

    // Discovered by SSDP without being told where: -a, then the mapping is listed. (The lab's
    // addresses are documentation ones, which miniupnpc calls reserved: it then says the IGD is
    // "not connected?" and goes on only with -i.)
    let (_, output) = app.run(&format!("upnpc -i -a {host} 7500 7500 TCP"));
    assert!(output.contains("is redirected to internal"), "{output}");
    assert!(
        lab.outside_reaches(7500, FIRST_SYN),
        "not open after -a: {output}"
    );
    let leases = lab.client().list();
    assert_eq!(leases.leases.len(), 1);
    let info = leases.leases[0]
        .app
        .clone()
        .expect("application information");
    assert_eq!(info.name.as_deref(), Some("upnpc via UPnP IGD"));
    assert_eq!(info.pid, Some(app.pid()));
    let (_, output) = app.run("upnpc -i -l");
    assert!(output.contains("TCP  7500->"), "{output}");

    // -d deletes it.
    let (_, output) = app.run("upnpc -i -d 7500 TCP");
    assert!(
        !lab.outside_reaches(7500, REFUSED),
        "still open after -d: {output}"
    );
    assert!(lab.client().list().leases.is_empty());

    // A port the policy does not allow: UPnP's 606.
    let (_, output) = app.run(&format!("upnpc -i -a {host} 8000 8000 TCP"));
    assert!(output.contains("606"), "{output}");
    assert!(!lab.outside_reaches(8000, REFUSED));

    // A port another process listens on: UPnP's 606 too; the port stays closed.
    let other = Application::start(&lab, &[7300], &[]);
    let (_, output) = app.run(&format!("upnpc -i -a {host} 7300 7300 TCP"));
    assert!(output.contains("606"), "{output}");
    assert!(!output.contains("is redirected to internal"), "{output}");
    assert!(
        !lab.outside_reaches(7300, REFUSED),
        "another process's port opened"
    );
    assert!(lab.client().list().leases.is_empty());
    drop(other);

    // The quota (three live leases): the fourth is 728 NoPortMapsAvailable.
    for port in [7500, 7502, 7503] {
        let (_, output) = app.run(&format!("upnpc -i -a {host} {port} {port} TCP"));
        assert!(output.contains("is redirected to internal"), "{output}");
    }
    let (_, output) = app.run(&format!("upnpc -i -a {host} 7501 7501 TCP"));
    assert!(output.contains("728"), "{output}");
    for port in [7500, 7502, 7503] {
        app.run(&format!("upnpc -i -d {port} TCP"));
    }
    assert!(lab.client().list().leases.is_empty());

    // An oversized body and an entity expansion are refused with a UPnP error; the agent
    // goes on. (The body is refused by its Content-Length, as HTTP's 413.)
    let answer = post_soap(&lab, &vec![b' '; 64 * 1024]);
    assert!(answer.contains("<errorCode>501</errorCode>"), "{answer}");
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
    let bomb = br#"<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><u:AddPortMapping xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"><NewExternalPort>&b;</NewExternalPort></u:AddPortMapping></s:Body></s:Envelope>"#;
    let answer = post_soap(&lab, bomb);
    assert!(answer.contains("<errorCode>402</errorCode>"), "{answer}");

    // The application's exit releases its mapping.
    let (_, output) = app.run(&format!("upnpc -i -a {host} 7501 7501 TCP"));
    assert!(
        lab.outside_reaches(7501, FIRST_SYN),
        "not open after -a: {output}"
    );
    app.child.kill();
    assert!(
        lab.eventually(STEP, || !lab
            .outside_reaches(7501, Duration::from_millis(300))),
        "still open after the application exited"
    );
}

/// Binds port 1900 in the host namespace as another SSDP service of the host would: with
/// SO_REUSEADDR when `shared` (as minissdpd does), joined to 239.255.255.250.
fn ssdp_neighbour(lab: &Lab, shared: bool) -> UdpSocket {
    lab.topology.host().netns.run(|| {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .expect("a socket");
        socket.set_reuse_address(shared).expect("SO_REUSEADDR");
        socket
            .bind(&SocketAddr::from(([0, 0, 0, 0], 1900)).into())
            .expect("bind port 1900");
        socket
            .join_multicast_v4(
                &std::net::Ipv4Addr::new(239, 255, 255, 250),
                &std::net::Ipv4Addr::UNSPECIFIED,
            )
            .expect("join 239.255.255.250");
        socket.into()
    })
}

/// Multicasts an M-SEARCH for `target` from the host namespace; the answers heard within 1.5 s.
fn ssdp_search(lab: &Lab, target: &str) -> Vec<String> {
    lab.topology.host().netns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let search = format!(
            "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: {target}\r\n\r\n"
        );
        socket
            .send_to(search.as_bytes(), "239.255.255.250:1900")
            .expect("send the search");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut answers = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                answers.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        answers
    })
}

/// The value of the header `name` of an SSDP answer.
fn ssdp_header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer.lines().find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// The agent's description, fetched from the host namespace.
fn root_description(lab: &Lab) -> String {
    let to = SocketAddr::new(lab.topology.host().v4, 49152);
    lab.topology.host().netns.run(|| {
        let mut stream = std::net::TcpStream::connect_timeout(&to, STEP).expect("connect");
        stream.set_read_timeout(Some(STEP)).expect("timeout");
        write!(
            stream,
            "GET /rootDesc.xml HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
}

#[test]
fn upnp_shares_the_ssdp_port_and_serves_without_it() {
    if !lab::require_root("upnp_shares_the_ssdp_port_and_serves_without_it") {
        return;
    }
    assert!(
        have("upnpc"),
        "upnpc is not installed (scripts/deps.sh installs miniupnpc)"
    );
    let mut lab = frontend_lab("upnp-ssdp", &[], "[frontends]\nupnp = true\n");
    let host = lab.topology.host().v4;

    // Another SSDP service holds port 1900 (shared) before the agent starts: both bind it, and
    // upnpc discovers the agent.
    lab.agent.terminate(STEP);
    let neighbour = ssdp_neighbour(&lab, true);
    lab.start_agent();
    let mut app = Application::start(&lab, &[7500, 7501], &[]);
    let (_, output) = app.run(&format!("upnpc -i -a {host} 7500 7500 TCP"));
    assert!(output.contains("is redirected to internal"), "{output}");
    assert!(lab.outside_reaches(7500, FIRST_SYN), "not open: {output}");
    neighbour.set_read_timeout(Some(STEP)).expect("timeout");
    let mut buf = [0u8; 2048];
    let heard = neighbour
        .recv(&mut buf)
        .expect("the neighbour hears the searches too");
    assert!(buf[..heard].starts_with(b"M-SEARCH"));

    // upnp:rootdevice is answered as upnp:rootdevice, with the root device's UUID.
    let description = root_description(&lab);
    let root_udn = description
        .split("<UDN>")
        .nth(1)
        .and_then(|rest| rest.split("</UDN>").next())
        .unwrap_or_else(|| panic!("no UDN: {description}"))
        .to_owned();
    let answers = ssdp_search(&lab, "upnp:rootdevice");
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(ssdp_header(&answers[0], "ST"), Some("upnp:rootdevice"));
    let usn = format!("{root_udn}::upnp:rootdevice");
    assert_eq!(ssdp_header(&answers[0], "USN"), Some(usn.as_str()));
    // ssdp:all: 3 for the root device, 2 for each of its two embedded devices, 1 for each of
    // the four services. A version the description does not offer: no answer.
    assert_eq!(ssdp_search(&lab, "ssdp:all").len(), 11);
    assert!(ssdp_search(&lab, "urn:schemas-upnp-org:service:WANIPConnection:2").is_empty());
    let (_, output) = app.run("upnpc -i -d 7500 TCP");
    assert!(!lab.outside_reaches(7500, REFUSED), "still open: {output}");

    // Port 1900 held by a service that does not share it: no discovery, yet the description
    // and the control are served to a control point given the description's URL.
    lab.agent.terminate(STEP);
    drop(neighbour);
    let _exclusive = ssdp_neighbour(&lab, false);
    lab.start_agent();
    let (_, output) = app.run(&format!(
        "upnpc -u http://{host}:49152/rootDesc.xml -i -a {host} 7501 7501 TCP"
    ));
    assert!(output.contains("is redirected to internal"), "{output}");
    assert!(lab.outside_reaches(7501, FIRST_SYN), "not open: {output}");
}

#[test]
fn a_pcp_client_maps_over_ipv6() {
    if !lab::require_root("a_pcp_client_maps_over_ipv6") {
        return;
    }
    let lab = frontend_lab("pcp6", &[7450], "[frontends]\npcp = true\n");
    let gateway = SocketAddr::new(lab.topology.gateway_inside_v6, 5351);
    let host = lab.topology.host().v6;
    let nonce = [0x66; 12];
    let target = SocketAddr::new(host, 7450);
    let reaches = |within| lab::tcp_connects(&lab.topology.outside, target, None, within);
    assert!(!reaches(REFUSED), "open before the mapping");

    // The request goes to the IPv6 default gateway; the lease opens the host's IPv6 address.
    // From an address the host's certificate does not hold: the gateway's address-mismatch is
    // PCP's ADDRESS_MISMATCH.
    let alt = lab
        .topology
        .host()
        .v6_alt
        .expect("the host of Topology::new has a second IPv6 address");
    let answer = ask_raw_to(
        &lab,
        Some(alt),
        gateway,
        &pcp_map(nonce, 6, 7450, 60, alt, &[]),
        STEP,
    )
    .expect("an answer to MAP");
    assert_eq!(pcp_result(&answer).0, 12, "ADDRESS_MISMATCH");
    let answer = ask_raw_to(
        &lab,
        Some(host),
        gateway,
        &pcp_map(nonce, 6, 7450, 60, host, &[]),
        STEP,
    )
    .expect("an answer to MAP");
    assert_eq!(pcp_result(&answer), (0, 60, Some(7450)));
    assert_eq!(
        answer[44..60],
        match host {
            std::net::IpAddr::V6(v6) => v6.octets(),
            std::net::IpAddr::V4(_) => unreachable!("the host's IPv6 address"),
        }
    );
    assert!(reaches(FIRST_SYN), "not open over IPv6 after the mapping");
    let leases = lab.client().list();
    let hosts: Vec<_> = leases.leases[0].grants.iter().map(|g| g.host).collect();
    assert_eq!(hosts, vec![host]);

    let answer = ask_raw_to(
        &lab,
        Some(host),
        gateway,
        &pcp_map(nonce, 6, 7450, 0, host, &[]),
        STEP,
    )
    .expect("an answer to the delete");
    assert_eq!(pcp_result(&answer).0, 0);
    assert!(!reaches(REFUSED), "still open after the delete");
}

#[test]
fn a_pcp_client_keeps_an_ipv4_and_an_ipv6_mapping_of_one_port_apart() {
    if !lab::require_root("a_pcp_client_keeps_an_ipv4_and_an_ipv6_mapping_of_one_port_apart") {
        return;
    }
    let lab = frontend_lab("pcp46", &[7460], "[frontends]\npcp = true\n");
    let (host, host6) = (lab.topology.host().v4, lab.topology.host().v6);
    let (gateway, gateway6) = (
        gateway_of(&lab),
        SocketAddr::new(lab.topology.gateway_inside_v6, 5351),
    );
    let nonce = [0x46; 12];
    let reaches = |to: std::net::IpAddr, within| {
        lab::tcp_connects(
            &lab.topology.outside,
            SocketAddr::new(to, 7460),
            None,
            within,
        )
    };
    let map = |to: SocketAddr, client: std::net::IpAddr, lifetime: u32| {
        let answer = ask_raw_to(
            &lab,
            Some(client),
            to,
            &pcp_map(nonce, 6, 7460, lifetime, client, &[]),
            STEP,
        )
        .expect("an answer to MAP");
        pcp_result(&answer)
    };

    // The same port for the client's IPv4 and its IPv6 address: two mappings, both open.
    assert_eq!(map(gateway, host, 60), (0, 60, Some(7460)));
    assert!(reaches(host, FIRST_SYN), "not open over IPv4");
    assert_eq!(map(gateway6, host6, 60), (0, 60, Some(7460)));
    assert!(reaches(host6, FIRST_SYN), "not open over IPv6");
    assert!(
        reaches(host, FIRST_SYN),
        "the IPv6 mapping closed the IPv4 one"
    );
    assert_eq!(lab.client().list().leases.len(), 2);

    // Each is refreshed as itself: no other lease.
    assert_eq!(map(gateway, host, 60).0, 0);
    assert_eq!(map(gateway6, host6, 60).0, 0);
    assert_eq!(lab.client().list().leases.len(), 2);

    // Deleting the IPv6 one leaves the IPv4 one open, and the other way round.
    assert_eq!(map(gateway6, host6, 0), (0, 0, Some(7460)));
    assert!(!reaches(host6, REFUSED), "still open over IPv6");
    assert!(
        reaches(host, FIRST_SYN),
        "the IPv6 delete closed the IPv4 mapping"
    );
    assert_eq!(map(gateway6, host6, 60).0, 0);
    assert_eq!(map(gateway, host, 0).0, 0);
    assert!(!reaches(host, REFUSED), "still open over IPv4");
    assert!(
        reaches(host6, FIRST_SYN),
        "the IPv4 delete closed the IPv6 mapping"
    );
    assert_eq!(map(gateway6, host6, 0).0, 0);
    assert!(lab.client().list().leases.is_empty());
}

#[test]
fn upnpc_opens_and_closes_an_ipv6_pinhole() {
    if !lab::require_root("upnpc_opens_and_closes_an_ipv6_pinhole") {
        return;
    }
    assert!(
        have("upnpc"),
        "upnpc is not installed (scripts/deps.sh installs miniupnpc)"
    );
    let lab = frontend_lab("upnp6", &[], "[frontends]\nupnp = true\n");
    let host = lab.topology.host().v6;
    let target = SocketAddr::new(host, 7600);
    let reaches = |within| lab::tcp_connects(&lab.topology.outside, target, None, within);
    let mut app = Application::start(&lab, &[7600], &[]);
    assert!(!reaches(REFUSED), "open before the pinhole");

    let (_, output) = app.run(&format!("upnpc -6 -i -A :: 0 {host} 7600 6 60"));
    let id = pinhole_id(&output);
    assert!(reaches(FIRST_SYN), "not open after the pinhole: {output}");
    let leases = lab.client().list();
    assert_eq!(leases.leases[0].grants[0].host, host);

    let (_, output) = app.run(&format!("upnpc -6 -i -U {id} 120"));
    assert!(reaches(FIRST_SYN), "closed by the update: {output}");
    // The agent counts no pinhole's packets: UPnP's 501, and the pinhole stays.
    let (_, output) = app.run(&format!("upnpc -6 -i -K {id}"));
    assert!(output.contains("failed with code 501"), "{output}");
    assert!(reaches(FIRST_SYN), "closed by -K: {output}");
    let (_, output) = app.run(&format!("upnpc -6 -i -D {id}"));
    assert!(!reaches(REFUSED), "still open after the delete: {output}");
    assert!(lab.client().list().leases.is_empty());
}

/// The UniqueID `upnpc -A` printed for the pinhole it added.
fn pinhole_id(output: &str) -> String {
    output
        .split("Pinhole ID")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .find(|w| !w.is_empty())
        })
        .unwrap_or_else(|| panic!("no pinhole id: {output}"))
        .to_owned()
}

#[test]
fn upnpc_keeps_a_port_mapping_and_a_pinhole_of_one_port_apart() {
    if !lab::require_root("upnpc_keeps_a_port_mapping_and_a_pinhole_of_one_port_apart") {
        return;
    }
    assert!(
        have("upnpc"),
        "upnpc is not installed (scripts/deps.sh installs miniupnpc)"
    );
    let lab = frontend_lab("upnp-both", &[], "[frontends]\nupnp = true\n");
    let host = lab.topology.host().v4;
    let host6 = lab.topology.host().v6;
    let reaches6 = |within| {
        lab::tcp_connects(
            &lab.topology.outside,
            SocketAddr::new(host6, 7700),
            None,
            within,
        )
    };
    let mut app = Application::start(&lab, &[7700], &[]);

    // A port mapping (IPv4), then a pinhole (IPv6) of the same port: both open.
    let (_, output) = app.run(&format!("upnpc -i -a {host} 7700 7700 TCP"));
    assert!(output.contains("is redirected to internal"), "{output}");
    assert!(!reaches6(REFUSED), "the mapping opened IPv6: {output}");
    let (_, output) = app.run(&format!("upnpc -6 -i -A :: 0 {host6} 7700 6 60"));
    let id = pinhole_id(&output);
    assert!(reaches6(FIRST_SYN), "not open after the pinhole: {output}");
    assert!(
        lab.outside_reaches(7700, FIRST_SYN),
        "the pinhole closed the mapping: {output}"
    );
    assert_eq!(lab.client().list().leases.len(), 2);

    // The mappings listed are the port mapping alone.
    let (_, output) = app.run("upnpc -i -l");
    assert_eq!(output.matches("7700->").count(), 1, "{output}");

    // -d deletes the mapping, not the pinhole.
    let (_, output) = app.run("upnpc -i -d 7700 TCP");
    assert!(
        !lab.outside_reaches(7700, REFUSED),
        "still open after -d: {output}"
    );
    assert!(
        reaches6(FIRST_SYN),
        "the pinhole went with the mapping: {output}"
    );

    // -D deletes the pinhole, not the mapping.
    let (_, output) = app.run(&format!("upnpc -i -a {host} 7700 7700 TCP"));
    assert!(output.contains("is redirected to internal"), "{output}");
    let (_, output) = app.run(&format!("upnpc -6 -i -D {id}"));
    assert!(!reaches6(REFUSED), "still open after -D: {output}");
    assert!(
        lab.outside_reaches(7700, FIRST_SYN),
        "the mapping went with the pinhole: {output}"
    );
    assert_eq!(lab.client().list().leases.len(), 1);
}

#[test]
fn upnpc_keeps_mappings_of_one_port_for_other_remote_hosts_and_families_apart() {
    if !lab::require_root(
        "upnpc_keeps_mappings_of_one_port_for_other_remote_hosts_and_families_apart",
    ) {
        return;
    }
    assert!(
        have("upnpc"),
        "upnpc is not installed (scripts/deps.sh installs miniupnpc)"
    );
    let lab = frontend_lab("upnp-apart", &[], "[frontends]\nupnp = true\n");
    let (host, host6) = (lab.topology.host().v4, lab.topology.host().v6);
    let (remote, remote_alt) = (lab.topology.outside_v6, lab.topology.outside_v6_alt);
    let reaches = |to: std::net::IpAddr, from: Option<std::net::IpAddr>, within| {
        lab::tcp_connects(
            &lab.topology.outside,
            SocketAddr::new(to, 7710),
            from,
            within,
        )
    };
    let mut app = Application::start(&lab, &[7710], &[]);

    // Two pinholes of the port, each for one remote host: each opens to its own.
    let (_, output) = app.run(&format!("upnpc -6 -i -A {remote} 0 {host6} 7710 6 60"));
    let first = pinhole_id(&output);
    let (_, output) = app.run(&format!("upnpc -6 -i -A {remote_alt} 0 {host6} 7710 6 60"));
    let second = pinhole_id(&output);
    assert_ne!(first, second);
    assert!(
        reaches(host6, Some(remote), FIRST_SYN),
        "the second pinhole closed the first: {output}"
    );
    assert!(
        reaches(host6, Some(remote_alt), FIRST_SYN),
        "not open to the second remote host: {output}"
    );
    assert_eq!(lab.client().list().leases.len(), 2);

    // Deleting one leaves the other.
    let (_, output) = app.run(&format!("upnpc -6 -i -D {first}"));
    assert!(
        !reaches(host6, Some(remote), REFUSED),
        "still open to the first remote host: {output}"
    );
    assert!(
        reaches(host6, Some(remote_alt), FIRST_SYN),
        "the delete closed the other pinhole: {output}"
    );
    let (_, output) = app.run(&format!("upnpc -6 -i -D {second}"));
    assert!(
        !reaches(host6, Some(remote_alt), REFUSED),
        "still open after both deletes: {output}"
    );
    assert!(lab.client().list().leases.is_empty());

    // A port mapping over IPv4 and one over IPv6: both open; -d over IPv6 deletes the IPv6
    // one only. Over IPv6, upnpc is given the description's URL on the host's address the
    // certificate holds: it maps for the address it asks from.
    let over_ipv6 = format!("upnpc -u http://[{host6}]:49152/rootDesc.xml -6 -i");
    let (_, output) = app.run(&format!("upnpc -i -a {host} 7710 7710 TCP"));
    assert!(output.contains("is redirected to internal"), "{output}");
    let (_, output) = app.run(&format!("{over_ipv6} -a {host6} 7710 7710 TCP"));
    assert!(output.contains("is redirected to internal"), "{output}");
    assert!(
        reaches(host6, None, FIRST_SYN),
        "not open over IPv6: {output}"
    );
    assert!(
        reaches(host, None, FIRST_SYN),
        "the IPv6 mapping closed the IPv4 one: {output}"
    );
    assert_eq!(lab.client().list().leases.len(), 2);
    let (_, output) = app.run(&format!("{over_ipv6} -d 7710 TCP"));
    assert!(
        !reaches(host6, None, REFUSED),
        "still open over IPv6 after -d: {output}"
    );
    assert!(
        reaches(host, None, FIRST_SYN),
        "-d over IPv6 closed the IPv4 mapping: {output}"
    );
    let (_, output) = app.run("upnpc -i -d 7710 TCP");
    assert!(
        !reaches(host, None, REFUSED),
        "still open over IPv4 after -d: {output}"
    );
    assert!(lab.client().list().leases.is_empty());
}

/// Has `app` post WANIPv6FirewallControl's UpdatePinhole of pinhole `id` to the agent on
/// `host`: upnpc's -U asks CheckPinholeWorking first, which the agent does not offer, and then
/// sends no UpdatePinhole. The answer's text.
fn update_pinhole(app: &mut Application, host: std::net::IpAddr, id: &str) -> String {
    let to = SocketAddr::new(host, 49152);
    let service = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1";
    let body = format!(
        r#"<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:UpdatePinhole xmlns:u="{service}"><UniqueID>{id}</UniqueID><NewLeaseTime>60</NewLeaseTime></u:UpdatePinhole></s:Body></s:Envelope>"#
    );
    let request = format!(
        "POST /ctl/IP6FCtl HTTP/1.1\r\nHost: {to}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nSOAPAction: \"{service}#UpdatePinhole\"\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, answer) = app.run(&format!("ask-tcp {to} {}", to_hex(request.as_bytes())));
    assert_eq!(status, 0, "{answer}");
    String::from_utf8_lossy(&from_hex(&answer).expect("hex")).into_owned()
}

#[test]
fn update_pinhole_does_not_bring_back_a_pinhole_that_ended() {
    if !lab::require_root("update_pinhole_does_not_bring_back_a_pinhole_that_ended") {
        return;
    }
    assert!(
        have("upnpc"),
        "upnpc is not installed (scripts/deps.sh installs miniupnpc)"
    );
    let lab = frontend_lab("upnp6-ended", &[], "[frontends]\nupnp = true\n");
    let host = lab.topology.host().v6;
    let target = SocketAddr::new(host, 7701);
    let reaches = |within| lab::tcp_connects(&lab.topology.outside, target, None, within);
    let mut app = Application::start(&lab, &[7701], &[]);

    // A live pinhole is updated, and stays open.
    let (_, output) = app.run(&format!("upnpc -6 -i -A :: 0 {host} 7701 6 5"));
    let id = pinhole_id(&output);
    assert!(reaches(FIRST_SYN), "not open after the pinhole: {output}");
    let answer = update_pinhole(&mut app, host, &id);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(reaches(FIRST_SYN), "closed by the update");
    // Not refreshed within its lease time (the update could not lengthen it), the pinhole
    // ends; updating it then is NoSuchEntry, and opens nothing.
    assert!(
        lab.eventually(STEP, || lab.client().list().leases.is_empty()),
        "the pinhole outlived its lease time"
    );
    let answer = update_pinhole(&mut app, host, &id);
    assert!(answer.contains("<errorCode>704</errorCode>"), "{answer}");
    assert!(!reaches(REFUSED), "the update opened the pinhole again");
    assert!(lab.client().list().leases.is_empty());

    // Added twice and deleted under its second ID: the first ID names nothing either.
    let (_, output) = app.run(&format!("upnpc -6 -i -A :: 0 {host} 7701 6 60"));
    let first = pinhole_id(&output);
    let (_, output) = app.run(&format!("upnpc -6 -i -A :: 0 {host} 7701 6 60"));
    let second = pinhole_id(&output);
    let (_, output) = app.run(&format!("upnpc -6 -i -D {second}"));
    assert!(!reaches(REFUSED), "still open after -D: {output}");
    let answer = update_pinhole(&mut app, host, &first);
    assert!(answer.contains("<errorCode>704</errorCode>"), "{answer}");
    assert!(!reaches(REFUSED), "the update opened the pinhole again");
    assert!(lab.client().list().leases.is_empty());
}

#[test]
fn upnpc_shows_the_connection_and_the_agent_tells_it_does_not_translate() {
    if !lab::require_root("upnpc_shows_the_connection_and_the_agent_tells_it_does_not_translate") {
        return;
    }
    assert!(
        have("upnpc"),
        "upnpc is not installed (scripts/deps.sh installs miniupnpc)"
    );
    let lab = frontend_lab("upnp-status", &[], "[frontends]\nupnp = true\n");
    let host = lab.topology.host().v4;
    let mut app = Application::start(&lab, &[], &[]);

    // Each action -s asks answers: no "failed" line.
    let (code, output) = app.run("upnpc -i -s");
    assert_eq!(code, 0, "{output}");
    assert!(!output.contains("failed"), "{output}");
    assert!(output.contains("Connection Type : IP_Routed"), "{output}");
    assert!(output.contains("Status : Connected"), "{output}");
    assert!(
        output.contains(&format!("ExternalIPAddress = {host}")),
        "{output}"
    );

    // GetNATRSIPStatus, which WANIPConnection:1 requires: neither RSIP nor NAT.
    let body = br#"<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:GetNATRSIPStatus xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1"></u:GetNATRSIPStatus></s:Body></s:Envelope>"#;
    let answer = post_soap_as(&lab, "GetNATRSIPStatus", body);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        answer.contains("<NewRSIPAvailable>0</NewRSIPAvailable>"),
        "{answer}"
    );
    assert!(
        answer.contains("<NewNATEnabled>0</NewNATEnabled>"),
        "{answer}"
    );
}

/// Listens on port 5350 in `ns`, over IPv4 and IPv6, as NAT-PMP and PCP clients listen for
/// announcements, until `enough` says so of what was heard (source, datagram) or `within` has
/// passed; what was heard.
fn hear_announcements(
    ns: &Netns,
    within: Duration,
    mut enough: impl FnMut(&[(SocketAddr, Vec<u8>)]) -> bool + Send,
) -> Vec<(SocketAddr, Vec<u8>)> {
    ns.run(|| {
        let v4 = UdpSocket::bind("0.0.0.0:5350").expect("bind 5350");
        let v6 = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .expect("a socket");
        v6.set_only_v6(true).expect("IPV6_V6ONLY");
        v6.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 5350)).into())
            .expect("bind [::]:5350");
        let v6: UdpSocket = v6.into();
        for socket in [&v4, &v6] {
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
        }
        let mut heard = Vec::new();
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 1100];
        while Instant::now() < deadline && !enough(&heard) {
            for socket in [&v4, &v6] {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    heard.push((from, buf[..n].to_vec()));
                }
            }
        }
        heard
    })
}

/// The IP packets to UDP port 5350 that reach any interface of `ns` (read before routing, as a
/// packet capture does: the gateway drops a packet from its own address unseen) until `done`
/// or `within` has passed.
fn captured_announcements(
    ns: &Netns,
    within: Duration,
    done: &std::sync::atomic::AtomicBool,
) -> Vec<Vec<u8>> {
    ns.run(|| {
        const ETH_P_ALL: u16 = 0x0003;
        let socket = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::from(i32::from(ETH_P_ALL.to_be()))),
        )
        .expect("a packet socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let socket: UdpSocket = socket.into();
        // The UDP destination port of an IPv4 or IPv6 packet without options or extension
        // headers.
        let destination_port = |packet: &[u8]| {
            let (protocol, header) = match packet.first()? >> 4 {
                4 => (*packet.get(9)?, usize::from(packet[0] & 0x0f) * 4),
                6 => (*packet.get(6)?, 40),
                _ => return None,
            };
            let port = packet.get(header + 2..header + 4)?;
            (protocol == 17).then(|| u16::from_be_bytes([port[0], port[1]]))
        };
        let mut captured = Vec::new();
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline && !done.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf)
                && destination_port(&buf[..n]) == Some(5350)
            {
                captured.push(buf[..n].to_vec());
            }
        }
        captured
    })
}

#[test]
fn natpmp_and_pcp_announce_from_the_gateways_address_and_port() {
    if !lab::require_root("natpmp_and_pcp_announce_from_the_gateways_address_and_port") {
        return;
    }
    let lab = frontend_lab("announce", &[], "[frontends]\nnatpmp = true\npcp = true\n");
    let (gateway, gateway6) = (
        gateway_of(&lab),
        SocketAddr::new(lab.topology.gateway_inside_v6, 5351),
    );
    let octets = |address: std::net::IpAddr| match address {
        std::net::IpAddr::V4(v4) => v4.octets(),
        std::net::IpAddr::V6(_) => unreachable!("an IPv4 address"),
    };
    // NAT-PMP's external address (RFC 6886 section 3.2.1) with `address`; PCP's unsolicited
    // ANNOUNCE (RFC 6887 section 14.1.3): version 2, the answer to opcode 0, success, lifetime
    // 0, then the epoch and 12 reserved octets.
    let natpmp_of = |address: std::net::IpAddr| {
        move |(from, datagram): &(SocketAddr, Vec<u8>)| {
            *from == gateway
                && datagram.len() == 12
                && datagram[..4] == [0, 128, 0, 0]
                && datagram[8..12] == octets(address)
        }
    };
    let pcp_from = |origin: SocketAddr| {
        move |(from, datagram): &(SocketAddr, Vec<u8>)| {
            *from == origin
                && datagram.len() == 24
                && datagram[..8] == [2, 0x80, 0, 0, 0, 0, 0, 0]
                && datagram[12..] == [0; 12]
        }
    };
    let natpmp = natpmp_of(lab.topology.host().v4);
    let (pcp, pcp6) = (pcp_from(gateway), pcp_from(gateway6));

    // The announcements after start follow each other at 250 ms, 500 ms, 1 s, 2 s, 4 s...: one
    // of each comes within the next ten seconds, each from its gateway's address and port 5351.
    // They speak for the gateway, which did not send them: nothing reaches the link.
    let done = std::sync::atomic::AtomicBool::new(false);
    let (heard, on_the_link) = std::thread::scope(|scope| {
        let link = scope.spawn(|| {
            captured_announcements(&lab.topology.gateway, Duration::from_secs(12), &done)
        });
        let heard = hear_announcements(
            &lab.topology.host().netns,
            Duration::from_secs(10),
            |heard| heard.iter().any(natpmp) && heard.iter().any(pcp) && heard.iter().any(pcp6),
        );
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (heard, link.join().expect("the capture"))
    });
    assert!(
        heard.iter().any(natpmp),
        "no NAT-PMP announcement: {heard:?}"
    );
    assert!(
        heard.iter().any(pcp),
        "no PCP ANNOUNCE over IPv4: {heard:?}"
    );
    assert!(
        heard.iter().any(pcp6),
        "no PCP ANNOUNCE over IPv6: {heard:?}"
    );
    assert!(
        heard
            .iter()
            .all(|(from, _)| *from == gateway || *from == gateway6),
        "an announcement from elsewhere: {heard:?}"
    );
    assert!(on_the_link.is_empty(), "heard on the link: {on_the_link:?}");

    // The host's address towards the gateway changes: NAT-PMP announces the new one.
    let alt = lab
        .topology
        .host()
        .v4_alt
        .expect("the host of Topology::new has a second IPv4 address");
    let route = lab
        .topology
        .host()
        .netns
        .exec_checked(&["ip", "-4", "-o", "route", "show", "proto", "kernel"])
        .expect("the host's routes");
    let subnet: Vec<&str> = route
        .lines()
        .find(|line| line.contains(&format!("src {}", lab.topology.host().v4)))
        .unwrap_or_else(|| panic!("no route of the host's subnet: {route}"))
        .split_whitespace()
        .take_while(|word| *word != "proto")
        .collect();
    let mut change = vec!["ip", "route", "replace"];
    change.extend(subnet);
    let alt_text = alt.to_string();
    change.extend(["src", alt_text.as_str()]);
    lab.topology
        .host()
        .netns
        .exec_checked(&change)
        .expect("change the host's address towards the gateway");
    let moved = natpmp_of(alt);
    let heard = hear_announcements(
        &lab.topology.host().netns,
        Duration::from_secs(10),
        |heard| heard.iter().any(moved),
    );
    assert!(
        heard.iter().any(moved),
        "no announcement of the new address: {heard:?}"
    );
}
