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
    fwnp_agent::daemon::init_logging(args.log_json);
    let config = match fwnp_agent::config::AgentConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fwnp-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: configuration is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fwnp-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fwnp_agent::daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fwnp-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
