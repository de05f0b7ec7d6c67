//! The small route-netlink query layer that interface selection (`iface`) and TUN
//! configuration (`netconf`) both stand on: links, IPv4 addresses, default routes
//! and route lookups, and the error type for netlink and sysctl failures. A netlink socket
//! lives in the network namespace of the thread that opened it.

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

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

pub(crate) fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetconfError {
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

    pub(crate) async fn ipv4_addr_messages(
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

pub(crate) fn local_ipv4(msg: &AddressMessage) -> Option<Ipv4Addr> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connecting_outside_a_runtime_is_an_error() {
        assert!(matches!(Netlink::connect(), Err(NetconfError::Connect(_))));
    }
}
