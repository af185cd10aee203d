//! The deployment's own certificate authority, as `fwnpctl pki` drives it.
//!
//! A CA directory holds:
//!
//! | file | what |
//! | --- | --- |
//! | `ca.pem`, `ca.key` | the CA certificate and its private key (mode 0600) |
//! | `NAME.pem`, `NAME.key` | a gateway or host certificate and its key (mode 0600) |
//! | `crl.pem` | the certificate revocation list, signed by the CA, that the gateway loads |
//! | `crl.index` | the revoked serials and the CRL number, from which `crl.pem` is rebuilt |
//!
//! Gateway certificates carry the server-auth extended key usage and DNS/IP SANs (what hosts
//! check the gateway's name against). Host certificates carry client-auth, their identity as a
//! URI SAN (`fwnp://host/NAME` by default, or the SPIFFE IDs given) and their IP SANs (the
//! addresses they may open). A host that wants to keep its key makes a CSR with [`create_csr`];
//! the CA signs it with [`issue_from_csr`], deciding the SANs itself.
//!
//! rcgen is only the bootstrap: nothing in [`crate::identity`] or [`crate::tls`] assumes these
//! certificates came from here, and an existing CA made by openssl can sign through these functions
//! too (its `ca.pem` and an unencrypted PKCS#8 `ca.key`).
//!
//! Existing files are never overwritten: issuing a name twice fails with
//! [`PkiError::AlreadyExists`]; revoke the old certificate and move its files away first.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use time::OffsetDateTime;

pub use crate::identity::{Fingerprint, Serial};

/// File name of the CA certificate in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the CRL in a CA directory.
pub const CRL_FILE: &str = "crl.pem";
/// File name of the revocation index in a CA directory.
pub const CRL_INDEX_FILE: &str = "crl.index";
/// A sensible default lifetime of a CA certificate, in days (for `fwnpctl pki init`).
pub const DEFAULT_CA_VALIDITY_DAYS: u32 = 3650;
/// A sensible default lifetime of a gateway or host certificate, in days.
pub const DEFAULT_LEAF_VALIDITY_DAYS: u32 = 365;
/// How long a freshly signed CRL says it is current (its nextUpdate). The gateway does not refuse
/// a CRL past its nextUpdate (rustls' default); re-sign with [`write_crl`] to refresh it anyway.
pub const DEFAULT_CRL_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// The start of every validity window is backdated this much, so that hosts whose clock lags a
/// little behind the CA's can use a certificate at once.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(300);

/// Errors of the CA operations. Each says which file or which input is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading, writing or creating a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file to write exists already; PKI files are never overwritten.
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A certificate or CSR name is not usable as a file name and identity.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A URI SAN is malformed (for SPIFFE IDs: not `spiffe://TRUST-DOMAIN/PATH`).
    #[error("invalid URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI given.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A DNS SAN is malformed.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidDnsName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The validity window ends before it starts, or ends in the past when that is not wanted.
    #[error("invalid validity: {0}")]
    InvalidValidity(&'static str),
    /// A file holds something other than what was expected.
    #[error("{path}: {what}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with its content.
        what: String,
    },
    /// The certificate to revoke was not issued by this CA (its issuer is not the CA's subject).
    #[error("{path} was not issued by the CA in {ca_dir}")]
    NotIssuedByThisCa {
        /// The certificate.
        path: PathBuf,
        /// The CA directory.
        ca_dir: PathBuf,
    },
    /// The CRL index is malformed.
    #[error("{path} line {line}: {what}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// rcgen refused to build or sign something.
    #[error("certificate generation failed: {0}")]
    Generation(#[from] rcgen::Error),
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// The first instant the certificate is valid.
    pub not_before: SystemTime,
    /// The last instant the certificate is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// From now (less [`CLOCK_SKEW_ALLOWANCE`]) for `duration`.
    pub fn starting_now(duration: Duration) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now),
            not_after: now + duration,
        }
    }

    /// From now for `days` days.
    pub fn days(days: u32) -> Self {
        Self::starting_now(Duration::from_secs(u64::from(days) * 24 * 3600))
    }

    fn check(&self) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
        if self.not_after <= self.not_before {
            return Err(PkiError::InvalidValidity(
                "not_after is not after not_before",
            ));
        }
        Ok((
            OffsetDateTime::from(self.not_before),
            OffsetDateTime::from(self.not_after),
        ))
    }
}

