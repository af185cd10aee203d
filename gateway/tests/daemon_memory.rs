//! What the daemon's process keeps resident beside its objects.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The anonymous memory of process `pid` that the kernel backs with transparent huge pages, in
/// KiB (`AnonHugePages` of `/proc/PID/smaps_rollup`).
fn anon_huge_pages_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .expect("read the daemon's smaps_rollup");
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("AnonHugePages:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or_else(|| panic!("no AnonHugePages in {rollup}"))
}

/// mimalloc asks the kernel for transparent huge pages on the memory it maps (`madvise`), and a
/// kernel that grants them on request (the usual `madvise` mode) makes each 2 MiB page resident
/// as a whole as soon as any byte of it is touched: 15 MiB of an idle gateway's 32 MiB, and at
/// 10,000 idle hosts most of the process (270 of 331 MiB) in huge pages, 0.5-0.9 KiB of each
/// connection's resident 30.7-31.1 KiB. The daemon's mimalloc is built without that request, so an
/// idle daemon holds none. Where the kernel gives huge pages to every process (`always`) or to
/// none (`never`), what mimalloc asks makes no difference, and the test says so and passes.
#[test]
fn the_daemon_holds_no_transparent_huge_pages() {
    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !mode.contains("[madvise]") {
        eprintln!(
            "skipped: transparent huge pages are not given on request here ({:?})",
            mode.trim()
        );
        return;
    }
    let pki = Pki::new("huge-pages");
    let dir = temp_dir("huge-pages");
    write_policy(&dir.path().join("policy.toml"), "");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        config_text(&pki, dir.path(), "127.0.0.1:0", "[filter]\nenabled = false"),
    )
    .expect("write config");
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_fwnp-gateway"))
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start fwnp-gateway");
    let admin_socket = dir.path().join("admin.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&admin_socket).is_err()
        && Instant::now() < deadline
        && daemon.try_wait().ok().flatten().is_none()
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = std::os::unix::net::UnixStream::connect(&admin_socket).is_ok();
    let huge = ready.then(|| anon_huge_pages_kib(daemon.id()));
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(ready, "the daemon did not start within 20 s");
    assert_eq!(
        huge,
        Some(0),
        "KiB of the idle daemon in transparent huge pages"
    );
}
