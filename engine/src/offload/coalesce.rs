//! Merging consecutive TCP segments (and UDP datagrams) of one flow into a super-packet for
//! the TUN, as Linux GRO does, so that the kernel takes one 64 KiB packet instead of
//! forty-five small ones.
//!
//! The [`Coalescer`] sees the packets of a batch in arrival order ([`Coalescer::push`]) and
//! sorts them into [`Group`]s: a group is either one packet written as it is, or a run of
//! segments that become one super-packet — the first packet whole, then the payloads of the
//! others. A segment joins the open group of its flow (same protocol, addresses and ports)
//! when:
//!
//! - both are IPv4 without options, with DF and no other flag, not a fragment, with the same
//!   TOS and TTL;
//! - for TCP, both are plain data segments: ACK number, header flags (all but PSH and FIN),
//!   window and TCP options the same as the group's first, no SYN, RST, URG or CWR, and a
//!   payload; and it continues the group's sequence space exactly;
//! - for UDP (only with [`Coalescer::set_udp`], for a TUN that takes UDP super-packets), both
//!   carry a checksum and a payload, the IP identification follows the group's by one (the
//!   kernel numbers the datagrams it cuts that way, as Linux GRO requires), and the TTL is
//!   above 1; the kernel cuts the super-packet back into the same datagrams, byte for byte,
//!   before any socket sees them (a TCP super-packet's segments get consecutive IP
//!   identifications too, which for DF packets carry no meaning, RFC 6864);
//! - its payload is no larger than the first segment's (the segment size), and the group has
//!   taken no shorter segment, PSH or FIN yet — those end a group;
//! - its checksum verifies (a super-packet's checksum is completed by the kernel, so a bad
//!   segment must never be hidden inside one) — unless it came from a peer whose packets are
//!   covered by the outer UDP checksum alone ([`Coalescer::push_from_partial_peer`], see
//!   [`crate::offload::partial`]);
//! - the super-packet stays within 65 535 bytes and [`MAX_SEGMENTS`] segments.
//!
//! Anything else starts a new group, and a packet of a flow that cannot join ends the flow's
//! open group, so packets of one flow are never reordered: groups are written in the order of
//! their first packets, and a flow's later packets always land in a later group. Packets of
//! different flows may pass each other, as they may in any router.

use crate::wire::ipv4::{checksum, protocol, Ipv4Packet, MIN_HEADER_LEN};
use crate::wire::tcp::{self, TcpHeader};
use crate::wire::udp::{self, UdpHeader};
use crate::wire::vnet::{VnetHeader, GSO_ECN, GSO_TCPV4, GSO_UDP_L4, NEEDS_CSUM};
use crate::wire::{pseudo_header_sum, put16};

use super::partial::Partial;

/// The most segments one super-packet carries.
pub const MAX_SEGMENTS: usize = 64;

/// The largest IPv4 packet, and so the largest super-packet.
const MAX_PACKET_LEN: usize = 65_535;

/// How many flows may have an open group at once; a new flow beyond that closes the oldest.
const MAX_OPEN_FLOWS: usize = 8;

/// The end of a member list.
const NONE: u32 = u32::MAX;

/// Sorts a batch of packets bound for the TUN into groups. Reused from batch to batch:
/// [`Coalescer::clear`] keeps its memory.
#[derive(Debug, Default)]
pub struct Coalescer {
    /// For each packet pushed, the next packet of its group.
    next: Vec<u32>,
    groups: Vec<Group>,
    /// Indexes into `groups` of the groups still open to more segments, one per flow.
    open: Vec<u32>,
    /// Whether UDP datagrams are merged too.
    udp: bool,
}

/// One write to the TUN: a packet as it is, or a run of segments merged into a super-packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    head: u32,
    tail: u32,
    count: u32,
    run: Option<Run>,
    /// The first packet came from a peer that may leave inner checksums partial: where its
    /// checksum lies, to be written as partial even when it stays alone.
    partial: Option<Partial>,
}

/// What a group of segments must keep equal, and how far it has grown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    flow: Flow,
    /// The IPv4 and transport headers' length (the IPv4 header is always 20 bytes).
    header_len: u16,
    /// The first segment's payload: every segment but the last carries exactly this much.
    gso_size: u16,
    /// Payload bytes of all segments so far.
    payload: u32,
    tos: u8,
    ttl: u8,
    /// The IP identification the next datagram must have (UDP).
    next_ident: u16,
    /// PSH and FIN of the last segment, which the super-packet carries (TCP).
    final_flags: u8,
    /// Whether the group takes more segments.
    open: bool,
    stream: Option<Stream>,
}

/// What a run of TCP segments keeps equal besides the IP fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stream {
    /// The sequence number the next segment must have.
    next_seq: u32,
    ack: u32,
    /// TCP bytes 12..16 (data offset, flags, window) with PSH, FIN and CWR masked out.
    word: u32,
    options: [u8; 40],
}

/// A TCP connection or UDP flow as seen in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Flow {
    protocol: u8,
    src: [u8; 4],
    dst: [u8; 4],
    ports: [u8; 4],
}

/// What a pushed packet is to the coalescer.
enum Kind {
    /// A data segment (or datagram) that may join or start a run.
    Segment(Segment),
    /// A packet of `Flow` that must be written alone.
    Alone(Flow),
    /// Anything else.
    Other,
}

/// A data segment's (or datagram's) fields, read once.
struct Segment {
    flow: Flow,
    header_len: u16,
    payload: u32,
    tos: u8,
    ttl: u8,
    ident: u16,
    /// TCP flags (0 for UDP).
    flags: u8,
    /// TCP's sequence fields; `None` for UDP.
    tcp: Option<TcpFields>,
}

