//! Copies of the audit trail for a SIEM (`[audit]` in the configuration): every event the
//! gateway stores in its audit trail is also written as one JSON object per line to a file,
//! and/or as an RFC 5424 syslog message to a Unix datagram socket (`/dev/log`) or a collector
//! over UDP.
//!
//! The export follows the stored trail (the store's audit watch), so an event goes out only
//! after its store commit, with either backend. Each sink has a bounded queue and a thread of
//! its own: the follower never waits for a sink, and an event that does not fit a full queue,
//! or that the sink cannot take (the socket is gone, the disk is full), is dropped, counted in
//! `fwnp_audit_export_dropped_total{sink}` and logged (the first drop, then every
//! [`LOG_EVERY`]th). A grant never waits for, or fails because of, a sink.
//!
//! Field names: those of the admin API's audit events (`fwnpctl audit --json`), plus `site` in
//! a cluster. Syslog messages carry APP-NAME `fwnp-gateway`, MSGID the event's kind, the main
//! fields as structured data `[fwnp@32473 ...]` (32473: the enterprise number RFC 5612 sets
//! aside for documentation and examples), and the whole JSON object as MSG.
//!
//! The JSON file follows its path, as logrotate expects: when the path no longer names the
//! open file (renamed or removed: its device and inode differ or it is gone), checked at most
//! once every [`REOPEN_CHECK`] before a write, the file is closed and the path opened again,
//! created if need be. Events written before the check land in the renamed file, none is lost.
//! [`ReopenHandle::reopen`] (SIGHUP) makes the next write reopen the path at once.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use fasyslog::format::SyslogContext;
use fasyslog::{Facility, SDElement, Severity};
use prometheus::IntCounterVec;
use tracing::warn;

use crate::api::AuditEventView;
use crate::config::{AuditConfig, SyslogTarget};

/// A drop is logged the first time and then once every this many drops.
pub const LOG_EVERY: u64 = 1000;

/// The SD-ID of the structured data in syslog messages.
pub const SD_ID: &str = "fwnp@32473";

/// How often, at most, the JSON file's path is compared with the open file.
pub const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// Asks the export's JSON file writer to open its path again before its next write (on
/// SIGHUP, after a rotation that did not wait for the path check). A count of the requests,
/// which each sink's thread compares with the last it saw: none takes a request from another.
#[derive(Debug, Clone, Default)]
pub struct ReopenHandle(Arc<AtomicU64>);

