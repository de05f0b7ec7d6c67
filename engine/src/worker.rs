//! One data-plane worker: a thread that owns a TUN queue, a UDP socket and an I/O back end,
//! and moves packets between them until told to stop.
//!
//! Both back ends ([`crate::uring`] and [`crate::syscalls`]) share what is here: the stop
//! signal; how a packet read from the TUN is decided on (once per super-packet) and cut into
//! datagrams (`decide_tun_read`, `queue_segments`); how a received buffer is split into its
//! datagrams and each decided on (`decide_datagrams`); how the accepted packets become TUN
//! writes, coalesced (`for_each_tun_write`); which counters all of that touches (packets as
//! they are on the wire: a super-packet counts each of its segments); which errors end a
//! worker; the thread itself and its optional pinning to a core.

use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::counters::{BatchCounts, DropReason, WorkerCounters};
use crate::decide::{self, Decision, Policy, REPLY_BUF_LEN};
use crate::engine::{ActiveOffloads, IoBackend};
use crate::offload::coalesce::MAX_SEGMENTS;
use crate::offload::{complete_checksum, Coalescer, Plan, Segmenter, VnetHeader, VNET_HDR_LEN};
use crate::route::{RouteTable, Routes};
use crate::tun::TunQueue;
use crate::udp::{MessageInfo, SendBatch};

/// Size of every packet buffer: the largest IPv4 packet, and the 64 KiB super-packets that
/// TUN and UDP offloads produce.
pub const PACKET_BUF_LEN: usize = 65536;

/// How many packets a worker moves per batch in each direction.
pub const BATCH: usize = 64;

/// Why a worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Setting up the worker's I/O failed.
    #[error("cannot set up {what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// An I/O error that leaves the worker unable to go on (a closed or detached descriptor).
    #[error("{what} failed: {source}")]
    Fatal {
        /// The operation that failed.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

impl WorkerError {
    pub(crate) fn setup(what: &'static str, source: io::Error) -> Self {
        Self::Setup { what, source }
    }

    pub(crate) fn fatal(what: &'static str, errno: i32) -> Self {
        Self::Fatal {
            what,
            source: io::Error::from_raw_os_error(errno),
        }
    }
}

/// Tells a worker to stop: an eventfd its I/O loop waits on beside the TUN and the socket, so
/// the request is seen at once, plus a flag for loops that are too busy to wait.
#[derive(Debug)]
pub(crate) struct StopSignal {
    fd: OwnedFd,
    raised: AtomicBool,
}

impl StopSignal {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            fd,
            raised: AtomicBool::new(false),
        })
    }

    /// Ask the worker to stop. The eventfd stays readable from then on.
    pub(crate) fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writes the 8-byte counter increment an eventfd expects from a live u64. The
        // only possible failure is a counter overflow, which cannot matter: it is nonzero.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Whether [`StopSignal::raise`] was called.
    pub(crate) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }
}

impl AsFd for StopSignal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Bytes reserved in front of every packet buffer, for headers the kernel puts before a packet
/// (the virtio-net header of a TUN read; io_uring's `recvmsg` header, the sender's address and
/// the control data).
pub(crate) const HEADROOM: usize = 64;

/// Distance between two packet buffers.
const STRIDE: usize = HEADROOM + PACKET_BUF_LEN;

/// A worker's preallocated packet memory: `slots` packet buffers of [`PACKET_BUF_LEN`] bytes
/// (each behind [`HEADROOM`] bytes) and as many reply buffers of [`REPLY_BUF_LEN`] bytes, each
/// pair used by one packet at a time.
///
/// The memory is reached only through raw pointers derived once from the allocation, because
/// the kernel reads and writes it between calls (io_uring) and no Rust reference may claim it
/// meanwhile. Whoever hands a buffer to the kernel must not touch it until the kernel is done.
pub(crate) struct PacketBuffers {
    packets: NonNull<u8>,
    replies: NonNull<u8>,
    slots: usize,
}

