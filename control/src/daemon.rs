//! weftd's life cycle: the order in which the parts start, what it does while running, and how
//! it stops.
//!
//! Before anything else the SIGTERM/SIGINT handlers are installed and `/healthz` is served, so
//! that weftd can be stopped, and says what it waits for, in every phase. Start order ([`run`]
//! → `start`; as flanneld's, so that docker, started after weftd, finds a working overlay):
//! external interface → etcd config → lease → TUN configured → workers running → subnet.env
//! written → iptables → READY=1. Each wait (the interface, etcd, the config, a lease) races the
//! signals, so a stop during start-up exits at once. While running (`supervise`), the control
//! thread (this tokio runtime) follows lease changes (re-addressing the TUN and rewriting
//! subnet.env), keeps iptables rules in place, serves health and metrics, watches the workers,
//! checks that no host interface still uses an old subnet of this host, and logs counters.
//! SIGTERM or SIGINT (`stop`) stops the workers, logs the final counters, removes the iptables
//! rules and leaves the lease in etcd for the next start.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use weft_engine::engine::{Engine, EngineConfig, IoBackend, Offloads};
use weft_engine::{Groups, MulticastConfig, Policy, RouteTable, Routes};

use crate::bridge_port;
use crate::flags::{Flags, IoMode};
use crate::host_records::{run_host_records, RecordInputs, RecordSettings};
use crate::http::{Health, HttpServer, MetricsFn};
use crate::iface::{find_external, ExternalInterface, IfaceSelection};
use crate::iptables::{Iptables, IptablesKeeper, RuleSet};
use crate::lease::{self, Backoff, Lease};
use crate::metrics::ControlMetrics;
use crate::netconf::{configure_tun, disable_ipv6, TunConfig};
use crate::netlink::Netlink;
use crate::notify::Notifier;
use crate::registry::{EtcdRegistry, EtcdSettings, TlsFiles};
use crate::secret::Secret;
use crate::subnet::KeyPrefix;
use crate::subnet_change::{stray_addresses, SubnetChanges};
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
    Netconf(#[from] crate::netlink::NetconfError),
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
    /// The masquerade rules `--ip-masq` asks for could not be applied.
    #[error("--ip-masq: cannot apply the masquerade rules")]
    Masquerade(#[source] crate::iptables::IptablesError),
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
    /// The network config asks for encryption and this host cannot encrypt.
    #[error(transparent)]
    Encryption(#[from] crate::encryption::EncryptionError),
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

fn etcd_settings(flags: &Flags) -> Result<EtcdSettings, DaemonError> {
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
    let password = match &flags.etcd_password_file {
        Some(path) => Some(
            Secret::read_file(path)
                .map_err(|e| DaemonError::Settings(format!("--etcd-password-file: {e}")))?,
        ),
        None => flags.etcd_password.clone(),
    };
    match (&flags.etcd_username, password) {
        (Some(user), password) => {
            settings.credentials = Some((user.clone(), password.unwrap_or_default()));
        }
        (None, Some(_)) => {
            warn!("an etcd password is given without --etcd-username; it is not used")
        }
        (None, None) => {}
    }
    Ok(settings)
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
        icmp_rate_limit: weft_engine::IcmpRateLimit::per_second(flags.icmp_rate_limit),
        multicast: multicast_config(flags),
        busy_poll: Duration::from_micros(flags.busy_poll_us.into()),
    }
}

/// The engine's multicast settings: `None` (flannel's behaviour: group traffic dropped and
/// counted) unless `--multicast` or `--broadcast` is on.
fn multicast_config(flags: &Flags) -> Option<MulticastConfig> {
    (flags.multicast || flags.broadcast).then(|| MulticastConfig {
        tap_name: flags.multicast_tap.clone(),
        multicast: flags.multicast,
        broadcast: flags.broadcast,
        rate_limit: flags.multicast_rate_limit,
    })
}

/// Whether this host leaves inner checksums partial between weft hosts: unless
/// `--no-skip-inner-csum`, and only when the TUN can take such packets.
fn skip_inner_csum(flags: &Flags, engine: &Engine) -> bool {
    let skip = !flags.no_skip_inner_csum && engine.offloads().takes_partial_checksums();
    if !flags.no_skip_inner_csum && !skip {
        info!("inner checksums stay complete: the TUN takes no offloads or coalescing is off");
    }
    skip
}

/// How often the engine's local groups are looked at for changes.
const LOCAL_GROUPS_POLL: Duration = Duration::from_millis(200);

/// With `--multicast` or `--broadcast`: keep the TAP on the container bridge and follow the
/// local groups. With either, or with inner checksums left partial between weft hosts (on
/// unless `--no-skip-inner-csum`, and only when the TUN can take such packets), or with the
/// per-peer UDP GSO check (on unless `--no-udp-gso-check`, and only with UDP GSO): keep this
/// host's record and publish the peers' as the group table, the partial-checksum peers and
/// the peers to check.
/// Without any: nothing (no TAP, nothing written to etcd beyond flanneld's keys).
fn start_records(
    flags: &Flags,
    registry: EtcdRegistry,
    membership: &lease::MembershipHandle,
    engine: &Engine,
    routes: Routes,
    groups: Groups,
) -> Result<Vec<AbortOnDrop>, DaemonError> {
    let relay = flags.multicast || flags.broadcast;
    let skip_inner_csum = skip_inner_csum(flags, engine);
    // Checked only where probes are sent: with UDP GSO on (the engine runs unencrypted here).
    let udp_gso_check = !flags.no_udp_gso_check && engine.offloads().udp_gso;
    if !(relay || skip_inner_csum || udp_gso_check) {
        return Ok(Vec::new());
    }
    let mut tasks = Vec::new();
    let (local_tx, local_rx) = watch::channel(Vec::new());
    if relay {
        let netlink = Netlink::connect()?;
        tasks.push(AbortOnDrop(tokio::spawn(bridge_port::keep_attached(
            netlink,
            flags.multicast_bridge.clone(),
            flags.multicast_tap.clone(),
        ))));
        let local = engine.local_groups();
        let (version, joined) = local.snapshot();
        local_tx.send_replace(joined);
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            let mut seen = version;
            let mut poll = tokio::time::interval(LOCAL_GROUPS_POLL);
            loop {
                poll.tick().await;
                let (version, joined) = local.snapshot();
                if version != seen {
                    seen = version;
                    local_tx.send_replace(joined);
                }
            }
        })));
        info!(
            multicast = flags.multicast,
            broadcast = flags.broadcast,
            bridge = %flags.multicast_bridge,
            tap = %flags.multicast_tap,
            rate_limit = flags.multicast_rate_limit,
            "multicast relay on"
        );
    } else {
        // No relay, no local groups: the channel stays open, and empty, for the record task
        // (which ends when it closes).
        tasks.push(AbortOnDrop(tokio::spawn(async move {
            let _open = local_tx;
            std::future::pending::<()>().await
        })));
    }
    tasks.push(AbortOnDrop(run_host_records(
        registry,
        RecordSettings {
            multicast: flags.multicast,
            broadcast: flags.broadcast,
            public_key: None,
            skip_inner_csum,
            udp_gso_check,
            retry: Backoff::default(),
        },
        RecordInputs {
            lease: membership.lease(),
            local_groups: local_rx,
            routes,
            groups,
            tunnels: None,
            partial_peers: engine.partial_peers(),
            gso_check: engine.gso_check(),
        },
    )));
    Ok(tasks)
}

