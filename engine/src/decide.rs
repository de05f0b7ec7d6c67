//! What to do with each packet, decided by pure functions over caller-owned buffers.
//!
//! The I/O loops never look inside a packet: they hand each one to [`from_tun`] or
//! [`from_peer`] with the batch's route-table snapshot and execute the [`TunDecision`] or [`PeerDecision`] that comes
//! back. Header edits (the TTL) happen in place; ICMP errors are written into a caller-owned
//! reply buffer of at least [`REPLY_BUF_LEN`] bytes.
//!
//! Each function validates the packet once (lengths and one header checksum), reads the fields
//! it needs straight from the buffer and edits the TTL in place; the checks run
//! in a fixed order, so a packet with several faults is always counted under the first:
//!
//! From the TUN ([`from_tun`]):
//! 1. IPv6 → `NotIpv4`; malformed → `BadPacket`;
//! 2. destination in 224/4 or 255.255.255.255 → `Multicast`;
//! 3. destination in this host's own subnet → `Loop`;
//! 4. no lease holds the destination → `NoRoute`, with ICMP net unreachable;
//! 5. TTL ≤ 1 → `TtlExpired`, with ICMP time exceeded;
//! 6. longer than the TUN MTU and DF set → `TooBig`, with ICMP fragmentation needed (for a
//!    super-packet, [`from_tun_super_packet`], the longest of its segments counts);
//! 7. otherwise the TTL drops by one and the packet goes to the peer.
//!
//! From a peer ([`from_peer`]):
//! 1. the sender is not a current lease's address and port → `UnknownPeer`;
//! 2. IPv6 → `NotIpv4`; malformed → `BadPacket`;
//! 3. longer than the TUN MTU → `TooBig` (never truncated);
//! 4. destination outside this host's subnet, or the host holds none → `NotOurs`;
//! 5. source in the Network but not in a subnet leased to the sender → `SpoofedSource`;
//!    source outside the Network unless [`Policy::allow_foreign_sources`] → `ForeignSource`;
//! 6. TTL ≤ 1 → `TtlExpired`, with ICMP time exceeded sent back to the sender;
//! 7. otherwise the TTL drops by one and the packet is written to the TUN.
//!
//! From the TUN the order is a router's (Linux `ip_forward`): the route decides the next hop,
//! then the hop costs a TTL, then the next hop's MTU applies — a sender never shrinks its
//! packets only to learn the destination is unreachable. From a peer the sender comes first:
//! strangers' traffic is counted as `unknown_peer` whatever its shape, so `bad_packet`,
//! `spoofed_source` and the rest point at a lease holder misbehaving. (The parser still runs
//! first, as proving a sender's lease is cheapest through the inner source; see
//! [`from_peer`].) A packet longer than the TUN MTU without DF is still sent:
//! the UDP socket fragments the datagram on the underlay.
//!
//! ICMP errors follow [`icmp::may_report`]; where the rules forbid one, the packet is dropped
//! under the same reason without a reply.

use std::net::SocketAddrV4;

use crate::counters::DropReason;
use crate::route::RouteTable;
use crate::wire::icmp::{self, IcmpError};
use crate::wire::ipv4::{Ipv4Packet, PacketError};

/// The smallest reply buffer the decision functions accept.
pub const REPLY_BUF_LEN: usize = 576;

/// What to do with a packet read from the TUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunDecision {
    /// Send the (edited) packet as one datagram to this peer.
    SendToPeer(SocketAddrV4),
    /// Drop the packet for `reason` and write the `len`-byte ICMP error in the reply buffer
    /// to the TUN.
    ReplyToTun {
        /// Length of the ICMP packet in the reply buffer.
        len: usize,
        /// Why the original packet was dropped.
        reason: DropReason,
    },
    /// Drop the packet and count it.
    Drop(DropReason),
}

/// What to do with a datagram received from a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerDecision {
    /// Write the (edited) packet to the TUN.
    WriteToTun,
    /// Drop the packet for `reason` and send the `len`-byte ICMP error in the reply buffer to
    /// the peer `to` (whose container sent the packet).
    ReplyToPeer {
        /// The peer that sent the packet.
        to: SocketAddrV4,
        /// Length of the ICMP packet in the reply buffer.
        len: usize,
        /// Why the original packet was dropped.
        reason: DropReason,
    },
    /// Drop the packet and count it.
    Drop(DropReason),
}

/// The rules that do not change per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The TUN's MTU: the largest inner packet carried, and the path MTU told to senders.
    pub tun_mtu: usize,
    /// Accept inner sources outside the whole Network (a peer forwarding traffic from beyond
    /// the overlay). Off by default.
    pub allow_foreign_sources: bool,
}

