//! Encryption between weft hosts (opt-in, network-wide): the WireGuard protocol of the
//! `boringtun` crate as a protocol object, with the engine doing all the I/O.
//!
//! - [`tunnels`]: this host's static key, one WireGuard tunnel per peer host (its handshake,
//!   sessions, replay window and timers behind a per-peer lock), and [`Tunnels`], the table
//!   control publishes whole, as it publishes the route table;
//! - [`seal`]: what a worker sends: a packet or a super-packet's segment encrypted into the
//!   send batch, one WireGuard data message per datagram;
//! - [`open`]: what a worker receives: a datagram decrypted into the worker's arena (where the
//!   TUN writes read it), a handshake answered through the worker's outbox, or a drop counted
//!   by reason.
//!
//! Nothing here does I/O; the worker reads the outbox and sends it.

pub mod open;
pub mod seal;
pub mod tunnels;

pub use open::{Opened, Opener, Opening};
pub use seal::{sealed_len, Sealer, OVERHEAD};
pub use tunnels::{PeerTunnel, StaticKeys, TunnelTable, Tunnels, KEY_LEN};
