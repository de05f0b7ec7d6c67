//! Opening what a worker receives: a datagram from a peer host is a WireGuard message. Data is
//! authenticated, checked against the session's replay window and decrypted into memory the
//! caller lends ([`Opener::open`]); a receive's datagrams are opened one after another into one
//! arena, packed ([`Opening`]), and the rest of the receive path (the checks of
//! `decide::from_peer`, coalescing, the TUN writes) reads each packet where it was opened.
//! Handshake messages are answered through the worker's outbox. Everything else is dropped and
//! counted by reason; nothing from the network can make this panic.

use std::net::{IpAddr, SocketAddrV4};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;

use crate::counters::DropReason;
use crate::crypto::tunnels::{lane_offset, PeerTunnel, Tunnels};

/// What became of a received datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// A packet of this many bytes now starts at the start of the memory it was opened into.
    Packet(usize),
    /// A protocol message (handshake, cookie, keepalive): handled, nothing for the TUN.
    Handled,
    /// Dropped, for this reason.
    Drop(DropReason),
}

/// The WireGuard message types (little-endian u32 in the first four bytes).
const HANDSHAKE_INIT: u8 = 1;
const DATA: u8 = 4;

/// The lane a message belongs to: the byte of its session index that names the receiving
/// host's lane (see [`crate::crypto::tunnels`]); `None` when the message is too short to
/// hold it.
fn lane_of(message: &[u8]) -> Option<u8> {
    let kind = *message.first()?;
    message.get(lane_offset(kind)).copied()
}

/// The tunnel of the lane `message` belongs to, locked. A lane beyond
/// [`crate::crypto::tunnels::LANES`] names a session index no weft host gives out, so, as
/// for any other index without a session, the message is `unknown_key`.
fn tunnel_for<'a>(
    tunnel: &'a PeerTunnel,
    message: &[u8],
) -> Result<std::sync::MutexGuard<'a, boringtun::noise::Tunn>, DropReason> {
    let lane = lane_of(message).ok_or(DropReason::Truncated)?;
    tunnel.lane(usize::from(lane)).ok_or(DropReason::UnknownKey)
}

/// A worker's opening state: the scratch buffer the packets that waited for a handshake are
/// sealed in, and the messages the protocol wants sent (handshake responses, keepalives, those
/// packets), which the worker sends after its batch.
#[derive(Debug)]
pub struct Opener {
    tunnels: Tunnels,
    scratch: Vec<u8>,
    outbox: Vec<(SocketAddrV4, Vec<u8>)>,
}

/// At most this many messages wait in the outbox; the protocol resends what is lost.
const OUTBOX_LIMIT: usize = 1024;

impl Opener {
    /// An opener of datagrams of up to 64 KiB with the peers' tunnels in `tunnels`.
    pub fn new(tunnels: Tunnels) -> Self {
        Self {
            tunnels,
            scratch: vec![0; 1 << 16],
            outbox: Vec::new(),
        }
    }

    /// Open `datagram`, received from `from`, with the tunnel of the peer at that address, into
    /// `out`, which must be at least as long as the datagram (what is shorter is dropped as
    /// `too_big`). The tunnel copies the message into `out` and decrypts it there, so a packet
    /// is in `out` with no further copy; the datagram is only read.
    pub fn open(&mut self, from: SocketAddrV4, datagram: &[u8], out: &mut [u8]) -> Opened {
        let table = self.tunnels.snapshot();
        let Some(tunnel) = table.get(from.ip()) else {
            // Either no lease, or a lease whose holder published no key.
            return Opened::Drop(DropReason::UnknownPeer);
        };
        if let Some(reason) = refuse_early(datagram) {
            return Opened::Drop(reason);
        }
        // The tunnel panics on a destination shorter than the message (or than a cookie reply,
        // which is shorter than any message it answers).
        if out.len() < datagram.len() {
            return Opened::Drop(DropReason::TooBig);
        }
        let mut tunn = match tunnel_for(tunnel, datagram) {
            Ok(tunn) => tunn,
            Err(reason) => return Opened::Drop(reason),
        };
        match tunn.decapsulate(Some(IpAddr::V4(*from.ip())), datagram, out) {
            // The packet starts at the start of `out`: the tunnel decrypts where it copied the
            // message to, and cuts the result to the IPv4 total length.
            TunnResult::WriteToTunnelV4(packet, _) => Opened::Packet(packet.len()),
            TunnResult::WriteToTunnelV6(..) => Opened::Drop(DropReason::NotIpv4),
            TunnResult::Done => Opened::Handled,
            TunnResult::Err(error) => Opened::Drop(reason_of(&error, datagram)),
            TunnResult::WriteToNetwork(message) => {
                push(&mut self.outbox, from, message);
                // A finished handshake releases the packets that waited for it.
                for _ in 0..OUTBOX_LIMIT {
                    match tunn.decapsulate(None, &[], &mut self.scratch) {
                        TunnResult::WriteToNetwork(message) => {
                            push(&mut self.outbox, from, message)
                        }
                        _ => break,
                    }
                }
                Opened::Handled
            }
        }
    }