/// The parts that follow the lease: TUN address, subnet.env, iptables.
struct LeaseFollowers<'a> {
    flags: &'a Flags,
    netlink: Netlink,
    network: Ipv4Net,
    tun_mtu: u32,
    iptables: Option<IptablesKeeper>,
    subnet_changes: Arc<SubnetChanges>,
}

impl LeaseFollowers<'_> {
    async fn configure_tun(&self, lease: &Lease) -> Result<(), DaemonError> {
        let changes = configure_tun(
            &self.netlink,
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
        self.iptables = Some(
            IptablesKeeper::start_or_skip_optional(
                Iptables::new(),
                rules,
                self.flags.iptables_resync,
            )
            .await
            .map_err(DaemonError::Masquerade)?,
        );
        Ok(())
    }

    /// A new subnet (re-acquired elsewhere after the old one was lost).
    async fn subnet_changed(&self, old: Ipv4Net, lease: &Lease) -> Result<(), DaemonError> {
        self.report_subnet_change(old, lease.subnet);
        self.configure_tun(lease).await?;
        self.write_subnet_env(lease)?;
        if let Some(keeper) = &self.iptables {
            let rules = self.rules(lease);
            let required = rules.has_masquerade();
            match keeper.update(rules).await {
                Err(e) if required => return Err(e.into()),
                // The FORWARD rules name only the Network, which a subnet change leaves as
                // it is; the keeper goes on trying them at every resync.
                Err(e) => warn!(error = %e, "iptables: cannot update the FORWARD rules"),
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// The one thing weftd cannot fix itself: docker must be restarted to take the new
    /// subnet.env. Said as an error, counted, and checked by [`LeaseFollowers::check_stale`].
    fn report_subnet_change(&self, old: Ipv4Net, new: Ipv4Net) {
        self.subnet_changes.record();
        error!(
            old = %old,
            new = %new,
            subnet_file = %self.flags.subnet_file.display(),
            "this host's subnet changed from {old} to {new}: the TUN device and the subnet file \
             now use {new}, but docker keeps its bridge on {old} and peers drop its containers' \
             traffic; restart docker (e.g. systemctl restart docker) so that it reads the new \
             subnet file. /healthz answers 503 until no host interface uses an address outside {new}"
        );
    }

    /// Whether a host interface other than the TUN still carries an address in the overlay
    /// outside `subnet` (docker's bridge on an old subnet); logs when that starts and ends.
    async fn check_stale(&self, subnet: Ipv4Net, health: &Health) {
        let (links, addrs) = match (
            self.netlink.links().await,
            self.netlink.ipv4_addrs(None).await,
        ) {
            (Ok(links), Ok(addrs)) => (links, addrs),
            (Err(e), _) | (_, Err(e)) => {
                warn!(error = %e, "cannot list host addresses to check for a stale docker subnet");
                return;
            }
        };
        let name_of = |index: u32| {
            links
                .iter()
                .find(|l| l.index == index)
                .map_or_else(|| index.to_string(), |l| l.name.clone())
        };
        let tun_index = links
            .iter()
            .find(|l| l.name == self.flags.tun_name)
            .map(|l| l.index);
        let strays = stray_addresses(&addrs, tun_index, self.network, subnet);
        let was_stale = health.subnet_stale();
        if let Some(stray) = strays.first() {
            if !was_stale {
                error!(
                    iface = %name_of(stray.index),
                    addr = %format!("{}/{}", stray.addr, stray.prefix_len),
                    subnet = %subnet,
                    "{} has {}/{}, outside this host's subnet {subnet}: docker still uses an old \
                     subnet; restart docker so that it reads {}",
                    name_of(stray.index),
                    stray.addr,
                    stray.prefix_len,
                    self.flags.subnet_file.display()
                );
            }
        } else if was_stale {
            info!(subnet = %subnet, "no host interface uses an old subnet any more");
        }
        health.set_subnet_stale(!strays.is_empty());
    }
}

/// Where the metrics page finds the engine once it runs.
type EngineSlot = Arc<std::sync::Mutex<Option<Arc<Engine>>>>;

/// The keeper's and watcher's metrics, set once the membership task has started; /metrics is
/// served before that.
type ControlMetricsSlot = Arc<std::sync::OnceLock<Arc<ControlMetrics>>>;

/// SIGTERM and SIGINT (Ctrl-C), the two ways to stop weftd.
struct StopSignals {
    sigterm: Signal,
    sigint: Signal,
}

impl StopSignals {
    fn install() -> Result<Self, DaemonError> {
        Ok(StopSignals {
            sigterm: signal(SignalKind::terminate()).map_err(DaemonError::Signals)?,
            sigint: signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?,
        })
    }

    /// Waits for either signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.sigterm.recv() => "SIGTERM",
            _ = self.sigint.recv() => "SIGINT",
        }
    }
}

/// A task that is aborted when this handle is dropped, so that an early return or a stop
/// during start-up leaves nothing running.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What weftd says on `/healthz` while it starts, step by step.
mod phase {
    pub const INTERFACE: &str = "starting: looking for the external interface";
    pub const CONFIG: &str = "starting: waiting for the network config in etcd";
    pub const LEASE: &str = "starting: waiting for a subnet lease";
    pub const DATA_PLANE: &str = "starting: bringing up the TUN device and the data plane";
    pub const STOPPING: &str = "stopping";
}

/// Everything start-up brought up: what `Daemon::supervise` runs and `Daemon::stop` takes down.
struct Running<'a> {
    _membership: AbortOnDrop,
    /// With `--multicast` or `--broadcast`: the bridge port, the local groups and the records.
    _multicast: Vec<AbortOnDrop>,
    leases: watch::Receiver<Option<Lease>>,
    current: Lease,
    followers: LeaseFollowers<'a>,
    engine: Arc<Engine>,
}

