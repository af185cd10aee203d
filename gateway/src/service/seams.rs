//! Points inside the gateway where a caller holds its work to put it in a chosen order with
//! something else: a race between a request and a reload, between two gateways' publishes of
//! a policy, or between the watch of the cluster's policy and a reload, which timing alone
//! would make happen once in many runs, happens every time. A gateway started by
//! [`Service::start`](super::Service::start) has none, and pays a branch on an empty
//! `Option` at each point.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// What a seam calls: the work waits at that point until the future it returns is done.
pub type Pause = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The seams of one gateway, given to
/// [`Service::start_with_seams`](super::Service::start_with_seams).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use fwnp_gateway::service::Seams;
///
/// let decided = Arc::new(AtomicU32::new(0));
/// let seams = Seams {
///     decided: Some(Arc::new({
///         let decided = decided.clone();
///         move || {
///             decided.fetch_add(1, Ordering::Relaxed);
///             Box::pin(async {})
///         }
///     })),
///     ..Seams::default()
/// };
/// // The service calls it at each decided request, and awaits what it returns.
/// let seam = seams.decided.as_ref().expect("set");
/// let _wait = seam();
/// assert_eq!(decided.load(Ordering::Relaxed), 1);
/// ```
#[derive(Clone, Default)]
pub struct Seams {
    /// Called once a request that needs the lease book has been decided by the policy in
    /// force, before the book's lock is taken.
    pub decided: Option<Pause>,
    /// In a cluster, called when the gateway has read the published policy to publish the
    /// next version (at a reload, or at the start when none is published yet), before the
    /// transaction that publishes it unless the key changed meanwhile.
    pub publishing: Option<Pause>,
    /// In a cluster, called when the watch of the cluster's policy has found a published
    /// version newer than the one in force and compiled it, before the step that checks it
    /// again and puts it in force.
    pub adopting: Option<Pause>,
    /// In a cluster, called when a reload has published its version, before the step that
    /// puts it in force here unless the watch has put a newer one in force meanwhile.
    pub published: Option<Pause>,
    /// Called before each live lease a policy put in force judges, to revoke it if the
    /// policy no longer allows it, and before the check that the policy is still the one in
    /// force.
    pub revoking: Option<Pause>,
    /// Called when a new lease is in the book, its insert counted as on its way to the store,
    /// before its kernel hold and its commit are carried out.
    pub storing: Option<Pause>,
    /// In a cluster, called when a lease's end is about to be committed to the store.
    pub ending: Option<Pause>,
    /// In a cluster, called when a lease's renewal, in the book already, is about to be
    /// committed to the store.
    pub renewing: Option<Pause>,
    /// In a cluster, called when a page of the audit trail has read where a follow of it goes
    /// on from, before it reads the page.
    pub paging: Option<Pause>,
}

impl fmt::Debug for Seams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seams")
            .field("decided", &self.decided.is_some())
            .field("publishing", &self.publishing.is_some())
            .field("adopting", &self.adopting.is_some())
            .field("published", &self.published.is_some())
            .field("revoking", &self.revoking.is_some())
            .field("storing", &self.storing.is_some())
            .field("ending", &self.ending.is_some())
            .field("renewing", &self.renewing.is_some())
            .field("paging", &self.paging.is_some())
            .finish()
    }
}

/// Waits at `seam`, if there is one.
pub(crate) async fn pause(seam: &Option<Pause>) {
    if let Some(seam) = seam {
        seam().await;
    }
}
