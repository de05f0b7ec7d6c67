//! Lease keys and values exactly as flanneld writes them to etcd.
//!
//! A lease lives at `<prefix>/subnets/<ip>-<len>` (dual stack: `<ip>-<len>&<ip6>-<len6>`) and
//! its value is a JSON object; the udp backend writes exactly
//! `{"PublicIP":"198.18.0.1","PublicIPv6":null}`. Other backends add `BackendType`,
//! `BackendData` and `BackendV6Data`, which are read and kept but carry nothing weft uses.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;

use crate::config::{field, json_kind};

/// flannel's default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// The etcd key prefix under which the config and the leases live.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// A prefix such as `/coreos.com/network`; trailing slashes are dropped.
    pub fn new(prefix: &str) -> Self {
        Self(prefix.trim_end_matches('/').to_owned())
    }

    /// The prefix without a trailing slash.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<prefix>/config`: the network config.
    pub fn config_key(&self) -> String {
        format!("{}/config", self.0)
    }

    /// `<prefix>/subnets/`: the directory of all leases, with its trailing slash.
    pub fn subnets_dir(&self) -> String {
        format!("{}/subnets/", self.0)
    }

    /// `/weft.io<prefix>/hosts/`: the directory of weft's per-host records (capabilities,
    /// multicast groups), with its trailing slash. flanneld never reads under `/weft.io`.
    pub fn hosts_dir(&self) -> String {
        let sep = if self.0.starts_with('/') { "" } else { "/" };
        format!("/weft.io{sep}{}/hosts/", self.0)
    }

    /// `/weft.io<prefix>/hosts/<name>` for a lease key name such as `10.1.74.0-24`.
    pub fn host_record_key(&self, name: &str) -> String {
        format!("{}{name}", self.hosts_dir())
    }

    /// `<prefix>/subnets/<name>` for a lease key name such as `10.1.74.0-24`.
    pub fn lease_key(&self, name: &str) -> String {
        format!("{}/subnets/{name}", self.0)
    }
}

impl Default for KeyPrefix {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The key name of the lease for `subnet`: `10.1.74.0/24` → `10.1.74.0-24`.
pub fn lease_key_name(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.addr(), subnet.prefix_len())
}

/// The subnets a lease key name stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    /// The IPv4 subnet, as written (host bits are not cleared: a key with host bits set does not
    /// fit any config and is reported as such).
    pub ipv4: Ipv4Net,
    /// The IPv6 subnet of a dual-stack lease.
    pub ipv6: Option<Ipv6Net>,
}

/// A lease key name that is not `<ip>-<len>` or `<ip>-<len>&<ip6>-<len6>`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed lease key {0:?}: expected <ipv4>-<prefix length>, e.g. 10.1.74.0-24")]
pub struct KeyError(pub String);

impl LeaseKey {
    /// Parse a key name (the part after `<prefix>/subnets/`).
    pub fn parse(name: &str) -> Result<Self, KeyError> {
        let bad = || KeyError(name.to_owned());
        let (v4, v6) = match name.split_once('&') {
            Some((v4, v6)) => (v4, Some(v6)),
            None => (name, None),
        };
        let (addr, len) = split_cidr(v4).ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let ipv4 = Ipv4Net::new(addr, len).map_err(|_| bad())?;
        let ipv6 = match v6 {
            None => None,
            Some(v6) => {
                let (addr, len) = split_cidr(v6).ok_or_else(bad)?;
                let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
                Some(Ipv6Net::new(addr, len).map_err(|_| bad())?)
            }
        };
        Ok(Self { ipv4, ipv6 })
    }

    /// The key name for these subnets.
    pub fn name(&self) -> String {
        match self.ipv6 {
            None => lease_key_name(self.ipv4),
            Some(v6) => format!(
                "{}&{}-{}",
                lease_key_name(self.ipv4),
                v6.addr(),
                v6.prefix_len()
            ),
        }
    }
}

/// `<addr>-<len>` with a decimal length of at most three digits.
fn split_cidr(s: &str) -> Option<(&str, u8)> {
    let (addr, len) = s.rsplit_once('-')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((addr, len.parse().ok()?))
}

/// A lease value that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttrsError {
    /// Not JSON, or not an object.
    #[error("lease value is not a JSON object: {0}")]
    Json(String),
    /// A field is missing or malformed.
    #[error("lease value field {field}: {reason}")]
    Field {
        /// The field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The value of a lease: who holds the subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseAttrs {
    /// The host's public IPv4 address: where its subnet's packets are sent.
    pub public_ip: Ipv4Addr,
    /// The host's public IPv6 address, if any.
    pub public_ipv6: Option<Ipv6Addr>,
    /// `BackendType`; the udp backend leaves it out.
    pub backend_type: Option<String>,
    /// `BackendData` of other backends, kept as read.
    pub backend_data: Option<Value>,
    /// `BackendV6Data` of other backends, kept as read.
    pub backend_v6_data: Option<Value>,
}

