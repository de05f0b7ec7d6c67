//! Which peers take packets whose inner TCP/UDP checksums are left partial, and whose partial
//! packets this host takes (see [`crate::offload::partial`]): the hosts that advertised it,
//! published by control only while this host advertises it too, read lock-free by the workers
//! (as [`crate::route::Routes`] is).

use std::net::Ipv4Addr;
use std::sync::Arc;

use arc_swap::ArcSwap;

/// An immutable set of peers' public addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartialPeerTable {
    /// Sorted, without duplicates.
    addrs: Box<[u32]>,
}

impl PartialPeerTable {
    /// The table of `peers`.
    pub fn new(peers: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        let mut addrs: Vec<u32> = peers.into_iter().map(u32::from).collect();
        addrs.sort_unstable();
        addrs.dedup();
        Self {
            addrs: addrs.into_boxed_slice(),
        }
    }

    /// Whether the peer at `addr` takes (and sends) partial inner checksums.
    #[inline]
    pub fn takes(&self, addr: Ipv4Addr) -> bool {
        !self.addrs.is_empty() && self.addrs.binary_search(&u32::from(addr)).is_ok()
    }

    /// How many peers are in the table.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Whether no peer is.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

/// The published table: written whole by control, read by the workers. Cloning gives another
/// handle to the same table.
#[derive(Clone, Debug, Default)]
pub struct PartialPeers {
    current: Arc<ArcSwap<PartialPeerTable>>,
}

impl PartialPeers {
    /// Replace the table in one atomic swap.
    pub fn publish(&self, table: PartialPeerTable) {
        self.current.store(Arc::new(table));
    }

    /// The current table. Cheap: one atomic load, no lock.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<PartialPeerTable>> {
        self.current.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_peers_take_partial_checksums() {
        let a: Ipv4Addr = "198.18.0.1".parse().unwrap();
        let b: Ipv4Addr = "198.18.0.2".parse().unwrap();
        let table = PartialPeerTable::new([b, a, b]);
        assert_eq!(table.len(), 2);
        assert!(table.takes(a) && table.takes(b));
        assert!(!table.takes("198.18.0.3".parse().unwrap()));
        let peers = PartialPeers::default();
        assert!(peers.snapshot().is_empty());
        peers.publish(table.clone());
        assert_eq!(**peers.snapshot(), table);
    }
}
