//! Sealing what a worker sends: one WireGuard data message per datagram, written straight
//! into the send batch's memory.
//!
//! A packet sent whole is sealed from its own buffer. A super-packet's segments are sealed in
//! order, each put together inside the super-packet itself: its headers are written just in
//! front of its payload, over bytes already sealed (the super-packet's own headers for the
//! first, the previous segment's last bytes for the others), and the segment is sealed from
//! there into the batch. The tunnel copies the plaintext into the batch and encrypts it there,
//! and that is the only copy of the payload. Equal plaintexts give equal messages (no padding),
//! so a run of full segments stays a run of equal-sized datagrams for UDP GSO.
//!
//! A worker seals on its own lane of the peer's tunnels (see [`crate::crypto::tunnels`]).
//!
//! Without a session the tunnel keeps the packet (up to 256) and answers with a handshake
//! initiation (or nothing while one is under way); the kept packets leave when the handshake
//! response arrives (the opener sends them).

use boringtun::noise::{Tunn, TunnResult};

use crate::crypto::tunnels::Tunnels;
use crate::offload::segment::MAX_HEADER_LEN;
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
/// and the headers of the super-packet being sealed.
#[derive(Debug)]
pub struct Sealer {
    tunnels: Tunnels,
    worker: usize,
    /// The headers of the super-packet being sealed, saved when its first segment overwrites
    /// them.
    headers: [u8; MAX_HEADER_LEN],
}

impl Sealer {
    /// Worker `worker`'s sealer for the peers in `tunnels`.
    pub fn new(tunnels: Tunnels, worker: usize) -> Self {
        Self {
            tunnels,
            worker,
            headers: [0; MAX_HEADER_LEN],
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
    /// into `out`, as [`Sealer::seal`] does, putting the segment together inside `packet`.
    /// A super-packet's segments must be sealed in order from 0, and no other super-packet's
    /// in between: each overwrites what the one before no longer needs, and the first saves
    /// the headers the others are made from. Afterwards `packet` is spent.
    pub fn seal_segment(
        &mut self,
        tunn: &mut Tunn,
        packet: &mut [u8],
        segmenter: &Segmenter,
        index: usize,
        out: &mut [u8],
    ) -> usize {
        let header_len = segmenter.header_len();
        let Some(payload) = segmenter.payload_range(index) else {
            return 0;
        };
        if index == 0 {
            match (packet.get(..header_len), self.headers.get_mut(..header_len)) {
                (Some(headers), Some(saved)) => saved.copy_from_slice(headers),
                _ => return 0,
            }
        }
        // The segment's headers go right in front of its payload.
        let Some(start) = payload.start.checked_sub(header_len) else {
            return 0;
        };
        if payload.end > packet.len() {
            return 0;
        }
        let (front, body) = packet.split_at_mut(payload.start);
        let written = segmenter.write_header_of(
            &self.headers[..header_len],
            &body[..payload.len()],
            index,
            &mut front[start..],
        );
        if written.is_none() {
            return 0;
        }
        Self::seal(tunn, &packet[start..payload.end], out)
    }
}
