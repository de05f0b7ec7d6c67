//! Two hosts encrypt between them, two workers each: one peer's datagrams are sealed on the
//! sending worker's lane and opened by the receiving host's worker of that lane, so both
//! receiving workers open datagrams, and every byte arrives intact.

mod support;

use std::net::Ipv4Addr;

use support::{stop_cleanly, tcp_transfer, Lab, ENCRYPTED_MTU};
use weft_engine::{DropReason, StaticKeys, Tunnels};

/// Bytes of each TCP stream.
const FLOW_BYTES: usize = 4 << 20;
/// Streams started at once; rounds of them run until both sending workers carried some.
const FLOWS_PER_ROUND: u16 = 4;
const MAX_ROUNDS: u16 = 8;
/// Datagrams a worker must have sent for its lane to count as used.
const USED: u64 = 500;

#[test]
fn one_peer_is_opened_by_every_worker_of_the_receiving_host() {
    let mut lab = Lab::new();
    let (host1, host2) = (lab.h1.clone(), lab.h2.clone());
    let sender = lab.add_container(&host1, "e1", Ipv4Addr::new(10, 1, 1, 3), ENCRYPTED_MTU);
    let receiver = lab.add_container(&host2, "e2", Ipv4Addr::new(10, 1, 2, 3), ENCRYPTED_MTU);
    let t1 = Tunnels::new(StaticKeys::from_private([0x31; 32]));
    let t2 = Tunnels::new(StaticKeys::from_private([0x32; 32]));
    t1.publish([(host2.public, t2.public_key())]);
    t2.publish([(host1.public, t1.public_key())]);
    let h1 = lab.start_engine_encrypted(&host1, 2, t1);
    let h2 = lab.start_engine_encrypted(&host2, 2, t2);
    assert!(
        h2.engine.offloads().flow_steering,
        "encrypted datagrams are steered by lane"
    );
    lab.assert_ping(&sender, Ipv4Addr::new(10, 1, 2, 3), 3);

    // Which of h1's workers a stream leaves through is the TUN's choice (a hash of the
    // flow): streams run until both sent datagrams.
    let mut rounds = 0;
    while h1
        .engine
        .worker_counters()
        .iter()
        .any(|w| w.udp_tx_packets < USED)
    {
        assert!(
            rounds < MAX_ROUNDS,
            "{} streams all left through one worker: {:?}",
            rounds * FLOWS_PER_ROUND,
            h1.engine
                .worker_counters()
                .iter()
                .map(|w| w.udp_tx_packets)
                .collect::<Vec<_>>()
        );
        let streams: Vec<_> = (0..FLOWS_PER_ROUND)
            .map(|i| {
                let n = rounds * FLOWS_PER_ROUND + i;
                let (from, to) = (sender.clone(), receiver.clone());
                std::thread::spawn(move || {
                    tcp_transfer(
                        &from,
                        &to,
                        Ipv4Addr::new(10, 1, 2, 3),
                        5400 + n,
                        FLOW_BYTES,
                        0x1a4e_0000 + u64::from(n),
                    )
                })
            })
            .collect();
        for stream in streams {
            stream.join().expect("TCP stream");
        }
        rounds += 1;
    }

    // What h1's worker w sealed went on lane w and was opened by h2's worker w: the kernel's
    // hash of the outer addresses alone would give one of them everything.
    let sent = h1.engine.worker_counters();
    let received = h2.engine.worker_counters();
    for (worker, (sent, received)) in sent.iter().zip(&received).enumerate() {
        eprintln!(
            "worker {worker}: h1 sent {} datagrams, h2 received {}",
            sent.udp_tx_packets, received.udp_rx_packets
        );
        assert!(
            received.udp_rx_packets >= sent.udp_tx_packets / 2,
            "h2's worker {worker} received {} of the {} datagrams h1's worker {worker} sent",
            received.udp_rx_packets,
            sent.udp_tx_packets
        );
    }
    let total = h2.engine.counters();
    for reason in [
        DropReason::Tampered,
        DropReason::UnknownKey,
        DropReason::Plaintext,
    ] {
        assert_eq!(total.drops(reason), 0, "{reason:?}: {}", total.summary());
    }
    stop_cleanly([h1, h2]);
}
