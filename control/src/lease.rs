//! Holding this host's subnet lease in etcd, and the membership task the daemon runs.
//!
//! The lease keeper acquires a subnet by flannel's rules ([`crate::alloc`]), writes it with
//! "create if absent" attached to an etcd lease (24 h by default), renews it at expiry minus the
//! renew margin, and retries a failed renewal every minute. Where flanneld gives up, weft goes
//! on: a lost creation race is retried with a fresh listing, an unreachable etcd is retried
//! with backoff, and a lease that disappears (deleted, expired, taken over) is re-acquired,
//! preferring the same subnet, while the data plane keeps forwarding with the routes it has.
//!
//! # Wiring it into the daemon
//!
//! ```ignore
//! let registry = EtcdRegistry::new(&etcd_settings)?;
//! // 1. The network config (waits, logging why, until a usable one is in etcd).
//! let config = lease::wait_for_config(&registry, Backoff::default()).await;
//! let routes = Routes::new(RouteTable::empty(config.overlay()?, config.port()));
//! // 2. The lease, then the peers: both run in one task.
//! let mut settings = lease::Settings::new(public_ip);
//! settings.previous_subnet = SubnetEnv::read(&subnet_file).unwrap_or_else(|e| { error!(..); None });
//! let (mut membership, task) = lease::run_membership(registry, &config, settings, routes.clone())?;
//! let lease = membership.acquired().await;
//! // 3. Configure the TUN device with lease.subnet; 4. start the workers with `routes`;
//! // 5. write subnet.env; 6. notify READY=1.
//! // Afterwards, watch `membership.lease()` for a changed subnet (re-acquired elsewhere after
//! // it was lost): readdress the TUN device and rewrite subnet.env. On shutdown,
//! // `task.abort()`; the lease is left in etcd so that a restart finds it again.
//! ```

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use weft_engine::Routes;

use crate::alloc::{self, Occupied, Pick};
use crate::config::{ConfigError, NetworkConfig};
use crate::registry::{Expect, RawLease, Registry, RegistryError};
use crate::subnet::{lease_key_name, LeaseAttrs, LeaseKey};
use crate::watch::{OwnLeaseGone, Watcher};

/// flannel's lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// flannel's `--subnet-lease-renew-margin` default, 60 minutes.
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(60 * 60);
/// flannel retries a failed renewal after a minute.
pub const DEFAULT_RENEW_RETRY: Duration = Duration::from_secs(60);
/// flannel's number of creation attempts before it gives up; weft then backs off and goes on.
pub const DEFAULT_RACE_ATTEMPTS: u32 = 10;

/// This host's lease as the daemon sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The leased subnet.
    pub subnet: Ipv4Net,
    /// This host's public IP, as stored in the lease.
    pub public_ip: Ipv4Addr,
    /// When the lease expires unless renewed; `None` for a reservation, which never does.
    pub expires: Option<SystemTime>,
}

/// Exponential backoff between retries: `initial`, doubling up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// A fresh sequence of delays.
    pub fn delays(&self) -> Delays {
        Delays {
            policy: *self,
            next: self.initial,
        }
    }
}

/// The running state of a [`Backoff`].
#[derive(Clone, Debug)]
pub struct Delays {
    policy: Backoff,
    next: Duration,
}

impl Delays {
    /// The delay to wait now; the following one is twice as long, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next.min(self.policy.max);
        self.next = (now * 2).min(self.policy.max);
        now
    }

    /// Start again from the initial delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.policy.initial;
    }
}

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

