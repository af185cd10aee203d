//! The Python SDK (`sdk/python`) against the real `fwnp-gateway` and `fwnp-agent` in network
//! namespaces: a Python program in a host's namespace serves a TCP echo and holds its port's
//! opening through the SDK (`interop-tests/python/sdk_driver.py`), step by step as the test
//! tells it, and the test checks from the outside network what each step does: the port is
//! reachable while the lease is held and refused once it is released, at the end of a `with`
//! block, when the lease is collected, and with the asyncio client; a port the policy denies
//! and a port nobody binds raise their exceptions; two opens of one opening are two leases
//! (under the one id the gateway gives them), the port held until both are released.
//!
//! Needs root (skipped otherwise, failing instead when FWNP_REQUIRE_NETNS=1), and a Python with
//! cbor2: `$FWNP_PYTHON`, else the virtual environment `scripts/test` makes in
//! `target/python-venv` (missing: skipped, failing instead when FWNP_REQUIRE_NETNS=1).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use fwnp_interop_tests::{
    Binaries, Lab, LabOptions, LineProcess, netns_command, require_root, test_python,
};

/// A connection attempt that gets no answer within this long counts as refused.
const REFUSED: Duration = Duration::from_millis(1200);
/// Bound of every wait for a change that should follow a step.
const SETTLE: Duration = Duration::from_secs(5);
/// Bound of every wait for the driver's next line (an open may wait for the agent's grace
/// period for binding the port).
const STEP: Duration = Duration::from_secs(20);

const POLICY: &str = r#"
[defaults]
lifetime = "30s"
min_lifetime = "1s"
max_lifetime = "5m"

[[group]]
name = "hosts"
identities = ["fwnp://host/*"]

[[rule]]
name = "web"
groups = ["hosts"]
allow = "tcp/8000-8999"
"#;

fn binaries() -> Binaries {
    static BUILT: OnceLock<Result<Binaries, String>> = OnceLock::new();
    match BUILT.get_or_init(|| Binaries::build().map_err(|err| err.to_string())) {
        Ok(bins) => bins.clone(),
        Err(err) => panic!("the lab's binaries: {err}"),
    }
}

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/python")
}

fn start_lab(label: &str) -> Lab {
    let options = LabOptions {
        label: label.into(),
        hosts: 1,
        host_prefix: "py".into(),
        policy: POLICY.into(),
        verify_port_owner: true,
    };
    Lab::start(binaries(), &options).unwrap_or_else(|err| panic!("{err}"))
}

/// One run of the driver in host 0's namespace; killed when dropped.
struct Driver(LineProcess);

impl Driver {
    fn start(lab: &Lab, python: &Path, mode: &str, port: u16) -> Driver {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/sdk_driver.py");
        let mut command = netns_command(&lab.site.hosts[0].netns, python);
        command
            .arg(script)
            .args([mode, &port.to_string()])
            .env("FWNP_AGENT_SOCKET", lab.agent_socket(0))
            // The SDK of this tree, whatever the environment has installed.
            .env("PYTHONPATH", sdk_dir());
        Driver(LineProcess::spawn(
            &mut command,
            format!("sdk_driver.py {mode} {port}"),
        ))
    }

    /// The driver's next line, which must start with `word`; its other words.
    fn expect(&self, word: &str, lab: &Lab) -> Vec<String> {
        let what = self.0.what();
        let line = self.0.next_line(STEP).unwrap_or_else(|| {
            panic!(
                "{what}: no line within {STEP:?} (expected {word})\n{}",
                lab.log_tails(20)
            )
        });
        let mut words = line.split_whitespace().map(str::to_owned);
        assert_eq!(words.next().as_deref(), Some(word), "{what}: said {line:?}");
        words.collect()
    }

    fn tell(&mut self, line: &str) {
        self.0.tell(line);
    }

    /// Waits (bounded) for the driver to exit and returns whether it succeeded.
    fn finished(&mut self) -> bool {
        self.0.finished(Duration::from_secs(5))
    }
}

/// Held: reachable from outside on both families and mirrored in the host's table.
fn assert_held(lab: &Lab, port: u16, lease_words: &[String]) {
    assert_eq!(
        lease_words.first().map(String::len),
        Some(32),
        "lease id {lease_words:?}"
    );
    // No family asked: one grant per family of the host.
    assert_eq!(lease_words.get(1).map(String::as_str), Some("2"));
    for v6 in [false, true] {
        assert!(
            lab.wait_reachable(0, v6, port, true, SETTLE),
            "tcp/{port} (v6 {v6}) not reachable while the lease is held\n{}",
            lab.log_tails(20)
        );
    }
    assert!(lab.host_has(0, "tcp", port), "{}", lab.host_table(0));
}

