//! This host's static key and the WireGuard tunnels to each peer host, several per peer.
//!
//! A peer is a host holding a lease whose record carries a public key. Its [`PeerTunnel`]
//! holds [`LANES`] lanes, each a boringtun `Tunn` of its own: its own handshake, up to eight
//! sessions (the current one and those being rotated out), each with its own replay window,
//! and the protocol's timers (rekey after 2 minutes or 2^60 messages, give a session up after
//! 3 minutes). Worker `w` seals everything it sends to a peer on lane `w % LANES`, so workers
//! sending to one peer do not take turns on one lock and each has a session of its own.
//!
//! The lane is written in every message: lane `l` of a peer is given the tunnel index
//! `(peer number << 8) | l`, and boringtun makes session indices of it by shifting it left by
//! 8 and adding a rotating byte, little-endian on the wire, so the second byte of a session
//! index is its lane. The receiver index of a data message or cookie reply, the sender index of
//! a handshake initiation and the receiver index of a handshake response all name the lane
//! (see [`lane_offset`]); the responder answers an initiation on its own lane of that number.
//! Both hosts so use lane `l`'s tunnels for one session pair, whatever their worker counts,
//! and the receiving host steers lane `l` to its worker `l % workers`
//! (`io::udp::steer_by_lane`), the one that seals lane `l` itself.
//!
//! A lane's tunnel is made on first use, so an idle lane costs a pointer and the timers run
//! only for lanes in use. Each lane keeps boringtun's own handshake rate limit (10 per second
//! before cookies are asked for), so a peer's is [`LANES`] times that.
//!
//! Control builds a whole new [`TunnelTable`] when the peers or their keys change and
//! publishes it through [`Tunnels`] (one atomic swap); a peer whose address and key did not
//! change keeps its lanes and sessions, a peer with a new key gets new lanes, which handshake
//! on their next packet.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use arc_swap::ArcSwap;
use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};

/// The length of an X25519 key, private or public.
pub const KEY_LEN: usize = 32;

/// Session indices are 24 bits of a tunnel's number (boringtun shifts it by 8).
const INDEX_MASK: u32 = (1 << 24) - 1;

/// How many lanes a peer has. Sixteen covers the worker count of most hosts, so that every
/// worker seals on a lane of its own; on a larger host workers `w` and `w + 16` share one (a
/// lock taken by two workers, not by all). Lanes are made on first use, so a host uses as many
/// as it has workers, and as many as its peers' workers use towards it. The lane takes the low
/// byte of a tunnel's index, so up to 256 would fit; each lane in use costs a handshake every
/// two minutes and its sessions' memory.
pub const LANES: usize = 16;

/// Where a message names the receiving host's lane: the second byte of the session index in
/// it, which is the receiver index (bytes 4..8) of a data message or cookie reply, the
/// receiver index (bytes 8..12) of a handshake response, and the initiator's sender index
/// (bytes 4..8) of a handshake initiation, answered on the lane of the same number.
pub fn lane_offset(message_type: u8) -> usize {
    const HANDSHAKE_RESPONSE: u8 = 2;
    if message_type == HANDSHAKE_RESPONSE {
        9
    } else {
        5
    }
}

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

/// One peer host's tunnels: [`LANES`] lanes, each made on first use.
pub struct PeerTunnel {
    public_key: [u8; KEY_LEN],
    keys: Arc<StaticKeys>,
    /// The peer's number among the tunnels this host made (16 bits), the upper part of
    /// every lane's index.
    number: u32,
    lanes: [OnceLock<Box<Mutex<Tunn>>>; LANES],
}

