//! Ethernet II frames as the multicast TAP carries them: a checked view for frames read from
//! the bridge, and the header weft writes in front of a packet it delivers.

use std::net::Ipv4Addr;

/// Length of an Ethernet II header (no VLAN tag: the bridge port is untagged).
pub const HEADER_LEN: usize = 14;
/// The ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// The source address of every frame weft writes: locally administered, unicast, fixed, so
/// that the bridge learns it on the TAP port and nothing else claims it.
pub const WEFT_MAC: [u8; 6] = [0x02, 0x77, 0x65, 0x66, 0x74, 0x00];
/// The broadcast address.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// A frame shorter than an Ethernet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a frame of {len} bytes is shorter than an Ethernet header")]
pub struct FrameTooShort {
    /// The frame's length.
    pub len: usize,
}

/// A view of a buffer that holds at least an Ethernet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthernetFrame<'a> {
    bytes: &'a [u8],
}

impl<'a> EthernetFrame<'a> {
    /// Check that `bytes` holds an Ethernet header and wrap it.
    pub fn new_checked(bytes: &'a [u8]) -> Result<Self, FrameTooShort> {
        if bytes.len() < HEADER_LEN {
            return Err(FrameTooShort { len: bytes.len() });
        }
        Ok(Self { bytes })
    }

    /// The destination MAC address.
    pub fn dst(&self) -> [u8; 6] {
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.bytes[..6]);
        mac
    }

    /// The source MAC address.
    pub fn src(&self) -> [u8; 6] {
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.bytes[6..12]);
        mac
    }

    /// Whether the destination is a group (multicast or broadcast) address.
    pub fn is_group_dst(&self) -> bool {
        self.bytes[0] & 1 == 1
    }

    /// The ethertype.
    pub fn ethertype(&self) -> u16 {
        u16::from_be_bytes([self.bytes[12], self.bytes[13]])
    }

    /// Everything after the header (an IPv4 packet may be followed by padding).
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// The MAC address IPv4 maps `group` to: 01:00:5e and the group's low 23 bits.
pub fn multicast_mac(group: Ipv4Addr) -> [u8; 6] {
    let [_, b, c, d] = group.octets();
    [0x01, 0x00, 0x5e, b & 0x7f, c, d]
}

/// The header of an IPv4 frame from weft to `dst`.
pub fn ipv4_header(dst: [u8; 6]) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..6].copy_from_slice(&dst);
    header[6..12].copy_from_slice(&WEFT_MAC);
    header[12..].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_map_to_their_mac_and_frames_read_back() {
        assert_eq!(
            multicast_mac("239.129.1.2".parse().unwrap()),
            [0x01, 0x00, 0x5e, 0x01, 0x01, 0x02]
        );
        assert_eq!(
            multicast_mac("224.0.0.251".parse().unwrap()),
            [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb]
        );
        let mut frame = ipv4_header(BROADCAST_MAC).to_vec();
        frame.extend_from_slice(&[0x45, 0]);
        let view = EthernetFrame::new_checked(&frame).unwrap();
        assert_eq!(view.dst(), BROADCAST_MAC);
        assert_eq!(view.src(), WEFT_MAC);
        assert!(view.is_group_dst());
        assert_eq!(view.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(view.payload(), &[0x45, 0]);
        assert_eq!(
            EthernetFrame::new_checked(&frame[..13]),
            Err(FrameTooShort { len: 13 })
        );
    }
}
