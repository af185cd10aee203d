//! `fwnp-load --baseline`: one short run measures the bare QUIC server and the gateway in
//! alternating phases and reports both, with FWNP's figures over the baseline's; `--store
//! etcd` (alone or beside SQLite) runs the gateway on a three-member etcd cluster started for
//! the run, and measures etcd's own write ceiling in the same phases. Only that the report is
//! whole and consistent is checked here, never a speed: speed is what the tool measures, on a
//! machine whose load no test controls. `fwnp-load --restart` stops the gateway after its
//! prefill and starts it again on the same store: the restarted gateway must renew a lease the
//! first one granted. Its closed loop waits the retry-after of a rate-limited answer before
//! the refused slot asks again.
//!
//! The runs in a network namespace and with etcd need root (and etcd installed): skipped
//! otherwise, failing instead when FWNP_REQUIRE_NETNS=1.

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
    // What each side cost the generator per request, and its datagrams per request, the
    // baseline's as FWNP's: read from the same phases as the side's CPU and answers.
    for side in [&report["baseline"], report] {
        let cpu_us =
            number(side, &["cpu_cores_used", "generator"]) * number(side, &["duration_s"]) * 1e6
                / number(side, &["sent"]);
        let reported = number(side, &["per_request", "generator_cpu_us"]);
        assert!((reported - cpu_us).abs() < 1e-6 * cpu_us, "{report:#}");
        assert!(number(side, &["per_request", "generator_context_switches"]) >= 0.0);
        // A request goes in at least part of a datagram each way.
        for way in ["datagrams_to_server", "datagrams_from_server"] {
            assert!(number(side, &["per_request", way]) > 0.0, "{report:#}");
        }
    }
    for (way, key) in [
        ("to_server", "datagrams_to_server"),
        ("from_server", "datagrams_from_server"),
    ] {
        assert_eq!(
            number(report, &["baseline", "datagrams_per_request", way]),
            number(report, &["baseline", "per_request", key]),
            "{report:#}"
        );
    }
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
    // The closed loop waits for every request it sent: each was answered or failed, and each
    // slot's counts were added to its side's.
    for side in [&report["baseline"], &report] {
        let answered = number(side, &["answered_per_s"]) * number(side, &["duration_s"]);
        let sent = number(side, &["sent"]);
        assert!((sent - answered).abs() < 1e-6 * sent, "{report:#}");
    }
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

/// A store's side: every request answered, some granted, its quantiles in order, measured for
/// the whole `--duration` of 2 s in all.
fn check_store_side(report: &serde_json::Value, store: &str) {
    let side = &report["stores"][store];
    assert_eq!(side["store"], store, "{report:#}");
    assert_eq!(number(side, &["failed"]), 0.0, "{report:#}");
    assert!(number(side, &["granted"]) > 0.0, "{report:#}");
    let q = |name: &str| number(side, &["latency_ms", name]);
    assert!(q("p50") > 0.0, "{report:#}");
    assert!(
        q("p50") <= q("p90") && q("p90") <= q("p99") && q("p99") <= q("max"),
        "{report:#}"
    );
    let secs = number(side, &["duration_s"]);
    assert!((2.0..4.0).contains(&secs), "{report:#}");
    let rate = number(side, &["granted"]) / secs;
    assert!(
        (number(side, &["grants_per_s"]) - rate).abs() < 1e-6 * rate,
        "{report:#}"
    );
}

/// etcd alone: each number of transactions in flight asked for was measured, and the gateway's
/// shape with its reads; each committed transactions of 48 lease keys the size of a lease the
/// gateway wrote, and failed none.
fn check_etcd_ceiling(report: &serde_json::Value, in_flight: &[f64]) {
    let ceiling = &report["etcd_ceiling"];
    assert_eq!(number(ceiling, &["lease_puts_per_transaction"]), 48.0);
    assert_eq!(ceiling["value_is_a_gateway_lease"], true, "{report:#}");
    assert!(number(ceiling, &["value_bytes"]) > 50.0, "{report:#}");
    let levels = ceiling["levels"].as_array().expect("levels");
    // Each number asked for without reads, then one at a time after the gateway's two reads.
    let expected: Vec<(f64, f64)> = in_flight
        .iter()
        .map(|&n| (n, 0.0))
        .chain([(1.0, 2.0)])
        .collect();
    assert_eq!(levels.len(), expected.len(), "{report:#}");
    for (level, &(n, reads)) in levels.iter().zip(&expected) {
        assert_eq!(number(level, &["transactions_in_flight"]), n);
        assert_eq!(number(level, &["reads_before_each"]), reads);
        assert_eq!(
            level["failures_by_reason"],
            serde_json::json!({}),
            "{report:#}"
        );
        let transactions = number(level, &["transactions"]);
        assert!(transactions > 0.0, "{report:#}");
        let puts = transactions * 48.0 / number(level, &["duration_s"]);
        assert!(
            (number(level, &["lease_puts_per_s"]) - puts).abs() < 1e-6 * puts,
            "{report:#}"
        );
        let q = |name: &str| number(level, &["transaction_latency_ms", name]);
        assert!(q("p50") > 0.0 && q("p50") <= q("p99"), "{report:#}");
    }
}