/// Why the membership cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The settings cannot work.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The config is not one weft can run.
    #[error(transparent)]
    Config(#[from] ConfigError),
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

/// Wait until etcd holds a network config weft can run, and return it. A missing, unreadable,
/// malformed or unsupported config is logged with its reason and read again after a backoff
/// delay, so that an operator can fix it while weftd waits; this never fails.
pub async fn wait_for_config<R: Registry>(registry: &R, retry: Backoff) -> NetworkConfig {
    let key = registry.prefix().config_key();
    let mut delays = retry.delays();
    loop {
        match registry.config().await {
            Ok(Some(text)) => {
                match NetworkConfig::parse(&text).and_then(|c| c.check_supported().map(|()| c)) {
                    Ok(config) => {
                        info!("network config at {key}: {config}");
                        return config;
                    }
                    Err(e) => {
                        let wait = delays.next_delay();
                        error!("network config at {key} cannot be used: {e}; reading it again in {wait:?}");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            Ok(None) => {
                let wait = delays.next_delay();
                warn!("no network config at {key} yet; reading it again in {wait:?}");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let wait = delays.next_delay();
                warn!("cannot read the network config at {key} ({e}); is etcd reachable? retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The daemon's view of the running membership task.
#[derive(Clone, Debug)]
pub struct MembershipHandle {
    lease: watch::Receiver<Option<Lease>>,
}

impl MembershipHandle {
    /// A receiver of this host's lease: `None` until the first one is acquired, then always the
    /// current one (a lost lease stays published until it is replaced, so that forwarding goes
    /// on). It changes on every renewal (`expires`) and when the subnet changes.
    pub fn lease(&self) -> watch::Receiver<Option<Lease>> {
        self.lease.clone()
    }

    /// The current lease, if one has been acquired.
    pub fn current(&self) -> Option<Lease> {
        *self.lease.borrow()
    }

    /// Wait for the first lease. `None` only if the membership task has ended (aborted).
    pub async fn acquired(&mut self) -> Option<Lease> {
        let lease = self.lease.wait_for(Option::is_some).await.ok()?;
        *lease
    }
}

/// Start this host's membership: the lease keeper and the peer watcher, in one task spawned on
/// the current tokio runtime (call it from within one).
///
/// `config` must be usable ([`NetworkConfig::check_supported`]); `routes` receives a fresh
/// route table whenever a peer or this host's subnet changes. The task runs until aborted;
/// aborting it leaves the lease in etcd (it expires unless a restarted weftd reuses it).
pub fn run_membership<R: Registry>(
    registry: R,
    config: &NetworkConfig,
    settings: Settings,
    routes: Routes,
) -> Result<(MembershipHandle, JoinHandle<()>), MembershipError> {
    settings.validate()?;
    config.check_supported()?;
    let overlay = config.overlay()?;
    let (lease_tx, lease_rx) = watch::channel(None);
    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
    let watcher = Watcher {
        registry: registry.clone(),
        overlay,
        port: config.port(),
        public_ip: settings.public_ip,
        routes,
        lease: lease_rx.clone(),
        own_gone: gone_tx,
        retry: settings.retry,
    };
    let keeper = Keeper {
        registry,
        config: config.clone(),
        settings,
        lease: lease_tx,
        gone: gone_rx,
        rng: random_source(),
    };
    let task = tokio::spawn(async move {
        tokio::select! {
            () = keeper.run() => {}
            () = watcher.run() => {}
        }
    });
    Ok((MembershipHandle { lease: lease_rx }, task))
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

struct Keeper<R> {
    registry: R,
    config: NetworkConfig,
    settings: Settings,
    lease: watch::Sender<Option<Lease>>,
    gone: mpsc::UnboundedReceiver<OwnLeaseGone>,
    rng: StdRng,
}

impl<R: Registry> Keeper<R> {
    async fn run(mut self) {
        let mut preferred = self.settings.previous_subnet;
        loop {
            let held = self.acquire(preferred).await;
            preferred = Some(held.subnet);
            self.publish(&held);
            let why = self.hold(held.clone()).await;
            warn!(
                "lease for {} lost: {why}; re-acquiring (the same subnet if it is still free) while forwarding goes on",
                held.subnet
            );
        }
    }

    fn publish(&self, held: &Held) {
        self.lease.send_replace(Some(Lease {
            subnet: held.subnet,
            public_ip: self.settings.public_ip,
            expires: held.expires.map(|e| e.at),
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
        let snapshot = self.registry.leases().await?;
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
            .await?
        else {
            return Err(AcquireError::LostRace);
        };
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
        match self.registry.keep_alive(raw.etcd_lease).await? {
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
                            self.publish(&held);
                        }
                        Ok(None) => return "its etcd lease expired or was revoked".to_owned(),
                        Err(e) => {
                            let retry = self.settings.renew_retry;
                            warn!("cannot renew lease {}: {e}; retrying in {retry:?}", held.subnet);
                            renew_at = Some(Instant::now() + retry);
                        }
                    }
                }
                gone = self.gone.recv(), if watcher_alive => match gone {
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
    use crate::registry::MemoryRegistry;
    use weft_engine::RouteTable;

    const NETWORK: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn config() -> NetworkConfig {
        NetworkConfig::parse(NETWORK).unwrap()
    }

    fn routes() -> Routes {
        let cfg = config();
        Routes::new(RouteTable::empty(cfg.overlay().unwrap(), cfg.port()))
    }

    fn fast(public_ip: &str) -> Settings {
        Settings {
            lease_ttl: Duration::from_secs(60),
            renew_margin: Duration::from_secs(20),
            renew_retry: Duration::from_secs(5),
            retry: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(1),
            },
            ..Settings::new(ip(public_ip))
        }
    }

    struct Member {
        handle: MembershipHandle,
        routes: Routes,
        task: JoinHandle<()>,
    }

    impl Drop for Member {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn start(reg: &MemoryRegistry, settings: Settings) -> Member {
        let routes = routes();
        let (handle, task) =
            run_membership(reg.clone(), &config(), settings, routes.clone()).unwrap();
        Member {
            handle,
            routes,
            task,
        }
    }

    impl Member {
        async fn subnet(&mut self) -> Ipv4Net {
            self.handle.acquired().await.unwrap().subnet
        }

        /// Wait (in virtual time) until the route table satisfies `ok`.
        async fn routes_until(&self, what: &str, ok: impl Fn(&RouteTable) -> bool) {
            for _ in 0..600 {
                if ok(&self.routes.current()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!(
                "routes never {what}: {:?}",
                self.routes.current().peers().collect::<Vec<_>>()
            );
        }

        async fn lease_until(&self, what: &str, ok: impl Fn(&Lease) -> bool) -> Lease {
            let mut rx = self.handle.lease();
            let waited = tokio::time::timeout(
                Duration::from_secs(30),
                rx.wait_for(|l| l.as_ref().is_some_and(&ok)),
            )
            .await;
            match waited {
                Ok(Ok(lease)) => lease.unwrap(),
                _ => panic!("lease never {what}: {:?}", self.handle.current()),
            }
        }
    }

    fn udp(public_ip: &str) -> String {
        LeaseAttrs::udp(ip(public_ip)).to_json()
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

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let mut d = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
        }
        .delays();
        let seen: Vec<u64> = (0..5).map(|_| d.next_delay().as_secs()).collect();
        assert_eq!(seen, [1, 2, 4, 5, 5]);
        d.reset();
        assert_eq!(d.next_delay().as_secs(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn config_is_awaited_through_missing_malformed_and_unsupported() {
        let reg = MemoryRegistry::new();
        reg.set_available(false);
        let waiter = tokio::spawn({
            let reg = reg.clone();
            async move { wait_for_config(&reg, Backoff::default()).await }
        });
        for step in [
            None,
            Some(r#"{"Network":"10.1.0.0/16","SubnetLen":31}"#),
            Some(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#),
        ] {
            tokio::time::sleep(Duration::from_secs(40)).await;
            assert!(!waiter.is_finished(), "accepted {step:?}");
            reg.set_available(true);
            reg.set_config(step);
        }
        reg.set_config(Some(NETWORK));
        let cfg = tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cfg, config());
    }

    #[tokio::test(start_paused = true)]
    async fn two_hosts_get_distinct_subnets_and_see_each_other() {
        let reg = MemoryRegistry::new();
        let mut a = start(&reg, fast("198.18.0.1"));
        let mut b = start(&reg, fast("198.18.0.2"));
        let (sa, sb) = (a.subnet().await, b.subnet().await);
        assert_ne!(sa, sb);
        assert!(config().fits(sa) && config().fits(sb));
        assert_eq!(reg.get(&lease_key_name(sa)), Some(udp("198.18.0.1")));
        a.routes_until("show b", |t| t.peers().eq([(sb, ip("198.18.0.2"))]))
            .await;
        b.routes_until("show a", |t| t.peers().eq([(sa, ip("198.18.0.1"))]))
            .await;
        assert_eq!(a.routes.current().local_subnet(), Some(sa));
    }

    #[tokio::test(start_paused = true)]
    async fn previous_subnet_is_preferred_and_restart_reuses_the_lease() {
        let reg = MemoryRegistry::new();
        let mut settings = fast("198.18.0.1");
        settings.previous_subnet = Some(net("10.1.15.0/24"));
        let mut first = start(&reg, settings);
        assert_eq!(first.subnet().await, net("10.1.15.0/24"));
        let etcd_lease = reg.etcd_lease_of("10.1.15.0-24").unwrap();
        drop(first);
        // Restarted without subnet.env: the lease for our IP is found and renewed in place.
        let mut again = start(&reg, fast("198.18.0.1"));
        assert_eq!(again.subnet().await, net("10.1.15.0/24"));
        assert_eq!(reg.etcd_lease_of("10.1.15.0-24"), Some(etcd_lease));
        assert_eq!(reg.names(), ["10.1.15.0-24"]);
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_happens_before_expiry_and_failures_are_retried() {
        let reg = MemoryRegistry::new();
        let mut m = start(&reg, fast("198.18.0.1"));
        let first = m.handle.acquired().await.unwrap();
        let expires = first.expires.unwrap();
        assert_eq!(reg.keep_alive_count(), 0);
        // TTL 60 s, margin 20 s: renewed at 40 s.
        tokio::time::sleep(Duration::from_secs(39)).await;
        assert_eq!(reg.keep_alive_count(), 0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(reg.keep_alive_count(), 1);
        let renewed = m
            .lease_until("renewed", |l| l.expires > Some(expires))
            .await;
        assert_eq!(renewed.subnet, first.subnet);
        // etcd goes away at the next renewal (80 s); it is retried every 5 s.
        reg.set_available(false);
        tokio::time::sleep(Duration::from_secs(40 + 12)).await;
        assert_eq!(reg.keep_alive_count(), 1);
        reg.set_available(true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(reg.keep_alive_count(), 2);
        assert_eq!(m.handle.current().unwrap().subnet, first.subnet);
    }

    #[tokio::test(start_paused = true)]
    async fn adopted_short_lease_is_renewed_half_way_not_in_a_loop() {
        let reg = MemoryRegistry::new();
        // Left by a host that used 10 s leases; ours renew an hour before a 24 h expiry.
        reg.put(
            "10.1.9.0-24",
            &udp("198.18.0.1"),
            Some(Duration::from_secs(10)),
        );
        let settings = Settings {
            retry: fast("198.18.0.1").retry,
            ..Settings::new(ip("198.18.0.1"))
        };
        let mut m = start(&reg, settings);
        assert_eq!(m.subnet().await, net("10.1.9.0/24"));
        assert_eq!(reg.keep_alive_count(), 1, "adopted by one renewal");
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(reg.keep_alive_count(), 3, "renewed every 5 s");
    }

    #[tokio::test(start_paused = true)]
    async fn lost_races_are_retried_not_fatal() {
        let reg = MemoryRegistry::new();
        // Another host grabs the subnet we were about to create, every time for a while.
        let mut settings = fast("198.18.0.1");
        settings.previous_subnet = Some(net("10.1.15.0/24"));
        reg.race_next_create(&udp("198.18.0.9"));
        let mut m = start(&reg, settings);
        let subnet = m.subnet().await;
        assert_ne!(subnet, net("10.1.15.0/24"), "the rival kept it");
        assert_eq!(reg.get("10.1.15.0-24"), Some(udp("198.18.0.9")));
        assert_eq!(reg.get(&lease_key_name(subnet)), Some(udp("198.18.0.1")));
        m.routes_until("show the rival", |t| {
            t.peer_for(ip("10.1.15.1"))
                .is_some_and(|p| *p.ip() == ip("198.18.0.9"))
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn expired_or_deleted_own_lease_is_reacquired() {
        let reg = MemoryRegistry::new();
        let mut m = start(&reg, fast("198.18.0.1"));
        let subnet = m.subnet().await;
        let name = lease_key_name(subnet);
        let first_lease = reg.etcd_lease_of(&name).unwrap();

        reg.expire(first_lease);
        m.lease_until("re-acquired", |_| {
            reg.etcd_lease_of(&name).is_some_and(|l| l != first_lease)
        })
        .await;
        assert_eq!(m.handle.current().unwrap().subnet, subnet, "same subnet");

        assert!(reg.delete(&name));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(reg.get(&name), Some(udp("198.18.0.1")));
        assert_eq!(m.handle.current().unwrap().subnet, subnet);

        // Taken over by another host while gone: a new subnet, and the old one is a peer.
        let other_lease = reg.etcd_lease_of(&name).unwrap();
        reg.expire(other_lease);
        reg.put(&name, &udp("198.18.0.7"), None);
        let moved = m.lease_until("moved", |l| l.subnet != subnet).await;
        m.routes_until("route the old subnet to its new holder", |t| {
            t.local_subnet() == Some(moved.subnet)
                && t.peers().any(|(s, p)| s == subnet && p == ip("198.18.0.7"))
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_failure_after_expiry_reacquires() {
        let reg = MemoryRegistry::new();
        let mut m = start(&reg, fast("198.18.0.1"));
        let subnet = m.subnet().await;
        let name = lease_key_name(subnet);
        let lease = reg.etcd_lease_of(&name).unwrap();
        // A long outage: the watch is down and the lease expires meanwhile.
        reg.set_available(false);
        tokio::time::sleep(Duration::from_secs(30)).await;
        reg.expire(lease);
        assert_eq!(reg.get(&name), None);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            m.handle.current().unwrap().subnet,
            subnet,
            "still forwarding"
        );
        reg.set_available(true);
        m.lease_until("re-acquired", |_| reg.get(&name).is_some())
            .await;
        assert_eq!(reg.get(&name), Some(udp("198.18.0.1")));
        assert_eq!(m.handle.current().unwrap().subnet, subnet);
    }

    #[tokio::test(start_paused = true)]
    async fn compaction_and_outages_lose_no_peer_change() {
        let reg = MemoryRegistry::new();
        let mut m = start(&reg, fast("198.18.0.1"));
        let own = m.subnet().await;
        reg.put(
            "10.1.200.0-24",
            &udp("198.18.0.2"),
            Some(Duration::from_secs(60)),
        );
        m.routes_until("show .2", |t| t.peers().count() == 1).await;

        reg.set_available(false);
        // While etcd is away the last table stays.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(m.routes.current().peers().count(), 1);
        reg.set_available(true);
        reg.delete("10.1.200.0-24");
        reg.put("10.1.201.0-24", &udp("198.18.0.3"), None);
        reg.compact();
        reg.put("10.1.202.0-24", &udp("198.18.0.4"), None);
        reg.put("10.1.203.0-24", "broken", None);
        reg.compact();
        m.routes_until("match the store", |t| {
            t.peers().eq([
                (net("10.1.201.0/24"), ip("198.18.0.3")),
                (net("10.1.202.0/24"), ip("198.18.0.4")),
            ])
        })
        .await;
        assert_eq!(m.routes.current().local_subnet(), Some(own));
        assert_eq!(m.handle.current().unwrap().subnet, own);
    }

    #[tokio::test(start_paused = true)]
    async fn own_reservation_is_used_and_stale_own_leases_are_deleted() {
        let reg = MemoryRegistry::new();
        reg.put("10.1.40.0-24", &udp("198.18.0.1"), None);
        reg.put(
            "10.1.41.0-25",
            &udp("198.18.0.1"),
            Some(Duration::from_secs(60)),
        );
        let mut m = start(&reg, fast("198.18.0.1"));
        let lease = m.handle.acquired().await.unwrap();
        assert_eq!(lease.subnet, net("10.1.40.0/24"));
        assert_eq!(lease.expires, None, "a reservation does not expire");
        assert_eq!(reg.names(), ["10.1.40.0-24"]);
        assert_eq!(reg.etcd_lease_of("10.1.40.0-24"), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_network_waits_for_a_free_subnet() {
        let reg = MemoryRegistry::new();
        let small = NetworkConfig::parse(r#"{"Network":"10.1.0.0/24"}"#).unwrap();
        for (i, s) in small.leasable_subnets().enumerate() {
            reg.put(
                &lease_key_name(s),
                &udp(&format!("198.18.1.{}", i + 1)),
                Some(Duration::from_secs(60)),
            );
        }
        let routes = Routes::new(RouteTable::empty(small.overlay().unwrap(), 8285));
        let (mut handle, task) =
            run_membership(reg.clone(), &small, fast("198.18.0.1"), routes).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(handle.current(), None);
        reg.delete("10.1.0.128-26");
        let got = tokio::time::timeout(Duration::from_secs(10), handle.acquired())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.subnet, net("10.1.0.128/26"));
        task.abort();
    }
}
