//! Per-packet cost of the pure decision path on a 1400-byte packet: `from_tun` (parse, route,
//! TTL edit) and `from_peer` (sender check, parse, receive validation, TTL edit), against a
//! 256-lease table. Each iteration restores the 20-byte header the previous one edited, as a
//! fresh packet would arrive.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipnet::Ipv4Net;
use weft_engine::decide::{from_peer, from_tun, PeerDecision, Policy, TunDecision, REPLY_BUF_LEN};
use weft_engine::route::{Overlay, RouteTable};
use weft_engine::wire::ipv4::checksum;

const PACKET_LEN: usize = 1400;
const PORT: u16 = 8285;

/// 10.1.0.0/16 in /24s, all leased; this host holds 10.1.15.0/24.
fn table() -> RouteTable {
    let network: Ipv4Net = "10.1.0.0/16".parse().expect("network");
    let overlay = Overlay::new(network, 24).expect("overlay");
    let leases = (0..overlay.slot_count()).map(|slot| {
        let public = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + slot as u32);
        (overlay.subnet_at(slot), public)
    });
    let local = "10.1.15.0/24".parse().expect("local");
    RouteTable::build(overlay, PORT, Some(local), leases).expect("table")
}

fn packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut out = vec![0u8; PACKET_LEN];
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(PACKET_LEN as u16).to_be_bytes());
    out[6] = 0x40;
    out[8] = 64;
    out[9] = 6;
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&dst.octets());
    let check = checksum::of(&out[..20]);
    out[10..12].copy_from_slice(&check.to_be_bytes());
    out
}

fn decisions(c: &mut Criterion) {
    let routes = table();
    let policy = Policy {
        tun_mtu: 1472,
        allow_foreign_sources: false,
    };
    let here = Ipv4Addr::new(10, 1, 15, 7);
    let there = Ipv4Addr::new(10, 1, 81, 5);
    let peer = routes.peer_for(there).expect("leased");
    let outbound = packet(here, there);
    let inbound = packet(there, here);
    let mut buf = outbound.clone();
    let mut reply = [0u8; REPLY_BUF_LEN];
    assert_eq!(
        from_tun(&mut buf, &routes, &policy, &mut reply),
        TunDecision::SendToPeer(peer)
    );
    let mut buf = inbound.clone();
    assert_eq!(
        from_peer(peer, &mut buf, &routes, &policy, &mut reply),
        PeerDecision::WriteToTun
    );

    let throughputs = [
        ("bytes", Throughput::Bytes(PACKET_LEN as u64)),
        ("packets", Throughput::Elements(1)),
    ];
    for (unit, throughput) in throughputs {
        let mut group = c.benchmark_group(format!("decide_{unit}"));
        group.throughput(throughput);
        let mut buf = outbound.clone();
        group.bench_function(BenchmarkId::new("from_tun", PACKET_LEN), |b| {
            b.iter(|| {
                buf[..20].copy_from_slice(&outbound[..20]);
                black_box(from_tun(black_box(&mut buf), &routes, &policy, &mut reply))
            })
        });
        let mut buf = inbound.clone();
        group.bench_function(BenchmarkId::new("from_peer", PACKET_LEN), |b| {
            b.iter(|| {
                buf[..20].copy_from_slice(&inbound[..20]);
                black_box(from_peer(
                    black_box(peer),
                    black_box(&mut buf),
                    &routes,
                    &policy,
                    &mut reply,
                ))
            })
        });
        group.finish();
    }
}

criterion_group!(benches, decisions);
criterion_main!(benches);
