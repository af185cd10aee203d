//! `examples/serve.c`, built with `cc` against the built libfwnp and run.
//!
//! As root, in network namespaces with the real `fwnp-gateway` and `fwnp-agent` (the
//! interop-tests lab): it opens its port, a connection from the outside namespace gets its
//! answer, it releases, and the outside can no longer connect while the server still listens.
//! The same run again under Valgrind (`--leak-check=full`) must end without a leak or an error.
//! Skipped when not root, failing instead under `FWNP_REQUIRE_NETNS=1`.
//!
//! Without root: the library installs with `install.sh`, its pkg-config file gives what a
//! build needs, dynamically and statically, and the program reports a missing agent with the
//! library's error text.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

mod common;

use common::{VALGRIND, cc, compile, crate_dir, library_dir, require_valgrind};
use fwnp_interop_tests::{
    Binaries, Lab, LabOptions, TempDir, netns_command, require_root, wait_until,
};

/// How long a step of the program may take (Valgrind makes it many times slower).
const STEP: Duration = Duration::from_secs(60);
/// A connection attempt without an answer within this long counts as refused.
const REFUSED: Duration = Duration::from_millis(1200);

const POLICY: &str = r#"
[defaults]
lifetime = "30s"
min_lifetime = "1s"
max_lifetime = "5m"

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "web"
groups = ["hosts"]
allow = "tcp/8000-8999"
"#;

/// A running serve.c: its standard input (closing it ends the program) and its output lines.
struct Served {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Served {
    fn start(mut command: Command) -> Served {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve starts");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (sender, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Served {
            child,
            stdin,
            lines,
            stderr: Some(stderr),
        }
    }

    /// The next line of output that starts with `prefix`, within [`STEP`].
    fn expect_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("serve did not print {prefix:?} within {STEP:?}");
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    panic!("serve ended before printing {prefix:?}");
                }
            }
        }
    }

    /// Closes its standard input and waits (bounded) for it to end; its exit code and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        drop(self.stdin.take());
        let ended = wait_until(STEP, Duration::from_millis(50), || {
            self.child.try_wait().is_ok_and(|status| status.is_some())
        });
        if !ended {
            let _ = self.child.kill();
        }
        let status = self.child.wait().expect("serve's status");
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (status.code(), stderr)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connects from the outside namespace to `to`, sends a line and returns the answer line.
fn ask_from_outside(lab: &Lab, to: SocketAddr, line: &str) -> std::io::Result<String> {
    lab.site.outside.run(|| {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(STEP))?;
        stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        Ok(answer)
    })
}

/// One run of serve.c on `port` (under `wrapper`, e.g. Valgrind, when given) in host 0's
/// namespace: opened, reached from outside, released, then refused while still listening.
fn serve_once(lab: &Lab, serve: &Path, port: u16, wrapper: &[&str]) -> (Option<i32>, String) {
    let ns = &lab.site.hosts[0].netns;
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = netns_command(ns, program);
            command.args(args).arg(serve);
            command
        }
        None => netns_command(ns, serve),
    };
    command
        .arg(port.to_string())
        .env("FWNP_AGENT_SOCKET", lab.agent_socket(0));
    let mut served = Served::start(command);

    let open = served.expect_line("open ");
    let lease = open.trim_start_matches("open ").trim();
    assert_eq!(lease.len(), 32, "a lease id: {open}");
    let host: IpAddr = lab.site.hosts[0].v4;
    assert!(
        lab.gateway_has(host, "tcp", port),
        "{}",
        lab.gateway_table()
    );

    let answer = ask_from_outside(lab, SocketAddr::new(host, port), "ping from outside\n")
        .expect("the outside reaches serve.c while its lease is held");
    assert_eq!(answer, "hello from serve.c: ping from outside\n");
    served.expect_line("served");
    served.expect_line("released");

    // serve.c still listens; the gateway no longer lets the outside in.
    assert!(
        !lab.outside_reaches(0, false, port, REFUSED),
        "the outside still reaches tcp/{port} after the release"
    );
    assert!(
        !lab.gateway_has(host, "tcp", port),
        "{}",
        lab.gateway_table()
    );
    served.finish()
}