/// What an issuing operation wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The certificate (PEM).
    pub cert_path: PathBuf,
    /// The private key (PEM, mode 0600), when this operation generated one.
    pub key_path: Option<PathBuf>,
    /// The certificate's serial number.
    pub serial: Serial,
    /// The SHA-256 fingerprint, to print for the operator.
    pub fingerprint: Fingerprint,
    /// The certificate's DER encoding.
    pub der: Vec<u8>,
}

/// Why a certificate is revoked (RFC 5280 section 5.3.1 reason codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationReason {
    /// No reason given.
    Unspecified,
    /// The certificate's key is known or suspected to be compromised.
    KeyCompromise,
    /// The CA's key is compromised.
    CaCompromise,
    /// The subject's name or other information changed.
    AffiliationChanged,
    /// A new certificate replaces this one.
    Superseded,
    /// The host is gone.
    CessationOfOperation,
    /// Temporarily on hold.
    CertificateHold,
    /// The host's rights were withdrawn.
    PrivilegeWithdrawn,
}

impl RevocationReason {
    /// Every reason, for help texts.
    pub const ALL: [RevocationReason; 8] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::CaCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
        Self::CertificateHold,
        Self::PrivilegeWithdrawn,
    ];

    /// The kebab-case name used on the command line and in the index.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "key-compromise",
            Self::CaCompromise => "ca-compromise",
            Self::AffiliationChanged => "affiliation-changed",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessation-of-operation",
            Self::CertificateHold => "certificate-hold",
            Self::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }

    fn to_rcgen(self) -> rcgen::RevocationReason {
        match self {
            Self::Unspecified => rcgen::RevocationReason::Unspecified,
            Self::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            Self::CaCompromise => rcgen::RevocationReason::CaCompromise,
            Self::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            Self::Superseded => rcgen::RevocationReason::Superseded,
            Self::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            Self::CertificateHold => rcgen::RevocationReason::CertificateHold,
            Self::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        }
    }
}

