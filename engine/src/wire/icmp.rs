//! ICMP error messages the engine sends as a router: net unreachable, fragmentation needed
//! and time exceeded, written into a caller-owned buffer.
//!
//! The rules of RFC 1122 3.2.2 and RFC 1812 4.3.2 decide whether an error may be sent at all
//! ([`may_report`]): never about an ICMP error, never about a fragment other than the first,
//! never about a packet whose source is not a single host or whose destination is multicast
//! or broadcast. A message quotes the offending packet's header and as much of its data as
//! fits in 576 bytes (RFC 1812 4.3.2.3).

use std::net::Ipv4Addr;

use crate::wire::ipv4::{checksum, protocol, Ipv4Packet, MIN_HEADER_LEN};

/// The largest ICMP error weft writes, IP header included (RFC 1812 4.3.2.3).
pub const MAX_ERROR_LEN: usize = 576;

/// Length of the ICMP header that precedes the quoted packet.
pub const ICMP_HEADER_LEN: usize = 8;

/// TTL of the messages weft originates.
pub const REPLY_TTL: u8 = 64;

/// IP precedence 6, internetwork control (RFC 1812 4.3.2.5).
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;

/// ICMP types.
pub mod kind {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 3;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
}

/// Which error to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// Destination unreachable, net unreachable (type 3, code 0): no lease holds the
    /// destination.
    NetUnreachable,
    /// Destination unreachable, fragmentation needed and DF set (type 3, code 4), with the
    /// next hop's MTU (RFC 1191).
    FragmentationNeeded {
        /// The largest packet the next hop carries.
        mtu: u16,
    },
    /// Time exceeded in transit (type 11, code 0).
    TimeExceeded,
}

impl IcmpError {
    /// The ICMP type and code.
    pub fn type_code(self) -> (u8, u8) {
        match self {
            IcmpError::NetUnreachable => (kind::DEST_UNREACHABLE, 0),
            IcmpError::FragmentationNeeded { .. } => (kind::DEST_UNREACHABLE, 4),
            IcmpError::TimeExceeded => (kind::TIME_EXCEEDED, 0),
        }
    }

    /// The four bytes after the checksum: unused, except for the next-hop MTU.
    fn rest_of_header(self) -> [u8; 4] {
        match self {
            IcmpError::FragmentationNeeded { mtu } => {
                let [hi, lo] = mtu.to_be_bytes();
                [0, 0, hi, lo]
            }
            IcmpError::NetUnreachable | IcmpError::TimeExceeded => [0; 4],
        }
    }
}

/// Whether the rules allow an ICMP error about `offending` at all.
pub fn may_report<T: AsRef<[u8]>>(offending: &Ipv4Packet<T>) -> bool {
    if offending.frag_offset() != 0 {
        return false;
    }
    if !is_single_host(offending.src()) {
        return false;
    }
    let dst = offending.dst();
    if dst.is_multicast() || dst.is_broadcast() {
        return false;
    }
    if offending.protocol() == protocol::ICMP {
        // Only queries may be answered with an error; an ICMP packet too short to show its
        // type is treated as an error message.
        return offending.payload().first().is_some_and(|&t| is_query(t));
    }
    true
}

