//! Keeping this host's record in etcd and the peers' records in the engine's group table and
//! partial-checksum peer table.
//!
//! Runs when a feature that needs the record is on (`--multicast`, `--broadcast`, encryption
//! between hosts, or leaving inner checksums partial between weft hosts, which is on by default
//! unless `--no-skip-inner-csum` or the TUN cannot take such packets); the record lives under
//! weft's own prefix, so flanneld's keys and values stay exactly as flanneld writes them. One task:
//! - writes this host's [`HostRecord`] at `/weft.io<prefix>/hosts/<lease key name>`, attached
//!   to the etcd lease of the subnet lease, whenever what it should say differs from what was
//!   written: a new lease (re-acquired, or etcd lost its data), the local groups changed
//!   (debounced by [`GROUPS_SETTLE`]), or the record vanished from etcd; a record left under
//!   an old subnet is deleted;
//! - follows every record with one prefix watch (snapshot, watch from its revision + 1, a
//!   fresh snapshot when the watch breaks, as the lease watcher does), and joins them with the
//!   route table into the [`GroupTable`] it publishes through [`Groups`] (and, when this host
//!   advertises it, the peers that advertise [`SKIP_INNER_CSUM`] into a [`PartialPeerTable`])
//!   whenever the records or the routes change, and with encryption into the peers' keys, which
//!   it publishes through [`Tunnels`].

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use weft_engine::{
    GroupTable, Groups, GsoCheck, PartialPeerTable, PartialPeers, RouteTable, Routes, Tunnels,
    KEY_LEN,
};

use crate::backoff::Backoff;
use crate::host_record::{HostRecord, RecordTable, SKIP_INNER_CSUM, UDP_GSO_CHECK};
use crate::own_lease::Lease;
use crate::registry::{LeaseSnapshot, LeaseWatch, Registry, WatchBroken, WatchItem};
use crate::subnet::lease_key_name;

/// How long the local groups must stay unchanged before the record is rewritten, so that a
/// burst of joins costs one write.
pub const GROUPS_SETTLE: Duration = Duration::from_millis(250);

/// How often the route table is checked for changes (a peer's lease came or went), and
/// failed writes are retried at the earliest.
pub const TICK: Duration = Duration::from_millis(250);

/// What this host advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordSettings {
    /// `--multicast`.
    pub multicast: bool,
    /// `--broadcast`.
    pub broadcast: bool,
    /// With encryption between hosts: this host's public key.
    pub public_key: Option<[u8; KEY_LEN]>,
    /// Advertise [`SKIP_INNER_CSUM`] and publish the peers that do (unless
    /// `--no-skip-inner-csum`, and only while the engine can take such packets).
    pub skip_inner_csum: bool,
    /// Advertise [`UDP_GSO_CHECK`] and check the peers that do (unless
    /// `--no-udp-gso-check`; never with encryption).
    pub udp_gso_check: bool,
    /// Backoff for etcd errors.
    pub retry: Backoff,
}

/// What the record task reads and publishes.
pub struct RecordInputs {
    /// This host's lease, from the membership.
    pub lease: watch::Receiver<Option<Lease>>,
    /// The groups local containers joined (sorted), from the engine.
    pub local_groups: watch::Receiver<Vec<Ipv4Addr>>,
    /// The route table the lease watcher publishes.
    pub routes: Routes,
    /// Where the group table goes.
    pub groups: Groups,
    /// With encryption between hosts: where the peers' keys go.
    pub tunnels: Option<Tunnels>,
    /// Where the peers that take partial inner checksums go.
    pub partial_peers: PartialPeers,
    /// Where the peers to check for UDP GSO go.
    pub gso_check: GsoCheck,
}

/// This host's record as last written.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    name: String,
    value: String,
    etcd_lease: i64,
    mod_revision: i64,
}

/// This host's side: what to write, and what was.
struct OwnRecord {
    settings: RecordSettings,
    written: Option<Written>,
    /// An older record of this host (under a subnet it no longer holds) to delete.
    stale: Option<Written>,
    /// The groups as of the last settled change.
    groups: Vec<Ipv4Addr>,
    /// A change of the local groups waiting to settle.
    groups_due: Option<Instant>,
    /// No write before this (after an error).
    retry_at: Option<Instant>,
    /// The etcd lease the last write found gone; nothing is written with it again.
    dead_etcd_lease: Option<i64>,
}

