//! Packet counters: one set per worker, written by that worker alone, summed on read.
//!
//! Each worker owns a [`WorkerCounters`] on its own cache line and updates it once per batch
//! with plain relaxed stores (a single writer needs no read-modify-write), so counting costs
//! the hot path nothing measurable. Readers (metrics, logs) sum all workers into a
//! [`CounterSnapshot`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::multicast::MulticastSnapshot;

/// Why a packet was dropped. Every drop is counted under exactly one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Not a well-formed IPv4 packet (length, version, header length, total length, checksum).
    BadPacket,
    /// From the TUN: no lease holds the destination (an ICMP net-unreachable may be sent).
    NoRoute,
    /// From the TUN: the destination lies in this host's own subnet, which the TUN never owns.
    Loop,
    /// A multicast or broadcast destination, which the overlay does not carry.
    Multicast,
    /// The TTL ran out (an ICMP time-exceeded may be sent).
    TtlExpired,
    /// Longer than the path allows (from the TUN) or than the TUN MTU (from a peer).
    TooBig,
    /// From the network: the sender is not the public address and port of a current lease.
    UnknownPeer,
    /// From the network: the inner destination is not in this host's subnet.
    NotOurs,
    /// From the network: the inner source is in the Network but not in the sender's subnet.
    SpoofedSource,
    /// From the network: the inner source is outside the Network and that is not allowed.
    ForeignSource,
    /// Not IPv4 at all (for example IPv6 written to the TUN by the host).
    NotIpv4,
    /// With encryption: a message no session or key of the sender's opens (a stranger's
    /// handshake or data, a session that ended, a handshake refused under load).
    UnknownKey,
    /// With encryption: a data message whose authentication tag does not match.
    Tampered,
    /// With encryption: a message whose counter (or handshake timestamp) was already seen or is
    /// too old for the replay window.
    Replayed,
    /// With encryption: shorter than its message type, or no message type at all.
    Truncated,
    /// With encryption: a plaintext IPv4 packet where only encrypted messages are accepted.
    Plaintext,
}

impl DropReason {
    /// Every reason, in the order counters are stored and shown.
    pub const ALL: [DropReason; 16] = [
        DropReason::BadPacket,
        DropReason::NoRoute,
        DropReason::Loop,
        DropReason::Multicast,
        DropReason::TtlExpired,
        DropReason::TooBig,
        DropReason::UnknownPeer,
        DropReason::NotOurs,
        DropReason::SpoofedSource,
        DropReason::ForeignSource,
        DropReason::NotIpv4,
        DropReason::UnknownKey,
        DropReason::Tampered,
        DropReason::Replayed,
        DropReason::Truncated,
        DropReason::Plaintext,
    ];

    /// How many reasons there are.
    pub const COUNT: usize = Self::ALL.len();

    /// The reason's name as it appears in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::BadPacket => "bad_packet",
            DropReason::NoRoute => "no_route",
            DropReason::Loop => "loop",
            DropReason::Multicast => "multicast",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::TooBig => "too_big",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::NotOurs => "not_ours",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::ForeignSource => "foreign_source",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::UnknownKey => "unknown_key",
            DropReason::Tampered => "tampered",
            DropReason::Replayed => "replayed",
            DropReason::Truncated => "truncated",
            DropReason::Plaintext => "plaintext",
        }
    }

    /// Whether only encryption between hosts drops for this reason.
    pub fn is_encryption(self) -> bool {
        matches!(
            self,
            DropReason::UnknownKey
                | DropReason::Tampered
                | DropReason::Replayed
                | DropReason::Truncated
                | DropReason::Plaintext
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counts a worker accumulates during one batch, in plain integers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Packets read from the TUN.
    pub tun_rx_packets: u64,
    /// Bytes read from the TUN.
    pub tun_rx_bytes: u64,
    /// Datagrams sent to peers.
    pub udp_tx_packets: u64,
    /// Bytes sent to peers (UDP payload).
    pub udp_tx_bytes: u64,
    /// Datagrams received from the network.
    pub udp_rx_packets: u64,
    /// Bytes received from the network (UDP payload).
    pub udp_rx_bytes: u64,
    /// Packets written to the TUN.
    pub tun_tx_packets: u64,
    /// Bytes written to the TUN.
    pub tun_tx_bytes: u64,
    /// TUN reads that yielded a packet or a super-packet.
    pub tun_reads: u64,
    /// Messages sent to peers: one datagram, or with UDP GSO a run of them.
    pub udp_sends: u64,
    /// Buffers received from the network: one datagram, or with UDP GRO a run of them.
    pub udp_receives: u64,
    /// TUN writes of forwarded packets: one packet, or a coalesced super-packet.
    pub tun_writes: u64,
    /// ICMP errors generated.
    pub icmp_sent: u64,
    /// ICMP errors not sent: over the worker's rate limit.
    pub icmp_suppressed: u64,
    /// Sends or writes the kernel refused.
    pub io_errors: u64,
    /// Batches handled.
    pub batches: u64,
    /// Packets handled across all batches (for the mean batch size).
    pub batch_packets: u64,
    /// Drops, indexed by [`DropReason`].
    pub drops: [u64; DropReason::COUNT],
}

impl BatchCounts {
    /// Count one drop.
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }
}