impl PacketBuffers {
    /// Zeroed buffers for `slots` packets (the pages are mapped lazily on first touch).
    pub(crate) fn new(slots: usize) -> Self {
        let packets = Box::into_raw(vec![0u8; slots * STRIDE].into_boxed_slice());
        let replies = Box::into_raw(vec![0u8; slots * REPLY_BUF_LEN].into_boxed_slice());
        Self {
            // A pointer from Box::into_raw is never null.
            packets: NonNull::new(packets.cast::<u8>()).unwrap_or(NonNull::dangling()),
            replies: NonNull::new(replies.cast::<u8>()).unwrap_or(NonNull::dangling()),
            slots,
        }
    }

    /// The start of packet buffer `slot` (which must be below the slot count).
    pub(crate) fn packet_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots, "packet slot {slot} out of range");
        // SAFETY: slot < slots, so the offset stays inside the allocation.
        unsafe { self.packets.as_ptr().add(slot * STRIDE + HEADROOM) }
    }

    /// The slot whose packet buffer `ptr` points into, if any.
    pub(crate) fn slot_of(&self, ptr: *const u8) -> Option<usize> {
        let offset = (ptr as usize).checked_sub(self.packets.as_ptr() as usize)?;
        let slot = offset / STRIDE;
        (slot < self.slots && offset % STRIDE >= HEADROOM).then_some(slot)
    }

    /// `bytes` (at most [`HEADROOM`]) before the start of packet buffer `slot`.
    pub(crate) fn headroom_ptr(&self, slot: usize, bytes: usize) -> *mut u8 {
        assert!(bytes <= HEADROOM, "headroom of {bytes} bytes is too large");
        // SAFETY: the packet buffer starts HEADROOM bytes into its stride, so stepping back at
        // most HEADROOM bytes stays inside the allocation.
        unsafe { self.packet_ptr(slot).sub(bytes) }
    }

    /// The start of reply buffer `slot` (which must be below the slot count).
    pub(crate) fn reply_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots, "reply slot {slot} out of range");
        // SAFETY: slot < slots, so the offset stays inside the allocation.
        unsafe { self.replies.as_ptr().add(slot * REPLY_BUF_LEN) }
    }

    /// The first `len` bytes of packet buffer `slot` and the whole reply buffer `slot`.
    ///
    /// # Safety
    /// No I/O may be in flight on either buffer, and the caller must not hold another slice
    /// of the same slot while these live.
    pub(crate) unsafe fn slot(&mut self, slot: usize, len: usize) -> (&mut [u8], &mut [u8]) {
        let len = len.min(PACKET_BUF_LEN);
        let packet = self.packet_ptr(slot);
        let reply = self.reply_ptr(slot);
        // SAFETY: both ranges lie inside their allocations and do not overlap each other; the
        // caller guarantees nothing else reads or writes them meanwhile.
        unsafe {
            (
                std::slice::from_raw_parts_mut(packet, len),
                std::slice::from_raw_parts_mut(reply, REPLY_BUF_LEN),
            )
        }
    }

    /// `len` bytes of slot `slot`'s headroom and packet buffer, starting `before` bytes in
    /// front of the packet, for reading what the kernel wrote there.
    ///
    /// # Safety
    /// As for [`PacketBuffers::slot`].
    pub(crate) unsafe fn with_headroom(&self, slot: usize, before: usize, len: usize) -> &[u8] {
        let start = self.headroom_ptr(slot, before);
        let len = len.min(before + PACKET_BUF_LEN);
        // SAFETY: the range starts inside the slot's stride and ends at most at the end of its
        // packet buffer; the caller guarantees the kernel no longer writes it.
        unsafe { std::slice::from_raw_parts(start, len) }
    }

    /// What a TUN read of `total` bytes left in `slot`: the virtio-net header read from the
    /// `vnet_len` bytes of headroom (a plain one without them, or when it cannot be read),
    /// the packet after it, and the slot's reply buffer.
    ///
    /// # Safety
    /// As for [`PacketBuffers::slot`]: the read has completed, and nothing else reads or
    /// writes the slot while the slices live.
    pub(crate) unsafe fn tun_read(
        &mut self,
        slot: usize,
        vnet_len: usize,
        total: usize,
    ) -> (VnetHeader, &mut [u8], &mut [u8]) {
        let header = if vnet_len > 0 {
            // SAFETY: the caller guarantees the kernel no longer writes the slot.
            let head = unsafe { self.with_headroom(slot, vnet_len, total) };
            VnetHeader::parse(head).unwrap_or(VnetHeader::PLAIN)
        } else {
            VnetHeader::PLAIN
        };
        let len = total.saturating_sub(vnet_len).min(PACKET_BUF_LEN);
        // SAFETY: as above, and the header slice is no longer used.
        let (packet, reply) = unsafe { self.slot(slot, len) };
        (header, packet, reply)
    }
}

