//! weftd's life cycle: the order in which the parts start, what it does while running, and how
//! it stops.
//!
//! Start order (as flanneld's, so that docker, started after weftd, finds a working overlay):
//! external interface → etcd config → lease → TUN configured → workers running → subnet.env
//! written → READY=1. While running, the control thread (this tokio runtime) follows lease
//! changes (re-addressing the TUN and rewriting subnet.env), keeps iptables rules in place,
//! serves health and metrics, watches the workers, and logs counters. SIGTERM or SIGINT stops
//! the workers, logs the final counters, removes the iptables rules and leaves the lease in
//! etcd for the next start.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info, warn};
use weft_engine::engine::{Engine, EngineConfig, IoBackend, Offloads};
use weft_engine::{Policy, RouteTable, Routes};

use crate::config::NetworkConfig;
use crate::flags::{Flags, IoMode};
use crate::http::{Health, HttpServer, MetricsFn};
use crate::iface::{find_external, ExternalInterface, IfaceSelection};
use crate::iptables::{Iptables, IptablesKeeper, RuleSet};
use crate::lease::{self, Backoff, Lease};
use crate::netconf::{configure_tun, disable_ipv6, Netlink, TunConfig};
use crate::notify::Notifier;
use crate::registry::{EtcdRegistry, EtcdSettings, TlsFiles};
use crate::subnet::KeyPrefix;
use crate::subnet_env::SubnetEnv;

/// IPv4 header (20) + UDP header (8): what encapsulation costs per packet.
pub const ENCAP_OVERHEAD: u32 = 28;