macro_rules! counter_fields {
    ($mac:ident) => {
        $mac! {
            tun_rx_packets,
            tun_rx_bytes,
            udp_tx_packets,
            udp_tx_bytes,
            udp_rx_packets,
            udp_rx_bytes,
            tun_tx_packets,
            tun_tx_bytes,
            tun_reads,
            udp_sends,
            udp_receives,
            tun_writes,
            icmp_sent,
            icmp_suppressed,
            io_errors,
            batches,
            batch_packets
        }
    };
}

macro_rules! define_worker_counters {
    ($($field:ident),*) => {
        /// One worker's counters. Only that worker writes them; anyone may read.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct WorkerCounters {
            $($field: AtomicU64,)*
            drops: [AtomicU64; DropReason::COUNT],
        }

        impl WorkerCounters {
            /// Fold one batch's counts in. Must be called only by the owning worker: the
            /// load-then-store pair is not atomic, which is fine with a single writer.
            pub fn add(&self, batch: &BatchCounts) {
                $(bump(&self.$field, batch.$field);)*
                for (slot, n) in self.drops.iter().zip(batch.drops.iter()) {
                    bump(slot, *n);
                }
            }

            /// The current values.
            pub fn read(&self) -> BatchCounts {
                let mut out = BatchCounts {
                    $($field: self.$field.load(Ordering::Relaxed),)*
                    drops: [0; DropReason::COUNT],
                };
                for (out, slot) in out.drops.iter_mut().zip(self.drops.iter()) {
                    *out = slot.load(Ordering::Relaxed);
                }
                out
            }
        }

        impl CounterSnapshot {
            fn accumulate(&mut self, other: &BatchCounts) {
                $(self.total.$field += other.$field;)*
                for (sum, n) in self.total.drops.iter_mut().zip(other.drops.iter()) {
                    *sum += *n;
                }
            }
        }
    };
}

counter_fields!(define_worker_counters);

