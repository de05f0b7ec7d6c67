//! Multicast and broadcast through the engine's TAP: h1 runs the engine with its TAP in the
//! container bridge (as weftd's control side sets it up), c1 and a second container c1b sit
//! on that bridge, and h2 and h3 play peers with plain UDP sockets on the overlay port.

mod support;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use support::{bridge, eventually, in_netns, ip, link_exists, open_fds, udp_socket_in, Lab, PORT};
use weft_engine::multicast::MulticastDrop;
use weft_engine::{DropReason, GroupTable, Groups, IoBackend, MulticastConfig, PeerMulticast};

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
const OTHER_GROUP: Ipv4Addr = Ipv4Addr::new(239, 2, 2, 2);
const MDNS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
const APP_PORT: u16 = 5000;
const TAP: &str = "weftmc0";

/// One test at a time: one of them counts this process's descriptors (under `cargo test`,
/// tests share the process).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Put the engine's TAP into h1's container bridge as control does: a permanent multicast
/// router port, up.
fn enslave_tap(lab: &Lab) {
    enslave_tap_in(&lab.h1.ns);
}

/// Put the engine's TAP into the container bridge of the host namespace `ns`.
fn enslave_tap_in(ns: &str) {
    ip(ns, &["link", "set", TAP, "master", "cbr0"]);
    bridge(ns, &["link", "set", "dev", TAP, "mcast_router", "2"]);
    ip(ns, &["link", "set", TAP, "up"]);
}

/// A peer's socket on its overlay address, to see what the engine sends it.
fn peer_socket(ns: &str, public: Ipv4Addr) -> UdpSocket {
    let socket = udp_socket_in(ns, SocketAddrV4::new(public, PORT));
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    socket
}

/// Every datagram `socket` receives within `window`.
fn drain(socket: &UdpSocket, window: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            got.push(buf[..n].to_vec());
        }
    }
    got
}

/// How many of `datagrams` are IPv4 packets to `dst` carrying `marker`.
fn carrying(datagrams: &[Vec<u8>], dst: Ipv4Addr, marker: &[u8]) -> usize {
    datagrams
        .iter()
        .filter(|d| d.len() >= 28 && d[16..20] == dst.octets() && d.ends_with(marker))
        .count()
}

/// A UDP socket in a container, sending with TTL 1 (Linux's default for multicast).
fn container_sender(ns: &str) -> UdpSocket {
    in_netns(ns, || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_multicast_ttl_v4(1).unwrap();
        socket.set_broadcast(true).unwrap();
        socket
    })
}

/// A socket in a container that joined `group` on port [`APP_PORT`].
fn member(ns: &str, group: Ipv4Addr) -> UdpSocket {
    in_netns(ns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP_PORT)).unwrap();
        socket
            .join_multicast_v4(&group, &Ipv4Addr::UNSPECIFIED)
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        socket
    })
}

/// An inner IPv4/UDP packet with TTL 1, as a peer's container sends it.
fn inner_packet(src: Ipv4Addr, dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), 1).udp(40000, port);
    let mut packet = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut packet, payload).unwrap();
    packet
}

fn groups_for(lab: &Lab, h2_groups: Vec<Ipv4Addr>) -> GroupTable {
    GroupTable::new([
        PeerMulticast {
            addr: SocketAddrV4::new(lab.h2.public, PORT),
            multicast: true,
            broadcast: true,
            groups: h2_groups,
        },
        // h3 holds a lease but advertised nothing (a flanneld, or a weft without the feature).
        PeerMulticast {
            addr: SocketAddrV4::new(lab.h3_public, PORT),
            multicast: false,
            broadcast: false,
            groups: vec![GROUP],
        },
    ])
}

#[test]
fn uring_carries_multicast_once_per_member_and_never_loops() {
    multicast_crosses_hosts(IoBackend::Uring);
}

#[test]
fn syscalls_carries_multicast_once_per_member_and_never_loops() {
    multicast_crosses_hosts(IoBackend::Syscalls);
}

