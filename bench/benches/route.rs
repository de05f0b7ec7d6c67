//! Route lookup cost: a small overlay (256 leases: 10.1.0.0/16 in /24s) and a large one
//! (65 536 leases: 10.0.0.0/8 in /24s), each lookup a destination spread over the Network.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipnet::Ipv4Net;
use weft_engine::route::{Overlay, RouteTable};

/// Destinations per measured iteration: enough to defeat per-call overhead.
const LOOKUPS: usize = 1024;

/// A table in which every host subnet of `network` is leased to its own public address.
fn full_table(network: &str, subnet_len: u8) -> RouteTable {
    let network: Ipv4Net = network.parse().expect("network");
    let overlay = Overlay::new(network, subnet_len).expect("overlay");
    let leases = (0..overlay.slot_count()).map(|slot| {
        // 198.18.0.0/15 holds 131 072 addresses, enough for one per lease.
        let public = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + slot as u32);
        (overlay.subnet_at(slot), public)
    });
    RouteTable::build(overlay, 8285, None, leases).expect("table")
}

/// Destinations scattered over the whole Network (a multiplicative hash of the index), so
/// that the large table's lookups miss the cache as real traffic to many hosts would.
fn destinations(network: &str) -> Vec<Ipv4Addr> {
    let network: Ipv4Net = network.parse().expect("network");
    let base = u32::from(network.network());
    let host_mask = !u32::from(network.netmask());
    (0..LOOKUPS as u32)
        .map(|i| Ipv4Addr::from(base | (i.wrapping_mul(0x9e37_79b1) & host_mask)))
        .collect()
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    group.throughput(Throughput::Elements(LOOKUPS as u64));
    for (name, network) in [
        ("256_leases", "10.1.0.0/16"),
        ("65536_leases", "10.0.0.0/8"),
    ] {
        let table = full_table(network, 24);
        let dsts = destinations(network);
        assert!(dsts.iter().all(|dst| table.peer_for(*dst).is_some()));
        group.bench_function(name, |b| {
            b.iter(|| {
                for dst in &dsts {
                    black_box(table.peer_for(black_box(*dst)));
                }
            })
        });
        let senders: Vec<_> = dsts
            .iter()
            .map(|dst| (table.peer_for(*dst).expect("leased"), *dst))
            .collect();
        group.bench_function(format!("{name}_sender_check"), |b| {
            b.iter(|| {
                for (from, src) in &senders {
                    black_box(table.is_peer(*from) && table.sender_owns(*from, *src));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
