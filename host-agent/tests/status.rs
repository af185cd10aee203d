//! What the real `fwnp-agent` tells an operator who asks why it is not connected: a gateway
//! whose certificate does not carry the configured name is named as the cause in Status (local
//! API key 10), not left as a bare "not connected". The gateway is a real QUIC endpoint with
//! the gateway's TLS configuration on 127.0.0.1. No root needed (mirror off).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn status_says_why_the_agent_is_not_connected() {
    let pki = Pki::with_gateway_ips("status-why", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    pki.host("web-01", &[], &[], &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let gateway = {
        let endpoint = gateway_endpoint(&pki, &runtime);
        let address = endpoint.local_addr().expect("address");
        runtime.spawn(async move {
            // Accept handshakes (which the agent aborts) for as long as the test runs.
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    let _ = incoming.await;
                });
            }
        });
        address
    };

    let dir = temp_dir("status-why");
    let config = dir.path().join("agent.toml");
    // The gateway's certificate names GATEWAY_NAME; the agent expects another name.
    let text = agent_config(
        &pki,
        "web-01",
        dir.path(),
        &gateway.to_string(),
        "off",
        &my_uid().to_string(),
        "1s",
    )
    .replace(GATEWAY_NAME, "gateway.elsewhere.test");
    std::fs::write(&config, text).expect("write config");
    let socket = dir.path().join("agent.sock");
    let mut agent = ProcessGuard(Some(
        agent_command(&config).spawn().expect("start fwnp-agent"),
    ));
    wait_for_socket(&mut agent, &socket);

    let mut client = LocalClient::connect(&socket);
    let deadline = Instant::now() + STEP;
    let status = loop {
        let status = client.status();
        assert!(!status.connected, "connected to a gateway of another name");
        // Before the first attempt ends, Status says only that none has.
        if status
            .last_error
            .as_deref()
            .is_some_and(|e| e != "no connection attempt has ended yet")
        {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "Status never said why the agent is not connected: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let why = status.last_error.expect("a reason");
    assert!(why.contains(&gateway.to_string()), "{why}");
    assert!(
        why.contains("gateway.elsewhere.test") && why.contains("not valid for name"),
        "{why}"
    );
}
