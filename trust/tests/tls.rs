//! The trust layer over real QUIC: certificates made by `pki` (and by the `openssl` command),
//! the gateway's and the host's TLS configurations from `tls`, and the identity the gateway reads
//! from `identity`. Endpoints listen on 127.0.0.1 only; every handshake is bounded in time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fwnp_trust::identity::{IdentityError, IdentityKind, PeerIdentity, Serial, allowed_addresses};
use fwnp_trust::pki::{self, PkiError, RevocationReason, Validity};
use fwnp_trust::tls::{
    self, ClientOptions, ClientTlsFiles, HandshakeRefusal, ServerOptions, ServerTlsFiles, TlsError,
};
use quinn::{Connection, ConnectionError, Endpoint, TransportErrorCode};
use rustls::AlertDescription;

const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const GATEWAY_NAME: &str = "gateway.test";

/// A directory removed when the test ends, whatever the outcome.
use tempfile::TempDir;

fn temp_dir(label: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fwnp-tls-{label}-"))
        .tempdir()
        .expect("create temp dir")
}

/// A CA with a gateway certificate, as `fwnpctl pki init` + `pki issue gateway` make them.
struct TestCa {
    dir: TempDir,
}

impl TestCa {
    fn new(label: &str) -> Self {
        let dir = temp_dir(label);
        pki::init_ca(
            dir.path(),
            &format!("FWNP Test CA {label}"),
            Validity::days(2),
        )
        .expect("init CA");
        pki::issue_gateway(
            dir.path(),
            "gateway",
            &[GATEWAY_NAME.to_owned()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Validity::days(2),
        )
        .expect("issue gateway");
        TestCa { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    fn server_files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.file("gateway.pem"),
            key: self.file("gateway.key"),
            ca: self.file("ca.pem"),
            crl: Some(self.file("crl.pem")),
        }
    }

    fn client_files(&self, host: &str) -> ClientTlsFiles {
        ClientTlsFiles {
            cert: self.file(&format!("{host}.pem")),
            key: self.file(&format!("{host}.key")),
            ca: self.file("ca.pem"),
        }
    }

    fn host(
        &self,
        name: &str,
        ips: &[IpAddr],
        uris: &[&str],
        dns: &[&str],
    ) -> pki::IssuedCertificate {
        let uris: Vec<String> = uris.iter().map(|s| s.to_string()).collect();
        let dns: Vec<String> = dns.iter().map(|s| s.to_string()).collect();
        pki::issue_host(self.path(), name, ips, &uris, &dns, Validity::days(1)).expect("issue host")
    }
}

fn server(files: &ServerTlsFiles) -> Endpoint {
    let config =
        tls::server_config_from_files(files, &ServerOptions::default()).expect("server config");
    Endpoint::server(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind server")
}

fn client_config(files: &ClientTlsFiles) -> quinn::ClientConfig {
    tls::client_config_from_files(files, &ClientOptions::default()).expect("client config")
}

/// What both ends saw of one connection attempt.
struct Attempt {
    server: Result<Connection, ConnectionError>,
    client: Result<Connection, ConnectionError>,
}

async fn attempt(
    server: &Endpoint,
    client_config: quinn::ClientConfig,
    server_name: &str,
) -> Attempt {
    let address = server.local_addr().expect("server address");
    let client = Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind client");
    let connecting = client
        .connect_with(client_config, address, server_name)
        .expect("connect");
    let accept = async {
        let incoming = server.accept().await.expect("server endpoint open");
        incoming.await
    };
    let (server_result, client_result) =
        tokio::time::timeout(STEP_TIMEOUT, async { tokio::join!(accept, connecting) })
            .await
            .expect("handshake did not finish within the timeout");
    Attempt {
        server: server_result,
        client: client_result,
    }
}

/// Host `web-01` (IP SAN 10.1.2.3, under a CA of its own named `label`) connected to a
/// gateway endpoint: both ends' connections, with the CA and the endpoint they live by.
struct Connected {
    _ca: TestCa,
    _endpoint: Endpoint,
    server: Connection,
    client: Connection,
}

/// A CA of its own named `label`, which has issued host `web-01` (IP SAN 10.1.2.3).
fn ca_with_web_01(label: &str) -> TestCa {
    let ca = TestCa::new(label);
    ca.host(
        "web-01",
        &[IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))],
        &[],
        &[],
    );
    ca
}

async fn web_01_connected(label: &str) -> Connected {
    let ca = ca_with_web_01(label);
    let endpoint = server(&ca.server_files());
    let attempt = attempt(
        &endpoint,
        client_config(&ca.client_files("web-01")),
        GATEWAY_NAME,
    )
    .await;
    Connected {
        server: attempt.server.expect("server accepted"),
        client: attempt.client.expect("client connected"),
        _ca: ca,
        _endpoint: endpoint,
    }
}

/// The crypto error code of an alert, as QUIC carries it.
fn alert_code(alert: AlertDescription) -> TransportErrorCode {
    TransportErrorCode::crypto(u8::from(alert))
}

/// Asserts that the gateway refused the handshake with `alert` and a reason containing `reason`,
/// and that the host saw the connection closed with the same code.
async fn assert_refused(attempt: Attempt, alert: AlertDescription, reason: &str) {
    match &attempt.server {
        Err(ConnectionError::TransportError(error)) => {
            assert_eq!(error.code, alert_code(alert), "server error: {error}");
            assert_eq!(
                attempt
                    .server
                    .as_ref()
                    .err()
                    .and_then(tls::handshake_refusal),
                Some(expected_refusal(alert))
            );
            assert!(
                error.reason.contains(reason),
                "server reason {:?} lacks {reason:?}",
                error.reason
            );
        }
        Err(other) => panic!("server failed with {other:?}, expected a TLS alert {alert:?}"),
        Ok(connection) => panic!(
            "server accepted a connection it should refuse (peer {:?})",
            PeerIdentity::from_connection(connection)
        ),
    }
    let client_error = match attempt.client {
        Err(error) => error,
        // In TLS 1.3 the client may finish its side before the server has judged its certificate:
        // the refusal then arrives as the connection's close.
        Ok(connection) => tokio::time::timeout(STEP_TIMEOUT, connection.closed())
            .await
            .expect("client close timed out"),
    };
    match client_error {
        ConnectionError::ConnectionClosed(ref close) => {
            assert_eq!(close.error_code, alert_code(alert));
            assert_eq!(
                tls::handshake_refusal(&client_error),
                Some(expected_refusal(alert))
            );
        }
        other => panic!("client saw {other:?}, expected the gateway's close with {alert:?}"),
    }
}

