//! Cutting a super-packet read from the TUN into the IPv4 packets that go on the wire.
//!
//! [`Plan::for_packet`] reads the virtio-net header and the headers of a packet already checked
//! by [`Ipv4Packet::new_checked`] (the only IPv4 parser) and says what the packet needs: nothing, a checksum completed ([`complete_checksum`]), or segmentation by a
//! [`Segmenter`]. Segment `i` of a TCP super-packet carries payload bytes
//! `i * gso_size .. (i + 1) * gso_size` (the last may be shorter) behind a copy of the headers
//! in which the IP identification is the first one plus `i`, the total length, the sequence
//! number and both checksums are the segment's own, FIN and PSH are left only on the last
//! segment and CWR only on the first — what Linux's own TCP segmentation produces. A UDP
//! super-packet (USO) becomes datagrams with their own length and checksum.
//!
//! The segmenter writes only headers: the payload stays where it is, and the caller sends
//! each segment as two pieces (the header it wrote, the payload's place in the super-packet),
//! so the payload is read once, for its checksum, and copied only by the kernel.

use std::ops::Range;

use crate::counters::DropReason;
use crate::wire::ipv4::{checksum, protocol, Ipv4Packet, PacketError};
use crate::wire::tcp::{self, TcpHeader};
use crate::wire::udp::{self, UdpHeader};
use crate::wire::vnet::{VnetHeader, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};
use crate::wire::{be16, be32, pseudo_header_sum, put16, put32};

/// The longest headers a segment can carry: a 60-byte IPv4 header and a 60-byte TCP header.
pub const MAX_HEADER_LEN: usize = 120;

/// Why a packet read from the TUN cannot be sent as it is described.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// Not IPv4 (an IPv6 super-packet, for instance).
    #[error("IP version {0}, not 4")]
    NotIpv4(u8),
    /// The headers or the virtio-net header do not describe a packet that can be cut.
    #[error("malformed offload packet: {0}")]
    Malformed(&'static str),
    /// A segmentation type weft does not implement.
    #[error("unsupported segmentation type {0:#04x}")]
    UnsupportedGso(u8),
}

impl From<PacketError> for SegmentError {
    fn from(error: PacketError) -> Self {
        match error {
            PacketError::NotIpv4 { version } => SegmentError::NotIpv4(version),
            _ => SegmentError::Malformed("not a well-formed IPv4 packet"),
        }
    }
}

impl SegmentError {
    /// The counter a packet refused for this reason is dropped under.
    pub fn drop_reason(self) -> DropReason {
        match self {
            SegmentError::NotIpv4(_) => DropReason::NotIpv4,
            SegmentError::Malformed(_) | SegmentError::UnsupportedGso(_) => DropReason::BadPacket,
        }
    }
}

/// What a packet read from the TUN needs before it can be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: it is one complete packet.
    Whole,
    /// One packet whose transport checksum, at byte `field`, must be completed over the bytes
    /// from `start` on ([`complete_checksum`]).
    Checksum {
        /// Where the checksummed data starts.
        start: usize,
        /// Where the checksum field is.
        field: usize,
    },
    /// A super-packet to cut.
    Segment(Segmenter),
}

impl Plan {
    /// Read what `packet` (which followed `header` out of the TUN) needs; a super-packet is
    /// checked as an IPv4 packet first.
    pub fn new(header: &VnetHeader, packet: &[u8]) -> Result<Plan, SegmentError> {
        if header.is_gso() {
            return Segmenter::new(header, packet).map(Plan::Segment);
        }
        Self::for_plain(header, packet.len())
    }

    /// Read what the checked packet `ip` (which followed `header` out of the TUN) needs.
    pub fn for_packet<T: AsRef<[u8]>>(
        header: &VnetHeader,
        ip: &Ipv4Packet<T>,
    ) -> Result<Plan, SegmentError> {
        if header.is_gso() {
            return Segmenter::for_packet(header, ip).map(Plan::Segment);
        }
        Self::for_plain(header, ip.as_bytes().len())
    }

