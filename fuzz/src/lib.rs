//! What the fuzz targets share: the fixed route table, how an input is split into a sender
//! and a packet, and the seed packets that start the corpus on every interesting path.

#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddrV4};

use weft_engine::wire::ipv4::checksum;
use weft_engine::route::{Overlay, RouteTable};

/// The overlay UDP port in the fixed table.
pub const PORT: u16 = 8285;

/// The TUN MTU the targets use by default.
pub const TUN_MTU: usize = 1472;

/// This host holds 10.1.15.0/24 of 10.1.0.0/16; 198.18.0.2 holds 10.1.81.0/24 and
/// 10.1.82.0/24, 198.18.0.3 the last subnet and 198.18.0.4 the first.
pub fn table(with_lease: bool) -> RouteTable {
    let overlay = match Overlay::new(net("10.1.0.0/16"), 24) {
        Ok(overlay) => overlay,
        Err(error) => panic!("fixed overlay: {error}"),
    };
    let local = with_lease.then(|| net("10.1.15.0/24"));
    let peers = [
        (net("10.1.81.0/24"), Ipv4Addr::new(198, 18, 0, 2)),
        (net("10.1.82.0/24"), Ipv4Addr::new(198, 18, 0, 2)),
        (net("10.1.255.0/24"), Ipv4Addr::new(198, 18, 0, 3)),
        (net("10.1.0.0/24"), Ipv4Addr::new(198, 18, 0, 4)),
    ];
    match RouteTable::build(overlay, PORT, local, peers) {
        Ok(table) => table,
        Err(error) => panic!("fixed table: {error}"),
    }
}

fn net(s: &str) -> ipnet::Ipv4Net {
    match s.parse() {
        Ok(net) => net,
        Err(error) => panic!("{s}: {error}"),
    }
}

/// Bytes before the packet in a `decide` input: flags, sender address, sender port.
pub const DECIDE_PREFIX: usize = 7;

/// A `decide` input: which table and policy to use, who sent the datagram, and the packet.
#[derive(Debug)]
pub struct DecideInput<'a> {
    /// Use the table in which this host holds no lease.
    pub without_lease: bool,
    /// Accept inner sources outside the Network.
    pub allow_foreign_sources: bool,
    /// Use a TUN MTU of 576 instead of [`TUN_MTU`].
    pub small_mtu: bool,
    /// The datagram's sender.
    pub from: SocketAddrV4,
    /// The packet.
    pub packet: &'a [u8],
}

impl<'a> DecideInput<'a> {
    /// Split raw fuzzer bytes; inputs shorter than the prefix are all packet.
    pub fn parse(data: &'a [u8]) -> Self {
        let (prefix, packet) = match data.split_first_chunk::<DECIDE_PREFIX>() {
            Some((prefix, packet)) => (*prefix, packet),
            None => ([0; DECIDE_PREFIX], data),
        };
        let [flags, a, b, c, d, p0, p1] = prefix;
        Self {
            without_lease: flags & 1 != 0,
            allow_foreign_sources: flags & 2 != 0,
            small_mtu: flags & 4 != 0,
            from: SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), u16::from_be_bytes([p0, p1])),
            packet,
        }
    }

    /// The raw bytes for this input.
    pub fn encode(&self) -> Vec<u8> {
        let flags = u8::from(self.without_lease)
            | u8::from(self.allow_foreign_sources) << 1
            | u8::from(self.small_mtu) << 2;
        let mut out = vec![flags];
        out.extend_from_slice(&self.from.ip().octets());
        out.extend_from_slice(&self.from.port().to_be_bytes());
        out.extend_from_slice(self.packet);
        out
    }
}

/// A well-formed IPv4 packet of `len` bytes (at least 20) with a patterned payload.
pub fn packet(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, protocol: u8, len: usize) -> Vec<u8> {
    let len = len.clamp(20, usize::from(u16::MAX));
    let mut out = vec![0u8; len];
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    out[6] = 0x40;
    out[8] = ttl;
    out[9] = protocol;
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&dst.octets());
    for (i, byte) in out[20..].iter_mut().enumerate() {
        *byte = (i * 7 + 3) as u8;
    }
    if protocol == 1 && len > 20 {
        out[20] = 8; // echo request
        out[21] = 0;
    }
    let check = checksum::of(&out[..20]);
    out[10..12].copy_from_slice(&check.to_be_bytes());
    out
}

/// Named seed inputs for the `decide` target: one per decision path.
pub fn decide_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ip = Ipv4Addr::new;
    let peer2 = SocketAddrV4::new(ip(198, 18, 0, 2), PORT);
    let stranger = SocketAddrV4::new(ip(198, 18, 0, 99), PORT);
    let here = ip(10, 1, 15, 7);
    let there = ip(10, 1, 81, 5);
    let cases: Vec<(&'static str, SocketAddrV4, Vec<u8>)> = vec![
        ("forward", peer2, packet(there, here, 64, 17, 1400)),
        ("send", peer2, packet(here, there, 64, 6, 1400)),
        ("ttl1", peer2, packet(there, here, 1, 17, 300)),
        ("echo_ttl1", peer2, packet(there, here, 1, 1, 84)),
        (
            "no_route",
            peer2,
            packet(here, ip(10, 1, 99, 1), 64, 17, 200),
        ),
        ("too_big", peer2, packet(there, here, 64, 17, 1500)),
        (
            "spoofed",
            peer2,
            packet(ip(10, 1, 255, 1), here, 64, 17, 100),
        ),
        ("foreign", peer2, packet(ip(8, 8, 8, 8), here, 64, 17, 100)),
        (
            "multicast",
            peer2,
            packet(here, ip(224, 0, 0, 251), 1, 17, 100),
        ),
        ("stranger", stranger, packet(there, here, 64, 17, 100)),
        ("short", peer2, vec![0x45, 0, 0, 20]),
        ("ipv6", peer2, {
            let mut v6 = vec![0u8; 60];
            v6[0] = 0x60;
            v6
        }),
    ];
    cases
        .into_iter()
        .map(|(name, from, packet)| {
            let input = DecideInput {
                without_lease: false,
                allow_foreign_sources: false,
                small_mtu: false,
                from,
                packet: &packet,
            };
            (name, input.encode())
        })
        .collect()
}

/// Named seed inputs for the `packet` target.
pub fn packet_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ip = Ipv4Addr::new;
    let mut with_options = packet(ip(10, 1, 15, 7), ip(10, 1, 81, 5), 64, 17, 100);
    with_options[0] = 0x47;
    with_options[20..28].copy_from_slice(&[1, 1, 1, 1, 1, 1, 1, 0]);
    with_options[10] = 0;
    with_options[11] = 0;
    let check = checksum::of(&with_options[..28]);
    with_options[10..12].copy_from_slice(&check.to_be_bytes());
    vec![
        (
            "udp",
            packet(ip(10, 1, 15, 7), ip(10, 1, 81, 5), 64, 17, 1400),
        ),
        ("echo", packet(ip(10, 1, 15, 7), ip(10, 1, 81, 5), 1, 1, 84)),
        ("ttl0", packet(ip(10, 1, 15, 7), ip(10, 1, 81, 5), 0, 6, 60)),
        (
            "header_only",
            packet(ip(10, 1, 15, 7), ip(10, 1, 81, 5), 64, 17, 20),
        ),
        ("options", with_options),
    ]
}
