//! The testkit's etcd cluster ([`fwnp_testkit::etcd`]) as the gateway's tests use it: the
//! store configuration of a gateway inside the cluster's namespace.

#![allow(dead_code, unused_imports)]

use std::time::Duration;

use fwnp_gateway::config::EtcdConfig;
pub(crate) use fwnp_testkit::etcd::{EtcdCluster, MemberTls, available};

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
