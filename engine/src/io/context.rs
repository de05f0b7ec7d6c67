//! What a worker's loop reads but does not own.

use std::sync::Arc;
use std::time::Duration;

use crate::counters::WorkerCounters;
use crate::crypto::Tunnels;
use crate::decide::Policy;
use crate::gso_check::GsoCheck;
use crate::icmp_limit::IcmpRateLimit;
use crate::io::stop::StopSignal;
use crate::io::tap::GroupDelivery;
use crate::partial_peers::PartialPeers;
use crate::route::Routes;

/// Everything a worker's loop reads but does not own.
pub(crate) struct WorkerContext {
    /// The worker's number, 0 to workers - 1: its socket's place in the reuseport group.
    pub(crate) index: usize,
    pub(crate) routes: Routes,
    pub(crate) policy: Policy,
    pub(crate) counters: Arc<WorkerCounters>,
    pub(crate) stop: Arc<StopSignal>,
    pub(crate) icmp_rate_limit: IcmpRateLimit,
    /// Where group traffic from peers goes, on a host that takes some.
    pub(crate) groups: Option<GroupDelivery>,
    /// The peers whose inner checksums are left partial, both ways.
    pub(crate) partial_peers: PartialPeers,
    /// The per-peer GSO checks.
    pub(crate) gso_check: GsoCheck,
    /// The longest the worker looks for packets before it sleeps.
    pub(crate) busy_poll: Duration,
    /// With encryption between hosts: the peers' tunnels.
    pub(crate) tunnels: Option<Tunnels>,
}
