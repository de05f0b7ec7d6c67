//! flanneld's iptables rules: masquerading (`--ip-masq`) and the FORWARD accept rules
//! (`--iptables-forward-rules`), kept in place every `--iptables-resync` seconds and removed
//! on a clean shutdown.
//!
//! Each rule group is a chain of its own (`FLANNEL-POSTRTG` in nat, `FLANNEL-FWD` in
//! filter) with one jump to it from the built-in chain, exactly as flanneld v0.20.2 writes
//! them, comments included. The rules are generated as text ([`ChainRules`]), compared with
//! `iptables-save` output ([`ChainState`]) and applied with one atomic
//! `iptables-restore --noflush` per table: declaring our chain in the input flushes and
//! refills it, so its rules are always exactly ours and in order, and the jump is inserted
//! only when it is missing, so it is never duplicated. Other rules in the built-in chains
//! are never touched.
//!
//! The iptables programs run in the network namespace of the calling thread.

use std::fmt::Write as _;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::{watch, Mutex};

/// flanneld's masquerade chain in the nat table.
const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";

/// kube-proxy's masquerade mark; flanneld leaves marked packets to kube-proxy.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// An iptables table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `nat`.
    Nat,
    /// `filter`.
    Filter,
}

impl Table {
    /// The table's name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

/// One of flanneld's chains: its rules and the jump to it from a built-in chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRules {
    /// The table.
    pub table: Table,
    /// The built-in chain holding the jump (`POSTROUTING`, `FORWARD`).
    pub parent: &'static str,
    /// flanneld's chain (`FLANNEL-POSTRTG`, `FLANNEL-FWD`).
    pub chain: &'static str,
    /// The jump's rule spec, in `iptables-save` form.
    pub jump: String,
    /// The chain's rule specs in order, in `iptables-save` form.
    pub rules: Vec<String>,
}

/// The masquerade rules for overlay `network` and this host's lease `subnet`.
pub fn masq_rules(network: Ipv4Net, subnet: Ipv4Net) -> ChainRules {
    let n = network.trunc();
    let sn = subnet.trunc();
    let c = r#"-m comment --comment "flanneld masq""#;
    ChainRules {
        table: Table::Nat,
        parent: "POSTROUTING",
        chain: MASQ_CHAIN,
        jump: format!("{c} -j FLANNEL-POSTRTG"),
        rules: vec![
            // Leave packets kube-proxy marked for masquerading to kube-proxy.
            format!("-m mark --mark {KUBE_PROXY_MARK} {c} -j RETURN"),
            // No NAT inside the overlay.
            format!("-s {n} -d {n} {c} -j RETURN"),
            // NAT what leaves the overlay, except multicast.
            format!("-s {n} ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"),
            // Keep the source of external traffic to this host's containers.
            format!("! -s {n} -d {sn} {c} -j RETURN"),
            // Masquerade what the host itself sends into the overlay.
            format!("! -s {n} -d {n} {c} -j MASQUERADE --random-fully"),
        ],
    }
}

/// The FORWARD accept rules for overlay `network`.
pub fn forward_rules(network: Ipv4Net) -> ChainRules {
    let n = network.trunc();
    let c = r#"-m comment --comment "flanneld forward""#;
    ChainRules {
        table: Table::Filter,
        parent: "FORWARD",
        chain: "FLANNEL-FWD",
        jump: format!("{c} -j FLANNEL-FWD"),
        rules: vec![
            format!("-s {n} {c} -j ACCEPT"),
            format!("-d {n} {c} -j ACCEPT"),
        ],
    }
}

/// All of weftd's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    /// The chains, in the order they are applied.
    pub chains: Vec<ChainRules>,
}

impl RuleSet {
    /// The rules flanneld installs for these flags: masquerading with `ip_masq`, forward
    /// rules with `forward_rules`.
    pub fn new(network: Ipv4Net, subnet: Ipv4Net, ip_masq: bool, forward_rules: bool) -> Self {
        let mut chains = Vec::new();
        if ip_masq {
            chains.push(masq_rules(network, subnet));
        }
        if forward_rules {
            chains.push(self::forward_rules(network));
        }
        RuleSet { chains }
    }

