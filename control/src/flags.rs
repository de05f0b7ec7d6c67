//! weftd's command line: flanneld v0.20.2's flags, defaults and `FLANNELD_*` environment
//! variables, plus weft's own flags (`WEFTD_*`).
//!
//! flanneld parses its command line with Go's `flag` package, which accepts `-name` and
//! `--name` alike, `-name=value` and `-name value`, and booleans only as `-name` or
//! `-name=value`. [`normalize_args`] rewrites such a command line into the one canonical
//! `--name=value` form that clap then parses, so a unit file written for flanneld works
//! unchanged. Environment variables fill the flags the command line did not set, as
//! flanneld's `SetFlagsFromEnv` does; an empty variable counts as unset.
//!
//! Kubernetes-mode flags and the flags of flannel's retired client/server and multi-network
//! modes are refused: weftd implements the etcd subnet manager with the udp backend.

use std::collections::HashSet;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Command, CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::secret::Secret;

/// flanneld's default `--etcd-endpoints`.
pub const DEFAULT_ETCD_ENDPOINTS: &str = "http://127.0.0.1:4001,http://127.0.0.1:2379";

/// Flags of flanneld modes weftd does not implement.
const REFUSED_FLAGS: &[&str] = &[
    "kube-subnet-mgr",
    "kube-api-url",
    "kube-annotation-prefix",
    "kubeconfig-file",
    "net-config-path",
    "set-node-network-unavailable",
    "use-multi-cluster-cidr",
    "listen",
    "remote",
    "remote-keyfile",
    "remote-certfile",
    "remote-cafile",
    "networks",
    "subnet-dir",
];

/// glog/klog flags flanneld copies into its flag set; weftd accepts and ignores them.
/// Each takes a value.
const IGNORED_FLAGS: &[&str] = &["vmodule", "log_backtrace_at"];

