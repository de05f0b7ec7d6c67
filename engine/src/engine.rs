//! The engine: one worker thread per TUN queue, started together, counted together and
//! stopped together.

use std::fmt;
use std::io;
use std::net::SocketAddrV4;
use std::str::FromStr;
use std::sync::Arc;

use crate::counters::{CounterSnapshot, WorkerCounters};
use crate::decide::Policy;
use std::net::UdpSocket;
use std::os::fd::AsFd;

use crate::offload::VNET_HDR_LEN;
use crate::route::Routes;
use crate::tun::{set_offload, TunOffload, TunQueue};
use crate::udp::{
    bind_worker_socket, enable_gro, gso_supported, kernel_cuts_tun_uso_safely, kernel_gso_broken,
    kernel_release, steer_by_inner_flow,
};
use crate::worker::{self, SpawnError, StopSignal, WorkerContext, WorkerError, WorkerSetup};

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
    /// virtio-net header ([`crate::tun::open_queues_with`]).
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
    /// Datagrams are spread across several workers' sockets by inner flow.
    pub flow_steering: bool,
}

impl ActiveOffloads {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Worker threads; must equal the number of TUN queues handed to [`Engine::start`].
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
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration asks for no worker at all.
    #[error("the engine needs at least one worker")]
    NoWorkers,
    /// Each worker owns exactly one TUN queue.
    #[error("{workers} workers need {workers} TUN queues, got {queues}")]
    QueueCount {
        /// Workers configured.
        workers: usize,
        /// TUN queues given.
        queues: usize,
    },
    /// A worker's UDP socket could not be opened or bound.
    #[error("cannot bind UDP socket to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddrV4,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The stop eventfd or the thread could not be created.
    #[error("cannot start worker {index}: {source}")]
    Spawn {
        /// The worker's number.
        index: usize,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A worker failed to set up its I/O.
    #[error("worker {index}: {source}")]
    Worker {
        /// The worker's number.
        index: usize,
        /// What went wrong.
        #[source]
        source: WorkerError,
    },
    /// A worker thread ended during setup without saying why.
    #[error("worker {index} ended during setup")]
    WorkerLost {
        /// The worker's number.
        index: usize,
    },
}

/// The running data plane. Dropping it stops the workers, like [`Engine::shutdown`].
pub struct Engine {
    workers: Vec<worker::WorkerThread>,
    offloads: ActiveOffloads,
}

impl Engine {
    /// Start one worker per TUN queue, each with its own socket bound to `config.bind`, all
    /// reading `routes`. Returns once every worker has set up its I/O; if one cannot, the
    /// others are stopped and the error is returned.
    pub fn start(
        config: EngineConfig,
        tun: Vec<TunQueue>,
        routes: Routes,
    ) -> Result<Engine, EngineError> {
        if config.workers == 0 {
            return Err(EngineError::NoWorkers);
        }
        if tun.len() != config.workers {
            return Err(EngineError::QueueCount {
                workers: config.workers,
                queues: tun.len(),
            });
        }
        // Bind every socket before starting a thread, so a bad address fails fast.
        let sockets = (0..config.workers)
            .map(|_| bind_worker_socket(config.bind))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| EngineError::Bind {
                addr: config.bind,
                source,
            })?;
        let mut offloads = probe_offloads(&config.offloads, &tun, &sockets);
        if let [first, _, ..] = &sockets[..] {
            match steer_by_inner_flow(first.as_fd(), sockets.len()) {
                Ok(()) => offloads.flow_steering = true,
                Err(error) => tracing::warn!(
                    %error,
                    "cannot spread received datagrams across workers by inner flow"
                ),
            }
        }
        let mut engine = Engine {
            workers: Vec::with_capacity(config.workers),
            offloads,
        };
        for (index, (tun, socket)) in tun.into_iter().zip(sockets).enumerate() {
            let stop = StopSignal::new().map_err(|source| EngineError::Spawn { index, source })?;
            let context = WorkerContext {
                routes: routes.clone(),
                policy: config.policy,
                counters: Arc::new(WorkerCounters::default()),
                stop: Arc::new(stop),
            };
            let setup = WorkerSetup {
                index,
                backend: config.io,
                pin_core: config.pin_cores,
                tun,
                socket,
                offloads,
                context,
            };
            // On error, `engine` is dropped, which stops the workers already running.
            let thread = worker::spawn(setup).map_err(|error| match error {
                SpawnError::Spawn(source) => EngineError::Spawn { index, source },
                SpawnError::Setup(source) => EngineError::Worker { index, source },
                SpawnError::Lost => EngineError::WorkerLost { index },
            })?;
            engine.workers.push(thread);
        }
        tracing::info!(
            workers = config.workers,
            io = %config.io,
            bind = %config.bind,
            "engine started"
        );
        Ok(engine)
    }

