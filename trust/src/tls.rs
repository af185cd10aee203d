//! rustls and quinn configurations for FWNP/1, for the gateway (server) and the host agent
//! (client).
//!
//! What the protocol asks and where it is enforced:
//!
//! - TLS 1.3 only, with the *ring* provider named explicitly (the build holds exactly one rustls
//!   provider; `builder_with_provider` never consults a process-wide default).
//!   The gateway's cipher suites are *ring*'s TLS 1.3 ones with keys built only when first used:
//!   the TLS record layer's keys, which QUIC never uses, and the packet keys of QUIC's next key
//!   phase are then no more than their key material on an idle connection.
//! - ALPN exactly `fwnp/1` ([`fwnp_proto::ALPN`]) on both sides; a peer offering anything else
//!   fails the handshake with the `no_application_protocol` alert.
//! - The gateway requires a client certificate and verifies it against the configured CA roots
//!   and CRLs (rustls' `WebPkiClientVerifier`): missing, unknown-issuer, expired and revoked
//!   certificates fail the handshake with the matching TLS alert.
//! - No 0-RTT (requests must not be replayable): the server's `max_early_data_size` is 0 and the
//!   client never enables early data. TLS session resumption is off on both sides as well, so every
//!   connection checks the certificate against the CRL in force at that moment, not the one of
//!   an earlier session.
//! - QUIC transport: idle timeout 30 s; the client sends keep-alive PINGs every 10 s (the host
//!   agent shortens both, per connection, for gateways that grant short leases); clients may
//!   open a bounded number of bidirectional streams (one per request) and no unidirectional
//!   stream; the gateway may open unidirectional streams (notices) towards the client, and no
//!   bidirectional one. Connection migration is off by default (see
//!   [`ServerOptions::allow_migration`]). The gateway's flow-control windows hold one message
//!   per stream, it takes no QUIC datagrams, and it keeps no more than one packet of send buffer
//!   per connection, of QUIC's minimum size (no path MTU discovery), so that many idle hosts
//!   cost little.
//!
//! # Reloading the CRL
//!
//! TLS checks revocation at the handshake only. To apply a new CRL without restarting, build a
//! fresh configuration and hand it to the endpoint: new connections use it at once, connections
//! already up keep running.
//!
//! ```no_run
//! # fn reload(endpoint: &quinn::Endpoint, files: &fwnp_trust::tls::ServerTlsFiles)
//! #     -> Result<(), fwnp_trust::tls::TlsError> {
//! let options = fwnp_trust::tls::ServerOptions::default();
//! fwnp_trust::tls::reload_server_config(endpoint, files, &options)?;
//! # Ok(()) }
//! ```
//!
//! A bad file leaves the old configuration in force (the error is returned before anything is
//! replaced). To also end live connections whose certificate the new CRL revokes, compare each
//! connection's [`PeerIdentity::certificate`](crate::identity::PeerIdentity::certificate)
//! (issuer and serial) with [`revoked_certificates`](crate::identity::revoked_certificates) of
//! the new CRLs and close the matches; the gateway's reload does so, after revoking what those
//! connections' hosts hold.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::RootCertStore;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};

mod alerts;
mod keys_on_demand;

/// The QUIC idle timeout of FWNP/1 (both sides).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The client's keep-alive interval of FWNP/1.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default bound on concurrently open request streams per client connection.
pub const DEFAULT_MAX_CONCURRENT_BIDI_STREAMS: u32 = 64;
/// Default bound on concurrently open notice streams the client accepts from the gateway.
pub const DEFAULT_MAX_CONCURRENT_NOTICE_STREAMS: u32 = 16;

