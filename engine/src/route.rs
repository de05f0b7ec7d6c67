//! The route table: which peer carries the packets for an overlay destination.
//!
//! The Network and the subnet length are fixed for a run, so every possible host subnet has a
//! slot in a flat array, and a lookup is one subtraction, one shift and one load. The control
//! thread builds a whole new table whenever a lease changes and publishes it through [`Routes`]
//! with one atomic swap; workers take one snapshot per batch and never lock.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;

/// Largest number of host subnets one overlay may have: 2^24 slots of 4 bytes is 64 MiB, far
/// beyond any real deployment (a /8 Network cut into /30 subnets needs 2^22).
pub const MAX_SLOTS_LOG2: u8 = 24;

/// Why an overlay shape or a route cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The subnet length is shorter than the Network's prefix or longer than 32.
    #[error("subnet length /{subnet_len} does not fit the network {network}")]
    BadSubnetLen {
        /// The overlay Network.
        network: Ipv4Net,
        /// The offending subnet length.
        subnet_len: u8,
    },
    /// The overlay would need more slots than [`MAX_SLOTS_LOG2`] allows.
    #[error(
        "network {network} cut into /{subnet_len} subnets has more than 2^{MAX_SLOTS_LOG2} subnets"
    )]
    TooManySubnets {
        /// The overlay Network.
        network: Ipv4Net,
        /// The offending subnet length.
        subnet_len: u8,
    },
    /// A lease's subnet is not one of the overlay's host subnets.
    #[error("subnet {subnet} is not a /{subnet_len} subnet of {network}")]
    NotASubnet {
        /// The subnet that does not fit.
        subnet: Ipv4Net,
        /// The overlay Network.
        network: Ipv4Net,
        /// The overlay's subnet length.
        subnet_len: u8,
    },
    /// A peer's public address cannot receive datagrams.
    #[error("peer address {0} cannot receive datagrams")]
    BadPeerAddress(Ipv4Addr),
}

/// The overlay's shape for one run: the Network and the prefix length of every host subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Overlay {
    network: Ipv4Net,
    subnet_len: u8,
}

impl Overlay {
    /// An overlay of `network` cut into `/subnet_len` host subnets. Host bits of `network` are
    /// cleared, as flannel does.
    pub fn new(network: Ipv4Net, subnet_len: u8) -> Result<Self, RouteError> {
        let network = network.trunc();
        if subnet_len < network.prefix_len() || subnet_len > 32 {
            return Err(RouteError::BadSubnetLen {
                network,
                subnet_len,
            });
        }
        if subnet_len - network.prefix_len() > MAX_SLOTS_LOG2 {
            return Err(RouteError::TooManySubnets {
                network,
                subnet_len,
            });
        }
        Ok(Self {
            network,
            subnet_len,
        })
    }

    /// The whole overlay Network.
    pub fn network(&self) -> Ipv4Net {
        self.network
    }

    /// The prefix length of each host subnet.
    pub fn subnet_len(&self) -> u8 {
        self.subnet_len
    }

    /// How many host subnets the Network holds.
    pub fn slot_count(&self) -> usize {
        1usize << (self.subnet_len - self.network.prefix_len())
    }

