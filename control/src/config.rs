//! The network config that operators write to `<prefix>/config` in etcd.
//!
//! [`NetworkConfig::parse`] derives exactly the values flanneld derives from the same JSON
//! (subnet length, first and last leasable subnet, backend, udp port) and refuses what flanneld
//! refuses, plus one flannel bug: a `SubnetMin` above `SubnetMax`. Every refusal names the field
//! and the reason. [`NetworkConfig::check_supported`] then says whether weft, which runs only the
//! udp backend over IPv4, can run the network.
//!
//! Field names are matched as Go's `encoding/json` matches them: an exact match first, else any
//! case-insensitive one, so every config flanneld reads is read the same way here.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};
use weft_engine::Overlay;

/// The udp backend's port when the config names none.
pub const DEFAULT_UDP_PORT: u16 = 8285;

/// The backend a config without `Backend` runs.
pub const DEFAULT_BACKEND: &str = "udp";

/// Why a network config cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not JSON at all.
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    /// The JSON is not an object.
    #[error("network config must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// One field is missing, malformed or out of range.
    #[error("{field}: {reason}")]
    Field {
        /// The field as it is spelled in the config, e.g. `SubnetLen` or `Backend.Type`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    fn field(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Field {
            field,
            reason: reason.into(),
        }
    }

    /// The field the error is about, if it is about one.
    pub fn field_name(&self) -> Option<&'static str> {
        match self {
            Self::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// The IPv6 half of a dual-stack config. weft's udp backend does not run it, but the values are
/// derived as flanneld derives them so that a config is read identically.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Config {
    /// `IPv6Network`, host bits cleared.
    pub network: Ipv6Net,
    /// `IPv6SubnetLen`, defaulted.
    pub subnet_len: u8,
    /// `IPv6SubnetMin`, defaulted to the second subnet.
    pub subnet_min: Ipv6Addr,
    /// `IPv6SubnetMax`, defaulted to the last subnet.
    pub subnet_max: Ipv6Addr,
}

/// A parsed network config with flannel's defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// `Network` with host bits cleared, `SubnetLen`, `SubnetMin`, `SubnetMax`; `None` when
    /// `EnableIPv4` is false.
    ipv4: Option<Ipv4Range>,
    ipv6: Option<Ipv6Config>,
    backend_type: String,
    /// `Backend.Port` when the udp backend names one.
    port: Option<u16>,
    /// `Backend.Encryption` as written (weft's own field; flanneld ignores it).
    encryption: Option<String>,
}

/// The encryption between hosts a network config asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encryption {
    /// `"Encryption":"wireguard"`: every datagram between hosts is a WireGuard message.
    WireGuard,
}

/// The value of `Backend.Encryption` that turns on the WireGuard protocol.
pub const WIREGUARD: &str = "wireguard";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ipv4Range {
    network: Ipv4Net,
    subnet_len: u8,
    subnet_min: Ipv4Addr,
    subnet_max: Ipv4Addr,
}