/// Why a TLS configuration could not be built. Each variant names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A file is not well-formed PEM.
    #[error("{path}: malformed PEM ({what}): {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the file was expected to hold.
        what: &'static str,
        /// The PEM parser's complaint.
        detail: String,
    },
    /// A file holds no item of the kind expected (e.g. a key file with only a certificate, or an
    /// encrypted key).
    #[error("{path}: no {what} found")]
    Missing {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
    /// A CA certificate could not be used as a trust anchor.
    #[error("{path}: CA certificate #{index} is not usable as a trust anchor: {source}")]
    BadCaCertificate {
        /// The file (or `<memory>`).
        path: PathBuf,
        /// 0-based position of the certificate in the file.
        index: usize,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// No CA roots were given.
    #[error("no CA certificate given to verify peers against")]
    NoCaRoots,
    /// The certificate chain and the key do not belong together, or the key type is unsupported.
    #[error("the certificate and private key are not usable together: {0}")]
    CertificateAndKey(rustls::Error),
    /// The verifier could not be built (e.g. a CRL that cannot be parsed).
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// TLS 1.3 is not available in the provider (cannot happen with *ring*).
    #[error("TLS 1.3 not available: {0}")]
    Protocol(rustls::Error),
    /// The provider lacks the QUIC initial cipher suite.
    #[error("the QUIC initial cipher suite is missing: {0}")]
    NoInitialCipherSuite(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// An option is out of range.
    #[error("invalid option: {0}")]
    Option(&'static str),
}

/// Gateway-side options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Request streams a client may have open at once on one connection.
    pub max_concurrent_bidi_streams: u32,
    /// The QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Accept a client certificate whose issuer has no CRL among those given. Off by default:
    /// when CRLs are configured, a certificate whose revocation status is unknown is refused.
    /// (Without any CRL configured, revocation is not checked at all.)
    pub allow_unknown_revocation_status: bool,
    /// Check the revocation of intermediate CA certificates too, not only of the host's own
    /// certificate. Off by default: CAs with an intermediate (step-ca, for one) publish the CRL of
    /// the intermediate, which covers host certificates; checking the intermediate as well needs
    /// the root's CRL in the CRL file, and without it every host would be refused as of unknown
    /// revocation status.
    pub check_intermediate_revocation: bool,
    /// Refuse every certificate when a CRL's nextUpdate has passed. Off by default, so an
    /// operator who forgets to re-sign the CRL does not lock every host out.
    pub enforce_crl_expiry: bool,
    /// Unidirectional streams a client may open. FWNP/1 clients open none and the protocol
    /// has the gateway announce 0, the default, so that QUIC flow control refuses them outright
    /// (a peer that sends on one anyway is closed with STREAM_LIMIT_ERROR). Only for testing
    /// the gateway's own handling of such a stream (it closes the connection with
    /// ProtocolViolation) may this be raised; the daemon never does.
    pub max_concurrent_uni_streams_from_client: u32,
    /// Let a client's connection move to a new source address (QUIC connection migration, NAT
    /// rebinding). Off by default: the source address can be what a host is allowed to open, so
    /// it must not change under an authenticated connection; a host whose address changes
    /// reconnects instead.
    pub allow_migration: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_concurrent_bidi_streams: DEFAULT_MAX_CONCURRENT_BIDI_STREAMS,
            idle_timeout: IDLE_TIMEOUT,
            allow_unknown_revocation_status: false,
            check_intermediate_revocation: false,
            enforce_crl_expiry: false,
            max_concurrent_uni_streams_from_client: 0,
            allow_migration: false,
        }
    }
}

/// Host-side options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Interval of QUIC keep-alive PINGs.
    pub keep_alive_interval: Duration,
    /// The QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Notice streams the gateway may have open at once towards the host.
    pub max_concurrent_notice_streams: u32,
    /// CRLs to check the gateway's certificate against (empty: no revocation check).
    pub server_crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            keep_alive_interval: KEEP_ALIVE_INTERVAL,
            idle_timeout: IDLE_TIMEOUT,
            max_concurrent_notice_streams: DEFAULT_MAX_CONCURRENT_NOTICE_STREAMS,
            server_crls: Vec::new(),
        }
    }
}