#[inline]
fn bump(slot: &AtomicU64, n: u64) {
    if n != 0 {
        slot.store(
            slot.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
}

/// A metric's name, help text and labelled values (an empty label means none).
type MetricFamily<'a> = (&'a str, &'a str, &'a [(&'a str, u64)]);

/// All workers' counters summed at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// The sums.
    pub total: BatchCounts,
    /// How many workers contributed.
    pub workers: usize,
    /// The multicast relay's counters, when the engine runs one.
    pub multicast: Option<MulticastSnapshot>,
}

impl CounterSnapshot {
    /// Sum the given workers' counters.
    pub fn sum<'a>(workers: impl IntoIterator<Item = &'a WorkerCounters>) -> Self {
        let mut snapshot = Self::default();
        for worker in workers {
            snapshot.accumulate(&worker.read());
            snapshot.workers += 1;
        }
        snapshot
    }

    /// Drops counted under `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.total.drops[reason.index()]
    }

    /// All drops, whatever the reason.
    pub fn total_drops(&self) -> u64 {
        self.total.drops.iter().sum()
    }

    /// The mean number of packets handled per batch.
    pub fn mean_batch(&self) -> f64 {
        if self.total.batches == 0 {
            0.0
        } else {
            self.total.batch_packets as f64 / self.total.batches as f64
        }
    }

    /// The counters in Prometheus' text exposition format.
    pub fn render_prometheus(&self, out: &mut String) {
        let t = &self.total;
        let counters: [MetricFamily; 8] = [
            (
                "weft_packets_total",
                "Packets moved, by path.",
                &[
                    ("tun_rx", t.tun_rx_packets),
                    ("udp_tx", t.udp_tx_packets),
                    ("udp_rx", t.udp_rx_packets),
                    ("tun_tx", t.tun_tx_packets),
                ],
            ),
            (
                "weft_bytes_total",
                "Bytes moved, by path.",
                &[
                    ("tun_rx", t.tun_rx_bytes),
                    ("udp_tx", t.udp_tx_bytes),
                    ("udp_rx", t.udp_rx_bytes),
                    ("tun_tx", t.tun_tx_bytes),
                ],
            ),
            (
                "weft_io_operations_total",
                "Reads, sends, receives and writes that moved packets, by path (packets divided \
                 by operations is what the offloads batch per operation).",
                &[
                    ("tun_rx", t.tun_reads),
                    ("udp_tx", t.udp_sends),
                    ("udp_rx", t.udp_receives),
                    ("tun_tx", t.tun_writes),
                ],
            ),
            (
                "weft_icmp_sent_total",
                "ICMP errors generated.",
                &[("", t.icmp_sent)],
            ),
            (
                "weft_icmp_suppressed_total",
                "ICMP errors not sent because of the per-worker rate limit.",
                &[("", t.icmp_suppressed)],
            ),
            (
                "weft_io_errors_total",
                "Sends and writes the kernel refused.",
                &[("", t.io_errors)],
            ),
            ("weft_batches_total", "Batches handled.", &[("", t.batches)]),
            (
                "weft_batch_packets_total",
                "Packets handled in batches (divide by weft_batches_total for the mean batch).",
                &[("", t.batch_packets)],
            ),
        ];
        for (name, help, values) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (path, value) in values {
                if path.is_empty() {
                    let _ = writeln!(out, "{name} {value}");
                } else {
                    let _ = writeln!(out, "{name}{{path=\"{path}\"}} {value}");
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP weft_drops_total Packets dropped, by reason.\n# TYPE weft_drops_total counter"
        );
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "weft_drops_total{{reason=\"{}\"}} {}",
                reason.name(),
                self.drops(reason)
            );
        }
        let _ = writeln!(
            out,
            "# HELP weft_workers Data-plane worker threads.\n# TYPE weft_workers gauge\nweft_workers {}",
            self.workers
        );
        if let Some(multicast) = &self.multicast {
            multicast.render_prometheus(out);
        }
    }

    /// A one-line summary for the log.
    pub fn summary(&self) -> String {
        let t = &self.total;
        let per_op = |packets: u64, operations: u64| {
            if operations == 0 {
                0.0
            } else {
                packets as f64 / operations as f64
            }
        };
        let mut line = format!(
            "tun_rx={} ({:.1}/read) udp_tx={} ({:.1}/send) udp_rx={} ({:.1}/receive) tun_tx={} \
             ({:.1}/write) icmp={} icmp_suppressed={} io_errors={} mean_batch={:.1} drops={}",
            t.tun_rx_packets,
            per_op(t.tun_rx_packets, t.tun_reads),
            t.udp_tx_packets,
            per_op(t.udp_tx_packets, t.udp_sends),
            t.udp_rx_packets,
            per_op(t.udp_rx_packets, t.udp_receives),
            t.tun_tx_packets,
            per_op(t.tun_tx_packets, t.tun_writes),
            t.icmp_sent,
            t.icmp_suppressed,
            t.io_errors,
            self.mean_batch(),
            self.total_drops()
        );
        for reason in DropReason::ALL {
            let n = self.drops(reason);
            if n != 0 {
                let _ = write!(line, " {}={}", reason.name(), n);
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
    }

    #[test]
    fn workers_are_summed() {
        let workers = [WorkerCounters::default(), WorkerCounters::default()];
        let mut batch = BatchCounts {
            tun_rx_packets: 3,
            tun_rx_bytes: 300,
            tun_reads: 2,
            batches: 1,
            batch_packets: 3,
            ..BatchCounts::default()
        };
        batch.drop(DropReason::SpoofedSource);
        workers[0].add(&batch);
        workers[0].add(&batch);
        workers[1].add(&batch);
        let snap = CounterSnapshot::sum(&workers);
        assert_eq!(snap.workers, 2);
        assert_eq!(snap.total.tun_rx_packets, 9);
        assert_eq!(snap.total.tun_rx_bytes, 900);
        assert_eq!(snap.drops(DropReason::SpoofedSource), 3);
        assert_eq!(snap.total_drops(), 3);
        assert_eq!(snap.mean_batch(), 3.0);
        assert!(snap.summary().contains("spoofed_source=3"));
        assert_eq!(snap.total.tun_reads, 6);
        assert!(
            snap.summary().contains("tun_rx=9 (1.5/read)"),
            "{}",
            snap.summary()
        );
    }

    #[test]
    fn prometheus_text_has_every_reason() {
        let worker = WorkerCounters::default();
        let mut batch = BatchCounts::default();
        batch.drop(DropReason::UnknownPeer);
        batch.udp_rx_packets = 7;
        batch.udp_receives = 2;
        worker.add(&batch);
        let mut text = String::new();
        CounterSnapshot::sum([&worker]).render_prometheus(&mut text);
        assert!(text.contains("weft_packets_total{path=\"udp_rx\"} 7\n"));
        assert!(text.contains("weft_io_operations_total{path=\"udp_rx\"} 2\n"));
        assert!(text.contains("weft_io_operations_total{path=\"tun_tx\"} 0\n"));
        assert!(text.contains("weft_drops_total{reason=\"unknown_peer\"} 1\n"));
        for reason in DropReason::ALL {
            assert!(text.contains(&format!("reason=\"{}\"", reason.name())));
        }
        assert!(text.contains("weft_workers 1\n"));
        assert!(text.contains("weft_icmp_suppressed_total 0\n"));
    }
}
