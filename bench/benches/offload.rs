//! Throughput of the offload paths on a 64 000-byte TCP super-packet cut at 1420 bytes (46
//! segments of a 1472-byte TUN MTU, with 32 bytes of TCP options):
//!
//! - `segment/headers`: what the engine does per super-packet read from the TUN — every
//!   segment's headers written and both checksums computed, the payload left in place;
//! - `segment/contiguous`: the same plus copying each payload behind its headers (the form a
//!   copying engine would use), for comparison;
//! - `coalesce`: what the engine does per receive — the 46 segments sorted into one group
//!   (their TCP checksums verified) and the super-packet's header written;
//! - `segment/headers-partial` and `coalesce/partial-peer`: the same between two weft hosts
//!   that leave inner checksums partial (the sender computes none, the receiver verifies
//!   none; the outer UDP checksum covers the bytes).
//!
//! Throughput is payload bytes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use weft_engine::offload::segment::MAX_HEADER_LEN;
use weft_engine::offload::{Coalescer, Segmenter, VnetHeader};
use weft_engine::wire::ipv4::checksum;
use weft_engine::wire::ipv4::Ipv4Packet;
use weft_engine::wire::vnet::{GSO_TCPV4, NEEDS_CSUM};

const PAYLOAD: usize = 64_000;
const GSO_SIZE: u16 = 1420;
const HEADERS: usize = 20 + 32;

/// A TSO super-packet as the TUN hands it over: valid IPv4 header, TCP header with
/// timestamps, the pseudo-header sum in the TCP checksum field.
fn super_packet() -> (VnetHeader, Vec<u8>) {
    let total = HEADERS + PAYLOAD;
    let mut packet = vec![0u8; total];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    packet[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    packet[6] = 0x40;
    packet[8] = 64;
    packet[9] = 6;
    packet[12..16].copy_from_slice(&[10, 1, 1, 2]);
    packet[16..20].copy_from_slice(&[10, 1, 2, 2]);
    let check = checksum::of(&packet[..20]);
    packet[10..12].copy_from_slice(&check.to_be_bytes());
    let tcp = &mut packet[20..HEADERS];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&7u32.to_be_bytes());
    tcp[12] = 8 << 4;
    tcp[13] = 0x18;
    tcp[14..16].copy_from_slice(&502u16.to_be_bytes());
    tcp[20..24].copy_from_slice(&[1, 1, 8, 10]);
    for (i, byte) in packet[HEADERS..].iter_mut().enumerate() {
        *byte = (i * 13 + 5) as u8;
    }
    let tcp_len = (total - 20) as u16;
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&[10, 1, 1, 2]);
    pseudo[4..8].copy_from_slice(&[10, 1, 2, 2]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&tcp_len.to_be_bytes());
    let partial = checksum::sum(&pseudo);
    packet[36..38].copy_from_slice(&partial.to_be_bytes());
    let header = VnetHeader {
        flags: NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: HEADERS as u16,
        gso_size: GSO_SIZE,
        csum_start: 20,
        csum_offset: 16,
    };
    (header, packet)
}

fn offload(c: &mut Criterion) {
    let (header, packet) = super_packet();
    let segmenter = Segmenter::new(&header, &packet).expect("a super-packet");
    let segments = segmenter.segments();
    let mut flat = vec![0u8; PAYLOAD + segments * HEADERS];
    let written = segmenter
        .segment_into(&packet, &mut flat)
        .expect("room for every segment");
    let segment_list: Vec<Vec<u8>> = flat[..written]
        .chunks(HEADERS + usize::from(GSO_SIZE))
        .map(<[u8]>::to_vec)
        .collect();

    let mut group = c.benchmark_group("offload");
    group.throughput(Throughput::Bytes(PAYLOAD as u64));
    let mut headers = vec![0u8; segments * MAX_HEADER_LEN];
    group.bench_function("segment/headers", |b| {
        b.iter(|| {
            for (index, out) in headers.chunks_mut(MAX_HEADER_LEN).enumerate() {
                black_box(segmenter.write_header(black_box(&packet), index, out));
            }
        })
    });
    let partial = segmenter.with_partial_checksums();
    group.bench_function("segment/headers-partial", |b| {
        b.iter(|| {
            for (index, out) in headers.chunks_mut(MAX_HEADER_LEN).enumerate() {
                black_box(partial.write_header(black_box(&packet), index, out));
            }
        })
    });
    group.bench_function("segment/contiguous", |b| {
        b.iter(|| black_box(segmenter.segment_into(black_box(&packet), &mut flat)))
    });
    let mut coalescer = Coalescer::new();
    let mut head = segment_list[0].to_vec();
    group.bench_function("coalesce", |b| {
        b.iter(|| {
            coalescer.clear();
            for segment in &segment_list {
                coalescer.push(black_box(segment));
            }
            head.copy_from_slice(&segment_list[0]);
            let group = coalescer.groups()[0];
            black_box(group.finish(&mut head))
        })
    });
    let mut partial_flat = vec![0u8; PAYLOAD + segments * HEADERS];
    partial
        .segment_into(&packet, &mut partial_flat)
        .expect("room for every segment");
    let partial_list: Vec<Vec<u8>> = partial_flat[..written]
        .chunks(HEADERS + usize::from(GSO_SIZE))
        .map(<[u8]>::to_vec)
        .collect();
    group.bench_function("coalesce/partial-peer", |b| {
        b.iter(|| {
            coalescer.clear();
            for segment in &partial_list {
                // The receive decision parses each datagram once; the coalescer reads its view.
                if let Ok(ip) = Ipv4Packet::new_checked(black_box(&segment[..])) {
                    coalescer.push_from_partial_peer(&ip);
                }
            }
            head.copy_from_slice(&partial_list[0]);
            let group = coalescer.groups()[0];
            black_box(group.finish(&mut head))
        })
    });
    group.finish();

    // The coalescer merged every segment back into the super-packet.
    coalescer.clear();
    for segment in &segment_list {
        coalescer.push(segment);
    }
    assert_eq!(coalescer.groups().len(), 1);
    assert_eq!(coalescer.groups()[0].super_len(), packet.len());
}

criterion_group!(benches, offload);
criterion_main!(benches);