/// The whole configuration that comes from weftd's command line and environment.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "weftd",
    about = "weft: a flannel-compatible userspace overlay network (etcd subnet manager, udp backend)",
    disable_version_flag = true,
    args_override_self = true
)]
pub struct Flags {
    /// A comma-delimited list of etcd endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_name = "URLS",
        default_value = DEFAULT_ETCD_ENDPOINTS,
        value_delimiter = ',',
        action = ArgAction::Set,
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        value_name = "PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// SSL key file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", value_name = "PATH")]
    pub etcd_keyfile: Option<PathBuf>,

    /// SSL certification file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", value_name = "PATH")]
    pub etcd_certfile: Option<PathBuf>,

    /// SSL Certificate Authority file used to secure etcd communication.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", value_name = "PATH")]
    pub etcd_cafile: Option<PathBuf>,

    /// Username for BasicAuth to etcd.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", value_name = "NAME")]
    pub etcd_username: Option<String>,

    /// Password for BasicAuth to etcd. Visible in the process list; prefer
    /// --etcd-password-file.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        value_name = "PASSWORD",
        value_parser = parse_secret,
        conflicts_with = "etcd_password_file",
    )]
    pub etcd_password: Option<Secret>,

    /// File holding the password for BasicAuth to etcd (one trailing line end is dropped).
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD_FILE", value_name = "PATH")]
    pub etcd_password_file: Option<PathBuf>,

    /// Interface to use (IP or name) for inter-host communication. Can be given several
    /// times; the first one found is used.
    #[arg(long, env = "FLANNELD_IFACE", value_name = "NAME|IP", action = ArgAction::Append)]
    pub iface: Vec<String>,

    /// Regex matched against interface IPv4 addresses, then names, to find the interface
    /// for inter-host communication. Can be given several times; checked after --iface.
    #[arg(
        long,
        env = "FLANNELD_IFACE_REGEX",
        value_name = "REGEX",
        action = ArgAction::Append,
        value_parser = parse_regex,
    )]
    pub iface_regex: Vec<String>,

    /// Use the interface of the route to this address (as `ip route get <addr>` shows).
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH", value_name = "IP")]
    pub iface_can_reach: Option<Ipv4Addr>,

    /// IP accessible by other nodes for inter-host communication.
    #[arg(long, env = "FLANNELD_PUBLIC_IP", value_name = "IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 accessible by other nodes for inter-host communication.
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6", value_name = "IP")]
    pub public_ipv6: Option<Ipv6Addr>,

    /// File where the environment variables (subnet, MTU, ...) are written.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        value_name = "PATH",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Subnet lease renewal margin, in minutes, from 1 to 1439.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        value_name = "MINUTES",
        default_value = "60",
        value_parser = parse_renew_margin,
    )]
    pub subnet_lease_renew_margin: u32,

    /// Set up IP masquerade rules for traffic leaving the overlay network.
    #[arg(
        long,
        env = "FLANNELD_IP_MASQ",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub ip_masq: bool,

    /// Resync period for iptables rules, in seconds.
    #[arg(
        long,
        env = "FLANNELD_IPTABLES_RESYNC",
        value_name = "SECONDS",
        default_value = "5",
        value_parser = parse_positive_secs,
    )]
    pub iptables_resync: Duration,

    /// Add accept rules for the overlay network to the FORWARD chain.
    #[arg(
        long,
        env = "FLANNELD_IPTABLES_FORWARD_RULES",
        value_name = "BOOL",
        default_value = "true",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub iptables_forward_rules: bool,

    /// The IP address the healthz server listens on.
    #[arg(
        long,
        env = "FLANNELD_HEALTHZ_IP",
        value_name = "IP",
        default_value = "0.0.0.0"
    )]
    pub healthz_ip: IpAddr,

    /// The port the healthz server listens on (0 disables it).
    #[arg(
        long,
        env = "FLANNELD_HEALTHZ_PORT",
        value_name = "PORT",
        default_value = "0",
        value_parser = parse_port,
    )]
    pub healthz_port: u16,

    /// Print the version and exit.
    #[arg(
        long,
        env = "FLANNELD_VERSION",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub version: bool,

    /// Log verbosity (glog's -v): 0 is quiet, 1 adds periodic statistics, higher is chattier.
    #[arg(
        long = "v",
        env = "FLANNELD_V",
        value_name = "LEVEL",
        default_value = "0",
        value_parser = parse_verbosity,
    )]
    pub verbosity: u32,

    /// Name of the TUN device.
    #[arg(
        long,
        env = "WEFTD_TUN_NAME",
        value_name = "NAME",
        default_value = "flannel0",
        value_parser = parse_ifname,
    )]
    pub tun_name: String,

    /// Number of packet worker threads (default: the number of available cores).
    #[arg(
        long,
        env = "WEFTD_WORKERS",
        value_name = "N",
        default_value_t = available_cores(),
        value_parser = parse_workers,
    )]
    pub workers: usize,

    /// How the packet workers talk to the kernel.
    #[arg(
        long,
        env = "WEFTD_IO",
        value_name = "MODE",
        value_enum,
        default_value_t = IoMode::Syscalls
    )]
    pub io: IoMode,

    /// ICMP errors each packet worker may send per second (RFC 1812's rate limit, in bursts
    /// of up to 50); 0 for no limit.
    #[arg(
        long,
        env = "WEFTD_ICMP_RATE_LIMIT",
        value_name = "N",
        default_value_t = 1000,
        value_parser = parse_icmp_rate_limit,
    )]
    pub icmp_rate_limit: u32,

    /// The longest, in microseconds, a packet worker keeps looking for packets after it
    /// handled some before it sleeps; the look adapts to the gaps in the traffic and stops
    /// when they are longer (so an idle weftd sleeps). Saves request/response traffic
    /// wake-ups, but takes CPU from applications that share the cores; 0 (the default)
    /// never looks.
    #[arg(
        long,
        env = "WEFTD_BUSY_POLL_US",
        value_name = "MICROSECONDS",
        default_value_t = 0,
        value_parser = parse_busy_poll_us,
    )]
    pub busy_poll_us: u32,

    /// Accept packets from a peer whose inner source lies outside the whole overlay network
    /// (traffic the peer forwards from beyond the overlay).
    #[arg(
        long,
        env = "WEFTD_ALLOW_FOREIGN_SOURCES",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub allow_foreign_sources: bool,

    /// Carry IPv4 multicast (224.0.0.0/4) between weft hosts that have it on: what local
    /// containers send to a group goes to every host with a member (link-local groups to
    /// every such host), through a TAP port on the container bridge (`--multicast-bridge`).
    #[arg(
        long,
        env = "WEFTD_MULTICAST",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub multicast: bool,

    /// Carry UDP broadcast to every weft host that has it on: to 255.255.255.255, and to the
    /// overlay Network's broadcast address (e.g. 10.1.255.255), which reaches the containers of
    /// those hosts and this host's other containers as 255.255.255.255.
    #[arg(
        long,
        env = "WEFTD_BROADCAST",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub broadcast: bool,

    /// The container bridge whose multicast and broadcast weft carries (with `--multicast`
    /// or `--broadcast`); weft's TAP port is enslaved to it as soon as it exists.
    #[arg(
        long,
        env = "WEFTD_MULTICAST_BRIDGE",
        value_name = "NAME",
        default_value = "docker0",
        value_parser = parse_ifname,
    )]
    pub multicast_bridge: String,

    /// Multicast and broadcast packets this host may replicate to its peers per second
    /// (one per copy sent; a token bucket with bursts of a tenth of it); more are dropped
    /// and counted. 0 for no limit.
    #[arg(
        long,
        env = "WEFTD_MULTICAST_RATE_LIMIT",
        value_name = "N",
        default_value_t = 10_000,
        value_parser = parse_multicast_rate_limit,
    )]
    pub multicast_rate_limit: u32,

    /// Name of the TAP device weft puts on the container bridge for multicast and broadcast.
    #[arg(
        long,
        env = "WEFTD_MULTICAST_TAP",
        value_name = "NAME",
        default_value = "weftmc0",
        value_parser = parse_ifname,
    )]
    pub multicast_tap: String,

    /// This host's private key for encryption between hosts (used only when the network
    /// config has `"Backend":{"Type":"udp","Encryption":"wireguard"}`): created with mode
    /// 0600 on first start, refused if others may read it.
    #[arg(
        long,
        env = "WEFTD_ENCRYPTION_KEY_FILE",
        value_name = "PATH",
        default_value = "/var/lib/weft/private.key"
    )]
    pub encryption_key_file: std::path::PathBuf,

    /// Pin worker N to CPU N. Off by default: pinned workers cannot move off a core that
    /// something else keeps busy (measured in the two-host lab, where two weftd share the
    /// cores: ping RTT spikes of over 20 ms pinned, about 4 ms unpinned on a busy machine).
    #[arg(
        long,
        env = "WEFTD_PIN_WORKERS",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub pin_workers: bool,

    /// Do not use the TUN's checksum and segmentation offloads (64 KiB super-packets read
    /// from and written to the TUN); the device is then opened without a virtio-net header.
    #[arg(
        long,
        env = "WEFTD_NO_TUN_OFFLOAD",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub no_tun_offload: bool,

    /// Do not send runs of datagrams to one peer in one call (UDP GSO).
    #[arg(
        long,
        env = "WEFTD_NO_UDP_GSO",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub no_udp_gso: bool,

    /// Do not receive runs of datagrams in one call (UDP GRO).
    #[arg(
        long,
        env = "WEFTD_NO_UDP_GRO",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub no_udp_gro: bool,

    /// Compute and verify every inner TCP/UDP checksum also between weft hosts (by default,
    /// two weft hosts that both advertise it leave them to the outer UDP checksum).
    #[arg(
        long,
        env = "WEFTD_NO_SKIP_INNER_CSUM",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub no_skip_inner_csum: bool,

    /// Send GSO runs to every peer unchecked (by default, a weft host that advertises the
    /// check gets datagrams one by one until a GSO run of probes to it arrives intact).
    #[arg(
        long,
        env = "WEFTD_NO_UDP_GSO_CHECK",
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = parse_go_bool,
    )]
    pub no_udp_gso_check: bool,

    /// Seconds between the statistics summaries logged at -v 1 and above.
    #[arg(
        long,
        env = "WEFTD_STATS_INTERVAL",
        value_name = "SECONDS",
        default_value = "10",
        value_parser = parse_positive_secs,
    )]
    pub stats_interval: Duration,

    /// TTL of the etcd lease holding our subnet, in seconds (testing only; default 24 h).
    #[arg(
        long,
        env = "WEFTD_LEASE_TTL",
        value_name = "SECONDS",
        hide = true,
        value_parser = parse_positive_secs,
    )]
    pub lease_ttl: Option<Duration>,

    /// Seconds between retries of a failed lease renewal (testing only; default 60).
    #[arg(
        long,
        env = "WEFTD_RENEW_RETRY",
        value_name = "SECONDS",
        hide = true,
        value_parser = parse_positive_secs,
    )]
    pub renew_retry: Option<Duration>,

    /// glog flags that were accepted for compatibility and have no effect.
    #[arg(skip)]
    pub ignored: Vec<String>,
}

