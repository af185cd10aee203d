//! The gateway's client-certificate verifier, with the TLS alerts of spec Section 3.2.
//!
//! rustls gives each certificate error webpki reports a precise alert only where it has a
//! variant of its own for it. The others (an unhandled critical extension, a CA certificate
//! presented as an end entity, a path-length or name constraint violated, a malformed
//! extension) become `CertificateError::Other`, which rustls alerts as `certificate_unknown`
//! (46). The spec gives `bad_certificate` (42) for all of them, so this verifier hands every
//! other decision to rustls's own and turns those errors into ones alerted as
//! `bad_certificate`. The detail the alert cannot carry is logged.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

/// A client-certificate verifier whose refusals rustls reports as `certificate_unknown` are
/// reported as `bad_certificate` instead.
#[derive(Debug)]
pub(super) struct BadCertificateAlerts(pub(super) Arc<dyn ClientCertVerifier>);

/// `error`, with a certificate error that rustls would alert as `certificate_unknown` turned
/// into one it alerts as `bad_certificate`: `UnhandledCriticalExtension` for that cause, and
/// `BadEncoding` for the others.
pub(super) fn bad_certificate_alert(error: Error) -> Error {
    match error {
        Error::InvalidCertificate(CertificateError::Other(other)) => {
            let detail = other.to_string();
            tracing::info!(error = %detail, "client certificate refused");
            let cause = if detail.contains("UnsupportedCriticalExtension") {
                CertificateError::UnhandledCriticalExtension
            } else {
                CertificateError::BadEncoding
            };
            Error::InvalidCertificate(cause)
        }
        other => other,
    }
}

impl ClientCertVerifier for BadCertificateAlerts {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.0
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(bad_certificate_alert)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::AlertDescription;
    use rustls::OtherError;

    #[derive(Debug)]
    struct Cause(&'static str);
    impl std::fmt::Display for Cause {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Cause {}

    fn alert(error: &Error) -> Option<AlertDescription> {
        match error {
            Error::InvalidCertificate(e) => Some(e.clone().into()),
            _ => None,
        }
    }

    #[test]
    fn errors_rustls_alerts_as_certificate_unknown_are_alerted_as_bad_certificate() {
        let other = |cause| {
            Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Cause(cause)))))
        };
        assert_eq!(
            alert(&other("CaUsedAsEndEntity")),
            Some(AlertDescription::CertificateUnknown)
        );
        for cause in ["CaUsedAsEndEntity", "UnsupportedCriticalExtension"] {
            assert_eq!(
                alert(&bad_certificate_alert(other(cause))),
                Some(AlertDescription::BadCertificate),
                "{cause}"
            );
        }
        // Errors with alerts of their own keep them.
        for (error, expected) in [
            (CertificateError::UnknownIssuer, AlertDescription::UnknownCA),
            (
                CertificateError::Revoked,
                AlertDescription::CertificateRevoked,
            ),
            (
                CertificateError::Expired,
                AlertDescription::CertificateExpired,
            ),
            (
                CertificateError::InvalidPurpose,
                AlertDescription::UnsupportedCertificate,
            ),
        ] {
            let mapped = bad_certificate_alert(Error::InvalidCertificate(error));
            assert_eq!(alert(&mapped), Some(expected));
        }
    }
}
