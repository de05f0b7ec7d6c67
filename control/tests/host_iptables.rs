//! flanneld's iptables rules applied, repaired, updated and removed by the real iptables
//! programs, inside network namespaces the tests create (their rules are isolated from the
//! root namespace's).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use support::netns::NetNs;
use weft_control::iptables::{Iptables, IptablesKeeper, RuleSet};

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// Rule lines (`-A …`) and user chains of one table, as iptables-save prints them.
fn saved(ns: &NetNs, table: &str) -> Vec<String> {
    ns.exec_ok("iptables-save", &["-t", table])
        .lines()
        .filter(|l| l.starts_with("-A ") || (l.starts_with(':') && l.contains(" - [")))
        .map(str::to_string)
        .collect()
}

const MASQ_15: &[&str] = &[
    r#":FLANNEL-POSTRTG - [0:0]"#,
    r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#,
    r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#,
    r#"-A FLANNEL-POSTRTG -s 10.1.0.0/16 -d 10.1.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#,
    r#"-A FLANNEL-POSTRTG -s 10.1.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
    r#"-A FLANNEL-POSTRTG ! -s 10.1.0.0/16 -d 10.1.15.0/24 -m comment --comment "flanneld masq" -j RETURN"#,
    r#"-A FLANNEL-POSTRTG ! -s 10.1.0.0/16 -d 10.1.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
];

const FWD: &[&str] = &[
    r#":FLANNEL-FWD - [0:0]"#,
    r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#,
    r#"-A FLANNEL-FWD -s 10.1.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
    r#"-A FLANNEL-FWD -d 10.1.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT"#,
];

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Polls until `f` holds (the keeper resyncs in the background).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn keeper_applies_repairs_updates_and_removes() {
    let ns = NetNs::new("ipt");
    // Somebody else's rules, which must survive everything below.
    ns.exec_ok(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "172.17.0.0/16",
            "-j",
            "MASQUERADE",
        ],
    );
    ns.exec_ok("iptables", &["-t", "filter", "-P", "FORWARD", "DROP"]);
    let foreign_nat = r#"-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE"#.to_string();

    ns.block_on(|| async {
        let rules = RuleSet::new(net("10.1.0.0/16"), net("10.1.15.0/24"), true, true);
        let keeper = IptablesKeeper::start(Iptables::new(), rules, Duration::from_millis(200))
            .await
            .expect("rules applied");

        // Applied exactly, with the jump inserted before the foreign rule.
        let mut want_nat = strs(MASQ_15);
        want_nat.insert(2, foreign_nat.clone());
        assert_eq!(saved(&ns, "nat"), want_nat);
        assert_eq!(saved(&ns, "filter"), strs(FWD));

        // Delete a chain rule and the FORWARD jump by hand; the resync puts them back,
        // in order and without duplicates.
        ns.exec_ok(
            "iptables",
            &[
                "-t",
                "nat",
                "-D",
                "FLANNEL-POSTRTG",
                "-s",
                "10.1.0.0/16",
                "-d",
                "10.1.0.0/16",
                "-m",
                "comment",
                "--comment",
                "flanneld masq",
                "-j",
                "RETURN",
            ],
        );
        ns.exec_ok(
            "iptables",
            &[
                "-t",
                "filter",
                "-D",
                "FORWARD",
                "-m",
                "comment",
                "--comment",
                "flanneld forward",
                "-j",
                "FLANNEL-FWD",
            ],
        );
        assert_ne!(saved(&ns, "nat"), want_nat);
        eventually("nat rules restored", || saved(&ns, "nat") == want_nat).await;
        eventually("filter rules restored", || {
            saved(&ns, "filter") == strs(FWD)
        })
        .await;

        // Several resync periods later nothing has been doubled.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(saved(&ns, "nat"), want_nat);
        assert_eq!(saved(&ns, "filter"), strs(FWD));

        // A new lease: the subnet rule changes in place.
        keeper
            .update(RuleSet::new(
                net("10.1.0.0/16"),
                net("10.1.81.0/24"),
                true,
                true,
            ))
            .await
            .expect("update");
        let want_81: Vec<String> = want_nat
            .iter()
            .map(|l| l.replace("10.1.15.0/24", "10.1.81.0/24"))
            .collect();
        assert_eq!(saved(&ns, "nat"), want_81);

        // Masquerading turned off: its chain goes, the forward rules stay.
        keeper
            .update(RuleSet::new(
                net("10.1.0.0/16"),
                net("10.1.81.0/24"),
                false,
                true,
            ))
            .await
            .expect("update");
        assert_eq!(saved(&ns, "nat"), vec![foreign_nat.clone()]);
        assert_eq!(saved(&ns, "filter"), strs(FWD));

        keeper.shutdown().await.expect("rules removed");
    });

    // Only the foreign rules remain.
    assert_eq!(saved(&ns, "nat"), vec![foreign_nat]);
    assert_eq!(saved(&ns, "filter"), Vec::<String>::new());
    let policy = ns.exec_ok("iptables-save", &["-t", "filter"]);
    assert!(policy.contains(":FORWARD DROP"), "{policy}");
}

