//! The per-peer check that a UDP GSO run arrives intact: the probe format, the peers' states,
//! and the table of peers that get plain sends until (or because) their check says so,
//! published to the workers lock-free.
//!
//! A host sends each peer that advertises the check a GSO run of [`PROBE_SEGMENTS`] probe
//! datagrams; the peer verifies each and answers with one verdict datagram: intact when the
//! whole run arrived unaltered, damaged at the first altered probe. Until a peer's run is
//! proven intact, datagrams to it leave one by one; a damaged verdict, or no verdict after
//! [`MAX_ATTEMPTS`] runs, keeps them so until the peer is checked again, [`RECHECK`] later and
//! then at doubling intervals up to [`RECHECK_MAX`]. Every probe and verdict starts with a zero
//! byte: not an IPv4 packet, so never taken for an inner packet (a TUN refuses it too).
//! Nothing here does I/O; time is passed in.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// The first bytes of every probe and verdict.
pub const MAGIC: [u8; 8] = *b"\0WEFTGSO";
/// The bytes before a probe's pattern (and the whole of a verdict).
pub const HEADER_LEN: usize = 28;
/// How many datagrams a probe run holds.
pub const PROBE_SEGMENTS: usize = 3;
/// The size of every probe but the last (the GSO segment size).
pub const PROBE_SEGMENT_LEN: usize = 1200;
/// The size of the last probe: shorter, as the last datagram of a run often is, since that
/// is the one whose lengths the kernel fixes up on its own.
pub const PROBE_LAST_LEN: usize = 700;
/// How long a run waits for its verdict before the next is sent.
pub const RETRY: Duration = Duration::from_millis(500);
/// How many runs a peer gets before it is judged by their silence.
pub const MAX_ATTEMPTS: u8 = 4;
/// How long a failed peer waits before it is checked again: the path or the peer may have
/// changed (a host that answered nothing may have been overloaded, a virtual machine may have
/// moved). Each further failure doubles the wait, up to [`RECHECK_MAX`].
pub const RECHECK: Duration = Duration::from_secs(300);
/// The longest wait between checks of a peer that keeps failing.
pub const RECHECK_MAX: Duration = Duration::from_secs(3600);
/// The most probe runs the receiving side remembers at once.
const MAX_RECEIVING: usize = 64;

const KIND_PROBE: u8 = 1;
const KIND_INTACT: u8 = 2;
const KIND_DAMAGED: u8 = 3;

/// What a datagram that starts with a zero byte turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// One probe of the run `nonce` for `to`, verified against its header: `intact` unless
    /// its length or pattern differ from what the header says.
    Probe {
        /// The host the run was sent to.
        to: Ipv4Addr,
        /// The run's nonce.
        nonce: u64,
        /// Which probe of the run.
        index: u8,
        /// Whether it arrived as sent.
        intact: bool,
    },
    /// The answer to the run `nonce`.
    Verdict {
        /// The run's nonce.
        nonce: u64,
        /// Whether the whole run arrived as sent.
        intact: bool,
    },
}

/// The length of probe `index` of a run.
fn probe_len(index: usize) -> usize {
    if index + 1 == PROBE_SEGMENTS {
        PROBE_LAST_LEN
    } else {
        PROBE_SEGMENT_LEN
    }
}

/// The pattern byte at `offset` of probe `index` of run `nonce`.
fn pattern(nonce: u64, index: u8, offset: usize) -> u8 {
    nonce.to_le_bytes()[offset % 8] ^ (offset as u8) ^ index.wrapping_mul(0x5b)
}

fn write_header(out: &mut [u8], kind: u8, index: u8, to: Ipv4Addr, nonce: u64) {
    out[..8].copy_from_slice(&MAGIC);
    out[8] = kind;
    out[9] = index;
    out[10] = PROBE_SEGMENTS as u8;
    out[11] = 0;
    out[12..16].copy_from_slice(&to.octets());
    out[16..24].copy_from_slice(&nonce.to_be_bytes());
    out[24..26].copy_from_slice(&(PROBE_SEGMENT_LEN as u16).to_be_bytes());
    out[26..28].copy_from_slice(&(PROBE_LAST_LEN as u16).to_be_bytes());
}

