//! TCP through the overlay with every offload on and with each one off, on both back ends:
//! 256 MiB of pseudo-random data arrives intact (compared byte for byte at the receiver),
//! nothing stalls, nothing is dropped, and the kernel's own TUN counters show that
//! super-packets were read from the TUN and written to it where the offloads are on.
//!
//! UDP through the overlay: bursts of datagrams arrive intact, one per receive with its own
//! length, in the order sent, and with TUN offload the receiving engine writes runs of them
//! as UDP super-packets that the kernel cuts back into the same datagrams.

mod support;

use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use support::{in_netns, spawn_in_netns, tcp_transfer, Lab, Stream};
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
    assert_eq!(
        active.coalesce_udp,
        offloads.tun && active.tun.uso,
        "{active:?}"
    );
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
    // The engine's own count of reads and writes agrees with the kernel's.
    assert_eq!(sent.total.tun_reads, kernel_read, "{}", sent.summary());
    assert_eq!(
        received.total.tun_writes,
        kernel_written,
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

/// Bytes of each UDP datagram: an 8-byte sequence number, then pseudo-random bytes.
const DATAGRAM: usize = 1400;
/// Datagrams sent, in bursts.
const DATAGRAMS: u64 = 20_000;
const BURST: u64 = 64;

fn carries_udp(backend: IoBackend, offloads: Offloads, seed: u64) {
    let lab = Lab::new();
    let h1 = lab.start_engine_with(&lab.h1, backend, 2, offloads);
    let h2 = lab.start_engine_with(&lab.h2, backend, 2, offloads);
    let coalescing = h2.engine.offloads().coalesce_udp;
    assert_eq!(coalescing, offloads.tun, "{:?}", h2.engine.offloads());
    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 3);

    let to = SocketAddrV4::new(lab.h2.container, 6000);
    let receiver = in_netns(&lab.h2.container_ns, move || {
        UdpSocket::bind(to).expect("bind the receiver")
    });
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt reads `size` for the length given; the socket is open.
    let rc = unsafe {
        libc::setsockopt(
            receiver.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::addr_of!(size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let from = SocketAddrV4::new(lab.h1.container, 6001);
    let sender = spawn_in_netns(&lab.h1.container_ns, move || {
        let socket = UdpSocket::bind(from).expect("bind the sender");
        socket.connect(to).expect("connect");
        let mut datagram = vec![0u8; DATAGRAM];
        for seq in 0..DATAGRAMS {
            datagram[..8].copy_from_slice(&seq.to_le_bytes());
            Stream::new(seed ^ seq).fill(&mut datagram[8..]);
            socket.send(&datagram).expect("send");
            if seq % BURST == BURST - 1 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });

    let mut buf = vec![0u8; 65_536];
    let mut want = vec![0u8; DATAGRAM - 8];
    let mut received = 0u64;
    let mut last: Option<u64> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received < DATAGRAMS && Instant::now() < deadline {
        let Ok(n) = receiver.recv(&mut buf) else {
            if sender.is_finished() {
                break;
            }
            continue;
        };
        assert_eq!(
            n, DATAGRAM,
            "datagram {received}: {n} bytes, not one datagram"
        );
        let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
        assert!(seq < DATAGRAMS, "unknown sequence number {seq}");
        if let Some(last) = last {
            assert!(
                seq > last,
                "datagram {seq} after {last}: reordered or repeated"
            );
        }
        last = Some(seq);
        Stream::new(seed ^ seq).fill(&mut want);
        assert!(buf[8..n] == want[..], "datagram {seq} arrived corrupted");
        received += 1;
    }
    sender.join().expect("sender");
    assert!(
        received * 100 >= DATAGRAMS * 95,
        "{received} of {DATAGRAMS} datagrams arrived"
    );

    let kernel_written = link_stat(&lab, &lab.h2.ns, &h2.tun, "rx_packets");
    let sent = h1.engine.shutdown();
    let written = h2.engine.shutdown();
    for snapshot in [&sent, &written] {
        let total = &snapshot.total;
        assert_eq!(total.io_errors, 0, "{}", snapshot.summary());
        assert_eq!(total.drops.iter().sum::<u64>(), 0, "{}", snapshot.summary());
    }
    let datagrams_written = written.total.tun_tx_packets;
    assert_eq!(
        written.total.tun_writes,
        kernel_written,
        "{}",
        written.summary()
    );
    eprintln!(
        "{backend}: {received} of {DATAGRAMS} datagrams, {datagrams_written} packets in {kernel_written} TUN writes"
    );
    if coalescing {
        assert!(
            kernel_written < datagrams_written,
            "no UDP super-packet: {datagrams_written} packets in {kernel_written} TUN writes"
        );
    } else {
        assert!(
            kernel_written >= datagrams_written,
            "{datagrams_written} packets in {kernel_written} TUN writes without coalescing"
        );
    }
}

#[test]
fn udp_with_every_offload_syscalls() {
    carries_udp(IoBackend::Syscalls, Offloads::ALL, 0x0ff1_0021);
}

#[test]
fn udp_with_every_offload_uring() {
    carries_udp(IoBackend::Uring, Offloads::ALL, 0x0ff1_0022);
}

#[test]
fn udp_without_tun_offload() {
    carries_udp(IoBackend::Syscalls, NO_TUN, 0x0ff1_0023);
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
