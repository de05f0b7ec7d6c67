//! The I/O shell: everything that talks to the kernel, and the only place in the engine where
//! `unsafe` is allowed (each block says why it is sound).
//!
//! From the bottom up: the packet memory ([`buffers`]), the stop signal and other eventfds
//! ([`stop`]), the errors that end a worker ([`error`]), the TUN queues ([`tun`]) and UDP
//! sockets ([`udp`]), what the kernel supports ([`probe`]), the execution of a batch's results
//! that both back ends share ([`execute`]), the two back ends ([`uring`], [`syscalls`]), the
//! worker thread ([`worker`]), the multicast TAP ([`tap`]), relay thread ([`relay`]) and the
//! queue through which workers hand it UDP to the Network's broadcast address
//! ([`broadcast_queue`]), encryption's sealed sends, outbox and timers thread ([`crypt`]), the
//! thread that sends the per-peer GSO checks' probes ([`gso_probe`]), and the [`engine`] that starts and stops them.

pub(crate) mod broadcast_queue;
pub(crate) mod buffers;
pub(crate) mod context;
pub(crate) mod crypt;
pub mod engine;
pub(crate) mod error;
pub(crate) mod execute;
pub(crate) mod gso_probe;
pub(crate) mod periodic;
pub mod probe;
pub(crate) mod relay;
pub(crate) mod stop;
pub(crate) mod syscalls;
pub(crate) mod tap;
pub mod tun;
pub mod udp;
pub(crate) mod uring;
pub(crate) mod worker;
