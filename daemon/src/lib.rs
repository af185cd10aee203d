//! What the two FWNP daemons, `fwnp-gateway` and `fwnp-agent`, do alike around their own work:
//! the start-up skeleton of their `main` ([`main`]: logging, the configuration file, `--check`,
//! the runtime, exit codes), logging with colour only at a terminal ([`init_logging`]), the
//! signals they obey ([`Signals`]), what they tell systemd ([`notify`]), and reading a
//! configuration file with errors by line and reason ([`config`]).
//!
//! Neither daemon may depend on the other, so what both repeat lives here, and nothing else
//! does: the protocol's rules are in `fwnp-proto`, certificates and TLS in `fwnp-trust`.
#![forbid(unsafe_code)]

pub mod config;

use std::fmt::Display;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The exit code of a configuration that cannot be used (as `--check` and a start report it).
pub const EXIT_CONFIG: u8 = 2;

/// What a daemon's command line says, besides what only that daemon has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartOptions<'a> {
    /// The program's name, which begins every error it prints.
    pub name: &'static str,
    /// The configuration file.
    pub config: &'a Path,
    /// Check the configuration (and what `check` reads), then exit.
    pub check: bool,
    /// Log as JSON lines instead of text.
    pub log_json: bool,
}

/// A daemon's `main`: logging set up, the configuration loaded (exit 2 if unusable); with
/// `--check`, `check` run and its verdict printed (exit 0, or 2 on error); else `run` on a
/// multi-threaded runtime until it returns (exit 0, or 1 with the error on standard error).
///
/// ```no_run
/// use std::path::Path;
/// use std::process::ExitCode;
/// use fwnp_daemon::{StartOptions, config::ConfigError};
///
/// fn load(path: &Path) -> Result<String, ConfigError> {
///     std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })
/// }
///
/// fn main() -> ExitCode {
///     let options = StartOptions {
///         name: "example-daemon",
///         config: Path::new("/etc/example.toml"),
///         check: false,
///         log_json: false,
///     };
///     fwnp_daemon::main(
///         &options,
///         load,
///         |_| Ok::<_, std::io::Error>("configuration is valid"),
///         |_config| async { Ok::<(), std::io::Error>(()) },
///     )
/// }
/// ```
pub fn main<C, E, F>(
    options: &StartOptions<'_>,
    load: impl FnOnce(&Path) -> Result<C, config::ConfigError>,
    check: impl FnOnce(&C) -> Result<&'static str, E>,
    run: impl FnOnce(C) -> F,
) -> ExitCode
where
    E: Display,
    F: Future<Output = Result<(), E>>,
{
    let name = options.name;
    init_logging(options.log_json);
    let config = match load(options.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if options.check {
        return match check(&config) {
            Ok(verdict) => {
                println!("{}: {verdict}", options.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Text logs on standard error (or JSON lines), filtered by `RUST_LOG` (default `info`). Colour
/// only for a person at a terminal: a file, a pipe or the journal gets plain text. A second
/// call changes nothing.
///
/// ```
/// fwnp_daemon::init_logging(false);
/// tracing::info!("logged on standard error");
/// ```
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGHUP: read the files that can change while running again.
    Reload,
    /// SIGTERM or SIGINT: stop.
    Stop,
}

/// Why the signal handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot handle {signal}: {source}")]
pub struct SignalError {
    /// The signal's name.
    pub signal: &'static str,
    /// The operating system's error.
    pub source: std::io::Error,
}

/// The signals a daemon obeys: SIGTERM and SIGINT stop it, and SIGHUP, where it can reload,
/// reloads it. A daemon that cannot reload leaves SIGHUP alone (its default action ends it).
#[derive(Debug)]
pub struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Option<Signal>,
}

impl Signals {
    /// Handles SIGTERM and SIGINT (inside a tokio runtime).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), fwnp_daemon::SignalError> {
    /// let mut signals = fwnp_daemon::Signals::stop()?;
    /// signals.next().await; // always Request::Stop
    /// # Ok(()) }
    /// ```
    pub fn stop() -> Result<Self, SignalError> {
        Ok(Signals {
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            hangup: None,
        })
    }

    /// Handles SIGTERM and SIGINT, and SIGHUP as a reload (inside a tokio runtime).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), fwnp_daemon::SignalError> {
    /// let mut signals = fwnp_daemon::Signals::stop_and_reload()?;
    /// while signals.next().await == fwnp_daemon::Request::Reload {
    ///     // read the files again
    /// }
    /// # Ok(()) }
    /// ```
    pub fn stop_and_reload() -> Result<Self, SignalError> {
        let mut signals = Self::stop()?;
        signals.hangup = Some(install(SignalKind::hangup(), "SIGHUP")?);
        Ok(signals)
    }

    /// The next request a signal makes.
    pub async fn next(&mut self) -> Request {
        let hangup = async {
            match &mut self.hangup {
                Some(hangup) => hangup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.terminate.recv() => Request::Stop,
            _ = self.interrupt.recv() => Request::Stop,
            _ = hangup => Request::Reload,
        }
    }
}

fn install(kind: SignalKind, name: &'static str) -> Result<Signal, SignalError> {
    signal(kind).map_err(|source| SignalError {
        signal: name,
        source,
    })
}

/// What the daemon tells its service manager (systemd's `Type=notify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It serves (`READY=1`), at start and after a reload.
    Ready,
    /// It is reloading (`RELOADING=1`).
    Reloading,
    /// It is stopping (`STOPPING=1`).
    Stopping,
}

/// Tells systemd the daemon's status, when it runs under systemd (`NOTIFY_SOCKET` set); without
/// it, or if the message cannot be sent, nothing happens: the daemon works the same.
///
/// ```
/// fwnp_daemon::notify(fwnp_daemon::Status::Ready);
/// ```
pub fn notify(status: Status) {
    let state = match status {
        Status::Ready => sd_notify::NotifyState::Ready,
        Status::Reloading => sd_notify::NotifyState::Reloading,
        Status::Stopping => sd_notify::NotifyState::Stopping,
    };
    let _ = sd_notify::notify(false, &[state]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{Signal as Sig, raise};
    use std::time::Duration;

    // One test raises every signal, so that no other test of this binary can be running when a
    // signal arrives (the handlers stay installed for the life of the process).
    #[tokio::test]
    async fn signals_are_read_as_requests() {
        let mut signals = Signals::stop_and_reload().expect("handlers");
        for (signal, request) in [
            (Sig::SIGHUP, Request::Reload),
            (Sig::SIGTERM, Request::Stop),
            (Sig::SIGHUP, Request::Reload),
            (Sig::SIGINT, Request::Stop),
        ] {
            raise(signal).expect("raise");
            let got = tokio::time::timeout(Duration::from_secs(5), signals.next())
                .await
                .expect("the signal was seen");
            assert_eq!(got, request, "{signal}");
        }
        let mut stop_only = Signals::stop().expect("handlers");
        raise(Sig::SIGTERM).expect("raise");
        let got = tokio::time::timeout(Duration::from_secs(5), stop_only.next())
            .await
            .expect("the signal was seen");
        assert_eq!(got, Request::Stop);
    }
}
