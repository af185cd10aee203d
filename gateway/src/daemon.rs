//! Starting and stopping the gateway: the kernel filter, the store and policy (through
//! [`Service::start`]), the QUIC endpoints, the admin socket, metrics, and what SIGHUP reloads;
//! logging, signals and systemd's notifications are `fwnp-daemon`'s, as for the agent.

use std::sync::Arc;
use std::time::Duration;

use fwnp_daemon::{Request, Signals, Status, notify};
use fwnp_netfilter::{Batcher, BatcherConfig, GatewayLayout, Layout, Netfilter, Refuse};
use tracing::{error, info, warn};

use crate::config::GatewayConfig;
use crate::policy::Policy;
use crate::service::Service;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The policy file is unusable.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// The TLS files are unusable.
    #[error("tls: {0}")]
    Tls(#[from] fwnp_trust::tls::TlsError),
    /// The service could not start.
    #[error(transparent)]
    Start(#[from] crate::service::StartError),
    /// The kernel filter could not be set up.
    #[error("filter: {0}")]
    Filter(#[from] fwnp_netfilter::Error),
    /// The stateless-reset secret could not be read or created.
    #[error("reset secret: {0}")]
    ResetSecret(#[from] ResetSecretError),
    /// A signal handler could not be installed.
    #[error(transparent)]
    Signal(#[from] fwnp_daemon::SignalError),
    /// A socket could not be bound.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Checks what a start would read: the policy and the TLS files.
pub fn check(config: &GatewayConfig) -> Result<(), DaemonError> {
    Policy::load(&config.policy)?;
    fwnp_trust::tls::server_config_from_files(&config.tls_files(), &config.server_options())?;
    Ok(())
}

/// The gateway's nftables layout from its configuration.
pub fn layout(config: &GatewayConfig) -> Layout {
    Layout::Gateway(GatewayLayout {
        table: config.filter.table.clone(),
        protected: config.filter.protected.clone(),
        inbound_interfaces: config.filter.inbound_interfaces.clone(),
        refuse: if config.filter.reject {
            Refuse::Reject
        } else {
            Refuse::Drop
        },
    })
}

/// Runs the gateway until SIGTERM or SIGINT.
pub async fn run(config: GatewayConfig) -> Result<(), DaemonError> {
    let tls =
        fwnp_trust::tls::server_config_from_files(&config.tls_files(), &config.server_options())?;
    let filter = if config.filter.enabled {
        let layout = layout(&config);
        let mut netfilter = Netfilter::open()?;
        // The table is created empty here; the service's start puts the restored leases back
        // in one reconcile.
        if !netfilter.table_present(&layout)? {
            netfilter.apply(&layout, &[])?;
        }
        Some(Batcher::start(netfilter, layout, BatcherConfig::default())?)
    } else {
        warn!("the filter is disabled: grants are not enforced by this gateway");
        None
    };
    if let Some(filter) = &filter {
        let mut repairs = filter.repairs();
        tokio::spawn(async move {
            while let Ok(event) = repairs.recv().await {
                warn!(
                    "the kernel table was changed by someone else and has been repaired: {event:?}"
                );
            }
        });
    }
    let service = Service::start(config.clone(), filter).await?;

    let secret = ResetSecret::load_or_create(&config.state_dir)?;
    let mut endpoints = Vec::new();
    for addr in &config.listen {
        let socket = std::net::UdpSocket::bind(addr).map_err(|source| DaemonError::Io {
            what: format!("listen on {addr}"),
            source,
        })?;
        let endpoint = quinn::Endpoint::new(
            secret.endpoint_config(),
            Some(tls.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| DaemonError::Io {
            what: format!("listen on {addr}"),
            source,
        })?;
        info!(%addr, "listening (QUIC, ALPN fwnp/1)");
        tokio::spawn(crate::server::serve(endpoint.clone(), service.clone()));
        service.add_endpoint(endpoint.clone());
        endpoints.push(endpoint);
    }
    let admin_path = config.admin_socket.clone();
    {
        let service = service.clone();
        let path = admin_path.clone();
        // Bind before announcing readiness so fwnpctl works as soon as systemd says it does.
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DaemonError::Io {
                what: format!("create {}", dir.display()),
                source,
            })?;
        }
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(&path, service).await {
                error!("admin socket {}: {e}", path.display());
            }
        });
    }
    if let Some(addr) = config.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Io {
                what: format!("metrics on {addr}"),
                source,
            })?;
        let service = service.clone();
        tokio::spawn(async move {
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let service = service.clone();
                    async move { service.render_metrics() }
                }),
            );
            if let Err(e) = axum::serve(listener, app).await {
                error!("metrics: {e}");
            }
        });
    }
    tokio::spawn(service.clone().run_expiry());
    tokio::spawn(housekeeping(service.clone()));

    // The handlers are in place before systemd hears it is ready: a SIGHUP sent as soon as it
    // is (a reload right after a start) would otherwise end the process, its default action.
    let mut signals = Signals::stop_and_reload()?;
    notify(Status::Ready);
    info!(epoch = format_args!("{:016x}", service.epoch()), "ready");

    while signals.next().await == Request::Reload {
        notify(Status::Reloading);
        // A rotation that sends SIGHUP need not wait for the audit file's path check.
        service.reopen_audit_export();
        match service.reload_policy().await {
            Ok(result) => info!(
                "SIGHUP: {}",
                serde_json::to_value(&result).unwrap_or_default()
            ),
            Err(e) => error!("SIGHUP: {}", e.message),
        }
        if let Err(e) = service.reload_tls().await {
            error!("SIGHUP: {e}");
        }
        notify(Status::Ready);
    }
    notify(Status::Stopping);
    info!(
        "stopping: leases stay in the kernel until they expire and are restored at the next start"
    );
    service.going_away(5).await;
    if let Some(cluster) = service.cluster() {
        // The other members list this one as absent at once, not when its etcd lease runs out.
        cluster.withdraw().await;
    }
    for endpoint in &endpoints {
        endpoint.close(
            quinn::VarInt::from_u32(fwnp_proto::QuicErrorCode::GoingAway.code()),
            b"stopping",
        );
    }
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

