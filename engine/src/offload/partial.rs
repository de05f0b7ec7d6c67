//! Inner checksums left partial between weft hosts that both take them that way.
//!
//! Every datagram between two weft hosts is covered by its outer UDP checksum, which the
//! sender's kernel (or NIC) computes and the receiver's kernel verifies before the socket sees
//! the datagram: a corrupted datagram never reaches the engine. The inner TCP or UDP checksum
//! adds nothing on that path, yet computing it costs the sender a read of every payload byte
//! and verifying it costs the receiver another. So, as Linux's remote checksum offload does,
//! a sender may leave the inner checksum of each segment it cuts from a super-packet holding
//! only the pseudo-header sum ([`crate::offload::Segmenter::with_partial_checksums`]), and the
//! receiver hands such a packet to its TUN marked `NEEDS_CSUM`, with the checksum field set to
//! the pseudo-header sum ([`Partial::finish`]): the kernel treats it as it treats a packet
//! a local socket sent, valid for local delivery and completed if it leaves through a device.
//!
//! Only packets from a peer that advertised it are taken this way, and such a peer promises to
//! send with outer UDP checksums on (weft never turns them off). A UDP socket cannot see the
//! outer checksum, so a datagram whose outer checksum is zero cannot be told apart on receive:
//! the promise is what is relied on; from every other peer packets are handled as before
//! (verified before coalescing, and written without `NEEDS_CSUM` so that the kernel checks
//! them). A host advertises it only while its TUN takes a virtio-net header and every packet
//! from peers goes through the coalescer, which writes the partial form.

use crate::wire::ipv4::{protocol, Ipv4Packet};
use crate::wire::tcp::{self, TcpHeader};
use crate::wire::udp::{self, UdpHeader};
use crate::wire::vnet::{VnetHeader, GSO_NONE, NEEDS_CSUM};
use crate::wire::{pseudo_header_sum, put16};

/// Where a packet's transport checksum lies: a TCP segment or UDP datagram that is not a
/// fragment and carries a checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partial {
    /// The transport header's start (the IPv4 header's length).
    start: u8,
    /// The checksum field's place in the transport header.
    offset: u8,
}

impl Partial {
    /// The checksum field of `ip`, if it has one whose checksum may be partial: TCP, or UDP
    /// with a nonzero checksum (zero means none) and a length that matches the packet; never a
    /// fragment.
    pub fn of<T: AsRef<[u8]>>(ip: &Ipv4Packet<T>) -> Option<Partial> {
        if ip.flags_and_offset() & 0x3fff != 0 {
            return None;
        }
        let transport = ip.payload();
        let offset = match ip.protocol() {
            protocol::TCP => {
                TcpHeader::new_checked(transport).ok()?;
                tcp::CHECKSUM
            }
            protocol::UDP => {
                let datagram = UdpHeader::new_checked(transport).ok()?;
                if datagram.checksum() == 0 || usize::from(datagram.length()) != transport.len() {
                    return None;
                }
                udp::CHECKSUM
            }
            _ => return None,
        };
        Some(Partial {
            start: u8::try_from(ip.header_len()).ok()?,
            offset: offset as u8,
        })
    }

    /// Where the checksummed data starts and where the checksum field is, counted from the
    /// packet's start (as [`crate::offload::Plan::Checksum`] says them).
    pub fn field(&self) -> (usize, usize) {
        let start = usize::from(self.start);
        (start, start + usize::from(self.offset))
    }

    /// Set the checksum field of `packet` (the packet this was read from) to the pseudo-header
    /// sum and return the virtio-net header that asks the kernel to treat it as partial;
    /// `None` (nothing changed) if `packet` is too short for it.
    pub fn finish(&self, packet: &mut [u8]) -> Option<VnetHeader> {
        let start = usize::from(self.start);
        let field = start + usize::from(self.offset);
        if packet.len() < field + 2 || packet.len() < 20 {
            return None;
        }
        let transport_len = u16::try_from(packet.len() - start).ok()?;
        let src: [u8; 4] = packet[12..16].try_into().ok()?;
        let dst: [u8; 4] = packet[16..20].try_into().ok()?;
        let partial = pseudo_header_sum(src, dst, packet[9], transport_len);
        put16(packet, field, partial);
        Some(VnetHeader {
            flags: NEEDS_CSUM,
            gso_type: GSO_NONE,
            hdr_len: 0,
            gso_size: 0,
            csum_start: u16::from(self.start),
            csum_offset: u16::from(self.offset),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::testing::{udp, Tcp};
    use crate::offload::{complete_checksum, Plan};
    use crate::wire::ipv4::checksum;
    use crate::wire::ipv4::testing::Spec;

    #[test]
    fn tcp_and_udp_with_checksums_have_a_partial_form() {
        let tcp = Tcp::new(1, 100).bytes();
        let ip = Ipv4Packet::new_checked(&tcp[..]).unwrap();
        assert_eq!(
            Partial::of(&ip),
            Some(Partial {
                start: 20,
                offset: 16
            })
        );
        let (_, datagram) = udp(100, 100);
        // The test datagram's checksum field holds the pseudo-header sum: nonzero.
        let ip = Ipv4Packet::new_checked(&datagram[..]).unwrap();
        assert_eq!(Partial::of(&ip).map(|p| p.offset), Some(6));
    }

    #[test]
    fn fragments_other_protocols_and_unchecksummed_udp_have_none() {
        let mut fragment = Tcp::new(1, 100).bytes();
        fragment[6] |= 0x20; // more fragments
        put16(&mut fragment, 10, 0);
        let check = checksum::of(&fragment[..20]);
        put16(&mut fragment, 10, check);
        let ip = Ipv4Packet::new_checked(&fragment[..]).unwrap();
        assert_eq!(Partial::of(&ip), None);
        let icmp = Spec::icmp("10.1.1.2", "10.1.2.2", 8, 64).bytes();
        assert_eq!(
            Partial::of(&Ipv4Packet::new_checked(&icmp[..]).unwrap()),
            None
        );
        let (_, mut datagram) = udp(100, 100);
        put16(&mut datagram, 26, 0);
        let ip = Ipv4Packet::new_checked(&datagram[..]).unwrap();
        assert_eq!(Partial::of(&ip), None, "UDP without a checksum");
    }

    #[test]
    fn a_partial_packet_completed_as_the_kernel_would_is_the_original() {
        let original = Tcp::new(7, 1000).bytes();
        let mut packet = original.clone();
        put16(&mut packet, 36, 0x1234); // whatever the sender left there
        let partial = Partial::of(&Ipv4Packet::new_checked(&packet[..]).unwrap()).unwrap();
        let header = partial.finish(&mut packet).unwrap();
        assert!(header.needs_csum() && !header.is_gso());
        let Plan::Checksum { start, field } = Plan::new(&header, &packet).unwrap() else {
            panic!("not a partial packet");
        };
        complete_checksum(&mut packet, start, field).unwrap();
        assert_eq!(packet, original);
    }
}
