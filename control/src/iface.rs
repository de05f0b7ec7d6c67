//! Finding the external interface: the one whose IPv4 address the UDP socket binds and
//! whose MTU sizes the TUN device.
//!
//! The order is flanneld's: each `--iface` in turn (a name, or an IPv4 address some
//! interface holds), then each `--iface-regex` (matched first against every interface's
//! IPv4 addresses, then against interface names), then `--iface-can-reach` (the interface of
//! the route to that address). If none of those flags is given, the interface holding
//! `--public-ip` is used when there is one, else the interface of the IPv4 default route.
//!
//! The choice is a pure function ([`select`]) over a [`Snapshot`] of links, addresses and
//! routes; [`find_external`] takes the snapshot through netlink.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use crate::netlink::{Link, LinkAddr, NetconfError, Netlink, RouteToHost};

/// The interface weftd sends and receives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Its IPv4 address; the UDP socket binds it.
    pub addr: Ipv4Addr,
    /// The address other hosts send to: `--public-ip`, else `addr`. Goes into the lease.
    pub public_ip: Ipv4Addr,
    /// Its MTU.
    pub mtu: u32,
}

/// The flags that choose the external interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IfaceSelection {
    /// `--iface`: names or IPv4 addresses, tried in order.
    pub ifaces: Vec<String>,
    /// `--iface-regex`: tried in order after `ifaces`.
    pub regexes: Vec<String>,
    /// `--iface-can-reach`.
    pub can_reach: Option<Ipv4Addr>,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
}

impl IfaceSelection {
    /// The selection flags from the command line.
    pub fn from_flags(flags: &crate::flags::Flags) -> Self {
        IfaceSelection {
            ifaces: flags.iface.clone(),
            regexes: flags.iface_regex.clone(),
            can_reach: flags.iface_can_reach,
            public_ip: flags.public_ip,
        }
    }

    fn explicit(&self) -> bool {
        !self.ifaces.is_empty() || !self.regexes.is_empty() || self.can_reach.is_some()
    }
}

/// Why no external interface could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// Talking to the kernel failed.
    #[error(transparent)]
    Netconf(#[from] NetconfError),
    /// Nothing given by `--iface`, `--iface-regex` or `--iface-can-reach` matched.
    #[error("no interface matches the interfaces and/or regexes provided: {}", Tried(.0))]
    NoMatch(Vec<String>),
    /// No flag chose an interface and there is no IPv4 default route.
    #[error("no IPv4 default route to find the external interface by; use --iface")]
    NoDefaultRoute,
    /// The chosen interface has no usable IPv4 address.
    #[error("interface {0} has no IPv4 address")]
    NoIpv4(String),
    /// The chosen interface reports no MTU.
    #[error("cannot determine the MTU of interface {0}")]
    NoMtu(String),
}

struct Tried<'a>(&'a [String]);

impl fmt::Display for Tried<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

/// The kernel state interface selection looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// All links, in index order.
    pub links: Vec<Link>,
    /// All IPv4 addresses, in the kernel's order.
    pub addrs: Vec<LinkAddr>,
    /// Output interfaces of IPv4 default routes, best first.
    pub default_oifs: Vec<u32>,
    /// The route to `--iface-can-reach`, when given and found.
    pub can_reach: Option<RouteToHost>,
}

