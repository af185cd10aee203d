//! Prometheus metrics of the gateway, served as text on the configured address.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

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
    /// Changes per kernel batch.
    pub batch_size: Histogram,
    /// Time per kernel batch.
    pub batch_latency: Histogram,
    /// Open QUIC connections.
    pub connections: IntGauge,
    /// Lease endings, by how they ended.
    pub lease_ends: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("fwnp".to_owned()), None)
            .expect("a constant, valid prefix");
        // The names and help texts below are constants; registration can only fail on a
        // duplicate name, which the constants rule out.
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Requests answered, by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let live_leases =
            IntGauge::new("live_leases", "Leases alive now").expect("valid metric");
        let grant_latency = Histogram::with_opts(
            HistogramOpts::new("grant_latency_seconds", "From request to Granted answer")
                .buckets(prometheus::exponential_buckets(0.000_1, 2.0, 16).expect("valid")),
        )
        .expect("valid metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("kernel_batch_size", "Element changes per netlink transaction")
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 14).expect("valid")),
        )
        .expect("valid metric");
        let batch_latency = Histogram::with_opts(
            HistogramOpts::new("kernel_batch_seconds", "Time per netlink transaction")
                .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 16).expect("valid")),
        )
        .expect("valid metric");
        let connections =
            IntGauge::new("connections", "Open QUIC connections").expect("valid metric");
        let lease_ends = IntCounterVec::new(
            Opts::new("lease_ends_total", "Leases ended, by how"),
            &["how"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(live_leases.clone()),
            Box::new(grant_latency.clone()),
            Box::new(batch_size.clone()),
            Box::new(batch_latency.clone()),
            Box::new(connections.clone()),
            Box::new(lease_ends.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        Metrics {
            registry,
            requests,
            live_leases,
            grant_latency,
            batch_size,
            batch_latency,
            connections,
            lease_ends,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, outcome: &str) {
        self.requests.with_label_values(&[outcome]).inc();
    }

    /// The metrics in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buffer).is_err() {
            return String::new();
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
