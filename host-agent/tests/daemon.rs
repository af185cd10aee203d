//! The real `fwnp-agent` under systemd's `Type=notify`: it says READY=1 once its socket serves
//! and STOPPING=1 on SIGTERM, then exits 0. No gateway is needed (none answers at the address
//! configured), and no root (mirror off).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixDatagram;

use common::*;
use fwnp_testkit::process::next_notice;

#[test]
fn systemd_is_told_ready_and_stopping() {
    let pki = Pki::with_gateway_ips("notify", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    pki.host("web-01", &[], &[], &[]);
    let dir = temp_dir("notify");
    let config = dir.path().join("agent.toml");
    let text = agent_config(
        &pki,
        "web-01",
        dir.path(),
        "127.0.0.1:9",
        "off",
        &my_uid().to_string(),
        "1s",
    );
    std::fs::write(&config, text).expect("write config");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    let mut agent = ProcessGuard(Some(
        agent_command(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .spawn()
            .expect("start fwnp-agent"),
    ));
    assert_eq!(next_notice(&notify, STEP), "READY=1\n");
    // Ready means serving: the local socket accepts.
    LocalClient::connect(&dir.path().join("agent.sock"));
    agent.signal("TERM");
    assert_eq!(next_notice(&notify, STEP), "STOPPING=1\n");
    let status = agent.wait_exit(STEP).expect("fwnp-agent did not stop");
    assert!(status.success(), "{status}");
}