impl Snapshot {
    fn link(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    /// The addresses flannel considers: global unicast first, then link-local; loopback,
    /// multicast, broadcast and unspecified addresses never count.
    fn usable_addrs(&self, index: u32) -> Vec<Ipv4Addr> {
        let on_link = || {
            self.addrs
                .iter()
                .filter(move |a| a.index == index)
                .map(|a| a.addr)
        };
        let global = on_link().filter(|a| {
            !a.is_loopback()
                && !a.is_multicast()
                && !a.is_broadcast()
                && !a.is_unspecified()
                && !a.is_link_local()
        });
        global
            .chain(on_link().filter(|a| a.is_link_local()))
            .collect()
    }
}

/// Picks the external interface from a snapshot. Pure.
pub fn select(sel: &IfaceSelection, snap: &Snapshot) -> Result<ExternalInterface, IfaceError> {
    let (link, addr) = if sel.explicit() {
        select_explicit(sel, snap)?
    } else {
        let owner = sel.public_ip.and_then(|ip| owner_of(snap, ip));
        match owner {
            Some(link) => (link, sel.public_ip),
            None => {
                let link = snap
                    .default_oifs
                    .iter()
                    .find_map(|&i| snap.link(i))
                    .ok_or(IfaceError::NoDefaultRoute)?;
                (link, None)
            }
        }
    };
    finish(sel, snap, link, addr)
}

fn finish(
    sel: &IfaceSelection,
    snap: &Snapshot,
    link: &Link,
    addr: Option<Ipv4Addr>,
) -> Result<ExternalInterface, IfaceError> {
    let addr = match addr {
        Some(a) => a,
        None => *snap
            .usable_addrs(link.index)
            .first()
            .ok_or_else(|| IfaceError::NoIpv4(link.name.clone()))?,
    };
    if link.mtu == 0 {
        return Err(IfaceError::NoMtu(link.name.clone()));
    }
    Ok(ExternalInterface {
        name: link.name.clone(),
        index: link.index,
        addr,
        public_ip: sel.public_ip.unwrap_or(addr),
        mtu: link.mtu,
    })
}

fn owner_of(snap: &Snapshot, ip: Ipv4Addr) -> Option<&Link> {
    let index = snap.addrs.iter().find(|a| a.addr == ip)?.index;
    snap.link(index)
}

fn select_explicit<'s>(
    sel: &IfaceSelection,
    snap: &'s Snapshot,
) -> Result<(&'s Link, Option<Ipv4Addr>), IfaceError> {
    let mut tried = Vec::new();
    for entry in &sel.ifaces {
        let found = match entry.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => owner_of(snap, ip).map(|l| (l, Some(ip))),
            Ok(IpAddr::V6(_)) => {
                tried.push(format!("--iface {entry}: weft's overlay is IPv4 only"));
                continue;
            }
            Err(_) => snap
                .links
                .iter()
                .find(|l| l.name == *entry)
                .map(|l| (l, None)),
        };
        match found {
            Some((link, addr)) if addr.is_some() || !snap.usable_addrs(link.index).is_empty() => {
                return Ok((link, addr));
            }
            Some((link, _)) => tried.push(format!(
                "--iface {entry}: {} has no IPv4 address",
                link.name
            )),
            None => tried.push(format!("--iface {entry}: no such interface or address")),
        }
    }
    for pattern in &sel.regexes {
        let re = match regex_lite::Regex::new(pattern) {
            Ok(re) => re,
            Err(e) => {
                tried.push(format!("--iface-regex {pattern}: {e}"));
                continue;
            }
        };
        let by_addr = snap.links.iter().find_map(|l| {
            snap.usable_addrs(l.index)
                .into_iter()
                .find(|a| re.is_match(&a.to_string()))
                .map(|a| (l, Some(a)))
        });
        let by_name = || {
            snap.links
                .iter()
                .find(|l| re.is_match(&l.name))
                .map(|l| (l, None))
        };
        match by_addr.or_else(by_name) {
            Some((link, addr)) if addr.is_some() || !snap.usable_addrs(link.index).is_empty() => {
                return Ok((link, addr));
            }
            Some((link, _)) => tried.push(format!(
                "--iface-regex {pattern}: {} has no IPv4 address",
                link.name
            )),
            None => tried.push(format!(
                "--iface-regex {pattern}: matches no interface ({})",
                describe_links(snap)
            )),
        }
    }
    if let Some(dst) = sel.can_reach {
        match snap
            .can_reach
            .and_then(|r| snap.link(r.oif).map(|l| (l, r.pref_src)))
        {
            Some((link, src)) => return Ok((link, src)),
            None => tried.push(format!("--iface-can-reach {dst}: no route")),
        }
    }
    Err(IfaceError::NoMatch(tried))
}