    /// Whether `addr` lies in the overlay Network.
    #[inline]
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        self.network.contains(&addr)
    }

    /// The slot of the host subnet that holds `addr`, or `None` outside the Network.
    #[inline]
    pub fn slot_of(&self, addr: Ipv4Addr) -> Option<usize> {
        if !self.network.contains(&addr) {
            return None;
        }
        let offset = u32::from(addr).wrapping_sub(u32::from(self.network.network()));
        // u64 keeps the shift defined when the subnet length is 0 (a 0.0.0.0/0 overlay).
        Some((u64::from(offset) >> (32 - u32::from(self.subnet_len))) as usize)
    }

    /// The host subnet at `slot`. Slots at or beyond [`Overlay::slot_count`] wrap around.
    pub fn subnet_at(&self, slot: usize) -> Ipv4Net {
        let slot = (slot % self.slot_count()) as u64;
        let base = u64::from(u32::from(self.network.network()));
        let addr = base + (slot << (32 - u32::from(self.subnet_len)));
        // The addition stays below 2^32 because slot < slot_count.
        Ipv4Net::new(Ipv4Addr::from(addr as u32), self.subnet_len)
            .unwrap_or_else(|_| unreachable!("subnet_len was checked to be <= 32"))
    }

    /// The slot of `subnet` if it is exactly one of this overlay's host subnets.
    pub fn slot_of_subnet(&self, subnet: Ipv4Net) -> Result<usize, RouteError> {
        let fits = subnet.prefix_len() == self.subnet_len && subnet.network() == subnet.addr();
        match self.slot_of(subnet.addr()) {
            Some(slot) if fits => Ok(slot),
            _ => Err(RouteError::NotASubnet {
                subnet,
                network: self.network,
                subnet_len: self.subnet_len,
            }),
        }
    }
}

/// A complete, immutable picture of the overlay as one host sees it: its own subnet and, for
/// every other host's subnet, that host's public address. Peers all listen on one UDP port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTable {
    overlay: Overlay,
    port: u16,
    local: Option<Ipv4Net>,
    /// Per host subnet, the peer's public IPv4 address as an integer; 0 means no lease.
    slots: Box<[u32]>,
    /// Every distinct peer address, sorted, to tell a lease holder from a stranger.
    peers: Box<[u32]>,
}

impl RouteTable {
    /// A table with no lease at all.
    pub fn empty(overlay: Overlay, port: u16) -> Self {
        Self {
            overlay,
            port,
            local: None,
            slots: vec![0; overlay.slot_count()].into_boxed_slice(),
            peers: Box::new([]),
        }
    }