impl ReopenHandle {
    /// The next write opens the path again, whatever file it names.
    pub fn reopen(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn requests(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where the export writes.
#[derive(Debug, Clone)]
enum Sink {
    JsonFile(PathBuf),
    Syslog(SyslogTarget),
}

impl Sink {
    fn name(&self) -> &'static str {
        match self {
            Sink::JsonFile(_) => "json_file",
            Sink::Syslog(_) => "syslog",
        }
    }
}

/// One sink's queue and its drop counter.
#[derive(Debug)]
struct Queue {
    name: &'static str,
    sender: SyncSender<Arc<AuditEventView>>,
    dropped: Arc<AtomicU64>,
    metric: IntCounterVec,
}

impl Queue {
    fn drop_one(&self, why: &str) {
        count_drop(&self.dropped, &self.metric, self.name, why);
    }
}

fn count_drop(dropped: &AtomicU64, metric: &IntCounterVec, sink: &str, why: &str) {
    let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
    metric.with_label_values(&[sink]).inc();
    if n == 1 || n.is_multiple_of(LOG_EVERY) {
        warn!(
            sink,
            dropped = n,
            "audit export: an event was dropped ({why}); the audit trail itself keeps it"
        );
    }
}

/// The export's sinks; see the module documentation.
#[derive(Debug, Default)]
pub struct AuditExport {
    queues: Vec<Queue>,
    reopen: ReopenHandle,
}

impl AuditExport {
    /// Starts a thread per configured sink; none when `[audit]` names no sink. `site` is the
    /// gateway's site in a cluster, written into each event.
    pub fn start(
        config: &AuditConfig,
        site: Option<String>,
        metric: IntCounterVec,
    ) -> std::io::Result<AuditExport> {
        let mut sinks = Vec::new();
        if let Some(path) = &config.json_file {
            sinks.push(Sink::JsonFile(path.clone()));
        }
        if let Some(target) = &config.syslog {
            sinks.push(Sink::Syslog(target.clone()));
        }
        let mut queues = Vec::new();
        let reopen = ReopenHandle::default();
        for sink in sinks {
            let (sender, receiver) = sync_channel(config.queue.max(1));
            let dropped = Arc::new(AtomicU64::new(0));
            let name = sink.name();
            let (counter, metric_of_thread, site) = (dropped.clone(), metric.clone(), site.clone());
            let reopen = reopen.clone();
            std::thread::Builder::new()
                .name(format!("fwnp-audit-{name}"))
                .spawn(move || {
                    write_all(sink, receiver, site, &reopen, &counter, &metric_of_thread)
                })?;
            queues.push(Queue {
                name,
                sender,
                dropped,
                metric: metric.clone(),
            });
        }
        Ok(AuditExport { queues, reopen })
    }

    /// What makes the JSON file writer open its path again (kept by the service for SIGHUP).
    pub fn reopen_handle(&self) -> ReopenHandle {
        self.reopen.clone()
    }

    /// Whether any sink is configured.
    pub fn is_active(&self) -> bool {
        !self.queues.is_empty()
    }

    /// Hands an event to every sink without waiting; a full queue drops it for that sink.
    pub fn offer(&self, event: AuditEventView) {
        let event = Arc::new(event);
        for queue in &self.queues {
            match queue.sender.try_send(event.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => queue.drop_one("its queue is full"),
                Err(TrySendError::Disconnected(_)) => queue.drop_one("its writer stopped"),
            }
        }
    }

    /// How many events each sink dropped, by sink name.
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        self.queues
            .iter()
            .map(|q| (q.name, q.dropped.load(Ordering::Relaxed)))
            .collect()
    }
}

/// A sink's thread: writes what its queue holds until the export is dropped.
fn write_all(
    sink: Sink,
    receiver: Receiver<Arc<AuditEventView>>,
    site: Option<String>,
    reopen: &ReopenHandle,
    dropped: &AtomicU64,
    metric: &IntCounterVec,
) {
    let name = sink.name();
    let mut writer = Writer::new(sink);
    let mut reopened = reopen.requests();
    while let Ok(event) = receiver.recv() {
        let mut event = (*event).clone();
        if event.site.is_none() {
            event.site = site.clone();
        }
        let requests = reopen.requests();
        if requests != reopened {
            reopened = requests;
            writer.file = None;
        }
        if let Err(e) = writer.write(&event) {
            count_drop(dropped, metric, name, &e.to_string());
        }
    }
}

/// A sink's open file or socket, opened again after a failure (and the file when its path
/// names another one).
struct Writer {
    sink: Sink,
    file: Option<OpenFile>,
    unix: Option<UnixDatagram>,
    udp: Option<UdpSocket>,
    context: SyslogContext,
}

impl Writer {
    fn new(sink: Sink) -> Writer {
        let mut context = SyslogContext::new();
        context.appname("fwnp-gateway").facility(Facility::AUTHPRIV);
        Writer {
            sink,
            file: None,
            unix: None,
            udp: None,
            context,
        }
    }

    fn write(&mut self, event: &AuditEventView) -> std::io::Result<()> {
        let json = serde_json::to_string(event).map_err(std::io::Error::other)?;
        match &self.sink {
            Sink::JsonFile(path) => {
                if self.file.as_mut().is_some_and(|f| f.moved_away(path)) {
                    self.file = None;
                }
                if self.file.is_none() {
                    self.file = Some(OpenFile::open(path)?);
                }
                let mut line = json.into_bytes();
                line.push(b'\n');
                // One write per line, so that a reader never sees half an event.
                let written = self.file.as_mut().map(|f| f.file.write_all(&line));
                if let Some(Err(e)) = written {
                    self.file = None;
                    return Err(e);
                }
                Ok(())
            }
            Sink::Syslog(target) => {
                let message = self.syslog_message(event, &json);
                let sent = match target {
                    SyslogTarget::Unix(path) => {
                        if self.unix.is_none() {
                            let socket = UnixDatagram::unbound()?;
                            // A receiver that does not read must not stall the sink.
                            socket.set_nonblocking(true)?;
                            self.unix = Some(socket);
                        }
                        self.unix
                            .as_ref()
                            .map(|s| s.send_to(message.as_bytes(), path))
                    }
                    SyslogTarget::Udp(addr) => {
                        if self.udp.is_none() {
                            let any: SocketAddr = if addr.is_ipv4() {
                                ([0, 0, 0, 0], 0).into()
                            } else {
                                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                            };
                            let socket = UdpSocket::bind(any)?;
                            socket.set_nonblocking(true)?;
                            self.udp = Some(socket);
                        }
                        self.udp
                            .as_ref()
                            .map(|s| s.send_to(message.as_bytes(), addr))
                    }
                };
                match sent {
                    Some(Ok(_)) => Ok(()),
                    Some(Err(e)) => {
                        self.unix = None;
                        self.udp = None;
                        Err(e)
                    }
                    None => Err(std::io::Error::other("no socket")),
                }
            }
        }
    }