impl Drop for PacketBuffers {
    fn drop(&mut self) {
        let packets =
            std::ptr::slice_from_raw_parts_mut(self.packets.as_ptr(), self.slots * STRIDE);
        let replies =
            std::ptr::slice_from_raw_parts_mut(self.replies.as_ptr(), self.slots * REPLY_BUF_LEN);
        // SAFETY: both came from Box::into_raw with exactly these lengths and are freed once.
        // Owners that may still have I/O in flight leak the buffers instead of dropping them.
        unsafe {
            drop(Box::from_raw(packets));
            drop(Box::from_raw(replies));
        }
    }
}

/// Everything a worker's loop reads but does not own.
pub(crate) struct WorkerContext {
    pub(crate) routes: Routes,
    pub(crate) policy: Policy,
    pub(crate) counters: Arc<WorkerCounters>,
    pub(crate) stop: Arc<StopSignal>,
}

/// Which buffer an outgoing packet is in: the packet's own (forwarded as is, zero copy) or the
/// reply buffer the decision wrote an ICMP error into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Packet,
    Reply,
}

/// The most datagrams one GRO buffer is split into; the kernel merges at most 64
/// (`UDP_GRO_CNT_MAX`) and sends at most 128 per GSO call, so more is an attack, dropped as
/// `too_big`.
pub(crate) const MAX_RX_DATAGRAMS: usize = 128;

/// What a packet read from the TUN turned into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TunAction {
    /// Send it to `to`: whole (`len` bytes), or as the segments `segments` cuts it into.
    Send {
        to: SocketAddrV4,
        len: usize,
        segments: Option<Segmenter>,
    },
    /// Write the `len`-byte ICMP error in the reply buffer to the TUN.
    WriteReply { len: usize },
    /// Nothing to send: the buffer goes back to reading.
    Recycle,
}

/// Decide on a packet read from the TUN behind `header`, once for a whole super-packet, and
/// count it: as many packets as it becomes on the wire, and their bytes. Completes a partial
/// checksum of a packet that is sent whole.
pub(crate) fn decide_tun_read(
    header: &VnetHeader,
    packet: &mut [u8],
    table: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
    counts: &mut BatchCounts,
) -> TunAction {
    let len = packet.len();
    let offload = Plan::new(header, packet);
    let (packets, bytes) = match &offload {
        Ok(Plan::Segment(segmenter)) => {
            let n = segmenter.segments();
            (n, len + (n - 1) * segmenter.header_len())
        }
        _ => (1, len),
    };
    counts.tun_reads += 1;
    counts.tun_rx_packets += packets as u64;
    counts.tun_rx_bytes += bytes as u64;
    let drop = |counts: &mut BatchCounts, reason: DropReason| {
        counts.drops[reason as usize] += packets as u64;
    };
    let offload = match offload {
        Ok(offload) => offload,
        Err(error) => {
            drop(counts, error.drop_reason());
            return TunAction::Recycle;
        }
    };
    let decision = match &offload {
        Plan::Segment(segmenter) => {
            decide::from_tun_super_packet(packet, segmenter.largest_segment(), table, policy, reply)
        }
        Plan::Whole | Plan::Checksum { .. } => decide::from_tun(packet, table, policy, reply),
    };
    match decision {
        Decision::SendToPeer(to) => match offload {
            Plan::Whole => TunAction::Send {
                to,
                len,
                segments: None,
            },
            Plan::Checksum { start, field } => match complete_checksum(packet, start, field) {
                Ok(()) => TunAction::Send {
                    to,
                    len,
                    segments: None,
                },
                Err(error) => {
                    drop(counts, error.drop_reason());
                    TunAction::Recycle
                }
            },
            Plan::Segment(segmenter) => TunAction::Send {
                to,
                len,
                segments: Some(segmenter),
            },
        },
        Decision::ReplyToTun { len, reason } => {
            drop(counts, reason);
            if len > 0 && len <= REPLY_BUF_LEN {
                TunAction::WriteReply { len }
            } else {
                TunAction::Recycle
            }
        }
        // From the TUN there is no peer to answer; never decided, but counted if it were.
        Decision::ReplyToPeer { reason, .. } | Decision::Drop(reason) => {
            drop(counts, reason);
            TunAction::Recycle
        }
        Decision::WriteToTun => TunAction::Recycle,
    }
}

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