/// The explicit crypto provider of FWNP's TLS configurations: the host's as it is; the gateway's
/// with the same TLS 1.3 suites, whose keys are built when first used.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The gateway's crypto provider: [`crypto_provider`] with its TLS 1.3 cipher suites only, the
/// same algorithms in the same order, whose TLS record-layer keys and QUIC packet keys are built
/// only when something is first protected or opened with them. rustls derives the record
/// layer's keys at the end of each handshake, though QUIC never uses them, and quinn the next
/// key phase's packet keys, which a connection that sends little never uses either: with
/// *ring*'s suites they were some 1,700 bytes of every idle host connection.
fn server_crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: keys_on_demand::tls13_suites(),
        ..rustls::crypto::ring::default_provider()
    })
}

/// The gateway's QUIC server configuration: TLS 1.3, client certificates required and verified
/// against `ca_roots` and `crls`, ALPN `fwnp/1`, no 0-RTT, no resumption, FWNP transport limits,
/// and hosts asked to acknowledge less often.
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_roots: &[CertificateDer<'static>],
    crls: Vec<CertificateRevocationListDer<'static>>,
    options: &ServerOptions,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = server_crypto_provider();
    let roots = Arc::new(root_store(ca_roots, Path::new("<memory>"))?);
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).with_crls(crls);
    if !options.check_intermediate_revocation {
        verifier = verifier.only_check_end_entity_revocation();
    }
    if options.allow_unknown_revocation_status {
        verifier = verifier.allow_unknown_revocation_status();
    }
    if options.enforce_crl_expiry {
        verifier = verifier.enforce_revocation_expiration();
    }
    let verifier = Arc::new(alerts::BadCertificateAlerts(verifier.build()?));

    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)
        .map_err(TlsError::CertificateAndKey)?;
    tls.alpn_protocols = vec![fwnp_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_half_rtt_data = false;
    tls.session_storage = Arc::new(NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;

    let crypto = QuicServerConfig::try_from(Arc::new(tls))?;
    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout(options.idle_timeout)?))
        .max_concurrent_bidi_streams(VarInt::from_u32(options.max_concurrent_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(
            options.max_concurrent_uni_streams_from_client,
        ));
    limit_windows(&mut transport, options.max_concurrent_bidi_streams);
    transport.ack_frequency_config(Some(fewer_acknowledgements()));
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    config.migration(options.allow_migration);
    Ok(config)
}

/// Flow-control windows and buffers for a gateway serving many hosts whose messages are small.
/// quinn's defaults suit bulk transfers: 1.25 MB of receive window per stream, no bound on a
/// connection's receive window, 10 MB of send buffer, and a 1.25 MB buffer for QUIC datagrams.
/// A request is one message of at most [`fwnp_proto::MAX_MESSAGE_SIZE`] bytes and so is an
/// answer or a notice, so a stream needs no more window than that and a connection no more than
/// its streams together: what one host can make the gateway buffer stays bounded, however many
/// hosts there are. FWNP sends no QUIC datagrams, so none are announced or buffered.
///
/// Segmentation offload is off: with it, each connection keeps a send buffer as large as the
/// largest burst it ever sent (up to ten packets, typically its handshake flight) for its whole
/// life; without it, one packet's worth. The gateway's answers fit in one packet each, so the
/// offload saved nothing but cost about 10 KiB on every idle connection.
///
/// Path MTU discovery is off: packets stay at QUIC's 1,200 bytes, which every path carries. The
/// discovered size (up to 1,452 bytes) only let the few answers larger than a packet take one
/// packet less, while each connection's send buffer, sized for one packet of the current MTU and
/// never shrunk, grew from 1,200 to 2,400 bytes when the MTU rose above 1,200 (and each
/// connection sent probe packets to find it).
fn limit_windows(transport: &mut TransportConfig, streams: u32) {
    let message = fwnp_proto::MAX_MESSAGE_SIZE as u64;
    // Notices and answers share the send buffer: room for every request stream's answer and a
    // few notices beside.
    let connection = message * (u64::from(streams.max(1)) + 8);
    transport
        .stream_receive_window(VarInt::from_u32(fwnp_proto::MAX_MESSAGE_SIZE as u32))
        .receive_window(VarInt::from_u64(connection).unwrap_or(VarInt::MAX))
        .send_window(connection)
        .datagram_receive_buffer_size(None)
        .enable_segmentation_offload(false)
        .mtu_discovery_config(None);
}