/// The probe run `nonce` for the peer `to`: [`PROBE_SEGMENTS`] datagrams back to back, to be
/// sent with a GSO segment size of [`PROBE_SEGMENT_LEN`].
pub fn probe_run(to: Ipv4Addr, nonce: u64) -> Vec<u8> {
    let mut run = Vec::with_capacity((PROBE_SEGMENTS - 1) * PROBE_SEGMENT_LEN + PROBE_LAST_LEN);
    for index in 0..PROBE_SEGMENTS {
        let start = run.len();
        run.resize(start + probe_len(index), 0);
        let probe = &mut run[start..];
        write_header(probe, KIND_PROBE, index as u8, to, nonce);
        for (offset, byte) in probe.iter_mut().enumerate().skip(HEADER_LEN) {
            *byte = pattern(nonce, index as u8, offset);
        }
    }
    run
}

/// The verdict on run `nonce` for `to` (the host answering), written into `out`; its length,
/// or `None` if `out` is too short.
pub fn write_verdict(out: &mut [u8], to: Ipv4Addr, nonce: u64, intact: bool) -> Option<usize> {
    let out = out.get_mut(..HEADER_LEN)?;
    let kind = if intact { KIND_INTACT } else { KIND_DAMAGED };
    write_header(out, kind, 0, to, nonce);
    Some(HEADER_LEN)
}

/// Read a datagram that may be a probe or a verdict. `None`: it is neither (or its header is
/// too damaged to say whose it is), and is dropped.
pub fn parse(datagram: &[u8]) -> Option<Message> {
    let header = datagram.get(..HEADER_LEN)?;
    if header[..8] != MAGIC || usize::from(header[10]) != PROBE_SEGMENTS {
        return None;
    }
    let to = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let nonce = u64::from_be_bytes(header[16..24].try_into().ok()?);
    let (kind, index) = (header[8], header[9]);
    match kind {
        KIND_INTACT | KIND_DAMAGED => Some(Message::Verdict {
            nonce,
            intact: kind == KIND_INTACT && datagram.len() == HEADER_LEN,
        }),
        KIND_PROBE if usize::from(index) < PROBE_SEGMENTS => {
            let sizes_hold = header[24..26] == (PROBE_SEGMENT_LEN as u16).to_be_bytes()
                && header[26..28] == (PROBE_LAST_LEN as u16).to_be_bytes();
            let intact = sizes_hold
                && datagram.len() == probe_len(usize::from(index))
                && datagram
                    .iter()
                    .enumerate()
                    .skip(HEADER_LEN)
                    .all(|(offset, byte)| *byte == pattern(nonce, index, offset));
            Some(Message::Probe {
                to,
                nonce,
                index,
                intact,
            })
        }
        _ => None,
    }
}

/// Where one peer's check stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerCheck {
    /// Run `nonce` is out (`sent` when), the `attempts`th; `nonce` 0 and no `sent`: none yet.
    Probing {
        /// The run out.
        nonce: u64,
        /// How many runs were sent.
        attempts: u8,
        /// When the last was.
        sent: Option<Instant>,
        /// How many checks of this peer failed before this one.
        failures: u8,
    },
    /// A run arrived intact: GSO to this peer.
    Proven,
    /// A run arrived damaged, or none was answered: plain sends to this peer until it is
    /// checked again at `recheck`.
    Failed {
        /// How many checks of this peer have failed.
        failures: u8,
        /// When the next check starts.
        recheck: Instant,
    },
}

impl PeerCheck {
    /// A check not started yet, after `failures` failed ones.
    fn fresh(failures: u8) -> Self {
        Self::Probing {
            nonce: 0,
            attempts: 0,
            sent: None,
            failures,
        }
    }

    /// Failed at `now`, after `failures` earlier failures.
    fn failed(failures: u8, now: Instant) -> Self {
        let failures = failures.saturating_add(1);
        let wait = RECHECK
            .saturating_mul(1 << (failures - 1).min(4))
            .min(RECHECK_MAX);
        Self::Failed {
            failures,
            recheck: now + wait,
        }
    }
}

