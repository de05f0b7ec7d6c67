//! IPv4 multicast and broadcast between weft hosts, opt-in per host: the pure core.
//!
//! Containers' multicast and broadcast frames reach weft through a TAP port of its own on the
//! container bridge. A relay thread (in [`crate::io`]) reads every frame the bridge floods to
//! it and asks [`relay`] what to do: IGMP feeds the [`membership`] of local groups; multicast
//! and broadcast sent by a local container are replicated as flannel-format datagrams to the
//! peers [`groups`] lists, within a [`rate`] limit. Multicast and broadcast received from a
//! validated peer is written into the TAP as an Ethernet frame ([`receive`]), and the bridge
//! hands it to the local members. UDP to the overlay Network's broadcast address reaches
//! weft through the TUN instead (containers route it to their gateway): the workers hand it to
//! the relay, which carries it as limited broadcast ([`network_broadcast`]). Nothing here does
//! I/O; time is passed in.

pub mod counters;
pub mod groups;
pub mod local;
pub mod membership;
pub mod network_broadcast;
pub mod rate;
pub mod receive;
pub mod relay;

pub use counters::{MulticastCounters, MulticastDrop, MulticastSnapshot};
pub use groups::{GroupTable, Groups, PeerMulticast};
pub use local::LocalGroups;

/// The default name of the TAP device.
pub const DEFAULT_TAP_NAME: &str = "weftmc0";

/// The default number of replicated packets per second.
pub const DEFAULT_RATE_LIMIT: u32 = 10_000;

/// How a host takes part in multicast and broadcast. `EngineConfig::multicast = None` turns
/// the whole feature off: no TAP, no relay, group traffic dropped as flannel does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MulticastConfig {
    /// The TAP device the engine creates and owns (control enslaves it to the bridge).
    pub tap_name: String,
    /// Replicate and deliver IPv4 multicast (224.0.0.0/4).
    pub multicast: bool,
    /// Replicate and deliver UDP broadcast (255.255.255.255 and the Network's broadcast).
    pub broadcast: bool,
    /// Datagrams the relay may send per second (each copy counts); the burst is a tenth of it.
    /// 0: no limit.
    pub rate_limit: u32,
}

impl Default for MulticastConfig {
    fn default() -> Self {
        Self {
            tap_name: DEFAULT_TAP_NAME.to_owned(),
            multicast: true,
            broadcast: false,
            rate_limit: DEFAULT_RATE_LIMIT,
        }
    }
}
