//! A two-host overlay lab in network namespaces, for the engine's integration tests.
//!
//! ```text
//!   c1 (10.1.1.2/24) ── cbr0 10.1.1.1 ─ h1 (198.18.0.1) ─┐
//!                                                       ├─ br0 in u ─ h3 (198.18.0.3)
//!   c2 (10.1.2.2/24) ── cbr0 10.1.2.1 ─ h2 (198.18.0.2) ─┘
//! ```
//!
//! Every namespace is created by this process under a name unique to the run
//! (`wfe-<pid>-<n>-<role>`) and deleted when the [`Lab`] is dropped, also when a test panics;
//! processes started in it are killed by PID. Nothing is added to the root namespace. The
//! engine itself runs in the test process: a thread enters the host's namespace with
//! `setns(2)`, opens the TUN there and starts the engine, whose worker threads inherit the
//! namespace.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use weft_engine::{
    open_queues_with, Engine, EngineConfig, Groups, IcmpRateLimit, IoBackend, MulticastConfig,
    Offloads, Overlay, Policy, RouteTable, Routes, Tunnels, OVERHEAD,
};

/// The overlay every lab uses: flannel's example Network cut into /24 subnets.
pub const NETWORK: &str = "10.1.0.0/16";
/// The udp backend's port.
pub const PORT: u16 = 8285;
/// The subnet leased to h3 in every engine's route table.
pub const H3_SUBNET: &str = "10.1.3.0/24";
/// The TUN (and container) MTU: the underlay's 1500 minus 28.
pub const TUN_MTU: usize = 1472;
/// The TUN MTU with encryption between hosts: what encryption adds is given up.
pub const ENCRYPTED_MTU: usize = TUN_MTU - OVERHEAD;
/// The name pattern the TUN is created with; the first device in a namespace is `flannel0`.
pub const TUN_PATTERN: &str = "flannel%d";

static NEXT_LAB: AtomicUsize = AtomicUsize::new(0);

/// One host of the lab: its namespace, underlay address, container namespace and subnet.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    pub public: Ipv4Addr,
    pub container_ns: String,
    /// The host's subnet, e.g. 10.1.1.0 for h1.
    pub subnet: Ipv4Addr,
    /// The container's address, e.g. 10.1.1.2.
    pub container: Ipv4Addr,
}

/// The namespaces of one test, deleted on drop.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Mutex<Vec<Child>>,
    pub h1: Host,
    pub h2: Host,
    /// A third underlay host that holds no lease: the attacker.
    pub h3_ns: String,
    pub h3_public: Ipv4Addr,
}