impl PeerTunnel {
    fn new(keys: Arc<StaticKeys>, public_key: [u8; KEY_LEN], number: u32) -> Self {
        Self {
            public_key,
            keys,
            number: number & (INDEX_MASK >> 8),
            lanes: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// The peer's public key.
    pub fn public_key(&self) -> [u8; KEY_LEN] {
        self.public_key
    }

    /// Lane `lane`'s tunnel (made now if it is the lane's first use), locked; `None` for a
    /// lane beyond [`LANES`]. A worker that panicked while holding it cannot have left it
    /// worse than a lost packet, so a poisoned lock is taken over.
    pub fn lane(&self, lane: usize) -> Option<MutexGuard<'_, Tunn>> {
        let slot = self.lanes.get(lane)?;
        Some(lock(slot.get_or_init(|| self.new_lane(lane))))
    }

    /// The tunnel of the lane worker `worker` seals on, `worker % LANES`, locked.
    pub fn worker_lane(&self, worker: usize) -> MutexGuard<'_, Tunn> {
        let lane = worker % LANES;
        lock(self.lanes[lane].get_or_init(|| self.new_lane(lane)))
    }

    /// Lane 0's tunnel, locked: the one a host with one worker seals on.
    pub fn lock(&self) -> MutexGuard<'_, Tunn> {
        self.worker_lane(0)
    }

    fn new_lane(&self, lane: usize) -> Box<Mutex<Tunn>> {
        let index = ((self.number << 8) | lane as u32) & INDEX_MASK;
        Box::new(Mutex::new(Tunn::new(
            self.keys.secret.clone(),
            PublicKey::from(self.public_key),
            None,
            None,
            index,
            None,
        )))
    }

    /// The tunnels of the lanes in use, each locked in turn as the iterator reaches it.
    pub fn lanes_in_use(&self) -> impl Iterator<Item = MutexGuard<'_, Tunn>> {
        self.lanes
            .iter()
            .filter_map(OnceLock::get)
            .map(|tunn| lock(tunn))
    }
}