impl std::fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`RevocationReason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown revocation reason {0:?} (one of: unspecified, key-compromise, ca-compromise, affiliation-changed, superseded, cessation-of-operation, certificate-hold, privilege-withdrawn)"
)]
pub struct UnknownRevocationReason(pub String);

impl FromStr for RevocationReason {
    type Err = UnknownRevocationReason;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|reason| reason.as_str() == text)
            .ok_or_else(|| UnknownRevocationReason(text.to_owned()))
    }
}

/// The outcome of [`revoke`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The revoked serial.
    pub serial: Serial,
    /// False when the serial was already revoked (the CRL is re-signed all the same).
    pub newly_revoked: bool,
    /// The CRL written.
    pub crl_path: PathBuf,
    /// The number of serials the CRL now lists.
    pub revoked_count: usize,
}

/// Creates a CA in `dir` (created mode 0700 if missing): a self-signed CA certificate `ca.pem`, its key
/// `ca.key` (0600), an empty signed CRL `crl.pem` and its index. Refuses to overwrite an existing
/// CA. The CA's name is `CN=name` plus its key identifier as `serialNumber`, unique to the CA.
pub fn init_ca(dir: &Path, name: &str, validity: Validity) -> Result<IssuedCertificate, PkiError> {
    check_common_name(name)?;
    let (not_before, not_after) = validity.check()?;
    create_private_dir(dir)?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for path in [
        &cert_path,
        &key_path,
        &dir.join(CRL_FILE),
        &dir.join(CRL_INDEX_FILE),
    ] {
        refuse_existing(path)?;
    }

    let key = KeyPair::generate()?;
    let key_id = subject_key_id(&key);
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_distinguished_name(name, &key_id)?;
    params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(key_id);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    let certificate = params.self_signed(&key)?;

    write_new_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new_file(&cert_path, certificate.pem().as_bytes(), 0o644)?;
    let index = CrlIndex::default();
    index.store(&dir.join(CRL_INDEX_FILE))?;
    let issuer = Issuer::new(params, key);
    sign_crl(
        dir,
        &issuer,
        certificate.der(),
        &index,
        DEFAULT_CRL_VALIDITY,
    )?;

    Ok(issued(
        cert_path,
        Some(key_path),
        certificate.der().to_vec(),
    ))
}

/// Issues a gateway (server) certificate `NAME.pem` with a fresh key `NAME.key` (0600) in the CA
/// directory. Its SANs are the DNS names and addresses hosts will connect to; with neither given,
/// `name` itself is the DNS SAN.
pub fn issue_gateway(
    dir: &Path,
    name: &str,
    dns: &[String],
    ips: &[IpAddr],
    validity: Validity,
) -> Result<IssuedCertificate, PkiError> {
    check_file_name(name)?;
    let mut sans = Vec::new();
    let default_dns = [name.to_owned()];
    let dns = if dns.is_empty() && ips.is_empty() {
        &default_dns[..]
    } else {
        dns
    };
    for dns_name in dns {
        sans.push(dns_san(dns_name)?);
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(ip.to_canonical())));
    let params = leaf_params(name, sans, ExtendedKeyUsagePurpose::ServerAuth, validity)?;
    issue_with_new_key(dir, name, params)
}

/// Issues a host (client) certificate `NAME.pem` with a fresh key `NAME.key` (0600) in the CA
/// directory. The identity is the first URI SAN: the `uris` given (SPIFFE IDs or other URIs), or
/// `fwnp://host/NAME` when neither URIs nor DNS names are given (with only DNS names, the first
/// is the identity). The IP SANs are the addresses the host may open.
pub fn issue_host(
    dir: &Path,
    name: &str,
    ips: &[IpAddr],
    uris: &[String],
    dns: &[String],
    validity: Validity,
) -> Result<IssuedCertificate, PkiError> {
    check_file_name(name)?;
    let params = host_params(name, ips, uris, dns, validity)?;
    issue_with_new_key(dir, name, params)
}

/// Makes a key `NAME.key` (0600) and a certificate signing request `NAME.csr` in `dir`, for a host
/// that keeps its key and sends only the CSR to the CA. Returns the CSR path.
pub fn create_csr(dir: &Path, name: &str) -> Result<PathBuf, PkiError> {
    check_file_name(name)?;
    create_private_dir(dir)?;
    let key_path = dir.join(format!("{name}.key"));
    let csr_path = dir.join(format!("{name}.csr"));
    refuse_existing(&key_path)?;
    refuse_existing(&csr_path)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(name);
    let key = KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    write_new_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new_file(&csr_path, csr.pem()?.as_bytes(), 0o644)?;
    Ok(csr_path)
}

