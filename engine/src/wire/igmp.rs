//! IGMP (RFC 1112, 2236, 3376) as weft's multicast relay reads it from the container bridge
//! and writes its queries: a checked view over an IGMP message (the IPv4 payload), the v3
//! report's group records as an iterator, and the general query weft sends.
//!
//! Every length is checked before it is read, so garbage yields an error, never a panic.

use std::net::Ipv4Addr;

use crate::wire::ipv4::checksum;

/// The IPv4 protocol number of IGMP.
pub const PROTOCOL: u8 = 2;
/// Membership query (every version).
pub const TYPE_QUERY: u8 = 0x11;
/// IGMPv1 membership report.
pub const TYPE_V1_REPORT: u8 = 0x12;
/// IGMPv2 membership report.
pub const TYPE_V2_REPORT: u8 = 0x16;
/// IGMPv2 leave group.
pub const TYPE_V2_LEAVE: u8 = 0x17;
/// IGMPv3 membership report.
pub const TYPE_V3_REPORT: u8 = 0x22;
/// The all-systems group queries go to.
pub const ALL_SYSTEMS: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);

/// Length of an IGMPv1/v2 message, and of the fixed part of a v3 report.
const MIN_LEN: usize = 8;
/// Length of a v3 group record's fixed part.
const RECORD_LEN: usize = 8;

/// Why bytes are not an IGMP message weft understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IgmpError {
    /// Shorter than the message type needs.
    #[error("IGMP message of {len} bytes is too short")]
    TooShort {
        /// The message's length.
        len: usize,
    },
    /// The checksum does not verify.
    #[error("IGMP checksum does not verify")]
    BadChecksum,
    /// A type weft does not read (queries from another querier, DVMRP, mtrace, ...).
    #[error("IGMP message type {0:#04x} is not a report or a leave")]
    OtherType(u8),
    /// A v3 group record runs past the end of the message.
    #[error("IGMPv3 group record {index} runs past the end of the report")]
    TruncatedRecord {
        /// The record's position.
        index: usize,
    },
}

/// A membership message a host sends: what the relay learns local groups from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgmpMessage<'a> {
    /// A v1 or v2 report: the sender is a member of the group.
    Report(Ipv4Addr),
    /// A v2 leave: the sender left the group.
    Leave(Ipv4Addr),
    /// A v3 report: its group records.
    V3Report(GroupRecords<'a>),
}

/// What a v3 group record says (RFC 3376, 4.2.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordType {
    /// MODE_IS_INCLUDE: receive only from the listed sources.
    IsInclude,
    /// MODE_IS_EXCLUDE: receive from all but the listed sources.
    IsExclude,
    /// CHANGE_TO_INCLUDE_MODE (with no source: leave).
    ToInclude,
    /// CHANGE_TO_EXCLUDE_MODE (with no source: join).
    ToExclude,
    /// ALLOW_NEW_SOURCES.
    Allow,
    /// BLOCK_OLD_SOURCES.
    Block,
    /// A type RFC 3376 does not define (to be ignored).
    Unknown(u8),
}

impl From<u8> for RecordType {
    fn from(value: u8) -> Self {
        match value {
            1 => RecordType::IsInclude,
            2 => RecordType::IsExclude,
            3 => RecordType::ToInclude,
            4 => RecordType::ToExclude,
            5 => RecordType::Allow,
            6 => RecordType::Block,
            other => RecordType::Unknown(other),
        }
    }
}

/// One v3 group record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupRecord<'a> {
    /// What the record says.
    pub kind: RecordType,
    /// The group.
    pub group: Ipv4Addr,
    /// The source list, four bytes per source.
    sources: &'a [u8],
}

impl GroupRecord<'_> {
    /// How many sources the record lists.
    pub fn source_count(&self) -> usize {
        self.sources.len() / 4
    }

    /// The listed sources.
    pub fn sources(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.sources
            .chunks_exact(4)
            .map(|s| Ipv4Addr::new(s[0], s[1], s[2], s[3]))
    }
}

/// The group records of a v3 report, in order; a record that runs past the end yields an
/// error and ends the iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupRecords<'a> {
    rest: &'a [u8],
    left: u16,
    index: usize,
}

