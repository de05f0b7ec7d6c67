//! What a batch does with each packet, as pure functions over caller-owned buffers: the
//! per-direction results the I/O back ends execute, and the counting that goes with them.
//!
//! A packet read from the TUN is decided on once, super-packet or not ([`decide_tun_read`],
//! which yields a [`TunAction`]); a buffer received from a peer is split into the datagrams it
//! holds and each is decided on ([`decide_datagrams`]). Packets are counted as they are on the
//! wire: a super-packet counts each of its segments.

use std::net::SocketAddrV4;

use crate::counters::{BatchCounts, DropReason};
use crate::crypto::{Opened, Opening};
use crate::decide::{self, PeerDecision, Policy, TunDecision, REPLY_BUF_LEN};
use crate::gso_check::{GsoCheck, Received};
use crate::icmp_limit::IcmpGate;
use crate::multicast::network_broadcast::{self, BroadcastSink};
use crate::multicast::receive::{self, Delivery};
use crate::offload::{complete_checksum, Partial, Plan, Segmenter};
use crate::partial_peers::PartialPeerTable;
use crate::route::RouteTable;
use crate::wire::ethernet;
use crate::wire::ipv4::Ipv4Packet;
use crate::wire::vnet::VnetHeader;

/// Which buffer an outgoing packet is in: the packet's own (forwarded as is, zero copy) or the
/// reply buffer the decision wrote an ICMP error into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Packet,
    Reply,
}

/// What one TUN write carries: packets (a super-packet counts each of its segments) and their
/// bytes as they arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WriteCount {
    pub(crate) packets: u32,
    pub(crate) bytes: u32,
}

/// The most datagrams one GRO buffer is split into; the kernel merges at most 64
/// (`UDP_GRO_CNT_MAX`) and sends at most 128 per GSO call, so more is an attack, dropped as
/// `too_big`.
pub(crate) const MAX_RX_DATAGRAMS: usize = 128;

/// The drop reason for a datagram whose sender address is not IPv4 (which an IPv4 socket
/// never reports, but the kernel's answer is not trusted).
pub(crate) const UNREADABLE_SENDER: DropReason = DropReason::UnknownPeer;

/// What a packet read from the TUN turned into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TunAction {
    /// Send it to `to`: whole (`len` bytes), or as the segments `segments` cuts it into.
    Send {
        to: SocketAddrV4,
        len: usize,
        segments: Option<Segmenter>,
    },
    /// Write the `len`-byte ICMP error in the reply buffer to the TUN.
    WriteReply { len: usize },
    /// Nothing to send: the buffer goes back to reading.
    Recycle,
}

