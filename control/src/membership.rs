//! This host's membership of the overlay: the lease keeper and the peer watcher, run together.
//!
//! The keeper ([`crate::keeper`]) holds this host's lease; the watcher ([`crate::watch`])
//! follows every lease and publishes the route table. They share only the vocabulary of
//! [`crate::own_lease`]: the keeper publishes the lease it holds, the watcher reports when it
//! sees that lease gone.
//!
//! # Wiring it into the daemon
//!
//! ```ignore
//! let registry = EtcdRegistry::new(&etcd_settings)?;
//! // 1. The network config (waits, logging why, until a usable one is in etcd).
//! let config = lease::wait_for_config(&registry, Backoff::default()).await;
//! let routes = Routes::new(RouteTable::empty(config.overlay()?, config.port()));
//! // 2. The lease, then the peers: both run in one task.
//! let mut settings = lease::Settings::new(public_ip);
//! settings.previous_subnet = SubnetEnv::read(&subnet_file).unwrap_or_else(|e| { error!(..); None });
//! let (mut membership, task) = lease::run_membership(registry, &config, settings, routes.clone())?;
//! let lease = membership.acquired().await;
//! // 3. Configure the TUN device with lease.subnet; 4. start the workers with `routes`;
//! // 5. write subnet.env; 6. notify READY=1.
//! // Afterwards, watch `membership.lease()` for a changed subnet (re-acquired elsewhere after
//! // it was lost): readdress the TUN device and rewrite subnet.env. On shutdown,
//! // `task.abort()`; the lease is left in etcd so that a restart finds it again.
//! ```

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use weft_engine::Routes;

use crate::backoff::Backoff;
use crate::config::{ConfigError, NetworkConfig};
use crate::data_loss::StoreHistory;
use crate::keeper::{Keeper, Settings, SettingsError, Shared};
use crate::metrics::ControlMetrics;
use crate::own_lease::Lease;
use crate::registry::Registry;
use crate::watch::Watcher;

