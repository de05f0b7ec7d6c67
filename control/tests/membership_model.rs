//! A randomized, stateful test of the lease keeper and the peer watcher against the
//! in-memory registry, with faults injected between steps.
//!
//! Each run drives one host's membership through a few hundred random steps — other hosts
//! join, leave, expire and move; junk leases appear; the history is compacted; streams break;
//! etcd goes away and comes back; etcd loses its data (with or without a new cluster ID); our
//! own lease is deleted, expired or taken over, also in the middle of the renewal that adopts
//! it after a restart; the host restarts; time passes — and after every step checks, once the
//! membership has had a few (virtual) seconds to react, that the route table is exactly what
//! etcd holds and that our own lease exists and is the one published.
//!
//! Time is tokio's paused clock, so a run takes milliseconds. A failure prints its seed;
//! `WEFT_MODEL_SEED=<seed>` replays that seed alone, `WEFT_MODEL_RUNS` sets how many runs.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use weft_control::config::NetworkConfig;
use weft_control::lease::{self, Backoff, MembershipHandle, Settings};
use weft_control::memory_registry::MemoryRegistry;
use weft_control::registry::RawLease;
use weft_control::subnet::{lease_key_name, LeaseAttrs, LeaseKey};
use weft_control::watch::parse_peer;
use weft_engine::{Overlay, RouteTable, Routes};

const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#;
const OURS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const STEPS: usize = 300;
const RUNS: u64 = 100;
/// How long the membership may take to reflect a step (virtual time).
const SETTLE: Duration = Duration::from_secs(30);

fn config() -> NetworkConfig {
    NetworkConfig::parse(CONFIG).unwrap()
}

fn settings() -> Settings {
    Settings {
        lease_ttl: Duration::from_secs(60),
        renew_margin: Duration::from_secs(20),
        renew_retry: Duration::from_secs(5),
        retry: Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        },
        ..Settings::new(OURS)
    }
}

struct Host {
    handle: MembershipHandle,
    routes: Routes,
    task: JoinHandle<()>,
}

