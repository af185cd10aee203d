//! The gateway's TLS 1.3 cipher suites: *ring*'s own, except that keys are built from their
//! key material only when something is first protected or opened with them.
//!
//! With *ring* each key is an expanded AES or ChaCha20 key of about 560 bytes on the heap, and
//! rustls and quinn derive more of them than an idle connection uses:
//!
//! - rustls derives the TLS record layer's keys at the end of every handshake, QUIC or not, and
//!   keeps them for the connection's life. QUIC never uses them: it protects packets with keys
//!   of its own and carries TLS messages in CRYPTO frames, not in records.
//! - quinn derives the QUIC packet keys of the next key phase as soon as the handshake is done,
//!   so that it can follow a key update at once. A connection that sends little never updates.
//!
//! On a gateway with many idle host connections these four keys were some 2,240 bytes of each
//! connection's memory. Here each holds its key material (44 bytes) until it is used, then
//! becomes *ring*'s own key: what it protects is exactly what *ring*'s suites protect. What an
//! idle connection keeps of them is now about 500 bytes.

use std::sync::{Mutex, OnceLock, PoisonError};

use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter, MessageEncrypter,
    OutboundOpaqueMessage, OutboundPlainMessage, Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::quic::{self, HeaderProtectionKey, PacketKey, Tag};
use rustls::{CipherSuiteCommon, ConnectionTrafficSecrets, SupportedCipherSuite, Tls13CipherSuite};

/// *ring*'s TLS 1.3 suites, in its order of preference, with the record layer's keys and QUIC's
/// packet keys built on demand. Made once per process: rustls takes suites by `'static`
/// reference.
pub(super) fn tls13_suites() -> Vec<SupportedCipherSuite> {
    static SUITES: OnceLock<Vec<SupportedCipherSuite>> = OnceLock::new();
    SUITES
        .get_or_init(|| {
            rustls::crypto::ring::DEFAULT_CIPHER_SUITES
                .iter()
                .filter_map(SupportedCipherSuite::tls13)
                .map(|suite| {
                    let aead: &'static RecordKeysOnDemand =
                        Box::leak(Box::new(RecordKeysOnDemand(suite.aead_alg)));
                    let quic = suite.quic.map(|quic| -> &'static dyn quic::Algorithm {
                        Box::leak(Box::new(PacketKeysOnDemand(quic)))
                    });
                    let suite: &'static Tls13CipherSuite = Box::leak(Box::new(Tls13CipherSuite {
                        common: CipherSuiteCommon {
                            suite: suite.common.suite,
                            hash_provider: suite.common.hash_provider,
                            confidentiality_limit: suite.common.confidentiality_limit,
                        },
                        hkdf_provider: suite.hkdf_provider,
                        aead_alg: aead,
                        quic,
                    }));
                    SupportedCipherSuite::Tls13(suite)
                })
                .collect()
        })
        .clone()
}

/// A TLS 1.3 AEAD whose encrypters and decrypters are those of the AEAD it wraps, built at their
/// first use.
struct RecordKeysOnDemand(&'static dyn Tls13AeadAlgorithm);

impl Tls13AeadAlgorithm for RecordKeysOnDemand {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(Encrypter(Mutex::new(OnDemand::new(self.0, key, iv))))
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(Decrypter(OnDemand::new(self.0, key, iv)))
    }

    fn key_len(&self) -> usize {
        self.0.key_len()
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        self.0.extract_keys(key, iv)
    }

    fn fips(&self) -> bool {
        self.0.fips()
    }
}

/// The key material until the first use, then what `algorithm` built from it.
struct OnDemand<T: ?Sized> {
    algorithm: &'static dyn Tls13AeadAlgorithm,
    keys: Option<(AeadKey, Iv)>,
    built: Option<Box<T>>,
}

impl<T: ?Sized> OnDemand<T> {
    fn new(algorithm: &'static dyn Tls13AeadAlgorithm, key: AeadKey, iv: Iv) -> Self {
        OnDemand {
            algorithm,
            keys: Some((key, iv)),
            built: None,
        }
    }

