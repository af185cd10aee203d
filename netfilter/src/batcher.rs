//! The batcher: many async callers, one thread that owns the [`Netfilter`] and turns whatever
//! is queued into one transaction (after waiting a little for more while its caller says it is
//! busy: [`Batcher::coalesce`]), and a watch that repairs our table when someone else flushes
//! or deletes it or changes its elements.
//!
//! The watch reads the ruleset's generation, which the kernel moves on by one with every
//! committed transaction, and compares how far it moved with how many transactions the batcher
//! committed itself: any more were someone else's, and the table is checked and repaired (an
//! owned table, which only its owner can change, for its structure only: someone else's
//! transaction changed another table).
//! Listening to the nf_tables events instead would tell at once, but as long as anyone listens
//! the kernel builds and sends one event per element of every transaction, ours included:
//! about 40 % of the time of a bulk batch. The generation costs one small request per
//! [`BatcherConfig::watch_interval`], whatever the batches hold.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, oneshot};

use crate::{
    Change, Coalescing, Element, ElementMap, Error, Layout, Netfilter, Ownership, ReconcileReport,
};

/// Settings of a [`Batcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Most changes in one transaction; what is queued beyond waits for the next one.
    pub max_batch: usize,
    /// How often the table's structure is checked, as a safety net beside the watch.
    pub check_interval: Duration,
    /// How often the periodic check also compares the elements with the live openings, so that
    /// an element nobody leased (added by hand, or missed by the watch) lives at most this
    /// long. Only for shared tables ([`crate::Ownership::Shared`]): nobody else can add elements
    /// to an owned one.
    pub element_check_interval: Duration,
    /// Watch the ruleset's generation to notice within [`BatcherConfig::watch_interval`] that
    /// someone else committed a change (to our table or any other: the check that follows
    /// tells), rather than at the next periodic check.
    pub watch_events: bool,
    /// How often the ruleset's generation is read while watching.
    pub watch_interval: Duration,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_batch: 4096,
            check_interval: Duration::from_secs(1),
            element_check_interval: Duration::from_secs(10),
            watch_events: true,
            watch_interval: Duration::from_millis(100),
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Element transactions sent (one per batch; a batch retried without a bad element counts once).
    pub batches: u64,
    /// Changes handled.
    pub changes: u64,
    /// Changes that ended in an error.
    pub failed_changes: u64,
    /// Size of the last batch, in changes.
    pub last_batch_size: usize,
    /// Largest batch so far.
    pub max_batch_size: usize,
    /// Time the last batch took in the kernel (send to last acknowledgement).
    pub last_batch_latency: Duration,
    /// Total time spent in batches.
    pub total_batch_time: Duration,
    /// Repairs made (see [`RepairEvent`]).
    pub repairs: u64,
}

/// Why a repair was looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RepairTrigger {
    /// Someone else committed a change to the ruleset (its generation moved on by more than
    /// our own transactions).
    ForeignChange,
    /// The periodic check (of the table's structure).
    PeriodicCheck,
    /// The periodic comparison of the elements with the live openings (shared tables only,
    /// see [`BatcherConfig::element_check_interval`]).
    ElementCheck,
    /// A change failed because the table was missing.
    TableMissing,
}

/// A repair of our table after someone else changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairEvent {
    /// When the repair was made.
    pub at: SystemTime,
    /// What led to it.
    pub trigger: RepairTrigger,
    /// Whether the table was recreated from the layout (missing or damaged).
    pub table_recreated: bool,
    /// Elements put back.
    pub restored: usize,
    /// Elements removed (present but not desired), as far as they were counted: see
    /// `replaced`.
    pub removed: usize,
    /// Elements whose timeout was set back to the desired expiry.
    pub refreshed: usize,
    /// Whether the sets' contents were replaced whole (a large shared table, see
    /// [`Netfilter::repair`]): elements not desired are gone, but were not listed, so
    /// `removed` does not count them; `restored` and `refreshed` count what the desired
    /// elements lacked.
    pub replaced: bool,
    /// Set if the repair failed; it is tried again at the next check.
    pub error: Option<String>,
}