fn multicast_crosses_hosts(backend: IoBackend) {
    let _serial = serial();
    let mut lab = Lab::new();
    let c1b = lab.add_container(&lab.h1.clone(), "c1b", Ipv4Addr::new(10, 1, 1, 3), 1500);
    let groups = Groups::new(groups_for(&lab, vec![GROUP]));
    let config = MulticastConfig {
        tap_name: TAP.into(),
        multicast: true,
        broadcast: true,
        rate_limit: 1000,
    };
    let h1 = lab.start_engine_multicast(&lab.h1, backend, Some(config), groups.clone());
    let h2_socket = peer_socket(&lab.h2.ns, lab.h2.public);
    let h3_socket = peer_socket(&lab.h3_ns, lab.h3_public);
    let local = h1.engine.local_groups();
    assert_eq!(local.snapshot().1, Vec::<Ipv4Addr>::new());

    // A container that joined before the TAP was in the bridge (its own reports long gone)
    // is learned from the relay's query once it is; a later join shows up too.
    let joined = member(&lab.h1.container_ns, GROUP);
    std::thread::sleep(Duration::from_secs(3));
    enslave_tap(&lab);
    assert!(
        eventually(Duration::from_secs(5), || local.snapshot().1 == [GROUP]),
        "the join was not seen: {:?}",
        local.snapshot()
    );
    let other = member(&c1b, OTHER_GROUP);
    assert!(eventually(Duration::from_secs(5), || local.snapshot().1
        == [GROUP, OTHER_GROUP]));
    let (version, _) = local.snapshot();
    drop(other);
    assert!(
        eventually(Duration::from_secs(5), || local.snapshot().1 == [GROUP]),
        "the leave was not seen: {:?}",
        local.snapshot()
    );
    assert!(local.snapshot().0 > version);
    // When one of two members leaves, the group goes at once, and the query that follows the
    // leave brings the other member's report back.
    let second = member(&c1b, GROUP);
    std::thread::sleep(Duration::from_millis(300));
    let (version, _) = local.snapshot();
    drop(second);
    assert!(
        eventually(Duration::from_secs(5), || {
            let (now, groups) = local.snapshot();
            now >= version + 2 && groups == [GROUP]
        }),
        "the remaining member was not learned again: {:?} (before the leave: version {version})",
        local.snapshot()
    );

    // From a container: once to the member peer, never to the one without the capability.
    let sender = container_sender(&c1b);
    sender
        .send_to(b"to-group", SocketAddrV4::new(GROUP, APP_PORT))
        .unwrap();
    sender
        .send_to(b"to-mdns", SocketAddrV4::new(MDNS, 5353))
        .unwrap();
    sender
        .send_to(b"to-nobody", SocketAddrV4::new(OTHER_GROUP, APP_PORT))
        .unwrap();
    let at_h2 = drain(&h2_socket, Duration::from_millis(500));
    let at_h3 = drain(&h3_socket, Duration::from_millis(100));
    assert_eq!(carrying(&at_h2, GROUP, b"to-group"), 1, "{at_h2:?}");
    assert_eq!(carrying(&at_h2, MDNS, b"to-mdns"), 1, "{at_h2:?}");
    assert_eq!(carrying(&at_h2, OTHER_GROUP, b"to-nobody"), 0);
    assert!(at_h3.is_empty(), "h3 took nothing: {at_h3:?}");
    let ttl = at_h2
        .iter()
        .find(|d| d.ends_with(b"to-group"))
        .map(|d| d[8]);
    assert_eq!(ttl, Some(1), "layer 2: the TTL is untouched");
    // c1, on the same bridge, got it from the bridge itself, once.
    let mut buf = [0u8; 64];
    let (n, _) = joined.recv_from(&mut buf).expect("c1 hears c1b");
    assert_eq!(&buf[..n], b"to-group");

    // From a peer: into the bridge, to the member container, once, and not sent on.
    let from_h2 = inner_packet(Ipv4Addr::new(10, 1, 2, 5), GROUP, APP_PORT, b"from-h2");
    h2_socket
        .send_to(&from_h2, SocketAddrV4::new(lab.h1.public, PORT))
        .unwrap();
    let (n, src) = joined.recv_from(&mut buf).expect("c1 hears h2's container");
    assert_eq!(&buf[..n], b"from-h2");
    assert_eq!(src.ip(), Ipv4Addr::new(10, 1, 2, 5));
    assert!(joined.recv_from(&mut buf).is_err(), "delivered once");
    assert!(
        drain(&h2_socket, Duration::from_millis(300)).is_empty(),
        "split horizon"
    );
    assert!(drain(&h3_socket, Duration::from_millis(50)).is_empty());
    // A peer forging another subnet's source is refused, as for unicast.
    let forged = inner_packet(Ipv4Addr::new(10, 1, 3, 5), GROUP, APP_PORT, b"forged");
    h2_socket
        .send_to(&forged, SocketAddrV4::new(lab.h1.public, PORT))
        .unwrap();
    assert!(
        joined.recv_from(&mut buf).is_err(),
        "a forged source is not delivered"
    );

    // Broadcast, enabled: to the broadcast-capable peer, and from it into the bridge.
    sender
        .send_to(b"to-all", SocketAddrV4::new(Ipv4Addr::BROADCAST, APP_PORT))
        .unwrap();
    let at_h2 = drain(&h2_socket, Duration::from_millis(300));
    assert_eq!(
        carrying(&at_h2, Ipv4Addr::BROADCAST, b"to-all"),
        1,
        "{at_h2:?}"
    );
    assert!(drain(&h3_socket, Duration::from_millis(50)).is_empty());
    let listener = in_netns(&lab.h1.container_ns, || {
        let socket =
            UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP_PORT + 1)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        socket
    });
    let packet = inner_packet(
        Ipv4Addr::new(10, 1, 2, 5),
        Ipv4Addr::BROADCAST,
        APP_PORT + 1,
        b"bcast-h2",
    );
    h2_socket
        .send_to(&packet, SocketAddrV4::new(lab.h1.public, PORT))
        .unwrap();
    let (n, _) = listener
        .recv_from(&mut buf)
        .expect("c1 hears h2's broadcast");
    assert_eq!(&buf[..n], b"bcast-h2");
    assert!(
        drain(&h2_socket, Duration::from_millis(200)).is_empty(),
        "split horizon"
    );

    // Larger than the TUN MTU (c1b's link takes 1500 bytes): counted, not sent.
    let big = vec![0x55u8; 1500 - 28];
    sender
        .send_to(&big, SocketAddrV4::new(GROUP, APP_PORT))
        .unwrap();
    assert!(drain(&h2_socket, Duration::from_millis(300)).is_empty());

    // A storm: 1000 per second with a burst of 100, so 2000 packets cannot all pass.
    for i in 0..2000u32 {
        let _ = sender.send_to(&i.to_be_bytes(), SocketAddrV4::new(GROUP, APP_PORT));
    }
    let storm = drain(&h2_socket, Duration::from_millis(500));
    assert!(
        !storm.is_empty() && storm.len() < 1000,
        "{} of 2000 passed",
        storm.len()
    );

    let counters = h1.engine.counters();
    let multicast = counters.multicast.clone().expect("multicast counters");
    assert!(multicast.drops(MulticastDrop::TooBig) >= 1, "{multicast:?}");
    assert!(
        multicast.drops(MulticastDrop::RateLimited) >= 1000,
        "{multicast:?}"
    );
    assert!(
        multicast.drops(MulticastDrop::NoMembers) >= 1,
        "{multicast:?}"
    );
    assert_eq!(multicast.delivered, 2, "{multicast:?}");
    assert!(multicast.queries >= 1, "{multicast:?}");
    assert_eq!(counters.drops(DropReason::SpoofedSource), 1);
    let mut text = String::new();
    counters.render_prometheus(&mut text);
    assert!(text.contains("weft_multicast_groups 1\n"), "{text}");

    // The leave removes the group at once; the engine's stop removes the TAP.
    drop(joined);
    assert!(eventually(Duration::from_secs(5), || local
        .snapshot()
        .1
        .is_empty()));
    h1.engine.shutdown();
    assert!(
        !link_exists(&lab.h1.ns, TAP),
        "the TAP went with the engine"
    );
}