/// The file of the state directory that holds the stateless-reset secret.
pub const RESET_SECRET_FILE: &str = "reset-secret";

/// Why the stateless-reset secret is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResetSecretError {
    /// The file could not be read, written or created.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file does not hold exactly the secret's 32 bytes.
    #[error("{path}: holds {len} bytes, not {expected}")]
    Length {
        /// The file.
        path: std::path::PathBuf,
        /// Its length.
        len: u64,
        /// The length of a secret.
        expected: usize,
    },
    /// Users other than the gateway's own may read or write the file.
    #[error("{path}: mode {mode:o} lets other users read or change it (0600 expected)")]
    Permissions {
        /// The file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The system's random generator failed.
    #[error("no random bytes for a new secret")]
    Random,
}

/// The secret from which the gateway derives its QUIC stateless-reset tokens and the keys of its
/// connection ids. It lives in the state directory (created 0600 at the first start) so that a
/// restarted gateway recognizes the connection ids of its previous run and answers their packets
/// with a stateless reset that the hosts accept: a host learns at its next packet that its
/// connection is gone and reconnects at once, instead of waiting for its idle timeout.
#[derive(Clone)]
pub struct ResetSecret([u8; ResetSecret::LEN]);

impl std::fmt::Debug for ResetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetSecret(..)")
    }
}

impl ResetSecret {
    /// The secret's length in bytes.
    pub const LEN: usize = 32;

    /// Reads the secret of `state_dir`, or creates it (atomically, mode 0600) if there is none.
    pub fn load_or_create(state_dir: &std::path::Path) -> Result<Self, ResetSecretError> {
        use std::io::Write;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let path = state_dir.join(RESET_SECRET_FILE);
        let io = |path: &std::path::Path| {
            let path = path.to_owned();
            move |source| ResetSecretError::Io { path, source }
        };
        std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        if !path.exists() {
            let mut secret = [0u8; Self::LEN];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| ResetSecretError::Random)?;
            // Written aside and linked into place, so that a concurrent start never reads a
            // partly written secret, and the first of two starts wins.
            let staging = state_dir.join(format!("{RESET_SECRET_FILE}.{}", std::process::id()));
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&staging)
                .and_then(|mut file| {
                    file.write_all(&secret)?;
                    file.sync_all()
                });
            let linked = written.and_then(|()| match std::fs::hard_link(&staging, &path) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                _ => Ok(()),
            });
            let _ = std::fs::remove_file(&staging);
            linked.map_err(io(&path))?;
        }
        let metadata = std::fs::metadata(&path).map_err(io(&path))?;
        if metadata.mode() & 0o077 != 0 {
            return Err(ResetSecretError::Permissions {
                path,
                mode: metadata.mode() & 0o7777,
            });
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let secret = <[u8; Self::LEN]>::try_from(bytes.as_slice()).map_err(|_| {
            ResetSecretError::Length {
                path: path.clone(),
                len: metadata.len(),
                expected: Self::LEN,
            }
        })?;
        Ok(ResetSecret(secret))
    }

    /// The endpoint configuration of every listening endpoint: stateless-reset tokens keyed by
    /// the secret, and connection ids a later run recognizes as its own (quinn sends a reset
    /// only for a connection id its generator accepts).
    pub fn endpoint_config(&self) -> quinn::EndpointConfig {
        let reset = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &self.derive(b"fwnp/1 stateless reset"),
        );
        let ids = self.derive(b"fwnp/1 connection ids");
        let mut id_key = [0u8; 8];
        id_key.copy_from_slice(&ids[..8]);
        let id_key = u64::from_le_bytes(id_key);
        let mut config = quinn::EndpointConfig::new(Arc::new(reset));
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(id_key))
        });
        config
    }

    /// An independent key for `purpose`.
    fn derive(&self, purpose: &[u8]) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::hmac::sign(&key, purpose).as_ref());
        out
    }
}

/// Periodic work: audit retention.
async fn housekeeping(service: Arc<Service>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let retention =
            u64::try_from(service.config.store.audit_retention.as_millis()).unwrap_or(u64::MAX);
        let before = crate::store::now_ms().saturating_sub(retention);
        match service.store().prune(before, 10_000).await {
            Ok((audit, leases)) if audit + leases > 0 => {
                info!(audit, leases, "old records pruned");
            }
            Ok(_) => {}
            Err(e) => warn!("pruning old records failed: {e}"),
        }
    }
}
