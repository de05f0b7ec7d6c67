//! Opening what a worker receives: a datagram from a peer host is a WireGuard message. Data is
//! authenticated, checked against the session's replay window and decrypted, and the packet
//! put back where the datagram lay, so that the rest of the receive path (the checks of
//! `decide::from_peer`, coalescing) reads it as it reads a plaintext datagram. Handshake
//! messages are answered through the worker's outbox. Everything else is dropped and counted
//! by reason; nothing from the network can make this panic.

use std::net::{IpAddr, SocketAddrV4};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;

use crate::counters::DropReason;
use crate::crypto::tunnels::{lane_offset, PeerTunnel, Tunnels};

/// What became of a received datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// A packet of this many bytes now starts where the datagram started.
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

/// A worker's opening state: the scratch buffer messages are decrypted in, and the messages
/// the protocol wants sent (handshake responses, keepalives, packets that waited for a
/// handshake), which the worker sends after its batch.
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

    /// Open `datagram`, received from `from`, with the tunnel of the peer at that address.
    pub fn open(&mut self, from: SocketAddrV4, datagram: &mut [u8]) -> Opened {
        let table = self.tunnels.snapshot();
        let Some(tunnel) = table.get(from.ip()) else {
            // Either no lease, or a lease whose holder published no key.
            return Opened::Drop(DropReason::UnknownPeer);
        };
        if let Some(reason) = refuse_early(datagram) {
            return Opened::Drop(reason);
        }
        let mut tunn = match tunnel_for(tunnel, datagram) {
            Ok(tunn) => tunn,
            Err(reason) => return Opened::Drop(reason),
        };
        let scratch = &mut self.scratch[..];
        if scratch.len() < datagram.len() {
            return Opened::Drop(DropReason::TooBig);
        }
        match tunn.decapsulate(Some(IpAddr::V4(*from.ip())), datagram, scratch) {
            TunnResult::WriteToTunnelV4(packet, _) => {
                let len = packet.len();
                datagram[..len].copy_from_slice(packet);
                Opened::Packet(len)
            }
            TunnResult::WriteToTunnelV6(..) => Opened::Drop(DropReason::NotIpv4),
            TunnResult::Done => Opened::Handled,
            TunnResult::Err(error) => Opened::Drop(reason_of(&error, datagram)),
            TunnResult::WriteToNetwork(message) => {
                push(&mut self.outbox, from, message);
                // A finished handshake releases the packets that waited for it.
                for _ in 0..OUTBOX_LIMIT {
                    match tunn.decapsulate(None, &[], scratch) {
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
mod tests {
    use super::*;
    use crate::crypto::seal::{sealed_len, Sealer, OVERHEAD};
    use crate::crypto::tunnels::{StaticKeys, Tunnels};
    use crate::wire::ipv4::testing::Spec;
    use std::net::Ipv4Addr;

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    fn at(ip: Ipv4Addr) -> SocketAddrV4 {
        SocketAddrV4::new(ip, 8285)
    }

    /// Two hosts that know each other's keys.
    fn pair() -> (Tunnels, Tunnels) {
        let a = Tunnels::new(StaticKeys::from_private([0x11; 32]));
        let b = Tunnels::new(StaticKeys::from_private([0x22; 32]));
        a.publish([(B, b.public_key())]);
        b.publish([(A, a.public_key())]);
        (a, b)
    }

    /// Seal `packet` on `from`'s side for `to`.
    fn seal(from: &Tunnels, to: Ipv4Addr, packet: &[u8]) -> Vec<u8> {
        let mut out = vec![0; sealed_len(packet.len())];
        let table = from.snapshot();
        let len = Sealer::seal(&mut table.get(&to).unwrap().lock(), packet, &mut out);
        out.truncate(len);
        out
    }

    /// Deliver the outbox of `opener` (on the host at `from`) to the other side.
    fn deliver(opener: &mut Opener, peer_opener: &mut Opener, from: Ipv4Addr) {
        let messages: Vec<_> = opener.outbox().drain(..).collect();
        for (_, mut message) in messages {
            peer_opener.open(at(from), &mut message);
        }
    }

    /// Run the handshake: A sends `packet`, which waits; the handshake completes; the
    /// packet is released into A's outbox and opened by B. Returns the openers.
    fn handshake(a: &Tunnels, b: &Tunnels, packet: &[u8]) -> (Opener, Opener) {
        let (mut oa, mut ob) = (Opener::new(a.clone()), Opener::new(b.clone()));
        let mut init = seal(a, B, packet);
        assert_eq!(init.len(), 148, "no session yet: a handshake initiation");
        assert_eq!(ob.open(at(A), &mut init), Opened::Handled);
        assert_eq!(ob.outbox().len(), 1, "the handshake response");
        let mut response = ob.outbox().pop().unwrap().1;
        assert_eq!(oa.open(at(B), &mut response), Opened::Handled);
        // The keepalive and the packet that waited.
        let mut out: Vec<_> = oa.outbox().drain(..).map(|(_, m)| m).collect();
        assert_eq!(out.len(), 2);
        assert_eq!(ob.open(at(A), &mut out[0]), Opened::Handled);
        let len = packet.len();
        assert_eq!(ob.open(at(A), &mut out[1]), Opened::Packet(len));
        assert_eq!(&out[1][..len], packet);
        (oa, ob)
    }

    fn packet(payload: usize) -> Vec<u8> {
        Spec::icmp("10.1.1.2", "10.1.2.2", 8, 28 + payload).bytes()
    }

    #[test]
    fn packets_cross_after_the_handshake_both_ways() {
        let (a, b) = pair();
        let (mut oa, mut ob) = handshake(&a, &b, &packet(100));
        for size in [0, 1, 1000, 1400] {
            let p = packet(size);
            let mut sealed = seal(&a, B, &p);
            assert_eq!(sealed.len(), p.len() + OVERHEAD);
            assert_eq!(ob.open(at(A), &mut sealed), Opened::Packet(p.len()));
            assert_eq!(&sealed[..p.len()], &p[..]);
        }
        // B answers: its session is confirmed by A's data.
        let p = packet(64);
        let mut sealed = seal(&b, A, &p);
        assert_eq!(oa.open(at(B), &mut sealed), Opened::Packet(p.len()));
        deliver(&mut oa, &mut ob, A);
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
            ob.open(at(A), &mut tampered),
            Opened::Drop(DropReason::Tampered)
        );
        let mut body = sealed.clone();
        body[40] ^= 0x80;
        assert_eq!(
            ob.open(at(A), &mut body),
            Opened::Drop(DropReason::Tampered)
        );

        let mut first = sealed.clone();
        assert_eq!(ob.open(at(A), &mut first), Opened::Packet(p.len()));
        let mut again = sealed.clone();
        assert_eq!(
            ob.open(at(A), &mut again),
            Opened::Drop(DropReason::Replayed)
        );

        for cut in [0, 2, 10, 31] {
            let mut short = sealed[..cut].to_vec();
            assert_eq!(
                ob.open(at(A), &mut short),
                Opened::Drop(DropReason::Truncated),
                "{cut} bytes"
            );
        }
        let fresh = seal(&a, B, &p);
        let mut short = fresh[..100].to_vec();
        assert_eq!(
            ob.open(at(A), &mut short),
            Opened::Drop(DropReason::Tampered),
            "a cut message fails its tag"
        );
        let mut short_init = vec![1, 0, 0, 0, 9, 9];
        assert_eq!(
            ob.open(at(A), &mut short_init),
            Opened::Drop(DropReason::Truncated)
        );

        let mut plain = p.clone();
        assert_eq!(
            ob.open(at(A), &mut plain),
            Opened::Drop(DropReason::Plaintext)
        );
        assert_eq!(plain, p, "a refused datagram is left alone");

        // A stranger at A's address, with its own key: its handshake fails, its data has
        // no session.
        let stranger = Tunnels::new(StaticKeys::from_private([0x33; 32]));
        stranger.publish([(B, b.public_key())]);
        let mut init = seal(&stranger, B, &p);
        assert_eq!(
            ob.open(at(A), &mut init),
            Opened::Drop(DropReason::UnknownKey)
        );
        let mut forged = sealed.clone();
        forged[4..8].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
        assert_eq!(
            ob.open(at(A), &mut forged),
            Opened::Drop(DropReason::UnknownKey)
        );
        // From an address without a tunnel.
        let mut other = sealed.clone();
        assert_eq!(
            ob.open(at(Ipv4Addr::new(198, 18, 0, 9)), &mut other),
            Opened::Drop(DropReason::UnknownPeer)
        );
        assert!(ob.outbox().is_empty());
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
            if let Some(Opened::Packet(_)) = Some(ob.open(at(A), &mut bytes)) {
                panic!("random bytes opened");
            }
        }
    }
}
