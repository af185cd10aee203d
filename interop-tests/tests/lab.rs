//! The lab demo (`fwnp-lab`) as a newcomer runs it: every step passes and nothing is left
//! behind; interrupted, it still removes everything; without root it says what it needs. The
//! same for its cluster story (`fwnp-lab --cluster`), which needs etcd as well: the host fails
//! over from a dead gateway to the other with its lease.
//!
//! The story itself needs root: skipped otherwise, failing instead when FWNP_REQUIRE_NETNS=1.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fwnp_interop_tests::{Binaries, require_root};

const LAB: &str = env!("CARGO_BIN_EXE_fwnp-lab");

/// The namespaces and temporary directories a lab process with `pid` left behind.
fn leftovers(pid: u32) -> Vec<String> {
    let marker = format!("-{pid}-");
    let mut left: Vec<String> = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(&marker))
        .map(str::to_string)
        .collect();
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("fwnp-lab") && name.contains(&marker) {
                left.push(name);
            }
        }
    }
    left
}

fn build_binaries() {
    if let Err(err) = Binaries::build() {
        panic!("the lab's binaries: {err}");
    }
}

#[test]
fn lab_demo_passes_every_step_and_leaves_nothing_behind() {
    if !require_root("lab_demo_passes_every_step_and_leaves_nothing_behind") {
        return;
    }
    build_binaries();
    let started = Instant::now();
    let child = Command::new(LAB)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fwnp-lab");
    let pid = child.id();
    let output = child.wait_with_output().expect("fwnp-lab runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "fwnp-lab failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("All 9 steps behaved as expected"),
        "{stdout}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

/// Runs `fwnp-lab ARGS`, interrupts it with SIGINT once it printed a line starting with
/// `step` (within `within`), and checks that it exits 130 leaving nothing behind; returns what
/// it printed.
fn interrupt_at(args: &[&str], step: &str, within: Duration) -> String {
    let mut child = Command::new(LAB)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fwnp-lab");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    // The reader drains the output to the end, so the lab never writes into a closed pipe.
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let marker = step.to_string();
    let reader = std::thread::spawn(move || {
        let mut printed = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(&marker) {
                let _ = seen_tx.send(());
            }
            printed += &line;
            printed.push('\n');
        }
        printed
    });
    let reached = seen_rx.recv_timeout(within).is_ok();
    if !reached {
        let _ = child.kill();
    }
    assert!(reached, "the lab never reached step {step}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("fwnp-lab did not stop within 10 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let printed = reader.join().unwrap_or_default();
    assert_eq!(status.code(), Some(130), "{status}\n{printed}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
    printed
}

/// The directory the cluster story says etcd's data and logs are in.
fn etcd_dir(stdout: &str) -> std::path::PathBuf {
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("etcd's data and logs in "))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("no etcd directory printed:\n{stdout}"))
}

#[test]
fn lab_demo_interrupted_removes_everything() {
    if !require_root("lab_demo_interrupted_removes_everything") {
        return;
    }
    build_binaries();
    // Interrupt it in the middle of the story, once the daemons run (step 2).
    interrupt_at(&[], "[2]", Duration::from_secs(30));
}

#[test]
fn lab_cluster_story_fails_over_and_leaves_nothing_behind() {
    if !fwnp_testkit::etcd::available("lab_cluster_story_fails_over_and_leaves_nothing_behind") {
        return;
    }
    build_binaries();
    let started = Instant::now();
    let child = Command::new(LAB)
        .arg("--cluster")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fwnp-lab --cluster");
    let pid = child.id();
    let output = child.wait_with_output().expect("fwnp-lab runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "fwnp-lab --cluster failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("All 8 steps behaved as expected"),
        "{stdout}"
    );
    // The failover as the story measured it: the same lease renewed through B within seconds.
    let renewed_ms: u64 = stdout
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("the application's Lease: renewed ")?
                .split(" ms after A's death")
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no measured failover:\n{stdout}"));
    assert!(
        renewed_ms < 10_000,
        "renewed {renewed_ms} ms after A's death"
    );
    for seen in [
        "fwnp status: connected to 198.51.100.2:4433 (B)",
        "the lease id is unchanged",
        "renewed lease",
        "got back \"hello through gateway B\"",
        "gateway A table: elements = { 198.51.100.10 . tcp . 7080",
    ] {
        assert!(stdout.contains(seen), "{seen:?} not in:\n{stdout}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(leftovers(pid), Vec::<String>::new());
    assert!(!etcd_dir(&stdout).exists(), "etcd's directory is left");
}

#[test]
fn lab_cluster_story_interrupted_removes_everything() {
    if !fwnp_testkit::etcd::available("lab_cluster_story_interrupted_removes_everything") {
        return;
    }
    build_binaries();
    // Interrupt it while the host fails over (step 5): etcd, both gateways and the agent run.
    let printed = interrupt_at(&["--cluster"], "[5]", Duration::from_secs(60));
    assert!(!etcd_dir(&printed).exists(), "etcd's directory is left");
}

#[test]
fn lab_demo_without_root_says_what_it_needs() {
    let mut command = Command::new(LAB);
    if nix::unistd::Uid::effective().is_root() {
        // Drop to nobody for this run.
        command.uid(65534).gid(65534);
    }
    let output = command.stdin(Stdio::null()).output().expect("run fwnp-lab");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
    assert!(stderr.contains("network namespaces"), "{stderr}");
    assert!(stderr.contains("sudo scripts/lab"), "{stderr}");
}

#[test]
fn lab_cluster_story_without_etcd_says_what_it_needs() {
    if !require_root("lab_cluster_story_without_etcd_says_what_it_needs") {
        return;
    }
    // No etcd on an empty PATH: it says so before it creates anything.
    let output = Command::new(LAB)
        .arg("--cluster")
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .expect("run fwnp-lab --cluster");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--cluster needs etcd"), "{stderr}");
    assert!(stderr.contains("etcd-server"), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).is_empty());
}
