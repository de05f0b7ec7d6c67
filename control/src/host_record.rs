//! weft's per-host record: what a weft host offers beyond flannel, and its join with the leases.
//!
//! One record per host, at `/weft.io<prefix>/hosts/<lease key name>` (a prefix flanneld never
//! reads), attached to the same etcd lease as the host's subnet lease, so that it disappears
//! with the host. Its value is JSON:
//! `{"PublicIP":"198.18.0.1","Capabilities":["multicast","broadcast","skip-inner-csum"],"MulticastGroups":["239.1.1.1"]}`,
//! and with encryption between hosts on, `"PublicKey":"<base64 X25519 key>"`.
//! A record counts only while the lease of the subnet it is named after is held by the
//! record's `PublicIP`: a record left by a host that lost its subnet, or forged for a subnet
//! someone else holds, is ignored. Nothing here does I/O.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};
use tracing::warn;
use weft_engine::{PeerMulticast, RouteTable, KEY_LEN};

use crate::key_file::{decode_key, encode_key};

use crate::registry::{RawLease, WatchEvent};
use crate::subnet::LeaseKey;

/// The capability a host advertises for IPv4 multicast.
pub const MULTICAST: &str = "multicast";
/// The capability a host advertises for broadcast.
pub const BROADCAST: &str = "broadcast";
/// The capability of a host that takes packets whose inner TCP/UDP checksums are left
/// partial, relying on the outer UDP checksum, and that always sends with that checksum on
/// (see `weft_engine::offload::partial`); it leaves them partial to hosts that advertise it.
pub const SKIP_INNER_CSUM: &str = "skip-inner-csum";
/// The capability of a host that answers the per-peer UDP GSO check's probe runs (see
/// `weft_engine::gso_check`) and checks its peers that advertise it.
pub const UDP_GSO_CHECK: &str = "udp-gso-check";

/// The most groups one record may list; a record with more is refused as junk.
pub const MAX_GROUPS: usize = 4096;

/// One host's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's public address: must match the one in its subnet lease.
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// What the host takes part in (`multicast`, `broadcast`; unknown names are kept and
    /// ignored, so that later features do not break older readers).
    #[serde(rename = "Capabilities", default)]
    pub capabilities: Vec<String>,
    /// The IPv4 multicast groups the host's containers joined.
    #[serde(rename = "MulticastGroups", default)]
    pub multicast_groups: Vec<Ipv4Addr>,
    /// With encryption between hosts: the host's public key, base64 as WireGuard writes it.
    #[serde(rename = "PublicKey", default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// Why a stored record is not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The key name is not a lease key name.
    #[error(transparent)]
    Key(#[from] crate::subnet::KeyError),
    /// The value is not a record.
    #[error("not a host record: {0}")]
    Json(String),
    /// A listed group is not an IPv4 multicast address.
    #[error("{0} is not a multicast group")]
    NotAGroup(Ipv4Addr),
    /// Too many groups.
    #[error("{0} groups listed, at most {MAX_GROUPS} are read")]
    TooManyGroups(usize),
}

impl HostRecord {
    /// The record of a host at `public_ip` with the given features on and `groups` joined
    /// (kept only with multicast on).
    pub fn new(public_ip: Ipv4Addr, multicast: bool, broadcast: bool, groups: &[Ipv4Addr]) -> Self {
        let mut capabilities = Vec::new();
        if multicast {
            capabilities.push(MULTICAST.to_owned());
        }
        if broadcast {
            capabilities.push(BROADCAST.to_owned());
        }
        let mut multicast_groups = if multicast {
            groups.to_vec()
        } else {
            Vec::new()
        };
        multicast_groups.sort_unstable();
        multicast_groups.dedup();
        Self {
            public_ip,
            capabilities,
            multicast_groups,
            public_key: None,
        }
    }

    /// The same record publishing `key` as the host's public key.
    pub fn with_public_key(mut self, key: Option<&[u8; KEY_LEN]>) -> Self {
        self.public_key = key.map(encode_key);
        self
    }

    /// This record, also advertising `capability`.
    pub fn with_capability(mut self, capability: &str) -> Self {
        if !self.has(capability) {
            self.capabilities.push(capability.to_owned());
        }
        self
    }