    /// What `build` makes of the key material, made at the first call. `None` only if a call
    /// before panicked while building (rustls then has no use for the connection anyway).
    fn get(
        &mut self,
        build: impl FnOnce(&dyn Tls13AeadAlgorithm, AeadKey, Iv) -> Box<T>,
    ) -> Option<&mut T> {
        if self.built.is_none() {
            let (key, iv) = self.keys.take()?;
            self.built = Some(build(self.algorithm, key, iv));
        }
        self.built.as_deref_mut()
    }
}

/// rustls asks an encrypter for a record's length through `&self`, so the state is behind a
/// lock; it is only ever taken on the record layer, which QUIC does not use.
struct Encrypter(Mutex<OnDemand<dyn MessageEncrypter>>);

fn build_encrypter(
    algorithm: &dyn Tls13AeadAlgorithm,
    key: AeadKey,
    iv: Iv,
) -> Box<dyn MessageEncrypter> {
    algorithm.encrypter(key, iv)
}

impl MessageEncrypter for Encrypter {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, rustls::Error> {
        let state = self.0.get_mut().unwrap_or_else(PoisonError::into_inner);
        state
            .get(build_encrypter)
            .ok_or(rustls::Error::EncryptError)?
            .encrypt(msg, seq)
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Without an encrypter no record is sent, whatever its length.
        state.get(build_encrypter).map_or(payload_len, |built| {
            built.encrypted_payload_len(payload_len)
        })
    }
}

struct Decrypter(OnDemand<dyn MessageDecrypter>);

impl MessageDecrypter for Decrypter {
    fn decrypt<'a>(
        &mut self,
        msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, rustls::Error> {
        self.0
            .get(|algorithm, key, iv| algorithm.decrypter(key, iv))
            .ok_or(rustls::Error::DecryptError)?
            .decrypt(msg, seq)
    }
}