/// The refusal each alert stands for (written out here to check the library's mapping).
fn expected_refusal(alert: AlertDescription) -> HandshakeRefusal {
    match alert {
        AlertDescription::CertificateRequired => HandshakeRefusal::NoClientCertificate,
        AlertDescription::UnknownCA => HandshakeRefusal::UnknownIssuer,
        AlertDescription::CertificateExpired => HandshakeRefusal::Expired,
        AlertDescription::CertificateRevoked => HandshakeRefusal::Revoked,
        AlertDescription::UnsupportedCertificate => HandshakeRefusal::WrongKeyUsage,
        AlertDescription::BadCertificate => HandshakeRefusal::BadCertificate,
        AlertDescription::DecryptError => HandshakeRefusal::BadSignature,
        AlertDescription::NoApplicationProtocol => HandshakeRefusal::NoApplicationProtocol,
        other => panic!("no expectation written for {other:?}"),
    }
}

/// Asserts that both ends connected, that one request stream round-trips, and returns the
/// identity the gateway reads.
async fn assert_connected(attempt: Attempt) -> (Result<PeerIdentity, IdentityError>, SocketAddr) {
    let server = attempt.server.expect("server accepted");
    let client = attempt.client.expect("client connected");
    assert_eq!(
        server
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol),
        Some(fwnp_proto::ALPN.to_vec())
    );
    let exchange = async {
        let (mut send, mut receive) = client.open_bi().await.expect("open stream");
        send.write_all(b"hello").await.expect("write");
        send.finish().expect("finish");
        let (mut server_send, mut server_receive) =
            server.accept_bi().await.expect("accept stream");
        let request = server_receive.read_to_end(64).await.expect("read request");
        server_send.write_all(&request).await.expect("write answer");
        server_send.finish().expect("finish answer");
        receive.read_to_end(64).await.expect("read answer")
    };
    let echoed = tokio::time::timeout(STEP_TIMEOUT, exchange)
        .await
        .expect("stream exchange timed out");
    assert_eq!(echoed, b"hello");
    // Notices: the gateway may open unidirectional streams towards the host...
    let notice = async {
        let mut send = server.open_uni().await.expect("open notice stream");
        send.write_all(b"notice").await.expect("write notice");
        send.finish().expect("finish notice");
        let mut receive = client.accept_uni().await.expect("accept notice stream");
        receive.read_to_end(64).await.expect("read notice")
    };
    let notice = tokio::time::timeout(STEP_TIMEOUT, notice)
        .await
        .expect("notice exchange timed out");
    assert_eq!(notice, b"notice");
    // ...but the host may open none, and the gateway opens no request stream towards the host.
    let refused_uni = tokio::time::timeout(Duration::from_millis(200), client.open_uni()).await;
    assert!(
        refused_uni.is_err(),
        "the host could open a unidirectional stream"
    );
    let refused_bi = tokio::time::timeout(Duration::from_millis(200), server.open_bi()).await;
    assert!(
        refused_bi.is_err(),
        "the gateway could open a bidirectional stream"
    );
    let source = server.remote_address();
    let identity = PeerIdentity::from_connection(&server);
    client.close(0u32.into(), b"done");
    (identity, source)
}

#[tokio::test]
async fn a_good_host_connects_and_the_gateway_reads_its_uri_identity_and_ip_sans() {
    let ca = TestCa::new("uri");
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 5));
    let issued = ca.host(
        "web-01",
        &[IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), v6],
        &[],
        &[],
    );
    let server = server(&ca.server_files());
    let (identity, source) = assert_connected(
        attempt(
            &server,
            client_config(&ca.client_files("web-01")),
            GATEWAY_NAME,
        )
        .await,
    )
    .await;
    let identity = identity.expect("identity");
    assert_eq!(identity.identity, "fwnp://host/web-01");
    assert_eq!(identity.kind, IdentityKind::Uri);
    assert_eq!(
        identity.ip_sans,
        vec![IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), v6]
    );
    assert_eq!(identity.certificate.serial, issued.serial);
    assert_eq!(identity.fingerprint, issued.fingerprint);
    assert!(identity.not_after > SystemTime::now());
    assert_eq!(allowed_addresses(&identity, source.ip()), identity.ip_sans);
}

/// What the gateway's transport parameters let a host do: send no QUIC datagrams, and put no
/// more than one message's worth of bytes on a request stream before the gateway reads it (a
/// host cannot make the gateway buffer more than its messages).
#[tokio::test]
async fn the_gateway_announces_one_message_of_stream_window_and_no_datagrams() {
    let connected = web_01_connected("windows").await;
    let client = &connected.client;
    assert_eq!(client.max_datagram_size(), None, "datagrams are announced");
    let (mut send, _receive) = tokio::time::timeout(STEP_TIMEOUT, client.open_bi())
        .await
        .expect("open in time")
        .expect("open stream");
    // A write takes what flow control allows at once, without waiting for the gateway.
    let taken = tokio::time::timeout(STEP_TIMEOUT, send.write(&vec![0; 1 << 20]))
        .await
        .expect("write in time")
        .expect("write");
    assert_eq!(taken, fwnp_proto::MAX_MESSAGE_SIZE);
    client.close(0u32.into(), b"done");
}

