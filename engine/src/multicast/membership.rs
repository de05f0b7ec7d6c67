//! Which groups local containers joined, learned from the IGMP they send, with time passed in.
//!
//! Weft keeps one view for the whole host, as a multicast router does for a link: a group is
//! joined while any container reports it, and forgotten after the membership interval without
//! a report, at once on a leave (v2 leave, v3 TO_IN({})), or when a v3 BLOCK removes its last
//! source. Since another container may still be a member after one leaves, the relay answers
//! every leave with a group-specific query, and the remaining members report again at once.
//! Link-local groups (224.0.0.0/24) are not tracked: every multicast-capable host receives them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::multicast::groups::is_link_local_group;
use crate::wire::igmp::{IgmpMessage, RecordType};

/// How long a group lives without a report: robustness 2 × query interval 125 s + 10 s of
/// response time (RFC 3376, 8.4), the default every IGMP router uses.
pub const MEMBERSHIP_INTERVAL: Duration = Duration::from_secs(260);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    expires: Instant,
    /// `None`: from any source (a v1/v2 join or a v3 EXCLUDE); otherwise the sources asked
    /// for (v3 INCLUDE), of which one suffices to forward the whole group.
    sources: Option<BTreeSet<Ipv4Addr>>,
}

/// What one IGMP message did to the membership.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// The set of groups changed.
    pub changed: bool,
    /// Groups a leave removed: the relay queries each, so that remaining members re-report.
    pub left: Vec<Ipv4Addr>,
    /// A v3 record ran past the end of the report (the records before it were applied).
    pub malformed: bool,
}

/// The groups joined on this host.
#[derive(Clone, Debug, Default)]
pub struct Membership {
    groups: BTreeMap<Ipv4Addr, Entry>,
}

impl Membership {
    /// No group.
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply one IGMP message received at `now`.
    pub fn apply(&mut self, message: IgmpMessage<'_>, now: Instant) -> Update {
        let mut update = Update::default();
        match message {
            IgmpMessage::Report(group) => self.join(group, None, now, &mut update),
            IgmpMessage::Leave(group) => self.leave(group, &mut update),
            IgmpMessage::V3Report(records) => {
                for record in records {
                    let Ok(record) = record else {
                        update.malformed = true;
                        break;
                    };
                    let sources: BTreeSet<Ipv4Addr> = record.sources().collect();
                    let group = record.group;
                    match record.kind {
                        RecordType::IsExclude | RecordType::ToExclude => {
                            self.join(group, None, now, &mut update)
                        }
                        RecordType::IsInclude | RecordType::ToInclude if sources.is_empty() => {
                            self.leave(group, &mut update)
                        }
                        RecordType::IsInclude | RecordType::ToInclude | RecordType::Allow => {
                            if !sources.is_empty() {
                                self.join(group, Some(sources), now, &mut update)
                            }
                        }
                        RecordType::Block => self.block(group, &sources, &mut update),
                        RecordType::Unknown(_) => {}
                    }
                }
            }
        }
        update
    }