/// Signs a host's CSR (PEM, e.g. from [`create_csr`] or `openssl req -new`), writing `NAME.pem` in
/// the CA directory; the host keeps its key. The CSR's signature is verified; the SANs and usages
/// it requests are ignored: the CA decides them exactly as [`issue_host`] does.
pub fn issue_from_csr(
    dir: &Path,
    csr_path: &Path,
    name: &str,
    ips: &[IpAddr],
    uris: &[String],
    dns: &[String],
    validity: Validity,
) -> Result<IssuedCertificate, PkiError> {
    check_file_name(name)?;
    let csr_pem = read_text(csr_path)?;
    let csr =
        CertificateSigningRequestParams::from_pem(&csr_pem).map_err(|error| PkiError::BadFile {
            path: csr_path.to_owned(),
            what: format!("not a valid certificate signing request: {error}"),
        })?;
    let params = host_params(name, ips, uris, dns, validity)?;
    let cert_path = dir.join(format!("{name}.pem"));
    refuse_existing(&cert_path)?;
    let (issuer, _) = load_issuer(dir)?;
    let certificate = params.signed_by(&csr.public_key, &issuer)?;
    write_new_file(&cert_path, certificate.pem().as_bytes(), 0o644)?;
    Ok(issued(cert_path, None, certificate.der().to_vec()))
}

/// Revokes the certificate at `cert_path` (issued by the CA in `dir`): records its serial in the
/// index and re-signs `crl.pem`. Revoking twice is harmless. The gateway applies the new CRL on
/// its next reload (see [`crate::tls`]).
pub fn revoke(
    dir: &Path,
    cert_path: &Path,
    reason: RevocationReason,
) -> Result<Revocation, PkiError> {
    let ca_der = read_single_certificate(&dir.join(CA_CERT_FILE))?;
    let cert_der = read_single_certificate(cert_path)?;
    let (_, ca) =
        x509_parser::parse_x509_certificate(&ca_der).map_err(|error| PkiError::BadFile {
            path: dir.join(CA_CERT_FILE),
            what: format!("not a valid X.509 certificate: {error}"),
        })?;
    let (_, certificate) =
        x509_parser::parse_x509_certificate(&cert_der).map_err(|error| PkiError::BadFile {
            path: cert_path.to_owned(),
            what: format!("not a valid X.509 certificate: {error}"),
        })?;
    if certificate.issuer().as_raw() != ca.subject().as_raw() {
        return Err(PkiError::NotIssuedByThisCa {
            path: cert_path.to_owned(),
            ca_dir: dir.to_owned(),
        });
    }
    revoke_serial(
        dir,
        Serial::from_der_bytes(certificate.raw_serial()),
        reason,
    )
}

/// Revokes a serial number directly (for a certificate whose file is lost).
pub fn revoke_serial(
    dir: &Path,
    serial: Serial,
    reason: RevocationReason,
) -> Result<Revocation, PkiError> {
    let index_path = dir.join(CRL_INDEX_FILE);
    let mut index = CrlIndex::load(&index_path)?;
    let newly_revoked = !index.revoked.contains_key(&serial);
    if newly_revoked {
        index.revoked.insert(serial.clone(), (unix_now(), reason));
    }
    let (issuer, ca_der) = load_issuer(dir)?;
    index.crl_number = index.crl_number.saturating_add(1);
    // The index is the source of truth: store it before the CRL so that a crash in between leaves
    // a CRL that the next signing rebuilds, never a revocation that is lost.
    index.store(&index_path)?;
    let crl_path = sign_crl(dir, &issuer, &ca_der, &index, DEFAULT_CRL_VALIDITY)?;
    Ok(Revocation {
        serial,
        newly_revoked,
        crl_path,
        revoked_count: index.revoked.len(),
    })
}

/// Re-signs `crl.pem` from the index with a new CRL number and a nextUpdate `next_update_in` from
/// now (creates an empty index for a CA made elsewhere). Returns the CRL path.
pub fn write_crl(dir: &Path, next_update_in: Duration) -> Result<PathBuf, PkiError> {
    let index_path = dir.join(CRL_INDEX_FILE);
    let mut index = if index_path.exists() {
        CrlIndex::load(&index_path)?
    } else {
        CrlIndex::default()
    };
    let (issuer, ca_der) = load_issuer(dir)?;
    index.crl_number = index.crl_number.saturating_add(1);
    index.store(&index_path)?;
    sign_crl(dir, &issuer, &ca_der, &index, next_update_in)
}

