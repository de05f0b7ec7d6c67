//! weft's control plane: everything weftd does besides forwarding packets.
//!
//! It leases this host's subnet in etcd exactly as flanneld (udp backend) does, keeps the
//! lease renewed, watches the other hosts' leases and publishes them to the engine as a route
//! table, configures the TUN device and routes through netlink, writes subnet.env, and serves
//! health and metrics. Pure parts (config, keys and values, allocation, subnet.env, iptables
//! rules) do no I/O and are tested without root; the rest talks to etcd, netlink and the kernel.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alloc;
pub mod backoff;
pub mod bridge_port;
pub mod config;
pub mod daemon;
pub mod data_loss;
pub mod encryption;
pub mod flags;
pub mod host_record;
pub mod host_records;
pub mod http;
pub mod iface;
pub mod iptables;
pub mod keeper;
pub mod key_file;
pub mod lease;
pub mod membership;
#[cfg(any(test, feature = "test-support"))]
pub mod memory_registry;
pub mod metrics;
pub mod netconf;
pub mod netlink;
pub mod notify;
pub mod own_lease;
pub mod registry;
pub mod secret;
pub mod subnet;
pub mod subnet_change;
pub mod subnet_env;
pub mod watch;