impl<'a> Iterator for GroupRecords<'a> {
    type Item = Result<GroupRecord<'a>, IgmpError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let index = self.index;
        self.index += 1;
        let truncated = || Some(Err(IgmpError::TruncatedRecord { index }));
        let Some((fixed, after)) = self.rest.split_first_chunk::<RECORD_LEN>() else {
            self.left = 0;
            return truncated();
        };
        let aux_len = usize::from(fixed[1]) * 4;
        let sources_len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]])) * 4;
        let Some(sources) = after.get(..sources_len) else {
            self.left = 0;
            return truncated();
        };
        let Some(rest) = after.get(sources_len + aux_len..) else {
            self.left = 0;
            return truncated();
        };
        self.rest = rest;
        Some(Ok(GroupRecord {
            kind: RecordType::from(fixed[0]),
            group: Ipv4Addr::new(fixed[4], fixed[5], fixed[6], fixed[7]),
            sources,
        }))
    }
}

/// Parse `bytes` (an IPv4 packet's payload with protocol 2) as a membership report or leave.
/// Queries and other types are [`IgmpError::OtherType`].
pub fn parse(bytes: &[u8]) -> Result<IgmpMessage<'_>, IgmpError> {
    let len = bytes.len();
    let Some(fixed) = bytes.first_chunk::<MIN_LEN>() else {
        return Err(IgmpError::TooShort { len });
    };
    if checksum::sum(bytes) != 0xffff {
        return Err(IgmpError::BadChecksum);
    }
    let group = Ipv4Addr::new(fixed[4], fixed[5], fixed[6], fixed[7]);
    match fixed[0] {
        TYPE_V1_REPORT | TYPE_V2_REPORT => Ok(IgmpMessage::Report(group)),
        TYPE_V2_LEAVE => Ok(IgmpMessage::Leave(group)),
        TYPE_V3_REPORT => Ok(IgmpMessage::V3Report(GroupRecords {
            rest: &bytes[MIN_LEN..],
            left: u16::from_be_bytes([fixed[6], fixed[7]]),
            index: 0,
        })),
        other => Err(IgmpError::OtherType(other)),
    }
}

/// Length of the frame [`write_query`] writes: Ethernet, IPv4 with Router Alert, IGMPv3 query.
pub const QUERY_FRAME_LEN: usize = 14 + 24 + 12;

