//! 65 536 leases in a real etcd: listed, watched, resynchronised and changed one at a time.
//!
//! A 10.0.0.0/8 network with /24 subnets holds 65 536 of them, more than one unpaginated
//! listing can carry under gRPC's default 4 MiB limit. The test puts them all (in
//! transactions of 128 puts, several at once), then measures and prints: the listing, a
//! host's start-up until its route table holds every peer, a resync after etcd restarts, one
//! lease change until the table shows it, and the cost of one route table rebuild, with the
//! process's peak memory. Oversized junk values are put too: they must be skipped, not stop
//! the listing. Run it with `--no-capture` to see the figures.

#[path = "support/etcd.rs"]
mod etcd;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use etcd::Etcd;
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use weft_control::lease::{self, Backoff, Settings};
use weft_control::registry::{EtcdRegistry, EtcdSettings, Registry};
use weft_control::subnet::{lease_key_name, LeaseAttrs};
use weft_control::watch::PeerTable;
use weft_engine::{RouteTable, Routes};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"udp"}}"#;
const LEASES: u32 = 65_536;
/// etcd's default `--max-txn-ops`.
const TXN_OPS: usize = 128;
const OWN_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 254);
const OWN_SUBNET: &str = "10.0.1.0/24";

/// Peak and current resident memory of this process (nextest runs each test in its own).
fn memory() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_owned())
            .unwrap_or_default()
    };
    format!("peak RSS {}, RSS {}", field("VmHWM:"), field("VmRSS:"))
}

/// The subnet of lease `i`: 10.0.0.0/24 … 10.255.255.0/24.
fn subnet(i: u32) -> ipnet::Ipv4Net {
    ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (i << 8)), 24).unwrap()
}

/// The holder of lease `i`: one host per lease, ours for 10.0.1.0/24.
fn holder(i: u32) -> Ipv4Addr {
    if subnet(i) == OWN_SUBNET.parse().unwrap() {
        OWN_IP
    } else {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i + 1)
    }
}

