//! Holding this host's subnet lease in etcd.
//!
//! The lease keeper acquires a subnet by flannel's rules ([`crate::alloc`]), writes it with
//! "create if absent" attached to an etcd lease (24 h by default), renews it at expiry minus the
//! renew margin, and retries a failed renewal every minute. Where flanneld gives up, weft goes
//! on: a lost creation race is retried with a fresh listing, an unreachable etcd is retried
//! with backoff, and a lease that disappears (deleted, expired, taken over) is re-acquired,
//! preferring the same subnet, while the data plane keeps forwarding with the routes it has.
//! It learns of a disappearance from the peer watcher ([`crate::watch`]) through
//! [`crate::own_lease`]; the membership module runs the two together.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::alloc::{self, Occupied, Pick};
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::data_loss::StoreHistory;
use crate::metrics::{ControlMetrics, EtcdOp};
use crate::own_lease::{Lease, OwnLeaseGone};
use crate::registry::{Expect, RawLease, Registry, RegistryError};
use crate::subnet::{lease_key_name, LeaseAttrs, LeaseKey};

/// flannel's lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// flannel's `--subnet-lease-renew-margin` default, 60 minutes.
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(60 * 60);
/// flannel retries a failed renewal after a minute.
pub const DEFAULT_RENEW_RETRY: Duration = Duration::from_secs(60);
/// flannel's number of creation attempts before it gives up; weft then backs off and goes on.
pub const DEFAULT_RACE_ATTEMPTS: u32 = 10;

/// How the lease keeper behaves. [`Settings::new`] gives flannel's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// This host's public IP (`--public-ip`, or the external interface's address).
    pub public_ip: Ipv4Addr,
    /// The subnet named by the previous subnet.env, preferred when it is free.
    pub previous_subnet: Option<Ipv4Net>,
    /// The TTL of the etcd lease a subnet is attached to.
    pub lease_ttl: Duration,
    /// Renew this long before expiry (`--subnet-lease-renew-margin`).
    pub renew_margin: Duration,
    /// After a failed renewal, try again after this long.
    pub renew_retry: Duration,
    /// Retries while etcd is unreachable or the network is full.
    pub retry: Backoff,
    /// Lost creation races retried at once before backing off.
    pub race_attempts: u32,
}

/// Settings that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The renew margin is outside flannel's 1–1439 minutes.
    #[error("--subnet-lease-renew-margin must be between 1 and 1439 minutes, got {0}")]
    RenewMarginMinutes(u64),
    /// The renew margin leaves no time between renewals.
    #[error("the renew margin ({margin:?}) must be shorter than the lease TTL ({ttl:?})")]
    MarginNotBelowTtl {
        /// The margin.
        margin: Duration,
        /// The TTL.
        ttl: Duration,
    },
    /// A duration that must be positive is zero.
    #[error("{0} must be longer than zero")]
    Zero(&'static str),
}

impl Settings {
    /// flannel's behaviour for a host with `public_ip`: 24 h leases renewed an hour before
    /// they expire, a failed renewal retried every minute.
    pub fn new(public_ip: Ipv4Addr) -> Self {
        Self {
            public_ip,
            previous_subnet: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            renew_margin: DEFAULT_RENEW_MARGIN,
            renew_retry: DEFAULT_RENEW_RETRY,
            retry: Backoff::default(),
            race_attempts: DEFAULT_RACE_ATTEMPTS,
        }
    }

    /// `--subnet-lease-renew-margin` (minutes, 1–1439) as a duration.
    pub fn renew_margin_from_minutes(minutes: u64) -> Result<Duration, SettingsError> {
        if (1..=1439).contains(&minutes) {
            Ok(Duration::from_secs(minutes * 60))
        } else {
            Err(SettingsError::RenewMarginMinutes(minutes))
        }
    }

