//! What to do with each packet, decided by pure functions over caller-owned buffers.
//!
//! The I/O loops never look inside a packet: they hand each one to [`from_tun`] or
//! [`from_peer`] with the batch's route-table snapshot and execute the [`Decision`] that comes
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
//! 6. longer than the TUN MTU and DF set → `TooBig`, with ICMP fragmentation needed;
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
//! packets only to learn the destination is unreachable. From a peer the sender is checked
//! before anything in the datagram is read: nothing from a stranger reaches the parser, and
//! strangers' traffic is counted as `unknown_peer` whatever its shape, while `bad_packet`
//! then points at a broken peer. A packet longer than the TUN MTU without DF is still sent:
//! the UDP socket fragments the datagram on the underlay.
//!
//! ICMP errors follow [`icmp::may_report`]; where the rules forbid one, the packet is dropped
//! under the same reason without a reply.

use std::net::SocketAddrV4;

use crate::counters::DropReason;
use crate::icmp::{self, IcmpError};
use crate::packet::{Ipv4Packet, PacketError};
use crate::route::RouteTable;

/// The smallest reply buffer the decision functions accept.
pub const REPLY_BUF_LEN: usize = 576;

/// What the I/O loop must do with one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send the (edited) packet as one datagram to this peer.
    SendToPeer(SocketAddrV4),
    /// Write the (edited) packet to the TUN.
    WriteToTun,
    /// Drop the packet for `reason` and write the `len`-byte ICMP error in the reply buffer
    /// to the TUN.
    ReplyToTun {
        /// Length of the ICMP packet in the reply buffer.
        len: usize,
        /// Why the original packet was dropped.
        reason: DropReason,
    },
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
/// virtio-net header must be segmented first). An ICMP error goes into `reply`, which should
/// hold [`REPLY_BUF_LEN`] bytes; a shorter one may turn a reply into a plain drop.
pub fn from_tun(
    packet: &mut [u8],
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> Decision {
    let mut ip = match Ipv4Packet::new_checked(packet) {
        Ok(ip) => ip,
        Err(error) => return Decision::Drop(malformed(error)),
    };
    let dst = ip.dst();
    if dst.is_multicast() || dst.is_broadcast() {
        return Decision::Drop(DropReason::Multicast);
    }
    if routes.is_local(dst) {
        return Decision::Drop(DropReason::Loop);
    }
    let Some(peer) = routes.peer_for(dst) else {
        return reply_to_tun(
            IcmpError::NetUnreachable,
            DropReason::NoRoute,
            &ip,
            routes,
            reply,
        );
    };
    if ip.ttl() <= 1 {
        return reply_to_tun(
            IcmpError::TimeExceeded,
            DropReason::TtlExpired,
            &ip,
            routes,
            reply,
        );
    }
    if ip.total_len() > policy.tun_mtu && ip.dont_frag() {
        let mtu = u16::try_from(policy.tun_mtu).unwrap_or(u16::MAX);
        let error = IcmpError::FragmentationNeeded { mtu };
        return reply_to_tun(error, DropReason::TooBig, &ip, routes, reply);
    }
    ip.decrement_ttl();
    Decision::SendToPeer(peer)
}

/// Decide the fate of a datagram received from `from`, lowering its TTL in place when it is
/// written to the TUN.
///
/// `packet` is the whole UDP payload. A time-exceeded error goes into `reply`, which should
/// hold [`REPLY_BUF_LEN`] bytes; a shorter one may turn a reply into a plain drop.
pub fn from_peer(
    from: SocketAddrV4,
    packet: &mut [u8],
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> Decision {
    if !routes.is_peer(from) {
        return Decision::Drop(DropReason::UnknownPeer);
    }
    let mut ip = match Ipv4Packet::new_checked(packet) {
        Ok(ip) => ip,
        Err(error) => return Decision::Drop(malformed(error)),
    };
    if ip.total_len() > policy.tun_mtu {
        return Decision::Drop(DropReason::TooBig);
    }
    if !routes.is_local(ip.dst()) {
        return Decision::Drop(DropReason::NotOurs);
    }
    let src = ip.src();
    if routes.overlay().contains(src) {
        if !routes.sender_owns(from, src) {
            return Decision::Drop(DropReason::SpoofedSource);
        }
    } else if !policy.allow_foreign_sources {
        return Decision::Drop(DropReason::ForeignSource);
    }
    if ip.ttl() <= 1 {
        return reply_to_peer(from, &ip, routes, reply);
    }
    ip.decrement_ttl();
    Decision::WriteToTun
}

/// The drop reason for a buffer that failed to parse.
fn malformed(error: PacketError) -> DropReason {
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
    routes: &RouteTable,
    reply: &mut [u8],
) -> Decision {
    let router = routes.local_subnet().map(|subnet| subnet.network());
    match icmp::write_error(error, offending, router, reply) {
        Some(len) => Decision::ReplyToTun { len, reason },
        None => Decision::Drop(reason),
    }
}

#[cold]
#[inline(never)]
fn reply_to_peer(
    to: SocketAddrV4,
    offending: &Ipv4Packet<&mut [u8]>,
    routes: &RouteTable,
    reply: &mut [u8],
) -> Decision {
    let reason = DropReason::TtlExpired;
    let router = routes.local_subnet().map(|subnet| subnet.network());
    match icmp::write_error(IcmpError::TimeExceeded, offending, router, reply) {
        Some(len) => Decision::ReplyToPeer { to, len, reason },
        None => Decision::Drop(reason),
    }
}
