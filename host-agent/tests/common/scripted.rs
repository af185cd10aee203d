//! A scripted FWNP gateway: a real QUIC endpoint with the gateway's TLS (see
//! [`super::gateway_endpoint`]) that answers the agent from an in-memory lease table, and that a
//! test makes depart from the plain answers where it wants to see what the agent does.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fwnp_proto::codec::DecodeError;
use fwnp_proto::{
    Capabilities, Common, Denied, Epoch, Grant, Granted, LeaseId, LeaseInfo, Leases, Limits,
    Message, QuicErrorCode, Released, ResultCode, Target, Welcome,
};

use super::{
    LocalClient, Pki, ProcessGuard, STEP, TempDir, agent_command, agent_config, gateway_endpoint,
    my_uid, wait_for_socket,
};

/// A PKI with a gateway certificate for 127.0.0.1 and the host `web-01`.
pub(crate) fn pki(label: &str) -> Pki {
    let pki = Pki::with_gateway_ips(label, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    pki.host("web-01", &[], &[], &[]);
    pki
}

/// The runtime scripted gateways serve in; they serve as long as it lives.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The script's state, even if a gateway task panicked while holding it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The wire's clock: milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The common keys of the answer to `request`: its request id.
pub(crate) fn answer_common(request: &Message) -> Common {
    Common {
        request_id: request.common().request_id,
        critical: Vec::new(),
    }
}

pub(crate) fn denied(
    common: Common,
    code: ResultCode,
    reason: Option<&str>,
    lease: Option<LeaseId>,
) -> Message {
    Message::Denied(Denied {
        common,
        code,
        reason: reason.map(Into::into),
        retry_after: None,
        lease,
        unsupported: Vec::new(),
    })
}

/// What a scripted gateway announces in its Welcome and grants.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terms {
    pub(crate) epoch: Epoch,
    /// The lifetime of each grant and renewal, in seconds.
    pub(crate) lifetime: u32,
    pub(crate) renew_after: u32,
    /// The least and the greatest lifetime the Welcome announces.
    pub(crate) lifetimes: (u32, u32),
    /// Fills each lease id after its 8-byte number, so that each script's ids are its own.
    pub(crate) lease_fill: u8,
}

impl Terms {
    fn welcome(&self, common: Common, remote: IpAddr) -> Message {
        Message::Welcome(Welcome {
            common,
            version: 1,
            capabilities: Capabilities(Capabilities::ALL),
            limits: Limits {
                max_message_size: fwnp_proto::MAX_MESSAGE_SIZE as u32,
                max_streams: 16,
                min_lifetime: self.lifetimes.0,
                max_lifetime: self.lifetimes.1,
                max_leases: None,
            },
            epoch: self.epoch,
            time_ms: now_ms(),
            identity: "fwnp://host/web-01".into(),
            addresses: vec![remote],
        })
    }

    fn granted(&self, common: Common, lease: LeaseId, grant: Grant, expires_ms: u64) -> Message {
        Message::Granted(Granted {
            common,
            lease,
            grants: vec![grant],
            lifetime: self.lifetime,
            expires_ms,
            renew_after: self.renew_after,
            epoch: self.epoch,
            narrowed: false,
        })
    }

    /// When a lease granted or renewed now expires.
    fn expiry(&self) -> u64 {
        now_ms() + u64::from(self.lifetime) * 1000
    }
}

/// A scripted gateway's leases: each one's grant and expiry (milliseconds since the Unix epoch),
/// and how many it granted, which numbers the next.
#[derive(Debug, Default)]
pub(crate) struct LeaseTable(HashMap<LeaseId, (Grant, u64)>, u64);

impl LeaseTable {
    /// Grants `grant` as a new lease: the Granted answer.
    pub(crate) fn grant(&mut self, terms: &Terms, common: Common, grant: Grant) -> Message {
        self.1 += 1;
        let mut id = [terms.lease_fill; 16];
        id[..8].copy_from_slice(&self.1.to_be_bytes());
        let lease = LeaseId(id);
        let expires_ms = terms.expiry();
        self.0.insert(lease, (grant.clone(), expires_ms));
        terms.granted(common, lease, grant, expires_ms)
    }