/// The TCP fields a segment is matched on.
struct TcpFields {
    seq: u32,
    ack: u32,
    word: u32,
    options: [u8; 40],
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// Merge UDP datagrams too (off by default). Only for a TUN that takes UDP super-packets
    /// (`TUN_F_USO4`, Linux 6.2 and later), which the kernel cuts back into the datagrams.
    pub fn set_udp(&mut self, on: bool) {
        self.udp = on;
    }

    /// Forget the batch, keeping the memory.
    pub fn clear(&mut self) {
        self.next.clear();
        self.groups.clear();
        self.open.clear();
    }

    /// How many packets were pushed since the last [`Coalescer::clear`].
    pub fn len(&self) -> usize {
        self.next.len()
    }

    /// Whether no packet was pushed.
    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }

    /// Add the next packet of the batch, checking it first. One that is not a well-formed
    /// IPv4 packet is written alone and, since its flow is unknown, ends every open run, so
    /// that nothing passes it. It is known from now on by its position in the batch, counting
    /// from 0.
    pub fn push(&mut self, packet: &[u8]) {
        match Ipv4Packet::new_checked(packet) {
            Ok(ip) => self.push_checked(&ip),
            Err(_) => {
                self.open.clear();
                self.push_kind(Kind::Other, None);
            }
        }
    }

    /// Add the next packet of the batch, already checked (by the receive decision, so that it
    /// is parsed once).
    pub fn push_checked<T: AsRef<[u8]>>(&mut self, ip: &Ipv4Packet<T>) {
        self.push_kind(classify(ip, self.udp, false), None);
    }

    /// As [`Coalescer::push_checked`], for a packet from a peer whose inner checksums may be
    /// partial (covered by the outer UDP checksum the kernel verified): it joins a run without
    /// its checksum being verified, and even alone it is written as partial
    /// ([`Group::finish`]) when it is a TCP segment or a UDP datagram with a checksum.
    pub fn push_from_partial_peer<T: AsRef<[u8]>>(&mut self, ip: &Ipv4Packet<T>) {
        self.push_kind(classify(ip, self.udp, true), Partial::of(ip));
    }

    fn push_kind(&mut self, kind: Kind, partial: Option<Partial>) {
        let index = self.next.len() as u32;
        self.next.push(NONE);
        match kind {
            Kind::Segment(segment) => {
                if let Some(slot) = self.open_slot(&segment.flow) {
                    let group = self.open[slot] as usize;
                    if self.groups[group].append(&segment) {
                        let tail = self.groups[group].tail as usize;
                        self.next[tail] = index;
                        self.groups[group].tail = index;
                        self.groups[group].count += 1;
                        if !self.groups[group].is_open() {
                            self.open.swap_remove(slot);
                        }
                        return;
                    }
                    self.open.swap_remove(slot);
                }
                let run = Run::start(&segment);
                let keep_open = run.open;
                self.groups.push(Group::new(index, Some(run), partial));
                if keep_open {
                    self.track(self.groups.len() as u32 - 1);
                }
            }
            Kind::Alone(flow) => {
                if let Some(slot) = self.open_slot(&flow) {
                    self.open.swap_remove(slot);
                }
                self.groups.push(Group::new(index, None, partial));
            }
            Kind::Other => self.groups.push(Group::new(index, None, partial)),
        }
    }

    /// The groups, in the order they must be written.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The packets of `group`, in order: the first is written whole, the others without their
    /// first [`Group::header_len`] bytes.
    pub fn members<'a>(&'a self, group: &Group) -> impl Iterator<Item = usize> + 'a {
        let mut at = group.head;
        std::iter::from_fn(move || {
            if at == NONE {
                return None;
            }
            let this = at;
            at = self.next.get(at as usize).copied().unwrap_or(NONE);
            Some(this as usize)
        })
    }

    fn open_slot(&self, flow: &Flow) -> Option<usize> {
        self.open.iter().position(|&group| {
            self.groups
                .get(group as usize)
                .and_then(|g| g.run.as_ref())
                .is_some_and(|run| run.flow == *flow)
        })
    }

    /// Keep `group` open for its flow, closing the oldest open group if there are too many.
    fn track(&mut self, group: u32) {
        if self.open.len() == MAX_OPEN_FLOWS {
            let oldest = (0..self.open.len()).min_by_key(|&slot| self.open[slot]);
            if let Some(slot) = oldest {
                self.open.swap_remove(slot);
            }
        }
        self.open.push(group);
    }
}

impl Group {
    fn new(head: u32, run: Option<Run>, partial: Option<Partial>) -> Group {
        Group {
            head,
            tail: head,
            count: 1,
            run,
            partial,
        }
    }

    /// The first packet's position in the batch.
    pub fn head(&self) -> usize {
        self.head as usize
    }

    /// How many packets the group holds.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Always false: a group holds at least one packet.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether the group merges several segments into a super-packet.
    pub fn is_super_packet(&self) -> bool {
        self.count > 1
    }

    /// The header bytes every member after the first leaves out (0 for a single packet).
    pub fn header_len(&self) -> usize {
        match &self.run {
            Some(run) if self.count > 1 => usize::from(run.header_len),
            _ => 0,
        }
    }

    /// The super-packet's length: the first packet's headers and every member's payload (for
    /// a single packet, whatever its length is: 0 here).
    pub fn super_len(&self) -> usize {
        match &self.run {
            Some(run) if self.count > 1 => usize::from(run.header_len) + run.payload as usize,
            _ => 0,
        }
    }

    fn is_open(&self) -> bool {
        self.run.as_ref().is_some_and(|run| run.open)
    }

