//! The per-peer GSO check between two weft hosts in namespaces: with the probe runs arriving
//! intact, each host proves the other and segments leave in GSO runs; with every probe run
//! to h2 altered on its way in (an nftables rule in h2's namespace rewrites a probe header
//! field, as a kernel that corrupts GSO would), h1 judges h2 failed and sends to it one
//! datagram at a time, while a TCP transfer still arrives byte for byte.

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use support::{eventually, stop_cleanly, tcp_transfer, Lab, RunningEngine};
use weft_engine::gso_check::PeerCheck;
use weft_engine::IoBackend;

/// How long a check may take: every attempt and its wait, with room for a loaded machine.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Make each host check the other, as control does for peers that advertise the check.
fn check_each_other(lab: &Lab, h1: &RunningEngine, h2: &RunningEngine) {
    assert!(h1.engine.offloads().udp_gso && h2.engine.offloads().udp_gso);
    h1.engine.gso_check().set_peers([lab.h2.public]);
    h2.engine.gso_check().set_peers([lab.h1.public]);
}

fn settled(engine: &RunningEngine, peer: Ipv4Addr) -> Option<PeerCheck> {
    let state = engine.engine.gso_check().state(peer)?;
    (!matches!(state, PeerCheck::Probing { .. })).then_some(state)
}

/// In `ns`, alter the header of every probe (not verdict) arriving for port 8285: its segment
/// size field (payload bytes 24..26) is zeroed, with the UDP checksum kept right.
fn alter_probes(lab: &Lab, ns: &str) {
    let magic = format!("0x{}", hex(weft_engine::gso_check::MAGIC));
    let steps: [&[&str]; 3] = [
        &["nft", "add", "table", "inet", "wgc"],
        &[
            "nft",
            "add",
            "chain",
            "inet",
            "wgc",
            "pre",
            "{",
            "type",
            "filter",
            "hook",
            "prerouting",
            "priority",
            "-300",
            ";",
            "}",
        ],
        &[
            "nft",
            "add",
            "rule",
            "inet",
            "wgc",
            "pre",
            "udp",
            "dport",
            "8285",
            "@th,64,64",
            &magic,
            "@th,128,8",
            "1",
            "@th,256,16",
            "set",
            "0",
        ],
    ];
    for argv in steps {
        let out = lab.exec_in(ns, argv, Duration::from_secs(10));
        assert!(
            out.status.success(),
            "{argv:?}: {} (nftables is a prerequisite: scripts/setup.sh)",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn hex(bytes: [u8; 8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn checked(backend: IoBackend, altered: bool) {
    let lab = Lab::new();
    if altered {
        alter_probes(&lab, &lab.h2.ns);
    }
    let h1 = lab.start_engine(&lab.h1, backend, 1);
    let h2 = lab.start_engine(&lab.h2, backend, 1);
    check_each_other(&lab, &h1, &h2);
    assert!(
        eventually(CHECK_TIMEOUT, || settled(&h1, lab.h2.public).is_some()
            && settled(&h2, lab.h1.public).is_some()),
        "checks did not settle: {:?} {:?}",
        h1.engine.gso_check().state(lab.h2.public),
        h2.engine.gso_check().state(lab.h1.public)
    );
    let state = settled(&h1, lab.h2.public);
    if altered {
        assert!(
            matches!(state, Some(PeerCheck::Failed { failures: 1, .. })),
            "{state:?}"
        );
    } else {
        assert_eq!(state, Some(PeerCheck::Proven));
    }
    // The probes h2 sends h1 are not altered.
    assert_eq!(settled(&h2, lab.h1.public), Some(PeerCheck::Proven));
    let counts = h1.engine.gso_check().counts();
    assert_eq!(
        (counts.proven, counts.failed),
        (!altered as u64, altered as u64)
    );

    let before = h1.engine.counters().total;
    tcp_transfer(
        &lab.h1.container_ns,
        &lab.h2.container_ns,
        lab.h2.container,
        5001,
        8 << 20,
        0x650_0000,
    );
    let after = h1.engine.counters().total;
    let sends = after.udp_sends - before.udp_sends;
    let datagrams = after.udp_tx_packets - before.udp_tx_packets;
    eprintln!("h1 to h2: {datagrams} datagrams in {sends} sends");
    if altered {
        assert_eq!(
            datagrams, sends,
            "one datagram per send after a failed check"
        );
    } else {
        assert!(datagrams > 2 * sends, "GSO runs to a proven peer");
    }
    stop_cleanly([h1, h2]);
}

#[test]
fn syscalls_intact_probes_prove_the_peer() {
    checked(IoBackend::Syscalls, false);
}

#[test]
fn syscalls_altered_probes_fall_back_to_plain_sends() {
    checked(IoBackend::Syscalls, true);
}

#[test]
fn uring_intact_probes_prove_the_peer() {
    checked(IoBackend::Uring, false);
}

#[test]
fn uring_altered_probes_fall_back_to_plain_sends() {
    checked(IoBackend::Uring, true);
}