/// A change in a peer's check, for the log and the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The peer's run arrived intact.
    Proven,
    /// The peer's run arrived damaged.
    Damaged,
    /// No run was answered.
    Unanswered,
}

/// A probe run due: the peer and the run's nonce.
pub type Run = (Ipv4Addr, u64);

/// The peers' checks (the sending side) and the runs being received (the answering side).
#[derive(Debug, Default)]
pub struct Checks {
    peers: BTreeMap<Ipv4Addr, PeerCheck>,
    /// (source, nonce) → the probes of that run that arrived intact, as bits.
    receiving: Vec<(Ipv4Addr, u64, u8)>,
}

impl Checks {
    /// Check exactly `peers` from now on: new ones start unchecked, gone ones are forgotten.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = Ipv4Addr>) {
        let mut next = BTreeMap::new();
        for peer in peers {
            let state = self
                .peers
                .get(&peer)
                .copied()
                .unwrap_or(PeerCheck::fresh(0));
            next.insert(peer, state);
        }
        self.peers = next;
    }

    /// The state of `peer`'s check, if it is checked.
    pub fn state(&self, peer: Ipv4Addr) -> Option<PeerCheck> {
        self.peers.get(&peer).copied()
    }

    /// The runs due at `now`: each peer whose run is not out yet or went unanswered for
    /// [`RETRY`], or whose failed check is due again, gets a new nonce from `nonce`; a peer out
    /// of attempts fails instead.
    pub fn due(
        &mut self,
        now: Instant,
        mut nonce: impl FnMut() -> u64,
    ) -> (Vec<Run>, Vec<(Ipv4Addr, Outcome)>) {
        let mut runs = Vec::new();
        let mut outcomes = Vec::new();
        for (peer, state) in self.peers.iter_mut() {
            if let PeerCheck::Failed { failures, recheck } = *state {
                if now >= recheck {
                    *state = PeerCheck::fresh(failures);
                }
            }
            let PeerCheck::Probing {
                attempts,
                sent,
                failures,
                ..
            } = *state
            else {
                continue;
            };
            if sent.is_some_and(|sent| now.saturating_duration_since(sent) < RETRY) {
                continue;
            }
            if attempts >= MAX_ATTEMPTS {
                *state = PeerCheck::failed(failures, now);
                outcomes.push((*peer, Outcome::Unanswered));
                continue;
            }
            let fresh = nonce();
            *state = PeerCheck::Probing {
                nonce: fresh,
                attempts: attempts + 1,
                sent: Some(now),
                failures,
            };
            runs.push((*peer, fresh));
        }
        (runs, outcomes)
    }

    /// A verdict from `from`: it counts only for the run that peer is waiting on.
    pub fn verdict(&mut self, from: Ipv4Addr, nonce: u64, intact: bool) -> Option<Outcome> {
        let state = self.peers.get_mut(&from)?;
        match *state {
            PeerCheck::Probing {
                nonce: expected,
                sent: Some(sent),
                failures,
                ..
            } if expected == nonce => {
                let (next, outcome) = if intact {
                    (PeerCheck::Proven, Outcome::Proven)
                } else {
                    (PeerCheck::failed(failures, sent), Outcome::Damaged)
                };
                *state = next;
                Some(outcome)
            }
            _ => None,
        }
    }

    /// A probe from `from`: the verdict to answer with, once the run is whole (intact) or at
    /// its first altered probe (damaged); `None` while the run is incomplete.
    pub fn probe(&mut self, from: Ipv4Addr, message: Message) -> Option<bool> {
        let Message::Probe {
            nonce,
            index,
            intact,
            ..
        } = message
        else {
            return None;
        };
        let at = self
            .receiving
            .iter()
            .position(|(s, n, _)| *s == from && *n == nonce);
        let at = match at {
            Some(at) => at,
            None => {
                if self.receiving.len() >= MAX_RECEIVING {
                    self.receiving.remove(0);
                }
                self.receiving.push((from, nonce, 0));
                self.receiving.len() - 1
            }
        };
        if !intact {
            self.receiving.remove(at);
            return Some(false);
        }
        self.receiving[at].2 |= 1 << index;
        if u32::from(self.receiving[at].2) == (1u32 << PROBE_SEGMENTS) - 1 {
            self.receiving.remove(at);
            return Some(true);
        }
        None
    }

    /// The peers to which datagrams leave one by one: those checked and not proven.
    pub fn withheld(&self) -> PlainPeerTable {
        PlainPeerTable {
            addrs: self
                .peers
                .iter()
                .filter(|(_, state)| **state != PeerCheck::Proven)
                .map(|(peer, _)| u32::from(*peer))
                .collect(),
        }
    }
}