#[test]
fn without_multicast_nothing_crosses_and_drops_are_counted_as_before() {
    let _serial = serial();
    let lab = Lab::new();
    let groups = Groups::new(groups_for(&lab, vec![GROUP]));
    let h1 = lab.start_engine_multicast(&lab.h1, IoBackend::Syscalls, None, groups);
    assert!(!link_exists(&lab.h1.ns, TAP), "no TAP without multicast");
    let h2_socket = peer_socket(&lab.h2.ns, lab.h2.public);
    let joined = member(&lab.h1.container_ns, GROUP);
    let from_h2 = inner_packet(Ipv4Addr::new(10, 1, 2, 5), GROUP, APP_PORT, b"from-h2");
    h2_socket
        .send_to(&from_h2, SocketAddrV4::new(lab.h1.public, PORT))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(joined.recv_from(&mut buf).is_err());
    let sender = container_sender(&lab.h1.container_ns);
    sender
        .send_to(b"to-group", SocketAddrV4::new(GROUP, APP_PORT))
        .unwrap();
    assert!(drain(&h2_socket, Duration::from_millis(300)).is_empty());
    assert!(eventually(Duration::from_secs(2), || h1
        .engine
        .counters()
        .drops(DropReason::NotOurs)
        == 1));
    let counters = h1.engine.counters();
    assert!(counters.multicast.is_none());
    assert_eq!(h1.engine.local_groups().snapshot(), (0, vec![]));
    let mut text = String::new();
    counters.render_prometheus(&mut text);
    assert!(!text.contains("weft_multicast"), "{text}");
}

