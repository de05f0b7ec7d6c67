//! Measure the engine side by side with the kernel in the namespace lab of the integration
//! tests: iperf3 TCP throughput (1 and 4 streams, container c1 to c2) with retransmissions,
//! ping RTT between the containers, and CPU time, over several interleaved rounds; medians at
//! the end.
//!
//! Everything runs inside namespaces this program creates and deletes; nothing touches the
//! root namespace. Run as root, in release mode:
//!
//! ```text
//! cargo run --release -p weft-engine --example lab -- --rounds 5 --seconds 10
//! ```
//!
//! Options: `--rounds N` (3), `--seconds S` (10), `--workers W` (1), `--streams LIST` (`1,4`),
//! `--modes LIST` (comma separated; default
//! `uring,syscalls,uring-notun,uring-nogso,uring-nogro,uring-none,vxlan,direct`), where
//!
//! - `uring`, `syscalls`: weft with that I/O back end and every offload; a suffix switches
//!   offloads off: `-notun` (TUN TSO and coalescing; the TUN is opened without a virtio-net
//!   header), `-nogso` (UDP GSO), `-nogro` (UDP GRO), `-none` (all three);
//! - `vxlan`: the kernel's VXLAN, set up as flannel's vxlan backend does (VNI 1, port 8472,
//!   `nolearning`, MTU 1450, the subnet's `.0/32` on `flannel.1`, an `onlink` route via the
//!   peer's `.0`, permanent neighbour and FDB entries); the containers get MTU 1450 as flannel
//!   would give them;
//! - `direct`: each host routes the other's container subnet through the underlay, no overlay
//!   at all (flannel's host-gw): the machine's ceiling.
//!
//! CPU is measured two ways while iperf3 runs: the whole machine's busy time (every process
//! and the kernel's softirq work, so comparable across modes, but also counting anything else
//! the machine runs meanwhile) and, for weft, its worker threads alone.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{ip, Host, Lab, TUN_MTU};
use weft_engine::{IoBackend, Offloads};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Engine(IoBackend, Offloads),
    Vxlan,
    Direct,
}

/// The mode names' offload suffixes.
const SUFFIXES: [(&str, Offloads); 5] = [
    ("", Offloads::ALL),
    (
        "-notun",
        Offloads {
            tun: false,
            ..Offloads::ALL
        },
    ),
    (
        "-nogso",
        Offloads {
            udp_gso: false,
            ..Offloads::ALL
        },
    ),
    (
        "-nogro",
        Offloads {
            udp_gro: false,
            ..Offloads::ALL
        },
    ),
    ("-none", Offloads::NONE),
];

impl Mode {
    fn parse(name: &str) -> Mode {
        match name {
            "vxlan" => return Mode::Vxlan,
            "direct" => return Mode::Direct,
            _ => {}
        }
        for backend in IoBackend::ALL {
            for (suffix, offloads) in SUFFIXES {
                if name == format!("{backend}{suffix}") {
                    return Mode::Engine(backend, offloads);
                }
            }
        }
        panic!("unknown mode {name}");
    }

    fn name(self) -> String {
        match self {
            Mode::Engine(backend, offloads) => {
                let suffix = SUFFIXES
                    .iter()
                    .find(|(_, o)| *o == offloads)
                    .map_or("-custom", |(s, _)| s);
                format!("{backend}{suffix}")
            }
            Mode::Vxlan => "vxlan".to_owned(),
            Mode::Direct => "direct".to_owned(),
        }
    }
}

struct Options {
    rounds: usize,
    seconds: u32,
    workers: usize,
    streams: Vec<u32>,
    modes: Vec<Mode>,
}