/// Each end asks the other, through QUIC's acknowledgement frequency extension, to acknowledge
/// less often than every second packet, so that the acknowledgement of a request rides in its
/// answer rather than in a datagram of its own. Each end also takes the other's request.
#[tokio::test]
async fn each_end_asks_the_other_to_acknowledge_less_often() {
    let connected = web_01_connected("acks").await;
    let (client, server) = (&connected.client, &connected.server);
    // The frame goes out once the handshake is confirmed; a few exchanges carry it and its
    // acknowledgement.
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        assert_eq!(echo(client, server, b"request").await, b"request");
        let (client_stats, server_stats) = (client.stats(), server.stats());
        if client_stats.frame_rx.ack_frequency > 0 && server_stats.frame_rx.ack_frequency > 0 {
            assert_eq!(client_stats.frame_tx.ack_frequency, 1);
            assert_eq!(server_stats.frame_tx.ack_frequency, 1);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ACK_FREQUENCY frame taken: host {:?}, gateway {:?}",
            client_stats.frame_rx,
            server_stats.frame_rx
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.close(0u32.into(), b"done");
}

/// One request stream's bytes from the host, echoed back by the gateway.
async fn echo(client: &Connection, server: &Connection, text: &[u8]) -> Vec<u8> {
    let exchange = async {
        let (mut send, mut receive) = client.open_bi().await.expect("open stream");
        send.write_all(text).await.expect("write");
        send.finish().expect("finish");
        let (mut server_send, mut server_receive) =
            server.accept_bi().await.expect("accept stream");
        let request = server_receive.read_to_end(64).await.expect("read request");
        server_send.write_all(&request).await.expect("write answer");
        server_send.finish().expect("finish answer");
        receive.read_to_end(64).await.expect("read answer")
    };
    tokio::time::timeout(STEP_TIMEOUT, exchange)
        .await
        .expect("stream exchange timed out")
}

/// The gateway's TLS 1.3 suites build their keys only when they are used (the record layer's,
/// which QUIC never uses, and the next key phase's packet keys): a host that offers a single
/// suite, whichever of the three, connects, and its connection goes on through the gateway's
/// key updates, where the keys made on demand protect and open the packets.
#[tokio::test]
async fn each_tls13_suite_connects_and_carries_streams_across_key_updates() {
    let ca = ca_with_web_01("suites");
    let server = server(&ca.server_files());
    let files = ca.client_files("web-01");
    let roots = tls::load_ca_certificates(&files.ca).expect("roots");
    let initial = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|suite| suite.quic_suite())
        .expect("QUIC's initial suite");
    let suites: Vec<_> = rustls::crypto::ring::DEFAULT_CIPHER_SUITES
        .iter()
        .filter(|suite| suite.tls13().is_some())
        .collect();
    assert_eq!(suites.len(), 3);
    for suite in suites {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![*suite],
            ..rustls::crypto::ring::default_provider()
        };
        let mut store = rustls::RootCertStore::empty();
        for root in &roots {
            store.add(root.clone()).expect("add root");
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(store)
            .with_client_auth_cert(
                tls::load_certificates(&files.cert).expect("certificate"),
                tls::load_private_key(&files.key).expect("key"),
            )
            .expect("client certificate");
        config.alpn_protocols = vec![fwnp_proto::ALPN.to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::with_initial(Arc::new(config), initial)
                .expect("QUIC client");
        let outcome = attempt(
            &server,
            quinn::ClientConfig::new(Arc::new(crypto)),
            GATEWAY_NAME,
        )
        .await;
        let gateway = outcome.server.expect("server accepted");
        let host = outcome
            .client
            .unwrap_or_else(|e| panic!("{:?}: {e}", suite.suite()));
        assert_eq!(echo(&host, &gateway, b"before").await, b"before");
        for update in 0..2 {
            gateway.force_key_update();
            let text = format!("after key update {update}");
            assert_eq!(
                echo(&host, &gateway, text.as_bytes()).await,
                text.as_bytes(),
                "{:?}",
                suite.suite()
            );
            // A key update waits for the one before to be acknowledged (three PTOs after).
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(gateway.close_reason().is_none());
        host.close(0u32.into(), b"done");
    }
}

#[tokio::test]
async fn spiffe_id_is_the_identity_and_without_ip_sans_the_source_address_is_allowed() {
    let ca = TestCa::new("spiffe");
    ca.host(
        "spiffe-host",
        &[],
        &["spiffe://example.org/ns/prod/sa/web"],
        &["ignored.example.org"],
    );
    let server = server(&ca.server_files());
    let (identity, source) = assert_connected(
        attempt(
            &server,
            client_config(&ca.client_files("spiffe-host")),
            GATEWAY_NAME,
        )
        .await,
    )
    .await;
    let identity = identity.expect("identity");
    assert_eq!(identity.identity, "spiffe://example.org/ns/prod/sa/web");
    assert_eq!(identity.kind, IdentityKind::Uri);
    assert!(identity.ip_sans.is_empty());
    assert_eq!(
        allowed_addresses(&identity, source.ip()),
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
    );
}

#[tokio::test]
async fn dns_san_is_the_identity_when_there_is_no_uri() {
    let ca = TestCa::new("dns");
    ca.host(
        "dns-host",
        &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9))],
        &[],
        &["Host-7.Example.org"],
    );
    let server = server(&ca.server_files());
    let (identity, _) = assert_connected(
        attempt(
            &server,
            client_config(&ca.client_files("dns-host")),
            GATEWAY_NAME,
        )
        .await,
    )
    .await;
    let identity = identity.expect("identity");
    assert_eq!(identity.identity, "host-7.example.org");
    assert_eq!(identity.kind, IdentityKind::Dns);
    assert_eq!(
        identity.ip_sans,
        vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9))]
    );
}

