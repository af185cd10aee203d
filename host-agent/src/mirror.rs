//! The host's mirror of its leases: every grant the gateway made becomes elements of the host's
//! own table (`inet fwnp_host`) with the lease's remaining lifetime as their timeout, through the
//! netfilter crate's [`Batcher`]. The agent never builds netlink itself.
//!
//! The mirror is one task that takes its orders in sequence, so that an add, a renewal and a
//! removal of the same lease reach the kernel in the order the agent decided them. Elements are
//! counted by the leases that hold them: two leases granting the same opening share one
//! element, whose timeout is the latest expiry of its holders, and which
//! goes only when its last holder goes. Holders are the agent's numbers for the leases it holds
//! for applications, not gateway lease ids (a re-opened lease keeps its number under a new id);
//! two applications whose identical openings the gateway merged into one lease share one.
//!
//! With mirror mode `off` the task keeps the same books and never touches the kernel.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use fwnp_netfilter::{
    AlwaysAllowed, Batcher, BatcherConfig, Element, Error as NfError, HostLayout, Layout, Netfilter,
};
use fwnp_proto::Grant;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::{MirrorConfig, MirrorMode};

/// The elements of the host table that grants stand for.
pub fn elements_of(grants: &[Grant]) -> Vec<Element> {
    grants.iter().flat_map(Element::from_grant).collect()
}

/// Who holds elements in the mirror: the agent's number for one lease held for applications
/// (which keeps it across re-opens under new lease ids), or for a lease of an earlier run.
pub type Holder = u64;

/// A failure of the mirror.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// The kernel refused a change.
    #[error("the host table refused the change: {0}")]
    Kernel(#[from] NfError),
    /// The mirror task has stopped.
    #[error("the mirror has stopped")]
    Stopped,
}

enum Order {
    Hold {
        lease: Holder,
        elements: Vec<Element>,
        expires_at: Instant,
        done: Option<oneshot::Sender<Result<(), MirrorError>>>,
    },
    Drop {
        lease: Holder,
        done: Option<oneshot::Sender<Result<(), MirrorError>>>,
    },
    Reconcile {
        holders: Vec<(Holder, Vec<Element>, Instant)>,
        done: oneshot::Sender<Result<(), MirrorError>>,
    },
    Count(oneshot::Sender<usize>),
    Shutdown(oneshot::Sender<()>),
}

/// Handle on the mirror task.
#[derive(Debug, Clone)]
pub struct Mirror {
    tx: mpsc::UnboundedSender<Order>,
    mode: MirrorMode,
}

impl std::fmt::Debug for Order {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Order::Hold { lease, .. } => write!(f, "Hold({lease})"),
            Order::Drop { lease, .. } => write!(f, "Drop({lease})"),
            Order::Reconcile { holders, .. } => write!(f, "Reconcile({})", holders.len()),
            Order::Count(_) => f.write_str("Count"),
            Order::Shutdown(_) => f.write_str("Shutdown"),
        }
    }
}

/// The host layout the configuration describes.
pub fn layout_of(config: &MirrorConfig) -> Option<Layout> {
    Some(Layout::Host(HostLayout {
        table: config.table.clone(),
        mode: config.mode.host_mode()?,
        always_allowed: config.always_allowed.clone(),
        redirects: config.redirects.clone(),
    }))
}