/// Split a received buffer into the datagrams it holds — one, or with GRO (`segment`) a run
/// of `segment`-byte datagrams, the last possibly shorter — decide on each, count them, and
/// call `accept(offset, len)` for each one to write to the TUN. Returns the ICMP error to send
/// back, if any: the first one, as the slot has one reply buffer (later ones count as drops).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decide_datagrams(
    from: Option<SocketAddrV4>,
    buf: &mut [u8],
    segment: Option<usize>,
    truncated: bool,
    table: &RouteTable,
    policy: &Policy,
    reply: &mut [u8],
    counts: &mut BatchCounts,
    mut accept: impl FnMut(usize, usize),
) -> Option<(SocketAddrV4, usize)> {
    let len = buf.len();
    let step = segment.unwrap_or(len).max(1);
    let datagrams = len.div_ceil(step).max(1);
    counts.udp_receives += 1;
    counts.udp_rx_packets += datagrams as u64;
    counts.udp_rx_bytes += len as u64;
    let too_big = DropReason::TooBig as usize;
    if truncated {
        counts.drops[too_big] += datagrams as u64;
        return None;
    }
    if datagrams > MAX_RX_DATAGRAMS {
        counts.drops[too_big] += (datagrams - MAX_RX_DATAGRAMS) as u64;
    }
    let mut answer = None;
    let mut reply = Some(reply);
    for index in 0..datagrams.min(MAX_RX_DATAGRAMS) {
        let start = index * step;
        let end = (start + step).min(len);
        let Some(datagram) = buf.get_mut(start..end) else {
            counts.drop(DropReason::BadPacket);
            continue;
        };
        let Some(from) = from else {
            counts.drop(UNREADABLE_SENDER);
            continue;
        };
        let out: &mut [u8] = match reply.as_deref_mut() {
            Some(out) => out,
            None => &mut [],
        };
        match decide::from_peer(from, datagram, table, policy, out) {
            Decision::WriteToTun => accept(start, end - start),
            Decision::ReplyToPeer { to, len, reason } => {
                counts.drop(reason);
                if len > 0 && len <= REPLY_BUF_LEN && reply.is_some() {
                    reply = None;
                    answer = Some((to, len));
                }
            }
            Decision::ReplyToTun { reason, .. } | Decision::Drop(reason) => counts.drop(reason),
            Decision::SendToPeer(_) => {}
        }
    }
    answer
}