/// How the packet workers move packets between the kernel and user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoMode {
    /// One io_uring per worker.
    Uring,
    /// Batched `recvmmsg`/`sendmmsg` and plain reads and writes.
    Syscalls,
}

/// Why a command line or environment was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum FlagsError {
    /// The flag belongs to a flanneld mode weftd does not implement.
    #[error(
        "{flag} is not supported: weftd implements flannel's etcd subnet manager with the udp \
         backend only"
    )]
    Unsupported {
        /// The flag as written.
        flag: String,
    },
    /// No such flag.
    #[error("flag provided but not defined: {0}")]
    Unknown(String),
    /// A flag that takes a value was last on the command line.
    #[error("flag needs an argument: {0}")]
    MissingValue(String),
    /// An argument that is not a flag.
    #[error("unexpected argument {0:?}: weftd takes only flags")]
    Positional(String),
    /// An argument or environment variable that is not valid UTF-8.
    #[error("argument is not valid UTF-8: {0:?}")]
    NotUtf8(OsString),
    /// An environment variable holds an invalid value.
    #[error("invalid value {value:?} in environment variable {var}: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        message: String,
    },
    /// `-h`/`-help`: the text to print.
    #[error("{0}")]
    Help(String),
    /// A flag's value was refused by the parser (the message names the flag).
    #[error("{0}")]
    Invalid(String),
}

impl Flags {
    /// Parses a flanneld-style command line (`args[0]` is the program name) and fills unset
    /// flags from `env`, which maps a variable name to its value.
    pub fn try_parse<I, S, E>(args: I, env: E) -> Result<Self, FlagsError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
        E: Fn(&str) -> Option<String>,
    {
        let args = args
            .into_iter()
            .map(|a| {
                let a: OsString = a.into();
                a.into_string().map_err(FlagsError::NotUtf8)
            })
            .collect::<Result<Vec<String>, _>>()?;
        let cmd = parse_command();
        let normalized = normalize_args(&args, &cmd)?;
        if normalized.help {
            return Err(FlagsError::Help(
                Flags::command().render_long_help().to_string(),
            ));
        }

        if let Some(v) = env("FLANNELD_KUBE_SUBNET_MGR").filter(|v| !v.is_empty()) {
            if parse_go_bool(&v).unwrap_or(true) {
                return Err(FlagsError::Unsupported {
                    flag: "FLANNELD_KUBE_SUBNET_MGR".to_string(),
                });
            }
        }

        let mut argv = normalized.args;
        for arg in Flags::command().get_arguments() {
            let (Some(long), Some(var)) = (arg.get_long(), arg.get_env()) else {
                continue;
            };
            if normalized.seen.contains(long) {
                continue;
            }
            let Some(var) = var.to_str() else { continue };
            let Some(value) = env(var).filter(|v| !v.is_empty()) else {
                continue;
            };
            let candidate = format!("--{long}={value}");
            // Checked alone first so that an error names the variable, not the flag.
            if let Err(e) = cmd
                .clone()
                .try_get_matches_from([String::from("weftd"), candidate.clone()])
            {
                let message = clap_message(&e);
                // Drop clap's "invalid value '…' for '--flag': " lead-in: the variable is named.
                let message = match message.split_once("': ") {
                    Some((_, reason)) if message.starts_with("invalid value") => {
                        format!("{reason} (for --{long})")
                    }
                    _ => message,
                };
                return Err(FlagsError::Env {
                    var: var.to_string(),
                    value,
                    message,
                });
            }
            argv.push(candidate);
        }

        let matches = cmd
            .try_get_matches_from(argv)
            .map_err(|e| FlagsError::Invalid(clap_message(&e)))?;
        let mut flags =
            Flags::from_arg_matches(&matches).map_err(|e| FlagsError::Invalid(clap_message(&e)))?;
        flags.ignored = normalized.ignored;
        Ok(flags)
    }