/// The desired openings, kept by a batcher's owner instead of by the batcher (see
/// [`Batcher::desired_by`]). An owner that already keeps every opening it wants, with its
/// expiry, spares the batcher a copy: with a million openings, about 75 bytes each.
///
/// ```
/// use std::sync::Mutex;
/// use std::time::{Duration, Instant};
/// use fwnp_netfilter::{DesiredState, Element};
///
/// /// Openings and when they expire.
/// struct Openings(Mutex<Vec<(Element, Instant)>>);
///
/// impl DesiredState for Openings {
///     fn count(&self) -> usize {
///         self.0.lock().unwrap().len()
///     }
///     fn openings(&self) -> Vec<(Element, Duration)> {
///         let now = Instant::now();
///         let openings = self.0.lock().unwrap();
///         openings
///             .iter()
///             .filter(|(_, expires)| *expires > now)
///             .map(|(opening, expires)| (opening.clone(), *expires - now))
///             .collect()
///     }
/// }
/// ```
pub trait DesiredState: Send + Sync + 'static {
    /// How many openings are desired, expired ones included or not (a large table's element
    /// check reads only this, unless someone else changed the ruleset).
    fn count(&self) -> usize;

    /// The openings desired now, each once and canonical ([`Element::canonical`]), with their
    /// remaining time; none that has expired. They may include changes queued on the batcher
    /// and not yet sent: a repair then makes them first, and they find them made (an opening
    /// asked for with [`Change::Renew`] is set or created, and one removed may be missing), so
    /// an owner should ask for new openings with `Renew`, not `Add`.
    fn openings(&self) -> Vec<(Element, Duration)>;
}

enum Command {
    Change(Change, oneshot::Sender<Result<(), Error>>),
    /// The desired openings, with their timeouts counted from the `Instant`.
    Reconcile(
        Vec<(Element, Duration)>,
        Instant,
        oneshot::Sender<Result<ReconcileReport, Error>>,
    ),
    Kill(Element, oneshot::Sender<Result<usize, Error>>),
    Apply(Layout, oneshot::Sender<Result<(), Error>>),
    Coalesce(Coalescing),
    DesiredBy(Arc<dyn DesiredState>),
    Shutdown(oneshot::Sender<()>),
    /// The last handle was dropped.
    Stop,
}

/// Shared by all clones of a handle; when the last one goes, the thread stops. (Every handle
/// holds a sender of its own too, so the channel alone would not tell.)
#[derive(Debug)]
struct Alive(mpsc::Sender<Command>);

impl Drop for Alive {
    fn drop(&mut self) {
        let _ = self.0.send(Command::Stop);
    }
}

/// Async front of a [`Netfilter`]: collects changes from many callers, sends one transaction
/// per batch and tells each caller whether its own change landed. It keeps the desired state
/// (layout and live elements with their expiry instants, or the layout alone when its owner
/// keeps the elements: [`Batcher::desired_by`]) and repairs the table from it when someone else
/// flushes or deletes it. Cloning gives another handle on the same thread.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Command>,
    _alive: Arc<Alive>,
    stats: Arc<Mutex<BatchStats>>,
    repairs: broadcast::Sender<RepairEvent>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Change(c, _) => write!(f, "Change({c:?})"),
            Command::Reconcile(d, ..) => write!(f, "Reconcile({} openings)", d.len()),
            Command::Kill(o, _) => write!(f, "Kill({o:?})"),
            Command::Apply(l, _) => write!(f, "Apply({})", l.table()),
            Command::Coalesce(c) => write!(f, "Coalesce({c:?})"),
            Command::DesiredBy(_) => write!(f, "DesiredBy"),
            Command::Shutdown(_) => write!(f, "Shutdown"),
            Command::Stop => write!(f, "Stop"),
        }
    }
}