/// Ack-eliciting packets a peer is asked to take before it must acknowledge them at once.
const ACK_ELICITING_THRESHOLD: u32 = 10;

/// What each side asks of the other through QUIC's acknowledgement frequency extension
/// (draft-ietf-quic-ack-frequency), which quinn speaks on both ends: acknowledge only after more
/// than [`ACK_ELICITING_THRESHOLD`] ack-eliciting packets, or else within the peer's own
/// `max_ack_delay` (25 ms). By default a QUIC receiver acknowledges every second packet at once.
/// FWNP's traffic is requests and answers: the gateway answers a request only after its kernel
/// element and its store commit, a few milliseconds later, so each acknowledgement of requests
/// went out in a datagram of its own, and so did the host's of answers before its next request.
/// Delayed, they ride in the answer and in the next request. Under the closed loop of 100 hosts
/// with 8 requests each in flight, the gateway sent 1.11 datagrams a grant instead of 1.24 and
/// received 1.11 instead of 1.35; in five alternating pairs of runs it granted 4-21 % more a
/// second, for 3-18 % less CPU a grant. A peer without the extension is asked nothing and
/// acknowledges as usual.
fn fewer_acknowledgements() -> quinn::AckFrequencyConfig {
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    ack
}

/// The host agent's QUIC client configuration: TLS 1.3, the gateway verified against `ca_roots`
/// (and the server name given to `Endpoint::connect`), the host's certificate presented, ALPN
/// `fwnp/1`, no 0-RTT, no resumption, keep-alive and idle timeout.
pub fn client_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_roots: &[CertificateDer<'static>],
    options: &ClientOptions,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let roots = Arc::new(root_store(ca_roots, Path::new("<memory>"))?);
    let mut verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone());
    if !options.server_crls.is_empty() {
        verifier = verifier.with_crls(options.server_crls.clone());
    }
    let verifier = verifier.build().map_err(TlsError::Verifier)?;

    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(cert_chain, key)
        .map_err(TlsError::CertificateAndKey)?;
    tls.alpn_protocols = vec![fwnp_proto::ALPN.to_vec()];
    tls.enable_early_data = false;
    tls.resumption = Resumption::disabled();

    let crypto = QuicClientConfig::try_from(Arc::new(tls))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(client_transport(options)?));
    Ok(config)
}

/// The host agent's QUIC transport settings alone: keep-alive, idle timeout, no bidirectional
/// stream for the gateway, notice streams, and the gateway asked to acknowledge less often. The
/// agent sets them per connection (on a clone of its [`client_config`]) when the timers depend
/// on the lifetimes the gateway grants.
///
/// ```
/// use std::time::Duration;
/// use fwnp_trust::tls::{ClientOptions, client_transport};
/// let options = ClientOptions {
///     keep_alive_interval: Duration::from_millis(400),
///     idle_timeout: Duration::from_millis(1250),
///     ..ClientOptions::default()
/// };
/// let transport = client_transport(&options)?;
/// # Ok::<(), fwnp_trust::tls::TlsError>(())
/// ```
pub fn client_transport(options: &ClientOptions) -> Result<TransportConfig, TlsError> {
    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout(options.idle_timeout)?))
        .keep_alive_interval(Some(options.keep_alive_interval))
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(options.max_concurrent_notice_streams))
        .ack_frequency_config(Some(fewer_acknowledgements()));
    Ok(transport)
}