/// A QUIC packet protection algorithm whose packet keys are those of the algorithm it wraps,
/// built at their first use. Header protection keys are used from the first packet of their
/// phase, so they are built at once.
struct PacketKeysOnDemand(&'static dyn quic::Algorithm);

impl quic::Algorithm for PacketKeysOnDemand {
    fn packet_key(&self, key: AeadKey, iv: Iv) -> Box<dyn PacketKey> {
        Box::new(PacketKeyOnDemand {
            algorithm: self.0,
            keys: Mutex::new(Some((key, iv))),
            built: OnceLock::new(),
        })
    }

    fn header_protection_key(&self, key: AeadKey) -> Box<dyn HeaderProtectionKey> {
        self.0.header_protection_key(key)
    }

    fn aead_key_len(&self) -> usize {
        self.0.aead_key_len()
    }

    fn fips(&self) -> bool {
        self.0.fips()
    }
}

/// QUIC uses a packet key through `&self` from any thread, so the key is made once behind a
/// `OnceLock`; after that a use costs one atomic load more than *ring*'s key alone.
struct PacketKeyOnDemand {
    algorithm: &'static dyn quic::Algorithm,
    keys: Mutex<Option<(AeadKey, Iv)>>,
    built: OnceLock<Option<Box<dyn PacketKey>>>,
}

/// The authentication tag of every AEAD QUIC uses (RFC 9001, Section 5.3), reported only by a key
/// that could not be built.
const TAG_LEN: usize = 16;

impl PacketKeyOnDemand {
    /// The key, made at the first call. `None` only if a call before panicked while making it;
    /// the connection then fails to protect or open anything.
    fn key(&self) -> Option<&dyn PacketKey> {
        self.built
            .get_or_init(|| {
                let keys = self
                    .keys
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                keys.map(|(key, iv)| self.algorithm.packet_key(key, iv))
            })
            .as_deref()
    }
}

impl PacketKey for PacketKeyOnDemand {
    fn encrypt_in_place(
        &self,
        packet_number: u64,
        header: &[u8],
        payload: &mut [u8],
    ) -> Result<Tag, rustls::Error> {
        self.key()
            .ok_or(rustls::Error::EncryptError)?
            .encrypt_in_place(packet_number, header, payload)
    }

    fn encrypt_in_place_for_path(
        &self,
        path_id: u32,
        packet_number: u64,
        header: &[u8],
        payload: &mut [u8],
    ) -> Result<Tag, rustls::Error> {
        self.key()
            .ok_or(rustls::Error::EncryptError)?
            .encrypt_in_place_for_path(path_id, packet_number, header, payload)
    }

    fn decrypt_in_place<'a>(
        &self,
        packet_number: u64,
        header: &[u8],
        payload: &'a mut [u8],
    ) -> Result<&'a [u8], rustls::Error> {
        self.key()
            .ok_or(rustls::Error::DecryptError)?
            .decrypt_in_place(packet_number, header, payload)
    }

    fn decrypt_in_place_for_path<'a>(
        &self,
        path_id: u32,
        packet_number: u64,
        header: &[u8],
        payload: &'a mut [u8],
    ) -> Result<&'a [u8], rustls::Error> {
        self.key()
            .ok_or(rustls::Error::DecryptError)?
            .decrypt_in_place_for_path(path_id, packet_number, header, payload)
    }

    fn tag_len(&self) -> usize {
        self.key().map_or(TAG_LEN, |key| key.tag_len())
    }

    // A key that could not be built has nothing left to protect: a limit of 0 makes QUIC stop
    // using it.
    fn confidentiality_limit(&self) -> u64 {
        self.key().map_or(0, |key| key.confidentiality_limit())
    }

    fn integrity_limit(&self) -> u64 {
        self.key().map_or(0, |key| key.integrity_limit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::OutboundChunks;
    use rustls::{ContentType, ProtocolVersion};

    fn seal(encrypter: &mut dyn MessageEncrypter, payload: &[u8], seq: u64) -> Vec<u8> {
        let plain = OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        encrypter.encrypt(plain, seq).expect("encrypt").encode()
    }

    fn open(decrypter: &mut dyn MessageDecrypter, record: &mut [u8], seq: u64) -> Option<Vec<u8>> {
        // The record's 5-byte header is not part of what the decrypter is given.
        let opaque = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut record[5..],
        );
        decrypter
            .decrypt(opaque, seq)
            .ok()
            .map(|plain| plain.payload.to_vec())
    }

    /// The suites are *ring*'s TLS 1.3 ones, in its order, each usable for QUIC.
    #[test]
    fn the_suites_are_rings_tls13_suites_in_its_order() {
        let ours = tls13_suites();
        let rings: Vec<&'static Tls13CipherSuite> = rustls::crypto::ring::DEFAULT_CIPHER_SUITES
            .iter()
            .filter_map(SupportedCipherSuite::tls13)
            .collect();
        assert_eq!(
            rings.len(),
            3,
            "AES-256-GCM, AES-128-GCM, ChaCha20-Poly1305"
        );
        assert_eq!(
            ours.iter().map(|s| s.suite()).collect::<Vec<_>>(),
            rings.iter().map(|s| s.common.suite).collect::<Vec<_>>()
        );
        for (ours, ring) in ours.iter().zip(rings) {
            let ours = ours.tls13().expect("a TLS 1.3 suite");
            assert!(ours.quic.is_some(), "{:?} without QUIC", ours.common.suite);
            assert_eq!(ours.aead_alg.key_len(), ring.aead_alg.key_len());
            assert_eq!(
                ours.common.confidentiality_limit,
                ring.common.confidentiality_limit
            );
        }
    }

    /// Records are protected byte for byte as *ring*'s own suite protects them, and opened by
    /// the same key only. (The suites with 32-byte keys: rustls makes a shorter key only
    /// inside itself; the AES-128 suite is used in a real handshake by the TLS tests.)
    #[test]
    fn records_are_protected_exactly_as_by_rings_own_suites() {
        let mut checked = 0;
        for (ours, ring) in tls13_suites().iter().zip(
            rustls::crypto::ring::DEFAULT_CIPHER_SUITES
                .iter()
                .filter_map(SupportedCipherSuite::tls13),
        ) {
            let ours = ours.tls13().expect("a TLS 1.3 suite");
            if ring.aead_alg.key_len() != 32 {
                continue;
            }
            let key = |byte| AeadKey::from([byte; 32]);
            let iv = || Iv::new([7; 12]);
            let mut theirs = ring.aead_alg.encrypter(key(3), iv());
            let mut mine = ours.aead_alg.encrypter(key(3), iv());
            assert_eq!(
                mine.encrypted_payload_len(100),
                theirs.encrypted_payload_len(100)
            );
            let mut opener = ours.aead_alg.decrypter(key(3), iv());
            let mut wrong = ours.aead_alg.decrypter(key(4), iv());
            for seq in 0..3 {
                let payload = format!("record {seq} of {:?}", ring.common.suite);
                let mut record = seal(mine.as_mut(), payload.as_bytes(), seq);
                assert_eq!(record, seal(theirs.as_mut(), payload.as_bytes(), seq));
                assert!(open(wrong.as_mut(), &mut record.clone(), seq).is_none());
                assert_eq!(
                    open(opener.as_mut(), &mut record, seq).as_deref(),
                    Some(payload.as_bytes())
                );
            }
            checked += 1;
        }
        assert_eq!(checked, 2, "AES-256-GCM and ChaCha20-Poly1305");
    }

    /// QUIC packets are protected byte for byte as with *ring*'s own suites (initial keys of
    /// each suite, derived by rustls as for a connection), and opened by the other side's keys.
    #[test]
    fn packets_are_protected_exactly_as_by_rings_own_suites() {
        let rings = rustls::crypto::ring::DEFAULT_CIPHER_SUITES
            .iter()
            .filter_map(SupportedCipherSuite::tls13);
        for (ours, ring) in tls13_suites().iter().zip(rings) {
            let ours = ours.tls13().expect("a TLS 1.3 suite");
            let keys = |suite: &'static Tls13CipherSuite, side| {
                let quic = suite.quic.expect("a QUIC suite");
                quic::Keys::initial(quic::Version::V1, suite, quic, b"\x83\x94\xc8\xf0", side)
            };
            let mine = keys(ours, rustls::Side::Client);
            let theirs = keys(ring, rustls::Side::Client);
            let peer = keys(ours, rustls::Side::Server);
            let (mine, theirs) = (&mine.local.packet, &theirs.local.packet);
            assert_eq!(mine.tag_len(), theirs.tag_len());
            assert_eq!(mine.confidentiality_limit(), theirs.confidentiality_limit());
            assert_eq!(mine.integrity_limit(), theirs.integrity_limit());
            let header = b"a packet's header";
            for number in 0..3u64 {
                let text = format!("packet {number} of {:?}", ring.common.suite);
                let mut a = text.clone().into_bytes();
                let mut b = text.clone().into_bytes();
                let tag_a = theirs
                    .encrypt_in_place(number, header, &mut a)
                    .expect("seal");
                let tag_b = mine.encrypt_in_place(number, header, &mut b).expect("seal");
                assert_eq!(
                    (a.as_slice(), tag_a.as_ref()),
                    (b.as_slice(), tag_b.as_ref())
                );
                b.extend_from_slice(tag_b.as_ref());
                let mut other = b.clone();
                assert!(
                    peer.remote
                        .packet
                        .decrypt_in_place(number + 1, header, &mut other)
                        .is_err(),
                    "opened under another packet number"
                );
                let opened = peer
                    .remote
                    .packet
                    .decrypt_in_place(number, header, &mut b)
                    .expect("open");
                assert_eq!(opened, text.as_bytes());
            }
        }
    }
}
