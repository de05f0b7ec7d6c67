//! Segmentation and coalescing offloads, as pure functions over caller-owned buffers.
//!
//! With offloads on, the TUN hands the engine 64 KiB TCP (and UDP) super-packets behind a
//! [`VnetHeader`], and accepts them back the same way. [`segment`] cuts a super-packet
//! into the IPv4 packets that go on the wire (one per datagram, as flannel's wire format
//! demands); [`coalesce`] merges consecutive TCP segments (and, where the TUN takes USO, UDP
//! datagrams) of one flow that arrive from a peer into one super-packet for the TUN, as Linux
//! GRO does. Neither copies payload: segmentation
//! writes each segment's headers into a small buffer and names the payload's place in the
//! super-packet, coalescing names the members whose payloads follow the first packet, and the
//! I/O shell gathers the pieces with `iovec`s.

pub mod checksum;
pub mod coalesce;
pub mod partial;
pub mod segment;

pub use crate::wire::vnet::{VnetHeader, VNET_HDR_LEN};
pub use coalesce::{Coalescer, Group};
pub use partial::Partial;
pub use segment::{complete_checksum, Plan, SegmentError, Segmenter};

/// Test packets: TCP and UDP super-packets and segments built by etherparse, an encoder that
/// shares no code with the engine, and checks of their checksums by etherparse too.
#[cfg(test)]
pub(crate) mod testing {
    use etherparse::{IpNumber, Ipv4Header, TcpHeader, TcpOptionElement, UdpHeader};

    use crate::wire::pseudo_header_sum;
    use crate::wire::vnet::{VnetHeader, GSO_TCPV4, GSO_UDP_L4, NEEDS_CSUM};

    /// The fields of a TCP test packet.
    #[derive(Clone, Debug)]
    pub(crate) struct Tcp {
        pub(crate) src: [u8; 4],
        pub(crate) dst: [u8; 4],
        pub(crate) sport: u16,
        pub(crate) dport: u16,
        pub(crate) seq: u32,
        pub(crate) ack: u32,
        pub(crate) ident: u16,
        pub(crate) ttl: u8,
        pub(crate) tos: u8,
        pub(crate) dont_frag: bool,
        pub(crate) ip_options: Vec<u8>,
        pub(crate) window: u16,
        pub(crate) fin: bool,
        pub(crate) psh: bool,
        pub(crate) cwr: bool,
        pub(crate) ece: bool,
        pub(crate) urg: bool,
        pub(crate) rst: bool,
        pub(crate) syn: bool,
        pub(crate) timestamps: Option<(u32, u32)>,
        pub(crate) payload: Vec<u8>,
    }

    impl Tcp {
        /// A data segment of a flow from 10.1.1.2:40000 to 10.1.2.2:5201 with `len` bytes of
        /// patterned payload, ACK set, DF set.
        pub(crate) fn new(seq: u32, len: usize) -> Tcp {
            Tcp {
                src: [10, 1, 1, 2],
                dst: [10, 1, 2, 2],
                sport: 40000,
                dport: 5201,
                seq,
                ack: 0x0102_0304,
                ident: 0x4242,
                ttl: 64,
                tos: 0,
                dont_frag: true,
                ip_options: Vec::new(),
                window: 502,
                fin: false,
                psh: false,
                cwr: false,
                ece: false,
                urg: false,
                rst: false,
                syn: false,
                timestamps: Some((0x1111_2222, 0x3333_4444)),
                payload: (0..len).map(|i| (i * 13 + seq as usize) as u8).collect(),
            }
        }

        fn headers(&self) -> (Ipv4Header, TcpHeader) {
            let mut tcp = TcpHeader::new(self.sport, self.dport, self.seq, self.window);
            tcp.acknowledgment_number = self.ack;
            tcp.ack = true;
            tcp.fin = self.fin;
            tcp.psh = self.psh;
            tcp.cwr = self.cwr;
            tcp.ece = self.ece;
            tcp.urg = self.urg;
            tcp.rst = self.rst;
            tcp.syn = self.syn;
            if let Some((value, echo)) = self.timestamps {
                tcp.set_options(&[
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                    TcpOptionElement::Timestamp(value, echo),
                ])
                .unwrap();
            }
            let mut ip = Ipv4Header::new(
                (tcp.header_len() + self.payload.len()) as u16,
                self.ttl,
                IpNumber::TCP,
                self.src,
                self.dst,
            )
            .unwrap();
            ip.identification = self.ident;
            ip.dont_fragment = self.dont_frag;
            ip.dscp = etherparse::Ipv4Dscp::try_new(self.tos >> 2).unwrap();
            ip.ecn = etherparse::Ipv4Ecn::try_new(self.tos & 3).unwrap();
            ip.options = etherparse::Ipv4Options::try_from(&self.ip_options[..]).unwrap();
            ip.set_payload_len(tcp.header_len() + self.payload.len())
                .unwrap();
            ip.header_checksum = ip.calc_header_checksum();
            (ip, tcp)
        }