    /// The messages to send, to be drained by the worker after each batch.
    pub fn outbox(&mut self) -> &mut Vec<(SocketAddrV4, Vec<u8>)> {
        &mut self.outbox
    }
}

/// The datagrams of a receive (or of a whole batch of receives) opened one after another into
/// an arena, packed: each packet starts where the one opened before it ends. A packet is
/// shorter than its datagram, so an arena as long as everything received holds every packet,
/// and each datagram finds room for its message behind the packets before it. Packets stay
/// where they were opened until the caller is done with them; nothing is moved again.
#[derive(Debug)]
pub struct Opening<'a> {
    opener: &'a mut Opener,
    arena: &'a mut [u8],
    used: usize,
}

impl<'a> Opening<'a> {
    /// Open into `arena`, from its start.
    pub fn new(opener: &'a mut Opener, arena: &'a mut [u8]) -> Self {
        Self {
            opener,
            arena,
            used: 0,
        }
    }

    /// Open `datagram`, received from `from`, behind the packets opened so far: the packet's
    /// offset in the arena and the packet, or (`Err`) the handshake handled or the drop and
    /// its reason, which take no room.
    pub fn open(
        &mut self,
        from: SocketAddrV4,
        datagram: &[u8],
    ) -> Result<(usize, &mut [u8]), Opened> {
        let at = self.used;
        let rest = self.arena.get_mut(at..).unwrap_or_default();
        match self.opener.open(from, datagram, rest) {
            Opened::Packet(len) => {
                self.used += len;
                Ok((at, &mut rest[..len]))
            }
            other => Err(other),
        }
    }

    /// The bytes of the arena the packets opened so far take, from its start.
    pub fn used(&self) -> usize {
        self.used
    }
}

fn push(outbox: &mut Vec<(SocketAddrV4, Vec<u8>)>, to: SocketAddrV4, message: &[u8]) {
    if outbox.len() < OUTBOX_LIMIT {
        outbox.push((to, message.to_vec()));
    }
}

/// What is refused before the tunnel is locked: nothing (an empty datagram would ask the
/// tunnel for its waiting packets), a plaintext IPv4 packet, a header too short for any
/// message.
fn refuse_early(datagram: &[u8]) -> Option<DropReason> {
    match datagram {
        [] => Some(DropReason::Truncated),
        // A WireGuard message starts with a type of 1 to 4 and three zero bytes; an IPv4
        // packet with version 4 and a header length.
        [first, ..] if first >> 4 == 4 => Some(DropReason::Plaintext),
        [kind, 0, 0, 0, ..] if (HANDSHAKE_INIT..=DATA).contains(kind) => None,
        [kind, rest @ ..] if (HANDSHAKE_INIT..=DATA).contains(kind) && rest.len() < 3 => {
            Some(DropReason::Truncated)
        }
        _ => Some(DropReason::BadPacket),
    }
}

