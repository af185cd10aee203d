//! The local API's Unix socket: accepts applications, learns who they are from the socket's
//! peer credentials and `/proc`, reads their frames and hands them to the core, and writes the
//! core's answers and events back.
//!
//! A frame over the size limit or empty closes the connection; a frame that does not decode is
//! answered with a Denied when its request id can be read, and otherwise closes the connection.
//!
//! Every resource a client can make the agent hold is bounded: connections per user and in
//! all, requests awaiting the core per connection (past that the connection is not read), and
//! bytes queued for a client that does not read (past that it is closed). A peer that may not
//! use the agent gets one answer and is closed; it never reaches the core.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use fwnp_proto::local::{
    DenialCode, FRAME_HEADER_LEN, LocalCode, LocalDenied, LocalMessage, decode_frame_body,
    encode_frame, frame_body_len,
};
use fwnp_proto::{AppInfo, Common};
use nix::sys::socket::sockopt::PeerPidfd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::config::LocalConfig;
use crate::core::{ConnId, CoreInput, Peer};
use crate::ports::{CallerProcess, ProcFs};

/// Longest application name sent to the gateway (the protocol's limit for `name`).
const MAX_NAME: usize = 256;
/// Longest executable path sent to the gateway (the protocol's limit for `executable`).
const MAX_EXECUTABLE: usize = 1024;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Another agent answers on the socket.
    #[error("{0} is in use by a running agent")]
    InUse(PathBuf),
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The socket's ACL could not be set: its filesystem may not support POSIX ACLs.
    #[error(
        "giving {path} an ACL for the allowed users and groups: {source} (the socket's \
         directory must be on a filesystem with POSIX ACLs, such as the tmpfs of /run)"
    )]
    Acl {
        /// The path.
        path: PathBuf,
        /// Why it failed.
        source: posix_acl::ACLError,
    },
}