async fn put_all(etcd: &Etcd) {
    let mut client = etcd.client().await;
    client
        .put(format!("{PREFIX}/config"), CONFIG, None)
        .await
        .unwrap();
    let own_lease = client.lease_grant(3600, None).await.unwrap().id();
    let keys: Vec<u32> = (0..LEASES).collect();
    let mut tasks = Vec::new();
    for chunk in keys.chunks(LEASES as usize / 8) {
        let chunk = chunk.to_vec();
        let mut client: Client = client.clone();
        tasks.push(tokio::spawn(async move {
            for batch in chunk.chunks(TXN_OPS) {
                let ops: Vec<TxnOp> = batch
                    .iter()
                    .map(|&i| {
                        let key = format!("{PREFIX}/subnets/{}", lease_key_name(subnet(i)));
                        let options =
                            (holder(i) == OWN_IP).then(|| PutOptions::new().with_lease(own_lease));
                        TxnOp::put(key, LeaseAttrs::udp(holder(i)).to_json(), options)
                    })
                    .collect();
                client.txn(Txn::new().and_then(ops)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

fn registry(etcd: &Etcd) -> EtcdRegistry {
    EtcdRegistry::new(&EtcdSettings {
        request_timeout: Duration::from_secs(10),
        ..EtcdSettings::new(vec![etcd.endpoint()])
    })
    .unwrap()
}

async fn until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_five_thousand_leases_are_listed_watched_and_changed() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let mut etcd = Etcd::start().await;
    let put_started = Instant::now();
    put_all(&etcd).await;
    println!(
        "put {LEASES} leases in {:?}; {}",
        put_started.elapsed(),
        memory()
    );
    // Junk a listing must survive: values of 1 MiB, far over what any lease holds.
    let mut client = etcd.client().await;
    for name in ["junk-a", "junk-b", "junk-c"] {
        client
            .put(
                format!("{PREFIX}/subnets/{name}"),
                vec![b'x'; 1 << 20],
                None,
            )
            .await
            .unwrap();
    }
    let reg = registry(&etcd);

    // The listing alone.
    let started = Instant::now();
    let snapshot = reg.leases().await.expect("listing 65 536 leases");
    let list_time = started.elapsed();
    assert_eq!(snapshot.leases.len(), LEASES as usize + 3);
    assert!(snapshot
        .leases
        .iter()
        .filter(|l| l.name.starts_with("junk"))
        .all(|l| l.value.is_empty()));
    println!(
        "listing: {} keys in {list_time:?}; {}",
        snapshot.leases.len(),
        memory()
    );

    // A host's start-up: config, listing, adoption of its lease, the full route table.
    let started = Instant::now();
    let config = tokio::time::timeout(
        Duration::from_secs(30),
        lease::wait_for_config(&reg, Backoff::default()),
    )
    .await
    .unwrap();
    let overlay = config.overlay().unwrap();
    let routes = Routes::new(RouteTable::empty(overlay, config.port()));
    let settings = Settings {
        lease_ttl: Duration::from_secs(3600),
        renew_margin: Duration::from_secs(600),
        retry: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        },
        ..Settings::new(OWN_IP)
    };
    let (mut handle, task) =
        lease::run_membership(reg.clone(), &config, settings, routes.clone()).unwrap();
    let own = tokio::time::timeout(Duration::from_secs(30), handle.acquired())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        own.subnet,
        OWN_SUBNET.parse().unwrap(),
        "its own lease adopted"
    );
    let peers = LEASES as usize - 1;
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while routes.current().peer_count() != peers {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "the route table holds {} peers, not {peers}",
        routes.current().peer_count()
    );
    println!(
        "start-up (config, listing, adoption, route table of {peers} peers): {:?}; {}",
        started.elapsed(),
        memory()
    );

    // One lease changes hands: until the workers' table shows it.
    let moved = subnet(40_000);
    let new_holder = Ipv4Addr::new(198, 19, 255, 1);
    client
        .put(
            format!("{PREFIX}/subnets/{}", lease_key_name(moved)),
            LeaseAttrs::udp(new_holder).to_json(),
            None,
        )
        .await
        .unwrap();
    let change = until("the change is routed", Duration::from_secs(10), || {
        routes.current().peer_for(moved.network()).map(|p| *p.ip()) == Some(new_holder)
    })
    .await;
    println!("one lease change, put to routed: {change:?}");

    // What one change costs the control thread: the route table rebuilt from the peer table
    // and compared with the published one.
    let table = PeerTable::from_snapshot(overlay, &reg.leases().await.unwrap().leases);
    let rounds = 20;
    let started = Instant::now();
    for _ in 0..rounds {
        let rebuilt = table
            .route_table(config.port(), Some(own.subnet), OWN_IP)
            .unwrap();
        assert!(rebuilt == *routes.current());
    }
    println!(
        "route table rebuild + compare at {} leases: {:?} each",
        table.len(),
        started.elapsed() / rounds
    );
    // What the watcher does instead for one change: the changed subnet's route, looked up
    // in the peer table, applied to a copy of the published table.
    let current = routes.current();
    let started = Instant::now();
    for round in 0..rounds {
        let subnet = subnet(30_000 + round);
        let via = table.route_for(subnet, Some(own.subnet), OWN_IP);
        let changed = current
            .with_changes([
                (subnet, Some(Ipv4Addr::new(198, 19, 128, 1))),
                (subnet, via),
            ])
            .unwrap();
        assert!(changed.is_none(), "a change and its undo change nothing");
        let changed = current.with_changes([(subnet, None)]).unwrap().unwrap();
        assert_eq!(changed.peer_count(), current.peer_count() - 1);
    }
    println!(
        "one change applied in place at {} leases: {:?} each",
        table.len(),
        started.elapsed() / (2 * rounds)
    );

    // A resync: etcd restarts, the watch breaks, the watcher lists everything again.
    let resyncs = handle.metrics().resync_count();
    etcd.stop();
    etcd.run().await;
    let restarted = Instant::now();
    let metrics = handle.metrics();
    until("the watcher resynced", Duration::from_secs(60), || {
        metrics.resync_count() > resyncs
    })
    .await;
    let resync = restarted.elapsed();
    assert_eq!(routes.current().peer_count(), peers);
    println!(
        "resync after an etcd restart (listing, diff, route table): {resync:?}; {}",
        memory()
    );
    assert_eq!(metrics.data_loss_count(), 0, "a restart is no data loss");
    task.abort();
}