impl Batcher {
    /// Starts the batcher's thread with a handle and the layout it keeps. The table is not
    /// applied here: apply or reconcile first (the first periodic check recreates a missing
    /// table, with no elements). Everything, the watch included, goes through the handle's
    /// socket, in the network namespace the handle was opened in.
    pub fn start(
        mut netfilter: Netfilter,
        layout: Layout,
        config: BatcherConfig,
    ) -> Result<Self, Error> {
        crate::layout::validate(&layout)?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(BatchStats::default()));
        let (repairs, _) = broadcast::channel(64);
        // The first reading before returning: whatever anyone changes once the batcher is
        // started is seen, however late its thread gets going.
        let watched = if config.watch_events {
            Some((netfilter.generation()?, netfilter.committed()))
        } else {
            None
        };
        let worker = Worker {
            nf: netfilter,
            layout,
            config,
            desired: DesiredSource::Kept(Desired::new()),
            stats: stats.clone(),
            repairs: repairs.clone(),
            watched,
            coalescing: None,
            elements_checked: None,
        };
        std::thread::Builder::new()
            .name("fwnp-nft-batcher".into())
            .spawn(move || worker.run(rx))?;
        let alive = Arc::new(Alive(tx.clone()));
        Ok(Batcher {
            tx,
            _alive: alive,
            stats,
            repairs,
        })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| Error::BatcherStopped)?;
        answer.await.map_err(|_| Error::BatcherStopped)?
    }

    /// Adds an opening that expires after `timeout`; returns once the kernel holds it.
    pub async fn add(&self, opening: Element, timeout: Duration) -> Result<(), Error> {
        self.call(|r| Command::Change(Change::Add(opening, timeout), r))
            .await
    }

    /// Sets an opening's remaining time to `timeout` (and creates it if it had expired).
    pub async fn renew(&self, opening: Element, timeout: Duration) -> Result<(), Error> {
        self.call(|r| Command::Change(Change::Renew(opening, timeout), r))
            .await
    }

    /// Removes an opening at once.
    pub async fn remove(&self, opening: Element) -> Result<(), Error> {
        self.call(|r| Command::Change(Change::Remove(opening), r))
            .await
    }

    /// Any change, for callers that hold [`Change`] values.
    pub async fn change(&self, change: Change) -> Result<(), Error> {
        self.call(|r| Command::Change(change, r)).await
    }

    /// Queues a change at once and returns its outcome as a future. Changes queued one after
    /// another reach the kernel in that order, whenever (and whether) their futures are
    /// awaited; so a caller that decides changes under a lock of its own queues them there, and
    /// waits after letting go of it.
    ///
    /// ```no_run
    /// # async fn example(batcher: fwnp_netfilter::Batcher, opening: fwnp_netfilter::Element) {
    /// use std::time::Duration;
    /// use fwnp_netfilter::Change;
    /// let added = batcher.submit(Change::Add(opening.clone(), Duration::from_secs(60)));
    /// let removed = batcher.submit(Change::Remove(opening));
    /// // The add reached the kernel before the remove.
    /// assert!(added.await.is_ok() && removed.await.is_ok());
    /// # }
    /// ```
    pub fn submit(
        &self,
        change: Change,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = self.tx.send(Command::Change(change, reply));
        async move {
            queued.map_err(|_| Error::BatcherStopped)?;
            answer.await.map_err(|_| Error::BatcherStopped)?
        }
    }

    /// Makes `desired` the whole desired state and brings the kernel to it (see
    /// [`Netfilter::reconcile`]). A batcher whose owner keeps the desired state
    /// ([`Batcher::desired_by`]) keeps no copy: `desired` is then the owner's state as it is
    /// now.
    pub async fn reconcile(
        &self,
        desired: Vec<(Element, Duration)>,
    ) -> Result<ReconcileReport, Error> {
        let asked = Instant::now();
        self.call(|r| Command::Reconcile(desired, asked, r)).await
    }

    /// Ends the live connections of an opening (see [`Netfilter::kill_connections`]).
    pub async fn kill_connections(&self, opening: Element) -> Result<usize, Error> {
        self.call(|r| Command::Kill(opening, r)).await
    }

    /// Replaces the layout (a new mode, other protected networks...) and applies it with the
    /// live elements, in one transaction. On error the old layout stays the one kept.
    pub async fn apply(&self, layout: Layout) -> Result<(), Error> {
        self.call(|r| Command::Apply(layout, r)).await
    }

    /// From now on, a batch waits for more changes while `coalescing` says many are on their
    /// way (see [`Coalescing`]); changes are otherwise committed as soon as the thread is free.
    pub fn coalesce(&self, coalescing: Coalescing) {
        // An error means the thread is gone, and there is nothing left to batch.
        let _ = self.tx.send(Command::Coalesce(coalescing));
    }

    /// From now on the batcher reads the desired state from `owner` when it repairs or
    /// applies the table, and keeps none of its own (the openings it kept so far are
    /// forgotten): for an owner that keeps every opening it wants anyway. Send it before the
    /// first change.
    pub fn desired_by(&self, owner: Arc<dyn DesiredState>) {
        // An error means the thread is gone, and there is nothing left to repair.
        let _ = self.tx.send(Command::DesiredBy(owner));
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BatchStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Subscribes to repair events.
    pub fn repairs(&self) -> broadcast::Receiver<RepairEvent> {
        self.repairs.subscribe()
    }

    /// Stops the thread after the changes already queued; other handles then get
    /// [`Error::BatcherStopped`]. The table and its elements stay in the kernel.
    pub async fn shutdown(self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Command::Shutdown(reply)).is_ok() {
            let _ = done.await;
        }
    }
}