/// Binds the socket: creates its directory, removes a stale socket file, and lets exactly the
/// allowed users and groups connect (local API 2; the peer-credential check stays the gate,
/// the file's permissions keep out who could never pass it): mode 0600 when nobody else is
/// allowed, 0660 with the group when one group is, and otherwise 0600 with a POSIX ACL entry
/// for each allowed user and group.
///
/// The socket is bound in a fresh directory only root can enter, given its owner and mode
/// there, and then renamed into place: at no moment can anyone connect to it with a wider
/// mode than the configured one.
pub fn bind(config: &LocalConfig) -> Result<UnixListener, ServerError> {
    let path = &config.socket;
    let io = |what, source| ServerError::Io {
        what,
        path: path.clone(),
        source,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.clone()));
        }
        std::fs::remove_file(path).map_err(|e| io("removing the stale socket", e))?;
    }
    let file_name = path
        .file_name()
        .unwrap_or(std::ffi::OsStr::new("agent.sock"));
    let private = dir.join(format!(
        ".{}.{}.{:x}",
        file_name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    // DirBuilder applies the mode at creation (less the umask, which only narrows it).
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| io("creating a private directory beside", e))?;
    let staged = private.join(file_name);
    let bound = (|| {
        let listener = UnixListener::bind(&staged).map_err(|e| io("binding", e))?;
        let only_one_group = config.allowed_uids.is_empty() && config.allowed_gids.len() == 1;
        let nobody_else = config.allowed_uids.is_empty() && config.allowed_gids.is_empty();
        let mode = if only_one_group
            && std::os::unix::fs::chown(&staged, None, config.allowed_gids.first().copied()).is_ok()
        {
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io("setting the mode of", e))?;
        let access = if nobody_else || mode == 0o660 {
            format!("mode {mode:o}")
        } else {
            let rw = posix_acl::ACL_READ | posix_acl::ACL_WRITE;
            let mut acl = posix_acl::PosixACL::new(mode);
            for uid in &config.allowed_uids {
                acl.set(posix_acl::Qualifier::User(*uid), rw);
            }
            for gid in &config.allowed_gids {
                acl.set(posix_acl::Qualifier::Group(*gid), rw);
            }
            acl.write_acl(&staged).map_err(|source| ServerError::Acl {
                path: path.clone(),
                source,
            })?;
            format!(
                "mode {mode:o} and the ACL {}",
                acl.as_text().replace('\n', ",")
            )
        };
        std::fs::rename(&staged, path).map_err(|e| io("moving the socket into place at", e))?;
        Ok((listener, access))
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    let (listener, access) = bound?;
    info!(socket = %path.display(), %access, "local API listening");
    Ok(listener)
}

/// The frames queued for one connection, bounded in bytes: a client that does not read its
/// answers is closed rather than allowed to grow the agent's memory.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    state: Arc<OutboxState>,
}

#[derive(Debug)]
struct OutboxState {
    queued: AtomicUsize,
    limit: usize,
    closing: AtomicBool,
    close: Notify,
}

impl Outbox {
    /// An outbox of at most `limit` queued bytes, and the receiving end its writer drains.
    pub fn new(limit: usize) -> (Outbox, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(OutboxState {
            queued: AtomicUsize::new(0),
            limit,
            closing: AtomicBool::new(false),
            close: Notify::new(),
        });
        (Outbox { tx, state }, rx)
    }

    /// Queues `frame`; when that would pass the limit, closes the connection instead. Returns
    /// whether the frame was queued.
    pub fn send(&self, frame: Vec<u8>) -> bool {
        if self.state.closing.load(Ordering::Relaxed) {
            return false;
        }
        let len = frame.len();
        let before = self.state.queued.fetch_add(len, Ordering::Relaxed);
        if before + len > self.state.limit {
            self.state.queued.fetch_sub(len, Ordering::Relaxed);
            debug!(
                queued = before,
                limit = self.state.limit,
                "a local client does not read its answers; closing its connection"
            );
            self.close();
            return false;
        }
        self.tx.send(frame).is_ok()
    }

    /// Asks the connection to close (it stops reading, and its leases are released).
    pub fn close(&self) {
        self.state.close();
    }

    /// Whether the connection was asked to close.
    pub fn is_closing(&self) -> bool {
        self.state.closing.load(Ordering::Relaxed)
    }
}

impl OutboxState {
    fn close(&self) {
        if !self.closing.swap(true, Ordering::Relaxed) {
            self.close.notify_one();
        }
    }
}

/// Open connections, per user id and in all; a slot is given back when its guard drops.
#[derive(Debug, Default)]
struct Slots {
    per_user: Mutex<HashMap<u32, usize>>,
}

struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Slots {
    fn take(
        self: &Arc<Self>,
        uid: u32,
        per_user: usize,
        total: usize,
    ) -> Result<Slot, &'static str> {
        let mut map = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let all: usize = map.values().sum();
        if all >= total {
            return Err("the agent has reached max_connections");
        }
        let mine = map.entry(uid).or_insert(0);
        if *mine >= per_user {
            return Err("this user has reached max_connections_per_user");
        }
        *mine += 1;
        Ok(Slot {
            slots: self.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self
            .slots
            .per_user
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// Accepts connections until the core goes away.
pub async fn serve(
    listener: UnixListener,
    config: LocalConfig,
    core: mpsc::UnboundedSender<CoreInput>,
) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let slots = Arc::new(Slots::default());
    let procfs = ProcFs::default();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("accepting a local connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = core.closed() => return,
        };
        let conn = NEXT.fetch_add(1, Ordering::Relaxed);
        let cred = match stream.peer_cred() {
            Ok(cred) => cred,
            Err(e) => {
                warn!("no peer credentials on a local connection: {e}");
                continue;
            }
        };
        let slot = match slots.take(
            cred.uid(),
            config.max_connections_per_user,
            config.max_connections,
        ) {
            Ok(slot) => slot,
            Err(why) => {
                // Closed at once: one user cannot take the descriptors everyone needs.
                debug!(conn, uid = cred.uid(), "refusing a local connection: {why}");
                continue;
            }
        };
        // A pid of 0 is a peer outside the agent's PID namespace: no process to verify.
        let pid = cred
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0);
        // The process is pinned (its pidfd and start time) before /proc is read for its groups,
        // executable and command line, and what was read counts only if it still runs under
        // its pid after: otherwise they may be another process's, one that took the pid of a
        // peer that exited (local API 2). Without a pinned process, only the credentials count.
        let pidfd = nix::sys::socket::getsockopt(&stream, PeerPidfd).ok();
        let process = pid.and_then(|p| CallerProcess::identify(&procfs, p, pidfd));
        let pinned = process.as_ref().map(CallerProcess::pid);
        let proc = Path::new("/proc");
        let mut peer = peer_of(pinned, cred.uid(), cred.gid(), &config, proc);
        match process {
            Some(process) if process.is_alive(&procfs) => peer.process = Some(process),
            Some(_) => peer = peer_of(None, cred.uid(), cred.gid(), &config, proc),
            None => {}
        }
        debug!(conn, pid = ?peer.pid, uid = peer.uid, authorized = peer.authorized, "local connection");
        if peer.authorized {
            tokio::spawn(connection(
                conn,
                stream,
                peer,
                core.clone(),
                config.clone(),
                slot,
            ));
        } else {
            tokio::spawn(unauthorized(conn, stream, peer, slot));
        }
    }
}

/// How long a peer that may not use the agent has to send its first request, which is answered
/// agent-not-authorized before the connection closes.
const UNAUTHORIZED_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves a peer that may not use the agent: its first request gets the answer every request
/// of it would get, then the connection closes. It never reaches the core.
async fn unauthorized(conn: ConnId, stream: UnixStream, peer: Peer, _slot: Slot) {
    let (mut reader, mut writer) = stream.into_split();
    let read = tokio::time::timeout(UNAUTHORIZED_WAIT, async {
        let mut header = [0u8; FRAME_HEADER_LEN];
        reader.read_exact(&mut header).await.ok()?;
        let len = frame_body_len(header).ok()?;
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).await.ok()?;
        fwnp_proto::codec::peek_request_id(&body)
    })
    .await;
    if let Ok(Some(request_id)) = read {
        let denied = LocalMessage::Denied(LocalDenied {
            common: Common {
                request_id: Some(request_id),
                critical: Vec::new(),
            },
            code: DenialCode::Local(LocalCode::AgentNotAuthorized),
            reason: Some(not_authorized_reason(&peer)),
            retry_after: None,
            lease: None,
            unsupported: Vec::new(),
        });
        let _ =
            tokio::time::timeout(UNAUTHORIZED_WAIT, writer.write_all(&encode_frame(&denied))).await;
    }
    debug!(
        conn,
        uid = peer.uid,
        "closed the connection of a peer that may not use the agent"
    );
}