#[test]
fn serve_c_opens_serves_and_releases_also_under_valgrind() {
    if !require_root("serve_c_opens_serves_and_releases_also_under_valgrind") {
        return;
    }
    let dir = TempDir::new("serve-c").expect("a temporary directory");
    let serve = compile(
        &crate_dir().join("examples/serve.c"),
        &dir.path().join("serve"),
    );
    let options = LabOptions {
        label: "serve-c".into(),
        hosts: 1,
        host_prefix: "web".into(),
        policy: POLICY.into(),
        verify_port_owner: true,
    };
    let bins = Binaries::build().unwrap_or_else(|e| panic!("the lab's binaries: {e}"));
    let lab = Lab::start(bins, &options).unwrap_or_else(|e| panic!("{e}"));

    let (code, stderr) = serve_once(&lab, &serve, 8301, &[]);
    assert_eq!(code, Some(0), "serve.c failed: {stderr}");

    require_valgrind();
    let (code, stderr) = serve_once(&lab, &serve, 8302, &VALGRIND);
    assert_eq!(code, Some(0), "serve.c under valgrind: {stderr}");
    assert!(
        stderr.contains("ERROR SUMMARY: 0 errors"),
        "valgrind's report: {stderr}"
    );
}

/// `pkg-config` with the installed fwnp.pc.
fn pkg_config(pc_dir: &Path, args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("fwnp")
        .env("PKG_CONFIG_PATH", pc_dir)
        .output()
        .expect("running pkg-config");
    assert!(
        out.status.success(),
        "pkg-config {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn installed_with_pkg_config_it_links_dynamically_and_statically() {
    let dir = TempDir::new("fwnp-c-install").expect("a temporary directory");
    let prefix = dir.path().join("prefix");
    let out = Command::new(crate_dir().join("install.sh"))
        .arg(&prefix)
        .env("FWNP_LIB_DIR", library_dir())
        .output()
        .expect("running install.sh");
    assert!(
        out.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pc_dir = prefix.join("lib/pkgconfig");
    assert_eq!(
        pkg_config(&pc_dir, &["--modversion"]),
        vec![env!("CARGO_PKG_VERSION").to_owned()]
    );
    let source = crate_dir().join("examples/serve.c");

    let dynamic = dir.path().join("serve-dynamic");
    let mut args: Vec<std::ffi::OsString> =
        vec![source.clone().into(), "-o".into(), dynamic.clone().into()];
    args.extend(
        pkg_config(&pc_dir, &["--cflags", "--libs"])
            .into_iter()
            .map(Into::into),
    );
    args.push(format!("-Wl,-rpath,{}", prefix.join("lib").display()).into());
    cc(&args);

    // Statically: libfwnp.a and what it needs (Libs.private), no libfwnp.so at run time.
    let static_exe = dir.path().join("serve-static");
    let mut args: Vec<std::ffi::OsString> =
        vec![source.into(), "-o".into(), static_exe.clone().into()];
    args.extend(
        pkg_config(&pc_dir, &["--cflags"])
            .into_iter()
            .map(Into::into),
    );
    args.push(prefix.join("lib/libfwnp.a").into());
    args.extend(
        pkg_config(&pc_dir, &["--static", "--libs-only-l"])
            .into_iter()
            .filter(|flag| flag != "-lfwnp")
            .map(Into::into),
    );
    cc(&args);
    let ldd = Command::new("ldd").arg(&static_exe).output().expect("ldd");
    assert!(!String::from_utf8_lossy(&ldd.stdout).contains("libfwnp"));

    // Both report the missing agent with the library's own error text, and fail.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    for exe in [&dynamic, &static_exe] {
        let out = Command::new(exe)
            .arg(port.to_string())
            .env("FWNP_AGENT_SOCKET", dir.path().join("no-agent.sock"))
            .stdin(Stdio::null())
            .output()
            .expect("running serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("connecting to the host agent: fwnp_client_connect: cannot reach the FWNP host agent"),
            "{stderr}"
        );
        assert!(stderr.contains("no-agent.sock"), "{stderr}");
    }
}
