//! The multicast counters: written by the relay thread and by the workers that deliver (group
//! traffic is rare, so shared atomics cost nothing that matters), shown with the engine's
//! other counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the relay did not replicate a frame, or a worker did not deliver one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MulticastDrop {
    /// A malformed IPv4 packet or IGMP message.
    BadPacket,
    /// The source is not a container of this host (split horizon: only local traffic is
    /// replicated, so nothing loops between hosts).
    NotLocalSource,
    /// Multicast, or broadcast, is off on this host (or broadcast that is not UDP).
    NotEnabled,
    /// No peer takes the group.
    NoMembers,
    /// Over the rate limit.
    RateLimited,
    /// Longer than the TUN MTU, which the receivers' containers could not take.
    TooBig,
    /// The kernel refused a send or a TAP write.
    IoError,
}

impl MulticastDrop {
    /// Every reason, in the order counters are stored and shown.
    pub const ALL: [MulticastDrop; 7] = [
        MulticastDrop::BadPacket,
        MulticastDrop::NotLocalSource,
        MulticastDrop::NotEnabled,
        MulticastDrop::NoMembers,
        MulticastDrop::RateLimited,
        MulticastDrop::TooBig,
        MulticastDrop::IoError,
    ];

    /// The reason's name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            MulticastDrop::BadPacket => "bad_packet",
            MulticastDrop::NotLocalSource => "not_local_source",
            MulticastDrop::NotEnabled => "not_enabled",
            MulticastDrop::NoMembers => "no_members",
            MulticastDrop::RateLimited => "rate_limited",
            MulticastDrop::TooBig => "too_big",
            MulticastDrop::IoError => "io_error",
        }
    }
}

/// The live multicast counters of one engine.
#[derive(Debug, Default)]
pub struct MulticastCounters {
    replicated: AtomicU64,
    delivered: AtomicU64,
    igmp: AtomicU64,
    queries: AtomicU64,
    groups: AtomicU64,
    drops: [AtomicU64; MulticastDrop::ALL.len()],
}

impl MulticastCounters {
    /// Count `n` datagrams sent to peers.
    pub fn replicated(&self, n: u64) {
        self.replicated.fetch_add(n, Ordering::Relaxed);
    }

    /// Count one frame written into the TAP.
    pub fn delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one IGMP message read.
    pub fn igmp(&self) {
        self.igmp.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one general query sent into the TAP.
    pub fn query_sent(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }

    /// Set how many groups local containers joined.
    pub fn set_groups(&self, n: usize) {
        self.groups.store(n as u64, Ordering::Relaxed);
    }

    /// Count `n` drops for `reason`.
    pub fn count_drop(&self, reason: MulticastDrop, n: u64) {
        self.drops[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> MulticastSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MulticastSnapshot {
            replicated: load(&self.replicated),
            delivered: load(&self.delivered),
            igmp: load(&self.igmp),
            queries: load(&self.queries),
            groups: load(&self.groups),
            drops: self.drops.each_ref().map(load),
        }
    }
}

/// The multicast counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MulticastSnapshot {
    /// Datagrams sent to peers (each copy counts).
    pub replicated: u64,
    /// Frames from peers written into the TAP.
    pub delivered: u64,
    /// IGMP messages read from the TAP.
    pub igmp: u64,
    /// General queries sent into the TAP.
    pub queries: u64,
    /// Groups local containers joined.
    pub groups: u64,
    /// Drops, indexed by [`MulticastDrop`].
    pub drops: [u64; MulticastDrop::ALL.len()],
}

impl MulticastSnapshot {
    /// Drops counted under `reason`.
    pub fn drops(&self, reason: MulticastDrop) -> u64 {
        self.drops[reason as usize]
    }

    /// The counters in Prometheus' text exposition format.
    pub fn render_prometheus(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP weft_multicast_packets_total Multicast and broadcast packets, by event.\n\
             # TYPE weft_multicast_packets_total counter"
        );
        for (event, value) in [
            ("replicated", self.replicated),
            ("delivered", self.delivered),
            ("igmp", self.igmp),
            ("query_sent", self.queries),
        ] {
            let _ = writeln!(
                out,
                "weft_multicast_packets_total{{event=\"{event}\"}} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP weft_multicast_drops_total Multicast and broadcast packets not replicated or \
             not delivered, by reason.\n# TYPE weft_multicast_drops_total counter"
        );
        for reason in MulticastDrop::ALL {
            let _ = writeln!(
                out,
                "weft_multicast_drops_total{{reason=\"{}\"}} {}",
                reason.name(),
                self.drops(reason)
            );
        }
        let _ = writeln!(
            out,
            "# HELP weft_multicast_groups Groups local containers joined.\n\
             # TYPE weft_multicast_groups gauge\nweft_multicast_groups {}",
            self.groups
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_prometheus_text() {
        let counters = MulticastCounters::default();
        counters.replicated(3);
        counters.delivered();
        counters.count_drop(MulticastDrop::RateLimited, 2);
        counters.set_groups(4);
        let snapshot = counters.snapshot();
        assert_eq!(snapshot.drops(MulticastDrop::RateLimited), 2);
        let mut text = String::new();
        snapshot.render_prometheus(&mut text);
        assert!(text.contains("weft_multicast_packets_total{event=\"replicated\"} 3\n"));
        assert!(text.contains("weft_multicast_packets_total{event=\"delivered\"} 1\n"));
        assert!(text.contains("weft_multicast_drops_total{reason=\"rate_limited\"} 2\n"));
        assert!(text.contains("weft_multicast_drops_total{reason=\"too_big\"} 0\n"));
        assert!(text.contains("weft_multicast_groups 4\n"));
    }
}
