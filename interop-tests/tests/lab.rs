//! The lab demo (`fwnp-lab`) as a newcomer runs it: every step passes and nothing is left
//! behind; interrupted, it still removes everything; without root it says what it needs.
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

#[test]
fn lab_demo_interrupted_removes_everything() {
    if !require_root("lab_demo_interrupted_removes_everything") {
        return;
    }
    build_binaries();
    let mut child = Command::new(LAB)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fwnp-lab");
    let pid = child.id();
    // Interrupt it in the middle of the story, once the daemons run (step 2).
    let stdout = child.stdout.take().expect("stdout");
    // The reader drains the output to the end, so the lab never writes into a closed pipe.
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("[2]") {
                let _ = seen_tx.send(());
            }
        }
    });
    let reached = seen_rx.recv_timeout(Duration::from_secs(30)).is_ok();
    if !reached {
        let _ = child.kill();
    }
    assert!(reached, "the lab never reached step 2");
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
    let _ = reader.join();
    assert_eq!(status.code(), Some(130), "{status}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
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
