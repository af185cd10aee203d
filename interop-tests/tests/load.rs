//! `fwnp-load --baseline`: one short run measures the bare QUIC server and the gateway in
//! alternating phases and reports both, with FWNP's figures over the baseline's. Only that the
//! report is whole and consistent is checked here, never a speed: speed is what the tool
//! measures, on a machine whose load no test controls. `fwnp-load --restart` stops the gateway
//! after its prefill and starts it again on the same store: the restarted gateway must renew a
//! lease the first one granted.
//!
//! The runs in a network namespace need root: skipped otherwise, failing instead when
//! FWNP_REQUIRE_NETNS=1.

use std::process::Command;

use fwnp_interop_tests::{Binaries, require_root};

const LOAD: &str = env!("CARGO_BIN_EXE_fwnp-load");

/// Runs fwnp-load with `args` and `--json`, and returns its report.
fn load(args: &[&str]) -> serde_json::Value {
    if let Err(err) = Binaries::build() {
        panic!("the gateway's binaries: {err}");
    }
    let output = Command::new(LOAD)
        .args(args)
        .arg("--json")
        .output()
        .expect("fwnp-load runs");
    assert!(
        output.status.success(),
        "fwnp-load {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON report")
}

fn number(report: &serde_json::Value, path: &[&str]) -> f64 {
    path.iter()
        .try_fold(report, |v, k| v.get(k))
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("{path:?} is not a number in {report:#}"))
}

/// Both sides answered every request, their quantiles are in order, the ratios are FWNP's
/// figures over the baseline's, and the baseline's answers are the size of the gateway's
/// Granted.
fn check_both_sides(report: &serde_json::Value, phases: f64) {
    assert_eq!(number(report, &["failed"]), 0.0, "{report:#}");
    assert_eq!(number(report, &["baseline", "failed"]), 0.0, "{report:#}");
    assert_eq!(number(report, &["baseline", "phases"]), phases);
    for side in [&report["baseline"], report] {
        assert!(number(side, &["answered_per_s"]) > 0.0, "{report:#}");
        let q = |name: &str| number(side, &["latency_ms", name]);
        assert!(q("p50") > 0.0, "{report:#}");
        assert!(
            q("p50") <= q("p90") && q("p90") <= q("p99") && q("p99") <= q("max"),
            "{report:#}"
        );
    }
    let rate =
        number(report, &["answered_per_s"]) / number(report, &["baseline", "answered_per_s"]);
    assert!(
        (number(report, &["fwnp_over_baseline", "answered_per_s"]) - rate).abs() < 1e-9,
        "{report:#}"
    );
    // Latencies are kept to three significant digits: the ratio of the reported p99s.
    let p99 =
        number(report, &["latency_ms", "p99"]) / number(report, &["baseline", "latency_ms", "p99"]);
    assert!(
        (number(report, &["fwnp_over_baseline", "p99"]) - p99).abs() < 1e-3 * p99,
        "{report:#}"
    );
    // The same message sizes: the gateway echoes each request's random 64-bit id, whose
    // encoding is a byte or two shorter now and then; the baseline's is always the longest.
    let fwnp_bytes = number(report, &["answer_bytes_mean"]);
    let baseline_bytes = number(report, &["baseline", "answer_bytes_mean"]);
    assert!(
        (fwnp_bytes - baseline_bytes).abs() < 2.0,
        "answers of {fwnp_bytes} bytes from the gateway, {baseline_bytes} from the baseline"
    );
}

#[test]
fn baseline_closed_loop_reports_both_sides_from_one_run() {
    let report = load(&[
        "--hosts",
        "4",
        "--concurrency",
        "2",
        "--duration",
        "2s",
        "--mix",
        "100,0,0",
        "--baseline",
        "--phases",
        "2",
    ]);
    assert_eq!(report["mode"], "closed-loop");
    check_both_sides(&report, 2.0);
    // Each side was measured for the whole --duration, in phases that alternated.
    for side in [&report["baseline"], &report] {
        let secs = number(side, &["duration_s"]);
        assert!((2.0..4.0).contains(&secs), "{report:#}");
    }
}

#[test]
fn baseline_open_loop_in_a_namespace_reports_both_sides_from_one_run() {
    if !require_root("baseline_open_loop_in_a_namespace_reports_both_sides_from_one_run") {
        return;
    }
    let report = load(&[
        "--hosts",
        "4",
        "--rate",
        "200",
        "--duration",
        "2s",
        "--mix",
        "100,0,0",
        "--netns",
        "--baseline",
        "--phases",
        "3",
    ]);
    assert_eq!(report["mode"], "open-loop");
    assert_eq!(report["kernel_filter"], true);
    check_both_sides(&report, 3.0);
    // The open loop offers the same rate to both: about 400 requests each in 2 s (a phase's
    // schedule counts its first request at its start and rounds up).
    for side in [&report["baseline"], &report] {
        let sent = number(side, &["sent"]);
        assert!((300.0..=410.0).contains(&sent), "{report:#}");
    }
}

#[test]
fn restart_times_a_gateway_back_to_ready_with_its_prefilled_leases() {
    if !require_root("restart_times_a_gateway_back_to_ready_with_its_prefilled_leases") {
        return;
    }
    let report = load(&[
        "--hosts",
        "2",
        "--concurrency",
        "2",
        "--prefill",
        "300",
        "--netns",
        "--restart",
    ]);
    assert_eq!(report["mode"], "restart");
    assert_eq!(report["kernel_filter"], true);
    // The restarted gateway answered and renewed a lease the first one granted: it was
    // restored from the store.
    assert_eq!(
        report["restart"]["prefilled_lease_renewed"], true,
        "{report:#}"
    );
    let ready = number(&report, &["restart", "ready_s"]);
    assert!(ready > 0.0 && ready < 300.0, "{report:#}");
    assert!(
        number(&report, &["gateway_rss_kib", "after_restart"]) > 0.0,
        "{report:#}"
    );
}
