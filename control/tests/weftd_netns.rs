//! weftd as a drop-in for flanneld: started with flanneld's command line (and, on the second
//! host, with flanneld's FLANNELD_* environment) against a real etcd, in network namespaces,
//! it must leave exactly what flanneld v0.20.2 left in the fixtures: the same etcd keys,
//! values and lease TTLs, the same subnet.env bytes, the same TUN device, address, route and
//! socket.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::netns::{veth, NetNs};

const ETCD: &str = "http://198.18.0.1:2379";

/// A process started in a test namespace, killed by PID when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(ns: &NetNs, log: PathBuf, program: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let out = fs::File::create(&log).expect("cannot create a log file");
        let err = out.try_clone().expect("cannot clone a log handle");
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), program])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill has no memory-safety preconditions; the PID is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("weftd-netns-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("cannot create a temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn etcdctl(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "etcdctl", "--endpoints", ETCD])
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .expect("cannot run etcdctl (apt-get install etcd-client)");
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool, logs: &[&Proc]) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|p| p.log()).collect();
            panic!(
                "timed out waiting for {what}; logs:\n{}",
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `KEY => VALUE` lines of the fixture keyspace.
fn fixture_keyspace() -> Vec<(String, String)> {
    support::fixture("etcd-after-two-hosts.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" => "))
        .map(|l| {
            let (key, rest) = l.split_once(" => ").unwrap_or((l, ""));
            let value = rest.split("   [").next().unwrap_or(rest);
            (key.to_string(), value.to_string())
        })
        .collect()
}

fn http_get(ns: &NetNs, url: &str) -> (u16, String) {
    let out = ns.exec(
        "curl",
        &[
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--max-time",
            "3",
            url,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn subnet_file(dir: &Path, host: &str) -> PathBuf {
    dir.join(host).join("subnet.env")
}

fn etcd_healthy(ns: &NetNs) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns.name(), "etcdctl", "--endpoints", ETCD])
        .args(["endpoint", "health"])
        .env("ETCDCTL_API", "3")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// etcd in `ns` on the underlay address, its data in `dir/etcd` (kept across restarts).
fn start_etcd(ns: &NetNs, dir: &Path) -> Proc {
    let etcd_dir = dir.join("etcd");
    let etcd = Proc::spawn(
        ns,
        dir.join("etcd.log"),
        "etcd",
        &[
            "--name=h1",
            &format!("--data-dir={}", etcd_dir.display()),
            &format!("--listen-client-urls={ETCD}"),
            &format!("--advertise-client-urls={ETCD}"),
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=h1=http://127.0.0.1:2380",
        ],
        &[],
    );
    wait_for(
        "etcd",
        Duration::from_secs(20),
        || etcd_healthy(ns),
        &[&etcd],
    );
    etcd
}

#[test]
fn flanneld_command_line_gives_flanneld_state() {
    let dir = TempDir::new();
    let h1 = NetNs::new("h1");
    let h2 = NetNs::new("h2");
    veth(&h1, "eth0", "198.18.0.1/24", &h2, "eth0", "198.18.0.2/24");

    let etcd = start_etcd(&h1, &dir.0);
    let keyspace = fixture_keyspace();
    let config = &keyspace[0];
    assert_eq!(config.0, "/coreos.com/network/config");
    etcdctl(&h1, &["put", &config.0, &config.1]);

    // As in the fixture run, each host starts with a subnet file naming its previous subnet.
    for (host, subnet) in [("h1", "10.1.15.1/24"), ("h2", "10.1.81.1/24")] {
        let file = subnet_file(&dir.0, host);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(
            &file,
            format!("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET={subnet}\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"),
        )
        .unwrap();
    }

    let weftd = env!("CARGO_BIN_EXE_weftd");
    let h1_file = subnet_file(&dir.0, "h1");
    let h1_file = h1_file.to_string_lossy();
    // Host 1: flanneld's flags, exactly as a unit file for flanneld would pass them.
    let mut w1 = Proc::spawn(
        &h1,
        dir.0.join("w1.log"),
        weftd,
        &[
            "--etcd-endpoints",
            ETCD,
            "--iface",
            "eth0",
            "--public-ip",
            "198.18.0.1",
            "--subnet-file",
            &h1_file,
            "--healthz-port",
            "8286",
        ],
        &[],
    );
    // Host 2: flanneld's environment variables, and Go-style single-dash flags.
    let h2_file = subnet_file(&dir.0, "h2");
    let h2_file = h2_file.to_string_lossy();
    let mut w2 = Proc::spawn(
        &h2,
        dir.0.join("w2.log"),
        weftd,
        &["-iface=eth0", "-healthz-port=8286"],
        &[
            ("FLANNELD_ETCD_ENDPOINTS", ETCD),
            ("FLANNELD_PUBLIC_IP", "198.18.0.2"),
            ("FLANNELD_SUBNET_FILE", &h2_file),
            ("WEFTD_NO_TUN_OFFLOAD", "true"),
            ("WEFTD_NO_UDP_GSO_CHECK", "true"),
        ],
    );

    wait_for(
        "both weftd healthy",
        Duration::from_secs(30),
        || {
            http_get(&h1, "http://198.18.0.1:8286/healthz").0 == 200
                && http_get(&h2, "http://198.18.0.2:8286/healthz").0 == 200
        },
        &[&w1, &w2, &etcd],
    );

    // etcd: the same keys and byte-identical values, each on a 24 h etcd lease.
    let listing = etcdctl(&h1, &["get", "--prefix", "/coreos.com/network"]);
    let lines: Vec<&str> = listing.lines().collect();
    let pairs: Vec<(String, String)> = lines
        .chunks(2)
        .map(|kv| (kv[0].to_string(), kv.get(1).unwrap_or(&"").to_string()))
        .collect();
    assert_eq!(pairs, keyspace, "etcd keyspace differs from flanneld's");
    for (key, _) in &keyspace[1..] {
        let json = etcdctl(&h1, &["get", key, "-w", "json"]);
        let lease_id = json
            .split("\"lease\":")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{key} is not attached to an etcd lease: {json}"));
        let ttl = etcdctl(&h1, &["lease", "timetolive", &format!("{lease_id:x}")]);
        assert!(
            ttl.contains("granted with TTL(86400s)"),
            "{key}: expected a 24 h lease, got {ttl}"
        );
    }

    // weft's own record lives outside flanneld's prefix: host 1 (TUN offloads, the default)
    // advertises that it takes partial inner checksums and answers the UDP GSO check; host 2
    // (no TUN offloads, so it cannot take partial checksums, and no GSO check) writes none.
    let records = etcdctl(
        &h1,
        &["get", "--prefix", "/weft.io/coreos.com/network/hosts/"],
    );
    let records: Vec<&str> = records.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(records.len(), 2, "one record, of host 1: {records:?}");
    assert!(
        records[1].contains(r#""PublicIP":"198.18.0.1""#)
            && records[1].contains(r#""skip-inner-csum""#)
            && records[1].contains(r#""udp-gso-check""#),
        "{records:?}"
    );

    // subnet.env: byte-identical to flanneld's for host 1.
    assert_eq!(
        fs::read_to_string(&*h1_file).unwrap(),
        support::fixture("subnet.env")
    );
    let h2_env = fs::read_to_string(&*h2_file).unwrap();
    assert!(h2_env.contains("FLANNEL_SUBNET=10.1.81.1/24\n"), "{h2_env}");

    // The TUN device, its address, the route and the socket, as flanneld set them up.
    let link = h1.ip(&["-d", "link", "show", "flannel0"]);
    assert!(
        link.contains("<POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 1472"),
        "{link}"
    );
    // weftd's offloads need a virtio-net header on the queues; with them off (host 2), the
    // device is flanneld's to the flag.
    assert!(link.contains("tun type tun pi off vnet_hdr on"), "{link}");
    let link2 = h2.ip(&["-d", "link", "show", "flannel0"]);
    assert!(
        link2.contains("tun type tun pi off vnet_hdr off"),
        "{link2}"
    );
    let addr = h1.ip(&["-4", "addr", "show", "flannel0"]);
    assert!(
        addr.contains("inet 10.1.15.0/32 scope global flannel0"),
        "{addr}"
    );
    let addr6 = h1.ip(&["-6", "addr", "show", "flannel0"]);
    assert!(
        !addr6.contains("inet6"),
        "IPv6 must be off on the TUN: {addr6}"
    );
    let routes = h1.ip(&["route"]);
    assert!(
        routes
            .lines()
            .any(|l| l.trim() == "10.1.0.0/16 dev flannel0"),
        "{routes}"
    );
    let sockets = h1.exec_ok("ss", &["-uanp"]);
    assert!(
        sockets
            .lines()
            .any(|l| l.contains("198.18.0.1:8285") && l.contains("weftd")),
        "{sockets}"
    );

    // One worker thread per queue, apart from the control thread.
    let threads = fs::read_dir(format!("/proc/{}/task", w1_pid(&w1)))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(threads >= 2, "expected worker threads, found {threads}");

    // A restart keeps the subnet (reused by PublicIP even without the subnet file).
    assert_eq!(
        w1.terminate(),
        Some(0),
        "weftd must exit cleanly on SIGTERM:\n{}",
        w1.log()
    );
    fs::remove_file(&*h1_file).unwrap();
    let w1b = Proc::spawn(
        &h1,
        dir.0.join("w1b.log"),
        weftd,
        &[
            "--etcd-endpoints",
            ETCD,
            "--iface",
            "eth0",
            "--public-ip",
            "198.18.0.1",
            "--subnet-file",
            &h1_file,
        ],
        &[],
    );
    wait_for(
        "restarted weftd to write its subnet file",
        Duration::from_secs(30),
        || Path::new(&*h1_file).exists(),
        &[&w1b],
    );
    assert_eq!(
        fs::read_to_string(&*h1_file).unwrap(),
        support::fixture("subnet.env")
    );
    assert_eq!(
        etcdctl(
            &h1,
            &[
                "get",
                "--prefix",
                "--keys-only",
                "/coreos.com/network/subnets"
            ]
        )
        .lines()
        .filter(|l| !l.is_empty())
        .count(),
        2
    );
    assert_eq!(
        w2.terminate(),
        Some(0),
        "weftd must exit cleanly on SIGTERM:\n{}",
        w2.log()
    );
}

fn w1_pid(p: &Proc) -> u32 {
    // `ip netns exec` execs the program, so the child's PID is weftd's.
    p.child.id()
}

/// The subnet a host's subnet.env names (its lease's network address + 1), as an etcd key.
fn lease_key_of(subnet_env: &Path) -> String {
    let text = fs::read_to_string(subnet_env).unwrap_or_default();
    let subnet = text
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .unwrap_or_else(|| panic!("no FLANNEL_SUBNET in {}: {text}", subnet_env.display()));
    let (addr, len) = subnet.split_once('/').unwrap();
    let mut octets: Vec<u8> = addr.split('.').map(|o| o.parse().unwrap()).collect();
    octets[3] -= 1;
    format!(
        "/coreos.com/network/subnets/{}.{}.{}.{}-{len}",
        octets[0], octets[1], octets[2], octets[3]
    )
}

/// weftd in `ns` as a plain host of the test's etcd: `--iface eth0 --public-ip public_ip`, its
/// subnet file and log under `dir/host`, /healthz on port 8286.
fn start_weftd(ns: &NetNs, dir: &Path, host: &str, public_ip: &str) -> Proc {
    start_weftd_with(ns, dir, host, public_ip, &[])
}

/// As [`start_weftd`], with `env` added to weftd's environment.
fn start_weftd_with(
    ns: &NetNs,
    dir: &Path,
    host: &str,
    public_ip: &str,
    env: &[(&str, &str)],
) -> Proc {
    let file = subnet_file(dir, host);
    Proc::spawn(
        ns,
        dir.join(format!("{host}.log")),
        env!("CARGO_BIN_EXE_weftd"),
        &[
            "--etcd-endpoints",
            ETCD,
            "--iface",
            "eth0",
            "--public-ip",
            public_ip,
            "--subnet-file",
            &file.to_string_lossy(),
            "--healthz-port",
            "8286",
        ],
        env,
    )
}

fn healthy(ns: &NetNs, ip: &str) -> bool {
    http_get(ns, &format!("http://{ip}:8286/healthz")).0 == 200
}

/// The address weftd gives its TUN: the lease's network address (FLANNEL_SUBNET's address - 1).
fn tun_address_of(subnet_env: &Path) -> String {
    let key = lease_key_of(subnet_env);
    let name = key.rsplit('/').next().unwrap_or_default();
    name.split('-').next().unwrap_or_default().to_owned()
}

/// One ping from `ns` to `to` answered within a second.
fn pings(ns: &NetNs, to: &str) -> bool {
    ns.exec("ping", &["-c", "1", "-W", "1", to])
        .status
        .success()
}

#[test]
fn etcd_data_loss_is_survived_by_two_weftd() {
    let TwoHosts { h1, h2, dir } = TwoHosts::new();
    let etcd = start_etcd(&h1, &dir.0);
    etcdctl(&h1, &["put", "/coreos.com/network/config", NETWORK_16]);
    let mut w1 = start_weftd(&h1, &dir.0, "h1", "198.18.0.1");
    let mut w2 = start_weftd(&h2, &dir.0, "h2", "198.18.0.2");
    wait_for(
        "both weftd healthy",
        Duration::from_secs(30),
        || healthy(&h1, "198.18.0.1") && healthy(&h2, "198.18.0.2"),
        &[&w1, &w2, &etcd],
    );
    let (k1, k2) = (
        lease_key_of(&subnet_file(&dir.0, "h1")),
        lease_key_of(&subnet_file(&dir.0, "h2")),
    );
    let t2 = tun_address_of(&subnet_file(&dir.0, "h2"));
    wait_for(
        "host 1 to reach host 2's TUN through weft",
        Duration::from_secs(10),
        || pings(&h1, &t2),
        &[&w1, &w2],
    );
    // Both advertise the UDP GSO check by default, and each proves the other's.
    wait_for(
        "each weftd to find UDP GSO to the other intact",
        Duration::from_secs(10),
        || {
            [(&h1, "198.18.0.1"), (&h2, "198.18.0.2")]
                .iter()
                .all(|(ns, ip)| {
                    metric_at(ns, ip, "weft_udp_gso_checks_total{outcome=\"proven\"}").as_deref()
                        == Some("1")
                })
        },
        &[&w1, &w2],
    );

    // etcd loses everything: stopped, its data directory deleted, started empty, and the
    // operator puts the network config back.
    let mut etcd = etcd;
    etcd.child.kill().unwrap();
    etcd.child.wait().unwrap();
    fs::remove_dir_all(dir.0.join("etcd")).unwrap();
    let etcd = start_etcd(&h1, &dir.0);
    // weftd never writes the config, so its absence shows the wipe; the leases may already be
    // back, as weftd re-registers as soon as it sees the empty etcd.
    assert_eq!(
        etcdctl(
            &h1,
            &["get", "/coreos.com/network/config", "--print-value-only"]
        )
        .trim(),
        "",
        "etcd came back with its data"
    );
    etcdctl(&h1, &["put", "/coreos.com/network/config", NETWORK_16]);
    let wiped = Instant::now();

    let value = |ip: &str| format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#);
    wait_for(
        "both hosts to register their subnets again",
        Duration::from_secs(10),
        || {
            etcdctl(&h1, &["get", &k1, "--print-value-only"]).trim() == value("198.18.0.1")
                && etcdctl(&h1, &["get", &k2, "--print-value-only"]).trim() == value("198.18.0.2")
        },
        &[&w1, &w2, &etcd],
    );
    wait_for(
        "host 1 to reach host 2 again",
        Duration::from_secs(10).saturating_sub(wiped.elapsed()),
        || pings(&h1, &t2),
        &[&w1, &w2],
    );
    eprintln!(
        "registered again and forwarding {} ms after etcd came back empty",
        wiped.elapsed().as_millis()
    );
    assert!(healthy(&h1, "198.18.0.1") && healthy(&h2, "198.18.0.2"));
    assert_eq!(w1.terminate(), Some(0), "{}", w1.log());
    assert_eq!(w2.terminate(), Some(0), "{}", w2.log());
    for log in [w1.log(), w2.log()] {
        assert!(log.contains("etcd lost its data"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[test]
fn etcd_outage_and_a_deleted_lease_are_survived() {
    let TwoHosts { h1, h2, dir } = TwoHosts::new();
    let mut etcd = start_etcd(&h1, &dir.0);
    etcdctl(
        &h1,
        &[
            "put",
            "/coreos.com/network/config",
            r#"{"Network":"10.1.0.0/16"}"#,
        ],
    );

    let mut w1 = start_weftd(&h1, &dir.0, "h1", "198.18.0.1");
    let mut w2 = start_weftd(&h2, &dir.0, "h2", "198.18.0.2");
    wait_for(
        "both weftd healthy",
        Duration::from_secs(30),
        || healthy(&h1, "198.18.0.1") && healthy(&h2, "198.18.0.2"),
        &[&w1, &w2, &etcd],
    );
    let h2_key = lease_key_of(&subnet_file(&dir.0, "h2"));

    // etcd goes away: both daemons keep running and keep reporting healthy (they hold valid
    // leases and forward with the routes they have).
    etcd.child.kill().unwrap();
    etcd.child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        w1.is_running(),
        "weftd exited while etcd was down:\n{}",
        w1.log()
    );
    assert!(
        w2.is_running(),
        "weftd exited while etcd was down:\n{}",
        w2.log()
    );
    assert!(healthy(&h1, "198.18.0.1") && healthy(&h2, "198.18.0.2"));

    // etcd is back; an operator deletes host 2's lease: host 2 takes the same subnet again.
    let etcd = start_etcd(&h1, &dir.0);
    etcdctl(&h1, &["del", &h2_key]);
    wait_for(
        "host 2 to re-acquire its deleted lease",
        Duration::from_secs(40),
        || {
            etcdctl(&h1, &["get", &h2_key, "--print-value-only"]).trim()
                == r#"{"PublicIP":"198.18.0.2","PublicIPv6":null}"#
        },
        &[&w2, &etcd],
    );
    assert_eq!(lease_key_of(&subnet_file(&dir.0, "h2")), h2_key);
    assert!(w1.is_running() && w2.is_running());
    assert_eq!(w1.terminate(), Some(0), "{}", w1.log());
    assert_eq!(w2.terminate(), Some(0), "{}", w2.log());
    for log in [w1.log(), w2.log()] {
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// Two namespaces joined by a veth on 198.18.0.0/24 (h1 .1, h2 .2) and a directory for files
/// and logs; everything is removed when dropped.
struct TwoHosts {
    h1: NetNs,
    h2: NetNs,
    dir: TempDir,
}

impl TwoHosts {
    fn new() -> Self {
        let dir = TempDir::new();
        let h1 = NetNs::new("h1");
        let h2 = NetNs::new("h2");
        veth(&h1, "eth0", "198.18.0.1/24", &h2, "eth0", "198.18.0.2/24");
        TwoHosts { h1, h2, dir }
    }

    /// etcd on host 1, with `config` (if any) at `<prefix>/config`.
    fn etcd(&self, config: Option<&str>) -> Proc {
        let etcd = start_etcd(&self.h1, &self.dir.0);
        if let Some(config) = config {
            etcdctl(&self.h1, &["put", "/coreos.com/network/config", config]);
        }
        etcd
    }

    /// weftd on host 1 (healthz on 198.18.0.1:8286, log in `log`) with its etcd at `etcd`,
    /// run through `wrapper` (e.g. `env VAR=…`) when that is not empty.
    fn weftd(
        &self,
        log: &str,
        etcd: &str,
        wrapper: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let file = subnet_file(&self.dir.0, "h1");
        let file = file.to_string_lossy();
        let weftd = env!("CARGO_BIN_EXE_weftd");
        let mut argv: Vec<&str> = wrapper.to_vec();
        argv.extend([
            weftd,
            "--etcd-endpoints",
            etcd,
            "--iface=eth0",
            "--subnet-file",
            &file,
            "--healthz-port=8286",
        ]);
        argv.extend_from_slice(extra);
        Proc::spawn(&self.h1, self.dir.0.join(log), argv[0], &argv[1..], env)
    }

    fn healthz(&self) -> (u16, String) {
        http_get(&self.h1, "http://198.18.0.1:8286/healthz")
    }
}

const NETWORK_16: &str = r#"{"Network":"10.1.0.0/16"}"#;

/// Sends SIGTERM; weftd must exit 0 within a second, logging `SIGTERM while <waiting_for>`.
fn assert_stops_at_once(p: &mut Proc, waiting_for: &str) {
    let sent = Instant::now();
    let status = p.terminate();
    let took = sent.elapsed();
    assert_eq!(status, Some(0), "{}", p.log());
    assert!(
        took < Duration::from_secs(1),
        "weftd took {took:?} to stop:\n{}",
        p.log()
    );
    assert!(
        p.log().contains(&format!("SIGTERM while {waiting_for}")),
        "{}",
        p.log()
    );
}

const STARTING_CONFIG: &str = "starting: waiting for the network config in etcd";

#[test]
fn sigterm_stops_weftd_at_once_while_etcd_is_unreachable() {
    let hosts = TwoHosts::new();
    // Nobody has 198.18.0.9: connecting to it hangs until the client gives up.
    let mut w1 = hosts.weftd("w1.log", "http://198.18.0.9:2379", &[], &[], &[]);
    wait_for(
        "healthz to report the wait for etcd",
        Duration::from_secs(20),
        || hosts.healthz() == (503, STARTING_CONFIG.to_string()),
        &[&w1],
    );
    assert_stops_at_once(&mut w1, "waiting for the network config");
}

#[test]
fn healthz_answers_and_sigterm_works_while_the_config_is_missing() {
    let hosts = TwoHosts::new();
    let etcd = hosts.etcd(None);
    let mut w1 = hosts.weftd("w1.log", ETCD, &[], &[], &[]);
    wait_for(
        "healthz to report the wait for the config",
        Duration::from_secs(20),
        || hosts.healthz() == (503, STARTING_CONFIG.to_string()),
        &[&w1, &etcd],
    );

    // 100 clients connect and say nothing; a probe still gets its answer at once.
    let idle: Vec<std::net::TcpStream> = hosts.h1.enter(|| {
        (0..100)
            .map(|_| std::net::TcpStream::connect("198.18.0.1:8286").expect("connect"))
            .collect()
    });
    let asked = Instant::now();
    assert_eq!(
        hosts.healthz(),
        (503, STARTING_CONFIG.to_string()),
        "{}",
        w1.log()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    drop(idle);
    assert_stops_at_once(&mut w1, "waiting for the network config");
}

#[test]
fn sigterm_stops_weftd_at_once_while_no_subnet_is_free() {
    let hosts = TwoHosts::new();
    // A /28 network has three leasable /30 subnets; other hosts hold all of them.
    let etcd = hosts.etcd(Some(r#"{"Network":"10.1.0.0/28"}"#));
    for (subnet, owner) in [
        ("4", "198.18.0.4"),
        ("8", "198.18.0.8"),
        ("12", "198.18.0.12"),
    ] {
        etcdctl(
            &hosts.h1,
            &[
                "put",
                &format!("/coreos.com/network/subnets/10.1.0.{subnet}-30"),
                &format!(r#"{{"PublicIP":"{owner}","PublicIPv6":null}}"#),
            ],
        );
    }
    let mut w1 = hosts.weftd("w1.log", ETCD, &[], &[], &[]);
    wait_for(
        "healthz to report the wait for a lease",
        Duration::from_secs(20),
        || hosts.healthz() == (503, "starting: waiting for a subnet lease".to_string()),
        &[&w1, &etcd],
    );
    assert_stops_at_once(&mut w1, "waiting for a subnet lease");
}

/// The value of one metric line (`name value`) on weftd's /metrics page.
fn metric(ns: &NetNs, name: &str) -> Option<String> {
    metric_at(ns, "198.18.0.1", name)
}

/// The value of metric `name` (with its labels) on the weftd serving /metrics at `ip`:8286.
fn metric_at(ns: &NetNs, ip: &str, name: &str) -> Option<String> {
    let (code, text) = http_get(ns, &format!("http://{ip}:8286/metrics"));
    assert_eq!(code, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string))
}

#[test]
fn a_subnet_taken_while_away_is_loud_until_docker_moves() {
    let hosts = TwoHosts::new();
    let h1 = &hosts.h1;
    let etcd = hosts.etcd(Some(NETWORK_16));
    // Host 1 ran on 10.1.15.0/24 and docker's bridge still has that subnet's first address.
    let file = subnet_file(&hosts.dir.0, "h1");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    fs::write(
        &file,
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.15.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    h1.ip(&["link", "add", "docker0", "type", "bridge"]);
    h1.ip(&["addr", "add", "10.1.15.1/24", "dev", "docker0"]);
    h1.ip(&["link", "set", "docker0", "up"]);
    // While it was away, host 2 took that subnet (a reservation: it never expires).
    etcdctl(
        h1,
        &[
            "put",
            "/coreos.com/network/subnets/10.1.15.0-24",
            r#"{"PublicIP":"198.18.0.2","PublicIPv6":null}"#,
        ],
    );

    let mut w1 = hosts.weftd("w1.log", ETCD, &[], &[], &[]);
    wait_for(
        "weftd to lease a new subnet",
        Duration::from_secs(30),
        || {
            fs::read_to_string(&file).is_ok_and(|t| !t.contains("FLANNEL_SUBNET=10.1.15.1/24"))
                && metric(h1, "weft_subnet_stale").as_deref() == Some("1")
        },
        &[&w1, &etcd],
    );
    let (code, body) = hosts.healthz();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("restart docker"), "{body}");
    assert_eq!(
        metric(h1, "weft_subnet_changes_total").as_deref(),
        Some("1")
    );
    let log = w1.log();
    assert!(
        log.contains("ERROR")
            && log.contains("subnet changed from 10.1.15.0/24")
            && log.contains("restart docker"),
        "{log}"
    );
    assert!(log.contains("docker0 has 10.1.15.1/24"), "{log}");

    // "Restarting docker": the bridge takes the first address of the new subnet.
    let text = fs::read_to_string(&file).unwrap();
    let new_bip = text
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .expect("FLANNEL_SUBNET")
        .to_string();
    h1.ip(&["addr", "flush", "dev", "docker0"]);
    h1.ip(&["addr", "add", &new_bip, "dev", "docker0"]);
    wait_for(
        "healthz to turn 200 once docker moved",
        Duration::from_secs(10),
        || hosts.healthz().0 == 200,
        &[&w1],
    );
    assert_eq!(metric(h1, "weft_subnet_stale").as_deref(), Some("0"));
    assert!(w1
        .log()
        .contains("no host interface uses an old subnet any more"));
    assert_eq!(w1.terminate(), Some(0), "{}", w1.log());
}

#[test]
fn a_password_file_authenticates_and_the_password_is_never_logged() {
    let hosts = TwoHosts::new();
    let etcd = hosts.etcd(Some(NETWORK_16));
    let password = "pw-7f3a9c-in-a-file";
    etcdctl(&hosts.h1, &["user", "add", &format!("root:{password}")]);
    etcdctl(&hosts.h1, &["user", "grant-role", "root", "root"]);
    etcdctl(&hosts.h1, &["auth", "enable"]);
    let password_file = hosts.dir.0.join("etcd-password");
    fs::write(&password_file, format!("{password}\n")).unwrap();

    let mut w1 = hosts.weftd(
        "w1.log",
        ETCD,
        &[],
        &["--etcd-username=root", "-v=4"],
        // flanneld's environment mechanism carries the file's path.
        &[(
            "FLANNELD_ETCD_PASSWORD_FILE",
            &password_file.to_string_lossy(),
        )],
    );
    wait_for(
        "weftd healthy with etcd authentication",
        Duration::from_secs(30),
        || hosts.healthz().0 == 200,
        &[&w1, &etcd],
    );
    assert_eq!(w1.terminate(), Some(0), "{}", w1.log());
    let log = w1.log();
    assert!(
        !log.contains(password),
        "the password is in the log:\n{log}"
    );
}

#[test]
fn without_iptables_weftd_runs_unless_masquerading_was_asked_for() {
    let hosts = TwoHosts::new();
    let etcd = hosts.etcd(Some(NETWORK_16));
    // A PATH with no iptables programs on it.
    let no_iptables = ["env", "PATH=/nonexistent"];

    // The default FORWARD accept rules cannot be applied: weftd says so and forwards.
    let mut w1 = hosts.weftd("w1.log", ETCD, &no_iptables, &[], &[]);
    wait_for(
        "weftd healthy without iptables",
        Duration::from_secs(30),
        || hosts.healthz().0 == 200,
        &[&w1, &etcd],
    );
    assert!(
        w1.log().contains("cannot apply the FORWARD accept rules"),
        "{}",
        w1.log()
    );
    assert_eq!(w1.terminate(), Some(0), "{}", w1.log());

    // --ip-masq asked for masquerading, which cannot be done: weftd stops with the reason.
    let mut w2 = hosts.weftd("w2.log", ETCD, &no_iptables, &["--ip-masq"], &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = w2.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "weftd still runs:\n{}", w2.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(1), "{}", w2.log());
    assert!(
        w2.log()
            .contains("--ip-masq: cannot apply the masquerade rules"),
        "{}",
        w2.log()
    );
}

#[test]
fn a_subnet_taken_over_while_running_is_loud_too() {
    let hosts = TwoHosts::new();
    let h1 = &hosts.h1;
    let etcd = hosts.etcd(Some(NETWORK_16));
    let mut w1 = hosts.weftd("w1.log", ETCD, &[], &[], &[]);
    wait_for(
        "weftd healthy",
        Duration::from_secs(30),
        || hosts.healthz().0 == 200,
        &[&w1, &etcd],
    );
    // docker started after weftd and put its bridge on FLANNEL_SUBNET: all is well.
    let file = subnet_file(&hosts.dir.0, "h1");
    let key = lease_key_of(&file);
    let bip = fs::read_to_string(&file)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET=").map(str::to_string))
        .expect("FLANNEL_SUBNET");
    h1.ip(&["link", "add", "docker0", "type", "bridge"]);
    h1.ip(&["addr", "add", &bip, "dev", "docker0"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(hosts.healthz(), (200, "ok".to_string()));
    assert_eq!(metric(h1, "weft_subnet_stale").as_deref(), Some("0"));

    // Another host takes the subnet over: weftd moves to a new one, docker stays behind.
    etcdctl(
        h1,
        &[
            "put",
            &key,
            r#"{"PublicIP":"198.18.0.2","PublicIPv6":null}"#,
        ],
    );
    wait_for(
        "weftd to report the stale bridge",
        Duration::from_secs(30),
        || {
            metric(h1, "weft_subnet_changes_total").as_deref() == Some("1")
                && metric(h1, "weft_subnet_stale").as_deref() == Some("1")
        },
        &[&w1, &etcd],
    );
    assert_ne!(
        lease_key_of(&file),
        key,
        "subnet.env still names the old subnet"
    );
    let (code, body) = hosts.healthz();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("restart docker"), "{body}");
    let log = w1.log();
    let old = key.rsplit('/').next().unwrap().replace('-', "/");
    assert!(
        log.contains(&format!("subnet changed from {old}")) && log.contains("restart docker"),
        "{log}"
    );
    assert_eq!(w1.terminate(), Some(0), "{}", w1.log());
}

/// The network config with encryption between hosts on.
const NETWORK_ENCRYPTED: &str =
    r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Encryption":"wireguard"}}"#;

fn key_file(dir: &Path, host: &str) -> PathBuf {
    dir.join(host).join("keys").join("private.key")
}

/// weftd on `host` with encryption's key file under the test's directory.
fn start_encrypted_weftd(ns: &NetNs, dir: &Path, host: &str, public_ip: &str) -> Proc {
    let key = key_file(dir, host);
    let key = key.to_string_lossy();
    start_weftd_with(
        ns,
        dir,
        host,
        public_ip,
        &[("WEFTD_ENCRYPTION_KEY_FILE", &key)],
    )
}

fn read_key(path: &Path) -> [u8; 32] {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    weft_control::key_file::decode_key(&text).expect("a key")
}

/// An IPv4 UDP packet from `src` to `dst`:`port` carrying `payload` (UDP checksum 0: none).
fn udp_packet(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum = 0u32;
    for pair in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// The drops `ns`'s weftd (at `ip`) counted under `reason`.
fn drops(ns: &NetNs, ip: &str, reason: &str) -> u64 {
    metric_at(ns, ip, &format!("weft_drops_total{{reason=\"{reason}\"}}"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_encrypted_overlay_carries_ping_and_tcp_and_refuses_forgeries() {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
    use weft_engine::crypto::{sealed_len, Opened, Opener, Sealer};
    use weft_engine::{StaticKeys, Tunnels};

    let TwoHosts { h1, h2, dir } = TwoHosts::new();
    let etcd = start_etcd(&h1, &dir.0);
    etcdctl(
        &h1,
        &["put", "/coreos.com/network/config", NETWORK_ENCRYPTED],
    );
    // A flanneld's lease: it publishes no key, so nothing goes to it.
    etcdctl(
        &h1,
        &[
            "put",
            "/coreos.com/network/subnets/10.1.200.0-24",
            r#"{"PublicIP":"198.18.0.9","PublicIPv6":null}"#,
        ],
    );
    let mut w1 = start_encrypted_weftd(&h1, &dir.0, "h1", "198.18.0.1");
    let mut w2 = start_encrypted_weftd(&h2, &dir.0, "h2", "198.18.0.2");
    wait_for(
        "both weftd healthy",
        Duration::from_secs(30),
        || healthy(&h1, "198.18.0.1") && healthy(&h2, "198.18.0.2"),
        &[&w1, &w2, &etcd],
    );
    let t1: Ipv4Addr = tun_address_of(&subnet_file(&dir.0, "h1")).parse().unwrap();
    let t2: Ipv4Addr = tun_address_of(&subnet_file(&dir.0, "h2")).parse().unwrap();
    wait_for(
        "host 1 to reach host 2 through the encrypted overlay",
        Duration::from_secs(10),
        || pings(&h1, &t2.to_string()),
        &[&w1, &w2],
    );

    // The key files are the owner's alone; the MTU gives up what encryption adds; flannel's
    // lease values are untouched, the public key is in weft's own record.
    for host in ["h1", "h2"] {
        use std::os::unix::fs::MetadataExt;
        let mode = fs::metadata(key_file(&dir.0, host)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{host}");
        let env = fs::read_to_string(subnet_file(&dir.0, host)).unwrap();
        assert!(env.contains("FLANNEL_MTU=1440\n"), "{env}");
    }
    let k1 = lease_key_of(&subnet_file(&dir.0, "h1"));
    assert_eq!(
        etcdctl(&h1, &["get", &k1, "--print-value-only"]).trim(),
        r#"{"PublicIP":"198.18.0.1","PublicIPv6":null}"#
    );
    let h1_public = StaticKeys::from_private(read_key(&key_file(&dir.0, "h1"))).public();
    let records = etcdctl(&h1, &["get", "--prefix", "/weft.io/", "--print-value-only"]);
    assert!(
        records.contains(&weft_control::key_file::encode_key(&h1_public)),
        "{records}"
    );
    // The tag authenticates the inner packets: encrypted hosts leave inner checksums partial
    // to each other too.
    assert!(records.contains(r#""skip-inner-csum""#), "{records}");
    wait_for(
        "the flanneld lease to be reported",
        Duration::from_secs(5),
        || {
            metric(&h1, "weft_encryption_peers{state=\"without_key\"}").as_deref() == Some("1")
                && metric(&h1, "weft_encryption_peers{state=\"keyed\"}").as_deref() == Some("1")
        },
        &[&w1],
    );
    assert!(w1.log().contains("publish no public key"), "{}", w1.log());

    // A TCP stream arrives byte for byte.
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let listener = h2.enter(|| TcpListener::bind((t2, 5001)).expect("listen on host 2"));
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).expect("read the stream");
        got
    });
    let mut client = h1.enter(|| {
        TcpStream::connect_timeout(&(t2, 5001).into(), Duration::from_secs(5)).expect("connect")
    });
    client.write_all(&data).expect("write the stream");
    drop(client);
    let got = server.join().expect("server thread");
    assert!(
        got == data,
        "{} of {} bytes, not the same",
        got.len(),
        data.len()
    );

    // Forgeries, sent from host 1's address and port by a socket of the test's own while
    // host 1's weftd is stopped (its lease and record stay). The test speaks the protocol
    // with host 1's key, so that what it sends is valid but for the forgery.
    assert_eq!(w1.terminate(), Some(0), "{}", w1.log());
    let receiver = h2.enter(|| UdpSocket::bind((t2, 6000)).expect("bind on host 2"));
    receiver
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let received = || {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = receiver.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    };
    let socket = h1.enter(|| UdpSocket::bind("198.18.0.1:8285").expect("bind on host 1"));
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let peer = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285);
    let h2_public = StaticKeys::from_private(read_key(&key_file(&dir.0, "h2"))).public();
    let me = Tunnels::new(StaticKeys::from_private(read_key(&key_file(&dir.0, "h1"))));
    me.publish([(*peer.ip(), h2_public)]);
    let seal = |tunnels: &Tunnels, text: &str| {
        let packet = udp_packet(t1, t2, 6000, text.as_bytes());
        let mut out = vec![0u8; sealed_len(packet.len())];
        let table = tunnels.snapshot();
        let len = Sealer::seal(&mut table.get(peer.ip()).unwrap().lock(), &packet, &mut out);
        out.truncate(len);
        out
    };
    // The handshake: the first packet waits for it, then leaves with the keepalive.
    let init = seal(&me, "valid");
    assert_eq!(init.len(), 148);
    socket.send_to(&init, peer).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).expect("a handshake response");
    assert_eq!(from, std::net::SocketAddr::V4(peer));
    let mut opener = Opener::new(me.clone());
    let mut opened = [0u8; 2048];
    assert_eq!(opener.open(peer, &buf[..n], &mut opened), Opened::Handled);
    for (_, message) in opener.outbox().drain(..) {
        socket.send_to(&message, peer).unwrap();
    }
    let replayed = seal(&me, "once");
    socket.send_to(&replayed, peer).unwrap();
    let before: Vec<u64> = [
        "plaintext",
        "tampered",
        "replayed",
        "truncated",
        "unknown_key",
    ]
    .iter()
    .map(|r| drops(&h2, "198.18.0.2", r))
    .collect();
    socket
        .send_to(&udp_packet(t1, t2, 6000, b"plaintext"), peer)
        .unwrap();
    let mut tampered = seal(&me, "tampered");
    *tampered.last_mut().unwrap() ^= 1;
    socket.send_to(&tampered, peer).unwrap();
    socket.send_to(&replayed, peer).unwrap();
    socket.send_to(&seal(&me, "truncated")[..20], peer).unwrap();
    let stranger = Tunnels::new(StaticKeys::from_private([0x5a; 32]));
    stranger.publish([(*peer.ip(), h2_public)]);
    socket.send_to(&seal(&stranger, "stranger"), peer).unwrap();
    assert_eq!(
        received(),
        ["valid", "once"],
        "only the valid packets arrive"
    );
    let after: Vec<u64> = [
        "plaintext",
        "tampered",
        "replayed",
        "truncated",
        "unknown_key",
    ]
    .iter()
    .map(|r| drops(&h2, "198.18.0.2", r))
    .collect();
    for (i, reason) in [
        "plaintext",
        "tampered",
        "replayed",
        "truncated",
        "unknown_key",
    ]
    .iter()
    .enumerate()
    {
        assert!(
            after[i] > before[i],
            "{reason}: {} -> {}",
            before[i],
            after[i]
        );
    }

    drop(socket);
    let mut w1 = start_encrypted_weftd(&h1, &dir.0, "h1", "198.18.0.1");
    wait_for(
        "host 1 back",
        Duration::from_secs(10),
        || pings(&h1, &t2.to_string()),
        &[&w1, &w2],
    );

    // Host 2 restarts with a new key: host 1 reaches it again within seconds, unrestarted.
    assert_eq!(w2.terminate(), Some(0), "{}", w2.log());
    fs::remove_file(key_file(&dir.0, "h2")).unwrap();
    let restarted = Instant::now();
    let mut w2 = start_encrypted_weftd(&h2, &dir.0, "h2", "198.18.0.2");
    wait_for(
        "host 1 to reach host 2 with its new key",
        Duration::from_secs(15),
        || pings(&h1, &t2.to_string()),
        &[&w1, &w2],
    );
    let took = restarted.elapsed();
    eprintln!(
        "host 2 reachable {} ms after its restart with a new key",
        took.as_millis()
    );
    assert_ne!(
        StaticKeys::from_private(read_key(&key_file(&dir.0, "h2"))).public(),
        h2_public
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(w1.terminate(), Some(0), "{}", w1.log());
    assert_eq!(w2.terminate(), Some(0), "{}", w2.log());
    for log in [w1.log(), w2.log()] {
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[test]
fn a_host_that_cannot_encrypt_is_refused() {
    let hosts = TwoHosts::new();
    let etcd = hosts.etcd(Some(NETWORK_ENCRYPTED));
    let key = key_file(&hosts.dir.0, "h1");
    fs::create_dir_all(key.parent().unwrap()).unwrap();
    fs::write(&key, "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let key_flag = format!("--encryption-key-file={}", key.display());
    for (extra, want) in [
        (vec![key_flag.as_str()], "chmod 600"),
        (
            vec!["--encryption-key-file=/proc/weft-no-such-dir/private.key"],
            "private key file",
        ),
        (vec!["--io=uring", key_flag.as_str()], "--io syscalls"),
    ] {
        let mut w1 = hosts.weftd("w1.log", ETCD, &[], &extra, &[]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Ok(Some(status)) = w1.child.try_wait() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "weftd kept running: {}",
                w1.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = w1.log();
        assert!(!status.success(), "{log}");
        assert!(
            log.contains("the network config asks for encryption") && log.contains(want),
            "{want}: {log}"
        );
    }
    // It never joined: no lease was taken.
    assert_eq!(
        etcdctl(
            &hosts.h1,
            &[
                "get",
                "--prefix",
                "/coreos.com/network/subnets/",
                "--keys-only"
            ]
        )
        .trim(),
        ""
    );
    drop(etcd);
}
