//! Prometheus metrics of the gateway, served as text on the configured address.

use prometheus::core::Metric;
use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::api::TimeBuckets;

/// A histogram's cumulative buckets in microseconds, its count of every observation as the
/// last, unbounded one.
fn buckets(histogram: &Histogram) -> TimeBuckets {
    let metric = histogram.metric();
    let proto = metric.get_histogram();
    let (mut le_us, mut counts): (Vec<u64>, Vec<u64>) = proto
        .get_bucket()
        .iter()
        .map(|b| ((b.upper_bound() * 1e6).round() as u64, b.cumulative_count()))
        .unzip();
    le_us.push(u64::MAX);
    counts.push(proto.get_sample_count());
    TimeBuckets { le_us, counts }
}

/// Every metric the gateway exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by outcome (`granted`, `released`, a result code's name...).
    pub requests: IntCounterVec,
    /// Leases alive now.
    pub live_leases: IntGauge,
    /// Time from a request's arrival to its Granted answer.
    pub grant_latency: Histogram,
    /// Netlink transactions sent to the kernel.
    pub kernel_batches: IntCounter,
    /// Element changes sent in them (divided by the batches: the mean batch size).
    pub kernel_changes: IntCounter,
    /// Element changes the kernel refused.
    pub kernel_failed_changes: IntCounter,
    /// Time spent in the kernel's transactions (divided by the batches: the mean latency).
    pub kernel_batch_seconds: Counter,
    /// Changes in the most recent transaction.
    pub kernel_last_batch_size: IntGauge,
    /// Repairs of the table after someone else changed it.
    pub kernel_repairs: IntCounter,
    /// Open QUIC connections.
    pub connections: IntGauge,
    /// Lease endings, by how they ended.
    pub lease_ends: IntCounterVec,
    /// Changes of the epoch while the gateway runs: the cluster's shared lease state was
    /// found lost or replaced.
    pub epoch_changes: IntCounter,
    /// Lists of the cluster's leases after a lost watch or an end that could not be stored:
    /// a count that keeps rising says the gateway follows the cluster by reading all of it.
    pub cluster_lists: IntCounter,
    /// Where a request waits, by stage: `lock` (for the request core's lease book), `kernel`
    /// (its elements' netlink batch acknowledged) and `store` (its group commit committed).
    /// Under saturation this says which queue the requests stand in.
    pub request_stage: HistogramVec,
    /// Requests being handled now (received and not yet answered).
    pub requests_in_flight: IntGauge,
    /// Audit events the export (`[audit]`) dropped, by sink.
    pub audit_export_dropped: IntCounterVec,
    /// Leases the store held live that the start's restore did not load into the lease book,
    /// by why (`duplicate`, `over-capacity`, `expired`): live in the store, enforced nowhere.
    pub restore_unloaded: IntCounterVec,
    /// The children of `request_stage` for [`Stage::Lock`], [`Stage::Kernel`] and
    /// [`Stage::Store`], and of `requests` for `granted`, looked up once: every grant passes
    /// through them, and a lookup by label hashes the label and takes the vector's lock.
    stages: [Histogram; 3],
    granted: IntCounter,
}

/// The stages of [`Metrics::request_stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for the request core's lock.
    Lock,
    /// Programming the kernel's elements.
    Kernel,
    /// Committing the store's writes.
    Store,
}