/// What one TUN write carries: packets (a super-packet counts each of its segments) and their
/// bytes as they arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WriteCount {
    pub(crate) packets: u32,
    pub(crate) bytes: u32,
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
/// buffers, in arrival order) into writes — with coalescing, runs of segments merged into
/// super-packets — and hand each to `write`: its virtio-net header (when the TUN takes one),
/// its pieces, and what it carries. What `write` reports is counted here, except queued writes.
///
/// # Safety
/// Every packet must be live memory that nothing else reads or writes until the writes are
/// done; a super-packet's first packet is edited in place.
pub(crate) unsafe fn for_each_tun_write(
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
    let plain = offloads.vnet_hdr.then(|| VnetHeader::PLAIN.to_bytes());
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
    coalescer.clear();
    coalescer.set_udp(offloads.coalesce_udp);
    for &(base, len) in packets {
        // SAFETY: the caller guarantees the packet is live and unshared.
        coalescer.push(unsafe { std::slice::from_raw_parts(base, len) });
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

/// The drop reason for a datagram whose sender address is not IPv4 (which an IPv4 socket
/// never reports, but the kernel's answer is not trusted).
pub(crate) const UNREADABLE_SENDER: DropReason = DropReason::UnknownPeer;

/// Whether a failed read or receive means the descriptor is unusable, so the worker must stop.
/// Everything else (no data yet, an interrupted call, a transient shortage, an error queued on
/// the socket by an ICMP message) is retried.
pub(crate) fn read_error_is_fatal(errno: i32) -> bool {
    matches!(
        errno,
        libc::EBADF
            | libc::EBADFD
            | libc::EFAULT
            | libc::EINVAL
            | libc::ENODEV
            | libc::ENXIO
            | libc::ENOTSOCK
            | libc::EOPNOTSUPP
    )
}

/// Whether a failed send or TUN write means the descriptor is unusable. Anything else is one
/// packet the kernel refused: counted in `io_errors`, and the worker goes on.
pub(crate) fn write_error_is_fatal(errno: i32) -> bool {
    matches!(
        errno,
        libc::EBADF | libc::EBADFD | libc::EFAULT | libc::ENOTSOCK
    )
}

/// How many read failures in a row (without one success) a worker tolerates before it
/// concludes the descriptor is broken rather than busy-looping on it.
pub(crate) const MAX_READ_FAILURES_IN_A_ROW: u32 = 100_000;

/// A running worker thread, as the engine holds it.
pub(crate) struct WorkerThread {
    pub(crate) thread: Option<JoinHandle<Result<(), WorkerError>>>,
    pub(crate) stop: Arc<StopSignal>,
    pub(crate) counters: Arc<WorkerCounters>,
}

/// What a worker thread starts from.
pub(crate) struct WorkerSetup {
    pub(crate) index: usize,
    pub(crate) backend: IoBackend,
    pub(crate) pin_core: bool,
    pub(crate) tun: TunQueue,
    pub(crate) socket: UdpSocket,
    pub(crate) offloads: ActiveOffloads,
    pub(crate) context: WorkerContext,
}

/// Start a worker thread named `weft-worker-N` and wait until its I/O is set up. On failure the
/// thread has ended and its error is returned.
pub(crate) fn spawn(setup: WorkerSetup) -> Result<WorkerThread, SpawnError> {
    let stop = Arc::clone(&setup.context.stop);
    let counters = Arc::clone(&setup.context.counters);
    let index = setup.index;
    let (ready_tx, ready_rx) = mpsc::sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name(format!("weft-worker-{index}"))
        .spawn(move || run(setup, ready_tx))
        .map_err(SpawnError::Spawn)?;
    match ready_rx.recv() {
        Ok(()) => Ok(WorkerThread {
            thread: Some(thread),
            stop,
            counters,
        }),
        // The thread dropped the sender without a word: it failed during setup.
        Err(mpsc::RecvError) => match thread.join() {
            Ok(Err(error)) => Err(SpawnError::Setup(error)),
            Ok(Ok(())) | Err(_) => Err(SpawnError::Lost),
        },
    }
}

/// Why [`spawn`] failed.
#[derive(Debug)]
pub(crate) enum SpawnError {
    Spawn(io::Error),
    Setup(WorkerError),
    Lost,
}

fn run(setup: WorkerSetup, ready: mpsc::SyncSender<()>) -> Result<(), WorkerError> {
    let WorkerSetup {
        index,
        backend,
        pin_core,
        tun,
        socket,
        offloads,
        context,
    } = setup;
    if pin_core {
        match pin_current_thread(index) {
            Ok(cpu) => tracing::debug!(worker = index, cpu, "worker pinned"),
            Err(error) => tracing::warn!(worker = index, %error, "cannot pin worker to a core"),
        }
    }
    let stop = Arc::clone(&context.stop);
    let result = match backend {
        IoBackend::Uring => {
            crate::uring::UringWorker::new(tun, socket, stop, offloads).and_then(|mut worker| {
                let _ = ready.send(());
                worker.run(&context)
            })
        }
        IoBackend::Syscalls => crate::syscalls::SyscallWorker::new(tun, socket, stop, offloads)
            .and_then(|mut worker| {
                let _ = ready.send(());
                worker.run(&context)
            }),
    };
    match &result {
        Ok(()) => tracing::debug!(worker = index, %backend, "worker stopped"),
        Err(error) => tracing::error!(worker = index, %backend, %error, "worker failed"),
    }
    result
}

/// Pin the calling thread to the `index`-th CPU it may run on (wrapping around), and return
/// that CPU's number.
fn pin_current_thread(index: usize) -> io::Result<usize> {
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size and pointer describe `allowed`.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET only reads bit `cpu` of `allowed`, and cpu < CPU_SETSIZE.
        .filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &allowed) })
        .collect();
    let Some(cpu) = cpus.get(index % cpus.len().max(1)).copied() else {
        return Err(io::Error::other("no CPU in the affinity mask"));
    };
    // SAFETY: as above, all zeroes is the empty set.
    let mut only: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes bit `cpu` of `only`, and cpu < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut only) };
    // SAFETY: pid 0 is the calling thread; the size and pointer describe `only`.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &only) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::testing::{assert_valid, Tcp};
    use crate::offload::vnet::{GSO_TCPV4, NEEDS_CSUM};
    use crate::route::Overlay;
    use std::net::Ipv4Addr;

    fn peer() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285)
    }

    const POLICY: Policy = Policy {
        tun_mtu: 1472,
        allow_foreign_sources: false,
    };

    /// The host of 10.1.1.0/24; 198.18.0.2 holds 10.1.2.0/24 (the test packets' flow runs from
    /// 10.1.1.2 to 10.1.2.2).
    fn table(local: &str) -> RouteTable {
        let overlay = Overlay::new("10.1.0.0/16".parse().unwrap(), 24).unwrap();
        let (local, other, public) = if local == "10.1.1.0/24" {
            ("10.1.1.0/24", "10.1.2.0/24", "198.18.0.2")
        } else {
            ("10.1.2.0/24", "10.1.1.0/24", "198.18.0.1")
        };
        RouteTable::build(
            overlay,
            8285,
            Some(local.parse().unwrap()),
            [(other.parse().unwrap(), public.parse().unwrap())],
        )
        .unwrap()
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
    fn super_packets_are_decided_once_and_counted_per_segment() {
        let spec = Tcp::new(1, 20_000);
        let (header, mut packet) = spec.super_packet(1420);
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut counts = BatchCounts::default();
        let routes = table("10.1.1.0/24");
        let action = decide_tun_read(
            &header,
            &mut packet,
            &routes,
            &POLICY,
            &mut reply,
            &mut counts,
        );
        let TunAction::Send {
            to,
            len,
            segments: Some(segmenter),
        } = action
        else {
            panic!("{action:?}");
        };
        assert_eq!((to, len), (peer(), packet.len()));
        assert_eq!(segmenter.segments(), 15);
        assert_eq!(packet[8], 63, "the TTL dropped once, in the shared header");
        assert_eq!(counts.tun_rx_packets, 15);
        assert_eq!(counts.tun_rx_bytes, 20_000 + 15 * 52);
        assert_eq!(counts.drops, [0; DropReason::COUNT]);

        // Unroutable: one ICMP error, every segment counted as dropped.
        let mut other = spec.clone();
        other.dst = [10, 1, 9, 9];
        let (header, mut packet) = other.super_packet(1420);
        let mut counts = BatchCounts::default();
        let action = decide_tun_read(
            &header,
            &mut packet,
            &routes,
            &POLICY,
            &mut reply,
            &mut counts,
        );
        assert!(matches!(action, TunAction::WriteReply { .. }), "{action:?}");
        assert_eq!(counts.drops[DropReason::NoRoute as usize], 15);

        // Not IPv4.
        let (header, mut packet) = spec.super_packet(1420);
        packet[0] = 0x60;
        let mut counts = BatchCounts::default();
        let action = decide_tun_read(
            &header,
            &mut packet,
            &routes,
            &POLICY,
            &mut reply,
            &mut counts,
        );
        assert_eq!(action, TunAction::Recycle);
        assert_eq!(counts.drops[DropReason::NotIpv4 as usize], 1);
    }

    #[test]
    fn partial_checksums_are_completed_before_a_whole_packet_leaves() {
        let spec = Tcp::new(1, 1000);
        let (mut header, mut packet) = spec.super_packet(1420);
        header.gso_type = 0;
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut counts = BatchCounts::default();
        let routes = table("10.1.1.0/24");
        let action = decide_tun_read(
            &header,
            &mut packet,
            &routes,
            &POLICY,
            &mut reply,
            &mut counts,
        );
        assert!(matches!(action, TunAction::Send { segments: None, .. }));
        assert_valid(&packet);
        let mut expected = spec.bytes();
        expected[8] -= 1;
        expected[10..12].copy_from_slice(&packet[10..12]);
        assert_eq!(packet, expected);
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

    #[test]
    fn gro_buffers_are_split_and_every_datagram_decided() {
        let routes = table("10.1.2.0/24");
        let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 8285);
        let a = Tcp::new(0, 1420).bytes();
        let b = Tcp::new(1420, 1420).bytes();
        let mut expiring = Tcp::new(2840, 1420);
        expiring.ttl = 1;
        let c = expiring.bytes();
        let d = Tcp::new(4260, 100).bytes();
        let mut buf = [a.clone(), b.clone(), c, d.clone()].concat();
        let mut reply = [0u8; REPLY_BUF_LEN];
        let mut counts = BatchCounts::default();
        let mut accepted = Vec::new();
        let answer = decide_datagrams(
            Some(from),
            &mut buf,
            Some(1472),
            false,
            &routes,
            &POLICY,
            &mut reply,
            &mut counts,
            |offset, len| accepted.push((offset, len)),
        );
        assert_eq!(accepted, vec![(0, 1472), (1472, 1472), (3 * 1472, 152)]);
        assert!(matches!(answer, Some((to, _)) if to == from));
        assert_eq!(counts.udp_rx_packets, 4);
        assert_eq!(counts.udp_rx_bytes, buf.len() as u64);
        assert_eq!(counts.drops[DropReason::TtlExpired as usize], 1);
        assert_eq!(buf[8], 63, "TTLs drop in place");
        assert_eq!(buf[3 * 1472 + 8], 63);

        // A truncated buffer, an unreadable sender, a stranger.
        for (from, truncated, reason) in [
            (Some(from), true, DropReason::TooBig),
            (None, false, UNREADABLE_SENDER),
            (
                Some(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 9), 8285)),
                false,
                DropReason::UnknownPeer,
            ),
        ] {
            let mut buf = [a.clone(), b.clone()].concat();
            let mut counts = BatchCounts::default();
            let answer = decide_datagrams(
                from,
                &mut buf,
                Some(1472),
                truncated,
                &routes,
                &POLICY,
                &mut reply,
                &mut counts,
                |_, _| panic!("nothing is accepted"),
            );
            assert_eq!(answer, None);
            assert_eq!(counts.drops[reason as usize], 2, "{reason:?}");
        }

        // More datagrams than a buffer may hold: the excess is dropped as too big.
        let small = Tcp::new(0, 1).bytes();
        let mut buf = small.repeat(MAX_RX_DATAGRAMS + 3);
        let mut counts = BatchCounts::default();
        let mut seen = 0;
        decide_datagrams(
            Some(from),
            &mut buf,
            Some(small.len()),
            false,
            &routes,
            &POLICY,
            &mut reply,
            &mut counts,
            |_, _| seen += 1,
        );
        assert_eq!(seen, MAX_RX_DATAGRAMS);
        assert_eq!(counts.drops[DropReason::TooBig as usize], 3);
        // An empty datagram is one bad packet.
        let mut counts = BatchCounts::default();
        decide_datagrams(
            Some(from),
            &mut [],
            None,
            false,
            &routes,
            &POLICY,
            &mut reply,
            &mut counts,
            |_, _| {},
        );
        assert_eq!(counts.drops[DropReason::BadPacket as usize], 1);
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
        let mut icmp = crate::packet::testing::Spec::icmp("10.1.1.2", "10.1.2.2", 8, 84).bytes();
        flat.truncate(total);
        let base = flat.as_mut_ptr();
        let mut packets: Vec<(*mut u8, usize)> = (0..5)
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
            crate::packet::testing::Spec::icmp("10.1.1.2", "10.1.2.2", 8, 84).bytes()
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

    #[test]
    fn only_broken_descriptors_are_fatal() {
        for errno in [libc::EAGAIN, libc::EINTR, libc::ENOBUFS, libc::ECONNREFUSED] {
            assert!(!read_error_is_fatal(errno));
        }
        for errno in [libc::EBADF, libc::EBADFD, libc::EFAULT] {
            assert!(read_error_is_fatal(errno));
            assert!(write_error_is_fatal(errno));
        }
        for errno in [
            libc::ENOBUFS,
            libc::EAGAIN,
            libc::EMSGSIZE,
            libc::EIO,
            libc::EINVAL,
            libc::ENETUNREACH,
            libc::EPERM,
        ] {
            assert!(!write_error_is_fatal(errno), "{errno}");
        }
    }

    #[test]
    fn packet_buffers_do_not_overlap() {
        let mut buffers = PacketBuffers::new(3);
        for slot in 0..3 {
            // SAFETY: no I/O uses these buffers.
            let (packet, reply) = unsafe { buffers.slot(slot, PACKET_BUF_LEN) };
            packet.fill(slot as u8 + 1);
            reply.fill(slot as u8 + 10);
        }
        for slot in 0..3 {
            // SAFETY: as above.
            let (packet, reply) = unsafe { buffers.slot(slot, PACKET_BUF_LEN) };
            assert!(packet.iter().all(|b| *b == slot as u8 + 1));
            assert!(reply.iter().all(|b| *b == slot as u8 + 10));
            assert_eq!(reply.len(), REPLY_BUF_LEN);
        }
        // The headroom sits right before the packet, between the slots.
        let head = buffers.headroom_ptr(1, HEADROOM);
        assert_eq!(head as usize + HEADROOM, buffers.packet_ptr(1) as usize);
        assert_eq!(
            buffers.packet_ptr(0) as usize + PACKET_BUF_LEN + HEADROOM,
            buffers.packet_ptr(1) as usize
        );
        // SAFETY: as above.
        let seen = unsafe { buffers.with_headroom(2, 4, 6) };
        assert_eq!(seen, &[0, 0, 0, 0, 3, 3]);
    }

    #[test]
    fn pinning_leaves_one_allowed_cpu() {
        let (cpu, count, is_set) = std::thread::spawn(|| {
            let cpu = pin_current_thread(1).unwrap();
            // SAFETY: all zeroes is the empty set.
            let mut now: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: pid 0 is this thread; the size and pointer describe `now`.
            let rc = unsafe {
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut now)
            };
            assert_eq!(rc, 0);
            // SAFETY: CPU_COUNT and CPU_ISSET only read the live set; cpu < CPU_SETSIZE.
            unsafe { (cpu, libc::CPU_COUNT(&now), libc::CPU_ISSET(cpu, &now)) }
        })
        .join()
        .unwrap();
        assert_eq!(count, 1);
        assert!(is_set, "pinned to CPU {cpu}");
    }

    #[test]
    fn stop_signal_is_visible_on_the_descriptor() {
        let stop = StopSignal::new().unwrap();
        assert!(!stop.is_raised());
        stop.raise();
        assert!(stop.is_raised());
        let mut fds = [libc::pollfd {
            fd: stop.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one live pollfd, no wait.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        assert_eq!(ready, 1);
        assert_ne!(fds[0].revents & libc::POLLIN, 0);
    }
}
