//! Inner checksums left partial between two weft hosts carry the same bytes as complete ones:
//! four TCP streams and back-to-back UDP requests and replies at the same time, every byte
//! compared at the receiving end, with the peers listed in each other's partial-peer table and
//! not. A packet socket on h2's underlay shows what travelled: with the tables set, inner TCP
//! segments whose checksum holds only the pseudo-header sum; without, only complete ones.

mod support;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{concurrent_flows, spawn_in_netns, stop_cleanly, Lab};
use weft_engine::{IoBackend, PartialPeerTable};

/// What the underlay sniffer saw: inner TCP segments with a payload whose checksum verified,
/// and those whose checksum did not.
#[derive(Debug, Default)]
struct Seen {
    complete: u64,
    partial: u64,
}

/// Count the inner TCP segments in weft datagrams (UDP to port 8285) that reach `ns`, until
/// `stop`.
fn sniff(ns: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    spawn_in_netns(ns, move || {
        // SAFETY: a plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                i32::from((libc::ETH_P_IP as u16).to_be()),
            )
        };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: `timeout` is a live timeval of the size passed.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        let mut seen = Seen::default();
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `buf` is live and writable for its length.
            let n =
                unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            let Ok(outer) = etherparse::SlicedPacket::from_ip(&buf[..n]) else {
                continue;
            };
            let Some(etherparse::TransportSlice::Udp(udp)) = outer.transport else {
                continue;
            };
            if udp.destination_port() != 8285 {
                continue;
            }
            // A merged (GRO) copy may hold several datagrams; the first is enough.
            let inner = udp.payload();
            let Some(total) = inner
                .get(2..4)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            else {
                continue;
            };
            let Some(inner) = inner.get(..total) else {
                continue;
            };
            let Ok(packet) = etherparse::SlicedPacket::from_ip(inner) else {
                continue;
            };
            let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(tcp))) =
                (&packet.net, &packet.transport)
            else {
                continue;
            };
            if tcp.payload().is_empty() {
                continue;
            }
            let header = ip.header().to_header();
            let expected = tcp.to_header().calc_checksum_ipv4(&header, tcp.payload());
            if expected.ok() == Some(tcp.checksum()) {
                seen.complete += 1;
            } else {
                seen.partial += 1;
            }
        }
        seen
    })
}

fn carries_the_same_bytes(backend: IoBackend, partial: bool) {
    let lab = Lab::new();
    let h1 = lab.start_engine_polling(&lab.h1, backend, Duration::ZERO);
    let h2 = lab.start_engine_polling(&lab.h2, backend, Duration::ZERO);
    for (host, peer) in [(&h1, lab.h2.public), (&h2, lab.h1.public)] {
        assert!(host.engine.offloads().takes_partial_checksums());
        let listed: &[Ipv4Addr] = if partial { &[peer] } else { &[] };
        host.engine
            .partial_peers()
            .publish(PartialPeerTable::new(listed.iter().copied()));
    }
    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 3);

    let stop = Arc::new(AtomicBool::new(false));
    let sniffer = sniff(&lab.h2.ns, Arc::clone(&stop));
    concurrent_flows(&lab, 0xc5_0000);
    stop.store(true, Ordering::Relaxed);
    let seen = sniffer.join().expect("sniffer");
    eprintln!("underlay at h2: {seen:?}");
    if partial {
        assert!(seen.partial > 0, "{seen:?}");
    } else {
        assert!(seen.complete > 0 && seen.partial == 0, "{seen:?}");
    }

    stop_cleanly([h1, h2]);
}

#[test]
fn syscalls_with_partial_checksums() {
    carries_the_same_bytes(IoBackend::Syscalls, true);
}

#[test]
fn syscalls_with_complete_checksums() {
    carries_the_same_bytes(IoBackend::Syscalls, false);
}

#[test]
fn uring_with_partial_checksums() {
    carries_the_same_bytes(IoBackend::Uring, true);
}

#[test]
fn uring_with_complete_checksums() {
    carries_the_same_bytes(IoBackend::Uring, false);
}
