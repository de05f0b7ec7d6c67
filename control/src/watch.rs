//! Following the other hosts' leases and publishing them to the data plane as routes.
//!
//! One persistent etcd watch on `<prefix>/subnets/` runs from the revision of a snapshot + 1,
//! so no change between the snapshot and the watch is missed. Each change updates a
//! [`PeerTable`]; whenever the peers or this host's own subnet change, a fresh
//! [`RouteTable`] is published to the workers. When the watch breaks (compaction, a broken
//! stream, etcd restarting) a fresh snapshot is taken and diffed against the table, so that
//! nothing that happened meanwhile is lost; while etcd is unreachable the last table stays
//! published and forwarding goes on.
//!
//! A lease that cannot be used as a route — a malformed key or value, a subnet that is not one
//! of the Network's host subnets, an unusable public address, another backend — is skipped
//! with a warning; it never stops the watcher.
//!
//! The watcher also notices when this host's own lease disappears (deleted, expired, or taken
//! over) and tells the lease keeper, which re-acquires it. Every fresh snapshot is checked for
//! signs that etcd lost its data (see [`crate::data_loss`]); then the keeper is told to
//! re-register at once, since the revisions it knows no longer mean anything.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use weft_engine::{Overlay, RouteError, RouteTable, Routes};

use crate::backoff::Backoff;
use crate::data_loss::StoreHistory;
use crate::metrics::{ControlMetrics, EtcdOp};
use crate::own_lease::{Lease, OwnLeaseGone};
use crate::registry::{LeaseWatch, RawLease, Registry, WatchBroken, WatchEvent, WatchItem};
use crate::subnet::{LeaseAttrs, LeaseKey};

/// One usable lease: a host subnet of the overlay and its holder's public address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLease {
    /// The leased subnet.
    pub subnet: Ipv4Net,
    /// Where packets for it go.
    pub public_ip: Ipv4Addr,
}

/// Why a lease is not used as a route.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    /// The key name is not a lease key.
    #[error(transparent)]
    Key(#[from] crate::subnet::KeyError),
    /// The value cannot be read.
    #[error(transparent)]
    Value(#[from] crate::subnet::AttrsError),
    /// The subnet is not one of the overlay's host subnets.
    #[error(transparent)]
    NotASubnet(RouteError),
    /// The public address cannot receive datagrams.
    #[error("public IP {0} cannot receive datagrams")]
    BadPublicIp(Ipv4Addr),
    /// The holder runs another backend and does not listen for udp-backend datagrams.
    #[error("backend {0:?} is not udp")]
    OtherBackend(String),
}

/// Read one stored lease as a route, or say why it cannot be one.
pub fn parse_peer(overlay: Overlay, lease: &RawLease) -> Result<PeerLease, SkipReason> {
    let key = LeaseKey::parse(&lease.name)?;
    overlay
        .slot_of_subnet(key.ipv4)
        .map_err(SkipReason::NotASubnet)?;
    let attrs = LeaseAttrs::parse(&lease.value)?;
    let ip = attrs.public_ip;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        return Err(SkipReason::BadPublicIp(ip));
    }
    if !attrs.is_udp() {
        return Err(SkipReason::OtherBackend(
            attrs.backend_type.unwrap_or_default(),
        ));
    }
    Ok(PeerLease {
        subnet: key.ipv4,
        public_ip: ip,
    })
}

/// What one change did to a [`PeerTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// Nothing a route depends on changed.
    Unchanged,
    /// A lease appeared.
    Added(PeerLease),
    /// A lease disappeared (or became unusable).
    Removed(PeerLease),
    /// A lease's holder changed.
    Replaced {
        /// Before.
        old: PeerLease,
        /// After.
        new: PeerLease,
    },
}

/// The difference between two tables, for logging a resync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerDiff {
    /// Leases only in the newer table (or with a new holder).
    pub added: Vec<PeerLease>,
    /// Leases only in the older table (or with an old holder).
    pub removed: Vec<PeerLease>,
}

impl PeerDiff {
    /// Whether the tables are equal.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// Every usable lease in etcd (this host's own included), by key name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTable {
    overlay: Overlay,
    leases: BTreeMap<String, PeerLease>,
}