/// An immutable set of peers that get no GSO runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlainPeerTable {
    /// Sorted (it is built from a sorted map), without duplicates.
    addrs: Box<[u32]>,
}

impl PlainPeerTable {
    /// Whether datagrams to `addr` leave one by one.
    #[inline]
    pub fn withholds(&self, addr: Ipv4Addr) -> bool {
        !self.addrs.is_empty() && self.addrs.binary_search(&u32::from(addr)).is_ok()
    }
}

/// How the checks went, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GsoCheckCounts {
    /// Peers whose run arrived intact.
    pub proven: u64,
    /// Peers whose run arrived damaged or went unanswered.
    pub failed: u64,
    /// Datagrams with a zero first byte that were not a well-formed probe or verdict, or a
    /// verdict no check waited for: dropped.
    pub bad: u64,
}

impl GsoCheckCounts {
    /// The counts in Prometheus' text format.
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP weft_udp_gso_checks_total Peers whose UDP GSO check passed (proven) or failed (plain sends to them)."
        );
        let _ = writeln!(out, "# TYPE weft_udp_gso_checks_total counter");
        let _ = writeln!(
            out,
            "weft_udp_gso_checks_total{{outcome=\"proven\"}} {}",
            self.proven
        );
        let _ = writeln!(
            out,
            "weft_udp_gso_checks_total{{outcome=\"failed\"}} {}",
            self.failed
        );
        let _ = writeln!(
            out,
            "# HELP weft_udp_gso_check_bad_total Malformed, forged or unexpected probes and verdicts, dropped."
        );
        let _ = writeln!(out, "# TYPE weft_udp_gso_check_bad_total counter");
        let _ = writeln!(out, "weft_udp_gso_check_bad_total {}", self.bad);
    }
}

/// The checks shared by control (which names the peers), the probe thread and the workers.
/// Cloning gives another handle to the same checks.
#[derive(Clone, Debug, Default)]
pub struct GsoCheck {
    checks: Arc<Mutex<Checks>>,
    plain: Arc<ArcSwap<PlainPeerTable>>,
    counts: Arc<CheckCounters>,
    nonces: RandomState,
}

#[derive(Debug, Default)]
struct CheckCounters {
    /// Probe runs sent so far.
    runs: AtomicU64,
    proven: AtomicU64,
    failed: AtomicU64,
    bad: AtomicU64,
}

