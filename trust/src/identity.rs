//! Who a peer is, read from its end-entity certificate.
//!
//! FWNP/1 names a host by its certificate (spec section 4.1): the first URI subject alternative
//! name (`fwnp://host/NAME` or a SPIFFE ID `spiffe://TRUST-DOMAIN/PATH`) if it is a valid
//! identity, else, without any URI SAN, its first DNS name that is a valid identity (no wildcard),
//! in lower case without a trailing dot. The addresses a host may open are its certificate's IP
//! SANs, or, when it has none, the source address of its QUIC connection. Nothing here assumes
//! the certificate was made by `fwnpctl pki`: certificates from openssl, step-ca or any other
//! X.509 CA are read the same way.
//!
//! This module only reads certificates that the TLS layer ([`crate::tls`]) has already verified
//! against the CA; it does not verify signatures itself.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::extensions::GeneralName;

/// The longest identity accepted, in bytes: the bound of Welcome's identity (spec section 8.3),
/// so that every identity the gateway accepts can be reported to its host. Identities also end
/// up in logs, policy matches and the audit trail; the bound keeps a hostile certificate from
/// bloating all three.
pub const MAX_IDENTITY_LEN: usize = fwnp_proto::validate::MAX_IDENTITY_LEN;

/// The longest DNS identity, in bytes, without its trailing dot (RFC 1035's 255 octets on the
/// wire).
pub const MAX_DNS_NAME_LEN: usize = 253;

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
    /// The first URI SAN is not a valid identity, or, without a URI SAN, no DNS SAN is (a
    /// wildcard is never one): the certificate names no identity. `name` is the first refused.
    #[error("the peer certificate names no valid identity: {name:?} {reason}")]
    InvalidIdentity {
        /// The offending name, as found (lossy for display only).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// More distinct IP address SANs than a Welcome may list ([`fwnp_proto::MAX_ALLOWED_ADDRESSES`]).
    #[error("the peer certificate names {count} IP addresses, more than the {max} a host may hold")]
    TooManyAddresses {
        /// The distinct addresses counted, up to one past the most allowed.
        count: usize,
        /// The most allowed.
        max: usize,
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
/// `openssl x509 -noout -serial` prints, and the form the CRL index of `pki` (feature `issue`) stores.
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
        let bytes = hex::decode(padded).ok()?;
        Some(Self::from_der_bytes(&bytes))
    }

    /// The big-endian magnitude bytes (no sign byte).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Made from bytes or checked digits: always an even number of hex digits.
        hex::decode(&self.0).unwrap_or_default()
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
    /// The host identity: the first URI SAN, else the first valid DNS SAN (lowercased, without
    /// a trailing dot).
    pub identity: String,
    /// Where [`identity`](Self::identity) came from.
    pub kind: IdentityKind,
    /// The certificate's IP address SANs, in certificate order without duplicates, IPv4-mapped
    /// IPv6 addresses normalised to IPv4 (before duplicates are dropped).
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

        let (identity, kind) = identity_of(&general_names)?;

        let mut ip_sans: Vec<IpAddr> = Vec::new();
        for name in &general_names {
            if let GeneralName::IPAddress(bytes) = name {
                let address = ip_from_san(bytes)?;
                if !ip_sans.contains(&address) {
                    ip_sans.push(address);
                }
                // Refused before the next one is compared with every one kept: the count
                // stays small whatever the certificate holds.
                if ip_sans.len() > fwnp_proto::MAX_ALLOWED_ADDRESSES {
                    return Err(IdentityError::TooManyAddresses {
                        count: ip_sans.len(),
                        max: fwnp_proto::MAX_ALLOWED_ADDRESSES,
                    });
                }
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

/// The identity the SANs name (spec section 4.1): the first URI SAN if there is one (and it is
/// valid), else the first DNS SAN that is a valid DNS identity.
fn identity_of(names: &[GeneralName<'_>]) -> Result<(String, IdentityKind), IdentityError> {
    let refused = |name: &str, reason| IdentityError::InvalidIdentity {
        name: name.chars().take(80).collect(),
        reason,
    };
    let first_uri = names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    if let Some(uri) = first_uri {
        // A URI SAN is the name the CA chose for the host: when it is unusable the certificate
        // names nobody, rather than whoever a DNS SAN of it might name.
        return match uri_identity_problem(uri) {
            None => Ok((uri.to_owned(), IdentityKind::Uri)),
            Some(reason) => Err(refused(uri, reason)),
        };
    }
    let mut first_refused = None;
    for name in names {
        if let GeneralName::DNSName(dns) = name {
            match dns_identity(dns) {
                Ok(identity) => return Ok((identity, IdentityKind::Dns)),
                Err(reason) => {
                    first_refused.get_or_insert_with(|| refused(dns, reason));
                }
            }
        }
    }
    Err(first_refused.unwrap_or(IdentityError::NoIdentity))
}

/// Why `uri` is not a valid URI identity, or `None` if it is one: 1 to [`MAX_IDENTITY_LEN`]
/// bytes of printable ASCII without spaces, beginning with a scheme (a letter, then letters,
/// digits, `+`, `-` or `.`), a `:` and at least one more character.
pub fn uri_identity_problem(uri: &str) -> Option<&'static str> {
    if uri.is_empty() {
        return Some("is empty");
    }
    if uri.len() > MAX_IDENTITY_LEN {
        return Some("is longer than 512 bytes");
    }
    if !uri.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Some("is not printable ASCII without spaces");
    }
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Some("has no scheme");
    };
    let mut scheme_bytes = scheme.bytes();
    let scheme_ok = scheme_bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic())
        && scheme_bytes
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Some("has no valid scheme");
    }
    if rest.is_empty() {
        return Some("has nothing after its scheme");
    }
    None
}