fn describe_links(snap: &Snapshot) -> String {
    snap.links
        .iter()
        .map(|l| {
            let addrs: Vec<String> = snap
                .usable_addrs(l.index)
                .iter()
                .map(|a| a.to_string())
                .collect();
            format!("{}:[{}]", l.name, addrs.join(" "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Takes a snapshot of the calling thread's network namespace and picks the external
/// interface from it.
pub async fn find_external(
    nl: &Netlink,
    sel: &IfaceSelection,
) -> Result<ExternalInterface, IfaceError> {
    let mut snap = Snapshot {
        links: nl.links().await?,
        addrs: nl.ipv4_addrs(None).await?,
        ..Snapshot::default()
    };
    if !sel.explicit() {
        snap.default_oifs = nl.default_route_oifs().await?;
    }
    if let Some(dst) = sel.can_reach {
        // No route is a selection failure reported by `select`, not an I/O error.
        snap.can_reach = nl.route_to(dst).await.ok();
    }
    let ext = select(sel, &snap)?;
    tracing::info!(
        "using interface {} (index {}) with address {}, public IP {}, MTU {}",
        ext.name,
        ext.index,
        ext.addr,
        ext.public_ip,
        ext.mtu
    );
    Ok(ext)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, mtu: u32) -> Link {
        Link {
            index,
            name: name.to_string(),
            mtu,
            up: true,
        }
    }

    fn addr(index: u32, a: &str) -> LinkAddr {
        LinkAddr {
            index,
            addr: a.parse().unwrap(),
            prefix_len: 24,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            links: vec![
                link(1, "lo", 65536),
                link(2, "eth0", 1500),
                link(3, "ens5", 9001),
                link(4, "bare0", 1500),
                link(5, "ll0", 1400),
            ],
            addrs: vec![
                addr(1, "127.0.0.1"),
                addr(2, "198.18.0.1"),
                addr(3, "169.254.3.3"),
                addr(3, "198.18.1.1"),
                addr(5, "169.254.5.5"),
            ],
            default_oifs: vec![2],
            can_reach: None,
        }
    }

    fn sel() -> IfaceSelection {
        IfaceSelection::default()
    }

    #[test]
    fn default_route_interface() {
        let e = select(&sel(), &snapshot()).unwrap();
        assert_eq!(
            e,
            ExternalInterface {
                name: "eth0".into(),
                index: 2,
                addr: "198.18.0.1".parse().unwrap(),
                public_ip: "198.18.0.1".parse().unwrap(),
                mtu: 1500,
            }
        );
    }

    #[test]
    fn public_ip_flag_sets_public_ip_only() {
        let s = IfaceSelection {
            public_ip: Some("203.0.113.9".parse().unwrap()),
            ..sel()
        };
        let e = select(&s, &snapshot()).unwrap();
        assert_eq!(e.name, "eth0");
        assert_eq!(e.addr, "198.18.0.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(e.public_ip, "203.0.113.9".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn a_local_public_ip_picks_its_interface() {
        let s = IfaceSelection {
            public_ip: Some("198.18.1.1".parse().unwrap()),
            ..sel()
        };
        let e = select(&s, &snapshot()).unwrap();
        assert_eq!(
            (e.name.as_str(), e.addr.to_string().as_str()),
            ("ens5", "198.18.1.1")
        );
    }

    #[test]
    fn no_default_route() {
        let mut snap = snapshot();
        snap.default_oifs.clear();
        assert!(matches!(
            select(&sel(), &snap),
            Err(IfaceError::NoDefaultRoute)
        ));
    }

    #[test]
    fn iface_by_name_prefers_global_addresses() {
        let s = IfaceSelection {
            ifaces: vec!["ens5".into()],
            ..sel()
        };
        let e = select(&s, &snapshot()).unwrap();
        assert_eq!(
            (e.addr.to_string(), e.mtu),
            ("198.18.1.1".to_string(), 9001)
        );
    }

    #[test]
    fn link_local_only_interface_uses_link_local() {
        let s = IfaceSelection {
            ifaces: vec!["ll0".into()],
            ..sel()
        };
        assert_eq!(
            select(&s, &snapshot()).unwrap().addr.to_string(),
            "169.254.5.5"
        );
    }

    #[test]
    fn iface_by_ip_uses_that_ip() {
        let s = IfaceSelection {
            ifaces: vec!["169.254.3.3".into()],
            ..sel()
        };
        let e = select(&s, &snapshot()).unwrap();
        assert_eq!(
            (e.name.as_str(), e.addr.to_string().as_str()),
            ("ens5", "169.254.3.3")
        );
    }

    #[test]
    fn ifaces_are_tried_in_order() {
        let s = IfaceSelection {
            ifaces: vec![
                "nope0".into(),
                "bare0".into(),
                "10.9.9.9".into(),
                "eth0".into(),
                "ens5".into(),
            ],
            ..sel()
        };
        assert_eq!(select(&s, &snapshot()).unwrap().name, "eth0");
    }

    #[test]
    fn explicit_flags_never_fall_back_to_the_default_route() {
        let s = IfaceSelection {
            ifaces: vec!["nope0".into(), "bare0".into(), "lo".into()],
            regexes: vec!["^wlan".into()],
            ..sel()
        };
        let err = select(&s, &snapshot()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, IfaceError::NoMatch(ref t) if t.len() == 4),
            "{msg}"
        );
        assert!(msg.contains("nope0: no such interface"), "{msg}");
        assert!(msg.contains("bare0 has no IPv4 address"), "{msg}");
        assert!(msg.contains("lo has no IPv4 address"), "{msg}");
        assert!(msg.contains("^wlan: matches no interface"), "{msg}");
    }

    #[test]
    fn regex_matches_addresses_before_names() {
        // Every interface's addresses are tried before any name.
        let s = IfaceSelection {
            regexes: vec!["^198\\.18\\.1\\.".into()],
            ..sel()
        };
        assert_eq!(select(&s, &snapshot()).unwrap().name, "ens5");
        let s = IfaceSelection {
            regexes: vec!["ens|198\\.18\\.0\\.".into()],
            ..sel()
        };
        assert_eq!(
            select(&s, &snapshot()).unwrap().name,
            "eth0",
            "address match wins"
        );
        let s = IfaceSelection {
            regexes: vec!["^ens".into()],
            ..sel()
        };
        let e = select(&s, &snapshot()).unwrap();
        assert_eq!(
            (e.name.as_str(), e.addr.to_string().as_str()),
            ("ens5", "198.18.1.1")
        );
    }

    #[test]
    fn regexes_come_after_ifaces() {
        let s = IfaceSelection {
            ifaces: vec!["ens5".into()],
            regexes: vec!["^eth".into()],
            ..sel()
        };
        assert_eq!(select(&s, &snapshot()).unwrap().name, "ens5");
        let s = IfaceSelection {
            ifaces: vec!["nope".into()],
            regexes: vec!["^eth".into()],
            ..sel()
        };
        assert_eq!(select(&s, &snapshot()).unwrap().name, "eth0");
    }

    #[test]
    fn can_reach_uses_the_route_and_its_source() {
        let mut snap = snapshot();
        snap.can_reach = Some(RouteToHost {
            oif: 3,
            pref_src: Some("198.18.1.1".parse().unwrap()),
        });
        let s = IfaceSelection {
            can_reach: Some("198.18.1.254".parse().unwrap()),
            ..sel()
        };
        let e = select(&s, &snap).unwrap();
        assert_eq!(
            (e.name.as_str(), e.addr.to_string().as_str()),
            ("ens5", "198.18.1.1")
        );
        snap.can_reach = None;
        assert!(matches!(select(&s, &snap), Err(IfaceError::NoMatch(_))));
    }

    #[test]
    fn zero_mtu_is_an_error() {
        let mut snap = snapshot();
        snap.links[1].mtu = 0;
        assert!(matches!(select(&sel(), &snap), Err(IfaceError::NoMtu(_))));
    }
}
