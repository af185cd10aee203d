//! The gateway's live connections as the service sees them: who is connected, what each
//! connection has said (Hello, notices wanted), and how to reach it with a notice or close it.
//! The transport behind a session is a [`HostLink`] (the server's QUIC connection), so that the
//! service never touches QUIC itself.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fwnp_proto::{Message, QuicErrorCode};
use tracing::debug;

use fwnp_trust::identity::PeerIdentity;

/// Why a notice did not reach its host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NoticeError {
    /// The stream could not be opened or written (the host is gone).
    #[error("{0}")]
    Failed(String),
    /// The host did not acknowledge it in the time given.
    #[error("not acknowledged in time")]
    NotAcknowledged,
}

/// A notice on its way.
pub type NoticeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), NoticeError>> + Send + 'a>>;

/// The transport of one host connection, as a session uses it.
pub trait HostLink: Send + Sync + std::fmt::Debug {
    /// Sends `bytes` as one notice on a new unidirectional stream; with `acknowledged_within`,
    /// resolves once the host has acknowledged all of it (or fails after that time).
    fn send_notice(
        &self,
        bytes: Vec<u8>,
        acknowledged_within: Option<Duration>,
    ) -> NoticeFuture<'_>;

    /// Closes the connection with a protocol error code and a reason.
    fn close(&self, reason: QuicErrorCode, text: &str);
}

/// One authenticated connection, as the service sees it.
#[derive(Debug)]
pub struct Session {
    /// A number unique within this gateway process, for logs.
    pub id: u64,
    /// Who the certificate says the peer is; `None` when the certificate names no identity,
    /// in which case every request is refused with not-authorized.
    pub peer: Option<PeerIdentity>,
    /// Why the certificate names no usable identity.
    pub identity_error: Option<String>,
    /// The source address of the connection.
    pub remote: SocketAddr,
    /// Whether Hello was answered with Welcome on this connection.
    pub welcomed: AtomicBool,
    /// Whether the client's Hello set the NOTICES capability: only then may notices be sent
    /// (spec section 5.3), and never before Welcome.
    pub notices: AtomicBool,
    /// Whether a CRL loaded since the handshake revokes this connection's certificate: the
    /// connection is about to be closed, and no further request on it is served.
    pub credential_revoked: AtomicBool,
    /// Whether a request on this connection was refused as rate-limited since the connection
    /// last took a stream: the transport then pauses before taking the next one.
    pub(crate) rate_limited: AtomicBool,
    /// What the session is counted under ([`Sessions::key_of`]), made once: every request
    /// looks its rate up under it.
    key: String,
    link: Box<dyn HostLink>,
}

impl Session {
    /// A session of a connection that has just completed its handshake.
    pub fn new(
        id: u64,
        peer: Option<PeerIdentity>,
        identity_error: Option<String>,
        remote: SocketAddr,
        link: Box<dyn HostLink>,
    ) -> Self {
        let key = match &peer {
            Some(peer) => peer.identity.clone(),
            None => format!("(no identity) {}", remote.ip()),
        };
        Session {
            key,
            id,
            peer,
            identity_error,
            remote,
            welcomed: AtomicBool::new(false),
            notices: AtomicBool::new(false),
            credential_revoked: AtomicBool::new(false),
            rate_limited: AtomicBool::new(false),
            link,
        }
    }

    /// The identity, or a placeholder for audit when the certificate named none.
    pub fn identity(&self) -> &str {
        self.peer
            .as_ref()
            .map_or("(no identity)", |p| p.identity.as_str())
    }

    /// Sends a notice on a new unidirectional stream; a failure only means the host is gone,
    /// which the lease's own expiry then handles.
    pub async fn notify(&self, notice: &Message) {
        self.send(notice, None).await;
    }

    /// Sends a notice like [`Session::notify`] and waits, at most `within`, until the host has
    /// acknowledged all of it: for a notice followed by closing the connection, which would
    /// drop data not yet delivered.
    pub async fn notify_delivered(&self, notice: &Message, within: Duration) {
        self.send(notice, Some(within)).await;
    }

    async fn send(&self, notice: &Message, within: Option<Duration>) {
        if !self.notices.load(Ordering::Acquire) {
            return;
        }
        let bytes = fwnp_proto::codec::encode(notice);
        if let Err(e) = self.link.send_notice(bytes, within).await {
            debug!(
                session = self.id,
                identity = self.identity(),
                "notice not delivered: {e}"
            );
        }
    }

    /// Closes the connection with a protocol error code.
    pub fn close(&self, reason: QuicErrorCode, text: &str) {
        self.link.close(reason, text);
    }
}

/// The live connections, by identity: used to push notices and to cap connections per identity.
#[derive(Debug, Default)]
pub struct Sessions {
    by_identity: Mutex<HashMap<String, Vec<Arc<Session>>>>,
    next_id: AtomicU64,
}

impl Sessions {
    /// The sessions of one identity.
    pub fn of(&self, identity: &str) -> Vec<Arc<Session>> {
        self.lock().get(identity).cloned().unwrap_or_default()
    }

    /// How many connections are open.
    pub fn count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Every live session.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.lock().values().flatten().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<Session>>>> {
        // A panic elsewhere while holding the lock leaves a map that is still consistent.
        self.by_identity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key a session is counted under: its identity, or for a certificate without one (kept
    /// only long enough to be told so), its address, so that one such host cannot use up the
    /// connections of every other.
    pub(crate) fn key_of(session: &Session) -> String {
        session.key.clone()
    }

    /// [`Sessions::key_of`], borrowed.
    pub(crate) fn key_ref(session: &Session) -> &String {
        &session.key
    }

    /// A number for a new session, unique within this process.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn insert(&self, session: &Arc<Session>, limit: u32) -> bool {
        let mut map = self.lock();
        let list = map.entry(Self::key_of(session)).or_default();
        if list.len() >= limit as usize {
            return false;
        }
        list.push(session.clone());
        true
    }

    pub(crate) fn remove(&self, session: &Session) {
        let mut map = self.lock();
        let key = Self::key_of(session);
        if let Some(list) = map.get_mut(&key) {
            list.retain(|s| s.id != session.id);
            if list.is_empty() {
                map.remove(&key);
            }
        }
    }
}
