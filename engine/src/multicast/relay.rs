//! What the relay does with each frame the bridge floods to weft's TAP: learn memberships from
//! IGMP, replicate a local container's multicast or broadcast to the peers that take it, or
//! drop it for a reason. Pure: the relay thread passes the time and executes the outcome.
//!
//! The checks run in a fixed order, so a frame is counted under the first that fails:
//! 1. not IPv4, or not to a group MAC address (ARP, IPv6, flooded unicast) → ignored;
//! 2. malformed IPv4 or IGMP → `bad_packet`;
//! 3. IGMP → membership (never forwarded; queries from another querier are ignored);
//! 4. to neither a multicast group nor a broadcast address → ignored;
//! 5. multicast (resp. broadcast) off, or broadcast that is not UDP → `not_enabled`;
//! 6. the source is not a container of this host → `not_local_source` (split horizon: what
//!    weft itself delivered into the bridge, or another router's traffic, is never sent on);
//! 7. longer than the TUN MTU → `too_big` (a multicast sender gets no ICMP error);
//! 8. no peer takes it → `no_members`;
//! 9. not enough tokens for every copy → `rate_limited`;
//! 10. otherwise the bare IPv4 packet goes to each receiver, TTL untouched.

use std::net::SocketAddrV4;
use std::time::Instant;

use crate::multicast::counters::MulticastDrop;
use crate::multicast::groups::GroupTable;
use crate::multicast::membership::{Membership, Update};
use crate::multicast::network_broadcast;
use crate::multicast::rate::TokenBucket;
use crate::multicast::MulticastConfig;
use crate::route::RouteTable;
use crate::wire::ethernet::{EthernetFrame, ETHERTYPE_IPV4};
use crate::wire::igmp::{self, IgmpError};
use crate::wire::ipv4::Ipv4Packet;

/// The IPv4 protocol number of UDP.
const UDP: u8 = 17;

/// What became of one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameOutcome<'a> {
    /// Not the relay's business.
    Ignored,
    /// An IGMP message, applied to the membership.
    Membership(Update),
    /// Send `packet` as one datagram to each of `to`.
    Replicate {
        /// The inner IPv4 packet (the frame without its Ethernet header and padding).
        packet: &'a [u8],
        /// The receivers.
        to: &'a [SocketAddrV4],
    },
    /// Dropped and counted.
    Drop(MulticastDrop),
}

/// Whether a destination is a group the relay carries, and which kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupKind {
    /// IPv4 multicast (224.0.0.0/4).
    Multicast,
    /// Limited broadcast, or the overlay Network's directed broadcast.
    Broadcast,
}

/// The kind of group `dst` is, on an overlay of `routes`' shape; `None` for unicast.
#[inline]
pub fn group_kind(dst: std::net::Ipv4Addr, routes: &RouteTable) -> Option<GroupKind> {
    if dst.is_multicast() {
        Some(GroupKind::Multicast)
    } else if dst.is_broadcast() || dst == routes.overlay().network().broadcast() {
        Some(GroupKind::Broadcast)
    } else {
        None
    }
}

/// The relay's state: the local membership and the rate limit.
#[derive(Clone, Debug)]
pub struct Relay {
    multicast: bool,
    broadcast: bool,
    tun_mtu: usize,
    membership: Membership,
    bucket: TokenBucket,
}

impl Relay {
    /// A relay for `config`, carrying packets of at most `tun_mtu` bytes, started at `now`.
    pub fn new(config: &MulticastConfig, tun_mtu: usize, now: Instant) -> Self {
        Self {
            multicast: config.multicast,
            broadcast: config.broadcast,
            tun_mtu,
            membership: Membership::new(),
            bucket: TokenBucket::new(config.rate_limit, now),
        }
    }

    /// The local membership.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Forget groups not reported in time; returns whether any was.
    pub fn expire(&mut self, now: Instant) -> bool {
        self.membership.expire(now)
    }

