//! This host's static key and one WireGuard tunnel per peer host.
//!
//! A peer is a host holding a lease whose record carries a public key. Its [`PeerTunnel`]
//! holds boringtun's `Tunn`: the handshake state, up to eight sessions (the current one and
//! those being rotated out), each with its own replay window, and the protocol's timers
//! (rekey after 2 minutes or 2^60 messages, give a session up after 3 minutes). The workers
//! share one tunnel per peer behind a mutex, taken once per packet or super-packet; one flow
//! stays on one worker, so the lock is rarely contended.
//!
//! Control builds a whole new [`TunnelTable`] when the peers or their keys change and
//! publishes it through [`Tunnels`] (one atomic swap); a peer whose address and key did not
//! change keeps its tunnel and sessions, a peer with a new key gets a new tunnel, which
//! handshakes on its next packet.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};

/// The length of an X25519 key, private or public.
pub const KEY_LEN: usize = 32;

/// Session indices are 24 bits of a tunnel's number (boringtun shifts it by 8).
const INDEX_MASK: u32 = (1 << 24) - 1;

/// This host's static X25519 key pair.
#[derive(Clone)]
pub struct StaticKeys {
    secret: StaticSecret,
    public: PublicKey,
}

impl StaticKeys {
    /// The key pair of a private key (any 32 bytes; X25519 clamps them).
    pub fn from_private(private: [u8; KEY_LEN]) -> Self {
        let secret = StaticSecret::from(private);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// The public key, as published to the peers.
    pub fn public(&self) -> [u8; KEY_LEN] {
        self.public.to_bytes()
    }
}

impl std::fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("StaticKeys")
            .field("public", &self.public.as_bytes())
            .finish_non_exhaustive()
    }
}

/// One peer host's tunnel.
pub struct PeerTunnel {
    public_key: [u8; KEY_LEN],
    tunn: Mutex<Tunn>,
}

impl PeerTunnel {
    fn new(keys: &StaticKeys, public_key: [u8; KEY_LEN], index: u32) -> Self {
        let tunn = Tunn::new(
            keys.secret.clone(),
            PublicKey::from(public_key),
            None,
            None,
            index & INDEX_MASK,
            None,
        );
        Self {
            public_key,
            tunn: Mutex::new(tunn),
        }
    }

    /// The peer's public key.
    pub fn public_key(&self) -> [u8; KEY_LEN] {
        self.public_key
    }

    /// The tunnel, locked. A worker that panicked while holding it cannot have left it worse
    /// than a lost packet, so a poisoned lock is taken over.
    pub fn lock(&self) -> MutexGuard<'_, Tunn> {
        self.tunn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for PeerTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTunnel")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

/// Every peer's tunnel, by the peer's public address.
#[derive(Debug, Default)]
pub struct TunnelTable {
    peers: HashMap<Ipv4Addr, Arc<PeerTunnel>>,
}

impl TunnelTable {
    /// The tunnel of the peer at `addr`.
    #[inline]
    pub fn get(&self, addr: &Ipv4Addr) -> Option<&Arc<PeerTunnel>> {
        self.peers.get(addr)
    }

    /// How many peers have a tunnel.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer has one.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Every peer and its tunnel.
    pub fn iter(&self) -> impl Iterator<Item = (&Ipv4Addr, &Arc<PeerTunnel>)> {
        self.peers.iter()
    }
}

/// The published tunnel table, and this host's keys. Cloning shares both.
#[derive(Clone)]
pub struct Tunnels {
    keys: Arc<StaticKeys>,
    current: Arc<ArcSwap<TunnelTable>>,
    next_index: Arc<AtomicU32>,
    without_key: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnels")
            .field("keys", &self.keys)
            .field("peers", &self.current.load().len())
            .finish()
    }
}

impl Tunnels {
    /// No peers yet, with this host's `keys`.
    pub fn new(keys: StaticKeys) -> Self {
        Self {
            keys: Arc::new(keys),
            current: Arc::new(ArcSwap::from_pointee(TunnelTable::default())),
            next_index: Arc::new(AtomicU32::new(1)),
            without_key: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Record how many lease holders have no tunnel (no key published): nothing is sent to
    /// them or accepted from them.
    pub fn set_peers_without_key(&self, count: usize) {
        self.without_key.store(count, Ordering::Relaxed);
    }

    /// How many lease holders have no tunnel, as last recorded.
    pub fn peers_without_key(&self) -> usize {
        self.without_key.load(Ordering::Relaxed)
    }

    /// This host's public key.
    pub fn public_key(&self) -> [u8; KEY_LEN] {
        self.keys.public()
    }

    /// The table now (one atomic load).
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<TunnelTable>> {
        self.current.load()
    }

    /// Publish the tunnels of `peers` (public address and public key): a peer whose address
    /// and key are unchanged keeps its tunnel; the others get a new one. Returns whether the
    /// table changed.
    pub fn publish(&self, peers: impl IntoIterator<Item = (Ipv4Addr, [u8; KEY_LEN])>) -> bool {
        let old = self.current.load_full();
        let mut changed = false;
        let mut table = TunnelTable::default();
        for (addr, key) in peers {
            let tunnel = match old.get(&addr) {
                Some(tunnel) if tunnel.public_key == key => Arc::clone(tunnel),
                _ => {
                    changed = true;
                    let index = self.next_index.fetch_add(1, Ordering::Relaxed);
                    Arc::new(PeerTunnel::new(&self.keys, key, index))
                }
            };
            table.peers.insert(addr, tunnel);
        }
        changed |= table.len() != old.len();
        if changed {
            self.current.store(Arc::new(table));
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_keeps_its_tunnel_until_its_key_changes() {
        let tunnels = Tunnels::new(StaticKeys::from_private([1; KEY_LEN]));
        let a = StaticKeys::from_private([2; KEY_LEN]).public();
        let b = StaticKeys::from_private([3; KEY_LEN]).public();
        assert!(tunnels.publish([(ip("198.18.0.2"), a)]));
        let first = Arc::clone(tunnels.snapshot().get(&ip("198.18.0.2")).unwrap());
        assert!(!tunnels.publish([(ip("198.18.0.2"), a)]));
        assert!(Arc::ptr_eq(
            &first,
            tunnels.snapshot().get(&ip("198.18.0.2")).unwrap()
        ));
        assert!(tunnels.publish([(ip("198.18.0.2"), b)]));
        let second = tunnels.snapshot();
        let second = second.get(&ip("198.18.0.2")).unwrap();
        assert!(!Arc::ptr_eq(&first, second));
        assert_eq!(second.public_key(), b);
        assert!(tunnels.publish([]));
        assert!(tunnels.snapshot().is_empty());
    }

    #[test]
    fn the_public_key_is_the_x25519_public_key_of_the_private_one() {
        // RFC 7748 section 6.1: Alice's private and public keys.
        let private: [u8; KEY_LEN] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let public: [u8; KEY_LEN] = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
            0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
            0xaa, 0x9b, 0x4e, 0x6a,
        ];
        assert_eq!(StaticKeys::from_private(private).public(), public);
        let debug = format!("{:?}", StaticKeys::from_private(private));
        assert!(!debug.contains("119"), "the private key is never printed");
    }
}
