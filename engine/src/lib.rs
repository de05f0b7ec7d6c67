//! weft's data plane.
//!
//! A thread-per-core packet engine that carries IPv4 packets between a TUN device and peers'
//! UDP sockets in flannel's udp-backend wire format (one inner packet per datagram, nothing
//! before it). The pure core — packet views, ICMP, the route table, per-packet decisions,
//! counters — does no I/O and is tested deterministically; the I/O shell (TUN, UDP sockets,
//! io_uring and batched system calls, the workers) executes its decisions in batches.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod counters;
pub mod decide;
pub mod engine;
pub mod icmp;
pub mod offload;
pub mod packet;
pub mod route;
mod syscalls;
pub mod tun;
pub mod udp;
mod uring;
pub mod worker;

pub use counters::{BatchCounts, CounterSnapshot, DropReason, WorkerCounters};
pub use decide::{Decision, Policy};
pub use engine::{
    ActiveOffloads, Engine, EngineConfig, EngineError, IoBackend, Offloads, UnknownIoBackend,
};
pub use packet::{Ipv4Packet, PacketError};
pub use route::{Overlay, RouteError, RouteTable, Routes};
pub use tun::{open_queues, open_queues_with, TunError, TunOffload, TunQueue};
pub use worker::WorkerError;