/// Why the membership cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The settings cannot work.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The config is not one weft can run.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Wait until etcd holds a network config weft can run, and return it. A missing, unreadable,
/// malformed or unsupported config is logged with its reason and read again after a backoff
/// delay, so that an operator can fix it while weftd waits; this never fails.
pub async fn wait_for_config<R: Registry>(registry: &R, retry: Backoff) -> NetworkConfig {
    let key = registry.prefix().config_key();
    let mut delays = retry.delays();
    loop {
        match registry.config().await {
            Ok(Some(text)) => {
                match NetworkConfig::parse(&text).and_then(|c| c.check_supported().map(|()| c)) {
                    Ok(config) => {
                        info!("network config at {key}: {config}");
                        return config;
                    }
                    Err(e) => {
                        let wait = delays.next_delay();
                        error!("network config at {key} cannot be used: {e}; reading it again in {wait:?}");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            Ok(None) => {
                let wait = delays.next_delay();
                warn!("no network config at {key} yet; reading it again in {wait:?}");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let wait = delays.next_delay();
                warn!("cannot read the network config at {key} ({e}); is etcd reachable? retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The daemon's view of the running membership task.
#[derive(Clone, Debug)]
pub struct MembershipHandle {
    lease: watch::Receiver<Option<Lease>>,
    metrics: Arc<ControlMetrics>,
}

impl MembershipHandle {
    /// The keeper's and the watcher's metrics, for `/metrics`.
    pub fn metrics(&self) -> Arc<ControlMetrics> {
        self.metrics.clone()
    }

    /// A receiver of this host's lease: `None` until the first one is acquired, then always the
    /// current one (a lost lease stays published until it is replaced, so that forwarding goes
    /// on). It changes on every renewal (`expires`) and when the subnet changes.
    pub fn lease(&self) -> watch::Receiver<Option<Lease>> {
        self.lease.clone()
    }

    /// The current lease, if one has been acquired.
    pub fn current(&self) -> Option<Lease> {
        *self.lease.borrow()
    }

    /// Wait for the first lease. `None` only if the membership task has ended (aborted).
    pub async fn acquired(&mut self) -> Option<Lease> {
        let lease = self.lease.wait_for(Option::is_some).await.ok()?;
        *lease
    }
}

/// Start this host's membership: the lease keeper and the peer watcher, in one task spawned on
/// the current tokio runtime (call it from within one).
///
/// `config` must be usable ([`NetworkConfig::check_supported`]); `routes` receives a fresh
/// route table whenever a peer or this host's subnet changes. The task runs until aborted;
/// aborting it leaves the lease in etcd (it expires unless a restarted weftd reuses it).
pub fn run_membership<R: Registry>(
    registry: R,
    config: &NetworkConfig,
    settings: Settings,
    routes: Routes,
) -> Result<(MembershipHandle, JoinHandle<()>), MembershipError> {
    settings.validate()?;
    config.check_supported()?;
    let overlay = config.overlay()?;
    let (lease_tx, lease_rx) = watch::channel(None);
    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
    let history = StoreHistory::new();
    let metrics = Arc::new(ControlMetrics::new());
    let watcher = Watcher {
        registry: registry.clone(),
        overlay,
        port: config.port(),
        public_ip: settings.public_ip,
        routes,
        lease: lease_rx.clone(),
        own_gone: gone_tx,
        retry: settings.retry,
        history: history.clone(),
        metrics: metrics.clone(),
    };
    let shared = Shared {
        history,
        metrics: metrics.clone(),
    };
    let keeper = Keeper::new(
        registry,
        config.clone(),
        settings,
        lease_tx,
        gone_rx,
        shared,
    );
    let task = tokio::spawn(async move {
        tokio::select! {
            () = keeper.run() => {}
            () = watcher.run() => {}
        }
    });
    Ok((
        MembershipHandle {
            lease: lease_rx,
            metrics,
        },
        task,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use ipnet::Ipv4Net;

    use crate::memory_registry::MemoryRegistry;
    use crate::subnet::{lease_key_name, LeaseAttrs};
    use weft_engine::RouteTable;

    const NETWORK: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn config() -> NetworkConfig {
        NetworkConfig::parse(NETWORK).unwrap()
    }

    fn routes() -> Routes {
        let cfg = config();
        Routes::new(RouteTable::empty(cfg.overlay().unwrap(), cfg.port()))
    }

    fn fast(public_ip: &str) -> Settings {
        Settings {
            lease_ttl: Duration::from_secs(60),
            renew_margin: Duration::from_secs(20),
            renew_retry: Duration::from_secs(5),
            retry: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(1),
            },
            ..Settings::new(ip(public_ip))
        }
    }

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

    fn start(reg: &MemoryRegistry, settings: Settings) -> Member {
        let routes = routes();
        let (handle, task) =
            run_membership(reg.clone(), &config(), settings, routes.clone()).unwrap();
        Member {
            handle,
            routes,
            task,
        }
    }

    impl Member {
        async fn subnet(&mut self) -> Ipv4Net {
            self.handle.acquired().await.unwrap().subnet
        }

        /// Wait (in virtual time) until the route table satisfies `ok`.
        async fn routes_until(&self, what: &str, ok: impl Fn(&RouteTable) -> bool) {
            for _ in 0..600 {
                if ok(&self.routes.current()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!(
                "routes never {what}: {:?}",
                self.routes.current().peers().collect::<Vec<_>>()
            );
        }

        async fn lease_until(&self, what: &str, ok: impl Fn(&Lease) -> bool) -> Lease {
            let mut rx = self.handle.lease();
            let waited = tokio::time::timeout(
                Duration::from_secs(30),
                rx.wait_for(|l| l.as_ref().is_some_and(&ok)),
            )
            .await;
            match waited {
                Ok(Ok(lease)) => lease.unwrap(),
                _ => panic!("lease never {what}: {:?}", self.handle.current()),
            }
        }
    }

    fn udp(public_ip: &str) -> String {
        LeaseAttrs::udp(ip(public_ip)).to_json()
    }

    #[tokio::test(start_paused = true)]
    async fn config_is_awaited_through_missing_malformed_and_unsupported() {
        let reg = MemoryRegistry::new();
        reg.set_available(false);
        let waiter = tokio::spawn({
            let reg = reg.clone();
            async move { wait_for_config(&reg, Backoff::default()).await }
        });
        for step in [
            None,
            Some(r#"{"Network":"10.1.0.0/16","SubnetLen":31}"#),
            Some(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#),
        ] {
            tokio::time::sleep(Duration::from_secs(40)).await;
            assert!(!waiter.is_finished(), "accepted {step:?}");
            reg.set_available(true);
            reg.set_config(step);
        }
        reg.set_config(Some(NETWORK));
        let cfg = tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cfg, config());
    }

    #[tokio::test(start_paused = true)]
    async fn two_hosts_get_distinct_subnets_and_see_each_other() {
        let reg = MemoryRegistry::new();
        let mut a = start(&reg, fast("198.18.0.1"));
        let mut b = start(&reg, fast("198.18.0.2"));
        let (sa, sb) = (a.subnet().await, b.subnet().await);
        assert_ne!(sa, sb);
        assert!(config().fits(sa) && config().fits(sb));
        assert_eq!(reg.get(&lease_key_name(sa)), Some(udp("198.18.0.1")));
        a.routes_until("show b", |t| t.peers().eq([(sb, ip("198.18.0.2"))]))
            .await;
        b.routes_until("show a", |t| t.peers().eq([(sa, ip("198.18.0.1"))]))
            .await;
        assert_eq!(a.routes.current().local_subnet(), Some(sa));
    }

    #[tokio::test(start_paused = true)]
    async fn previous_subnet_is_preferred_and_restart_reuses_the_lease() {
        let reg = MemoryRegistry::new();
        let mut settings = fast("198.18.0.1");
        settings.previous_subnet = Some(net("10.1.15.0/24"));
        let mut first = start(&reg, settings);
        assert_eq!(first.subnet().await, net("10.1.15.0/24"));
        let etcd_lease = reg.etcd_lease_of("10.1.15.0-24").unwrap();
        drop(first);
        // Restarted without subnet.env: the lease for our IP is found and renewed in place.
        let mut again = start(&reg, fast("198.18.0.1"));
        assert_eq!(again.subnet().await, net("10.1.15.0/24"));
        assert_eq!(reg.etcd_lease_of("10.1.15.0-24"), Some(etcd_lease));
        assert_eq!(reg.names(), ["10.1.15.0-24"]);
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_happens_before_expiry_and_failures_are_retried() {
        let reg = MemoryRegistry::new();
        let mut m = start(&reg, fast("198.18.0.1"));
        let first = m.handle.acquired().await.unwrap();
        let expires = first.expires.unwrap();
        assert_eq!(reg.keep_alive_count(), 0);
        // TTL 60 s, margin 20 s: renewed at 40 s.
        tokio::time::sleep(Duration::from_secs(39)).await;
        assert_eq!(reg.keep_alive_count(), 0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(reg.keep_alive_count(), 1);
        let renewed = m
            .lease_until("renewed", |l| l.expires > Some(expires))
            .await;
        assert_eq!(renewed.subnet, first.subnet);
        // etcd goes away at the next renewal (80 s); it is retried every 5 s.
        reg.set_available(false);
        tokio::time::sleep(Duration::from_secs(40 + 12)).await;
        assert_eq!(reg.keep_alive_count(), 1);
        reg.set_available(true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(reg.keep_alive_count(), 2);
        assert_eq!(m.handle.current().unwrap().subnet, first.subnet);
    }

    #[tokio::test(start_paused = true)]
    async fn adopted_short_lease_is_renewed_half_way_not_in_a_loop() {
        let reg = MemoryRegistry::new();
        // Left by a host that used 10 s leases; ours renew an hour before a 24 h expiry.
        reg.put(
            "10.1.9.0-24",
            &udp("198.18.0.1"),
            Some(Duration::from_secs(10)),
        );
        let settings = Settings {
            retry: fast("198.18.0.1").retry,
            ..Settings::new(ip("198.18.0.1"))
        };
        let mut m = start(&reg, settings);
        assert_eq!(m.subnet().await, net("10.1.9.0/24"));
        assert_eq!(reg.keep_alive_count(), 1, "adopted by one renewal");
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(reg.keep_alive_count(), 3, "renewed every 5 s");
    }

    #[tokio::test(start_paused = true)]
    async fn lost_races_are_retried_not_fatal() {
        let reg = MemoryRegistry::new();
        // Another host grabs the subnet we were about to create, every time for a while.
        let mut settings = fast("198.18.0.1");
        settings.previous_subnet = Some(net("10.1.15.0/24"));
        reg.race_next_create(&udp("198.18.0.9"));
        let mut m = start(&reg, settings);
        let subnet = m.subnet().await;
        assert_ne!(subnet, net("10.1.15.0/24"), "the rival kept it");
        assert_eq!(reg.get("10.1.15.0-24"), Some(udp("198.18.0.9")));
        assert_eq!(reg.get(&lease_key_name(subnet)), Some(udp("198.18.0.1")));
        m.routes_until("show the rival", |t| {
            t.peer_for(ip("10.1.15.1"))
                .is_some_and(|p| *p.ip() == ip("198.18.0.9"))
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn expired_or_deleted_own_lease_is_reacquired() {
        let reg = MemoryRegistry::new();
        let mut m = start(&reg, fast("198.18.0.1"));
        let subnet = m.subnet().await;
        let name = lease_key_name(subnet);
        let first_lease = reg.etcd_lease_of(&name).unwrap();

        reg.expire(first_lease);
        m.lease_until("re-acquired", |_| {
            reg.etcd_lease_of(&name).is_some_and(|l| l != first_lease)
        })
        .await;
        assert_eq!(m.handle.current().unwrap().subnet, subnet, "same subnet");

        assert!(reg.delete(&name));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(reg.get(&name), Some(udp("198.18.0.1")));
        assert_eq!(m.handle.current().unwrap().subnet, subnet);

        // Taken over by another host while gone: a new subnet, and the old one is a peer.
        let other_lease = reg.etcd_lease_of(&name).unwrap();
        reg.expire(other_lease);
        reg.put(&name, &udp("198.18.0.7"), None);
        let moved = m.lease_until("moved", |l| l.subnet != subnet).await;
        m.routes_until("route the old subnet to its new holder", |t| {
            t.local_subnet() == Some(moved.subnet)
                && t.peers().any(|(s, p)| s == subnet && p == ip("198.18.0.7"))
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_failure_after_expiry_reacquires() {
        let reg = MemoryRegistry::new();
        let mut m = start(&reg, fast("198.18.0.1"));
        let subnet = m.subnet().await;
        let name = lease_key_name(subnet);
        let lease = reg.etcd_lease_of(&name).unwrap();
        // A long outage: the watch is down and the lease expires meanwhile.
        reg.set_available(false);
        tokio::time::sleep(Duration::from_secs(30)).await;
        reg.expire(lease);
        assert_eq!(reg.get(&name), None);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            m.handle.current().unwrap().subnet,
            subnet,
            "still forwarding"
        );
        reg.set_available(true);
        m.lease_until("re-acquired", |_| reg.get(&name).is_some())
            .await;
        assert_eq!(reg.get(&name), Some(udp("198.18.0.1")));
        assert_eq!(m.handle.current().unwrap().subnet, subnet);
    }

    #[tokio::test(start_paused = true)]
    async fn compaction_and_outages_lose_no_peer_change() {
        let reg = MemoryRegistry::new();
        let mut m = start(&reg, fast("198.18.0.1"));
        let own = m.subnet().await;
        reg.put(
            "10.1.200.0-24",
            &udp("198.18.0.2"),
            Some(Duration::from_secs(60)),
        );
        m.routes_until("show .2", |t| t.peers().count() == 1).await;

        reg.set_available(false);
        // While etcd is away the last table stays.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(m.routes.current().peers().count(), 1);
        reg.set_available(true);
        reg.delete("10.1.200.0-24");
        reg.put("10.1.201.0-24", &udp("198.18.0.3"), None);
        reg.compact();
        reg.put("10.1.202.0-24", &udp("198.18.0.4"), None);
        reg.put("10.1.203.0-24", "broken", None);
        reg.compact();
        m.routes_until("match the store", |t| {
            t.peers().eq([
                (net("10.1.201.0/24"), ip("198.18.0.3")),
                (net("10.1.202.0/24"), ip("198.18.0.4")),
            ])
        })
        .await;
        assert_eq!(m.routes.current().local_subnet(), Some(own));
        assert_eq!(m.handle.current().unwrap().subnet, own);
    }

    #[tokio::test(start_paused = true)]
    async fn own_reservation_is_used_and_stale_own_leases_are_deleted() {
        let reg = MemoryRegistry::new();
        reg.put("10.1.40.0-24", &udp("198.18.0.1"), None);
        reg.put(
            "10.1.41.0-25",
            &udp("198.18.0.1"),
            Some(Duration::from_secs(60)),
        );
        let mut m = start(&reg, fast("198.18.0.1"));
        let lease = m.handle.acquired().await.unwrap();
        assert_eq!(lease.subnet, net("10.1.40.0/24"));
        assert_eq!(lease.expires, None, "a reservation does not expire");
        assert_eq!(reg.names(), ["10.1.40.0-24"]);
        assert_eq!(reg.etcd_lease_of("10.1.40.0-24"), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_network_waits_for_a_free_subnet() {
        let reg = MemoryRegistry::new();
        let small = NetworkConfig::parse(r#"{"Network":"10.1.0.0/24"}"#).unwrap();
        for (i, s) in small.leasable_subnets().enumerate() {
            reg.put(
                &lease_key_name(s),
                &udp(&format!("198.18.1.{}", i + 1)),
                Some(Duration::from_secs(60)),
            );
        }
        let routes = Routes::new(RouteTable::empty(small.overlay().unwrap(), 8285));
        let (mut handle, task) =
            run_membership(reg.clone(), &small, fast("198.18.0.1"), routes).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(handle.current(), None);
        reg.delete("10.1.0.128-26");
        let got = tokio::time::timeout(Duration::from_secs(10), handle.acquired())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.subnet, net("10.1.0.128/26"));
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn etcd_data_loss_reregisters_at_once_with_the_same_subnet() {
        let reg = MemoryRegistry::new();
        let mut m = start(&reg, fast("198.18.0.1"));
        let subnet = m.subnet().await;
        reg.put(
            "10.1.200.0-24",
            &udp("198.18.0.2"),
            Some(Duration::from_secs(60)),
        );
        for i in 0..20 {
            reg.put("10.1.201.0-24", &udp(&format!("198.18.1.{i}")), None);
        }
        m.routes_until("show both peers", |t| t.peers().count() == 2)
            .await;
        // Wiped: every key and revision gone; the renewal is 40 s away.
        reg.lose_data(false);
        assert_eq!(reg.names(), Vec::<String>::new());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(reg.names(), [lease_key_name(subnet)], "re-registered");
        assert_eq!(reg.get(&lease_key_name(subnet)), Some(udp("198.18.0.1")));
        assert_eq!(m.handle.current().unwrap().subnet, subnet);
        m.routes_until("match the empty store", |t| {
            t.peers().count() == 0 && t.local_subnet() == Some(subnet)
        })
        .await;
        assert_eq!(m.handle.metrics().data_loss_count(), 1);

        // Another cluster whose revision has already passed ours: the cluster ID tells.
        reg.lose_data(true);
        for i in 0..100 {
            reg.put("10.1.202.0-24", &udp(&format!("198.18.2.{i}")), None);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(reg.get(&lease_key_name(subnet)), Some(udp("198.18.0.1")));
        assert_eq!(m.handle.metrics().data_loss_count(), 2);
        m.routes_until("show the new cluster's host", |t| {
            t.peers().eq([(net("10.1.202.0/24"), ip("198.18.2.99"))])
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_takeover_while_adopting_the_lease_is_noticed() {
        let reg = MemoryRegistry::new();
        // Our lease from before a restart; while the keeper renews it to adopt it, another
        // host takes the key, and the watch shows that before the lease is published.
        reg.put(
            "10.1.9.0-24",
            &udp("198.18.0.1"),
            Some(Duration::from_secs(60)),
        );
        reg.take_over_during_next_keep_alive(&udp("198.18.0.7"), Duration::from_millis(500));
        let m = start(&reg, fast("198.18.0.1"));
        let moved = m
            .lease_until("moved", |l| l.subnet != net("10.1.9.0/24"))
            .await;
        assert_eq!(
            reg.get(&lease_key_name(moved.subnet)),
            Some(udp("198.18.0.1"))
        );
        m.routes_until("route the taken subnet to its new holder", |t| {
            t.local_subnet() == Some(moved.subnet)
                && t.peers().eq([(net("10.1.9.0/24"), ip("198.18.0.7"))])
        })
        .await;
    }
}
