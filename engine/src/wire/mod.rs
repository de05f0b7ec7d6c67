//! The wire formats weft reads and writes, as checked views and field layouts over
//! caller-owned buffers: IPv4 ([`ipv4`]), the ICMP errors a router sends ([`icmp`]), the
//! TCP and UDP header fields the offloads touch ([`tcp`], [`udp`]), and the virtio-net header
//! in front of every TUN packet with offloads ([`vnet`]), and for the multicast relay the
//! Ethernet frames on its TAP ([`ethernet`]) and IGMP ([`igmp`]).
//!
//! Every parser of the engine lives here. IPv4 is parsed once per packet
//! ([`ipv4::Ipv4Packet::new_checked`]): the decisions, the segmenter and the coalescer all read
//! the same checked view; the offloads read the TCP and UDP headers behind it through
//! [`tcp::TcpHeader`] and [`udp::UdpHeader`]. Nothing in this layer does I/O or uses `unsafe`.

pub mod ethernet;
pub mod icmp;
pub mod igmp;
pub mod ipv4;
pub mod tcp;
pub mod udp;
pub mod vnet;

/// The folded sum of the IPv4 pseudo-header for a transport segment of `len` bytes (not
/// inverted: the value a `NEEDS_CSUM` checksum field holds).
pub(crate) fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, len: u16) -> u16 {
    let [len_hi, len_lo] = len.to_be_bytes();
    let bytes = [
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, protocol, len_hi, len_lo,
    ];
    ipv4::checksum::sum(&bytes)
}

/// Read a big-endian `u16` at `at`; `None` past the end.
#[inline]
pub(crate) fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    let raw = bytes.get(at..at + 2)?;
    Some(u16::from_be_bytes([raw[0], raw[1]]))
}

/// Read a big-endian `u32` at `at`; `None` past the end.
#[inline]
pub(crate) fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

/// Write a big-endian `u16` at `at`; does nothing past the end.
#[inline]
pub(crate) fn put16(bytes: &mut [u8], at: usize, value: u16) {
    if let Some(raw) = bytes.get_mut(at..at + 2) {
        raw.copy_from_slice(&value.to_be_bytes());
    }
}

/// Write a big-endian `u32` at `at`; does nothing past the end.
#[inline]
pub(crate) fn put32(bytes: &mut [u8], at: usize, value: u32) {
    if let Some(raw) = bytes.get_mut(at..at + 4) {
        raw.copy_from_slice(&value.to_be_bytes());
    }
}