/// How often expired openings are dropped from the desired state when idle.
const PRUNE_INTERVAL: Duration = Duration::from_secs(30);

struct Worker {
    nf: Netfilter,
    layout: Layout,
    config: BatcherConfig,
    desired: DesiredSource,
    stats: Arc<Mutex<BatchStats>>,
    repairs: broadcast::Sender<RepairEvent>,
    /// The ruleset's generation when last read, and how many transactions of our own the kernel
    /// had committed then; `None` when not watching.
    watched: Option<(u32, u64)>,
    /// When a batch waits for more (none: never).
    coalescing: Option<Coalescing>,
    /// The ruleset's generation and our committed transactions when the elements were last
    /// compared or replaced (by a repair, a reconcile or an apply), for the element check of
    /// large tables.
    elements_checked: Option<(u32, u64)>,
}

/// The live openings (canonical) and when they expire, in milliseconds after `started` (the
/// kernel's timeouts are milliseconds too). Entries lie side by side and only their positions
/// are hashed: with a million openings, a hash table of whole entries would pay for up to as
/// many empty slots of 56 bytes each. An expiry as 8 bytes of milliseconds instead of a 16-byte
/// `Instant` makes an entry 56 bytes instead of 64.
#[derive(Debug)]
struct Desired {
    elements: ElementMap<u64>,
    started: Instant,
}

impl Desired {
    fn new() -> Self {
        Desired {
            elements: ElementMap::new(),
            started: Instant::now(),
        }
    }

    /// Milliseconds since `started`.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Desires `opening` for `timeout` from now.
    fn set(&mut self, opening: &Element, timeout: Duration) {
        self.set_from(self.now_ms(), opening, timeout);
    }

    /// Desires `opening` for `timeout` from `from_ms` (see [`Desired::now_ms`]).
    fn set_from(&mut self, from_ms: u64, opening: &Element, timeout: Duration) {
        if let Ok(canonical) = opening.canonical() {
            let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            self.elements
                .insert(canonical, from_ms.saturating_add(timeout));
        }
    }

    /// Desires `opening` no more.
    fn remove(&mut self, opening: &Element) {
        if let Ok(canonical) = opening.canonical() {
            self.elements.remove(&canonical);
        }
    }

    /// Desires exactly `openings`, their timeouts counted from `asked`.
    fn replace(&mut self, openings: &[(Element, Duration)], asked: Instant) {
        self.elements.clear();
        // At once: grown entry by entry, a start's million openings left the map's outgrown
        // entries and indexes freed behind it (a sixth of what it holds), which the allocator
        // keeps.
        self.elements.reserve(openings.len());
        let from = u64::try_from(asked.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        for (opening, timeout) in openings {
            self.set_from(from, opening, *timeout);
        }
    }

    /// Forgets the openings the kernel has expired by itself.
    fn prune(&mut self) {
        let now = self.now_ms();
        self.elements.retain(|_, expiry| *expiry > now);
    }

    /// The desired openings with their remaining time; expired ones are forgotten.
    fn remaining(&mut self) -> Vec<(Element, Duration)> {
        self.prune();
        let now = self.now_ms();
        self.elements
            .iter()
            .filter(|(_, expiry)| **expiry > now)
            .map(|(o, expiry)| (o.clone(), Duration::from_millis(expiry - now)))
            .collect()
    }
}

/// Where the worker finds the desired state.
enum DesiredSource {
    /// Kept here, from the changes the kernel took.
    Kept(Desired),
    /// Kept by the batcher's owner, and read when needed.
    Owner(Arc<dyn DesiredState>),
}

impl DesiredSource {
    fn set(&mut self, opening: &Element, timeout: Duration) {
        if let DesiredSource::Kept(desired) = self {
            desired.set(opening, timeout);
        }
    }