impl Lab {
    /// Build the whole topology. Panics (failing the test) with a clear message when a
    /// prerequisite is missing.
    pub fn new() -> Lab {
        check_prerequisites();
        remove_stale_namespaces();
        let prefix = format!(
            "wfe-{}-{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let name = |role: &str| format!("{prefix}-{role}");
        let host = |n: u8| Host {
            ns: name(&format!("h{n}")),
            public: Ipv4Addr::new(198, 18, 0, n),
            container_ns: name(&format!("c{n}")),
            subnet: Ipv4Addr::new(10, 1, n, 0),
            container: Ipv4Addr::new(10, 1, n, 2),
        };
        let mut lab = Lab {
            namespaces: Vec::new(),
            children: Mutex::new(Vec::new()),
            h1: host(1),
            h2: host(2),
            h3_ns: name("h3"),
            h3_public: Ipv4Addr::new(198, 18, 0, 3),
            prefix: prefix.clone(),
        };
        let underlay = name("u");
        let all = [
            underlay.clone(),
            lab.h1.ns.clone(),
            lab.h2.ns.clone(),
            lab.h3_ns.clone(),
            lab.h1.container_ns.clone(),
            lab.h2.container_ns.clone(),
        ];
        for ns in &all {
            // Registered before creation so that a failure half-way still cleans up.
            lab.namespaces.push(ns.clone());
            run(&["ip", "netns", "add", ns]);
            sysctl(
                ns,
                &[
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            );
            ip(ns, &["link", "set", "lo", "up"]);
        }

        ip(&underlay, &["link", "add", "br0", "type", "bridge"]);
        ip(&underlay, &["link", "set", "br0", "up"]);
        let hosts = [
            (lab.h1.ns.clone(), lab.h1.public),
            (lab.h2.ns.clone(), lab.h2.public),
            (lab.h3_ns.clone(), lab.h3_public),
        ];
        for (i, (ns, public)) in hosts.iter().enumerate() {
            let port = format!("to-h{}", i + 1);
            ip(
                &underlay,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            );
            ip(&underlay, &["link", "set", &port, "master", "br0", "up"]);
            ip(ns, &["addr", "add", &format!("{public}/24"), "dev", "eth0"]);
            ip(ns, &["link", "set", "eth0", "up"]);
        }

        for host in [&lab.h1, &lab.h2] {
            let gateway = Ipv4Addr::from(u32::from(host.subnet) + 1);
            let mtu = TUN_MTU.to_string();
            sysctl(&host.ns, &["net.ipv4.ip_forward=1"]);
            ip(&host.ns, &["link", "add", "cbr0", "type", "bridge"]);
            ip(
                &host.ns,
                &["addr", "add", &format!("{gateway}/24"), "dev", "cbr0"],
            );
            ip(
                &host.ns,
                &[
                    "link",
                    "add",
                    "to-c",
                    "mtu",
                    &mtu,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "mtu",
                    &mtu,
                    "netns",
                    &host.container_ns,
                ],
            );
            ip(&host.ns, &["link", "set", "to-c", "master", "cbr0", "up"]);
            ip(&host.ns, &["link", "set", "cbr0", "up"]);
            let c = &host.container_ns;
            ip(
                c,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", host.container),
                    "dev",
                    "eth0",
                ],
            );
            ip(c, &["link", "set", "eth0", "up"]);
            ip(c, &["route", "add", "default", "via", &gateway.to_string()]);
        }
        lab
    }

    /// Add a container namespace `role` on `host`'s bridge with address `addr` (in the host's
    /// subnet) and link MTU `mtu`; returns the namespace's name.
    pub fn add_container(&mut self, host: &Host, role: &str, addr: Ipv4Addr, mtu: usize) -> String {
        let ns = format!("{}-{role}", self.prefix);
        self.namespaces.push(ns.clone());
        run(&["ip", "netns", "add", &ns]);
        sysctl(
            &ns,
            &[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        ip(&ns, &["link", "set", "lo", "up"]);
        let port = format!("to-{role}");
        let mtu = mtu.to_string();
        ip(
            &host.ns,
            &[
                "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu",
                &mtu, "netns", &ns,
            ],
        );
        ip(&host.ns, &["link", "set", &port, "master", "cbr0", "up"]);
        ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&ns, &["link", "set", "eth0", "up"]);
        let gateway = Ipv4Addr::from(u32::from(host.subnet) + 1);
        ip(
            &ns,
            &["route", "add", "default", "via", &gateway.to_string()],
        );
        ns
    }

    /// The name prefix of this lab's namespaces.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The route table `host` runs with: its own subnet, the other host's, and h3's lease of
    /// [`H3_SUBNET`] (h3 runs no engine: it is a lease holder that misbehaves).
    pub fn routes_for(&self, host: &Host) -> Routes {
        let overlay = Overlay::new(NETWORK.parse().unwrap(), 24).unwrap();
        let peers = [&self.h1, &self.h2]
            .into_iter()
            .filter(|other| other.ns != host.ns)
            .map(|other| (subnet_of(other), other.public))
            .chain([(H3_SUBNET.parse().unwrap(), self.h3_public)]);
        Routes::new(RouteTable::build(overlay, PORT, Some(subnet_of(host)), peers).unwrap())
    }

    /// Open a `workers`-queue TUN in `host`'s namespace, configure it as flanneld does and
    /// start the engine there, with every offload.
    pub fn start_engine(&self, host: &Host, backend: IoBackend, workers: usize) -> RunningEngine {
        self.start_engine_with(host, backend, workers, Offloads::ALL)
    }

    /// Like [`Lab::start_engine`], with the given offloads; without TUN offloads the TUN is
    /// opened without a virtio-net header, as the udp backend always did.
    pub fn start_engine_with(
        &self,
        host: &Host,
        backend: IoBackend,
        workers: usize,
        offloads: Offloads,
    ) -> RunningEngine {
        self.start_engine_limited(host, backend, workers, offloads, IcmpRateLimit::DEFAULT)
    }

    /// Like [`Lab::start_engine_with`], with ICMP errors limited to `icmp_rate_limit` per
    /// worker.
    pub fn start_engine_limited(
        &self,
        host: &Host,
        backend: IoBackend,
        workers: usize,
        offloads: Offloads,
        icmp_rate_limit: IcmpRateLimit,
    ) -> RunningEngine {
        self.start_engine_full(
            host,
            backend,
            workers,
            offloads,
            icmp_rate_limit,
            None,
            Groups::default(),
            weft_engine::DEFAULT_BUSY_POLL,
        )
    }

    /// Start the engine on `host` with two workers, every offload, and workers that look for
    /// packets for up to `busy_poll` before they sleep.
    pub fn start_engine_polling(
        &self,
        host: &Host,
        backend: IoBackend,
        busy_poll: Duration,
    ) -> RunningEngine {
        self.start_engine_full(
            host,
            backend,
            2,
            Offloads::ALL,
            IcmpRateLimit::DEFAULT,
            None,
            Groups::default(),
            busy_poll,
        )
    }

    /// Start the engine on `host` with two workers, every offload, and `multicast` with the
    /// peers `groups` lists.
    pub fn start_engine_multicast(
        &self,
        host: &Host,
        backend: IoBackend,
        multicast: Option<MulticastConfig>,
        groups: Groups,
    ) -> RunningEngine {
        self.start_engine_full(
            host,
            backend,
            2,
            Offloads::ALL,
            IcmpRateLimit::DEFAULT,
            multicast,
            groups,
            weft_engine::DEFAULT_BUSY_POLL,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start_engine_full(
        &self,
        host: &Host,
        backend: IoBackend,
        workers: usize,
        offloads: Offloads,
        icmp_rate_limit: IcmpRateLimit,
        multicast: Option<MulticastConfig>,
        groups: Groups,
        busy_poll: Duration,
    ) -> RunningEngine {
        self.start_engine_on(
            host,
            EngineConfig {
                workers,
                bind: SocketAddrV4::new(host.public, PORT),
                io: backend,
                policy: Policy {
                    tun_mtu: TUN_MTU,
                    allow_foreign_sources: false,
                },
                pin_cores: false,
                offloads,
                icmp_rate_limit,
                multicast,
                busy_poll,
            },
            groups,
            None,
        )
    }

    /// Start the engine on `host` with `workers` workers, every offload, and encryption
    /// between hosts with `tunnels`; the TUN MTU gives up what encryption adds
    /// ([`ENCRYPTED_MTU`]).
    pub fn start_engine_encrypted(
        &self,
        host: &Host,
        workers: usize,
        tunnels: Tunnels,
    ) -> RunningEngine {
        let config = EngineConfig {
            workers,
            bind: SocketAddrV4::new(host.public, PORT),
            io: IoBackend::Syscalls,
            policy: Policy {
                tun_mtu: ENCRYPTED_MTU,
                allow_foreign_sources: false,
            },
            pin_cores: false,
            offloads: Offloads::ALL,
            icmp_rate_limit: IcmpRateLimit::DEFAULT,
            multicast: None,
            busy_poll: weft_engine::DEFAULT_BUSY_POLL,
        };
        self.start_engine_on(host, config, Groups::default(), Some(tunnels))
    }

    fn start_engine_on(
        &self,
        host: &Host,
        config: EngineConfig,
        groups: Groups,
        tunnels: Option<Tunnels>,
    ) -> RunningEngine {
        let routes = self.routes_for(host);
        let ns = host.ns.clone();
        let subnet = host.subnet;
        in_netns(&host.ns, move || {
            let queues = open_queues_with(TUN_PATTERN, config.workers, config.offloads.tun)
                .expect("open TUN queues");
            let tun = queues[0].name().to_owned();
            configure_tun(&ns, &tun, subnet, config.policy.tun_mtu);
            let engine =
                Engine::start_with(config, queues, routes, groups, tunnels).expect("start engine");
            RunningEngine { engine, tun }
        })
    }

    /// Start a process in `ns` (killed when the lab is dropped, if still running).
    pub fn spawn_in(&self, ns: &str, argv: &[&str]) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {argv:?} in {ns}: {e}"));
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Wait for a process started with [`Lab::spawn_in`] and collect its output.
    pub fn wait_for(&self, pid: u32) -> Output {
        let child = {
            let mut children = self.children.lock().unwrap();
            let index = children
                .iter()
                .position(|c| c.id() == pid)
                .expect("unknown child");
            children.swap_remove(index)
        };
        child.wait_with_output().expect("wait for child")
    }

    /// Run a command in `ns` to completion (killed after `timeout`).
    pub fn exec_in(&self, ns: &str, argv: &[&str], timeout: Duration) -> Output {
        let pid = self.spawn_in(ns, argv);
        let deadline = Instant::now() + timeout;
        loop {
            let finished = {
                let mut children = self.children.lock().unwrap();
                let child = children.iter_mut().find(|c| c.id() == pid).unwrap();
                child.try_wait().expect("poll child").is_some()
            };
            if finished {
                return self.wait_for(pid);
            }
            if Instant::now() > deadline {
                self.kill(pid);
                panic!("{argv:?} in {ns} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill a process started with [`Lab::spawn_in`], by its PID.
    pub fn kill(&self, pid: u32) {
        let mut children = self.children.lock().unwrap();
        if let Some(index) = children.iter().position(|c| c.id() == pid) {
            let mut child = children.swap_remove(index);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `ping` from `ns` to `dst`; the output text.
    pub fn ping(&self, ns: &str, dst: Ipv4Addr, count: u32) -> String {
        let count = count.to_string();
        let dst = dst.to_string();
        let out = self.exec_in(
            ns,
            &["ping", "-n", "-c", &count, "-i", "0.05", "-W", "2", &dst],
            Duration::from_secs(20),
        );
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Assert that `count` pings from `ns` to `dst` all come back.
    pub fn assert_ping(&self, ns: &str, dst: Ipv4Addr, count: u32) {
        let text = self.ping(ns, dst, count);
        assert!(
            text.contains(&format!(
                "{count} packets transmitted, {count} received, 0% packet loss"
            )),
            "ping {dst} from {ns} lost packets:\n{text}"
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(mut children) = self.children.lock() {
            for child in children.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            children.clear();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// An engine running in a host namespace, with the name its TUN got.
pub struct RunningEngine {
    pub engine: Engine,
    pub tun: String,
}

fn subnet_of(host: &Host) -> ipnet::Ipv4Net {
    ipnet::Ipv4Net::new(host.subnet, 24).unwrap()
}

/// Address the TUN, set its MTU, bring it up and route the Network through it, as flanneld
/// does; IPv6 is off so the device stays quiet.
fn configure_tun(ns: &str, tun: &str, subnet: Ipv4Addr, mtu: usize) {
    sysctl(ns, &[&format!("net.ipv6.conf.{tun}.disable_ipv6=1")]);
    ip(ns, &["addr", "add", &format!("{subnet}/32"), "dev", tun]);
    ip(ns, &["link", "set", tun, "mtu", &mtu.to_string(), "up"]);
    ip(ns, &["route", "add", NETWORK, "dev", tun]);
}

/// Run `f` on a new thread that has entered network namespace `ns`, and return its result.
/// Threads `f` starts stay in that namespace.
pub fn in_netns<T, F>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn_in_netns(ns, f)
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Like [`in_netns`], but without waiting for the thread.
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = netns_path(ns);
    std::thread::spawn(move || {
        enter_netns(&path);
        f()
    })
}

fn netns_path(ns: &str) -> PathBuf {
    ["/run/netns", "/var/run/netns"]
        .iter()
        .map(|dir| PathBuf::from(dir).join(ns))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("namespace {ns} has no file under /run/netns"))
}

fn enter_netns(path: &PathBuf) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns takes an open namespace descriptor and a namespace type; it changes only
    // the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Run `ip -n ns args...`, failing the test on error.
pub fn ip(ns: &str, args: &[&str]) {
    let mut argv = vec!["ip", "-n", ns];
    argv.extend_from_slice(args);
    run(&argv);
}

/// Run `bridge -n ns args...`, failing the test on error.
pub fn bridge(ns: &str, args: &[&str]) {
    let mut argv = vec!["bridge", "-n", ns];
    argv.extend_from_slice(args);
    run(&argv);
}

/// Whether `dev` exists in `ns`.
pub fn link_exists(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", dev])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn sysctl(ns: &str, settings: &[&str]) {
    let mut argv = vec!["ip", "netns", "exec", ns, "sysctl", "-q", "-w"];
    argv.extend_from_slice(settings);
    run(&argv);
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_prerequisites() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "the engine's namespace tests must run as root (they create network namespaces and TUN devices)");
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: load the tun module"
    );
    for tool in ["ip", "ping"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(found, "`{tool}` is not installed (iproute2 / iputils-ping)");
    }
}

/// Delete namespaces left by earlier runs of these tests whose process is gone (a run killed
/// with SIGKILL cannot clean up after itself).
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.splitn(4, '-');
        let (Some("wfe"), Some(pid), Some(n), Some(_role)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u32>()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Poll `condition` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A deterministic pseudo-random byte stream (xorshift64*), so that sender and receiver
/// agree on every byte without sharing memory.
pub struct Stream(u64);

impl Stream {
    pub fn new(seed: u64) -> Self {
        Stream(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Send `total` bytes of the stream `seed` over TCP from `from_ns` to `to`:`port` and check
/// that the receiver in `to_ns` gets exactly those bytes. Returns the byte count received.
pub fn tcp_transfer(from_ns: &str, to_ns: &str, to: Ipv4Addr, port: u16, total: usize, seed: u64) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let receiver = spawn_in_netns(to_ns, move || -> Result<usize, String> {
        let listener =
            TcpListener::bind(SocketAddrV4::new(to, port)).map_err(|e| format!("bind: {e}"))?;
        ready_tx.send(()).map_err(|e| e.to_string())?;
        let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut expected = Stream::new(seed);
        let mut got = vec![0u8; 64 * 1024];
        // The expected bytes, generated a block at a time; `used` of them are compared.
        let mut want = vec![0u8; 64 * 1024];
        let mut used = want.len();
        let mut received = 0usize;
        loop {
            let n = conn
                .read(&mut got)
                .map_err(|e| format!("read after {received}: {e}"))?;
            if n == 0 {
                break;
            }
            let mut offset = 0;
            while offset < n {
                if used == want.len() {
                    expected.fill(&mut want);
                    used = 0;
                }
                let take = (want.len() - used).min(n - offset);
                if got[offset..offset + take] != want[used..used + take] {
                    return Err(format!("byte {} differs", received + offset));
                }
                offset += take;
                used += take;
            }
            received += n;
        }
        Ok(received)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("receiver did not start");
    let dst = SocketAddrV4::new(to, port);
    let sender = spawn_in_netns(from_ns, move || -> Result<(), String> {
        let mut conn = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        conn.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut stream = Stream::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = (total - sent).min(buf.len());
            stream.fill(&mut buf[..n]);
            conn.write_all(&buf[..n])
                .map_err(|e| format!("write after {sent}: {e}"))?;
            sent += n;
        }
        conn.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())
    });
    sender.join().unwrap().expect("TCP sender");
    let received = receiver.join().unwrap().expect("TCP receiver");
    assert_eq!(received, total, "receiver got {received} of {total} bytes");
}

/// Listen for UDP datagrams on `addr` in `ns` for `window`. The receiver fires once the socket
/// is bound; the thread returns every payload that arrived.
pub fn udp_listener(
    ns: &str,
    addr: SocketAddrV4,
    window: Duration,
) -> (mpsc::Receiver<()>, std::thread::JoinHandle<Vec<Vec<u8>>>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = spawn_in_netns(ns, move || {
        let socket = UdpSocket::bind(addr).expect("bind listener");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }
        got
    });
    (ready_rx, handle)
}

/// A UDP socket bound to `addr` in `ns`, handed back to the caller's thread (the socket stays
/// in the namespace it was created in).
pub fn udp_socket_in(ns: &str, addr: SocketAddrV4) -> UdpSocket {
    in_netns(ns, move || UdpSocket::bind(addr).expect("bind UDP socket"))
}

/// An IPv4/UDP packet from `src`:`sport` to `dst`:`dport` carrying `payload`.
pub fn ipv4_udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 64).udp(sport, dport);
    let mut packet = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut packet, payload).unwrap();
    packet
}

/// How many descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Bytes of each TCP stream in [`concurrent_flows`].
const STREAM_BYTES: usize = 32 << 20;
/// Request/response round trips in [`concurrent_flows`].
const ROUND_TRIPS: u64 = 2_000;
/// Bytes of each request and reply.
const MESSAGE: usize = 64;
/// What the client sends when it is done.
const END: &[u8] = b"end";

/// Four TCP streams from h1's container to h2's and back-to-back UDP requests and replies at
/// the same time, every byte compared at the receiving end; `seed` varies the bytes.
pub fn concurrent_flows(lab: &Lab, seed: u64) {
    // The responder: answers every request with its bytes reversed.
    let server_addr = SocketAddrV4::new(lab.h2.container, 7000);
    let server = in_netns(&lab.h2.container_ns, move || {
        UdpSocket::bind(server_addr).expect("bind the responder")
    });
    server
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let responder = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut answered = 0u64;
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            if buf[..n] == *END {
                break;
            }
            buf[..n].reverse();
            server.send_to(&buf[..n], from).expect("reply");
            answered += 1;
        }
        answered
    });

    let streams: Vec<_> = (0..4u16)
        .map(|i| {
            let (from, to, dst) = (
                lab.h1.container_ns.clone(),
                lab.h2.container_ns.clone(),
                lab.h2.container,
            );
            std::thread::spawn(move || {
                tcp_transfer(&from, &to, dst, 5300 + i, STREAM_BYTES, seed + u64::from(i))
            })
        })
        .collect();

    let client_addr = SocketAddrV4::new(lab.h1.container, 7001);
    let client = spawn_in_netns(&lab.h1.container_ns, move || -> Result<u64, String> {
        let socket = UdpSocket::bind(client_addr).map_err(|e| format!("bind: {e}"))?;
        socket.connect(server_addr).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut request = [0u8; MESSAGE];
        let mut reply = [0u8; 2048];
        let mut answered = 0u64;
        for seq in 0..ROUND_TRIPS {
            Stream::new((seed + 0x1000) ^ seq).fill(&mut request);
            request[..8].copy_from_slice(&seq.to_le_bytes());
            socket.send(&request).map_err(|e| e.to_string())?;
            // A lost request or reply (the TCP streams fill the queues) is sent again; a late
            // reply to an earlier request is skipped.
            loop {
                match socket.recv(&mut reply) {
                    Ok(n) => {
                        reply[..n].reverse();
                        if n >= 8 && reply[..8] == seq.to_le_bytes() {
                            if reply[..n] != request[..] {
                                return Err(format!("reply {seq} differs from its request"));
                            }
                            break;
                        }
                    }
                    Err(_) => {
                        socket.send(&request).map_err(|e| e.to_string())?;
                    }
                }
            }
            answered += 1;
        }
        for _ in 0..3 {
            socket.send(END).map_err(|e| e.to_string())?;
        }
        Ok(answered)
    });

    for stream in streams {
        stream.join().expect("TCP stream");
    }
    let answered = client.join().unwrap().expect("request/response client");
    assert_eq!(answered, ROUND_TRIPS);
    let served = responder.join().unwrap();
    assert!(served >= ROUND_TRIPS, "{served} requests answered");
}

/// Stop `engines`, which must all still be running, and check they saw no I/O error.
pub fn stop_cleanly(engines: [RunningEngine; 2]) {
    assert!(engines.iter().all(|e| e.engine.is_running()));
    for running in engines {
        let snapshot = running.engine.shutdown();
        assert_eq!(snapshot.total.io_errors, 0, "{}", snapshot.summary());
    }
}
