//! Who a peer is, read from its end-entity certificate.
//!
//! FWNP/1 names a host by its certificate: the first URI subject alternative name
//! (`fwnp://host/NAME` or a SPIFFE ID `spiffe://TRUST-DOMAIN/PATH`), else its first DNS name. The
//! addresses a host may open are its certificate's IP SANs, or, when it has none, the source
//! address of its QUIC connection. Nothing here assumes the certificate was made by `fwnpctl pki`:
//! certificates from openssl, step-ca or any other X.509 CA are read the same way.
//!
//! This module only reads certificates that the TLS layer ([`crate::tls`]) has already verified
//! against the CA; it does not verify signatures itself.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::extensions::GeneralName;

/// The longest identity accepted, in bytes. Identities end up in logs, policy matches and the
/// audit trail; a bound keeps a hostile certificate from bloating all three.
pub const MAX_IDENTITY_LEN: usize = 1024;

/// Why no identity could be read from a peer certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The connection carries no peer certificate (the TLS layer would normally refuse this).
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The certificate is not valid DER X.509.
    #[error("the peer certificate cannot be parsed: {0}")]
    Parse(String),
    /// The subject alternative name extension is malformed or present twice.
    #[error("the peer certificate's subject alternative names cannot be read: {0}")]
    SubjectAltName(String),
    /// The certificate has neither a URI nor a DNS subject alternative name.
    #[error("the peer certificate has no URI or DNS subject alternative name to identify the host")]
    NoIdentity,
    /// The URI or DNS name chosen as identity is empty, too long, or holds characters that are not
    /// printable ASCII.
    #[error("the peer certificate's identity {name:?} is not acceptable: {reason}")]
    InvalidIdentity {
        /// The offending name, as found (lossy for display only).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An IP address SAN whose length is neither 4 nor 16 bytes.
    #[error("the peer certificate has an IP address SAN of {0} bytes (expected 4 or 16)")]
    BadIpAddressSan(usize),
    /// A certificate revocation list could not be parsed.
    #[error("a certificate revocation list cannot be parsed: {0}")]
    CrlParse(String),
}

/// The SHA-256 fingerprint of a certificate's DER encoding.
///
/// Displayed as uppercase hex pairs separated by colons, the same form as
/// `openssl x509 -noout -fingerprint -sha256` prints, so an operator can compare the two.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }

    /// Lowercase hex without separators (for JSON and file names).
    pub fn to_hex(&self) -> String {
        hex_lower(&self.0)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, byte) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A certificate serial number, normalised: uppercase hex of the big-endian magnitude, without the
/// DER sign byte and leading zeros (at least one digit pair). This is the form
/// `openssl x509 -noout -serial` prints, and the form the CRL index of [`crate::pki`] stores.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(String);

impl Serial {
    /// The serial from the raw DER INTEGER content bytes.
    pub fn from_der_bytes(raw: &[u8]) -> Self {
        let first_significant = raw.iter().position(|byte| *byte != 0);
        let magnitude = match first_significant {
            Some(start) => raw.get(start..).unwrap_or_default(),
            None => &[0u8][..],
        };
        Serial(hex_upper(magnitude))
    }

    /// Parses the normalised hex form (case-insensitive; colons allowed, leading zeros ignored).
    pub fn parse(text: &str) -> Option<Self> {
        let digits: String = text.chars().filter(|c| *c != ':').collect();
        if digits.is_empty() || digits.len() > 80 || !digits.chars().all(|c| c.is_ascii_hexdigit())
        {
            return None;
        }
        let padded = if digits.len() % 2 == 1 {
            format!("0{digits}")
        } else {
            digits
        };
        let mut bytes = Vec::with_capacity(padded.len() / 2);
        for pair in padded.as_bytes().chunks(2) {
            let text = std::str::from_utf8(pair).ok()?;
            bytes.push(u8::from_str_radix(text, 16).ok()?);
        }
        Some(Self::from_der_bytes(&bytes))
    }

    /// The big-endian magnitude bytes (no sign byte).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0
            .as_bytes()
            .chunks(2)
            .filter_map(|pair| std::str::from_utf8(pair).ok())
            .filter_map(|text| u8::from_str_radix(text, 16).ok())
            .collect()
    }

    /// The normalised hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.0)
    }
}

/// Which kind of subject alternative name the identity was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// A URI SAN (`fwnp://host/NAME`, `spiffe://...`, or another scheme).
    Uri,
    /// A DNS SAN (no URI SAN was present). Stored in lowercase.
    Dns,
}

/// What the gateway knows about an authenticated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The host identity: the first URI SAN, else the first DNS SAN (lowercased).
    pub identity: String,
    /// Where [`identity`](Self::identity) came from.
    pub kind: IdentityKind,
    /// The certificate's IP address SANs, in certificate order, IPv4-mapped IPv6 addresses
    /// normalised to IPv4.
    pub ip_sans: Vec<IpAddr>,
    /// The certificate as a CRL names it (issuer and serial number); shared, since each lease
    /// remembers the certificate that last opened or renewed it.
    pub certificate: Arc<CertificateName>,
    /// The SHA-256 fingerprint of the certificate.
    pub fingerprint: Fingerprint,
    /// The end of the certificate's validity.
    pub not_after: SystemTime,
}

