//! A real three-member etcd cluster with a member lost: killed, frozen, left without a
//! leader, or cut off from its peers while it keeps serving clients. The watch must move on
//! to a healthy member and events must keep arriving.
//!
//! The members run on 127.0.0.1 with free ports and data directories of their own; every
//! process is the test's own and is killed by its PID when the test ends, also on failure.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;
use ipnet::Ipv4Net;
use tokio::task::JoinHandle;
use weft_control::lease::{self, Backoff, MembershipHandle, Settings};
use weft_control::registry::{
    EtcdRegistry, EtcdSettings, LeaseWatch, Registry, WatchBroken, WatchItem,
};
use weft_control::subnet::LeaseAttrs;
use weft_engine::{RouteTable, Routes};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#;
const WAIT: Duration = Duration::from_secs(30);
/// The user a member cut off by firewall rules runs as.
const NOBODY: u32 = 65534;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port")
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// Three etcd members forming one cluster.
struct Cluster {
    dir: PathBuf,
    members: Vec<Member>,
}

impl Cluster {
    async fn start() -> Self {
        Self::start_with_outsider(None).await
    }

    /// Like [`Cluster::start`]; member `outsider` runs as user `nobody`, so that packets from
    /// it can be told apart by firewall rules (every member sends from 127.0.0.1).
    async fn start_with_outsider(outsider: Option<usize>) -> Self {
        let binary = std::env::var_os("WEFT_TEST_ETCD")
            .map(PathBuf::from)
            .unwrap_or_else(which_etcd);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("weft-etcd-cluster-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cannot create the cluster's directory");
        let peers: Vec<(String, u16, u16)> = (0..3)
            .map(|i| (format!("m{i}"), free_port(), free_port()))
            .collect();
        let initial: Vec<String> = peers
            .iter()
            .map(|(name, _, peer)| format!("{name}=http://127.0.0.1:{peer}"))
            .collect();
        let mut members = Vec::new();
        for (i, (name, client_port, peer_port)) in peers.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
            let mut command = if outsider == Some(i) {
                let data = dir.join(name);
                std::fs::create_dir_all(&data).unwrap();
                let owner = Command::new("chown")
                    .arg(format!("{NOBODY}:{NOBODY}"))
                    .arg(&data)
                    .status()
                    .expect("chown");
                assert!(owner.success(), "cannot chown {}", data.display());
                // etcd refuses a data directory others can read.
                let mode = Command::new("chmod")
                    .arg("700")
                    .arg(&data)
                    .status()
                    .expect("chmod");
                assert!(mode.success());
                let mut command = Command::new("setpriv");
                command
                    .arg(format!("--reuid={NOBODY}"))
                    .arg(format!("--regid={NOBODY}"))
                    .arg("--clear-groups")
                    .arg(&binary);
                command
            } else {
                Command::new(&binary)
            };
            let child = command
                .arg(format!("--name={name}"))
                .arg(format!("--data-dir={}", dir.join(name).display()))
                .arg(format!(
                    "--listen-client-urls=http://127.0.0.1:{client_port}"
                ))
                .arg(format!(
                    "--advertise-client-urls=http://127.0.0.1:{client_port}"
                ))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
                ))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=weft-test-cluster")
                .arg("--heartbeat-interval=100")
                .arg("--election-timeout=1000")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
            members.push(Member {
                name: name.clone(),
                client_port: *client_port,
                peer_port: *peer_port,
                child: Some(child),
            });
        }
        let cluster = Self { dir, members };
        let deadline = Instant::now() + WAIT;
        for i in 0..3 {
            while !cluster.answers(i).await {
                assert!(Instant::now() < deadline, "the etcd cluster did not form");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        cluster
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    fn endpoints(&self) -> Vec<String> {
        (0..3).map(|i| self.endpoint(i)).collect()
    }

    async fn answers(&self, i: usize) -> bool {
        let attempt = async {
            let mut client = Client::connect([self.endpoint(i)], None).await.ok()?;
            client.get("/weft-test-ready", None).await.ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), attempt).await,
            Ok(Some(_))
        )
    }

    /// A client of the members other than `skip`.
    async fn client_without(&self, skip: usize) -> Client {
        let endpoints: Vec<String> = (0..3)
            .filter(|i| *i != skip)
            .map(|i| self.endpoint(i))
            .collect();
        Client::connect(endpoints, None).await.unwrap()
    }

    fn pid(&self, i: usize) -> u32 {
        self.members[i].child.as_ref().expect("member running").id()
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, i: usize, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid(i).to_string())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "kill -{signal} {} failed",
            self.members[i].name
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_some() {
                // A frozen member must be thawed to die cleanly.
                let _ = Command::new("kill")
                    .arg("-CONT")
                    .arg(self.pid(i).to_string())
                    .status();
            }
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which_etcd() -> PathBuf {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("etcd not found: apt-get install etcd-server"))
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// A registry over all three members, starting with member 0, with a watch checked every
/// second and requests timing out after one.
fn registry(cluster: &Cluster) -> EtcdRegistry {
    EtcdRegistry::new(&EtcdSettings {
        request_timeout: Duration::from_secs(1),
        watch_check_interval: Duration::from_secs(1),
        ..EtcdSettings::new(cluster.endpoints())
    })
    .unwrap()
}