impl Mirror {
    /// Starts the mirror. With a kernel mode, opens netfilter, installs the host table keeping
    /// the elements it already holds (their leases may still be live at the gateway; the first
    /// reconcile with the gateway's list decides), and starts the batcher.
    pub async fn start(config: &MirrorConfig) -> Result<Mirror, NfError> {
        let batcher = match layout_of(config) {
            None => None,
            Some(layout) => {
                let layout_for_thread = layout.clone();
                let (batcher, kept) = tokio::task::spawn_blocking(move || {
                    let mut nf = Netfilter::open()?;
                    let kept = if nf.table_present(&layout_for_thread)? {
                        nf.elements(&layout_for_thread).unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    let batcher = Batcher::start(nf, layout_for_thread, BatcherConfig::default())?;
                    Ok::<_, NfError>((batcher, kept))
                })
                .await
                .map_err(|e| NfError::Io(std::io::Error::other(e.to_string())))??;
                let report = batcher.reconcile(kept.clone()).await?;
                info!(
                    table = layout.table(),
                    kept = kept.len(),
                    recreated = report.table_recreated,
                    "host table installed"
                );
                Some(batcher)
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, batcher));
        Ok(Mirror {
            tx,
            mode: config.mode,
        })
    }

    /// The mirror mode.
    pub fn mode(&self) -> MirrorMode {
        self.mode
    }

    /// Makes `lease` hold `elements` until `expires_at` (adding or refreshing them); `done`
    /// hears whether the kernel took it.
    pub fn hold(
        &self,
        lease: Holder,
        elements: Vec<Element>,
        expires_at: Instant,
        done: Option<oneshot::Sender<Result<(), MirrorError>>>,
    ) {
        let order = Order::Hold {
            lease,
            elements,
            expires_at,
            done,
        };
        if let Err(mpsc::error::SendError(Order::Hold { done: Some(d), .. })) = self.tx.send(order)
        {
            let _ = d.send(Err(MirrorError::Stopped));
        }
    }

    /// Lets go of everything `lease` holds; elements no other lease holds are removed.
    pub fn drop_lease(
        &self,
        lease: Holder,
        done: Option<oneshot::Sender<Result<(), MirrorError>>>,
    ) {
        if let Err(mpsc::error::SendError(Order::Drop { done: Some(d), .. })) =
            self.tx.send(Order::Drop { lease, done })
        {
            let _ = d.send(Err(MirrorError::Stopped));
        }
    }

    /// Makes `holders` the whole mirror, in the books and in the kernel.
    pub async fn reconcile(
        &self,
        holders: Vec<(Holder, Vec<Element>, Instant)>,
    ) -> Result<(), MirrorError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Order::Reconcile { holders, done })
            .map_err(|_| MirrorError::Stopped)?;
        wait.await.map_err(|_| MirrorError::Stopped)?
    }

    /// How many elements the mirror holds.
    pub async fn element_count(&self) -> usize {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Order::Count(done)).is_err() {
            return 0;
        }
        wait.await.unwrap_or(0)
    }

    /// Stops the task after the orders already given. The elements stay in the kernel until
    /// their timeouts.
    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Order::Shutdown(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

/// The books: which leases hold which elements until when.
#[derive(Default)]
struct Books {
    leases: HashMap<Holder, (Vec<Element>, Instant)>,
    holders: HashMap<Element, BTreeSet<Holder>>,
}

impl Books {
    /// The latest expiry among the holders of `element`.
    fn expiry_of(&self, element: &Element) -> Option<Instant> {
        self.holders
            .get(element)?
            .iter()
            .filter_map(|l| self.leases.get(l).map(|(_, e)| *e))
            .max()
    }
}

fn timeout_until(expiry: Instant) -> Duration {
    // The kernel refuses a zero timeout (it would mean "never"); an element about to expire
    // gets the shortest one.
    expiry
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

async fn run(mut rx: mpsc::UnboundedReceiver<Order>, batcher: Option<Batcher>) {
    let mut books = Books::default();
    while let Some(order) = rx.recv().await {
        match order {
            Order::Hold {
                lease,
                elements,
                expires_at,
                done,
            } => {
                let result = hold(&mut books, batcher.as_ref(), lease, elements, expires_at).await;
                if let Some(done) = done {
                    let _ = done.send(result);
                } else if let Err(e) = result {
                    warn!(%lease, "mirror: {e}");
                }
            }
            Order::Drop { lease, done } => {
                let result = release(&mut books, batcher.as_ref(), lease).await;
                if let Some(done) = done {
                    let _ = done.send(result);
                } else if let Err(e) = result {
                    warn!(%lease, "mirror: {e}");
                }
            }
            Order::Reconcile { holders, done } => {
                books = Books::default();
                for (lease, elements, expiry) in holders {
                    for element in &elements {
                        books
                            .holders
                            .entry(element.clone())
                            .or_default()
                            .insert(lease);
                    }
                    books.leases.insert(lease, (elements, expiry));
                }
                let result = match &batcher {
                    None => Ok(()),
                    Some(b) => {
                        let desired: Vec<(Element, Duration)> = books
                            .holders
                            .keys()
                            .filter_map(|e| Some((e.clone(), timeout_until(books.expiry_of(e)?))))
                            .collect();
                        match b.reconcile(desired).await {
                            Ok(report) => {
                                info!(
                                    added = report.added_count,
                                    removed = report.removed.len(),
                                    failed = report.failed.len(),
                                    "host table reconciled with the gateway's leases"
                                );
                                Ok(())
                            }
                            Err(e) => Err(MirrorError::Kernel(e)),
                        }
                    }
                };
                let _ = done.send(result);
            }
            Order::Count(done) => {
                let _ = done.send(books.holders.len());
            }
            Order::Shutdown(done) => {
                if let Some(b) = batcher {
                    b.shutdown().await;
                }
                let _ = done.send(());
                return;
            }
        }
    }
}

async fn hold(
    books: &mut Books,
    batcher: Option<&Batcher>,
    lease: Holder,
    elements: Vec<Element>,
    expires_at: Instant,
) -> Result<(), MirrorError> {
    // Elements this lease held before and holds no more (a renewal that narrowed the grant).
    let before = books
        .leases
        .insert(lease, (elements.clone(), expires_at))
        .map(|(e, _)| e)
        .unwrap_or_default();
    let mut first_error = None;
    for element in &elements {
        let holders = books.holders.entry(element.clone()).or_default();
        let new_element = holders.is_empty();
        holders.insert(lease);
        let Some(batcher) = batcher else { continue };
        let timeout = timeout_until(books.expiry_of(element).unwrap_or(expires_at));
        let result = if new_element {
            match batcher.add(element.clone(), timeout).await {
                // Left by an earlier run, or by a lease whose books were reconciled away.
                Err(NfError::ElementExists(_)) => batcher.renew(element.clone(), timeout).await,
                other => other,
            }
        } else {
            batcher.renew(element.clone(), timeout).await
        };
        match result {
            Ok(()) => debug!(%lease, ?element, ?timeout, "mirrored"),
            Err(e) => {
                if new_element && let Some(h) = books.holders.get_mut(element) {
                    h.remove(&lease);
                    if h.is_empty() {
                        books.holders.remove(element);
                    }
                }
                first_error.get_or_insert(e);
            }
        }
    }
    for gone in before.iter().filter(|e| !elements.contains(e)) {
        let _ = unhold(books, batcher, lease, gone).await;
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(MirrorError::Kernel(e)),
    }
}

async fn release(
    books: &mut Books,
    batcher: Option<&Batcher>,
    lease: Holder,
) -> Result<(), MirrorError> {
    let Some((elements, _)) = books.leases.remove(&lease) else {
        return Ok(());
    };
    let mut first_error = None;
    for element in &elements {
        if let Err(e) = unhold(books, batcher, lease, element).await {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(MirrorError::Kernel(e)),
    }
}

/// `lease` no longer holds `element`: remove it if nobody else does, else set its timeout to
/// the remaining holders' latest expiry.
async fn unhold(
    books: &mut Books,
    batcher: Option<&Batcher>,
    lease: Holder,
    element: &Element,
) -> Result<(), NfError> {
    let Some(holders) = books.holders.get_mut(element) else {
        return Ok(());
    };
    holders.remove(&lease);
    let last = holders.is_empty();
    if last {
        books.holders.remove(element);
    }
    let Some(batcher) = batcher else {
        return Ok(());
    };
    if last {
        match batcher.remove(element.clone()).await {
            Ok(()) | Err(NfError::ElementMissing(_)) => Ok(()),
            Err(e) => Err(e),
        }
    } else if let Some(expiry) = books.expiry_of(element) {
        batcher.renew(element.clone(), timeout_until(expiry)).await
    } else {
        Ok(())
    }
}

/// Entries of the always-allowed list, for logs.
pub fn describe_allowed(entries: &[AlwaysAllowed]) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            let mut s = e.remote.to_string();
            if let Some(p) = e.protocol {
                s.push_str(&format!(" {p}"));
            }
            if let Some(ports) = e.ports {
                s.push_str(&format!("/{ports}"));
            }
            s
        })
        .collect()
}
