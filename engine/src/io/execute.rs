//! Executing a batch's results, shared by both back ends: a super-packet's datagrams queued
//! for the socket ([`queue_segments`]), the packets accepted for the TUN sorted into (coalesced)
//! writes ([`Accepted`], [`write_sorted`]), and the counting of what the kernel made of each.

use std::net::SocketAddrV4;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::batch::{decide_datagrams, GroupSink, Source, WriteCount};
use crate::config::ActiveOffloads;
use crate::counters::BatchCounts;
use crate::crypto::{Opener, Opening};
use crate::decide::Policy;
use crate::gso_check::GsoCheck;
use crate::icmp_limit::IcmpGate;
use crate::io::buffers::{OpenedArena, PacketBuffers};
use crate::io::error::{write_error_is_fatal, WorkerError};
use crate::io::tap::GroupDelivery;
use crate::io::tun::write_packet;
use crate::io::udp::{MessageInfo, SendBatch};
use crate::multicast::network_broadcast::BroadcastSink;
use crate::offload::coalesce::MAX_SEGMENTS;
use crate::offload::{Coalescer, Segmenter};
use crate::partial_peers::{PartialPeerTable, PartialPeers};
use crate::route::RouteTable;
use crate::wire::ethernet::HEADER_LEN;
use crate::wire::vnet::{VnetHeader, VNET_HDR_LEN};

/// Queue the datagrams of a decided super-packet for `to` into `batch`, from segment `*next`
/// on, advancing `*next`. Returns whether every segment is queued (`false`: the batch is full,
/// send it and call again). Each datagram is the segment's headers, written into the batch,
/// and its payload, left in `packet`.
pub(crate) fn queue_segments(
    batch: &mut SendBatch,
    to: SocketAddrV4,
    packet: &[u8],
    segmenter: &Segmenter,
    next: &mut usize,
    gso: bool,
) -> bool {
    let header_len = segmenter.header_len();
    while *next < segmenter.segments() {
        if !batch.has_room(2, header_len) {
            return false;
        }
        let Some(space) = batch.header_space(header_len) else {
            return false;
        };
        let header = space.as_ptr();
        let Some(segment) = segmenter.write_header(packet, *next, space) else {
            // The segmenter was made from this packet, so this cannot happen; give up the
            // rest rather than loop.
            *next = segmenter.segments();
            return true;
        };
        let payload = packet[segment.payload.clone()].as_ptr();
        let pieces = [(header, header_len), (payload, segment.payload.len())];
        if !batch.push(to, Source::Packet, &pieces, gso) {
            return false;
        }
        *next += 1;
    }
    true
}

/// The packets of a batch accepted for the TUN, where they lie in the worker's buffers (with
/// encryption, in the arena they were opened into) and in arrival order, and (with coalescing) the coalescer that sorts them into writes, fed with
/// the checked views the decisions read.
pub(crate) struct Accepted {
    packets: Vec<(*mut u8, usize)>,
    coalescer: Coalescer,
    coalesce: bool,
    /// Where group traffic from peers goes, on a host that takes some.
    groups: Option<GroupDelivery>,
    /// With encryption: what opens the datagrams, and its outbox; and the arena a batch's
    /// packets are opened into, which the batch's writes read.
    opener: Option<(Opener, OpenedArena)>,
    /// The peers whose inner checksums are left partial, both ways.
    partial_peers: PartialPeers,
    /// The per-peer GSO checks: which peers get plain sends, and the probes' answers.
    gso_check: Option<GsoCheck>,
}

/// What a received buffer needs sent back: at most one ICMP error, to `to`, from the piece of
/// the slot's reply buffer that holds it.
pub(crate) type ReplyToSender = (SocketAddrV4, (*const u8, usize));

impl Accepted {
    /// Room for `packets` packets before the list grows; coalesced as `offloads` allow.
    pub(crate) fn new(packets: usize, offloads: &ActiveOffloads) -> Self {
        let mut coalescer = Coalescer::new();
        coalescer.set_udp(offloads.coalesce_udp);
        Self {
            packets: Vec::with_capacity(packets),
            coalescer,
            coalesce: offloads.coalesce,
            groups: None,
            opener: None,
            partial_peers: PartialPeers::default(),
            gso_check: None,
        }
    }