    /// A table for `overlay` in which `local` is this host's subnet and `peers` maps each other
    /// host's subnet to its public address. A peer entry for the local subnet is ignored.
    pub fn build<I>(
        overlay: Overlay,
        port: u16,
        local: Option<Ipv4Net>,
        peers: I,
    ) -> Result<Self, RouteError>
    where
        I: IntoIterator<Item = (Ipv4Net, Ipv4Addr)>,
    {
        let mut table = Self::empty(overlay, port);
        let local_slot = match local {
            Some(subnet) => Some(overlay.slot_of_subnet(subnet)?),
            None => None,
        };
        table.local = local;
        let mut addrs = Vec::new();
        for (subnet, addr) in peers {
            let slot = overlay.slot_of_subnet(subnet)?;
            if Some(slot) == local_slot {
                continue;
            }
            if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
                return Err(RouteError::BadPeerAddress(addr));
            }
            table.slots[slot] = u32::from(addr);
            addrs.push(u32::from(addr));
        }
        addrs.sort_unstable();
        addrs.dedup();
        table.peers = addrs.into_boxed_slice();
        Ok(table)
    }

    /// This table with each `(subnet, peer)` change applied: `Some(addr)` routes the subnet to
    /// that peer, `None` removes its route; a change to the local subnet is ignored, as in
    /// [`RouteTable::build`]. `Ok(None)` when nothing changes. The result equals a rebuild
    /// from the changed list of peers, at the cost of one copy of the table instead: a single
    /// lease change in a large overlay costs microseconds, not a rebuild.
    pub fn with_changes<I>(&self, changes: I) -> Result<Option<Self>, RouteError>
    where
        I: IntoIterator<Item = (Ipv4Net, Option<Ipv4Addr>)>,
    {
        let local_slot = match self.local {
            Some(subnet) => Some(self.overlay.slot_of_subnet(subnet)?),
            None => None,
        };
        let mut slots: Option<Box<[u32]>> = None;
        let mut gone = Vec::new();
        let mut added = Vec::new();
        for (subnet, peer) in changes {
            let slot = self.overlay.slot_of_subnet(subnet)?;
            let new = match peer {
                Some(addr)
                    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() =>
                {
                    return Err(RouteError::BadPeerAddress(addr))
                }
                Some(addr) => u32::from(addr),
                None => 0,
            };
            let table = slots.get_or_insert_with(|| self.slots.clone());
            if Some(slot) == local_slot || table[slot] == new {
                continue;
            }
            if table[slot] != 0 {
                gone.push(table[slot]);
            }
            if new != 0 {
                added.push(new);
            }
            table[slot] = new;
        }
        let Some(slots) = slots.filter(|s| *s != self.slots) else {
            return Ok(None);
        };
        let mut peers = self.peers.to_vec();
        for addr in added {
            if let Err(at) = peers.binary_search(&addr) {
                peers.insert(at, addr);
            }
        }
        for addr in gone {
            if !slots.contains(&addr) {
                if let Ok(at) = peers.binary_search(&addr) {
                    peers.remove(at);
                }
            }
        }
        Ok(Some(Self {
            overlay: self.overlay,
            port: self.port,
            local: self.local,
            slots,
            peers: peers.into_boxed_slice(),
        }))
    }

    /// The overlay this table describes.
    pub fn overlay(&self) -> Overlay {
        self.overlay
    }

    /// The UDP port every host listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// This host's subnet, if it holds a lease.
    pub fn local_subnet(&self) -> Option<Ipv4Net> {
        self.local
    }

    /// How many distinct peer hosts the table knows.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Whether `addr` lies in this host's own subnet.
    #[inline]
    pub fn is_local(&self, addr: Ipv4Addr) -> bool {
        self.local.is_some_and(|subnet| subnet.contains(&addr))
    }

    /// The UDP address of the peer whose subnet holds `dst`, if any.
    #[inline]
    pub fn peer_for(&self, dst: Ipv4Addr) -> Option<SocketAddrV4> {
        let slot = self.overlay.slot_of(dst)?;
        match self.slots.get(slot).copied() {
            Some(0) | None => None,
            Some(ip) => Some(SocketAddrV4::new(Ipv4Addr::from(ip), self.port)),
        }
    }

    /// Whether `from` is the address of a current lease holder (its public IP on the overlay port).
    #[inline]
    pub fn is_peer(&self, from: SocketAddrV4) -> bool {
        from.port() == self.port && self.peers.binary_search(&u32::from(*from.ip())).is_ok()
    }

    /// Whether the inner source `src` lies in a subnet leased to the host at `from`: the reverse
    /// question receive validation asks.
    #[inline]
    pub fn sender_owns(&self, from: SocketAddrV4, src: Ipv4Addr) -> bool {
        from.port() == self.port
            && self
                .peer_for(src)
                .is_some_and(|peer| peer.ip() == from.ip())
    }

    /// Every subnet leased to the host at `from`, in address order.
    pub fn subnets_of(&self, from: SocketAddrV4) -> impl Iterator<Item = Ipv4Net> + '_ {
        let ip = u32::from(*from.ip());
        let port_matches = from.port() == self.port;
        self.slots
            .iter()
            .enumerate()
            .filter(move |(_, held)| port_matches && **held == ip && ip != 0)
            .map(|(slot, _)| self.overlay.subnet_at(slot))
    }

    /// Every peer subnet and its public address, in address order.
    pub fn peers(&self) -> impl Iterator<Item = (Ipv4Net, Ipv4Addr)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, held)| **held != 0)
            .map(|(slot, held)| (self.overlay.subnet_at(slot), Ipv4Addr::from(*held)))
    }
}

/// The published route table: written whole by the control thread, read lock-free by workers.
#[derive(Clone, Debug)]
pub struct Routes {
    current: Arc<ArcSwap<RouteTable>>,
}