/// The serials recorded as revoked in the CA's index, with when and why.
pub fn revoked_list(dir: &Path) -> Result<Vec<(Serial, SystemTime, RevocationReason)>, PkiError> {
    let index = CrlIndex::load(&dir.join(CRL_INDEX_FILE))?;
    Ok(index
        .revoked
        .into_iter()
        .map(|(serial, (time, reason))| (serial, UNIX_EPOCH + Duration::from_secs(time), reason))
        .collect())
}

/// The SHA-256 fingerprint of the first certificate in a PEM file, for printing.
pub fn fingerprint_file(path: &Path) -> Result<Fingerprint, PkiError> {
    Ok(Fingerprint::of_der(&read_single_certificate(path)?))
}

/// The SHA-256 fingerprint of a DER certificate.
pub fn fingerprint_sha256(der: &[u8]) -> Fingerprint {
    Fingerprint::of_der(der)
}

fn host_params(
    name: &str,
    ips: &[IpAddr],
    uris: &[String],
    dns: &[String],
    validity: Validity,
) -> Result<CertificateParams, PkiError> {
    let mut sans = Vec::new();
    if uris.is_empty() && dns.is_empty() {
        sans.push(uri_san(&format!("fwnp://host/{name}"))?);
    }
    for uri in uris {
        sans.push(uri_san(uri)?);
    }
    for dns_name in dns {
        sans.push(dns_san(dns_name)?);
    }
    sans.extend(ips.iter().map(|ip| SanType::IpAddress(ip.to_canonical())));
    leaf_params(name, sans, ExtendedKeyUsagePurpose::ClientAuth, validity)
}

fn leaf_params(
    name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    validity: Validity,
) -> Result<CertificateParams, PkiError> {
    let (not_before, not_after) = validity.check()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

fn issue_with_new_key(
    dir: &Path,
    name: &str,
    params: CertificateParams,
) -> Result<IssuedCertificate, PkiError> {
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    refuse_existing(&cert_path)?;
    refuse_existing(&key_path)?;
    let (issuer, _) = load_issuer(dir)?;
    let key = KeyPair::generate()?;
    let certificate = params.signed_by(&key, &issuer)?;
    write_new_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new_file(&cert_path, certificate.pem().as_bytes(), 0o644)?;
    Ok(issued(
        cert_path,
        Some(key_path),
        certificate.der().to_vec(),
    ))
}

fn issued(cert_path: PathBuf, key_path: Option<PathBuf>, der: Vec<u8>) -> IssuedCertificate {
    let serial = x509_parser::parse_x509_certificate(&der)
        .map(|(_, certificate)| Serial::from_der_bytes(certificate.raw_serial()))
        .unwrap_or_else(|_| Serial::from_der_bytes(&[0]));
    IssuedCertificate {
        cert_path,
        key_path,
        serial,
        fingerprint: Fingerprint::of_der(&der),
        der,
    }
}

fn load_issuer(dir: &Path) -> Result<(Issuer<'static, KeyPair>, Vec<u8>), PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert_pem = read_text(&cert_path)?;
    let key_pem = read_text(&key_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|error| PkiError::BadFile {
        path: key_path.clone(),
        what: format!("not a usable unencrypted PEM private key: {error}"),
    })?;
    let ca_der = read_single_certificate(&cert_path)?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|error| PkiError::BadFile {
        path: cert_path,
        what: format!("not a usable CA certificate: {error}"),
    })?;
    Ok((issuer, ca_der))
}