    /// Forget the groups not reported for [`MEMBERSHIP_INTERVAL`]; returns whether any was.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.groups.len();
        self.groups.retain(|_, entry| entry.expires > now);
        self.groups.len() != before
    }

    /// When the next group expires, if any is joined.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.groups.values().map(|entry| entry.expires).min()
    }

    /// The groups joined, in address order.
    pub fn groups(&self) -> Vec<Ipv4Addr> {
        self.groups.keys().copied().collect()
    }

    fn join(
        &mut self,
        group: Ipv4Addr,
        sources: Option<BTreeSet<Ipv4Addr>>,
        now: Instant,
        update: &mut Update,
    ) {
        if !group.is_multicast() || is_link_local_group(group) {
            return;
        }
        let expires = now + MEMBERSHIP_INTERVAL;
        match self.groups.get_mut(&group) {
            Some(entry) => {
                entry.expires = entry.expires.max(expires);
                match (&mut entry.sources, sources) {
                    (Some(known), Some(more)) => known.extend(more),
                    (known, None) => *known = None,
                    (None, Some(_)) => {}
                }
            }
            None => {
                self.groups.insert(group, Entry { expires, sources });
                update.changed = true;
            }
        }
    }

    fn leave(&mut self, group: Ipv4Addr, update: &mut Update) {
        if self.groups.remove(&group).is_some() {
            update.changed = true;
            update.left.push(group);
        }
    }

    fn block(&mut self, group: Ipv4Addr, blocked: &BTreeSet<Ipv4Addr>, update: &mut Update) {
        let Some(Entry {
            sources: Some(sources),
            ..
        }) = self.groups.get_mut(&group)
        else {
            // From any source: blocking some leaves the group joined.
            return;
        };
        sources.retain(|source| !blocked.contains(source));
        if sources.is_empty() {
            self.leave(group, update);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::igmp;
    use crate::wire::ipv4::checksum;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v3(records: &[(u8, &str, &[&str])]) -> Vec<u8> {
        let mut msg = vec![0x22, 0, 0, 0, 0, 0, 0, records.len() as u8];
        for (kind, group, sources) in records {
            msg.extend_from_slice(&[*kind, 0, 0, sources.len() as u8]);
            msg.extend_from_slice(&ip(group).octets());
            for source in *sources {
                msg.extend_from_slice(&ip(source).octets());
            }
        }
        let check = checksum::of(&msg);
        msg[2..4].copy_from_slice(&check.to_be_bytes());
        msg
    }

    fn apply(m: &mut Membership, bytes: &[u8], now: Instant) -> Update {
        m.apply(igmp::parse(bytes).unwrap(), now)
    }

    #[test]
    fn v2_joins_refresh_and_leaves_remove_at_once() {
        let t0 = Instant::now();
        let mut m = Membership::new();
        let join = IgmpMessage::Report(ip("239.1.1.1"));
        assert!(m.apply(join, t0).changed);
        assert!(
            !m.apply(join, t0 + Duration::from_secs(200)).changed,
            "a refresh"
        );
        assert!(
            !m.expire(t0 + Duration::from_secs(300)),
            "refreshed at 200 s"
        );
        assert_eq!(m.groups(), [ip("239.1.1.1")]);
        assert_eq!(m.next_expiry(), Some(t0 + Duration::from_secs(460)));
        let update = m.apply(IgmpMessage::Leave(ip("239.1.1.1")), t0);
        assert!(update.changed);
        assert_eq!(update.left, [ip("239.1.1.1")]);
        assert!(m.groups().is_empty());
        assert_eq!(
            m.apply(IgmpMessage::Leave(ip("239.1.1.1")), t0),
            Update::default()
        );
    }

    #[test]
    fn groups_expire_after_the_membership_interval() {
        let t0 = Instant::now();
        let mut m = Membership::new();
        m.apply(IgmpMessage::Report(ip("239.1.1.1")), t0);
        m.apply(
            IgmpMessage::Report(ip("239.1.1.2")),
            t0 + Duration::from_secs(100),
        );
        assert!(!m.expire(t0 + Duration::from_secs(259)));
        assert!(m.expire(t0 + Duration::from_secs(260)));
        assert_eq!(m.groups(), [ip("239.1.1.2")]);
        assert!(m.expire(t0 + Duration::from_secs(360)));
        assert_eq!(m.next_expiry(), None);
    }

    #[test]
    fn link_local_and_unicast_groups_are_not_tracked() {
        let t0 = Instant::now();
        let mut m = Membership::new();
        assert!(!m.apply(IgmpMessage::Report(ip("224.0.0.251")), t0).changed);
        assert!(!m.apply(IgmpMessage::Report(ip("10.1.1.1")), t0).changed);
        assert!(m.groups().is_empty());
    }

    #[test]
    fn v3_records_join_leave_and_block() {
        let t0 = Instant::now();
        let mut m = Membership::new();
        // TO_EX({}) joins from any source; IS_IN({S}) joins for a source; ALLOW({}) is nothing.
        let update = apply(
            &mut m,
            &v3(&[
                (4, "239.1.1.1", &[]),
                (1, "239.1.1.2", &["10.1.1.9"]),
                (5, "239.1.1.3", &[]),
            ]),
            t0,
        );
        assert!(update.changed);
        assert_eq!(m.groups(), [ip("239.1.1.1"), ip("239.1.1.2")]);
        // ALLOW adds a source; BLOCK of one leaves the other; BLOCK on an any-source group is
        // nothing.
        apply(&mut m, &v3(&[(5, "239.1.1.2", &["10.1.1.10"])]), t0);
        let update = apply(
            &mut m,
            &v3(&[
                (6, "239.1.1.2", &["10.1.1.9"]),
                (6, "239.1.1.1", &["10.1.1.9"]),
            ]),
            t0,
        );
        assert!(!update.changed);
        // BLOCK of the last source leaves; TO_IN({}) leaves.
        let update = apply(
            &mut m,
            &v3(&[(6, "239.1.1.2", &["10.1.1.10"]), (3, "239.1.1.1", &[])]),
            t0,
        );
        assert!(update.changed);
        assert_eq!(update.left, [ip("239.1.1.2"), ip("239.1.1.1")]);
        assert!(m.groups().is_empty());
        // An INCLUDE group turned EXCLUDE is from any source: BLOCK leaves it joined.
        apply(
            &mut m,
            &v3(&[(3, "239.1.1.4", &["10.1.1.9"]), (4, "239.1.1.4", &[])]),
            t0,
        );
        apply(&mut m, &v3(&[(6, "239.1.1.4", &["10.1.1.9"])]), t0);
        assert_eq!(m.groups(), [ip("239.1.1.4")]);
    }

    #[test]
    fn a_truncated_v3_report_applies_the_records_before_the_fault() {
        let t0 = Instant::now();
        let mut m = Membership::new();
        let mut msg = v3(&[(4, "239.1.1.1", &[])]);
        msg[7] = 2;
        msg[2] = 0;
        msg[3] = 0;
        let check = checksum::of(&msg);
        msg[2..4].copy_from_slice(&check.to_be_bytes());
        let update = apply(&mut m, &msg, t0);
        assert!(update.changed && update.malformed);
        assert_eq!(m.groups(), [ip("239.1.1.1")]);
    }
}