/// Why a TLS handshake was refused, read from the QUIC error of a failed connection (the TLS
/// alert it carries). The gateway records it as the reason of an authentication failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandshakeRefusal {
    /// The client presented no certificate (`certificate_required`).
    NoClientCertificate,
    /// The certificate does not chain to a configured CA, or its revocation status is unknown
    /// (`unknown_ca`).
    UnknownIssuer,
    /// The certificate has expired or is not yet valid (`certificate_expired`).
    Expired,
    /// A configured CRL revokes the certificate (`certificate_revoked`).
    Revoked,
    /// The certificate's extended key usage does not allow this role, e.g. a server certificate
    /// presented by a client (`unsupported_certificate`).
    WrongKeyUsage,
    /// The certificate is malformed or not valid for the name connected to (`bad_certificate`).
    BadCertificate,
    /// A signature did not verify or uses an unsupported algorithm (`decrypt_error`).
    BadSignature,
    /// The peer does not speak `fwnp/1` (`no_application_protocol`).
    NoApplicationProtocol,
    /// The peer does not support TLS 1.3 (`protocol_version`).
    ProtocolVersion,
    /// Another TLS alert, by number.
    OtherAlert(u8),
}

impl HandshakeRefusal {
    /// A short kebab-case name for logs, metrics labels and the audit trail.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NoClientCertificate => "no-client-certificate",
            Self::UnknownIssuer => "unknown-issuer",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::WrongKeyUsage => "wrong-key-usage",
            Self::BadCertificate => "bad-certificate",
            Self::BadSignature => "bad-signature",
            Self::NoApplicationProtocol => "no-application-protocol",
            Self::ProtocolVersion => "protocol-version",
            Self::OtherAlert(_) => "tls-alert",
        }
    }

    fn from_alert(alert: u8) -> Self {
        use rustls::AlertDescription as Alert;
        match Alert::from(alert) {
            Alert::CertificateRequired => Self::NoClientCertificate,
            Alert::UnknownCA => Self::UnknownIssuer,
            Alert::CertificateExpired => Self::Expired,
            Alert::CertificateRevoked => Self::Revoked,
            Alert::UnsupportedCertificate => Self::WrongKeyUsage,
            Alert::BadCertificate => Self::BadCertificate,
            Alert::DecryptError => Self::BadSignature,
            Alert::NoApplicationProtocol => Self::NoApplicationProtocol,
            Alert::ProtocolVersion => Self::ProtocolVersion,
            _ => Self::OtherAlert(alert),
        }
    }
}

impl std::fmt::Display for HandshakeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OtherAlert(alert) => write!(f, "tls-alert-{alert}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// The TLS refusal behind a failed QUIC connection, whether this side refused (a local
/// `TransportError`) or the peer did (a received `CONNECTION_CLOSE`); `None` when the connection
/// failed for another reason (timeout, reset, application close).
pub fn handshake_refusal(error: &quinn::ConnectionError) -> Option<HandshakeRefusal> {
    let code = match error {
        quinn::ConnectionError::TransportError(error) => error.code,
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code,
        _ => return None,
    };
    let code = u64::from(code);
    // QUIC carries a TLS alert as the transport error 0x100 + alert (RFC 9001 section 4.8).
    if (0x100..=0x1ff).contains(&code) {
        u8::try_from(code - 0x100)
            .ok()
            .map(HandshakeRefusal::from_alert)
    } else {
        None
    }
}

/// The files the gateway's TLS configuration is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The gateway certificate chain (PEM; end-entity first).
    pub cert: PathBuf,
    /// The gateway private key (PEM: PKCS#8, PKCS#1 or SEC1, unencrypted).
    pub key: PathBuf,
    /// The CA certificate(s) client certificates must chain to (PEM).
    pub ca: PathBuf,
    /// The CRL file (PEM, one or more CRLs), if any.
    pub crl: Option<PathBuf>,
}