#[test]
fn the_relay_ends_with_the_engine_or_its_tap_and_releases_every_descriptor() {
    let _serial = serial();
    let lab = Lab::new();
    let fds_before = open_fds();
    let config = MulticastConfig {
        tap_name: TAP.into(),
        ..MulticastConfig::default()
    };
    let groups = Groups::new(groups_for(&lab, vec![GROUP]));
    let h1 = lab.start_engine_multicast(&lab.h1, IoBackend::Syscalls, Some(config), groups);
    enslave_tap(&lab);
    let relay_running = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .any(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|name| name.trim() == "weft-relay")
            })
    };
    assert!(relay_running(), "one relay thread beside the workers");
    assert!(eventually(Duration::from_secs(3), || h1
        .engine
        .counters()
        .multicast
        .is_some_and(|m| m.queries >= 1)));
    h1.engine.shutdown();
    assert!(!relay_running(), "the relay outlived the engine");
    assert!(!link_exists(&lab.h1.ns, TAP), "the TAP outlived the engine");
    assert_eq!(open_fds(), fds_before, "descriptors leaked");

    // A TAP deleted under a running engine ends the relay (it does not spin); unicast goes
    // on, and the engine still stops cleanly.
    let config = MulticastConfig {
        tap_name: TAP.into(),
        ..MulticastConfig::default()
    };
    let h1 = lab.start_engine_multicast(
        &lab.h1,
        IoBackend::Syscalls,
        Some(config),
        Groups::default(),
    );
    let h2 = lab.start_engine(&lab.h2, IoBackend::Syscalls, 1);
    ip(&lab.h1.ns, &["link", "del", TAP]);
    assert!(
        eventually(Duration::from_secs(3), || !relay_running()),
        "the relay kept running without its TAP"
    );
    assert!(h1.engine.is_running());
    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 3);
    h1.engine.shutdown();
    h2.engine.shutdown();
    assert!(!relay_running());
    assert_eq!(open_fds(), fds_before, "descriptors leaked");
}

/// The overlay Network's broadcast address (of [`support::NETWORK`], 10.1.0.0/16).
const NETWORK_BROADCAST: Ipv4Addr = Ipv4Addr::new(10, 1, 255, 255);

/// A socket in a container on `port`, bound to 0.0.0.0, with `SO_BROADCAST` or without (it
/// only matters for sending: both receive broadcast).
fn listener(ns: &str, port: u16, so_broadcast: bool) -> UdpSocket {
    in_netns(ns, move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).unwrap();
        socket.set_broadcast(so_broadcast).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        socket
    })
}

/// Every payload `socket` receives within `window`, with its source.
fn received(socket: &UdpSocket, window: Duration) -> Vec<(Ipv4Addr, Vec<u8>)> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((n, std::net::SocketAddr::V4(src))) = socket.recv_from(&mut buf) {
            got.push((*src.ip(), buf[..n].to_vec()));
        }
    }
    got
}