    /// No rules at all.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Whether the masquerade rules (`--ip-masq`) are among them.
    pub fn has_masquerade(&self) -> bool {
        self.chains.iter().any(|c| c.chain == MASQ_CHAIN)
    }
}

/// What `iptables-save` shows of one of our chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainState {
    /// Whether the chain exists.
    pub exists: bool,
    /// Specs of the rules in the parent chain that jump to ours.
    pub jumps: Vec<String>,
    /// Specs of the rules in our chain, in order.
    pub rules: Vec<String>,
}

/// Reads the state of `chain` from `iptables-save` output (of its table or of all tables).
pub fn parse_save(save: &str, chain: &ChainRules) -> ChainState {
    let mut state = ChainState::default();
    let mut in_table = false;
    let declared = format!(":{} ", chain.chain);
    let in_parent = format!("-A {} ", chain.parent);
    let in_chain = format!("-A {} ", chain.chain);
    for line in save.lines().map(str::trim_end) {
        if let Some(table) = line.strip_prefix('*') {
            in_table = table == chain.table.name();
            continue;
        }
        if !in_table {
            continue;
        }
        if line.starts_with(&declared) {
            state.exists = true;
        } else if let Some(spec) = line.strip_prefix(&in_parent) {
            if jump_target(spec) == Some(chain.chain) {
                state.jumps.push(spec.to_string());
            }
        } else if let Some(spec) = line.strip_prefix(&in_chain) {
            state.rules.push(spec.to_string());
        }
    }
    state
}

/// The target of a rule spec: what follows its last `-j` (target options come after it,
/// matches and comments before).
fn jump_target(spec: &str) -> Option<&str> {
    let mut tokens = spec.split_whitespace();
    let mut target = None;
    while let Some(token) = tokens.next() {
        if token == "-j" {
            target = tokens.next();
        }
    }
    target
}

impl ChainRules {
    /// Whether the chain holds exactly our rules and is jumped to.
    pub fn is_in_place(&self, state: &ChainState) -> bool {
        state.exists && !state.jumps.is_empty() && state.rules == self.rules
    }

    /// `iptables-restore --noflush` input that puts this chain in place from `state`, or
    /// `None` when it already is.
    pub fn restore_input(&self, state: &ChainState) -> Option<String> {
        if self.is_in_place(state) {
            return None;
        }
        let mut s = String::new();
        let _ = writeln!(s, "*{}", self.table.name());
        // Declaring a user chain under --noflush creates it, or empties it if it exists.
        let _ = writeln!(s, ":{} - [0:0]", self.chain);
        if state.jumps.is_empty() {
            let _ = writeln!(s, "-I {} 1 {}", self.parent, self.jump);
        }
        for rule in &self.rules {
            let _ = writeln!(s, "-A {} {}", self.chain, rule);
        }
        s.push_str("COMMIT\n");
        Some(s)
    }

    /// `iptables-restore --noflush` input that removes the chain and every jump to it, or
    /// `None` when neither exists.
    pub fn teardown_input(&self, state: &ChainState) -> Option<String> {
        if !state.exists && state.jumps.is_empty() {
            return None;
        }
        let mut s = String::new();
        let _ = writeln!(s, "*{}", self.table.name());
        let _ = writeln!(s, ":{} - [0:0]", self.chain);
        for jump in &state.jumps {
            let _ = writeln!(s, "-D {} {}", self.parent, jump);
        }
        let _ = writeln!(s, "-X {}", self.chain);
        s.push_str("COMMIT\n");
        Some(s)
    }
}

/// A failed iptables operation.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The program failed.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Runs `iptables-save` and `iptables-restore`.
#[derive(Debug, Clone)]
pub struct Iptables {
    save: String,
    restore: String,
}

impl Default for Iptables {
    fn default() -> Self {
        Iptables::new()
    }
}

/// Seconds `iptables-restore` waits for the xtables lock another program holds.
const LOCK_WAIT_SECS: u32 = 5;

