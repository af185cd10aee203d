//! The workspace's binaries, for tests that run them as a deployment would while belonging to
//! another package (Cargo builds only a test's own package's binaries for it).

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Why the binaries cannot be found or built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BinariesError {
    /// A binary is not in the target directory.
    #[error("{name} not found at {path}: build it first with `{build}`")]
    MissingBinary {
        /// The binary's name.
        name: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The command that builds it.
        build: String,
    },
    /// The running executable cannot be located.
    #[error("locating the running executable: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// The running executable is not inside a cargo target directory.
    #[error("cannot tell the target directory from the running executable {0}")]
    NoTargetDir(PathBuf),
    /// `cargo build` could not be run.
    #[error("running {command}: {source}")]
    Run {
        /// The command.
        command: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `cargo build` of the binaries failed.
    #[error("`{command}` failed ({status})")]
    Build {
        /// The command run.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
}

/// The paths of the four binaries a deployment runs, as the lab, the end-to-end tests and the
/// agent's tests start them.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `fwnp-gateway`.
    pub gateway: PathBuf,
    /// `fwnpctl`.
    pub fwnpctl: PathBuf,
    /// `fwnp-agent`.
    pub agent: PathBuf,
    /// `fwnp`, the command-line client of the agent.
    pub fwnp: PathBuf,
}

/// The `cargo build` that makes every binary of a deployment.
pub const BUILD_COMMAND: &str =
    "cargo build --bins -p fwnp-gateway -p fwnp-agent -p fwnp-sdk --features fwnp-sdk/cli";

impl Binaries {
    /// The directory of the binaries of the running executable's profile: `target/debug` for
    /// `target/debug/fwnp-lab` and for a test at `target/debug/deps/e2e-HASH`.
    pub fn profile_dir() -> Result<PathBuf, BinariesError> {
        let exe = std::env::current_exe().map_err(BinariesError::CurrentExe)?;
        let dir = exe
            .parent()
            .ok_or_else(|| BinariesError::NoTargetDir(exe.clone()))?;
        let dir = if dir.file_name().is_some_and(|name| name == "deps") {
            dir.parent()
                .ok_or_else(|| BinariesError::NoTargetDir(exe.clone()))?
        } else {
            dir
        };
        Ok(dir.to_path_buf())
    }

    /// Finds the binaries beside the running executable; names the missing one and the command
    /// that builds it.
    pub fn locate() -> Result<Self, BinariesError> {
        let dir = Self::profile_dir()?;
        let find = |name: &'static str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(BinariesError::MissingBinary {
                    name,
                    path,
                    build: BUILD_COMMAND.to_string(),
                })
            }
        };
        Ok(Binaries {
            gateway: find("fwnp-gateway")?,
            fwnpctl: find("fwnpctl")?,
            agent: find("fwnp-agent")?,
            fwnp: find("fwnp")?,
        })
    }

    /// Runs `cargo build` for the binaries into the running executable's target directory and
    /// profile (cargo does nothing when they are up to date), then locates them. The cargo binary
    /// is `$CARGO` (set by cargo for what it runs), else `cargo`.
    pub fn build() -> Result<Self, BinariesError> {
        let dir = Self::profile_dir()?;
        let profile = dir
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| BinariesError::NoTargetDir(dir.clone()))?
            .to_string();
        let target = dir
            .parent()
            .ok_or_else(|| BinariesError::NoTargetDir(dir.clone()))?;
        let cargo = std::env::var_os("CARGO")
            .or_else(|| option_env!("CARGO").map(Into::into))
            .unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(&cargo);
        command
            .args(["build", "--bins", "-p", "fwnp-gateway", "-p", "fwnp-agent"])
            .args([
                "-p",
                "fwnp-sdk",
                "--features",
                "fwnp-sdk/cli",
                "--target-dir",
            ])
            .arg(target)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile.as_str() {
            "debug" => {}
            "release" => {
                command.arg("--release");
            }
            other => {
                command.args(["--profile", other]);
            }
        }
        // What cargo set for the running test (the package's name, manifest, output
        // directories) must not reach the inner build: build scripts that watch such variables
        // would rebuild their crates every time.
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            let from_outer_cargo = key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_")
                || key.starts_with("CARGO_CFG_")
                || matches!(
                    key,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                );
            if from_outer_cargo {
                command.env_remove(key);
            }
        }
        let shown = format!("{command:?}");
        let status =
            command
                .stdin(Stdio::null())
                .status()
                .map_err(|source| BinariesError::Run {
                    command: shown.clone(),
                    source,
                })?;
        if !status.success() {
            return Err(BinariesError::Build {
                command: shown,
                status,
            });
        }
        Self::locate()
    }
}