    /// Answer GSO probes and take verdicts with `check`, and send GSO runs only to the peers
    /// it does not withhold, from now on.
    pub(crate) fn set_gso_check(&mut self, check: GsoCheck) {
        self.gso_check = Some(check);
    }

    /// Whether datagrams to `to` may leave in GSO runs, given the worker's `gso`.
    #[inline]
    pub(crate) fn gso_to(&self, to: SocketAddrV4, gso: bool) -> bool {
        gso && !self
            .gso_check
            .as_ref()
            .is_some_and(|check| check.withholds(*to.ip()))
    }

    /// Open every datagram with `opener` from now on (encryption between hosts), into an
    /// arena that holds the packets of `receives` receives (more in one batch are dropped as
    /// `too_big`). The arena is reused once [`Accepted::write`] returns, so only a back end
    /// whose writes are done by then may set one.
    pub(crate) fn set_opener(&mut self, opener: Opener, receives: usize) {
        self.opener = Some((opener, OpenedArena::new(receives)));
    }

    /// The opener, whose outbox the worker sends after each batch.
    pub(crate) fn opener(&mut self) -> Option<&mut Opener> {
        self.opener.as_mut().map(|(opener, _)| opener)
    }

    /// Take partial inner checksums from, and leave them partial to, the peers `peers` lists.
    pub(crate) fn set_partial_peers(&mut self, peers: PartialPeers) {
        self.partial_peers = peers;
    }

    /// The peers whose inner checksums are left partial, for a batch of TUN reads.
    pub(crate) fn partial_peer_table(&self) -> arc_swap::Guard<Arc<PartialPeerTable>> {
        self.partial_peers.snapshot()
    }

    /// Deliver group traffic from peers through `groups` from now on.
    pub(crate) fn set_groups(&mut self, groups: Option<GroupDelivery>) {
        self.groups = groups;
    }

    /// Where UDP to the Network's broadcast address read from the TUN goes, with broadcast on.
    pub(crate) fn broadcast_sink(&self) -> Option<&dyn BroadcastSink> {
        let queue = self.groups.as_ref()?.to_relay.as_ref()?;
        Some(queue)
    }