    /// The plan for a packet of `len` bytes that is not a super-packet.
    fn for_plain(header: &VnetHeader, len: usize) -> Result<Plan, SegmentError> {
        if !header.needs_csum() {
            return Ok(Plan::Whole);
        }
        let start = usize::from(header.csum_start);
        let field = start + usize::from(header.csum_offset);
        check_checksum_field(len, start, field)?;
        Ok(Plan::Checksum { start, field })
    }

    /// The length of the longest packet this one becomes on the wire.
    pub fn largest_packet(&self, packet_len: usize) -> usize {
        match self {
            Plan::Segment(segmenter) => segmenter.largest_segment(),
            Plan::Whole | Plan::Checksum { .. } => packet_len,
        }
    }
}

/// Complete a partial checksum: the field at `field` holds the pseudo-header sum, and the
/// checksum covers every byte from `start` on. A result of zero is sent as `0xffff`, as Linux
/// does (for UDP, zero would mean "no checksum"; for TCP both are the same value).
pub fn complete_checksum(
    packet: &mut [u8],
    start: usize,
    field: usize,
) -> Result<(), SegmentError> {
    check_checksum_field(packet.len(), start, field)?;
    let covered = packet.get(start..).unwrap_or_default();
    let check = checksum::of(covered);
    put16(packet, field, if check == 0 { 0xffff } else { check });
    Ok(())
}

/// A checksum field must lie inside the packet, after the checksummed data's start, and on a
/// 16-bit word boundary of that data (as every transport's does).
fn check_checksum_field(len: usize, start: usize, field: usize) -> Result<(), SegmentError> {
    if field + 2 > len || start > field {
        return Err(SegmentError::Malformed("checksum field beyond the packet"));
    }
    if (field - start) % 2 != 0 {
        return Err(SegmentError::Malformed("checksum field between two words"));
    }
    Ok(())
}

/// What a segment's transport checksum field holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InnerChecksum {
    /// The complete checksum.
    Complete,
    /// The pseudo-header sum only.
    Partial,
}

/// Which transport a super-packet carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
}

/// How to cut one super-packet; it describes the packet it was made from and must only be used
/// with that packet (whose headers the caller may still edit, e.g. the TTL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segmenter {
    transport: Transport,
    ip_header_len: usize,
    header_len: usize,
    gso_size: usize,
    payload_len: usize,
    segments: usize,
    inner: InnerChecksum,
}

/// One segment, as [`Segmenter::write_header`] describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The segment's payload: a range of the super-packet.
    pub payload: Range<usize>,
    /// The segment's length on the wire: headers plus payload.
    pub len: usize,
}

impl Segmenter {
    /// Check that `packet` is a super-packet `header` can cut: IPv4, not a fragment, the
    /// transport the segmentation type names, complete headers, a nonzero segment size.
    pub fn new(header: &VnetHeader, packet: &[u8]) -> Result<Segmenter, SegmentError> {
        Self::for_packet(header, &Ipv4Packet::new_checked(packet)?)
    }