    /// The plain answer to `request` from `remote`: a Welcome; an Open of ports granted to
    /// `remote`, merged into the live lease that grants the same if there is one (spec 11.3);
    /// a Renew of a known lease granted for another lifetime; the leases that have not
    /// expired; a Release done.
    pub(crate) fn answer(&mut self, terms: &Terms, request: &Message, remote: IpAddr) -> Message {
        let common = answer_common(request);
        match request {
            Message::Hello(_) => terms.welcome(common, remote),
            Message::Open(open) => {
                let Target::Ports { protocol, ports } = open.opening.target.clone() else {
                    let reason = "the scripted gateway grants ports only";
                    return denied(common, ResultCode::UnknownApplication, Some(reason), None);
                };
                let grant = Grant {
                    protocol,
                    ports,
                    host: remote,
                    remotes: Vec::new(),
                    app: None,
                };
                let now = now_ms();
                let same = self
                    .0
                    .iter_mut()
                    .find(|(_, (granted, expires_ms))| *granted == grant && *expires_ms > now);
                if let Some((lease, (_, expires_ms))) = same {
                    *expires_ms = (*expires_ms).max(terms.expiry());
                    return terms.granted(common, *lease, grant, *expires_ms);
                }
                self.grant(terms, common, grant)
            }
            Message::Renew(renew) => match self.0.get_mut(&renew.lease) {
                Some((grant, expires_ms)) => {
                    *expires_ms = terms.expiry();
                    terms.granted(common, renew.lease, grant.clone(), *expires_ms)
                }
                None => denied(
                    common,
                    ResultCode::UnknownLease,
                    Some("no such lease"),
                    Some(renew.lease),
                ),
            },
            Message::List(_) => {
                let now = now_ms();
                Message::Leases(Leases {
                    common,
                    leases: self
                        .0
                        .iter()
                        .filter(|(_, (_, expires_ms))| *expires_ms > now)
                        .map(|(lease, (grant, expires_ms))| LeaseInfo {
                            lease: *lease,
                            grants: vec![grant.clone()],
                            remaining: ((expires_ms - now) / 1000) as u32,
                            expires_ms: *expires_ms,
                            app: None,
                        })
                        .collect(),
                    epoch: terms.epoch,
                })
            }
            Message::Release(release) => {
                self.0.remove(&release.lease);
                Message::Released(Released {
                    common,
                    lease: release.lease,
                })
            }
            _ => denied(
                common,
                ResultCode::MalformedRequest,
                Some("the scripted gateway does not answer this"),
                None,
            ),
        }
    }
}

/// What a scripted gateway does with one request's stream.
#[derive(Debug)]
pub(crate) enum Reply {
    /// Sends the answer and finishes the stream.
    Answer(Message),
    /// Sends the answer, then closes the connection with the code and reason once the agent has
    /// it (a second at most), as the gateway does after refusing every version (spec 5.2).
    AnswerAndClose(Message, QuicErrorCode, &'static [u8]),
    /// Sends more bytes than an answer may have, for the agent to stop the stream.
    Oversized,
    /// Leaves the stream unanswered.
    Nothing,
}

/// How a scripted gateway behaves: each test's script.
pub(crate) trait Conduct: Send + Sync + 'static {
    /// What the gateway does with a request from `remote`, or with bytes that did not decode.
    fn reply(&self, request: Result<Message, DecodeError>, remote: IpAddr) -> Reply;

    /// Notes a connection the gateway accepted.
    fn accepted(&self, _connection: &quinn::Connection) {}

    /// Notes how the agent ended the stream of a [`Reply::Oversized`]: the code it stopped the
    /// stream with, `None` if it read the bytes.
    fn oversized_stopped(&self, _code: Option<quinn::VarInt>) {}
}