/// h1 and h2 run engines with `broadcast` and their TAPs in their bridges; h1 has a second
/// container c1b and h2 a second container c2b; h3 is a broadcast-capable peer seen through
/// its socket. c1 sends three datagrams to the Network's broadcast address.
struct BroadcastLab {
    lab: Lab,
    h1: support::RunningEngine,
    h2: support::RunningEngine,
    /// c1's own listener, c1b's, c2's and c2b's.
    listeners: [UdpSocket; 4],
    h3_socket: UdpSocket,
}

const BCAST_PORT: u16 = 5009;

fn broadcast_lab(backend: IoBackend, broadcast: bool) -> BroadcastLab {
    let mut lab = Lab::new();
    let c1b = lab.add_container(&lab.h1.clone(), "c1b", Ipv4Addr::new(10, 1, 1, 3), 1472);
    let c2b = lab.add_container(&lab.h2.clone(), "c2b", Ipv4Addr::new(10, 1, 2, 3), 1472);
    let config = MulticastConfig {
        tap_name: TAP.into(),
        multicast: true,
        broadcast,
        rate_limit: 1000,
    };
    let capable = |addr| PeerMulticast {
        addr,
        multicast: true,
        broadcast: true,
        groups: vec![],
    };
    let h1_groups = Groups::new(GroupTable::new([
        capable(SocketAddrV4::new(lab.h2.public, PORT)),
        capable(SocketAddrV4::new(lab.h3_public, PORT)),
    ]));
    let h2_groups = Groups::new(GroupTable::new([capable(SocketAddrV4::new(
        lab.h1.public,
        PORT,
    ))]));
    let h1 = lab.start_engine_multicast(&lab.h1, backend, Some(config.clone()), h1_groups);
    let h2 = lab.start_engine_multicast(&lab.h2, backend, Some(config), h2_groups);
    enslave_tap_in(&lab.h1.ns);
    enslave_tap_in(&lab.h2.ns);
    let listeners = [
        listener(&lab.h1.container_ns, BCAST_PORT, false),
        listener(&c1b, BCAST_PORT, true),
        listener(&lab.h2.container_ns, BCAST_PORT, false),
        listener(&c2b, BCAST_PORT, true),
    ];
    let h3_socket = peer_socket(&lab.h3_ns, lab.h3_public);
    // Unicast across first: the ARP entries and bridge ports are settled before counting.
    lab.assert_ping(&lab.h1.container_ns, lab.h2.container, 1);
    let sender = in_netns(&lab.h1.container_ns, || {
        UdpSocket::bind("0.0.0.0:0").unwrap()
    });
    for i in 0..3 {
        let payload = format!("net-bcast-{i}");
        sender
            .send_to(
                payload.as_bytes(),
                SocketAddrV4::new(NETWORK_BROADCAST, BCAST_PORT),
            )
            .expect("no SO_BROADCAST needed: to the container it is an overlay address");
    }
    BroadcastLab {
        lab,
        h1,
        h2,
        listeners,
        h3_socket,
    }
}

#[test]
fn uring_carries_the_networks_broadcast_to_every_broadcast_host_once() {
    the_networks_broadcast_crosses_hosts(IoBackend::Uring);
}

#[test]
fn syscalls_carries_the_networks_broadcast_to_every_broadcast_host_once() {
    the_networks_broadcast_crosses_hosts(IoBackend::Syscalls);
}