/// Decide on a packet read from the TUN behind `header`, once for a whole super-packet, and
/// count it: as many packets as it becomes on the wire, and their bytes. Completes a partial
/// checksum of a packet that is sent whole. With `broadcast` (a host with broadcast on), UDP
/// to the Network's broadcast address is handed to it instead of being routed. To a peer in
/// `partial_peers`, a TCP or UDP packet's checksum is left partial: a segment's is not
/// computed, a packet's partial one is not completed (see [`crate::offload::partial`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decide_tun_read(
    header: &VnetHeader,
    packet: &mut [u8],
    table: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
    icmp: &mut IcmpGate,
    counts: &mut BatchCounts,
    broadcast: Option<&dyn BroadcastSink>,
    partial_peers: &PartialPeerTable,
) -> TunAction {
    let len = packet.len();
    // The one parse of the packet: the plan and the decision both read this view.
    let mut ip = match Ipv4Packet::new_checked(packet) {
        Ok(ip) => ip,
        Err(error) => {
            counts.tun_reads += 1;
            counts.tun_rx_packets += 1;
            counts.tun_rx_bytes += len as u64;
            counts.drop(decide::malformed(error));
            return TunAction::Recycle;
        }
    };
    let offload = Plan::for_packet(header, &ip);
    let (packets, bytes) = match &offload {
        Ok(Plan::Segment(segmenter)) => {
            let n = segmenter.segments();
            (n, len + (n - 1) * segmenter.header_len())
        }
        _ => (1, len),
    };
    counts.tun_reads += 1;
    counts.tun_rx_packets += packets as u64;
    counts.tun_rx_bytes += bytes as u64;
    let drop = |counts: &mut BatchCounts, reason: DropReason| {
        counts.drops[reason as usize] += packets as u64;
    };
    let offload = match offload {
        Ok(offload) => offload,
        Err(error) => {
            drop(counts, error.drop_reason());
            return TunAction::Recycle;
        }
    };
    // With broadcast on, UDP to the Network's broadcast address goes to the relay thread.
    if let Some(sink) = broadcast.filter(|_| network_broadcast::is_carried(&ip, table)) {
        if let Err(reason) = network_broadcast::hand_off(ip.into_inner(), &offload, sink) {
            drop(counts, reason);
        }
        return TunAction::Recycle;
    }
    let largest = match &offload {
        Plan::Segment(segmenter) => Some(segmenter.largest_segment()),
        Plan::Whole | Plan::Checksum { .. } => None,
    };
    let decision = decide::from_tun_checked(&mut ip, largest, table, policy, reply);
    let partial = match decision {
        TunDecision::SendToPeer(to) if partial_peers.takes(*to.ip()) => Partial::of(&ip),
        _ => None,
    };
    let packet = ip.into_inner();
    match decision {
        TunDecision::SendToPeer(to) => match offload {
            Plan::Whole => TunAction::Send {
                to,
                len,
                segments: None,
            },
            Plan::Checksum { start, field }
                if partial.is_some_and(|partial| partial.field() == (start, field)) =>
            {
                TunAction::Send {
                    to,
                    len,
                    segments: None,
                }
            }
            Plan::Checksum { start, field } => match complete_checksum(packet, start, field) {
                Ok(()) => TunAction::Send {
                    to,
                    len,
                    segments: None,
                },
                Err(error) => {
                    drop(counts, error.drop_reason());
                    TunAction::Recycle
                }
            },
            Plan::Segment(segmenter) => TunAction::Send {
                to,
                len,
                segments: Some(match partial {
                    Some(_) => segmenter.with_partial_checksums(),
                    None => segmenter,
                }),
            },
        },
        TunDecision::ReplyToTun { len, reason } => {
            drop(counts, reason);
            if len == 0 || len > REPLY_BUF_LEN {
                TunAction::Recycle
            } else if icmp.admit() {
                TunAction::WriteReply { len }
            } else {
                counts.icmp_suppressed += 1;
                TunAction::Recycle
            }
        }
        TunDecision::Drop(reason) => {
            drop(counts, reason);
            TunAction::Recycle
        }
    }
}