#[tokio::test]
async fn a_certificate_without_uri_or_dns_san_passes_tls_but_has_no_identity() {
    let ca = TestCa::new("nosan");
    // Made with rcgen directly: pki never issues such a certificate.
    let ca_pem = std::fs::read_to_string(ca.file("ca.pem")).expect("read ca");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.file("ca.key")).expect("read key"))
            .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(
        10, 9, 9, 9,
    )))];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x42, 0x01]));
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(ca.file("nosan.pem"), certificate.pem()).expect("write cert");
    std::fs::write(ca.file("nosan.key"), key.serialize_pem()).expect("write key");

    let server = server(&ca.server_files());
    let (identity, _) = assert_connected(
        attempt(
            &server,
            client_config(&ca.client_files("nosan")),
            GATEWAY_NAME,
        )
        .await,
    )
    .await;
    assert!(
        matches!(identity, Err(IdentityError::NoIdentity)),
        "got {identity:?}"
    );
}

#[tokio::test]
async fn refused_without_a_client_certificate() {
    let ca = TestCa::new("nocert");
    let server = server(&ca.server_files());
    let roots = tls::load_ca_certificates(&ca.file("ca.pem")).expect("roots");
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root).expect("add root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![fwnp_proto::ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("quic"),
    ));
    let outcome = attempt(&server, config, GATEWAY_NAME).await;
    assert_refused(
        outcome,
        AlertDescription::CertificateRequired,
        "peer sent no certificates",
    )
    .await;
}

#[tokio::test]
async fn refused_with_a_certificate_from_another_ca() {
    let ca = TestCa::new("mine");
    let other = TestCa::new("other");
    other.host("stranger", &[], &[], &[]);
    let server = server(&ca.server_files());
    // The stranger trusts our gateway (so the refusal is the gateway's, not the host's).
    let files = ClientTlsFiles {
        ca: ca.file("ca.pem"),
        ..other.client_files("stranger")
    };
    let outcome = attempt(&server, client_config(&files), GATEWAY_NAME).await;
    assert_refused(outcome, AlertDescription::UnknownCA, "UnknownIssuer").await;
}

#[tokio::test]
async fn refused_as_unknown_ca_with_a_certificate_from_another_ca_of_the_same_name() {
    // Every `fwnpctl pki init` names its CA `FWNP CA` unless told otherwise.
    let make = |label: &str| {
        let dir = temp_dir(label);
        pki::init_ca(dir.path(), "FWNP CA", Validity::days(2)).expect("init CA");
        pki::issue_gateway(
            dir.path(),
            "gateway",
            &[GATEWAY_NAME.to_owned()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Validity::days(2),
        )
        .expect("issue gateway");
        TestCa { dir }
    };
    let (ca, other) = (make("same-name-mine"), make("same-name-other"));
    let subject = |ca: &TestCa| {
        let der = tls::load_ca_certificates(&ca.file("ca.pem")).expect("ca")[0].clone();
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        parsed.subject().to_string()
    };
    assert_ne!(subject(&ca), subject(&other), "two CAs share one name");
    assert!(subject(&ca).contains("FWNP CA"), "{}", subject(&ca));
    other.host("stranger", &[], &["fwnp://host/stranger"], &[]);
    let server = server(&ca.server_files());
    let files = ClientTlsFiles {
        ca: ca.file("ca.pem"),
        ..other.client_files("stranger")
    };
    let outcome = attempt(&server, client_config(&files), GATEWAY_NAME).await;
    assert_refused(outcome, AlertDescription::UnknownCA, "UnknownIssuer").await;
    // Its own CA's hosts still connect, and a certificate issued later still chains to it.
    ca.host("web-01", &[], &["fwnp://host/web-01"], &[]);
    let (identity, _) = assert_connected(
        attempt(
            &server,
            client_config(&ca.client_files("web-01")),
            GATEWAY_NAME,
        )
        .await,
    )
    .await;
    assert_eq!(identity.expect("identity").identity, "fwnp://host/web-01");
}

#[tokio::test]
async fn refused_with_an_expired_certificate() {
    let ca = TestCa::new("expired");
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let validity = Validity {
        not_before: now - 3 * day,
        not_after: now - day,
    };
    pki::issue_host(ca.path(), "old-host", &[], &[], &[], validity).expect("issue expired");
    let server = server(&ca.server_files());
    let outcome = attempt(
        &server,
        client_config(&ca.client_files("old-host")),
        GATEWAY_NAME,
    )
    .await;
    assert_refused(
        outcome,
        AlertDescription::CertificateExpired,
        "certificate expired",
    )
    .await;
}

/// Not yet valid is outside the validity period too: `certificate_expired` (spec 3.2).
#[tokio::test]
async fn refused_with_a_certificate_not_yet_valid() {
    let ca = TestCa::new("early");
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let validity = Validity {
        not_before: now + day,
        not_after: now + 3 * day,
    };
    pki::issue_host(ca.path(), "early-host", &[], &[], &[], validity).expect("issue");
    let server = server(&ca.server_files());
    let outcome = attempt(
        &server,
        client_config(&ca.client_files("early-host")),
        GATEWAY_NAME,
    )
    .await;
    assert_refused(
        outcome,
        AlertDescription::CertificateExpired,
        "not valid yet",
    )
    .await;
}

/// A certificate of the deployment's CA whose signature does not verify (one bit of it
/// flipped): `decrypt_error` (spec 3.2).
#[tokio::test]
async fn refused_with_a_certificate_whose_signature_does_not_verify() {
    let ca = ca_with_web_01("forged");
    let server = server(&ca.server_files());
    let files = ca.client_files("web-01");
    let mut der = tls::load_certificates(&files.cert).expect("certificate")[0].to_vec();
    // The signature is the certificate's last field: its last byte is the signature's.
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let key = tls::load_private_key(&files.key).expect("key");
    let outcome = attempt(
        &server,
        unchecked_client(vec![der.into()], key, &files.ca),
        GATEWAY_NAME,
    )
    .await;
    assert_refused(outcome, AlertDescription::DecryptError, "BadSignature").await;
}

#[tokio::test]
async fn refused_once_revoked_and_the_crl_reloads_without_restart() {
    let ca = TestCa::new("revoked");
    let issued = ca.host("doomed", &[], &[], &[]);
    ca.host("survivor", &[], &[], &[]);
    let files = ca.server_files();
    let server = server(&files);

    let (identity, _) = assert_connected(
        attempt(
            &server,
            client_config(&ca.client_files("doomed")),
            GATEWAY_NAME,
        )
        .await,
    )
    .await;
    assert_eq!(identity.expect("identity").identity, "fwnp://host/doomed");

    let revocation = pki::revoke(
        ca.path(),
        &issued.cert_path,
        RevocationReason::KeyCompromise,
    )
    .expect("revoke");
    assert!(revocation.newly_revoked);
    assert_eq!(revocation.serial, issued.serial);
    assert_eq!(revocation.revoked_count, 1);
    let again = pki::revoke(
        ca.path(),
        &issued.cert_path,
        RevocationReason::KeyCompromise,
    )
    .expect("revoke again");
    assert!(!again.newly_revoked);
    assert_eq!(again.revoked_count, 1);
    let crls = tls::load_crls(&ca.file("crl.pem")).expect("load crl");
    let revoked = fwnp_trust::identity::revoked_certificates(&crls).expect("parse crl");
    assert_eq!(revoked.serials(), vec![issued.serial.clone()]);
    let listed = pki::revoked_list(ca.path()).expect("index");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].2, RevocationReason::KeyCompromise);

    // Before the reload the endpoint still uses the old CRL.
    let (before, _) = assert_connected(
        attempt(
            &server,
            client_config(&ca.client_files("doomed")),
            GATEWAY_NAME,
        )
        .await,
    )
    .await;
    assert!(before.is_ok());

    tls::reload_server_config(&server, &files, &ServerOptions::default()).expect("reload");
    let outcome = attempt(
        &server,
        client_config(&ca.client_files("doomed")),
        GATEWAY_NAME,
    )
    .await;
    assert_refused(outcome, AlertDescription::CertificateRevoked, "Revoked").await;

    // Other hosts of the same CA are unaffected.
    let (other, _) = assert_connected(
        attempt(
            &server,
            client_config(&ca.client_files("survivor")),
            GATEWAY_NAME,
        )
        .await,
    )
    .await;
    assert_eq!(other.expect("identity").identity, "fwnp://host/survivor");

    // A broken CRL file is refused with its name, and the running configuration stays.
    std::fs::write(
        ca.file("broken-crl.pem"),
        "-----BEGIN X509 CRL-----\nAAAA\n",
    )
    .expect("write");
    let broken = ServerTlsFiles {
        crl: Some(ca.file("broken-crl.pem")),
        ..files.clone()
    };
    let error = tls::reload_server_config(&server, &broken, &ServerOptions::default())
        .expect_err("broken CRL accepted");
    assert!(
        matches!(&error, TlsError::Pem { path, .. } if path.ends_with("broken-crl.pem")),
        "got {error:?}"
    );
    let outcome = attempt(
        &server,
        client_config(&ca.client_files("doomed")),
        GATEWAY_NAME,
    )
    .await;
    assert_refused(outcome, AlertDescription::CertificateRevoked, "Revoked").await;
}