    /// Decide on the datagrams a receive from `from` left in `slot` (`len` bytes; a GRO run
    /// of `segment`-byte datagrams; `truncated` if the kernel cut it) and keep the accepted
    /// ones for the batch's writes. With encryption the datagrams are opened into the arena,
    /// behind the packets of the batch's earlier receives, and the packets kept are there.
    ///
    /// # Safety
    /// The receive has completed, and nothing else reads or writes the slot until the batch's
    /// writes are done.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn receive(
        &mut self,
        buffers: &mut PacketBuffers,
        slot: usize,
        len: usize,
        from: Option<SocketAddrV4>,
        segment: Option<usize>,
        truncated: bool,
        table: &RouteTable,
        policy: &Policy,
        icmp: &mut IcmpGate,
        counts: &mut BatchCounts,
    ) -> Option<ReplyToSender> {
        let base = buffers.packet_ptr(slot);
        let reply_ptr = buffers.reply_ptr(slot).cast_const();
        // SAFETY: the caller guarantees nothing else uses the slot meanwhile.
        let (buf, reply) = unsafe { buffers.slot(slot, len) };
        let mut opening = self.opener.as_mut().map(|(opener, arena)| {
            // SAFETY: the arena's rest is lent only here, for this call; the accepted packets
            // point into its filled part.
            let (start, rest) = unsafe { arena.rest() };
            (start, Opening::new(opener, rest))
        });
        // Where the offsets `decide_datagrams` reports start: the arena's rest with encryption.
        let base = opening.as_ref().map_or(base, |(start, _)| *start);
        // Only the coalescer writes partial checksums as such; without it nothing is published.
        let from_partial_peer = self.coalesce
            && from.is_some_and(|from| self.partial_peers.snapshot().takes(*from.ip()));
        let packets = &mut self.packets;
        let mut coalescer = self.coalesce.then_some(&mut self.coalescer);
        let groups = self.groups.as_ref();
        let mut deliver = |header: &[u8; HEADER_LEN], packet: &[u8]| {
            if let Some(groups) = groups {
                groups.deliver(header, packet);
            }
        };
        let sink = groups.map(|groups| GroupSink {
            delivery: groups.delivery,
            deliver: &mut deliver,
        });
        let answer = decide_datagrams(
            from,
            buf,
            segment,
            truncated,
            table,
            policy,
            reply,
            icmp,
            counts,
            sink,
            opening.as_mut().map(|(_, opening)| opening),
            self.gso_check.as_ref(),
            |offset, ip| {
                // SAFETY: the packet lies inside the slot's buffer (or the arena's rest),
                // `offset` bytes in.
                packets.push((unsafe { base.add(offset) }, ip.as_bytes().len()));
                match coalescer.as_deref_mut() {
                    Some(coalescer) if from_partial_peer => coalescer.push_from_partial_peer(ip),
                    Some(coalescer) => coalescer.push_checked(ip),
                    None => {}
                }
            },
        );
        let opened = opening.map(|(_, opening)| opening.used());
        if let (Some(used), Some((_, arena))) = (opened, self.opener.as_mut()) {
            arena.fill(used);
        }
        answer.map(|(to, len)| (to, (reply_ptr, len)))
    }

    /// Sort the accepted packets into writes and hand each to `write`, as [`write_sorted`]
    /// does; the list is empty afterwards.
    ///
    /// # Safety
    /// As for [`write_sorted`]: every accepted packet is still live and unshared.
    pub(crate) unsafe fn write(
        &mut self,
        offloads: &ActiveOffloads,
        counts: &mut BatchCounts,
        write: impl FnMut(Option<[u8; VNET_HDR_LEN]>, &[libc::iovec], WriteCount) -> Written,
    ) {
        // SAFETY: the caller's guarantee.
        unsafe { write_sorted(&mut self.coalescer, &self.packets, offloads, counts, write) };
        self.packets.clear();
        self.coalescer.clear();
        if let Some((_, arena)) = self.opener.as_mut() {
            arena.clear();
        }
    }
}

/// What became of a TUN write handed to the I/O back end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Written: the kernel's byte count or a negative errno.
    Done(i64),
    /// Queued; its completion is counted later.
    Queued,
}

/// Sort the packets accepted for the TUN (`packets`: start and length in the worker's
/// buffers, in arrival order) into writes, as [`write_sorted`] does, after pushing them into
/// the coalescer (which checks each again; the workers push the views their decisions read).
///
/// # Safety
/// As for [`write_sorted`].
#[cfg(test)]
pub(crate) unsafe fn for_each_tun_write(
    coalescer: &mut Coalescer,
    packets: &[(*mut u8, usize)],
    offloads: &ActiveOffloads,
    counts: &mut BatchCounts,
    write: impl FnMut(Option<[u8; VNET_HDR_LEN]>, &[libc::iovec], WriteCount) -> Written,
) {
    coalescer.clear();
    coalescer.set_udp(offloads.coalesce_udp);
    if offloads.coalesce {
        for &(base, len) in packets {
            // SAFETY: the caller guarantees the packet is live and unshared.
            coalescer.push(unsafe { std::slice::from_raw_parts(base, len) });
        }
    }
    // SAFETY: the caller's guarantee.
    unsafe { write_sorted(coalescer, packets, offloads, counts, write) }
}