        /// The packet with every checksum complete.
        pub(crate) fn bytes(&self) -> Vec<u8> {
            let (ip, mut tcp) = self.headers();
            tcp.checksum = tcp.calc_checksum_ipv4(&ip, &self.payload).unwrap();
            let mut out = ip.to_bytes().to_vec();
            out.extend_from_slice(&tcp.to_bytes());
            out.extend_from_slice(&self.payload);
            out
        }

        /// The packet as a TSO super-packet read from the TUN: the TCP checksum field holds
        /// the pseudo-header sum only, and the virtio-net header asks for `gso_size`-byte
        /// segments.
        pub(crate) fn super_packet(&self, gso_size: u16) -> (VnetHeader, Vec<u8>) {
            let (ip, mut tcp) = self.headers();
            let ip_len = ip.header_len();
            let tcp_len = (tcp.header_len() + self.payload.len()) as u16;
            tcp.checksum = pseudo_header_sum(self.src, self.dst, 6, tcp_len);
            let mut out = ip.to_bytes().to_vec();
            out.extend_from_slice(&tcp.to_bytes());
            out.extend_from_slice(&self.payload);
            let header = VnetHeader {
                flags: NEEDS_CSUM,
                gso_type: GSO_TCPV4
                    | if self.cwr {
                        crate::wire::vnet::GSO_ECN
                    } else {
                        0
                    },
                hdr_len: (ip_len + tcp.header_len()) as u16,
                gso_size,
                csum_start: ip_len as u16,
                csum_offset: 16,
            };
            (header, out)
        }
    }

    /// A UDP super-packet (USO) from 10.1.1.2:4000 to 10.1.2.2:5000 with `len` payload bytes,
    /// and a plain UDP packet with a complete checksum.
    pub(crate) fn udp(len: usize, gso_size: u16) -> (VnetHeader, Vec<u8>) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
        let (src, dst) = ([10, 1, 1, 2], [10, 1, 2, 2]);
        let mut udp = UdpHeader {
            source_port: 4000,
            destination_port: 5000,
            length: (8 + len) as u16,
            checksum: 0,
        };
        let mut ip = Ipv4Header::new((8 + len) as u16, 64, IpNumber::UDP, src, dst).unwrap();
        ip.identification = 7;
        ip.header_checksum = ip.calc_header_checksum();
        udp.checksum = pseudo_header_sum(src, dst, 17, (8 + len) as u16);
        let mut out = ip.to_bytes().to_vec();
        out.extend_from_slice(&udp.to_bytes());
        out.extend_from_slice(&payload);
        let header = VnetHeader {
            flags: NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 28,
            gso_size,
            csum_start: 20,
            csum_offset: 6,
        };
        (header, out)
    }

    /// Every segment `segmenter` cuts `packet` into, each in its own buffer.
    pub(crate) fn segments_of(segmenter: &super::Segmenter, packet: &[u8]) -> Vec<Vec<u8>> {
        let mut scratch = [0u8; super::segment::MAX_HEADER_LEN];
        (0..segmenter.segments())
            .map(|i| {
                let segment = segmenter.write_header(packet, i, &mut scratch).unwrap();
                let mut bytes = scratch[..segmenter.header_len()].to_vec();
                bytes.extend_from_slice(&packet[segment.payload]);
                bytes
            })
            .collect()
    }

    /// Assert that `packet` is one well-formed IPv4 packet whose header and transport
    /// checksums etherparse accepts; returns its transport payload.
    pub(crate) fn assert_valid(packet: &[u8]) -> Vec<u8> {
        let sliced = etherparse::SlicedPacket::from_ip(packet).expect("etherparse parses it");
        let Some(etherparse::NetSlice::Ipv4(ipv4)) = &sliced.net else {
            panic!("not IPv4");
        };
        let ip = ipv4.header().to_header();
        assert_eq!(ip.calc_header_checksum(), ip.header_checksum, "IP checksum");
        assert_eq!(usize::from(ip.total_len), packet.len(), "IP total length");
        match sliced.transport {
            Some(etherparse::TransportSlice::Tcp(tcp)) => {
                let expected = tcp
                    .to_header()
                    .calc_checksum_ipv4(&ip, tcp.payload())
                    .unwrap();
                assert_eq!(tcp.checksum(), expected, "TCP checksum");
                tcp.payload().to_vec()
            }
            Some(etherparse::TransportSlice::Udp(udp)) => {
                let expected = udp
                    .to_header()
                    .calc_checksum_ipv4(&ip, udp.payload())
                    .unwrap();
                assert_eq!(udp.checksum(), expected, "UDP checksum");
                assert_eq!(usize::from(udp.length()), udp.slice().len(), "UDP length");
                udp.payload().to_vec()
            }
            other => panic!("unexpected transport {other:?}"),
        }
    }
}
