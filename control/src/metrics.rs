//! The control plane's own metrics: the lease, the peers, the watch and etcd's health, in
//! Prometheus' text format.
//!
//! The lease keeper and the peer watcher update one shared [`ControlMetrics`]; `/metrics`
//! appends [`ControlMetrics::render_prometheus`] to the data plane's counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::SystemTime;

/// The etcd operations whose failures are counted, by `kind` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtcdOp {
    /// Listing the leases.
    List,
    /// Writing this host's lease.
    Write,
    /// Renewing this host's etcd lease.
    Renew,
    /// Deleting a stale lease of this host.
    Delete,
    /// Starting a watch, or a watch that broke.
    Watch,
    /// A watch that went silent and did not answer a progress request.
    WatchStalled,
}

impl EtcdOp {
    const ALL: [EtcdOp; 6] = [
        EtcdOp::List,
        EtcdOp::Write,
        EtcdOp::Renew,
        EtcdOp::Delete,
        EtcdOp::Watch,
        EtcdOp::WatchStalled,
    ];

    fn label(self) -> &'static str {
        match self {
            EtcdOp::List => "list",
            EtcdOp::Write => "write",
            EtcdOp::Renew => "renew",
            EtcdOp::Delete => "delete",
            EtcdOp::Watch => "watch",
            EtcdOp::WatchStalled => "watch_stalled",
        }
    }
}

/// Counters and gauges of the lease keeper and the peer watcher. All methods are lock-free.
#[derive(Debug, Default)]
pub struct ControlMetrics {
    /// Unix time (ms) at which this host's lease expires; 0 without a lease, -1 for a
    /// reservation, which never expires.
    lease_expiry_ms: AtomicI64,
    peers: AtomicU64,
    lease_acquisitions: AtomicU64,
    lease_renewals: AtomicU64,
    lease_losses: AtomicU64,
    watch_resyncs: AtomicU64,
    data_loss: AtomicU64,
    etcd_errors: [AtomicU64; EtcdOp::ALL.len()],
}

impl ControlMetrics {
    /// All zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// This host's lease now expires at `at` (`None`: a reservation, never).
    pub fn set_lease_expiry(&self, at: Option<SystemTime>) {
        let ms = match at {
            None => -1,
            Some(at) => at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        };
        self.lease_expiry_ms.store(ms, Ordering::Relaxed);
    }

    /// A lease was acquired (created, adopted or re-acquired).
    pub fn lease_acquired(&self) {
        self.lease_acquisitions.fetch_add(1, Ordering::Relaxed);
    }

    /// The lease was renewed.
    pub fn lease_renewed(&self) {
        self.lease_renewals.fetch_add(1, Ordering::Relaxed);
    }

    /// The lease was lost (deleted, expired, taken over, or etcd lost its data).
    pub fn lease_lost(&self) {
        self.lease_losses.fetch_add(1, Ordering::Relaxed);
    }

    /// The published route table now holds `peers` peers.
    pub fn set_peers(&self, peers: usize) {
        self.peers.store(peers as u64, Ordering::Relaxed);
    }

    /// The watcher took a fresh snapshot after its watch broke.
    pub fn watch_resynced(&self) {
        self.watch_resyncs.fetch_add(1, Ordering::Relaxed);
    }

    /// etcd was found to have lost its data.
    pub fn data_lost(&self) {
        self.data_loss.fetch_add(1, Ordering::Relaxed);
    }