#[tokio::test]
async fn refused_with_a_wrong_alpn() {
    let ca = TestCa::new("alpn");
    ca.host("web", &[], &[], &[]);
    let server = server(&ca.server_files());
    let files = ca.client_files("web");
    let mut store = rustls::RootCertStore::empty();
    for root in tls::load_ca_certificates(&files.ca).expect("roots") {
        store.add(root).expect("add root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(store)
        .with_client_auth_cert(
            tls::load_certificates(&files.cert).expect("cert"),
            tls::load_private_key(&files.key).expect("key"),
        )
        .expect("client auth");
    config.alpn_protocols = vec![b"h3".to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("quic"),
    ));
    let outcome = attempt(&server, config, GATEWAY_NAME).await;
    assert_refused(
        outcome,
        AlertDescription::NoApplicationProtocol,
        "peer doesn't support any known protocol",
    )
    .await;
}

#[tokio::test]
async fn refused_with_a_server_certificate_used_as_a_client_certificate() {
    let ca = TestCa::new("purpose");
    let server = server(&ca.server_files());
    // gateway.pem carries the server-auth usage only.
    let files = ClientTlsFiles {
        cert: ca.file("gateway.pem"),
        key: ca.file("gateway.key"),
        ca: ca.file("ca.pem"),
    };
    let outcome = attempt(&server, client_config(&files), GATEWAY_NAME).await;
    assert_refused(
        outcome,
        AlertDescription::UnsupportedCertificate,
        "certificate does not allow extended key usage",
    )
    .await;
}

/// A host certificate of `ca` with the extended key usages `usages` (none: no extension).
fn host_with_usages(
    ca: &TestCa,
    name: &str,
    usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
) -> ClientTlsFiles {
    let ca_pem = std::fs::read_to_string(ca.file("ca.pem")).expect("read ca");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.file("ca.key")).expect("read key"))
            .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("fwnp://host/{name}").try_into().expect("uri"),
    )];
    params.extended_key_usages = usages;
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(ca.file(&format!("{name}.pem")), certificate.pem()).expect("write cert");
    std::fs::write(ca.file(&format!("{name}.key")), key.serialize_pem()).expect("write key");
    ca.client_files(name)
}

#[tokio::test]
async fn an_extended_key_usage_without_client_auth_is_refused_with_unsupported_certificate() {
    let ca = TestCa::new("eku");
    let server = server(&ca.server_files());
    let mail = host_with_usages(
        &ca,
        "mail",
        vec![rcgen::ExtendedKeyUsagePurpose::EmailProtection],
    );
    let outcome = attempt(&server, client_config(&mail), GATEWAY_NAME).await;
    assert_refused(
        outcome,
        AlertDescription::UnsupportedCertificate,
        "certificate does not allow extended key usage",
    )
    .await;
    // Without the extension at all, any usage is allowed (spec 3.2).
    let plain = host_with_usages(&ca, "plain", Vec::new());
    let (identity, _) =
        assert_connected(attempt(&server, client_config(&plain), GATEWAY_NAME).await).await;
    assert_eq!(identity.expect("identity").identity, "fwnp://host/plain");
}