    fn remove(&mut self, opening: &Element) {
        if let DesiredSource::Kept(desired) = self {
            desired.remove(opening);
        }
    }

    fn replace(&mut self, openings: &[(Element, Duration)], asked: Instant) {
        if let DesiredSource::Kept(desired) = self {
            desired.replace(openings, asked);
        }
    }

    fn prune(&mut self) {
        if let DesiredSource::Kept(desired) = self {
            desired.prune();
        }
    }

    fn count(&self) -> usize {
        match self {
            DesiredSource::Kept(desired) => desired.elements.len(),
            DesiredSource::Owner(owner) => owner.count(),
        }
    }

    /// The desired openings with their remaining time, none expired.
    fn remaining(&mut self) -> Vec<(Element, Duration)> {
        match self {
            DesiredSource::Kept(desired) => desired.remaining(),
            DesiredSource::Owner(owner) => owner.openings(),
        }
    }
}

/// How far the ruleset's generation moved from `from` to `to`: the kernel skips 0 when it wraps.
fn generations_between(from: u32, to: u32) -> u64 {
    let moved = u64::from(to.wrapping_sub(from));
    if to < from {
        moved.saturating_sub(1)
    } else {
        moved
    }
}

/// Moves the changes queued on `rx` into `batch`, up to `max`; a command of another kind stops
/// it and is kept in `deferred`, to run after the batch.
fn take_changes(
    rx: &mpsc::Receiver<Command>,
    batch: &mut Vec<(Change, oneshot::Sender<Result<(), Error>>)>,
    max: usize,
    deferred: &mut Option<Command>,
) {
    while batch.len() < max && deferred.is_none() {
        match rx.try_recv() {
            Ok(Command::Change(c, r)) => batch.push((c, r)),
            Ok(other) => *deferred = Some(other),
            Err(_) => break,
        }
    }
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut next_check = Instant::now() + self.config.check_interval;
        let mut deferred: Option<Command> = None;
        let mut last_prune = Instant::now();
        let mut last_element_check = Instant::now();
        // Without a watch, the next reading is never due (a year is as good as never here).
        let mut next_watch = Instant::now()
            + if self.config.watch_events {
                self.config.watch_interval
            } else {
                Duration::from_secs(365 * 24 * 3600)
            };
        loop {
            let command = match deferred.take() {
                Some(c) => c,
                None => match rx.recv_timeout(
                    next_check
                        .min(next_watch)
                        .saturating_duration_since(Instant::now()),
                ) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) if Instant::now() < next_check => {
                        self.watch();
                        next_watch = Instant::now() + self.config.watch_interval;
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        // An owned table's elements change only through us; a shared one's
                        // may have been changed unseen (the watch is a help, not a promise).
                        let elements = self.nf.ownership() == Ownership::Shared
                            && last_element_check.elapsed() >= self.config.element_check_interval;
                        if elements {
                            last_element_check = Instant::now();
                            self.check(RepairTrigger::ElementCheck);
                        } else {
                            self.check(RepairTrigger::PeriodicCheck);
                        }
                        next_check = Instant::now() + self.config.check_interval;
                        if last_prune.elapsed() >= PRUNE_INTERVAL {
                            // Forget openings the kernel has expired by itself.
                            self.desired.prune();
                            last_prune = Instant::now();
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                },
            };
            match command {
                Command::Change(change, reply) => {
                    let mut batch = vec![(change, reply)];
                    // Drain what is queued: under load batches grow, latency stays low.
                    let max = self.config.max_batch.max(1);
                    take_changes(&rx, &mut batch, max, &mut deferred);
                    if let Some(coalescing) = &self.coalescing {
                        coalescing.gather(batch.len(), || {
                            take_changes(&rx, &mut batch, max, &mut deferred);
                            (deferred.is_none() && batch.len() < max).then_some(batch.len())
                        });
                    }
                    self.commit(batch);
                }
                Command::Coalesce(coalescing) => self.coalescing = Some(coalescing),
                Command::DesiredBy(owner) => self.desired = DesiredSource::Owner(owner),
                Command::Reconcile(mut desired, asked, reply) => {
                    self.desired.replace(&desired, asked);
                    // The timeouts count from the ask: the time the command waited and the
                    // desired state took to make (seconds for a million) is taken off them.
                    let spent = asked.elapsed();
                    for (_, timeout) in &mut desired {
                        *timeout = timeout.saturating_sub(spent).max(Duration::from_millis(1));
                    }
                    let reading = self.reading();
                    let result = self.nf.reconcile(&self.layout, desired);
                    if result.is_ok() {
                        self.elements_checked = reading;
                    }
                    let _ = reply.send(result);
                }
                Command::Kill(opening, reply) => {
                    let _ = reply.send(self.nf.kill_connections(&opening));
                }
                Command::Apply(layout, reply) => {
                    let elements = self.desired.remaining();
                    let reading = self.reading();
                    let result = self.nf.apply(&layout, &elements);
                    if result.is_ok() {
                        self.elements_checked = reading;
                        if layout.table() != self.layout.table() {
                            // The old table is no longer ours to keep: leave no stale copy.
                            if let Err(e) = self.nf.delete_table(&self.layout) {
                                tracing::warn!(error = %e, table = self.layout.table(), "could not delete the previous table");
                            }
                        }
                        self.layout = layout;
                    }
                    let _ = reply.send(result);
                }
                Command::Shutdown(reply) => {
                    let _ = reply.send(());
                    return;
                }
                Command::Stop => return,
            }
            if Instant::now() >= next_watch {
                self.watch();
                next_watch = Instant::now() + self.config.watch_interval;
            }
            if Instant::now() >= next_check {
                self.check(RepairTrigger::PeriodicCheck);
                next_check = Instant::now() + self.config.check_interval;
            }
        }
    }

