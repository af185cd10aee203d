//! How fast elements with timeouts reach the kernel: through the [`Batcher`] (with and without
//! its nf_tables event watch), through [`Netfilter::commit`] in chunks, and with `nft -f` from a
//! file, in one run on one machine.
//!
//! Each path gets a fresh network namespace with the same gateway layout, loads the same
//! elements (100,000 by default, each with a one-hour timeout) and is timed from the first
//! change to the last acknowledgement (for `nft`, the whole process, as an operator would run
//! it). Every load is then read back and counted, so a fast but lossy path cannot win.
//!
//! Run as root: `cargo bench -p fwnp-netfilter --bench batch `.
//! `FWNP_BENCH_ELEMENTS` changes the number of elements, `FWNP_BENCH_CHUNK` the chunk size of
//! the commit path (default 5,000). The last line printed is the result as one JSON object.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use fwnp_netfilter::{
    Batcher, BatcherConfig, Change, GatewayLayout, Layout, Netfilter, Opening, PortRange, Prefix,
    Protocol, Refuse,
};
use fwnp_testkit::netns::{Netns, require_root};

const ELEMENT_TIMEOUT: Duration = Duration::from_secs(3600);

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
        Err(_) => default,
    }
}

fn layout() -> Layout {
    Layout::Gateway(GatewayLayout {
        protected: vec![Prefix {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)),
            len: 8,
        }],
        refuse: Refuse::Drop,
        ..GatewayLayout::default()
    })
}

/// `count` distinct single-port TCP openings: hosts 10.0.x.y, 1,000 ports each.
fn openings(count: usize) -> Vec<Opening> {
    (0..count)
        .map(|i| {
            let host = u32::try_from(i / 1000).expect("element count fits u32");
            let port = 1000 + u16::try_from(i % 1000).expect("below 1000");
            Opening {
                host: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + host + 1)),
                protocol: Protocol::Tcp,
                ports: PortRange::single(port),
                remote: None,
            }
        })
        .collect()
}

/// A fresh namespace with the layout applied and no elements.
fn prepared(prefix: &str) -> (Netns, Netfilter) {
    let ns = Netns::new(prefix).expect("network namespace");
    let nf = ns.run(|| {
        let mut nf = Netfilter::open().expect("netfilter handle");
        nf.apply(&layout(), &[]).expect("apply layout");
        nf
    });
    (ns, nf)
}

fn count_in(nf: &mut Netfilter) -> (usize, Duration) {
    let started = Instant::now();
    let count = nf.elements(&layout()).expect("read back").len();
    (count, started.elapsed())
}

struct Run {
    name: &'static str,
    elapsed: Duration,
    read_back: usize,
    read_back_time: Duration,
}

impl Run {
    fn rate(&self, count: usize) -> f64 {
        count as f64 / self.elapsed.as_secs_f64()
    }
}