impl PeerIdentity {
    /// Reads the identity of a peer from its end-entity certificate (DER).
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| IdentityError::Parse(error.to_string()))?;
        let general_names: Vec<GeneralName<'_>> = match certificate.subject_alternative_name() {
            Ok(Some(extension)) => extension.value.general_names.clone(),
            Ok(None) => Vec::new(),
            Err(error) => return Err(IdentityError::SubjectAltName(error.to_string())),
        };

        let first_uri = general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
        let first_dns = general_names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        });
        let (identity, kind) = match (first_uri, first_dns) {
            (Some(uri), _) => (checked_identity(uri)?.to_owned(), IdentityKind::Uri),
            (None, Some(dns)) => (
                checked_identity(dns)?.to_ascii_lowercase(),
                IdentityKind::Dns,
            ),
            (None, None) => return Err(IdentityError::NoIdentity),
        };

        let mut ip_sans = Vec::new();
        for name in &general_names {
            if let GeneralName::IPAddress(bytes) = name {
                ip_sans.push(ip_from_san(bytes)?);
            }
        }

        let not_after_unix = certificate.validity().not_after.timestamp();
        let not_after = if not_after_unix >= 0 {
            UNIX_EPOCH + Duration::from_secs(not_after_unix.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(not_after_unix.unsigned_abs())
        };

        Ok(PeerIdentity {
            identity,
            kind,
            ip_sans,
            certificate: Arc::new(CertificateName {
                issuer: certificate.issuer().as_raw().to_vec(),
                serial: Serial::from_der_bytes(certificate.raw_serial()),
            }),
            fingerprint: Fingerprint::of_der(der),
            not_after,
        })
    }

    /// Reads the identity of the peer of an established QUIC connection (its first certificate,
    /// which rustls has verified against the CA).
    pub fn from_connection(connection: &quinn::Connection) -> Result<Self, IdentityError> {
        let chain = connection
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or(IdentityError::NoPeerCertificate)?;
        let end_entity = chain.first().ok_or(IdentityError::NoPeerCertificate)?;
        Self::from_certificate(end_entity.as_ref())
    }
}

/// The addresses a host may open: its certificate's IP SANs, or, when it has none, the source
/// address of its QUIC connection (an IPv4-mapped IPv6 source, as a dual-stack socket reports
/// IPv4 peers, is turned back into IPv4).
pub fn allowed_addresses(peer: &PeerIdentity, connection_source: IpAddr) -> Vec<IpAddr> {
    if peer.ip_sans.is_empty() {
        vec![connection_source.to_canonical()]
    } else {
        peer.ip_sans.clone()
    }
}

/// The certificates a set of CRLs lists as revoked, each named as a CRL names it: by its
/// issuer and its serial. Used to close live connections whose certificate a freshly loaded CRL
/// revokes, since TLS checks revocation only at the handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevokedCertificates {
    entries: std::collections::BTreeSet<CertificateName>,
}

/// A certificate as a CRL entry names it: by its issuer and its serial. A serial alone could
/// name a certificate of another CA of the trust store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CertificateName {
    /// The issuer's distinguished name, as the DER bytes of the certificate.
    pub issuer: Vec<u8>,
    /// The serial number.
    pub serial: Serial,
}

impl RevokedCertificates {
    /// Whether `certificate` is listed.
    pub fn lists(&self, certificate: &CertificateName) -> bool {
        self.entries.contains(certificate)
    }

    /// Whether no certificate is listed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The serials listed, of every issuer, in order.
    pub fn serials(&self) -> Vec<Serial> {
        self.entries
            .iter()
            .map(|name| name.serial.clone())
            .collect()
    }
}

/// Reads the revoked certificates of a set of CRLs (DER). Each CRL's entries are its issuer's
/// (the indirect-CRL certificate-issuer entry extension is not supported: such a CRL is read
/// as its issuer's own).
pub fn revoked_certificates(
    crls: &[CertificateRevocationListDer<'_>],
) -> Result<RevokedCertificates, IdentityError> {
    let mut revoked = RevokedCertificates::default();
    for crl in crls {
        let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
            .map_err(|error| IdentityError::CrlParse(error.to_string()))?;
        let issuer = parsed.issuer().as_raw().to_vec();
        for entry in parsed.iter_revoked_certificates() {
            revoked.entries.insert(CertificateName {
                issuer: issuer.clone(),
                serial: Serial::from_der_bytes(entry.raw_serial()),
            });
        }
    }
    Ok(revoked)
}

fn checked_identity(name: &str) -> Result<&str, IdentityError> {
    let refuse = |reason| {
        Err(IdentityError::InvalidIdentity {
            name: name.chars().take(80).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("empty");
    }
    if name.len() > MAX_IDENTITY_LEN {
        return refuse("longer than 1024 bytes");
    }
    if !name.bytes().all(|byte| byte.is_ascii_graphic()) {
        return refuse("not printable ASCII without spaces");
    }
    Ok(name)
}

fn ip_from_san(bytes: &[u8]) -> Result<IpAddr, IdentityError> {
    if let Ok(octets) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::from(octets));
    }
    if let Ok(octets) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::from(octets).to_canonical());
    }
    Err(IdentityError::BadIpAddressSan(bytes.len()))
}

pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A CA named `name`: its issuer, for signing certificates and CRLs.
    fn test_ca(name: &str) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        rcgen::Issuer::new(params, key)
    }

    fn crl_listing(
        issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
        serial: &[u8],
    ) -> CertificateRevocationListDer<'static> {
        let now = rcgen::date_time_ymd(2026, 1, 1);
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2036, 1, 1),
            crl_number: rcgen::SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(serial),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(issuer).expect("sign crl").der().clone()
    }

    #[test]
    fn a_crl_revokes_its_own_issuers_certificate_not_another_cas_with_the_same_serial() {
        let (ours, theirs) = (test_ca("FWNP test CA"), test_ca("Another CA"));
        let serial = [0x42, 0x17];
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI("fwnp://host/a".try_into().unwrap())];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = rcgen::KeyPair::generate().expect("key");
        let certificate = params.signed_by(&key, &ours).expect("sign");
        let peer = PeerIdentity::from_certificate(certificate.der()).expect("identity");
        assert_eq!(peer.certificate.serial, Serial::from_der_bytes(&serial));

        let by_another_ca = revoked_certificates(&[crl_listing(&theirs, &serial)]).expect("crl");
        assert_eq!(
            by_another_ca.serials(),
            vec![peer.certificate.serial.clone()]
        );
        assert!(
            !by_another_ca.lists(&peer.certificate),
            "a serial of another issuer matched"
        );
        let by_its_ca = revoked_certificates(&[crl_listing(&ours, &serial)]).expect("crl");
        assert!(by_its_ca.lists(&peer.certificate));
        let both = revoked_certificates(&[crl_listing(&theirs, &serial), crl_listing(&ours, &[1])])
            .expect("crls");
        assert!(!both.lists(&peer.certificate));
    }

    #[test]
    fn serial_normalisation_drops_sign_byte_and_leading_zeros() {
        assert_eq!(Serial::from_der_bytes(&[0x00, 0x8f, 0x01]).as_str(), "8F01");
        assert_eq!(Serial::from_der_bytes(&[0x00]).as_str(), "00");
        assert_eq!(
            Serial::parse("8f:01"),
            Some(Serial::from_der_bytes(&[0x8f, 0x01]))
        );
        assert_eq!(Serial::parse("0f01"), Serial::parse("F01"));
        assert_eq!(Serial::parse("xyz"), None);
        assert_eq!(Serial::parse(""), None);
        assert_eq!(
            Serial::parse("8F01").map(|s| s.to_bytes()),
            Some(vec![0x8f, 0x01])
        );
    }

    #[test]
    fn fingerprint_prints_like_openssl() {
        let fingerprint = Fingerprint([0xab; 32]);
        let text = fingerprint.to_string();
        assert!(text.starts_with("AB:AB:"));
        assert_eq!(text.len(), 32 * 3 - 1);
        assert_eq!(fingerprint.to_hex(), "ab".repeat(32));
    }

    #[test]
    fn allowed_addresses_prefers_ip_sans_and_normalises_mapped_sources() {
        let mut peer = PeerIdentity {
            identity: "fwnp://host/a".into(),
            kind: IdentityKind::Uri,
            ip_sans: vec![],
            certificate: Arc::new(CertificateName {
                issuer: Vec::new(),
                serial: Serial::from_der_bytes(&[1]),
            }),
            fingerprint: Fingerprint([0; 32]),
            not_after: UNIX_EPOCH,
        };
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(
            allowed_addresses(&peer, mapped),
            vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))]
        );
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        assert_eq!(allowed_addresses(&peer, v6), vec![v6]);
        peer.ip_sans = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), v6];
        assert_eq!(allowed_addresses(&peer, mapped), peer.ip_sans);
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_panic() {
        assert!(matches!(
            PeerIdentity::from_certificate(&[0x30, 0x03, 0x02, 0x01]),
            Err(IdentityError::Parse(_))
        ));
        assert!(matches!(
            PeerIdentity::from_certificate(&[]),
            Err(IdentityError::Parse(_))
        ));
    }

    #[test]
    fn identity_checks() {
        assert!(checked_identity("fwnp://host/a").is_ok());
        assert!(checked_identity("").is_err());
        assert!(checked_identity("a b").is_err());
        assert!(checked_identity("a\u{7}").is_err());
        assert!(checked_identity(&"a".repeat(MAX_IDENTITY_LEN + 1)).is_err());
        assert!(matches!(
            ip_from_san(&[1, 2, 3]),
            Err(IdentityError::BadIpAddressSan(3))
        ));
    }
}