/// What lives for the whole run, from before start-up to the end of the stop.
struct Daemon<'a> {
    flags: &'a Flags,
    notifier: Option<Notifier>,
    health: Arc<Health>,
    engine_slot: EngineSlot,
    control_metrics: ControlMetricsSlot,
    subnet_changes: Arc<SubnetChanges>,
}

/// Run weftd until SIGTERM/SIGINT or a fatal error. The signal handlers are installed and
/// `/healthz` served first, so that weftd can be stopped, and is observable, in every phase.
pub async fn run(flags: Flags) -> Result<(), DaemonError> {
    let mut signals = StopSignals::install()?;
    let notifier = match Notifier::from_env() {
        Ok(notifier) => notifier,
        Err(e) => {
            warn!(error = %e, "NOTIFY_SOCKET is unusable; systemd will not be told when weftd is ready");
            None
        }
    };
    let daemon = Daemon {
        flags: &flags,
        notifier,
        health: Arc::new(Health::new()),
        engine_slot: EngineSlot::default(),
        control_metrics: ControlMetricsSlot::default(),
        subnet_changes: Arc::default(),
    };
    daemon.health.set_phase(Some(phase::INTERFACE));
    let _http = serve_health(&daemon).await?;

    let outcome = match daemon.start(&mut signals).await {
        Ok(Some(mut running)) => {
            let outcome = daemon.supervise(&mut running, &mut signals).await;
            daemon.stop(running).await;
            outcome
        }
        stopped_or_failed => stopped_or_failed.map(drop),
    };
    if let Some(notifier) = &daemon.notifier {
        let _ = notifier.stopping();
    }
    outcome
}