/// The counted reason for a message the protocol refused.
fn reason_of(error: &WireGuardError, datagram: &[u8]) -> DropReason {
    match error {
        WireGuardError::InvalidAeadTag => DropReason::Tampered,
        WireGuardError::InvalidCounter
        | WireGuardError::DuplicateCounter
        | WireGuardError::WrongTai64nTimestamp => DropReason::Replayed,
        WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
            if datagram.first() == Some(&DATA) && datagram.len() >= OVERHEAD_MIN {
                DropReason::BadPacket
            } else {
                DropReason::Truncated
            }
        }
        _ => DropReason::UnknownKey,
    }
}

/// The shortest data message: header and tag around nothing (a keepalive).
const OVERHEAD_MIN: usize = crate::crypto::seal::OVERHEAD;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crypto::seal::{sealed_len, Sealer, OVERHEAD};
    use crate::crypto::tunnels::{StaticKeys, Tunnels};
    use crate::wire::ipv4::testing::Spec;
    use std::net::Ipv4Addr;

    pub(crate) const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    pub(crate) const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    /// Room to open any datagram into.
    fn out() -> Vec<u8> {
        vec![0; 1 << 16]
    }

    fn at(ip: Ipv4Addr) -> SocketAddrV4 {
        SocketAddrV4::new(ip, 8285)
    }

    /// Two hosts that know each other's keys.
    pub(crate) fn pair() -> (Tunnels, Tunnels) {
        let a = Tunnels::new(StaticKeys::from_private([0x11; 32]));
        let b = Tunnels::new(StaticKeys::from_private([0x22; 32]));
        a.publish([(B, b.public_key())]);
        b.publish([(A, a.public_key())]);
        (a, b)
    }

    /// Seal `packet` on `from`'s side for `to`.
    pub(crate) fn seal(from: &Tunnels, to: Ipv4Addr, packet: &[u8]) -> Vec<u8> {
        let mut out = vec![0; sealed_len(packet.len())];
        let table = from.snapshot();
        let len = Sealer::seal(&mut table.get(&to).unwrap().lock(), packet, &mut out);
        out.truncate(len);
        out
    }

    /// Deliver the outbox of `opener` (on the host at `from`) to the other side.
    fn deliver(opener: &mut Opener, peer_opener: &mut Opener, from: Ipv4Addr) {
        let messages: Vec<_> = opener.outbox().drain(..).collect();
        for (_, message) in messages {
            peer_opener.open(at(from), &message, &mut out());
        }
    }

    /// Run the handshake: A sends `packet`, which waits; the handshake completes; the
    /// packet is released into A's outbox and opened by B. Returns the openers.
    pub(crate) fn handshake(a: &Tunnels, b: &Tunnels, packet: &[u8]) -> (Opener, Opener) {
        let (mut oa, mut ob) = (Opener::new(a.clone()), Opener::new(b.clone()));
        let init = seal(a, B, packet);
        assert_eq!(init.len(), 148, "no session yet: a handshake initiation");
        assert_eq!(ob.open(at(A), &init, &mut out()), Opened::Handled);
        assert_eq!(ob.outbox().len(), 1, "the handshake response");
        let response = ob.outbox().pop().unwrap().1;
        assert_eq!(oa.open(at(B), &response, &mut out()), Opened::Handled);
        // The keepalive and the packet that waited.
        let sent: Vec<_> = oa.outbox().drain(..).map(|(_, m)| m).collect();
        assert_eq!(sent.len(), 2);
        assert_eq!(ob.open(at(A), &sent[0], &mut out()), Opened::Handled);
        let len = packet.len();
        let mut opened = out();
        assert_eq!(ob.open(at(A), &sent[1], &mut opened), Opened::Packet(len));
        assert_eq!(&opened[..len], packet);
        (oa, ob)
    }

    pub(crate) fn packet(payload: usize) -> Vec<u8> {
        Spec::icmp("10.1.1.2", "10.1.2.2", 8, 28 + payload).bytes()
    }

    #[test]
    fn packets_cross_after_the_handshake_both_ways() {
        let (a, b) = pair();
        let (mut oa, mut ob) = handshake(&a, &b, &packet(100));
        for size in [0, 1, 1000, 1400] {
            let p = packet(size);
            let sealed = seal(&a, B, &p);
            assert_eq!(sealed.len(), p.len() + OVERHEAD);
            let mut opened = out();
            assert_eq!(
                ob.open(at(A), &sealed, &mut opened),
                Opened::Packet(p.len())
            );
            assert_eq!(&opened[..p.len()], &p[..]);
        }
        // B answers: its session is confirmed by A's data.
        let p = packet(64);
        let sealed = seal(&b, A, &p);
        assert_eq!(oa.open(at(B), &sealed, &mut out()), Opened::Packet(p.len()));
        deliver(&mut oa, &mut ob, A);
    }

    #[test]
    fn segments_put_together_inside_the_super_packet_open_to_what_the_segmenter_cuts() {
        use crate::offload::testing::Tcp;
        use crate::offload::Segmenter;
        let (a, b) = pair();
        let (_, mut ob) = handshake(&a, &b, &packet(10));
        // Seven segments, the last one shorter, with TCP options.
        let (header, mut super_packet) = Tcp::new(7, 10_000).super_packet(1448);
        let segmenter = Segmenter::new(&header, &super_packet).unwrap();
        let mut expected = vec![0; 20_000];
        let total = segmenter
            .segment_into(&super_packet, &mut expected)
            .unwrap();
        let mut sealer = Sealer::new(a.clone(), 0);
        let table = a.snapshot();
        let tunnel = table.get(&B).unwrap();
        let mut at_expected = 0;
        for index in 0..segmenter.segments() {
            let len = segmenter.segment_len(index);
            let mut message = vec![0; sealed_len(len)];
            let sealed = sealer.seal_segment(
                &mut tunnel.worker_lane(0),
                &mut super_packet,
                &segmenter,
                index,
                &mut message,
            );
            assert_eq!(sealed, len + OVERHEAD, "segment {index}");
            let mut opened = out();
            assert_eq!(
                ob.open(at(A), &message[..sealed], &mut opened),
                Opened::Packet(len)
            );
            assert_eq!(
                &opened[..len],
                &expected[at_expected..at_expected + len],
                "segment {index} is what the segmenter cuts"
            );
            at_expected += len;
        }
        assert_eq!(at_expected, total);
    }

    #[test]
    fn tampered_replayed_truncated_plaintext_and_strangers_are_counted() {
        let (a, b) = pair();
        let (_, mut ob) = handshake(&a, &b, &packet(10));
        let p = packet(200);
        let sealed = seal(&a, B, &p);

        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            ob.open(at(A), &tampered, &mut out()),
            Opened::Drop(DropReason::Tampered)
        );
        let mut body = sealed.clone();
        body[40] ^= 0x80;
        assert_eq!(
            ob.open(at(A), &body, &mut out()),
            Opened::Drop(DropReason::Tampered)
        );

        let first = sealed.clone();
        assert_eq!(ob.open(at(A), &first, &mut out()), Opened::Packet(p.len()));
        let again = sealed.clone();
        assert_eq!(
            ob.open(at(A), &again, &mut out()),
            Opened::Drop(DropReason::Replayed)
        );

        for cut in [0, 2, 10, 31] {
            let short = sealed[..cut].to_vec();
            assert_eq!(
                ob.open(at(A), &short, &mut out()),
                Opened::Drop(DropReason::Truncated),
                "{cut} bytes"
            );
        }
        let fresh = seal(&a, B, &p);
        let short = fresh[..100].to_vec();
        assert_eq!(
            ob.open(at(A), &short, &mut out()),
            Opened::Drop(DropReason::Tampered),
            "a cut message fails its tag"
        );
        let short_init = vec![1, 0, 0, 0, 9, 9];
        assert_eq!(
            ob.open(at(A), &short_init, &mut out()),
            Opened::Drop(DropReason::Truncated)
        );

        let plain = p.clone();
        assert_eq!(
            ob.open(at(A), &plain, &mut out()),
            Opened::Drop(DropReason::Plaintext)
        );
        assert_eq!(plain, p, "a refused datagram is left alone");

        // A stranger at A's address, with its own key: its handshake fails, its data has
        // no session.
        let stranger = Tunnels::new(StaticKeys::from_private([0x33; 32]));
        stranger.publish([(B, b.public_key())]);
        let init = seal(&stranger, B, &p);
        assert_eq!(
            ob.open(at(A), &init, &mut out()),
            Opened::Drop(DropReason::UnknownKey)
        );
        let mut forged = sealed.clone();
        forged[4..8].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
        assert_eq!(
            ob.open(at(A), &forged, &mut out()),
            Opened::Drop(DropReason::UnknownKey)
        );
        // From an address without a tunnel.
        let other = sealed.clone();
        assert_eq!(
            ob.open(at(Ipv4Addr::new(198, 18, 0, 9)), &other, &mut out()),
            Opened::Drop(DropReason::UnknownPeer)
        );
        assert!(ob.outbox().is_empty());
    }

    #[test]
    fn an_opening_packs_packets_behind_each_other_and_skips_what_does_not_open() {
        let (a, b) = pair();
        let (_, mut ob) = handshake(&a, &b, &packet(10));
        let packets: Vec<Vec<u8>> = [300, 0, 1400].map(packet).into();
        let sealed: Vec<Vec<u8>> = packets.iter().map(|p| seal(&a, B, p)).collect();
        let mut tampered = seal(&a, B, &packets[0]);
        tampered[20] ^= 1;
        let received = [&sealed[0], &tampered, &sealed[1], &sealed[0], &sealed[2]];
        // Room for everything received, as a worker's arena has.
        let mut arena = vec![0; received.iter().map(|d| d.len()).sum()];
        let mut opening = Opening::new(&mut ob, &mut arena);
        let outcomes: Vec<_> = received
            .iter()
            .map(|d| {
                opening
                    .open(at(A), d)
                    .map(|(at, packet)| (at, packet.len()))
            })
            .collect();
        let used = opening.used();
        let (p0, p1, p2) = (packets[0].len(), packets[1].len(), packets[2].len());
        assert_eq!(
            outcomes,
            [
                Ok((0, p0)),
                Err(Opened::Drop(DropReason::Tampered)),
                Ok((p0, p1)),
                Err(Opened::Drop(DropReason::Replayed)),
                Ok((p0 + p1, p2)),
            ]
        );
        assert_eq!(used, p0 + p1 + p2);
        assert_eq!(arena[..used], packets.concat());

        // No room behind the packets for the message: dropped, and it still opens later.
        let fresh = seal(&a, B, &packets[0]);
        let mut small = vec![0; fresh.len() - 1];
        let mut opening = Opening::new(&mut ob, &mut small);
        let outcome = opening.open(at(A), &fresh).map(|(at, p)| (at, p.len()));
        assert_eq!(outcome, Err(Opened::Drop(DropReason::TooBig)));
        assert_eq!(opening.used(), 0);
        let mut room = out();
        assert_eq!(ob.open(at(A), &fresh, &mut room), Opened::Packet(p0));
        assert_eq!(room[..p0], packets[0]);
    }

    #[test]
    fn a_peer_with_a_new_key_is_reached_again() {
        let (a, b) = pair();
        handshake(&a, &b, &packet(10));
        // B restarts with a new key; A learns it from B's record.
        let b2 = Tunnels::new(StaticKeys::from_private([0x44; 32]));
        b2.publish([(A, a.public_key())]);
        a.publish([(B, b2.public_key())]);
        handshake(&a, &b2, &packet(20));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let (a, b) = pair();
        let (_, mut ob) = handshake(&a, &b, &packet(10));
        let mut seed = 0x1234_5678_u32;
        for len in 0..400 {
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            if let Some(first) = bytes.first_mut() {
                *first = (len % 5) as u8;
            }
            if let Some(Opened::Packet(_)) = Some(ob.open(at(A), &bytes, &mut out())) {
                panic!("random bytes opened");
            }
        }
    }
}