fn sign_crl(
    dir: &Path,
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    ca_der: &[u8],
    index: &CrlIndex,
    next_update_in: Duration,
) -> Result<PathBuf, PkiError> {
    let now = SystemTime::now();
    let revoked_certs = index
        .revoked
        .iter()
        .map(|(serial, (time, reason))| RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial.to_bytes()),
            revocation_time: OffsetDateTime::from(UNIX_EPOCH + Duration::from_secs(*time)),
            reason_code: Some(reason.to_rcgen()),
            invalidity_date: None,
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update: OffsetDateTime::from(now),
        next_update: OffsetDateTime::from(now + next_update_in.max(Duration::from_secs(60))),
        crl_number: SerialNumber::from_slice(&index.crl_number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: ca_key_identifier(ca_der),
    };
    let crl = params.signed_by(issuer)?;
    let crl_path = dir.join(CRL_FILE);
    // Written beside and renamed, so a gateway reloading at that moment reads the old or the new
    // CRL, never half of one.
    let temporary = dir.join(format!("{CRL_FILE}.tmp"));
    let _ = fs::remove_file(&temporary);
    write_new_file(&temporary, crl.pem()?.as_bytes(), 0o644)?;
    fs::rename(&temporary, &crl_path).map_err(|source| io_error(&crl_path, source))?;
    Ok(crl_path)
}

/// The CA certificate's own subject key identifier, so that the CRL's authority key identifier
/// names the same key whichever tool made the CA (openssl uses SHA-1, rcgen SHA-256).
fn ca_key_identifier(ca_der: &[u8]) -> rcgen::KeyIdMethod {
    let subject_key_id = x509_parser::parse_x509_certificate(ca_der)
        .ok()
        .and_then(|(_, ca)| {
            ca.extensions()
                .iter()
                .find_map(|extension| match extension.parsed_extension() {
                    x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(key_id) => {
                        Some(key_id.0.to_vec())
                    }
                    _ => None,
                })
        });
    match subject_key_id {
        Some(key_id) => rcgen::KeyIdMethod::PreSpecified(key_id),
        None => rcgen::KeyIdMethod::Sha256,
    }
}

/// The revocation index: one line per revoked serial plus the CRL number.
#[derive(Debug, Default)]
struct CrlIndex {
    crl_number: u64,
    revoked: BTreeMap<Serial, (u64, RevocationReason)>,
}

impl CrlIndex {
    fn load(path: &Path) -> Result<Self, PkiError> {
        let text = read_text(path)?;
        let mut index = CrlIndex::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| PkiError::BadIndex {
                path: path.to_owned(),
                line: number + 1,
                what: what.to_owned(),
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["crl-number", value] => {
                    index.crl_number = value
                        .parse()
                        .map_err(|_| bad("crl-number is not an integer"))?;
                }
                ["revoked", serial, time, reason] => {
                    let serial =
                        Serial::parse(serial).ok_or_else(|| bad("bad serial (hex expected)"))?;
                    let time = time
                        .parse()
                        .map_err(|_| bad("bad revocation time (unix seconds expected)"))?;
                    let reason = reason
                        .parse()
                        .map_err(|error: UnknownRevocationReason| bad(&error.to_string()))?;
                    index.revoked.insert(serial, (time, reason));
                }
                _ => {
                    return Err(bad(
                        "expected `crl-number N` or `revoked SERIAL UNIX-TIME REASON`",
                    ));
                }
            }
        }
        Ok(index)
    }

    fn store(&self, path: &Path) -> Result<(), PkiError> {
        let mut text =
            String::from("# FWNP CA revocation index: crl.pem is rebuilt from this file.\n");
        text.push_str(&format!("crl-number {}\n", self.crl_number));
        for (serial, (time, reason)) in &self.revoked {
            text.push_str(&format!("revoked {serial} {time} {reason}\n"));
        }
        let temporary = path.with_extension("index.tmp");
        let _ = fs::remove_file(&temporary);
        write_new_file(&temporary, text.as_bytes(), 0o644)?;
        fs::rename(&temporary, path).map_err(|source| io_error(path, source))
    }
}

/// The key identifier of a CA key: the first 20 bytes of the SHA-256 digest of its public key
/// (RFC 7093 method 1), as the subject key identifier of the CA certificate states it.
fn subject_key_id(key: &KeyPair) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    digest.as_ref()[..20].to_vec()
}

