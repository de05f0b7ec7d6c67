//! Two hosts run the engine; their containers reach each other through the overlay.

mod support;

use support::{tcp_transfer, Lab};
use weft_engine::IoBackend;

/// Bytes of the TCP transfer: enough for many full batches and window growth.
const TCP_BYTES: usize = 8 << 20;

fn containers_talk(backend: IoBackend) {
    let lab = Lab::new();
    let h1 = lab.start_engine(&lab.h1, backend, 2);
    let h2 = lab.start_engine(&lab.h2, backend, 2);
    assert_eq!(
        h1.tun, "flannel0",
        "the TUN pattern resolves in the host namespace"
    );

    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 5);
    lab.assert_ping(&lab.h2.container_ns, lab.h1.container, 5);
    tcp_transfer(
        &lab.h1.container_ns,
        &lab.h2.container_ns,
        lab.h2.container,
        5201,
        TCP_BYTES,
        0x5eed_0001,
    );
    assert!(h1.engine.is_running() && h2.engine.is_running());

    let sent = h1.engine.shutdown();
    let received = h2.engine.shutdown();
    assert_eq!(sent.workers, 2);
    // c1 -> c2 crosses h1 from TUN to UDP and h2 from UDP to TUN, and the replies the other way.
    assert!(
        sent.total.tun_rx_bytes > TCP_BYTES as u64,
        "{}",
        sent.summary()
    );
    assert!(sent.total.udp_tx_packets > 0 && sent.total.udp_rx_packets > 0);
    assert!(
        received.total.udp_rx_bytes > TCP_BYTES as u64,
        "{}",
        received.summary()
    );
    assert!(received.total.tun_tx_packets > 0 && received.total.tun_rx_packets > 0);
    for snapshot in [&sent, &received] {
        assert_eq!(snapshot.total.io_errors, 0, "{}", snapshot.summary());
        assert!(snapshot.total.batches > 0);
    }
}

#[test]
fn uring_carries_ping_and_tcp_both_ways() {
    containers_talk(IoBackend::Uring);
}

#[test]
fn syscalls_carries_ping_and_tcp_both_ways() {
    containers_talk(IoBackend::Syscalls);
}
