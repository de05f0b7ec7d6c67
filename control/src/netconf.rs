//! Host network configuration through rtnetlink: the TUN device's address, MTU, state and
//! the overlay route, exactly as flanneld's udp backend leaves them.
//!
//! After [`configure_tun`] the device looks like flanneld's (see the fixture
//! `host-network.txt`): `inet 10.1.15.0/32 scope global flannel0`, `mtu 1472` over a 1500
//! underlay, `UP`, and the route `10.1.0.0/16 dev flannel0`. Unlike flanneld it also turns
//! IPv6 off on the device, so the kernel does not send router solicitations and MLD reports
//! into the overlay. Configuring is idempotent, and re-configuring for a new lease replaces
//! the old address.
//!
//! The netlink connection and its queries live below, in [`crate::netlink`].

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use crate::netlink::{local_ipv4, nl_err, LinkAddr, NetconfError, Netlink};

/// What the TUN device should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    /// Device name (`flannel0`).
    pub name: String,
    /// This host's lease subnet; the device gets its network address as a /32.
    pub subnet: Ipv4Net,
    /// The whole overlay network, routed through the device.
    pub network: Ipv4Net,
    /// Device MTU: the external interface's MTU minus 28.
    pub mtu: u32,
}

/// What [`configure_tun`] changed, for logging.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunChanges {
    /// Addresses removed (earlier leases or anything else that was on the device).
    pub removed: Vec<LinkAddr>,
    /// Whether the lease address had to be added.
    pub address_added: bool,
    /// Whether the MTU had to be changed.
    pub mtu_changed: bool,
}

/// Brings the TUN device named in `cfg` into flanneld's configuration: IPv6 off, the lease
/// network address as its only IPv4 address (/32), the MTU, link up, and the overlay
/// network routed through it (replacing any route to that network in the main table).
pub async fn configure_tun(nl: &Netlink, cfg: &TunConfig) -> Result<TunChanges, NetconfError> {
    let link = nl.link_by_name(&cfg.name).await?;
    let mut changes = TunChanges::default();

    // Before the link goes up, so that no IPv6 traffic is ever emitted.
    disable_ipv6(&cfg.name)?;

    if link.mtu != cfg.mtu {
        nl.handle()
            .link()
            .set(LinkUnspec::new_with_index(link.index).mtu(cfg.mtu).build())
            .execute()
            .await
            .map_err(nl_err(format!("set mtu {} on {}", cfg.mtu, cfg.name)))?;
        changes.mtu_changed = true;
    }

    let want = cfg.subnet.network();
    let mut have_wanted = false;
    for msg in nl.ipv4_addr_messages(Some(link.index)).await? {
        let Some(addr) = local_ipv4(&msg) else {
            continue;
        };
        if addr == want && msg.header.prefix_len == 32 {
            have_wanted = true;
            continue;
        }
        let removed = LinkAddr {
            index: link.index,
            addr,
            prefix_len: msg.header.prefix_len,
        };
        nl.handle()
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(nl_err(format!(
                "delete {addr}/{} from {}",
                removed.prefix_len, cfg.name
            )))?;
        changes.removed.push(removed);
    }
    if !have_wanted {
        nl.handle()
            .address()
            .add(link.index, IpAddr::V4(want), 32)
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!("add {want}/32 to {}", cfg.name)))?;
        changes.address_added = true;
    }

    if !link.up {
        nl.handle()
            .link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(nl_err(format!("set {} up", cfg.name)))?;
    }

    nl.handle()
        .route()
        .add(overlay_route(cfg.network, link.index))
        .replace()
        .execute()
        .await
        .map_err(nl_err(format!("route {} dev {}", cfg.network, cfg.name)))?;
    Ok(changes)
}

/// `<network> dev <tun>` in the main table, as flanneld (and `ip route add`) writes it:
/// protocol boot, scope universe.
fn overlay_route(network: Ipv4Net, oif: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network.network(), network.prefix_len())
        .output_interface(oif)
        .protocol(RouteProtocol::Boot)
        .scope(RouteScope::Universe)
        .kind(RouteType::Unicast)
        .build()
}

/// Turns IPv6 off on a device (`net.ipv6.conf.<dev>.disable_ipv6 = 1`), in the network
/// namespace of the calling thread. A kernel without IPv6 has nothing to turn off.
pub fn disable_ipv6(dev: &str) -> Result<(), NetconfError> {
    if dev.is_empty() || dev.contains('/') || dev == "." || dev == ".." {
        return Err(NetconfError::NoSuchLink(dev.to_string()));
    }
    let path = format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6");
    match std::fs::write(&path, b"1\n") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !ipv6_present() => Ok(()),
        Err(source) => Err(NetconfError::Sysctl { path, source }),
    }
}

fn ipv6_present() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};

    #[test]
    fn overlay_route_is_a_plain_boot_route() {
        let r = overlay_route("10.1.0.0/16".parse().unwrap(), 7);
        assert_eq!(r.header.destination_prefix_length, 16);
        assert_eq!(r.header.table, RouteHeader::RT_TABLE_MAIN);
        assert_eq!(r.header.protocol, RouteProtocol::Boot);
        assert_eq!(r.header.scope, RouteScope::Universe);
        assert!(r
            .attributes
            .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::new(10, 1, 0, 0)
            ))));
        assert!(r.attributes.contains(&RouteAttribute::Oif(7)));
    }

    #[test]
    fn sysctl_path_cannot_escape() {
        for bad in ["", "..", ".", "a/b"] {
            assert!(
                matches!(disable_ipv6(bad), Err(NetconfError::NoSuchLink(_))),
                "{bad:?}"
            );
        }
    }
}
