//! Conformance with what a real flanneld v0.20.2 (udp backend) wrote to etcd and subnet.env
//! (`control/tests/fixtures/flannel-v0.20.2/`), against a real etcd started by each test: weft writes
//! the same keys, values, TTLs and subnet.env, and reads flanneld's leases as its own.

#[path = "support/etcd.rs"]
mod etcd;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd::Etcd;
use etcd_client::{Client, GetOptions, LeaseTimeToLiveOptions, PutOptions};
use ipnet::Ipv4Net;
use tokio::task::JoinHandle;
use weft_control::lease::{self, Backoff, MembershipHandle, Settings};
use weft_control::registry::{EtcdRegistry, EtcdSettings};
use weft_control::subnet_env::SubnetEnv;
use weft_engine::{RouteTable, Routes};

const WAIT: Duration = Duration::from_secs(20);

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/flannel-v0.20.2")
        .join(name)
}

fn fixture(name: &str) -> String {
    let path = fixture_path(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

/// One `KEY => VALUE   [lease note]` line of etcd-after-two-hosts.txt.
struct FixtureKey {
    key: String,
    value: String,
    ttl: Option<i64>,
}

fn fixture_keys() -> Vec<FixtureKey> {
    fixture("etcd-after-two-hosts.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" => "))
        .map(|line| {
            let (key, rest) = line.split_once(" => ").unwrap();
            let (value, note) = rest.split_once("   [").unwrap();
            let ttl = note
                .split_once("TTL(")
                .and_then(|(_, t)| t.split_once("s)"))
                .map(|(secs, _)| secs.parse().unwrap());
            FixtureKey {
                key: key.to_owned(),
                value: value.to_owned(),
                ttl,
            }
        })
        .collect()
}

fn registry(etcd: &Etcd) -> EtcdRegistry {
    EtcdRegistry::new(&EtcdSettings {
        request_timeout: Duration::from_secs(2),
        ..EtcdSettings::new(vec![etcd.endpoint()])
    })
    .unwrap()
}

fn fast_retry() -> Backoff {
    Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    }
}

struct Member {
    handle: MembershipHandle,
    routes: Routes,
    task: JoinHandle<()>,
    network: Ipv4Net,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A host with flannel's own settings (24 h leases, 60 min margin).
async fn join(etcd: &Etcd, public_ip: Ipv4Addr, previous: Option<Ipv4Net>) -> Member {
    let reg = registry(etcd);
    let config = tokio::time::timeout(WAIT, lease::wait_for_config(&reg, fast_retry()))
        .await
        .expect("no usable network config");
    let routes = Routes::new(RouteTable::empty(config.overlay().unwrap(), config.port()));
    let settings = Settings {
        previous_subnet: previous,
        retry: fast_retry(),
        ..Settings::new(public_ip)
    };
    let (handle, task) = lease::run_membership(reg, &config, settings, routes.clone()).unwrap();
    Member {
        handle,
        routes,
        task,
        network: config.network().unwrap(),
    }
}

impl Member {
    async fn subnet(&mut self) -> Ipv4Net {
        tokio::time::timeout(WAIT, self.handle.acquired())
            .await
            .expect("no lease acquired in time")
            .expect("membership ended")
            .subnet
    }
}

async fn all_keys(client: &mut Client) -> BTreeMap<String, (String, i64)> {
    client
        .get(
            "/coreos.com/network/",
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_owned(),
                (kv.value_str().unwrap().to_owned(), kv.lease()),
            )
        })
        .collect()
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_writes_what_flanneld_wrote() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let keys = fixture_keys();
    assert_eq!(keys.len(), 3);
    let config = &keys[0];
    assert!(config.key.ends_with("/config") && config.ttl.is_none());
    client
        .put(config.key.as_str(), config.value.as_str(), None)
        .await
        .unwrap();

    // Host 1 starts with flanneld's subnet.env from the lab, host 2 with its previous subnet.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir =
        TempDir(std::env::temp_dir().join(format!("weft-fixture-{}-{nanos}", std::process::id())));
    let subnet_file = dir.0.join("flannel/subnet.env");
    std::fs::create_dir_all(subnet_file.parent().unwrap()).unwrap();
    std::fs::copy(fixture_path("subnet.env"), &subnet_file).unwrap();
    let previous = SubnetEnv::read(&subnet_file).unwrap();
    assert_eq!(previous, Some("10.1.15.0/24".parse().unwrap()));
    let mut h1 = join(&etcd, "198.18.0.1".parse().unwrap(), previous).await;
    let s1 = h1.subnet().await;
    let mut h2 = join(
        &etcd,
        "198.18.0.2".parse().unwrap(),
        Some("10.1.81.0/24".parse().unwrap()),
    )
    .await;
    h2.subnet().await;

    // The keyspace is flanneld's, byte for byte, with 24 h etcd leases on the subnets.
    let stored = all_keys(&mut client).await;
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        keys.iter().map(|k| &k.key).collect::<Vec<_>>()
    );
    for expected in &keys {
        let (value, lease) = &stored[&expected.key];
        assert_eq!(value, &expected.value, "{}", expected.key);
        match expected.ttl {
            None => assert_eq!(*lease, 0, "{} has no lease", expected.key),
            Some(ttl) => {
                let resp = client
                    .lease_time_to_live(*lease, Some(LeaseTimeToLiveOptions::new()))
                    .await
                    .unwrap();
                assert_eq!(resp.granted_ttl(), ttl, "{}", expected.key);
                assert!(
                    resp.ttl() > ttl - 60,
                    "{}: {} s left",
                    expected.key,
                    resp.ttl()
                );
            }
        }
    }

    // Host 1's subnet.env is flanneld's, byte for byte (MTU 1500 - 28).
    let env = SubnetEnv {
        network: h1.network,
        subnet: s1,
        mtu: 1472,
        ipmasq: false,
    };
    env.write_atomic(&subnet_file).unwrap();
    assert_eq!(
        std::fs::read_to_string(&subnet_file).unwrap(),
        fixture("subnet.env")
    );
    wait_for_peers(&h1, &[("10.1.81.0/24", "198.18.0.2")]).await;
}