#[test]
fn etcd_beside_sqlite_and_the_baseline_in_a_namespace_reports_grants_made_through_etcd() {
    let test =
        "etcd_beside_sqlite_and_the_baseline_in_a_namespace_reports_grants_made_through_etcd";
    if !fwnp_testkit::etcd::available(test) {
        return;
    }
    let report = load(&[
        "--hosts",
        "4",
        "--concurrency",
        "2",
        "--duration",
        "2s",
        "--mix",
        "100,0,0",
        "--netns",
        "--baseline",
        "--store",
        "sqlite,etcd",
        "--etcd-writers",
        "1,4",
    ]);
    assert_eq!(report["kernel_filter"], true);
    // The figures at the top are the first store's, beside the baseline as before.
    assert_eq!(report["store"], "sqlite");
    check_both_sides(&report, 2.0);
    assert_eq!(
        number(&report, &["granted"]),
        number(&report, &["stores", "sqlite", "granted"])
    );
    for store in ["sqlite", "etcd"] {
        check_store_side(&report, store);
        assert!(
            number(
                &report,
                &["stores", store, "over_baseline", "answered_per_s"]
            ) > 0.0,
            "{report:#}"
        );
    }
    // Opens only, none released: every grant of the etcd gateway is a lease key in etcd, and
    // none of the SQLite gateway's is; each host has its counter key.
    assert_eq!(
        number(&report, &["etcd_keys_at_end", "leases"]),
        number(&report, &["stores", "etcd", "granted"]),
        "{report:#}"
    );
    assert_eq!(number(&report, &["etcd_keys_at_end", "hosts"]), 4.0);
    let ratio = number(&report, &["stores", "etcd", "grants_per_s"])
        / number(&report, &["stores", "sqlite", "grants_per_s"]);
    assert!(
        (number(
            &report,
            &["store_ratios", "etcd_over_sqlite", "grants_per_s"]
        ) - ratio)
            .abs()
            < 1e-9,
        "{report:#}"
    );
    check_etcd_ceiling(&report, &[1.0, 4.0]);
}

#[test]
fn etcd_alone_reports_its_grants_and_the_ceiling_of_etcd() {
    if !fwnp_testkit::etcd::available("etcd_alone_reports_its_grants_and_the_ceiling_of_etcd") {
        return;
    }
    let report = load(&[
        "--hosts",
        "2",
        "--concurrency",
        "2",
        "--duration",
        "2s",
        "--mix",
        "100,0,0",
        "--store",
        "etcd",
    ]);
    // Without --netns the gateway has a namespace for the link to etcd, but no filter.
    assert_eq!(report["kernel_filter"], false);
    assert_eq!(report["store"], "etcd");
    assert_eq!(
        report["stores"].as_object().map(|s| s.len()),
        Some(1),
        "{report:#}"
    );
    check_store_side(&report, "etcd");
    assert_eq!(number(&report, &["failed"]), 0.0, "{report:#}");
    assert_eq!(
        number(&report, &["etcd_keys_at_end", "leases"]),
        number(&report, &["granted"]),
        "{report:#}"
    );
    check_etcd_ceiling(&report, &[1.0, 8.0]);
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
        "--restart-later",
        "1",
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
    assert!(
        number(&report, &["gateway_rss_kib", "after_restart_later", "1s"]) > 0.0,
        "{report:#}"
    );
}

/// A gateway whose policy allows each host one request a second: the closed loop's slots that
/// are refused as rate-limited wait the answer's retry-after (at least a second) before their
/// next request, instead of asking again at once. Each of the 8 slots (2 hosts × 4) is then
/// refused at most once per second of the 3 s run, plus once at its end; a loop that ignored
/// the retry-after is refused every time the gateway's short pause after a refusal lets it
/// ask again, some hundreds of times.
#[test]
fn closed_loop_waits_the_retry_after_of_a_rate_limited_answer() {
    let report = load(&[
        "--hosts",
        "2",
        "--concurrency",
        "4",
        "--duration",
        "3s",
        "--mix",
        "100,0,0",
        "--host-rate-limit",
        "1",
    ]);
    assert_eq!(report["mode"], "closed-loop");
    assert_eq!(number(&report, &["failed"]), 0.0, "{report:#}");
    let (granted, rate_limited) = (
        number(&report, &["granted"]),
        number(&report, &["rate_limited"]),
    );
    // The limit was reached, and each host was still granted about one request a second.
    assert!(rate_limited >= 1.0, "{report:#}");
    assert!((1.0..=10.0).contains(&granted), "{report:#}");
    let slots = 2.0 * 4.0;
    let secs = number(&report, &["duration_s"]);
    assert!(
        rate_limited <= slots * (secs.ceil() + 1.0),
        "{rate_limited} rate-limited answers to {slots} slots in {secs} s: {report:#}"
    );
    // Every refusal made its slot wait, at least a second each unless the run ended first.
    let waits = number(&report, &["retry_after", "waits"]);
    assert_eq!(waits, rate_limited, "{report:#}");
    assert!(
        number(&report, &["retry_after", "waited_s"]) > 0.0,
        "{report:#}"
    );
}