    /// Decide on one frame read from the TAP at `now`.
    pub fn on_frame<'a>(
        &mut self,
        frame: &'a [u8],
        now: Instant,
        routes: &RouteTable,
        groups: &'a GroupTable,
    ) -> FrameOutcome<'a> {
        let Ok(frame) = EthernetFrame::new_checked(frame) else {
            return FrameOutcome::Drop(MulticastDrop::BadPacket);
        };
        if frame.ethertype() != ETHERTYPE_IPV4 || !frame.is_group_dst() {
            return FrameOutcome::Ignored;
        }
        let payload = frame.payload();
        // Short frames are padded to 60 bytes: the packet is what its total length says.
        let total_len = match payload.get(2..4) {
            Some(raw) => usize::from(u16::from_be_bytes([raw[0], raw[1]])),
            None => return FrameOutcome::Drop(MulticastDrop::BadPacket),
        };
        let Some(bytes) = payload.get(..total_len) else {
            return FrameOutcome::Drop(MulticastDrop::BadPacket);
        };
        let Ok(ip) = Ipv4Packet::new_checked(bytes) else {
            return FrameOutcome::Drop(MulticastDrop::BadPacket);
        };
        if ip.protocol() == igmp::PROTOCOL {
            return match igmp::parse(ip.payload()) {
                Ok(message) => FrameOutcome::Membership(self.membership.apply(message, now)),
                Err(IgmpError::OtherType(_)) => FrameOutcome::Ignored,
                Err(_) => FrameOutcome::Drop(MulticastDrop::BadPacket),
            };
        }
        let dst = ip.dst();
        let enabled = match group_kind(dst, routes) {
            None => return FrameOutcome::Ignored,
            Some(GroupKind::Multicast) => self.multicast,
            Some(GroupKind::Broadcast) => self.broadcast && ip.protocol() == UDP,
        };
        if !enabled {
            return FrameOutcome::Drop(MulticastDrop::NotEnabled);
        }
        if !routes.is_local(ip.src()) {
            return FrameOutcome::Drop(MulticastDrop::NotLocalSource);
        }
        if bytes.len() > self.tun_mtu {
            return FrameOutcome::Drop(MulticastDrop::TooBig);
        }
        let to = if dst.is_multicast() {
            groups.receivers_of(dst)
        } else {
            groups.broadcast_receivers()
        };
        if to.is_empty() {
            return FrameOutcome::Drop(MulticastDrop::NoMembers);
        }
        let copies = u32::try_from(to.len()).unwrap_or(u32::MAX);
        if !self.bucket.take(copies, now) {
            return FrameOutcome::Drop(MulticastDrop::RateLimited);
        }
        FrameOutcome::Replicate { packet: bytes, to }
    }

    /// Decide at `now` on a packet a worker read from the TUN and [`network_broadcast::is_carried`]
    /// found to be UDP to the Network's broadcast address, rewriting it in place to
    /// 255.255.255.255 when it is carried. Checked in this order, as a frame from the TAP:
    /// malformed → `bad_packet`; broadcast off, or not UDP to that address → `not_enabled`;
    /// the source is not a container of this host → `not_local_source`; longer than the TUN
    /// MTU (a super-packet) → `too_big`. A carried packet goes to this host's containers
    /// whatever the peers, and to the broadcast-capable peers within the rate limit.
    pub fn on_network_broadcast<'a>(
        &mut self,
        packet: &mut [u8],
        now: Instant,
        routes: &RouteTable,
        groups: &'a GroupTable,
    ) -> Result<NetworkBroadcast<'a>, MulticastDrop> {
        let Ok(ip) = Ipv4Packet::new_checked(&*packet) else {
            return Err(MulticastDrop::BadPacket);
        };
        if !self.broadcast || !network_broadcast::is_carried(&ip, routes) {
            return Err(MulticastDrop::NotEnabled);
        }
        if !routes.is_local(ip.src()) {
            return Err(MulticastDrop::NotLocalSource);
        }
        if packet.len() > self.tun_mtu {
            return Err(MulticastDrop::TooBig);
        }
        network_broadcast::to_limited_broadcast(packet).map_err(|_| MulticastDrop::BadPacket)?;
        let to = groups.broadcast_receivers();
        let copies = u32::try_from(to.len()).unwrap_or(u32::MAX);
        if to.is_empty() || self.bucket.take(copies, now) {
            Ok(NetworkBroadcast { to, refused: None })
        } else {
            Ok(NetworkBroadcast {
                to: &[],
                refused: Some(MulticastDrop::RateLimited),
            })
        }
    }
}