/// Sort the packets accepted for the TUN (`packets`: start and length in the worker's
/// buffers, in arrival order; with coalescing, already pushed into `coalescer` in that order)
/// into writes — with coalescing, runs of segments merged into
/// super-packets — and hand each to `write`: its virtio-net header (when the TUN takes one),
/// its pieces, and what it carries. What `write` reports is counted here, except queued writes.
///
/// # Safety
/// Every packet must be live memory that nothing else reads or writes until the writes are
/// done; a super-packet's first packet is edited in place.
pub(crate) unsafe fn write_sorted(
    coalescer: &mut Coalescer,
    packets: &[(*mut u8, usize)],
    offloads: &ActiveOffloads,
    counts: &mut BatchCounts,
    mut write: impl FnMut(Option<[u8; VNET_HDR_LEN]>, &[libc::iovec], WriteCount) -> Written,
) {
    let record = |counts: &mut BatchCounts, written: Written, count: WriteCount| match written {
        Written::Done(result) => count_write(counts, Source::Packet, count, result),
        Written::Queued => {}
    };
    let iov = |base: *mut u8, len: usize| libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    };
    let plain = plain_header(offloads);
    if !offloads.coalesce {
        for &(base, len) in packets {
            let count = WriteCount {
                packets: 1,
                bytes: len as u32,
            };
            let written = write(plain, &[iov(base, len)], count);
            record(counts, written, count);
        }
        return;
    }
    let mut pieces = [iov(std::ptr::null_mut(), 0); MAX_SEGMENTS];
    for group in coalescer.groups() {
        let (head, head_len) = packets[group.head()];
        // SAFETY: as above; no other slice of this packet is alive.
        let header = group.finish(unsafe { std::slice::from_raw_parts_mut(head, head_len) });
        let skip = group.header_len();
        let mut count = WriteCount::default();
        let mut used = 0;
        for member in coalescer.members(group) {
            let (base, len) = packets[member];
            pieces[used] = if used == 0 {
                iov(base, len)
            } else {
                // SAFETY: a member after the first is a segment at least `skip` bytes long
                // (the coalescer checked its headers).
                iov(unsafe { base.add(skip) }, len - skip)
            };
            used += 1;
            count.packets += 1;
            count.bytes += len as u32;
        }
        let vnet = offloads.vnet_hdr.then(|| header.to_bytes());
        let written = write(vnet, &pieces[..used], count);
        record(counts, written, count);
    }
}

/// What the worker does after the kernel answered a send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SendOutcome {
    /// Nothing more: the message is counted, sent or refused.
    Counted,
    /// The message, a GSO run the kernel would not send as one, was split into the plain
    /// messages `Range` at the end of the batch: send those.
    Resend(Range<usize>),
}

/// Handle the kernel's answer to message `i` of `sends` (`result`: bytes sent or a negative
/// errno). A broken socket ends the worker. A GSO run refused as a whole (`EIO`: no checksum
/// offload on the way out; `EINVAL`, `EMSGSIZE`: too large for the path) is split into plain
/// datagrams, and after `EIO` GSO stays off for good (`udp_gso` is cleared). Anything else is
/// counted: sent, or one refused message in `io_errors`.
pub(crate) fn handle_send_result(
    sends: &mut SendBatch,
    i: usize,
    result: i64,
    udp_gso: &mut bool,
    counts: &mut BatchCounts,
) -> Result<SendOutcome, WorkerError> {
    let Some(info) = sends.info(i).copied() else {
        return Ok(SendOutcome::Counted);
    };
    let errno = i32::try_from(-result).unwrap_or(libc::EIO);
    if result < 0 && write_error_is_fatal(errno) {
        return Err(WorkerError::fatal("UDP send", errno));
    }
    let gso_refused = matches!(errno, libc::EIO | libc::EINVAL | libc::EMSGSIZE);
    if result < 0 && gso_refused && info.segments > 1 {
        if errno == libc::EIO && *udp_gso {
            *udp_gso = false;
            tracing::warn!("the kernel refused a UDP GSO send (EIO): sending plain datagrams");
        }
        let before = sends.len();
        if sends.split(i) {
            return Ok(SendOutcome::Resend(before..sends.len()));
        }
    }
    count_send(counts, &info, result);
    Ok(SendOutcome::Counted)
}