    /// The RFC 5424 message of one event.
    fn syslog_message(&self, event: &AuditEventView, json: &str) -> String {
        let severity = match event.outcome.as_deref() {
            Some("denied" | "revoked" | "failed") => Severity::NOTICE,
            _ => Severity::INFORMATIONAL,
        };
        // A constant SD-ID, always valid: without it the message would still carry the JSON.
        let Ok(mut element) = SDElement::new(SD_ID) else {
            return self
                .context
                .format_rfc5424(severity, Some(event.kind.clone()), vec![], Some(json))
                .to_string();
        };
        let mut param = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                // The names are constants of PARAM-NAME's alphabet; values are escaped.
                let _ = element.add_param(name, value);
            }
        };
        param("id", Some(event.id.to_string()));
        param("time_ms", Some(event.time_ms.to_string()));
        param("kind", Some(event.kind.clone()));
        param("outcome", event.outcome.clone());
        param("identity", event.identity.clone());
        param("peer", event.peer.clone());
        param("lease", event.lease.clone());
        param(
            "opening",
            event.request.as_ref().and_then(|r| r.opening.clone()),
        );
        param(
            "grants",
            (!event.grants.is_empty()).then(|| {
                event
                    .grants
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
        );
        param("rule", event.rule.clone());
        param("code", event.code.clone());
        param("actor", event.actor.clone());
        param("site", event.site.clone());
        self.context
            .format_rfc5424(
                severity,
                Some(event.kind.clone()),
                vec![element],
                Some(json),
            )
            .to_string()
    }
}

/// The JSON file as opened, with what names it on disk.
struct OpenFile {
    file: std::fs::File,
    /// Device and inode of the open file.
    id: (u64, u64),
    checked: Instant,
}

impl OpenFile {
    fn open(path: &std::path::Path) -> std::io::Result<OpenFile> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        let meta = file.metadata()?;
        Ok(OpenFile {
            file,
            id: (meta.dev(), meta.ino()),
            checked: Instant::now(),
        })
    }

    /// Whether the path names another file than the open one, or none; looked at once every
    /// [`REOPEN_CHECK`] at most, since a rotation need not be followed within the millisecond.
    fn moved_away(&mut self, path: &std::path::Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        if self.checked.elapsed() < REOPEN_CHECK {
            return false;
        }
        self.checked = Instant::now();
        match std::fs::metadata(path) {
            Ok(meta) => (meta.dev(), meta.ino()) != self.id,
            Err(_) => true,
        }
    }
}

/// Follows the stored audit trail and offers each new event to the export, for as long as the
/// service lives.
pub async fn follow(export: AuditExport, service: std::sync::Weak<crate::service::Service>) {
    let Some(strong) = service.upgrade() else {
        return;
    };
    let mut watch = strong.store().audit_watch();
    let mut after = *watch.borrow_and_update();
    drop(strong);
    loop {
        let Some(strong) = service.upgrade() else {
            return;
        };
        match strong.read_audit_after(after, 500).await {
            Ok(events) if !events.is_empty() => {
                after = events.last().map_or(after, |e| e.id);
                for event in events {
                    export.offer(event);
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => warn!("audit export: the trail could not be read: {}", e.message),
        }
        drop(strong);
        // Woken by the next stored event; the timeout notices a service that went away.
        if let Ok(Err(_)) =
            tokio::time::timeout(std::time::Duration::from_secs(5), watch.changed()).await
        {
            // The store stopped announcing: look again now and then.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}