impl LeaseAttrs {
    /// The value a udp-backend host with `public_ip` writes.
    pub fn udp(public_ip: Ipv4Addr) -> Self {
        Self {
            public_ip,
            public_ipv6: None,
            backend_type: None,
            backend_data: None,
            backend_v6_data: None,
        }
    }

    /// Whether a host holding this lease receives udp-backend datagrams: it names no backend
    /// (as flanneld's udp backend writes it) or names `udp`.
    pub fn is_udp(&self) -> bool {
        match self.backend_type.as_deref() {
            None | Some("") | Some("udp") => true,
            Some(_) => false,
        }
    }

    /// The JSON flanneld writes: `PublicIP`, `PublicIPv6` (null when absent), then the backend
    /// fields that are set. For the udp backend this is byte-identical to flanneld's value.
    pub fn to_json(&self) -> String {
        let mut out = format!("{{\"PublicIP\":\"{}\",\"PublicIPv6\":", self.public_ip);
        match self.public_ipv6 {
            Some(v6) => out.push_str(&format!("\"{v6}\"")),
            None => out.push_str("null"),
        }
        if let Some(t) = self.backend_type.as_deref().filter(|t| !t.is_empty()) {
            out.push_str(",\"BackendType\":");
            out.push_str(&Value::String(t.to_owned()).to_string());
        }
        for (name, data) in [
            ("BackendData", &self.backend_data),
            ("BackendV6Data", &self.backend_v6_data),
        ] {
            if let Some(data) = data.as_ref().filter(|d| !d.is_null()) {
                out.push_str(&format!(",\"{name}\":{data}"));
            }
        }
        out.push('}');
        out
    }

    /// Read a lease value as written by flanneld (any backend) or weft.
    pub fn parse(json: &[u8]) -> Result<Self, AttrsError> {
        let value: Value =
            serde_json::from_slice(json).map_err(|e| AttrsError::Json(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(AttrsError::Json(format!("got {}", json_kind(&value))));
        };
        let public_ip = match field(&obj, "PublicIP") {
            Some(Value::String(s)) => s.parse::<Ipv4Addr>().map_err(|_| AttrsError::Field {
                field: "PublicIP",
                reason: format!("invalid IPv4 address {s:?}"),
            })?,
            None | Some(Value::Null) => {
                return Err(AttrsError::Field {
                    field: "PublicIP",
                    reason: "missing".to_owned(),
                })
            }
            Some(other) => {
                return Err(AttrsError::Field {
                    field: "PublicIP",
                    reason: format!("must be a string, got {}", json_kind(other)),
                })
            }
        };
        let public_ipv6 = match field(&obj, "PublicIPv6") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                Some(s.parse::<Ipv6Addr>().map_err(|_| AttrsError::Field {
                    field: "PublicIPv6",
                    reason: format!("invalid IPv6 address {s:?}"),
                })?)
            }
            Some(other) => {
                return Err(AttrsError::Field {
                    field: "PublicIPv6",
                    reason: format!("must be a string or null, got {}", json_kind(other)),
                })
            }
        };
        let backend_type = match field(&obj, "BackendType") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(AttrsError::Field {
                    field: "BackendType",
                    reason: format!("must be a string, got {}", json_kind(other)),
                })
            }
        };
        let backend_data = field(&obj, "BackendData").filter(|v| !v.is_null()).cloned();
        let backend_v6_data = field(&obj, "BackendV6Data")
            .filter(|v| !v.is_null())
            .cloned();
        Ok(Self {
            public_ip,
            public_ipv6,
            backend_type,
            backend_data,
            backend_v6_data,
        })
    }
}

