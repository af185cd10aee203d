//! Starting and stopping the gateway: logging, the kernel filter, the store and policy (through
//! [`Service::start`]), the QUIC endpoints, the admin socket, metrics, signals, and systemd's
//! readiness notification.

use std::sync::Arc;
use std::time::Duration;

use fwnp_netfilter::{Batcher, BatcherConfig, GatewayLayout, Layout, Netfilter, Refuse};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::GatewayConfig;
use crate::policy::Policy;
use crate::service::Service;
use crate::tls::{ServerOptions, ServerTlsFiles};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The policy file is unusable.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// The TLS files are unusable.
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The service could not start.
    #[error(transparent)]
    Start(#[from] crate::service::StartError),
    /// The kernel filter could not be set up.
    #[error("filter: {0}")]
    Filter(#[from] fwnp_netfilter::Error),
    /// A socket could not be bound.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Text logs on standard error (or JSON lines), filtered by `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Checks what a start would read: the policy and the TLS files.
pub fn check(config: &GatewayConfig) -> Result<(), DaemonError> {
    Policy::load(&config.policy)?;
    crate::tls::server_config_from_files(&tls_files(config), &server_options(config))?;
    Ok(())
}

/// The TLS files named by the configuration.
pub fn tls_files(config: &GatewayConfig) -> ServerTlsFiles {
    ServerTlsFiles {
        cert: config.certificate.clone(),
        key: config.key.clone(),
        ca: config.ca.clone(),
        crl: config.crl.clone(),
    }
}

/// The TLS and transport options the gateway serves with.
pub fn server_options(config: &GatewayConfig) -> ServerOptions {
    ServerOptions {
        max_concurrent_bidi_streams: config.limits.max_streams,
        // One is allowed so that a client that opens one is told precisely what it did wrong
        // (ProtocolViolation) instead of a bare transport-level stream-limit error.
        max_concurrent_uni_streams_from_client: 1,
        ..ServerOptions::default()
    }
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
    let tls = crate::tls::server_config_from_files(&tls_files(&config), &server_options(&config))?;
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

    let mut endpoints = Vec::new();
    for addr in &config.listen {
        let endpoint =
            quinn::Endpoint::server(tls.clone(), *addr).map_err(|source| DaemonError::Io {
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

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(epoch = format_args!("{:016x}", service.epoch()), "ready");

    let mut hangup = signal(SignalKind::hangup()).map_err(|source| DaemonError::Io {
        what: "SIGHUP handler".into(),
        source,
    })?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|source| DaemonError::Io {
        what: "SIGTERM handler".into(),
        source,
    })?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Io {
        what: "SIGINT handler".into(),
        source,
    })?;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                match service.reload_policy().await {
                    Ok(result) => info!("SIGHUP: {result}"),
                    Err(e) => error!("SIGHUP: {}", e.message),
                }
                if let Err(e) = service.reload_tls().await {
                    error!("SIGHUP: {e}");
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    info!(
        "stopping: leases stay in the kernel until they expire and are restored at the next start"
    );
    service.going_away(5).await;
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

/// Periodic work: audit retention.
async fn housekeeping(service: Arc<Service>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let retention =
            u64::try_from(service.config.store.audit_retention.as_millis()).unwrap_or(u64::MAX);
        let before = crate::store::now_ms().saturating_sub(retention);
        match service.store().writer().prune(before, 10_000).await {
            Ok((audit, leases)) if audit + leases > 0 => {
                info!(audit, leases, "old records pruned");
            }
            Ok(_) => {}
            Err(e) => warn!("pruning old records failed: {e}"),
        }
    }
}
