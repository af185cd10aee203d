//! Starting and stopping the agent: the state directory, the host table, the link to the
//! gateway, the local socket and the core, then readiness for systemd; SIGTERM or SIGINT release
//! every lease and stop. Logging, signals and systemd's notifications are `fwnp-daemon`'s, as
//! for the gateway.

use std::sync::Arc;

use fwnp_daemon::{Signals, Status, notify};
use fwnp_trust::tls::{ClientOptions, ClientTlsFiles, client_config_from_files};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::core::Core;
use crate::link::{self, LinkSettings};
use crate::mirror::{Mirror, describe_allowed};
use crate::server;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The state directory could not be created.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The host's certificate, key or CA could not be used.
    #[error("TLS: {0}")]
    Tls(#[from] fwnp_trust::tls::TlsError),
    /// The host table could not be installed.
    #[error("host table: {0}")]
    Mirror(#[from] fwnp_netfilter::Error),
    /// The local socket could not be set up.
    #[error("local socket: {0}")]
    Socket(#[from] server::ServerError),
    /// The NAT-PMP/PCP front end's socket could not be bound.
    #[error("NAT-PMP/PCP socket: {0}")]
    Frontend(std::io::Error),
    /// A signal handler could not be installed.
    #[error(transparent)]
    Signal(#[from] fwnp_daemon::SignalError),
}

/// Raises the soft limit of open files to the hard one (systemd's default soft limit is 1024):
/// every local connection takes a descriptor, and the connection caps should be what stops
/// a flood, not the limit.
fn raise_descriptor_limit(local: &crate::config::LocalConfig) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                warn!("raising the open-file limit from {soft} to {hard}: {e}");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(e) => {
            warn!("reading the open-file limit: {e}");
            return;
        }
    };
    // Each connection holds its socket and its caller's pidfd; the gateway link, the netlink
    // socket, the listener and /proc reads need some too.
    let needed = 2 * local.max_connections as u64 + 64;
    if soft < needed {
        warn!(
            limit = soft,
            max_connections = local.max_connections,
            "the open-file limit is below max_connections: connections past it fail at accept"
        );
    } else {
        info!(limit = soft, "open-file limit");
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(mut config: AgentConfig) -> Result<(), DaemonError> {
    config.mirror.redirects =
        crate::frontend::redirects(&config.frontends, std::path::Path::new("/proc"));
    // The NAT-PMP and PCP announcements are sent in the names of the gateways the host's
    // requests are redirected from.
    let announcing: Vec<std::net::IpAddr> = config.mirror.redirects.iter().map(|r| r.to).collect();
    config
        .mirror
        .always_allowed
        .extend(crate::frontend::service::admitted_announcements(
            &announcing,
        ));
    if config.frontends.upnp {
        let mut own: Vec<std::net::IpAddr> = crate::frontend::service::local_ipv4()
            .map(std::net::IpAddr::V4)
            .into_iter()
            .collect();
        own.extend(crate::frontend::upnp::ipv6_addresses(
            &std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default(),
        ));
        let admitted = crate::frontend::upnp::admitted(&own);
        config.mirror.always_allowed.extend(admitted);
    }
    let config = Arc::new(config);
    crate::state::prepare(&config.state_dir).map_err(|source| DaemonError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    if let Some(last) = crate::state::load(&config.state_dir) {
        info!(
            epoch = format_args!("{:016x}", last.epoch),
            identity = %last.identity,
            "last run's gateway"
        );
    }
    let client_options = ClientOptions::default();
    let client_config = client_config_from_files(
        &ClientTlsFiles {
            cert: config.gateway.certificate.clone(),
            key: config.gateway.key.clone(),
            ca: config.gateway.ca.clone(),
        },
        &client_options,
    )?;
    let mirror = Mirror::start(&config.mirror).await?;
    info!(
        mode = config.mirror.mode.name(),
        table = %config.mirror.table,
        always_allowed = ?describe_allowed(&config.mirror.always_allowed),
        "mirror ready"
    );
    raise_descriptor_limit(&config.local);
    let listener = server::bind(&config.local)?;

    let (tx, rx) = mpsc::unbounded_channel();
    let core = Core::new(config.clone(), mirror, tx.clone());
    let earliest_expiry = core.earliest_expiry();
    let core_task = tokio::spawn(core.run(rx));
    tokio::spawn(link::run(
        LinkSettings {
            gateways: config.gateway.gateways.clone(),
            client_config,
            client_options,
        },
        tx.clone(),
        earliest_expiry,
    ));
    tokio::spawn(server::serve(listener, config.local.clone(), tx.clone()));
    let seam = crate::frontend::Seam::new(tx.clone(), config.local.clone());
    if config.frontends.upnp {
        let seam = seam.clone();
        let port = config.frontends.upnp_port;
        tokio::spawn(async move {
            if let Err(e) = crate::frontend::upnp::serve(seam, port).await {
                warn!("UPnP IGD front end: {e}");
            }
        });
    }
    if config.frontends.natpmp || config.frontends.pcp {
        let sockets = crate::frontend::service::bind(&config.frontends)
            .await
            .map_err(DaemonError::Frontend)?;
        info!(redirects = ?config.mirror.redirects, "front ends: redirected from");
        tokio::spawn(crate::frontend::service::serve(
            sockets,
            seam,
            config.frontends.clone(),
            announcing,
        ));
    } else if config.frontends.upnp {
        tokio::spawn(seam.sweep());
    }

    // The handlers first: a TERM sent as soon as systemd hears READY must stop the agent
    // through its shutdown (leases released, socket removed), not kill it.
    let mut signals = Signals::stop()?;
    notify(Status::Ready);
    info!(socket = %config.local.socket.display(), gateway = %config.gateway.gateways.describe(), "ready");

    signals.next().await;
    notify(Status::Stopping);
    let (done, stopped) = oneshot::channel();
    if tx.send(crate::core::CoreInput::Shutdown(done)).is_ok() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stopped).await;
    }
    drop(tx);
    if let Err(e) = std::fs::remove_file(&config.local.socket) {
        warn!("removing the socket: {e}");
    }
    core_task.abort();
    info!("stopped");
    Ok(())
}
