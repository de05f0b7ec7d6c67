//! Leases, peers and routes against a real etcd 3.4 started by each test.
//!
//! Every test runs its own etcd on 127.0.0.1 (see `support/etcd.rs`) and one or more complete
//! memberships (lease keeper + watcher) over [`EtcdRegistry`], with short TTLs so that
//! renewals and expiries happen within seconds.

#[path = "support/etcd.rs"]
mod etcd;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etcd::Etcd;
use etcd_client::{Client, CompactionOptions, GetOptions, PutOptions};
use ipnet::Ipv4Net;
use tokio::task::JoinHandle;
use weft_control::lease::{self, Backoff, MembershipHandle, Settings};
use weft_control::registry::{
    EtcdRegistry, EtcdSettings, Expect, LeaseWatch, Registry, WatchBroken, WatchEvent, WatchItem,
};
use weft_control::subnet::{lease_key_name, LeaseAttrs, LeaseKey};
use weft_engine::{RouteTable, Routes};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#;
const WAIT: Duration = Duration::from_secs(20);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn udp(public_ip: &str) -> String {
    LeaseAttrs::udp(ip(public_ip)).to_json()
}

fn key(name: &str) -> String {
    format!("{PREFIX}/subnets/{name}")
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

/// Leases of 3 s renewed 1 s before expiry.
fn fast(public_ip: &str) -> Settings {
    Settings {
        lease_ttl: Duration::from_secs(3),
        renew_margin: Duration::from_secs(1),
        renew_retry: Duration::from_millis(500),
        retry: fast_retry(),
        ..Settings::new(ip(public_ip))
    }
}

/// One host's membership; aborted when dropped (its lease stays in etcd, as after a crash).
struct Member {
    handle: MembershipHandle,
    routes: Routes,
    task: JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn join(endpoint_of: &Etcd, settings: Settings) -> Member {
    join_registry(registry(endpoint_of), settings).await
}

async fn join_registry(reg: EtcdRegistry, settings: Settings) -> Member {
    let config = tokio::time::timeout(WAIT, lease::wait_for_config(&reg, fast_retry()))
        .await
        .expect("no usable network config");
    let routes = Routes::new(RouteTable::empty(config.overlay().unwrap(), config.port()));
    let (handle, task) = lease::run_membership(reg, &config, settings, routes.clone()).unwrap();
    Member {
        handle,
        routes,
        task,
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

    fn peers(&self) -> BTreeMap<Ipv4Net, Ipv4Addr> {
        self.routes.current().peers().collect()
    }
}

/// Poll `ok` until it holds or the deadline passes.
async fn eventually(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs on, a fresh etcd holding the network config, and a client of it.
async fn etcd_with_config() -> (Etcd, Client) {
    init_logs();
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    put_config(&mut client).await;
    (etcd, client)
}

async fn put_config(client: &mut Client) {
    client
        .put(format!("{PREFIX}/config"), CONFIG, None)
        .await
        .unwrap();
}

/// Store a lease as another host would, attached to an etcd lease of `ttl` seconds (0: none).
async fn put_lease(client: &mut Client, name: &str, value: &str, ttl: i64) -> i64 {
    let id = if ttl > 0 {
        client.lease_grant(ttl, None).await.unwrap().id()
    } else {
        0
    };
    let options = (id != 0).then(|| PutOptions::new().with_lease(id));
    client.put(key(name), value, options).await.unwrap();
    id
}

/// Every lease in etcd that parses, as subnet → public IP.
async fn etcd_leases(client: &mut Client) -> BTreeMap<Ipv4Net, Ipv4Addr> {
    let resp = client
        .get(
            format!("{PREFIX}/subnets/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .filter_map(|kv| {
            let name = kv
                .key_str()
                .ok()?
                .strip_prefix(&format!("{PREFIX}/subnets/"))?;
            let key = LeaseKey::parse(name).ok()?;
            let attrs = LeaseAttrs::parse(kv.value()).ok()?;
            Some((key.ipv4, attrs.public_ip))
        })
        .collect()
}

/// The value and etcd lease of a lease key.
async fn stored(client: &mut Client, subnet: Ipv4Net) -> Option<(String, i64)> {
    let resp = client
        .get(key(&lease_key_name(subnet)), None)
        .await
        .unwrap();
    resp.kvs()
        .first()
        .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_get_distinct_subnets_and_see_each_other() {
    let (etcd, mut client) = etcd_with_config().await;
    let mut a = join(&etcd, fast("198.18.0.1")).await;
    let mut b = join(&etcd, fast("198.18.0.2")).await;
    let (sa, sb) = (a.subnet().await, b.subnet().await);
    assert_ne!(sa, sb);
    eventually("a routes b's subnet to b", async || {
        a.peers() == BTreeMap::from([(sb, ip("198.18.0.2"))])
            && a.routes.current().local_subnet() == Some(sa)
    })
    .await;
    eventually("b routes a's subnet to a", async || {
        b.peers() == BTreeMap::from([(sa, ip("198.18.0.1"))])
    })
    .await;
    assert_eq!(a.routes.current().local_subnet(), Some(sa));
    assert_eq!(
        a.routes.current().peer_for(sb.addr()),
        Some(std::net::SocketAddrV4::new(ip("198.18.0.2"), 8285))
    );

    // Leases of 3 s outlive several renewal periods without being recreated.
    let before = stored(&mut client, sa).await.unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!(
        stored(&mut client, sa).await,
        Some(before),
        "renewed in place"
    );
    assert_eq!(a.handle.current().unwrap().subnet, sa);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_public_ip_keeps_the_subnet() {
    let (etcd, mut client) = etcd_with_config().await;
    let mut first = join(&etcd, fast("198.18.0.1")).await;
    let subnet = first.subnet().await;
    let (_, etcd_lease) = stored(&mut client, subnet).await.unwrap();
    drop(first);
    // No subnet.env this time: the lease for our IP is found in etcd and kept.
    let mut again = join(&etcd, fast("198.18.0.1")).await;
    assert_eq!(again.subnet().await, subnet);
    assert_eq!(
        stored(&mut client, subnet).await,
        Some((udp("198.18.0.1"), etcd_lease)),
        "the same key on the same etcd lease"
    );
    assert_eq!(etcd_leases(&mut client).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_hosts_get_twenty_subnets() {
    let (etcd, mut client) = etcd_with_config().await;
    // All ask for the same previous subnet: one wins, nineteen lose the race and choose again.
    let contested = net("10.1.5.0/24");
    let mut members = Vec::new();
    for i in 1..=20 {
        let mut settings = fast(&format!("198.18.0.{i}"));
        settings.previous_subnet = Some(contested);
        members.push(join(&etcd, settings));
    }
    let mut members = futures::future::join_all(members).await;
    let mut subnets = Vec::new();
    for m in &mut members {
        subnets.push(m.subnet().await);
    }
    let distinct: BTreeSet<Ipv4Net> = subnets.iter().copied().collect();
    assert_eq!(distinct.len(), 20, "{subnets:?}");
    assert_eq!(subnets.iter().filter(|s| **s == contested).count(), 1);
    let in_etcd = etcd_leases(&mut client).await;
    assert_eq!(in_etcd.len(), 20);
    for (i, subnet) in subnets.iter().enumerate() {
        assert_eq!(in_etcd[subnet], ip(&format!("198.18.0.{}", i + 1)));
    }
    for m in &members {
        eventually("every host sees the other nineteen", async || {
            m.peers().len() == 19
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_and_expired_peer_leases_leave_the_route_table() {
    let (etcd, mut client) = etcd_with_config().await;
    let mut a = join(&etcd, fast("198.18.0.1")).await;
    let mut b = join(&etcd, fast("198.18.0.2")).await;
    a.subnet().await;
    let sb = b.subnet().await;
    let peer_lease = put_lease(&mut client, "10.1.250.0-24", &udp("198.18.0.3"), 60).await;
    eventually("a sees b and .3", async || a.peers().len() == 2).await;

    // b crashes and an operator deletes its lease.
    drop(b);
    client.delete(key(&lease_key_name(sb)), None).await.unwrap();
    eventually("b's subnet is gone from a's routes", async || {
        !a.peers().contains_key(&sb)
    })
    .await;
    // .3's etcd lease ends: etcd deletes the key.
    client.lease_revoke(peer_lease).await.unwrap();
    eventually("a has no peer left", async || a.peers().is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_lease_deleted_or_expired_is_reacquired() {
    let (etcd, mut client) = etcd_with_config().await;
    let mut a = join(&etcd, fast("198.18.0.1")).await;
    let subnet = a.subnet().await;
    let (_, first_lease) = stored(&mut client, subnet).await.unwrap();

    client
        .delete(key(&lease_key_name(subnet)), None)
        .await
        .unwrap();
    eventually("the deleted lease is back", async || {
        stored(&mut client, subnet).await.is_some()
    })
    .await;
    let (value, second_lease) = stored(&mut client, subnet).await.unwrap();
    assert_eq!(value, udp("198.18.0.1"));
    assert_eq!(a.handle.current().unwrap().subnet, subnet);

    // Expiry is what etcd does when the lease is revoked: the key goes with it.
    client.lease_revoke(second_lease).await.unwrap();
    eventually("the expired lease is back on a new etcd lease", async || {
        matches!(stored(&mut client, subnet).await, Some((_, l)) if l != second_lease && l != 0)
    })
    .await;
    assert_ne!(first_lease, second_lease);
    assert_eq!(a.handle.current().unwrap().subnet, subnet, "same subnet");
    assert_eq!(a.routes.current().local_subnet(), Some(subnet));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_and_compaction_lose_no_event() {
    init_logs();
    let mut etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    put_config(&mut client).await;
    let mut a = join(&etcd, fast("198.18.0.1")).await;
    let own = a.subnet().await;
    put_lease(&mut client, "10.1.201.0-24", &udp("198.18.0.11"), 120).await;
    put_lease(&mut client, "10.1.202.0-24", &udp("198.18.0.12"), 0).await;
    eventually("a sees both peers", async || a.peers().len() == 2).await;

    etcd.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        a.peers().len(),
        2,
        "the last table stays while etcd is down"
    );
    assert_eq!(a.handle.current().unwrap().subnet, own);
    etcd.run().await;

    // Changes right after the restart, around a compaction.
    let mut client = etcd.client().await;
    client.delete(key("10.1.201.0-24"), None).await.unwrap();
    put_lease(&mut client, "10.1.203.0-24", &udp("198.18.0.13"), 120).await;
    let rev = client
        .put(key("10.1.204.0-24"), udp("198.18.0.14"), None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client
        .compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    client.delete(key("10.1.202.0-24"), None).await.unwrap();
    put_lease(&mut client, "10.1.205.0-24", &udp("198.18.0.15"), 0).await;

    eventually("a's routes equal etcd's leases", async || {
        let mut expected = etcd_leases(&mut client).await;
        expected.remove(&own);
        a.peers() == expected && expected.len() == 3
    })
    .await;
    assert_eq!(
        a.peers().keys().copied().collect::<Vec<_>>(),
        [
            net("10.1.203.0/24"),
            net("10.1.204.0/24"),
            net("10.1.205.0/24")
        ]
    );
    assert_eq!(a.handle.current().unwrap().subnet, own);
    eventually("a's own lease is in etcd", async || {
        stored(&mut client, own).await.map(|(v, _)| v) == Some(udp("198.18.0.1"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_at_start_is_waited_for() {
    init_logs();
    let mut etcd = Etcd::prepare();
    let reg = registry(&etcd);
    let joining = tokio::spawn(async move {
        let mut m = join_registry(reg, fast("198.18.0.1")).await;
        let subnet = m.subnet().await;
        (m, subnet)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!joining.is_finished());
    etcd.run().await;
    let mut client = etcd.client().await;
    put_config(&mut client).await;
    let (_member, subnet) = tokio::time::timeout(WAIT, joining).await.unwrap().unwrap();
    assert_eq!(
        stored(&mut client, subnet).await.map(|(v, _)| v),
        Some(udp("198.18.0.1"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_leases_are_skipped() {
    let (etcd, mut client) = etcd_with_config().await;
    let bad = [
        ("10.1.50.0-24", "{\"PublicIP\":"),
        ("not-a-subnet", udp("198.18.0.30").as_str()),
        ("10.9.0.0-24", udp("198.18.0.31").as_str()),
        ("10.1.51.0-25", udp("198.18.0.32").as_str()),
        (
            "10.1.52.0-24",
            "{\"PublicIP\":\"198.18.0.33\",\"BackendType\":\"vxlan\"}",
        ),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    for (name, value) in &bad {
        put_lease(&mut client, name, value, 0).await;
    }
    let mut a = join(&etcd, fast("198.18.0.1")).await;
    let mut b = join(&etcd, fast("198.18.0.2")).await;
    let (sa, sb) = (a.subnet().await, b.subnet().await);
    for taken in ["10.1.50.0/24", "10.1.52.0/24"] {
        assert!(
            sa != net(taken) && sb != net(taken),
            "a malformed lease still holds its key"
        );
    }
    eventually("a sees b only", async || {
        a.peers() == BTreeMap::from([(sb, ip("198.18.0.2"))])
    })
    .await;
    // Malformed changes while watching are skipped too. (Subnets above the first 100, which
    // the random pick never takes, so that neither host's own lease is overwritten.)
    put_lease(&mut client, "10.1.200.0-24", "garbage", 0).await;
    put_lease(&mut client, "10.1.201.0-24", &udp("198.18.0.61"), 0).await;
    eventually("a sees b and .61", async || {
        a.peers()
            == BTreeMap::from([
                (sb, ip("198.18.0.2")),
                (net("10.1.201.0/24"), ip("198.18.0.61")),
            ])
    })
    .await;
    assert_eq!(a.handle.current().unwrap().subnet, sa);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_operations_on_etcd() {
    init_logs();
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    let reg = registry(&etcd);
    assert_eq!(reg.config().await.unwrap(), None);
    put_config(&mut client).await;
    assert_eq!(reg.config().await.unwrap().as_deref(), Some(CONFIG));

    // flannel's default lists an endpoint that is usually dead (:4001) before the live one.
    let dead = Etcd::prepare();
    let both = EtcdRegistry::new(&EtcdSettings {
        request_timeout: Duration::from_secs(2),
        ..EtcdSettings::new(vec![dead.endpoint(), etcd.endpoint()])
    })
    .unwrap();
    for _ in 0..5 {
        let config = tokio::time::timeout(WAIT, both.config()).await.unwrap();
        assert_eq!(config.unwrap().as_deref(), Some(CONFIG));
    }

    let ttl = Some(Duration::from_secs(5));
    let written = reg
        .write_lease("10.1.1.0-24", &udp("198.18.0.1"), ttl, Expect::Absent)
        .await
        .unwrap()
        .expect("created");
    assert_eq!(written.ttl, ttl);
    assert!(reg
        .write_lease("10.1.1.0-24", &udp("198.18.0.2"), ttl, Expect::Absent)
        .await
        .unwrap()
        .is_none());
    let snapshot = reg.leases().await.unwrap();
    assert_eq!(snapshot.leases.len(), 1);
    assert_eq!(snapshot.leases[0].etcd_lease, written.etcd_lease);
    assert_eq!(snapshot.revision, written.revision);

    let ttl_left = reg.keep_alive(written.etcd_lease).await.unwrap();
    assert!(
        matches!(ttl_left, Some(t) if t >= Duration::from_secs(4)),
        "{ttl_left:?}"
    );

    let mut watch = reg.watch(snapshot.revision + 1).await.unwrap();
    assert!(!reg
        .delete_lease("10.1.1.0-24", written.revision - 1)
        .await
        .unwrap());
    client.lease_revoke(written.etcd_lease).await.unwrap();
    assert_eq!(reg.keep_alive(written.etcd_lease).await.unwrap(), None);
    let item = tokio::time::timeout(WAIT, watch.next()).await.unwrap();
    assert!(
        matches!(&item, WatchItem::Events { events, .. }
            if matches!(&events[..], [WatchEvent::Delete { name, .. }] if name == "10.1.1.0-24")),
        "{item:?}"
    );

    // A watch from a compacted revision says so.
    let old = snapshot.revision;
    let rev = client
        .put(key("10.1.2.0-24"), udp("198.18.0.2"), None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(rev, None).await.unwrap();
    let mut stale = reg.watch(old).await.unwrap();
    let item = tokio::time::timeout(WAIT, stale.next()).await.unwrap();
    assert!(
        matches!(item, WatchItem::Broken(WatchBroken::Compacted { compact_revision }) if compact_revision == rev),
        "{item:?}"
    );
}

/// etcd loses its data while two hosts run: stopped, its data directory deleted, started
/// empty, the network config put back by the operator. Leases of an hour, so that no renewal
/// comes to the rescue: both hosts must notice the loss and register again, with the same
/// subnets, within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_data_wiped_while_running_both_hosts_reregister() {
    init_logs();
    let mut etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    put_config(&mut client).await;
    // Enough history that the wiped etcd's revision is lower than what the hosts have seen.
    for i in 0..20 {
        client
            .put("/weft-test/filler", format!("{i}"), None)
            .await
            .unwrap();
    }
    let hour = |public_ip: &str| Settings {
        lease_ttl: Duration::from_secs(3600),
        renew_margin: Duration::from_secs(600),
        ..fast(public_ip)
    };
    let mut a = join(&etcd, hour("198.18.0.1")).await;
    let mut b = join(&etcd, hour("198.18.0.2")).await;
    let (sa, sb) = (a.subnet().await, b.subnet().await);
    eventually("the hosts see each other", async || {
        a.peers().get(&sb) == Some(&ip("198.18.0.2"))
            && b.peers().get(&sa) == Some(&ip("198.18.0.1"))
    })
    .await;

    etcd.stop();
    std::fs::remove_dir_all(etcd.dir().join("data")).unwrap();
    etcd.run().await;
    let mut client = etcd.client().await;
    put_config(&mut client).await;
    // The hosts may already be back: they need no config to re-register.
    let wiped = Instant::now();

    let deadline = wiped + Duration::from_secs(10);
    loop {
        let leases = etcd_leases(&mut client).await;
        let back = leases.get(&sa) == Some(&ip("198.18.0.1"))
            && leases.get(&sb) == Some(&ip("198.18.0.2"))
            && a.peers().get(&sb) == Some(&ip("198.18.0.2"))
            && b.peers().get(&sa) == Some(&ip("198.18.0.1"));
        if back {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not re-registered within 10 s of the wipe: etcd holds {leases:?}, a routes {:?}, b routes {:?}",
            a.peers(),
            b.peers()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "both hosts re-registered (same subnets) and route to each other {:?} after the wipe",
        wiped.elapsed()
    );
    assert_eq!(a.handle.current().unwrap().subnet, sa);
    assert_eq!(b.handle.current().unwrap().subnet, sb);
    assert!(a.handle.metrics().data_loss_count() >= 1);
    assert!(b.handle.metrics().data_loss_count() >= 1);
}