fn through_batcher(all: &[Opening], name: &'static str, config: BatcherConfig) -> Run {
    let (ns, nf) = prepared("fwbb");
    let mut reader = ns.run(|| Netfilter::open().expect("netfilter handle"));
    let batcher = ns.run(|| Batcher::start(nf, layout(), config).expect("batcher"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let elapsed = runtime.block_on(async {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for opening in all {
            let batcher = batcher.clone();
            let opening = opening.clone();
            tasks.spawn(async move { batcher.add(opening, ELEMENT_TIMEOUT).await });
        }
        let mut failed = 0usize;
        while let Some(joined) = tasks.join_next().await {
            if !matches!(joined, Ok(Ok(()))) {
                failed += 1;
            }
        }
        let elapsed = started.elapsed();
        assert_eq!(failed, 0, "{failed} adds failed through the batcher");
        let stats = batcher.stats();
        println!(
            "{name}: {} batches, largest {} changes, kernel time {:?}",
            stats.batches, stats.max_batch_size, stats.total_batch_time
        );
        batcher.shutdown().await;
        elapsed
    });
    let (read_back, read_back_time) = count_in(&mut reader);
    Run {
        name,
        elapsed,
        read_back,
        read_back_time,
    }
}

fn through_commit(all: &[Opening], chunk: usize) -> Run {
    let (_ns, mut nf) = prepared("fwbc");
    let layout = layout();
    let started = Instant::now();
    for part in all.chunks(chunk.max(1)) {
        let changes: Vec<Change> = part
            .iter()
            .map(|o| Change::Add(o.clone(), ELEMENT_TIMEOUT))
            .collect();
        let results = nf.commit(&layout, &changes).expect("commit");
        let failed = results.iter().filter(|r| r.is_err()).count();
        assert_eq!(failed, 0, "{failed} adds failed in a commit");
    }
    let elapsed = started.elapsed();
    let (read_back, read_back_time) = count_in(&mut nf);
    Run {
        name: "commit",
        elapsed,
        read_back,
        read_back_time,
    }
}

fn through_nft(all: &[Opening]) -> Run {
    let (ns, mut nf) = prepared("fwbn");
    let mut script = String::with_capacity(all.len() * 40);
    script.push_str("add element inet fwnp lease4 {\n");
    for opening in all {
        let _ = writeln!(
            script,
            "  {} . tcp . {} timeout 1h,",
            opening.host, opening.ports.first
        );
    }
    script.push_str("}\n");
    let path = std::env::temp_dir().join(format!("fwnp-bench-{}.nft", std::process::id()));
    std::fs::write(&path, &script).expect("writing the nft file");
    let file = path.to_string_lossy().into_owned();
    let started = Instant::now();
    let loaded = ns.exec_checked(&["nft", "-f", &file]);
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&path);
    loaded.expect("nft -f");
    let (read_back, read_back_time) = count_in(&mut nf);
    Run {
        name: "nft -f",
        elapsed,
        read_back,
        read_back_time,
    }
}

fn main() {
    if !require_root("bench batch") {
        return;
    }
    let count = env_usize("FWNP_BENCH_ELEMENTS", 100_000);
    let chunk = env_usize("FWNP_BENCH_CHUNK", 5_000);
    let all = openings(count);
    println!("loading {count} elements with a {ELEMENT_TIMEOUT:?} timeout each, four ways");
    // The batcher as the daemons run it (watching nf_tables events, so that the kernel also
    // sends a notification per element), and without the event watch (periodic check only).
    let runs = [
        through_batcher(&all, "batcher", BatcherConfig::default()),
        through_commit(&all, chunk),
        through_nft(&all),
        through_batcher(
            &all,
            "batcher (no event watch)",
            BatcherConfig {
                watch_events: false,
                ..BatcherConfig::default()
            },
        ),
    ];
    for run in &runs {
        println!(
            "{:>24}: {:>7.3} s, {:>9.0} elements/s; read back {} in {:.3} s",
            run.name,
            run.elapsed.as_secs_f64(),
            run.rate(count),
            run.read_back,
            run.read_back_time.as_secs_f64()
        );
        assert_eq!(run.read_back, count, "{} lost elements", run.name);
    }
    let [batcher, commit, nft, quiet] = &runs;
    let ratio_batcher = batcher.rate(count) / nft.rate(count);
    let ratio_commit = commit.rate(count) / nft.rate(count);
    let ratio_quiet = quiet.rate(count) / nft.rate(count);
    println!(
        "batcher / nft -f: {ratio_batcher:.2}x; commit / nft -f: {ratio_commit:.2}x; \
         batcher without event watch / nft -f: {ratio_quiet:.2}x"
    );
    println!(
        "{{\"elements\":{count},\"commit_chunk\":{chunk},\"batcher_elements_per_s\":{:.0},\
         \"commit_elements_per_s\":{:.0},\"nft_elements_per_s\":{:.0},\
         \"batcher_no_events_elements_per_s\":{:.0},\
         \"batcher_vs_nft\":{ratio_batcher:.3},\"commit_vs_nft\":{ratio_commit:.3},\
         \"batcher_no_events_vs_nft\":{ratio_quiet:.3},\
         \"batcher_s\":{:.4},\"commit_s\":{:.4},\"nft_s\":{:.4},\"read_back_s\":{:.4}}}",
        batcher.rate(count),
        commit.rate(count),
        nft.rate(count),
        quiet.rate(count),
        batcher.elapsed.as_secs_f64(),
        commit.elapsed.as_secs_f64(),
        nft.elapsed.as_secs_f64(),
        commit.read_back_time.as_secs_f64(),
    );
}