    /// Reads the ruleset's generation and checks the table when it moved on by more than our
    /// own transactions since the last reading. A transaction of ours that the kernel
    /// acknowledged but that changed nothing (no generation) would hide one of someone else's
    /// in the same interval; the periodic checks are the net for that.
    fn watch(&mut self) {
        if !self.config.watch_events {
            return;
        }
        let generation = match self.nf.generation() {
            Ok(generation) => generation,
            Err(e) => {
                tracing::warn!(error = %e, "reading the nftables generation failed");
                return;
            }
        };
        let committed = self.nf.committed();
        let Some((last, last_committed)) = self.watched.replace((generation, committed)) else {
            return;
        };
        if generations_between(last, generation) > committed.wrapping_sub(last_committed) {
            // The repair's own transactions are counted as ours at the next reading.
            self.check(RepairTrigger::ForeignChange);
        }
    }

    fn commit(&mut self, batch: Vec<(Change, oneshot::Sender<Result<(), Error>>)>) {
        let changes: Vec<Change> = batch.iter().map(|(c, _)| c.clone()).collect();
        let started = Instant::now();
        let mut results = match self.nf.commit(&self.layout, &changes) {
            Ok(results) => results,
            Err(e) => changes.iter().map(|_| Err(e.clone())).collect(),
        };
        // Our table vanished under us: repair it, then try those changes once more.
        let missing: Vec<usize> = (0..results.len())
            .filter(|i| matches!(results[*i], Err(Error::TableMissing { .. })))
            .collect();
        if !missing.is_empty() {
            self.check(RepairTrigger::TableMissing);
            let again: Vec<Change> = missing.iter().map(|i| changes[*i].clone()).collect();
            if let Ok(second) = self.nf.commit(&self.layout, &again) {
                for (i, result) in missing.into_iter().zip(second) {
                    results[i] = result;
                }
            }
        }
        let elapsed = started.elapsed();
        // Counted before the callers hear: a caller that reads the stats once answered finds
        // its batch among them.
        let failed = results.iter().filter(|r| r.is_err()).count() as u64;
        if let Ok(mut stats) = self.stats.lock() {
            stats.batches += 1;
            stats.changes += changes.len() as u64;
            stats.failed_changes += failed;
            stats.last_batch_size = changes.len();
            stats.max_batch_size = stats.max_batch_size.max(changes.len());
            stats.last_batch_latency = elapsed;
            stats.total_batch_time += elapsed;
        }
        for ((change, reply), result) in batch.into_iter().zip(results) {
            match (&change, &result) {
                (Change::Add(o, t) | Change::Renew(o, t), Ok(())) => {
                    self.desired.set(o, *t);
                }
                (Change::Remove(o), Ok(()) | Err(Error::ElementMissing(_))) => {
                    self.desired.remove(o);
                }
                _ => {}
            }
            let _ = reply.send(result);
        }
    }