/// A client that presents its certificate without the checks rustls makes of its own (which
/// refuse one with an unknown critical extension before any handshake), as a client of another
/// implementation may.
fn unchecked_client_config(files: &ClientTlsFiles) -> quinn::ClientConfig {
    let chain = tls::load_certificates(&files.cert).expect("certificate");
    let key = tls::load_private_key(&files.key).expect("key");
    unchecked_client(chain, key, &files.ca)
}

/// [`unchecked_client_config`] for a chain and key in memory.
fn unchecked_client(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    ca: &Path,
) -> quinn::ClientConfig {
    #[derive(Debug)]
    struct Present(Arc<rustls::sign::CertifiedKey>);
    impl rustls::client::ResolvesClientCert for Present {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[rustls::SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let provider = tls::crypto_provider();
    let key = provider
        .key_provider
        .load_private_key(key)
        .expect("signing key");
    let mut roots = rustls::RootCertStore::empty();
    for ca in tls::load_ca_certificates(ca).expect("ca") {
        roots.add(ca).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Present(Arc::new(
            rustls::sign::CertifiedKey::new(chain, key),
        ))));
    config.alpn_protocols = vec![fwnp_proto::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("QUIC client config"),
    ))
}

/// Certificates webpki refuses for causes rustls has no alert of its own for are refused with
/// `bad_certificate` (spec 3.2, "anything else"), not rustls's `certificate_unknown`: an
/// extension marked critical that nobody knows, and the CA's own certificate presented as a
/// host's.
#[tokio::test]
async fn certificates_refused_for_other_causes_are_refused_with_bad_certificate() {
    let ca = TestCa::new("critical");
    let server = server(&ca.server_files());
    let ca_pem = std::fs::read_to_string(ca.file("ca.pem")).expect("read ca");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.file("ca.key")).expect("read key"))
            .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "fwnp://host/odd".try_into().expect("uri"),
    )];
    // A private-use OID, critical, holding an empty SEQUENCE.
    let mut extension =
        rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x30, 0x00]);
    extension.set_criticality(true);
    params.custom_extensions = vec![extension];
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(ca.file("odd.pem"), certificate.pem()).expect("write cert");
    std::fs::write(ca.file("odd.key"), key.serialize_pem()).expect("write key");
    let outcome = attempt(
        &server,
        unchecked_client_config(&ca.client_files("odd")),
        GATEWAY_NAME,
    )
    .await;
    assert_refused(
        outcome,
        AlertDescription::BadCertificate,
        "UnhandledCriticalExtension",
    )
    .await;

    let the_ca = ClientTlsFiles {
        cert: ca.file("ca.pem"),
        key: ca.file("ca.key"),
        ca: ca.file("ca.pem"),
    };
    let outcome = attempt(&server, client_config(&the_ca), GATEWAY_NAME).await;
    assert_refused(
        outcome,
        AlertDescription::BadCertificate,
        "invalid peer certificate",
    )
    .await;
}

#[tokio::test]
async fn the_host_refuses_a_gateway_under_another_name() {
    let ca = TestCa::new("name");
    ca.host("web", &[], &[], &[]);
    let server = server(&ca.server_files());
    let outcome = attempt(
        &server,
        client_config(&ca.client_files("web")),
        "not-the-gateway.test",
    )
    .await;
    match outcome.client {
        Err(ConnectionError::TransportError(error)) => {
            assert_eq!(
                error.code,
                alert_code(AlertDescription::BadCertificate),
                "{error}"
            );
            assert!(
                error.reason.contains("not-the-gateway.test")
                    || error.reason.contains("NotValidForName"),
                "{}",
                error.reason
            );
        }
        other => panic!(
            "client should refuse the gateway's certificate, got {:?}",
            other.map(|c| c.remote_address())
        ),
    }
    match outcome.server {
        Err(ConnectionError::ConnectionClosed(close)) => assert_eq!(
            close.error_code,
            alert_code(AlertDescription::BadCertificate)
        ),
        other => panic!(
            "server should see the host's alert, got {:?}",
            other.map(|c| c.remote_address())
        ),
    }
}

