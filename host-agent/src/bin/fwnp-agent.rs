//! `fwnp-agent --config PATH`: the FWNP host agent, in the foreground, with structured logs on
//! standard error. SIGTERM and SIGINT release every lease and stop it.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The FWNP host agent: asks the gateway for the openings local applications need, renews them
/// while the applications hold them, and mirrors them into the host's own firewall table.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The configuration file (see host-agent/examples/agent.toml).
    #[arg(long, short, default_value = "/etc/fwnp/agent.toml")]
    config: PathBuf,
    /// Check the configuration, then exit.
    #[arg(long)]
    check: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    fwnp_daemon::main(
        &fwnp_daemon::StartOptions {
            name: "fwnp-agent",
            config: &args.config,
            check: args.check,
            log_json: args.log_json,
        },
        fwnp_agent::config::AgentConfig::load,
        |_| Ok::<_, fwnp_agent::daemon::DaemonError>("configuration is valid"),
        fwnp_agent::daemon::run,
    )
}