impl PeerTable {
    /// An empty table for `overlay`.
    pub fn new(overlay: Overlay) -> Self {
        Self {
            overlay,
            leases: BTreeMap::new(),
        }
    }

    /// A table of every usable lease in `leases`; the others are logged and skipped.
    pub fn from_snapshot(overlay: Overlay, leases: &[RawLease]) -> Self {
        let mut table = Self::new(overlay);
        for raw in leases {
            match parse_peer(overlay, raw) {
                Ok(peer) => {
                    table.leases.insert(raw.name.clone(), peer);
                }
                Err(reason) => warn_skipped(&raw.name, &reason),
            }
        }
        table
    }

    /// Apply one change from the watch.
    pub fn apply(&mut self, event: &WatchEvent) -> PeerChange {
        match event {
            WatchEvent::Put(raw) => {
                let parsed = parse_peer(self.overlay, raw);
                let old = self.leases.get(&raw.name).copied();
                match (old, parsed) {
                    (old, Ok(new)) => {
                        self.leases.insert(raw.name.clone(), new);
                        match old {
                            None => PeerChange::Added(new),
                            Some(old) if old == new => PeerChange::Unchanged,
                            Some(old) => PeerChange::Replaced { old, new },
                        }
                    }
                    (old, Err(reason)) => {
                        warn_skipped(&raw.name, &reason);
                        match old {
                            Some(old) => {
                                self.leases.remove(&raw.name);
                                PeerChange::Removed(old)
                            }
                            None => PeerChange::Unchanged,
                        }
                    }
                }
            }
            WatchEvent::Delete { name, .. } => match self.leases.remove(name) {
                Some(old) => PeerChange::Removed(old),
                None => PeerChange::Unchanged,
            },
        }
    }

    /// What changed from `self` to `newer`.
    pub fn diff(&self, newer: &PeerTable) -> PeerDiff {
        let mut diff = PeerDiff::default();
        for (name, old) in &self.leases {
            if newer.leases.get(name) != Some(old) {
                diff.removed.push(*old);
            }
        }
        for (name, new) in &newer.leases {
            if self.leases.get(name) != Some(new) {
                diff.added.push(*new);
            }
        }
        diff
    }

    /// Every usable lease, in key order.
    pub fn leases(&self) -> impl Iterator<Item = PeerLease> + '_ {
        self.leases.values().copied()
    }

    /// How many usable leases the table holds.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Who holds `subnet`, if anyone.
    pub fn holder(&self, subnet: Ipv4Net) -> Option<Ipv4Addr> {
        self.leases
            .values()
            .find(|l| l.subnet == subnet)
            .map(|l| l.public_ip)
    }

    /// Where the route table for this host sends `subnet` (see [`PeerTable::route_table`]):
    /// the holder of the last usable lease for it, in key order, unless that is this host.
    pub fn route_for(
        &self,
        subnet: Ipv4Net,
        own: Option<Ipv4Net>,
        public_ip: Ipv4Addr,
    ) -> Option<Ipv4Addr> {
        if Some(subnet) == own {
            return None;
        }
        self.leases
            .values()
            .rev()
            .find(|l| l.subnet == subnet && l.public_ip != public_ip)
            .map(|l| l.public_ip)
    }

    /// The route table for this host: `own` is its subnet; every lease but that one, and but
    /// any other lease held by this host's own `public_ip`, becomes a route.
    pub fn route_table(
        &self,
        port: u16,
        own: Option<Ipv4Net>,
        public_ip: Ipv4Addr,
    ) -> Result<RouteTable, RouteError> {
        RouteTable::build(
            self.overlay,
            port,
            own,
            self.leases
                .values()
                .filter(|l| l.public_ip != public_ip && Some(l.subnet) != own)
                .map(|l| (l.subnet, l.public_ip)),
        )
    }
}

/// The subnet whose route `change` may have changed.
fn changed_subnet(change: PeerChange) -> Option<Ipv4Net> {
    match change {
        PeerChange::Unchanged => None,
        PeerChange::Added(p) | PeerChange::Removed(p) => Some(p.subnet),
        PeerChange::Replaced { new, .. } => Some(new.subnet),
    }
}

