//! Who receives what from this host: the group table control publishes, read lock-free by the
//! relay thread (as [`crate::route::Routes`] is by the workers).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// What one peer host advertised: whether it takes multicast and broadcast, and the groups its
/// containers joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerMulticast {
    /// The peer's public address and overlay port (where its datagrams are sent).
    pub addr: SocketAddrV4,
    /// The peer takes IPv4 multicast (224.0.0.0/4).
    pub multicast: bool,
    /// The peer takes broadcast.
    pub broadcast: bool,
    /// The groups the peer's containers joined (ignored unless `multicast`).
    pub groups: Vec<Ipv4Addr>,
}

/// An immutable picture of which peers get a group's packets: built whole by control from
/// the peers' records, replaced whole through [`Groups`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupTable {
    /// Per group, the member peers (sorted, without duplicates).
    members: HashMap<Ipv4Addr, Vec<SocketAddrV4>>,
    /// Every multicast-capable peer: the receivers of link-local groups (224.0.0.0/24), which
    /// containers use without reporting them.
    link_local: Vec<SocketAddrV4>,
    /// Every broadcast-capable peer.
    broadcast: Vec<SocketAddrV4>,
}

impl GroupTable {
    /// A table in which no peer takes anything.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The table for `peers`. A peer listed twice gets the union of its entries; groups that
    /// are not multicast addresses are ignored.
    pub fn new(peers: impl IntoIterator<Item = PeerMulticast>) -> Self {
        let mut table = Self::empty();
        for peer in peers {
            if peer.broadcast {
                table.broadcast.push(peer.addr);
            }
            if !peer.multicast {
                continue;
            }
            table.link_local.push(peer.addr);
            for group in peer.groups {
                if group.is_multicast() && !is_link_local_group(group) {
                    table.members.entry(group).or_default().push(peer.addr);
                }
            }
        }
        let tidy = |list: &mut Vec<SocketAddrV4>| {
            list.sort_unstable();
            list.dedup();
        };
        tidy(&mut table.link_local);
        tidy(&mut table.broadcast);
        table.members.values_mut().for_each(tidy);
        table
    }

    /// The peers that get a packet for `group` (a multicast address): the members, or every
    /// multicast-capable peer for a link-local group.
    pub fn receivers_of(&self, group: Ipv4Addr) -> &[SocketAddrV4] {
        if is_link_local_group(group) {
            &self.link_local
        } else {
            self.members.get(&group).map_or(&[], Vec::as_slice)
        }
    }

    /// The peers that get broadcast.
    pub fn broadcast_receivers(&self) -> &[SocketAddrV4] {
        &self.broadcast
    }

    /// Whether no peer takes anything.
    pub fn is_empty(&self) -> bool {
        self.link_local.is_empty() && self.broadcast.is_empty()
    }
}

/// Whether `group` is in 224.0.0.0/24, the local network control block: groups that never
/// leave a link (mDNS, all-hosts), which hosts do not report.
pub fn is_link_local_group(group: Ipv4Addr) -> bool {
    let [a, b, c, _] = group.octets();
    a == 224 && b == 0 && c == 0
}

/// The published group table: written whole by control, read lock-free by the relay.
/// Cloning gives another handle to the same table.
#[derive(Clone, Debug)]
pub struct Groups {
    current: Arc<ArcSwap<GroupTable>>,
}

impl Groups {
    /// Publish `table` as the first version.
    pub fn new(table: GroupTable) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(table)),
        }
    }

    /// Replace the table in one atomic swap; the relay uses it from its next frame on.
    pub fn publish(&self, table: GroupTable) {
        self.current.store(Arc::new(table));
    }

    /// The current table. Cheap: one atomic load, no lock.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<GroupTable>> {
        self.current.load()
    }
}

impl Default for Groups {
    fn default() -> Self {
        Self::new(GroupTable::empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(last: u8, multicast: bool, broadcast: bool, groups: &[&str]) -> PeerMulticast {
        PeerMulticast {
            addr: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, last), 8285),
            multicast,
            broadcast,
            groups: groups.iter().map(|g| g.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn members_get_their_groups_and_capable_peers_the_rest() {
        let table = GroupTable::new([
            peer(2, true, false, &["239.1.1.1", "239.1.1.2"]),
            peer(3, true, true, &["239.1.1.1"]),
            // Groups without the capability mean nothing; a unicast "group" is ignored.
            peer(4, false, true, &["239.1.1.1", "10.1.1.1"]),
            peer(3, true, true, &["239.1.1.1"]),
        ]);
        let addrs =
            |list: &[SocketAddrV4]| list.iter().map(|a| a.ip().octets()[3]).collect::<Vec<_>>();
        assert_eq!(
            addrs(table.receivers_of("239.1.1.1".parse().unwrap())),
            [2, 3]
        );
        assert_eq!(addrs(table.receivers_of("239.1.1.2".parse().unwrap())), [2]);
        assert!(table.receivers_of("239.9.9.9".parse().unwrap()).is_empty());
        assert_eq!(
            addrs(table.receivers_of("224.0.0.251".parse().unwrap())),
            [2, 3]
        );
        assert_eq!(addrs(table.broadcast_receivers()), [3, 4]);
        assert!(GroupTable::empty().is_empty());
        assert!(!table.is_empty());
    }

    #[test]
    fn publish_swaps_the_whole_table() {
        let groups = Groups::new(GroupTable::empty());
        let other = groups.clone();
        other.publish(GroupTable::new([peer(2, true, true, &[])]));
        assert_eq!(groups.snapshot().broadcast_receivers().len(), 1);
    }
}