fn options() -> Options {
    let mut options = Options {
        rounds: 3,
        seconds: 10,
        workers: 1,
        streams: vec![1, 4],
        modes: "uring,syscalls,uring-notun,uring-nogso,uring-nogro,uring-none,vxlan,direct"
            .split(',')
            .map(Mode::parse)
            .collect(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--rounds" => options.rounds = value.parse().expect("--rounds N"),
            "--seconds" => options.seconds = value.parse().expect("--seconds S"),
            "--workers" => options.workers = value.parse().expect("--workers W"),
            "--streams" => {
                options.streams = value
                    .split(',')
                    .map(|s| s.parse().expect("--streams 1,4"))
                    .collect()
            }
            "--modes" => options.modes = value.split(',').map(Mode::parse).collect(),
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    options
}

/// One iperf3 run.
#[derive(Debug, Default, Clone)]
struct Transfer {
    gbits: f64,
    retransmits: u64,
    /// Busy CPU seconds of the whole machine during the run.
    system_cpu_s: f64,
    /// CPU seconds of this lab's processes (iperf3, weft's workers) and of the kernel's
    /// softirq threads during the run.
    process_cpu_s: f64,
    /// CPU seconds of weft's workers during the run.
    worker_cpu_s: f64,
}

/// One mode in one round.
#[derive(Debug, Default, Clone)]
struct Sample {
    rtt_ms: f64,
    rtt_min_ms: f64,
    /// By stream count.
    transfers: BTreeMap<u32, Transfer>,
}

fn main() {
    let options = options();
    let lab = Lab::new();
    let mut results: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    let order: Vec<String> = options.modes.iter().map(|m| m.name()).collect();
    for round in 0..options.rounds {
        for mode in &options.modes {
            let sample = measure(&lab, *mode, &options);
            let transfers: Vec<String> = sample
                .transfers
                .iter()
                .map(|(streams, t)| {
                    format!(
                        "P{streams} {:6.2} Gbit/s retr {:5} cpu sys {:5.2} proc {:5.2} s",
                        t.gbits, t.retransmits, t.system_cpu_s, t.process_cpu_s
                    )
                })
                .collect();
            println!(
                "round {round} {:>14}: rtt avg {:.3} min {:.3} ms  {}",
                mode.name(),
                sample.rtt_ms,
                sample.rtt_min_ms,
                transfers.join("  ")
            );
            results.entry(mode.name()).or_default().push(sample);
        }
    }
    println!(
        "\nmedians over {} rounds ({} s per transfer, {} worker(s) per host); Gbit per CPU-second \
         by the whole machine's busy time (sys), by the lab's processes and softirq threads \
         (proc), and by weft's workers alone [workers]:",
        options.rounds, options.seconds, options.workers
    );
    println!(
        "| mode | streams | Gbit/s | retransmits | Gbit per CPU-s (sys) | (proc) | [workers] \
         | ping avg ms | ping min ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mode in &order {
        let Some(samples) = results.get(mode) else {
            continue;
        };
        let rtt = median(samples.iter().map(|s| s.rtt_ms));
        let rtt_min = median(samples.iter().map(|s| s.rtt_min_ms));
        for streams in &options.streams {
            let runs: Vec<&Transfer> = samples
                .iter()
                .filter_map(|s| s.transfers.get(streams))
                .collect();
            let seconds = f64::from(options.seconds);
            let gbits = median(runs.iter().map(|t| t.gbits));
            let retr = median(runs.iter().map(|t| t.retransmits as f64));
            let per_cpu = median(
                runs.iter()
                    .map(|t| t.gbits * seconds / t.system_cpu_s.max(1e-9)),
            );
            let per_process = median(
                runs.iter()
                    .map(|t| t.gbits * seconds / t.process_cpu_s.max(1e-9)),
            );
            let per_worker = median(
                runs.iter()
                    .filter(|t| t.worker_cpu_s > 0.0)
                    .map(|t| t.gbits * seconds / t.worker_cpu_s),
            );
            let worker = if per_worker.is_nan() {
                "-".to_owned()
            } else {
                format!("[{per_worker:.1}]")
            };
            println!(
                "| {mode} | {streams} | {gbits:.2} | {retr:.0} | {per_cpu:.2} | {per_process:.2} \
                 | {worker} | {rtt:.3} | {rtt_min:.3} |"
            );
        }
    }
}

fn measure(lab: &Lab, mode: Mode, options: &Options) -> Sample {
    match mode {
        Mode::Engine(backend, offloads) => {
            let h1 = lab.start_engine_with(&lab.h1, backend, options.workers, offloads);
            let h2 = lab.start_engine_with(&lab.h2, backend, options.workers, offloads);
            let sample = run_traffic(lab, options);
            // Packets the kernel dropped at the TUN because the worker did not read them in
            // time (the TUN's own queue is full): where TCP's losses happen.
            eprintln!(
                "  {} offloads {:?}; TUN tx_dropped h1 {} h2 {}",
                mode.name(),
                h1.engine.offloads(),
                tun_stat(lab, &lab.h1.ns, &h1.tun, "tx_dropped"),
                tun_stat(lab, &lab.h2.ns, &h2.tun, "tx_dropped")
            );
            let a = h1.engine.shutdown();
            let b = h2.engine.shutdown();
            eprintln!("  h1 {}\n  h2 {}", a.summary(), b.summary());
            sample
        }
        Mode::Vxlan => {
            set_container_mtu(lab, VXLAN_MTU);
            for (host, peer) in [(&lab.h1, &lab.h2), (&lab.h2, &lab.h1)] {
                vxlan_up(host, peer);
            }
            let sample = run_traffic(lab, options);
            for host in [&lab.h1, &lab.h2] {
                ip(&host.ns, &["link", "del", VXLAN_DEV]);
            }
            set_container_mtu(lab, TUN_MTU);
            sample
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
            let sample = run_traffic(lab, options);
            ip(&lab.h1.ns, &["route", "del", "10.1.2.0/24"]);
            ip(&lab.h2.ns, &["route", "del", "10.1.1.0/24"]);
            sample
        }
    }
}

/// flannel's VXLAN device name and MTU (the underlay's 1500 minus 50).
const VXLAN_DEV: &str = "flannel.1";
const VXLAN_MTU: usize = 1450;

/// The VTEP MAC address of `host`, fixed so that the peer's entries can be written up front
/// (flannel publishes it in the lease).
fn vtep_mac(host: &Host) -> String {
    format!("0e:00:00:00:00:{:02x}", host.public.octets()[3])
}

/// Set up `host`'s VXLAN device and its entries for `peer`, as flannel's vxlan backend does.
fn vxlan_up(host: &Host, peer: &Host) {
    let ns = &host.ns;
    let local = host.public.to_string();
    let mac = vtep_mac(host);
    ip(
        ns,
        &[
            "link",
            "add",
            VXLAN_DEV,
            "address",
            &mac,
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ],
    );
    ip(
        ns,
        &[
            "link",
            "set",
            VXLAN_DEV,
            "mtu",
            &VXLAN_MTU.to_string(),
            "up",
        ],
    );
    ip(
        ns,
        &[
            "addr",
            "add",
            &format!("{}/32", host.subnet),
            "dev",
            VXLAN_DEV,
        ],
    );
    let peer_vtep = peer.subnet.to_string();
    let peer_mac = vtep_mac(peer);
    ip(
        ns,
        &[
            "neigh",
            "replace",
            &peer_vtep,
            "lladdr",
            &peer_mac,
            "dev",
            VXLAN_DEV,
            "nud",
            "permanent",
        ],
    );
    let status = std::process::Command::new("bridge")
        .args([
            "-n",
            ns,
            "fdb",
            "replace",
            &peer_mac,
            "dev",
            VXLAN_DEV,
            "dst",
            &peer.public.to_string(),
            "self",
            "permanent",
        ])
        .status()
        .expect("run bridge");
    assert!(status.success(), "bridge fdb replace failed");
    ip(
        ns,
        &[
            "route",
            "add",
            &format!("{}/24", peer.subnet),
            "via",
            &peer_vtep,
            "dev",
            VXLAN_DEV,
            "onlink",
        ],
    );
}

/// Give both containers' links (and the host ends) `mtu`.
fn set_container_mtu(lab: &Lab, mtu: usize) {
    let mtu = mtu.to_string();
    for host in [&lab.h1, &lab.h2] {
        ip(&host.container_ns, &["link", "set", "eth0", "mtu", &mtu]);
        ip(&host.ns, &["link", "set", "to-c", "mtu", &mtu]);
    }
}

fn run_traffic(lab: &Lab, options: &Options) -> Sample {
    let mut sample = Sample::default();
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
        return sample;
    }
    for &streams in &options.streams {
        let transfer = iperf(lab, c1, c2, &dst, streams, options.seconds);
        sample.transfers.insert(streams, transfer);
    }
    sample
}

fn iperf(lab: &Lab, c1: &str, c2: &str, dst: &str, streams: u32, seconds: u32) -> Transfer {
    let server = lab.spawn_in(c2, &["iperf3", "-s", "-1", "-B", dst]);
    std::thread::sleep(Duration::from_millis(300));
    let cpu_before = system_busy_seconds();
    let process_before = process_cpu_seconds();
    let workers_before = worker_cpu_seconds();
    let client = lab.exec_in(
        c1,
        &[
            "iperf3",
            "-c",
            dst,
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-f",
            "g",
        ],
        Duration::from_secs(u64::from(seconds) + 30),
    );
    let transfer_cpu = system_busy_seconds() - cpu_before;
    let workers = worker_cpu_seconds() - workers_before;
    // The server is reaped by the kill, so its CPU time joins this process's children's.
    lab.kill(server);
    let process_cpu = process_cpu_seconds() - process_before;
    let text = String::from_utf8_lossy(&client.stdout);
    let transfer = Transfer {
        gbits: parse_gbits(&text, "receiver").unwrap_or(f64::NAN),
        retransmits: parse_retransmits(&text).unwrap_or(0),
        system_cpu_s: transfer_cpu,
        process_cpu_s: process_cpu,
        worker_cpu_s: workers,
    };
    if transfer.gbits.is_nan() {
        eprintln!(
            "iperf3 output:\n{text}\n{}",
            String::from_utf8_lossy(&client.stderr)
        );
    }
    transfer
}

/// Field `index` (0 min, 1 avg, 2 max) of ping's `rtt min/avg/max/mdev = a/b/c/d ms` line.
fn parse_rtt(text: &str, index: usize) -> Option<f64> {
    let line = text.lines().find(|l| l.contains("min/avg/max"))?;
    let values = line.split('=').nth(1)?.trim();
    values.split('/').nth(index)?.trim().parse().ok()
}

/// The Gbits/sec figure on iperf3's last summary line ending in `which` (the `[SUM]` line
/// with several streams).
fn parse_gbits(text: &str, which: &str) -> Option<f64> {
    let line = text.lines().rev().find(|l| l.trim_end().ends_with(which))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let unit = words.iter().position(|w| *w == "Gbits/sec")?;
    words.get(unit.checked_sub(1)?)?.parse().ok()
}

/// The retransmission count on iperf3's last sender summary line.
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

/// Busy CPU seconds of the whole machine so far: every CPU's time outside idle and iowait.
fn system_busy_seconds() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| fields.get(*i))
        .sum();
    busy / ticks
}

/// CPU seconds used so far by this process (all its threads), its reaped children, and the
/// kernel's `ksoftirqd` threads (which carry network work when the CPUs are saturated).
fn process_cpu_seconds() -> f64 {
    let usage = |who: libc::c_int| {
        // SAFETY: `rusage` is plain integers; all zeroes is valid, and getrusage fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::getrusage(who, &mut usage) };
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        seconds(usage.ru_utime) + seconds(usage.ru_stime)
    };
    let mut total = usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("ksoftirqd") {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
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
