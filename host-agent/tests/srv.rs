//! The agent's SRV lookup (`srv = "_fwnp._udp.DOMAIN"`) against a real dnsmasq on the
//! loopback of a namespace of the test's own: targets in priority order with their addresses,
//! and each way a name or a target can fail, told apart. Needs root (skips otherwise).

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use fwnp_agent::srv::{Located, SrvError, SrvResolver};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Where dnsmasq listens inside the namespace.
const DNS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 53);

/// Looks `name` up through the given server, from inside `ns`.
fn locate_in(
    ns: &fwnp_testkit::netns::Netns,
    server: SocketAddr,
    timeout: Duration,
    name: &str,
) -> Result<Vec<Located>, SrvError> {
    ns.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let resolver = SrvResolver::with_servers(&[server], timeout);
            let mut rng = StdRng::seed_from_u64(5);
            tokio::time::timeout(STEP, resolver.locate(name, &mut rng))
                .await
                .expect("the lookup ends within its step")
        })
    })
}

/// A namespace with a dnsmasq that is authoritative for `example.test` (an unknown name there
/// is NXDOMAIN) and answers from `records`, or `None` when the test skips.
fn dns_with(test: &str, records: &[&str]) -> Option<(fwnp_testkit::netns::Netns, ProcessGuard)> {
    if !dnsmasq_available(test) {
        return None;
    }
    let ns = fwnp_testkit::netns::Netns::new("dns").expect("namespace");
    let mut args = vec!["--local=/example.test/"];
    args.extend_from_slice(records);
    let dnsmasq = start_dnsmasq(&ns, &args);
    Some((ns, dnsmasq))
}

fn addresses(found: &Located) -> Vec<SocketAddr> {
    match &found.addresses {
        Ok(list) => {
            let mut list = list.clone();
            list.sort();
            list
        }
        Err(e) => panic!("{}: {e}", found.target.target),
    }
}

#[test]
fn the_targets_come_in_priority_order_with_their_addresses() {
    let Some((ns, _dns)) = dns_with(
        "the_targets_come_in_priority_order_with_their_addresses",
        &[
            "--srv-host=_fwnp._udp.example.test,late.example.test,4434,20,0",
            "--srv-host=_fwnp._udp.example.test,first.example.test,4433,10,0",
            "--host-record=first.example.test,192.0.2.1,2001:db8::1",
            "--host-record=late.example.test,192.0.2.2",
        ],
    ) else {
        return;
    };
    let found = locate_in(&ns, DNS, STEP, "_fwnp._udp.example.test").expect("lookup");
    let names: Vec<(&str, u16)> = found
        .iter()
        .map(|f| (f.target.target.as_str(), f.target.port))
        .collect();
    assert_eq!(
        names,
        [("first.example.test", 4433), ("late.example.test", 4434)]
    );
    assert_eq!(
        addresses(&found[0]),
        [
            "192.0.2.1:4433".parse().unwrap(),
            "[2001:db8::1]:4433".parse().unwrap()
        ]
    );
    assert_eq!(addresses(&found[1]), ["192.0.2.2:4434".parse().unwrap()]);
}

#[test]
fn a_target_without_an_address_is_named_and_the_others_still_serve() {
    let Some((ns, _dns)) = dns_with(
        "a_target_without_an_address_is_named_and_the_others_still_serve",
        &[
            "--srv-host=_fwnp._udp.example.test,nowhere.example.test,4433,10,0",
            "--srv-host=_fwnp._udp.example.test,gw.example.test,4433,20,0",
            "--host-record=gw.example.test,192.0.2.1",
        ],
    ) else {
        return;
    };
    let found = locate_in(&ns, DNS, STEP, "_fwnp._udp.example.test.").expect("lookup");
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        matches!(&found[0].addresses,
            Err(SrvError::TargetWithoutAddress(name)) if name == "nowhere.example.test"),
        "{found:?}"
    );
    assert_eq!(addresses(&found[1]), ["192.0.2.1:4433".parse().unwrap()]);
}

/// Targets whose address questions go unanswered are waited for together: a name with six of
/// them takes about as long as a name with one, not six times as long, and the target that
/// does answer is still found.
#[test]
fn targets_whose_questions_go_unanswered_are_waited_for_together() {
    let slow: Vec<String> = (1..=6)
        .map(|i| format!("--srv-host=_six._udp.example.test,gw-{i}.slow.test,4433,{i},0"))
        .collect();
    let mut records: Vec<&str> = slow.iter().map(String::as_str).collect();
    records.extend([
        "--srv-host=_six._udp.example.test,gw.example.test,4433,9,0",
        "--host-record=gw.example.test,192.0.2.1",
        "--srv-host=_one._udp.example.test,gw-1.slow.test,4433,1,0",
        // Questions about slow.test go to a server that never answers them.
        "--server=/slow.test/127.0.0.1#5300",
    ]);
    let Some((ns, _dns)) = dns_with(
        "targets_whose_questions_go_unanswered_are_waited_for_together",
        &records,
    ) else {
        return;
    };
    let _silent = ns.run(|| UdpSocket::bind((Ipv4Addr::LOCALHOST, 5300)).expect("bind"));
    let timeout = Duration::from_millis(200);
    let unanswered =
        |found: &Located| matches!(found.addresses, Err(SrvError::Timeout(t)) if t == timeout);

    let started = Instant::now();
    let one = locate_in(&ns, DNS, timeout, "_one._udp.example.test").expect("lookup");
    let one_took = started.elapsed();
    assert_eq!(one.len(), 1, "{one:?}");
    assert!(unanswered(&one[0]), "{one:?}");

    let started = Instant::now();
    let six = locate_in(&ns, DNS, timeout, "_six._udp.example.test").expect("lookup");
    let six_took = started.elapsed();
    assert_eq!(six.len(), 7, "{six:?}");
    assert!(six[..6].iter().all(unanswered), "{six:?}");
    assert_eq!(addresses(&six[6]), ["192.0.2.1:4433".parse().unwrap()]);
    // One after another they would take six times as long.
    assert!(
        six_took < one_took * 3,
        "six unanswered targets took {six_took:?}, one {one_took:?}"
    );
}