/// Write an IGMPv3 query for `group` (unspecified: a general query to all systems; otherwise
/// a group-specific query to the group) as a whole Ethernet frame from weft, asking for
/// answers within `max_resp_tenths` tenths of a second. IGMPv1 and v2 hosts read it as their
/// own version's query. The source address is 0.0.0.0, as a snooping querier's may be.
pub fn write_query(
    group: Ipv4Addr,
    max_resp_tenths: u8,
    interval_secs: u8,
) -> [u8; QUERY_FRAME_LEN] {
    use crate::wire::ethernet;
    let to = if group.is_unspecified() {
        ALL_SYSTEMS
    } else {
        group
    };
    let mut frame = [0u8; QUERY_FRAME_LEN];
    frame[..14].copy_from_slice(&ethernet::ipv4_header(ethernet::multicast_mac(to)));
    let ip = &mut frame[14..38];
    ip[0] = 0x46; // version 4, 24-byte header: Router Alert follows.
    ip[1] = 0xc0; // precedence: internetwork control, as IGMP queries carry.
    ip[2..4].copy_from_slice(&((24 + 12) as u16).to_be_bytes());
    ip[8] = 1; // TTL 1: a query never leaves the link.
    ip[9] = PROTOCOL;
    ip[16..20].copy_from_slice(&to.octets());
    ip[20..24].copy_from_slice(&[0x94, 0x04, 0, 0]); // Router Alert (RFC 2113).
    let check = checksum::of(ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let igmp = &mut frame[38..];
    igmp[0] = TYPE_QUERY;
    igmp[1] = max_resp_tenths;
    igmp[4..8].copy_from_slice(&group.octets());
    igmp[8] = 2; // robustness variable 2, S flag clear.
    igmp[9] = interval_secs;
    let check = checksum::of(igmp);
    igmp[2..4].copy_from_slice(&check.to_be_bytes());
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ipv4::Ipv4Packet;

    fn with_checksum(mut msg: Vec<u8>) -> Vec<u8> {
        msg[2] = 0;
        msg[3] = 0;
        let check = checksum::of(&msg);
        msg[2..4].copy_from_slice(&check.to_be_bytes());
        msg
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_v2_reports_and_leaves() {
        let report = with_checksum(vec![0x16, 100, 0, 0, 239, 1, 1, 1]);
        assert_eq!(parse(&report), Ok(IgmpMessage::Report(ip("239.1.1.1"))));
        let v1 = with_checksum(vec![0x12, 0, 0, 0, 239, 1, 1, 2]);
        assert_eq!(parse(&v1), Ok(IgmpMessage::Report(ip("239.1.1.2"))));
        let leave = with_checksum(vec![0x17, 0, 0, 0, 239, 1, 1, 1]);
        assert_eq!(parse(&leave), Ok(IgmpMessage::Leave(ip("239.1.1.1"))));
        let query = with_checksum(vec![0x11, 100, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse(&query), Err(IgmpError::OtherType(0x11)));
        let mut bad = report.clone();
        bad[7] ^= 1;
        assert_eq!(parse(&bad), Err(IgmpError::BadChecksum));
        assert_eq!(parse(&report[..7]), Err(IgmpError::TooShort { len: 7 }));
    }

    #[test]
    fn v3_records_are_read_in_order_and_truncation_is_an_error() {
        let msg = with_checksum(vec![
            0x22, 0, 0, 0, 0, 0, 0, 3, // three records
            4, 0, 0, 0, 239, 1, 1, 1, // TO_EX({}): join
            3, 1, 0, 1, 239, 1, 1, 2, 10, 1, 1, 9, 0xaa, 0xbb, 0xcc,
            0xdd, // TO_IN({10.1.1.9}) + aux
            6, 0, 0, 0, 239, 1, 1, 3, // BLOCK({})
        ]);
        let IgmpMessage::V3Report(records) = parse(&msg).unwrap() else {
            panic!("not a v3 report");
        };
        let records: Vec<_> = records.map(Result::unwrap).collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].kind, RecordType::ToExclude);
        assert_eq!(records[1].kind, RecordType::ToInclude);
        assert_eq!(records[1].group, ip("239.1.1.2"));
        assert_eq!(records[1].sources().collect::<Vec<_>>(), [ip("10.1.1.9")]);
        assert_eq!(records[2].kind, RecordType::Block);
        // Claims four records, holds three: the fourth is an error and ends the iteration.
        let mut lying = msg.clone();
        lying[7] = 4;
        let lying = with_checksum(lying);
        let IgmpMessage::V3Report(records) = parse(&lying).unwrap() else {
            panic!("not a v3 report");
        };
        let all: Vec<_> = records.collect();
        assert_eq!(all.len(), 4);
        assert_eq!(all[3], Err(IgmpError::TruncatedRecord { index: 3 }));
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x1234_5678_u32;
        for len in 0..64 {
            for _ in 0..200 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 17;
                        state ^= state << 5;
                        state as u8
                    })
                    .collect();
                let mut typed = bytes.clone();
                if len >= 8 {
                    typed[0] = 0x22;
                    typed = with_checksum(typed);
                }
                for b in [&bytes, &typed] {
                    if let Ok(IgmpMessage::V3Report(records)) = parse(b) {
                        for record in records.flatten() {
                            let _ = record.sources().count();
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_query_is_a_valid_packet() {
        let frame = write_query(Ipv4Addr::UNSPECIFIED, 100, 60);
        assert_eq!(&frame[..6], &[0x01, 0x00, 0x5e, 0, 0, 1]);
        let packet = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        assert_eq!(packet.dst(), ALL_SYSTEMS);
        assert_eq!(packet.ttl(), 1);
        assert_eq!(packet.protocol(), PROTOCOL);
        let igmp = packet.payload();
        assert_eq!(checksum::sum(igmp), 0xffff);
        assert_eq!(igmp[0], TYPE_QUERY);
        let specific = write_query(ip("239.1.1.1"), 10, 60);
        let packet = Ipv4Packet::new_checked(&specific[14..]).unwrap();
        assert_eq!(packet.dst(), ip("239.1.1.1"));
        assert_eq!(&packet.payload()[4..8], &[239, 1, 1, 1]);
    }
}
