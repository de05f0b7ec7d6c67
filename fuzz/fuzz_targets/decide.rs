//! Both per-packet decision functions over a fixed route table, with any sender and packet.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weft_engine::counters::DropReason;
use weft_engine::decide::{from_peer, from_tun, PeerDecision, Policy, TunDecision, REPLY_BUF_LEN};
use weft_engine::wire::ipv4::Ipv4Packet;
use weft_engine::route::RouteTable;
use weft_fuzz::{table, DecideInput, TUN_MTU};

static TABLES: OnceLock<[RouteTable; 2]> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let tables = TABLES.get_or_init(|| [table(true), table(false)]);
    let input = DecideInput::parse(data);
    let routes = &tables[usize::from(input.without_lease)];
    let policy = Policy {
        tun_mtu: if input.small_mtu { 576 } else { TUN_MTU },
        allow_foreign_sources: input.allow_foreign_sources,
    };
    let mut reply = [0u8; REPLY_BUF_LEN];

    let mut packet = input.packet.to_vec();
    match from_tun(&mut packet, routes, &policy, &mut reply) {
        TunDecision::SendToPeer(peer) => {
            let sent = Ipv4Packet::new_checked(&packet[..]).unwrap();
            assert_eq!(sent.ttl() + 1, input.packet[8]);
            assert_eq!(routes.peer_for(sent.dst()), Some(peer));
        }
        TunDecision::ReplyToTun { len, .. } => {
            assert!(len <= REPLY_BUF_LEN);
            let answer = Ipv4Packet::new_checked(&reply[..len]).unwrap();
            let original = Ipv4Packet::new_checked(input.packet).unwrap();
            assert_eq!(answer.dst(), original.src());
            assert_eq!(packet, input.packet);
        }
        TunDecision::Drop(_) => assert_eq!(packet, input.packet),
    }

    let mut packet = input.packet.to_vec();
    match from_peer(input.from, &mut packet, routes, &policy, &mut reply) {
        PeerDecision::WriteToTun => {
            let written = Ipv4Packet::new_checked(&packet[..]).unwrap();
            assert_eq!(written.ttl() + 1, input.packet[8]);
            assert!(written.total_len() <= policy.tun_mtu);
            assert!(routes.is_local(written.dst()));
            assert!(routes.is_peer(input.from));
            let src = written.src();
            if routes.overlay().contains(src) {
                assert!(routes.sender_owns(input.from, src));
            } else {
                assert!(policy.allow_foreign_sources);
            }
        }
        PeerDecision::ReplyToPeer { to, len, .. } => {
            assert_eq!(to, input.from);
            assert!(routes.is_peer(input.from));
            let answer = Ipv4Packet::new_checked(&reply[..len]).unwrap();
            let original = Ipv4Packet::new_checked(input.packet).unwrap();
            assert_eq!(answer.dst(), original.src());
            assert_eq!(packet, input.packet);
        }
        PeerDecision::Drop(reason) => {
            assert_eq!(packet, input.packet);
            if !routes.is_peer(input.from) {
                assert_eq!(reason, DropReason::UnknownPeer);
            }
        }
    }
});