fn assert_closed(lab: &Lab, port: u16, after: &str) {
    for v6 in [false, true] {
        assert!(
            lab.wait_reachable(0, v6, port, false, SETTLE),
            "tcp/{port} (v6 {v6}) still reachable after {after}"
        );
    }
    assert!(!lab.host_has(0, "tcp", port), "{}", lab.host_table(0));
}

#[test]
fn python_sdk_holds_a_port_until_released_or_collected_and_raises_refusals() {
    let test = "python_sdk_holds_a_port_until_released_or_collected_and_raises_refusals";
    if !require_root(test) {
        return;
    }
    let Some(python) = test_python(test, &["cbor2"]) else {
        return;
    };
    let lab = start_lab("py-sdk");

    // `with client.open(...) as lease:`, released at the block's end.
    let port = 8101;
    assert!(
        !lab.outside_reaches(0, false, port, REFUSED),
        "open before any lease"
    );
    let mut with = Driver::start(&lab, &python, "with", port);
    let held = with.expect("held", &lab);
    assert_held(&lab, port, &held);
    with.tell("release");
    assert_eq!(with.expect("released", &lab), ["False"]);
    assert_closed(&lab, port, "the with block");
    with.tell("exit");
    assert!(with.finished(), "the with driver failed");

    // A lease dropped and collected is released while the client stays connected.
    let port = 8102;
    let mut gc = Driver::start(&lab, &python, "gc", port);
    let held = gc.expect("held", &lab);
    assert_held(&lab, port, &held);
    gc.tell("drop");
    assert_eq!(gc.expect("dropped", &lab), ["True"]);
    assert_closed(&lab, port, "the lease's collection");
    gc.tell("exit");
    assert!(gc.finished(), "the gc driver failed");

    // A port outside the policy: DeniedByPolicy (code 7), an FwnpError; nothing opened.
    let mut denied = Driver::start(&lab, &python, "denied", 7000);
    assert_eq!(
        denied.expect("refused", &lab),
        ["DeniedByPolicy", "7", "True"]
    );
    assert!(denied.finished());
    assert!(!lab.outside_reaches(0, false, 7000, REFUSED));
    // A port nobody binds: PortNotOwned (local code 1025), after the agent's grace period.
    let mut unbound = Driver::start(&lab, &python, "unbound", 8104);
    assert_eq!(
        unbound.expect("refused", &lab),
        ["PortNotOwned", "1025", "True"]
    );
    assert!(unbound.finished());
}

#[test]
fn python_sdk_asyncio_holds_a_port_until_the_async_with_ends() {
    let test = "python_sdk_asyncio_holds_a_port_until_the_async_with_ends";
    if !require_root(test) {
        return;
    }
    let Some(python) = test_python(test, &["cbor2"]) else {
        return;
    };
    let lab = start_lab("py-aio");
    let port = 8103;
    assert!(
        !lab.outside_reaches(0, false, port, REFUSED),
        "open before any lease"
    );
    let mut driver = Driver::start(&lab, &python, "async", port);
    let held = driver.expect("held", &lab);
    assert_held(&lab, port, &held);
    driver.tell("release");
    assert_eq!(driver.expect("released", &lab), ["False"]);
    assert_closed(&lab, port, "the async with block");
    driver.tell("exit");
    assert!(driver.finished(), "the asyncio driver failed");
}

#[test]
fn python_sdk_two_opens_of_one_opening_are_two_leases() {
    let test = "python_sdk_two_opens_of_one_opening_are_two_leases";
    if !require_root(test) {
        return;
    }
    let Some(python) = test_python(test, &["cbor2"]) else {
        return;
    };
    let lab = start_lab("py-twice");
    let port = 8105;
    let mut driver = Driver::start(&lab, &python, "twice", port);
    // The gateway merges the two into one lease id; the SDK still gives two leases.
    let held = driver.expect("held", &lab);
    assert_eq!(
        held.get(2..),
        Some(&["True".to_owned(), "True".to_owned()][..])
    );
    assert_held(&lab, port, &held[..2]);
    // The first let go, the second holds the opening on its own.
    driver.tell("release");
    assert_eq!(driver.expect("released", &lab), ["False", "True"]);
    std::thread::sleep(Duration::from_millis(500));
    for v6 in [false, true] {
        assert!(
            lab.wait_reachable(0, v6, port, true, SETTLE),
            "tcp/{port} (v6 {v6}) closed while the second lease holds it\n{}",
            lab.log_tails(20)
        );
    }
    assert!(lab.host_has(0, "tcp", port), "{}", lab.host_table(0));
    driver.tell("release");
    assert_eq!(driver.expect("released", &lab), ["False", "False"]);
    assert_closed(&lab, port, "the second release");
    driver.tell("exit");
    assert!(driver.finished(), "the driver failed");
}
