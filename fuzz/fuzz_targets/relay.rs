//! The multicast relay's decision on any frame from the TAP (Ethernet, IPv4, IGMP v1/v2/v3),
//! and the workers' delivery decision on any packet from a peer: never a panic, and what is
//! replicated is a valid IPv4 packet inside the frame, to a listed receiver.

#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use weft_engine::decide::Policy;
use weft_engine::multicast::receive::{self, Delivery};
use weft_engine::multicast::relay::{FrameOutcome, Relay};
use weft_engine::multicast::{GroupTable, MulticastConfig, PeerMulticast};
use weft_engine::route::RouteTable;
use weft_engine::wire::igmp;
use weft_engine::wire::ipv4::Ipv4Packet;
use weft_fuzz::{table, PORT, TUN_MTU};

static FIXED: OnceLock<(RouteTable, GroupTable, Instant)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (routes, groups, start) = FIXED.get_or_init(|| {
        let peer = |last| SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, last), PORT);
        let groups = GroupTable::new([
            PeerMulticast {
                addr: peer(2),
                multicast: true,
                broadcast: true,
                groups: vec![Ipv4Addr::new(239, 1, 1, 1)],
            },
            PeerMulticast {
                addr: peer(3),
                multicast: true,
                broadcast: false,
                groups: vec![Ipv4Addr::new(239, 1, 1, 1), Ipv4Addr::new(239, 1, 1, 2)],
            },
        ]);
        (table(true), groups, Instant::now())
    });
    let Some((&flags, frame)) = data.split_first() else {
        return;
    };
    let config = MulticastConfig {
        broadcast: flags & 1 != 0,
        rate_limit: if flags & 2 != 0 { 1 } else { 100_000 },
        ..MulticastConfig::default()
    };
    let now = *start + Duration::from_millis(u64::from(flags >> 2));
    let mut relay = Relay::new(&config, TUN_MTU, *start);
    match relay.on_frame(frame, now, routes, groups) {
        FrameOutcome::Replicate { packet, to } => {
            let ip = Ipv4Packet::new_checked(packet).expect("a replicated packet is valid");
            assert!(packet.len() <= TUN_MTU);
            assert!(routes.is_local(ip.src()));
            assert!(!to.is_empty());
        }
        FrameOutcome::Membership(_) | FrameOutcome::Ignored | FrameOutcome::Drop(_) => {}
    }
    relay.expire(now + Duration::from_secs(300));
    assert!(relay.membership().groups().is_empty());

    // The same bytes as a bare IGMP message, and as a packet from a peer.
    if let Ok(igmp::IgmpMessage::V3Report(records)) = igmp::parse(frame) {
        for record in records.flatten() {
            let _ = record.sources().count();
        }
    }
    if let Ok(ip) = Ipv4Packet::new_checked(frame) {
        let policy = Policy {
            tun_mtu: TUN_MTU,
            allow_foreign_sources: flags & 4 != 0,
        };
        let delivery = Delivery {
            multicast: true,
            broadcast: flags & 1 != 0,
        };
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), PORT);
        if receive::from_peer(from, &ip, routes, &policy, delivery).is_ok() {
            assert!(ip.dst().is_multicast() || ip.dst().is_broadcast() || ip.dst() == Ipv4Addr::new(10, 1, 255, 255));
        }
    }
});