/// A packet to the Network's broadcast address that is carried: now to 255.255.255.255, it
/// is written into the TAP for this host's containers and sent to each of `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkBroadcast<'a> {
    /// The peers that get a copy (none when no peer takes broadcast, or over the rate).
    pub to: &'a [SocketAddrV4],
    /// Why the peers get no copy, when that is to be counted (`rate_limited`).
    pub refused: Option<MulticastDrop>,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::multicast::groups::PeerMulticast;
    use crate::route::Overlay;
    use crate::wire::ethernet::{self, BROADCAST_MAC};
    use crate::wire::ipv4::checksum;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn peer(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, last), 8285)
    }

    /// This host holds 10.1.1.0/24, 198.18.0.2 holds 10.1.2.0/24.
    pub(crate) fn routes() -> RouteTable {
        let overlay = Overlay::new("10.1.0.0/16".parse().unwrap(), 24).unwrap();
        RouteTable::build(
            overlay,
            8285,
            Some("10.1.1.0/24".parse().unwrap()),
            [("10.1.2.0/24".parse().unwrap(), ip("198.18.0.2"))],
        )
        .unwrap()
    }

    fn groups() -> GroupTable {
        GroupTable::new([
            PeerMulticast {
                addr: peer(2),
                multicast: true,
                broadcast: true,
                groups: vec![ip("239.1.1.1")],
            },
            PeerMulticast {
                addr: peer(3),
                multicast: true,
                broadcast: false,
                groups: vec![ip("239.1.1.1"), ip("239.1.1.2")],
            },
        ])
    }

    /// An Ethernet frame holding an IPv4 packet from `src` to `dst` with `payload_len` bytes
    /// of `protocol` payload, padded to the 60-byte minimum.
    pub(crate) fn frame(src: &str, dst: &str, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let dst = ip(dst);
        let mac = if dst.is_multicast() {
            ethernet::multicast_mac(dst)
        } else {
            BROADCAST_MAC
        };
        let mut frame = ethernet::ipv4_header(mac).to_vec();
        let total = (20 + payload.len()) as u16;
        let mut header = [0u8; 20];
        header[0] = 0x45;
        header[2..4].copy_from_slice(&total.to_be_bytes());
        header[8] = 1;
        header[9] = protocol;
        header[12..16].copy_from_slice(&ip(src).octets());
        header[16..20].copy_from_slice(&dst.octets());
        let check = checksum::of(&header);
        header[10..12].copy_from_slice(&check.to_be_bytes());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(payload);
        frame.resize(frame.len().max(60), 0);
        frame
    }

    fn config(broadcast: bool, rate_limit: u32) -> MulticastConfig {
        MulticastConfig {
            broadcast,
            rate_limit,
            ..MulticastConfig::default()
        }
    }

    #[test]
    fn local_multicast_goes_to_the_members_once_each() {
        let now = Instant::now();
        let (routes, groups) = (routes(), groups());
        let mut relay = Relay::new(&config(false, 1000), 1472, now);
        let f = frame("10.1.1.5", "239.1.1.1", UDP, &[0; 8]);
        let FrameOutcome::Replicate { packet, to } = relay.on_frame(&f, now, &routes, &groups)
        else {
            panic!("not replicated");
        };
        assert_eq!(packet, &f[14..42], "the bare packet, without padding");
        assert_eq!(to, [peer(2), peer(3)]);
        let f = frame("10.1.1.5", "239.1.1.2", UDP, &[0; 8]);
        assert!(matches!(
            relay.on_frame(&f, now, &routes, &groups),
            FrameOutcome::Replicate { to: [p], .. } if *p == peer(3)
        ));
        // Link-local: every multicast-capable peer, without a report.
        let f = frame("10.1.1.5", "224.0.0.251", UDP, &[0; 8]);
        assert!(matches!(
            relay.on_frame(&f, now, &routes, &groups),
            FrameOutcome::Replicate { to: [_, _], .. }
        ));
    }

    #[test]
    fn every_refusal_has_its_reason() {
        let now = Instant::now();
        let (routes, groups) = (routes(), groups());
        let mut relay = Relay::new(&config(false, 1000), 1472, now);
        let mut decide = |f: &[u8]| match relay.on_frame(f, now, &routes, &groups) {
            FrameOutcome::Drop(reason) => Some(reason),
            FrameOutcome::Ignored => None,
            other => panic!("{other:?}"),
        };
        use MulticastDrop::*;
        // From a peer's container, delivered by weft: never sent on (split horizon).
        assert_eq!(
            decide(&frame("10.1.2.5", "239.1.1.1", UDP, &[0; 8])),
            Some(NotLocalSource)
        );
        assert_eq!(
            decide(&frame("10.1.1.5", "239.9.9.9", UDP, &[0; 8])),
            Some(NoMembers)
        );
        assert_eq!(
            decide(&frame("10.1.1.5", "255.255.255.255", UDP, &[0; 8])),
            Some(NotEnabled)
        );
        assert_eq!(
            decide(&frame("10.1.1.5", "239.1.1.1", UDP, &[0; 1460])),
            Some(TooBig)
        );
        let mut bad = frame("10.1.1.5", "239.1.1.1", UDP, &[0; 8]);
        bad[14 + 10] ^= 1;
        assert_eq!(decide(&bad), Some(BadPacket));
        assert_eq!(decide(&bad[..20]), Some(BadPacket));
        assert_eq!(decide(&bad[..10]), Some(BadPacket));
        // ARP, unicast IP, and unicast MACs are not the relay's business.
        let mut arp = frame("10.1.1.5", "239.1.1.1", UDP, &[0; 8]);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(decide(&arp), None);
        let mut unicast_mac = frame("10.1.1.5", "239.1.1.1", UDP, &[0; 8]);
        unicast_mac[0] = 0x02;
        assert_eq!(decide(&unicast_mac), None);
        let mut unicast_ip = frame("10.1.1.5", "10.1.2.5", UDP, &[0; 8]);
        unicast_ip[0] = 0x01;
        assert_eq!(decide(&unicast_ip), None);
    }

    #[test]
    fn broadcast_only_udp_and_only_when_enabled() {
        let now = Instant::now();
        let (routes, groups) = (routes(), groups());
        let mut relay = Relay::new(&config(true, 1000), 1472, now);
        for dst in ["255.255.255.255", "10.1.255.255"] {
            let f = frame("10.1.1.5", dst, UDP, &[0; 8]);
            assert!(matches!(
                relay.on_frame(&f, now, &routes, &groups),
                FrameOutcome::Replicate { to: [p], .. } if *p == peer(2)
            ));
        }
        let icmp = frame("10.1.1.5", "255.255.255.255", 1, &[0; 8]);
        assert_eq!(
            relay.on_frame(&icmp, now, &routes, &groups),
            FrameOutcome::Drop(MulticastDrop::NotEnabled)
        );
        let off = MulticastConfig {
            multicast: false,
            ..config(true, 1000)
        };
        let mut relay = Relay::new(&off, 1472, now);
        let f = frame("10.1.1.5", "239.1.1.1", UDP, &[0; 8]);
        assert_eq!(
            relay.on_frame(&f, now, &routes, &groups),
            FrameOutcome::Drop(MulticastDrop::NotEnabled)
        );
    }

    /// The bare packet of [`frame`]: what a worker reads from the TUN.
    fn packet(src: &str, dst: &str, protocol: u8, payload: &[u8]) -> Vec<u8> {
        frame(src, dst, protocol, payload)[14..34 + payload.len()].to_vec()
    }

    #[test]
    fn the_networks_broadcast_goes_to_the_broadcast_peers_as_limited_broadcast() {
        let now = Instant::now();
        let (routes, groups) = (routes(), groups());
        let mut relay = Relay::new(&config(true, 1000), 1472, now);
        let mut bytes = packet("10.1.1.5", "10.1.255.255", UDP, &[7; 12]);
        let before = bytes.clone();
        let carried = relay.on_network_broadcast(&mut bytes, now, &routes, &groups);
        assert_eq!(
            carried,
            Ok(NetworkBroadcast {
                to: &[peer(2)],
                refused: None
            }),
            "only the peer that takes broadcast"
        );
        let ip = Ipv4Packet::new_checked(&bytes[..]).expect("still a valid packet");
        assert_eq!(ip.dst(), Ipv4Addr::BROADCAST);
        assert_eq!(ip.ttl(), before[8], "the TTL is untouched");
        assert_eq!(
            bytes[20..26],
            before[20..26],
            "only the UDP checksum changes"
        );
        assert_eq!(bytes[28..], before[28..]);

        // No peer takes broadcast: the local containers still get it, nothing is counted.
        let none = GroupTable::new([]);
        let mut bytes = packet("10.1.1.5", "10.1.255.255", UDP, &[7; 12]);
        assert_eq!(
            relay.on_network_broadcast(&mut bytes, now, &routes, &none),
            Ok(NetworkBroadcast {
                to: &[],
                refused: None
            })
        );
    }

    #[test]
    fn the_networks_broadcast_is_refused_in_the_documented_order() {
        let now = Instant::now();
        let (routes, groups) = (routes(), groups());
        let mut relay = Relay::new(&config(true, 1000), 1472, now);
        let mut decide = |src: &str, dst: &str, protocol: u8, len: usize| {
            let mut bytes = packet(src, dst, protocol, &vec![0; len]);
            let before = bytes.clone();
            let outcome = relay.on_network_broadcast(&mut bytes, now, &routes, &groups);
            if outcome.is_err() {
                assert_eq!(bytes, before, "a refused packet is left alone");
            }
            outcome.err()
        };
        use MulticastDrop::*;
        // Each packet has the fault named and every later one.
        assert_eq!(
            decide("10.1.2.5", "10.1.255.255", 1, 1460),
            Some(NotEnabled)
        );
        assert_eq!(decide("10.1.1.5", "10.1.2.255", UDP, 8), Some(NotEnabled));
        assert_eq!(
            decide("10.1.2.5", "10.1.255.255", UDP, 1460),
            Some(NotLocalSource)
        );
        assert_eq!(decide("10.1.1.5", "10.1.255.255", UDP, 1460), Some(TooBig));
        assert_eq!(decide("10.1.1.5", "10.1.255.255", UDP, 4), Some(BadPacket));
        let mut malformed = packet("10.1.1.5", "10.1.255.255", UDP, &[0; 8]);
        malformed[10] ^= 1;
        assert_eq!(
            relay.on_network_broadcast(&mut malformed, now, &routes, &groups),
            Err(BadPacket)
        );
        // Broadcast off: not carried.
        let mut off = Relay::new(&config(false, 1000), 1472, now);
        let mut bytes = packet("10.1.1.5", "10.1.255.255", UDP, &[0; 8]);
        assert_eq!(
            off.on_network_broadcast(&mut bytes, now, &routes, &groups),
            Err(NotEnabled)
        );
    }

    #[test]
    fn the_networks_broadcast_shares_the_rate_limit() {
        let now = Instant::now();
        let (routes, groups) = (routes(), groups());
        // 100 per second: a burst of 10 copies, shared with the frames from the TAP.
        let mut relay = Relay::new(&config(true, 100), 1472, now);
        let f = frame("10.1.1.5", "255.255.255.255", UDP, &[0; 8]);
        for _ in 0..5 {
            assert!(matches!(
                relay.on_frame(&f, now, &routes, &groups),
                FrameOutcome::Replicate { .. }
            ));
        }
        let mut carried = 0;
        let mut limited = 0;
        for _ in 0..10 {
            let mut bytes = packet("10.1.1.5", "10.1.255.255", UDP, &[0; 8]);
            match relay.on_network_broadcast(&mut bytes, now, &routes, &groups) {
                Ok(NetworkBroadcast {
                    to: [_],
                    refused: None,
                }) => carried += 1,
                Ok(NetworkBroadcast {
                    to: [],
                    refused: Some(MulticastDrop::RateLimited),
                }) => limited += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((carried, limited), (5, 5));
    }

    #[test]
    fn a_storm_is_cut_to_the_rate() {
        let now = Instant::now();
        let (routes, groups) = (routes(), groups());
        // 100 per second: a burst of 10 copies, i.e. 5 packets to two members each.
        let mut relay = Relay::new(&config(false, 100), 1472, now);
        let f = frame("10.1.1.5", "239.1.1.1", UDP, &[0; 8]);
        let sent = (0..50)
            .filter(|_| {
                matches!(
                    relay.on_frame(&f, now, &routes, &groups),
                    FrameOutcome::Replicate { .. }
                )
            })
            .count();
        assert_eq!(sent, 5);
        assert_eq!(
            relay.on_frame(&f, now, &routes, &groups),
            FrameOutcome::Drop(MulticastDrop::RateLimited)
        );
        let later = now + Duration::from_millis(20);
        assert!(matches!(
            relay.on_frame(&f, later, &routes, &groups),
            FrameOutcome::Replicate { .. }
        ));
    }

    #[test]
    fn igmp_feeds_the_membership_and_is_never_replicated() {
        let now = Instant::now();
        let (routes, groups) = (routes(), groups());
        let mut relay = Relay::new(&config(false, 1000), 1472, now);
        let mut report = vec![0x16, 0, 0, 0, 239, 1, 1, 7];
        let check = checksum::of(&report);
        report[2..4].copy_from_slice(&check.to_be_bytes());
        let f = frame("10.1.1.5", "239.1.1.7", igmp::PROTOCOL, &report);
        match relay.on_frame(&f, now, &routes, &groups) {
            FrameOutcome::Membership(update) => assert!(update.changed),
            other => panic!("{other:?}"),
        }
        assert_eq!(relay.membership().groups(), [ip("239.1.1.7")]);
        let query = igmp::write_query(Ipv4Addr::UNSPECIFIED, 100, 60);
        assert_eq!(
            relay.on_frame(&query, now, &routes, &groups),
            FrameOutcome::Ignored
        );
        report[7] ^= 1;
        let f = frame("10.1.1.5", "239.1.1.7", igmp::PROTOCOL, &report);
        assert_eq!(
            relay.on_frame(&f, now, &routes, &groups),
            FrameOutcome::Drop(MulticastDrop::BadPacket)
        );
        assert!(!relay.expire(now + Duration::from_secs(259)));
        assert!(relay.expire(now + Duration::from_secs(260)));
    }
}