impl NetworkConfig {
    /// Parse the JSON stored at `<prefix>/config` and fill in flannel's defaults.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(ConfigError::NotAnObject(json_kind(&value)));
        };

        let enable_ipv4 = opt_bool(&obj, "EnableIPv4")?.unwrap_or(true);
        let enable_ipv6 = opt_bool(&obj, "EnableIPv6")?.unwrap_or(false);

        // Go decodes every field before validating any, so a malformed field is refused even
        // when its half of the config is disabled.
        let network = opt_string(&obj, "Network")?
            .map(|s| parse_cidr4(s).ok_or_else(|| bad_cidr("Network", s)))
            .transpose()?;
        let subnet_len = opt_uint(&obj, "SubnetLen")?;
        let subnet_min = opt_ipv4(&obj, "SubnetMin")?;
        let subnet_max = opt_ipv4(&obj, "SubnetMax")?;
        let network6 = opt_string(&obj, "IPv6Network")?
            .map(|s| parse_cidr6(s).ok_or_else(|| bad_cidr("IPv6Network", s)))
            .transpose()?;
        let subnet_len6 = opt_uint(&obj, "IPv6SubnetLen")?;
        let subnet_min6 = opt_ipv6(&obj, "IPv6SubnetMin")?;
        let subnet_max6 = opt_ipv6(&obj, "IPv6SubnetMax")?;
        let (backend_type, port) = parse_backend(field(&obj, "Backend"))?;
        let encryption = match field(&obj, "Backend") {
            Some(Value::Object(backend)) => opt_string(backend, "Encryption")
                .map_err(|e| rename(e, "Backend.Encryption"))?
                .map(str::to_owned),
            _ => None,
        };

        let ipv4 = if enable_ipv4 {
            let network = network.ok_or_else(|| {
                ConfigError::field(
                    "Network",
                    "missing; the config must name the overlay network, e.g. \"10.1.0.0/16\"",
                )
            })?;
            Some(derive_ipv4(network, subnet_len, subnet_min, subnet_max)?)
        } else {
            None
        };
        let ipv6 = if enable_ipv6 {
            let network = network6.ok_or_else(|| {
                ConfigError::field(
                    "IPv6Network",
                    "missing; EnableIPv6 needs an IPv6 network, e.g. \"fc00::/48\"",
                )
            })?;
            Some(derive_ipv6(network, subnet_len6, subnet_min6, subnet_max6)?)
        } else {
            None
        };

        Ok(Self {
            ipv4,
            ipv6,
            backend_type,
            port,
            encryption,
        })
    }

    /// Refuse what weft cannot run: any backend but udp, a network without IPv4, IPv6, or a
    /// network with more subnets than the route table holds.
    pub fn check_supported(&self) -> Result<(), ConfigError> {
        if self.backend_type != "udp" {
            return Err(ConfigError::field(
                "Backend.Type",
                format!(
                    "weft runs only the udp backend, got {:?}",
                    self.backend_type
                ),
            ));
        }
        if self.ipv4.is_none() {
            return Err(ConfigError::field(
                "EnableIPv4",
                "must be true: the udp backend carries IPv4",
            ));
        }
        if self.ipv6.is_some() {
            return Err(ConfigError::field(
                "EnableIPv6",
                "the udp backend carries only IPv4; remove EnableIPv6 or set it to false",
            ));
        }
        self.encryption()?;
        self.overlay().map(|_| ())
    }

    /// The overlay shape the route table uses: the IPv4 Network cut into `SubnetLen` subnets.
    pub fn overlay(&self) -> Result<Overlay, ConfigError> {
        let range = self.ipv4.ok_or_else(|| {
            ConfigError::field("EnableIPv4", "must be true: the udp backend carries IPv4")
        })?;
        Overlay::new(range.network, range.subnet_len)
            .map_err(|e| ConfigError::field("SubnetLen", e.to_string()))
    }

    /// The udp port every host sends to and listens on.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(DEFAULT_UDP_PORT)
    }

    /// `Backend.Port` as written in the config, if the udp backend names one.
    pub fn explicit_port(&self) -> Option<u16> {
        self.port
    }

    /// The encryption between hosts `Backend.Encryption` asks for: none when it is absent or
    /// null; an error for a protocol this weftd does not know, so that such a host never joins
    /// in plaintext.
    pub fn encryption(&self) -> Result<Option<Encryption>, ConfigError> {
        match self.encryption.as_deref() {
            None => Ok(None),
            Some(WIREGUARD) => Ok(Some(Encryption::WireGuard)),
            Some(other) => Err(ConfigError::field(
                "Backend.Encryption",
                format!("this weftd encrypts only with \"{WIREGUARD}\", got {other:?}"),
            )),
        }
    }

    /// `Backend.Type`: `udp` when the config has no `Backend`.
    pub fn backend_type(&self) -> &str {
        &self.backend_type
    }

    /// The IPv4 overlay Network with host bits cleared, if IPv4 is enabled.
    pub fn network(&self) -> Option<Ipv4Net> {
        self.ipv4.map(|r| r.network)
    }

    /// The prefix length of each host subnet (0 when IPv4 is disabled, as in flannel).
    pub fn subnet_len(&self) -> u8 {
        self.ipv4.map_or(0, |r| r.subnet_len)
    }

    /// The lowest subnet address that may be leased (0.0.0.0 when IPv4 is disabled).
    pub fn subnet_min(&self) -> Ipv4Addr {
        self.ipv4.map_or(Ipv4Addr::UNSPECIFIED, |r| r.subnet_min)
    }

    /// The highest subnet address that may be leased (0.0.0.0 when IPv4 is disabled).
    pub fn subnet_max(&self) -> Ipv4Addr {
        self.ipv4.map_or(Ipv4Addr::UNSPECIFIED, |r| r.subnet_max)
    }

    /// Whether IPv4 is enabled (`EnableIPv4`, default true).
    pub fn enable_ipv4(&self) -> bool {
        self.ipv4.is_some()
    }

    /// The IPv6 half, when `EnableIPv6` is true.
    pub fn ipv6(&self) -> Option<&Ipv6Config> {
        self.ipv6.as_ref()
    }

    /// Whether `subnet` may be leased under this config: the configured length, aligned, and
    /// between `SubnetMin` and `SubnetMax` (flannel's "compatible with the config" test).
    pub fn fits(&self, subnet: Ipv4Net) -> bool {
        self.ipv4.is_some_and(|r| {
            subnet.prefix_len() == r.subnet_len
                && subnet.network() == subnet.addr()
                && subnet.addr() >= r.subnet_min
                && subnet.addr() <= r.subnet_max
        })
    }

    /// Every leasable subnet, from `SubnetMin` up to `SubnetMax`, in address order.
    pub fn leasable_subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let (first, last, len) = match self.ipv4 {
            Some(r) => (
                u64::from(u32::from(r.subnet_min)),
                u64::from(u32::from(r.subnet_max)),
                r.subnet_len,
            ),
            None => (1, 0, 32),
        };
        let step = 1u64 << (32 - u32::from(len));
        (0..)
            .map(move |i: u64| first + i * step)
            .take_while(move |addr| *addr <= last)
            // `addr <= last < 2^32` makes the conversion lossless; the fallback never runs.
            .filter_map(move |addr| Ipv4Net::new(Ipv4Addr::from(addr as u32), len).ok())
    }
}