/// `wait`, unless SIGTERM or SIGINT comes first: then `None`, and the signal is logged.
async fn unless_stopped<T>(
    signals: &mut StopSignals,
    waiting_for: &str,
    wait: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        done = wait => Some(done),
        signal = signals.recv() => {
            info!("{signal} while {waiting_for}: shutting down");
            None
        }
    }
}

impl Daemon<'_> {
    /// Brings weftd up in flanneld's order, up to READY=1; `None` when a signal stopped it.
    async fn start(&self, signals: &mut StopSignals) -> Result<Option<Running<'_>>, DaemonError> {
        let flags = self.flags;
        let health = &self.health;
        let netlink = Netlink::connect()?;
        let selection = IfaceSelection::from_flags(flags);
        let Some(ext) = unless_stopped(
            signals,
            "looking for the external interface",
            find_external(&netlink, &selection),
        )
        .await
        else {
            return Ok(None);
        };
        let ext = ext?;
        info!(iface = %ext.name, addr = %ext.addr, public_ip = %ext.public_ip, mtu = ext.mtu, "using external interface");
        let tun_mtu = ext.mtu.saturating_sub(ENCAP_OVERHEAD);
        if tun_mtu < 576 {
            return Err(DaemonError::Settings(format!(
                "the MTU of {} ({}) leaves {} bytes for the overlay; at least 576 are needed",
                ext.name, ext.mtu, tun_mtu
            )));
        }

        let registry = EtcdRegistry::new(&etcd_settings(flags)?)?;
        health.set_phase(Some(phase::CONFIG));
        let Some(config) = unless_stopped(
            signals,
            "waiting for the network config",
            lease::wait_for_config(&registry, Backoff::default()),
        )
        .await
        else {
            return Ok(None);
        };
        let overlay = config.overlay()?;
        let network = overlay.network();
        info!(network = %network, subnet_len = overlay.subnet_len(), port = config.port(), "network config");
        let tunnels = crate::encryption::prepare(flags, &config)?;
        let tun_mtu = match &tunnels {
            Some(_) => tun_mtu.saturating_sub(crate::encryption::MTU_OVERHEAD),
            None => tun_mtu,
        };
        if tun_mtu < 576 {
            return Err(DaemonError::Settings(format!(
                "the MTU of {} ({}) leaves {} bytes for the encrypted overlay; at least 576 are needed",
                ext.name, ext.mtu, tun_mtu
            )));
        }

        let routes = Routes::new(RouteTable::empty(overlay, config.port()));
        let settings = lease_settings(flags, ext.public_ip)?;
        let previous_subnet = settings.previous_subnet;
        let record_registry = registry.clone();
        let (mut membership, membership_task) =
            lease::run_membership(registry, &config, settings, routes.clone())?;
        let membership_task = AbortOnDrop(membership_task);
        // Set once per process: start runs once.
        let _ = self.control_metrics.set(membership.metrics());

        info!("waiting for a subnet lease");
        health.set_phase(Some(phase::LEASE));
        let Some(first) =
            unless_stopped(signals, "waiting for a subnet lease", membership.acquired()).await
        else {
            return Ok(None);
        };
        let Some(first) = first else {
            return Err(DaemonError::MembershipEnded);
        };
        health.set_lease_held(true);
        health.set_phase(Some(phase::DATA_PLANE));
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
            flags,
            netlink,
            network,
            tun_mtu,
            iptables: None,
            subnet_changes: self.subnet_changes.clone(),
        };
        if let Some(previous) = previous_subnet.filter(|p| *p != first.subnet) {
            followers.report_subnet_change(previous, first.subnet);
        }
        followers.configure_tun(&first).await?;
        let groups = Groups::default();
        let engine = Arc::new(Engine::start_with(
            engine_config(flags, &ext, config.port(), tun_mtu),
            queues,
            routes.clone(),
            groups.clone(),
            tunnels.clone(),
        )?);
        let multicast_tasks = match &tunnels {
            Some(tunnels) => {
                let (task, local_groups) = crate::encryption::start_records(
                    record_registry,
                    &membership,
                    routes.clone(),
                    tunnels,
                    skip_inner_csum(flags, &engine),
                    engine.partial_peers(),
                );
                let keep_open = tokio::spawn(async move {
                    let _open = local_groups;
                    std::future::pending::<()>().await
                });
                vec![AbortOnDrop(task), AbortOnDrop(keep_open)]
            }
            None => start_records(
                flags,
                record_registry,
                &membership,
                &engine,
                routes.clone(),
                groups,
            )?,
        };
        if let Ok(mut slot) = self.engine_slot.lock() {
            *slot = Some(engine.clone());
        }
        health.set_engine_running(true);
        info!(workers = flags.workers.max(1), io = ?flags.io, bind = %SocketAddrV4::new(ext.addr, config.port()), "data plane running");
        followers.write_subnet_env(&first)?;
        followers.start_iptables(&first).await?;
        followers.check_stale(first.subnet, health).await;
        health.set_phase(None);
        if let Some(notifier) = &self.notifier {
            if let Err(e) = notifier.ready() {
                warn!(error = %e, "cannot notify systemd");
            }
        }
        Ok(Some(Running {
            _membership: membership_task,
            _multicast: multicast_tasks,
            leases: membership.lease(),
            current: first,
            followers,
            engine,
        }))
    }
}

