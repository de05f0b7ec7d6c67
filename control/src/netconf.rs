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
//! [`Netlink`] is also the small query layer [`crate::iface`] uses. A netlink socket lives
//! in the network namespace of the thread that opened it.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// A failed netlink or sysctl operation.
#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] io::Error),
    /// The kernel refused a request.
    #[error("netlink: {what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// No interface has that name.
    #[error("no network interface named {0:?}")]
    NoSuchLink(String),
    /// Writing a sysctl failed.
    #[error("cannot write {path}: {source}")]
    Sysctl {
        /// The /proc/sys path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetconfError {
    let what = what.into();
    move |source| NetconfError::Netlink { what, source }
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MTU (0 when the kernel did not report one).
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
}

/// One IPv4 address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkAddr {
    /// Interface index.
    pub index: u32,
    /// The local address.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// The IPv4 route the kernel would use for a destination (`ip route get`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteToHost {
    /// Output interface index.
    pub oif: u32,
    /// Preferred source address, when the route has one.
    pub pref_src: Option<Ipv4Addr>,
}

/// A route-netlink connection, bound to the network namespace of the thread that opened it.
pub struct Netlink {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    /// Opens a netlink socket and drives it on the current tokio runtime (an error outside
    /// of one).
    pub fn connect() -> Result<Self, NetconfError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| NetconfError::Connect(io::Error::other(e)))?;
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetconfError::Connect)?;
        let connection = runtime.spawn(connection);
        Ok(Netlink { handle, connection })
    }

    /// The rtnetlink handle, for requests this module does not wrap.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// All interfaces, in index order.
    pub async fn links(&self) -> Result<Vec<Link>, NetconfError> {
        let mut links = Vec::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(msg) = stream.try_next().await.map_err(nl_err("list links"))? {
            let mut link = Link {
                index: msg.header.index,
                name: String::new(),
                mtu: 0,
                up: msg.header.flags.contains(LinkFlags::Up),
            };
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::IfName(name) => link.name = name,
                    LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                    _ => {}
                }
            }
            links.push(link);
        }
        links.sort_by_key(|l| l.index);
        Ok(links)
    }

    /// The interface with this name.
    pub async fn link_by_name(&self, name: &str) -> Result<Link, NetconfError> {
        self.links()
            .await?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| NetconfError::NoSuchLink(name.to_string()))
    }

    /// IPv4 addresses in the kernel's order, of one interface or (`None`) all of them.
    pub async fn ipv4_addrs(&self, index: Option<u32>) -> Result<Vec<LinkAddr>, NetconfError> {
        Ok(self
            .ipv4_addr_messages(index)
            .await?
            .iter()
            .filter_map(|msg| {
                Some(LinkAddr {
                    index: msg.header.index,
                    addr: local_ipv4(msg)?,
                    prefix_len: msg.header.prefix_len,
                })
            })
            .collect())
    }

    async fn ipv4_addr_messages(
        &self,
        index: Option<u32>,
    ) -> Result<Vec<AddressMessage>, NetconfError> {
        let mut request = self.handle.address().get();
        if let Some(index) = index {
            request = request.set_link_index_filter(index);
        }
        let mut stream = request.execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(nl_err("list addresses"))? {
            if msg.header.family == AddressFamily::Inet {
                out.push(msg);
            }
        }
        Ok(out)
    }

    /// Output interfaces of the IPv4 default routes of the main table, best (lowest
    /// metric) first. A multipath default route contributes its first hop.
    pub async fn default_route_oifs(&self) -> Result<Vec<u32>, NetconfError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut stream = self.handle.route().get(query).execute();
        let mut found: Vec<(u32, u32)> = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(nl_err("list routes"))? {
            if msg.header.address_family != AddressFamily::Inet
                || msg.header.destination_prefix_length != 0
                || route_table(&msg) != u32::from(RouteHeader::RT_TABLE_MAIN)
                || msg.header.kind != RouteType::Unicast
            {
                continue;
            }
            let mut oif = None;
            let mut metric = 0;
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(p) => metric = *p,
                    RouteAttribute::MultiPath(hops) if oif.is_none() => {
                        oif = hops.first().map(|h| h.interface_index);
                    }
                    _ => {}
                }
            }
            if let Some(oif) = oif.filter(|&i| i > 0) {
                found.push((metric, oif));
            }
        }
        found.sort_by_key(|&(metric, _)| metric);
        Ok(found.into_iter().map(|(_, oif)| oif).collect())
    }

    /// The route the kernel would use to reach `dst` (`ip route get <dst>`).
    pub async fn route_to(&self, dst: Ipv4Addr) -> Result<RouteToHost, NetconfError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        let mut stream = self.handle.route().get(query).execute();
        let what = format!("route get {dst}");
        while let Some(msg) = stream.try_next().await.map_err(nl_err(what.clone()))? {
            let mut oif = None;
            let mut pref_src = None;
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::PrefSource(RouteAddress::Inet(a)) => pref_src = Some(*a),
                    _ => {}
                }
            }
            if let Some(oif) = oif {
                return Ok(RouteToHost { oif, pref_src });
            }
        }
        Err(NetconfError::Netlink {
            what,
            source: rtnetlink::Error::RequestFailed,
        })
    }
}

fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn local_ipv4(msg: &AddressMessage) -> Option<Ipv4Addr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(a)) => return Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => address = Some(*a),
            _ => {}
        }
    }
    address
}

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
        nl.handle
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
        nl.handle
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
        nl.handle
            .address()
            .add(link.index, IpAddr::V4(want), 32)
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!("add {want}/32 to {}", cfg.name)))?;
        changes.address_added = true;
    }

    if !link.up {
        nl.handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(nl_err(format!("set {} up", cfg.name)))?;
    }

    nl.handle
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
    fn connecting_outside_a_runtime_is_an_error() {
        assert!(matches!(Netlink::connect(), Err(NetconfError::Connect(_))));
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
