//! `fwnp-baseline --config PATH`: the ceiling FWNP is measured against. A bare QUIC server with
//! the gateway's own TLS server configuration, transport settings and endpoint configuration,
//! built by the gateway's functions from a gateway configuration file, that answers every
//! request stream with a fixed answer the size of a Granted: no policy, no kernel, no store, no
//! audit. The first stream of each connection (the host's Hello) is answered with a fixed
//! Welcome instead, so that a host talks to it exactly as to the gateway.
//!
//! `fwnp-load --baseline` starts it beside the gateway and alternates between the two; what the
//! gateway does beyond moving bytes over QUIC is the difference between their figures.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use fwnp_gateway::config::GatewayConfig;
use fwnp_gateway::daemon::ResetSecret;
use fwnp_proto::codec::encode;
use fwnp_proto::{
    Capabilities, Common, Grant, Granted, LeaseId, Limits, Message, PortRange, Protocol, Welcome,
};

// The gateway's allocator, so that the two differ only in what they do per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A bare QUIC server with the gateway's TLS and transport settings, answering every request
/// with a fixed Granted.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// A gateway configuration file: its listen addresses, certificate, key, CA, CRL, limits
    /// and state directory (for the endpoint's reset secret) are used, nothing else.
    #[arg(long, short)]
    config: PathBuf,
}

/// The fixed answers, encoded once.
struct Answers {
    welcome: Bytes,
    granted: Bytes,
}

impl Answers {
    /// A Welcome and a Granted as large as the gateway's answers to fwnp-load's Hello and
    /// single-port Open: every key present, numbers as wide as the gateway's (a 64-bit request
    /// id, a millisecond timestamp, a random epoch).
    fn new(config: &GatewayConfig) -> Self {
        let common = Common {
            request_id: Some(u64::MAX - 1),
            critical: Vec::new(),
        };
        let epoch = u64::MAX - 2;
        let now_ms = 1_800_000_000_000;
        let host = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1));
        let welcome = Message::Welcome(Welcome {
            common: Common::default(),
            version: fwnp_proto::VERSION,
            capabilities: Capabilities(Capabilities::ALL),
            limits: Limits {
                max_message_size: fwnp_proto::MAX_MESSAGE_SIZE as u32,
                max_streams: config.limits.max_streams,
                min_lifetime: 10,
                max_lifetime: 7200,
                max_leases: Some(100_000),
            },
            epoch,
            time_ms: now_ms,
            identity: "fwnp://host/load-0".into(),
            addresses: vec![host],
        });
        let granted = Message::Granted(Granted {
            common,
            lease: LeaseId([0xa5; 16]),
            grants: vec![Grant {
                protocol: Protocol::Tcp,
                ports: PortRange::single(40_000),
                host,
                remotes: Vec::new(),
                app: None,
            }],
            lifetime: 3600,
            expires_ms: now_ms + 3_600_000,
            renew_after: 2400,
            epoch,
            narrowed: false,
        });
        Answers {
            welcome: Bytes::from(encode(&welcome)),
            granted: Bytes::from(encode(&granted)),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match GatewayConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fwnp-baseline: {e}");
            return ExitCode::from(2);
        }
    };
    // The gateway's runtime: tokio's default multi-threaded one.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fwnp-baseline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fwnp-baseline: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: GatewayConfig) -> Result<(), Box<dyn std::error::Error>> {
    let tls =
        fwnp_trust::tls::server_config_from_files(&config.tls_files(), &config.server_options())?;
    std::fs::create_dir_all(&config.state_dir)?;
    let secret = ResetSecret::load_or_create(&config.state_dir)?;
    let answers = Arc::new(Answers::new(&config));
    let mut servers = Vec::new();
    for addr in &config.listen {
        let socket = std::net::UdpSocket::bind(addr)?;
        let endpoint = quinn::Endpoint::new(
            secret.endpoint_config(),
            Some(tls.clone()),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        servers.push(tokio::spawn(serve(endpoint, answers.clone())));
    }
    for server in servers {
        server.await?;
    }
    Ok(())
}

async fn serve(endpoint: quinn::Endpoint, answers: Arc<Answers>) {
    while let Some(incoming) = endpoint.accept().await {
        let answers = answers.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            let mut first = true;
            // One task per stream, as the gateway does.
            while let Ok((send, recv)) = connection.accept_bi().await {
                let answer = if std::mem::take(&mut first) {
                    answers.welcome.clone()
                } else {
                    answers.granted.clone()
                };
                tokio::spawn(answer_stream(send, recv, answer));
            }
        });
    }
}

async fn answer_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, answer: Bytes) {
    if recv
        .read_to_end(fwnp_proto::MAX_MESSAGE_SIZE)
        .await
        .is_err()
    {
        return;
    }
    if send.write_chunk(answer).await.is_ok() {
        let _ = send.finish();
    }
}