    /// As [`Segmenter::new`], for a packet already checked as IPv4.
    pub fn for_packet<T: AsRef<[u8]>>(
        header: &VnetHeader,
        ip: &Ipv4Packet<T>,
    ) -> Result<Segmenter, SegmentError> {
        let transport = match header.gso_kind() {
            GSO_TCPV4 => Transport::Tcp,
            GSO_UDP_L4 => Transport::Udp,
            GSO_TCPV6 => return Err(SegmentError::Malformed("IPv6 segmentation of IPv4")),
            other => return Err(SegmentError::UnsupportedGso(other)),
        };
        let packet = ip.as_bytes();
        let ip_header_len = ip.header_len();
        if ip.is_fragment() {
            return Err(SegmentError::Malformed("a fragment cannot be segmented"));
        }
        let proto = ip.protocol();
        let transport_header_len = match transport {
            Transport::Tcp => {
                if proto != protocol::TCP {
                    return Err(SegmentError::Malformed(
                        "TCP segmentation of another protocol",
                    ));
                }
                TcpHeader::new_checked(ip.payload())
                    .map_err(|_| SegmentError::Malformed("bad TCP header"))?
                    .header_len()
            }
            Transport::Udp => {
                if proto != protocol::UDP {
                    return Err(SegmentError::Malformed(
                        "UDP segmentation of another protocol",
                    ));
                }
                UdpHeader::new_checked(ip.payload())
                    .map_err(|_| SegmentError::Malformed("truncated UDP header"))?;
                udp::HEADER_LEN
            }
        };
        let header_len = ip_header_len + transport_header_len;
        if header_len > packet.len() {
            return Err(SegmentError::Malformed("truncated transport header"));
        }
        let gso_size = usize::from(header.gso_size);
        if gso_size == 0 {
            return Err(SegmentError::Malformed("zero segment size"));
        }
        let payload_len = packet.len() - header_len;
        Ok(Segmenter {
            transport,
            ip_header_len,
            header_len,
            gso_size,
            payload_len,
            segments: payload_len.div_ceil(gso_size).max(1),
            inner: InnerChecksum::Complete,
        })
    }

    /// How many segments the super-packet becomes.
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// The headers' length: what each segment carries before its payload.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The payload bytes of a full segment.
    pub fn gso_size(&self) -> usize {
        self.gso_size
    }

    /// The length of segment `index` on the wire (0 if there is no such segment).
    pub fn segment_len(&self, index: usize) -> usize {
        self.payload_range(index)
            .map_or(0, |range| self.header_len + range.len())
    }

    /// The length of the first, and longest, segment.
    pub fn largest_segment(&self) -> usize {
        self.segment_len(0)
    }

    /// Where segment `index`'s payload lies in the super-packet.
    pub fn payload_range(&self, index: usize) -> Option<Range<usize>> {
        if index >= self.segments {
            return None;
        }
        let start = self.header_len + index * self.gso_size;
        let end = (start + self.gso_size).min(self.header_len + self.payload_len);
        Some(start..end)
    }

    /// This segmenter, writing segments whose transport checksum field holds only the
    /// pseudo-header sum, as in a packet whose checksum is still to be completed: the payload
    /// is not read. Only for a peer that takes such packets (one that relies on the outer UDP
    /// checksum and hands them on with `NEEDS_CSUM`, see [`crate::offload::partial`]).
    pub fn with_partial_checksums(self) -> Segmenter {
        Segmenter {
            inner: InnerChecksum::Partial,
            ..self
        }
    }

    /// Write segment `index`'s headers into `out` (which must hold [`Segmenter::header_len`]
    /// bytes) and say where its payload is. `None` if there is no such segment, `out` is too
    /// short, or `packet` is not the packet this segmenter was made for.
    pub fn write_header(&self, packet: &[u8], index: usize, out: &mut [u8]) -> Option<Segment> {
        let payload = self.payload_range(index)?;
        let headers = packet.get(..self.header_len)?;
        let body = packet.get(payload)?;
        self.write_header_of(headers, body, index, out)
    }