/// flanneld's own summary line of a parsed config, used to compare with its output.
impl fmt::Display for NetworkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (len6, min6, max6) = match &self.ipv6 {
            Some(c) => (
                c.subnet_len,
                c.subnet_min.to_string(),
                c.subnet_max.to_string(),
            ),
            None => (0, "<nil>".to_owned(), "<nil>".to_owned()),
        };
        write!(
            f,
            "BackendType={} SubnetLen={} SubnetMin={} SubnetMax={} EnableIPv4={} EnableIPv6={} \
             IPv6SubnetLen={} IPv6SubnetMin={} IPv6SubnetMax={} Port={}{}",
            self.backend_type,
            self.subnet_len(),
            self.subnet_min(),
            self.subnet_max(),
            self.enable_ipv4(),
            self.ipv6.is_some(),
            len6,
            min6,
            max6,
            self.port.map(|p| p.to_string()).unwrap_or_default(),
            self.encryption
                .as_ref()
                .map(|e| format!(" Encryption={e}"))
                .unwrap_or_default(),
        )
    }
}

fn derive_ipv4(
    network: Ipv4Net,
    subnet_len: Option<u64>,
    subnet_min: Option<Ipv4Addr>,
    subnet_max: Option<Ipv4Addr>,
) -> Result<Ipv4Range, ConfigError> {
    let prefix = network.prefix_len();
    // flannel treats 0 like an absent field.
    let subnet_len = match subnet_len.filter(|len| *len != 0) {
        Some(len) if len > 30 => {
            return Err(ConfigError::field(
                "SubnetLen",
                format!("must be at most 30 (a host needs room for a tunnel and a bridge address), got {len}"),
            ));
        }
        Some(len) if len < u64::from(prefix) + 2 => {
            return Err(ConfigError::field(
                "SubnetLen",
                format!(
                    "must be at least {} so that {network} holds at least four subnets, got {len}",
                    prefix + 2
                ),
            ));
        }
        // Checked above to be at most 30.
        Some(len) => len as u8,
        None if prefix > 28 => {
            return Err(ConfigError::field(
                "Network",
                format!("{network} is too small: the prefix must be /28 or shorter"),
            ));
        }
        None if prefix <= 22 => 24,
        None => prefix + 2,
    };

    let size = 1u64 << (32 - u32::from(subnet_len));
    let start = u64::from(u32::from(network.network()));
    let end = start + (1u64 << (32 - u32::from(prefix)));
    let subnet_min = match subnet_min.filter(|a| !a.is_unspecified()) {
        None => ipv4_from(start + size),
        Some(a) if !network.contains(&a) => {
            return Err(ConfigError::field(
                "SubnetMin",
                format!("{a} is not in the Network {network}"),
            ));
        }
        Some(a) => a,
    };
    let subnet_max = match subnet_max.filter(|a| !a.is_unspecified()) {
        None => ipv4_from(end - size),
        Some(a) if !network.contains(&a) => {
            return Err(ConfigError::field(
                "SubnetMax",
                format!("{a} is not in the Network {network}"),
            ));
        }
        Some(a) => a,
    };
    for (field, addr) in [("SubnetMin", subnet_min), ("SubnetMax", subnet_max)] {
        if u64::from(u32::from(addr)) % size != 0 {
            return Err(ConfigError::field(
                field,
                format!("{addr} is not on a /{subnet_len} (SubnetLen) boundary"),
            ));
        }
    }
    if subnet_min > subnet_max {
        return Err(ConfigError::field(
            "SubnetMin",
            format!("{subnet_min} is above SubnetMax {subnet_max}: no subnet could be leased"),
        ));
    }
    Ok(Ipv4Range {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

fn derive_ipv6(
    network: Ipv6Net,
    subnet_len: Option<u64>,
    subnet_min: Option<Ipv6Addr>,
    subnet_max: Option<Ipv6Addr>,
) -> Result<Ipv6Config, ConfigError> {
    let prefix = network.prefix_len();
    let subnet_len = match subnet_len.filter(|len| *len != 0) {
        Some(len) if len > 126 => {
            return Err(ConfigError::field(
                "IPv6SubnetLen",
                format!("must be at most 126, got {len}"),
            ));
        }
        Some(len) if len < u64::from(prefix) + 2 => {
            return Err(ConfigError::field(
                "IPv6SubnetLen",
                format!(
                    "must be at least {} so that {network} holds at least four subnets, got {len}",
                    prefix + 2
                ),
            ));
        }
        // Checked above to be at most 126.
        Some(len) => len as u8,
        None if prefix > 124 => {
            return Err(ConfigError::field(
                "IPv6Network",
                format!("{network} is too small: the prefix must be /124 or shorter"),
            ));
        }
        None if prefix <= 62 => 64,
        None => prefix + 2,
    };

    // subnet_len <= 126, so the shifts stay below 128.
    let size = 1u128 << (128 - u32::from(subnet_len));
    let start = u128::from(network.network());
    let last_addr = u128::from(network.broadcast());
    let subnet_min = match subnet_min.filter(|a| !a.is_unspecified()) {
        None => Ipv6Addr::from(start + size),
        Some(a) if !network.contains(&a) => {
            return Err(ConfigError::field(
                "IPv6SubnetMin",
                format!("{a} is not in the IPv6Network {network}"),
            ));
        }
        Some(a) => a,
    };
    let subnet_max = match subnet_max.filter(|a| !a.is_unspecified()) {
        // The last subnet starts `size` below the end; `last_addr + 1` may overflow for ::/0.
        None => Ipv6Addr::from(last_addr - (size - 1)),
        Some(a) if !network.contains(&a) => {
            return Err(ConfigError::field(
                "IPv6SubnetMax",
                format!("{a} is not in the IPv6Network {network}"),
            ));
        }
        Some(a) => a,
    };
    for (field, addr) in [("IPv6SubnetMin", subnet_min), ("IPv6SubnetMax", subnet_max)] {
        if u128::from(addr) % size != 0 {
            return Err(ConfigError::field(
                field,
                format!("{addr} is not on a /{subnet_len} (IPv6SubnetLen) boundary"),
            ));
        }
    }
    if subnet_min > subnet_max {
        return Err(ConfigError::field(
            "IPv6SubnetMin",
            format!("{subnet_min} is above IPv6SubnetMax {subnet_max}: no subnet could be leased"),
        ));
    }
    Ok(Ipv6Config {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

/// `Backend` → (type, udp port). A missing or null `Backend` is `{"Type":"udp"}`.
fn parse_backend(backend: Option<&Value>) -> Result<(String, Option<u16>), ConfigError> {
    let obj = match backend {
        None | Some(Value::Null) => return Ok((DEFAULT_BACKEND.to_owned(), None)),
        Some(Value::Object(obj)) => obj,
        Some(other) => {
            return Err(ConfigError::field(
                "Backend",
                format!(
                    "must be an object like {{\"Type\":\"udp\"}}, got {}",
                    json_kind(other)
                ),
            ));
        }
    };
    let backend_type = opt_string(obj, "Type")
        .map_err(|e| rename(e, "Backend.Type"))?
        .unwrap_or_default()
        .to_owned();
    // Other backends give `Port` other meanings; only udp's is read.
    let port = if backend_type == "udp" {
        match opt_uint(obj, "Port").map_err(|e| rename(e, "Backend.Port"))? {
            None => None,
            Some(p @ 1..=65535) => Some(p as u16),
            Some(p) => {
                return Err(ConfigError::field(
                    "Backend.Port",
                    format!("must be a udp port between 1 and 65535, got {p}"),
                ));
            }
        }
    } else {
        None
    };
    Ok((backend_type, port))
}

fn rename(err: ConfigError, field: &'static str) -> ConfigError {
    match err {
        ConfigError::Field { reason, .. } => ConfigError::Field { field, reason },
        other => other,
    }
}

/// The value of `name` in `obj` the way Go's `encoding/json` finds it: the exact key if present,
/// else the first key equal to it ignoring ASCII case.
pub(crate) fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    })
}

/// A short name for the kind of a JSON value, for error messages.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// Go leaves a field at its default when the JSON value is null, so null reads as absent.
fn present<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    field(obj, name).filter(|v| !v.is_null())
}

fn opt_bool(obj: &Map<String, Value>, name: &'static str) -> Result<Option<bool>, ConfigError> {
    match present(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ConfigError::field(
            name,
            format!("must be true or false, got {}", json_kind(other)),
        )),
    }
}

fn opt_string<'a>(
    obj: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, ConfigError> {
    match present(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ConfigError::field(
            name,
            format!("must be a string, got {}", json_kind(other)),
        )),
    }
}

