//! The local API's Unix socket: accepts applications, learns who they are from the socket's
//! peer credentials and `/proc`, reads their frames and hands them to the core, and writes the
//! core's answers and events back.
//!
//! A frame over the size limit or empty closes the connection; a frame that does not decode is
//! answered with a Denied when its request id can be read, and otherwise closes the connection.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use fwnp_proto::local::{
    DenialCode, FRAME_HEADER_LEN, LocalDenied, LocalMessage, decode_frame_body, encode_frame,
    frame_body_len,
};
use fwnp_proto::{AppInfo, Common};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::LocalConfig;
use crate::core::{CoreInput, Peer};

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
}

/// Binds the socket: creates its directory, removes a stale socket file, and sets the mode the
/// allowed users and groups need (the peer-credential check is the gate; the mode only keeps
/// out who could never pass it).
pub fn bind(config: &LocalConfig) -> Result<UnixListener, ServerError> {
    let path = &config.socket;
    let io = |what, source| ServerError::Io {
        what,
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.clone()));
        }
        std::fs::remove_file(path).map_err(|e| io("removing the stale socket", e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| io("binding", e))?;
    let only_one_group = config.allowed_uids.is_empty() && config.allowed_gids.len() == 1;
    let mode = if config.allowed_uids.is_empty() && config.allowed_gids.is_empty() {
        0o600
    } else if only_one_group
        && std::os::unix::fs::chown(path, None, config.allowed_gids.first().copied()).is_ok()
    {
        0o660
    } else {
        0o666
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("setting the mode of", e))?;
    info!(socket = %path.display(), mode = format_args!("{mode:o}"), "local API listening");
    Ok(listener)
}

/// Accepts connections until the core goes away.
pub async fn serve(
    listener: UnixListener,
    config: LocalConfig,
    core: mpsc::UnboundedSender<CoreInput>,
) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
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
        let peer = match stream.peer_cred() {
            Ok(cred) => peer_of(
                cred.pid().and_then(|p| u32::try_from(p).ok()),
                cred.uid(),
                cred.gid(),
                &config,
                Path::new("/proc"),
            ),
            Err(e) => {
                warn!("no peer credentials on a local connection: {e}");
                continue;
            }
        };
        debug!(conn, pid = ?peer.pid, uid = peer.uid, authorized = peer.authorized, "local connection");
        tokio::spawn(connection(conn, stream, peer, core.clone()));
    }
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

async fn connection(
    conn: u64,
    stream: UnixStream,
    peer: Peer,
    core: mpsc::UnboundedSender<CoreInput>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let (out, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
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
    let writing = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if writer.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        if reader.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = match frame_body_len(header) {
            Ok(len) => len,
            Err(e) => {
                debug!(conn, "closing the connection: {e}");
                break;
            }
        };
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).await.is_err() {
            break;
        }
        match decode_frame_body(&body) {
            Ok(message) => {
                if core
                    .send(CoreInput::LocalRequest { conn, message })
                    .is_err()
                {
                    break;
                }
            }
            Err(e) => match fwnp_proto::codec::peek_request_id(&body) {
                Some(request_id) => {
                    debug!(conn, request_id, "undecodable request: {e}");
                    let denied = LocalMessage::Denied(LocalDenied {
                        common: Common {
                            request_id: Some(request_id),
                            critical: Vec::new(),
                        },
                        code: DenialCode::Wire(e.result_code()),
                        reason: Some(e.to_string()),
                        retry_after: None,
                        lease: None,
                        unsupported: match &e {
                            fwnp_proto::local::LocalError::UnsupportedCritical(keys) => {
                                keys.clone()
                            }
                            other => match other {
                                fwnp_proto::local::LocalError::Decode(d) => {
                                    d.unsupported_keys().to_vec()
                                }
                                _ => Vec::new(),
                            },
                        },
                    });
                    let _ = out.send(encode_frame(&denied));
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
    drop(out);
    let _ = core.send(CoreInput::LocalClosed { conn });
    // The writer ends when the core has dropped its sender too.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writing).await;
}
