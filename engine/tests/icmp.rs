//! A container that sends to an overlay address nobody leases is told so by ICMP.

mod support;

use std::net::Ipv4Addr;

use support::Lab;
use weft_engine::{DropReason, IoBackend};

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
