//! TUN device configuration on a real TUN device in a network namespace, compared with what
//! flanneld v0.20.2 set up (fixture host-network.txt).

mod support;

use support::netns::{veth, NetNs};
use weft_control::iface::{find_external, IfaceSelection};
use weft_control::netconf::{configure_tun, TunChanges, TunConfig};
use weft_control::netlink::{NetconfError, Netlink};

fn fixture() -> String {
    support::fixture("host-network.txt")
}

/// The lines of the fixture's output for one command.
fn fixture_section(fixture: &str, command: &str) -> Vec<String> {
    let mut lines = fixture.lines().skip_while(|l| *l != format!("$ {command}"));
    assert!(lines.next().is_some(), "fixture has no `$ {command}`");
    lines
        .take_while(|l| !l.starts_with('$') && !l.starts_with('#'))
        .map(|l| l.trim().to_string())
        .collect()
}

/// Host 1 of the fixture: underlay eth0 198.18.0.1/24 (MTU 1500) to a peer namespace.
fn host() -> (NetNs, NetNs) {
    let host = NetNs::new("h");
    let peer = NetNs::new("p");
    veth(
        &host,
        "eth0",
        "198.18.0.1/24",
        &peer,
        "eth0",
        "198.18.0.2/24",
    );
    host.ip(&["route", "add", "default", "via", "198.18.0.2"]);
    (host, peer)
}

fn configure(ns: &NetNs, cfg: &TunConfig) -> Result<TunChanges, NetconfError> {
    let cfg = cfg.clone();
    ns.block_on(|| async move {
        let nl = Netlink::connect().expect("netlink socket");
        configure_tun(&nl, &cfg).await
    })
}

fn lease_config(ns: &NetNs, subnet: &str) -> TunConfig {
    let ext = ns.block_on(|| async {
        let nl = Netlink::connect().expect("netlink socket");
        find_external(&nl, &IfaceSelection::default()).await
    });
    let ext = ext.expect("external interface");
    TunConfig {
        name: "flannel0".into(),
        subnet: subnet.parse().unwrap(),
        network: "10.1.0.0/16".parse().unwrap(),
        mtu: ext.mtu - 28,
    }
}

fn inet_lines(ns: &NetNs) -> Vec<String> {
    ns.ip(&["addr", "show", "flannel0"])
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("inet"))
        .map(str::to_string)
        .collect()
}

fn routes_via_tun(ns: &NetNs) -> Vec<String> {
    ns.ip(&["route"])
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("flannel0"))
        .map(str::to_string)
        .collect()
}

#[test]
fn matches_flanneld_device_setup() {
    let fixture = fixture();
    let (host, _peer) = host();
    let _tun = host.create_tun("flannel0");

    let cfg = lease_config(&host, "10.1.15.0/24");
    assert_eq!(cfg.mtu, 1472);
    let changes = configure(&host, &cfg).unwrap();
    assert!(changes.address_added && changes.mtu_changed && changes.removed.is_empty());

    // ip -d link show flannel0: flags, MTU and TUN details as flanneld's.
    let link = host.ip(&["-d", "link", "show", "flannel0"]);
    let want_link = fixture_section(&fixture, "ip -d link show flannel0");
    let flags = want_link[0].split_whitespace().nth(1).unwrap();
    assert_eq!(flags, "<POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP>");
    assert!(link.contains(flags), "{link}");
    assert!(link.contains(" mtu 1472 "), "{link}");
    assert!(link.contains("link/none"), "{link}");
    assert!(
        link.contains("tun type tun pi off vnet_hdr off"),
        "fixture: {want_link:?}\ngot: {link}"
    );

    // ip addr show flannel0: the fixture's inet line, and no IPv6 (weft turns it off).
    let want_inet: Vec<_> = fixture_section(&fixture, "ip addr show flannel0")
        .into_iter()
        .filter(|l| l.starts_with("inet "))
        .collect();
    assert_eq!(want_inet, vec!["inet 10.1.15.0/32 scope global flannel0"]);
    assert_eq!(inet_lines(&host), want_inet);
    let disabled = host.exec_ok("cat", &["/proc/sys/net/ipv6/conf/flannel0/disable_ipv6"]);
    assert_eq!(disabled.trim(), "1");

    // ip route: the fixture's route through the TUN, exactly.
    let want_route: Vec<_> = fixture_section(&fixture, "ip route")
        .into_iter()
        .filter(|l| l.contains("flannel0"))
        .collect();
    assert_eq!(want_route, vec!["10.1.0.0/16 dev flannel0"]);
    assert_eq!(routes_via_tun(&host), want_route);
    // The underlay route is as in the fixture too.
    let underlay = host.ip(&["route"]);
    assert!(
        underlay.contains("198.18.0.0/24 dev eth0 proto kernel scope link src 198.18.0.1"),
        "{underlay}"
    );
}