#[tokio::test]
async fn csr_issuance_keeps_the_hosts_key() {
    let ca = TestCa::new("csr-ca");
    let host_dir = temp_dir("csr-host");
    let csr_path = pki::create_csr(host_dir.path(), "csr-host").expect("create csr");
    let key_path = host_dir.path().join("csr-host.key");
    let key_before = std::fs::read(&key_path).expect("read key");
    assert_eq!(
        std::fs::metadata(&key_path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let issued = pki::issue_from_csr(
        ca.path(),
        &csr_path,
        "csr-host",
        &[IpAddr::V4(Ipv4Addr::new(10, 7, 7, 7))],
        &["spiffe://example.org/host/csr".to_owned()],
        &[],
        Validity::days(1),
    )
    .expect("issue from csr");
    assert_eq!(issued.key_path, None);
    assert!(
        !ca.file("csr-host.key").exists(),
        "the CA must not make a key for a CSR"
    );
    assert_eq!(std::fs::read(&key_path).expect("read key"), key_before);

    // The host's own key and the CA's certificate belong together: the handshake proves it.
    let files = ClientTlsFiles {
        cert: issued.cert_path.clone(),
        key: key_path,
        ca: ca.file("ca.pem"),
    };
    let server = server(&ca.server_files());
    let (identity, _) =
        assert_connected(attempt(&server, client_config(&files), GATEWAY_NAME).await).await;
    let identity = identity.expect("identity");
    assert_eq!(identity.identity, "spiffe://example.org/host/csr");
    assert_eq!(
        identity.ip_sans,
        vec![IpAddr::V4(Ipv4Addr::new(10, 7, 7, 7))]
    );

    // Another host's key does not go with this certificate.
    ca.host("other", &[], &[], &[]);
    let mismatched = ClientTlsFiles {
        key: ca.file("other.key"),
        ..files
    };
    assert!(matches!(
        tls::client_config_from_files(&mismatched, &ClientOptions::default()),
        Err(TlsError::CertificateAndKey(_))
    ));
}

#[tokio::test]
async fn pki_files_modes_and_refusals() {
    let parent = temp_dir("files-new");
    let fresh = parent.path().join("ca");
    pki::init_ca(&fresh, "Fresh CA", Validity::days(1)).expect("init in a new dir");
    assert_eq!(
        std::fs::metadata(&fresh)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let ca = TestCa::new("files");
    for key in ["ca.key", "gateway.key"] {
        assert_eq!(
            std::fs::metadata(ca.file(key))
                .expect("stat")
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "{key}"
        );
    }
    let issued = ca.host("web", &[], &[], &[]);
    assert_eq!(
        issued.key_path.as_deref(),
        Some(ca.file("web.key").as_path())
    );
    assert_eq!(
        std::fs::metadata(ca.file("web.key"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        pki::fingerprint_file(&ca.file("web.pem")).expect("fingerprint"),
        issued.fingerprint
    );
    assert_eq!(issued.fingerprint.to_string().len(), 95);

    assert!(matches!(
        pki::init_ca(ca.path(), "again", Validity::days(1)),
        Err(PkiError::AlreadyExists { .. })
    ));
    assert!(matches!(
        pki::issue_host(ca.path(), "web", &[], &[], &[], Validity::days(1)),
        Err(PkiError::AlreadyExists { .. })
    ));
    assert!(matches!(
        pki::issue_host(ca.path(), "../escape", &[], &[], &[], Validity::days(1)),
        Err(PkiError::InvalidName { .. })
    ));
    assert!(matches!(
        pki::issue_host(
            ca.path(),
            "bad-uri",
            &[],
            &["spiffe://UPPER/x".to_owned()],
            &[],
            Validity::days(1)
        ),
        Err(PkiError::InvalidUri { .. })
    ));
    let other = TestCa::new("files-other");
    let stranger = other.host("stranger", &[], &[], &[]);
    assert!(matches!(
        pki::revoke(
            ca.path(),
            &stranger.cert_path,
            RevocationReason::Unspecified
        ),
        Err(PkiError::NotIssuedByThisCa { .. })
    ));
}

#[tokio::test]
async fn loading_errors_name_the_file_and_the_problem() {
    let ca = TestCa::new("load");
    let missing = ca.file("missing.pem");
    assert!(
        matches!(tls::load_certificates(&missing), Err(TlsError::Read { path, .. }) if path == missing)
    );
    assert!(matches!(
        tls::load_private_key(&ca.file("ca.pem")),
        Err(TlsError::Missing { path, .. }) if path == ca.file("ca.pem")
    ));
    assert!(matches!(
        tls::load_certificates(&ca.file("ca.key")),
        Err(TlsError::Missing { path, .. }) if path == ca.file("ca.key")
    ));
    std::fs::write(
        ca.file("truncated.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n",
    )
    .expect("write");
    assert!(matches!(
        tls::load_certificates(&ca.file("truncated.pem")),
        Err(TlsError::Pem { .. })
    ));
    assert!(matches!(
        tls::load_crls(&ca.file("ca.pem")),
        Err(TlsError::Missing { .. })
    ));
    let error = tls::load_private_key(&ca.file("ca.pem")).expect_err("cert as key");
    assert!(error.to_string().contains("ca.pem"), "{error}");
}

fn openssl_available() -> bool {
    std::process::Command::new("openssl")
        .arg("version")
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn certificates_made_with_openssl_work_the_same_way() {
    if !openssl_available() {
        eprintln!("SKIPPED: the `openssl` command is not installed");
        return;
    }
    let ours = TestCa::new("ossl-gw");
    let dir = temp_dir("openssl");
    let path = dir.path();
    std::fs::write(
        path.join("ca.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = ca_ext\n\
         [dn]\nO = Elsewhere\nCN = OpenSSL Test CA\n\
         [ca_ext]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n\
         subjectKeyIdentifier = hash\n",
    )
    .expect("write ca.cnf");
    std::fs::write(
        path.join("host.cnf"),
        "[host]\nbasicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\n\
         extendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n\
         subjectAltName = URI:spiffe://openssl.example/host/a, IP:127.0.0.1, IP:2001:db8::7\n",
    )
    .expect("write host.cnf");
    // An EC CA and an RSA host key, both PKCS#8 as openssl writes them.
    openssl(
        path,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ca.key",
        ],
    );
    openssl(
        path,
        &[
            "req", "-new", "-x509", "-key", "ca.key", "-days", "2", "-config", "ca.cnf", "-out",
            "ca.pem",
        ],
    );
    openssl(
        path,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "host.key",
        ],
    );
    openssl(
        path,
        &[
            "req",
            "-new",
            "-key",
            "host.key",
            "-subj",
            "/CN=openssl-host",
            "-out",
            "host.csr",
        ],
    );
    openssl(
        path,
        &[
            "x509",
            "-req",
            "-in",
            "host.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "0x0A1B2C3D",
            "-days",
            "1",
            "-extfile",
            "host.cnf",
            "-extensions",
            "host",
            "-out",
            "host.pem",
        ],
    );

    // The gateway trusts the openssl CA; its CRL is signed by pki for that CA.
    pki::write_crl(path, Duration::from_secs(3600)).expect("CRL for an openssl CA");
    let files = ServerTlsFiles {
        ca: path.join("ca.pem"),
        crl: Some(path.join("crl.pem")),
        ..ours.server_files()
    };
    let server = server(&files);
    let client_files = ClientTlsFiles {
        cert: path.join("host.pem"),
        key: path.join("host.key"),
        ca: ours.file("ca.pem"),
    };

    let (identity, _) =
        assert_connected(attempt(&server, client_config(&client_files), GATEWAY_NAME).await).await;
    let identity = identity.expect("identity");
    assert_eq!(identity.identity, "spiffe://openssl.example/host/a");
    assert_eq!(
        identity.ip_sans,
        vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7))
        ]
    );
    assert_eq!(
        identity.certificate.serial,
        Serial::parse("0A1B2C3D").expect("serial")
    );
    // The fingerprint is the one openssl prints.
    let output = std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-in",
            "host.pem",
        ])
        .current_dir(path)
        .output()
        .expect("openssl fingerprint");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.trim().ends_with(&identity.fingerprint.to_string()),
        "{printed} vs {}",
        identity.fingerprint
    );

    // pki can revoke the openssl certificate, and the gateway then refuses it.
    pki::revoke(path, &path.join("host.pem"), RevocationReason::Superseded)
        .expect("revoke openssl cert");
    tls::reload_server_config(&server, &files, &ServerOptions::default()).expect("reload");
    let outcome = attempt(&server, client_config(&client_files), GATEWAY_NAME).await;
    assert_refused(outcome, AlertDescription::CertificateRevoked, "Revoked").await;

    // A CSR made by openssl is signed by pki; the host keeps its openssl key.
    openssl(
        path,
        &[
            "req",
            "-new",
            "-key",
            "host.key",
            "-subj",
            "/CN=openssl-host-2",
            "-out",
            "host2.csr",
        ],
    );
    let issued = pki::issue_from_csr(
        ours.path(),
        &path.join("host2.csr"),
        "openssl-host-2",
        &[],
        &[],
        &[],
        Validity::days(1),
    )
    .expect("sign openssl CSR");
    let files = ours.server_files();
    let server = self::server(&files);
    let client_files = ClientTlsFiles {
        cert: issued.cert_path,
        key: path.join("host.key"),
        ca: ours.file("ca.pem"),
    };
    let (identity, _) =
        assert_connected(attempt(&server, client_config(&client_files), GATEWAY_NAME).await).await;
    assert_eq!(
        identity.expect("identity").identity,
        "fwnp://host/openssl-host-2"
    );
}

