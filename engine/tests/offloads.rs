//! TCP through the overlay with every offload on and with each one off, on both back ends:
//! 256 MiB of pseudo-random data arrives intact (compared byte for byte at the receiver),
//! nothing stalls, nothing is dropped, and the kernel's own TUN counters show that
//! super-packets were read from the TUN and written to it where the offloads are on.

mod support;

use std::time::Duration;

use support::{tcp_transfer, Lab};
use weft_engine::{IoBackend, Offloads};

/// Bytes of each transfer.
const TCP_BYTES: usize = 256 << 20;

/// A counter of `dev` in namespace `ns`, as the kernel keeps it (`/sys/class/net`).
fn link_stat(lab: &Lab, ns: &str, dev: &str, name: &str) -> u64 {
    let path = format!("/sys/class/net/{dev}/statistics/{name}");
    let out = lab.exec_in(ns, &["cat", &path], Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{path} in {ns}: {text:?}"))
}

fn carries_tcp(backend: IoBackend, offloads: Offloads, seed: u64) {
    let lab = Lab::new();
    let h1 = lab.start_engine_with(&lab.h1, backend, 2, offloads);
    let h2 = lab.start_engine_with(&lab.h2, backend, 2, offloads);
    let active = h1.engine.offloads();
    assert_eq!(active.vnet_hdr, offloads.tun, "{active:?}");
    assert_eq!(active.tun.tso, offloads.tun, "{active:?}");
    assert_eq!(active.coalesce, offloads.tun, "{active:?}");
    assert_eq!(active.udp_gso, offloads.udp_gso, "{active:?}");
    assert_eq!(active.udp_gro, offloads.udp_gro, "{active:?}");
    assert!(
        active.flow_steering,
        "two workers share the port by inner flow"
    );
    assert_eq!(h2.engine.offloads(), active);

    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 3);
    tcp_transfer(
        &lab.h1.container_ns,
        &lab.h2.container_ns,
        lab.h2.container,
        5201,
        TCP_BYTES,
        seed,
    );
    lab.assert_ping(&lab.h2.container_ns, lab.h1.container, 3);
    assert!(h1.engine.is_running() && h2.engine.is_running());

    // What the kernel handed h1's engine and what h2's engine wrote, counted by the kernel
    // per packet it saw: a super-packet counts once.
    let kernel_read = link_stat(&lab, &lab.h1.ns, &h1.tun, "tx_packets");
    let kernel_written = link_stat(&lab, &lab.h2.ns, &h2.tun, "rx_packets");
    let sent = h1.engine.shutdown();
    let received = h2.engine.shutdown();
    for snapshot in [&sent, &received] {
        let total = &snapshot.total;
        assert_eq!(total.io_errors, 0, "{}", snapshot.summary());
        assert_eq!(total.drops.iter().sum::<u64>(), 0, "{}", snapshot.summary());
    }
    assert!(
        received.total.tun_tx_bytes > TCP_BYTES as u64,
        "{}",
        received.summary()
    );
    // Every packet the engine counts left h1 as a datagram and reached h2's TUN.
    assert_eq!(sent.total.tun_rx_packets, sent.total.udp_tx_packets);
    assert_eq!(received.total.udp_rx_packets, received.total.tun_tx_packets);
    let segments_per_read = sent.total.tun_rx_packets as f64 / kernel_read as f64;
    let segments_per_write = received.total.tun_tx_packets as f64 / kernel_written as f64;
    if offloads.tun {
        assert!(
            segments_per_read > 4.0,
            "TSO: {segments_per_read:.1} packets per TUN read"
        );
    } else {
        assert!(
            segments_per_read < 1.01,
            "no TSO: {segments_per_read:.2} packets per TUN read"
        );
    }
    // Coalescing merges the datagrams of one receive (one GRO run on the io_uring back end,
    // one recvmmsg batch on the other).
    if offloads.tun && (offloads.udp_gro || backend == IoBackend::Syscalls) {
        assert!(
            segments_per_write > 4.0,
            "coalescing: {segments_per_write:.1} packets per TUN write"
        );
    }
    if !offloads.tun {
        assert!(
            segments_per_write < 1.01,
            "no coalescing: {segments_per_write:.2} packets per TUN write"
        );
    }
}

const NO_TUN: Offloads = Offloads {
    tun: false,
    ..Offloads::ALL
};
const NO_GSO: Offloads = Offloads {
    udp_gso: false,
    ..Offloads::ALL
};
const NO_GRO: Offloads = Offloads {
    udp_gro: false,
    ..Offloads::ALL
};

#[test]
fn uring_with_every_offload() {
    carries_tcp(IoBackend::Uring, Offloads::ALL, 0x0ff1_0001);
}

#[test]
fn uring_without_tun_offload() {
    carries_tcp(IoBackend::Uring, NO_TUN, 0x0ff1_0002);
}

#[test]
fn uring_without_udp_gso() {
    carries_tcp(IoBackend::Uring, NO_GSO, 0x0ff1_0003);
}

#[test]
fn uring_without_udp_gro() {
    carries_tcp(IoBackend::Uring, NO_GRO, 0x0ff1_0004);
}

#[test]
fn uring_without_any_offload() {
    carries_tcp(IoBackend::Uring, Offloads::NONE, 0x0ff1_0005);
}

#[test]
fn syscalls_with_every_offload() {
    carries_tcp(IoBackend::Syscalls, Offloads::ALL, 0x0ff1_0011);
}

#[test]
fn syscalls_without_tun_offload() {
    carries_tcp(IoBackend::Syscalls, NO_TUN, 0x0ff1_0012);
}

#[test]
fn syscalls_without_udp_gso() {
    carries_tcp(IoBackend::Syscalls, NO_GSO, 0x0ff1_0013);
}

#[test]
fn syscalls_without_udp_gro() {
    carries_tcp(IoBackend::Syscalls, NO_GRO, 0x0ff1_0014);
}

#[test]
fn syscalls_without_any_offload() {
    carries_tcp(IoBackend::Syscalls, Offloads::NONE, 0x0ff1_0015);
}