/// A CA's name: the common name the operator chose, and the CA's key identifier as the
/// `serialNumber` attribute. Hosts and gateways find a certificate's CA by its issuer name: two
/// CAs of the same common name (every `pki init` without `--name` makes an `FWNP CA`) would
/// otherwise be confused, and a certificate of the one would fail against the other with a bad
/// signature (`decrypt_error`) instead of as an unknown CA (`unknown_ca`).
fn ca_distinguished_name(name: &str, key_id: &[u8]) -> Result<DistinguishedName, PkiError> {
    /// id-at-serialNumber (X.520).
    const SERIAL_NUMBER: [u64; 4] = [2, 5, 4, 5];
    let mut distinguished_name = distinguished_name(name);
    let key_id: rcgen::string::PrintableString = crate::identity::hex_upper(key_id).try_into()?;
    distinguished_name.push(
        DnType::CustomDnType(SERIAL_NUMBER.to_vec()),
        rcgen::DnValue::PrintableString(key_id),
    );
    Ok(distinguished_name)
}

fn distinguished_name(name: &str) -> DistinguishedName {
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, name);
    distinguished_name
}

fn check_common_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason| {
        Err(PkiError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return invalid("must be 1 to 64 characters");
    }
    if name.chars().any(char::is_control) {
        return invalid("must not contain control characters");
    }
    Ok(())
}