    /// Parses the process's command line and environment; prints help or the error and
    /// exits (status 0 for help, 2 for errors) when there is nothing to run.
    pub fn parse_or_exit() -> Self {
        match Flags::try_parse(std::env::args_os(), |var| std::env::var(var).ok()) {
            Ok(flags) => flags,
            Err(FlagsError::Help(text)) => {
                eprintln!("{text}");
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("weftd: {e}");
                std::process::exit(2);
            }
        }
    }
}

/// The clap command used for parsing: environment lookups are stripped because
/// [`Flags::try_parse`] applies the environment itself (from the map it is given).
fn parse_command() -> Command {
    Flags::command().mut_args(|a| a.env(None))
}

/// clap's message on one line, without the "error: " prefix, tips and usage footer.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let message = text
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    message
        .strip_prefix("error: ")
        .unwrap_or(&message)
        .to_string()
}

/// A command line rewritten into canonical `--name=value` form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedArgs {
    /// The program name followed by canonical flags.
    pub args: Vec<String>,
    /// Long names of the flags the command line set (the environment must not override them).
    pub seen: HashSet<String>,
    /// glog flags that were accepted and dropped, as written.
    pub ignored: Vec<String>,
    /// `-h`, `-help` or `--help` was given.
    pub help: bool,
}

/// Rewrites a Go-`flag`-style command line into canonical `--name=value` arguments for
/// `cmd`: single and double dashes alike, `-name value` joined, booleans only ever
/// `-name` or `-name=value`, `--` ends the flags, empty values of flags without a default
/// dropped (Go treats them as unset). Pure; `args[0]` is the program name.
pub fn normalize_args(args: &[String], cmd: &Command) -> Result<NormalizedArgs, FlagsError> {
    let mut out = NormalizedArgs {
        args: vec![args.first().cloned().unwrap_or_else(|| "weftd".to_string())],
        seen: HashSet::new(),
        ignored: Vec::new(),
        help: false,
    };
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        if arg == "--" {
            if let Some(positional) = rest.next() {
                return Err(FlagsError::Positional(positional.clone()));
            }
            break;
        }
        let body = match arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) {
            Some(body) if !body.is_empty() && !body.starts_with('-') && !body.starts_with('=') => {
                body
            }
            _ => return Err(FlagsError::Positional(arg.clone())),
        };
        let (name, inline_value) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (body, None),
        };

        if name == "h" || name == "help" {
            out.help = true;
            continue;
        }
        if REFUSED_FLAGS.contains(&name) {
            return Err(FlagsError::Unsupported { flag: arg.clone() });
        }
        if IGNORED_FLAGS.contains(&name) {
            if inline_value.is_none() {
                rest.next()
                    .ok_or_else(|| FlagsError::MissingValue(format!("-{name}")))?;
            }
            out.ignored.push(format!("-{name}"));
            continue;
        }
        let Some(spec) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(name) && !matches!(a.get_action(), ArgAction::Help))
        else {
            return Err(FlagsError::Unknown(format!("-{name}")));
        };

        // Booleans (require_equals) never take the next argument, as in Go.
        let takes_separate_value =
            spec.get_action().takes_values() && !spec.is_require_equals_set();
        let value = match inline_value {
            Some(v) => Some(v.to_string()),
            None if takes_separate_value => Some(
                rest.next()
                    .cloned()
                    .ok_or_else(|| FlagsError::MissingValue(format!("-{name}")))?,
            ),
            None => None,
        };
        out.seen.insert(name.to_string());
        match value {
            Some(v) if v.is_empty() && spec.get_default_values().is_empty() => {}
            Some(v) => out.args.push(format!("--{name}={v}")),
            None => out.args.push(format!("--{name}")),
        }
    }
    Ok(out)
}

/// Parses a boolean the way Go's `strconv.ParseBool` does.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true/false, t/f, 1/0)")),
    }
}

/// Parses an integer the way Go's `strconv.ParseInt(s, 0, 64)` does: optional sign,
/// `0x`/`0o`/`0b` or leading-`0` (octal) prefixes, underscores between digits with a prefix.
pub fn parse_go_int(s: &str) -> Result<i64, String> {
    let invalid = || format!("{s:?} is not an integer");
    let (negative, unsigned) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = unsigned.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_string())
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string())
    } else {
        (10, lower.clone())
    };
    if digits.is_empty() {
        return Err(invalid());
    }
    let digits = if radix == 10 {
        digits
    } else {
        if digits.starts_with('_') && !lower.starts_with('0') || digits.ends_with('_') {
            return Err(invalid());
        }
        digits.replace('_', "")
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    let magnitude = i128::from_str_radix(&digits, radix).map_err(|_| invalid())?;
    let value = if negative { -magnitude } else { magnitude };
    i64::try_from(value).map_err(|_| format!("{s:?} is out of range"))
}

fn parse_int_in(s: &str, min: i64, max: i64) -> Result<i64, String> {
    let v = parse_go_int(s)?;
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not in {min}..={max}"))
    }
}

