//! The IPv4 parser, its header edits, the checksum and the ICMP writer on arbitrary bytes.

#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use weft_engine::decide::REPLY_BUF_LEN;
use weft_engine::wire::icmp::{self, IcmpError};
use weft_engine::wire::ipv4::{checksum, Ipv4Packet};

/// RFC 1071 one 16-bit word at a time, to check the wide implementation against.
fn reference_sum(data: &[u8]) -> u16 {
    let mut acc: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        acc += u32::from(word);
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fuzz_target!(|data: &[u8]| {
    assert_eq!(checksum::sum(data), reference_sum(data));

    let Ok(packet) = Ipv4Packet::new_checked(data) else {
        return;
    };
    let header_len = packet.header_len();
    assert!((20..=60).contains(&header_len));
    assert_eq!(packet.total_len(), data.len());
    assert_eq!(packet.header().len() + packet.payload().len(), data.len());
    assert_eq!(packet.options().len(), header_len - 20);
    let _ = (
        packet.src(),
        packet.dst(),
        packet.protocol(),
        packet.ident(),
        packet.tos(),
    );
    let _ = (
        packet.dont_frag(),
        packet.more_frags(),
        packet.frag_offset(),
        packet.is_fragment(),
    );

    // A TTL edit keeps the header valid and touches only the TTL and the checksum.
    let mut copy = data.to_vec();
    let mut view = Ipv4Packet::new_checked(&mut copy[..]).unwrap();
    match view.decrement_ttl() {
        Some(ttl) => assert_eq!(ttl + 1, packet.ttl()),
        None => assert_eq!(packet.ttl(), 0),
    }
    assert!(Ipv4Packet::new_checked(&copy[..]).is_ok());
    for (at, (after, before)) in copy.iter().zip(data).enumerate() {
        assert!(
            after == before || matches!(at, 8 | 10 | 11),
            "byte {at} changed"
        );
    }
    let mut view = Ipv4Packet::new_checked(&mut copy[..]).unwrap();
    view.fill_checksum();
    assert!(Ipv4Packet::new_checked(&copy[..]).is_ok());

    let mut reply = [0u8; REPLY_BUF_LEN];
    let errors = [
        IcmpError::NetUnreachable,
        IcmpError::TimeExceeded,
        IcmpError::FragmentationNeeded { mtu: 1472 },
    ];
    for error in errors {
        for router in [None, Some(Ipv4Addr::new(10, 1, 15, 0))] {
            match icmp::write_error(error, &packet, router, &mut reply) {
                Some(len) => {
                    assert!(icmp::may_report(&packet));
                    assert!(len <= icmp::MAX_ERROR_LEN);
                    let answer = Ipv4Packet::new_checked(&reply[..len]).unwrap();
                    assert_eq!(answer.dst(), packet.src());
                    assert_eq!(answer.src(), router.unwrap_or(packet.dst()));
                    assert_eq!(checksum::sum(answer.payload()), 0xffff);
                    assert_eq!((reply[20], reply[21]), error.type_code());
                    let quoted = len - 28;
                    assert_eq!(&reply[28..len], &data[..quoted]);
                }
                None => assert!(!icmp::may_report(&packet)),
            }
        }
    }
});