    /// Turn the group's first packet, `head`, into the super-packet's header and return the
    /// virtio-net header to write before it: total length and header checksum for the whole,
    /// the last segment's PSH and FIN, and in the TCP checksum field the pseudo-header sum
    /// that the kernel completes. A single packet gets a plain header and is left alone —
    /// unless it came from a peer whose inner checksums may be partial, when its checksum
    /// field is made partial too.
    pub fn finish(&self, head: &mut [u8]) -> VnetHeader {
        let Some(run) = self.run.as_ref().filter(|_| self.count > 1) else {
            return self
                .partial
                .and_then(|partial| partial.finish(head))
                .unwrap_or(VnetHeader::PLAIN);
        };
        let ip_len = MIN_HEADER_LEN;
        let total = usize::from(run.header_len) + run.payload as usize;
        let (Ok(total16), Ok(transport_len)) =
            (u16::try_from(total), u16::try_from(total - ip_len))
        else {
            return VnetHeader::PLAIN;
        };
        if head.len() < usize::from(run.header_len) {
            return VnetHeader::PLAIN;
        }
        put16(head, 2, total16);
        put16(head, 10, 0);
        let ip_check = checksum::of(&head[..ip_len]);
        put16(head, 10, ip_check);
        let partial =
            pseudo_header_sum(run.flow.src, run.flow.dst, run.flow.protocol, transport_len);
        if run.stream.is_none() {
            // The kernel cuts a UDP super-packet by `gso_size` and rewrites each datagram's
            // length and checksum from these.
            put16(head, ip_len + udp::LENGTH, transport_len);
            put16(head, ip_len + udp::CHECKSUM, partial);
            return VnetHeader {
                flags: NEEDS_CSUM,
                gso_type: GSO_UDP_L4,
                hdr_len: run.header_len,
                gso_size: run.gso_size,
                csum_start: ip_len as u16,
                csum_offset: udp::CHECKSUM as u16,
            };
        }
        head[ip_len + tcp::FLAGS] |= run.final_flags;
        put16(head, ip_len + tcp::CHECKSUM, partial);
        let cwr = head[ip_len + tcp::FLAGS] & tcp::CWR != 0;
        VnetHeader {
            flags: NEEDS_CSUM,
            gso_type: GSO_TCPV4 | if cwr { GSO_ECN } else { 0 },
            hdr_len: run.header_len,
            gso_size: run.gso_size,
            csum_start: ip_len as u16,
            csum_offset: tcp::CHECKSUM as u16,
        }
    }

    /// Whether `segment` extends this group; if so, the group now counts it.
    fn append(&mut self, segment: &Segment) -> bool {
        let count = self.count as usize;
        let Some(run) = self.run.as_mut() else {
            return false;
        };
        let fits = run.open
            && count < MAX_SEGMENTS
            && segment.flow == run.flow
            && segment.header_len == run.header_len
            && segment.payload <= u32::from(run.gso_size)
            && usize::from(run.header_len) + (run.payload + segment.payload) as usize
                <= MAX_PACKET_LEN
            && segment.tos == run.tos
            && segment.ttl == run.ttl;
        let continues = match (&mut run.stream, &segment.tcp) {
            (Some(stream), Some(tcp)) => {
                tcp.seq == stream.next_seq
                    && tcp.ack == stream.ack
                    && tcp.word == stream.word
                    && segment.flags & tcp::CWR == 0
                    && tcp.options == stream.options
            }
            (None, None) => segment.ident == run.next_ident,
            _ => false,
        };
        if !(fits && continues) {
            return false;
        }
        run.payload += segment.payload;
        run.next_ident = segment.ident.wrapping_add(1);
        if let Some(stream) = &mut run.stream {
            stream.next_seq = stream.next_seq.wrapping_add(segment.payload);
        }
        run.final_flags = segment.flags & (tcp::PSH | tcp::FIN);
        run.open = segment.payload == u32::from(run.gso_size) && run.final_flags == 0;
        true
    }
}

impl Run {
    fn start(segment: &Segment) -> Run {
        let final_flags = segment.flags & (tcp::PSH | tcp::FIN);
        Run {
            flow: segment.flow,
            header_len: segment.header_len,
            gso_size: segment.payload as u16,
            payload: segment.payload,
            tos: segment.tos,
            ttl: segment.ttl,
            next_ident: segment.ident.wrapping_add(1),
            final_flags: 0,
            open: final_flags == 0,
            stream: segment.tcp.as_ref().map(|tcp| Stream {
                next_seq: tcp.seq.wrapping_add(segment.payload),
                ack: tcp.ack,
                word: tcp.word,
                options: tcp.options,
            }),
        }
    }
}