impl Stage {
    const ALL: [Stage; 3] = [Stage::Lock, Stage::Kernel, Stage::Store];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Lock => "lock",
            Stage::Kernel => "kernel",
            Stage::Store => "store",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("fwnp".to_owned()), None).expect("a constant, valid prefix");
        // The names and help texts below are constants; registration can only fail on a
        // duplicate name, which the constants rule out.
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Requests answered, by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let live_leases = IntGauge::new("live_leases", "Leases alive now").expect("valid metric");
        let grant_latency = Histogram::with_opts(
            HistogramOpts::new("grant_latency_seconds", "From request to Granted answer")
                .buckets(prometheus::exponential_buckets(0.000_1, 2.0, 16).expect("valid")),
        )
        .expect("valid metric");
        let kernel_batches = IntCounter::new("kernel_batches_total", "Netlink transactions sent")
            .expect("valid metric");
        let kernel_changes =
            IntCounter::new("kernel_changes_total", "Element changes sent to the kernel")
                .expect("valid metric");
        let kernel_failed_changes = IntCounter::new(
            "kernel_failed_changes_total",
            "Element changes the kernel refused",
        )
        .expect("valid metric");
        let kernel_batch_seconds = Counter::new(
            "kernel_batch_seconds_total",
            "Time spent in netlink transactions",
        )
        .expect("valid metric");
        let kernel_last_batch_size = IntGauge::new(
            "kernel_last_batch_size",
            "Element changes in the latest transaction",
        )
        .expect("valid metric");
        let kernel_repairs = IntCounter::new(
            "kernel_repairs_total",
            "Repairs of the table after outside changes",
        )
        .expect("valid metric");
        let connections =
            IntGauge::new("connections", "Open QUIC connections").expect("valid metric");
        let audit_export_dropped = IntCounterVec::new(
            Opts::new(
                "audit_export_dropped_total",
                "Audit events the export dropped (queue full or sink failing), by sink",
            ),
            &["sink"],
        )
        .expect("constant options");
        let restore_unloaded = IntCounterVec::new(
            Opts::new(
                "restore_unloaded_leases_total",
                "Leases the store held live that the restore did not load, by why",
            ),
            &["why"],
        )
        .expect("valid metric");
        let lease_ends = IntCounterVec::new(
            Opts::new("lease_ends_total", "Leases ended, by how"),
            &["how"],
        )
        .expect("valid metric");
        let epoch_changes = IntCounter::new(
            "epoch_changes_total",
            "Epoch changes while running: the cluster's lease state lost or replaced",
        )
        .expect("valid metric");
        let cluster_lists = IntCounter::new(
            "cluster_lists_total",
            "Lists of every lease of the cluster, after a lost watch or an end not stored",
        )
        .expect("valid metric");
        let request_stage = HistogramVec::new(
            HistogramOpts::new(
                "request_stage_seconds",
                "Time a request spent in each stage of its handling",
            )
            .buckets(prometheus::exponential_buckets(0.000_025, 2.0, 18).expect("valid")),
            &["stage"],
        )
        .expect("valid metric");
        let requests_in_flight = IntGauge::new(
            "requests_in_flight",
            "Requests received and not yet answered",
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_stage.clone()),
            Box::new(requests_in_flight.clone()),
            Box::new(live_leases.clone()),
            Box::new(grant_latency.clone()),
            Box::new(kernel_batches.clone()),
            Box::new(kernel_changes.clone()),
            Box::new(kernel_failed_changes.clone()),
            Box::new(kernel_batch_seconds.clone()),
            Box::new(kernel_last_batch_size.clone()),
            Box::new(kernel_repairs.clone()),
            Box::new(connections.clone()),
            Box::new(lease_ends.clone()),
            Box::new(epoch_changes.clone()),
            Box::new(cluster_lists.clone()),
            Box::new(audit_export_dropped.clone()),
            Box::new(restore_unloaded.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        let stages = Stage::ALL.map(|stage| request_stage.with_label_values(&[stage.name()]));
        let granted = requests.with_label_values(&["granted"]);
        Metrics {
            registry,
            stages,
            granted,
            requests,
            live_leases,
            grant_latency,
            kernel_batches,
            kernel_changes,
            kernel_failed_changes,
            kernel_batch_seconds,
            kernel_last_batch_size,
            kernel_repairs,
            connections,
            lease_ends,
            epoch_changes,
            cluster_lists,
            request_stage,
            requests_in_flight,
            audit_export_dropped,
            restore_unloaded,
        }
    }

    /// Records that a request spent `elapsed` in `stage`.
    pub fn stage(&self, stage: Stage, elapsed: std::time::Duration) {
        self.stages[stage as usize].observe(elapsed.as_secs_f64());
    }

    /// How many requests went through `stage` and their summed time there, in microseconds.
    pub fn stage_totals(&self, stage: Stage) -> (u64, u64) {
        let histogram = self.request_stage.with_label_values(&[stage.name()]);
        (
            histogram.get_sample_count(),
            (histogram.get_sample_sum() * 1e6) as u64,
        )
    }

    /// How the times of `stage` spread, in its histogram's buckets.
    pub fn stage_buckets(&self, stage: Stage) -> TimeBuckets {
        buckets(&self.stages[stage as usize])
    }

    /// How the grants' latency spread, in its histogram's buckets.
    pub fn grant_latency_buckets(&self) -> TimeBuckets {
        buckets(&self.grant_latency)
    }

    /// Counts one answered request.
    pub fn request(&self, outcome: &str) {
        if outcome == "granted" {
            self.granted.inc();
        } else {
            self.requests.with_label_values(&[outcome]).inc();
        }
    }

    /// Brings the kernel counters up to the batcher's own (they only grow).
    pub fn observe_batcher(&self, stats: &fwnp_netfilter::BatchStats) {
        fn catch_up(counter: &IntCounter, total: u64) {
            let now = counter.get();
            if total > now {
                counter.inc_by(total - now);
            }
        }
        catch_up(&self.kernel_batches, stats.batches);
        catch_up(&self.kernel_changes, stats.changes);
        catch_up(&self.kernel_failed_changes, stats.failed_changes);
        catch_up(&self.kernel_repairs, stats.repairs);
        let seconds = stats.total_batch_time.as_secs_f64();
        let now = self.kernel_batch_seconds.get();
        if seconds > now {
            self.kernel_batch_seconds.inc_by(seconds - now);
        }
        self.kernel_last_batch_size
            .set(i64::try_from(stats.last_batch_size).unwrap_or(i64::MAX));
    }

    /// The metrics in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if encoder
            .encode(&self.registry.gather(), &mut buffer)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::{Metrics, Stage};
    use std::time::Duration;

    #[test]
    fn kernel_counters_follow_the_batcher_and_render() {
        let metrics = Metrics::new();
        let mut stats = fwnp_netfilter::BatchStats {
            batches: 3,
            changes: 120,
            last_batch_size: 40,
            total_batch_time: Duration::from_millis(6),
            ..Default::default()
        };
        metrics.observe_batcher(&stats);
        stats.batches = 5;
        stats.changes = 150;
        metrics.observe_batcher(&stats);
        metrics.request("granted");
        let text = metrics.render();
        assert!(text.contains("fwnp_kernel_batches_total 5"), "{text}");
        assert!(text.contains("fwnp_kernel_changes_total 150"), "{text}");
        assert!(text.contains("fwnp_kernel_last_batch_size 40"), "{text}");
        assert!(
            text.contains("fwnp_requests_total{outcome=\"granted\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn the_buckets_count_each_time_at_every_bound_it_is_within() {
        let metrics = Metrics::new();
        metrics.stage(Stage::Store, Duration::from_millis(3));
        metrics.stage(Stage::Store, Duration::from_millis(1));
        metrics.grant_latency.observe(0.000_15);
        let store = metrics.stage_buckets(Stage::Store);
        assert_eq!(store.le_us.len(), store.counts.len());
        assert_eq!(&store.le_us[..3], &[25, 50, 100]);
        assert_eq!(store.le_us.last(), Some(&u64::MAX));
        let at = |b: &crate::api::TimeBuckets, le_us: u64| {
            b.le_us
                .iter()
                .position(|&le| le == le_us)
                .map(|i| b.counts[i])
        };
        assert_eq!(at(&store, 800), Some(0));
        assert_eq!(at(&store, 1_600), Some(1));
        assert_eq!(at(&store, 3_200), Some(2));
        assert_eq!(store.counts.last(), Some(&2));
        let lock = metrics.stage_buckets(Stage::Lock);
        assert!(lock.counts.iter().all(|&n| n == 0), "{lock:?}");
        let grants = metrics.grant_latency_buckets();
        assert_eq!(at(&grants, 100), Some(0));
        assert_eq!(at(&grants, 200), Some(1));
    }

    #[test]
    fn each_stage_and_outcome_is_counted_under_its_own_label() {
        let metrics = Metrics::new();
        metrics.stage(Stage::Kernel, Duration::from_millis(2));
        metrics.stage(Stage::Store, Duration::from_millis(3));
        metrics.stage(Stage::Store, Duration::from_millis(1));
        assert_eq!(metrics.stage_totals(Stage::Lock), (0, 0));
        assert_eq!(metrics.stage_totals(Stage::Kernel), (1, 2_000));
        assert_eq!(metrics.stage_totals(Stage::Store), (2, 4_000));
        metrics.request("granted");
        metrics.request("granted");
        metrics.request("released");
        let text = metrics.render();
        assert!(
            text.contains("fwnp_requests_total{outcome=\"granted\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("fwnp_requests_total{outcome=\"released\"} 1"),
            "{text}"
        );
    }
}
