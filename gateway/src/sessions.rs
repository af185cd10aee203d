//! The gateway's live connections as the service sees them: who is connected, what each
//! connection has said (Hello, notices wanted), and how to reach it with a notice or close it.
//! The transport behind a session is a [`HostLink`] (the server's QUIC connection), so that the
//! service never touches QUIC itself.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
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

/// [`Session`]'s `welcome_answered` when no Welcome waits to be written.
const NO_WELCOME: u8 = u8::MAX;

/// Wakes the requests that wait for a Welcome being written ([`Session::welcome_settled`]),
/// whichever connection's: they are rare (a request that overtook its own connection's
/// Welcome), and one per process costs a connection nothing.
static WELCOMES_SETTLED: tokio::sync::Notify = tokio::sync::Notify::const_new();

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
    /// Whether Hello was answered with Welcome on this connection, and the Welcome written.
    pub welcomed: AtomicBool,
    /// Whether the client's Hello set the NOTICES capability: only then may notices be sent
    /// (spec section 5.3), and never before Welcome.
    pub notices: AtomicBool,
    /// A Welcome decided but not yet written ([`Session::answered_welcome`]): `NO_WELCOME`, or
    /// whether its Hello set NOTICES.
    welcome_answered: AtomicU8,
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
            welcome_answered: AtomicU8::new(NO_WELCOME),
            credential_revoked: AtomicBool::new(false),
            rate_limited: AtomicBool::new(false),
            link,
        }
    }

    /// Records that the connection's Hello is answered with Welcome, its client asking for
    /// notices or not. Nothing changes until that Welcome is written
    /// ([`Session::welcome_written`]): a notice or a request served before would come before
    /// the Welcome (spec 5.2 and 5.3).
    pub fn answered_welcome(&self, notices: bool) {
        self.welcome_answered
            .store(u8::from(notices), Ordering::Release);
    }

    /// The Welcome answered is written: the connection is welcomed from now on, and takes
    /// notices if its Hello asked for them. Says whether a Welcome was waiting.
    pub fn welcome_written(&self) -> bool {
        let answered = self.welcome_answered.swap(NO_WELCOME, Ordering::AcqRel);
        if answered == NO_WELCOME {
            return false;
        }
        self.notices.store(answered == 1, Ordering::Release);
        self.welcomed.store(true, Ordering::Release);
        WELCOMES_SETTLED.notify_waiters();
        true
    }

    /// The Welcome answered could not be written (its stream was reset, or the connection
    /// lost): the connection stays without one.
    pub fn welcome_not_written(&self) {
        self.welcome_answered.store(NO_WELCOME, Ordering::Release);
        WELCOMES_SETTLED.notify_waiters();
    }

    /// Waits while a Welcome is answered and not yet written. Once its bytes are on their way
    /// the client may have it and send its next request, which can be taken before the
    /// Welcome's own task has marked it written: that request is served once it is (or
    /// refused hello-required if it never is), not refused for a Welcome the client holds.
    pub async fn welcome_settled(&self) {
        loop {
            let settled = WELCOMES_SETTLED.notified();
            tokio::pin!(settled);
            // Registered before the check, so that a write between the two still wakes it.
            settled.as_mut().enable();
            if self.welcome_answered.load(Ordering::Acquire) == NO_WELCOME {
                return;
            }
            // Woken by another connection's Welcome too: look again.
            settled.await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A link that counts the notices it is given.
    #[derive(Debug, Default)]
    struct Counting(Arc<AtomicUsize>);

    impl HostLink for Counting {
        fn send_notice(&self, _: Vec<u8>, _: Option<Duration>) -> NoticeFuture<'_> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Ok(()) })
        }

        fn close(&self, _: QuicErrorCode, _: &str) {}
    }

    /// A Welcome decided is not yet in force: until it is written, the connection is not
    /// welcomed and takes no notice (spec 5.2 and 5.3), whatever its Hello asked.
    #[tokio::test]
    async fn a_welcome_is_in_force_once_it_is_written() {
        let sent = Arc::new(AtomicUsize::new(0));
        let session = Session::new(
            1,
            None,
            None,
            "192.0.2.10:4433".parse().unwrap(),
            Box::new(Counting(sent.clone())),
        );
        let notice = Message::EpochChanged(fwnp_proto::EpochChanged {
            common: fwnp_proto::Common::default(),
            epoch: 7,
        });
        assert!(!session.welcome_written(), "no Welcome was answered");
        session.answered_welcome(true);
        session.notify(&notice).await;
        assert_eq!(sent.load(Ordering::Relaxed), 0);
        assert!(!session.welcomed.load(Ordering::Acquire));
        assert!(session.welcome_written());
        assert!(session.welcomed.load(Ordering::Acquire));
        session.notify(&notice).await;
        assert_eq!(sent.load(Ordering::Relaxed), 1);
        assert!(!session.welcome_written(), "written once");
    }
}
