//! Measure the engine's I/O back ends side by side in the namespace lab of the integration
//! tests: iperf3 TCP throughput (one stream, container c1 to c2), ping RTT between the
//! containers, and the CPU time the workers used, over several alternating rounds.
//!
//! Everything runs inside namespaces this program creates and deletes; nothing touches the
//! root namespace. Run as root, in release mode:
//!
//! ```text
//! cargo run --release -p weft-engine --example lab -- --rounds 3 --seconds 10
//! ```
//!
//! Options: `--rounds N` (3), `--seconds S` (10), `--workers W` (1), `--modes LIST` (comma
//! separated from `uring`, `syscalls`, `direct`; default `uring,syscalls,direct`, where
//! `direct` routes the containers' subnets through the underlay without any overlay: the
//! machine's ceiling).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{ip, Lab};
use weft_engine::IoBackend;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Engine(IoBackend),
    Direct,
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Engine(backend) => backend.to_string(),
            Mode::Direct => "direct".to_owned(),
        }
    }
}

struct Options {
    rounds: usize,
    seconds: u32,
    workers: usize,
    modes: Vec<Mode>,
}

fn options() -> Options {
    let mut options = Options {
        rounds: 3,
        seconds: 10,
        workers: 1,
        modes: vec![
            Mode::Engine(IoBackend::Uring),
            Mode::Engine(IoBackend::Syscalls),
            Mode::Direct,
        ],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--rounds" => options.rounds = value.parse().expect("--rounds N"),
            "--seconds" => options.seconds = value.parse().expect("--seconds S"),
            "--workers" => options.workers = value.parse().expect("--workers W"),
            "--modes" => {
                options.modes = value
                    .split(',')
                    .map(|m| match m {
                        "direct" => Mode::Direct,
                        other => Mode::Engine(other.parse().expect("a mode")),
                    })
                    .collect()
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    options
}

#[derive(Debug, Default, Clone)]
struct Sample {
    gbits: f64,
    retransmits: u64,
    rtt_ms: f64,
    rtt_min_ms: f64,
    worker_cpu_s: f64,
    /// Worker CPU time per packet handled (both hosts, both directions).
    cpu_us_per_packet: f64,
    idle_cpu_s: f64,
}

fn main() {
    let options = options();
    let lab = Lab::new();
    let mut results: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for round in 0..options.rounds {
        for mode in &options.modes {
            let sample = measure(&lab, *mode, &options);
            println!(
                "round {round} {:>8}: {:6.2} Gbit/s  retr {:5}  rtt avg {:.3} min {:.3} ms  worker cpu {:.2} s ({:.2} us/packet)  idle cpu {:.3} s",
                mode.name(),
                sample.gbits,
                sample.retransmits,
                sample.rtt_ms,
                sample.rtt_min_ms,
                sample.worker_cpu_s,
                sample.cpu_us_per_packet,
                sample.idle_cpu_s
            );
            results.entry(mode.name()).or_default().push(sample);
        }
    }
    println!(
        "\nmedians over {} rounds ({} s each, {} worker(s) per host):",
        options.rounds, options.seconds, options.workers
    );
    for (mode, samples) in &results {
        let gbits = median(samples.iter().map(|s| s.gbits));
        let rtt = median(samples.iter().map(|s| s.rtt_ms));
        let rtt_min = median(samples.iter().map(|s| s.rtt_min_ms));
        let per_packet = median(samples.iter().map(|s| s.cpu_us_per_packet));
        let cpu = median(samples.iter().map(|s| s.worker_cpu_s));
        let per_cpu = if cpu > 0.0 {
            format!(
                "{:.2} Gbit per worker CPU-second",
                gbits * f64::from(options.seconds) / cpu
            )
        } else {
            String::new()
        };
        println!(
            "{mode:>8}: {gbits:6.2} Gbit/s  rtt avg {rtt:.3} min {rtt_min:.3} ms  {per_packet:.2} us CPU/packet  {per_cpu}"
        );
    }
}

fn measure(lab: &Lab, mode: Mode, options: &Options) -> Sample {
    let mut sample = Sample::default();
    match mode {
        Mode::Engine(backend) => {
            let h1 = lab.start_engine(&lab.h1, backend, options.workers);
            let h2 = lab.start_engine(&lab.h2, backend, options.workers);
            let idle_start = worker_cpu_seconds();
            std::thread::sleep(Duration::from_secs(1));
            sample.idle_cpu_s = worker_cpu_seconds() - idle_start;
            let busy_start = worker_cpu_seconds();
            run_traffic(lab, options, &mut sample);
            sample.worker_cpu_s = worker_cpu_seconds() - busy_start;
            // Packets the kernel dropped at the TUN because the worker did not read them in
            // time (the TUN's own queue is full): where TCP's losses happen.
            eprintln!(
                "  TUN tx_dropped h1 {} h2 {}",
                tun_stat(lab, &lab.h1.ns, &h1.tun, "tx_dropped"),
                tun_stat(lab, &lab.h2.ns, &h2.tun, "tx_dropped")
            );
            let a = h1.engine.shutdown();
            let b = h2.engine.shutdown();
            let packets = [&a, &b]
                .iter()
                .map(|s| s.total.tun_rx_packets + s.total.udp_rx_packets)
                .sum::<u64>();
            if packets > 0 {
                sample.cpu_us_per_packet = sample.worker_cpu_s * 1e6 / packets as f64;
            }
            eprintln!("  h1 {}\n  h2 {}", a.summary(), b.summary());
        }
        Mode::Direct => {
            ip(
                &lab.h1.ns,
                &["route", "add", "10.1.2.0/24", "via", "198.18.0.2"],
            );
            ip(
                &lab.h2.ns,
                &["route", "add", "10.1.1.0/24", "via", "198.18.0.1"],
            );
            run_traffic(lab, options, &mut sample);
            ip(&lab.h1.ns, &["route", "del", "10.1.2.0/24"]);
            ip(&lab.h2.ns, &["route", "del", "10.1.1.0/24"]);
        }
    }
    sample
}

fn run_traffic(lab: &Lab, options: &Options, sample: &mut Sample) {
    let c1 = &lab.h1.container_ns;
    let c2 = &lab.h2.container_ns;
    let dst = lab.h2.container.to_string();
    let ping = lab.exec_in(
        c1,
        &["ping", "-n", "-q", "-c", "200", "-i", "0.005", &dst],
        Duration::from_secs(30),
    );
    let ping = String::from_utf8_lossy(&ping.stdout);
    sample.rtt_ms = parse_rtt(&ping, 1).unwrap_or(f64::NAN);
    sample.rtt_min_ms = parse_rtt(&ping, 0).unwrap_or(f64::NAN);

    if options.seconds == 0 {
        return;
    }
    let server = lab.spawn_in(c2, &["iperf3", "-s", "-1", "-B", &dst]);
    std::thread::sleep(Duration::from_millis(300));
    let seconds = options.seconds.to_string();
    let client = lab.exec_in(
        c1,
        &["iperf3", "-c", &dst, "-t", &seconds, "-f", "g"],
        Duration::from_secs(u64::from(options.seconds) + 30),
    );
    lab.kill(server);
    let text = String::from_utf8_lossy(&client.stdout);
    sample.gbits = parse_gbits(&text, "receiver").unwrap_or(f64::NAN);
    sample.retransmits = parse_retransmits(&text).unwrap_or(0);
    if sample.gbits.is_nan() {
        eprintln!(
            "iperf3 output:\n{text}\n{}",
            String::from_utf8_lossy(&client.stderr)
        );
    }
}

/// Field `index` (0 min, 1 avg, 2 max) of ping's `rtt min/avg/max/mdev = a/b/c/d ms` line.
fn parse_rtt(text: &str, index: usize) -> Option<f64> {
    let line = text.lines().find(|l| l.contains("min/avg/max"))?;
    let values = line.split('=').nth(1)?.trim();
    values.split('/').nth(index)?.trim().parse().ok()
}

/// The Gbits/sec figure on iperf3's summary line ending in `which`.
fn parse_gbits(text: &str, which: &str) -> Option<f64> {
    let line = text.lines().rev().find(|l| l.trim_end().ends_with(which))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let unit = words.iter().position(|w| *w == "Gbits/sec")?;
    words.get(unit.checked_sub(1)?)?.parse().ok()
}

/// The retransmission count on iperf3's sender summary line.
fn parse_retransmits(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with("sender"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let unit = words.iter().position(|w| *w == "Gbits/sec")?;
    words.get(unit + 1)?.parse().ok()
}

/// A statistics counter of device `dev` in namespace `ns`.
fn tun_stat(lab: &Lab, ns: &str, dev: &str, name: &str) -> String {
    let path = format!("/sys/class/net/{dev}/statistics/{name}");
    let out = lab.exec_in(ns, &["cat", &path], Duration::from_secs(5));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// User plus system CPU seconds of this process's `weft-worker-*` threads, alive ones only.
fn worker_cpu_seconds() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("weft-worker") {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let Some(rest) = stat.rsplit(')').next() else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        total += (utime + stime) / ticks;
    }
    total
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.filter(|v| !v.is_nan()).collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}