fn opt_uint(obj: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, ConfigError> {
    match present(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ConfigError::field(name, format!("must be a non-negative integer, got {n}"))
        }),
        Some(other) => Err(ConfigError::field(
            name,
            format!("must be a non-negative integer, got {}", json_kind(other)),
        )),
    }
}

fn opt_ipv4(obj: &Map<String, Value>, name: &'static str) -> Result<Option<Ipv4Addr>, ConfigError> {
    opt_string(obj, name)?
        .map(|s| {
            s.parse()
                .map_err(|_| ConfigError::field(name, format!("invalid IPv4 address: {s:?}")))
        })
        .transpose()
}

fn opt_ipv6(obj: &Map<String, Value>, name: &'static str) -> Result<Option<Ipv6Addr>, ConfigError> {
    opt_string(obj, name)?
        .map(|s| {
            s.parse()
                .map_err(|_| ConfigError::field(name, format!("invalid IPv6 address: {s:?}")))
        })
        .transpose()
}

fn bad_cidr(name: &'static str, s: &str) -> ConfigError {
    ConfigError::field(
        name,
        format!("invalid CIDR address {s:?}: expected an address and a prefix length"),
    )
}

/// A CIDR as Go's `net.ParseCIDR` reads it, host bits cleared.
fn parse_cidr4(s: &str) -> Option<Ipv4Net> {
    s.parse::<Ipv4Net>().ok().map(|n| n.trunc())
}