/// Serves /healthz and /metrics when `--healthz-port` is set.
async fn serve_health(daemon: &Daemon<'_>) -> Result<Option<AbortOnDrop>, DaemonError> {
    let flags = daemon.flags;
    if flags.healthz_port == 0 {
        return Ok(None);
    }
    let addr = SocketAddr::new(flags.healthz_ip, flags.healthz_port);
    let metrics_engine = daemon.engine_slot.clone();
    let metrics_health = daemon.health.clone();
    let subnet_changes = daemon.subnet_changes.clone();
    let control_metrics = daemon.control_metrics.clone();
    let metrics: MetricsFn = Arc::new(move || {
        let mut text = String::new();
        let engine = metrics_engine.lock().ok().and_then(|slot| slot.clone());
        if let Some(engine) = engine {
            engine.counters().render_prometheus(&mut text);
            engine.gso_check().counts().render_prometheus(&mut text);
            if let Some(tunnels) = engine.tunnels() {
                crate::encryption::render_prometheus(tunnels, &mut text);
            }
        }
        if let Some(control) = control_metrics.get() {
            control.render_prometheus(&mut text);
        }
        subnet_changes.render_prometheus(metrics_health.subnet_stale(), &mut text);
        text
    });
    let server = HttpServer::bind(addr, daemon.health.clone(), metrics)
        .await
        .map_err(|source| DaemonError::Healthz { addr, source })?;
    info!(%addr, "serving /healthz and /metrics");
    Ok(Some(AbortOnDrop(tokio::spawn(server.run()))))
}

