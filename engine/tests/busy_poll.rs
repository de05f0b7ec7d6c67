//! Workers that look for packets before they sleep (`busy_poll`) carry the same bytes as
//! workers that sleep at once: four TCP streams and back-to-back UDP requests and replies at
//! the same time, every byte compared at the receiving end, with looking on and off.

mod support;

use std::net::{SocketAddrV4, UdpSocket};
use std::time::Duration;

use support::{in_netns, spawn_in_netns, tcp_transfer, Lab, Stream};
use weft_engine::IoBackend;

/// Bytes of each TCP stream.
const STREAM_BYTES: usize = 32 << 20;
/// Request/response round trips.
const ROUND_TRIPS: u64 = 2_000;
/// Bytes of each request and reply.
const MESSAGE: usize = 64;
/// The longest look before sleeping, when on.
const LOOK: Duration = Duration::from_micros(50);
/// What the client sends when it is done.
const END: &[u8] = b"end";

fn concurrent_flows(backend: IoBackend, busy_poll: Duration) {
    let lab = Lab::new();
    let h1 = lab.start_engine_polling(&lab.h1, backend, busy_poll);
    let h2 = lab.start_engine_polling(&lab.h2, backend, busy_poll);
    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 3);

    // The responder: answers every request with its bytes reversed.
    let server_addr = SocketAddrV4::new(lab.h2.container, 7000);
    let server = in_netns(&lab.h2.container_ns, move || {
        UdpSocket::bind(server_addr).expect("bind the responder")
    });
    server
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let responder = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut answered = 0u64;
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            if buf[..n] == *END {
                break;
            }
            buf[..n].reverse();
            server.send_to(&buf[..n], from).expect("reply");
            answered += 1;
        }
        answered
    });

    let streams: Vec<_> = (0..4u16)
        .map(|i| {
            let (from, to, dst) = (
                lab.h1.container_ns.clone(),
                lab.h2.container_ns.clone(),
                lab.h2.container,
            );
            std::thread::spawn(move || {
                tcp_transfer(
                    &from,
                    &to,
                    dst,
                    5300 + i,
                    STREAM_BYTES,
                    0xb05_0000 + u64::from(i),
                )
            })
        })
        .collect();

    let client_addr = SocketAddrV4::new(lab.h1.container, 7001);
    let client = spawn_in_netns(&lab.h1.container_ns, move || -> Result<u64, String> {
        let socket = UdpSocket::bind(client_addr).map_err(|e| format!("bind: {e}"))?;
        socket.connect(server_addr).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut request = [0u8; MESSAGE];
        let mut reply = [0u8; 2048];
        let mut answered = 0u64;
        for seq in 0..ROUND_TRIPS {
            Stream::new(0xb05_1000 ^ seq).fill(&mut request);
            request[..8].copy_from_slice(&seq.to_le_bytes());
            socket.send(&request).map_err(|e| e.to_string())?;
            // A lost request or reply (the TCP streams fill the queues) is sent again; a late
            // reply to an earlier request is skipped.
            loop {
                match socket.recv(&mut reply) {
                    Ok(n) => {
                        reply[..n].reverse();
                        if n >= 8 && reply[..8] == seq.to_le_bytes() {
                            if reply[..n] != request[..] {
                                return Err(format!("reply {seq} differs from its request"));
                            }
                            break;
                        }
                    }
                    Err(_) => {
                        socket.send(&request).map_err(|e| e.to_string())?;
                    }
                }
            }
            answered += 1;
        }
        for _ in 0..3 {
            socket.send(END).map_err(|e| e.to_string())?;
        }
        Ok(answered)
    });

    for stream in streams {
        stream.join().expect("TCP stream");
    }
    let answered = client.join().unwrap().expect("request/response client");
    assert_eq!(answered, ROUND_TRIPS);
    let served = responder.join().unwrap();
    assert!(served >= ROUND_TRIPS, "{served} requests answered");
    assert!(h1.engine.is_running() && h2.engine.is_running());
    for snapshot in [h1.engine.shutdown(), h2.engine.shutdown()] {
        assert_eq!(snapshot.total.io_errors, 0, "{}", snapshot.summary());
    }
}

#[test]
fn syscalls_looking_before_sleeping() {
    concurrent_flows(IoBackend::Syscalls, LOOK);
}

#[test]
fn syscalls_sleeping_at_once() {
    concurrent_flows(IoBackend::Syscalls, Duration::ZERO);
}

#[test]
fn uring_looking_before_sleeping() {
    concurrent_flows(IoBackend::Uring, LOOK);
}

#[test]
fn uring_sleeping_at_once() {
    concurrent_flows(IoBackend::Uring, Duration::ZERO);
}