fn parse_cidr6(s: &str) -> Option<Ipv6Net> {
    s.parse::<Ipv6Net>().ok().map(|n| n.trunc())
}

fn ipv4_from(addr: u64) -> Ipv4Addr {
    // Callers pass addresses inside a parsed IPv4 network, which are below 2^32.
    Ipv4Addr::from(addr as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::subnet::fixture;

    /// The one row flannel accepts and weft refuses (flannel then leases nothing).
    const MIN_ABOVE_MAX: &str =
        r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.20.0","SubnetMax":"10.1.10.0"}"#;

    /// For each row flannel refuses, the field weft's message must name.
    fn expected_field(config: &str) -> Option<&'static str> {
        serde_json::from_str::<Value>(config).ok()?;
        Some(match config {
            c if c.contains("\"SubnetLen\"") => "SubnetLen",
            c if c.contains("\"SubnetMin\"") => "SubnetMin",
            c if c.contains("\"SubnetMax\"") => "SubnetMax",
            c if c.contains("EnableIPv6") => "IPv6Network",
            c if c.contains("\"Backend\"") => "Backend",
            c if c.contains("Network") => "Network",
            "{}" => "Network",
            _ => return None,
        })
    }

    #[test]
    fn encryption_is_read_from_the_backend_and_unknown_protocols_are_refused() {
        let plain = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16"}"#).unwrap();
        assert_eq!(plain.encryption().unwrap(), None);
        let on = NetworkConfig::parse(
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Encryption":"wireguard"}}"#,
        )
        .unwrap();
        assert_eq!(on.encryption().unwrap(), Some(Encryption::WireGuard));
        on.check_supported().unwrap();
        assert!(on.to_string().ends_with(" Encryption=wireguard"), "{on}");
        let null = NetworkConfig::parse(
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Encryption":null}}"#,
        )
        .unwrap();
        assert_eq!(null.encryption().unwrap(), None);
        let other = NetworkConfig::parse(
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Encryption":"ipsec"}}"#,
        )
        .unwrap();
        assert_eq!(
            other.check_supported().unwrap_err().to_string(),
            "Backend.Encryption: this weftd encrypts only with \"wireguard\", got \"ipsec\""
        );
        let err = NetworkConfig::parse(
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Encryption":true}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("Backend.Encryption: must be a string"),
            "{err}"
        );
    }

    #[test]
    fn every_fixture_row_is_derived_or_refused_like_flannel() {
        let text = fixture("config-defaults.tsv");
        let mut rows = 0;
        for line in text.lines().skip(1).filter(|l| !l.is_empty()) {
            let mut cols = line.split('\t');
            let (Some(config), Some(outcome), Some(result)) =
                (cols.next(), cols.next(), cols.next())
            else {
                panic!("malformed fixture row: {line:?}");
            };
            rows += 1;
            let parsed = NetworkConfig::parse(config);
            match outcome {
                "OK" if config == MIN_ABOVE_MAX => {
                    let err = parsed.expect_err("SubnetMin above SubnetMax must be refused");
                    assert_eq!(err.field_name(), Some("SubnetMin"), "{err}");
                    assert!(err.to_string().contains("above SubnetMax"), "{err}");
                }
                "OK" => {
                    let cfg = parsed.unwrap_or_else(|e| panic!("{config}: refused: {e}"));
                    assert_eq!(cfg.to_string(), result, "derived values for {config}");
                }
                "ERROR" => {
                    let err = parsed.expect_err(config);
                    let message = err.to_string();
                    match expected_field(config) {
                        Some(field) => {
                            assert_eq!(err.field_name(), Some(field), "{config}: {message}")
                        }
                        None => assert!(matches!(err, ConfigError::Json(_)), "{config}: {err:?}"),
                    }
                    assert!(message.len() > 12, "{config}: message too terse: {message}");
                }
                other => panic!("unknown outcome {other:?} in {line:?}"),
            }
        }
        assert_eq!(rows, 34, "the fixture has 34 rows; did it change?");
    }

    #[test]
    fn messages_name_the_field_and_the_reason() {
        let cases = [
            (
                r#"{"Network":"10.1.0.0/16","SubnetLen":31}"#,
                "SubnetLen: must be at most 30 (a host needs room for a tunnel and a bridge address), got 31",
            ),
            (
                r#"{"Network":"10.1.0.0/16","SubnetLen":16}"#,
                "SubnetLen: must be at least 18 so that 10.1.0.0/16 holds at least four subnets, got 16",
            ),
            (
                r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.10.5"}"#,
                "SubnetMin: 10.1.10.5 is not on a /24 (SubnetLen) boundary",
            ),
            (
                r#"{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}"#,
                "SubnetMin: 10.2.0.0 is not in the Network 10.1.0.0/16",
            ),
            (
                r#"{"Network":"10.1.0.0/29"}"#,
                "Network: 10.1.0.0/29 is too small: the prefix must be /28 or shorter",
            ),
            (
                r#"{"Network":"bogus"}"#,
                "Network: invalid CIDR address \"bogus\": expected an address and a prefix length",
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":"udp"}"#,
                "Backend: must be an object like {\"Type\":\"udp\"}, got a string",
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Port":0}}"#,
                "Backend.Port: must be a udp port between 1 and 65535, got 0",
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":7}}"#,
                "Backend.Type: must be a string, got a number",
            ),
            (
                r#"{"Network":"10.1.0.0/16","SubnetLen":-1}"#,
                "SubnetLen: must be a non-negative integer, got -1",
            ),
            ("[1]", "network config must be a JSON object, got an array"),
        ];
        for (config, expected) in cases {
            assert_eq!(
                NetworkConfig::parse(config).unwrap_err().to_string(),
                expected
            );
        }
    }

    #[test]
    fn field_names_match_like_go() {
        let cfg = NetworkConfig::parse(
            r#"{"network":"10.1.0.0/16","subnetlen":26,"backend":{"type":"udp","port":9000}}"#,
        )
        .unwrap();
        assert_eq!(cfg.network(), Some("10.1.0.0/16".parse().unwrap()));
        assert_eq!(cfg.subnet_len(), 26);
        assert_eq!(cfg.port(), 9000);
        // An exact match wins over a case-insensitive one.
        let cfg =
            NetworkConfig::parse(r#"{"network":"10.9.0.0/16","Network":"10.1.0.0/16"}"#).unwrap();
        assert_eq!(cfg.network(), Some("10.1.0.0/16".parse().unwrap()));
        // null is the default, as in Go.
        let cfg =
            NetworkConfig::parse(r#"{"Network":"10.1.0.0/16","Backend":null,"SubnetLen":null}"#)
                .unwrap();
        assert_eq!((cfg.backend_type(), cfg.subnet_len()), ("udp", 24));
    }

    #[test]
    fn supported_is_udp_over_ipv4_only() {
        let ok = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16"}"#).unwrap();
        ok.check_supported().unwrap();
        assert_eq!(ok.port(), 8285);
        let overlay = ok.overlay().unwrap();
        assert_eq!(overlay.network(), "10.1.0.0/16".parse::<Ipv4Net>().unwrap());
        assert_eq!(overlay.subnet_len(), 24);

        let refused = [
            (
                r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#,
                "Backend.Type: weft runs only the udp backend, got \"vxlan\"",
            ),
            (
                r#"{"Network":"10.1.0.0/16","Backend":{}}"#,
                "Backend.Type: weft runs only the udp backend, got \"\"",
            ),
            (
                r#"{"EnableIPv4":false}"#,
                "EnableIPv4: must be true: the udp backend carries IPv4",
            ),
            (
                r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#,
                "EnableIPv6: the udp backend carries only IPv4; remove EnableIPv6 or set it to false",
            ),
        ];
        for (config, expected) in refused {
            let cfg = NetworkConfig::parse(config).unwrap();
            assert_eq!(cfg.check_supported().unwrap_err().to_string(), expected);
        }
        // Parsed fine by flannel's rules, but more subnets than the route table holds.
        let huge = NetworkConfig::parse(r#"{"Network":"0.0.0.0/0","SubnetLen":30}"#).unwrap();
        assert_eq!(
            huge.check_supported().unwrap_err().field_name(),
            Some("SubnetLen")
        );
    }

    #[test]
    fn leasable_subnets_run_from_min_to_max() {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.1.0.0/24"}"#).unwrap();
        let all: Vec<String> = cfg.leasable_subnets().map(|n| n.to_string()).collect();
        assert_eq!(all, ["10.1.0.64/26", "10.1.0.128/26", "10.1.0.192/26"]);
        let top = NetworkConfig::parse(r#"{"Network":"255.255.255.0/24","SubnetLen":30}"#).unwrap();
        assert_eq!(top.leasable_subnets().count(), 63);
        assert_eq!(
            top.leasable_subnets().last(),
            Some("255.255.255.252/30".parse().unwrap())
        );
    }

    #[test]
    fn fits_is_flannels_compatibility_test() {
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.10.0","SubnetMax":"10.1.20.0"}"#,
        )
        .unwrap();
        for (subnet, fits) in [
            ("10.1.10.0/24", true),
            ("10.1.20.0/24", true),
            ("10.1.15.0/24", true),
            ("10.1.9.0/24", false),
            ("10.1.21.0/24", false),
            ("10.1.15.0/25", false),
            ("10.1.15.0/23", false),
            ("10.2.15.0/24", false),
        ] {
            assert_eq!(cfg.fits(subnet.parse().unwrap()), fits, "{subnet}");
        }
        let host_bits: Ipv4Net = "10.1.15.7/24".parse().unwrap();
        assert!(!cfg.fits(host_bits));
    }
}
