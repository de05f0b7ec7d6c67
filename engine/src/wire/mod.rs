//! The wire formats weft reads and writes, as checked views and field layouts over
//! caller-owned buffers: IPv4 ([`ipv4`]), the ICMP errors a router sends ([`icmp`]), the
//! TCP and UDP header fields the offloads touch ([`tcp`], [`udp`]), and the virtio-net header
//! in front of every TUN packet with offloads ([`vnet`]), and for the multicast relay the
//! Ethernet frames on its TAP ([`ethernet`]) and IGMP ([`igmp`]).
//!
//! IPv4 is parsed only here ([`ipv4::Ipv4Packet::new_checked`]), once per packet: the
//! decisions, the segmenter and the coalescer all read the same checked view. The TCP and UDP
//! fields behind it are read by the offloads through the layouts defined here. Nothing in this
//! layer does I/O or uses `unsafe`.

pub mod ethernet;
pub mod icmp;
pub mod igmp;
pub mod ipv4;
pub mod vnet;

/// TCP header fields and flags weft touches.
pub mod tcp {
    /// Length of a TCP header without options.
    pub const MIN_HEADER_LEN: usize = 20;
    /// Offset of the sequence number.
    pub const SEQ: usize = 4;
    /// Offset of the acknowledgment number.
    pub const ACK: usize = 8;
    /// Offset of the data-offset byte.
    pub const DATA_OFFSET: usize = 12;
    /// Offset of the flags byte.
    pub const FLAGS: usize = 13;
    /// Offset of the checksum.
    pub const CHECKSUM: usize = 16;

    /// Flag: The last segment of a stream.
    pub const FIN: u8 = 0x01;
    /// Flag: Opens a connection.
    pub const SYN: u8 = 0x02;
    /// Flag: Resets a connection.
    pub const RST: u8 = 0x04;
    /// Flag: Push the data to the application at once.
    pub const PSH: u8 = 0x08;
    /// Flag: The urgent pointer is valid.
    pub const URG: u8 = 0x20;
    /// Flag: Congestion window reduced (ECN).
    pub const CWR: u8 = 0x80;
}

/// UDP header fields.
pub mod udp {
    /// Length of a UDP header.
    pub const HEADER_LEN: usize = 8;
    /// Offset of the length field.
    pub const LENGTH: usize = 4;
    /// Offset of the checksum.
    pub const CHECKSUM: usize = 6;
}

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
