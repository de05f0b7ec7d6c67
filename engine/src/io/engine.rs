//! The engine: one worker thread per TUN queue, started together, counted together and
//! stopped together.

use std::fmt;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

pub use crate::config::{ActiveOffloads, EngineConfig, IoBackend, Offloads, UnknownIoBackend};
use crate::counters::{BatchCounts, CounterSnapshot, WorkerCounters};
use crate::crypto::Tunnels;
use crate::gso_check::GsoCheck;
use crate::io::broadcast_queue;
use crate::io::context::WorkerContext;
use crate::io::crypt;
use crate::io::error::WorkerError;
use crate::io::gso_probe;
use crate::io::periodic::PeriodicThread;
use crate::io::probe::probe_offloads;
use crate::io::relay::{self, RelaySetup, RelayThread};
use crate::io::stop::StopSignal;
use crate::io::tap::{GroupDelivery, Tap};
use crate::io::tun::TunError;
use crate::io::tun::TunQueue;
use crate::io::udp::{bind_worker_socket, steer_by_inner_flow, steer_by_lane};
use crate::io::worker::{self, SpawnError, WorkerSetup};
use crate::multicast::receive::Delivery;
use crate::multicast::relay::Relay;
use crate::multicast::{Groups, LocalGroups, MulticastCounters};
use crate::partial_peers::PartialPeers;
use crate::route::Routes;

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
    /// The multicast TAP could not be created.
    #[error("cannot open the multicast TAP: {0}")]
    Tap(#[source] TunError),
    /// The multicast relay's socket or thread could not be set up.
    #[error("cannot start the multicast relay: {0}")]
    Relay(#[source] io::Error),
    /// Encryption between hosts runs on the syscalls back end only.
    #[error("encryption between hosts needs the syscalls I/O back end (--io syscalls), not {0}")]
    EncryptionBackend(IoBackend),
    /// The tunnels' timer thread or its socket could not be set up.
    #[error("cannot start the tunnel timers: {0}")]
    Timers(#[source] io::Error),
    /// The GSO probe thread or its socket could not be set up.
    #[error("cannot start the GSO probes: {0}")]
    Probes(#[source] io::Error),
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
    local_groups: LocalGroups,
    partial_peers: PartialPeers,
    gso_check: GsoCheck,
    multicast_counters: Option<Arc<MulticastCounters>>,
    relay: Option<RelayThread>,
    timers: Option<PeriodicThread>,
    probes: Option<PeriodicThread>,
    tunnels: Option<Tunnels>,
}

impl Engine {
    /// Start one worker per TUN queue, each with its own socket bound to `config.bind`, all
    /// reading `routes`. Returns once every worker has set up its I/O; if one cannot, the
    /// others are stopped and the error is returned. With `config.multicast` set, no peer
    /// takes group traffic until one is published: see [`Engine::start_with_groups`].
    pub fn start(
        config: EngineConfig,
        tun: Vec<TunQueue>,
        routes: Routes,
    ) -> Result<Engine, EngineError> {
        Self::start_with_groups(config, tun, routes, Groups::default())
    }

    /// As [`Engine::start`], and with `config.multicast` set, also open the multicast TAP
    /// and start the relay thread, which replicates local group traffic to the peers
    /// `groups` lists. Without `config.multicast`, `groups` is unused.
    pub fn start_with_groups(
        config: EngineConfig,
        tun: Vec<TunQueue>,
        routes: Routes,
        groups: Groups,
    ) -> Result<Engine, EngineError> {
        Self::start_with(config, tun, routes, groups, None)
    }

    /// As [`Engine::start_with_groups`], and with `tunnels`, every datagram between hosts is
    /// encrypted and authenticated with the WireGuard protocol: sent sealed for the peer's
    /// tunnel, received opened, and anything else (plaintext, a stranger's, tampered,
    /// replayed, truncated) dropped and counted. A peer without a tunnel gets nothing. Runs
    /// on the syscalls back end only.
    pub fn start_with(
        config: EngineConfig,
        tun: Vec<TunQueue>,
        routes: Routes,
        groups: Groups,
        tunnels: Option<Tunnels>,
    ) -> Result<Engine, EngineError> {
        if tunnels.is_some() && config.io != IoBackend::Syscalls {
            return Err(EngineError::EncryptionBackend(config.io));
        }
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
        // With encryption the datagram holds no inner flow to steer by, but it names its
        // lane: each lane goes to the worker that seals on it.
        if let [first, _, ..] = &sockets[..] {
            let (steered, by) = match &tunnels {
                None => (
                    steer_by_inner_flow(first.as_fd(), sockets.len()),
                    "inner flow",
                ),
                Some(_) => (steer_by_lane(first.as_fd(), sockets.len()), "lane"),
            };
            match steered {
                Ok(()) => offloads.flow_steering = true,
                Err(error) => tracing::warn!(
                    %error,
                    "cannot spread received datagrams across workers by {by}"
                ),
            }
        }
        let mut engine = Engine {
            workers: Vec::with_capacity(config.workers),
            offloads,
            local_groups: LocalGroups::new(),
            partial_peers: PartialPeers::default(),
            gso_check: GsoCheck::default(),
            multicast_counters: None,
            relay: None,
            timers: None,
            probes: None,
            tunnels: tunnels.clone(),
        };
        // With multicast: the TAP, shared by the workers (delivery) and the relay (capture).
        let mut relay_setup = None;
        let mut delivery = None;
        if let Some(multicast) = &config.multicast {
            let tap = Arc::new(Tap::open(&multicast.tap_name).map_err(EngineError::Tap)?);
            let counters = Arc::new(MulticastCounters::default());
            // A duplicate of a bound socket, not a new one: a new socket on the port would
            // join the reuseport group and take a share of the peers' datagrams.
            let socket = sockets[0].try_clone().map_err(EngineError::Relay)?;
            let (to_relay, handed, wake) = broadcast_queue::broadcast_queue(Arc::clone(&counters))
                .map_err(EngineError::Relay)?;
            delivery = Some(GroupDelivery {
                tap: Arc::clone(&tap),
                delivery: Delivery {
                    multicast: multicast.multicast,
                    broadcast: multicast.broadcast,
                },
                counters: Arc::clone(&counters),
                to_relay: multicast.broadcast.then_some(to_relay),
            });
            relay_setup = Some(RelaySetup {
                tap,
                socket,
                routes: routes.clone(),
                groups,
                local: engine.local_groups.clone(),
                counters: Arc::clone(&counters),
                relay: Relay::new(multicast, config.policy.tun_mtu, Instant::now()),
                handed,
                wake,
            });
            engine.multicast_counters = Some(counters);
        }
        if let Some(tunnels) = &tunnels {
            // A duplicate, as for the relay: a new socket would join the reuseport group.
            let socket = sockets[0].try_clone().map_err(EngineError::Timers)?;
            engine.timers = Some(
                crypt::spawn_timers(tunnels.clone(), socket, config.bind.port())
                    .map_err(EngineError::Timers)?,
            );
        }
        // With encryption, a damaged datagram fails its authentication and is never delivered;
        // the check's unsealed probes would not pass the peer's opener either.
        if offloads.udp_gso && tunnels.is_none() {
            // A duplicate, as for the relay: a new socket would join the reuseport group.
            let socket = sockets[0].try_clone().map_err(EngineError::Probes)?;
            engine.probes = Some(
                gso_probe::spawn(engine.gso_check.clone(), socket, config.bind.port())
                    .map_err(EngineError::Probes)?,
            );
        }
        for (index, (tun, socket)) in tun.into_iter().zip(sockets).enumerate() {
            let stop = StopSignal::new().map_err(|source| EngineError::Spawn { index, source })?;
            let context = WorkerContext {
                index,
                routes: routes.clone(),
                policy: config.policy,
                icmp_rate_limit: config.icmp_rate_limit,
                groups: delivery.clone(),
                partial_peers: engine.partial_peers.clone(),
                gso_check: engine.gso_check.clone(),
                busy_poll: config.busy_poll,
                tunnels: tunnels.clone(),
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
        if let Some(setup) = relay_setup {
            engine.relay = Some(relay::spawn(setup).map_err(EngineError::Relay)?);
        }
        tracing::info!(
            workers = config.workers,
            io = %config.io,
            bind = %config.bind,
            encrypted = tunnels.is_some(),
            "engine started"
        );
        Ok(engine)
    }

    /// With encryption between hosts: the peers' tunnels.
    pub fn tunnels(&self) -> Option<&Tunnels> {
        self.tunnels.as_ref()
    }

    /// The offloads in use.
    pub fn offloads(&self) -> ActiveOffloads {
        self.offloads
    }

    /// Each worker's own counters, by worker number.
    pub fn worker_counters(&self) -> Vec<BatchCounts> {
        self.workers.iter().map(|w| w.counters.read()).collect()
    }

    /// All workers' counters, summed, and the multicast relay's.
    pub fn counters(&self) -> CounterSnapshot {
        let mut snapshot = CounterSnapshot::sum(self.workers.iter().map(|w| &*w.counters));
        snapshot.multicast = self.multicast_counters.as_ref().map(|c| c.snapshot());
        snapshot
    }

    /// The peers with which inner checksums are left partial (none until control publishes
    /// some; see [`crate::offload::partial`]). Publish only while the TUN takes a virtio-net
    /// header and coalescing is on (see [`ActiveOffloads::takes_partial_checksums`]).
    pub fn partial_peers(&self) -> PartialPeers {
        self.partial_peers.clone()
    }

    /// The per-peer GSO checks: control names the peers to check (the weft hosts that
    /// advertise it); until a peer's probe run arrives intact, datagrams to it leave one by
    /// one (see [`crate::gso_check`]). Probes are sent only with UDP GSO on and without
    /// encryption.
    pub fn gso_check(&self) -> GsoCheck {
        self.gso_check.clone()
    }

    /// The groups local containers joined, as the multicast relay snooped them (always empty
    /// without multicast). The handle stays valid, and keeps changing, while the engine runs.
    pub fn local_groups(&self) -> LocalGroups {
        self.local_groups.clone()
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
        if let Some(relay) = &mut self.relay {
            relay.stop_and_join();
        }
        if let Some(timers) = &mut self.timers {
            timers.stop_and_join();
        }
        if let Some(probes) = &mut self.probes {
            probes.stop_and_join();
        }
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
    use crate::decide::Policy;

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
            icmp_rate_limit: crate::icmp_limit::IcmpRateLimit::DEFAULT,
            multicast: None,
            busy_poll: crate::config::DEFAULT_BUSY_POLL,
        };
        assert!(matches!(
            Engine::start(config.clone(), Vec::new(), routes.clone()),
            Err(EngineError::NoWorkers)
        ));
        let two = EngineConfig {
            workers: 2,
            ..config.clone()
        };
        assert!(matches!(
            Engine::start(two, Vec::new(), routes.clone()),
            Err(EngineError::QueueCount {
                workers: 2,
                queues: 0
            })
        ));
        let uring = EngineConfig {
            io: IoBackend::Uring,
            ..config
        };
        let tunnels = Tunnels::new(crate::crypto::StaticKeys::from_private([1; 32]));
        let refused =
            Engine::start_with(uring, Vec::new(), routes, Groups::default(), Some(tunnels));
        assert!(matches!(
            refused,
            Err(EngineError::EncryptionBackend(IoBackend::Uring))
        ));
    }
}