    /// An etcd operation of kind `op` failed.
    pub fn etcd_error(&self, op: EtcdOp) {
        if let Some(i) = EtcdOp::ALL.iter().position(|o| *o == op) {
            self.etcd_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many times etcd was found to have lost its data.
    pub fn data_loss_count(&self) -> u64 {
        self.data_loss.load(Ordering::Relaxed)
    }

    /// How many resyncs the watcher made.
    pub fn resync_count(&self) -> u64 {
        self.watch_resyncs.load(Ordering::Relaxed)
    }

    /// How many failures of kind `op`.
    pub fn etcd_error_count(&self, op: EtcdOp) -> u64 {
        EtcdOp::ALL
            .iter()
            .position(|o| *o == op)
            .map_or(0, |i| self.etcd_errors[i].load(Ordering::Relaxed))
    }

    /// Append the metrics in Prometheus' text exposition format.
    pub fn render_prometheus(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: u64| vec![(String::new(), v.to_string())];
        metric(
            "weft_build_info",
            "gauge",
            "weftd's version; always 1.",
            &[(
                format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
                "1".to_owned(),
            )],
        );
        let expiry = match self.lease_expiry_ms.load(Ordering::Relaxed) {
            0 => None,
            -1 => Some("+Inf".to_owned()),
            ms => Some(format!("{}.{:03}", ms / 1000, ms % 1000)),
        };
        if let Some(expiry) = expiry {
            metric(
                "weft_lease_expiry_timestamp_seconds",
                "gauge",
                "When this host's subnet lease expires unless renewed (Unix time; +Inf for a reservation).",
                &[(String::new(), expiry)],
            );
        }
        metric(
            "weft_peers",
            "gauge",
            "Other hosts' subnets in the published route table.",
            &one(load(&self.peers)),
        );
        metric(
            "weft_lease_acquisitions_total",
            "counter",
            "Subnet leases acquired (created, adopted or re-acquired).",
            &one(load(&self.lease_acquisitions)),
        );
        metric(
            "weft_lease_renewals_total",
            "counter",
            "Successful renewals of this host's etcd lease.",
            &one(load(&self.lease_renewals)),
        );
        metric(
            "weft_lease_losses_total",
            "counter",
            "Times this host's lease was found gone (deleted, expired, taken over, data loss).",
            &one(load(&self.lease_losses)),
        );
        metric(
            "weft_watch_resyncs_total",
            "counter",
            "Fresh snapshots of the leases taken after the watch broke, stalled or was compacted.",
            &one(load(&self.watch_resyncs)),
        );
        metric(
            "weft_etcd_data_loss_total",
            "counter",
            "Times etcd was found to have lost its data (revision went back, cluster ID changed).",
            &one(load(&self.data_loss)),
        );
        let errors: Vec<(String, String)> = EtcdOp::ALL
            .iter()
            .zip(&self.etcd_errors)
            .map(|(op, n)| (format!("{{kind=\"{}\"}}", op.label()), load(n).to_string()))
            .collect();
        metric(
            "weft_etcd_errors_total",
            "counter",
            "Failed etcd operations, by kind.",
            &errors,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renders_prometheus_text() {
        let m = ControlMetrics::new();
        let mut text = String::new();
        m.render_prometheus(&mut text);
        assert!(
            !text.contains("weft_lease_expiry_timestamp_seconds"),
            "no lease yet"
        );
        m.set_lease_expiry(Some(
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
        ));
        m.set_peers(3);
        m.lease_renewed();
        m.data_lost();
        m.etcd_error(EtcdOp::WatchStalled);
        m.etcd_error(EtcdOp::WatchStalled);
        let mut text = String::new();
        m.render_prometheus(&mut text);
        for line in [
            "weft_lease_expiry_timestamp_seconds 1700000000.250",
            "weft_peers 3",
            "weft_lease_renewals_total 1",
            "weft_etcd_data_loss_total 1",
            "weft_etcd_errors_total{kind=\"watch_stalled\"} 2",
            "weft_etcd_errors_total{kind=\"list\"} 0",
            "# TYPE weft_watch_resyncs_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        let build = format!(
            "weft_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build));
        m.set_lease_expiry(None);
        let mut text = String::new();
        m.render_prometheus(&mut text);
        assert!(text.contains("weft_lease_expiry_timestamp_seconds +Inf"));
    }
}
