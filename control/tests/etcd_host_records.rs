//! weft's per-host records (multicast groups) against a real etcd 3.4 started by each test.
//!
//! Complete memberships (lease keeper + watcher) and record tasks over [`EtcdRegistry`], with
//! short lease TTLs: the record's key, value and etcd lease as stored, a join reaching a peer's
//! group table, a host's record expiring with its lease, and the records coming back after
//! etcd lost its data.

#[path = "support/etcd.rs"]
mod etcd;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use etcd::Etcd;
use etcd_client::{Client, GetOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_control::host_records::{run_host_records, RecordInputs, RecordSettings};
use weft_control::lease::{self, Backoff, MembershipHandle, Settings};
use weft_control::registry::{EtcdRegistry, EtcdSettings};
use weft_control::subnet::lease_key_name;
use weft_engine::{GroupTable, Groups, RouteTable, Routes};

const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#;
const RECORDS: &str = "/weft.io/coreos.com/network/hosts/";
const WAIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn fast_retry() -> Backoff {
    Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    }
}

fn registry(etcd: &Etcd) -> EtcdRegistry {
    EtcdRegistry::new(&EtcdSettings {
        request_timeout: Duration::from_secs(2),
        ..EtcdSettings::new(vec![etcd.endpoint()])
    })
    .unwrap()
}

/// One host with multicast on: membership (3 s leases) and its record task.
struct Host {
    membership: MembershipHandle,
    local_groups: watch::Sender<Vec<Ipv4Addr>>,
    groups: Groups,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Host {
    async fn start(etcd: &Etcd, public_ip: &str) -> Self {
        let reg = registry(etcd);
        let config = tokio::time::timeout(WAIT, lease::wait_for_config(&reg, fast_retry()))
            .await
            .expect("no usable network config");
        let routes = Routes::new(RouteTable::empty(config.overlay().unwrap(), config.port()));
        let settings = Settings {
            lease_ttl: Duration::from_secs(3),
            renew_margin: Duration::from_secs(1),
            renew_retry: Duration::from_millis(500),
            retry: fast_retry(),
            ..Settings::new(ip(public_ip))
        };
        let (mut membership, task) =
            lease::run_membership(reg.clone(), &config, settings, routes.clone()).unwrap();
        tokio::time::timeout(WAIT, membership.acquired())
            .await
            .expect("no lease in time");
        let (local_groups, local_rx) = watch::channel(Vec::new());
        let groups = Groups::default();
        let records = run_host_records(
            reg,
            RecordSettings {
                multicast: true,
                broadcast: false,
                public_key: None,
                skip_inner_csum: false,
                udp_gso_check: false,
                retry: fast_retry(),
            },
            RecordInputs {
                lease: membership.lease(),
                local_groups: local_rx,
                routes,
                groups: groups.clone(),
                tunnels: None,
                partial_peers: Default::default(),
                gso_check: Default::default(),
            },
        );
        Self {
            membership,
            local_groups,
            groups,
            tasks: vec![task, records],
        }
    }

    fn name(&self) -> String {
        lease_key_name(self.membership.current().unwrap().subnet)
    }
}

async fn eventually(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The record stored under `name`: its value and etcd lease.
async fn stored(client: &mut Client, name: &str) -> Option<(String, i64)> {
    let resp = client.get(format!("{RECORDS}{name}"), None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
}

async fn lease_of(client: &mut Client, name: &str) -> Option<i64> {
    let resp = client
        .get(format!("/coreos.com/network/subnets/{name}"), None)
        .await
        .unwrap();
    resp.kvs().first().map(|kv| kv.lease())
}

fn receivers(t: &GroupTable, group: &str) -> Vec<SocketAddrV4> {
    t.receivers_of(ip(group)).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_joins_and_the_lease_in_a_real_etcd() {
    let etcd = Etcd::start().await;
    let mut client = etcd.client().await;
    client
        .put("/coreos.com/network/config", CONFIG, None)
        .await
        .unwrap();
    let a = Host::start(&etcd, "198.18.0.1").await;
    let b = Host::start(&etcd, "198.18.0.2").await;

    // b's containers join a group: b's record says so, on b's subnet lease, and a's table follows.
    b.local_groups.send_replace(vec![ip("239.1.1.1")]);
    let b_name = b.name();
    let want =
        r#"{"PublicIP":"198.18.0.2","Capabilities":["multicast"],"MulticastGroups":["239.1.1.1"]}"#;
    eventually("b's record lists the group", async || {
        stored(&mut client.clone(), &b_name).await.map(|s| s.0) == Some(want.to_owned())
    })
    .await;
    let (_, record_lease) = stored(&mut client, &b_name).await.unwrap();
    assert_eq!(Some(record_lease), lease_of(&mut client, &b_name).await);
    assert_ne!(record_lease, 0);
    let at_b = SocketAddrV4::new(ip("198.18.0.2"), 8285);
    eventually("a sends 239.1.1.1 to b", async || {
        receivers(&a.groups.snapshot(), "239.1.1.1") == [at_b]
    })
    .await;

    // A leave.
    b.local_groups.send_replace(vec![]);
    eventually("a stops sending 239.1.1.1 to b", async || {
        receivers(&a.groups.snapshot(), "239.1.1.1").is_empty()
    })
    .await;
    assert_eq!(receivers(&a.groups.snapshot(), "224.0.0.251"), [at_b]);

    // Junk under the records' prefix is skipped; nothing else is disturbed.
    client
        .put(format!("{RECORDS}10.1.250.0-24"), "not json", None)
        .await
        .unwrap();

    // Every key is deleted: the leases and records are written again.
    client
        .delete("", Some(etcd_client::DeleteOptions::new().with_all_keys()))
        .await
        .unwrap();
    client
        .put("/coreos.com/network/config", CONFIG, None)
        .await
        .unwrap();
    b.local_groups.send_replace(vec![ip("239.2.2.2")]);
    eventually("both records are back", async || {
        let resp = client
            .clone()
            .get(RECORDS, Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        resp.kvs().len() == 2
    })
    .await;
    eventually("a sends 239.2.2.2 to b", async || {
        receivers(&a.groups.snapshot(), "239.2.2.2") == [at_b]
    })
    .await;

    // b dies: its lease expires (3 s) and takes the record with it; a forgets b.
    let b_name = b.name();
    drop(b);
    eventually("b's record expired with its lease", async || {
        stored(&mut client.clone(), &b_name).await.is_none()
    })
    .await;
    eventually("a forgets b", async || a.groups.snapshot().is_empty()).await;
}