#[test]
fn configuring_twice_changes_nothing() {
    let (host, _peer) = host();
    let _tun = host.create_tun("flannel0");
    let cfg = lease_config(&host, "10.1.15.0/24");
    configure(&host, &cfg).unwrap();
    let before = (
        host.ip(&["-d", "link", "show", "flannel0"]),
        host.ip(&["addr"]),
        host.ip(&["route"]),
    );

    let changes = configure(&host, &cfg).unwrap();
    assert_eq!(changes, TunChanges::default());
    let after = (
        host.ip(&["-d", "link", "show", "flannel0"]),
        host.ip(&["addr"]),
        host.ip(&["route"]),
    );
    assert_eq!(before, after);
}

#[test]
fn a_new_lease_replaces_the_old_address() {
    let (host, _peer) = host();
    let _tun = host.create_tun("flannel0");
    configure(&host, &lease_config(&host, "10.1.15.0/24")).unwrap();
    // Something else left on the device goes too.
    host.ip(&["addr", "add", "10.1.99.7/24", "dev", "flannel0"]);

    let changes = configure(&host, &lease_config(&host, "10.1.81.0/24")).unwrap();
    assert!(changes.address_added);
    let mut removed: Vec<String> = changes
        .removed
        .iter()
        .map(|a| format!("{}/{}", a.addr, a.prefix_len))
        .collect();
    removed.sort();
    assert_eq!(removed, vec!["10.1.15.0/32", "10.1.99.7/24"]);
    assert_eq!(
        inet_lines(&host),
        vec!["inet 10.1.81.0/32 scope global flannel0"]
    );
    assert_eq!(routes_via_tun(&host), vec!["10.1.0.0/16 dev flannel0"]);
}

#[test]
fn an_existing_route_to_the_network_is_replaced() {
    let (host, _peer) = host();
    host.ip(&["route", "add", "10.1.0.0/16", "via", "198.18.0.2"]);
    let _tun = host.create_tun("flannel0");
    configure(&host, &lease_config(&host, "10.1.15.0/24")).unwrap();
    let routes: Vec<String> = host
        .ip(&["route"])
        .lines()
        .filter(|l| l.starts_with("10.1.0.0/16"))
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(routes, vec!["10.1.0.0/16 dev flannel0"]);
}

#[test]
fn a_missing_device_is_a_clear_error() {
    let (host, _peer) = host();
    let err = configure(&host, &lease_config(&host, "10.1.15.0/24")).unwrap_err();
    assert!(
        matches!(err, NetconfError::NoSuchLink(ref n) if n == "flannel0"),
        "{err}"
    );
    assert!(err.to_string().contains("flannel0"));
}

#[test]
fn mtu_follows_the_underlay() {
    let (host, _peer) = host();
    host.ip(&["link", "set", "eth0", "mtu", "9000"]);
    let _tun = host.create_tun("flannel0");
    let cfg = lease_config(&host, "10.1.15.0/24");
    assert_eq!(cfg.mtu, 8972);
    configure(&host, &cfg).unwrap();
    assert!(host
        .ip(&["link", "show", "flannel0"])
        .contains(" mtu 8972 "));
}