/// Names become file names and the path of `fwnp://host/NAME`, so they are kept to a safe set.
fn check_file_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason| {
        Err(PkiError::InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return invalid("must be 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    {
        return invalid("only letters, digits, '.', '_' and '-' are allowed");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return invalid("must not start with '.' or '-'");
    }
    if matches!(name, "ca" | "crl") {
        return invalid("reserved for the CA's own files");
    }
    Ok(())
}

fn uri_san(uri: &str) -> Result<SanType, PkiError> {
    let invalid = |reason| {
        Err(PkiError::InvalidUri {
            uri: uri.to_owned(),
            reason,
        })
    };
    if uri.is_empty() || uri.len() > crate::identity::MAX_IDENTITY_LEN {
        return invalid("must be 1 to 512 bytes");
    }
    if !uri.bytes().all(|byte| byte.is_ascii_graphic()) {
        return invalid("only printable ASCII without spaces is allowed");
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return invalid("expected SCHEME://AUTHORITY/PATH");
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'-' | b'.'))
    {
        return invalid("bad scheme");
    }
    if scheme.eq_ignore_ascii_case("spiffe") {
        // SPIFFE ID rules: lowercase trust domain, a path of non-empty segments, nothing else.
        let (trust_domain, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        if scheme != "spiffe" {
            return invalid("the SPIFFE scheme must be lowercase");
        }
        if trust_domain.is_empty()
            || !trust_domain.bytes().all(|byte| {
                byte.is_ascii_lowercase()
                    || byte.is_ascii_digit()
                    || matches!(byte, b'.' | b'-' | b'_')
            })
        {
            return invalid(
                "SPIFFE trust domain must be lowercase letters, digits, '.', '-' or '_'",
            );
        }
        if path.is_empty()
            || path
                .split('/')
                .skip(1)
                .any(|segment| segment.is_empty() || segment == "." || segment == "..")
        {
            return invalid(
                "SPIFFE ID needs a path of non-empty segments (spiffe://TRUST-DOMAIN/PATH)",
            );
        }
        if path.contains(['?', '#', '%']) {
            return invalid("SPIFFE ID must not have a query, fragment or percent-encoding");
        }
    } else if rest.is_empty() {
        return invalid("empty authority and path");
    }
    Ok(SanType::URI(uri.try_into()?))
}

fn dns_san(name: &str) -> Result<SanType, PkiError> {
    let invalid = |reason| {
        Err(PkiError::InvalidDnsName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 253 {
        return invalid("must be 1 to 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return invalid("every label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return invalid("labels hold letters, digits and inner '-'");
        }
    }
    Ok(SanType::DnsName(name.try_into()?))
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    // Positive and of full length, as RFC 5280 wants a positive integer of at most 20 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| io_error(path, source))
}

fn read_single_certificate(path: &Path) -> Result<Vec<u8>, PkiError> {
    let text = read_text(path)?;
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let bad = |what: &str| PkiError::BadFile {
        path: path.to_owned(),
        what: what.to_owned(),
    };
    let start = text
        .find(begin)
        .ok_or_else(|| bad("no PEM CERTIFICATE block"))?;
    let body_and_rest = text
        .get(start + begin.len()..)
        .ok_or_else(|| bad("truncated PEM block"))?;
    let stop = body_and_rest
        .find(end)
        .ok_or_else(|| bad("PEM CERTIFICATE block has no END line"))?;
    let body: String = body_and_rest
        .get(..stop)
        .ok_or_else(|| bad("truncated PEM block"))?
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64_decode(&body).ok_or_else(|| bad("PEM CERTIFICATE block is not valid base64"))
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(byte: u8) -> Option<u32> {
        Some(match byte {
            b'A'..=b'Z' => u32::from(byte - b'A'),
            b'a'..=b'z' => u32::from(byte - b'a') + 26,
            b'0'..=b'9' => u32::from(byte - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    }
    let trimmed = text.trim_end_matches('=');
    let mut output = Vec::with_capacity(trimmed.len() * 3 / 4);
    let mut buffer = 0u32;
    let mut bits = 0u32;
    for byte in trimmed.bytes() {
        buffer = (buffer << 6) | value(byte)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            output.push(((buffer >> bits) & 0xff) as u8);
        }
    }
    Some(output)
}

/// Creates a directory (and its parents) readable only by its owner, as it will hold private
/// keys; an existing directory is left as it is.
fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| io_error(dir, source))
}

fn refuse_existing(path: &Path) -> Result<(), PkiError> {
    if path.exists() {
        return Err(PkiError::AlreadyExists {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::AlreadyExists {
                    path: path.to_owned(),
                }
            } else {
                io_error(path, source)
            }
        })?;
    file.write_all(contents)
        .map_err(|source| io_error(path, source))?;
    file.sync_all().map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_file_name("web-01").is_ok());
        assert!(check_file_name("host.example_1").is_ok());
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-flag",
            "ca",
            "crl",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn uris_are_checked() {
        assert!(uri_san("fwnp://host/web-01").is_ok());
        assert!(uri_san("spiffe://example.org/ns/prod/sa/web").is_ok());
        for bad in [
            "",
            "spiffe://Example.org/x",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a?b",
            "SPIFFE://example.org/a",
            "no-scheme",
            "fwnp://",
            "fwnp://host/a b",
        ] {
            assert!(uri_san(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn dns_names_are_checked() {
        assert!(dns_san("gw.example.org").is_ok());
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a_b.c",
            "a.b-",
            &format!("{}.x", "a".repeat(64)),
        ] {
            assert!(dns_san(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn reasons_round_trip() {
        for reason in RevocationReason::ALL {
            assert_eq!(reason.as_str().parse::<RevocationReason>(), Ok(reason));
        }
        assert!("nope".parse::<RevocationReason>().is_err());
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(base64_decode("aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode("aGk"), Some(b"hi".to_vec()));
        assert_eq!(base64_decode("a*"), None);
    }

    #[test]
    fn serials_are_positive_and_random() {
        let first = random_serial().map(|serial| serial.to_bytes());
        let second = random_serial().map(|serial| serial.to_bytes());
        let (Ok(first), Ok(second)) = (first, second) else {
            panic!("random failed")
        };
        assert_eq!(first.len(), 16);
        assert!(first[0] & 0x80 == 0 && first[0] & 0x40 != 0);
        assert_ne!(first, second);
    }
}