    /// The ruleset's generation and how many transactions of ours the kernel had committed
    /// then (`None` if the generation could not be read).
    fn reading(&mut self) -> Option<(u32, u64)> {
        let generation = self.nf.generation().ok()?;
        Some((generation, self.nf.committed()))
    }

    /// Checks the table and repairs it. The periodic check compares the structure only (cheap);
    /// a foreign change also compares the elements.
    fn check(&mut self, trigger: RepairTrigger) {
        let present = match self.nf.table_present(&self.layout) {
            Ok(present) => present,
            Err(e) => {
                tracing::warn!(error = %e, "checking the nftables table failed");
                return;
            }
        };
        // Nobody else can change an owned table: someone else's transaction, which moved the
        // ruleset's generation, changed another table, and the elements need no comparison
        // (with a million of them, seconds of this thread at every rule another firewall adds).
        let structure_only = trigger == RepairTrigger::PeriodicCheck
            || (trigger == RepairTrigger::ForeignChange && self.nf.ownership() == Ownership::Owned);
        if present && structure_only {
            return;
        }
        // Read before the repair: its own transactions count as ours at the next reading, and
        // anyone else's meanwhile as someone else's.
        let reading = self.reading();
        if present
            && trigger == RepairTrigger::ElementCheck
            && self.desired.count() >= Netfilter::REPLACE_AT
            && let (Some((last, last_committed)), Some((generation, committed))) =
                (self.elements_checked, reading)
            && generations_between(last, generation) <= committed.wrapping_sub(last_committed)
        {
            // A large shared table's repair replaces its sets whole, as only a listing could
            // find what someone else added: not every element check, only when someone else
            // committed anything since the elements were last compared.
            return;
        }
        // Only now: an owner's desired state is copied under its lock, which its changes wait
        // for, and a large one should not be copied every element check for nothing.
        let desired = self.desired.remaining();
        let mut event = RepairEvent {
            at: SystemTime::now(),
            trigger,
            table_recreated: false,
            restored: 0,
            removed: 0,
            refreshed: 0,
            replaced: false,
            error: None,
        };
        if !present {
            event.table_recreated = true;
            match self.nf.apply(&self.layout, &desired) {
                Ok(()) => event.restored = desired.len(),
                Err(e) => event.error = Some(e.to_string()),
            }
        } else {
            match self.nf.repair(&self.layout, desired) {
                Ok(report) => {
                    event.table_recreated = report.table_recreated;
                    event.restored = report.added_count;
                    event.removed = report.removed.len();
                    event.refreshed = report.refreshed;
                    event.replaced = report.replaced;
                    if report.undesired_may_remain {
                        event.error = Some(
                            "the kernel refused to replace the sets whole: the desired elements \
                             are back, but elements nobody desires may remain"
                                .into(),
                        );
                    }
                }
                Err(e) => event.error = Some(e.to_string()),
            }
        }
        if event.error.is_none() {
            self.elements_checked = reading;
        }
        if event.restored + event.removed + event.refreshed == 0
            && !event.table_recreated
            && !event.replaced
            && event.error.is_none()
        {
            return;
        }
        tracing::warn!(
            ?event,
            table = self.layout.table(),
            "repaired the nftables table"
        );
        if let Ok(mut stats) = self.stats.lock() {
            stats.repairs += 1;
        }
        let _ = self.repairs.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::generations_between;

    #[test]
    fn generations_count_across_the_wrap_without_zero() {
        assert_eq!(generations_between(7, 7), 0);
        assert_eq!(generations_between(7, 10), 3);
        // The kernel goes from u32::MAX to 1.
        assert_eq!(generations_between(u32::MAX, 1), 1);
        assert_eq!(generations_between(u32::MAX - 1, 2), 3);
    }
}

/// What a million desired openings cost, counted by a global allocator that exists in this
/// crate's unit tests only (the process's: tests beside this one change little meanwhile).
#[cfg(test)]
mod memory_tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use fwnp_proto::alloc_count::{INSTRUMENTED_SYSTEM, live};
    use fwnp_proto::{PortRange, Protocol};