    /// Check that the settings can work.
    pub fn validate(&self) -> Result<(), SettingsError> {
        for (name, d) in [
            ("the lease TTL", self.lease_ttl),
            ("the renew margin", self.renew_margin),
            ("the renewal retry interval", self.renew_retry),
            ("the initial retry delay", self.retry.initial),
        ] {
            if d.is_zero() {
                return Err(SettingsError::Zero(name));
            }
        }
        if self.renew_margin >= self.lease_ttl {
            return Err(SettingsError::MarginNotBelowTtl {
                margin: self.renew_margin,
                ttl: self.lease_ttl,
            });
        }
        Ok(())
    }
}

/// The generator for the random subnet pick. The OS source is preferred; if it fails, the
/// clock and the process id still spread hosts that start together.
fn random_source() -> StdRng {
    StdRng::from_rng(rand::rngs::OsRng).unwrap_or_else(|_| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        StdRng::seed_from_u64(nanos ^ u64::from(std::process::id()).rotate_left(32))
    })
}

/// The lease this keeper holds.
#[derive(Clone, Debug)]
struct Held {
    subnet: Ipv4Net,
    /// 0 for a reservation.
    etcd_lease: i64,
    /// The revision at which the key became ours; a disappearance seen earlier is stale.
    revision: i64,
    /// When it expires unless renewed; `None` for a reservation.
    expires: Option<Expiry>,
}

/// When a lease expires unless renewed, and when to renew it.
#[derive(Clone, Copy, Debug)]
struct Expiry {
    renew_at: Instant,
    at: SystemTime,
}

impl Expiry {
    /// A lease that lives `ttl` from now is renewed `margin` before it expires, or half-way if
    /// its TTL is not longer than the margin (a lease adopted from a host with shorter ones).
    fn new(ttl: Duration, margin: Duration) -> Self {
        let wait = if ttl > margin { ttl - margin } else { ttl / 2 };
        Self {
            renew_at: Instant::now() + wait,
            at: SystemTime::now() + ttl,
        }
    }
}

enum AcquireError {
    /// Another host wrote the key first, or it changed under us.
    LostRace,
    Exhausted,
    Registry(RegistryError),
}

impl From<RegistryError> for AcquireError {
    fn from(e: RegistryError) -> Self {
        Self::Registry(e)
    }
}

/// The lease keeper: acquires, renews and re-acquires this host's lease, publishing it on
/// `lease`.
pub(crate) struct Keeper<R> {
    registry: R,
    config: NetworkConfig,
    settings: Settings,
    lease: watch::Sender<Option<Lease>>,
    gone: mpsc::UnboundedReceiver<OwnLeaseGone>,
    rng: StdRng,
    history: StoreHistory,
    metrics: Arc<ControlMetrics>,
}

/// What the keeper shares with the watcher besides the lease itself.
pub(crate) struct Shared {
    /// The newest revision seen, to notice that etcd lost its data.
    pub history: StoreHistory,
    /// The control plane's metrics.
    pub metrics: Arc<ControlMetrics>,
}

impl<R: Registry> Keeper<R> {
    /// A keeper that publishes on `lease` and hears of a lost lease on `gone`.
    pub(crate) fn new(
        registry: R,
        config: NetworkConfig,
        settings: Settings,
        lease: watch::Sender<Option<Lease>>,
        gone: mpsc::UnboundedReceiver<OwnLeaseGone>,
        shared: Shared,
    ) -> Self {
        Self {
            registry,
            config,
            settings,
            lease,
            gone,
            rng: random_source(),
            history: shared.history,
            metrics: shared.metrics,
        }
    }

    /// Hold a lease forever.
    pub(crate) async fn run(mut self) {
        let mut preferred = self.settings.previous_subnet;
        loop {
            let held = self.acquire(preferred).await;
            preferred = Some(held.subnet);
            self.metrics.lease_acquired();
            self.publish(&held);
            let why = self.hold(held.clone()).await;
            self.metrics.lease_lost();
            warn!(
                "lease for {} lost: {why}; re-acquiring (the same subnet if it is still free) while forwarding goes on",
                held.subnet
            );
        }
    }

    fn publish(&self, held: &Held) {
        self.metrics.set_lease_expiry(held.expires.map(|e| e.at));
        self.lease.send_replace(Some(Lease {
            subnet: held.subnet,
            public_ip: self.settings.public_ip,
            expires: held.expires.map(|e| e.at),
            etcd_lease: held.etcd_lease,
        }));
    }

