//! External interface detection against real links, addresses and routes in network
//! namespaces the tests create.

mod support;

use std::net::Ipv4Addr;

use support::netns::{veth, NetNs};
use weft_control::flags::Flags;
use weft_control::iface::{find_external, ExternalInterface, IfaceError, IfaceSelection};
use weft_control::netlink::Netlink;

/// A host namespace with two underlays to two peer namespaces:
/// eth0 198.18.0.1/24 (MTU 1500, default route via 198.18.0.2) and
/// ext1 198.18.1.1/24 (MTU 9000), plus bare0 with no IPv4 address.
struct Topology {
    host: NetNs,
    _peer: NetNs,
    _peer2: NetNs,
}

fn topology() -> Topology {
    let host = NetNs::new("h");
    let peer = NetNs::new("p");
    let peer2 = NetNs::new("q");
    veth(
        &host,
        "eth0",
        "198.18.0.1/24",
        &peer,
        "eth0",
        "198.18.0.2/24",
    );
    veth(
        &host,
        "ext1",
        "198.18.1.1/24",
        &peer2,
        "eth0",
        "198.18.1.2/24",
    );
    host.ip(&["link", "set", "ext1", "mtu", "9000"]);
    peer2.ip(&["link", "set", "eth0", "mtu", "9000"]);
    host.ip(&["route", "add", "default", "via", "198.18.0.2"]);
    host.ip(&[
        "link", "add", "bare0", "type", "veth", "peer", "name", "bare1",
    ]);
    Topology {
        host,
        _peer: peer,
        _peer2: peer2,
    }
}

fn find(ns: &NetNs, sel: IfaceSelection) -> Result<ExternalInterface, IfaceError> {
    ns.block_on(|| async move {
        let nl = Netlink::connect().expect("netlink socket");
        find_external(&nl, &sel).await
    })
}

fn from_cmdline(args: &[&str]) -> IfaceSelection {
    let argv = std::iter::once("flanneld").chain(args.iter().copied());
    IfaceSelection::from_flags(&Flags::try_parse(argv, |_| None).expect("flags"))
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn default_route_interface() {
    let t = topology();
    let e = find(&t.host, from_cmdline(&[])).unwrap();
    assert_eq!(e.name, "eth0");
    assert_eq!(e.addr, ip("198.18.0.1"));
    assert_eq!(e.public_ip, ip("198.18.0.1"));
    assert_eq!(e.mtu, 1500);
    let index: u32 = t
        .host
        .exec_ok("cat", &["/sys/class/net/eth0/ifindex"])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(e.index, index);
}

#[test]
fn by_name_by_ip_and_in_order() {
    let t = topology();
    let e = find(&t.host, from_cmdline(&["--iface=ext1"])).unwrap();
    assert_eq!(
        (e.name.as_str(), e.addr, e.mtu),
        ("ext1", ip("198.18.1.1"), 9000)
    );

    let e = find(&t.host, from_cmdline(&["-iface", "198.18.1.1"])).unwrap();
    assert_eq!((e.name.as_str(), e.addr), ("ext1", ip("198.18.1.1")));

    let e = find(
        &t.host,
        from_cmdline(&[
            "--iface=nosuch0",
            "--iface=bare0",
            "--iface=eth0",
            "--iface=ext1",
        ]),
    )
    .unwrap();
    assert_eq!(e.name, "eth0");
}

#[test]
fn by_regex_on_addresses_then_names() {
    let t = topology();
    let e = find(&t.host, from_cmdline(&["--iface-regex=^198\\.18\\.1\\."])).unwrap();
    assert_eq!((e.name.as_str(), e.addr), ("ext1", ip("198.18.1.1")));

    let e = find(&t.host, from_cmdline(&["--iface-regex=^ext"])).unwrap();
    assert_eq!(
        (e.name.as_str(), e.addr, e.mtu),
        ("ext1", ip("198.18.1.1"), 9000)
    );

    let e = find(
        &t.host,
        from_cmdline(&["--iface-regex=^wlan", "--iface-regex=^eth"]),
    )
    .unwrap();
    assert_eq!(e.name, "eth0");
}

#[test]
fn by_route_to_a_reachable_address() {
    let t = topology();
    let e = find(&t.host, from_cmdline(&["--iface-can-reach=198.18.1.2"])).unwrap();
    assert_eq!((e.name.as_str(), e.addr), ("ext1", ip("198.18.1.1")));
    // Beyond the default gateway.
    let e = find(&t.host, from_cmdline(&["--iface-can-reach=198.19.7.7"])).unwrap();
    assert_eq!((e.name.as_str(), e.addr), ("eth0", ip("198.18.0.1")));
}

#[test]
fn public_ip() {
    let t = topology();
    let e = find(&t.host, from_cmdline(&["--public-ip=198.19.0.1"])).unwrap();
    assert_eq!((e.name.as_str(), e.addr), ("eth0", ip("198.18.0.1")));
    assert_eq!(e.public_ip, ip("198.19.0.1"));
    // A public IP this host holds selects its interface.
    let e = find(&t.host, from_cmdline(&["--public-ip=198.18.1.1"])).unwrap();
    assert_eq!((e.name.as_str(), e.public_ip), ("ext1", ip("198.18.1.1")));
}

#[test]
fn clear_errors() {
    let t = topology();
    let err = find(
        &t.host,
        from_cmdline(&["--iface=nosuch0", "--iface-regex=^wlan"]),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, IfaceError::NoMatch(_)), "{msg}");
    assert!(msg.contains("nosuch0"), "{msg}");
    assert!(msg.contains("^wlan"), "{msg}");
    assert!(
        msg.contains("eth0:[198.18.0.1]"),
        "lists what exists: {msg}"
    );

    let err = find(&t.host, from_cmdline(&["--iface=bare0"])).unwrap_err();
    assert!(
        err.to_string().contains("bare0 has no IPv4 address"),
        "{err}"
    );

    // A namespace with only loopback has no default route.
    let empty = NetNs::new("e");
    let err = find(&empty, from_cmdline(&[])).unwrap_err();
    assert!(matches!(err, IfaceError::NoDefaultRoute), "{err}");
    assert!(err.to_string().contains("default route"), "{err}");

    // A default route through an interface without IPv4 address.
    t.host.ip(&["link", "set", "bare0", "up"]);
    t.host.ip(&["link", "set", "bare1", "up"]);
    t.host.ip(&["route", "replace", "default", "dev", "bare0"]);
    let err = find(&t.host, from_cmdline(&[])).unwrap_err();
    assert!(
        matches!(err, IfaceError::NoIpv4(ref n) if n == "bare0"),
        "{err}"
    );
}