impl GsoCheck {
    fn lock(&self) -> MutexGuard<'_, Checks> {
        // A panic elsewhere leaves the map consistent: every change is one assignment.
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, checks: &Checks) {
        let table = checks.withheld();
        if **self.plain.load() != table {
            self.plain.store(Arc::new(table));
        }
    }

    /// Check exactly `peers` (the weft hosts that advertise the check); until a peer is
    /// proven, datagrams to it leave one by one.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = Ipv4Addr>) {
        let mut checks = self.lock();
        checks.set_peers(peers);
        self.publish(&checks);
    }

    /// The state of `peer`'s check, if it is checked.
    pub fn state(&self, peer: Ipv4Addr) -> Option<PeerCheck> {
        self.lock().state(peer)
    }

    /// Whether datagrams to `addr` must leave one by one. Cheap: one atomic load, no lock.
    #[inline]
    pub fn withholds(&self, addr: Ipv4Addr) -> bool {
        self.plain.load().withholds(addr)
    }

    /// The counts so far.
    pub fn counts(&self) -> GsoCheckCounts {
        GsoCheckCounts {
            proven: self.counts.proven.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
            bad: self.counts.bad.load(Ordering::Relaxed),
        }
    }

    /// The runs due now, with fresh unpredictable nonces; peers out of attempts fail.
    pub(crate) fn due(&self, now: Instant) -> Vec<Run> {
        let mut checks = self.lock();
        // Unpredictable to others (the hasher's keys are random), and never repeated within
        // this process (the sequence).
        let (nonces, sequence) = (&self.nonces, &self.counts.runs);
        let (runs, outcomes) = checks.due(now, || {
            let mut hasher = nonces.build_hasher();
            hasher.write_u64(sequence.fetch_add(1, Ordering::Relaxed));
            hasher.finish()
        });
        for (peer, outcome) in outcomes {
            self.note(peer, outcome);
        }
        self.publish(&checks);
        runs
    }

    fn note(&self, peer: Ipv4Addr, outcome: Outcome) {
        match outcome {
            Outcome::Proven => {
                self.counts.proven.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, "UDP GSO to this peer arrives intact: GSO runs to it");
            }
            Outcome::Damaged | Outcome::Unanswered => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                let reason = if outcome == Outcome::Damaged {
                    "damaged"
                } else {
                    "unanswered"
                };
                tracing::warn!(
                    %peer,
                    reason,
                    "UDP GSO probe run to this peer failed: plain sends to it until it is checked again"
                );
            }
        }
    }

    /// Handle a datagram from `from` that starts with a zero byte: a probe gets its verdict
    /// written into `reply` once due, a verdict settles a check. Anything else is counted here
    /// and [`Received::Bad`] for the caller to count as a drop.
    pub fn receive(&self, from: Ipv4Addr, datagram: &[u8], reply: &mut [u8]) -> Received {
        let Some(message) = parse(datagram) else {
            self.counts.bad.fetch_add(1, Ordering::Relaxed);
            return Received::Bad;
        };
        let mut checks = self.lock();
        match message {
            Message::Verdict { nonce, intact } => match checks.verdict(from, nonce, intact) {
                Some(outcome) => {
                    self.note(from, outcome);
                    self.publish(&checks);
                    Received::Taken
                }
                None => {
                    self.counts.bad.fetch_add(1, Ordering::Relaxed);
                    Received::Bad
                }
            },
            Message::Probe { to, nonce, .. } => match checks.probe(from, message) {
                Some(intact) => match write_verdict(reply, to, nonce, intact) {
                    Some(len) => Received::Answer(len),
                    None => Received::Taken,
                },
                None => Received::Taken,
            },
        }
    }
}

