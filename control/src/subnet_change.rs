//! What a change of this host's subnet leaves behind, and how weftd makes it seen.
//!
//! When the subnet this host had was taken while weftd was away (or its lease was lost and
//! re-acquired elsewhere), weftd moves the TUN device and subnet.env to the new subnet, but
//! docker keeps the bridge address it took from the old subnet.env until it is restarted.
//! Its containers then send from addresses no peer routes back to this host, and peers drop
//! them as spoofed. A host interface other than the TUN that carries an address inside the
//! overlay network but outside this host's subnet is that stale bridge: [`stray_addresses`]
//! finds such addresses; [`SubnetChanges`] counts the changes for `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::Ipv4Net;

use crate::netlink::LinkAddr;

/// The addresses in `addrs` that lie inside the overlay `network` but outside this host's
/// `subnet`, on any interface but the TUN device (`tun_index`). Pure.
pub fn stray_addresses(
    addrs: &[LinkAddr],
    tun_index: Option<u32>,
    network: Ipv4Net,
    subnet: Ipv4Net,
) -> Vec<LinkAddr> {
    addrs
        .iter()
        .filter(|a| Some(a.index) != tun_index)
        .filter(|a| network.contains(&a.addr) && !subnet.contains(&a.addr))
        .copied()
        .collect()
}

/// How often this host's subnet changed since weftd started.
#[derive(Debug, Default)]
pub struct SubnetChanges {
    count: AtomicU64,
}

impl SubnetChanges {
    /// Counts one change.
    pub fn record(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends `weft_subnet_changes_total` and the `weft_subnet_stale` gauge (1 while a host
    /// interface still uses an old subnet) in the Prometheus text format.
    pub fn render_prometheus(&self, stale: bool, out: &mut String) {
        let _ = write!(
            out,
            "# HELP weft_subnet_changes_total Times this host's subnet changed since weftd started.\n\
             # TYPE weft_subnet_changes_total counter\n\
             weft_subnet_changes_total {}\n\
             # HELP weft_subnet_stale 1 while a host interface (docker's bridge) has an address \
             in the overlay outside this host's subnet: restart docker.\n\
             # TYPE weft_subnet_stale gauge\n\
             weft_subnet_stale {}\n",
            self.count(),
            u8::from(stale)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(index: u32, cidr: &str) -> LinkAddr {
        let net: Ipv4Net = cidr.parse().unwrap();
        LinkAddr {
            index,
            addr: net.addr(),
            prefix_len: net.prefix_len(),
        }
    }

    #[test]
    fn only_overlay_addresses_outside_our_subnet_are_strays() {
        let network = "10.1.0.0/16".parse().unwrap();
        let subnet = "10.1.7.0/24".parse().unwrap();
        let addrs = [
            addr(1, "127.0.0.1/8"),
            addr(2, "198.18.0.1/24"),
            addr(3, "10.1.7.0/32"),  // the TUN
            addr(4, "10.1.15.1/24"), // docker0, still on the old subnet
            addr(5, "10.1.7.1/24"),  // a bridge on the new subnet
            addr(6, "10.2.0.1/24"),  // outside the overlay
        ];
        assert_eq!(
            stray_addresses(&addrs, Some(3), network, subnet),
            vec![addr(4, "10.1.15.1/24")]
        );
        let moved = "10.1.15.0/24".parse().unwrap();
        assert_eq!(
            stray_addresses(&addrs, Some(3), network, moved),
            vec![addr(5, "10.1.7.1/24")]
        );
    }

    #[test]
    fn metrics_text() {
        let changes = SubnetChanges::default();
        changes.record();
        let mut text = String::new();
        changes.render_prometheus(true, &mut text);
        assert!(text
            .contains("# TYPE weft_subnet_changes_total counter\nweft_subnet_changes_total 1\n"));
        assert!(text.contains("# TYPE weft_subnet_stale gauge\nweft_subnet_stale 1\n"));
    }
}
