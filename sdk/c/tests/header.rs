//! The committed header (`include/fwnp.h`) is what cbindgen makes of the code now: regenerated
//! here with the crate's `cbindgen.toml` and compared byte for byte. After a change of the
//! exported API, `FWNP_UPDATE_HEADER=1 cargo test -p fwnp-c --test header` rewrites it (and
//! the change shows in the commit). The header also compiles as C and as C++ on its own.

use std::path::{Path, PathBuf};
use std::process::Command;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate() -> String {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen reads src/lib.rs");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn the_committed_header_is_the_generated_one() {
    let generated = generate();
    let path = crate_dir().join("include/fwnp.h");
    if std::env::var_os("FWNP_UPDATE_HEADER").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("writing include/fwnp.h");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or(
                committed.lines().count().min(generated.lines().count()),
                |n| n,
            );
        panic!(
            "include/fwnp.h differs from what the code exports (first at line {}): regenerate it \
             with FWNP_UPDATE_HEADER=1 cargo test -p fwnp-c --test header",
            line + 1
        );
    }
    // Every exported function is declared, and documented.
    for name in [
        "fwnp_last_error",
        "fwnp_client_connect",
        "fwnp_client_open",
        "fwnp_lease_event_fd",
        "fwnp_lease_next_event",
        "fwnp_lease_set_callback",
        "fwnp_lease_release",
        "fwnp_lease_free",
        "fwnp_event_free",
    ] {
        let lines: Vec<&str> = generated.lines().collect();
        let at = lines
            .iter()
            .position(|l| !l.starts_with(" *") && l.contains(&format!("{name}(")))
            .unwrap_or_else(|| panic!("{name} is not declared"));
        assert!(
            at > 0 && lines[at - 1] == " */",
            "{name} has no doc comment"
        );
    }
}

fn compiles(compiler: &str, lang: &str, dir: &Path) {
    let source = dir.join(format!("use.{lang}"));
    std::fs::write(
        &source,
        "#include <fwnp.h>\nint main(void) { fwnp_client *c = 0; return fwnp_client_connect(0, &c) == FWNP_OK ? 0 : 1; }\n",
    )
    .expect("writing the source");
    let out = Command::new(compiler)
        .args(["-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I"])
        .arg(crate_dir().join("include"))
        .arg(&source)
        .output()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(
        out.status.success(),
        "{compiler} refuses the header: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_header_compiles_as_c_and_cpp() {
    let dir = std::env::temp_dir().join(format!("fwnp-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    compiles("cc", "c", &dir);
    if Command::new("c++").arg("--version").output().is_ok() {
        compiles("c++", "cpp", &dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