impl Daemon<'_> {
    /// The running daemon's loop: returns on a signal (Ok) or a fatal error.
    async fn supervise(
        &self,
        running: &mut Running<'_>,
        signals: &mut StopSignals,
    ) -> Result<(), DaemonError> {
        let flags = self.flags;
        let health = &self.health;
        let mut engine_check = tokio::time::interval(Duration::from_secs(1));
        let mut stats = tokio::time::interval(flags.stats_interval.max(Duration::from_secs(1)));
        stats.tick().await;
        loop {
            tokio::select! {
                signal = signals.recv() => { info!("{signal}: shutting down"); return Ok(()); }
                changed = running.leases.changed() => {
                    if changed.is_err() {
                        health.set_lease_held(false);
                        return Err(DaemonError::MembershipEnded);
                    }
                    let lease = *running.leases.borrow_and_update();
                    match lease {
                        Some(lease) if lease.subnet != running.current.subnet => {
                            running.followers.subnet_changed(running.current.subnet, &lease).await?;
                            running.followers.check_stale(lease.subnet, health).await;
                            running.current = lease;
                            health.set_lease_held(true);
                        }
                        Some(lease) => {
                            running.current = lease;
                            health.set_lease_held(true);
                        }
                        None => health.set_lease_held(false),
                    }
                }
                _ = engine_check.tick() => {
                    // A lost lease stays published until it is replaced; its expiry tells.
                    let held = running.current.expires.is_none_or(|at| at > std::time::SystemTime::now());
                    health.set_lease_held(held);
                    let engine_running = running.engine.is_running();
                    health.set_engine_running(engine_running);
                    if !engine_running {
                        error!("a data-plane worker stopped");
                        return Err(DaemonError::EngineStopped);
                    }
                    running.followers.check_stale(running.current.subnet, health).await;
                }
                _ = stats.tick(), if flags.verbosity >= 1 => {
                    info!(counters = %running.engine.counters().summary(), "data plane");
                }
            }
        }
    }

    /// Takes the running daemon down: workers stopped and their counters logged, iptables
    /// rules removed. The lease stays in etcd for the next start.
    async fn stop(&self, running: Running<'_>) {
        self.health.set_phase(Some(phase::STOPPING));
        let Running {
            _membership,
            _multicast,
            mut followers,
            engine,
            ..
        } = running;
        drop(_membership);
        drop(_multicast);
        if let Ok(mut slot) = self.engine_slot.lock() {
            slot.take();
        }
        // A /metrics answer being rendered holds a clone for a moment: wait for it.
        let mut engine = engine;
        for attempt in 0..100 {
            match Arc::try_unwrap(engine) {
                Ok(owned) => {
                    info!(counters = %owned.shutdown().summary(), "data plane stopped");
                    break;
                }
                Err(shared) if attempt == 99 => {
                    warn!(counters = %shared.counters().summary(), "data plane still shared after 1 s; it stops when the last user lets go");
                    break;
                }
                Err(shared) => engine = shared,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(keeper) = followers.iptables.take() {
            if let Err(e) = keeper.shutdown().await {
                warn!(error = %e, "cannot remove iptables rules");
            }
        }
    }
}