/// Read what the coalescer needs from a checked packet; UDP datagrams are segments only when
/// `udp`.
/// `covered` when the packet's checksum needs no verifying (see
/// [`Coalescer::push_from_partial_peer`]).
fn classify<T: AsRef<[u8]>>(ip: &Ipv4Packet<T>, udp: bool, covered: bool) -> Kind {
    let protocol = ip.protocol();
    let is_udp = protocol == protocol::UDP && udp;
    if protocol != protocol::TCP && !is_udp {
        return Kind::Other;
    }
    let ip_len = ip.header_len();
    let transport = ip.payload();
    let Some(&ports) = transport.first_chunk::<4>() else {
        return Kind::Other;
    };
    let flow = Flow {
        protocol,
        src: ip.src().octets(),
        dst: ip.dst().octets(),
        ports,
    };
    let alone = Kind::Alone(flow);
    // DF alone: not a fragment, and no reserved bit, which the kernel would copy from the
    // first packet to every one it cuts.
    if ip_len != MIN_HEADER_LEN || ip.flags_and_offset() != 0x4000 {
        return alone;
    }
    let ident = ip.ident();
    // Only segments that verify may hide inside a super-packet.
    let Ok(transport_len) = u16::try_from(transport.len()) else {
        return alone;
    };
    let verifies = || {
        if covered {
            return true;
        }
        let pseudo = pseudo_header_sum(flow.src, flow.dst, protocol, transport_len);
        checksum::add(pseudo, super::checksum::sum(transport)) == 0xffff
    };
    if is_udp {
        // A datagram without a checksum (zero) would get one when the kernel cuts the
        // super-packet: it is written as it came. So is one whose TTL runs out at the next
        // hop, so that each gets its own ICMP time exceeded.
        let Ok(datagram) = UdpHeader::new_checked(transport) else {
            return alone;
        };
        let payload = datagram.payload().len();
        if payload == 0
            || ip.ttl() <= 1
            || datagram.length() != transport_len
            || datagram.checksum() == 0
            || !verifies()
        {
            return alone;
        }
        return Kind::Segment(Segment {
            flow,
            header_len: (ip_len + udp::HEADER_LEN) as u16,
            payload: payload as u32,
            tos: ip.tos(),
            ttl: ip.ttl(),
            ident,
            flags: 0,
            tcp: None,
        });
    }
    let Ok(segment) = TcpHeader::new_checked(transport) else {
        return alone;
    };
    let tcp_len = segment.header_len();
    let payload = segment.payload().len();
    let flags = segment.flags();
    if payload == 0 || flags & (tcp::SYN | tcp::RST | tcp::URG) != 0 || !verifies() {
        return alone;
    }
    let (seq, ack, word) = (segment.seq(), segment.ack(), segment.offset_flags_window());
    let mut options = [0u8; 40];
    options[..tcp_len - tcp::MIN_HEADER_LEN].copy_from_slice(segment.options());
    let masked = u32::from(tcp::PSH | tcp::FIN | tcp::CWR) << 16;
    Kind::Segment(Segment {
        flow,
        header_len: (ip_len + tcp_len) as u16,
        payload: payload as u32,
        tos: ip.tos(),
        ttl: ip.ttl(),
        ident,
        flags,
        tcp: Some(TcpFields {
            seq,
            ack,
            word: word & !masked,
            options,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::segment::Plan;
    use crate::offload::testing::{assert_valid, segments_of, Tcp};
    use crate::wire::ipv4::testing::{Rng, Spec};
    use crate::wire::{be16, be32};

    /// Run `packets` through a coalescer and return each write as the TUN would receive it:
    /// the virtio-net header and the bytes.
    fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHeader, Vec<u8>)> {
        coalesce_with(packets, false)
    }

    /// As [`coalesce`], merging UDP datagrams too when `udp`.
    fn coalesce_with(packets: &[Vec<u8>], udp: bool) -> Vec<(VnetHeader, Vec<u8>)> {
        coalesce_from(packets, udp, false)
    }

    /// As [`coalesce_with`]; `partial_peer`: every packet came from a peer whose inner
    /// checksums may be partial.
    fn coalesce_from(
        packets: &[Vec<u8>],
        udp: bool,
        partial_peer: bool,
    ) -> Vec<(VnetHeader, Vec<u8>)> {
        let mut coalescer = Coalescer::new();
        coalescer.set_udp(udp);
        for packet in packets {
            if partial_peer {
                coalescer.push_from_partial_peer(&Ipv4Packet::new_checked(&packet[..]).unwrap());
            } else {
                coalescer.push(packet);
            }
        }
        assert_eq!(coalescer.len(), packets.len());
        let mut seen = vec![false; packets.len()];
        let mut out = Vec::new();
        for group in coalescer.groups() {
            let members: Vec<usize> = coalescer.members(group).collect();
            assert_eq!(members.len(), group.len());
            assert_eq!(members[0], group.head());
            assert!(members.windows(2).all(|w| w[0] < w[1]), "members in order");
            let mut head = packets[group.head()].clone();
            let header = group.finish(&mut head);
            let mut bytes = head;
            for &member in &members[1..] {
                bytes.extend_from_slice(&packets[member][group.header_len()..]);
            }
            if group.is_super_packet() {
                assert_eq!(bytes.len(), group.super_len());
            }
            for member in members {
                assert!(!seen[member], "packet {member} in two groups");
                seen[member] = true;
            }
            out.push((header, bytes));
        }
        assert!(seen.iter().all(|s| *s), "every packet is written");
        out
    }

    /// Cut a super-packet with the engine's segmenter.
    fn cut(header: &VnetHeader, packet: &[u8]) -> Vec<Vec<u8>> {
        let Plan::Segment(segmenter) = Plan::new(header, packet).unwrap() else {
            panic!("not a super-packet");
        };
        segments_of(&segmenter, packet)
    }

    /// Cut a super-packet as for a peer that takes partial inner checksums.
    fn cut_partial(header: &VnetHeader, packet: &[u8]) -> Vec<Vec<u8>> {
        let Plan::Segment(segmenter) = Plan::new(header, packet).unwrap() else {
            panic!("not a super-packet");
        };
        segments_of(&segmenter.with_partial_checksums(), packet)
    }

    /// Complete a super-packet's checksums, as the kernel will: the bytes a receiver sees.
    fn completed(header: &VnetHeader, packet: &[u8]) -> Vec<u8> {
        let mut packet = packet.to_vec();
        if header.needs_csum() {
            let start = usize::from(header.csum_start);
            let field = start + usize::from(header.csum_offset);
            crate::offload::complete_checksum(&mut packet, start, field).unwrap();
        }
        packet
    }

    #[test]
    fn segments_coalesce_back_into_the_super_packet() {
        for (len, gso) in [(64_000, 1448), (10_000, 1000), (4_345, 1448), (2_000, 1000)] {
            for (psh, fin, cwr) in [
                (false, false, false),
                (true, false, true),
                (true, true, false),
            ] {
                let mut spec = Tcp::new(0xffff_0000, len);
                spec.psh = psh;
                spec.fin = fin;
                spec.cwr = cwr;
                let (header, packet) = spec.super_packet(gso);
                let segments = cut(&header, &packet);
                let writes = coalesce(&segments);
                assert_eq!(writes.len(), 1, "{len}/{gso}");
                let (vnet, bytes) = &writes[0];
                assert_eq!(vnet, &header, "{len}/{gso}");
                assert_eq!(bytes, &packet, "{len}/{gso}");
                assert_valid(&completed(vnet, bytes));
            }
        }
    }

    #[test]
    fn segments_cut_with_partial_checksums_arrive_whole() {
        // TCP: whole runs, a short last segment, and segments that stay alone (PSH ends
        // each group of two); every write, completed as the kernel completes it, holds exactly
        // the bytes the complete segments would have.
        for (len, gso, psh) in [
            (64_000, 1448, false),
            (4_345, 1448, true),
            (900, 1448, true),
        ] {
            let mut spec = Tcp::new(0x1000, len);
            spec.psh = psh;
            let (header, packet) = spec.super_packet(gso);
            let partial = cut_partial(&header, &packet);
            let complete = cut(&header, &packet);
            assert_ne!(partial, complete, "the checksums were left out");
            let writes = coalesce_from(&partial, false, true);
            let written: Vec<Vec<u8>> = writes
                .iter()
                .map(|(vnet, bytes)| {
                    assert!(vnet.needs_csum(), "every write asks for its checksum");
                    completed(vnet, bytes)
                })
                .collect();
            let expected: Vec<Vec<u8>> = coalesce(&complete)
                .iter()
                .map(|(vnet, bytes)| completed(vnet, bytes))
                .collect();
            assert_eq!(written, expected, "{len}/{gso}");
            assert_eq!(written.len(), 1);
            assert_eq!(written[0], spec.bytes());
        }
        // The same segments one by one (a batch of one each).
        let (header, packet) = Tcp::new(5, 5_000).super_packet(1448);
        for (partial, complete) in cut_partial(&header, &packet)
            .iter()
            .zip(cut(&header, &packet))
        {
            let writes = coalesce_from(std::slice::from_ref(partial), false, true);
            let (vnet, bytes) = &writes[0];
            assert!(vnet.needs_csum() && !vnet.is_gso());
            assert_eq!(completed(vnet, bytes), complete);
        }
        // UDP, merged and alone.
        for udp in [true, false] {
            let (header, packet) = crate::offload::testing::udp(10 * 1000 + 17, 1000);
            let partial = cut_partial(&header, &packet);
            let complete = cut(&header, &packet);
            let writes = coalesce_from(&partial, udp, true);
            assert_eq!(writes.len(), if udp { 1 } else { 11 });
            let mut again = Vec::new();
            for (vnet, bytes) in &writes {
                assert!(vnet.needs_csum());
                let whole = completed(vnet, bytes);
                if vnet.is_gso() {
                    again.extend(cut(vnet, &whole));
                } else {
                    again.push(whole);
                }
            }
            assert_eq!(again, complete, "udp merged: {udp}");
        }
    }

    #[test]
    fn partial_checksums_from_other_peers_are_never_merged_or_marked() {
        let (header, packet) = Tcp::new(1, 10_000).super_packet(1448);
        let partial = cut_partial(&header, &packet);
        let writes = coalesce(&partial);
        assert_eq!(writes.len(), partial.len());
        for ((vnet, bytes), segment) in writes.iter().zip(&partial) {
            assert_eq!(vnet, &VnetHeader::PLAIN, "the kernel verifies it");
            assert_eq!(bytes, segment);
        }
    }

    #[test]
    fn many_small_segments_split_into_bounded_super_packets() {
        let spec = Tcp::new(1, 65_000);
        let (header, packet) = spec.super_packet(500);
        let segments = cut(&header, &packet);
        assert_eq!(segments.len(), 130);
        let writes = coalesce(&segments);
        assert_eq!(writes.len(), 3, "64 + 64 + 2 segments");
        let mut payload = Vec::new();
        for (vnet, bytes) in &writes {
            assert_eq!(vnet.gso_size, 500);
            payload.extend_from_slice(&assert_valid(&completed(vnet, bytes)));
        }
        assert_eq!(payload, spec.payload);
    }

    #[test]
    fn a_short_segment_ends_the_group() {
        let a = Tcp::new(0, 1000).bytes();
        let short = Tcp::new(1000, 400).bytes();
        let c = Tcp::new(1400, 1000).bytes();
        let writes = coalesce(&[a, short, c.clone()]);
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0].0.gso_size, 1000);
        assert_eq!(writes[0].1.len(), 52 + 1400);
        assert_eq!(writes[1], (VnetHeader::PLAIN, c));
    }

    #[test]
    fn a_larger_segment_does_not_follow_a_smaller_one() {
        let a = Tcp::new(0, 500).bytes();
        let b = Tcp::new(500, 1000).bytes();
        let writes = coalesce(&[a.clone(), b.clone()]);
        assert_eq!(writes, vec![(VnetHeader::PLAIN, a), (VnetHeader::PLAIN, b)]);
    }

    #[test]
    fn push_and_fin_end_the_group_on_the_last_segment() {
        let a = Tcp::new(0, 1000).bytes();
        let mut spec = Tcp::new(1000, 1000);
        spec.psh = true;
        let b = spec.bytes();
        let c = Tcp::new(2000, 1000).bytes();
        let writes = coalesce(&[a, b, c.clone()]);
        assert_eq!(writes.len(), 2);
        let header = &writes[0].1;
        assert_ne!(
            header[20 + 13] & tcp::PSH,
            0,
            "the super-packet carries PSH"
        );
        assert_eq!(writes[1], (VnetHeader::PLAIN, c));

        let mut spec = Tcp::new(1000, 1000);
        spec.fin = true;
        let writes = coalesce(&[Tcp::new(0, 1000).bytes(), spec.bytes()]);
        assert_eq!(writes.len(), 1);
        assert_ne!(writes[0].1[20 + 13] & tcp::FIN, 0);
    }

    #[test]
    fn control_segments_are_written_alone_and_keep_their_place() {
        for edit in [
            (|t: &mut Tcp| t.syn = true) as fn(&mut Tcp),
            |t| t.rst = true,
            |t| t.urg = true,
            |t| t.ece = true,
            |t| t.window = 1,
            |t| t.ack = 5,
            |t| t.ttl = 3,
            |t| t.tos = 4,
            |t| t.timestamps = Some((9, 9)),
            |t| t.timestamps = None,
            |t| t.dont_frag = false,
            |t| t.ip_options = vec![1, 1, 1, 0],
        ] {
            let a = Tcp::new(0, 1000).bytes();
            let mut spec = Tcp::new(1000, 1000);
            edit(&mut spec);
            let b = spec.bytes();
            let c = Tcp::new(2000, 1000).bytes();
            let writes = coalesce(&[a.clone(), b.clone(), c.clone()]);
            // The odd one out is never merged into the first group, and the third segment,
            // contiguous with the first, is not merged over it either.
            assert_eq!(writes.len(), 3, "{spec:?}");
            assert_eq!(writes[0], (VnetHeader::PLAIN, a));
            assert_eq!(writes[1].1[..], b[..]);
            assert_eq!(writes[2].1[..], c[..]);
        }
    }

    #[test]
    fn a_cwr_segment_may_start_a_group() {
        let mut spec = Tcp::new(0, 1000);
        spec.cwr = true;
        let writes = coalesce(&[spec.bytes(), Tcp::new(1000, 1000).bytes()]);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].0.gso_type, GSO_TCPV4 | GSO_ECN);
    }

    #[test]
    fn pure_acks_are_written_alone() {
        let ack = Tcp::new(0, 0).bytes();
        let writes = coalesce(&[ack.clone(), ack.clone()]);
        assert_eq!(
            writes,
            vec![(VnetHeader::PLAIN, ack.clone()), (VnetHeader::PLAIN, ack)]
        );
    }

    #[test]
    fn bad_checksums_are_never_merged() {
        let a = Tcp::new(0, 1000).bytes();
        let mut b = Tcp::new(1000, 1000).bytes();
        b[100] ^= 0xff;
        let c = Tcp::new(2000, 1000).bytes();
        let writes = coalesce(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(
            writes,
            vec![
                (VnetHeader::PLAIN, a),
                (VnetHeader::PLAIN, b),
                (VnetHeader::PLAIN, c)
            ]
        );
    }

    #[test]
    fn out_of_order_segments_are_not_merged_or_reordered() {
        let a = Tcp::new(0, 1000).bytes();
        let b = Tcp::new(1000, 1000).bytes();
        let c = Tcp::new(2000, 1000).bytes();
        let d = Tcp::new(3000, 1000).bytes();
        // c arrives before b. c and d are contiguous, but merging them would put d before b.
        let writes = coalesce(&[a.clone(), c.clone(), b.clone(), d.clone()]);
        let firsts: Vec<u32> = writes
            .iter()
            .map(|(_, bytes)| be32(bytes, 24).unwrap())
            .collect();
        assert_eq!(firsts, vec![0, 2000, 1000, 3000]);
        assert!(writes.iter().all(|(v, _)| *v == VnetHeader::PLAIN));
        // Retransmitted duplicates do not merge either.
        let writes = coalesce(&[a.clone(), a.clone()]);
        assert_eq!(writes.len(), 2);
        // In order again, they do.
        let writes = coalesce(&[a, b, c, d]);
        assert_eq!(writes.len(), 1);
    }

    #[test]
    fn interleaved_flows_each_coalesce_in_order() {
        let flow = |port: u16, seq: u32| {
            let mut spec = Tcp::new(seq, 1000);
            spec.sport = port;
            spec.bytes()
        };
        let mut packets = Vec::new();
        for i in 0..6 {
            packets.push(flow(1, i * 1000));
            packets.push(flow(2, 50_000 + i * 1000));
            if i == 2 {
                // Something else between them: an ICMP packet and a UDP one.
                packets.push(Spec::icmp("10.1.1.2", "10.1.2.2", 8, 84).bytes());
                packets.push(Spec::udp("10.1.1.2", "10.1.2.2", 300).bytes());
            }
        }
        let writes = coalesce(&packets);
        assert_eq!(writes.len(), 4);
        assert_eq!(writes[0].1.len(), 52 + 6000);
        assert_eq!(be16(&writes[0].1, 20).unwrap(), 1);
        assert_eq!(writes[1].1.len(), 52 + 6000);
        assert_eq!(be16(&writes[1].1, 20).unwrap(), 2);
        assert_eq!(writes[2].0, VnetHeader::PLAIN);
        assert_eq!(writes[3].0, VnetHeader::PLAIN);
    }

    #[test]
    fn a_flow_change_mid_batch_starts_a_new_group() {
        let mut other = Tcp::new(5000, 1000);
        other.dst = [10, 1, 2, 3];
        let packets = vec![
            Tcp::new(0, 1000).bytes(),
            Tcp::new(1000, 1000).bytes(),
            other.bytes(),
            Tcp::new(2000, 1000).bytes(),
        ];
        let writes = coalesce(&packets);
        assert_eq!(writes.len(), 2, "the first flow continues after the other");
        assert_eq!(writes[0].1.len(), 52 + 3000);
        assert_eq!(writes[1].1[..], packets[2][..]);
    }

    #[test]
    fn open_flows_are_bounded() {
        let batch = |flows: u16| {
            let mut packets = Vec::new();
            for round in 0..3u32 {
                for port in 0..flows {
                    let mut spec = Tcp::new(round * 1000, 1000);
                    spec.sport = port;
                    packets.push(spec.bytes());
                }
            }
            packets
        };
        // As many flows as can be open: each becomes one super-packet.
        let writes = coalesce(&batch(MAX_OPEN_FLOWS as u16));
        assert_eq!(writes.len(), MAX_OPEN_FLOWS);
        // More: groups are closed early, but every byte still arrives, in order per flow.
        let packets = batch(MAX_OPEN_FLOWS as u16 + 3);
        let writes = coalesce(&packets);
        for port in 0..MAX_OPEN_FLOWS as u16 + 3 {
            let written: Vec<u8> = writes
                .iter()
                .filter(|(_, b)| be16(b, 20) == Some(port))
                .flat_map(|(v, b)| assert_valid(&completed(v, b)))
                .collect();
            let pushed: Vec<u8> = packets
                .iter()
                .filter(|p| be16(p, 20) == Some(port))
                .flat_map(|p| p[52..].to_vec())
                .collect();
            assert_eq!(written, pushed);
        }
    }

    #[test]
    fn super_packets_stay_within_the_ip_limit() {
        let packets: Vec<Vec<u8>> = (0..50u32)
            .map(|i| Tcp::new(i * 1448, 1448).bytes())
            .collect();
        let writes = coalesce(&packets);
        assert_eq!(writes.len(), 2);
        assert!(writes[0].1.len() <= MAX_PACKET_LEN);
        assert_eq!(writes[0].1.len(), 52 + 45 * 1448);
        for (vnet, bytes) in writes {
            assert_valid(&completed(&vnet, &bytes));
        }
    }

    #[test]
    fn random_batches_keep_every_flow_in_order() {
        let mut rng = Rng::new(0x5eed);
        for _ in 0..200 {
            let flows = 1 + rng.below(4);
            let mut seqs = vec![0u32; flows];
            let mut packets = Vec::new();
            for _ in 0..rng.below(80) {
                let f = rng.below(flows);
                let len = if rng.below(5) == 0 {
                    rng.below(1448)
                } else {
                    1448
                };
                let mut spec = Tcp::new(seqs[f], len);
                spec.sport = f as u16;
                spec.psh = rng.below(10) == 0;
                if rng.below(20) == 0 {
                    spec.seq = spec.seq.wrapping_sub(1448);
                } else {
                    seqs[f] = seqs[f].wrapping_add(len as u32);
                }
                packets.push(spec.bytes());
            }
            let writes = coalesce(&packets);
            // Per flow, the bytes written are the bytes pushed, in the same order.
            for f in 0..flows {
                let pushed: Vec<u8> = packets
                    .iter()
                    .filter(|p| be16(p, 20) == Some(f as u16))
                    .flat_map(|p| p[52..].to_vec())
                    .collect();
                let written: Vec<u8> = writes
                    .iter()
                    .filter(|(_, b)| be16(b, 20) == Some(f as u16))
                    .flat_map(|(v, b)| assert_valid(&completed(v, b)))
                    .collect();
                assert_eq!(written, pushed);
            }
        }
    }

    #[test]
    fn anything_else_passes_through() {
        let mut rng = Rng::new(3);
        let mut coalescer = Coalescer::new();
        for _ in 0..500 {
            let len = rng.below(200);
            let bytes = rng.bytes(len);
            coalescer.push(&bytes);
        }
        assert_eq!(coalescer.groups().len(), 500);
        coalescer.clear();
        assert!(coalescer.is_empty() && coalescer.groups().is_empty());
        let mut head = vec![0u8; 3];
        let single = Group::new(0, None, None);
        assert_eq!(single.finish(&mut head), VnetHeader::PLAIN);
        assert_eq!(head, vec![0u8; 3]);
    }

    /// `count` datagrams of `size` payload bytes (the last `last` bytes) of one UDP flow,
    /// cut by the engine's segmenter from a USO super-packet, and that super-packet.
    fn datagrams(count: usize, size: u16, last: usize) -> (VnetHeader, Vec<u8>, Vec<Vec<u8>>) {
        let len = (count - 1) * usize::from(size) + last;
        let (header, packet) = crate::offload::testing::udp(len, size);
        let segments = cut(&header, &packet);
        assert_eq!(segments.len(), count);
        (header, packet, segments)
    }

    #[test]
    fn udp_datagrams_coalesce_back_into_the_super_packet() {
        for (count, size, last) in [
            (45, 1400, 1400),
            (10, 1000, 17),
            (2, 1444, 1),
            (64, 1000, 1000),
        ] {
            let (header, packet, segments) = datagrams(count, size, last);
            let writes = coalesce_with(&segments, true);
            assert_eq!(writes.len(), 1, "{count}x{size}");
            let (vnet, bytes) = &writes[0];
            assert_eq!(vnet, &header, "{count}x{size}");
            assert_eq!(vnet.gso_type, GSO_UDP_L4);
            assert_eq!(bytes, &packet, "{count}x{size}");
            // Cut again by the engine's segmenter, which numbers and checksums the datagrams as
            // the kernel does: the same datagrams, byte for byte, each one valid.
            let again = cut(vnet, &completed(vnet, bytes));
            assert_eq!(again, segments);
            for datagram in &again {
                assert_valid(datagram);
            }
        }
    }

    #[test]
    fn udp_is_left_alone_unless_asked() {
        let (_, _, segments) = datagrams(5, 1000, 1000);
        let writes = coalesce_with(&segments, false);
        assert_eq!(writes.len(), 5);
        for ((vnet, bytes), segment) in writes.iter().zip(&segments) {
            assert_eq!(vnet, &VnetHeader::PLAIN);
            assert_eq!(bytes, segment);
        }
    }

    #[test]
    fn udp_groups_end_at_a_short_datagram_and_never_take_a_bad_one() {
        let (_, _, mut segments) = datagrams(6, 1000, 1000);
        // A datagram shorter than the first ends the group after it; a larger one does not
        // join after a shorter one.
        let (_, _, short) = datagrams(1, 500, 500);
        let mut batch = segments[..2].to_vec();
        batch.push(with_ident(&short[0], 9));
        batch.extend_from_slice(&segments[2..4]);
        let writes = coalesce_with(&batch, true);
        let sizes: Vec<usize> = writes.iter().map(|(_, b)| b.len()).collect();
        assert_eq!(sizes, vec![28 + 2000 + 500, 28 + 2000]);

        // A bad checksum, a zero checksum, a fragment and a datagram without DF are each
        // written alone, and split the run around them.
        let mut bad = segments[1].clone();
        bad[40] ^= 0xff;
        let mut zero = segments[2].clone();
        put16(&mut zero, 26, 0);
        let mut no_df = segments[3].clone();
        no_df[6] &= !0x40;
        put16(&mut no_df, 10, 0);
        let check = checksum::of(&no_df[..20]);
        put16(&mut no_df, 10, check);
        segments[1] = bad.clone();
        segments[2] = zero.clone();
        segments[3] = no_df.clone();
        let writes = coalesce_with(&segments, true);
        let plain: Vec<&Vec<u8>> = writes
            .iter()
            .filter(|(v, _)| *v == VnetHeader::PLAIN)
            .map(|(_, b)| b)
            .collect();
        assert!(plain.contains(&&bad) && plain.contains(&&zero) && plain.contains(&&no_df));
        assert_eq!(writes.len(), 5, "nothing merges across them");
        assert_eq!(writes[4].0.gso_type, GSO_UDP_L4);
        assert_eq!(cut(&writes[4].0, &writes[4].1), segments[4..].to_vec());
    }

    /// `packet` with IP identification `ident` and its header checksum redone.
    fn with_ident(packet: &[u8], ident: u16) -> Vec<u8> {
        let mut packet = packet.to_vec();
        put16(&mut packet, 4, ident);
        put16(&mut packet, 10, 0);
        let check = checksum::of(&packet[..20]);
        put16(&mut packet, 10, check);
        packet
    }

    #[test]
    fn udp_datagrams_join_only_when_the_kernel_would_cut_them_back_the_same() {
        let (_, _, segments) = datagrams(4, 1000, 1000);
        let sizes = |batch: &[Vec<u8>]| -> Vec<usize> {
            coalesce_with(batch, true)
                .iter()
                .map(|(_, b)| b.len())
                .collect()
        };
        assert_eq!(sizes(&segments), vec![28 + 4000]);
        // The same identification on every datagram (an unconnected Linux socket sends 0),
        // or identifications out of step: the kernel would renumber them, so no merge.
        let same: Vec<Vec<u8>> = segments.iter().map(|d| with_ident(d, 0)).collect();
        assert_eq!(sizes(&same), vec![1028; 4]);
        let mut skipped = segments.clone();
        skipped[2] = with_ident(&segments[2], 100);
        skipped[3] = with_ident(&segments[3], 101);
        assert_eq!(sizes(&skipped), vec![28 + 2000, 28 + 2000]);
        // Identifications wrap.
        let wrapping: Vec<Vec<u8>> = segments
            .iter()
            .enumerate()
            .map(|(i, d)| with_ident(d, 0xfffe_u16.wrapping_add(i as u16)))
            .collect();
        assert_eq!(sizes(&wrapping), vec![28 + 4000]);
        // The reserved flag bit, and a TTL that runs out at the next hop: written alone.
        let mut evil = segments.clone();
        evil[1][6] |= 0x80;
        evil[1] = with_ident(&evil[1], u16::from_be_bytes([evil[1][4], evil[1][5]]));
        assert_eq!(sizes(&evil), vec![1028, 1028, 28 + 2000]);
        let mut dying = segments.clone();
        for datagram in &mut dying {
            datagram[8] = 1;
            *datagram = with_ident(datagram, u16::from_be_bytes([datagram[4], datagram[5]]));
        }
        assert_eq!(sizes(&dying), vec![1028; 4]);
    }

    #[test]
    fn udp_and_tcp_flows_with_the_same_ports_stay_apart() {
        let (_, _, datagrams) = datagrams(4, 1000, 1000);
        let tcp: Vec<Vec<u8>> = (0..4u32)
            .map(|i| {
                let mut segment = Tcp::new(1000 + i * 1000, 1000);
                (segment.sport, segment.dport) = (4000, 5000);
                segment.bytes()
            })
            .collect();
        let mut batch = Vec::new();
        for i in 0..4 {
            batch.push(datagrams[i].clone());
            batch.push(tcp[i].clone());
        }
        let writes = coalesce_with(&batch, true);
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0].0.gso_type, GSO_UDP_L4);
        assert_eq!(writes[1].0.gso_type, GSO_TCPV4);
        for (vnet, bytes) in &writes {
            let parts = cut(vnet, &completed(vnet, bytes));
            assert_eq!(parts.len(), 4);
        }
    }
}