/// Wait until `member` routes exactly `expected` (subnet, public IP) pairs.
async fn wait_for_peers(member: &Member, expected: &[(&str, &str)]) {
    let expected: Vec<(Ipv4Net, Ipv4Addr)> = expected
        .iter()
        .map(|(s, ip)| (s.parse().unwrap(), ip.parse().unwrap()))
        .collect();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let peers: Vec<_> = member.routes.current().peers().collect();
        if peers == expected {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "peers: {peers:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_adopts_flanneld_leases() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    // Load the keyspace flanneld left, leases and all.
    let mut lease_ids = BTreeMap::new();
    for k in fixture_keys() {
        let options = match k.ttl {
            Some(ttl) => {
                let id = client.lease_grant(ttl, None).await.unwrap().id();
                lease_ids.insert(k.key.clone(), id);
                Some(PutOptions::new().with_lease(id))
            }
            None => None,
        };
        client
            .put(k.key.as_str(), k.value.as_str(), options)
            .await
            .unwrap();
    }
    // weftd replaces flanneld on host 1, without its subnet.env: it finds host 1's lease.
    let mut h1 = join(&etcd, "198.18.0.1".parse().unwrap(), None).await;
    assert_eq!(
        h1.subnet().await,
        "10.1.15.0/24".parse::<Ipv4Net>().unwrap()
    );
    let stored = all_keys(&mut client).await;
    let key = "/coreos.com/network/subnets/10.1.15.0-24";
    assert_eq!(
        stored[key],
        (
            r#"{"PublicIP":"198.18.0.1","PublicIPv6":null}"#.to_owned(),
            lease_ids[key]
        ),
        "flanneld's lease is kept and renewed in place"
    );
    // Host 2 (still flanneld) is a peer.
    wait_for_peers(&h1, &[("10.1.81.0/24", "198.18.0.2")]).await;
}
