//! A container that sends to an overlay address nobody leases is told so by ICMP, at no more
//! than the rate each worker may send ICMP errors.

mod support;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use support::{in_netns, spawn_in_netns, Lab};
use weft_engine::{DropReason, IcmpRateLimit, IoBackend, Offloads};

fn unleased_destination_is_unreachable(backend: IoBackend) {
    let lab = Lab::new();
    let h1 = lab.start_engine(&lab.h1, backend, 1);
    let text = lab.ping(&lab.h1.container_ns, Ipv4Addr::new(10, 1, 77, 5), 1);
    assert!(
        text.contains("Destination Net Unreachable"),
        "no net-unreachable for an unleased subnet:\n{text}"
    );
    let counters = h1.engine.shutdown();
    assert!(counters.drops(DropReason::NoRoute) >= 1);
    assert!(counters.total.icmp_sent >= 1, "{}", counters.summary());
}

#[test]

fn uring_answers_unleased_destinations() {
    unleased_destination_is_unreachable(IoBackend::Uring);
}

#[test]

fn syscalls_answers_unleased_destinations() {
    unleased_destination_is_unreachable(IoBackend::Syscalls);
}

/// ICMP destination-unreachable messages the namespace `ns` has received so far, from its
/// own kernel's counters.
fn dest_unreachables_received(ns: &str) -> u64 {
    let snmp = in_netns(ns, || {
        std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read the ICMP counters")
    });
    let mut rows = snmp.lines().filter(|line| line.starts_with("Icmp: "));
    let (names, values) = (
        rows.next().expect("ICMP names"),
        rows.next().expect("ICMP values"),
    );
    let column = names
        .split_whitespace()
        .position(|name| name == "InDestUnreachs")
        .expect("an InDestUnreachs column");
    values
        .split_whitespace()
        .nth(column)
        .and_then(|value| value.parse().ok())
        .expect("an InDestUnreachs value")
}

/// A flood of datagrams to an unleased subnet: each earns a net unreachable, but no more
/// arrive back than the rate limit allows, and the engine counts the rest as suppressed.
fn a_flood_of_errors_is_limited(backend: IoBackend) {
    const FLOOD: u64 = 3000;
    let limit = IcmpRateLimit {
        per_second: 100,
        burst: 10,
    };
    let lab = Lab::new();
    let before = dest_unreachables_received(&lab.h1.container_ns);
    let started = Instant::now();
    let h1 = lab.start_engine_limited(&lab.h1, backend, 1, Offloads::ALL, limit);
    let from = SocketAddrV4::new(lab.h1.container, 6100);
    let sender = spawn_in_netns(&lab.h1.container_ns, move || {
        let socket = UdpSocket::bind(from).expect("bind the sender");
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 1, 77, 5), 9);
        for seq in 0..FLOOD {
            // A net unreachable queued on the socket fails the next send: go on.
            let _ = socket.send_to(&seq.to_le_bytes(), to);
        }
    });
    sender.join().expect("sender");
    // Let the last errors arrive.
    std::thread::sleep(Duration::from_millis(300));
    let counters = h1.engine.shutdown();
    let elapsed = started.elapsed();
    let received = dest_unreachables_received(&lab.h1.container_ns) - before;

    let t = &counters.total;
    eprintln!(
        "{backend}: {received} errors arrived in {elapsed:?}; sent {}, suppressed {}",
        t.icmp_sent, t.icmp_suppressed
    );
    let allowed = u64::from(limit.burst)
        + (u64::from(limit.per_second) as f64 * elapsed.as_secs_f64()).ceil() as u64
        + 1;
    let no_route = counters.drops(DropReason::NoRoute);
    assert!(
        no_route > allowed,
        "the flood did not reach the engine: {}",
        counters.summary()
    );
    assert!(
        received <= allowed,
        "{received} errors arrived in {elapsed:?}, more than {allowed}: {}",
        counters.summary()
    );
    assert!(received >= 1, "no error arrived: {}", counters.summary());
    assert!(
        received <= t.icmp_sent,
        "{received} arrived: {}",
        counters.summary()
    );
    assert_eq!(
        t.icmp_sent + t.icmp_suppressed,
        no_route,
        "every error is sent or suppressed: {}",
        counters.summary()
    );
}

#[test]
fn uring_limits_icmp_errors() {
    a_flood_of_errors_is_limited(IoBackend::Uring);
}

#[test]
fn syscalls_limits_icmp_errors() {
    a_flood_of_errors_is_limited(IoBackend::Syscalls);
}