#[test]
fn a_name_that_does_not_exist_is_told_from_one_without_srv_records() {
    let Some((ns, _dns)) = dns_with(
        "a_name_that_does_not_exist_is_told_from_one_without_srv_records",
        &["--txt-record=_fwnp._udp.text.example.test,\"no gateway here\""],
    ) else {
        return;
    };
    let missing = locate_in(&ns, DNS, STEP, "_fwnp._udp.missing.example.test");
    assert!(matches!(missing, Err(SrvError::NoSuchName)), "{missing:?}");
    let text_only = locate_in(&ns, DNS, STEP, "_fwnp._udp.text.example.test");
    assert!(
        matches!(text_only, Err(SrvError::NoRecords)),
        "{text_only:?}"
    );
}

#[test]
fn a_lone_dot_target_says_the_service_is_not_offered() {
    // dnsmasq's SRV record without a target is the record whose target is ".".
    let Some((ns, _dns)) = dns_with(
        "a_lone_dot_target_says_the_service_is_not_offered",
        &["--srv-host=_fwnp._udp.example.test"],
    ) else {
        return;
    };
    let found = locate_in(&ns, DNS, STEP, "_fwnp._udp.example.test");
    assert!(matches!(found, Err(SrvError::NotOffered)), "{found:?}");
}

#[test]
fn a_refused_question_names_the_answer_code() {
    // Outside its local domain and with no upstream server, dnsmasq refuses.
    let Some((ns, _dns)) = dns_with("a_refused_question_names_the_answer_code", &[]) else {
        return;
    };
    let found = locate_in(&ns, DNS, STEP, "_fwnp._udp.elsewhere.test");
    assert!(
        matches!(&found, Err(SrvError::Answered(code)) if code == "REFUSED"),
        "{found:?}"
    );
}

#[test]
fn an_answer_too_long_for_udp_is_asked_again_over_tcp() {
    // 60 targets with their addresses do not fit a UDP answer (512 bytes, or dnsmasq's EDNS
    // size): the server truncates it and only TCP brings them all.
    let records: Vec<String> = (0..60)
        .flat_map(|i| {
            [
                format!("--srv-host=_fwnp._udp.example.test,gateway-{i:02}.example.test,4433,10,1"),
                format!(
                    "--host-record=gateway-{i:02}.example.test,192.0.2.{}",
                    i + 1
                ),
            ]
        })
        .collect();
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let Some((ns, _dns)) = dns_with(
        "an_answer_too_long_for_udp_is_asked_again_over_tcp",
        &records,
    ) else {
        return;
    };
    let found = locate_in(&ns, DNS, STEP, "_fwnp._udp.example.test").expect("lookup");
    assert_eq!(found.len(), 60);
    for f in &found {
        let i: u8 = f.target.target["gateway-".len().."gateway-".len() + 2]
            .parse()
            .expect("index");
        assert_eq!(
            addresses(f),
            [SocketAddr::from(([192, 0, 2, i + 1], 4433))],
            "{}",
            f.target.target
        );
    }
}

#[test]
fn a_server_that_never_answers_is_a_timeout() {
    if !fwnp_testkit::netns::require_root("a_server_that_never_answers_is_a_timeout") {
        return;
    }
    let ns = fwnp_testkit::netns::Netns::new("dns").expect("namespace");
    // A socket that receives the questions and never answers them.
    let silent = ns.run(|| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind"));
    let server = silent.local_addr().expect("address");
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let found = locate_in(&ns, server, timeout, "_fwnp._udp.example.test");
    assert!(
        matches!(found, Err(SrvError::Timeout(t)) if t == timeout),
        "{found:?}"
    );
    assert!(started.elapsed() < STEP, "{:?}", started.elapsed());
}

/// The link makes a resolver for each round of connection attempts (it reads the system's
/// configuration afresh): once dropped, the tasks its transports ran must be gone, or a host
/// whose gateway keeps failing would gather them for as long as it runs.
#[test]
fn a_dropped_resolver_leaves_no_task_behind() {
    let Some((ns, _dns)) = dns_with(
        "a_dropped_resolver_leaves_no_task_behind",
        &[
            "--srv-host=_fwnp._udp.example.test,gw.example.test,4433,10,0",
            "--host-record=gw.example.test,192.0.2.1",
        ],
    ) else {
        return;
    };
    let alive = ns.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let metrics = tokio::runtime::Handle::current().metrics();
            let mut rng = StdRng::seed_from_u64(5);
            for _ in 0..5 {
                let resolver = SrvResolver::with_servers(&[DNS], STEP);
                let found = resolver
                    .locate("_fwnp._udp.example.test", &mut rng)
                    .await
                    .expect("lookup");
                assert_eq!(found.len(), 1);
                // What is counted below: a live resolver's transports run as tasks.
                assert!(metrics.num_alive_tasks() > 0);
            }
            let deadline = Instant::now() + STEP;
            while metrics.num_alive_tasks() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            metrics.num_alive_tasks()
        })
    });
    assert_eq!(alive, 0, "tasks left behind by dropped resolvers");
}
