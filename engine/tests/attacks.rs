//! What arrives on the overlay port from a host that holds no lease never reaches a
//! container, and nothing a datagram holds can stop a worker.

mod support;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use support::{eventually, ipv4_udp, udp_listener, udp_socket_in, Lab, Stream, PORT};
use weft_engine::{DropReason, IoBackend};

fn forged_source_is_dropped(backend: IoBackend) {
    let lab = Lab::new();
    let h1 = lab.start_engine(&lab.h1, backend, 2);
    let _h2 = lab.start_engine(&lab.h2, backend, 2);
    let target = SocketAddrV4::new(lab.h1.container, 7777);
    let (ready, listener) = udp_listener(&lab.h1.container_ns, target, Duration::from_secs(2));
    ready.recv_timeout(Duration::from_secs(5)).unwrap();

    // h3 holds a lease (10.1.3.0/24) but claims to speak for a container of h2's subnet;
    // from another port it is no lease holder at all.
    let forged = ipv4_udp(
        Ipv4Addr::new(10, 1, 2, 99),
        40000,
        lab.h1.container,
        7777,
        b"forged",
    );
    let holder = udp_socket_in(&lab.h3_ns, SocketAddrV4::new(lab.h3_public, PORT));
    let stranger = udp_socket_in(&lab.h3_ns, SocketAddrV4::new(lab.h3_public, PORT + 1));
    for _ in 0..5 {
        holder
            .send_to(&forged, SocketAddrV4::new(lab.h1.public, PORT))
            .unwrap();
        stranger
            .send_to(&forged, SocketAddrV4::new(lab.h1.public, PORT))
            .unwrap();
    }
    // The same kind of datagram from the real container behind h2 goes through: the listener
    // works and the path is up.
    let genuine = udp_socket_in(
        &lab.h2.container_ns,
        SocketAddrV4::new(lab.h2.container, 40000),
    );
    genuine.send_to(b"genuine", target).unwrap();

    let got = listener.join().unwrap();
    assert!(
        got.iter().any(|p| p == b"genuine"),
        "the genuine datagram was lost"
    );
    assert!(
        !got.iter().any(|p| p == b"forged"),
        "a forged datagram reached the container"
    );
    let counted = || {
        let c = h1.engine.counters();
        c.drops(DropReason::SpoofedSource) == 5 && c.drops(DropReason::UnknownPeer) == 5
    };
    assert!(
        eventually(Duration::from_secs(2), counted),
        "forged datagrams not counted by reason: {}",
        h1.engine.counters().summary()
    );
    assert!(h1.engine.is_running());
}

fn garbage_leaves_the_engine_running(backend: IoBackend) {
    let lab = Lab::new();
    let h1 = lab.start_engine(&lab.h1, backend, 2);
    let _h2 = lab.start_engine(&lab.h2, backend, 2);
    let before = h1.engine.counters();

    let attacker = udp_socket_in(&lab.h3_ns, SocketAddrV4::new(lab.h3_public, PORT));
    let victim = SocketAddrV4::new(lab.h1.public, PORT);
    let mut random = Stream::new(0xbad_da7a);
    let mut buf = vec![0u8; 65507];
    let mut sent = 0u64;
    for i in 0..10_000u32 {
        let len = match i % 100 {
            // Edge lengths: empty, shorter than a header, a header, the largest datagram.
            0 => 0,
            1 => 1,
            2 => 19,
            3 => 20,
            4 => 65507,
            _ => (random.next_u64() % 1473) as usize,
        };
        random.fill(&mut buf[..len]);
        if i % 3 == 0 && len >= 20 {
            // Half-plausible IPv4 headers reach deeper into the checks.
            buf[0] = 0x45;
        }
        // The attacker's own kernel may refuse a send when its buffer is full: not counted.
        if attacker.send_to(&buf[..len], victim).is_ok() {
            sent += 1;
        }
        if i % 500 == 0 {
            // Let the engine keep up instead of measuring the socket buffer.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(sent > 9_000);

    // Every datagram that arrived was dropped, none written anywhere.
    let settled = eventually(Duration::from_secs(5), || {
        let now = h1.engine.counters();
        let received = now.total.udp_rx_packets - before.total.udp_rx_packets;
        received >= sent * 9 / 10 && now.total_drops() - before.total_drops() == received
    });
    let after = h1.engine.counters();
    assert!(
        settled,
        "garbage not all counted as drops: sent {sent}, {}",
        after.summary()
    );
    assert_eq!(after.total.tun_tx_packets, before.total.tun_tx_packets);
    assert!(h1.engine.is_running(), "a worker died on garbage");

    // And the overlay still works.
    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 3);
}

#[test]
fn uring_drops_forged_sources() {
    forged_source_is_dropped(IoBackend::Uring);
}

#[test]
fn syscalls_drops_forged_sources() {
    forged_source_is_dropped(IoBackend::Syscalls);
}

#[test]
fn uring_survives_garbage() {
    garbage_leaves_the_engine_running(IoBackend::Uring);
}

#[test]
fn syscalls_survives_garbage() {
    garbage_leaves_the_engine_running(IoBackend::Syscalls);
}
