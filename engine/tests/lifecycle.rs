//! Starting and stopping: shutdown releases every descriptor and removes the TUN device; a
//! worker whose TUN disappears ends with an error instead of spinning.
//!
//! The tests count this process's open descriptors, so they run one at a time.

mod support;

use std::sync::Mutex;
use std::time::Duration;

use support::{eventually, ip, link_exists, open_fds, Lab};
use weft_engine::IoBackend;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn shutdown_releases_everything(backend: IoBackend) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new();
    let fds_before = open_fds();
    let h1 = lab.start_engine(&lab.h1, backend, 2);
    let h2 = lab.start_engine(&lab.h2, backend, 2);
    assert!(open_fds() > fds_before, "the engines hold descriptors");
    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 3);

    let tun = h1.tun.clone();
    assert!(link_exists(&lab.h1.ns, &tun));
    let counters = h1.engine.shutdown();
    assert!(counters.total.tun_rx_packets >= 3, "{}", counters.summary());
    assert!(counters.total.udp_rx_packets >= 3, "{}", counters.summary());
    h2.engine.shutdown();

    assert!(
        !link_exists(&lab.h1.ns, &tun) && !link_exists(&lab.h2.ns, &h2.tun),
        "the TUN devices outlived the engines"
    );
    assert_eq!(open_fds(), fds_before, "descriptors leaked");
}

fn lost_tun_ends_the_workers(backend: IoBackend) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new();
    let h1 = lab.start_engine(&lab.h1, backend, 2);
    assert!(h1.engine.is_running());
    ip(&lab.h1.ns, &["link", "del", &h1.tun]);
    assert!(
        eventually(Duration::from_secs(5), || !h1.engine.is_running()),
        "workers kept running without their TUN device"
    );
    // Shutdown still works after the workers ended on their own.
    h1.engine.shutdown();
}

#[test]
fn uring_shutdown_releases_everything() {
    shutdown_releases_everything(IoBackend::Uring);
}

#[test]
fn syscalls_shutdown_releases_everything() {
    shutdown_releases_everything(IoBackend::Syscalls);
}

#[test]
fn uring_workers_end_when_the_tun_goes() {
    lost_tun_ends_the_workers(IoBackend::Uring);
}

#[test]
fn syscalls_workers_end_when_the_tun_goes() {
    lost_tun_ends_the_workers(IoBackend::Syscalls);
}