impl OwnRecord {
    /// What should be stored now, if a lease is held.
    fn desired(&self, lease: Option<&Lease>) -> Option<(String, String, i64)> {
        let lease = lease?;
        let record = HostRecord::new(
            lease.public_ip,
            self.settings.multicast,
            self.settings.broadcast,
            &self.groups,
        )
        .with_public_key(self.settings.public_key.as_ref());
        let record = if self.settings.skip_inner_csum {
            record.with_capability(SKIP_INNER_CSUM)
        } else {
            record
        };
        let record = if self.settings.udp_gso_check {
            record.with_capability(UDP_GSO_CHECK)
        } else {
            record
        };
        Some((
            lease_key_name(lease.subnet),
            record.to_json(),
            lease.etcd_lease,
        ))
    }

    /// The watch or a listing shows `table`: forget a write that is no longer there, so that
    /// it is written again.
    fn observe(&mut self, table: &RecordTable, public_ip: Option<Ipv4Addr>) {
        let Some(written) = &self.written else { return };
        let stored = table.get(&written.name);
        let ours_intact =
            stored.is_some_and(|r| HostRecord::parse(written.value.as_bytes()).as_ref() == Ok(r));
        let someone_elses = stored.is_some_and(|r| Some(r.public_ip) != public_ip);
        if !ours_intact && !someone_elses {
            debug!(record = %written.name, "this host's record is gone or changed; writing it again");
            self.written = None;
        }
    }

    /// Write the record if it differs from what was written; returns whether etcd answered.
    async fn sync<R: Registry>(&mut self, registry: &R, lease: Option<&Lease>) -> bool {
        if let Some(stale) = self.stale.take() {
            match registry
                .delete_host_record(&stale.name, stale.mod_revision)
                .await
            {
                Ok(_) => {
                    info!(record = %stale.name, "deleted this host's record for its old subnet")
                }
                Err(e) => {
                    warn!(record = %stale.name, "cannot delete this host's old record: {e}");
                    self.stale = Some(stale);
                    return false;
                }
            }
        }
        let Some((name, value, etcd_lease)) = self.desired(lease) else {
            return true;
        };
        let current = self
            .written
            .as_ref()
            .is_some_and(|w| w.name == name && w.value == value && w.etcd_lease == etcd_lease);
        if current || self.dead_etcd_lease == Some(etcd_lease) {
            return true;
        }
        match registry.put_host_record(&name, &value, etcd_lease).await {
            Ok(Some(revision)) => {
                info!(record = %name, value = %value, "wrote this host's record");
                let written = Written {
                    name,
                    value,
                    etcd_lease,
                    mod_revision: revision,
                };
                if let Some(old) = self.written.replace(written) {
                    if self.written.as_ref().is_some_and(|w| w.name != old.name) {
                        self.stale = Some(old);
                    }
                }
                self.dead_etcd_lease = None;
                true
            }
            Ok(None) => {
                // The keeper will acquire a lease again and publish it.
                debug!(record = %name, etcd_lease, "the subnet's etcd lease is gone; waiting for the next one");
                self.dead_etcd_lease = Some(etcd_lease);
                true
            }
            Err(e) => {
                warn!(record = %name, "cannot write this host's record: {e}");
                false
            }
        }
    }
}

/// Start the record task on the current tokio runtime; it runs until aborted.
pub fn run_host_records<R: Registry>(
    registry: R,
    settings: RecordSettings,
    inputs: RecordInputs,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(HostRecords::new(registry, settings, inputs).run())
}

struct HostRecords<R> {
    registry: R,
    inputs: RecordInputs,
    own: OwnRecord,
    table: RecordTable,
    /// The route table the published group table was built from.
    joined_with: Option<Arc<RouteTable>>,
    retry: Backoff,
}

