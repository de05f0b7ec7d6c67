//! What a worker does with multicast or broadcast a peer sent: deliver it into the TAP as an
//! Ethernet frame, or drop it as flannel would.
//!
//! The workers' decision ([`crate::decide::from_peer`]) drops every packet whose destination
//! is not in this host's subnet as `not_ours`, off the hot path; only then is this asked, so
//! unicast pays nothing for it. A group packet is delivered when the host takes its kind and
//! it passes the unicast rules: the sender holds a lease (checked before `not_ours`), and the
//! inner source lies in a subnet leased to the sender (`spoofed_source`; outside the Network,
//! `foreign_source` unless allowed). IGMP is never taken from a peer (`not_ours`). The TTL is
//! left alone: the TAP is a layer-2 port. A delivered packet is never replicated again: the
//! relay sends on only what a local container sent.

use std::net::SocketAddrV4;

use crate::counters::DropReason;
use crate::decide::Policy;
use crate::multicast::relay::{group_kind, GroupKind};
use crate::route::RouteTable;
use crate::wire::ethernet::{self, BROADCAST_MAC};
use crate::wire::igmp;
use crate::wire::ipv4::Ipv4Packet;

/// Which group traffic from peers this host delivers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// IPv4 multicast.
    pub multicast: bool,
    /// UDP broadcast.
    pub broadcast: bool,
}

impl Delivery {
    /// Whether anything is delivered at all.
    #[inline]
    pub fn any(&self) -> bool {
        self.multicast || self.broadcast
    }
}

/// Decide on a packet from `from` that the workers' rules found not to be for this host's
/// subnet (a lease holder's, so the sender is known): the Ethernet header to deliver it
/// behind, or the reason to drop it (`not_ours` for what this host does not take, as without
/// multicast).
pub fn from_peer<T: AsRef<[u8]>>(
    from: SocketAddrV4,
    ip: &Ipv4Packet<T>,
    routes: &RouteTable,
    policy: &Policy,
    delivery: Delivery,
) -> Result<[u8; ethernet::HEADER_LEN], DropReason> {
    let dst = ip.dst();
    let mac = match group_kind(dst, routes) {
        // IGMP is between a host and its own link: never taken from another host.
        _ if ip.protocol() == igmp::PROTOCOL => return Err(DropReason::NotOurs),
        Some(GroupKind::Multicast) if delivery.multicast => ethernet::multicast_mac(dst),
        Some(GroupKind::Broadcast) if delivery.broadcast && ip.protocol() == 17 => BROADCAST_MAC,
        _ => return Err(DropReason::NotOurs),
    };
    let src = ip.src();
    if routes.overlay().contains(src) {
        if !routes.sender_owns(from, src) {
            return Err(DropReason::SpoofedSource);
        }
    } else if !policy.allow_foreign_sources {
        return Err(DropReason::ForeignSource);
    }
    Ok(ethernet::ipv4_header(mac))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::multicast::relay::tests::{frame, routes};

    const POLICY: Policy = Policy {
        tun_mtu: 1472,
        allow_foreign_sources: false,
    };

    fn decide(
        src: &str,
        dst: &str,
        protocol: u8,
        delivery: Delivery,
    ) -> Result<[u8; 6], DropReason> {
        let f = frame(src, dst, protocol, &[0; 8]);
        let ip = Ipv4Packet::new_checked(&f[14..42]).unwrap();
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285);
        from_peer(from, &ip, &routes(), &POLICY, delivery).map(|header| {
            assert_eq!(
                &header[6..],
                &[0x02, 0x77, 0x65, 0x66, 0x74, 0x00, 0x08, 0x00]
            );
            header[..6].try_into().unwrap()
        })
    }

    #[test]
    fn group_traffic_from_a_lease_holder_is_delivered_when_enabled() {
        let both = Delivery {
            multicast: true,
            broadcast: true,
        };
        assert_eq!(
            decide("10.1.2.5", "239.1.1.1", 17, both),
            Ok([0x01, 0x00, 0x5e, 0x01, 0x01, 0x01])
        );
        assert_eq!(
            decide("10.1.2.5", "255.255.255.255", 17, both),
            Ok([0xff; 6])
        );
        assert_eq!(decide("10.1.2.5", "10.1.255.255", 17, both), Ok([0xff; 6]));
        // Spoofed and foreign sources, as for unicast.
        assert_eq!(
            decide("10.1.3.5", "239.1.1.1", 17, both),
            Err(DropReason::SpoofedSource)
        );
        assert_eq!(
            decide("192.0.2.1", "239.1.1.1", 17, both),
            Err(DropReason::ForeignSource)
        );
        // Not taken: counted as without multicast.
        let none = Delivery::default();
        assert!(!none.any());
        assert_eq!(
            decide("10.1.2.5", "239.1.1.1", 17, none),
            Err(DropReason::NotOurs)
        );
        let multicast_only = Delivery {
            multicast: true,
            broadcast: false,
        };
        assert_eq!(
            decide("10.1.2.5", "255.255.255.255", 17, multicast_only),
            Err(DropReason::NotOurs)
        );
        assert_eq!(
            decide("10.1.2.5", "255.255.255.255", 1, both),
            Err(DropReason::NotOurs)
        );
        assert_eq!(
            decide("10.1.2.5", "10.1.9.9", 17, both),
            Err(DropReason::NotOurs)
        );
    }
}
