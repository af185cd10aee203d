//! The agent's core: one task that drives the [`AgentMachine`] (which owns every lease, the
//! callers and the state of the link, and decides) and carries out its actions: requests to the
//! gateway, orders to the mirror, frames to local connections, port checks. Its inputs come
//! from one channel (requests of applications, answers and notices from the gateway, the
//! mirror's and the port check's results), in the order they arrive; nothing is shared, nothing
//! is locked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fwnp_proto::local::{LocalMessage, encode_frame};
use fwnp_proto::{Message, QuicErrorCode, ResultCode};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tracing::warn;

use crate::config::AgentConfig;
use crate::link::{ExchangeError, GatewayEvent, exchange};
use crate::machine::{Action, AfterDrop, AgentMachine, Input};
use crate::mirror::{Mirror, MirrorError, elements_of};
use crate::ports::ProcFs;
use crate::server::Outbox;
use fwnp_proto::lease::Attempt;

pub use crate::machine::{ConnId, OPEN_WAIT, Peer};

/// How long a stopping agent waits for its Releases to reach the gateway.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Everything the core reacts to.
#[derive(Debug)]
pub enum CoreInput {
    /// From the link.
    Gateway(GatewayEvent),
    /// The answer (or failure) of a request a machine sent.
    Answer {
        /// The machine.
        key: u64,
        /// The attempt, as the machine named it when it asked for the sending.
        attempt: Attempt,
        /// The answer.
        result: Result<Message, String>,
    },
    /// A new local connection.
    LocalConnected {
        /// Its number.
        conn: ConnId,
        /// Who it is.
        peer: Peer,
        /// Where its outgoing frames go.
        out: Outbox,
    },
    /// A request frame of a local connection.
    LocalRequest {
        /// The connection.
        conn: ConnId,
        /// The request.
        message: LocalMessage,
        /// Held until the core is done with the request: the connection's reader takes one
        /// per request, so a client cannot queue more than a few.
        permit: OwnedSemaphorePermit,
    },
    /// A local connection closed.
    LocalClosed {
        /// The connection.
        conn: ConnId,
    },
    /// The outcome of a task the core started, for the machine.
    Done(Input),
    /// Release everything and stop.
    Shutdown(oneshot::Sender<()>),
}

/// The link as the driver holds it.
enum Link {
    Down,
    Up(quinn::Connection),
}

/// The core's state: the machine, and what carries out its actions.
pub struct Core {
    config: Arc<AgentConfig>,
    machine: AgentMachine,
    mirror: Mirror,
    procfs: ProcFs,
    tx: mpsc::UnboundedSender<CoreInput>,
    link: Link,
    outboxes: std::collections::HashMap<ConnId, Outbox>,
    /// The earliest local expiry of the leases held, for the link's reconnection schedule.
    earliest_expiry: watch::Sender<Option<Instant>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("machine", &self.machine)
            .finish()
    }
}

impl Core {
    /// A core; `tx` is the sending side of its own input channel (for the tasks it starts).
    pub fn new(
        config: Arc<AgentConfig>,
        mirror: Mirror,
        tx: mpsc::UnboundedSender<CoreInput>,
    ) -> Self {
        Core {
            machine: AgentMachine::from_os_rng(config.clone(), Instant::now()),
            config,
            mirror,
            procfs: ProcFs::default(),
            tx,
            link: Link::Down,
            outboxes: std::collections::HashMap::new(),
            earliest_expiry: watch::Sender::new(None),
        }
    }

    /// The earliest local expiry of the leases the core holds, kept current: the link bounds
    /// its reconnection delays and handshakes by it.
    pub fn earliest_expiry(&self) -> watch::Receiver<Option<Instant>> {
        self.earliest_expiry.subscribe()
    }