/// Why weftd could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A flag value that cannot work.
    #[error("{0}")]
    Settings(String),
    /// Netlink could not be opened or queried.
    #[error(transparent)]
    Netconf(#[from] crate::netconf::NetconfError),
    /// No usable external interface.
    #[error(transparent)]
    Iface(#[from] crate::iface::IfaceError),
    /// The etcd client could not be set up.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// The network config cannot be run.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The membership task could not start.
    #[error(transparent)]
    Membership(#[from] crate::membership::MembershipError),
    /// The TUN device could not be opened.
    #[error(transparent)]
    Tun(#[from] weft_engine::tun::TunError),
    /// The data plane could not start.
    #[error(transparent)]
    Engine(#[from] weft_engine::engine::EngineError),
    /// subnet.env could not be written.
    #[error(transparent)]
    SubnetEnv(#[from] crate::subnet_env::SubnetEnvError),
    /// iptables rules could not be applied.
    #[error(transparent)]
    Iptables(#[from] crate::iptables::IptablesError),
    /// The health/metrics listener could not be bound.
    #[error("cannot listen for healthz on {addr}: {source}")]
    Healthz {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A signal handler could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The membership task ended, which it never does on its own.
    #[error("the lease task ended unexpectedly")]
    MembershipEnded,
    /// A data-plane worker died.
    #[error("a data-plane worker stopped; see the log above")]
    EngineStopped,
}

/// The lease-related settings weftd derives from its flags.
fn lease_settings(flags: &Flags, public_ip: Ipv4Addr) -> Result<lease::Settings, DaemonError> {
    let mut settings = lease::Settings::new(public_ip);
    settings.renew_margin =
        lease::Settings::renew_margin_from_minutes(u64::from(flags.subnet_lease_renew_margin))
            .map_err(|e| DaemonError::Settings(format!("--subnet-lease-renew-margin: {e}")))?;
    if let Some(ttl) = flags.lease_ttl {
        settings.lease_ttl = ttl;
    }
    if let Some(retry) = flags.renew_retry {
        settings.renew_retry = retry;
    }
    settings.previous_subnet = match SubnetEnv::read(&flags.subnet_file) {
        Ok(previous) => previous,
        Err(e) => {
            warn!(file = %flags.subnet_file.display(), error = %e, "ignoring the previous subnet file");
            None
        }
    };
    settings
        .validate()
        .map_err(|e| DaemonError::Settings(e.to_string()))?;
    Ok(settings)
}

fn etcd_settings(flags: &Flags) -> EtcdSettings {
    let mut settings = EtcdSettings::new(flags.etcd_endpoints.clone());
    settings.prefix = KeyPrefix::new(&flags.etcd_prefix);
    if flags.etcd_cafile.is_some() || flags.etcd_certfile.is_some() || flags.etcd_keyfile.is_some()
    {
        settings.tls = Some(TlsFiles {
            ca: flags.etcd_cafile.clone(),
            cert: flags.etcd_certfile.clone(),
            key: flags.etcd_keyfile.clone(),
        });
    }
    if let Some(user) = &flags.etcd_username {
        settings.credentials = Some((
            user.clone(),
            flags.etcd_password.clone().unwrap_or_default(),
        ));
    }
    settings
}

/// The engine configuration from the flags, the external interface and the network config.
fn engine_config(flags: &Flags, ext: &ExternalInterface, port: u16, tun_mtu: u32) -> EngineConfig {
    EngineConfig {
        workers: flags.workers.max(1),
        bind: SocketAddrV4::new(ext.addr, port),
        io: match flags.io {
            IoMode::Uring => IoBackend::Uring,
            IoMode::Syscalls => IoBackend::Syscalls,
        },
        policy: Policy {
            tun_mtu: tun_mtu as usize,
            allow_foreign_sources: flags.allow_foreign_sources,
        },
        pin_cores: flags.pin_workers,
        offloads: Offloads {
            tun: !flags.no_tun_offload,
            udp_gso: !flags.no_udp_gso,
            udp_gro: !flags.no_udp_gro,
        },
    }
}

/// The parts that follow the lease: TUN address, subnet.env, iptables.
struct LeaseFollowers<'a> {
    flags: &'a Flags,
    netlink: &'a Netlink,
    network: ipnet::Ipv4Net,
    tun_mtu: u32,
    iptables: Option<IptablesKeeper>,
}

impl LeaseFollowers<'_> {
    async fn configure_tun(&self, lease: &Lease) -> Result<(), DaemonError> {
        let changes = configure_tun(
            self.netlink,
            &TunConfig {
                name: self.flags.tun_name.clone(),
                subnet: lease.subnet,
                network: self.network,
                mtu: self.tun_mtu,
            },
        )
        .await?;
        info!(tun = %self.flags.tun_name, subnet = %lease.subnet, ?changes, "TUN device configured");
        Ok(())
    }

    fn write_subnet_env(&self, lease: &Lease) -> Result<(), DaemonError> {
        SubnetEnv {
            network: self.network,
            subnet: lease.subnet,
            mtu: self.tun_mtu,
            ipmasq: self.flags.ip_masq,
        }
        .write_atomic(&self.flags.subnet_file)?;
        info!(file = %self.flags.subnet_file.display(), "wrote subnet file");
        Ok(())
    }

    fn rules(&self, lease: &Lease) -> RuleSet {
        RuleSet::new(
            self.network,
            lease.subnet,
            self.flags.ip_masq,
            self.flags.iptables_forward_rules,
        )
    }

    async fn start_iptables(&mut self, lease: &Lease) -> Result<(), DaemonError> {
        let rules = self.rules(lease);
        if rules.is_empty() {
            return Ok(());
        }
        let keeper =
            IptablesKeeper::start(Iptables::new(), rules, self.flags.iptables_resync).await?;
        self.iptables = Some(keeper);
        Ok(())
    }

    /// A new subnet (re-acquired elsewhere after the old one was lost).
    async fn subnet_changed(&self, lease: &Lease) -> Result<(), DaemonError> {
        warn!(subnet = %lease.subnet, "this host's subnet changed; containers must be restarted to use it");
        self.configure_tun(lease).await?;
        self.write_subnet_env(lease)?;
        if let Some(keeper) = &self.iptables {
            keeper.update(self.rules(lease)).await?;
        }
        Ok(())
    }
}

/// Run weftd until SIGTERM/SIGINT or a fatal error.
pub async fn run(flags: Flags) -> Result<(), DaemonError> {
    let notifier = match Notifier::from_env() {
        Ok(notifier) => notifier,
        Err(e) => {
            warn!(error = %e, "NOTIFY_SOCKET is unusable; systemd will not be told when weftd is ready");
            None
        }
    };
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let netlink = Netlink::connect()?;
    let ext = find_external(&netlink, &IfaceSelection::from_flags(&flags)).await?;
    info!(iface = %ext.name, addr = %ext.addr, public_ip = %ext.public_ip, mtu = ext.mtu, "using external interface");
    let tun_mtu = ext.mtu.saturating_sub(ENCAP_OVERHEAD);
    if tun_mtu < 576 {
        return Err(DaemonError::Settings(format!(
            "the MTU of {} ({}) leaves {} bytes for the overlay; at least 576 are needed",
            ext.name, ext.mtu, tun_mtu
        )));
    }

    let registry = EtcdRegistry::new(&etcd_settings(&flags))?;
    let config: NetworkConfig = lease::wait_for_config(&registry, Backoff::default()).await;
    let overlay = config.overlay()?;
    let network = overlay.network();
    info!(network = %network, subnet_len = overlay.subnet_len(), port = config.port(), "network config");

    let routes = Routes::new(RouteTable::empty(overlay, config.port()));
    let settings = lease_settings(&flags, ext.public_ip)?;
    let (mut membership, membership_task) =
        lease::run_membership(registry, &config, settings, routes.clone())?;
    let health = Arc::new(Health::new());

    // Health and metrics are served from the start so that probes see why weftd is not ready.
    let engine_slot: Arc<std::sync::Mutex<Option<Arc<Engine>>>> = Arc::default();
    let http_task = if flags.healthz_port != 0 {
        let addr = SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        let metrics_engine = engine_slot.clone();
        let control_metrics = membership.metrics();
        let metrics: MetricsFn = Arc::new(move || {
            let mut text = String::new();
            let engine = metrics_engine.lock().ok().and_then(|slot| slot.clone());
            if let Some(engine) = engine {
                engine.counters().render_prometheus(&mut text);
            }
            control_metrics.render_prometheus(&mut text);
            text
        });
        let server = HttpServer::bind(addr, health.clone(), metrics)
            .await
            .map_err(|source| DaemonError::Healthz { addr, source })?;
        info!(%addr, "serving /healthz and /metrics");
        Some(tokio::spawn(server.run()))
    } else {
        None
    };

    info!("waiting for a subnet lease");
    let Some(first) = membership.acquired().await else {
        return Err(DaemonError::MembershipEnded);
    };
    health.set_lease_held(true);
    info!(subnet = %first.subnet, public_ip = %first.public_ip, "acquired lease");

    // With TUN offloads the queues carry a virtio-net header; without, bare packets as
    // flanneld's device does.
    let queues = weft_engine::tun::open_queues_with(
        &flags.tun_name,
        flags.workers.max(1),
        !flags.no_tun_offload,
    )?;
    if let Err(e) = disable_ipv6(&flags.tun_name) {
        warn!(tun = %flags.tun_name, error = %e, "cannot disable IPv6 on the TUN device");
    }
    let mut followers = LeaseFollowers {
        flags: &flags,
        netlink: &netlink,
        network,
        tun_mtu,
        iptables: None,
    };
    followers.configure_tun(&first).await?;
    let engine = Arc::new(Engine::start(
        engine_config(&flags, &ext, config.port(), tun_mtu),
        queues,
        routes.clone(),
    )?);
    if let Ok(mut slot) = engine_slot.lock() {
        *slot = Some(engine.clone());
    }
    health.set_engine_running(true);
    info!(workers = flags.workers.max(1), io = ?flags.io, bind = %SocketAddrV4::new(ext.addr, config.port()), "data plane running");
    followers.write_subnet_env(&first)?;
    followers.start_iptables(&first).await?;
    if let Some(notifier) = &notifier {
        if let Err(e) = notifier.ready() {
            warn!(error = %e, "cannot notify systemd");
        }
    }

    let outcome = supervise(
        &mut followers,
        &mut membership.lease(),
        first,
        &engine,
        &health,
        flags.verbosity,
        flags.stats_interval,
        (&mut sigterm, &mut sigint),
    )
    .await;

    if let Some(notifier) = &notifier {
        let _ = notifier.stopping();
    }
    membership_task.abort();
    if let Some(task) = http_task {
        task.abort();
    }
    if let Ok(mut slot) = engine_slot.lock() {
        slot.take();
    }
    match Arc::try_unwrap(engine) {
        Ok(engine) => info!(counters = %engine.shutdown().summary(), "data plane stopped"),
        Err(engine) => info!(counters = %engine.counters().summary(), "data plane left running"),
    }
    if let Some(keeper) = followers.iptables.take() {
        if let Err(e) = keeper.shutdown().await {
            warn!(error = %e, "cannot remove iptables rules");
        }
    }
    outcome
}

/// The running daemon's loop: returns on a signal (Ok) or a fatal error.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    followers: &mut LeaseFollowers<'_>,
    leases: &mut watch::Receiver<Option<Lease>>,
    mut current: Lease,
    engine: &Engine,
    health: &Health,
    verbosity: u32,
    stats_interval: Duration,
    signals: (
        &mut tokio::signal::unix::Signal,
        &mut tokio::signal::unix::Signal,
    ),
) -> Result<(), DaemonError> {
    let (sigterm, sigint) = signals;
    let mut engine_check = tokio::time::interval(Duration::from_secs(1));
    let mut stats = tokio::time::interval(stats_interval.max(Duration::from_secs(1)));
    stats.tick().await;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); return Ok(()); }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); return Ok(()); }
            changed = leases.changed() => {
                if changed.is_err() {
                    health.set_lease_held(false);
                    return Err(DaemonError::MembershipEnded);
                }
                let lease = *leases.borrow_and_update();
                match lease {
                    Some(lease) if lease.subnet != current.subnet => {
                        followers.subnet_changed(&lease).await?;
                        current = lease;
                        health.set_lease_held(true);
                    }
                    Some(lease) => {
                        current = lease;
                        health.set_lease_held(true);
                    }
                    None => health.set_lease_held(false),
                }
            }
            _ = engine_check.tick() => {
                // A lost lease stays published until it is replaced; its expiry tells.
                let held = current.expires.is_none_or(|at| at > std::time::SystemTime::now());
                health.set_lease_held(held);
                let running = engine.is_running();
                health.set_engine_running(running);
                if !running {
                    error!("a data-plane worker stopped");
                    return Err(DaemonError::EngineStopped);
                }
            }
            _ = stats.tick(), if verbosity >= 1 => {
                info!(counters = %engine.counters().summary(), "data plane");
            }
        }
    }
}