/// Split a received buffer into the datagrams it holds — one, or with GRO (`segment`) a run
/// of `segment`-byte datagrams, the last possibly shorter — decide on each, count them, and
/// call `accept(offset, packet)` for each one to write to the TUN, with the checked view the
/// decision read (so that the coalescer need not parse it again). Returns the ICMP error to send
/// back, if any: the first one, as the slot has one reply buffer (later ones count as drops).
/// With encryption (`opening`), each datagram is opened first, into the opening's arena, and
/// what it held is decided on there: `accept`'s offsets are then into the arena, not `buf`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decide_datagrams(
    from: Option<SocketAddrV4>,
    buf: &mut [u8],
    segment: Option<usize>,
    truncated: bool,
    table: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
    icmp: &mut IcmpGate,
    counts: &mut BatchCounts,
    mut groups: Option<GroupSink<'_>>,
    mut opening: Option<&mut Opening<'_>>,
    gso_check: Option<&GsoCheck>,
    mut accept: impl FnMut(usize, &Ipv4Packet<&mut [u8]>),
) -> Option<(SocketAddrV4, usize)> {
    let len = buf.len();
    let step = segment.unwrap_or(len).max(1);
    let datagrams = len.div_ceil(step).max(1);
    counts.udp_receives += 1;
    counts.udp_rx_packets += datagrams as u64;
    counts.udp_rx_bytes += len as u64;
    let too_big = DropReason::TooBig as usize;
    if truncated {
        counts.drops[too_big] += datagrams as u64;
        return None;
    }
    if datagrams > MAX_RX_DATAGRAMS {
        counts.drops[too_big] += (datagrams - MAX_RX_DATAGRAMS) as u64;
    }
    let mut answer = None;
    let mut reply = Some(reply);
    for index in 0..datagrams.min(MAX_RX_DATAGRAMS) {
        let start = index * step;
        let end = (start + step).min(len);
        let Some(datagram) = buf.get_mut(start..end) else {
            counts.drop(DropReason::BadPacket);
            continue;
        };
        let Some(from) = from else {
            counts.drop(UNREADABLE_SENDER);
            continue;
        };
        let (at, datagram) = match opening.as_deref_mut().map(|o| o.open(from, datagram)) {
            None => (start, datagram),
            Some(Ok(opened)) => opened,
            Some(Err(Opened::Drop(reason))) => {
                counts.drop(reason);
                continue;
            }
            // A handshake message, answered through the outbox: nothing for the TUN.
            Some(Err(_)) => continue,
        };
        let out: &mut [u8] = match reply.as_deref_mut() {
            Some(out) => out,
            None => &mut [],
        };
        // A zero first byte is no IPv4 packet: a GSO check's probe or verdict, or junk.
        if let (Some(check), Some(0)) = (gso_check, datagram.first()) {
            match check.receive(*from.ip(), datagram, out) {
                Received::Answer(len) if icmp.admit() => {
                    reply = None;
                    answer = Some((from, len));
                }
                Received::Answer(_) => counts.icmp_suppressed += 1,
                Received::Taken => {}
                Received::Bad => counts.drop(DropReason::BadPacket),
            }
            continue;
        }
        // The one parse of the datagram: the decision and the coalescer both read this view.
        let (decision, ip) = match Ipv4Packet::new_checked(datagram) {
            Ok(mut ip) => (
                decide::from_peer_checked(from, &mut ip, table, policy, out),
                Some(ip),
            ),
            Err(error) => (decide::from_peer_malformed(from, table, error), None),
        };
        match decision {
            PeerDecision::WriteToTun => {
                if let Some(ip) = &ip {
                    accept(at, ip);
                }
            }
            PeerDecision::ReplyToPeer { to, len, reason } => {
                counts.drop(reason);
                if len > 0 && len <= REPLY_BUF_LEN && reply.is_some() {
                    if icmp.admit() {
                        reply = None;
                        answer = Some((to, len));
                    } else {
                        counts.icmp_suppressed += 1;
                    }
                }
            }
            PeerDecision::Drop(DropReason::NotOurs) => match (&mut groups, &ip) {
                // Off the hot path: only what is not for this host's subnet gets here.
                (Some(sink), Some(ip)) => {
                    match receive::from_peer(from, ip, table, policy, sink.delivery) {
                        Ok(header) => (sink.deliver)(&header, ip.as_bytes()),
                        Err(reason) => counts.drop(reason),
                    }
                }
                _ => counts.drop(DropReason::NotOurs),
            },
            PeerDecision::Drop(reason) => counts.drop(reason),
        }
    }
    answer
}

