//! What to do with each packet, decided by pure functions over caller-owned buffers.
//!
//! The I/O loops never look inside a packet: they hand each one to [`from_tun`] or
//! [`from_peer`] with the batch's route-table snapshot and execute the [`Decision`] that comes
//! back. Header edits (the TTL) happen in place; ICMP errors are written into a caller-owned
//! reply buffer of at least [`REPLY_BUF_LEN`] bytes.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::counters::DropReason;
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

/// Decide the fate of a packet read from the TUN.
pub fn from_tun(
    packet: &mut [u8],
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> Decision {
    let _ = (policy, reply);
    let Some(dst) = destination(packet) else {
        return Decision::Drop(DropReason::BadPacket);
    };
    match routes.peer_for(dst) {
        Some(peer) => Decision::SendToPeer(peer),
        None => Decision::Drop(DropReason::NoRoute),
    }
}

/// Decide the fate of a datagram received from `from`.
pub fn from_peer(
    from: SocketAddrV4,
    packet: &mut [u8],
    routes: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
) -> Decision {
    let _ = (policy, reply);
    let Some(dst) = destination(packet) else {
        return Decision::Drop(DropReason::BadPacket);
    };
    if !routes.is_peer(from) {
        return Decision::Drop(DropReason::UnknownPeer);
    }
    if !routes.is_local(dst) {
        return Decision::Drop(DropReason::NotOurs);
    }
    Decision::WriteToTun
}

fn destination(packet: &[u8]) -> Option<Ipv4Addr> {
    let header: [u8; 20] = packet.get(..20)?.try_into().ok()?;
    (header[0] >> 4 == 4).then(|| Ipv4Addr::new(header[16], header[17], header[18], header[19]))
}
