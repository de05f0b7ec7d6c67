//! Choosing this host's subnet: flannel's rules, as a pure function.
//!
//! Given the config, every lease in etcd, this host's public IP and the subnet it held before
//! (from subnet.env), [`plan`] decides, in flannel's order:
//!
//! 1. reuse a lease that already belongs to this public IP and fits the config (a reservation
//!    first); own leases that no longer fit are listed for deletion (reservations are the
//!    operator's and are never deleted);
//! 2. else take the previous subnet if it fits and no lease overlaps it;
//! 3. else pick at random among the first 100 free subnets from `SubnetMin` up to `SubnetMax`;
//! 4. else report that the network is exhausted.
//!
//! The random choice spreads hosts that start together over different subnets, so that their
//! "create if absent" writes rarely collide. The caller injects the random number generator.

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

use crate::config::NetworkConfig;

/// How many free subnets the random pick chooses among (flannel's number).
pub const RANDOM_POOL: usize = 100;

/// A lease that exists in etcd, as far as allocation cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupied {
    /// The leased subnet (it blocks every subnet it overlaps, whatever its length).
    pub subnet: Ipv4Net,
    /// The holder's public IP.
    pub public_ip: Ipv4Addr,
    /// A key without a TTL: the subnet belongs to `public_ip` for good.
    pub reservation: bool,
}

/// Which subnet to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Keep the existing lease at this index of the input: it is ours and fits.
    Reuse(usize),
    /// Create a lease for the subnet this host held before.
    Previous(Ipv4Net),
    /// Create a lease for this free subnet.
    Free(Ipv4Net),
    /// No subnet between `SubnetMin` and `SubnetMax` is free.
    Exhausted,
}

/// The decision: what to take and which of our own leases to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The subnet to take.
    pub pick: Pick,
    /// Indexes (into the input) of our own non-reservation leases that do not fit the config.
    pub stale: Vec<usize>,
}

/// Decide which subnet this host takes. See the module documentation for the rules.
pub fn plan<R: Rng + ?Sized>(
    config: &NetworkConfig,
    leases: &[Occupied],
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Net>,
    rng: &mut R,
) -> Plan {
    let mut stale = Vec::new();
    let mut reuse: Option<usize> = None;
    for (i, lease) in leases.iter().enumerate() {
        if lease.public_ip != public_ip {
            continue;
        }
        if !config.fits(lease.subnet) {
            if !lease.reservation {
                stale.push(i);
            }
            continue;
        }
        let better = match reuse {
            None => true,
            Some(j) => preference(&leases[i], previous) < preference(&leases[j], previous),
        };
        if better {
            reuse = Some(i);
        }
    }
    if let Some(i) = reuse {
        return Plan {
            pick: Pick::Reuse(i),
            stale,
        };
    }

    let occupancy = Occupancy::new(leases);
    if let Some(prev) = previous.filter(|p| config.fits(*p) && !occupancy.overlaps(*p)) {
        return Plan {
            pick: Pick::Previous(prev),
            stale,
        };
    }

    let free: Vec<Ipv4Net> = config
        .leasable_subnets()
        .filter(|candidate| !occupancy.overlaps(*candidate))
        .take(RANDOM_POOL)
        .collect();
    let pick = if free.is_empty() {
        Pick::Exhausted
    } else {
        Pick::Free(free[rng.gen_range(0..free.len())])
    };
    Plan { pick, stale }
}

/// Lower is better: a reservation, then the previous subnet, then the lowest address.
fn preference(lease: &Occupied, previous: Option<Ipv4Net>) -> (bool, bool, Ipv4Addr) {
    (
        !lease.reservation,
        Some(lease.subnet) != previous,
        lease.subnet.addr(),
    )
}

/// The taken address space, answering "does anything overlap this subnet" in O(log n + 32).
struct Occupancy {
    /// Every lease as (network address, prefix length), host bits cleared.
    nets: HashSet<(u32, u8)>,
    /// Bit `len` is set when some lease is a /len: supernets of other lengths are not looked up.
    lens: u64,
    starts: BTreeSet<u32>,
}

impl Occupancy {
    fn new(leases: &[Occupied]) -> Self {
        let mut nets = HashSet::with_capacity(leases.len());
        let mut starts = BTreeSet::new();
        let mut lens = 0u64;
        for lease in leases {
            let net = lease.subnet.trunc();
            nets.insert((u32::from(net.network()), net.prefix_len()));
            starts.insert(u32::from(net.network()));
            lens |= 1 << net.prefix_len();
        }
        Self { nets, lens, starts }
    }

