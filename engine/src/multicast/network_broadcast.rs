//! UDP to the overlay Network's broadcast address (10.1.255.255 for Network 10.1.0.0/16),
//! carried to the containers of every broadcast-capable weft host.
//!
//! A container does not know that address as a broadcast: to it, it is an overlay address
//! like any other, so the packet goes to its gateway, and the host routes it into the TUN (it
//! lies inside the Network). There a worker recognises it ([`is_carried`]) and hands it to
//! the relay thread instead of routing it; the relay rewrites its destination to the limited
//! broadcast 255.255.255.255 ([`to_limited_broadcast`]) and treats it like a limited
//! broadcast a local container sent: one copy to each broadcast-capable peer, within the rate
//! limit, and one frame into this host's TAP for its other containers.
//!
//! Why 255.255.255.255: on every container's link it is a broadcast, whatever the
//! container's address and mask, so a socket bound to 0.0.0.0 receives it (with or without
//! `SO_BROADCAST`, which only matters for sending), and the Network's broadcast address
//! itself is a broadcast on nobody's link: a container receiving a frame to it would drop
//! it. Rewriting once at the sender also means the receivers see what they already
//! deliver, and that a host holding the Network's last subnet (to which the address also
//! belongs) is not special.

use std::net::Ipv4Addr;

use crate::counters::DropReason;
use crate::offload::{complete_checksum, Plan};
use crate::route::RouteTable;
use crate::wire::ipv4::{checksum, protocol, Ipv4Packet};
use crate::wire::udp;

/// Offset of the destination address in the IPv4 header.
const DST: usize = 16;
/// Offset of the IPv4 header checksum.
const IP_CHECKSUM: usize = 10;

/// Where the relay thread gets what a worker hands it from the TUN.
pub trait BroadcastSink {
    /// Take a copy of `packet`, a UDP packet to the Network's broadcast address.
    fn hand_off(&self, packet: &[u8]);
}

/// Whether a packet read from the TUN is UDP to the Network's broadcast address: what a host
/// with broadcast on carries instead of routing. Anything else to that address (ICMP, TCP)
/// is routed as without broadcast.
#[inline]
pub fn is_carried<T: AsRef<[u8]>>(ip: &Ipv4Packet<T>, routes: &RouteTable) -> bool {
    ip.dst() == routes.overlay().network().broadcast() && ip.protocol() == protocol::UDP
}

/// Hand a packet [`is_carried`] accepted to `sink`, its checksum completed first if the TUN
/// left it partial (`offload`); the reason to drop it if that fails. A super-packet is handed
/// over whole: the relay refuses it as longer than the MTU.
pub fn hand_off(
    packet: &mut [u8],
    offload: &Plan,
    sink: &dyn BroadcastSink,
) -> Result<(), DropReason> {
    if let Plan::Checksum { start, field } = *offload {
        complete_checksum(packet, start, field).map_err(|error| error.drop_reason())?;
    }
    sink.hand_off(packet);
    Ok(())
}

/// Why a packet could not be rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// Not a well-formed IPv4 packet.
    #[error("not a well-formed IPv4 packet")]
    Malformed,
    /// Not UDP.
    #[error("not UDP")]
    NotUdp,
    /// A first fragment too short to hold the UDP header.
    #[error("the UDP header is cut short")]
    ShortUdp,
}

/// Rewrite the destination of the UDP packet `packet` to 255.255.255.255, patching the IPv4
/// header checksum and the UDP checksum (which covers the destination through the pseudo
/// header) incrementally (RFC 1624). A UDP checksum of 0 (none) stays 0; a fragment after
/// the first carries no UDP header, so only its IPv4 header changes (the receiver checks the
/// first fragment's checksum against the reassembled datagram, whose fragments all say
/// 255.255.255.255). The TTL is not touched. On error the packet is unchanged.
pub fn to_limited_broadcast(packet: &mut [u8]) -> Result<(), RewriteError> {
    let ip = Ipv4Packet::new_checked(&*packet).map_err(|_| RewriteError::Malformed)?;
    if ip.protocol() != protocol::UDP {
        return Err(RewriteError::NotUdp);
    }
    let header_len = ip.header_len();
    let first_fragment = ip.frag_offset() == 0;
    let old = ip.dst().octets();
    let new = Ipv4Addr::BROADCAST.octets();
    let udp_checksum_at = header_len + udp::CHECKSUM;
    if first_fragment && packet.len() < header_len + udp::HEADER_LEN {
        return Err(RewriteError::ShortUdp);
    }
    let patch = |check: u16| {
        let high = checksum::update(check, be16(&old[..2]), be16(&new[..2]));
        checksum::update(high, be16(&old[2..]), be16(&new[2..]))
    };
    let ip_check = patch(be16(&packet[IP_CHECKSUM..IP_CHECKSUM + 2]));
    packet[IP_CHECKSUM..IP_CHECKSUM + 2].copy_from_slice(&ip_check.to_be_bytes());
    if first_fragment {
        let field = udp_checksum_at..udp_checksum_at + 2;
        let udp_check = be16(&packet[field.clone()]);
        if udp_check != 0 {
            // A sum that comes out as zero is sent as all ones: zero means "no checksum".
            let patched = match patch(udp_check) {
                0 => 0xffff,
                check => check,
            };
            packet[field].copy_from_slice(&patched.to_be_bytes());
        }
    }
    packet[DST..DST + 4].copy_from_slice(&new);
    Ok(())
}

fn be16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

#[cfg(test)]
mod tests {
    use etherparse::{Ipv4Header, PacketBuilder, UdpHeader};

    use super::*;
    use crate::multicast::relay::tests::routes;

    const NETWORK_BROADCAST: [u8; 4] = [10, 1, 255, 255];