/// Write the ICMP `error` about `offending` into `out` and return its length, or `None` when
/// [`may_report`] forbids it or `out` cannot hold the header and the first 8 data bytes the
/// quote must carry. `out` should hold at least [`MAX_ERROR_LEN`] bytes; a larger buffer is
/// used only up to that length.
///
/// The message comes from `router` (this host's address on the overlay) or, when the host has
/// none, from the offending packet's destination, and goes to the offending packet's source.
pub fn write_error<T: AsRef<[u8]>>(
    error: IcmpError,
    offending: &Ipv4Packet<T>,
    router: Option<Ipv4Addr>,
    out: &mut [u8],
) -> Option<usize> {
    if !may_report(offending) {
        return None;
    }
    let original = offending.as_bytes();
    let limit = out.len().min(MAX_ERROR_LEN);
    let room = limit.checked_sub(MIN_HEADER_LEN + ICMP_HEADER_LEN)?;
    let must_quote = original.len().min(offending.header_len() + 8);
    if room < must_quote {
        return None;
    }
    let quote = original.get(..original.len().min(room))?;
    let total = MIN_HEADER_LEN + ICMP_HEADER_LEN + quote.len();
    let out = out.get_mut(..total)?;
    let (ip, rest) = out.split_at_mut(MIN_HEADER_LEN);
    let (icmp, body) = rest.split_at_mut(ICMP_HEADER_LEN);

    let source = router.unwrap_or_else(|| offending.dst());
    let [len_hi, len_lo] = (total as u16).to_be_bytes();
    ip.copy_from_slice(&[
        0x45,
        TOS_INTERNETWORK_CONTROL,
        len_hi,
        len_lo,
        0,
        0,
        // DF: at most 576 bytes never needs fragmenting, and an atomic datagram may use
        // identification 0 (RFC 6864).
        0x40,
        0,
        REPLY_TTL,
        protocol::ICMP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&offending.src().octets());
    let ip_check = checksum::of(ip);
    ip[10..12].copy_from_slice(&ip_check.to_be_bytes());

    let (icmp_type, code) = error.type_code();
    icmp[0] = icmp_type;
    icmp[1] = code;
    icmp[2] = 0;
    icmp[3] = 0;
    icmp[4..8].copy_from_slice(&error.rest_of_header());
    body.copy_from_slice(quote);
    let icmp_check = !checksum::add(checksum::sum(icmp), checksum::sum(body));
    icmp[2..4].copy_from_slice(&icmp_check.to_be_bytes());
    Some(total)
}

/// RFC 1812 4.3.2.7: no error about a packet whose source does not name one host — this
/// network (0/8), loopback, multicast, broadcast or class E.
fn is_single_host(src: Ipv4Addr) -> bool {
    let first = src.octets()[0];
    !(first == 0 || first == 127 || first >= 224)
}

/// ICMP query types (RFC 792, RFC 950, RFC 1256, RFC 8335): an error may answer them.
/// Anything else — the error types and any unknown type — must not be answered.
fn is_query(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        0 | 8 | 9 | 10 | 13 | 14 | 15 | 16 | 17 | 18 | 42 | 43
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ipv4::testing::Spec;
    use etherparse::{
        icmpv4::{DestUnreachableHeader, TimeExceededCode},
        Icmpv4Slice, Icmpv4Type, Ipv4HeaderSlice,
    };

    const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 1, 15, 0);

    /// Decode a generated error with etherparse, checking everything that must hold for any
    /// error weft sends, and return the ICMP type and the quoted bytes.
    fn decode(reply: &[u8]) -> (Ipv4HeaderSlice<'_>, Icmpv4Type, Vec<u8>) {
        let ip = Ipv4HeaderSlice::from_slice(reply).unwrap();
        assert_eq!(ip.to_header().calc_header_checksum(), ip.header_checksum());
        assert_eq!(usize::from(ip.total_len()), reply.len());
        assert!(reply.len() <= MAX_ERROR_LEN);
        assert_eq!(ip.ttl(), REPLY_TTL);
        assert_eq!(ip.protocol().0, 1);
        assert!(!ip.is_fragmenting_payload());
        let icmp = Icmpv4Slice::from_slice(&reply[20..]).unwrap();
        let icmp_type = icmp.icmp_type();
        assert_eq!(icmp_type.calc_checksum(icmp.payload()), icmp.checksum());
        // Our own parser agrees the reply is a well-formed packet.
        assert!(Ipv4Packet::new_checked(reply).is_ok());
        (ip, icmp_type, icmp.payload().to_vec())
    }

    fn write(error: IcmpError, offending: &[u8], router: Option<Ipv4Addr>) -> Option<Vec<u8>> {
        let packet = Ipv4Packet::new_checked(offending).unwrap();
        let mut out = [0u8; 1500];
        write_error(error, &packet, router, &mut out).map(|len| out[..len].to_vec())
    }

    #[test]
    fn every_error_type_decodes() {
        let offending = Spec::udp("10.1.15.7", "10.1.99.3", 1400).bytes();
        let cases = [
            (
                IcmpError::NetUnreachable,
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Network),
            ),
            (
                IcmpError::FragmentationNeeded { mtu: 1472 },
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1472,
                }),
            ),
            (
                IcmpError::TimeExceeded,
                Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
            ),
        ];
        for (error, expected) in cases {
            let reply = write(error, &offending, Some(ROUTER)).unwrap();
            assert_eq!(reply.len(), MAX_ERROR_LEN);
            let (ip, icmp_type, quote) = decode(&reply);
            assert_eq!(icmp_type, expected);
            assert_eq!((reply[20], reply[21]), error.type_code());
            assert_eq!(ip.source_addr(), ROUTER);
            assert_eq!(ip.destination_addr(), Ipv4Addr::new(10, 1, 15, 7));
            assert_eq!(ip.dcp().value() << 2, TOS_INTERNETWORK_CONTROL);
            assert_eq!(quote, &offending[..MAX_ERROR_LEN - 28]);
        }
        let reply = write(
            IcmpError::FragmentationNeeded { mtu: 1234 },
            &offending,
            None,
        )
        .unwrap();
        assert_eq!(&reply[24..28], &[0, 0, 0x04, 0xd2]);
    }

    #[test]
    fn small_packets_are_quoted_whole() {
        for len in [20, 21, 28, 29, 100, 547, 548] {
            let offending = Spec::udp("10.1.15.7", "10.1.99.3", len).bytes();
            let reply = write(IcmpError::NetUnreachable, &offending, Some(ROUTER)).unwrap();
            let (_, _, quote) = decode(&reply);
            assert_eq!(quote, offending, "len {len}");
            assert_eq!(reply.len(), 28 + len);
        }
        let offending = Spec::udp("10.1.15.7", "10.1.99.3", 549).bytes();
        let reply = write(IcmpError::NetUnreachable, &offending, Some(ROUTER)).unwrap();
        assert_eq!(decode(&reply).2, &offending[..548]);
    }

    #[test]
    fn the_quote_keeps_header_options() {
        let mut spec = Spec::udp("10.1.15.7", "10.1.99.3", 100);
        spec.options = vec![1; 40];
        let offending = spec.bytes();
        let reply = write(IcmpError::TimeExceeded, &offending, Some(ROUTER)).unwrap();
        assert_eq!(decode(&reply).2, offending);
    }

    #[test]
    fn without_a_router_address_the_offending_destination_answers() {
        let offending = Spec::udp("10.1.15.7", "10.1.99.3", 60).bytes();
        let reply = write(IcmpError::NetUnreachable, &offending, None).unwrap();
        let (ip, _, _) = decode(&reply);
        assert_eq!(ip.source_addr(), Ipv4Addr::new(10, 1, 99, 3));
        assert_eq!(ip.destination_addr(), Ipv4Addr::new(10, 1, 15, 7));
    }

    #[test]
    fn icmp_queries_get_errors_and_icmp_errors_do_not() {
        for query in [0, 8, 9, 10, 13, 14, 15, 16, 17, 18, 42, 43] {
            let offending = Spec::icmp("10.1.15.7", "10.1.99.3", query, 84).bytes();
            let reply = write(IcmpError::NetUnreachable, &offending, Some(ROUTER));
            assert!(reply.is_some(), "type {query}");
        }
        for error in [3, 4, 5, 11, 12, 1, 2, 7, 19, 30, 40, 41, 44, 200, 255] {
            let offending = Spec::icmp("10.1.15.7", "10.1.99.3", error, 84).bytes();
            assert_eq!(
                write(IcmpError::TimeExceeded, &offending, Some(ROUTER)),
                None,
                "type {error}"
            );
        }
        // An ICMP packet with no room for a type says nothing about itself.
        let empty = Spec::icmp("10.1.15.7", "10.1.99.3", 8, 20).bytes();
        assert_eq!(write(IcmpError::TimeExceeded, &empty, Some(ROUTER)), None);
    }

    #[test]
    fn only_first_fragments_get_errors() {
        let mut spec = Spec::udp("10.1.15.7", "10.1.99.3", 200);
        spec.dont_frag = false;
        spec.more_frags = true;
        assert!(write(IcmpError::NetUnreachable, &spec.bytes(), Some(ROUTER)).is_some());
        for (units, more) in [(1, true), (185, true), (185, false), (0x1fff, false)] {
            spec.frag_units = units;
            spec.more_frags = more;
            assert_eq!(
                write(IcmpError::NetUnreachable, &spec.bytes(), Some(ROUTER)),
                None
            );
        }
        // A non-first fragment of an echo request is no exception.
        let mut echo = Spec::icmp("10.1.15.7", "10.1.99.3", 8, 200);
        echo.frag_units = 10;
        assert_eq!(
            write(IcmpError::NetUnreachable, &echo.bytes(), Some(ROUTER)),
            None
        );
    }

    #[test]
    fn no_errors_to_or_about_non_hosts() {
        for src in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            let offending = Spec::udp(src, "10.1.99.3", 60).bytes();
            assert_eq!(
                write(IcmpError::NetUnreachable, &offending, Some(ROUTER)),
                None,
                "source {src}"
            );
        }
        for dst in ["224.0.0.1", "239.1.2.3", "255.255.255.255"] {
            let offending = Spec::udp("10.1.15.7", dst, 60).bytes();
            assert_eq!(
                write(IcmpError::NetUnreachable, &offending, Some(ROUTER)),
                None,
                "destination {dst}"
            );
        }
        let ok = Spec::udp("192.168.1.1", "8.8.8.8", 60).bytes();
        assert!(write(IcmpError::NetUnreachable, &ok, Some(ROUTER)).is_some());
    }

    #[test]
    fn the_buffer_bounds_the_reply() {
        let offending = Spec::udp("10.1.15.7", "10.1.99.3", 1400).bytes();
        let packet = Ipv4Packet::new_checked(&offending[..]).unwrap();
        // Room for the headers and the header + 8 bytes quote, not one byte less.
        let mut out = [0u8; 28 + 28];
        assert_eq!(
            write_error(IcmpError::TimeExceeded, &packet, Some(ROUTER), &mut out),
            Some(56)
        );
        assert_eq!(decode(&out).2, &offending[..28]);
        for len in [0, 1, 20, 28, 55] {
            let mut out = vec![0u8; len];
            assert_eq!(
                write_error(IcmpError::TimeExceeded, &packet, Some(ROUTER), &mut out),
                None,
                "buffer {len}"
            );
        }
        // A tiny offending packet fits a tiny buffer.
        let tiny = Spec::udp("10.1.15.7", "10.1.99.3", 20).bytes();
        let tiny = Ipv4Packet::new_checked(&tiny[..]).unwrap();
        let mut out = [0u8; 48];
        assert_eq!(
            write_error(IcmpError::TimeExceeded, &tiny, Some(ROUTER), &mut out),
            Some(48)
        );
    }
}
