//! Sealing what a worker sends: one WireGuard data message per datagram, written straight
//! into the send batch's memory.
//!
//! A packet sent whole is sealed from its own buffer. A super-packet's segment is first put
//! together (its headers from the segmenter, then its payload) in the worker's scratch buffer,
//! then sealed into the batch. Equal plaintexts give equal messages (no padding), so a run of
//! full segments stays a run of equal-sized datagrams for UDP GSO.
//!
//! A worker seals on its own lane of the peer's tunnels (see [`crate::crypto::tunnels`]).
//!
//! Without a session the tunnel keeps the packet (up to 256) and answers with a handshake
//! initiation (or nothing while one is under way); the kept packets leave when the handshake
//! response arrives (the opener sends them).

use boringtun::noise::{Tunn, TunnResult};

use crate::crypto::tunnels::Tunnels;
use crate::offload::Segmenter;

/// What encryption adds to a packet: the data message header (type, receiver index, counter:
/// 16 bytes) and the authentication tag (16 bytes).
pub const OVERHEAD: usize = 32;

/// The size of a handshake initiation, the largest message that is not data.
pub const HANDSHAKE_INIT_LEN: usize = 148;

/// The room a sealed `plaintext_len`-byte packet may need: its data message, or a handshake
/// initiation in its place.
#[inline]
pub fn sealed_len(plaintext_len: usize) -> usize {
    (plaintext_len + OVERHEAD).max(HANDSHAKE_INIT_LEN)
}

/// A worker's sealing state: the peers' tunnels, the worker's number (which picks its lane)
/// and the scratch buffer segments are put together in.
#[derive(Debug)]
pub struct Sealer {
    tunnels: Tunnels,
    worker: usize,
    scratch: Vec<u8>,
}

impl Sealer {
    /// Worker `worker`'s sealer of segments of up to 64 KiB for the peers in `tunnels`.
    pub fn new(tunnels: Tunnels, worker: usize) -> Self {
        Self {
            tunnels,
            worker,
            scratch: vec![0; 1 << 16],
        }
    }

    /// The peers' tunnels.
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// The number of the worker this sealer seals for.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Seal `plaintext` for the tunnel into `out` (at least [`sealed_len`] bytes): the length
    /// of the message written, data or handshake initiation, or 0 when there is nothing to
    /// send now (the packet waits for the handshake under way, or `out` is too short).
    pub fn seal(tunn: &mut Tunn, plaintext: &[u8], out: &mut [u8]) -> usize {
        if out.len() < sealed_len(plaintext.len()) {
            return 0;
        }
        match tunn.encapsulate(plaintext, out) {
            TunnResult::WriteToNetwork(message) => message.len(),
            _ => 0,
        }
    }

    /// Seal segment `index` of the super-packet `packet` (which `segmenter` was made for)
    /// into `out`, as [`Sealer::seal`] does.
    pub fn seal_segment(
        &mut self,
        tunn: &mut Tunn,
        packet: &[u8],
        segmenter: &Segmenter,
        index: usize,
        out: &mut [u8],
    ) -> usize {
        let header_len = segmenter.header_len();
        let Some(header) = self.scratch.get_mut(..header_len) else {
            return 0;
        };
        let Some(segment) = segmenter.write_header(packet, index, header) else {
            return 0;
        };
        let payload_len = segment.payload.len();
        let (Some(payload), Some(into)) = (
            packet.get(segment.payload),
            self.scratch.get_mut(header_len..header_len + payload_len),
        ) else {
            return 0;
        };
        into.copy_from_slice(payload);
        Self::seal(tunn, &self.scratch[..header_len + payload_len], out)
    }
}
