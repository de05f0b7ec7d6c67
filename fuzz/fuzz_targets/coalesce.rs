//! Coalescing of any batch of packets: TCP segments of a few flows and UDP datagrams of one
//! built from the input (with gaps, retransmissions, flags, odd lengths, corrupted or missing
//! checksums) mixed with raw bytes. Every
//! packet must be written exactly once, a flow's packets never reordered, and every
//! super-packet must be valid, carry exactly its members' payloads, and cut back into them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_engine::offload::segment::MAX_HEADER_LEN;
use weft_engine::offload::{complete_checksum, Coalescer, Plan};
use weft_engine::wire::ipv4::{checksum, Ipv4Packet};

/// A TCP/IPv4 segment of flow `flow` with the given fields and a correct checksum (unless
/// `corrupt`).
#[allow(clippy::too_many_arguments)]
fn segment(flow: u8, seq: u32, payload: usize, flags: u8, ttl: u8, options: bool, corrupt: bool) -> Vec<u8> {
    let tcp_len = if options { 32 } else { 20 };
    let total = 20 + tcp_len + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = ttl;
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 1, 1, 2]);
    p[16..20].copy_from_slice(&[10, 1, 2, 2 + flow]);
    let check = checksum::of(&p[..20]);
    p[10..12].copy_from_slice(&check.to_be_bytes());
    p[20..22].copy_from_slice(&(40000 + u16::from(flow)).to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&1u32.to_be_bytes());
    p[32] = ((tcp_len / 4) as u8) << 4;
    p[33] = flags | 0x10;
    p[34..36].copy_from_slice(&1000u16.to_be_bytes());
    if options {
        p[40..44].copy_from_slice(&[1, 1, 8, 10]);
    }
    for (i, byte) in p[20 + tcp_len..].iter_mut().enumerate() {
        *byte = (seq as usize + i) as u8;
    }
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&p[12..20]);
    pseudo[9] = 6;
    pseudo[10..].copy_from_slice(&((tcp_len + payload) as u16).to_be_bytes());
    let sum = checksum::add(checksum::sum(&pseudo), checksum::sum(&p[20..]));
    let check = !sum ^ u16::from(corrupt);
    p[36..38].copy_from_slice(&check.to_be_bytes());
    p
}

/// A UDP/IPv4 datagram of flow 3 with `payload` bytes, IP identification `ident`, a correct
/// checksum (unless `corrupt`), or none at all (`no_checksum`).
fn datagram(payload: usize, ident: u16, ttl: u8, no_checksum: bool, corrupt: bool) -> Vec<u8> {
    let total = 28 + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6] = 0x40;
    p[8] = ttl;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 1, 1, 2]);
    p[16..20].copy_from_slice(&[10, 1, 2, 5]);
    let check = checksum::of(&p[..20]);
    p[10..12].copy_from_slice(&check.to_be_bytes());
    p[20..22].copy_from_slice(&40003u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    for (i, byte) in p[28..].iter_mut().enumerate() {
        *byte = (payload + i) as u8;
    }
    if !no_checksum {
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&p[12..20]);
        pseudo[9] = 17;
        pseudo[10..].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        let sum = checksum::add(checksum::sum(&pseudo), checksum::sum(&p[20..]));
        // A computed zero goes on the wire as 0xffff: zero means "no checksum".
        let check = match !sum ^ u16::from(corrupt) {
            0 => 0xffff,
            check => check,
        };
        p[26..28].copy_from_slice(&check.to_be_bytes());
    }
    p
}