/// Decide the fate of a packet read from the TUN, lowering its TTL in place when it is sent.
///
/// `packet` is exactly one IPv4 packet as the TUN returned it (a super-packet read with a
/// segmentation-offload header goes to [`from_tun_super_packet`] instead). An ICMP error goes into `reply`, which should
/// hold [`REPLY_BUF_LEN`] bytes; a shorter one may turn a reply into a plain drop.
pub fn from_tun(
    packet: &mut [u8],
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> TunDecision {
    from_tun_sized(packet, None, routes, policy, reply)
}

/// Decide the fate of a super-packet read from the TUN with a segmentation-offload header,
/// once for all the segments it becomes: they share its destination and TTL, so only the
/// size rule differs, and it applies to `largest`, the length of the longest segment (see
/// [`crate::offload::Plan::largest_packet`]), not to the super-packet.
///
/// On [`TunDecision::SendToPeer`] the TTL is lowered in the super-packet's header, from which
/// every segment's header is then copied. An ICMP error quotes the super-packet's header.
pub fn from_tun_super_packet(
    packet: &mut [u8],
    largest: usize,
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> TunDecision {
    from_tun_sized(packet, Some(largest), routes, policy, reply)
}

#[inline(always)]
fn from_tun_sized(
    packet: &mut [u8],
    largest: Option<usize>,
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> TunDecision {
    match Ipv4Packet::new_checked(packet) {
        Ok(mut ip) => from_tun_checked(&mut ip, largest, routes, policy, reply),
        Err(error) => TunDecision::Drop(malformed(error)),
    }
}

/// Decide the fate of a packet read from the TUN that the caller has already checked, so that
/// it is parsed once: as [`from_tun`], or with `largest` as [`from_tun_super_packet`].
#[inline(always)]
pub fn from_tun_checked(
    ip: &mut Ipv4Packet<&mut [u8]>,
    largest: Option<usize>,
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> TunDecision {
    let dst = ip.dst();
    if dst.is_multicast() || dst.is_broadcast() {
        return TunDecision::Drop(DropReason::Multicast);
    }
    if routes.is_local(dst) {
        return TunDecision::Drop(DropReason::Loop);
    }
    let Some(peer) = routes.peer_for(dst) else {
        return reply_to_tun(IcmpError::NetUnreachable, DropReason::NoRoute, ip, reply);
    };
    if ip.ttl() <= 1 {
        return reply_to_tun(IcmpError::TimeExceeded, DropReason::TtlExpired, ip, reply);
    }
    if largest.unwrap_or_else(|| ip.total_len()) > policy.tun_mtu && ip.dont_frag() {
        let mtu = u16::try_from(policy.tun_mtu).unwrap_or(u16::MAX);
        let error = IcmpError::FragmentationNeeded { mtu };
        return reply_to_tun(error, DropReason::TooBig, ip, reply);
    }
    ip.decrement_ttl();
    TunDecision::SendToPeer(peer)
}

/// Decide the fate of a datagram received from `from`, lowering its TTL in place when it is
/// written to the TUN.
///
/// `packet` is the whole UDP payload. A time-exceeded error goes into `reply`, which should
/// hold [`REPLY_BUF_LEN`] bytes; a shorter one may turn a reply into a plain drop.
///
/// A datagram from a sender that holds no lease is always dropped as
/// [`DropReason::UnknownPeer`], whatever it holds. The packet is parsed before that is known:
/// for overlay traffic the lease is proven by the inner source's slot in O(1), and the search
/// of the whole peer set runs only for refusals and for sources outside the Network.
pub fn from_peer(
    from: SocketAddrV4,
    packet: &mut [u8],
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> PeerDecision {
    // The sender is the first check in the documented order, but the search of the peer set
    // is deferred: on the common path `sender_owns` proves the sender holds a lease in O(1)
    // (a subnet's holder is always in the peer set), and every refusal asks `is_peer` first.
    match Ipv4Packet::new_checked(packet) {
        Ok(mut ip) => from_peer_checked(from, &mut ip, routes, policy, reply),
        Err(error) => from_peer_malformed(from, routes, error),
    }
}

/// Decide the fate of a datagram from `from` that the caller has already checked, so that it
/// is parsed once (see [`from_peer`]).
#[inline(always)]
pub fn from_peer_checked(
    from: SocketAddrV4,
    ip: &mut Ipv4Packet<&mut [u8]>,
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> PeerDecision {
    if ip.total_len() > policy.tun_mtu {
        return refuse(from, routes, DropReason::TooBig);
    }
    if !routes.is_local(ip.dst()) {
        return refuse(from, routes, DropReason::NotOurs);
    }
    let src = ip.src();
    if routes.overlay().contains(src) {
        if !routes.sender_owns(from, src) {
            return refuse(from, routes, DropReason::SpoofedSource);
        }
    } else if !policy.allow_foreign_sources || !routes.is_peer(from) {
        return refuse(from, routes, DropReason::ForeignSource);
    }
    if ip.ttl() <= 1 {
        return reply_to_peer(from, ip, routes, reply);
    }
    ip.decrement_ttl();
    PeerDecision::WriteToTun
}

/// The decision on a datagram from `from` that is not a well-formed IPv4 packet.
#[cold]
pub fn from_peer_malformed(
    from: SocketAddrV4,
    routes: &RouteTable,
    error: PacketError,
) -> PeerDecision {
    refuse(from, routes, malformed(error))
}

/// Drop a datagram for `reason`, unless its sender holds no lease: that comes first.
#[cold]
#[inline(never)]
fn refuse(from: SocketAddrV4, routes: &RouteTable, reason: DropReason) -> PeerDecision {
    if routes.is_peer(from) {
        PeerDecision::Drop(reason)
    } else {
        PeerDecision::Drop(DropReason::UnknownPeer)
    }
}

/// The drop reason for a buffer that failed to parse.
pub fn malformed(error: PacketError) -> DropReason {
    match error {
        PacketError::NotIpv4 { version: 6 } => DropReason::NotIpv4,
        _ => DropReason::BadPacket,
    }
}

#[cold]
#[inline(never)]
fn reply_to_tun(
    error: IcmpError,
    reason: DropReason,
    offending: &Ipv4Packet<&mut [u8]>,
    reply: &mut [u8],
) -> TunDecision {
    // An error written to the TUN must not come from the TUN's own address: the host would
    // take a packet arriving with one of its own addresses as source for a martian and drop
    // it. The offending packet's destination answers instead (as flanneld does), which also
    // passes reverse-path filtering, since that destination is routed through the TUN.
    match icmp::write_error(error, offending, None, reply) {
        Some(len) => TunDecision::ReplyToTun { len, reason },
        None => TunDecision::Drop(reason),
    }
}

#[cold]
#[inline(never)]
fn reply_to_peer(
    to: SocketAddrV4,
    offending: &Ipv4Packet<&mut [u8]>,
    routes: &RouteTable,
    reply: &mut [u8],
) -> PeerDecision {
    let reason = DropReason::TtlExpired;
    let router = routes.local_subnet().map(|subnet| subnet.network());
    match icmp::write_error(IcmpError::TimeExceeded, offending, router, reply) {
        Some(len) => PeerDecision::ReplyToPeer { to, len, reason },
        None => PeerDecision::Drop(reason),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::route::Overlay;
    use crate::wire::ipv4::testing::{random_packet, Rng, Spec};
    use etherparse::{
        icmpv4::{DestUnreachableHeader, TimeExceededCode},
        Icmpv4Slice, Icmpv4Type, Ipv4HeaderSlice,
    };

    const PORT: u16 = 8285;
    const MTU: usize = 1472;
    const POLICY: Policy = Policy {
        tun_mtu: MTU,
        allow_foreign_sources: false,
    };

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn peer(s: &str) -> SocketAddrV4 {
        SocketAddrV4::new(ip(s), PORT)
    }

    /// This host holds 10.1.15.0/24; 198.18.0.2 holds two subnets; the Network's first and
    /// last subnets are leased too, to test the edges.
    fn table() -> RouteTable {
        let overlay = Overlay::new("10.1.0.0/16".parse().unwrap(), 24).unwrap();
        RouteTable::build(
            overlay,
            PORT,
            Some("10.1.15.0/24".parse().unwrap()),
            [
                ("10.1.81.0/24".parse().unwrap(), ip("198.18.0.2")),
                ("10.1.82.0/24".parse().unwrap(), ip("198.18.0.2")),
                ("10.1.255.0/24".parse().unwrap(), ip("198.18.0.3")),
                ("10.1.0.0/24".parse().unwrap(), ip("198.18.0.4")),
            ],
        )
        .unwrap()
    }

    fn table_without_lease() -> RouteTable {
        let overlay = Overlay::new("10.1.0.0/16".parse().unwrap(), 24).unwrap();
        RouteTable::build(
            overlay,
            PORT,
            None,
            [("10.1.81.0/24".parse().unwrap(), ip("198.18.0.2"))],
        )
        .unwrap()
    }

    /// Either direction's decision, so that expectations read alike in both.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Decision {
        SendToPeer(SocketAddrV4),
        WriteToTun,
        ReplyToTun {
            len: usize,
            reason: DropReason,
        },
        ReplyToPeer {
            to: SocketAddrV4,
            len: usize,
            reason: DropReason,
        },
        Drop(DropReason),
    }

    impl From<TunDecision> for Decision {
        fn from(decision: TunDecision) -> Self {
            match decision {
                TunDecision::SendToPeer(to) => Decision::SendToPeer(to),
                TunDecision::ReplyToTun { len, reason } => Decision::ReplyToTun { len, reason },
                TunDecision::Drop(reason) => Decision::Drop(reason),
            }
        }
    }

    impl From<PeerDecision> for Decision {
        fn from(decision: PeerDecision) -> Self {
            match decision {
                PeerDecision::WriteToTun => Decision::WriteToTun,
                PeerDecision::ReplyToPeer { to, len, reason } => {
                    Decision::ReplyToPeer { to, len, reason }
                }
                PeerDecision::Drop(reason) => Decision::Drop(reason),
            }
        }
    }

    struct Outcome {
        decision: Decision,
        packet: Vec<u8>,
        reply: Vec<u8>,
    }

    impl Outcome {
        /// The reply the decision points at, checked by etherparse.
        fn icmp(&self) -> (Ipv4HeaderSlice<'_>, Icmpv4Type, &[u8]) {
            let len = match self.decision {
                Decision::ReplyToTun { len, .. } | Decision::ReplyToPeer { len, .. } => len,
                other => panic!("no reply in {other:?}"),
            };
            let reply = &self.reply[..len];
            let header = Ipv4HeaderSlice::from_slice(reply).unwrap();
            assert_eq!(
                header.to_header().calc_header_checksum(),
                header.header_checksum()
            );
            assert_eq!(usize::from(header.total_len()), len);
            let icmp = Icmpv4Slice::from_slice(&reply[20..]).unwrap();
            assert_eq!(
                icmp.icmp_type().calc_checksum(icmp.payload()),
                icmp.checksum()
            );
            (header, icmp.icmp_type(), icmp.payload())
        }
    }

    fn tun_with(bytes: &[u8], routes: &RouteTable, policy: &Policy) -> Outcome {
        let mut packet = bytes.to_vec();
        let mut reply = vec![0u8; REPLY_BUF_LEN];
        let decision = from_tun(&mut packet, routes, policy, &mut reply).into();
        Outcome {
            decision,
            packet,
            reply,
        }
    }

    fn tun(bytes: &[u8]) -> Outcome {
        tun_with(bytes, &table(), &POLICY)
    }

    fn from_with(
        from: SocketAddrV4,
        bytes: &[u8],
        routes: &RouteTable,
        policy: &Policy,
    ) -> Outcome {
        let mut packet = bytes.to_vec();
        let mut reply = vec![0u8; REPLY_BUF_LEN];
        let decision = from_peer(from, &mut packet, routes, policy, &mut reply).into();
        Outcome {
            decision,
            packet,
            reply,
        }
    }

    fn from(from: &str, bytes: &[u8]) -> Outcome {
        from_with(peer(from), bytes, &table(), &POLICY)
    }

    /// `after` is `before` with the TTL one lower and a correct checksum, nothing else changed.
    fn assert_forwarded(before: &[u8], after: &[u8]) {
        assert_eq!(after.len(), before.len());
        assert_eq!(after[8], before[8] - 1);
        let header = Ipv4HeaderSlice::from_slice(after).unwrap();
        assert_eq!(
            header.to_header().calc_header_checksum(),
            header.header_checksum()
        );
        let mut expected = before.to_vec();
        expected[8] -= 1;
        expected[10..12].copy_from_slice(&after[10..12]);
        assert_eq!(after, &expected[..]);
    }

    // ---- from the TUN ----

    #[test]
    fn tun_packets_go_to_the_peer_holding_the_destination() {
        let cases = [
            ("10.1.81.7", "198.18.0.2"),
            ("10.1.82.255", "198.18.0.2"),
            ("10.1.255.255", "198.18.0.3"),
            ("10.1.255.0", "198.18.0.3"),
            ("10.1.0.0", "198.18.0.4"),
            ("10.1.0.1", "198.18.0.4"),
        ];
        for (dst, expected) in cases {
            let bytes = Spec::udp("10.1.15.3", dst, 1400).bytes();
            let out = tun(&bytes);
            assert_eq!(
                out.decision,
                Decision::SendToPeer(peer(expected)),
                "dst {dst}"
            );
            assert_forwarded(&bytes, &out.packet);
        }
    }

    #[test]
    fn tun_rejects_what_is_not_an_ipv4_packet() {
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        assert_eq!(tun(&v6).decision, Decision::Drop(DropReason::NotIpv4));
        assert_eq!(tun(&[0x60]).decision, Decision::Drop(DropReason::BadPacket));
        assert_eq!(tun(&[]).decision, Decision::Drop(DropReason::BadPacket));
        let good = Spec::udp("10.1.15.3", "10.1.81.7", 100).bytes();
        let mut bad_sum = good.clone();
        bad_sum[12] ^= 1;
        let mut long = good.clone();
        long.push(0);
        for bytes in [&good[..99], &long[..], &bad_sum[..], &good[..19]] {
            let out = tun(bytes);
            assert_eq!(out.decision, Decision::Drop(DropReason::BadPacket));
            assert_eq!(out.packet, bytes, "dropped packets are not edited");
        }
    }

    #[test]
    fn tun_drops_multicast_and_broadcast() {
        for dst in [
            "224.0.0.1",
            "224.0.0.251",
            "239.255.255.250",
            "255.255.255.255",
        ] {
            let bytes = Spec::udp("10.1.15.3", dst, 100).bytes();
            assert_eq!(
                tun(&bytes).decision,
                Decision::Drop(DropReason::Multicast),
                "{dst}"
            );
        }
    }

    #[test]
    fn tun_drops_packets_for_its_own_subnet() {
        for dst in ["10.1.15.0", "10.1.15.7", "10.1.15.255"] {
            let bytes = Spec::udp("10.1.15.3", dst, 100).bytes();
            assert_eq!(
                tun(&bytes).decision,
                Decision::Drop(DropReason::Loop),
                "{dst}"
            );
        }
    }

    #[test]
    fn tun_answers_unrouted_destinations_with_net_unreachable() {
        for dst in [
            "10.1.99.1",
            "10.1.80.255",
            "10.1.83.0",
            "10.0.255.255",
            "10.2.0.0",
            "8.8.8.8",
        ] {
            let bytes = Spec::udp("10.1.15.3", dst, 1400).bytes();
            let out = tun(&bytes);
            assert!(
                matches!(
                    out.decision,
                    Decision::ReplyToTun {
                        len: 576,
                        reason: DropReason::NoRoute
                    }
                ),
                "{dst}: {:?}",
                out.decision
            );
            let (header, icmp_type, quote) = out.icmp();
            assert_eq!(
                icmp_type,
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Network)
            );
            // Not the TUN's own address, which the host would drop as a martian source.
            assert_eq!(header.source_addr(), ip(dst));
            assert_eq!(header.destination_addr(), ip("10.1.15.3"));
            assert_eq!(quote, &bytes[..548]);
            assert_eq!(out.packet, bytes);
        }
    }

    #[test]
    fn tun_stays_silent_where_icmp_rules_forbid_an_error() {
        let mut fragment = Spec::udp("10.1.15.3", "10.1.99.1", 100);
        fragment.frag_units = 20;
        let icmp_error = Spec::icmp("10.1.15.3", "10.1.99.1", 3, 100);
        let from_nowhere = Spec::udp("0.0.0.0", "10.1.99.1", 100);
        for spec in [&fragment, &icmp_error, &from_nowhere] {
            assert_eq!(
                tun(&spec.bytes()).decision,
                Decision::Drop(DropReason::NoRoute)
            );
            let expired = spec.clone().ttl(1);
            assert_eq!(
                tun(&Spec {
                    dst: ip("10.1.81.1"),
                    ..expired
                }
                .bytes())
                .decision,
                Decision::Drop(DropReason::TtlExpired)
            );
        }
        // An echo request is a query: it gets its error.
        let echo = Spec::icmp("10.1.15.3", "10.1.99.1", 8, 84).bytes();
        assert!(matches!(
            tun(&echo).decision,
            Decision::ReplyToTun {
                reason: DropReason::NoRoute,
                ..
            }
        ));
    }

    #[test]
    fn tun_without_a_lease_answers_from_the_destination() {
        let bytes = Spec::udp("10.1.15.3", "10.1.99.1", 100).bytes();
        let out = tun_with(&bytes, &table_without_lease(), &POLICY);
        assert!(matches!(
            out.decision,
            Decision::ReplyToTun {
                len: 128,
                reason: DropReason::NoRoute
            }
        ));
        let (header, _, _) = out.icmp();
        assert_eq!(header.source_addr(), ip("10.1.99.1"));
        // With no lease nothing is local, so the old subnet is just unrouted.
        let own = Spec::udp("10.1.15.3", "10.1.15.9", 100).bytes();
        assert!(matches!(
            tun_with(&own, &table_without_lease(), &POLICY).decision,
            Decision::ReplyToTun {
                reason: DropReason::NoRoute,
                ..
            }
        ));
        let routed = Spec::udp("10.1.15.3", "10.1.81.9", 100).bytes();
        assert_eq!(
            tun_with(&routed, &table_without_lease(), &POLICY).decision,
            Decision::SendToPeer(peer("198.18.0.2"))
        );
    }

    #[test]
    fn tun_answers_expired_ttls_with_time_exceeded() {
        for ttl in [0, 1] {
            let bytes = Spec::udp("10.1.15.3", "10.1.81.7", 300).ttl(ttl).bytes();
            let out = tun(&bytes);
            assert!(matches!(
                out.decision,
                Decision::ReplyToTun {
                    len: 328,
                    reason: DropReason::TtlExpired
                }
            ));
            let (header, icmp_type, quote) = out.icmp();
            assert_eq!(
                icmp_type,
                Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit)
            );
            assert_eq!(header.source_addr(), ip("10.1.81.7"));
            assert_eq!(header.destination_addr(), ip("10.1.15.3"));
            assert_eq!(quote, &bytes[..], "the quote shows the TTL as it arrived");
        }
        let bytes = Spec::udp("10.1.15.3", "10.1.81.7", 300).ttl(2).bytes();
        let out = tun(&bytes);
        assert_eq!(out.decision, Decision::SendToPeer(peer("198.18.0.2")));
        assert_eq!(out.packet[8], 1);
    }

    #[test]
    fn tun_answers_oversized_df_packets_with_fragmentation_needed() {
        let big = Spec::udp("10.1.15.3", "10.1.81.7", MTU + 1);
        let out = tun(&big.bytes());
        assert!(matches!(
            out.decision,
            Decision::ReplyToTun {
                len: 576,
                reason: DropReason::TooBig
            }
        ));
        let (_, icmp_type, _) = out.icmp();
        assert_eq!(
            icmp_type,
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: MTU as u16
            })
        );
        // Without DF the underlay may fragment the datagram.
        let loose = Spec {
            dont_frag: false,
            ..big.clone()
        }
        .bytes();
        let out = tun(&loose);
        assert_eq!(out.decision, Decision::SendToPeer(peer("198.18.0.2")));
        assert_forwarded(&loose, &out.packet);
        // Exactly the MTU fits.
        let fits = Spec::udp("10.1.15.3", "10.1.81.7", MTU).bytes();
        assert_eq!(
            tun(&fits).decision,
            Decision::SendToPeer(peer("198.18.0.2"))
        );
        // An MTU beyond 16 bits is reported as the largest one ICMP can carry.
        let huge = Policy {
            tun_mtu: 70_000,
            ..POLICY
        };
        let small = Policy {
            tun_mtu: 100,
            ..POLICY
        };
        assert_eq!(
            tun_with(&fits, &table(), &huge).decision,
            Decision::SendToPeer(peer("198.18.0.2"))
        );
        let out = tun_with(&fits, &table(), &small);
        assert_eq!(&out.reply[26..28], &100u16.to_be_bytes());
    }

    #[test]
    fn super_packets_are_sized_by_their_largest_segment() {
        let routes = table();
        let decide = |bytes: &[u8], largest: usize| {
            let mut packet = bytes.to_vec();
            let mut reply = vec![0u8; REPLY_BUF_LEN];
            let decision =
                from_tun_super_packet(&mut packet, largest, &routes, &POLICY, &mut reply);
            (Decision::from(decision), packet)
        };
        // A 60 000-byte TCP super-packet whose segments fit the MTU goes to the peer once,
        // with its TTL lowered.
        let mut spec = Spec::udp("10.1.15.3", "10.1.81.7", 60_000);
        spec.protocol = 6;
        let bytes = spec.bytes();
        let (decision, packet) = decide(&bytes, MTU);
        assert_eq!(decision, Decision::SendToPeer(peer("198.18.0.2")));
        assert_forwarded(&bytes, &packet);
        // Segments beyond the MTU with DF: fragmentation needed, quoting the super-packet.
        let (decision, _) = decide(&bytes, MTU + 1);
        assert!(matches!(
            decision,
            Decision::ReplyToTun {
                reason: DropReason::TooBig,
                ..
            }
        ));
        // Every other rule is the same as for a single packet.
        let unrouted = Spec::udp("10.1.15.3", "10.1.99.1", 60_000).bytes();
        assert!(matches!(
            decide(&unrouted, MTU).0,
            Decision::ReplyToTun {
                reason: DropReason::NoRoute,
                ..
            }
        ));
        let expiring = Spec::udp("10.1.15.3", "10.1.81.1", 60_000).ttl(1).bytes();
        assert!(matches!(
            decide(&expiring, MTU).0,
            Decision::ReplyToTun {
                reason: DropReason::TtlExpired,
                ..
            }
        ));
        let local = Spec::udp("10.1.15.3", "10.1.15.9", 60_000).bytes();
        assert_eq!(decide(&local, MTU).0, Decision::Drop(DropReason::Loop));
        let mut broken = bytes.clone();
        broken[10] ^= 1;
        assert_eq!(
            decide(&broken, MTU).0,
            Decision::Drop(DropReason::BadPacket)
        );
    }

    #[test]
    fn tun_checks_route_then_ttl_then_size() {
        // No route and too big: the sender learns the destination is unreachable.
        let unrouted = Spec::udp("10.1.15.3", "10.1.99.1", MTU + 100).bytes();
        assert!(matches!(
            tun(&unrouted).decision,
            Decision::ReplyToTun {
                reason: DropReason::NoRoute,
                ..
            }
        ));
        // Expiring and too big: the TTL runs out first.
        let expiring = Spec::udp("10.1.15.3", "10.1.81.1", MTU + 100)
            .ttl(1)
            .bytes();
        assert!(matches!(
            tun(&expiring).decision,
            Decision::ReplyToTun {
                reason: DropReason::TtlExpired,
                ..
            }
        ));
        // Multicast with TTL 1 (the usual case) is counted as multicast.
        let mdns = Spec::udp("10.1.15.3", "224.0.0.251", 100).ttl(1).bytes();
        assert_eq!(tun(&mdns).decision, Decision::Drop(DropReason::Multicast));
    }

    #[test]
    fn a_short_reply_buffer_turns_replies_into_drops() {
        let bytes = Spec::udp("10.1.15.3", "10.1.99.1", 100).bytes();
        let mut packet = bytes.clone();
        let mut reply = [0u8; 40];
        assert_eq!(
            Decision::from(from_tun(&mut packet, &table(), &POLICY, &mut reply)),
            Decision::Drop(DropReason::NoRoute)
        );
    }

    // ---- from a peer ----

    #[test]
    fn peer_packets_for_our_subnet_reach_the_tun() {
        let cases = [
            ("198.18.0.2", "10.1.81.5", "10.1.15.7"),
            ("198.18.0.2", "10.1.82.255", "10.1.15.0"),
            ("198.18.0.3", "10.1.255.255", "10.1.15.255"),
            ("198.18.0.4", "10.1.0.0", "10.1.15.1"),
        ];
        for (sender, src, dst) in cases {
            let bytes = Spec::udp(src, dst, 1400).bytes();
            let out = from(sender, &bytes);
            assert_eq!(
                out.decision,
                Decision::WriteToTun,
                "{sender} {src} -> {dst}"
            );
            assert_forwarded(&bytes, &out.packet);
        }
        let fits = Spec::udp("10.1.81.5", "10.1.15.7", MTU).bytes();
        assert_eq!(from("198.18.0.2", &fits).decision, Decision::WriteToTun);
    }

    #[test]
    fn peer_datagrams_from_strangers_are_unknown_whatever_they_hold() {
        let bytes = Spec::udp("10.1.81.5", "10.1.15.7", 100).bytes();
        for sender in [
            peer("198.18.0.9"),
            peer("10.1.81.5"),
            SocketAddrV4::new(ip("198.18.0.2"), 9999),
            SocketAddrV4::new(ip("198.18.0.2"), 0),
        ] {
            let out = from_with(sender, &bytes, &table(), &POLICY);
            assert_eq!(
                out.decision,
                Decision::Drop(DropReason::UnknownPeer),
                "{sender}"
            );
            assert_eq!(out.packet, bytes);
        }
        // Whatever a stranger sends — garbage, IPv6, oversized, misaddressed, spoofed,
        // foreign even where foreign sources are allowed, expiring — it is a stranger's.
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        let lenient = Policy {
            allow_foreign_sources: true,
            ..POLICY
        };
        let payloads = [
            vec![1, 2, 3],
            v6,
            Spec::udp("10.1.81.5", "10.1.15.7", MTU + 1).bytes(),
            Spec::udp("10.1.81.5", "10.1.81.7", 100).bytes(),
            Spec::udp("10.1.255.5", "10.1.15.7", 100).bytes(),
            Spec::udp("8.8.8.8", "10.1.15.7", 100).bytes(),
            Spec::udp("10.1.81.5", "10.1.15.7", 100).ttl(1).bytes(),
            Spec::udp("8.8.8.8", "10.1.15.7", 100).ttl(1).bytes(),
        ];
        for payload in &payloads {
            for policy in [&POLICY, &lenient] {
                let out = from_with(peer("198.18.0.9"), payload, &table(), policy);
                assert_eq!(out.decision, Decision::Drop(DropReason::UnknownPeer));
                assert_eq!(&out.packet, payload);
            }
        }
        // With no lease anywhere, everyone is a stranger.
        let overlay = Overlay::new("10.1.0.0/16".parse().unwrap(), 24).unwrap();
        assert_eq!(
            from_with(
                peer("198.18.0.2"),
                &bytes,
                &RouteTable::empty(overlay, PORT),
                &POLICY
            )
            .decision,
            Decision::Drop(DropReason::UnknownPeer)
        );
    }

    #[test]
    fn peer_malformed_packets_are_bad() {
        let good = Spec::udp("10.1.81.5", "10.1.15.7", 100).bytes();
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        assert_eq!(
            from("198.18.0.2", &v6).decision,
            Decision::Drop(DropReason::NotIpv4)
        );
        let mut long = good.clone();
        long.extend_from_slice(&[0; 4]);
        let mut bad_sum = good.clone();
        bad_sum[16] ^= 0x10;
        for bytes in [
            &[][..],
            &good[..50],
            &long[..],
            &bad_sum[..],
            &[0x45; 20][..],
        ] {
            assert_eq!(
                from("198.18.0.2", bytes).decision,
                Decision::Drop(DropReason::BadPacket)
            );
        }
    }

    #[test]
    fn peer_packets_beyond_the_mtu_are_dropped_not_truncated() {
        for len in [MTU + 1, 1500, 9000] {
            let bytes = Spec::udp("10.1.81.5", "10.1.15.7", len).bytes();
            let out = from("198.18.0.2", &bytes);
            assert_eq!(out.decision, Decision::Drop(DropReason::TooBig));
            assert_eq!(out.packet, bytes);
        }
    }

    #[test]
    fn peer_packets_for_other_hosts_are_not_ours() {
        for dst in [
            "10.1.81.1",
            "10.1.16.0",
            "10.1.14.255",
            "8.8.8.8",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            let bytes = Spec::udp("10.1.81.5", dst, 100).bytes();
            assert_eq!(
                from("198.18.0.2", &bytes).decision,
                Decision::Drop(DropReason::NotOurs),
                "{dst}"
            );
        }
        let bytes = Spec::udp("10.1.81.5", "10.1.15.7", 100).bytes();
        assert_eq!(
            from_with(peer("198.18.0.2"), &bytes, &table_without_lease(), &POLICY).decision,
            Decision::Drop(DropReason::NotOurs)
        );
    }

    #[test]
    fn peer_sources_must_lie_in_the_senders_subnets() {
        let cases = [
            ("198.18.0.2", "10.1.255.1"),
            ("198.18.0.2", "10.1.15.9"),
            ("198.18.0.2", "10.1.200.1"),
            ("198.18.0.2", "10.1.0.0"),
            ("198.18.0.2", "10.1.80.255"),
            ("198.18.0.2", "10.1.83.0"),
            ("198.18.0.3", "10.1.81.5"),
        ];
        for (sender, src) in cases {
            let bytes = Spec::udp(src, "10.1.15.7", 100).bytes();
            let out = from(sender, &bytes);
            assert_eq!(
                out.decision,
                Decision::Drop(DropReason::SpoofedSource),
                "{sender} {src}"
            );
            assert_eq!(out.packet, bytes);
            // Allowing foreign sources never lets a spoofed overlay source through.
            let lenient = Policy {
                allow_foreign_sources: true,
                ..POLICY
            };
            assert_eq!(
                from_with(peer(sender), &bytes, &table(), &lenient).decision,
                Decision::Drop(DropReason::SpoofedSource)
            );
        }
    }

    #[test]
    fn peer_sources_outside_the_network_need_the_policy() {
        let lenient = Policy {
            allow_foreign_sources: true,
            ..POLICY
        };
        for src in ["8.8.8.8", "10.0.255.255", "10.2.0.0", "192.168.1.1"] {
            let bytes = Spec::udp(src, "10.1.15.7", 100).bytes();
            assert_eq!(
                from("198.18.0.2", &bytes).decision,
                Decision::Drop(DropReason::ForeignSource),
                "{src}"
            );
            let out = from_with(peer("198.18.0.2"), &bytes, &table(), &lenient);
            assert_eq!(out.decision, Decision::WriteToTun);
            assert_forwarded(&bytes, &out.packet);
        }
    }

    #[test]
    fn peer_expired_ttls_are_answered_to_the_sender() {
        for ttl in [0, 1] {
            let bytes = Spec::udp("10.1.81.5", "10.1.15.7", 1000).ttl(ttl).bytes();
            let out = from("198.18.0.2", &bytes);
            assert_eq!(
                out.decision,
                Decision::ReplyToPeer {
                    to: peer("198.18.0.2"),
                    len: 576,
                    reason: DropReason::TtlExpired
                }
            );
            let (header, icmp_type, quote) = out.icmp();
            assert_eq!(
                icmp_type,
                Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit)
            );
            assert_eq!(header.source_addr(), ip("10.1.15.0"));
            assert_eq!(header.destination_addr(), ip("10.1.81.5"));
            assert_eq!(quote, &bytes[..548]);
            assert_eq!(out.packet, bytes);
        }
        // No error about an ICMP error or a later fragment.
        let icmp_error = Spec::icmp("10.1.81.5", "10.1.15.7", 11, 100).ttl(1).bytes();
        assert_eq!(
            from("198.18.0.2", &icmp_error).decision,
            Decision::Drop(DropReason::TtlExpired)
        );
        let mut fragment = Spec::udp("10.1.81.5", "10.1.15.7", 100).ttl(1);
        fragment.frag_units = 100;
        assert_eq!(
            from("198.18.0.2", &fragment.bytes()).decision,
            Decision::Drop(DropReason::TtlExpired)
        );
        let echo = Spec::icmp("10.1.81.5", "10.1.15.7", 8, 84).ttl(1).bytes();
        assert!(matches!(
            from("198.18.0.2", &echo).decision,
            Decision::ReplyToPeer { len: 112, .. }
        ));
    }

    #[test]
    fn peer_checks_run_in_the_documented_order() {
        // Each packet has the fault named and every fault after it in the order.
        let sender = "198.18.0.2";
        let stranger = "198.18.0.77";
        let worst = Spec::udp("10.1.255.1", "10.1.81.1", MTU + 1).ttl(1);
        assert_eq!(
            from(stranger, &worst.bytes()).decision,
            Decision::Drop(DropReason::UnknownPeer)
        );
        let mut malformed = worst.bytes();
        malformed[10] ^= 0xff;
        assert_eq!(
            from(sender, &malformed).decision,
            Decision::Drop(DropReason::BadPacket)
        );
        assert_eq!(
            from(sender, &worst.bytes()).decision,
            Decision::Drop(DropReason::TooBig)
        );
        let fits = Spec::udp("10.1.255.1", "10.1.81.1", 100).ttl(1);
        assert_eq!(
            from(sender, &fits.bytes()).decision,
            Decision::Drop(DropReason::NotOurs)
        );
        let ours = Spec {
            dst: ip("10.1.15.7"),
            ..fits.clone()
        };
        assert_eq!(
            from(sender, &ours.bytes()).decision,
            Decision::Drop(DropReason::SpoofedSource)
        );
        let foreign = Spec {
            src: ip("8.8.8.8"),
            ..ours.clone()
        };
        assert_eq!(
            from(sender, &foreign.bytes()).decision,
            Decision::Drop(DropReason::ForeignSource)
        );
        let honest = Spec {
            src: ip("10.1.81.1"),
            ..ours
        };
        assert!(matches!(
            from(sender, &honest.bytes()).decision,
            Decision::ReplyToPeer {
                reason: DropReason::TtlExpired,
                ..
            }
        ));
    }

    // ---- anything at all ----

    /// An address in a subnet of the test table, at its edges, or somewhere else.
    fn interesting_addr(rng: &mut Rng) -> Ipv4Addr {
        let host = match rng.below(4) {
            0 => 0,
            1 => 255,
            _ => rng.byte(),
        };
        let subnet = [15, 15, 15, 81, 82, 255, 0, rng.byte()][rng.below(8)];
        match rng.below(10) {
            0 => Ipv4Addr::from(rng.next_u64() as u32),
            1 => Ipv4Addr::new(224, 0, 0, host),
            _ => Ipv4Addr::new(10, 1, subnet, host),
        }
    }

    /// A few hundred thousand random and mutated packets through every entry point: nothing
    /// panics, and whatever is sent on or answered is itself a valid packet.
    #[test]
    fn mini_fuzz_never_panics_and_only_emits_valid_packets() {
        let routes = table();
        let bare = table_without_lease();
        let senders = [
            peer("198.18.0.2"),
            peer("198.18.0.3"),
            peer("198.18.0.9"),
            SocketAddrV4::new(ip("198.18.0.2"), 1),
        ];
        let policies = [
            POLICY,
            Policy {
                tun_mtu: 576,
                allow_foreign_sources: true,
            },
        ];
        let mut rng = Rng::new(0xf00d);
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut emitted = 0usize;
        let mut reasons = std::collections::BTreeSet::new();
        let (mut sent, mut written) = (0usize, 0usize);
        for round in 0..200_000 {
            let mut bytes = match round % 4 {
                0 => {
                    let len = rng.below(80);
                    rng.bytes(len)
                }
                1 => random_packet(&mut rng, 1600),
                _ => {
                    // A packet aimed into the overlay, then mutated a little.
                    let mut spec = Spec::udp("10.1.81.5", "10.1.15.7", 20 + rng.below(1500));
                    spec.src = interesting_addr(&mut rng);
                    spec.dst = interesting_addr(&mut rng);
                    spec.ttl = rng.byte() % 4;
                    spec.protocol = [1, 6, 17][rng.below(3)];
                    if let Some(first) = spec.payload.first_mut() {
                        *first = rng.byte() % 20;
                    }
                    spec.frag_units = if rng.coin() { 0 } else { rng.byte().into() };
                    let mut bytes = spec.bytes();
                    for _ in 0..rng.below(3) {
                        let at = rng.below(bytes.len().min(64));
                        bytes[at] ^= 1 << rng.below(8);
                    }
                    if rng.below(8) == 0 {
                        bytes.truncate(rng.below(bytes.len() + 1));
                    }
                    bytes
                }
            };
            let policy = &policies[round % 2];
            let table = if round % 7 == 0 { &bare } else { &routes };

            if let Ok(mut packet) = Ipv4Packet::new_checked(&mut bytes[..]) {
                let _ = (
                    packet.payload().len(),
                    packet.options().len(),
                    packet.frag_offset(),
                );
                let mut copy = packet.as_bytes().to_vec();
                let mut view = Ipv4Packet::new_checked(&mut copy[..]).unwrap();
                if view.decrement_ttl().is_some() {
                    assert!(Ipv4Packet::new_checked(&copy[..]).is_ok());
                }
                for error in [IcmpError::NetUnreachable, IcmpError::TimeExceeded] {
                    if let Some(len) = icmp::write_error(error, &packet, None, &mut reply) {
                        assert!(Ipv4Packet::new_checked(&reply[..len]).is_ok());
                    }
                }
                packet.fill_checksum();
            }

            let mut tun_copy = bytes.clone();
            match Decision::from(from_tun(&mut tun_copy, table, policy, &mut reply)) {
                Decision::SendToPeer(_) => {
                    let packet = Ipv4Packet::new_checked(&tun_copy[..]).unwrap();
                    assert_eq!(packet.ttl() + 1, bytes[8]);
                    sent += 1;
                }
                Decision::ReplyToTun { len, reason } => {
                    reasons.insert(reason);
                    assert!(len <= REPLY_BUF_LEN);
                    assert!(Ipv4Packet::new_checked(&reply[..len]).is_ok());
                    assert_eq!(tun_copy, bytes);
                    emitted += 1;
                }
                Decision::Drop(reason) => {
                    reasons.insert(reason);
                    assert_eq!(tun_copy, bytes);
                }
                other => panic!("from_tun returned {other:?}"),
            }

            let sender = senders[rng.below(senders.len())];
            let mut peer_copy = bytes.clone();
            match Decision::from(from_peer(sender, &mut peer_copy, table, policy, &mut reply)) {
                Decision::WriteToTun => {
                    let packet = Ipv4Packet::new_checked(&peer_copy[..]).unwrap();
                    assert!(packet.total_len() <= policy.tun_mtu);
                    assert!(table.is_local(packet.dst()));
                    assert!(table.is_peer(sender));
                    written += 1;
                }
                Decision::ReplyToPeer { to, len, reason } => {
                    reasons.insert(reason);
                    assert_eq!(to, sender);
                    assert!(table.is_peer(sender));
                    assert!(Ipv4Packet::new_checked(&reply[..len]).is_ok());
                    emitted += 1;
                }
                Decision::Drop(reason) => {
                    reasons.insert(reason);
                    assert_eq!(peer_copy, bytes);
                    if !table.is_peer(sender) {
                        assert_eq!(reason, DropReason::UnknownPeer);
                    }
                }
                other => panic!("from_peer returned {other:?}"),
            }
        }
        // The inputs reach every path, not only the parser's rejections.
        assert!(emitted > 1_000, "replies: {emitted}");
        assert!(
            sent > 1_000 && written > 100,
            "sent {sent}, written {written}"
        );
        assert_eq!(
            reasons.len(),
            DropReason::ALL
                .iter()
                .filter(|r| !r.is_encryption())
                .count(),
            "reasons seen: {reasons:?}"
        );
    }
}
