//! A test certificate authority, made with `fwnp_trust::pki` as `fwnpctl pki` makes one: a CA
//! with a gateway certificate, and host certificates issued on demand.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fwnp_trust::pki::{self, Validity};
use fwnp_trust::tls::{ClientTlsFiles, ServerTlsFiles};
use tempfile::TempDir;

/// The DNS name in the gateway's certificate.
pub const GATEWAY_NAME: &str = "gateway.test";

/// A CA directory with a gateway certificate `gateway.pem` for [`GATEWAY_NAME`] and the given
/// addresses, removed when dropped.
///
/// ```
/// let pki = fwnp_testkit::pki::Pki::new("doc");
/// let host = pki.host("web-01", &[], &[], &[]);
/// assert!(host.cert.exists() && pki.file("gateway.pem").exists());
/// ```
#[derive(Debug)]
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// A CA whose gateway certificate names 127.0.0.1.
    pub fn new(label: &str) -> Self {
        Self::with_gateway_ips(label, &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
    }

    /// A CA whose gateway certificate names `ips`.
    pub fn with_gateway_ips(label: &str, ips: &[IpAddr]) -> Self {
        let dir = crate::temp_dir(&format!("pki-{label}"));
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
            ips,
            Validity::days(2),
        )
        .expect("issue gateway certificate");
        Pki { dir }
    }

    /// The CA directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A file of the CA directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    /// The gateway's TLS files, with the CA's CRL.
    pub fn server_files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.file("gateway.pem"),
            key: self.file("gateway.key"),
            ca: self.file("ca.pem"),
            crl: Some(self.file("crl.pem")),
        }
    }

    /// Issues a host certificate valid for a day (identity `fwnp://host/NAME` unless `uris`
    /// says otherwise); returns the host's TLS files.
    pub fn host(&self, name: &str, ips: &[IpAddr], uris: &[&str], dns: &[&str]) -> ClientTlsFiles {
        self.host_valid(name, ips, uris, dns, Validity::days(1))
    }

    /// Issues a host certificate with the given validity.
    pub fn host_valid(
        &self,
        name: &str,
        ips: &[IpAddr],
        uris: &[&str],
        dns: &[&str],
        validity: Validity,
    ) -> ClientTlsFiles {
        let uris: Vec<String> = uris.iter().map(|s| (*s).to_owned()).collect();
        let dns: Vec<String> = dns.iter().map(|s| (*s).to_owned()).collect();
        pki::issue_host(self.path(), name, ips, &uris, &dns, validity).expect("issue host");
        self.host_files(name)
    }

    /// A host certificate that expired yesterday.
    pub fn expired_host(&self, name: &str) -> ClientTlsFiles {
        let day = Duration::from_secs(24 * 3600);
        let now = SystemTime::now();
        self.host_valid(
            name,
            &[],
            &[],
            &[],
            Validity {
                not_before: now - 3 * day,
                not_after: now - day,
            },
        )
    }

    /// The TLS files of a host issued earlier.
    pub fn host_files(&self, name: &str) -> ClientTlsFiles {
        ClientTlsFiles {
            cert: self.file(&format!("{name}.pem")),
            key: self.file(&format!("{name}.key")),
            ca: self.file("ca.pem"),
        }
    }
}
