//! The request path of a service with its SQLite store and without a kernel filter, driven
//! through [`Service::handle`](super::Service::handle) as the transport drives it, and the
//! pieces other unit tests of the service build on.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fwnp_proto::{
    Capabilities, Common, Hello, HostAddresses, Message, Open, Opening, PortRange, Protocol,
    ResultCode, Target, codec,
};
use fwnp_trust::identity::{CertificateName, Fingerprint, IdentityKind, PeerIdentity, Serial};

use crate::sessions::{HostLink, NoticeFuture, Session};

/// A link that carries nothing: the request path answers through the stream, not the link.
#[derive(Debug)]
pub(super) struct NoLink;

impl HostLink for NoLink {
    fn send_notice(
        &self,
        _bytes: Vec<u8>,
        _acknowledged_within: Option<Duration>,
    ) -> NoticeFuture<'_> {
        Box::pin(async { Ok(()) })
    }

    fn close(&self, _reason: fwnp_proto::QuicErrorCode, _text: &str) {}
}

/// A service whose state is in `dir`, its policy allowing every TCP port to the load
/// generator's hosts, without a kernel filter.
pub(super) async fn unfiltered_service(dir: &Path) -> Arc<super::Service> {
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[defaults]\nlifetime = \"1h\"\nmax_leases = 100000\n\n[[group]]\nname = \"load\"\n\
         identities = [\"fwnp://host/load-*\"]\n\n[[rule]]\nname = \"load-any-tcp\"\n\
         groups = [\"load\"]\nallow = [\"tcp/*\"]\n",
    )
    .expect("policy file");
    let config = crate::config::GatewayConfig::parse(
        &format!(
            "listen = [\"127.0.0.1:4433\"]\ncertificate = \"/nonexistent/gw.pem\"\n\
             key = \"/nonexistent/gw.key\"\nca = \"/nonexistent/ca.pem\"\npolicy = \"{}\"\n\
             state_dir = \"{}\"\n\n[filter]\nenabled = false\n",
            policy.display(),
            dir.join("state").display()
        ),
        "gateway.toml",
    )
    .expect("configuration");
    super::Service::start(config, None).await.expect("service")
}

/// The session of a connection of the load generator's first host, its handshake done.
pub(super) fn load_session() -> Session {
    let remote: std::net::SocketAddr = "192.0.2.10:50000".parse().expect("address");
    let peer = PeerIdentity {
        identity: "fwnp://host/load-0".into(),
        kind: IdentityKind::Uri,
        ip_sans: Vec::new(),
        certificate: Arc::new(CertificateName {
            issuer: b"CN=load CA".to_vec(),
            serial: Serial::parse("01").expect("serial"),
        }),
        fingerprint: Fingerprint([7; 32]),
        not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
    };
    Session::new(1, Some(peer), None, remote, Box::new(NoLink))
}

fn common(id: u64) -> Common {
    Common {
        request_id: Some(id),
        critical: Vec::new(),
    }
}

/// A Hello of version 1, request `id`.
pub(super) fn hello(id: u64) -> Vec<u8> {
    codec::encode(&Message::Hello(Hello {
        common: common(id),
        versions: vec![1],
        capabilities: Capabilities(0),
        software: None,
    }))
}

/// An Open of TCP port 1024 + `i` for an hour, request `i + 1`.
pub(super) fn open(i: u16) -> Vec<u8> {
    codec::encode(&Message::Open(Open {
        common: common(u64::from(i) + 1),
        opening: Opening {
            target: Target::Ports {
                protocol: Protocol::Tcp,
                ports: PortRange::single(1024 + i),
            },
            host: HostAddresses::Default,
            family: None,
            remotes: Vec::new(),
        },
        lifetime: Some(3600),
        app: None,
    }))
}

/// The client may hold its Welcome, and send its next request, before the Welcome's own task
/// marks it written: that request waits for the mark and is served (spec 5.2), where it was
/// refused hello-required; one taken while a Welcome that never leaves is pending is refused.
#[test]
fn a_request_taken_before_its_welcome_is_marked_written_is_served() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let service = unfiltered_service(dir.path()).await;
        let session = Arc::new(load_session());
        assert!(matches!(
            service.handle(&session, &hello(100)).await,
            Message::Welcome(_)
        ));
        // The Welcome is decided, its bytes not yet marked written.
        let served = tokio::spawn({
            let (service, session) = (service.clone(), session.clone());
            async move { service.handle(&session, &open(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !served.is_finished(),
            "answered before the Welcome was written"
        );
        assert!(session.welcome_written());
        let answer = tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("answered once the Welcome is written")
            .expect("the request's task");
        assert!(matches!(answer, Message::Granted(_)), "{answer:?}");

        // A Welcome whose stream failed: the connection has none, and the request waiting for
        // it is refused.
        let other = Arc::new(load_session());
        assert!(matches!(
            service.handle(&other, &hello(100)).await,
            Message::Welcome(_)
        ));
        let refused = tokio::spawn({
            let (service, other) = (service.clone(), other.clone());
            async move { service.handle(&other, &open(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        other.welcome_not_written();
        let answer = tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .expect("answered once the Welcome failed")
            .expect("the request's task");
        assert!(
            matches!(&answer, Message::Denied(d) if d.code == ResultCode::HelloRequired),
            "{answer:?}"
        );
    });
}