    /// Acquire a lease, retrying until it succeeds.
    async fn acquire(&mut self, preferred: Option<Ipv4Net>) -> Held {
        let mut delays = self.settings.retry.delays();
        let mut races = 0;
        loop {
            match self.try_acquire(preferred).await {
                Ok(held) => return held,
                Err(AcquireError::LostRace) => {
                    races += 1;
                    if races < self.settings.race_attempts {
                        debug!("another host took the subnet first; choosing again");
                        continue;
                    }
                    races = 0;
                    let wait = delays.next_delay();
                    warn!(
                        "lost {} races for a subnet in a row; trying again in {wait:?}",
                        self.settings.race_attempts
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(AcquireError::Exhausted) => {
                    let wait = delays.next_delay();
                    error!(
                        "no free subnet between {} and {}; trying again in {wait:?}",
                        self.config.subnet_min(),
                        self.config.subnet_max()
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(AcquireError::Registry(e)) => {
                    let wait = delays.next_delay();
                    warn!("cannot acquire a lease, etcd unreachable? ({e}); retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn try_acquire(&mut self, preferred: Option<Ipv4Net>) -> Result<Held, AcquireError> {
        let snapshot = self.registry.leases().await.inspect_err(|_| {
            self.metrics.etcd_error(EtcdOp::List);
        })?;
        self.history.saw(snapshot.revision);
        let mut occupied = Vec::with_capacity(snapshot.leases.len());
        let mut raws: Vec<&RawLease> = Vec::with_capacity(snapshot.leases.len());
        for raw in &snapshot.leases {
            let Ok(key) = LeaseKey::parse(&raw.name) else {
                // It cannot collide with any key weft writes.
                continue;
            };
            // A lease whose value cannot be read still holds its key: count it as taken by
            // nobody we know, so that it is never chosen.
            let public_ip = LeaseAttrs::parse(&raw.value)
                .map(|a| a.public_ip)
                .unwrap_or(Ipv4Addr::UNSPECIFIED);
            occupied.push(Occupied {
                subnet: key.ipv4,
                public_ip,
                reservation: raw.is_reservation(),
            });
            raws.push(raw);
        }
        let me = self.settings.public_ip;
        let plan = alloc::plan(&self.config, &occupied, me, preferred, &mut self.rng);
        for &i in &plan.stale {
            let raw = raws[i];
            info!(
                "deleting this host's lease {}: it no longer fits the network config",
                raw.name
            );
            if let Err(e) = self
                .registry
                .delete_lease(&raw.name, raw.mod_revision)
                .await
            {
                self.metrics.etcd_error(EtcdOp::Delete);
                warn!("cannot delete lease {}: {e}", raw.name);
            }
        }
        let value = LeaseAttrs::udp(me).to_json();
        let ttl = Some(self.settings.lease_ttl);
        let (name, subnet, expect, ttl) = match plan.pick {
            Pick::Reuse(i) => {
                let raw = raws[i];
                let subnet = occupied[i].subnet;
                if raw.value == value.as_bytes() {
                    // `None`: its etcd lease ended since the listing; the key is going away.
                    return self.adopt(raw, subnet).await?.ok_or(AcquireError::LostRace);
                }
                info!("found lease {subnet} for this host's IP {me}, rewriting its value");
                // A reservation stays one.
                let ttl = if raw.is_reservation() { None } else { ttl };
                let expect = Expect::ModRevision(raw.mod_revision);
                (raw.name.clone(), subnet, expect, ttl)
            }
            Pick::Previous(subnet) => {
                info!("found previously leased subnet {subnet}, reusing it");
                (lease_key_name(subnet), subnet, Expect::Absent, ttl)
            }
            Pick::Free(subnet) => (lease_key_name(subnet), subnet, Expect::Absent, ttl),
            Pick::Exhausted => return Err(AcquireError::Exhausted),
        };
        let Some(written) = self
            .registry
            .write_lease(&name, &value, ttl, expect)
            .await
            .inspect_err(|_| self.metrics.etcd_error(EtcdOp::Write))?
        else {
            return Err(AcquireError::LostRace);
        };
        self.history.saw(written.revision);
        info!("allocated lease {subnet} to this host ({me})");
        Ok(Held {
            subnet,
            etcd_lease: written.etcd_lease,
            revision: written.revision,
            expires: written
                .ttl
                .map(|ttl| Expiry::new(ttl, self.settings.renew_margin)),
        })
    }

    /// Take over our own existing lease as it is: a reservation needs nothing, a TTL lease a
    /// renewal. `None` when its etcd lease is already gone.
    async fn adopt(&self, raw: &RawLease, subnet: Ipv4Net) -> Result<Option<Held>, AcquireError> {
        let me = self.settings.public_ip;
        if raw.is_reservation() {
            info!("found subnet {subnet} reserved for this host's IP {me}, using it");
            return Ok(Some(Held {
                subnet,
                etcd_lease: 0,
                revision: raw.mod_revision,
                expires: None,
            }));
        }
        let renewed = self.registry.keep_alive(raw.etcd_lease).await;
        match renewed.inspect_err(|_| self.metrics.etcd_error(EtcdOp::Renew))? {
            Some(ttl) => {
                info!("found lease {subnet} for this host's IP {me}, reusing it");
                Ok(Some(Held {
                    subnet,
                    etcd_lease: raw.etcd_lease,
                    revision: raw.mod_revision,
                    expires: Some(Expiry::new(ttl, self.settings.renew_margin)),
                }))
            }
            None => Ok(None),
        }
    }

    /// Keep `held` until it is lost; return why.
    async fn hold(&mut self, mut held: Held) -> String {
        let margin = self.settings.renew_margin;
        let mut renew_at = held.expires.map(|e| e.renew_at);
        let mut watcher_alive = true;
        loop {
            let renew = async {
                match renew_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = renew => {
                    match self.registry.keep_alive(held.etcd_lease).await {
                        Ok(Some(ttl)) => {
                            let expires = Expiry::new(ttl, margin);
                            held.expires = Some(expires);
                            renew_at = Some(expires.renew_at);
                            debug!("renewed lease {} for {ttl:?}", held.subnet);
                            self.metrics.lease_renewed();
                            self.publish(&held);
                        }
                        Ok(None) => return "its etcd lease expired or was revoked".to_owned(),
                        Err(e) => {
                            self.metrics.etcd_error(EtcdOp::Renew);
                            let retry = self.settings.renew_retry;
                            warn!("cannot renew lease {}: {e}; retrying in {retry:?}", held.subnet);
                            renew_at = Some(Instant::now() + retry);
                        }
                    }
                }
                gone = self.gone.recv(), if watcher_alive => match gone {
                    // After a data loss the revisions held before mean nothing: whatever the
                    // news says, register again (adopting the key if it survived).
                    Some(gone) if gone.data_loss => return gone.why,
                    Some(gone) if gone.subnet == held.subnet && gone.revision >= held.revision => {
                        return gone.why;
                    }
                    Some(stale) => debug!(?stale, "ignoring a stale lease disappearance"),
                    None => watcher_alive = false,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn settings_are_validated() {
        assert_eq!(
            Settings::renew_margin_from_minutes(60),
            Ok(Duration::from_secs(3600))
        );
        for bad in [0, 1440] {
            assert_eq!(
                Settings::renew_margin_from_minutes(bad),
                Err(SettingsError::RenewMarginMinutes(bad))
            );
        }
        Settings::new(ip("198.18.0.1")).validate().unwrap();
        let mut s = Settings::new(ip("198.18.0.1"));
        s.renew_margin = s.lease_ttl;
        assert!(matches!(
            s.validate(),
            Err(SettingsError::MarginNotBelowTtl { .. })
        ));
        s.renew_margin = Duration::ZERO;
        assert_eq!(s.validate(), Err(SettingsError::Zero("the renew margin")));
    }
}