fn warn_skipped(name: &str, reason: &SkipReason) {
    warn!(lease = name, "skipping lease: {reason}");
}

/// Above this many peer changes in one snapshot, they are logged as counts, one by one only at
/// debug level.
const LOGGED_PEER_CHANGES: usize = 64;

/// What the watcher needs to run.
pub(crate) struct Watcher<R> {
    pub registry: R,
    pub overlay: Overlay,
    pub port: u16,
    pub public_ip: Ipv4Addr,
    pub routes: Routes,
    pub lease: watch::Receiver<Option<Lease>>,
    pub own_gone: mpsc::UnboundedSender<OwnLeaseGone>,
    pub retry: Backoff,
    pub history: StoreHistory,
    pub metrics: Arc<ControlMetrics>,
}

impl<R: Registry> Watcher<R> {
    /// Follow the leases forever.
    pub async fn run(mut self) {
        let mut table = PeerTable::new(self.overlay);
        let mut own: Option<Ipv4Net>;
        let mut delay = self.retry.delays();
        let mut first = true;
        loop {
            let floor = self.history.newest();
            let snapshot = match self.registry.leases().await {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    self.metrics.etcd_error(EtcdOp::List);
                    let wait = delay.next_delay();
                    warn!(
                        "cannot list leases: {e}; keeping the current routes, retrying in {wait:?}"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            if !first {
                self.metrics.watch_resynced();
            }
            first = false;
            let lost = self
                .history
                .check_listing(floor, snapshot.revision, snapshot.cluster_id);
            let fresh = PeerTable::from_snapshot(self.overlay, &snapshot.leases);
            let diff = table.diff(&fresh);
            self.log_diff(&diff);
            table = fresh;
            own = self.own_subnet();
            let mut applied = snapshot.revision;
            match lost {
                Err(loss) => {
                    self.metrics.data_lost();
                    error!(
                        "etcd lost its data: {loss}; {} leases are left; re-registering this host's lease at once (the same subnet if it is free)",
                        snapshot.leases.len()
                    );
                    if let Some(subnet) = own {
                        let _ = self.own_gone.send(OwnLeaseGone {
                            subnet,
                            revision: snapshot.revision,
                            why: format!("etcd lost its data ({loss})"),
                            data_loss: true,
                        });
                    }
                }
                Ok(()) => self.check_own(&table, own, applied, "it is not in etcd"),
            }
            self.publish(&table, own);

            let mut stream = match self.registry.watch(snapshot.revision + 1).await {
                Ok(stream) => stream,
                Err(e) => {
                    self.metrics.etcd_error(EtcdOp::Watch);
                    let wait = delay.next_delay();
                    warn!("cannot watch leases: {e}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            debug!(revision = snapshot.revision + 1, "watching leases");
            let broken = loop {
                tokio::select! {
                    item = stream.next() => match item {
                        WatchItem::Events { revision, events } => {
                            delay.reset();
                            self.history.saw(revision);
                            applied = applied.max(revision);
                            // The keeper may have changed our subnet since we last looked;
                            // never publish a table with a stale one.
                            let was = own;
                            own = self.own_subnet();
                            let mut touched = Vec::with_capacity(events.len());
                            for event in &events {
                                let change = table.apply(event);
                                touched.extend(changed_subnet(change));
                                self.log_change(change);
                                if let Some(own) = own {
                                    self.check_event(&table, own, event, revision);
                                }
                            }
                            if own == was {
                                self.publish_changes(&table, own, &touched);
                            } else {
                                self.publish(&table, own);
                            }
                        }
                        WatchItem::Broken(why) => break why,
                    },
                    changed = self.lease.changed() => {
                        if changed.is_err() {
                            // The lease keeper is gone: so is the membership.
                            return;
                        }
                        let now = self.own_subnet();
                        if now != own {
                            own = now;
                            // The keeper may have adopted a key that was deleted or taken
                            // over after it listed it, and the watch may have shown that
                            // before the lease was published: check the table as it stands.
                            // A key the keeper has just written is newer than `applied`, and
                            // the keeper ignores the news as stale.
                            self.check_own(&table, own, applied, "it is not in etcd");
                            self.publish(&table, own);
                        }
                    }
                }
            };
            match broken {
                WatchBroken::Compacted { compact_revision } => {
                    info!(
                        compact_revision,
                        "lease watch fell behind a compaction; resynchronising"
                    );
                }
                WatchBroken::Stalled(why) => {
                    self.metrics.etcd_error(EtcdOp::WatchStalled);
                    warn!(
                        "lease watch stalled: {why}; resynchronising through another etcd member"
                    );
                }
                WatchBroken::Disconnected(why) => {
                    self.metrics.etcd_error(EtcdOp::Watch);
                    let wait = delay.next_delay();
                    warn!("lease watch broke: {why}; resynchronising in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Log what a snapshot changed: each peer, as flanneld does, unless there are so many
    /// (a start in a large overlay) that one line with the counts says more.
    fn log_diff(&self, diff: &PeerDiff) {
        let theirs = |p: &&PeerLease| p.public_ip != self.public_ip;
        let removed: Vec<&PeerLease> = diff.removed.iter().filter(theirs).collect();
        let added: Vec<&PeerLease> = diff.added.iter().filter(theirs).collect();
        let each = removed.len() + added.len() <= LOGGED_PEER_CHANGES;
        if !each {
            info!(
                "{} subnets added, {} removed (each is logged at debug level)",
                added.len(),
                removed.len()
            );
        }
        for peer in removed {
            if each {
                info!("Subnet removed: {} (was {})", peer.subnet, peer.public_ip);
            } else {
                debug!("Subnet removed: {} (was {})", peer.subnet, peer.public_ip);
            }
        }
        for peer in added {
            if each {
                info!("Subnet added: {} via {}", peer.subnet, peer.public_ip);
            } else {
                debug!("Subnet added: {} via {}", peer.subnet, peer.public_ip);
            }
        }
    }

    fn own_subnet(&self) -> Option<Ipv4Net> {
        self.lease.borrow().as_ref().map(|l| l.subnet)
    }

    fn log_change(&self, change: PeerChange) {
        let ours = |p: &PeerLease| p.public_ip == self.public_ip;
        match change {
            PeerChange::Added(p) | PeerChange::Removed(p) if ours(&p) => {}
            PeerChange::Unchanged => {}
            PeerChange::Added(p) => info!("Subnet added: {} via {}", p.subnet, p.public_ip),
            PeerChange::Removed(p) => {
                info!("Subnet removed: {} (was {})", p.subnet, p.public_ip)
            }
            PeerChange::Replaced { old, new } => info!(
                "Subnet {} moved from {} to {}",
                new.subnet, old.public_ip, new.public_ip
            ),
        }
    }

    /// After `event` at `revision`: if it was about our own subnet and the subnet is no longer
    /// ours, tell the lease keeper.
    fn check_event(&self, table: &PeerTable, own: Ipv4Net, event: &WatchEvent, revision: i64) {
        let (name, event_revision, what) = match event {
            WatchEvent::Put(raw) => (&raw.name, raw.mod_revision, "it was overwritten"),
            WatchEvent::Delete { name, revision } => (name, *revision, "it was deleted or expired"),
        };
        let about_own = LeaseKey::parse(name).is_ok_and(|k| k.ipv4 == own);
        if about_own {
            let at = if event_revision > 0 {
                event_revision
            } else {
                revision
            };
            self.check_own(table, Some(own), at, what);
        }
    }

    fn check_own(&self, table: &PeerTable, own: Option<Ipv4Net>, revision: i64, why: &str) {
        let Some(own) = own else { return };
        if table.holder(own) != Some(self.public_ip) {
            let _ = self.own_gone.send(OwnLeaseGone {
                subnet: own,
                revision,
                why: why.to_owned(),
                data_loss: false,
            });
        }
    }

    /// Publish the route table with the routes for `touched` subnets brought up to date
    /// from `table`: the rest of the published table is already right, and updating it in
    /// place costs far less than a rebuild when there are many leases.
    fn publish_changes(&self, table: &PeerTable, own: Option<Ipv4Net>, touched: &[Ipv4Net]) {
        if touched.is_empty() {
            return;
        }
        let changes = touched
            .iter()
            .map(|&subnet| (subnet, table.route_for(subnet, own, self.public_ip)));
        match self.routes.current().with_changes(changes) {
            Ok(Some(routes)) => {
                debug!(peers = routes.peer_count(), "publishing routes");
                self.metrics.set_peers(routes.peer_count());
                self.routes.publish(routes);
            }
            Ok(None) => {}
            Err(e) => {
                error!("cannot update the route table: {e}; rebuilding it");
                self.publish(table, own);
            }
        }
    }

    /// Publish the route table for `table` and `own`, unless the workers already have it.
    fn publish(&self, table: &PeerTable, own: Option<Ipv4Net>) {
        match table.route_table(self.port, own, self.public_ip) {
            Ok(routes) => {
                if *self.routes.current() != routes {
                    debug!(peers = routes.peer_count(), "publishing routes");
                    self.metrics.set_peers(routes.peer_count());
                    self.routes.publish(routes);
                }
            }
            // Every entry was checked against the overlay when it entered the table.
            Err(e) => error!("cannot build the route table: {e}; keeping the previous one"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn overlay() -> Overlay {
        Overlay::new(net("10.1.0.0/16"), 24).unwrap()
    }

    fn raw(name: &str, value: &str) -> RawLease {
        RawLease {
            name: name.to_owned(),
            value: value.as_bytes().to_vec(),
            etcd_lease: 1,
            mod_revision: 1,
        }
    }

    fn udp(public_ip: &str) -> String {
        LeaseAttrs::udp(ip(public_ip)).to_json()
    }

    fn peer(subnet: &str, public_ip: &str) -> PeerLease {
        PeerLease {
            subnet: net(subnet),
            public_ip: ip(public_ip),
        }
    }

    #[test]
    fn unusable_leases_are_skipped() {
        let leases = [
            raw("10.1.15.0-24", &udp("198.18.0.1")),
            raw("10.1.81.0-24", &udp("198.18.0.2")),
            raw("10.1.82.0-24", "{not json"),
            raw("bogus", &udp("198.18.0.3")),
            raw("10.2.1.0-24", &udp("198.18.0.4")),
            raw("10.1.83.0-25", &udp("198.18.0.5")),
            raw("10.1.84.7-24", &udp("198.18.0.6")),
            raw("10.1.85.0-24", &udp("0.0.0.0")),
            raw("10.1.86.0-24", &udp("224.0.0.1")),
            raw(
                "10.1.87.0-24",
                r#"{"PublicIP":"198.18.0.7","BackendType":"vxlan"}"#,
            ),
            raw(
                "10.1.88.0-24&fc00:0:0:88::-64",
                r#"{"PublicIP":"198.18.0.8","PublicIPv6":"fc00::8","BackendType":"udp"}"#,
            ),
        ];
        let table = PeerTable::from_snapshot(overlay(), &leases);
        assert_eq!(
            table.leases().collect::<Vec<_>>(),
            [
                peer("10.1.15.0/24", "198.18.0.1"),
                peer("10.1.81.0/24", "198.18.0.2"),
                peer("10.1.88.0/24", "198.18.0.8"),
            ]
        );
        assert!(matches!(
            parse_peer(overlay(), &leases[4]),
            Err(SkipReason::NotASubnet(_))
        ));
        assert!(matches!(
            parse_peer(overlay(), &leases[9]),
            Err(SkipReason::OtherBackend(t)) if t == "vxlan"
        ));
    }

    #[test]
    fn events_add_replace_and_remove_peers() {
        let mut table = PeerTable::new(overlay());
        let put = |name: &str, value: &str| WatchEvent::Put(raw(name, value));
        let delete = |name: &str| WatchEvent::Delete {
            name: name.to_owned(),
            revision: 9,
        };
        assert_eq!(
            table.apply(&put("10.1.81.0-24", &udp("198.18.0.2"))),
            PeerChange::Added(peer("10.1.81.0/24", "198.18.0.2"))
        );
        assert_eq!(
            table.apply(&put("10.1.81.0-24", &udp("198.18.0.2"))),
            PeerChange::Unchanged,
            "a renewal by re-put changes nothing"
        );
        assert_eq!(
            table.apply(&put("10.1.81.0-24", &udp("198.18.0.9"))),
            PeerChange::Replaced {
                old: peer("10.1.81.0/24", "198.18.0.2"),
                new: peer("10.1.81.0/24", "198.18.0.9"),
            }
        );
        assert_eq!(
            table.apply(&put("10.1.81.0-24", "garbage")),
            PeerChange::Removed(peer("10.1.81.0/24", "198.18.0.9")),
            "a lease that turns unusable stops being a route"
        );
        assert_eq!(table.apply(&put("junk", "garbage")), PeerChange::Unchanged);
        assert_eq!(table.apply(&delete("junk")), PeerChange::Unchanged);
        table.apply(&put("10.1.82.0-24", &udp("198.18.0.3")));
        assert_eq!(
            table.apply(&delete("10.1.82.0-24")),
            PeerChange::Removed(peer("10.1.82.0/24", "198.18.0.3"))
        );
        assert!(table.is_empty());
    }

    #[test]
    fn diff_reports_what_a_resync_changed() {
        let before = PeerTable::from_snapshot(
            overlay(),
            &[
                raw("10.1.1.0-24", &udp("198.18.0.1")),
                raw("10.1.2.0-24", &udp("198.18.0.2")),
                raw("10.1.3.0-24", &udp("198.18.0.3")),
            ],
        );
        let after = PeerTable::from_snapshot(
            overlay(),
            &[
                raw("10.1.1.0-24", &udp("198.18.0.1")),
                raw("10.1.3.0-24", &udp("198.18.0.7")),
                raw("10.1.4.0-24", &udp("198.18.0.4")),
            ],
        );
        let diff = before.diff(&after);
        assert_eq!(
            diff.removed,
            [
                peer("10.1.2.0/24", "198.18.0.2"),
                peer("10.1.3.0/24", "198.18.0.3")
            ]
        );
        assert_eq!(
            diff.added,
            [
                peer("10.1.3.0/24", "198.18.0.7"),
                peer("10.1.4.0/24", "198.18.0.4")
            ]
        );
        assert!(after.diff(&after).is_empty());
        // Applying the diff's events to the old table yields the new one.
        let mut replayed = before.clone();
        for p in &diff.removed {
            replayed.apply(&WatchEvent::Delete {
                name: crate::subnet::lease_key_name(p.subnet),
                revision: 5,
            });
        }
        for p in &diff.added {
            replayed.apply(&WatchEvent::Put(raw(
                &crate::subnet::lease_key_name(p.subnet),
                &udp(&p.public_ip.to_string()),
            )));
        }
        assert_eq!(replayed, after);
    }

    #[test]
    fn route_table_leaves_out_our_own_leases() {
        let table = PeerTable::from_snapshot(
            overlay(),
            &[
                raw("10.1.15.0-24", &udp("198.18.0.1")),
                raw("10.1.16.0-24", &udp("198.18.0.1")),
                raw("10.1.81.0-24", &udp("198.18.0.2")),
            ],
        );
        let routes = table
            .route_table(8285, Some(net("10.1.15.0/24")), ip("198.18.0.1"))
            .unwrap();
        assert_eq!(
            routes.peers().collect::<Vec<_>>(),
            [(net("10.1.81.0/24"), ip("198.18.0.2"))]
        );
        assert_eq!(routes.local_subnet(), Some(net("10.1.15.0/24")));
        assert_eq!(table.holder(net("10.1.16.0/24")), Some(ip("198.18.0.1")));
        assert_eq!(table.holder(net("10.1.17.0/24")), None);
        // Another host's view of the same table.
        let theirs = table
            .route_table(8285, Some(net("10.1.81.0/24")), ip("198.18.0.2"))
            .unwrap();
        assert_eq!(theirs.peers().count(), 2);
    }
}