    /// Runs until shut down or until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<CoreInput>) {
        loop {
            let now = Instant::now();
            let wake = self.machine.poll_timeout(now);
            let earliest = self.machine.earliest_expiry();
            self.earliest_expiry.send_if_modified(|current| {
                let changed = *current != earliest;
                *current = earliest;
                changed
            });
            let input = tokio::select! {
                input = rx.recv() => input,
                _ = tokio::time::sleep_until(wake.into()) => {
                    self.machine.handle_timeout(Instant::now());
                    self.carry_out();
                    continue;
                }
            };
            let Some(input) = input else { return };
            if let CoreInput::Shutdown(done) = input {
                self.shutdown(&mut rx).await;
                let _ = done.send(());
                return;
            }
            self.handle(input, Instant::now());
        }
    }

    fn handle(&mut self, input: CoreInput, now: Instant) {
        // Held until the request's actions were carried out, or by the port check it starts.
        let mut permit = None;
        let input = match input {
            CoreInput::Gateway(GatewayEvent::Connected {
                gateway,
                connection,
                welcome,
                leases,
            }) => {
                self.link = Link::Up(connection);
                Input::LinkUp {
                    gateway,
                    welcome: Box::new(welcome),
                    leases,
                }
            }
            CoreInput::Gateway(GatewayEvent::Notice(notice)) => Input::Notice(notice),
            CoreInput::Gateway(GatewayEvent::NoticeDiscarded { reason }) => {
                Input::NoticeDiscarded { reason }
            }
            CoreInput::Gateway(GatewayEvent::NoGatewayLeft { reason }) => {
                Input::NoGatewayLeft { reason }
            }
            CoreInput::Gateway(GatewayEvent::ConnectFailed { reason }) => {
                Input::LinkFailed { reason }
            }
            CoreInput::Gateway(GatewayEvent::Disconnected { reason }) => {
                self.link = Link::Down;
                Input::LinkDown { reason }
            }
            CoreInput::Answer {
                key,
                attempt,
                result,
            } => Input::Answer {
                key,
                attempt,
                result,
            },
            CoreInput::LocalConnected { conn, peer, out } => {
                self.outboxes.insert(conn, out);
                Input::CallerConnected { conn, peer }
            }
            CoreInput::LocalRequest {
                conn,
                message,
                permit: p,
            } => {
                permit = Some(p);
                Input::Request { conn, message }
            }
            CoreInput::LocalClosed { conn } => {
                self.outboxes.remove(&conn);
                Input::CallerClosed { conn }
            }
            CoreInput::Done(input) => input,
            CoreInput::Shutdown(done) => {
                let _ = done.send(());
                return;
            }
        };
        self.machine.handle(input, now);
        self.carry_out_with(permit);
    }

    fn carry_out(&mut self) {
        self.carry_out_with(None);
    }

    /// Carries out the machine's actions; `permit` goes with the port check of an Open, if the
    /// request started one.
    fn carry_out_with(&mut self, mut permit: Option<OwnedSemaphorePermit>) {
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::Send {
                    key,
                    request,
                    attempt,
                    verify_first,
                } => {
                    let Link::Up(connection) = &self.link else {
                        // The machine sends only while the link is up; the link's end is on
                        // its way to it, and the request's failure with it.
                        let _ = self.tx.send(CoreInput::Answer {
                            key,
                            attempt,
                            result: Err("no connection to the gateway".to_owned()),
                        });
                        continue;
                    };
                    let connection = connection.clone();
                    let tx = self.tx.clone();
                    let procfs = self.procfs.clone();
                    tokio::spawn(async move {
                        // Each holder whose port is not its own any more lets go; the request
                        // goes for the others, if any is left.
                        let mut lost = 0;
                        for (conn, check) in &verify_first {
                            if let Err(reason) = procfs
                                .verify_all(&check.caller, &check.targets, Duration::ZERO)
                                .await
                            {
                                lost += 1;
                                let conn = *conn;
                                let _ = tx.send(CoreInput::Done(Input::OwnerLost {
                                    key,
                                    conn,
                                    reason,
                                }));
                            }
                        }
                        if lost > 0 && lost == verify_first.len() {
                            return;
                        }
                        let result = exchange(&connection, &request).await;
                        if let Err(ExchangeError::Timeout(after)) = &result {
                            // A gateway that leaves a request unanswered this long is gone
                            // (killed, or the path is broken): do not wait for the idle
                            // timeout, reconnect now.
                            warn!("no answer from the gateway within {after:?}; reconnecting");
                            connection.close(
                                quinn::VarInt::from_u32(QuicErrorCode::RequestTimeout.code()),
                                b"request timed out",
                            );
                        }
                        if let Ok(Message::Denied(d)) = &result
                            && d.code == ResultCode::HelloRequired
                        {
                            // The gateway does not know this connection's Hello: Hello again, on
                            // a new connection (spec 11.9).
                            warn!("the gateway answered hello-required; connecting again");
                            connection.close(
                                quinn::VarInt::from_u32(QuicErrorCode::NoError.code()),
                                b"hello-required",
                            );
                        }
                        let result = result.map_err(|e| e.to_string());
                        let _ = tx.send(CoreInput::Answer {
                            key,
                            attempt,
                            result,
                        });
                    });
                }
                Action::List { request } => {
                    let request_id = request.common().request_id.unwrap_or_default();
                    let Link::Up(connection) = &self.link else {
                        let _ = self.tx.send(CoreInput::Done(Input::Listed {
                            request_id,
                            result: Err("no connection to the gateway".to_owned()),
                        }));
                        continue;
                    };
                    let connection = connection.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let result = exchange(&connection, &request)
                            .await
                            .map_err(|e| e.to_string());
                        let _ = tx.send(CoreInput::Done(Input::Listed { request_id, result }));
                    });
                }
                Action::Reply { conn, message } => {
                    if let Some(out) = self.outboxes.get(&conn) {
                        // A client that does not read is closed by its outbox; its leases go
                        // with it.
                        out.send(encode_frame(&message));
                    }
                }
                Action::Close { conn } => {
                    if let Some(out) = self.outboxes.get(&conn)
                        && !out.is_closing()
                    {
                        out.close();
                    }
                }
                Action::CheckOwner {
                    conn,
                    open,
                    caller,
                    protocol,
                    ports,
                    grace,
                } => {
                    let procfs = self.procfs.clone();
                    let tx = self.tx.clone();
                    let permit = permit.take();
                    tokio::spawn(async move {
                        let result = procfs.verify(&caller, protocol, ports, grace).await;
                        let _ = tx.send(CoreInput::Done(Input::OwnerChecked {
                            conn,
                            open,
                            result,
                            caller,
                        }));
                        drop(permit);
                    });
                }
                Action::CheckGrants {
                    key,
                    lease,
                    replaces,
                    targets,
                    callers,
                    grace,
                } => {
                    let procfs = self.procfs.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let mut lost = Vec::new();
                        for (conn, caller) in callers {
                            if let Err(reason) = procfs.verify_all(&caller, &targets, grace).await {
                                lost.push((conn, reason));
                            }
                        }
                        let _ = tx.send(CoreInput::Done(Input::GrantsChecked {
                            key,
                            lease,
                            replaces,
                            targets,
                            lost,
                        }));
                    });
                }
                Action::SweepOwners { leases } => {
                    let procfs = self.procfs.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        for (key, conn, check) in leases {
                            if let Err(reason) = procfs
                                .verify_all(&check.caller, &check.targets, Duration::ZERO)
                                .await
                            {
                                let _ = tx.send(CoreInput::Done(Input::OwnerLost {
                                    key,
                                    conn,
                                    reason,
                                }));
                            }
                        }
                        let _ = tx.send(CoreInput::Done(Input::OwnerSweepDone));
                    });
                }
                Action::MirrorHold {
                    holder,
                    grants,
                    expires_at,
                    confirm,
                } => {
                    let done = confirm.map(|lease| {
                        let (done, landed) = oneshot::channel();
                        let tx = self.tx.clone();
                        tokio::spawn(async move {
                            let result = landed.await.unwrap_or(Err(MirrorError::Stopped));
                            let _ = tx.send(CoreInput::Done(Input::MirrorLanded {
                                key: holder,
                                lease,
                                result,
                            }));
                        });
                        done
                    });
                    self.mirror
                        .hold(holder, elements_of(&grants), expires_at, done);
                }
                Action::MirrorDrop { holder, then: None } => {
                    self.mirror.drop_lease(holder, None);
                }
                Action::MirrorDrop {
                    holder,
                    then: Some(AfterDrop { lease, answer }),
                } => {
                    let (done, removed) = oneshot::channel();
                    self.mirror.drop_lease(holder, Some(done));
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        if let Ok(Err(e)) = removed.await {
                            warn!(%lease, "removing a released lease from the host table: {e}");
                        }
                        if let Some((conn, requests)) = answer {
                            let _ =
                                tx.send(CoreInput::Done(Input::MirrorReleased { conn, requests }));
                        }
                    });
                }
                Action::MirrorReconcile { holders } => {
                    let mirror = self.mirror.clone();
                    let holders = holders
                        .into_iter()
                        .map(|(holder, grants, expires_at)| {
                            (holder, elements_of(&grants), expires_at)
                        })
                        .collect();
                    tokio::spawn(async move {
                        if let Err(e) = mirror.reconcile(holders).await {
                            warn!("reconciling the host table failed: {e}");
                        }
                    });
                }
                Action::Record { epoch, identity } => {
                    crate::state::record(&self.config.state_dir, epoch, &identity);
                }
            }
        }
    }

    async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<CoreInput>) {
        self.machine.shutdown(Instant::now());
        self.carry_out();
        // Give the Release requests a moment to reach the gateway.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        while self.machine.holds_leases() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(CoreInput::Answer {
                    key,
                    attempt,
                    result,
                })) => {
                    self.machine.handle(
                        Input::Answer {
                            key,
                            attempt,
                            result,
                        },
                        Instant::now(),
                    );
                    self.carry_out();
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.mirror.shutdown().await;
    }
}