impl Host {
    fn start(reg: &MemoryRegistry) -> Self {
        let cfg = config();
        let routes = Routes::new(RouteTable::empty(cfg.overlay().unwrap(), cfg.port()));
        let (handle, task) =
            lease::run_membership(reg.clone(), &cfg, settings(), routes.clone()).unwrap();
        Self {
            handle,
            routes,
            task,
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What etcd holds, as the route table should show it: every usable lease but ours.
fn expected_routes(reg: &MemoryRegistry, overlay: Overlay) -> BTreeMap<Ipv4Net, Ipv4Addr> {
    reg.names()
        .into_iter()
        .filter_map(|name| {
            let value = reg.get(&name)?;
            let raw = RawLease {
                name,
                value: value.into_bytes(),
                etcd_lease: 0,
                mod_revision: 0,
            };
            parse_peer(overlay, &raw).ok()
        })
        .filter(|p| p.public_ip != OURS)
        .map(|p| (p.subnet, p.public_ip))
        .collect()
}

/// Our leases in etcd, by subnet.
fn own_leases(reg: &MemoryRegistry) -> Vec<Ipv4Net> {
    let ours = LeaseAttrs::udp(OURS).to_json();
    reg.names()
        .into_iter()
        .filter(|name| reg.get(name).as_deref() == Some(ours.as_str()))
        .filter_map(|name| LeaseKey::parse(&name).ok().map(|k| k.ipv4))
        .collect()
}

/// Why the host's state is not (yet) what etcd holds; `None` when it is.
fn mismatch(reg: &MemoryRegistry, host: &Host, overlay: Overlay) -> Option<String> {
    let own = own_leases(reg);
    let published = host.handle.current().map(|l| l.subnet);
    if own.len() != 1 || published != own.first().copied() {
        return Some(format!(
            "our leases in etcd: {own:?}, published lease: {published:?}"
        ));
    }
    let table = host.routes.current();
    if table.local_subnet() != published {
        return Some(format!(
            "route table's own subnet {:?}, published {published:?}",
            table.local_subnet()
        ));
    }
    let routes: BTreeMap<Ipv4Net, Ipv4Addr> = table.peers().collect();
    let expected = expected_routes(reg, overlay);
    (routes != expected).then(|| format!("routes {routes:?}\n   etcd {expected:?}"))
}

struct Model {
    rng: StdRng,
    reg: MemoryRegistry,
    overlay: Overlay,
    /// Other hosts' leases the model put: key name → etcd lease (0 for none).
    others: BTreeMap<String, i64>,
    next_host: u32,
}

impl Model {
    fn other_ip(&mut self) -> String {
        self.next_host += 1;
        let n = self.next_host;
        format!("198.18.{}.{}", 1 + (n / 250) % 200, 1 + n % 250)
    }

    fn free_subnet(&mut self) -> Option<String> {
        for _ in 0..20 {
            let name = format!("10.1.{}.0-24", self.rng.gen_range(1..=254));
            if self.reg.get(&name).is_none() {
                return Some(name);
            }
        }
        None
    }

    fn some_other(&mut self) -> Option<String> {
        let live: Vec<&String> = self
            .others
            .keys()
            .filter(|name| self.reg.get(name).is_some())
            .collect();
        (!live.is_empty()).then(|| live[self.rng.gen_range(0..live.len())].clone())
    }

    /// One random step; returns what it did.
    async fn step(&mut self, host: &mut Host) -> String {
        let own = host.handle.current().map(|l| lease_key_name(l.subnet));
        match self.rng.gen_range(0..100) {
            0..=24 => {
                let Some(name) = self.free_subnet() else {
                    return "join: no free subnet".into();
                };
                let ip = self.other_ip();
                let ttl = self.rng.gen_bool(0.8).then_some(Duration::from_secs(600));
                let lease = self.reg.put(&name, &udp(&ip), ttl);
                self.others.insert(name.clone(), lease);
                format!("join {name} via {ip}")
            }
            25..=34 => match self.some_other() {
                Some(name) => {
                    self.reg.delete(&name);
                    format!("leave {name}")
                }
                None => "leave: nobody".into(),
            },
            35..=42 => match self.some_other() {
                Some(name) if self.others[&name] != 0 => {
                    self.reg.expire(self.others[&name]);
                    format!("expire {name}")
                }
                _ => "expire: nobody".into(),
            },
            43..=49 => match self.some_other() {
                Some(name) => {
                    let ip = self.other_ip();
                    let lease = self.reg.put(&name, &udp(&ip), None);
                    self.others.insert(name.clone(), lease);
                    format!("move {name} to {ip}")
                }
                None => "move: nobody".into(),
            },
            50..=53 => {
                let name = match self.rng.gen_range(0..3) {
                    0 => "junk".to_owned(),
                    _ => match self.free_subnet() {
                        Some(name) => name,
                        None => return "junk: no free subnet".into(),
                    },
                };
                let value = [
                    "{not json",
                    r#"{"PublicIP":"0.0.0.0"}"#,
                    r#"{"PublicIP":"198.18.9.9","BackendType":"vxlan"}"#,
                ][self.rng.gen_range(0..3)];
                self.reg.put(&name, value, None);
                self.others.insert(name.clone(), 0);
                format!("junk at {name}: {value}")
            }
            54..=59 => {
                self.reg.compact();
                "compact".into()
            }
            60..=65 => {
                self.reg.break_watches();
                "break the watch".into()
            }
            66..=69 => {
                let outage = Duration::from_millis(self.rng.gen_range(0..8000));
                self.reg.set_available(false);
                tokio::time::sleep(outage).await;
                self.reg.set_available(true);
                format!("outage of {outage:?}")
            }
            70..=73 => {
                let new_cluster = self.rng.gen_bool(0.5);
                self.reg.lose_data(new_cluster);
                self.others.clear();
                // Other hosts register again, some of them at once.
                let back = self.rng.gen_range(0..3);
                for _ in 0..back {
                    if let Some(name) = self.free_subnet() {
                        let ip = self.other_ip();
                        let lease = self
                            .reg
                            .put(&name, &udp(&ip), Some(Duration::from_secs(600)));
                        self.others.insert(name, lease);
                    }
                }
                format!("etcd lost its data (new cluster: {new_cluster}); {back} hosts back")
            }
            74..=77 => match own {
                Some(name) => {
                    self.reg.delete(&name);
                    format!("our lease {name} deleted")
                }
                None => "delete ours: none".into(),
            },
            78..=81 => match own.as_deref().and_then(|n| self.reg.etcd_lease_of(n)) {
                Some(lease) if lease != 0 => {
                    self.reg.expire(lease);
                    "our etcd lease expired".into()
                }
                _ => "expire ours: none".into(),
            },
            82..=84 => match own {
                Some(name) => {
                    let ip = self.other_ip();
                    self.reg.put(&name, &udp(&ip), None);
                    self.others.insert(name.clone(), 0);
                    format!("our lease {name} taken over by {ip}")
                }
                None => "take over ours: none".into(),
            },
            85..=88 => {
                let ip = self.other_ip();
                let delay = Duration::from_millis(self.rng.gen_range(1..500));
                self.reg.take_over_during_next_keep_alive(&udp(&ip), delay);
                *host = Host::start(&self.reg);
                format!("restart; our lease taken over by {ip} during its adoption")
            }
            89..=92 => {
                *host = Host::start(&self.reg);
                "restart".into()
            }
            _ => {
                let pass = Duration::from_secs(self.rng.gen_range(1..120));
                tokio::time::sleep(pass).await;
                format!("{pass:?} pass")
            }
        }
    }
}

fn udp(ip: &str) -> String {
    LeaseAttrs::udp(ip.parse().unwrap()).to_json()
}

/// One run; `Err` says which step broke what.
async fn run(seed: u64) -> Result<(), String> {
    let reg = MemoryRegistry::new();
    reg.set_config(Some(CONFIG));
    let overlay = config().overlay().unwrap();
    let mut model = Model {
        rng: StdRng::seed_from_u64(seed),
        reg: reg.clone(),
        overlay,
        others: BTreeMap::new(),
        next_host: 1,
    };
    let mut host = Host::start(&reg);
    let mut log: Vec<String> = Vec::new();
    for step in 0..STEPS {
        let did = model.step(&mut host).await;
        log.push(did);
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match mismatch(&model.reg, &host, model.overlay) {
                None => break,
                Some(why) if tokio::time::Instant::now() >= deadline => {
                    let recent = log[log.len().saturating_sub(8)..].join("\n  ");
                    return Err(format!(
                        "seed {seed}, step {step}: {SETTLE:?} after the step, {why}\n last steps:\n  {recent}"
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn keeper_and_watcher_follow_etcd_through_random_faults() {
    let seeds: Vec<u64> = match std::env::var("WEFT_MODEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("WEFT_MODEL_SEED must be a number")],
        Err(_) => {
            let runs = std::env::var("WEFT_MODEL_RUNS")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(RUNS);
            // A fresh base each time, so that runs explore; a failure names its seed.
            let base: u64 = rand::random::<u32>().into();
            (base..base + runs).collect()
        }
    };
    let started = std::time::Instant::now();
    for &seed in &seeds {
        if let Err(why) = run(seed).await {
            panic!("{why}\nreplay with WEFT_MODEL_SEED={seed}");
        }
    }
    println!(
        "{} runs of {STEPS} steps in {:?} (seeds {}..={})",
        seeds.len(),
        started.elapsed(),
        seeds[0],
        seeds[seeds.len() - 1]
    );
}