/// The text of a flanneld fixture file, from the copies kept with the integration tests
/// (`control/tests/fixtures/flannel-v0.20.2/`).
#[cfg(test)]
pub(crate) fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/flannel-v0.20.2")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::subnet::fixture;

    #[test]
    fn keys_match_the_fixture() {
        let text = fixture("subnet-keys.tsv");
        let mut checked = 0;
        for line in text.lines().skip(1).filter(|l| !l.is_empty()) {
            let cols: Vec<&str> = line.split('\t').collect();
            match cols.as_slice() {
                ["key", input, expected] => {
                    let subnet: Ipv4Net = input.parse().unwrap();
                    assert_eq!(lease_key_name(subnet), *expected);
                    // And back.
                    assert_eq!(LeaseKey::parse(expected).unwrap().ipv4, subnet);
                }
                ["parsekey", input, v4, v6] => match LeaseKey::parse(input) {
                    Ok(key) => {
                        assert_eq!(key.ipv4.to_string(), *v4, "{input}");
                        let got6 = key.ipv6.map_or("<nil>".to_owned(), |n| n.to_string());
                        assert_eq!(got6, *v6, "{input}");
                        assert_eq!(key.name(), *input, "round trip");
                    }
                    Err(e) => {
                        assert_eq!((*v4, *v6), ("<nil>", "<nil>"), "{input} refused: {e}");
                    }
                },
                _ => panic!("malformed fixture row {line:?}"),
            }
            checked += 1;
        }
        assert_eq!(checked, 8);
    }

    #[test]
    fn malformed_keys_are_errors() {
        for name in [
            "",
            "-24",
            "10.1.74.0-",
            "10.1.74.0-24-",
            "10.1.74.0-+24",
            "10.1.74.0-0024",
            "10.1.74-24",
            "10.1.74.0-24&",
            "10.1.74.0-24&fc00::-129",
            "10.1.74.0-24&10.1.0.0-24",
            "10.1.74.0/24",
            "config",
        ] {
            assert!(LeaseKey::parse(name).is_err(), "{name:?} accepted");
        }
    }

    #[test]
    fn values_match_the_fixture() {
        let text = fixture("etcd-after-two-hosts.txt");
        let mut seen = 0;
        for line in text.lines().filter(|l| l.contains("/subnets/")) {
            let (key, rest) = line.split_once(" => ").unwrap();
            let value = rest.split("   [").next().unwrap();
            let name = key.strip_prefix("/coreos.com/network/subnets/").unwrap();
            let lease = LeaseKey::parse(name).unwrap();
            assert_eq!(lease.name(), name);
            let attrs = LeaseAttrs::parse(value.as_bytes()).unwrap();
            assert!(attrs.is_udp());
            // weft writes the very bytes flanneld wrote.
            assert_eq!(LeaseAttrs::udp(attrs.public_ip).to_json(), value);
            assert_eq!(attrs.to_json(), value);
            assert_eq!(
                KeyPrefix::default().lease_key(&lease_key_name(lease.ipv4)),
                key
            );
            seen += 1;
        }
        assert_eq!(seen, 2);
        assert_eq!(
            LeaseAttrs::udp("198.18.0.1".parse().unwrap()).to_json(),
            r#"{"PublicIP":"198.18.0.1","PublicIPv6":null}"#
        );
    }

    #[test]
    fn other_backends_values_are_read() {
        let vxlan = br#"{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#;
        let attrs = LeaseAttrs::parse(vxlan).unwrap();
        assert_eq!(attrs.public_ip, "198.18.0.3".parse::<Ipv4Addr>().unwrap());
        assert_eq!(attrs.backend_type.as_deref(), Some("vxlan"));
        assert!(!attrs.is_udp());
        assert_eq!(attrs.backend_data.as_ref().unwrap()["VNI"], 1);
        assert_eq!(
            LeaseAttrs::parse(attrs.to_json().as_bytes()).unwrap(),
            attrs
        );

        let dual = br#"{"PublicIP":"198.18.0.4","PublicIPv6":"fc00::4","BackendType":"udp","BackendV6Data":null}"#;
        let attrs = LeaseAttrs::parse(dual).unwrap();
        assert_eq!(attrs.public_ipv6, Some("fc00::4".parse().unwrap()));
        assert!(attrs.is_udp());
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"198.18.0.4","PublicIPv6":"fc00::4","BackendType":"udp"}"#
        );
    }

    #[test]
    fn malformed_values_are_errors() {
        for value in [
            &b"not json"[..],
            b"[]",
            b"{}",
            b"{\"PublicIP\":null}",
            b"{\"PublicIP\":7}",
            b"{\"PublicIP\":\"198.18.0\"}",
            b"{\"PublicIP\":\"198.18.0.1\",\"PublicIPv6\":\"x\"}",
            b"{\"PublicIP\":\"198.18.0.1\",\"BackendType\":[]}",
            b"\xff\xfe",
        ] {
            assert!(
                LeaseAttrs::parse(value).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn prefix_paths() {
        for raw in [
            "/coreos.com/network",
            "/coreos.com/network/",
            "/coreos.com/network//",
        ] {
            let p = KeyPrefix::new(raw);
            assert_eq!(p.config_key(), "/coreos.com/network/config");
            assert_eq!(p.subnets_dir(), "/coreos.com/network/subnets/");
            assert_eq!(
                p.lease_key("10.1.74.0-24"),
                "/coreos.com/network/subnets/10.1.74.0-24"
            );
        }
        assert_eq!(KeyPrefix::new("/weft").config_key(), "/weft/config");
    }
}
