//! What the lease keeper and the peer watcher say to each other about this host's lease: the
//! lease as published, and the watcher's news that it is gone. It lives below both, so that
//! neither needs the other.

use std::net::Ipv4Addr;
use std::time::SystemTime;

use ipnet::Ipv4Net;

/// This host's lease as the daemon sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The leased subnet.
    pub subnet: Ipv4Net,
    /// This host's public IP, as stored in the lease.
    pub public_ip: Ipv4Addr,
    /// When the lease expires unless renewed; `None` for a reservation, which never does.
    pub expires: Option<SystemTime>,
    /// The etcd lease the subnet's key is attached to (0 for a reservation): weft's per-host
    /// record is attached to it too, so that both disappear together.
    pub etcd_lease: i64,
}

/// This host's lease was seen gone at `revision`: the watcher's message to the lease keeper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OwnLeaseGone {
    pub subnet: Ipv4Net,
    pub revision: i64,
    pub why: String,
    /// etcd lost its data: revisions from before mean nothing, so the keeper re-registers
    /// whatever revision it holds the lease at.
    pub data_loss: bool,
}