/// Serves every connection and stream of `endpoint` as `conduct` says.
pub(crate) async fn serve<C: Conduct>(endpoint: quinn::Endpoint, conduct: Arc<C>) {
    while let Some(incoming) = endpoint.accept().await {
        let conduct = conduct.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            conduct.accepted(&connection);
            let remote = connection.remote_address().ip();
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                let (conduct, connection) = (conduct.clone(), connection.clone());
                tokio::spawn(async move {
                    let Ok(bytes) = recv.read_to_end(fwnp_proto::MAX_MESSAGE_SIZE).await else {
                        return;
                    };
                    match conduct.reply(fwnp_proto::codec::decode(&bytes), remote) {
                        Reply::Answer(answer) => {
                            let _ = send.write_all(&fwnp_proto::codec::encode(&answer)).await;
                            let _ = send.finish();
                        }
                        Reply::AnswerAndClose(answer, code, reason) => {
                            let _ = send.write_all(&fwnp_proto::codec::encode(&answer)).await;
                            let _ = send.finish();
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                            connection.close(quinn::VarInt::from_u32(code.code()), reason);
                        }
                        Reply::Oversized => {
                            let too_long = vec![0xa0; fwnp_proto::MAX_MESSAGE_SIZE + 4096];
                            let code = match send.write_all(&too_long).await {
                                Err(quinn::WriteError::Stopped(code)) => Some(code),
                                _ => send.stopped().await.ok().flatten(),
                            };
                            conduct.oversized_stopped(code);
                        }
                        Reply::Nothing => {}
                    }
                });
            }
        });
    }
}

/// A scripted gateway on 127.0.0.1 with `pki`'s gateway certificate, serving in `runtime` as
/// `conduct` says: its address.
pub(crate) fn spawn_gateway<C: Conduct>(
    pki: &Pki,
    runtime: &tokio::runtime::Runtime,
    conduct: Arc<C>,
) -> SocketAddr {
    let endpoint = gateway_endpoint(pki, runtime);
    let address = endpoint.local_addr().expect("address");
    runtime.spawn(serve(endpoint, conduct));
    address
}

/// The configuration of the agent of the host `web-01` with its socket and state in `dir` and
/// the mirror off, finding its gateways by `key` (a line of the `[gateway]` table: `addresses =
/// [...]`, `srv = "..."`).
pub(crate) fn agent_config_with_gateways(pki: &Pki, dir: &Path, key: &str) -> String {
    agent_config(
        pki,
        "web-01",
        dir,
        "PLACEHOLDER",
        "off",
        &my_uid().to_string(),
        "1s",
    )
    .replace("address = \"PLACEHOLDER\"", key)
}

/// The agent of the host `web-01` configured with `gateways`, in order, and the mirror off,
/// started in `dir`: its process and its socket, which accepts.
pub(crate) fn start_agent(
    pki: &Pki,
    dir: &TempDir,
    gateways: &[SocketAddr],
) -> (ProcessGuard, PathBuf) {
    let config = dir.path().join("agent.toml");
    let addresses: Vec<String> = gateways.iter().map(|g| format!("\"{g}\"")).collect();
    let text = agent_config_with_gateways(
        pki,
        dir.path(),
        &format!("addresses = [{}]", addresses.join(", ")),
    );
    assert!(text.contains("addresses = ["), "{text}");
    std::fs::write(&config, text).expect("write config");
    let socket = dir.path().join("agent.sock");
    let mut agent = ProcessGuard(Some(
        agent_command(&config).spawn().expect("start fwnp-agent"),
    ));
    wait_for_socket(&mut agent, &socket);
    (agent, socket)
}

/// Waits until Status says the agent is connected to `gateway`.
pub(crate) fn wait_connected_to(status: &mut LocalClient, gateway: SocketAddr) {
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let now = status.status();
        if now.connected && now.gateway == gateway.to_string() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not connect to {gateway}: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
