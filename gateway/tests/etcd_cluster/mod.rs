//! The testkit's etcd cluster ([`fwnp_testkit::etcd`]) as the gateway's tests use it: the
//! store configuration of a gateway inside the cluster's namespace.

#![allow(dead_code, unused_imports)]

use std::time::Duration;

use fwnp_gateway::config::EtcdConfig;
pub(crate) use fwnp_testkit::etcd::{EtcdCluster, EtcdOptions, MemberTls, available};

/// A gateway's store configuration on a testkit cluster.
pub(crate) trait StoreConfig {
    /// A store configuration for a gateway named `site`, with `timeout` per request.
    fn config(&self, site: &str, timeout: Duration) -> EtcdConfig;
}

impl StoreConfig for EtcdCluster {
    fn config(&self, site: &str, timeout: Duration) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.endpoints(),
            prefix: "/fwnp-test".into(),
            site: site.into(),
            timeout,
            tls: None,
        }
    }
}

/// Runs `body` on the runtime `runtime` builds, in the namespace of a one-member cluster
/// started for `test` (named after `short`), or skips `test` where etcd cannot run: for a test
/// that loses no member of etcd (those that do start three themselves). The runtime is built inside the namespace, so that its threads' sockets are there.
pub(crate) fn in_cluster(
    test: &str,
    short: &str,
    runtime: fn() -> tokio::runtime::Runtime,
    body: impl AsyncFnOnce(&EtcdCluster) + Send,
) {
    if !available(test) {
        return;
    }
    let cluster = EtcdCluster::single(short).unwrap_or_else(|e| panic!("{e}"));
    cluster.run(|| runtime().block_on(body(&cluster)));
}

/// A runtime of two workers, as a gateway's machine of two cores runs it.
pub(crate) fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The cluster's published policy under the tests' prefix (`/fwnp-test/policy`), with how many
/// times its key was written; `None` when none is published.
pub(crate) async fn published_policy(
    endpoints: &[String],
) -> Option<(fwnp_gateway::cluster::policy::StoredPolicy, i64)> {
    let mut client = etcd_client::Client::connect(endpoints, None)
        .await
        .expect("etcd client");
    let answer = client
        .get("/fwnp-test/policy", None)
        .await
        .expect("read the policy");
    let kv = answer.kvs().first()?;
    let stored = fwnp_gateway::cluster::policy::decode(kv.value()).expect("a published policy");
    Some((stored, kv.version()))
}