fn lock(tunn: &Mutex<Tunn>) -> MutexGuard<'_, Tunn> {
    tunn.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::fmt::Debug for PeerTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTunnel")
            .field("public_key", &self.public_key)
            .field("number", &self.number)
            .field(
                "lanes_in_use",
                &self.lanes.iter().filter(|l| l.get().is_some()).count(),
            )
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
    /// and key are unchanged keeps its lanes; the others get new ones. Returns whether the
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
                    Arc::new(PeerTunnel::new(Arc::clone(&self.keys), key, index))
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
    fn a_new_key_replaces_every_lane_of_that_peer_only() {
        let tunnels = Tunnels::new(StaticKeys::from_private([1; KEY_LEN]));
        let [a, b, c] = [2, 3, 4].map(|k| StaticKeys::from_private([k; KEY_LEN]).public());
        let (first, second) = (ip("198.18.0.2"), ip("198.18.0.3"));
        tunnels.publish([(first, a), (second, b)]);
        let table = tunnels.snapshot();
        for worker in [0, 1, 5] {
            drop(table.get(&first).unwrap().worker_lane(worker));
            drop(table.get(&second).unwrap().worker_lane(worker));
        }
        assert_eq!(table.get(&first).unwrap().lanes_in_use().count(), 3);
        assert!(table.get(&first).unwrap().lane(LANES).is_none());
        assert!(tunnels.publish([(first, c), (second, b)]));
        let after = tunnels.snapshot();
        assert_eq!(after.get(&first).unwrap().lanes_in_use().count(), 0);
        assert!(Arc::ptr_eq(
            table.get(&second).unwrap(),
            after.get(&second).unwrap()
        ));
        assert_eq!(after.get(&second).unwrap().lanes_in_use().count(), 3);
    }

    mod lanes {
        use super::*;
        use crate::counters::DropReason;
        use crate::crypto::open::{Opened, Opener};
        use crate::crypto::seal::{sealed_len, Sealer};
        use crate::wire::ipv4::testing::Spec;
        use std::net::SocketAddrV4;

        const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
        const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

        /// One host: its tunnels and its opener (which of its workers opens does not matter
        /// to the protocol; the steering program picks it on a real host).
        struct Host {
            addr: Ipv4Addr,
            tunnels: Tunnels,
            opener: Opener,
        }

        impl Host {
            fn new(addr: Ipv4Addr, private: u8) -> Self {
                let tunnels = Tunnels::new(StaticKeys::from_private([private; KEY_LEN]));
                let opener = Opener::new(tunnels.clone());
                Host {
                    addr,
                    tunnels,
                    opener,
                }
            }

            /// Seal `packet` for `to` as worker `worker` does.
            fn seal(&self, to: Ipv4Addr, worker: usize, packet: &[u8]) -> Vec<u8> {
                let mut out = vec![0; sealed_len(packet.len())];
                let table = self.tunnels.snapshot();
                let mut tunn = table.get(&to).unwrap().worker_lane(worker);
                let len = Sealer::seal(&mut tunn, packet, &mut out);
                out.truncate(len);
                out
            }

            /// Open `message`; a packet is put where the message was, as the tests read it.
            fn open(&mut self, from: Ipv4Addr, message: &mut [u8]) -> Opened {
                let mut out = vec![0; message.len()];
                let opened = self
                    .opener
                    .open(SocketAddrV4::new(from, 8285), message, &mut out);
                if let Opened::Packet(len) = opened {
                    message[..len].copy_from_slice(&out[..len]);
                }
                opened
            }

            fn outbox(&mut self) -> Vec<Vec<u8>> {
                self.opener.outbox().drain(..).map(|(_, m)| m).collect()
            }

            fn lanes_in_use(&self, peer: Ipv4Addr) -> usize {
                self.tunnels
                    .snapshot()
                    .get(&peer)
                    .unwrap()
                    .lanes_in_use()
                    .count()
            }
        }

        fn pair() -> (Host, Host) {
            let (a, b) = (Host::new(A, 0x11), Host::new(B, 0x22));
            a.tunnels.publish([(B, b.tunnels.public_key())]);
            b.tunnels.publish([(A, a.tunnels.public_key())]);
            (a, b)
        }

        fn packet(payload: usize) -> Vec<u8> {
            Spec::icmp("10.1.1.2", "10.1.2.2", 8, 28 + payload).bytes()
        }

        /// `from`'s worker `worker` sends `p` to `to`: the handshake on the worker's lane,
        /// then the packet that waited for it. Every message names the lane.
        fn first_packet(from: &mut Host, to: &mut Host, worker: usize, p: &[u8]) {
            let lane = (worker % LANES) as u8;
            let mut init = from.seal(to.addr, worker, p);
            assert_eq!(init.len(), 148, "worker {worker}: a handshake initiation");
            assert_eq!(init[5], lane, "the initiator's sender index names its lane");
            assert_eq!(to.open(from.addr, &mut init), Opened::Handled);
            let mut response = to.outbox();
            assert_eq!(response.len(), 1);
            let response = &mut response[0];
            assert_eq!(response[0], 2);
            assert_eq!(
                response[5], lane,
                "answered on the responder's lane of that number"
            );
            assert_eq!(
                response[9], lane,
                "the receiver index names the initiator's lane"
            );
            assert_eq!(from.open(to.addr, response), Opened::Handled);
            let mut released = from.outbox();
            assert_eq!(
                released.len(),
                2,
                "the keepalive and the packet that waited"
            );
            for message in &mut released {
                assert_eq!(message[0], 4);
                assert_eq!(message[5], lane, "data names the receiver's lane");
            }
            assert_eq!(to.open(from.addr, &mut released[0]), Opened::Handled);
            assert_eq!(
                to.open(from.addr, &mut released[1]),
                Opened::Packet(p.len())
            );
            assert_eq!(&released[1][..p.len()], p);
        }

        #[test]
        fn hosts_with_different_worker_counts_handshake_on_several_lanes() {
            // A has two workers, B three: A seals on lanes 0 and 1, B on lanes 0, 1 and 2.
            let (mut a, mut b) = pair();
            for worker in 0..2 {
                first_packet(&mut a, &mut b, worker, &packet(10 + worker));
            }
            // B's lanes 0 and 1 have A's sessions: its workers 0 and 1 send at once.
            for worker in 0..2 {
                let p = packet(100 + worker);
                let mut sealed = b.seal(A, worker, &p);
                assert_eq!(sealed[5], worker as u8);
                assert_eq!(a.open(B, &mut sealed), Opened::Packet(p.len()));
                assert_eq!(&sealed[..p.len()], &p[..]);
            }
            // B's worker 2 starts lane 2, which A answers on a lane none of its workers
            // seals on.
            first_packet(&mut b, &mut a, 2, &packet(200));
            assert_eq!(a.lanes_in_use(B), 3);
            assert_eq!(b.lanes_in_use(A), 3);
            // A worker beyond the lanes shares one: worker LANES + 1 seals on lane 1.
            let p = packet(300);
            let mut sealed = a.seal(B, LANES + 1, &p);
            assert_eq!(sealed[5], 1);
            assert_eq!(b.open(A, &mut sealed), Opened::Packet(p.len()));
        }

        #[test]
        fn data_opens_only_through_its_own_lane() {
            let (mut a, mut b) = pair();
            for worker in 0..3 {
                first_packet(&mut a, &mut b, worker, &packet(10));
            }
            let p = packet(500);
            let sealed: Vec<Vec<u8>> = (0..3).map(|worker| a.seal(B, worker, &p)).collect();
            for (sealed_on, claimed) in [(0, 1u8), (1, 2), (2, 0)] {
                // Every lane's first session has the same rotating byte, so the moved index
                // is that of lane `claimed`'s session, whose key does not open the message.
                let mut moved = sealed[sealed_on].clone();
                moved[5] = claimed;
                assert_eq!(
                    b.open(A, &mut moved),
                    Opened::Drop(DropReason::Tampered),
                    "sealed on lane {sealed_on}, claiming lane {claimed}"
                );
            }
            for mut original in sealed {
                assert_eq!(b.open(A, &mut original), Opened::Packet(p.len()));
            }
            // A lane that does not exist: dropped as an unknown session, and made nowhere.
            for claimed in [LANES as u8, 0x80, 0xff] {
                let mut beyond = a.seal(B, 0, &p);
                beyond[5] = claimed;
                assert_eq!(
                    b.open(A, &mut beyond),
                    Opened::Drop(DropReason::UnknownKey),
                    "lane {claimed}"
                );
                let a_again = Host::new(A, 0x11);
                a_again.tunnels.publish([(B, b.tunnels.public_key())]);
                let mut init_beyond = a_again.seal(B, 0, &p);
                init_beyond[5] = claimed;
                assert_eq!(
                    b.open(A, &mut init_beyond),
                    Opened::Drop(DropReason::UnknownKey),
                    "an initiation from lane {claimed}"
                );
            }
            assert_eq!(b.lanes_in_use(A), 3);
            assert!(b.outbox().is_empty());
            // Too short to name a lane.
            assert_eq!(
                b.open(A, &mut [4, 0, 0, 0, 1]),
                Opened::Drop(DropReason::Truncated)
            );
        }

        #[test]
        fn a_replay_on_one_lane_leaves_the_others_alone() {
            let (mut a, mut b) = pair();
            for worker in 0..3 {
                first_packet(&mut a, &mut b, worker, &packet(10));
            }
            let p = packet(700);
            let sealed: Vec<Vec<u8>> = (0..3).map(|worker| a.seal(B, worker, &p)).collect();
            let mut first = sealed[1].clone();
            assert_eq!(b.open(A, &mut first), Opened::Packet(p.len()));
            let mut again = sealed[1].clone();
            assert_eq!(b.open(A, &mut again), Opened::Drop(DropReason::Replayed));
            // The other lanes count their own messages: the same counter opens there.
            for lane in [0, 2] {
                let mut other = sealed[lane].clone();
                assert_eq!(b.open(A, &mut other), Opened::Packet(p.len()), "{lane}");
            }
            // And lane 1 goes on.
            let mut next = a.seal(B, 1, &p);
            assert_eq!(b.open(A, &mut next), Opened::Packet(p.len()));
        }
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