/// TUN writes made at once rather than queued, and the first error among them that leaves the
/// queue unusable: the worker goes on with the batch and then stops.
#[derive(Debug, Default)]
pub(crate) struct DirectWrites {
    fatal: Option<i32>,
}

impl DirectWrites {
    /// Write `pieces` behind `vnet` to the TUN queue `fd`: the byte count or a negative errno.
    pub(crate) fn write(
        &mut self,
        fd: RawFd,
        vnet: Option<&[u8; VNET_HDR_LEN]>,
        pieces: &[libc::iovec],
    ) -> i64 {
        let result = write_packet(fd, vnet, pieces);
        let errno = i32::try_from(-result).unwrap_or(libc::EIO);
        if result < 0 && write_error_is_fatal(errno) {
            self.fatal.get_or_insert(errno);
        }
        result
    }

    /// The error that ends the worker, if a write met one.
    pub(crate) fn finish(self) -> Result<(), WorkerError> {
        match self.fatal {
            Some(errno) => Err(WorkerError::fatal("TUN write", errno)),
            None => Ok(()),
        }
    }
}

/// The TUN write of an ICMP error of `len` bytes at `buf`: the header of a plain packet (when
/// the TUN takes one), the piece, and what it carries.
pub(crate) fn reply_write(
    offloads: &ActiveOffloads,
    buf: *mut u8,
    len: usize,
) -> (Option<[u8; VNET_HDR_LEN]>, libc::iovec, WriteCount) {
    let piece = libc::iovec {
        iov_base: buf.cast(),
        iov_len: len,
    };
    let count = WriteCount {
        packets: 1,
        bytes: len as u32,
    };
    (plain_header(offloads), piece, count)
}

/// The virtio-net header of a packet written whole, when the TUN takes one.
fn plain_header(offloads: &ActiveOffloads) -> Option<[u8; VNET_HDR_LEN]> {
    offloads.vnet_hdr.then(|| VnetHeader::PLAIN.to_bytes())
}

/// Count the outcome of sending `info`'s datagrams: `result` is the kernel's byte count or a
/// negative errno.
pub(crate) fn count_send(counts: &mut BatchCounts, info: &MessageInfo, result: i64) {
    let segments = u64::from(info.segments);
    if result < 0 {
        counts.io_errors += segments;
        return;
    }
    match info.source {
        Source::Reply => counts.icmp_sent += 1,
        Source::Packet => {
            counts.udp_sends += 1;
            counts.udp_tx_packets += segments;
            counts.udp_tx_bytes += result as u64;
        }
    }
}

