//! How the engine is configured, and which kernel offloads a running engine uses: plain
//! values shared by the engine, the workers and the daemon.

use std::fmt;
use std::net::SocketAddrV4;
use std::str::FromStr;
use std::time::Duration;

use crate::decide::Policy;
use crate::icmp_limit::IcmpRateLimit;
use crate::multicast::MulticastConfig;
use crate::wire::vnet::VNET_HDR_LEN;

/// How workers talk to the kernel. With offloads, the batched system calls measured faster
/// than io_uring (docs/offloads.md), so they are the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IoBackend {
    /// One io_uring per worker with many reads in flight and batched submissions.
    Uring,
    /// `poll`, `read`/`writev` on the TUN and `recvmmsg`/`sendmmsg` on the socket.
    #[default]
    Syscalls,
}

impl IoBackend {
    /// Every back end, in the order they are documented.
    pub const ALL: [IoBackend; 2] = [IoBackend::Uring, IoBackend::Syscalls];

    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            IoBackend::Uring => "uring",
            IoBackend::Syscalls => "syscalls",
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not an I/O back end.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown I/O back end {0:?} (expected \"uring\" or \"syscalls\")")]
pub struct UnknownIoBackend(pub String);

impl FromStr for IoBackend {
    type Err = UnknownIoBackend;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IoBackend::ALL
            .into_iter()
            .find(|backend| backend.name() == s)
            .ok_or_else(|| UnknownIoBackend(s.to_owned()))
    }
}

/// Which kernel offloads the engine may use. Each is probed at start and used only where the
/// kernel (and, for the TUN, the queues) support it; every combination carries the same
/// packets, fewer offloads only cost more CPU per byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Offloads {
    /// Checksum and TCP/UDP segmentation offload on the TUN: the kernel hands over 64 KiB
    /// super-packets, which the workers cut into datagrams, and segments from peers are
    /// merged into super-packets before they are written. Needs queues opened with a
    /// virtio-net header (`open_queues_with`).
    pub tun: bool,
    /// UDP GSO: a run of equal-sized datagrams to one peer leaves in one send.
    pub udp_gso: bool,
    /// UDP GRO: a run of datagrams from one peer arrives in one buffer.
    pub udp_gro: bool,
}

impl Offloads {
    /// Every offload.
    pub const ALL: Offloads = Offloads {
        tun: true,
        udp_gso: true,
        udp_gro: true,
    };
    /// None: one packet per operation everywhere.
    pub const NONE: Offloads = Offloads {
        tun: false,
        udp_gso: false,
        udp_gro: false,
    };
}

impl Default for Offloads {
    fn default() -> Self {
        Offloads::ALL
    }
}

/// The offloads a running engine actually uses, after probing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActiveOffloads {
    /// The TUN queues carry a virtio-net header.
    pub vnet_hdr: bool,
    /// What the TUN device was told it may hand over.
    pub tun: TunOffload,
    /// Segments from peers are merged into super-packets for the TUN.
    pub coalesce: bool,
    /// UDP datagrams from peers are merged too (the TUN takes USO).
    pub coalesce_udp: bool,
    /// UDP GSO on send.
    pub udp_gso: bool,
    /// UDP GRO on receive (on every worker's socket).
    pub udp_gro: bool,
    /// Datagrams are spread across several workers' sockets by inner flow (with
    /// encryption: by lane).
    pub flow_steering: bool,
}

impl ActiveOffloads {
    /// Whether packets with partial inner checksums can be handed to the TUN as such: it
    /// takes a virtio-net header and every packet from peers goes through the coalescer.
    pub fn takes_partial_checksums(&self) -> bool {
        self.vnet_hdr && self.coalesce
    }

    /// Bytes of virtio-net header before every packet on the TUN.
    pub(crate) fn vnet_len(&self) -> usize {
        if self.vnet_hdr {
            VNET_HDR_LEN
        } else {
            0
        }
    }
}

/// How to run the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Worker threads; must equal the number of TUN queues handed to `Engine::start`.
    pub workers: usize,
    /// The public address and UDP port every worker's socket binds (with `SO_REUSEPORT`).
    pub bind: SocketAddrV4,
    /// How workers do their I/O.
    pub io: IoBackend,
    /// The per-packet rules.
    pub policy: Policy,
    /// Pin worker N to the N-th CPU the process may use.
    pub pin_cores: bool,
    /// The offloads to use where the kernel supports them.
    pub offloads: Offloads,
    /// How many ICMP errors each worker may send.
    pub icmp_rate_limit: IcmpRateLimit,
    /// Multicast and broadcast between hosts; `None` (the default) drops them as flannel does.
    pub multicast: Option<MulticastConfig>,
    /// The longest a worker keeps looking for packets after it handled some, before it
    /// sleeps (adapted to the traffic: [`crate::poll_window`]); zero never looks.
    pub busy_poll: Duration,
}

/// The default of [`EngineConfig::busy_poll`]: off. On a machine whose cores the workers
/// share with the containers, looking took CPU the applications needed and cut TCP
/// throughput (docs/performance.md, "Looking before sleeping").
pub const DEFAULT_BUSY_POLL: Duration = Duration::ZERO;

/// The offloads a TUN device was set up with (`TUNSETOFFLOAD`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunOffload {
    /// The kernel may hand over packets whose transport checksum is still to be completed.
    pub csum: bool,
    /// TCP super-packets (TSO, IPv4 and IPv6), ECN's CWR included.
    pub tso: bool,
    /// UDP super-packets (USO, Linux 6.2 and later).
    pub uso: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_faster_back_end_is_the_default() {
        assert_eq!(IoBackend::default(), IoBackend::Syscalls);
        assert_eq!(Offloads::default(), Offloads::ALL);
    }

    #[test]
    fn backends_parse_and_print_their_names() {
        for backend in IoBackend::ALL {
            assert_eq!(backend.to_string().parse::<IoBackend>(), Ok(backend));
        }
        assert_eq!("uring".parse::<IoBackend>(), Ok(IoBackend::Uring));
        assert_eq!("syscalls".parse::<IoBackend>(), Ok(IoBackend::Syscalls));
        assert_eq!(
            "epoll".parse::<IoBackend>(),
            Err(UnknownIoBackend("epoll".into()))
        );
        assert!("Uring".parse::<IoBackend>().is_err());
    }
}