/// Why a peer may not use the agent.
pub fn not_authorized_reason(peer: &Peer) -> String {
    format!(
        "uid {} (gid {}) may not use the FWNP agent; see allowed_users and allowed_groups in its configuration",
        peer.uid, peer.gid
    )
}

/// Who a peer is and whether it may use the agent.
pub fn peer_of(pid: Option<u32>, uid: u32, gid: u32, config: &LocalConfig, proc: &Path) -> Peer {
    let supplementary = pid.map(|p| groups_of(proc, p)).unwrap_or_default();
    let authorized = uid == 0
        || config.allowed_uids.contains(&uid)
        || config.allowed_gids.contains(&gid)
        || supplementary
            .iter()
            .any(|g| config.allowed_gids.contains(g));
    let executable = pid.and_then(|p| {
        let exe = std::fs::read_link(proc.join(p.to_string()).join("exe")).ok()?;
        Some(truncate(exe.to_string_lossy().into_owned(), MAX_EXECUTABLE))
    });
    let name = pid.and_then(|p| {
        let dir = proc.join(p.to_string());
        let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
        let words: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|w| !w.is_empty())
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        let line = if words.is_empty() {
            std::fs::read_to_string(dir.join("comm"))
                .ok()?
                .trim_end()
                .to_owned()
        } else {
            words.join(" ")
        };
        Some(truncate(line, MAX_NAME))
    });
    Peer {
        pid,
        process: None,
        uid,
        gid,
        authorized,
        app: AppInfo {
            name,
            executable,
            uid: Some(uid),
            pid,
        },
    }
}