/// What became of a datagram handed to [`GsoCheck::receive`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// A probe that completed its run: the verdict of this length, in the reply buffer, goes
    /// back to the sender.
    Answer(usize),
    /// A probe of a run not yet complete, or a verdict that settled a check.
    Taken,
    /// Neither a well-formed probe nor an awaited verdict: dropped.
    Bad,
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    fn probes(run: &[u8]) -> Vec<&[u8]> {
        run.chunks(PROBE_SEGMENT_LEN).collect()
    }

    #[test]
    fn probes_verify_and_altered_ones_do_not() {
        let run = probe_run(A, 42);
        let probes = probes(&run);
        assert_eq!(probes.len(), PROBE_SEGMENTS);
        assert_eq!(probes[PROBE_SEGMENTS - 1].len(), PROBE_LAST_LEN);
        for (index, probe) in probes.iter().enumerate() {
            assert_eq!(probe[0], 0, "never an IPv4 packet");
            assert_eq!(
                parse(probe),
                Some(Message::Probe {
                    to: A,
                    nonce: 42,
                    index: index as u8,
                    intact: true
                })
            );
        }
        let mut altered = probes[1].to_vec();
        altered[700] ^= 1;
        assert!(matches!(
            parse(&altered),
            Some(Message::Probe { intact: false, .. })
        ));
        // Cut short, or given the size of another probe, it is damaged too.
        assert!(matches!(
            parse(&probes[0][..PROBE_LAST_LEN]),
            Some(Message::Probe { intact: false, .. })
        ));
        let mut verdict = [0u8; 64];
        let len = write_verdict(&mut verdict, A, 42, true).unwrap();
        assert_eq!(
            parse(&verdict[..len]),
            Some(Message::Verdict {
                nonce: 42,
                intact: true
            })
        );
        assert_eq!(write_verdict(&mut [0u8; 10], A, 42, true), None);
    }

    #[test]
    fn junk_is_neither_probe_nor_verdict() {
        let run = probe_run(A, 7);
        for junk in [
            &b""[..],
            &[0u8; 27][..],
            &run[..HEADER_LEN - 1],
            &[0x45u8; 100][..],
        ] {
            assert_eq!(parse(junk), None);
        }
        let mut wrong_kind = run[..PROBE_SEGMENT_LEN].to_vec();
        wrong_kind[8] = 9;
        assert_eq!(parse(&wrong_kind), None);
        let mut wrong_index = run[..PROBE_SEGMENT_LEN].to_vec();
        wrong_index[9] = PROBE_SEGMENTS as u8;
        assert_eq!(parse(&wrong_index), None);
    }

    #[test]
    fn a_whole_run_is_answered_intact_and_an_altered_one_damaged() {
        let mut checks = Checks::default();
        let run = probe_run(A, 5);
        let probes = probes(&run);
        assert_eq!(checks.probe(A, parse(probes[2]).unwrap()), None);
        assert_eq!(checks.probe(A, parse(probes[0]).unwrap()), None);
        assert_eq!(checks.probe(A, parse(probes[1]).unwrap()), Some(true));
        let mut altered = probes[0].to_vec();
        altered[HEADER_LEN] ^= 0x80;
        assert_eq!(checks.probe(A, parse(probes[1]).unwrap()), None);
        assert_eq!(checks.probe(A, parse(&altered).unwrap()), Some(false));
        // Runs are told apart by their source too.
        assert_eq!(checks.probe(B, parse(probes[0]).unwrap()), None);
        assert!(checks.receiving.len() <= MAX_RECEIVING);
        for nonce in 0..2 * MAX_RECEIVING as u64 {
            let run = probe_run(A, nonce);
            checks.probe(A, parse(&run[..PROBE_SEGMENT_LEN]).unwrap());
        }
        assert_eq!(checks.receiving.len(), MAX_RECEIVING);
    }

    #[test]
    fn peers_are_probed_until_proven_failed_or_silent() {
        let start = Instant::now();
        let mut checks = Checks::default();
        let mut next = 100;
        let mut nonce = || {
            next += 1;
            next
        };
        checks.set_peers([A, B]);
        assert!(checks.withheld().withholds(A) && checks.withheld().withholds(B));
        let (runs, outcomes) = checks.due(start, &mut nonce);
        assert_eq!(runs, vec![(A, 101), (B, 102)]);
        assert!(outcomes.is_empty());
        // Not due again before RETRY.
        assert!(checks.due(start, &mut nonce).0.is_empty());
        // A stale or forged nonce, or a stranger, settles nothing.
        assert_eq!(checks.verdict(A, 999, true), None);
        assert_eq!(
            checks.verdict(Ipv4Addr::new(198, 18, 0, 9), 101, true),
            None
        );
        assert_eq!(checks.verdict(A, 101, true), Some(Outcome::Proven));
        assert_eq!(checks.verdict(A, 101, true), None);
        assert_eq!(checks.verdict(B, 102, false), Some(Outcome::Damaged));
        assert!(!checks.withheld().withholds(A));
        assert!(checks.withheld().withholds(B));
        assert_eq!(
            checks.state(B),
            Some(PeerCheck::Failed {
                failures: 1,
                recheck: start + RECHECK
            })
        );

        // A silent peer is probed MAX_ATTEMPTS times, then fails.
        let c = Ipv4Addr::new(198, 18, 0, 3);
        checks.set_peers([A, B, c]);
        assert_eq!(checks.state(A), Some(PeerCheck::Proven));
        let mut at = start;
        for _ in 0..MAX_ATTEMPTS {
            assert_eq!(checks.due(at, &mut nonce).0.len(), 1);
            at += RETRY;
        }
        assert_eq!(checks.due(at, &mut nonce).1, vec![(c, Outcome::Unanswered)]);
        assert!(checks.withheld().withholds(c));
        checks.set_peers([A]);
        assert_eq!(checks.state(c), None);
        assert_eq!(checks.withheld(), PlainPeerTable::default());
    }

    #[test]
    fn a_failed_peer_is_checked_again_later_and_less_often_each_time() {
        let start = Instant::now();
        let mut checks = Checks::default();
        let mut next = 0;
        let mut nonce = || {
            next += 1;
            next
        };
        checks.set_peers([B]);
        let mut at = start;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let [(peer, run)] = checks.due(at, &mut nonce).0[..] else {
                panic!("one run due");
            };
            assert_eq!(peer, B);
            assert_eq!(checks.verdict(B, run, false), Some(Outcome::Damaged));
            let Some(PeerCheck::Failed { recheck, .. }) = checks.state(B) else {
                panic!("failed: {:?}", checks.state(B));
            };
            waits.push(recheck - at);
            // Plain sends while failed, and nothing due before the recheck.
            assert!(checks.withheld().withholds(B));
            assert!(checks.due(recheck - RETRY, &mut nonce).0.is_empty());
            at = recheck;
        }
        let minutes: Vec<u64> = waits.iter().map(|w| w.as_secs() / 60).collect();
        assert_eq!(minutes, vec![5, 10, 20, 40, 60, 60, 60]);
        // Still withheld while the recheck runs; a pass restores GSO runs.
        let [(_, run)] = checks.due(at, &mut nonce).0[..] else {
            panic!("one run due");
        };
        assert!(checks.withheld().withholds(B));
        assert_eq!(checks.verdict(B, run, true), Some(Outcome::Proven));
        assert!(!checks.withheld().withholds(B));
        // A peer silent on its recheck fails again after MAX_ATTEMPTS runs.
        checks.set_peers([A]);
        fail_silently(&mut checks, start);
        let Some(PeerCheck::Failed { recheck, failures }) = checks.state(A) else {
            panic!("failed");
        };
        assert_eq!(failures, 1);
        fail_silently(&mut checks, recheck);
        assert!(matches!(
            checks.state(A),
            Some(PeerCheck::Failed { failures: 2, .. })
        ));
    }

    /// Let `A`'s check (starting at `from`) go unanswered until it fails.
    fn fail_silently(checks: &mut Checks, from: Instant) {
        let mut at = from;
        for _ in 0..MAX_ATTEMPTS {
            assert_eq!(checks.due(at, || 7).0, vec![(A, 7)]);
            at += RETRY;
        }
        assert_eq!(checks.due(at, || 7).1, vec![(A, Outcome::Unanswered)]);
    }

    #[test]
    fn shared_checks_count_and_publish() {
        let check = GsoCheck::default();
        check.set_peers([B]);
        assert!(check.withholds(B) && !check.withholds(A));
        let runs = check.due(Instant::now());
        let [(peer, nonce)] = runs[..] else {
            panic!("one run: {runs:?}")
        };
        assert_eq!(peer, B);
        // The answering side: B, receiving the run from this host (A).
        let answering = GsoCheck::default();
        let run = probe_run(B, nonce);
        let mut reply = [0u8; 64];
        let mut answer = None;
        for probe in probes(&run) {
            match answering.receive(A, probe, &mut reply) {
                Received::Answer(len) => answer = Some(len),
                other => assert_eq!(other, Received::Taken),
            }
        }
        let len = answer.expect("a verdict");
        assert_eq!(
            check.receive(B, &reply[..len], &mut [0u8; 64]),
            Received::Taken
        );
        assert!(!check.withholds(B));
        assert_eq!(check.counts().proven, 1);
        // Junk and replayed verdicts are counted and dropped.
        assert_eq!(
            check.receive(B, &reply[..len], &mut [0u8; 64]),
            Received::Bad
        );
        assert_eq!(check.receive(B, &[0, 1, 2], &mut [0u8; 64]), Received::Bad);
        assert_eq!(check.counts().bad, 2);
        let mut text = String::new();
        check.counts().render_prometheus(&mut text);
        assert!(text.contains("weft_udp_gso_checks_total{outcome=\"proven\"} 1\n"));
        assert!(text.contains("weft_udp_gso_check_bad_total 2\n"));
    }
}