struct Host {
    handle: MembershipHandle,
    routes: Routes,
    task: JoinHandle<()>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Host {
    async fn join(cluster: &Cluster, public_ip: &str) -> Self {
        let reg = registry(cluster);
        let retry = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let config = tokio::time::timeout(WAIT, lease::wait_for_config(&reg, retry))
            .await
            .expect("no network config");
        let routes = Routes::new(RouteTable::empty(config.overlay().unwrap(), config.port()));
        let settings = Settings {
            lease_ttl: Duration::from_secs(600),
            renew_margin: Duration::from_secs(60),
            retry,
            ..Settings::new(ip(public_ip))
        };
        let (mut handle, task) =
            lease::run_membership(reg, &config, settings, routes.clone()).unwrap();
        tokio::time::timeout(WAIT, handle.acquired())
            .await
            .expect("no lease")
            .expect("membership ended");
        Self {
            handle,
            routes,
            task,
        }
    }

    fn peers(&self) -> BTreeMap<Ipv4Net, Ipv4Addr> {
        self.routes.current().peers().collect()
    }

    /// Put a peer lease through `client` and wait until this host routes it; how long it took.
    async fn sees_put(&self, client: &mut Client, subnet: &str, holder: &str) -> Duration {
        let name = format!("{}-24", subnet.trim_end_matches("/24"));
        let started = Instant::now();
        // A lost member may have been the leader: the put waits for the next one.
        while let Err(e) = client
            .put(
                format!("{PREFIX}/subnets/{name}"),
                LeaseAttrs::udp(ip(holder)).to_json(),
                None,
            )
            .await
        {
            assert!(started.elapsed() < WAIT, "cannot put {name}: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        while self.peers().get(&net(subnet)) != Some(&ip(holder)) {
            assert!(
                started.elapsed() < WAIT,
                "{subnet} via {holder} never reached the route table: {:?}",
                self.peers()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    }
}

async fn cluster_with_config() -> Cluster {
    init_logs();
    let cluster = Cluster::start().await;
    let mut client = cluster.client_without(9).await;
    client
        .put(format!("{PREFIX}/config"), CONFIG, None)
        .await
        .unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_member_killed_the_watch_moves_on() {
    let mut cluster = cluster_with_config().await;
    let host = Host::join(&cluster, "198.18.0.1").await;
    let mut client = cluster.client_without(0).await;
    host.sees_put(&mut client, "10.1.200.0/24", "198.18.0.2")
        .await;
    // The host's registry starts with member 0: its watch runs there.
    cluster.kill(0);
    let took = host
        .sees_put(&mut client, "10.1.201.0/24", "198.18.0.3")
        .await;
    println!("after member 0 was killed, a change reached the route table in {took:?}");
    let took = host
        .sees_put(&mut client, "10.1.202.0/24", "198.18.0.4")
        .await;
    println!("and the next one in {took:?}");
    assert_eq!(host.peers().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_member_frozen_the_stall_is_detected_and_the_watch_moves_on() {
    let cluster = cluster_with_config().await;
    let host = Host::join(&cluster, "198.18.0.1").await;
    let mut client = cluster.client_without(0).await;
    host.sees_put(&mut client, "10.1.200.0/24", "198.18.0.2")
        .await;
    // Frozen: its sockets stay open, it answers nothing, the watch goes silent.
    cluster.signal(0, "STOP");
    let took = host
        .sees_put(&mut client, "10.1.201.0/24", "198.18.0.3")
        .await;
    println!("after member 0 froze, a change reached the route table in {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "the stalled watch took {took:?} to move on"
    );
    let took = host
        .sees_put(&mut client, "10.1.202.0/24", "198.18.0.4")
        .await;
    println!("and the next one in {took:?}");
    assert!(
        host.handle
            .metrics()
            .etcd_error_count(weft_control::metrics::EtcdOp::WatchStalled)
            >= 1
    );
    cluster.signal(0, "CONT");
}

/// A member cut off from the other two loses its leader. With etcd's `hasleader` metadata,
/// which weftd sends, it refuses a watch (or cancels it) instead of serving one that never
/// delivers anything; the hosts' watch then moves to a member that has a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_without_a_leader_refuses_watches_and_the_watch_moves_on() {
    let cluster = cluster_with_config().await;
    // A registry that knows only member 2.
    let only_2 = EtcdRegistry::new(&EtcdSettings {
        request_timeout: Duration::from_secs(1),
        watch_check_interval: Duration::from_secs(1),
        ..EtcdSettings::new(vec![cluster.endpoint(2)])
    })
    .unwrap();
    let host = Host::join(&cluster, "198.18.0.1").await;
    let mut watch = only_2
        .watch(only_2.leases().await.unwrap().revision + 1)
        .await
        .unwrap();
    // Members 0 and 1 freeze: member 2 runs on, cut off from them, and loses its leader.
    cluster.signal(0, "STOP");
    cluster.signal(1, "STOP");
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), watch.next()).await;
    match ended {
        Ok(WatchItem::Broken(WatchBroken::Disconnected(why)))
        | Ok(WatchItem::Broken(WatchBroken::Stalled(why))) => {
            println!(
                "the leaderless member ended the watch after {:?}: {why}",
                started.elapsed()
            );
        }
        other => panic!("the watch on a leaderless member did not end: {other:?}"),
    }
    let refused = only_2.watch(1).await;
    assert!(
        refused.is_err()
            || matches!(
                tokio::time::timeout(Duration::from_secs(5), refused.unwrap().next()).await,
                Ok(WatchItem::Broken(_))
            ),
        "a new watch on the leaderless member is not refused"
    );
    assert!(
        only_2.leases().await.is_err(),
        "a leaderless member serves a listing"
    );
    // The cluster heals; the host's watch (now on any member) gets events again.
    cluster.signal(0, "CONT");
    cluster.signal(1, "CONT");
    let mut client = cluster.client_without(9).await;
    let took = host
        .sees_put(&mut client, "10.1.203.0/24", "198.18.0.5")
        .await;
    println!("after the cluster healed, a change reached the route table in {took:?}");
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A member cut off from the other two by the network while it keeps serving clients: it
/// loses its leader, and with `hasleader` it cancels the hosts' watch, which moves to a member
/// of the majority; changes keep arriving while the partition lasts.
///
/// The test runs in a network namespace of its own (unshared by this process, gone when it
/// exits), where firewall rules drop member 0's peer traffic and nothing else.
#[test]
fn member_cut_off_from_its_peers_the_watch_moves_on() {
    // SAFETY: unshare takes no pointers; it moves this thread, and every thread and process
    // it starts afterwards, into a new network namespace owned by this test process.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) failed (the test needs root): {}",
        std::io::Error::last_os_error()
    );
    run(&["ip", "link", "set", "lo", "up"]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        init_logs();
        let cluster = Cluster::start_with_outsider(Some(0)).await;
        let mut client = cluster.client_without(0).await;
        client
            .put(format!("{PREFIX}/config"), CONFIG, None)
            .await
            .unwrap();
        let host = Host::join(&cluster, "198.18.0.1").await;
        host.sees_put(&mut client, "10.1.200.0/24", "198.18.0.2")
            .await;

        // Member 0 (user nobody) can no longer reach its peers' ports, nor they its.
        let peer_port = |i: usize| cluster.members[i].peer_port.to_string();
        run(&[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &peer_port(0),
            "-j",
            "DROP",
        ]);
        for i in [1, 2] {
            run(&[
                "iptables",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-m",
                "owner",
                "--uid-owner",
                "65534",
                "--dport",
                &peer_port(i),
                "-j",
                "DROP",
            ]);
        }
        let mut cut_off = Client::connect([cluster.endpoint(0)], None).await.unwrap();
        let started = Instant::now();
        let mut leaderless = false;
        while started.elapsed() < WAIT {
            // A linearizable read needs a leader; a serializable one is served locally.
            let status = cut_off.status().await;
            if status.as_ref().is_ok_and(|s| s.leader() == 0) || status.is_err() {
                leaderless = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            leaderless,
            "member 0 still has a leader behind the firewall"
        );
        println!(
            "member 0 lost its leader {:?} after the partition",
            started.elapsed()
        );
        for (i, subnet) in ["10.1.201.0/24", "10.1.202.0/24"].iter().enumerate() {
            let took = host
                .sees_put(&mut client, subnet, &format!("198.18.0.{}", 3 + i))
                .await;
            println!("during the partition, a change reached the route table in {took:?}");
        }
        assert_eq!(host.peers().len(), 3);
    });
}