/// The files the host agent's TLS configuration is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The host certificate chain (PEM; end-entity first).
    pub cert: PathBuf,
    /// The host private key (PEM, unencrypted).
    pub key: PathBuf,
    /// The CA certificate(s) the gateway's certificate must chain to (PEM).
    pub ca: PathBuf,
}

/// [`server_config`] from files.
pub fn server_config_from_files(
    files: &ServerTlsFiles,
    options: &ServerOptions,
) -> Result<quinn::ServerConfig, TlsError> {
    let cert_chain = load_certificates(&files.cert)?;
    let key = load_private_key(&files.key)?;
    let ca_roots = load_ca_certificates(&files.ca)?;
    let crls = match &files.crl {
        Some(path) => load_crls(path)?,
        None => Vec::new(),
    };
    server_config(cert_chain, key, &ca_roots, crls, options)
}

/// [`client_config`] from files.
pub fn client_config_from_files(
    files: &ClientTlsFiles,
    options: &ClientOptions,
) -> Result<quinn::ClientConfig, TlsError> {
    let cert_chain = load_certificates(&files.cert)?;
    let key = load_private_key(&files.key)?;
    let ca_roots = load_ca_certificates(&files.ca)?;
    client_config(cert_chain, key, &ca_roots, options)
}

/// Rebuilds the server configuration from `files` (the CRL re-read) and installs it on `endpoint`
/// for new connections. On error nothing is replaced.
pub fn reload_server_config(
    endpoint: &quinn::Endpoint,
    files: &ServerTlsFiles,
    options: &ServerOptions,
) -> Result<(), TlsError> {
    let config = server_config_from_files(files, options)?;
    endpoint.set_server_config(Some(config));
    Ok(())
}

/// Loads a PEM certificate chain (at least one certificate).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let what = "certificate";
    let bytes = read(path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(path, what, error))?;
    if certificates.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "PEM CERTIFICATE block",
        });
    }
    Ok(certificates)
}

/// Loads CA certificates (PEM), checking that each can serve as a trust anchor.
pub fn load_ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = load_certificates(path)?;
    root_store(&certificates, path)?;
    Ok(certificates)
}

/// Loads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1; unencrypted).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
            path: path.to_owned(),
            what: "unencrypted private key (PKCS#8, PKCS#1 or SEC1 PEM block)",
        },
        other => pem_error(path, "private key", other),
    })
}

/// Loads the CRLs of a PEM file (at least one).
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error(path, "certificate revocation list", error))?;
    if crls.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "PEM X509 CRL block",
        });
    }
    // Parsed now so that a corrupt CRL is reported with its file name, not later by the verifier.
    crate::identity::revoked_certificates(&crls).map_err(|error| TlsError::Pem {
        path: path.to_owned(),
        what: "certificate revocation list",
        detail: error.to_string(),
    })?;
    Ok(crls)
}

fn root_store(
    ca_roots: &[CertificateDer<'static>],
    path: &Path,
) -> Result<RootCertStore, TlsError> {
    if ca_roots.is_empty() {
        return Err(TlsError::NoCaRoots);
    }
    let mut store = RootCertStore::empty();
    for (index, certificate) in ca_roots.iter().enumerate() {
        store
            .add(certificate.clone())
            .map_err(|source| TlsError::BadCaCertificate {
                path: path.to_owned(),
                index,
                source,
            })?;
    }
    Ok(store)
}

fn idle_timeout(duration: Duration) -> Result<IdleTimeout, TlsError> {
    if duration.is_zero() {
        return Err(TlsError::Option("the idle timeout must not be zero"));
    }
    IdleTimeout::try_from(duration).map_err(|_| TlsError::Option("the idle timeout is too long"))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, what: &'static str, error: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        what,
        detail: error.to_string(),
    }
}