    /// As [`Segmenter::write_header`], with the super-packet's original `headers` and segment
    /// `index`'s payload `body` given apart: for a caller that writes each segment's headers
    /// into the super-packet itself, in front of the segment's payload, over what it no longer
    /// needs (the super-packet's own headers, the previous segment's last bytes).
    pub fn write_header_of(
        &self,
        headers: &[u8],
        body: &[u8],
        index: usize,
        out: &mut [u8],
    ) -> Option<Segment> {
        let payload = self.payload_range(index)?;
        if body.len() != payload.len() {
            return None;
        }
        let headers = headers.get(..self.header_len)?;
        let out = out.get_mut(..self.header_len)?;
        out.copy_from_slice(headers);
        let len = self.header_len + body.len();
        let transport_len = u16::try_from(len - self.ip_header_len).ok()?;

        let (ip, transport) = out.split_at_mut(self.ip_header_len);
        put16(ip, 2, u16::try_from(len).ok()?);
        let ident = be16(ip, 4)?.wrapping_add(index as u16);
        put16(ip, 4, ident);
        put16(ip, 10, 0);
        let ip_check = checksum::of(ip);
        put16(ip, 10, ip_check);

        let field = match self.transport {
            Transport::Tcp => {
                let seq = be32(transport, tcp::SEQ)?
                    .wrapping_add((index as u32).wrapping_mul(self.gso_size as u32));
                put32(transport, tcp::SEQ, seq);
                let flags = transport.get_mut(tcp::FLAGS)?;
                if index + 1 < self.segments {
                    *flags &= !(tcp::FIN | tcp::PSH);
                }
                if index > 0 {
                    *flags &= !tcp::CWR;
                }
                tcp::CHECKSUM
            }
            Transport::Udp => {
                put16(transport, udp::LENGTH, transport_len);
                udp::CHECKSUM
            }
        };
        put16(transport, field, 0);
        let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
        let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
        let proto = *ip.get(9)?;
        let pseudo = pseudo_header_sum(src, dst, proto, transport_len);
        if self.inner == InnerChecksum::Partial {
            put16(transport, field, pseudo);
            return Some(Segment { payload, len });
        }
        let sum = checksum::add(
            checksum::add(pseudo, checksum::sum(transport)),
            super::checksum::sum(body),
        );
        let check = !sum;
        let check = if self.transport == Transport::Udp && check == 0 {
            0xffff
        } else {
            check
        };
        put16(transport, field, check);
        Some(Segment { payload, len })
    }

    /// Write every segment, headers and payload, back to back into `out`; returns the bytes
    /// written, or `None` if `out` is too short. (The engine sends segments without this copy;
    /// it serves tests, fuzzing and benchmarks.)
    pub fn segment_into(&self, packet: &[u8], out: &mut [u8]) -> Option<usize> {
        let mut at = 0;
        for index in 0..self.segments {
            let segment = self.write_header(packet, index, out.get_mut(at..)?)?;
            let body = packet.get(segment.payload.clone())?;
            out.get_mut(at + self.header_len..at + segment.len)?
                .copy_from_slice(body);
            at += segment.len;
        }
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::testing::{assert_valid, udp, Tcp};
    use crate::wire::vnet::{GSO_ECN, NEEDS_CSUM};
    use etherparse::{SlicedPacket, TransportSlice};

    /// Cut `packet` and return each segment as its own buffer, each checked by etherparse.
    fn cut(header: &VnetHeader, packet: &[u8]) -> Vec<Vec<u8>> {
        let Plan::Segment(segmenter) = Plan::new(header, packet).unwrap() else {
            panic!("not a super-packet");
        };
        let mut out = Vec::new();
        let mut scratch = [0u8; MAX_HEADER_LEN];
        for index in 0..segmenter.segments() {
            let segment = segmenter.write_header(packet, index, &mut scratch).unwrap();
            let mut bytes = scratch[..segmenter.header_len()].to_vec();
            bytes.extend_from_slice(&packet[segment.payload.clone()]);
            assert_eq!(bytes.len(), segment.len);
            assert_eq!(segmenter.segment_len(index), segment.len);
            assert_valid(&bytes);
            out.push(bytes);
        }
        // The contiguous form holds the same bytes.
        let mut flat = vec![0u8; out.iter().map(Vec::len).sum::<usize>()];
        assert_eq!(segmenter.segment_into(packet, &mut flat), Some(flat.len()));
        assert_eq!(flat, out.concat());
        out
    }

    fn tcp_fields(packet: &[u8]) -> (u16, u32, etherparse::TcpHeader) {
        let sliced = SlicedPacket::from_ip(packet).unwrap();
        let ident = match &sliced.net {
            Some(etherparse::NetSlice::Ipv4(ip)) => ip.header().identification(),
            _ => unreachable!(),
        };
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!("not TCP");
        };
        (ident, tcp.sequence_number(), tcp.to_header())
    }