    /// Read a stored value.
    pub fn parse(json: &[u8]) -> Result<Self, RecordError> {
        let record: Self =
            serde_json::from_slice(json).map_err(|e| RecordError::Json(e.to_string()))?;
        if record.multicast_groups.len() > MAX_GROUPS {
            return Err(RecordError::TooManyGroups(record.multicast_groups.len()));
        }
        if let Some(bad) = record.multicast_groups.iter().find(|g| !g.is_multicast()) {
            return Err(RecordError::NotAGroup(*bad));
        }
        Ok(record)
    }

    /// The stored form.
    pub fn to_json(&self) -> String {
        // A struct of strings and addresses always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether the host advertises `capability`.
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

/// Every readable record, by lease key name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordTable {
    records: BTreeMap<String, HostRecord>,
}

impl RecordTable {
    /// The readable records of a listing; the others are logged and skipped.
    pub fn from_snapshot(raws: &[RawLease]) -> Self {
        let mut table = Self::default();
        for raw in raws {
            table.put(raw);
        }
        table
    }

    /// Apply one change from the watch; returns whether the table changed.
    pub fn apply(&mut self, event: &WatchEvent) -> bool {
        match event {
            WatchEvent::Put(raw) => self.put(raw),
            WatchEvent::Delete { name, .. } => self.records.remove(name).is_some(),
        }
    }

    fn put(&mut self, raw: &RawLease) -> bool {
        match read_record(raw) {
            Ok(record) => self.records.insert(raw.name.clone(), record.clone()) != Some(record),
            Err(e) => {
                warn!(record = %raw.name, "skipping host record: {e}");
                self.records.remove(&raw.name).is_some()
            }
        }
    }

    /// The record stored under `name`.
    pub fn get(&self, name: &str) -> Option<&HostRecord> {
        self.records.get(name)
    }

    /// How many readable records there are.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// What each peer takes, for the group table: every record whose subnet is a peer's lease
    /// in `routes` held by the record's `PublicIP` (this host's own subnet is never a peer in
    /// its route table), other than one of this host's (`public_ip`).
    pub fn peers(&self, routes: &RouteTable, public_ip: Ipv4Addr) -> Vec<PeerMulticast> {
        self.joined(routes, public_ip)
            .map(|(addr, record)| PeerMulticast {
                addr,
                multicast: record.has(MULTICAST),
                broadcast: record.has(BROADCAST),
                groups: record.multicast_groups.clone(),
            })
            .collect()
    }

    /// The public addresses of the peers (joined as for [`RecordTable::peers`]) that
    /// advertise [`SKIP_INNER_CSUM`].
    pub fn skip_inner_csum_peers(&self, routes: &RouteTable, public_ip: Ipv4Addr) -> Vec<Ipv4Addr> {
        self.peers_advertising(SKIP_INNER_CSUM, routes, public_ip)
    }

    /// The public addresses of the peers (joined as for [`RecordTable::peers`]) that
    /// advertise [`UDP_GSO_CHECK`].
    pub fn udp_gso_check_peers(&self, routes: &RouteTable, public_ip: Ipv4Addr) -> Vec<Ipv4Addr> {
        self.peers_advertising(UDP_GSO_CHECK, routes, public_ip)
    }

    fn peers_advertising(
        &self,
        capability: &str,
        routes: &RouteTable,
        public_ip: Ipv4Addr,
    ) -> Vec<Ipv4Addr> {
        self.joined(routes, public_ip)
            .filter(|(_, record)| record.has(capability))
            .map(|(addr, _)| *addr.ip())
            .collect()
    }

    /// Every record whose subnet is a peer's lease in `routes` held by the record's
    /// `PublicIP`, other than one of this host's (`public_ip`), with the peer's address.
    fn joined<'a>(
        &'a self,
        routes: &'a RouteTable,
        public_ip: Ipv4Addr,
    ) -> impl Iterator<Item = (SocketAddrV4, &'a HostRecord)> + 'a {
        self.records
            .iter()
            .filter(move |(_, record)| record.public_ip != public_ip)
            .filter_map(|(name, record)| {
                let subnet = LeaseKey::parse(name).ok()?.ipv4;
                routes.overlay().slot_of_subnet(subnet).ok()?;
                let addr: SocketAddrV4 = routes.peer_for(subnet.addr())?;
                (*addr.ip() == record.public_ip).then_some((addr, record))
            })
    }
}

/// The peers encryption can reach, and how many lease holders it cannot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyedPeers {
    /// Every lease holder whose record carries a readable public key: address and key.
    pub keyed: Vec<(Ipv4Addr, [u8; KEY_LEN])>,
    /// Lease holders without such a record (a flanneld, an older weftd, a host whose record
    /// is not written yet): nothing is sent to them or accepted from them.
    pub without_key: Vec<Ipv4Addr>,
}