/// Count the outcome of a TUN write of `count`; ICMP errors (`Source::Reply`) count as sent
/// messages.
pub(crate) fn count_write(
    counts: &mut BatchCounts,
    source: Source,
    count: WriteCount,
    result: i64,
) {
    if result < 0 {
        counts.io_errors += u64::from(count.packets);
        return;
    }
    match source {
        Source::Reply => counts.icmp_sent += 1,
        Source::Packet => {
            counts.tun_writes += 1;
            counts.tun_tx_packets += u64::from(count.packets);
            counts.tun_tx_bytes += u64::from(count.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::testing::{assert_valid, Tcp};
    use crate::wire::vnet::{GSO_TCPV4, NEEDS_CSUM};
    use std::net::Ipv4Addr;

    fn peer() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285)
    }

    /// The bytes a message of `batch` would put on the wire, datagram by datagram.
    fn datagrams(batch: &SendBatch, i: usize, iovs: &[libc::iovec]) -> Vec<Vec<u8>> {
        let info = batch.info(i).unwrap();
        let mut flat = Vec::new();
        for iov in iovs {
            // SAFETY: the iovecs point into live test buffers.
            flat.extend_from_slice(unsafe {
                std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
            });
        }
        assert_eq!(flat.len(), info.bytes as usize);
        let size = flat.len().div_ceil(info.segments as usize);
        let size = if info.segments > 1 {
            // Every datagram but the last has the first one's length.
            u16::from_be_bytes([flat[2], flat[3]]) as usize
        } else {
            size
        };
        flat.chunks(size).map(<[u8]>::to_vec).collect()
    }

    fn message_iovs(batch: &mut SendBatch, i: usize) -> Vec<libc::iovec> {
        let msg = batch.prepare(i).unwrap();
        // SAFETY: `prepare` pointed the header at the batch's own live iovecs.
        unsafe { std::slice::from_raw_parts((*msg).msg_iov, (*msg).msg_iovlen).to_vec() }
    }

    #[test]
    fn segments_leave_in_gso_runs_or_one_by_one() {
        let (header, packet) = Tcp::new(7, 64_000).super_packet(1420);
        let segmenter = Segmenter::new(&header, &packet).unwrap();
        let mut expected = vec![0u8; 70_000];
        let total = segmenter.segment_into(&packet, &mut expected).unwrap();
        let expected: Vec<Vec<u8>> = expected[..total].chunks(1472).map(<[u8]>::to_vec).collect();
        assert_eq!(expected.len(), 46);

        // With GSO: 44 datagrams fit the 65 493-byte limit, the rest go in a second run.
        let mut batch = SendBatch::new(80, 256, 128 * 120);
        let mut next = 0;
        assert!(queue_segments(
            &mut batch,
            peer(),
            &packet,
            &segmenter,
            &mut next,
            true
        ));
        assert_eq!(next, 46);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.info(0).unwrap().segments, 44);
        assert_eq!(batch.info(1).unwrap().segments, 2);
        let mut got = Vec::new();
        for i in 0..batch.len() {
            let iovs = message_iovs(&mut batch, i);
            got.extend(datagrams(&batch, i, &iovs));
        }
        assert_eq!(got, expected);
        for datagram in &got {
            assert_valid(datagram);
        }

        // Without: one message per datagram; a small batch fills and is resumed.
        let mut batch = SendBatch::new(20, 256, 128 * 120);
        let mut next = 0;
        let mut got = Vec::new();
        let mut rounds = 0;
        loop {
            let done = queue_segments(&mut batch, peer(), &packet, &segmenter, &mut next, false);
            for i in 0..batch.len() {
                assert_eq!(batch.info(i).unwrap().segments, 1);
                let iovs = message_iovs(&mut batch, i);
                got.extend(datagrams(&batch, i, &iovs));
            }
            batch.clear();
            rounds += 1;
            if done {
                break;
            }
        }
        assert_eq!(rounds, 3);
        assert_eq!(got, expected);
    }

    /// Gather a write's pieces.
    fn gather(pieces: &[libc::iovec]) -> Vec<u8> {
        let mut out = Vec::new();
        for iov in pieces {
            // SAFETY: the pieces point into live test buffers.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
            });
        }
        out
    }

    #[test]
    fn accepted_segments_are_written_as_super_packets() {
        let spec = Tcp::new(0, 1420 * 5);
        let (header, original) = spec.super_packet(1420);
        let segmenter = Segmenter::new(&header, &original).unwrap();
        let mut flat = vec![0u8; 10_000];
        let total = segmenter.segment_into(&original, &mut flat).unwrap();
        let mut icmp =
            crate::wire::ipv4::testing::Spec::icmp("10.1.1.2", "10.1.2.2", 8, 84).bytes();
        flat.truncate(total);
        let base = flat.as_mut_ptr();
        let mut packets: Vec<(*mut u8, usize)> = (0..5)
            // SAFETY: five 1472-byte segments lie one after another in `flat`.
            .map(|i| (unsafe { base.add(i * 1472) }, 1472))
            .collect();
        packets.insert(2, (icmp.as_mut_ptr(), icmp.len()));
        let mut coalescer = Coalescer::new();
        let mut counts = BatchCounts::default();
        let all = ActiveOffloads {
            vnet_hdr: true,
            coalesce: true,
            coalesce_udp: true,
            udp_gso: true,
            udp_gro: true,
            ..ActiveOffloads::default()
        };
        let mut writes = Vec::new();
        // SAFETY: the packets are live and used by nothing else.
        unsafe {
            for_each_tun_write(
                &mut coalescer,
                &packets,
                &all,
                &mut counts,
                |vnet, pieces, count| {
                    writes.push((vnet, gather(pieces), count));
                    Written::Queued
                },
            );
        }
        assert_eq!(
            writes.len(),
            2,
            "the ICMP packet is written beside the super-packet"
        );
        let (vnet, bytes, count) = &writes[0];
        let vnet = VnetHeader::parse(&vnet.unwrap()).unwrap();
        assert_eq!(vnet.flags, NEEDS_CSUM);
        assert_eq!(vnet.gso_type, GSO_TCPV4);
        assert_eq!(vnet.gso_size, 1420);
        assert_eq!(bytes, &original);
        assert_eq!(
            *count,
            WriteCount {
                packets: 5,
                bytes: 5 * 1472
            }
        );
        assert_eq!(writes[1].0, Some(VnetHeader::PLAIN.to_bytes()));
        assert_eq!(
            writes[1].1,
            crate::wire::ipv4::testing::Spec::icmp("10.1.1.2", "10.1.2.2", 8, 84).bytes()
        );

        // Without coalescing, each packet is its own write; without the header, bare.
        for vnet_hdr in [true, false] {
            let offloads = ActiveOffloads {
                vnet_hdr,
                coalesce: false,
                coalesce_udp: false,
                ..all
            };
            let mut writes = Vec::new();
            let mut counts = BatchCounts::default();
            // SAFETY: as above.
            unsafe {
                for_each_tun_write(
                    &mut coalescer,
                    &packets,
                    &offloads,
                    &mut counts,
                    |vnet, pieces, count| {
                        writes.push((vnet, pieces.len(), count));
                        Written::Done(count.bytes as i64)
                    },
                );
            }
            assert_eq!(writes.len(), 6);
            let header = vnet_hdr.then(|| VnetHeader::PLAIN.to_bytes());
            assert!(writes
                .iter()
                .all(|(v, n, c)| *v == header && *n == 1 && c.packets == 1));
            assert_eq!(counts.tun_tx_packets, 6);
            assert_eq!(counts.tun_tx_bytes, 5 * 1472 + 84);
        }
        // Failed writes are counted per packet.
        let mut counts = BatchCounts::default();
        // SAFETY: as above.
        unsafe {
            for_each_tun_write(&mut coalescer, &packets, &all, &mut counts, |_, _, _| {
                Written::Done(-i64::from(libc::EINVAL))
            });
        }
        assert_eq!(counts.io_errors, 6);
    }

    #[test]
    fn sends_and_writes_are_counted_by_datagram() {
        let mut batch = SendBatch::new(4, 8, 0);
        let data = [0u8; 3000];
        for _ in 0..3 {
            assert!(batch.push(peer(), Source::Packet, &[(data.as_ptr(), 1000)], true));
        }
        assert!(batch.push(peer(), Source::Reply, &[(data.as_ptr(), 56)], true));
        let run = *batch.info(0).unwrap();
        let mut counts = BatchCounts::default();
        count_send(&mut counts, &run, 3000);
        count_send(&mut counts, batch.info(1).unwrap(), 56);
        count_send(&mut counts, &run, -i64::from(libc::ENOBUFS));
        assert_eq!((counts.udp_tx_packets, counts.udp_tx_bytes), (3, 3000));
        assert_eq!(counts.icmp_sent, 1);
        assert_eq!(counts.io_errors, 3);
        let count = WriteCount {
            packets: 4,
            bytes: 4000,
        };
        let mut counts = BatchCounts::default();
        count_write(&mut counts, Source::Packet, count, 4010);
        count_write(
            &mut counts,
            Source::Reply,
            WriteCount {
                packets: 1,
                bytes: 56,
            },
            66,
        );
        count_write(&mut counts, Source::Packet, count, -i64::from(libc::EINVAL));
        assert_eq!((counts.tun_tx_packets, counts.tun_tx_bytes), (4, 4000));
        assert_eq!(counts.icmp_sent, 1);
        assert_eq!(counts.io_errors, 4);
    }
}