    #[test]
    fn tcp_super_packets_become_mss_sized_segments() {
        // 10 000 bytes at 1448 per segment: six full segments and a shorter last one.
        let mut spec = Tcp::new(0xffff_f000, 10_000);
        spec.psh = true;
        spec.fin = true;
        spec.cwr = true;
        spec.ident = 0xfffe;
        let (header, packet) = spec.super_packet(1448);
        assert_eq!(header.gso_type, GSO_TCPV4 | GSO_ECN);
        let segments = cut(&header, &packet);
        assert_eq!(segments.len(), 7);
        let mut payload = Vec::new();
        for (i, segment) in segments.iter().enumerate() {
            let (ident, seq, tcp) = tcp_fields(segment);
            assert_eq!(ident, 0xfffeu16.wrapping_add(i as u16), "IP id increments");
            // The sequence number wraps around 2^32 in the middle of the packet.
            assert_eq!(seq, 0xffff_f000u32.wrapping_add(1448 * i as u32));
            let last = i == segments.len() - 1;
            assert_eq!(tcp.psh, last, "PSH only on the last");
            assert_eq!(tcp.fin, last, "FIN only on the last");
            assert_eq!(tcp.cwr, i == 0, "CWR only on the first");
            assert!(tcp.ack);
            assert_eq!(tcp.acknowledgment_number, spec.ack);
            assert_eq!(tcp.header_len(), 32, "options are copied");
            let body = assert_valid(segment);
            assert_eq!(body.len(), if last { 10_000 - 6 * 1448 } else { 1448 });
            payload.extend_from_slice(&body);
        }
        assert_eq!(payload, spec.payload);
    }

    #[test]
    fn a_payload_that_fits_one_segment_stays_whole() {
        let spec = Tcp::new(1, 1000);
        let (header, packet) = spec.super_packet(1448);
        let segments = cut(&header, &packet);
        assert_eq!(segments, vec![spec.bytes()]);
    }

    #[test]
    fn exact_multiples_leave_no_empty_segment() {
        let spec = Tcp::new(1, 3 * 500);
        let (header, packet) = spec.super_packet(500);
        let segments = cut(&header, &packet);
        assert_eq!(segments.len(), 3);
        assert!(segments.iter().all(|s| s.len() == 20 + 32 + 500));
    }

    #[test]
    fn odd_segment_sizes_checksum_correctly() {
        for gso in [1, 3, 7, 999, 1001] {
            let spec = Tcp::new(77, 4099);
            let (header, packet) = spec.super_packet(gso);
            let segments = cut(&header, &packet);
            assert_eq!(segments.len(), 4099usize.div_ceil(usize::from(gso)));
        }
    }

    #[test]
    fn ip_options_and_tos_are_copied_into_every_segment() {
        let mut spec = Tcp::new(5, 3000);
        spec.ip_options = vec![1, 1, 1, 0];
        spec.tos = 0xb8;
        spec.timestamps = None;
        let (header, packet) = spec.super_packet(1000);
        for segment in cut(&header, &packet) {
            assert_eq!(segment[0], 0x46);
            assert_eq!(segment[1], 0xb8);
            assert_eq!(&segment[20..24], &[1, 1, 1, 0]);
        }
    }

    #[test]
    fn udp_super_packets_become_datagrams() {
        let (header, packet) = udp(3000, 1200);
        let segments = cut(&header, &packet);
        assert_eq!(segments.len(), 3);
        let payload: Vec<u8> = segments.iter().flat_map(|s| assert_valid(s)).collect();
        assert_eq!(payload, packet[28..]);
        assert_eq!(segments[2].len(), 28 + 600);
    }