impl<R: Registry> HostRecords<R> {
    fn new(registry: R, settings: RecordSettings, inputs: RecordInputs) -> Self {
        let groups = inputs.local_groups.borrow().clone();
        Self {
            registry,
            inputs,
            own: OwnRecord {
                settings,
                written: None,
                stale: None,
                groups,
                groups_due: None,
                retry_at: None,
                dead_etcd_lease: None,
            },
            table: RecordTable::default(),
            joined_with: None,
            retry: settings.retry,
        }
    }

    fn lease(&self) -> Option<Lease> {
        *self.inputs.lease.borrow()
    }

    async fn run(mut self) {
        let mut delays = self.retry.delays();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let snapshot = match self.registry.host_records().await {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    let wait = delays.next_delay();
                    warn!("cannot list host records: {e}; keeping the current group table, retrying in {wait:?}");
                    self.idle(wait).await;
                    continue;
                }
            };
            self.resync(&snapshot);
            let mut stream = match self
                .registry
                .watch_host_records(snapshot.revision + 1)
                .await
            {
                Ok(stream) => stream,
                Err(e) => {
                    let wait = delays.next_delay();
                    warn!("cannot watch host records: {e}; retrying in {wait:?}");
                    self.idle(wait).await;
                    continue;
                }
            };
            let broken = loop {
                tokio::select! {
                    item = stream.next() => match item {
                        WatchItem::Events { events, .. } => {
                            delays.reset();
                            let mut changed = false;
                            for event in &events {
                                changed |= self.table.apply(event);
                            }
                            if changed {
                                self.own.observe(&self.table, self.lease().map(|l| l.public_ip));
                                self.joined_with = None;
                            }
                        }
                        WatchItem::Broken(why) => break why,
                    },
                    changed = self.inputs.lease.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    changed = self.inputs.local_groups.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        self.own.groups_due.get_or_insert(Instant::now() + GROUPS_SETTLE);
                    }
                    _ = tick.tick() => {}
                }
                self.step().await;
            };
            match broken {
                WatchBroken::Compacted { .. } => {
                    info!("host record watch fell behind a compaction; resynchronising")
                }
                WatchBroken::Stalled(why) | WatchBroken::Disconnected(why) => {
                    let wait = delays.next_delay();
                    warn!("host record watch broke: {why}; resynchronising in {wait:?}");
                    self.idle(wait).await;
                }
            }
        }
    }

    /// Wait `wait`, keeping the group table in step with the routes meanwhile.
    async fn idle(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            tokio::time::sleep(TICK.min(until - Instant::now())).await;
            self.publish_groups();
        }
    }

    fn resync(&mut self, snapshot: &LeaseSnapshot) {
        let fresh = RecordTable::from_snapshot(&snapshot.leases);
        debug!(records = fresh.len(), "listed host records");
        self.table = fresh;
        self.own
            .observe(&self.table, self.lease().map(|l| l.public_ip));
        self.joined_with = None;
        self.publish_groups();
    }

    /// After any input: settle the groups, write the record if needed, publish the table.
    async fn step(&mut self) {
        if self.own.groups_due.is_some_and(|due| Instant::now() >= due) {
            self.own.groups_due = None;
            self.own.groups = self.inputs.local_groups.borrow_and_update().clone();
        }
        let lease = self.lease();
        let waiting = self.own.retry_at.is_some_and(|at| Instant::now() < at);
        if !waiting {
            self.own.retry_at = if self.own.sync(&self.registry, lease.as_ref()).await {
                None
            } else {
                Some(Instant::now() + self.retry.initial.max(TICK))
            };
        }
        self.publish_groups();
    }

    /// Publish the group table (and with encryption the peers' keys) if the records or the
    /// routes changed since the last one.
    fn publish_groups(&mut self) {
        let routes = self.inputs.routes.current();
        if self
            .joined_with
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, &routes))
        {
            return;
        }
        if let Some(tunnels) = &self.inputs.tunnels {
            publish_keys(tunnels, &self.table, &routes);
        }
        let public_ip = self.lease().map_or(Ipv4Addr::UNSPECIFIED, |l| l.public_ip);
        let peers = self.table.peers(&routes, public_ip);
        let table = GroupTable::new(peers.iter().cloned());
        if **self.inputs.groups.snapshot() != table {
            info!(
                peers = peers.len(),
                multicast = peers.iter().filter(|p| p.multicast).count(),
                broadcast = peers.iter().filter(|p| p.broadcast).count(),
                "publishing the multicast group table"
            );
            debug!(?peers, "multicast peers");
            self.inputs.groups.publish(table);
        }
        if self.own.settings.skip_inner_csum {
            let partial =
                PartialPeerTable::new(self.table.skip_inner_csum_peers(&routes, public_ip));
            if **self.inputs.partial_peers.snapshot() != partial {
                info!(
                    peers = partial.len(),
                    "publishing the peers that take partial inner checksums"
                );
                self.inputs.partial_peers.publish(partial);
            }
        }
        if self.own.settings.udp_gso_check {
            let checked = self.table.udp_gso_check_peers(&routes, public_ip);
            debug!(peers = checked.len(), "the peers checked for UDP GSO");
            self.inputs.gso_check.set_peers(checked);
        }
        self.joined_with = Some(routes);
    }
}