fn parse_renew_margin(s: &str) -> Result<u32, String> {
    // flanneld: "out of acceptable range" unless 0 < margin < 24*60.
    parse_int_in(s, 1, 24 * 60 - 1).map(|v| v as u32)
}

fn parse_port(s: &str) -> Result<u16, String> {
    parse_int_in(s, 0, u16::MAX.into()).map(|v| v as u16)
}

fn parse_verbosity(s: &str) -> Result<u32, String> {
    parse_int_in(s, 0, i32::MAX.into()).map(|v| v as u32)
}

fn parse_workers(s: &str) -> Result<usize, String> {
    parse_int_in(s, 1, 1024).map(|v| v as usize)
}

fn parse_icmp_rate_limit(s: &str) -> Result<u32, String> {
    parse_int_in(s, 0, 1_000_000).map(|v| v as u32)
}

fn parse_busy_poll_us(s: &str) -> Result<u32, String> {
    parse_int_in(s, 0, 10_000).map(|v| v as u32)
}

fn parse_multicast_rate_limit(s: &str) -> Result<u32, String> {
    parse_int_in(s, 0, 10_000_000).map(|v| v as u32)
}

fn parse_positive_secs(s: &str) -> Result<Duration, String> {
    parse_int_in(s, 1, 365 * 24 * 3600).map(|v| Duration::from_secs(v as u64))
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

fn parse_regex(s: &str) -> Result<String, String> {
    regex_lite::Regex::new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("invalid regex: {e}"))
}

fn parse_ifname(s: &str) -> Result<String, String> {
    // IFNAMSIZ is 16 including the terminating NUL.
    let valid = !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if valid {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a valid interface name (1-15 bytes, no '/', ':' or spaces)"
        ))
    }
}

fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Flags, FlagsError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let argv = std::iter::once("weftd").chain(args.iter().copied());
        Flags::try_parse(argv, |k| env.get(k).cloned())
    }

    fn parse(args: &[&str]) -> Result<Flags, FlagsError> {
        parse_env(args, &[])
    }

    #[test]
    fn defaults_match_flanneld() {
        let f = parse(&[]).unwrap();
        assert_eq!(
            f.etcd_endpoints,
            vec!["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.etcd_keyfile, None);
        assert_eq!(f.etcd_username, None);
        assert!(f.iface.is_empty());
        assert!(f.iface_regex.is_empty());
        assert_eq!(f.iface_can_reach, None);
        assert_eq!(f.public_ip, None);
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert!(!f.ip_masq);
        assert_eq!(f.iptables_resync, Duration::from_secs(5));
        assert!(f.iptables_forward_rules);
        assert_eq!(f.healthz_ip, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(f.healthz_port, 0);
        assert!(!f.version);
        assert_eq!(f.verbosity, 0);
        assert_eq!(f.tun_name, "flannel0");
        assert_eq!(f.workers, available_cores());
        assert_eq!(f.io, IoMode::Syscalls);
        assert!(!f.allow_foreign_sources);
        assert!(!f.pin_workers);
        assert_eq!(f.busy_poll_us, 0);
        assert!(!f.no_tun_offload && !f.no_udp_gso && !f.no_udp_gro);
        assert!(!f.no_skip_inner_csum);
        assert!(!f.no_udp_gso_check);
        assert_eq!(f.lease_ttl, None);
        assert_eq!(f.renew_retry, None);
        assert!(f.ignored.is_empty());
    }

    #[test]
    fn full_flanneld_command_line() {
        let f = parse(&[
            "--etcd-endpoints=https://10.0.0.1:2379,https://10.0.0.2:2379",
            "--etcd-prefix",
            "/weft/network",
            "--etcd-keyfile=/etc/ssl/etcd/key.pem",
            "--etcd-certfile=/etc/ssl/etcd/cert.pem",
            "--etcd-cafile",
            "/etc/ssl/etcd/ca.pem",
            "--etcd-username=flannel",
            "--etcd-password",
            "s3cret=-x",
            "--iface=eth1",
            "--iface",
            "192.168.0.2",
            "--iface-regex=^en",
            "--iface-regex",
            "^192\\.168\\.",
            "--iface-can-reach=192.168.0.1",
            "--public-ip=203.0.113.7",
            "--public-ipv6=2001:db8::7",
            "--subnet-file=/run/flannel/h1.env",
            "--subnet-lease-renew-margin=120",
            "--ip-masq",
            "--iptables-resync=10",
            "--iptables-forward-rules=false",
            "--healthz-ip=127.0.0.1",
            "--healthz-port=8471",
            "-v=2",
            "--vmodule=main=3",
        ])
        .unwrap();
        assert_eq!(
            f.etcd_endpoints,
            vec!["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        );
        assert_eq!(f.etcd_prefix, "/weft/network");
        assert_eq!(f.etcd_keyfile, Some("/etc/ssl/etcd/key.pem".into()));
        assert_eq!(f.etcd_certfile, Some("/etc/ssl/etcd/cert.pem".into()));
        assert_eq!(f.etcd_cafile, Some("/etc/ssl/etcd/ca.pem".into()));
        assert_eq!(f.etcd_username.as_deref(), Some("flannel"));
        assert_eq!(
            f.etcd_password.as_ref().map(Secret::expose),
            Some("s3cret=-x")
        );
        assert_eq!(f.iface, vec!["eth1", "192.168.0.2"]);
        assert_eq!(f.iface_regex, vec!["^en", "^192\\.168\\."]);
        assert_eq!(f.iface_can_reach, Some(Ipv4Addr::new(192, 168, 0, 1)));
        assert_eq!(f.public_ip, Some(Ipv4Addr::new(203, 0, 113, 7)));
        assert_eq!(f.public_ipv6, Some("2001:db8::7".parse().unwrap()));
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/h1.env"));
        assert_eq!(f.subnet_lease_renew_margin, 120);
        assert!(f.ip_masq);
        assert_eq!(f.iptables_resync, Duration::from_secs(10));
        assert!(!f.iptables_forward_rules);
        assert_eq!(f.healthz_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(f.healthz_port, 8471);
        assert_eq!(f.verbosity, 2);
        assert_eq!(f.ignored, vec!["-vmodule"]);
    }

    #[test]
    fn single_dash_forms_as_go_flag_accepts_them() {
        let f = parse(&[
            "-etcd-endpoints",
            "http://198.18.0.1:2379",
            "-etcd-prefix=/p",
            "-iface",
            "eth0",
            "-ip-masq=true",
            "-iptables-forward-rules=0",
            "-v",
            "3",
            "-subnet-lease-renew-margin",
            "0x10",
        ])
        .unwrap();
        assert_eq!(f.etcd_endpoints, vec!["http://198.18.0.1:2379"]);
        assert_eq!(f.etcd_prefix, "/p");
        assert_eq!(f.iface, vec!["eth0"]);
        assert!(f.ip_masq);
        assert!(!f.iptables_forward_rules);
        assert_eq!(f.verbosity, 3);
        assert_eq!(f.subnet_lease_renew_margin, 16);

        let f = parse(&["-ip-masq", "-version"]).unwrap();
        assert!(f.ip_masq && f.version);
        let f = parse(&["--ip-masq=F", "-v=0"]).unwrap();
        assert!(!f.ip_masq);
    }

    #[test]
    fn value_flags_take_the_next_argument_even_with_a_dash() {
        let f = parse(&["--etcd-prefix", "-odd", "-etcd-password", "--x"]).unwrap();
        assert_eq!(f.etcd_prefix, "-odd");
        assert_eq!(f.etcd_password.as_ref().map(Secret::expose), Some("--x"));
    }

    #[test]
    fn a_repeated_single_flag_keeps_the_last_value() {
        let f = parse(&["--etcd-prefix=/a", "--etcd-prefix=/b", "-v=1", "-v=4"]).unwrap();
        assert_eq!(f.etcd_prefix, "/b");
        assert_eq!(f.verbosity, 4);
    }

    #[test]
    fn a_boolean_does_not_consume_the_next_argument() {
        // Go would treat "false" as the first positional argument; weftd refuses it.
        let err = parse(&["--ip-masq", "false"]).unwrap_err();
        assert!(
            matches!(err, FlagsError::Positional(ref p) if p == "false"),
            "{err}"
        );
    }

    #[test]
    fn env_vars_fill_unset_flags() {
        let f = parse_env(
            &[],
            &[
                ("FLANNELD_ETCD_ENDPOINTS", "http://a:2379,http://b:2379"),
                ("FLANNELD_ETCD_PREFIX", "/env/prefix"),
                ("FLANNELD_IFACE", "eth9"),
                ("FLANNELD_IP_MASQ", "true"),
                ("FLANNELD_IPTABLES_FORWARD_RULES", "f"),
                ("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "30"),
                ("FLANNELD_PUBLIC_IP", "198.18.0.9"),
                ("FLANNELD_V", "1"),
                ("FLANNELD_HEALTHZ_PORT", ""),
                ("WEFTD_TUN_NAME", "weft7"),
                ("WEFTD_WORKERS", "3"),
                ("WEFTD_IO", "uring"),
                ("WEFTD_ALLOW_FOREIGN_SOURCES", "1"),
                ("WEFTD_PIN_WORKERS", "true"),
                ("WEFTD_BUSY_POLL_US", "30"),
                ("WEFTD_NO_TUN_OFFLOAD", "true"),
                ("WEFTD_NO_UDP_GSO", "1"),
                ("WEFTD_NO_UDP_GRO", "t"),
                ("WEFTD_NO_SKIP_INNER_CSUM", "true"),
                ("WEFTD_NO_UDP_GSO_CHECK", "true"),
                ("WEFTD_STATS_INTERVAL", "7"),
                ("WEFTD_LEASE_TTL", "30"),
                ("WEFTD_RENEW_RETRY", "2"),
            ],
        )
        .unwrap();
        assert_eq!(f.etcd_endpoints, vec!["http://a:2379", "http://b:2379"]);
        assert_eq!(f.etcd_prefix, "/env/prefix");
        assert_eq!(f.iface, vec!["eth9"]);
        assert!(f.ip_masq);
        assert!(!f.iptables_forward_rules);
        assert_eq!(f.subnet_lease_renew_margin, 30);
        assert_eq!(f.public_ip, Some(Ipv4Addr::new(198, 18, 0, 9)));
        assert_eq!(f.verbosity, 1);
        assert_eq!(f.healthz_port, 0, "an empty variable counts as unset");
        assert_eq!(f.tun_name, "weft7");
        assert_eq!(f.workers, 3);
        assert_eq!(f.io, IoMode::Uring);
        assert!(f.allow_foreign_sources);
        assert!(f.pin_workers);
        assert_eq!(f.busy_poll_us, 30);
        assert!(f.no_tun_offload && f.no_udp_gso && f.no_udp_gro);
        assert!(f.no_skip_inner_csum);
        assert!(f.no_udp_gso_check);
        assert_eq!(f.stats_interval, Duration::from_secs(7));
        assert_eq!(f.lease_ttl, Some(Duration::from_secs(30)));
        assert_eq!(f.renew_retry, Some(Duration::from_secs(2)));
    }

    #[test]
    fn passwords_come_from_a_flag_or_a_file_and_never_show() {
        let f = parse(&["--etcd-username=flannel", "--etcd-password=s3cret"]).unwrap();
        assert!(!format!("{f:?}").contains("s3cret"), "{f:?}");
        let f = parse(&["-etcd-password-file", "/etc/weft/etcd-password"]).unwrap();
        assert_eq!(
            f.etcd_password_file,
            Some(PathBuf::from("/etc/weft/etcd-password"))
        );
        let f = parse_env(
            &[],
            &[
                ("FLANNELD_ETCD_USERNAME", "flannel"),
                ("FLANNELD_ETCD_PASSWORD_FILE", "/run/secrets/etcd"),
            ],
        )
        .unwrap();
        assert_eq!(
            f.etcd_password_file,
            Some(PathBuf::from("/run/secrets/etcd"))
        );
        assert_eq!(f.etcd_password, None);
        let f = parse_env(&[], &[("FLANNELD_ETCD_PASSWORD", "from-env")]).unwrap();
        assert!(!format!("{f:?}").contains("from-env"), "{f:?}");
        let err = parse(&["--etcd-password=a", "--etcd-password-file=/p"]).unwrap_err();
        assert!(err.to_string().contains("--etcd-password-file"), "{err}");
    }

    #[test]
    fn offloads_are_switched_off_one_by_one() {
        let f = parse(&["--no-tun-offload"]).unwrap();
        assert!(f.no_tun_offload && !f.no_udp_gso && !f.no_udp_gro);
        let f = parse(&["-no-udp-gso", "--no-udp-gro=true"]).unwrap();
        assert!(!f.no_tun_offload && f.no_udp_gso && f.no_udp_gro);
        let f = parse_env(&["--no-udp-gso=false"], &[("WEFTD_NO_UDP_GSO", "true")]).unwrap();
        assert!(!f.no_udp_gso, "the flag wins over the variable");
    }

    #[test]
    fn icmp_errors_are_limited_per_worker_unless_zero() {
        assert_eq!(parse(&[]).unwrap().icmp_rate_limit, 1000);
        assert_eq!(parse(&["--icmp-rate-limit=0"]).unwrap().icmp_rate_limit, 0);
        let f = parse_env(&[], &[("WEFTD_ICMP_RATE_LIMIT", "250")]).unwrap();
        assert_eq!(f.icmp_rate_limit, 250);
        assert!(parse(&["--icmp-rate-limit=-1"]).is_err());
        assert!(parse(&["--icmp-rate-limit=many"]).is_err());
    }

    #[test]
    fn multicast_and_broadcast_are_off_unless_asked_for() {
        let f = parse(&[]).unwrap();
        assert!(!f.multicast && !f.broadcast);
        assert_eq!(f.multicast_bridge, "docker0");
        assert_eq!(f.multicast_tap, "weftmc0");
        assert_eq!(f.multicast_rate_limit, 10_000);
        let f = parse(&[
            "--multicast",
            "--broadcast=true",
            "--multicast-bridge",
            "cbr0",
            "--multicast-rate-limit=500",
        ])
        .unwrap();
        assert!(f.multicast && f.broadcast);
        assert_eq!(f.multicast_bridge, "cbr0");
        assert_eq!(f.multicast_rate_limit, 500);
        let f = parse_env(
            &[],
            &[("WEFTD_MULTICAST", "1"), ("WEFTD_MULTICAST_BRIDGE", "cni0")],
        )
        .unwrap();
        assert!(f.multicast && !f.broadcast);
        assert_eq!(f.multicast_bridge, "cni0");
        assert_eq!(
            parse(&["--multicast-rate-limit=0"])
                .unwrap()
                .multicast_rate_limit,
            0,
            "no limit"
        );
        for bad in [
            "--multicast-rate-limit=-1",
            "--multicast-rate-limit=lots",
            "--multicast-bridge=a/b",
        ] {
            assert!(parse(&[bad]).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn flags_win_over_env_vars() {
        let env = [
            ("FLANNELD_ETCD_PREFIX", "/env"),
            ("FLANNELD_IFACE", "eth9"),
            ("FLANNELD_IP_MASQ", "true"),
            ("FLANNELD_PUBLIC_IP", "198.18.0.9"),
            ("WEFTD_TUN_NAME", "weft7"),
        ];
        let f = parse_env(
            &[
                "-etcd-prefix",
                "/flag",
                "--iface=eth1",
                "--ip-masq=false",
                "--public-ip=",
                "--tun-name=weft0",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(f.etcd_prefix, "/flag");
        assert_eq!(f.iface, vec!["eth1"]);
        assert!(!f.ip_masq);
        assert_eq!(
            f.public_ip, None,
            "an explicit empty flag still blocks the env var"
        );
        assert_eq!(f.tun_name, "weft0");
    }

    #[test]
    fn invalid_env_var_is_named() {
        let err = parse_env(&[], &[("FLANNELD_IP_MASQ", "maybe")]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("FLANNELD_IP_MASQ"), "{msg}");
        assert!(msg.contains("maybe"), "{msg}");
    }

    #[test]
    fn kube_and_other_mode_flags_are_refused() {
        for args in [
            &["--kube-subnet-mgr"][..],
            &["-kube-subnet-mgr=true"],
            &["--kube-api-url", "https://k8s:6443"],
            &["--kubeconfig-file=/etc/kubeconfig"],
            &["--kube-annotation-prefix=x"],
            &["--net-config-path=/etc/kube-flannel/net-conf.json"],
            &["--remote=10.0.0.1:8080"],
            &["--networks=a,b"],
        ] {
            let err = parse(args).unwrap_err();
            assert!(
                matches!(err, FlagsError::Unsupported { .. }),
                "{args:?}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(args[0]), "{msg}");
            assert!(msg.contains("etcd subnet manager"), "{msg}");
            assert!(msg.contains("udp backend"), "{msg}");
        }
        let err = parse_env(&[], &[("FLANNELD_KUBE_SUBNET_MGR", "true")]).unwrap_err();
        assert!(matches!(err, FlagsError::Unsupported { .. }), "{err}");
        assert!(parse_env(&[], &[("FLANNELD_KUBE_SUBNET_MGR", "false")]).is_ok());
    }

    #[test]
    fn renew_margin_out_of_range_is_refused() {
        for bad in ["0", "1440", "-5", "99999"] {
            let err = parse(&["--subnet-lease-renew-margin", bad]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("--subnet-lease-renew-margin"), "{msg}");
        }
        assert_eq!(
            parse(&["--subnet-lease-renew-margin=1"])
                .unwrap()
                .subnet_lease_renew_margin,
            1
        );
        assert_eq!(
            parse(&["--subnet-lease-renew-margin=1439"])
                .unwrap()
                .subnet_lease_renew_margin,
            1439
        );
        let err = parse_env(&[], &[("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "1440")]).unwrap_err();
        assert!(err
            .to_string()
            .contains("FLANNELD_SUBNET_LEASE_RENEW_MARGIN"));
    }

    #[test]
    fn validation_errors_name_the_flag() {
        for (args, flag) in [
            (&["--public-ip=300.1.1.1"][..], "--public-ip"),
            (&["--healthz-port=70000"], "--healthz-port"),
            (&["--iptables-resync=0"], "--iptables-resync"),
            (&["--iface-regex=("], "--iface-regex"),
            (&["--io=epoll"], "possible values: uring, syscalls"),
            (&["--workers=0"], "--workers"),
            (&["--tun-name=way-too-long-name0"], "--tun-name"),
            (&["-v=loud"], "--v"),
        ] {
            let msg = parse(args).unwrap_err().to_string();
            assert!(msg.contains(flag), "{args:?}: {msg}");
        }
    }

    #[test]
    fn unknown_missing_and_positional_arguments_are_errors() {
        assert!(matches!(
            parse(&["--no-such-flag"]),
            Err(FlagsError::Unknown(_))
        ));
        assert!(matches!(
            parse(&["--etcd-prefix"]),
            Err(FlagsError::MissingValue(_))
        ));
        assert!(matches!(parse(&["-v"]), Err(FlagsError::MissingValue(_))));
        assert!(matches!(parse(&["eth0"]), Err(FlagsError::Positional(_))));
        assert!(matches!(parse(&["-"]), Err(FlagsError::Positional(_))));
        assert!(matches!(parse(&["---x"]), Err(FlagsError::Positional(_))));
        assert!(matches!(
            parse(&["--", "x"]),
            Err(FlagsError::Positional(_))
        ));
        assert!(parse(&["--ip-masq", "--"]).unwrap().ip_masq);
    }

    #[test]
    fn help_is_reported_with_env_names() {
        for h in ["-h", "-help", "--help"] {
            match parse(&[h]) {
                Err(FlagsError::Help(text)) => {
                    assert!(text.contains("--etcd-endpoints"));
                    assert!(text.contains("FLANNELD_ETCD_ENDPOINTS"));
                    assert!(!text.contains("--lease-ttl"));
                }
                other => panic!("{h}: {other:?}"),
            }
        }
    }

    #[test]
    fn normalizer_output_is_canonical() {
        let args: Vec<String> = [
            "weftd",
            "-iface",
            "eth0",
            "-ip-masq",
            "-v=2",
            "--public-ip=",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let n = normalize_args(&args, &parse_command()).unwrap();
        assert_eq!(n.args, vec!["weftd", "--iface=eth0", "--ip-masq", "--v=2"]);
        let mut seen: Vec<_> = n.seen.into_iter().collect();
        seen.sort();
        assert_eq!(seen, vec!["iface", "ip-masq", "public-ip", "v"]);
    }

    #[test]
    fn go_integers() {
        assert_eq!(parse_go_int("42"), Ok(42));
        assert_eq!(parse_go_int("-7"), Ok(-7));
        assert_eq!(parse_go_int("+7"), Ok(7));
        assert_eq!(parse_go_int("0x1F"), Ok(31));
        assert_eq!(parse_go_int("0o17"), Ok(15));
        assert_eq!(parse_go_int("017"), Ok(15));
        assert_eq!(parse_go_int("0b101"), Ok(5));
        assert_eq!(parse_go_int("0x_ff"), Ok(255));
        assert_eq!(parse_go_int("0"), Ok(0));
        for bad in [
            "",
            "-",
            "0x",
            "1_000",
            "08",
            "abc",
            "1.5",
            " 1",
            "99999999999999999999",
        ] {
            assert!(parse_go_int(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn go_booleans() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false));
        }
        for bad in ["yes", "on", "", "tRuE"] {
            assert!(parse_go_bool(bad).is_err());
        }
    }
}