impl Iptables {
    /// Uses `iptables-save` and `iptables-restore` from `$PATH`.
    pub fn new() -> Self {
        Iptables::with_programs("iptables-save", "iptables-restore")
    }

    /// Uses other programs with the same interface (e.g. `iptables-legacy-save`).
    pub fn with_programs(save: impl Into<String>, restore: impl Into<String>) -> Self {
        Iptables {
            save: save.into(),
            restore: restore.into(),
        }
    }

    /// `iptables-save -t <table>`.
    pub async fn save(&self, table: Table) -> Result<String, IptablesError> {
        let out = Command::new(&self.save)
            .args(["-t", table.name()])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| IptablesError::Spawn {
                program: self.save.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(IptablesError::Failed {
                program: self.save.clone(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `iptables-restore --noflush` with `input`: all of it or nothing.
    pub async fn restore(&self, input: &str) -> Result<(), IptablesError> {
        let spawn_err = |source| IptablesError::Spawn {
            program: self.restore.clone(),
            source,
        };
        let mut child = Command::new(&self.restore)
            .arg("--noflush")
            .arg(format!("--wait={LOCK_WAIT_SECS}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).await.map_err(spawn_err)?;
        }
        let out = child.wait_with_output().await.map_err(spawn_err)?;
        if !out.status.success() {
            return Err(IptablesError::Failed {
                program: self.restore.clone(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// The current state of one chain.
    pub async fn state(&self, chain: &ChainRules) -> Result<ChainState, IptablesError> {
        Ok(parse_save(&self.save(chain.table).await?, chain))
    }

    /// Puts every chain of `rules` in place; returns the chains that had to be (re)written.
    pub async fn ensure(&self, rules: &RuleSet) -> Result<Vec<&'static str>, IptablesError> {
        let mut rewritten = Vec::new();
        for chain in &rules.chains {
            if let Some(input) = chain.restore_input(&self.state(chain).await?) {
                self.restore(&input).await?;
                rewritten.push(chain.chain);
            }
        }
        Ok(rewritten)
    }

    /// Removes every chain of `rules` and the jumps to them.
    pub async fn remove(&self, rules: &RuleSet) -> Result<(), IptablesError> {
        for chain in &rules.chains {
            if let Some(input) = chain.teardown_input(&self.state(chain).await?) {
                self.restore(&input).await?;
            }
        }
        Ok(())
    }
}

/// Keeps a [`RuleSet`] in place: applied at start, re-checked periodically (re-adding what
/// someone removed), replaceable (a new lease changes the masquerade rules), and removed
/// by [`IptablesKeeper::shutdown`].
pub struct IptablesKeeper {
    iptables: Iptables,
    current: Arc<Mutex<RuleSet>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl IptablesKeeper {
    /// Applies `rules` now (failing if that fails) and re-checks them every `resync` on a
    /// task of the current runtime.
    pub async fn start(
        iptables: Iptables,
        rules: RuleSet,
        resync: Duration,
    ) -> Result<Self, IptablesError> {
        iptables.ensure(&rules).await?;
        Ok(Self::keep(iptables, rules, resync, false))
    }

    /// Re-checks `rules` every `resync` from now on; `failing` says whether the last attempt
    /// to apply them failed, so that a lasting failure is logged once and the recovery too.
    fn keep(iptables: Iptables, rules: RuleSet, resync: Duration, failing: bool) -> Self {
        let current = Arc::new(Mutex::new(rules));
        let (stop, mut stopped) = watch::channel(false);
        let task = {
            let iptables = iptables.clone();
            let current = current.clone();
            tokio::spawn(async move {
                let mut failing = failing;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(resync) => {}
                        _ = stopped.changed() => return,
                    }
                    // Held across the check and the fix, so that an update cannot
                    // interleave and double a jump.
                    let rules = current.lock().await;
                    match iptables.ensure(&rules).await {
                        Ok(fixed) if failing => {
                            failing = false;
                            tracing::info!("iptables: rules applied ({})", fixed.join(", "));
                        }
                        Ok(fixed) if !fixed.is_empty() => {
                            tracing::info!(
                                "iptables: restored missing rules in {}",
                                fixed.join(", ")
                            );
                        }
                        Ok(_) => {}
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!("iptables: resync failed: {e}");
                        }
                        Err(_) => {}
                    }
                }
            })
        };
        IptablesKeeper {
            iptables,
            current,
            stop,
            task,
        }
    }

    /// Like [`IptablesKeeper::start`], with the failure policy weftd uses: the masquerade
    /// rules are what `--ip-masq` asked for, so failing to apply them is an error; the
    /// FORWARD accept rules are a default the host may not need, so without them (iptables
    /// missing or refusing) weftd logs why and goes on, as flanneld only logs, and keeps
    /// trying at every resync (iptables may be installed later).
    pub async fn start_or_skip_optional(
        iptables: Iptables,
        rules: RuleSet,
        resync: Duration,
    ) -> Result<Self, IptablesError> {
        let required = rules.has_masquerade();
        match iptables.ensure(&rules).await {
            Ok(_) => Ok(Self::keep(iptables, rules, resync, false)),
            Err(e) if required => Err(e),
            Err(e) => {
                tracing::error!(
                    "iptables: cannot apply the FORWARD accept rules ({e}); going on without \
                     them. Traffic to and from containers on other hosts is dropped where the \
                     FORWARD policy is DROP (docker sets it): install iptables, or accept the \
                     overlay network in FORWARD yourself and pass --iptables-forward-rules=false; \
                     weftd tries again every --iptables-resync"
                );
                Ok(Self::keep(iptables, rules, resync, true))
            }
        }
    }

    /// Replaces the rules (removing chains no longer wanted) and applies the new ones now.
    pub async fn update(&self, rules: RuleSet) -> Result<(), IptablesError> {
        let mut current = self.current.lock().await;
        let dropped = RuleSet {
            chains: current
                .chains
                .iter()
                .filter(|old| !rules.chains.iter().any(|new| new.chain == old.chain))
                .cloned()
                .collect(),
        };
        self.iptables.remove(&dropped).await?;
        *current = rules;
        self.iptables.ensure(&current).await.map(drop)
    }

    /// The rules being kept.
    pub async fn rules(&self) -> RuleSet {
        self.current.lock().await.clone()
    }

    /// Stops re-checking and removes all rules.
    pub async fn shutdown(self) -> Result<(), IptablesError> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let rules = self.current.lock().await;
        self.iptables.remove(&rules).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn masquerade_rules_are_flanneld_s() {
        let c = masq_rules(net("10.1.0.0/16"), net("10.1.15.0/24"));
        let input = c.restore_input(&ChainState::default()).unwrap();
        assert_eq!(
            input,
            r#"*nat
:FLANNEL-POSTRTG - [0:0]
-I POSTROUTING 1 -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.1.0.0/16 -d 10.1.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.1.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.1.0.0/16 -d 10.1.15.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.1.0.0/16 -d 10.1.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
"#
        );
    }

    #[test]
    fn forward_rules_are_flanneld_s() {
        let c = forward_rules(net("10.1.0.0/16"));
        assert_eq!(
            c.restore_input(&ChainState::default()).unwrap(),
            r#"*filter
:FLANNEL-FWD - [0:0]
-I FORWARD 1 -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.1.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.1.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
"#
        );
    }

    #[test]
    fn networks_are_written_as_prefixes() {
        let c = masq_rules(net("10.1.2.3/16"), net("10.1.15.9/24"));
        assert!(c.rules[1].starts_with("-s 10.1.0.0/16 -d 10.1.0.0/16 "));
        assert!(c.rules[3].starts_with("! -s 10.1.0.0/16 -d 10.1.15.0/24 "));
    }

    #[test]
    fn rule_set_follows_flags() {
        let n = net("10.1.0.0/16");
        let sn = net("10.1.15.0/24");
        let names = |s: RuleSet| s.chains.iter().map(|c| c.chain).collect::<Vec<_>>();
        assert_eq!(
            names(RuleSet::new(n, sn, true, true)),
            ["FLANNEL-POSTRTG", "FLANNEL-FWD"]
        );
        assert_eq!(names(RuleSet::new(n, sn, false, true)), ["FLANNEL-FWD"]);
        assert_eq!(names(RuleSet::new(n, sn, true, false)), ["FLANNEL-POSTRTG"]);
        assert!(RuleSet::new(n, sn, false, false).is_empty());
    }

    const SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
:FLANNEL-POSTRTG-X - [0:0]
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -j FLANNEL-POSTRTG-X
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.1.0.0/16 -d 10.1.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.1.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.1.0.0/16 -d 10.1.15.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.1.0.0/16 -d 10.1.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
*filter
:FORWARD DROP [0:0]
-A FORWARD -j FLANNEL-POSTRTG
COMMIT
"#;

    #[test]
    fn save_output_in_place() {
        let c = masq_rules(net("10.1.0.0/16"), net("10.1.15.0/24"));
        let st = parse_save(SAVE, &c);
        assert!(st.exists);
        assert_eq!(
            st.jumps,
            [r#"-m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#],
            "jumps to other chains and other tables do not count"
        );
        assert_eq!(st.rules, c.rules);
        assert!(c.is_in_place(&st));
        assert_eq!(c.restore_input(&st), None);
    }

    #[test]
    fn a_missing_rule_refills_the_chain_without_a_second_jump() {
        let c = masq_rules(net("10.1.0.0/16"), net("10.1.15.0/24"));
        let save = SAVE.replace(
            "-A FLANNEL-POSTRTG -s 10.1.0.0/16 -d 10.1.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n",
            "",
        );
        let st = parse_save(&save, &c);
        assert!(!c.is_in_place(&st));
        let input = c.restore_input(&st).unwrap();
        assert!(input.starts_with("*nat\n:FLANNEL-POSTRTG - [0:0]\n-A FLANNEL-POSTRTG -m mark"));
        assert!(!input.contains("POSTROUTING"), "{input}");
        assert_eq!(input.lines().filter(|l| l.starts_with("-A ")).count(), 5);
    }

    #[test]
    fn a_new_lease_subnet_rewrites_the_chain() {
        let c = masq_rules(net("10.1.0.0/16"), net("10.1.81.0/24"));
        let st = parse_save(SAVE, &c);
        let input = c.restore_input(&st).unwrap();
        assert!(input.contains("-d 10.1.81.0/24"));
        assert!(!input.contains("10.1.15.0"));
    }

    #[test]
    fn a_missing_jump_is_inserted_first() {
        let c = masq_rules(net("10.1.0.0/16"), net("10.1.15.0/24"));
        let save = SAVE.replace(
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n",
            "",
        );
        let st = parse_save(&save, &c);
        assert!(st.jumps.is_empty());
        let input = c.restore_input(&st).unwrap();
        assert!(input.contains(
            "\n-I POSTROUTING 1 -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n"
        ));
    }

    #[test]
    fn teardown_removes_every_jump_and_the_chain() {
        let c = masq_rules(net("10.1.0.0/16"), net("10.1.15.0/24"));
        let save = SAVE.replace(
            "-A POSTROUTING -j FLANNEL-POSTRTG-X\n",
            "-A POSTROUTING -j FLANNEL-POSTRTG\n",
        );
        let st = parse_save(&save, &c);
        assert_eq!(st.jumps.len(), 2);
        assert_eq!(
            c.teardown_input(&st).unwrap(),
            r#"*nat
:FLANNEL-POSTRTG - [0:0]
-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-D POSTROUTING -j FLANNEL-POSTRTG
-X FLANNEL-POSTRTG
COMMIT
"#
        );
        assert_eq!(c.teardown_input(&ChainState::default()), None);
    }

    #[test]
    fn empty_or_foreign_save_output() {
        let c = forward_rules(net("10.1.0.0/16"));
        assert_eq!(parse_save("", &c), ChainState::default());
        assert_eq!(
            parse_save("garbage\n*filter\n-A\nCOMMIT", &c),
            ChainState::default()
        );
        let st = parse_save(SAVE, &c);
        assert!(!st.exists && st.jumps.is_empty() && st.rules.is_empty());
    }
}
