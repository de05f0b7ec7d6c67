//! Encryption between weft hosts, on the control side: what the network config and the
//! flags must agree on, this host's key, and the record task that publishes the public key
//! and keys the peers from the watch.
//!
//! Encryption is network-wide: `"Backend":{"Type":"udp","Encryption":"wireguard"}` in the
//! network config every host reads. A host that cannot encrypt (its key file unreadable or
//! readable by others, another I/O back end, multicast asked for) refuses to start; a lease
//! holder that publishes no key (a flanneld, an older weftd) gets nothing and is said so at
//! ERROR level and in `weft_encryption_peers{state="without_key"}`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use tokio::sync::watch;
use tracing::info;
use weft_engine::{StaticKeys, Tunnels, OVERHEAD};

use crate::backoff::Backoff;
use crate::config::{Encryption, NetworkConfig};
use crate::flags::{Flags, IoMode};
use crate::host_records::{run_host_records, RecordInputs, RecordSettings};
use crate::key_file::{encode_key, load_or_create, KeyFileError, KeyOrigin};
use crate::membership::MembershipHandle;
use crate::registry::Registry;

/// Why this host cannot take part in an encrypted network.
#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    /// The network config asks for a protocol this weftd does not know.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The private key cannot be had.
    #[error("the network config asks for encryption, but {0}")]
    Key(#[from] KeyFileError),
    /// A flag asks for something encryption does not cover.
    #[error("the network config asks for encryption, which {0}")]
    Flags(&'static str),
}

/// The bytes encryption adds to every datagram, which the TUN MTU gives up.
pub const MTU_OVERHEAD: u32 = OVERHEAD as u32;

/// The peers' tunnels with this host's key, if the network config asks for encryption;
/// `None` if it does not. Refuses what cannot work rather than run in plaintext.
pub fn prepare(flags: &Flags, config: &NetworkConfig) -> Result<Option<Tunnels>, EncryptionError> {
    let Some(Encryption::WireGuard) = config.encryption()? else {
        return Ok(None);
    };
    if flags.io != IoMode::Syscalls {
        return Err(EncryptionError::Flags(
            "runs on the syscalls I/O back end only (--io syscalls)",
        ));
    }
    if flags.multicast || flags.broadcast {
        return Err(EncryptionError::Flags(
            "does not cover the multicast relay yet: turn --multicast and --broadcast off",
        ));
    }
    let (private, origin) = load_or_create(&flags.encryption_key_file)?;
    let keys = StaticKeys::from_private(private);
    info!(
        key_file = %flags.encryption_key_file.display(),
        public_key = %encode_key(&keys.public()),
        created = origin == KeyOrigin::Created,
        "encryption between hosts on (WireGuard)"
    );
    Ok(Some(Tunnels::new(keys)))
}

/// Keep this host's record (with its public key) in etcd and the peers' keys in `tunnels`.
/// The returned handles end the task when dropped.
/// With `skip_inner_csum` the record also advertises that inner checksums may be left
/// partial, and the peers that advertise it are published to `partial_peers`: inside a
/// message that ChaCha20-Poly1305 authenticates, an inner checksum catches nothing the tag
/// does not.
pub fn start_records<R: Registry>(
    registry: R,
    membership: &MembershipHandle,
    routes: weft_engine::Routes,
    tunnels: &Tunnels,
    skip_inner_csum: bool,
    partial_peers: weft_engine::PartialPeers,
) -> (tokio::task::JoinHandle<()>, watch::Sender<Vec<Ipv4Addr>>) {
    // No multicast with encryption: the local groups never change, but the channel must stay
    // open for the task to run.
    let (local_groups, local_rx) = watch::channel(Vec::new());
    let task = run_host_records(
        registry,
        RecordSettings {
            multicast: false,
            broadcast: false,
            public_key: Some(tunnels.public_key()),
            skip_inner_csum,
            // A damaged datagram fails its authentication; the check's probes are not sealed.
            udp_gso_check: false,
            retry: Backoff::default(),
        },
        RecordInputs {
            lease: membership.lease(),
            local_groups: local_rx,
            routes,
            groups: weft_engine::Groups::default(),
            tunnels: Some(tunnels.clone()),
            partial_peers,
            gso_check: weft_engine::GsoCheck::default(),
        },
    );
    (task, local_groups)
}

/// The peers with and without a key, in Prometheus' text format.
pub fn render_prometheus(tunnels: &Tunnels, out: &mut String) {
    let keyed = tunnels.snapshot().len();
    let _ = writeln!(
        out,
        "# HELP weft_encryption_peers Lease holders by whether encryption can reach them (without_key: refused)."
    );
    let _ = writeln!(out, "# TYPE weft_encryption_peers gauge");
    let _ = writeln!(out, "weft_encryption_peers{{state=\"keyed\"}} {keyed}");
    let _ = writeln!(
        out,
        "weft_encryption_peers{{state=\"without_key\"}} {}",
        tunnels.peers_without_key()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn flags(args: &[&str]) -> Flags {
        Flags::try_parse_from(std::iter::once("weftd").chain(args.iter().copied())).unwrap()
    }

    const ENCRYPTED: &str =
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Encryption":"wireguard"}}"#;

    #[test]
    fn hosts_that_cannot_encrypt_are_refused() {
        let dir = std::env::temp_dir().join(format!("weft-enc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let key = dir.join("private.key");
        let key_flag = format!("--encryption-key-file={}", key.display());
        let plain = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16"}"#).unwrap();
        let encrypted = NetworkConfig::parse(ENCRYPTED).unwrap();
        assert!(prepare(&flags(&[&key_flag]), &plain).unwrap().is_none());
        assert!(!key.exists(), "no key is made without encryption");
        let tunnels = prepare(&flags(&[&key_flag]), &encrypted).unwrap().unwrap();
        let again = prepare(&flags(&[&key_flag]), &encrypted).unwrap().unwrap();
        assert_eq!(tunnels.public_key(), again.public_key(), "the key is kept");
        for (args, want) in [
            (vec!["--io=uring"], "syscalls I/O back end only"),
            (vec!["--multicast"], "multicast relay"),
        ] {
            let mut args = args;
            args.push(&key_flag);
            let err = prepare(&flags(&args), &encrypted).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        std::fs::write(&key, "garbage").unwrap();
        let err = prepare(&flags(&[&key_flag]), &encrypted)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("the network config asks for encryption, but private key file"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