#[tokio::test]
async fn a_ca_with_an_intermediate_and_its_own_crl_works_the_same_way() {
    // Laid out as step-ca does: a root, an intermediate that signs host certificates and the
    // CRL, and host certificates with an empty subject and only SANs.
    let ours = TestCa::new("int-gw");
    let dir = temp_dir("intermediate");
    let path = dir.path();
    let ca_params = |name: &str, constraint: rcgen::BasicConstraints| {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(constraint);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params
    };
    let root_params = ca_params("Elsewhere Root CA", rcgen::BasicConstraints::Unconstrained);
    let root_key = rcgen::KeyPair::generate().expect("root key");
    let root = root_params.self_signed(&root_key).expect("root");
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let intermediate_params = ca_params(
        "Elsewhere Intermediate CA",
        rcgen::BasicConstraints::Constrained(0),
    );
    let intermediate_key = rcgen::KeyPair::generate().expect("intermediate key");
    let intermediate = intermediate_params
        .signed_by(&intermediate_key, &root_issuer)
        .expect("intermediate");
    let intermediate_issuer = rcgen::Issuer::new(intermediate_params, intermediate_key);

    let mut leaf = rcgen::CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.subject_alt_names = vec![
        rcgen::SanType::URI("spiffe://step.example/host/b".try_into().expect("uri")),
        rcgen::SanType::DnsName("b.step.example".try_into().expect("dns")),
    ];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    leaf.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x77, 0x01]));
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf_cert = leaf
        .signed_by(&leaf_key, &intermediate_issuer)
        .expect("leaf");
    // The host presents its certificate followed by the intermediate; the gateway trusts the root.
    std::fs::write(path.join("host.pem"), leaf_cert.pem() + &intermediate.pem())
        .expect("write chain");
    std::fs::write(path.join("host.key"), leaf_key.serialize_pem()).expect("write key");
    std::fs::write(path.join("root.pem"), root.pem()).expect("write root");

    let crl = |revoked: &[u8]| {
        let now = time::OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(1),
            crl_number: rcgen::SerialNumber::from_slice(&[revoked.len() as u8 + 1]),
            issuing_distribution_point: None,
            revoked_certs: if revoked.is_empty() {
                vec![]
            } else {
                vec![rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(revoked),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }]
            },
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&intermediate_issuer)
            .expect("sign crl")
            .pem()
            .expect("crl pem")
    };
    std::fs::write(path.join("crl.pem"), crl(&[])).expect("write crl");

    let files = ServerTlsFiles {
        ca: path.join("root.pem"),
        crl: Some(path.join("crl.pem")),
        ..ours.server_files()
    };
    let client_files = ClientTlsFiles {
        cert: path.join("host.pem"),
        key: path.join("host.key"),
        ca: ours.file("ca.pem"),
    };
    let server = server(&files);
    let (identity, _) =
        assert_connected(attempt(&server, client_config(&client_files), GATEWAY_NAME).await).await;
    let identity = identity.expect("identity");
    assert_eq!(identity.identity, "spiffe://step.example/host/b");
    assert_eq!(
        identity.certificate.serial,
        Serial::parse("7701").expect("serial")
    );

    // Checking the intermediate too needs the root's CRL, which is not given: refused.
    let whole_chain = ServerOptions {
        check_intermediate_revocation: true,
        ..ServerOptions::default()
    };
    server.set_server_config(Some(
        tls::server_config_from_files(&files, &whole_chain).expect("config"),
    ));
    let outcome = attempt(&server, client_config(&client_files), GATEWAY_NAME).await;
    assert_refused(
        outcome,
        AlertDescription::UnknownCA,
        "UnknownRevocationStatus",
    )
    .await;

    // The intermediate's CRL revoking the host: refused as revoked.
    std::fs::write(path.join("crl.pem"), crl(&[0x77, 0x01])).expect("rewrite crl");
    tls::reload_server_config(&server, &files, &ServerOptions::default()).expect("reload");
    let outcome = attempt(&server, client_config(&client_files), GATEWAY_NAME).await;
    assert_refused(outcome, AlertDescription::CertificateRevoked, "Revoked").await;
}