#[test]
fn removal_takes_duplicate_jumps_and_tolerates_absence() {
    let ns = NetNs::new("iptdup");
    ns.block_on(|| async {
        let ipt = Iptables::new();
        let rules = RuleSet::new(net("10.1.0.0/16"), net("10.1.15.0/24"), true, true);
        // Nothing there yet: removing is a no-op.
        ipt.remove(&rules).await.expect("remove nothing");

        assert_eq!(
            ipt.ensure(&rules).await.unwrap(),
            ["FLANNEL-POSTRTG", "FLANNEL-FWD"]
        );
        assert!(
            ipt.ensure(&rules).await.unwrap().is_empty(),
            "second ensure changes nothing"
        );

        // A second jump, as an earlier crashed daemon might have left.
        ns.exec_ok(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-m",
                "comment",
                "--comment",
                "flanneld masq",
                "-j",
                "FLANNEL-POSTRTG",
            ],
        );
        assert_eq!(
            saved(&ns, "nat")
                .iter()
                .filter(|l| l.starts_with("-A POSTROUTING"))
                .count(),
            2
        );
        ipt.remove(&rules).await.expect("remove");
    });
    assert_eq!(saved(&ns, "nat"), Vec::<String>::new());
    assert_eq!(saved(&ns, "filter"), Vec::<String>::new());
}

#[test]
fn missing_iptables_is_fatal_only_for_masquerade() {
    let ns = NetNs::new("iptmiss");
    ns.block_on(|| async {
        let missing = || {
            Iptables::with_programs(
                "/nonexistent/iptables-save",
                "/nonexistent/iptables-restore",
            )
        };
        let resync = Duration::from_secs(5);
        // The default: forward rules only. weftd goes on without them.
        let forward_only = RuleSet::new(net("10.1.0.0/16"), net("10.1.15.0/24"), false, true);
        let keeper = IptablesKeeper::start_or_skip_optional(missing(), forward_only, resync)
            .await
            .expect("forward rules alone are optional");
        keeper.shutdown().await.ok();
        // --ip-masq: the user asked for these rules.
        for (masq, forward) in [(true, false), (true, true)] {
            let rules = RuleSet::new(net("10.1.0.0/16"), net("10.1.15.0/24"), masq, forward);
            let err = IptablesKeeper::start_or_skip_optional(missing(), rules, resync)
                .await
                .err()
                .expect("masquerade rules are required");
            assert!(
                err.to_string().contains("/nonexistent/iptables-save"),
                "{err}"
            );
        }
        // With iptables present the rules are applied as before.
        let forward_only = RuleSet::new(net("10.1.0.0/16"), net("10.1.15.0/24"), false, true);
        let keeper = IptablesKeeper::start_or_skip_optional(Iptables::new(), forward_only, resync)
            .await
            .expect("iptables present");
        keeper.shutdown().await.expect("removed");
    });
}

#[test]
fn forward_rules_arrive_once_iptables_is_installed() {
    let ns = NetNs::new("iptlate");
    let bin = std::env::temp_dir().join(format!("weft-iptlate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::create_dir_all(&bin).unwrap();
    let (save, restore) = (bin.join("iptables-save"), bin.join("iptables-restore"));
    let real = |program: &str| {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .expect("sh");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (real_save, real_restore) = (real("iptables-save"), real("iptables-restore"));
    let ns_ref = &ns;
    ns.block_on(|| async move {
        let iptables = Iptables::with_programs(
            save.to_string_lossy().into_owned(),
            restore.to_string_lossy().into_owned(),
        );
        let rules = RuleSet::new(net("10.1.0.0/16"), net("10.1.15.0/24"), false, true);
        let keeper =
            IptablesKeeper::start_or_skip_optional(iptables, rules, Duration::from_millis(100))
                .await
                .expect("forward rules alone are optional");
        assert_eq!(saved(ns_ref, "filter"), Vec::<String>::new());
        // iptables is installed while weftd runs: a later resync applies the rules.
        std::os::unix::fs::symlink(&real_save, &save).expect("symlink");
        std::os::unix::fs::symlink(&real_restore, &restore).expect("symlink");
        let deadline = Instant::now() + Duration::from_secs(10);
        while saved(ns_ref, "filter") != strs(FWD) {
            assert!(
                Instant::now() < deadline,
                "rules not applied after iptables appeared: {:?}",
                saved(ns_ref, "filter")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        keeper.shutdown().await.expect("removed");
    });
    assert_eq!(saved(&ns, "filter"), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&bin);
}