/// Where group traffic from peers goes on a host that takes some: what it takes, and the
/// function that writes a frame (`header`, then the packet) into the multicast TAP.
pub(crate) struct GroupSink<'a> {
    pub(crate) delivery: Delivery,
    pub(crate) deliver: &'a mut dyn FnMut(&[u8; ethernet::HEADER_LEN], &[u8]),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::testing::{assert_valid, Tcp};
    use crate::route::Overlay;
    use std::net::Ipv4Addr;

    fn peer() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285)
    }

    const POLICY: Policy = Policy {
        tun_mtu: 1472,
        allow_foreign_sources: false,
    };

    /// The host of 10.1.1.0/24; 198.18.0.2 holds 10.1.2.0/24 (the test packets' flow runs from
    /// 10.1.1.2 to 10.1.2.2).
    fn table(local: &str) -> RouteTable {
        let overlay = Overlay::new("10.1.0.0/16".parse().unwrap(), 24).unwrap();
        let (local, other, public) = if local == "10.1.1.0/24" {
            ("10.1.1.0/24", "10.1.2.0/24", "198.18.0.2")
        } else {
            ("10.1.2.0/24", "10.1.1.0/24", "198.18.0.1")
        };
        RouteTable::build(
            overlay,
            8285,
            Some(local.parse().unwrap()),
            [(other.parse().unwrap(), public.parse().unwrap())],
        )
        .unwrap()
    }

    #[test]
    fn group_traffic_from_a_peer_goes_to_the_sink_only_when_one_is_given() {
        use crate::multicast::relay::tests::frame;
        let routes = table("10.1.1.0/24");
        let group = frame("10.1.2.5", "239.1.1.1", 17, &[7; 8]);
        let group = &group[14..14 + 28];
        let forged = frame("10.1.3.5", "239.1.1.1", 17, &[7; 8]);
        let forged = &forged[14..14 + 28];
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut decide = |packet: &[u8], delivery: Option<Delivery>| {
            let mut buf = packet.to_vec();
            let mut counts = BatchCounts::default();
            let mut delivered = Vec::new();
            let mut deliver = |header: &[u8; ethernet::HEADER_LEN], packet: &[u8]| {
                delivered.push((header[..6].to_vec(), packet.to_vec()))
            };
            let sink = delivery.map(|delivery| GroupSink {
                delivery,
                deliver: &mut deliver,
            });
            decide_datagrams(
                Some(peer()),
                &mut buf,
                None,
                false,
                &routes,
                &POLICY,
                &mut reply,
                &mut IcmpGate::unlimited(),
                &mut counts,
                sink,
                None,
                None,
                |_, _: &Ipv4Packet<&mut [u8]>| panic!("nothing goes to the TUN"),
            );
            (counts, delivered)
        };
        let on = Delivery {
            multicast: true,
            broadcast: false,
        };
        let (counts, delivered) = decide(group, Some(on));
        assert_eq!(counts.drops, [0; DropReason::COUNT]);
        assert_eq!(delivered, [(vec![1, 0, 0x5e, 1, 1, 1], group.to_vec())]);
        let (counts, delivered) = decide(forged, Some(on));
        assert_eq!(counts.drops[DropReason::SpoofedSource as usize], 1);
        assert!(delivered.is_empty());
        for delivery in [None, Some(Delivery::default())] {
            let (counts, delivered) = decide(group, delivery);
            assert_eq!(
                counts.drops[DropReason::NotOurs as usize],
                1,
                "as without multicast"
            );
            assert!(delivered.is_empty());
        }
    }

    #[test]
    fn udp_to_the_networks_broadcast_goes_to_the_sink_with_its_checksum_completed() {
        use crate::wire::ipv4::checksum;
        use crate::wire::ipv4::testing::Spec;
        use crate::wire::vnet::NEEDS_CSUM;
        use std::cell::RefCell;

        struct Collect(RefCell<Vec<Vec<u8>>>);
        impl BroadcastSink for Collect {
            fn hand_off(&self, packet: &[u8]) {
                self.0.borrow_mut().push(packet.to_vec());
            }
        }
        let routes = table("10.1.1.0/24");
        let builder =
            etherparse::PacketBuilder::ipv4([10, 1, 1, 2], [10, 1, 255, 255], 64).udp(40000, 5001);
        let mut whole = Vec::new();
        builder.write(&mut whole, b"to all").unwrap();
        // The TUN may leave the UDP checksum partial: the pseudo header's sum, to be completed
        // over the bytes from the UDP header on.
        let mut partial = whole.clone();
        let pseudo = checksum::sum(&[&whole[12..20], &[0, 17], &whole[24..26]].concat());
        partial[26..28].copy_from_slice(&pseudo.to_be_bytes());
        let needs_csum = VnetHeader {
            flags: NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 6,
            ..VnetHeader::PLAIN
        };
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut decide = |header: &VnetHeader, packet: &[u8], sink: Option<&dyn BroadcastSink>| {
            let mut packet = packet.to_vec();
            let mut counts = BatchCounts::default();
            let action = decide_tun_read(
                header,
                &mut packet,
                &routes,
                &POLICY,
                &mut reply,
                &mut IcmpGate::unlimited(),
                &mut counts,
                sink,
                &PartialPeerTable::default(),
            );
            (action, counts)
        };
        let sink = Collect(RefCell::new(Vec::new()));
        for (header, packet) in [(&VnetHeader::PLAIN, &whole), (&needs_csum, &partial)] {
            let (action, counts) = decide(header, packet, Some(&sink));
            assert_eq!(action, TunAction::Recycle);
            assert_eq!(counts.drops, [0; DropReason::COUNT]);
            assert_eq!(counts.tun_rx_packets, 1);
        }
        assert_eq!(sink.0.take(), [whole.clone(), whole.clone()]);
        // Without a sink (broadcast off), and for anything but UDP, the address is routed as
        // any other: no lease holds 10.1.255.0/24.
        let icmp = Spec::icmp("10.1.1.2", "10.1.255.255", 8, 64).bytes();
        for (packet, sink) in [(&whole, None), (&icmp, Some(&sink as &dyn BroadcastSink))] {
            let (action, counts) = decide(&VnetHeader::PLAIN, packet, sink);
            assert!(matches!(action, TunAction::WriteReply { .. }), "{action:?}");
            assert_eq!(counts.drops[DropReason::NoRoute as usize], 1);
        }
        assert!(sink.0.take().is_empty());
    }

    #[test]
    fn super_packets_are_decided_once_and_counted_per_segment() {
        let spec = Tcp::new(1, 20_000);
        let (header, mut packet) = spec.super_packet(1420);
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut counts = BatchCounts::default();
        let routes = table("10.1.1.0/24");
        let action = decide_tun_read(
            &header,
            &mut packet,
            &routes,
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut counts,
            None,
            &PartialPeerTable::default(),
        );
        let TunAction::Send {
            to,
            len,
            segments: Some(segmenter),
        } = action
        else {
            panic!("{action:?}");
        };
        assert_eq!((to, len), (peer(), packet.len()));
        assert_eq!(segmenter.segments(), 15);
        assert_eq!(packet[8], 63, "the TTL dropped once, in the shared header");
        assert_eq!(counts.tun_rx_packets, 15);
        assert_eq!(counts.tun_rx_bytes, 20_000 + 15 * 52);
        assert_eq!(counts.drops, [0; DropReason::COUNT]);

        // Unroutable: one ICMP error, every segment counted as dropped.
        let mut other = spec.clone();
        other.dst = [10, 1, 9, 9];
        let (header, mut packet) = other.super_packet(1420);
        let mut counts = BatchCounts::default();
        let action = decide_tun_read(
            &header,
            &mut packet,
            &routes,
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut counts,
            None,
            &PartialPeerTable::default(),
        );
        assert!(matches!(action, TunAction::WriteReply { .. }), "{action:?}");
        assert_eq!(counts.drops[DropReason::NoRoute as usize], 15);

        // Not IPv4.
        let (header, mut packet) = spec.super_packet(1420);
        packet[0] = 0x60;
        let mut counts = BatchCounts::default();
        let action = decide_tun_read(
            &header,
            &mut packet,
            &routes,
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut counts,
            None,
            &PartialPeerTable::default(),
        );
        assert_eq!(action, TunAction::Recycle);
        assert_eq!(counts.drops[DropReason::NotIpv4 as usize], 1);
    }

    #[test]
    fn partial_checksums_are_completed_before_a_whole_packet_leaves() {
        let spec = Tcp::new(1, 1000);
        let (mut header, mut packet) = spec.super_packet(1420);
        header.gso_type = 0;
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut counts = BatchCounts::default();
        let routes = table("10.1.1.0/24");
        let action = decide_tun_read(
            &header,
            &mut packet,
            &routes,
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut counts,
            None,
            &PartialPeerTable::default(),
        );
        assert!(matches!(action, TunAction::Send { segments: None, .. }));
        assert_valid(&packet);
        let mut expected = spec.bytes();
        expected[8] -= 1;
        expected[10..12].copy_from_slice(&packet[10..12]);
        assert_eq!(packet, expected);
    }

    /// Decide on a TCP super-packet (or, with `gso_type` 0, a packet with a partial
    /// checksum) bound for 198.18.0.2 with `partial_peers`, and return the packets that go on
    /// the wire.
    fn sent(whole: bool, partial_peers: &PartialPeerTable) -> Vec<Vec<u8>> {
        let spec = Tcp::new(1, if whole { 1000 } else { 10_000 });
        let (mut header, mut packet) = spec.super_packet(1420);
        if whole {
            header.gso_type = 0;
        }
        let mut reply = [0u8; REPLY_BUF_LEN];
        let action = decide_tun_read(
            &header,
            &mut packet,
            &table("10.1.1.0/24"),
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut BatchCounts::default(),
            None,
            partial_peers,
        );
        let TunAction::Send { to, segments, .. } = action else {
            panic!("{action:?}");
        };
        assert_eq!(to, peer());
        match segments {
            None => vec![packet],
            Some(segmenter) => crate::offload::testing::segments_of(&segmenter, &packet),
        }
    }

    #[test]
    fn only_peers_that_take_them_get_partial_checksums() {
        let others = PartialPeerTable::new(["198.18.0.9".parse().unwrap()]);
        let this_one = PartialPeerTable::new([*peer().ip()]);
        for whole in [false, true] {
            // A flanneld (or any other) peer: every packet verifies, by etherparse.
            for peers in [&PartialPeerTable::default(), &others] {
                for packet in sent(whole, peers) {
                    assert_valid(&packet);
                }
            }
            // A peer that takes them: the checksums hold the pseudo-header sum; completed,
            // the packets are the ones any other peer gets.
            let complete = sent(whole, &others);
            let partial = sent(whole, &this_one);
            assert_eq!(partial.len(), complete.len());
            for (mut packet, complete) in partial.into_iter().zip(complete) {
                assert_ne!(packet, complete, "the checksum was left out");
                crate::offload::complete_checksum(&mut packet, 20, 36).unwrap();
                assert_eq!(packet, complete);
            }
        }
    }

    #[test]
    fn gso_probes_are_answered_and_junk_with_a_zero_byte_dropped() {
        use crate::gso_check::{probe_run, GsoCheck, PROBE_SEGMENT_LEN};
        let routes = table("10.1.2.0/24");
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 8285);
        let check = GsoCheck::default();
        let decide = |buf: &mut [u8], segment, counts: &mut BatchCounts| {
            let mut reply = [0u8; REPLY_BUF_LEN];
            let answer = decide_datagrams(
                Some(from),
                buf,
                segment,
                false,
                &routes,
                &POLICY,
                &mut reply,
                &mut IcmpGate::unlimited(),
                counts,
                None,
                None,
                Some(&check),
                |_, _: &Ipv4Packet<&mut [u8]>| panic!("nothing goes to the TUN"),
            );
            answer.map(|(to, len)| (to, reply[..len].to_vec()))
        };
        // A whole run in one GRO buffer: one verdict, intact, back to its sender.
        let mut run = probe_run(Ipv4Addr::new(198, 18, 0, 2), 77);
        let mut counts = BatchCounts::default();
        let (to, verdict) = decide(&mut run, Some(PROBE_SEGMENT_LEN), &mut counts).unwrap();
        assert_eq!(to, from);
        assert_eq!(
            crate::gso_check::parse(&verdict),
            Some(crate::gso_check::Message::Verdict {
                nonce: 77,
                intact: true
            })
        );
        assert!(counts.drops.iter().all(|d| *d == 0));
        // Junk whose first byte is zero, and an unexpected verdict: dropped as bad packets.
        for mut junk in [vec![0u8; 40], verdict] {
            let mut counts = BatchCounts::default();
            assert_eq!(decide(&mut junk, None, &mut counts), None);
            assert_eq!(counts.drops[DropReason::BadPacket as usize], 1);
        }
        assert_eq!(check.counts().bad, 2);
    }

    #[test]
    fn gro_buffers_are_split_and_every_datagram_decided() {
        let routes = table("10.1.2.0/24");
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 8285);
        let a = Tcp::new(0, 1420).bytes();
        let b = Tcp::new(1420, 1420).bytes();
        let mut expiring = Tcp::new(2840, 1420);
        expiring.ttl = 1;
        let c = expiring.bytes();
        let d = Tcp::new(4260, 100).bytes();
        let mut buf = [a.clone(), b.clone(), c, d.clone()].concat();
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut counts = BatchCounts::default();
        let mut accepted = Vec::new();
        let answer = decide_datagrams(
            Some(from),
            &mut buf,
            Some(1472),
            false,
            &routes,
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut counts,
            None,
            None,
            None,
            |offset, ip| accepted.push((offset, ip.as_bytes().len())),
        );
        assert_eq!(accepted, vec![(0, 1472), (1472, 1472), (3 * 1472, 152)]);
        assert!(matches!(answer, Some((to, _)) if to == from));
        assert_eq!(counts.udp_rx_packets, 4);
        assert_eq!(counts.udp_rx_bytes, buf.len() as u64);
        assert_eq!(counts.drops[DropReason::TtlExpired as usize], 1);
        assert_eq!(buf[8], 63, "TTLs drop in place");
        assert_eq!(buf[3 * 1472 + 8], 63);

        // A truncated buffer, an unreadable sender, a stranger.
        for (from, truncated, reason) in [
            (Some(from), true, DropReason::TooBig),
            (None, false, UNREADABLE_SENDER),
            (
                Some(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 8285)),
                false,
                DropReason::UnknownPeer,
            ),
        ] {
            let mut buf = [a.clone(), b.clone()].concat();
            let mut counts = BatchCounts::default();
            let answer = decide_datagrams(
                from,
                &mut buf,
                Some(1472),
                truncated,
                &routes,
                &POLICY,
                &mut reply,
                &mut IcmpGate::unlimited(),
                &mut counts,
                None,
                None,
                None,
                |_, _: &Ipv4Packet<&mut [u8]>| panic!("nothing is accepted"),
            );
            assert_eq!(answer, None);
            assert_eq!(counts.drops[reason as usize], 2, "{reason:?}");
        }

        // More datagrams than a buffer may hold: the excess is dropped as too big.
        let small = Tcp::new(0, 1).bytes();
        let mut buf = small.repeat(MAX_RX_DATAGRAMS + 3);
        let mut counts = BatchCounts::default();
        let mut seen = 0;
        decide_datagrams(
            Some(from),
            &mut buf,
            Some(small.len()),
            false,
            &routes,
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut counts,
            None,
            None,
            None,
            |_, _: &Ipv4Packet<&mut [u8]>| seen += 1,
        );
        assert_eq!(seen, MAX_RX_DATAGRAMS);
        assert_eq!(counts.drops[DropReason::TooBig as usize], 3);
        // An empty datagram is one bad packet.
        let mut counts = BatchCounts::default();
        decide_datagrams(
            Some(from),
            &mut [],
            None,
            false,
            &routes,
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut counts,
            None,
            None,
            None,
            |_, _: &Ipv4Packet<&mut [u8]>| {},
        );
        assert_eq!(counts.drops[DropReason::BadPacket as usize], 1);
    }

    #[test]
    fn a_sealed_gro_run_opens_into_the_arena_packed_with_drops_skipped() {
        use crate::crypto::open::tests::{handshake, packet, pair, seal, A, B};
        let (a, b) = pair();
        let (_, mut opener) = handshake(&a, &b, &packet(10));
        let routes = table("10.1.2.0/24");
        let from = SocketAddrV4::new(A, 8285);
        let plain = [
            Tcp::new(0, 1420).bytes(),
            Tcp::new(1420, 1420).bytes(),
            Tcp::new(2840, 100).bytes(),
        ];
        let sealed: Vec<_> = plain.iter().map(|p| seal(&a, B, p)).collect();
        let mut tampered = seal(&a, B, &Tcp::new(9999, 1420).bytes());
        tampered[100] ^= 1;
        // Equal-sized datagrams but the last, as GRO merges them: a tampered one and a replay
        // of the first in the middle.
        let run = [&sealed[0], &tampered, &sealed[1], &sealed[0], &sealed[2]];
        let segment = sealed[0].len();
        let mut buf: Vec<u8> = run.iter().flat_map(|d| d.iter().copied()).collect();
        let mut arena = vec![0u8; buf.len()];
        let mut opening = Opening::new(&mut opener, &mut arena);
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut counts = BatchCounts::default();
        let mut accepted = Vec::new();
        decide_datagrams(
            Some(from),
            &mut buf,
            Some(segment),
            false,
            &routes,
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut counts,
            None,
            Some(&mut opening),
            None,
            |offset, ip| accepted.push((offset, ip.as_bytes().len())),
        );
        let used = opening.used();
        assert_eq!(accepted, [(0, 1472), (1472, 1472), (2944, 152)]);
        assert_eq!(used, 2944 + 152);
        assert_eq!(counts.udp_rx_packets, 5);
        assert_eq!(counts.drops[DropReason::Tampered as usize], 1);
        assert_eq!(counts.drops[DropReason::Replayed as usize], 1);
        assert_eq!(counts.drops.iter().sum::<u64>(), 2);
        // The packets are the ones sealed, as the same run in plaintext leaves them (with
        // their TTLs dropped).
        let mut expected = plain.concat();
        decide_datagrams(
            Some(from),
            &mut expected,
            Some(1472),
            false,
            &routes,
            &POLICY,
            &mut reply,
            &mut IcmpGate::unlimited(),
            &mut BatchCounts::default(),
            None,
            None,
            None,
            |_, _: &Ipv4Packet<&mut [u8]>| {},
        );
        assert_eq!(expected[8], 63);
        assert_eq!(arena[..used], expected);
    }

    #[test]
    fn icmp_errors_over_the_rate_are_suppressed_and_counted() {
        use crate::icmp_limit::IcmpRateLimit;
        use crate::wire::ipv4::testing::Spec;
        let limit = IcmpRateLimit {
            per_second: 1,
            burst: 2,
        };
        // From the TUN: five packets nobody leases a route for.
        let routes = table("10.1.1.0/24");
        let mut gate = IcmpGate::new(limit);
        gate.set_time(5_000_000_000);
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut counts = BatchCounts::default();
        let actions: Vec<TunAction> = (0..5)
            .map(|_| {
                let mut packet = Spec::udp("10.1.1.2", "10.1.9.9", 100).bytes();
                decide_tun_read(
                    &VnetHeader::PLAIN,
                    &mut packet,
                    &routes,
                    &POLICY,
                    &mut reply,
                    &mut gate,
                    &mut counts,
                    None,
                    &PartialPeerTable::default(),
                )
            })
            .collect();
        let replies = actions
            .iter()
            .filter(|a| matches!(a, TunAction::WriteReply { .. }))
            .count();
        assert_eq!(replies, 2);
        assert_eq!(counts.icmp_suppressed, 3);
        assert_eq!(counts.drops[DropReason::NoRoute as usize], 5);
        // A second later the bucket holds one more.
        gate.set_time(6_000_000_000);
        let mut packet = Spec::udp("10.1.1.2", "10.1.9.9", 100).bytes();
        let action = decide_tun_read(
            &VnetHeader::PLAIN,
            &mut packet,
            &routes,
            &POLICY,
            &mut reply,
            &mut gate,
            &mut counts,
            None,
            &PartialPeerTable::default(),
        );
        assert!(matches!(action, TunAction::WriteReply { .. }), "{action:?}");

        // From a peer: datagrams whose TTL runs out, one per receive.
        let routes = table("10.1.2.0/24");
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 8285);
        let mut gate = IcmpGate::new(limit);
        gate.set_time(5_000_000_000);
        let mut counts = BatchCounts::default();
        let mut answers = 0;
        for _ in 0..4 {
            let mut expiring = Tcp::new(0, 100);
            expiring.ttl = 1;
            let mut buf = expiring.bytes();
            let answer = decide_datagrams(
                Some(from),
                &mut buf,
                None,
                false,
                &routes,
                &POLICY,
                &mut reply,
                &mut gate,
                &mut counts,
                None,
                None,
                None,
                |_, _: &Ipv4Packet<&mut [u8]>| panic!("nothing is accepted"),
            );
            answers += usize::from(answer.is_some());
        }
        assert_eq!(answers, 2);
        assert_eq!(counts.icmp_suppressed, 2);
        assert_eq!(counts.drops[DropReason::TtlExpired as usize], 4);
    }
}
