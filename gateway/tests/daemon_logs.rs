//! The daemon's logs as an operator collects them: written to a file (or a pipe, or the
//! journal), they carry no terminal colour codes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fwnp_testkit::process::{ProcessGuard, next_notice};

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    let pki = Pki::new("plain-logs");
    let dir = temp_dir("plain-logs");
    write_policy(&dir.path().join("policy.toml"), "");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        config_text(&pki, dir.path(), "127.0.0.1:0", "[filter]\nenabled = false"),
    )
    .expect("write config");
    let log = dir.path().join("gateway.log");
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_fwnp-gateway"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).expect("log file"))
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
    let _ = daemon.kill();
    let _ = daemon.wait();
    let text = std::fs::read_to_string(&log).expect("read the log");
    assert!(
        text.contains("INFO"),
        "the daemon logged nothing at info: {text:?}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text:?}"
    );
}

#[test]
fn systemd_is_told_ready_reloading_and_stopping() {
    let pki = Pki::new("notify");
    let dir = temp_dir("notify");
    write_policy(&dir.path().join("policy.toml"), "");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        config_text(&pki, dir.path(), "127.0.0.1:0", "[filter]\nenabled = false"),
    )
    .expect("write config");
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    let mut daemon = ProcessGuard::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_fwnp-gateway"))
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "warn"),
    )
    .expect("start fwnp-gateway");
    assert_eq!(next_notice(&notify, Duration::from_secs(20)), "READY=1\n");
    daemon.signal("HUP");
    assert_eq!(
        next_notice(&notify, Duration::from_secs(20)),
        "RELOADING=1\n"
    );
    assert_eq!(next_notice(&notify, Duration::from_secs(20)), "READY=1\n");
    daemon.signal("TERM");
    assert_eq!(
        next_notice(&notify, Duration::from_secs(20)),
        "STOPPING=1\n"
    );
    let status = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("fwnp-gateway did not stop");
    assert!(status.success(), "{status}");
}