/// Publish the keyed peers as the tunnel table; a lease holder without a key is refused
/// (nothing sent to it, nothing accepted from it) and said so at ERROR level when that
/// changes.
fn publish_keys(tunnels: &Tunnels, table: &RecordTable, routes: &RouteTable) {
    let peers = table.keyed_peers(routes);
    let before = tunnels.peers_without_key();
    tunnels.set_peers_without_key(peers.without_key.len());
    if tunnels.publish(peers.keyed.iter().copied()) {
        info!(peers = peers.keyed.len(), "publishing the peers' keys");
    }
    if !peers.without_key.is_empty() && peers.without_key.len() != before {
        error!(
            hosts = ?peers.without_key,
            "encryption is on, but these lease holders publish no public key (a flanneld, an \
             older weftd, or a host still starting): nothing is sent to them or accepted from them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    use crate::config::NetworkConfig;
    use crate::keeper::Settings;
    use crate::membership::{run_membership, MembershipHandle};
    use crate::memory_registry::MemoryRegistry;
    use tokio::task::JoinHandle;

    const NETWORK: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn at(s: &str) -> SocketAddrV4 {
        SocketAddrV4::new(ip(s), 8285)
    }

    fn fast_retry() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }

    /// One host: its membership and, with a feature on, its record task.
    struct Host {
        membership: MembershipHandle,
        local_groups: watch::Sender<Vec<Ipv4Addr>>,
        groups: Groups,
        partial_peers: PartialPeers,
        tasks: Vec<JoinHandle<()>>,
    }

    impl Drop for Host {
        fn drop(&mut self) {
            self.tasks.iter().for_each(JoinHandle::abort);
        }
    }

    impl Host {
        async fn start(
            reg: &MemoryRegistry,
            public_ip: &str,
            multicast: bool,
            broadcast: bool,
        ) -> Self {
            Self::start_with(reg, public_ip, multicast, broadcast, None, false).await
        }

        /// As `start`, with encryption's tunnels (and so this host's public key) if given, and
        /// advertising partial inner checksums if `skip_inner_csum`.
        async fn start_with(
            reg: &MemoryRegistry,
            public_ip: &str,
            multicast: bool,
            broadcast: bool,
            tunnels: Option<Tunnels>,
            skip_inner_csum: bool,
        ) -> Self {
            let config = NetworkConfig::parse(NETWORK).unwrap();
            let routes = Routes::new(RouteTable::empty(config.overlay().unwrap(), config.port()));
            let settings = Settings {
                lease_ttl: Duration::from_secs(60),
                renew_margin: Duration::from_secs(20),
                renew_retry: Duration::from_secs(5),
                retry: fast_retry(),
                ..Settings::new(ip(public_ip))
            };
            let (mut membership, task) =
                run_membership(reg.clone(), &config, settings, routes.clone()).unwrap();
            membership.acquired().await.unwrap();
            let (local_groups, groups_rx) = watch::channel(Vec::new());
            let groups = Groups::default();
            let partial_peers = PartialPeers::default();
            let mut tasks = vec![task];
            if multicast || broadcast || tunnels.is_some() || skip_inner_csum {
                tasks.push(run_host_records(
                    reg.clone(),
                    RecordSettings {
                        multicast,
                        broadcast,
                        public_key: tunnels.as_ref().map(Tunnels::public_key),
                        skip_inner_csum,
                        udp_gso_check: false,
                        retry: fast_retry(),
                    },
                    RecordInputs {
                        lease: membership.lease(),
                        local_groups: groups_rx,
                        routes,
                        groups: groups.clone(),
                        tunnels,
                        partial_peers: partial_peers.clone(),
                        gso_check: GsoCheck::default(),
                    },
                ));
            }
            Self {
                membership,
                local_groups,
                groups,
                partial_peers,
                tasks,
            }
        }

        fn name(&self) -> String {
            lease_key_name(self.membership.current().unwrap().subnet)
        }

        fn join(&self, groups: &[&str]) {
            let mut groups: Vec<Ipv4Addr> = groups.iter().map(|g| ip(g)).collect();
            groups.sort_unstable();
            self.local_groups.send_replace(groups);
        }

        /// Wait (in virtual time, at most 10 s) until the group table satisfies `ok`.
        async fn groups_until(&self, what: &str, ok: impl Fn(&GroupTable) -> bool) {
            for _ in 0..200 {
                if ok(&self.groups.snapshot()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("group table never {what}: {:?}", **self.groups.snapshot());
        }
    }

    /// Wait (in virtual time, at most 10 s) until `ok`.
    async fn until(what: &str, ok: impl Fn() -> bool) {
        for _ in 0..200 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never {what}");
    }

    fn receivers(t: &GroupTable, group: &str) -> Vec<SocketAddrV4> {
        t.receivers_of(ip(group)).to_vec()
    }

    async fn registry() -> MemoryRegistry {
        let reg = MemoryRegistry::new();
        reg.set_config(Some(NETWORK));
        reg
    }

    #[tokio::test(start_paused = true)]
    async fn encrypting_hosts_key_each_other_and_a_new_key_replaces_the_tunnel() {
        use weft_engine::StaticKeys;
        let reg = registry().await;
        let keys = |b: u8| StaticKeys::from_private([b; KEY_LEN]);
        let ta = Tunnels::new(keys(1));
        let tb = Tunnels::new(keys(2));
        let a = Host::start_with(&reg, "198.18.0.1", false, false, Some(ta.clone()), false).await;
        let b = Host::start_with(&reg, "198.18.0.2", false, false, Some(tb.clone()), false).await;
        let plain = Host::start(&reg, "198.18.0.3", false, false).await;
        let key_of = |t: &Tunnels, peer: &str| t.snapshot().get(&ip(peer)).map(|p| p.public_key());
        until("both keyed", || {
            key_of(&ta, "198.18.0.2") == Some(tb.public_key())
                && key_of(&tb, "198.18.0.1") == Some(ta.public_key())
        })
        .await;
        // The host without encryption holds a lease but publishes no key: refused.
        until("the keyless host counted", || ta.peers_without_key() == 1).await;
        assert_eq!(ta.snapshot().len(), 1);
        assert!(reg.host_record(&plain.name()).is_none());
        assert!(reg
            .host_record(&b.name())
            .unwrap()
            .contains(&crate::key_file::encode_key(&tb.public_key())));
        // b comes back with a new key: a replaces its tunnel.
        drop(b);
        let tb2 = Tunnels::new(keys(4));
        let _b = Host::start_with(&reg, "198.18.0.2", false, false, Some(tb2.clone()), false).await;
        until("the new key replaces the old", || {
            key_of(&ta, "198.18.0.2") == Some(tb2.public_key())
        })
        .await;
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn peers_that_advertise_it_take_partial_checksums() {
        let reg = registry().await;
        let a = Host::start_with(&reg, "198.18.0.1", false, false, None, true).await;
        let b = Host::start_with(&reg, "198.18.0.2", true, false, None, true).await;
        let c = Host::start_with(&reg, "198.18.0.3", true, false, None, false).await;
        let plain = Host::start(&reg, "198.18.0.4", false, false).await;
        let listed = |h: &Host, peer: &str| h.partial_peers.snapshot().takes(ip(peer));
        until("a and b list each other", || {
            listed(&a, "198.18.0.2") && listed(&b, "198.18.0.1")
        })
        .await;
        for h in [&a, &b] {
            assert_eq!(h.partial_peers.snapshot().len(), 1, "only the other");
        }
        // c runs its records for multicast but does not advertise, so it lists nobody and
        // nobody lists it; the plain host (a flanneld in all but name) writes nothing.
        assert!(c.partial_peers.snapshot().is_empty());
        assert!(!listed(&a, "198.18.0.3") && !listed(&b, "198.18.0.3"));
        assert!(reg.host_record(&plain.name()).is_none());
        let record =
            |h: &Host| HostRecord::parse(reg.host_record(&h.name()).unwrap().as_bytes()).unwrap();
        assert!(record(&a).has(SKIP_INNER_CSUM) && !record(&a).has(crate::host_record::MULTICAST));
        assert!(!record(&c).has(SKIP_INNER_CSUM));

        // b stops (its tasks end) and its etcd lease expires: a stops leaving checksums
        // partial to it.
        let etcd_lease = reg.etcd_lease_of(&b.name()).unwrap();
        drop(b);
        reg.expire(etcd_lease);
        until("a lists nobody", || a.partial_peers.snapshot().is_empty()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn joins_and_leaves_reach_the_peers_within_a_second() {
        let reg = registry().await;
        let a = Host::start(&reg, "198.18.0.1", true, false).await;
        let b = Host::start(&reg, "198.18.0.2", true, false).await;
        let c = Host::start(&reg, "198.18.0.3", true, true).await;
        let plain = Host::start(&reg, "198.18.0.4", false, false).await;
        a.groups_until("lists b and c for link-local groups", |t| {
            receivers(t, "224.0.0.251") == [at("198.18.0.2"), at("198.18.0.3")]
        })
        .await;
        assert!(receivers(&a.groups.snapshot(), "239.1.1.1").is_empty());
        assert_eq!(
            a.groups.snapshot().broadcast_receivers(),
            [at("198.18.0.3")]
        );
        // The host without the features wrote nothing and receives nothing.
        assert!(reg.host_record(&plain.name()).is_none());
        assert_eq!(reg.host_record_names().len(), 3);

        b.join(&["239.1.1.1", "239.2.2.2"]);
        let joined = Instant::now();
        a.groups_until("lists b for 239.1.1.1", |t| {
            receivers(t, "239.1.1.1") == [at("198.18.0.2")]
        })
        .await;
        assert!(
            joined.elapsed() <= Duration::from_secs(1),
            "{:?}",
            joined.elapsed()
        );
        c.groups_until("lists b for 239.2.2.2", |t| {
            receivers(t, "239.2.2.2") == [at("198.18.0.2")]
        })
        .await;
        assert_eq!(
            reg.host_record(&b.name()).unwrap(),
            r#"{"PublicIP":"198.18.0.2","Capabilities":["multicast"],"MulticastGroups":["239.1.1.1","239.2.2.2"]}"#
        );
        // The record lives and dies with the subnet lease.
        assert_eq!(
            reg.etcd_lease_of_host_record(&b.name()),
            reg.etcd_lease_of(&b.name())
        );

        // A burst of changes settles into one table.
        c.join(&["239.1.1.1"]);
        b.join(&["239.2.2.2"]);
        let left = Instant::now();
        a.groups_until("lists only c for 239.1.1.1", |t| {
            receivers(t, "239.1.1.1") == [at("198.18.0.3")]
        })
        .await;
        assert!(
            left.elapsed() <= Duration::from_secs(1),
            "{:?}",
            left.elapsed()
        );
        b.join(&[]);
        a.groups_until("lists nobody for 239.2.2.2", |t| {
            receivers(t, "239.2.2.2").is_empty()
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_host_leaves_the_table_and_a_reacquired_lease_brings_it_back() {
        let reg = registry().await;
        let a = Host::start(&reg, "198.18.0.1", true, false).await;
        let b = Host::start(&reg, "198.18.0.2", true, false).await;
        b.join(&["239.1.1.1"]);
        a.groups_until("lists b", |t| {
            receivers(t, "239.1.1.1") == [at("198.18.0.2")]
        })
        .await;
        // b's etcd lease expires (a long outage of b): its lease and record go at once.
        let name = b.name();
        let etcd_lease = reg.etcd_lease_of(&name).unwrap();
        reg.expire(etcd_lease);
        assert!(
            reg.host_record(&name).is_none(),
            "the record went with the lease"
        );
        // b's keeper re-acquires, and its record is written again on the new etcd lease.
        until("b's record is rewritten", || {
            reg.etcd_lease_of_host_record(&b.name())
                .is_some_and(|l| l != etcd_lease)
        })
        .await;
        a.groups_until("lists b again", |t| {
            receivers(t, "239.1.1.1") == [at("198.18.0.2")]
        })
        .await;
        let again = b.name();
        assert_ne!(reg.etcd_lease_of_host_record(&again), Some(etcd_lease));
        assert_eq!(
            reg.etcd_lease_of_host_record(&again),
            reg.etcd_lease_of(&again)
        );

        // A host that is gone for good (its tasks stopped) leaves when its lease expires.
        let name = b.name();
        drop(b);
        reg.expire(reg.etcd_lease_of(&name).unwrap());
        a.groups_until("forgets b", GroupTable::is_empty).await;
        assert!(reg.host_record(&name).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn records_come_back_after_deletion_data_loss_and_broken_watches() {
        let reg = registry().await;
        let a = Host::start(&reg, "198.18.0.1", true, false).await;
        let b = Host::start(&reg, "198.18.0.2", true, true).await;
        b.join(&["239.1.1.1"]);
        a.groups_until("lists b", |t| {
            receivers(t, "239.1.1.1") == [at("198.18.0.2")]
        })
        .await;

        // An operator deletes b's record: b writes it again.
        reg.delete_host_record_raw(&b.name());
        until("b's record is rewritten", || {
            reg.host_record(&b.name()).is_some()
        })
        .await;

        // etcd loses everything: both register again, the records follow.
        reg.lose_data(false);
        until("both records are rewritten", || {
            reg.host_record_names().len() == 2
                && reg
                    .host_record_names()
                    .iter()
                    .all(|n| reg.etcd_lease_of(n).is_some())
        })
        .await;
        a.groups_until("lists b after the data loss", |t| {
            receivers(t, "239.1.1.1") == [at("198.18.0.2")]
                && t.broadcast_receivers() == [at("198.18.0.2")]
        })
        .await;
        assert!(reg.host_record(&a.name()).is_some());

        // Changes made while the watches are broken, or compacted away, are not lost.
        reg.set_available(false);
        b.join(&["239.3.3.3"]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        reg.set_available(true);
        a.groups_until("lists b for 239.3.3.3", |t| {
            receivers(t, "239.3.3.3") == [at("198.18.0.2")] && receivers(t, "239.1.1.1").is_empty()
        })
        .await;
        reg.compact();
        b.join(&["239.4.4.4"]);
        a.groups_until("lists b for 239.4.4.4", |t| {
            receivers(t, "239.4.4.4") == [at("198.18.0.2")]
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_and_forged_records_are_skipped() {
        let reg = registry().await;
        let a = Host::start(&reg, "198.18.0.1", true, false).await;
        let b = Host::start(&reg, "198.18.0.2", true, false).await;
        a.groups_until("lists b", |t| !receivers(t, "224.0.0.1").is_empty())
            .await;
        // A record under b's subnet claiming another address, junk, a record without a lease.
        reg.put_host_record_raw(
            "10.1.200.0-24",
            r#"{"PublicIP":"198.18.0.9","Capabilities":["multicast"]}"#,
            0,
        );
        reg.put_host_record_raw("junk", "{", 0);
        reg.put_host_record_raw("10.1.201.0-24", "[1,2]", 0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            receivers(&a.groups.snapshot(), "224.0.0.1"),
            [at("198.18.0.2")]
        );
        // Someone overwrites b's record with another host's address: ignored until b rewrites it.
        reg.put_host_record_raw(
            &b.name(),
            r#"{"PublicIP":"198.18.0.9","Capabilities":["multicast"],"MulticastGroups":["239.9.9.9"]}"#,
            0,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(receivers(&a.groups.snapshot(), "239.9.9.9").is_empty());
    }
}