/// The DNS identity a dNSName SAN makes (spec section 4.1): without one trailing dot, in lower
/// case, at most [`MAX_DNS_NAME_LEN`] bytes of labels of 1 to 63 letters, digits and inner
/// hyphens. A wildcard (`*`) or any other character makes it no identity; the error says why.
pub fn dns_identity(name: &str) -> Result<String, &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("is empty");
    }
    if name.contains('*') {
        return Err("is a wildcard, which names no single host");
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return Err("is longer than 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("has a label that is empty or longer than 63 bytes");
        }
        if !label
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err("has a label that is not letters, digits and inner hyphens");
        }
    }
    Ok(name.to_ascii_lowercase())
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
    hex::encode(bytes)
}

pub(crate) fn hex_upper(bytes: &[u8]) -> String {
    hex::encode_upper(bytes)
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

    /// Welcome lists the host's addresses, and must fit in an answer: a certificate naming more
    /// than 256 distinct addresses names no usable identity (spec 4.2). Repeats count once.
    #[test]
    fn a_certificate_naming_more_addresses_than_a_welcome_lists_names_no_identity() {
        let ca = test_ca("FWNP test CA");
        let with_addresses = |count: u16, repeat: bool| {
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names =
                vec![rcgen::SanType::URI("fwnp://host/many".try_into().unwrap())];
            for i in 0..count {
                let address = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i));
                params
                    .subject_alt_names
                    .push(rcgen::SanType::IpAddress(address));
                if repeat {
                    params
                        .subject_alt_names
                        .push(rcgen::SanType::IpAddress(address));
                }
            }
            let key = rcgen::KeyPair::generate().expect("key");
            let certificate = params.signed_by(&key, &ca).expect("sign");
            PeerIdentity::from_certificate(certificate.der())
        };
        let most = fwnp_proto::MAX_ALLOWED_ADDRESSES as u16;
        assert_eq!(
            with_addresses(most, true).expect("identity").ip_sans.len(),
            256
        );
        assert!(matches!(
            with_addresses(most + 1, false),
            Err(IdentityError::TooManyAddresses {
                count: 257,
                max: 256
            })
        ));
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
        assert_eq!(uri_identity_problem("fwnp://host/a"), None);
        assert_eq!(uri_identity_problem("urn:x"), None);
        for bad in [
            "",
            "a b",
            "a\u{7}",
            "no-scheme",
            "1x:y",
            ":y",
            "fwnp:",
            "f_x://h",
        ] {
            assert!(uri_identity_problem(bad).is_some(), "{bad:?} accepted");
        }
        let longest = format!("fwnp://host/{}", "a".repeat(MAX_IDENTITY_LEN - 12));
        assert_eq!(longest.len(), MAX_IDENTITY_LEN);
        assert_eq!(uri_identity_problem(&longest), None);
        assert!(uri_identity_problem(&format!("{longest}a")).is_some());
        assert!(matches!(
            ip_from_san(&[1, 2, 3]),
            Err(IdentityError::BadIpAddressSan(3))
        ));
    }

    #[test]
    fn dns_identities_are_lower_case_without_trailing_dot_and_never_wildcards() {
        assert_eq!(
            dns_identity("Web-01.Example.ORG.").as_deref(),
            Ok("web-01.example.org")
        );
        assert_eq!(dns_identity("web-01").as_deref(), Ok("web-01"));
        for bad in [
            "*.wild.example.org",
            "*",
            "a.*.b",
            "",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "a b",
            "a.b..",
            "é.example",
        ] {
            assert!(dns_identity(bad).is_err(), "{bad:?} accepted");
        }
        let label = "a".repeat(63);
        let longest = [&label[..], &label[..], &label[..], &"b".repeat(61)].join(".");
        assert_eq!(longest.len(), MAX_DNS_NAME_LEN);
        assert!(dns_identity(&longest).is_ok());
        assert!(dns_identity(&format!("{longest}.")).is_ok());
        assert!(dns_identity(&format!("c{longest}")).is_err());
        assert!(dns_identity(&"a".repeat(64)).is_err());
    }

    /// A certificate with `sans`, signed by a throwaway CA.
    fn certificate_with(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let ca = test_ca("FWNP identity test CA");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().expect("key");
        params.signed_by(&key, &ca).expect("sign").der().to_vec()
    }

    fn dns(name: &str) -> rcgen::SanType {
        rcgen::SanType::DnsName(name.try_into().expect("ia5"))
    }

    fn uri(name: &str) -> rcgen::SanType {
        rcgen::SanType::URI(name.try_into().expect("ia5"))
    }

    #[test]
    fn the_identity_follows_the_san_rules() {
        let read = |sans| PeerIdentity::from_certificate(&certificate_with(sans));
        // A wildcard names nobody; nor does a certificate whose only DNS name is one.
        let wildcard = read(vec![dns("*.wild.example.org")]);
        assert!(
            matches!(wildcard, Err(IdentityError::InvalidIdentity { .. })),
            "{wildcard:?}"
        );
        // The first valid DNS name after invalid ones, lower case, without its trailing dot.
        let peer = read(vec![
            dns("*.wild.example.org"),
            dns("bad_name.example"),
            dns("Web-01.Example.org."),
            dns("web-02.example.org"),
        ])
        .expect("identity");
        assert_eq!(
            (peer.identity.as_str(), peer.kind),
            ("web-01.example.org", IdentityKind::Dns)
        );
        // The first URI wins over DNS names, and an invalid first URI names nobody: neither the
        // next URI nor a DNS name stands in for it.
        let peer = read(vec![
            dns("web-01.example.org"),
            uri("fwnp://host/a"),
            uri("fwnp://host/b"),
        ])
        .expect("identity");
        assert_eq!(
            (peer.identity.as_str(), peer.kind),
            ("fwnp://host/a", IdentityKind::Uri)
        );
        let over_long = format!("fwnp://host/{}", "a".repeat(MAX_IDENTITY_LEN));
        for first in ["no-scheme", over_long.as_str()] {
            let refused = read(vec![
                uri(first),
                uri("fwnp://host/b"),
                dns("web-01.example.org"),
            ]);
            assert!(
                matches!(refused, Err(IdentityError::InvalidIdentity { .. })),
                "{first:?}: {refused:?}"
            );
        }
        // An identity of exactly the longest length is one, and fits Welcome.
        let longest = format!("fwnp://host/{}", "a".repeat(MAX_IDENTITY_LEN - 12));
        assert_eq!(
            read(vec![uri(&longest)]).expect("identity").identity,
            longest
        );
        // IP SANs: certificate order, IPv4-mapped ones as IPv4, without duplicates.
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        let ip = rcgen::SanType::IpAddress;
        let peer = read(vec![
            uri("fwnp://host/a"),
            ip(v6),
            ip(v4),
            ip(mapped),
            ip(v6),
        ])
        .expect("identity");
        assert_eq!(peer.ip_sans, vec![v6, v4]);
    }
}
