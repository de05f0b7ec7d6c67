//! weft's data plane.
//!
//! A thread-per-core packet engine that carries IPv4 packets between a TUN device and peers'
//! UDP sockets in flannel's udp-backend wire format (one inner packet per datagram, nothing
//! before it). The layers, from the bottom up:
//!
//! - [`wire`]: checked views and field layouts of the packets (IPv4, ICMP, TCP, UDP, the
//!   virtio-net header); every parser lives here;
//! - the pure core: [`config`], [`counters`], the route table ([`route`]), the per-packet
//!   decisions ([`decide`]), the ICMP rate limit ([`icmp_limit`]), how long a worker looks
//!   for packets before it sleeps ([`poll_window`]), the peers that take partial inner
//!   checksums ([`partial_peers`]), the per-peer check that UDP GSO arrives intact
//!   ([`gso_check`]), segmentation and
//!   coalescing ([`offload`]), what a batch does with each packet ([`batch`]) and the
//!   multicast relay's decisions and membership ([`multicast`]), encryption between hosts
//!   ([`crypto`]) — no I/O, tested
//!   deterministically;
//! - [`io`]: the shell that talks to the kernel (TUN, UDP sockets, io_uring and batched system
//!   calls, the worker threads, the [`engine`]) and executes the core's results in batches.
//!
//! `unsafe` is forbidden everywhere but in [`io`].

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[forbid(unsafe_code)]
pub mod batch;
#[forbid(unsafe_code)]
pub mod config;
#[forbid(unsafe_code)]
pub mod counters;
#[forbid(unsafe_code)]
pub mod crypto;
#[forbid(unsafe_code)]
pub mod decide;
#[forbid(unsafe_code)]
pub mod gso_check;
#[forbid(unsafe_code)]
pub mod icmp_limit;
pub mod io;
#[forbid(unsafe_code)]
pub mod multicast;
#[forbid(unsafe_code)]
pub mod offload;
#[forbid(unsafe_code)]
pub mod partial_peers;
#[forbid(unsafe_code)]
pub mod poll_window;
#[forbid(unsafe_code)]
pub mod route;
#[forbid(unsafe_code)]
pub mod wire;

pub use io::{engine, tun, udp};

pub use config::{
    ActiveOffloads, EngineConfig, IoBackend, Offloads, TunOffload, UnknownIoBackend,
    DEFAULT_BUSY_POLL,
};
pub use counters::{BatchCounts, CounterSnapshot, DropReason, WorkerCounters};
pub use crypto::{StaticKeys, Tunnels, KEY_LEN, OVERHEAD};
pub use decide::{PeerDecision, Policy, TunDecision};
pub use gso_check::{GsoCheck, GsoCheckCounts};
pub use icmp_limit::IcmpRateLimit;
pub use io::engine::{Engine, EngineError};
pub use io::error::WorkerError;
pub use io::tun::{open_queues, open_queues_with, TunError, TunQueue};
pub use multicast::{GroupTable, Groups, LocalGroups, MulticastConfig, PeerMulticast};
pub use partial_peers::{PartialPeerTable, PartialPeers};
pub use route::{Overlay, RouteError, RouteTable, Routes};
pub use wire::ipv4::{Ipv4Packet, PacketError};