    /// The offloads in use.
    pub fn offloads(&self) -> ActiveOffloads {
        self.offloads
    }

    /// All workers' counters, summed.
    pub fn counters(&self) -> CounterSnapshot {
        CounterSnapshot::sum(self.workers.iter().map(|w| &*w.counters))
    }

    /// Whether every worker is still running (a worker that hit a fatal error has ended).
    pub fn is_running(&self) -> bool {
        !self.workers.is_empty()
            && self.workers.iter().all(|w| {
                w.thread
                    .as_ref()
                    .is_some_and(|thread| !thread.is_finished())
            })
    }

    /// Stop every worker, wait for them to end (closing their TUN queues, sockets and rings)
    /// and return the final counters.
    pub fn shutdown(mut self) -> CounterSnapshot {
        self.stop_and_join();
        let snapshot = self.counters();
        tracing::info!(counters = %snapshot.summary(), "engine stopped");
        snapshot
    }

    fn stop_and_join(&mut self) {
        for worker in &self.workers {
            worker.stop.raise();
        }
        for (index, worker) in self.workers.iter_mut().enumerate() {
            if let Some(thread) = worker.thread.take() {
                if thread.join().is_err() {
                    tracing::error!(worker = index, "worker thread panicked");
                }
            }
        }
    }
}

/// Turn on what `wanted` asks for and the kernel supports, and log what is on.
fn probe_offloads(wanted: &Offloads, tun: &[TunQueue], sockets: &[UdpSocket]) -> ActiveOffloads {
    let vnet_hdr = tun.iter().all(TunQueue::vnet_hdr);
    let tun_offload = match tun.first() {
        Some(queue) if vnet_hdr => match set_offload(queue, wanted.tun) {
            Ok(offload) => offload,
            Err(error) => {
                tracing::warn!(%error, "cannot set the TUN offloads; reading plain packets");
                TunOffload::default()
            }
        },
        _ => TunOffload::default(),
    };
    if wanted.tun && !vnet_hdr {
        tracing::info!("the TUN queues carry no virtio-net header: no TUN offloads");
    }
    let release = kernel_release().unwrap_or_default();
    let udp_gso = wanted.udp_gso
        && sockets.iter().all(|s| gso_supported(s.as_fd()))
        && if kernel_gso_broken(&release) {
            tracing::warn!(
                kernel = %release,
                "this kernel's UDP GSO corrupts headers (Linux 7.0 to 7.1.4): sending plain datagrams"
            );
            false
        } else {
            true
        };
    let udp_gro = wanted.udp_gro
        && sockets.iter().all(|s| match enable_gro(s.as_fd()) {
            Ok(()) => true,
            Err(error) => {
                tracing::info!(%error, "no UDP GRO");
                false
            }
        });
    let active = ActiveOffloads {
        vnet_hdr,
        tun: tun_offload,
        coalesce: vnet_hdr && wanted.tun,
        coalesce_udp: vnet_hdr
            && wanted.tun
            && tun_offload.uso
            && kernel_cuts_tun_uso_safely(&release),
        udp_gso,
        udp_gro,
        flow_steering: false,
    };
    tracing::info!(
        tun_csum = active.tun.csum,
        tun_tso = active.tun.tso,
        tun_uso = active.tun.uso,
        tun_coalesce = active.coalesce,
        tun_coalesce_udp = active.coalesce_udp,
        udp_gso = active.udp_gso,
        udp_gro = active.udp_gro,
        "offloads"
    );
    active
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("workers", &self.workers.len())
            .field("running", &self.is_running())
            .finish()
    }
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

    #[test]
    fn configurations_that_cannot_work_are_refused() {
        use crate::route::{Overlay, RouteTable};
        let overlay = Overlay::new("10.1.0.0/16".parse().unwrap(), 24).unwrap();
        let routes = Routes::new(RouteTable::empty(overlay, 8285));
        let config = EngineConfig {
            workers: 0,
            bind: "198.18.0.1:8285".parse().unwrap(),
            io: IoBackend::Syscalls,
            policy: Policy {
                tun_mtu: 1472,
                allow_foreign_sources: false,
            },
            pin_cores: false,
            offloads: Offloads::default(),
        };
        assert!(matches!(
            Engine::start(config, Vec::new(), routes.clone()),
            Err(EngineError::NoWorkers)
        ));
        let two = EngineConfig {
            workers: 2,
            ..config
        };
        assert!(matches!(
            Engine::start(two, Vec::new(), routes),
            Err(EngineError::QueueCount {
                workers: 2,
                queues: 0
            })
        ));
    }
}
