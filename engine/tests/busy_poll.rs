//! Workers that look for packets before they sleep (`busy_poll`) carry the same bytes as
//! workers that sleep at once: four TCP streams and back-to-back UDP requests and replies at
//! the same time, every byte compared at the receiving end, with looking on and off.

mod support;

use std::time::Duration;

use support::{concurrent_flows, stop_cleanly, Lab};
use weft_engine::IoBackend;

/// The longest look before sleeping, when on.
const LOOK: Duration = Duration::from_micros(50);

fn carries_the_same_bytes(backend: IoBackend, busy_poll: Duration) {
    let lab = Lab::new();
    let h1 = lab.start_engine_polling(&lab.h1, backend, busy_poll);
    let h2 = lab.start_engine_polling(&lab.h2, backend, busy_poll);
    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 3);

    concurrent_flows(&lab, 0xb05_0000);
    stop_cleanly([h1, h2]);
}

#[test]
fn syscalls_looking_before_sleeping() {
    carries_the_same_bytes(IoBackend::Syscalls, LOOK);
}

#[test]
fn syscalls_sleeping_at_once() {
    carries_the_same_bytes(IoBackend::Syscalls, Duration::ZERO);
}

#[test]
fn uring_looking_before_sleeping() {
    carries_the_same_bytes(IoBackend::Uring, LOOK);
}

#[test]
fn uring_sleeping_at_once() {
    carries_the_same_bytes(IoBackend::Uring, Duration::ZERO);
}