impl RecordTable {
    /// Join the records with the leases in `routes`: a lease holder's key is the one in the
    /// record named after its subnet, if that record's `PublicIP` is the holder's.
    pub fn keyed_peers(&self, routes: &RouteTable) -> KeyedPeers {
        let mut peers = KeyedPeers::default();
        for (subnet, holder) in routes.peers() {
            let key = self
                .records
                .get(&crate::subnet::lease_key_name(subnet))
                .filter(|record| record.public_ip == holder)
                .and_then(|record| record.public_key.as_deref())
                .and_then(decode_key);
            match key {
                Some(key) => peers.keyed.push((holder, key)),
                None => peers.without_key.push(holder),
            }
        }
        peers.keyed.sort_unstable();
        peers.keyed.dedup();
        peers.without_key.sort_unstable();
        peers.without_key.dedup();
        // A host holding several subnets counts once, keyed if any of its records is.
        let keyed: Vec<Ipv4Addr> = peers.keyed.iter().map(|(ip, _)| *ip).collect();
        peers.without_key.retain(|ip| !keyed.contains(ip));
        peers
    }
}

fn read_record(raw: &RawLease) -> Result<HostRecord, RecordError> {
    LeaseKey::parse(&raw.name)?;
    HostRecord::parse(&raw.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::Ipv4Net;
    use weft_engine::{GroupTable, Overlay};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn raw(name: &str, value: &str) -> RawLease {
        RawLease {
            name: name.to_owned(),
            value: value.as_bytes().to_vec(),
            etcd_lease: 7,
            mod_revision: 3,
        }
    }

    fn routes(peers: &[(&str, &str)]) -> RouteTable {
        let overlay = Overlay::new("10.1.0.0/16".parse().unwrap(), 24).unwrap();
        RouteTable::build(
            overlay,
            8285,
            Some("10.1.1.0/24".parse::<Ipv4Net>().unwrap()),
            peers
                .iter()
                .map(|(s, p)| (s.parse::<Ipv4Net>().unwrap(), ip(p))),
        )
        .unwrap()
    }

    #[test]
    fn the_record_reads_back_and_matches_the_documented_form() {
        let record = HostRecord::new(ip("198.18.0.1"), true, true, &[ip("239.1.1.1")]);
        assert_eq!(
            record.to_json(),
            r#"{"PublicIP":"198.18.0.1","Capabilities":["multicast","broadcast"],"MulticastGroups":["239.1.1.1"]}"#
        );
        assert_eq!(HostRecord::parse(record.to_json().as_bytes()), Ok(record));
        let only_broadcast = HostRecord::new(ip("198.18.0.1"), false, true, &[ip("239.1.1.1")]);
        assert_eq!(
            only_broadcast.to_json(),
            r#"{"PublicIP":"198.18.0.1","Capabilities":["broadcast"],"MulticastGroups":[]}"#
        );
        // Later fields and capabilities are ignored, missing lists are empty.
        let later = HostRecord::parse(
            br#"{"PublicIP":"198.18.0.2","Capabilities":["multicast","wireguard"],"PublicKey":"x"}"#,
        )
        .unwrap();
        assert!(later.has(MULTICAST) && !later.has(BROADCAST));
        assert!(later.multicast_groups.is_empty());
    }

    #[test]
    fn malformed_records_are_refused_with_the_reason() {
        for (value, want) in [
            ("{not json", "not a host record"),
            (r#"{"Capabilities":[]}"#, "PublicIP"),
            (
                r#"{"PublicIP":"198.18.0.2","MulticastGroups":["10.1.1.1"]}"#,
                "10.1.1.1 is not a multicast group",
            ),
            (
                r#"{"PublicIP":"198.18.0.2","MulticastGroups":["banana"]}"#,
                "not a host record",
            ),
        ] {
            let err = HostRecord::parse(value.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{value}: {err}");
        }
        let many: Vec<String> = (0..=MAX_GROUPS)
            .map(|i| format!("\"239.0.{}.{}\"", i / 256, i % 256))
            .collect();
        let value = format!(
            r#"{{"PublicIP":"198.18.0.2","MulticastGroups":[{}]}}"#,
            many.join(",")
        );
        assert_eq!(
            HostRecord::parse(value.as_bytes()),
            Err(RecordError::TooManyGroups(MAX_GROUPS + 1))
        );
    }

    #[test]
    fn records_count_only_with_a_matching_lease() {
        let rec = |ip_: &str, groups: &str| {
            format!(
                r#"{{"PublicIP":"{ip_}","Capabilities":["multicast"],"MulticastGroups":[{groups}]}}"#
            )
        };
        let table = RecordTable::from_snapshot(&[
            raw("10.1.1.0-24", &rec("198.18.0.1", r#""239.1.1.1""#)), // ours
            raw("10.1.2.0-24", &rec("198.18.0.2", r#""239.1.1.1""#)),
            raw("10.1.3.0-24", &rec("198.18.0.3", "")),
            raw("10.1.4.0-24", &rec("198.18.0.9", r#""239.1.1.1""#)), // lease held by .4
            raw("10.1.5.0-24", &rec("198.18.0.5", r#""239.1.1.1""#)), // no lease
            raw("10.1.6.0-25", &rec("198.18.0.6", r#""239.1.1.1""#)), // not a subnet
            raw("bogus", &rec("198.18.0.7", "")),
            raw("10.1.8.0-24", "garbage"),
        ]);
        assert_eq!(table.len(), 6, "unreadable records are skipped");
        let routes = routes(&[
            ("10.1.2.0/24", "198.18.0.2"),
            ("10.1.3.0/24", "198.18.0.3"),
            ("10.1.4.0/24", "198.18.0.4"),
            ("10.1.6.0/24", "198.18.0.6"),
            ("10.1.8.0/24", "198.18.0.8"),
        ]);
        let peers = table.peers(&routes, ip("198.18.0.1"));
        let at = |s: &str| SocketAddrV4::new(ip(s), 8285);
        assert_eq!(
            peers,
            [
                PeerMulticast {
                    addr: at("198.18.0.2"),
                    multicast: true,
                    broadcast: false,
                    groups: vec![ip("239.1.1.1")],
                },
                PeerMulticast {
                    addr: at("198.18.0.3"),
                    multicast: true,
                    broadcast: false,
                    groups: vec![],
                },
            ]
        );
        let groups = GroupTable::new(peers);
        assert_eq!(groups.receivers_of(ip("239.1.1.1")), [at("198.18.0.2")]);
        assert_eq!(
            groups.receivers_of(ip("224.0.0.251")),
            [at("198.18.0.2"), at("198.18.0.3")]
        );
        assert!(groups.receivers_of(ip("239.9.9.9")).is_empty());
        assert!(groups.broadcast_receivers().is_empty());
    }

    #[test]
    fn public_keys_join_with_the_leases() {
        let key = |b: u8| encode_key(&[b; KEY_LEN]);
        let record = HostRecord::new(ip("198.18.0.2"), false, false, &[])
            .with_public_key(Some(&[2; KEY_LEN]));
        assert_eq!(
            record.to_json(),
            format!(
                r#"{{"PublicIP":"198.18.0.2","Capabilities":[],"MulticastGroups":[],"PublicKey":"{}"}}"#,
                key(2)
            )
        );
        assert_eq!(HostRecord::parse(record.to_json().as_bytes()), Ok(record));
        let rec = |ip_: &str, key: &str| format!(r#"{{"PublicIP":"{ip_}","PublicKey":"{key}"}}"#);
        let table = RecordTable::from_snapshot(&[
            raw("10.1.2.0-24", &rec("198.18.0.2", &key(2))),
            raw("10.1.3.0-24", &rec("198.18.0.9", &key(3))), // lease held by .3
            raw("10.1.4.0-24", &rec("198.18.0.4", "bad key")),
            raw("10.1.5.0-24", r#"{"PublicIP":"198.18.0.5"}"#), // an older weftd
        ]);
        let routes = routes(&[
            ("10.1.2.0/24", "198.18.0.2"),
            ("10.1.3.0/24", "198.18.0.3"),
            ("10.1.4.0/24", "198.18.0.4"),
            ("10.1.5.0/24", "198.18.0.5"),
            ("10.1.6.0/24", "198.18.0.6"), // a flanneld: no record
        ]);
        assert_eq!(
            table.keyed_peers(&routes),
            KeyedPeers {
                keyed: vec![(ip("198.18.0.2"), [2; KEY_LEN])],
                without_key: ["198.18.0.3", "198.18.0.4", "198.18.0.5", "198.18.0.6"]
                    .map(ip)
                    .to_vec(),
            }
        );
    }

    /// The records of this host (.1), two peers that advertise `capability` (.2, and one
    /// forged under .4's lease) and an older weft (.3), with the leases of .2 to .5 (.5 is a
    /// flanneld host: it has no record at all).
    fn advertising(capability: &str) -> (RecordTable, RouteTable) {
        let record = |public: &str, advertises: bool| {
            let record = HostRecord::new(ip(public), false, false, &[]);
            let record = if advertises {
                record.with_capability(capability)
            } else {
                record
            };
            record.to_json()
        };
        let table = RecordTable::from_snapshot(&[
            raw("10.1.1.0-24", &record("198.18.0.1", true)), // ours
            raw("10.1.2.0-24", &record("198.18.0.2", true)),
            raw("10.1.3.0-24", &record("198.18.0.3", false)), // an older weft
            raw("10.1.4.0-24", &record("198.18.0.9", true)),  // lease held by .4
        ]);
        let routes = routes(&[
            ("10.1.2.0/24", "198.18.0.2"),
            ("10.1.3.0/24", "198.18.0.3"),
            ("10.1.4.0/24", "198.18.0.4"),
            ("10.1.5.0/24", "198.18.0.5"),
        ]);
        (table, routes)
    }

    #[test]
    fn only_joined_peers_that_advertise_it_are_gso_checked() {
        let (table, routes) = advertising(UDP_GSO_CHECK);
        // Never the flanneld host: a probe would reach its TUN.
        assert_eq!(
            table.udp_gso_check_peers(&routes, ip("198.18.0.1")),
            [ip("198.18.0.2")]
        );
        assert!(table
            .skip_inner_csum_peers(&routes, ip("198.18.0.1"))
            .is_empty());
    }

    #[test]
    fn only_joined_peers_that_advertise_it_take_partial_checksums() {
        let plain = HostRecord::new(ip("198.18.0.2"), false, false, &[]);
        let skip = plain.clone().with_capability(SKIP_INNER_CSUM);
        assert_eq!(
            skip.clone().with_capability(SKIP_INNER_CSUM),
            skip,
            "advertised once"
        );
        assert_eq!(
            skip.to_json(),
            r#"{"PublicIP":"198.18.0.2","Capabilities":["skip-inner-csum"],"MulticastGroups":[]}"#
        );
        let (table, routes) = advertising(SKIP_INNER_CSUM);
        assert_eq!(
            table.skip_inner_csum_peers(&routes, ip("198.18.0.1")),
            [ip("198.18.0.2")]
        );
        assert!(table
            .udp_gso_check_peers(&routes, ip("198.18.0.1"))
            .is_empty());
        let peers = table.peers(&routes, ip("198.18.0.1"));
        assert!(peers.iter().all(|p| !p.multicast && !p.broadcast));
    }

    #[test]
    fn events_change_the_table() {
        let mut table = RecordTable::default();
        let value = HostRecord::new(ip("198.18.0.2"), true, false, &[]).to_json();
        assert!(table.apply(&WatchEvent::Put(raw("10.1.2.0-24", &value))));
        assert!(!table.apply(&WatchEvent::Put(raw("10.1.2.0-24", &value))));
        assert!(table.apply(&WatchEvent::Put(raw("10.1.2.0-24", "junk"))));
        assert!(
            table.is_empty(),
            "a record that turns unreadable is dropped"
        );
        table.apply(&WatchEvent::Put(raw("10.1.2.0-24", &value)));
        assert!(table.apply(&WatchEvent::Delete {
            name: "10.1.2.0-24".to_owned(),
            revision: 9
        }));
        assert!(table.get("10.1.2.0-24").is_none());
    }
}