/// Build the batch from the input: 4-byte records make segments, a record whose first byte
/// has the top bit set is a raw packet of up to 255 bytes.
fn batch(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    let mut seqs = [0u32; 4];
    let mut ident = 0u16;
    while let Some((&kind, rest)) = data.split_first() {
        if kind & 0x80 != 0 {
            let Some((&len, rest)) = rest.split_first() else {
                break;
            };
            let len = usize::from(len).min(rest.len());
            packets.push(rest[..len].to_vec());
            data = &rest[len..];
            continue;
        }
        let Some((record, rest)) = rest.split_first_chunk::<3>() else {
            break;
        };
        data = rest;
        let flow = kind & 3;
        let flags = [0, 0x08, 0x01, 0x80, 0x02, 0x20][usize::from(kind >> 2 & 7) % 6];
        let payload = match record[0] {
            0..=199 => 1000,
            200..=239 => usize::from(record[1]) * 4,
            _ => usize::from(record[1]),
        };
        let seq = &mut seqs[usize::from(flow)];
        let this = match record[2] & 7 {
            0 => seq.wrapping_sub(1000),
            1 => seq.wrapping_add(1),
            _ => *seq,
        };
        let ttl = if record[2] & 0x08 != 0 { 63 } else { 64 };
        let options = record[2] & 0x10 != 0;
        let corrupt = record[2] & 0x20 != 0;
        if flow == 3 {
            // Consecutive identifications, as a connected socket sends, unless the record
            // skips some.
            ident = ident.wrapping_add(if record[2] & 0x40 != 0 { 7 } else { 1 });
            packets.push(datagram(payload, ident, ttl, options, corrupt));
            continue;
        }
        packets.push(segment(flow, this, payload, flags, ttl, options, corrupt));
        *seq = this.wrapping_add(payload as u32);
    }
    packets
}

fuzz_target!(|data: &[u8]| {
    let packets = batch(data);
    let mut coalescer = Coalescer::new();
    coalescer.set_udp(true);
    for packet in &packets {
        coalescer.push(packet);
    }
    assert_eq!(coalescer.len(), packets.len());
    let mut written = vec![false; packets.len()];
    // The last packet index written per flow (protocol, destination address and ports).
    let mut last: Vec<(u8, [u8; 4], [u8; 4], usize)> = Vec::new();
    for group in coalescer.groups() {
        let members: Vec<usize> = coalescer.members(group).collect();
        assert_eq!(members.len(), group.len());
        assert!(members.len() <= 64);
        assert_eq!(members[0], group.head());
        for &member in &members {
            assert!(!written[member], "packet {member} written twice");
            written[member] = true;
            let packet = &packets[member];
            if packet.len() >= 24 && packet[0] == 0x45 && matches!(packet[9], 6 | 17) {
                let protocol = packet[9];
                let dst: [u8; 4] = packet[16..20].try_into().unwrap();
                let ports: [u8; 4] = packet[20..24].try_into().unwrap();
                match last
                    .iter_mut()
                    .find(|(r, d, p, _)| *r == protocol && *d == dst && *p == ports)
                {
                    Some(entry) => {
                        assert!(entry.3 < member, "flow reordered");
                        entry.3 = member;
                    }
                    None => last.push((protocol, dst, ports, member)),
                }
            }
        }
        let mut head = packets[group.head()].clone();
        let vnet = group.finish(&mut head);
        if !group.is_super_packet() {
            assert_eq!(head, packets[group.head()]);
            continue;
        }
        let skip = group.header_len();
        let mut whole = head;
        for &member in &members[1..] {
            whole.extend_from_slice(&packets[member][skip..]);
        }
        assert_eq!(whole.len(), group.super_len());
        assert!(whole.len() <= 65_535);
        Ipv4Packet::new_checked(&whole[..]).expect("a valid IPv4 super-packet");
        // The kernel's completion of the checksum verifies.
        let mut completed = whole.clone();
        let start = usize::from(vnet.csum_start);
        complete_checksum(&mut completed, start, start + usize::from(vnet.csum_offset))
            .expect("the checksum field is inside");
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&completed[12..20]);
        pseudo[9] = completed[9];
        pseudo[10..].copy_from_slice(&((completed.len() - 20) as u16).to_be_bytes());
        assert_eq!(
            checksum::add(checksum::sum(&pseudo), checksum::sum(&completed[20..])),
            0xffff
        );
        // Cut again, it gives back the members' payloads.
        let Ok(Plan::Segment(segmenter)) = Plan::new(&vnet, &whole) else {
            panic!("a super-packet that cannot be cut");
        };
        assert_eq!(segmenter.segments(), members.len());
        let mut out = [0u8; MAX_HEADER_LEN];
        for (index, &member) in members.iter().enumerate() {
            let cut = segmenter
                .write_header(&whole, index, &mut out)
                .expect("a segment");
            assert_eq!(&whole[cut.payload.clone()], &packets[member][skip..]);
            if whole[9] == 17 {
                // A datagram comes back byte for byte: headers, identification, checksum.
                assert_eq!(&out[..skip], &packets[member][..skip], "datagram {member} changed");
            }
        }
    }
    assert!(written.iter().all(|w| *w), "a packet was not written");
});
