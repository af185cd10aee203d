//! What the tests that build C against libfwnp share: the library built, a C program compiled
//! against it, Valgrind's command line.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use fwnp_interop_tests::Binaries;

/// Valgrind as the tests run a program under it: exit code 99 when it found an error or a
/// leak (definite or possible).
pub(crate) const VALGRIND: [&str; 5] = [
    "valgrind",
    "--leak-check=full",
    "--errors-for-leak-kinds=definite,possible",
    "--show-leak-kinds=definite,possible",
    "--error-exitcode=99",
];

pub(crate) fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test with a clear message when Valgrind is missing.
pub(crate) fn require_valgrind() {
    assert!(
        Command::new("valgrind").arg("--version").output().is_ok(),
        "valgrind is not installed (scripts/deps.sh installs it)"
    );
}

/// Builds libfwnp (cargo builds no cdylib for the crate's own integration tests) into this
/// test's target directory and profile; returns the directory holding libfwnp.so and
/// libfwnp.a. Once per test process.
pub(crate) fn library_dir() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let dir = Binaries::profile_dir().map_err(|e| e.to_string())?;
        let target = dir.parent().ok_or("no target directory")?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .args(["build", "-p", "fwnp-c", "--target-dir"])
            .arg(target)
            .current_dir(crate_dir());
        if dir.file_name().is_some_and(|n| n == "release") {
            command.arg("--release");
        }
        // The running test's cargo variables must not reach the inner build (build scripts
        // that watch them would rebuild their crates).
        for (key, _) in std::env::vars_os() {
            if let Some(key) = key.to_str()
                && (key.starts_with("CARGO_") || key == "OUT_DIR")
                && key != "CARGO_HOME"
            {
                command.env_remove(key);
            }
        }
        let status = command
            .stdin(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("`cargo build -p fwnp-c` failed ({status})"));
        }
        Ok(dir)
    });
    match built {
        Ok(dir) => dir.clone(),
        Err(e) => panic!("building libfwnp: {e}"),
    }
}

/// `cc` with `args`, failing the test with the compiler's output.
pub(crate) fn cc<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) {
    let out = Command::new("cc")
        .args(args)
        .output()
        .expect("running cc (a C compiler is needed)");
    assert!(
        out.status.success(),
        "cc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `source` compiled with warnings as errors against the built libfwnp (found at run time by
/// its rpath) into `out`.
pub(crate) fn compile(source: &Path, out: &Path) -> PathBuf {
    let lib = library_dir();
    let include = crate_dir().join("include");
    cc(&[
        OsStr::new("-Wall"),
        OsStr::new("-Wextra"),
        OsStr::new("-Werror"),
        OsStr::new("-g"),
        OsStr::new("-I"),
        include.as_os_str(),
        source.as_os_str(),
        OsStr::new("-L"),
        lib.as_os_str(),
        OsStr::new("-lfwnp"),
        OsStr::new(&format!("-Wl,-rpath,{}", lib.display())),
        OsStr::new("-o"),
        out.as_os_str(),
    ]);
    out.to_path_buf()
}