fn the_networks_broadcast_crosses_hosts(backend: IoBackend) {
    let _serial = serial();
    let BroadcastLab {
        lab,
        h1,
        h2,
        listeners,
        h3_socket,
    } = broadcast_lab(backend, true);
    let expected: Vec<Vec<u8>> = (0..3)
        .map(|i| format!("net-bcast-{i}").into_bytes())
        .collect();
    let [own, c1b, c2, c2b] = &listeners;
    // Every container of h1 (but the sender) and of h2 gets each datagram exactly once, from
    // c1's address.
    for (who, socket) in [("c1b (h1)", c1b), ("c2 (h2)", c2), ("c2b (h2)", c2b)] {
        let got = received(socket, Duration::from_millis(700));
        let payloads: Vec<Vec<u8>> = got.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(payloads, expected, "{who}: each datagram once, in order");
        assert!(
            got.iter().all(|(src, _)| *src == lab.h1.container),
            "{who}: {got:?}"
        );
    }
    // The sender's kernel drops the copy its bridge hands back: its own source address.
    assert_eq!(received(own, Duration::from_millis(100)), vec![]);
    // h3, a broadcast-capable peer, gets one datagram per packet: to 255.255.255.255, both
    // checksums right, the TTL lowered only by h1's kernel routing it into the TUN.
    let at_h3 = drain(&h3_socket, Duration::from_millis(200));
    assert_eq!(at_h3.len(), 3, "{at_h3:?}");
    for (datagram, payload) in at_h3.iter().zip(&expected) {
        let (header, rest) = etherparse::Ipv4Header::from_slice(datagram).unwrap();
        let (udp, body) = etherparse::UdpHeader::from_slice(rest).unwrap();
        assert_eq!(header.destination, [255; 4]);
        assert_eq!(header.source, lab.h1.container.octets());
        assert_eq!(header.time_to_live, 63);
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        assert_eq!(udp.checksum, udp.calc_checksum_ipv4(&header, body).unwrap());
        assert_eq!(body, &payload[..]);
    }
    // Nothing comes back to h1 from h2 (split horizon), and nothing else crossed.
    assert!(drain(&h3_socket, Duration::from_millis(100)).is_empty());
    // Why the rewrite: a frame to the Network's broadcast address itself, as h2 delivers what
    // a peer sends to it, is dropped by every container (it is no broadcast on their link).
    let unrewritten = inner_packet(
        Ipv4Addr::new(10, 1, 3, 5),
        NETWORK_BROADCAST,
        BCAST_PORT,
        b"as sent",
    );
    h3_socket
        .send_to(&unrewritten, SocketAddrV4::new(lab.h2.public, PORT))
        .unwrap();
    assert!(eventually(Duration::from_secs(2), || h2
        .engine
        .counters()
        .multicast
        .is_some_and(|m| m.delivered == 4)));
    assert_eq!(received(c2, Duration::from_millis(300)), vec![]);
    assert_eq!(received(c2b, Duration::from_millis(50)), vec![]);
    let m1 = h1.engine.counters().multicast.expect("h1's relay counters");
    assert_eq!(m1.replicated, 6, "two copies of each, to h2 and h3: {m1:?}");
    assert_eq!(m1.delivered, 3, "once into h1's own bridge: {m1:?}");
    let m2 = h2.engine.counters().multicast.expect("h2's relay counters");
    assert_eq!(m2.replicated, 0, "h2 sends nothing on: {m2:?}");
    assert_eq!(m2.delivered, 4, "{m2:?}");
    assert_eq!(h1.engine.counters().drops(DropReason::NoRoute), 0);
    h1.engine.shutdown();
    h2.engine.shutdown();
}

#[test]
fn with_broadcast_off_the_networks_broadcast_is_routed_and_dropped_as_before() {
    let _serial = serial();
    let BroadcastLab {
        lab: _lab,
        h1,
        h2,
        listeners,
        h3_socket,
    } = broadcast_lab(IoBackend::Syscalls, false);
    for socket in &listeners {
        assert_eq!(received(socket, Duration::from_millis(300)), vec![]);
    }
    assert!(drain(&h3_socket, Duration::from_millis(100)).is_empty());
    // No lease holds 10.1.255.0/24: the address is routed like any other and refused as
    // no_route (with ICMP net unreachable to c1), as without multicast.
    assert!(eventually(Duration::from_secs(2), || h1
        .engine
        .counters()
        .drops(DropReason::NoRoute)
        == 3));
    let m1 = h1.engine.counters().multicast.expect("h1's relay counters");
    assert_eq!((m1.replicated, m1.delivered), (0, 0), "{m1:?}");
    let m2 = h2.engine.counters().multicast.expect("h2's relay counters");
    assert_eq!(m2.delivered, 0, "{m2:?}");
    h1.engine.shutdown();
    h2.engine.shutdown();
}