    use super::Desired;
    use crate::Element;

    fwnp_proto::count_allocations!();

    const OPENINGS: usize = 1_000_000;

    /// The count is the process's: the tests of this module take turns, so that neither
    /// counts the other's million openings.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The openings of the load generator's prefill of a million leases: 100 hosts, one TCP
    /// port each, any source.
    fn prefill() -> Vec<(Element, Duration)> {
        (0..OPENINGS)
            .map(|i| (opening(i), Duration::from_secs(3600)))
            .collect()
    }

    fn opening(i: usize) -> Element {
        Element {
            host: IpAddr::V4(Ipv4Addr::new(198, 18, 0, (i % 100) as u8)),
            protocol: Protocol::Tcp,
            ports: PortRange::single(1024 + (i / 100) as u16),
            remote: None,
        }
    }

    /// The desired state of a gateway the load generator's prefill leaves with a million
    /// leases (100 hosts, one TCP port each, any source): an `Instant` per entry made it 82
    /// bytes an opening (run with `--nocapture` to see the figure).
    #[test]
    fn a_million_desired_openings_cost_at_most_76_bytes_each() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let before = live();
        let mut desired = Desired::new();
        for i in 0..OPENINGS {
            desired.set(&opening(i), Duration::from_secs(3600));
        }
        assert_eq!(desired.elements.len(), OPENINGS);
        // The map reserves room for its entries up to its index's capacity (near twice as
        // many here): address space that nothing touches, which the gateway's memory does not
        // count. Counted is what holds entries.
        desired.elements.shrink_to_fit();
        let held = usize::try_from(live() - before).unwrap_or(0);
        drop(desired);
        let per = held as f64 / OPENINGS as f64;
        println!("desired state: {per:.1} bytes per opening");
        assert!(per <= 76.0, "{per:.1} bytes per opening");
    }

    /// A start's reconcile makes a million openings the desired state at once: it allocates
    /// what it keeps, once. Grown entry by entry, the map allocated 1.16 times what it kept
    /// (run with `--nocapture` to see the figure), and what it outgrew was freed behind it,
    /// which the allocator keeps.
    #[test]
    fn replacing_the_desired_state_with_a_million_openings_allocates_what_it_keeps() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let openings = prefill();
        let mut desired = Desired::new();
        let before_live = live();
        let before = INSTRUMENTED_SYSTEM.stats().bytes_allocated;
        desired.replace(&openings, std::time::Instant::now());
        let allocated = INSTRUMENTED_SYSTEM.stats().bytes_allocated - before;
        let held = usize::try_from(live() - before_live).unwrap_or(0);
        assert_eq!(desired.elements.len(), OPENINGS);
        let ratio = allocated as f64 / held.max(1) as f64;
        println!("replace: allocated {ratio:.2} times what it holds");
        assert!(ratio <= 1.05, "allocated {ratio:.2} times what it holds");
    }

    /// Planning a start's reconcile of a million openings allocates little beside the list
    /// it is given, which becomes the list of what to add: a table of their positions (about
    /// 19 bytes an opening). A map of the wanted openings and a list of what to add, each a
    /// copy of the list before, allocated 139 bytes an opening, all held at the plan's peak
    /// with the list itself (run with `--nocapture` to see the figure).
    #[test]
    fn planning_a_million_openings_allocates_at_most_24_bytes_each_beside_them() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let desired = prefill();
        let before = INSTRUMENTED_SYSTEM.stats().bytes_allocated;
        let plan = crate::reconcile::plan(&[], desired);
        let allocated = INSTRUMENTED_SYSTEM.stats().bytes_allocated - before;
        assert_eq!(plan.add.len(), OPENINGS);
        assert!(plan.invalid.is_empty());
        let per = allocated as f64 / OPENINGS as f64;
        println!("plan: {per:.1} bytes allocated per opening");
        assert!(per <= 24.0, "{per:.1} bytes allocated per opening");
    }
}
