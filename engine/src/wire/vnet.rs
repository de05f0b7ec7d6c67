//! The virtio-net header that a TUN device opened with `IFF_VNET_HDR` puts before every packet
//! it hands out and expects before every packet written to it.
//!
//! It says whether the packet is a segmentation-offload super-packet (`gso_type`, `gso_size`:
//! the payload bytes per segment, `hdr_len`: the headers repeated in front of each) and
//! whether its transport checksum is still to be completed (`NEEDS_CSUM`, with `csum_start` and
//! `csum_offset`). weft uses the 10-byte legacy layout (`struct virtio_net_hdr`): the 12-byte
//! variant only adds `num_buffers`, which a TUN device never uses, and the worker places the
//! header in the headroom before the packet buffer, so the IP header stays aligned either way.
//!
//! A TUN device without `TUNSETVNETLE` uses the legacy virtio byte order, which is the host's:
//! the fields are native-endian.

/// Length of the header weft asks the TUN for (`TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;

/// `flags`: the checksum at `csum_start + csum_offset` holds only the pseudo-header sum; the
/// receiver must complete it over everything from `csum_start` on.
pub const NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was verified (a hint the TUN may give; weft ignores it).
pub const DATA_VALID: u8 = 2;

/// `gso_type`: not a super-packet.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: an IPv4 TCP super-packet.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: an IPv6 TCP super-packet.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: a UDP super-packet cut into datagrams (USO).
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP super-packet carries ECN's CWR flag, which only the first segment
/// keeps.
pub const GSO_ECN: u8 = 0x80;

/// The fields of a virtio-net header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VnetHeader {
    /// [`NEEDS_CSUM`], [`DATA_VALID`].
    pub flags: u8,
    /// [`GSO_NONE`], [`GSO_TCPV4`], [`GSO_UDP_L4`], … possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers repeated in each segment (a hint; weft reads the real headers).
    pub hdr_len: u16,
    /// Payload bytes per segment (the last may carry fewer).
    pub gso_size: u16,
    /// Where the checksummed data starts (the transport header).
    pub csum_start: u16,
    /// Where the checksum field lies, counted from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// The header of a plain packet: no segmentation, checksums complete.
    pub const PLAIN: VnetHeader = VnetHeader {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Read a header from the first [`VNET_HDR_LEN`] bytes of `bytes`; `None` if shorter.
    pub fn parse(bytes: &[u8]) -> Option<VnetHeader> {
        let raw: &[u8; VNET_HDR_LEN] = bytes.first_chunk()?;
        let half = |at: usize| u16::from_ne_bytes([raw[at], raw[at + 1]]);
        Some(VnetHeader {
            flags: raw[0],
            gso_type: raw[1],
            hdr_len: half(2),
            gso_size: half(4),
            csum_start: half(6),
            csum_offset: half(8),
        })
    }

    /// The header as the kernel lays it out.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut out = [0u8; VNET_HDR_LEN];
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        out
    }

    /// Whether the transport checksum must be completed.
    pub fn needs_csum(&self) -> bool {
        self.flags & NEEDS_CSUM != 0
    }

    /// The segmentation kind without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }

    /// Whether the packet is a super-packet to be segmented.
    pub fn is_gso(&self) -> bool {
        self.gso_kind() != GSO_NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_bytes() {
        let header = VnetHeader {
            flags: NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 52,
            gso_size: 1420,
            csum_start: 20,
            csum_offset: 16,
        };
        let bytes = header.to_bytes();
        assert_eq!(VnetHeader::parse(&bytes), Some(header));
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes[1], 0x81);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 1420);
        assert!(header.needs_csum() && header.is_gso());
        assert_eq!(header.gso_kind(), GSO_TCPV4);
    }

    #[test]
    fn short_buffers_hold_no_header() {
        assert_eq!(VnetHeader::parse(&[0; VNET_HDR_LEN - 1]), None);
        assert_eq!(VnetHeader::parse(&[]), None);
        let plain = VnetHeader::parse(&[0; 64]).unwrap();
        assert_eq!(plain, VnetHeader::PLAIN);
        assert!(!plain.is_gso() && !plain.needs_csum());
    }
}