impl Routes {
    /// Publish `table` as the first version.
    pub fn new(table: RouteTable) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(table)),
        }
    }

    /// Replace the table in one atomic swap. Workers see it from their next batch on.
    pub fn publish(&self, table: RouteTable) {
        self.current.store(Arc::new(table));
    }

    /// The current table, for one batch. Cheap: one atomic load, no lock, no allocation.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.current.load()
    }

    /// The current table as an owned pointer, for holders that keep it longer than a batch.
    pub fn current(&self) -> Arc<RouteTable> {
        self.current.load_full()
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

    #[test]
    fn changes_give_what_a_rebuild_gives() {
        let o = overlay();
        let local = Some(net("10.1.5.0/24"));
        let mut peers: std::collections::BTreeMap<Ipv4Net, Ipv4Addr> = [
            (net("10.1.1.0/24"), ip("198.18.0.1")),
            (net("10.1.2.0/24"), ip("198.18.0.2")),
            (net("10.1.3.0/24"), ip("198.18.0.2")),
        ]
        .into();
        let mut table = RouteTable::build(o, 8285, local, peers.clone()).unwrap();
        let steps: &[&[(&str, Option<&str>)]] = &[
            &[("10.1.4.0/24", Some("198.18.0.4"))],
            &[("10.1.2.0/24", None)],
            &[("10.1.3.0/24", None), ("10.1.3.0/24", Some("198.18.0.9"))],
            &[("10.1.1.0/24", Some("198.18.0.4")), ("10.1.4.0/24", None)],
            &[("10.1.5.0/24", Some("198.18.0.7"))],
            &[("10.1.9.0/24", None)],
        ];
        for step in steps {
            let changes: Vec<(Ipv4Net, Option<Ipv4Addr>)> =
                step.iter().map(|(s, p)| (net(s), p.map(ip))).collect();
            for (subnet, peer) in &changes {
                match peer {
                    Some(addr) => peers.insert(*subnet, *addr),
                    None => peers.remove(subnet),
                };
            }
            let rebuilt = RouteTable::build(o, 8285, local, peers.clone()).unwrap();
            match table.with_changes(changes).unwrap() {
                Some(changed) => {
                    assert_eq!(changed, rebuilt, "after {step:?}");
                    table = changed;
                }
                None => assert_eq!(table, rebuilt, "{step:?} changes nothing"),
            }
        }
        assert_eq!(
            table.with_changes([(net("10.1.1.0/24"), Some(ip("0.0.0.0")))]),
            Err(RouteError::BadPeerAddress(ip("0.0.0.0")))
        );
        assert!(table.with_changes([(net("10.2.0.0/24"), None)]).is_err());
    }

    #[test]
    fn slots_cover_the_network_edges() {
        let o = overlay();
        assert_eq!(o.slot_count(), 256);
        assert_eq!(o.slot_of(ip("10.1.0.0")), Some(0));
        assert_eq!(o.slot_of(ip("10.1.0.255")), Some(0));
        assert_eq!(o.slot_of(ip("10.1.74.9")), Some(74));
        assert_eq!(o.slot_of(ip("10.1.255.255")), Some(255));
        assert_eq!(o.slot_of(ip("10.0.255.255")), None);
        assert_eq!(o.slot_of(ip("10.2.0.0")), None);
        assert_eq!(o.subnet_at(74), net("10.1.74.0/24"));
        assert_eq!(o.subnet_at(255), net("10.1.255.0/24"));
    }

    #[test]
    fn overlay_shapes_at_the_limits() {
        let all = Overlay::new(net("0.0.0.0/0"), 24).unwrap();
        assert_eq!(all.slot_of(ip("255.255.255.255")), Some((1 << 24) - 1));
        let hosts = Overlay::new(net("10.9.9.0/24"), 32).unwrap();
        assert_eq!(hosts.slot_of(ip("10.9.9.7")), Some(7));
        assert_eq!(hosts.subnet_at(7), net("10.9.9.7/32"));
        assert!(matches!(
            Overlay::new(net("10.0.0.0/8"), 4),
            Err(RouteError::BadSubnetLen { .. })
        ));
        assert!(matches!(
            Overlay::new(net("10.0.0.0/8"), 33),
            Err(RouteError::BadSubnetLen { .. })
        ));
        assert!(matches!(
            Overlay::new(net("0.0.0.0/0"), 30),
            Err(RouteError::TooManySubnets { .. })
        ));
        // Host bits are cleared, as flannel does with 10.1.5.7/16.
        assert_eq!(
            Overlay::new(net("10.1.5.7/16"), 24).unwrap().network(),
            net("10.1.0.0/16")
        );
    }

    #[test]
    fn lookups_find_peers_and_nothing_else() {
        let table = RouteTable::build(
            overlay(),
            8285,
            Some(net("10.1.15.0/24")),
            [
                (net("10.1.81.0/24"), ip("198.18.0.2")),
                (net("10.1.255.0/24"), ip("198.18.0.3")),
                (net("10.1.15.0/24"), ip("198.18.0.1")),
            ],
        )
        .unwrap();
        let peer2 = SocketAddrV4::new(ip("198.18.0.2"), 8285);
        assert_eq!(table.peer_for(ip("10.1.81.7")), Some(peer2));
        assert_eq!(
            table.peer_for(ip("10.1.255.255")),
            Some(SocketAddrV4::new(ip("198.18.0.3"), 8285))
        );
        assert_eq!(
            table.peer_for(ip("10.1.15.3")),
            None,
            "own subnet is not a peer"
        );
        assert_eq!(table.peer_for(ip("10.1.82.1")), None);
        assert_eq!(table.peer_for(ip("10.2.81.1")), None);
        assert!(table.is_local(ip("10.1.15.200")));
        assert!(!table.is_local(ip("10.1.16.0")));
        assert_eq!(table.peer_count(), 2);
        assert!(table.is_peer(peer2));
        assert!(!table.is_peer(SocketAddrV4::new(ip("198.18.0.2"), 9999)));
        assert!(!table.is_peer(SocketAddrV4::new(ip("198.18.0.1"), 8285)));
        assert!(table.sender_owns(peer2, ip("10.1.81.200")));
        assert!(!table.sender_owns(peer2, ip("10.1.255.1")));
        assert_eq!(
            table.subnets_of(peer2).collect::<Vec<_>>(),
            vec![net("10.1.81.0/24")]
        );
        assert_eq!(table.peers().count(), 2);
    }

    #[test]
    fn build_refuses_what_does_not_fit() {
        let o = overlay();
        let bad = [
            (net("10.1.81.0/25"), ip("198.18.0.2")),
            (net("10.1.81.1/24"), ip("198.18.0.2")),
            (net("10.2.81.0/24"), ip("198.18.0.2")),
        ];
        for entry in bad {
            assert!(matches!(
                RouteTable::build(o, 8285, None, [entry]),
                Err(RouteError::NotASubnet { .. })
            ));
        }
        assert_eq!(
            RouteTable::build(o, 8285, None, [(net("10.1.81.0/24"), ip("0.0.0.0"))]),
            Err(RouteError::BadPeerAddress(ip("0.0.0.0")))
        );
    }

    #[test]
    fn publish_swaps_the_whole_table() {
        let o = overlay();
        let routes = Routes::new(RouteTable::empty(o, 8285));
        let before = routes.current();
        routes.publish(
            RouteTable::build(o, 8285, None, [(net("10.1.2.0/24"), ip("198.18.0.9"))]).unwrap(),
        );
        assert_eq!(before.peer_for(ip("10.1.2.1")), None);
        assert!(routes.snapshot().peer_for(ip("10.1.2.1")).is_some());
    }
}
