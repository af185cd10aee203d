//! How fast elements with timeouts reach the kernel: through the [`Batcher`] (with and without
//! its watch for outside changes, alternating), through [`Netfilter::commit`] in chunks, and
//! with `nft -f` from a file, in one run on one machine.
//!
//! Each path gets a fresh network namespace with the same gateway layout, loads the same
//! elements (100,000 by default, each with a one-hour timeout) and is timed from the first
//! change to the last acknowledgement (for `nft`, the whole process, as an operator would run
//! it). Every load is then read back and counted, so a fast but lossy path cannot win.
//!
//! Run as root: `cargo bench -p fwnp-netfilter --bench batch `.
//! `FWNP_BENCH_ELEMENTS` changes the number of elements, `FWNP_BENCH_CHUNK` the chunk size of
//! the commit path (default 5,000), `FWNP_BENCH_ROUNDS` how many times each batcher runs
//! (default 2; the times shown are the means). The last line printed is the result as one JSON
//! object.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use fwnp_netfilter::{
    Batcher, BatcherConfig, Change, Element, GatewayLayout, Layout, Netfilter, PortRange, Prefix,
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
fn openings(count: usize) -> Vec<Element> {
    (0..count)
        .map(|i| {
            let host = u32::try_from(i / 1000).expect("element count fits u32");
            let port = 1000 + u16::try_from(i % 1000).expect("below 1000");
            Element {
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

fn through_batcher(all: &[Element], name: &'static str, config: BatcherConfig) -> Run {
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

fn through_commit(all: &[Element], chunk: usize) -> Run {
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

/// `nft -f` of the same elements, or why it failed (some `nft` builds give up on a large file
/// with ENOBUFS): the other paths are measured all the same.
fn through_nft(all: &[Element]) -> Result<Run, String> {
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
    loaded.map_err(|e| format!("nft -f: {e}"))?;
    let (read_back, read_back_time) = count_in(&mut nf);
    Ok(Run {
        name: "nft -f",
        elapsed,
        read_back,
        read_back_time,
    })
}

fn main() {
    if !require_root("bench batch") {
        return;
    }
    let count = env_usize("FWNP_BENCH_ELEMENTS", 100_000);
    let chunk = env_usize("FWNP_BENCH_CHUNK", 5_000);
    let all = openings(count);
    println!("loading {count} elements with a {ELEMENT_TIMEOUT:?} timeout each, four ways");
    // The batcher as the daemons run it (watching for outside changes), and without the watch
    // (periodic check only): what the watch costs the batches. The two alternate, `rounds`
    // times each, so that the machine's drift weighs on both; their times are summed.
    let rounds = env_usize("FWNP_BENCH_ROUNDS", 2).max(1);
    let (mut watched, mut unwatched) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        unwatched.push(through_batcher(
            &all,
            "batcher (no watch)",
            BatcherConfig {
                watch_events: false,
                ..BatcherConfig::default()
            },
        ));
        watched.push(through_batcher(&all, "batcher", BatcherConfig::default()));
    }
    let total = |runs: Vec<Run>| Run {
        name: runs[0].name,
        elapsed: runs.iter().map(|r| r.elapsed).sum::<Duration>() / rounds as u32,
        read_back: runs.iter().map(|r| r.read_back).min().unwrap_or(0),
        read_back_time: runs.iter().map(|r| r.read_back_time).sum::<Duration>() / rounds as u32,
    };
    let (batcher, quiet) = (total(watched), total(unwatched));
    let commit = through_commit(&all, chunk);
    let nft = through_nft(&all);
    if let Err(e) = &nft {
        println!("{e}");
    }
    for run in [
        Some(&batcher),
        Some(&commit),
        nft.as_ref().ok(),
        Some(&quiet),
    ]
    .into_iter()
    .flatten()
    {
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
    let nft_rate = nft.as_ref().ok().map(|n| n.rate(count));
    let versus = |run: &Run| nft_rate.map(|n| run.rate(count) / n);
    let show = |ratio: Option<f64>| ratio.map_or("-".to_string(), |r| format!("{r:.2}x"));
    println!(
        "batcher / nft -f: {}; commit / nft -f: {}; batcher without the watch / nft -f: {}; \
         batcher / batcher without the watch: {:.2}x",
        show(versus(&batcher)),
        show(versus(&commit)),
        show(versus(&quiet)),
        batcher.rate(count) / quiet.rate(count),
    );
    let json = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
    println!(
        "{{\"elements\":{count},\"commit_chunk\":{chunk},\"batcher_elements_per_s\":{:.0},\
         \"commit_elements_per_s\":{:.0},\"nft_elements_per_s\":{},\
         \"batcher_no_watch_elements_per_s\":{:.0},\
         \"batcher_vs_nft\":{},\"commit_vs_nft\":{},\"batcher_no_watch_vs_nft\":{},\
         \"batcher_s\":{:.4},\"commit_s\":{:.4},\"nft_s\":{},\"read_back_s\":{:.4}}}",
        batcher.rate(count),
        commit.rate(count),
        json(nft_rate),
        quiet.rate(count),
        json(versus(&batcher)),
        json(versus(&commit)),
        json(versus(&quiet)),
        batcher.elapsed.as_secs_f64(),
        commit.elapsed.as_secs_f64(),
        json(nft.as_ref().ok().map(|n| n.elapsed.as_secs_f64())),
        commit.read_back_time.as_secs_f64(),
    );
}
