//! Encryption's I/O: sealed datagrams queued into the send batch, the protocol's own messages
//! sent from a worker's socket, and the thread that runs the tunnels' timers (handshake
//! retries, rekeying, keepalives, expiry).
//!
//! The protocol lives in [`crate::crypto`]; this file only moves its bytes.

use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::TunnResult;

use crate::batch::Source;
use crate::counters::BatchCounts;
use crate::crypto::{sealed_len, Opener, Sealer, Tunnels};
use crate::io::periodic::PeriodicThread;
use crate::io::udp::SendBatch;
use crate::offload::Segmenter;

/// The send batch's room for sealed datagrams: with encryption every datagram is written
/// into the batch, not only the segments' headers. About 170 full datagrams: a `sendmmsg`
/// of a few GSO runs. A worker seals on its own lane, so no other worker's batch overtakes its
/// messages, except on a host with more workers than lanes, where two workers share one; a
/// batch then still holds far fewer messages of one session than the receiver's replay window
/// (1024) lets be overtaken.
pub(crate) const SEALED_BYTES: usize = 256 << 10;

/// Queue `packet` for `to` sealed into `batch`: whole, or (with `segmenter`) its segments
/// from `*next` on, advancing `*next`. Returns whether everything is queued (`false`: the
/// batch is full; send it and call again, with the same `packet` and `*next`). A packet the
/// tunnel keeps for a handshake under way queues nothing; a peer without a tunnel (no key) is
/// counted as `unknown_peer`. A super-packet is spent afterwards: its segments are put
/// together inside it (see [`Sealer::seal_segment`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn queue_sealed(
    batch: &mut SendBatch,
    sealer: &mut Sealer,
    to: SocketAddrV4,
    packet: &mut [u8],
    segmenter: Option<&Segmenter>,
    next: &mut usize,
    gso: bool,
    counts: &mut BatchCounts,
) -> bool {
    let table = sealer.tunnels().snapshot();
    let total = segmenter.map_or(1, Segmenter::segments);
    let Some(tunnel) = table.get(to.ip()) else {
        counts.drops[crate::counters::DropReason::UnknownPeer as usize] += (total - *next) as u64;
        *next = total;
        return true;
    };
    let tunnel = Arc::clone(tunnel);
    drop(table);
    let mut tunn = tunnel.worker_lane(sealer.worker());
    while *next < total {
        let plain = segmenter.map_or(packet.len(), |s| s.segment_len(*next));
        let room = sealed_len(plain);
        if !batch.has_room(1, room) {
            return false;
        }
        let Some(space) = batch.header_space(room) else {
            return false;
        };
        let len = match segmenter {
            Some(segmenter) => sealer.seal_segment(&mut tunn, packet, segmenter, *next, space),
            None => Sealer::seal(&mut tunn, &*packet, space),
        };
        if len > 0 {
            let piece = (space.as_ptr(), len);
            if !batch.push(to, Source::Packet, &[piece], gso) {
                // Sealed but no room: the counter is spent, the packet is lost like a
                // dropped datagram (has_room said there was room, so this is not expected).
                counts.io_errors += 1;
            }
        }
        *next += 1;
    }
    true
}

/// Send what the opener's protocol wants sent (handshake responses, keepalives, packets
/// released by a handshake) from the worker's socket. What the kernel refuses is counted;
/// the protocol retries its handshakes on its own.
pub(crate) fn send_outbox(socket: &UdpSocket, opener: &mut Opener, counts: &mut BatchCounts) {
    for (to, message) in opener.outbox().drain(..) {
        match socket.send_to(&message, to) {
            Ok(sent) => {
                counts.udp_sends += 1;
                counts.udp_tx_packets += 1;
                counts.udp_tx_bytes += sent as u64;
            }
            Err(_) => counts.io_errors += 1,
        }
    }
}

/// How often the tunnels' timers run (boringtun's own device loop uses 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Start the thread `weft-timers`, which every [`TIMER_TICK`] runs the timers of every
/// peer's lanes in use and sends what they produce from `socket` (a duplicate of a worker's socket) to the
/// peer's address at `port`.
pub(crate) fn spawn_timers(
    tunnels: Tunnels,
    socket: UdpSocket,
    port: u16,
) -> io::Result<PeriodicThread> {
    let mut buf = vec![0u8; 256];
    PeriodicThread::spawn("weft-timers", TIMER_TICK, move || {
        let table = tunnels.snapshot();
        for (addr, tunnel) in table.iter() {
            for mut tunn in tunnel.lanes_in_use() {
                if let TunnResult::WriteToNetwork(message) = tunn.update_timers(&mut buf) {
                    // Lost or refused: the protocol tries again on a later tick.
                    let _ = socket.send_to(message, SocketAddrV4::new(*addr, port));
                }
            }
        }
    })
}