/// The supplementary groups of `pid` (the `Groups:` line of `/proc/PID/status`).
fn groups_of(proc: &Path, pid: u32) -> Vec<u32> {
    std::fs::read_to_string(proc.join(pid.to_string()).join("status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Groups:"))?;
            Some(
                line.trim_start_matches("Groups:")
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Requests of one connection the core has not finished with: past this many the connection
/// is not read until the core catches up, so that one client cannot fill the core's queue
/// (and make everyone else's answers wait behind it).
const MAX_PENDING_REQUESTS: usize = 16;

async fn connection(
    conn: ConnId,
    stream: UnixStream,
    peer: Peer,
    core: mpsc::UnboundedSender<CoreInput>,
    config: LocalConfig,
    _slot: Slot,
) {
    let (mut reader, mut writer) = stream.into_split();
    let (out, mut outgoing) = Outbox::new(config.max_output_bytes);
    if core
        .send(CoreInput::LocalConnected {
            conn,
            peer,
            out: out.clone(),
        })
        .is_err()
    {
        return;
    }
    // The writer holds no sender: it ends when the reader and the core have dropped theirs.
    let state = out.state.clone();
    let mut writing = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if writer.write_all(&frame).await.is_err() {
                state.close();
                break;
            }
            state.queued.fetch_sub(frame.len(), Ordering::Relaxed);
        }
    });
    let pending = Arc::new(Semaphore::new(MAX_PENDING_REQUESTS));
    loop {
        let Ok(permit) = pending.clone().acquire_owned().await else {
            break;
        };
        let frame = tokio::select! {
            frame = read_frame(&mut reader) => frame,
            _ = out.state.close.notified() => break,
        };
        let body = match frame {
            Ok(body) => body,
            Err(why) => {
                debug!(conn, "closing the connection: {why}");
                break;
            }
        };
        match decode_frame_body(&body) {
            Ok(message) => {
                if core
                    .send(CoreInput::LocalRequest {
                        conn,
                        message,
                        permit,
                    })
                    .is_err()
                {
                    break;
                }
            }
            Err(e) => match fwnp_proto::codec::peek_request_id(&body) {
                Some(request_id) => {
                    debug!(conn, request_id, "undecodable request: {e}");
                    let mut denied = LocalDenied {
                        common: Common {
                            request_id: Some(request_id),
                            critical: Vec::new(),
                        },
                        code: DenialCode::Wire(e.result_code()),
                        // The schema's 512 bytes at most, and the whole frame within its
                        // limit however many critical keys the request listed.
                        reason: Some(fwnp_proto::codec::reason_text(&e.to_string())),
                        retry_after: None,
                        lease: None,
                        unsupported: match &e {
                            fwnp_proto::local::LocalError::UnsupportedCritical(keys) => {
                                keys.clone()
                            }
                            fwnp_proto::local::LocalError::Decode(d) => {
                                d.unsupported_keys().to_vec()
                            }
                            _ => Vec::new(),
                        },
                    };
                    let mut trial = denied.clone();
                    fwnp_proto::codec::fit_unsupported(
                        &mut denied.unsupported,
                        &mut denied.reason,
                        |keys, reason| {
                            trial.unsupported = keys.to_vec();
                            trial.reason = reason.map(str::to_owned);
                            fwnp_proto::local::encode_body(&LocalMessage::Denied(trial.clone()))
                                .len()
                        },
                    );
                    out.send(encode_frame(&LocalMessage::Denied(denied)));
                }
                None => {
                    debug!(
                        conn,
                        "closing the connection after an undecodable frame: {e}"
                    );
                    break;
                }
            },
        }
    }
    let closing = out.is_closing();
    drop(out);
    let _ = core.send(CoreInput::LocalClosed { conn });
    // The writer ends when the core has dropped its sender too; a client that does not read
    // is not waited for.
    if closing
        || tokio::time::timeout(std::time::Duration::from_secs(1), &mut writing)
            .await
            .is_err()
    {
        writing.abort();
    }
}

/// Reads one frame's body; `Err` says why the connection must close (end of stream, a length
/// out of bounds).
async fn read_frame(reader: &mut OwnedReadHalf) -> Result<Vec<u8>, String> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    reader
        .read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    let len = frame_body_len(header).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}