    #[test]
    fn plain_packets_need_nothing_or_a_checksum() {
        let spec = Tcp::new(9, 500);
        let whole = spec.bytes();
        assert_eq!(Plan::new(&VnetHeader::PLAIN, &whole), Ok(Plan::Whole));
        let (mut header, mut packet) = spec.super_packet(1448);
        header.gso_type = 0;
        let plan = Plan::new(&header, &packet).unwrap();
        assert_eq!(
            plan,
            Plan::Checksum {
                start: 20,
                field: 36
            }
        );
        assert_eq!(plan.largest_packet(packet.len()), packet.len());
        let Plan::Checksum { start, field } = plan else {
            unreachable!()
        };
        complete_checksum(&mut packet, start, field).unwrap();
        assert_eq!(packet, whole);

        let (mut header, mut packet) = udp(333, 1000);
        header.gso_type = 0;
        let Plan::Checksum { start, field } = Plan::new(&header, &packet).unwrap() else {
            panic!("UDP needs its checksum");
        };
        complete_checksum(&mut packet, start, field).unwrap();
        assert_valid(&packet);
    }

    #[test]
    fn the_largest_packet_is_the_first_segment() {
        let (header, packet) = Tcp::new(1, 5000).super_packet(1400);
        let plan = Plan::new(&header, &packet).unwrap();
        assert_eq!(plan.largest_packet(packet.len()), 20 + 32 + 1400);
    }

    #[test]
    fn descriptions_that_do_not_fit_the_packet_are_refused() {
        let (header, packet) = Tcp::new(1, 5000).super_packet(1400);
        let with = |f: &dyn Fn(&mut VnetHeader, &mut Vec<u8>)| {
            let (mut h, mut p) = (header, packet.clone());
            f(&mut h, &mut p);
            Plan::new(&h, &p)
        };
        let malformed =
            |r: Result<Plan, SegmentError>| matches!(r, Err(SegmentError::Malformed(_)));
        assert!(malformed(with(&|h, _| h.gso_size = 0)));
        assert!(malformed(with(&|_, p| p.truncate(40))));
        assert!(malformed(with(&|_, p| p[9] = 17)));
        assert!(malformed(with(&|_, p| p[6] |= 0x20)));
        assert!(malformed(with(&|_, p| p[0] = 0x44)));
        assert!(malformed(with(&|_, p| p[0] = 0x4f)));
        assert!(malformed(with(&|_, p| p[32] = 0x40)));
        assert!(malformed(with(&|h, _| {
            h.gso_type = 0;
            h.csum_start = 5040;
        })));
        assert!(malformed(with(&|h, _| h.gso_type = GSO_TCPV6)));
        assert_eq!(
            with(&|h, _| h.gso_type = 3),
            Err(SegmentError::UnsupportedGso(3))
        );
        assert_eq!(with(&|_, p| p[0] = 0x60), Err(SegmentError::NotIpv4(6)));
        assert_eq!(SegmentError::NotIpv4(6).drop_reason(), DropReason::NotIpv4);
        assert_eq!(
            SegmentError::UnsupportedGso(3).drop_reason(),
            DropReason::BadPacket
        );
        assert!(malformed(Plan::new(&header, &[])));
        // Checksum completion stays inside the packet.
        let mut short = vec![0u8; 10];
        assert!(complete_checksum(&mut short, 4, 9).is_err());
        assert!(complete_checksum(&mut short, 9, 4).is_err());
        assert!(complete_checksum(&mut short, 4, 7).is_err(), "odd offset");
        assert!(complete_checksum(&mut short, 4, 8).is_ok());
        assert!(malformed(with(&|h, _| {
            h.gso_type = 0;
            h.csum_offset = 15;
        })));
    }

    #[test]
    fn header_writes_check_their_inputs() {
        let (header, packet) = Tcp::new(1, 5000).super_packet(1400);
        let segmenter = Segmenter::new(&header, &packet).unwrap();
        let mut out = [0u8; MAX_HEADER_LEN];
        assert!(segmenter.write_header(&packet, 4, &mut out).is_none());
        assert!(segmenter.write_header(&packet, 0, &mut out[..10]).is_none());
        assert!(segmenter
            .write_header(&packet[..100], 3, &mut out)
            .is_none());
        assert_eq!(segmenter.segment_len(9), 0);
        let mut small = vec![0u8; 100];
        assert_eq!(segmenter.segment_into(&packet, &mut small), None);
        assert_eq!(header.flags, NEEDS_CSUM);
    }
}