    fn overlaps(&self, candidate: Ipv4Net) -> bool {
        let first = u32::from(candidate.network());
        let last = u32::from(candidate.broadcast());
        // Prefixes nest or are disjoint: an overlapping lease either starts inside the
        // candidate or contains it, in which case it is one of the candidate's supernets.
        self.starts.range(first..=last).next().is_some()
            || (0..candidate.prefix_len())
                .filter(|len| self.lens & (1 << len) != 0)
                .any(|len| {
                    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                    self.nets.contains(&(first & mask, len))
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    fn lease(subnet: &str, public_ip: &str) -> Occupied {
        Occupied {
            subnet: net(subnet),
            public_ip: ip(public_ip),
            reservation: false,
        }
    }

    fn reservation(subnet: &str, public_ip: &str) -> Occupied {
        Occupied {
            reservation: true,
            ..lease(subnet, public_ip)
        }
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    const ME: &str = "198.18.0.1";

    #[test]
    fn reuses_our_fitting_lease() {
        let cfg = config(r#"{"Network":"10.1.0.0/16"}"#);
        let leases = [
            lease("10.1.5.0/24", "198.18.0.2"),
            lease("10.1.15.0/24", ME),
        ];
        let plan = plan(&cfg, &leases, ip(ME), Some(net("10.1.99.0/24")), &mut rng());
        assert_eq!(plan.pick, Pick::Reuse(1));
        assert!(plan.stale.is_empty());
    }

    #[test]
    fn our_reservation_wins_over_our_lease_and_previous() {
        let cfg = config(r#"{"Network":"10.1.0.0/16"}"#);
        let leases = [
            lease("10.1.15.0/24", ME),
            reservation("10.1.40.0/24", ME),
            lease("10.1.3.0/24", ME),
        ];
        let plan = plan(&cfg, &leases, ip(ME), Some(net("10.1.15.0/24")), &mut rng());
        assert_eq!(plan.pick, Pick::Reuse(1));
        // Among plain leases the previous subnet is preferred, then the lowest.
        let leases = [lease("10.1.15.0/24", ME), lease("10.1.3.0/24", ME)];
        let with_prev = super::plan(&cfg, &leases, ip(ME), Some(net("10.1.15.0/24")), &mut rng());
        assert_eq!(with_prev.pick, Pick::Reuse(0));
        let without = super::plan(&cfg, &leases, ip(ME), None, &mut rng());
        assert_eq!(without.pick, Pick::Reuse(1));
    }

    #[test]
    fn own_leases_that_no_longer_fit_are_stale() {
        let cfg = config(r#"{"Network":"10.1.0.0/16","SubnetLen":25}"#);
        let leases = [
            lease("10.1.15.0/24", ME),
            reservation("10.1.16.0/24", ME),
            lease("10.2.1.0/25", ME),
            lease("10.1.30.0/25", "198.18.0.2"),
        ];
        let plan = plan(&cfg, &leases, ip(ME), None, &mut rng());
        assert_eq!(plan.stale, vec![0, 2], "reservations are never deleted");
        let Pick::Free(subnet) = plan.pick else {
            panic!("expected a fresh subnet, got {:?}", plan.pick);
        };
        assert!(cfg.fits(subnet));
        // The stale /24s still block what they overlap until they are gone.
        for blocked in ["10.1.15.0/24", "10.1.16.0/24", "10.1.30.0/25"] {
            assert!(
                !net(blocked).contains(&subnet.addr()),
                "{subnet} in {blocked}"
            );
        }
    }

    #[test]
    fn previous_subnet_is_taken_when_free_and_fitting() {
        let cfg = config(r#"{"Network":"10.1.0.0/16"}"#);
        let others = [lease("10.1.81.0/24", "198.18.0.2")];
        let prev = Some(net("10.1.15.0/24"));
        assert_eq!(
            plan(&cfg, &others, ip(ME), prev, &mut rng()).pick,
            Pick::Previous(net("10.1.15.0/24"))
        );
        // Held by another host, reserved for another host, or overlapped by a wider lease.
        for taken in [
            lease("10.1.15.0/24", "198.18.0.2"),
            reservation("10.1.15.0/24", "198.18.0.3"),
            lease("10.1.14.0/23", "198.18.0.4"),
            lease("10.1.15.128/25", "198.18.0.5"),
        ] {
            let pick = plan(&cfg, &[taken], ip(ME), prev, &mut rng()).pick;
            assert!(
                matches!(pick, Pick::Free(s) if s != net("10.1.15.0/24")),
                "{taken:?}: {pick:?}"
            );
        }
        // Not fitting: wrong length, outside the Network, below SubnetMin.
        for unfit in ["10.1.15.0/25", "10.2.15.0/24", "10.1.0.0/24"] {
            let pick = plan(&cfg, &[], ip(ME), Some(net(unfit)), &mut rng()).pick;
            assert!(
                matches!(pick, Pick::Free(s) if s != net(unfit)),
                "{unfit}: {pick:?}"
            );
        }
    }

    #[test]
    fn random_pick_is_among_the_first_hundred_free_subnets() {
        let cfg = config(r#"{"Network":"10.0.0.0/8"}"#);
        // 10.0.1.0 .. 10.0.50.0 are taken, so the pool is 10.0.51.0 .. 10.0.150.0.
        let leases: Vec<Occupied> = (1..=50)
            .map(|i| lease(&format!("10.0.{i}.0/24"), "198.18.1.1"))
            .collect();
        let mut rng = rng();
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let Pick::Free(s) = plan(&cfg, &leases, ip(ME), None, &mut rng).pick else {
                panic!("no pick");
            };
            let third = s.addr().octets()[2];
            assert_eq!(s.addr().octets()[..2], [10, 0]);
            assert!((51..=150).contains(&third), "{s}");
            seen.insert(s);
        }
        assert_eq!(
            seen.len(),
            RANDOM_POOL,
            "every subnet in the pool gets picked"
        );
        // Deterministic for a given seed.
        let a = plan(&cfg, &leases, ip(ME), None, &mut StdRng::seed_from_u64(1));
        let b = plan(&cfg, &leases, ip(ME), None, &mut StdRng::seed_from_u64(1));
        assert_eq!(a, b);
    }

    #[test]
    fn subnet_min_and_max_bound_the_pick() {
        let cfg =
            config(r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.10.0","SubnetMax":"10.1.12.0"}"#);
        let mut rng = rng();
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            match plan(&cfg, &[], ip(ME), None, &mut rng).pick {
                Pick::Free(s) => seen.insert(s),
                other => panic!("{other:?}"),
            };
        }
        let expected: BTreeSet<Ipv4Net> = ["10.1.10.0/24", "10.1.11.0/24", "10.1.12.0/24"]
            .into_iter()
            .map(net)
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn exhaustion_and_other_hosts_reservations() {
        let cfg = config(r#"{"Network":"10.1.0.0/24"}"#);
        // Three leasable /26s: .64, .128, .192. Another host's reservation blocks one.
        let leases = [
            lease("10.1.0.64/26", "198.18.0.2"),
            reservation("10.1.0.128/26", "198.18.0.3"),
        ];
        assert_eq!(
            plan(&cfg, &leases, ip(ME), None, &mut rng()).pick,
            Pick::Free(net("10.1.0.192/26"))
        );
        let full = [leases[0], leases[1], lease("10.1.0.192/26", "198.18.0.4")];
        let plan = plan(&cfg, &full, ip(ME), Some(net("10.1.0.64/26")), &mut rng());
        assert_eq!(plan.pick, Pick::Exhausted);
        assert!(plan.stale.is_empty());
    }

    #[test]
    fn the_top_of_the_address_space_does_not_overflow() {
        let cfg = config(r#"{"Network":"255.255.255.0/24","SubnetLen":30}"#);
        let leases: Vec<Occupied> = cfg
            .leasable_subnets()
            .take(62)
            .map(|s| Occupied {
                subnet: s,
                public_ip: ip("198.18.0.9"),
                reservation: false,
            })
            .collect();
        assert_eq!(
            plan(&cfg, &leases, ip(ME), None, &mut rng()).pick,
            Pick::Free(net("255.255.255.252/30"))
        );
    }

    #[test]
    fn a_wide_lease_blocks_every_subnet_inside_it() {
        let cfg = config(r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.3.0"}"#);
        let leases = [lease("10.1.0.0/22", "198.18.0.2")];
        assert_eq!(
            plan(&cfg, &leases, ip(ME), None, &mut rng()).pick,
            Pick::Exhausted
        );
        let whole = [lease("0.0.0.0/0", "198.18.0.2")];
        assert_eq!(
            plan(&cfg, &whole, ip(ME), None, &mut rng()).pick,
            Pick::Exhausted
        );
    }
}