    fn udp_packet(dst: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ipv4([10, 1, 1, 5], dst, ttl).udp(40000, 5001);
        let mut packet = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut packet, payload).unwrap();
        packet
    }

    /// Recompute the IPv4 header checksum after a test edited the header.
    fn refresh(packet: &mut [u8]) {
        packet[10..12].copy_from_slice(&[0, 0]);
        let check = checksum::of(&packet[..20]);
        packet[10..12].copy_from_slice(&check.to_be_bytes());
    }

    /// The IPv4 header checksum and the UDP checksum computed from scratch by etherparse,
    /// and the ones in the packet.
    fn checksums(packet: &[u8]) -> ((u16, u16), (u16, u16)) {
        let (ip, rest) = Ipv4Header::from_slice(packet).unwrap();
        let (udp, payload) = UdpHeader::from_slice(rest).unwrap();
        let udp_expected = udp.calc_checksum_ipv4(&ip, payload).unwrap();
        (
            (ip.header_checksum, ip.calc_header_checksum()),
            (udp.checksum, udp_expected),
        )
    }

    #[test]
    fn the_rewrite_keeps_both_checksums_right() {
        // Payloads that put the sums at every kind of value, odd lengths included.
        for (i, len) in [0usize, 1, 7, 8, 100, 1443].into_iter().enumerate() {
            for ttl in [1, 64, 255] {
                let payload: Vec<u8> = (0..len).map(|b| (b * 31 + i * 7) as u8).collect();
                let mut packet = udp_packet(NETWORK_BROADCAST, ttl, &payload);
                let before = packet.clone();
                to_limited_broadcast(&mut packet).unwrap();
                assert_eq!(&packet[16..20], &[255; 4]);
                let ((ip_sum, ip_expected), (udp_sum, udp_expected)) = checksums(&packet);
                assert_eq!(ip_sum, ip_expected, "IPv4 header checksum, {len} bytes");
                assert_eq!(udp_sum, udp_expected, "UDP checksum, {len} bytes");
                // Nothing else changed: not the TTL, not the payload.
                assert_eq!(packet[..10], before[..10]);
                assert_eq!(packet[12..16], before[12..16]);
                assert_eq!(packet[20..26], before[20..26]);
                assert_eq!(packet[28..], before[28..]);
            }
        }
    }

    #[test]
    fn a_udp_checksum_that_comes_out_zero_is_sent_as_all_ones() {
        // Search for a payload whose rewritten UDP checksum is 0x0000 when summed from
        // scratch: etherparse (like the kernel) transmits it as 0xffff.
        let found = (0u16..=u16::MAX).find_map(|word| {
            let mut packet = udp_packet(NETWORK_BROADCAST, 64, &word.to_be_bytes());
            to_limited_broadcast(&mut packet).ok()?;
            let (_, (sum, expected)) = checksums(&packet);
            assert_eq!(sum, expected, "payload {word:#06x}");
            (sum == 0xffff).then_some(word)
        });
        assert!(found.is_some(), "no payload hit the all-ones case");
    }

    #[test]
    fn no_udp_checksum_stays_none_and_later_fragments_change_only_their_header() {
        let mut packet = udp_packet(NETWORK_BROADCAST, 64, b"no checksum");
        packet[26..28].copy_from_slice(&[0, 0]);
        refresh(&mut packet);
        to_limited_broadcast(&mut packet).unwrap();
        assert_eq!(&packet[26..28], &[0, 0]);
        let ((ip_sum, ip_expected), _) = checksums(&packet);
        assert_eq!(ip_sum, ip_expected);

        // A later fragment: its first payload bytes are data, not a UDP header.
        let mut fragment = udp_packet(NETWORK_BROADCAST, 64, &[0xab; 40]);
        fragment[6..8].copy_from_slice(&185u16.to_be_bytes());
        refresh(&mut fragment);
        let before = fragment.clone();
        to_limited_broadcast(&mut fragment).unwrap();
        assert_eq!(fragment[20..], before[20..], "the data is untouched");
        let (header, _) = Ipv4Header::from_slice(&fragment).unwrap();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        assert_eq!(header.destination, [255; 4]);
    }

    #[test]
    fn what_cannot_be_rewritten_is_left_alone() {
        let udp = udp_packet(NETWORK_BROADCAST, 64, b"x");
        let mut icmp = udp.clone();
        icmp[9] = 1;
        refresh(&mut icmp);
        let mut short = udp[..24].to_vec();
        short[3] = 24;
        refresh(&mut short);
        let mut bad = udp.clone();
        bad[10] ^= 1;
        for (mut packet, error) in [
            (icmp, RewriteError::NotUdp),
            (short, RewriteError::ShortUdp),
            (bad, RewriteError::Malformed),
        ] {
            let before = packet.clone();
            assert_eq!(to_limited_broadcast(&mut packet), Err(error));
            assert_eq!(packet, before);
        }
    }

    #[test]
    fn only_udp_to_the_networks_broadcast_address_is_carried() {
        let routes = routes();
        let carried =
            |packet: &[u8]| is_carried(&Ipv4Packet::new_checked(packet).unwrap(), &routes);
        assert!(carried(&udp_packet(NETWORK_BROADCAST, 64, b"x")));
        for dst in [
            [10, 1, 2, 255],
            [10, 1, 255, 254],
            [10, 2, 255, 255],
            [255, 255, 255, 255],
        ] {
            assert!(!carried(&udp_packet(dst, 64, b"x")), "{dst:?}");
        }
        let mut icmp = udp_packet(NETWORK_BROADCAST, 64, b"x");
        icmp[9] = 1;
        refresh(&mut icmp);
        assert!(!carried(&icmp));
    }
}
