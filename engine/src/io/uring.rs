//! The io_uring back end of a worker.
//!
//! Every packet slot owns a 64 KiB buffer (behind some headroom), a reply buffer, and the
//! message memory its output needs at fixed addresses: a [`SendBatch`] (segment headers,
//! `iovec`s, `msghdr`s, addresses, `UDP_SEGMENT` control data) and a [`WriteList`] (virtio-net
//! headers and `iovec`s for TUN writes). [`TUN_SLOTS`] slots are lent to the kernel for TUN
//! reads and [`UDP_SLOTS`] for datagrams, through two provided-buffer rings, and one multishot
//! read on the TUN and one multishot `recvmsg` on the socket stay armed: each arriving packet
//! completes into a free slot. The packet is decided on where it lies and leaves from the same
//! buffer: a super-packet's segments as their headers (written into the slot's batch) and their
//! payload (left in place), sent as GSO runs; datagrams of a GRO buffer as TUN writes, runs of
//! one flow merged into super-packets by pointing at their payloads. When every operation of a
//! slot has completed, the slot goes back to its ring — or, for a super-packet with more
//! segments than the batch holds, the batch is refilled with the next ones. ICMP errors leave
//! from the slot's reply buffer. Completions are reaped in batches and every operation they
//! cause is submitted with the next wait, one `io_uring_enter` per loop. A poll on the stop
//! eventfd stays in the ring, so a stop request ends the wait at once.
//!
//! One armed multishot request per descriptor, rather than one read per slot, matters: every
//! packet wakes every read waiting on a descriptor, so 64 single-shot reads cost 63 failed
//! retries per packet (measured: +0.1 ms on the ping RTT through two hosts).
//!
//! Before the buffers are freed, every operation still in flight is cancelled and its
//! completion awaited; if the kernel does not answer in time, the buffers are leaked rather
//! than freed under it.

use std::alloc::Layout;
use std::io;
use std::mem::ManuallyDrop;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use crate::batch::{decide_tun_read, Source, TunAction, MAX_RX_DATAGRAMS};
use crate::config::ActiveOffloads;
use crate::counters::{BatchCounts, DropReason};
use crate::decide::Policy;
use crate::icmp_limit::IcmpGate;
use crate::io::buffers::{PacketBuffers, HEADROOM, PACKET_BUF_LEN};
use crate::io::context::WorkerContext;
use crate::io::error::{write_error_is_fatal, ReadFailures, WorkerError};
use crate::io::execute::{
    count_write, handle_send_result, queue_segments, reply_write, Accepted, DirectWrites,
    SendOutcome, Written,
};
use crate::io::stop::StopSignal;
use crate::io::tun::{TunQueue, WriteList};
use crate::io::udp::{from_sockaddr, gro_segment_size, SendBatch, CONTROL_LEN, SOCKADDR_IN_LEN};
use crate::offload::segment::MAX_HEADER_LEN;
use crate::offload::Segmenter;
use crate::poll_window::PollWindow;

/// `IORING_ENTER_GETEVENTS` from linux/io_uring.h (the io-uring crate keeps its own private).
const IORING_ENTER_GETEVENTS: u32 = 1;
use crate::route::RouteTable;

/// Slots that read from the TUN and send to peers (a power of two: a buffer ring's size).
pub const TUN_SLOTS: usize = 64;
/// Slots that receive from peers and write to the TUN (a power of two).
pub const UDP_SLOTS: usize = 64;

const SLOTS: usize = TUN_SLOTS + UDP_SLOTS;

/// A TUN slot's send batch: 128 segments of a super-packet at a time (three GSO runs of
/// MSS-sized datagrams), or 80 plain datagrams without GSO. A super-packet with more segments
/// (a tiny MSS) is sent in turns.
const TUN_SLOT_MESSAGES: usize = 80;
const TUN_SLOT_PIECES: usize = 256;
const TUN_SLOT_HEADERS: usize = 128;

/// Submission queue entries; operations beyond them are submitted early.
const RING_ENTRIES: u32 = 1024;
/// Completion queue entries: more than can ever be in flight (every slot's sends and writes),
/// so the queue never overflows.
const COMPLETION_ENTRIES: u32 = 16384;

/// Registered-file indexes: the kernel skips the descriptor-table lookup for each operation.
const TUN_FILE: types::Fixed = types::Fixed(0);
const SOCKET_FILE: types::Fixed = types::Fixed(1);
const STOP_FILE: types::Fixed = types::Fixed(2);

/// Provided-buffer group ids.
const TUN_GROUP: u16 = 0;
const UDP_GROUP: u16 = 1;

/// What a multishot `recvmsg` writes before each datagram: `struct io_uring_recvmsg_out`
/// (16 bytes), the sender's address in a field of the `msg_namelen` the request asked for,
/// and the control data in a field of its `msg_controllen`.
const RECVMSG_OUT_LEN: usize = 16;
const NAME_LEN: usize = SOCKADDR_IN_LEN as usize;

// What the kernel writes before a packet fits in the headroom every buffer has.
const _: () = assert!(RECVMSG_OUT_LEN + NAME_LEN + CONTROL_LEN <= HEADROOM);
const _: () = assert!(crate::wire::vnet::VNET_HDR_LEN <= HEADROOM);

/// How long shutdown waits for cancelled operations to complete.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What an operation in the ring is, recorded in its `user_data` beside its slot and the index
/// of its message or write within the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    TunRead = 1,
    UdpRecv = 2,
    Send = 3,
    Write = 4,
    Stop = 5,
    Cancel = 6,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::TunRead,
        Op::UdpRecv,
        Op::Send,
        Op::Write,
        Op::Stop,
        Op::Cancel,
    ];

    fn encode(self, slot: usize, index: usize) -> u64 {
        (u64::from(self as u8) << 56)
            | ((index as u64 & 0xff_ffff) << 32)
            | (slot as u64 & 0xffff_ffff)
    }

    fn decode(user_data: u64) -> Option<(Op, usize, usize)> {
        let code = (user_data >> 56) as u8;
        let op = Op::ALL.into_iter().find(|op| *op as u8 == code)?;
        let index = ((user_data >> 32) & 0xff_ffff) as usize;
        Some((op, (user_data & 0xffff_ffff) as usize, index))
    }

    fn what(self) -> &'static str {
        match self {
            Op::TunRead => "TUN read",
            Op::UdpRecv => "UDP receive",
            Op::Send => "UDP send",
            Op::Write => "TUN write",
            Op::Stop => "stop poll",
            Op::Cancel => "cancel",
        }
    }
}

/// The output memory of one slot and the operations using it.
struct SlotIo {
    sends: SendBatch,
    writes: WriteList,
    /// Operations in flight on the slot; it goes back to its ring at zero.
    pending: u32,
    /// A super-packet whose segments are not all sent yet.
    cursor: Option<Cursor>,
}

/// Where the sending of a super-packet stands.
struct Cursor {
    to: SocketAddrV4,
    segmenter: Segmenter,
    /// The super-packet's length.
    len: usize,
    /// The next segment to queue.
    next: usize,
}

impl SlotIo {
    fn for_tun() -> Self {
        Self {
            sends: SendBatch::new(
                TUN_SLOT_MESSAGES,
                TUN_SLOT_PIECES,
                TUN_SLOT_HEADERS * MAX_HEADER_LEN,
            ),
            writes: WriteList::new(1, 2),
            pending: 0,
            cursor: None,
        }
    }

    fn for_udp() -> Self {
        Self {
            sends: SendBatch::new(1, 1, 0),
            writes: WriteList::new(MAX_RX_DATAGRAMS, 2 * MAX_RX_DATAGRAMS),
            pending: 0,
            cursor: None,
        }
    }
}

/// A ring of buffers lent to the kernel (`IORING_REGISTER_PBUF_RING`): the worker writes
/// entries at the tail, the kernel takes them from the head as packets arrive.
struct BufferRing {
    entries: NonNull<types::BufRingEntry>,
    size: u16,
    tail: u16,
    published: u16,
}

impl BufferRing {
    fn layout(size: u16) -> Layout {
        // A page-aligned array of 16-byte entries, as the kernel requires.
        Layout::from_size_align(
            usize::from(size) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .unwrap_or_else(|_| unreachable!("a ring of at most 32768 entries has a valid layout"))
    }

    fn new(size: u16) -> Self {
        assert!(
            size.is_power_of_two(),
            "buffer ring sizes are powers of two"
        );
        // SAFETY: the layout has a nonzero size.
        let raw = unsafe { std::alloc::alloc_zeroed(Self::layout(size)) };
        let entries = NonNull::new(raw.cast::<types::BufRingEntry>())
            .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(size)));
        Self {
            entries,
            size,
            tail: 0,
            published: 0,
        }
    }

    fn addr(&self) -> u64 {
        self.entries.as_ptr() as u64
    }

    /// Queue buffer `bid` (at `addr`, `len` bytes long) for the kernel; it sees it after
    /// [`BufferRing::publish`].
    fn give(&mut self, bid: u16, addr: *mut u8, len: usize) {
        let index = usize::from(self.tail & (self.size - 1));
        // SAFETY: index < size, so the entry is inside the allocation. The kernel reads only
        // entries between its head and the published tail, and this one is beyond the tail.
        // Writing addr, len and bid leaves the shared tail (in entry 0's reserved field) alone.
        unsafe {
            let entry = &mut *self.entries.as_ptr().add(index);
            entry.set_addr(addr as u64);
            entry.set_len(u32::try_from(len).unwrap_or(u32::MAX));
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Make every buffer given so far visible to the kernel.
    fn publish(&mut self) {
        if self.published == self.tail {
            return;
        }
        // SAFETY: the tail is the reserved field of entry 0, a properly aligned u16 inside
        // the allocation that the kernel only reads; an atomic store with release ordering
        // publishes the entries written before it.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries.as_ptr()).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
        self.published = self.tail;
    }
}

impl Drop for BufferRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout, freed once; the owner unregisters
        // the ring (or leaks it) before dropping it.
        unsafe { std::alloc::dealloc(self.entries.as_ptr().cast(), Self::layout(self.size)) };
    }
}

/// One multishot request kept armed on a descriptor, fed by a buffer ring.
struct Intake {
    ring: ManuallyDrop<BufferRing>,
    /// Whether the kernel knows the ring (it must be unregistered before it is freed).
    registered: bool,
    /// Whether the multishot request is armed.
    armed: bool,
    /// Buffers the kernel has filled and the worker has not given back yet.
    lent: usize,
    /// The first slot of this intake's buffers.
    first_slot: usize,
    slots: usize,
}

/// A worker's ring, its slots and the descriptors they read and write.
pub(crate) struct UringWorker {
    ring: IoUring,
    // Freed only after every operation that uses them has completed (see `Drop`).
    buffers: ManuallyDrop<PacketBuffers>,
    io: ManuallyDrop<Box<[SlotIo]>>,
    tun_intake: Intake,
    udp_intake: Intake,
    /// The `msghdr` the multishot `recvmsg` was armed with: only its name and control lengths
    /// matter, and they shape what the kernel writes before each datagram.
    recv_template: Box<libc::msghdr>,
    /// Bytes the kernel writes before each datagram (header, name, control data).
    recv_prefix: usize,
    /// Bytes of control data room in that prefix (nonzero with GRO).
    control_len: usize,
    offloads: ActiveOffloads,
    /// The packets of the batch's receives accepted for the TUN.
    accepted: Accepted,
    held: Vec<usize>,
    queued_writes: Vec<(usize, usize)>,
    in_flight: usize,
    read_failures: ReadFailures,
    /// The ICMP errors this worker may still send.
    icmp: IcmpGate,
    /// The worker's clock origin, for the ICMP rate limit.
    origin: Instant,
    completions: Vec<(u64, i32, u32)>,
    // Registered with the ring; kept open until the ring is gone.
    _tun: TunQueue,
    _socket: UdpSocket,
    _stop: Arc<StopSignal>,
}

impl UringWorker {
    /// Set up the ring (on the calling thread, which must be the one that runs it), register
    /// the TUN queue, the socket and the stop signal with it, and lend it the buffers.
    pub(crate) fn new(
        tun: TunQueue,
        socket: UdpSocket,
        stop: Arc<StopSignal>,
        offloads: ActiveOffloads,
    ) -> Result<Self, WorkerError> {
        let ring = build_ring(RING_ENTRIES, COMPLETION_ENTRIES)
            .map_err(|e| WorkerError::setup("io_uring", e))?;
        check_opcodes(&ring)?;
        ring.submitter()
            .register_files(&[
                tun.as_raw_fd(),
                socket.as_raw_fd(),
                stop.as_fd().as_raw_fd(),
            ])
            .map_err(|e| WorkerError::setup("io_uring registered files", e))?;
        let control_len = if offloads.udp_gro { CONTROL_LEN } else { 0 };
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
        let mut recv_template: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_template.msg_namelen = SOCKADDR_IN_LEN;
        recv_template.msg_controllen = control_len as _;
        let completions = Vec::with_capacity(ring.params().cq_entries() as usize);
        let io: Box<[SlotIo]> = (0..SLOTS)
            .map(|slot| {
                if slot < TUN_SLOTS {
                    SlotIo::for_tun()
                } else {
                    SlotIo::for_udp()
                }
            })
            .collect();
        let mut worker = Self {
            ring,
            buffers: ManuallyDrop::new(PacketBuffers::new(SLOTS)),
            io: ManuallyDrop::new(io),
            tun_intake: Intake::new(0, TUN_SLOTS),
            udp_intake: Intake::new(TUN_SLOTS, UDP_SLOTS),
            recv_template,
            recv_prefix: RECVMSG_OUT_LEN + NAME_LEN + control_len,
            control_len,
            offloads,
            accepted: Accepted::new(UDP_SLOTS * MAX_RX_DATAGRAMS, &offloads),
            held: Vec::with_capacity(UDP_SLOTS),
            queued_writes: Vec::with_capacity(UDP_SLOTS * MAX_RX_DATAGRAMS),
            in_flight: 0,
            read_failures: ReadFailures::default(),
            icmp: IcmpGate::unlimited(),
            origin: Instant::now(),
            completions,
            _tun: tun,
            _socket: socket,
            _stop: stop,
        };
        for (intake, group) in [
            (&mut worker.tun_intake, TUN_GROUP),
            (&mut worker.udp_intake, UDP_GROUP),
        ] {
            // SAFETY: the ring memory stays allocated until the group is unregistered in
            // `Drop` (or is leaked if that is not possible).
            unsafe {
                worker.ring.submitter().register_buf_ring_with_flags(
                    intake.ring.addr(),
                    intake.ring.size,
                    group,
                    0,
                )
            }
            .map_err(|e| WorkerError::setup("io_uring buffer ring", e))?;
            intake.registered = true;
        }
        for slot in 0..SLOTS {
            worker.give_back(slot);
        }
        Ok(worker)
    }

    /// Move packets until the stop signal is raised or a fatal error occurs.
    pub(crate) fn run(&mut self, context: &WorkerContext) -> Result<(), WorkerError> {
        self.icmp = IcmpGate::new(context.icmp_rate_limit);
        self.accepted.set_groups(context.groups.clone());
        self.accepted
            .set_partial_peers(context.partial_peers.clone());
        self.accepted.set_gso_check(context.gso_check.clone());
        self.push(
            opcode::PollAdd::new(STOP_FILE, libc::POLLIN as u32)
                .build()
                .user_data(Op::Stop.encode(0, 0)),
        )?;
        let mut window = PollWindow::new(context.busy_poll);
        loop {
            self.tun_intake.ring.publish();
            self.udp_intake.ring.publish();
            self.arm_intakes()?;
            self.wait_for_work(&mut window)?;
            self.reap();
            let mut counts = BatchCounts::default();
            let outcome = self.handle_completions(context, &mut counts);
            context.counters.add(&counts);
            match outcome {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => return Ok(()),
                Err(error) => return Err(error),
            }
        }
    }

    fn handle_completions(
        &mut self,
        context: &WorkerContext,
        counts: &mut BatchCounts,
    ) -> Result<Flow, WorkerError> {
        let table = context.routes.snapshot();
        // The ICMP rate limit's time, read once per batch of completions.
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.icmp.set_time(now);
        let policy = &context.policy;
        let mut flow = Flow::Continue;
        let packets_before = counts.tun_rx_packets + counts.udp_rx_packets;
        let mut reads = 0u64;
        for index in 0..self.completions.len() {
            let (user_data, result, flags) = self.completions[index];
            let Some((op, slot, item)) = Op::decode(user_data) else {
                continue;
            };
            match op {
                Op::TunRead | Op::UdpRecv => {
                    let intake = self.intake_mut(op);
                    if !cqueue::more(flags) {
                        intake.armed = false;
                    }
                    let Some(slot) = cqueue::buffer_select(flags).and_then(|bid| intake.lend(bid))
                    else {
                        if result < 0 {
                            self.read_failed(op, -result)?;
                        }
                        continue;
                    };
                    if result < 0 {
                        // A buffer came back with an error: return it and treat the error.
                        self.give_back(slot);
                        self.read_failed(op, -result)?;
                        continue;
                    }
                    self.read_failures.reset();
                    reads += 1;
                    if op == Op::TunRead {
                        self.tun_read(slot, result as usize, &table, policy, counts)?;
                    } else {
                        self.udp_received(slot, result as usize, &table, policy, counts)?;
                    }
                }
                Op::Send => self.sent(slot, item, result, counts)?,
                Op::Write => self.written(slot, item, result, counts)?,
                Op::Stop => flow = Flow::Stop,
                Op::Cancel => {}
            }
        }
        self.write_accepted(counts)?;
        if reads > 0 {
            counts.batches += 1;
            counts.batch_packets += counts.tun_rx_packets + counts.udp_rx_packets - packets_before;
        }
        Ok(flow)
    }

    /// Decide on the packet a TUN read put in `slot` (`result` bytes, the virtio-net header
    /// included) and start sending it.
    fn tun_read(
        &mut self,
        slot: usize,
        result: usize,
        table: &RouteTable,
        policy: &Policy,
        counts: &mut BatchCounts,
    ) -> Result<(), WorkerError> {
        let vnet_len = self.offloads.vnet_len();
        // SAFETY: the kernel filled this buffer and handed it over with the completion; it is
        // lent to nobody else until given back.
        let (header, packet, reply) = unsafe { self.buffers.tun_read(slot, vnet_len, result) };
        let action = decide_tun_read(
            &header,
            packet,
            table,
            policy,
            reply,
            &mut self.icmp,
            counts,
            self.accepted.broadcast_sink(),
            &self.accepted.partial_peer_table(),
        );
        let io = &mut self.io[slot];
        io.sends.clear();
        io.writes.clear();
        match action {
            TunAction::Recycle => {
                self.give_back(slot);
                Ok(())
            }
            TunAction::WriteReply { len } => {
                let (vnet, piece, count) =
                    reply_write(&self.offloads, self.buffers.reply_ptr(slot), len);
                io.writes.push(vnet, &[piece], count, Source::Reply);
                self.submit(slot)
            }
            TunAction::Send {
                to,
                len,
                segments: None,
            } => {
                let piece = (self.buffers.packet_ptr(slot).cast_const(), len);
                io.sends.push(to, Source::Packet, &[piece], false);
                self.submit(slot)
            }
            TunAction::Send {
                to,
                len,
                segments: Some(segmenter),
            } => {
                io.cursor = Some(Cursor {
                    to,
                    segmenter,
                    len,
                    next: 0,
                });
                self.refill(slot)
            }
        }
    }

    /// Queue the next segments of `slot`'s super-packet and submit them; give the slot back
    /// when there are none left.
    fn refill(&mut self, slot: usize) -> Result<(), WorkerError> {
        let packet_ptr = self.buffers.packet_ptr(slot);
        let io = &mut self.io[slot];
        io.sends.clear();
        let Some(cursor) = io.cursor.as_mut() else {
            self.give_back(slot);
            return Ok(());
        };
        // SAFETY: the slot's buffer holds the super-packet's `len` bytes; the kernel only
        // reads it (earlier segments' sends) while the slot is ours.
        let packet = unsafe { std::slice::from_raw_parts(packet_ptr.cast_const(), cursor.len) };
        let gso = self.accepted.gso_to(cursor.to, self.offloads.udp_gso);
        let done = queue_segments(
            &mut io.sends,
            cursor.to,
            packet,
            &cursor.segmenter,
            &mut cursor.next,
            gso,
        );
        if done {
            io.cursor = None;
        }
        if io.sends.is_empty() {
            io.cursor = None;
            self.give_back(slot);
            return Ok(());
        }
        self.submit(slot)
    }

    /// Split the GRO buffer a receive put in `slot` (`result` bytes, the kernel's prefix
    /// included) into datagrams, decide on each, and write the accepted ones to the TUN,
    /// coalesced.
    fn udp_received(
        &mut self,
        slot: usize,
        result: usize,
        table: &RouteTable,
        policy: &Policy,
        counts: &mut BatchCounts,
    ) -> Result<(), WorkerError> {
        // SAFETY: the kernel wrote `result` bytes starting `recv_prefix` bytes before the
        // packet buffer, and handed the slot over with the completion.
        let prefix = unsafe { self.buffers.with_headroom(slot, self.recv_prefix, result) };
        let received = parse_recvmsg_out(prefix, self.control_len);
        let answer = match received {
            None => {
                counts.udp_receives += 1;
                counts.udp_rx_packets += 1;
                counts.drop(DropReason::BadPacket);
                None
            }
            // SAFETY: as above; the slot is held until the batch's writes are prepared.
            Some(received) => unsafe {
                self.accepted.receive(
                    &mut self.buffers,
                    slot,
                    received.len,
                    received.from,
                    received.segment,
                    received.truncated,
                    table,
                    policy,
                    &mut self.icmp,
                    counts,
                )
            },
        };
        let io = &mut self.io[slot];
        io.sends.clear();
        io.writes.clear();
        // Held until the batch's writes are prepared (see `write_accepted`).
        io.pending += 1;
        self.held.push(slot);
        if let Some((to, piece)) = answer {
            io.sends.push(to, Source::Reply, &[piece], false);
        }
        self.submit(slot)
    }

    /// Write the packets accepted from every receive of the batch to the TUN, segments of one
    /// flow merged into super-packets even across receives. A write is kept in the write list
    /// of the slot holding its first packet and holds every slot it points into (once per
    /// piece) until it completes; one that does not fit there is written at once.
    fn write_accepted(&mut self, counts: &mut BatchCounts) -> Result<(), WorkerError> {
        let buffers = &*self.buffers;
        let io = &mut **self.io;
        let queued = &mut self.queued_writes;
        let fd = self._tun.as_raw_fd();
        let mut direct = DirectWrites::default();
        // SAFETY: the accepted packets lie in slots held by this batch, which no I/O uses
        // until the writes are submitted; each write then holds the slots it points into.
        unsafe {
            self.accepted
                .write(&self.offloads, counts, |vnet, pieces, count| {
                    let head = pieces
                        .first()
                        .and_then(|p| buffers.slot_of(p.iov_base.cast()));
                    if let Some(head) = head {
                        if io[head].writes.push(vnet, pieces, count, Source::Packet) {
                            for piece in pieces {
                                if let Some(slot) = buffers.slot_of(piece.iov_base.cast()) {
                                    io[slot].pending += 1;
                                }
                            }
                            queued.push((head, io[head].writes.len() - 1));
                            return Written::Queued;
                        }
                    }
                    Written::Done(direct.write(fd, vnet.as_ref(), pieces))
                });
        }
        direct.finish()?;
        for index in 0..self.queued_writes.len() {
            let (slot, i) = self.queued_writes[index];
            let Some((iovs, count, _)) = self.io[slot].writes.get(i) else {
                continue;
            };
            self.push(
                opcode::Writev::new(TUN_FILE, iovs, count)
                    .build()
                    .user_data(Op::Write.encode(slot, i)),
            )?;
        }
        self.queued_writes.clear();
        while let Some(slot) = self.held.pop() {
            self.release(slot)?;
        }
        Ok(())
    }

    /// One operation (or hold) of `slot` is over.
    fn release(&mut self, slot: usize) -> Result<(), WorkerError> {
        let Some(io) = self.io.get_mut(slot) else {
            return Ok(());
        };
        io.pending = io.pending.saturating_sub(1);
        self.slot_progressed(slot)
    }

    /// Submit every prepared send and write of `slot`, or give the slot back if there is none.
    fn submit(&mut self, slot: usize) -> Result<(), WorkerError> {
        let mut entries = 0;
        for i in 0..self.io[slot].writes.len() {
            let Some((iovs, count, _)) = self.io[slot].writes.get(i) else {
                continue;
            };
            self.push(
                opcode::Writev::new(TUN_FILE, iovs, count)
                    .build()
                    .user_data(Op::Write.encode(slot, i)),
            )?;
            entries += 1;
        }
        for i in 0..self.io[slot].sends.len() {
            entries += self.submit_send(slot, i)?;
        }
        self.io[slot].pending += entries;
        if self.io[slot].pending == 0 {
            self.give_back(slot);
        }
        Ok(())
    }

    /// Submit message `i` of `slot`'s batch; how many operations that made (0 or 1).
    fn submit_send(&mut self, slot: usize, i: usize) -> Result<u32, WorkerError> {
        let Some(msg) = self.io[slot].sends.prepare(i) else {
            return Ok(0);
        };
        self.push(
            opcode::SendMsg::new(SOCKET_FILE, msg)
                .build()
                .user_data(Op::Send.encode(slot, i)),
        )?;
        Ok(1)
    }

    /// Message `i` of `slot` was sent (or refused).
    fn sent(
        &mut self,
        slot: usize,
        i: usize,
        result: i32,
        counts: &mut BatchCounts,
    ) -> Result<(), WorkerError> {
        let Some(io) = self.io.get_mut(slot) else {
            return Ok(());
        };
        io.pending = io.pending.saturating_sub(1);
        let outcome = handle_send_result(
            &mut io.sends,
            i,
            i64::from(result),
            &mut self.offloads.udp_gso,
            counts,
        )?;
        if let SendOutcome::Resend(split) = outcome {
            for j in split {
                let submitted = self.submit_send(slot, j)?;
                self.io[slot].pending += submitted;
            }
        }
        self.slot_progressed(slot)
    }

    /// Write `i` of `slot` completed: release every slot it pointed into (an ICMP error, in
    /// the slot's reply buffer, holds only its own).
    fn written(
        &mut self,
        slot: usize,
        i: usize,
        result: i32,
        counts: &mut BatchCounts,
    ) -> Result<(), WorkerError> {
        if result < 0 && write_error_is_fatal(-result) {
            return Err(WorkerError::fatal(Op::Write.what(), -result));
        }
        let Some(entry) = self
            .io
            .get(slot)
            .and_then(|io| io.writes.get(i))
            .map(|w| w.2)
        else {
            return Ok(());
        };
        count_write(counts, entry.source, entry.count, i64::from(result));
        if entry.source == Source::Reply {
            return self.release(slot);
        }
        for piece in 0..self.io[slot].writes.pieces(i).len() {
            let base = self.io[slot].writes.pieces(i)[piece].iov_base;
            if let Some(held) = self.buffers.slot_of(base.cast()) {
                self.release(held)?;
            }
        }
        Ok(())
    }

    /// After an operation of `slot` completed: once none is left, send the rest of its
    /// super-packet, or give it back.
    fn slot_progressed(&mut self, slot: usize) -> Result<(), WorkerError> {
        if self.io[slot].pending > 0 {
            return Ok(());
        }
        if self.io[slot].cursor.is_some() {
            self.refill(slot)
        } else {
            self.give_back(slot);
            Ok(())
        }
    }

    /// Lend `slot`'s buffer to the kernel again, through its intake's ring.
    fn give_back(&mut self, slot: usize) {
        let (intake, before) = if slot < TUN_SLOTS {
            (&mut self.tun_intake, self.offloads.vnet_len())
        } else {
            // The kernel writes its recvmsg header, the sender's address and the control data
            // in front of the datagram, so the packet itself lands at the buffer's start.
            (&mut self.udp_intake, self.recv_prefix)
        };
        let bid = (slot - intake.first_slot) as u16;
        intake.lent = intake.lent.saturating_sub(1);
        let addr = self.buffers.headroom_ptr(slot, before);
        intake.ring.give(bid, addr, before + PACKET_BUF_LEN);
    }

    /// Arm the multishot reads that are not armed and have buffers to fill.
    fn arm_intakes(&mut self) -> Result<(), WorkerError> {
        if !self.tun_intake.armed && self.tun_intake.has_free_buffers() {
            self.tun_intake.armed = true;
            self.push(
                opcode::ReadMulti::new(TUN_FILE, 0, TUN_GROUP)
                    .build()
                    .user_data(Op::TunRead.encode(0, 0)),
            )?;
        }
        if !self.udp_intake.armed && self.udp_intake.has_free_buffers() {
            self.udp_intake.armed = true;
            let template: *const libc::msghdr = &*self.recv_template;
            self.push(
                opcode::RecvMsgMulti::new(SOCKET_FILE, template, UDP_GROUP)
                    .build()
                    .user_data(Op::UdpRecv.encode(0, 0)),
            )?;
        }
        Ok(())
    }

    fn intake_mut(&mut self, op: Op) -> &mut Intake {
        if op == Op::TunRead {
            &mut self.tun_intake
        } else {
            &mut self.udp_intake
        }
    }

    fn read_failed(&mut self, op: Op, errno: i32) -> Result<(), WorkerError> {
        // Without a free buffer the request has ended; it is re-armed once buffers come back.
        self.read_failures.failed(op.what(), errno)
    }

    /// Queue `entry`; it goes to the kernel with the next wait.
    fn push(&mut self, entry: squeue::Entry) -> Result<(), WorkerError> {
        loop {
            // SAFETY: every pointer in an entry built by this worker leads into `buffers`,
            // `io` or `recv_template`, which stay allocated until the operation has completed
            // (`Drop` waits for every operation before freeing them), and into a slot whose
            // memory no other operation writes.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            // The queue is full: hand what is queued to the kernel to make room.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    return Err(WorkerError::Fatal {
                        what: "io_uring submit",
                        source: e,
                    })
                }
            }
        }
    }

    /// Submit everything queued and wait for a completion, looking for one without sleeping
    /// for `window`'s time first.
    fn wait_for_work(&mut self, window: &mut PollWindow) -> Result<(), WorkerError> {
        let started = Instant::now();
        let look = window.window();
        if look > Duration::ZERO {
            self.submit_and_wait_for(0)?;
            loop {
                self.run_task_work()?;
                if !self.ring.completion().is_empty() {
                    window.woke(started.elapsed());
                    return Ok(());
                }
                if started.elapsed() >= look {
                    break;
                }
                // Let a thread waiting for this CPU (often the one that will answer) run.
                std::thread::yield_now();
            }
        }
        self.submit_and_wait_for(1)?;
        window.woke(started.elapsed());
        Ok(())
    }

    /// Let the kernel post the completions that are ready: with `DEFER_TASKRUN` they wait
    /// for the ring's thread to enter the kernel asking for events.
    fn run_task_work(&mut self) -> Result<(), WorkerError> {
        // SAFETY: no submissions and no argument are passed; GETEVENTS with a minimum of
        // zero completions only runs the ring's pending work and returns.
        let rc = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
        };
        match rc {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => Ok(()),
                _ => Err(WorkerError::Fatal {
                    what: "io_uring wait",
                    source: e,
                }),
            },
        }
    }

    /// Submit everything queued and wait for at least `want` completions.
    fn submit_and_wait_for(&mut self, want: usize) -> Result<(), WorkerError> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    // Task work or a signal interrupted the wait: wait again.
                    Some(libc::EINTR) => continue,
                    // Completions are waiting to be reaped first.
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => return Ok(()),
                    _ => {
                        return Err(WorkerError::Fatal {
                            what: "io_uring wait",
                            source: e,
                        })
                    }
                },
            }
        }
    }

    /// Move every available completion into `self.completions`. An operation stops being
    /// in flight with its last completion (a multishot request posts many).
    fn reap(&mut self) {
        self.completions.clear();
        for cqe in self.ring.completion() {
            if !cqueue::more(cqe.flags()) {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            self.completions
                .push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }

    /// Cancel everything in flight and wait (bounded) for the kernel to let go of it.
    fn cancel_and_drain(&mut self) -> bool {
        if self.in_flight == 0 {
            return true;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(Op::Cancel.encode(0, 0));
        if self.push(cancel).is_err() {
            return false;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let wait = types::Timespec::new().nsec(100_000_000);
        let args = types::SubmitArgs::new().timespec(&wait);
        while self.in_flight > 0 && Instant::now() < deadline {
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(_) => return false,
            }
            self.reap();
        }
        self.in_flight == 0
    }
}

impl Drop for UringWorker {
    fn drop(&mut self) {
        if !self.cancel_and_drain() {
            tracing::warn!(
                in_flight = self.in_flight,
                "io_uring operations did not complete; leaking their buffers"
            );
            return;
        }
        let submitter = self.ring.submitter();
        // The ring is torn down asynchronously after its descriptor closes; releasing the
        // registered files now closes the TUN queue and the socket before `drop` returns, so
        // the device is gone when the engine says it has stopped.
        if let Err(error) = submitter.unregister_files() {
            tracing::debug!(%error, "cannot unregister io_uring files");
        }
        for (intake, group) in [
            (&mut self.tun_intake, TUN_GROUP),
            (&mut self.udp_intake, UDP_GROUP),
        ] {
            if intake.registered {
                if let Err(error) = submitter.unregister_buf_ring(group) {
                    tracing::warn!(%error, group, "cannot unregister a buffer ring; leaking it");
                    continue;
                }
            }
            // SAFETY: the kernel no longer knows this ring (never registered, or just
            // unregistered), and it is dropped exactly once, here.
            unsafe { ManuallyDrop::drop(&mut intake.ring) };
        }
        // SAFETY: no operation is in flight any more, so nothing in the kernel refers to the
        // buffers or the slots' message memory; each is dropped exactly once, here.
        unsafe {
            ManuallyDrop::drop(&mut self.buffers);
            ManuallyDrop::drop(&mut self.io);
        }
    }
}

impl Intake {
    fn new(first_slot: usize, slots: usize) -> Self {
        let size = u16::try_from(slots).unwrap_or(u16::MAX);
        Self {
            ring: ManuallyDrop::new(BufferRing::new(size)),
            registered: false,
            armed: false,
            // Every buffer starts with the worker, which gives them all to the ring at setup.
            lent: slots,
            first_slot,
            slots,
        }
    }

    /// The slot of buffer `bid`, which the kernel has just filled.
    fn lend(&mut self, bid: u16) -> Option<usize> {
        let bid = usize::from(bid);
        if bid >= self.slots {
            return None;
        }
        self.lent += 1;
        Some(self.first_slot + bid)
    }

    fn has_free_buffers(&self) -> bool {
        self.lent < self.slots
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// What a multishot `recvmsg` reported about one receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Received {
    from: Option<SocketAddrV4>,
    len: usize,
    truncated: bool,
    /// The datagram size of a GRO run.
    segment: Option<usize>,
}

/// Read the `io_uring_recvmsg_out` header, the sender's address and the control data in front
/// of a datagram; `bytes` is everything the kernel reported writing, and `control_len` the
/// control room the request asked for. `None` if it is too short to hold them.
fn parse_recvmsg_out(bytes: &[u8], control_len: usize) -> Option<Received> {
    let word = |i: usize| -> Option<u32> {
        let raw: [u8; 4] = bytes.get(i * 4..i * 4 + 4)?.try_into().ok()?;
        Some(u32::from_ne_bytes(raw))
    };
    let (namelen, controllen, payloadlen, flags) = (word(0)?, word(1)?, word(2)?, word(3)?);
    let name = bytes.get(RECVMSG_OUT_LEN..RECVMSG_OUT_LEN + NAME_LEN)?;
    let control_start = RECVMSG_OUT_LEN + NAME_LEN;
    let prefix = control_start + control_len;
    let control = bytes.get(control_start..prefix)?;
    // SAFETY: `name` holds exactly size_of::<sockaddr_in>() bytes; read_unaligned copies them
    // into a sockaddr_in, a plain C struct valid for any bit pattern.
    let addr: libc::sockaddr_in =
        unsafe { std::ptr::read_unaligned(name.as_ptr().cast::<libc::sockaddr_in>()) };
    let from = from_sockaddr(&addr, namelen.min(SOCKADDR_IN_LEN));
    let written = bytes.len() - prefix;
    let len = (payloadlen as usize).min(written);
    let truncated = flags & libc::MSG_TRUNC as u32 != 0 || (payloadlen as usize) > written;
    let segment = gro_segment_size(&control[..(controllen as usize).min(control_len)]);
    Some(Received {
        from,
        len,
        truncated,
        segment,
    })
}

/// Refuse kernels that lack the operations this back end is built on (multishot TUN reads
/// arrived in Linux 6.7); `--io syscalls` works there.
fn check_opcodes(ring: &IoUring) -> Result<(), WorkerError> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| WorkerError::setup("io_uring probe", e))?;
    let needed = [
        (opcode::ReadMulti::CODE, "READ_MULTISHOT"),
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(WorkerError::setup(
                "io_uring",
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel lacks IORING_OP_{name}; use the syscalls back end"),
                ),
            ));
        }
    }
    Ok(())
}

/// A ring with `entries` submission and `completions` completion slots. Deferred task work
/// on a single issuer keeps completions from interrupting the loop (they are run only when it
/// waits); `SUBMIT_ALL` keeps one bad entry from holding back the rest. Older kernels get a
/// plain ring.
fn build_ring(entries: u32, completions: u32) -> io::Result<IoUring> {
    let tuned = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_submit_all()
        .setup_cqsize(completions)
        .build(entries);
    match tuned {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!("io_uring without DEFER_TASKRUN: {e}");
            IoUring::builder().setup_cqsize(completions).build(entries)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::udp::to_sockaddr;
    use std::net::Ipv4Addr;

    #[test]
    fn user_data_round_trips() {
        for op in Op::ALL {
            for slot in [0, 1, TUN_SLOTS, SLOTS - 1, u32::MAX as usize] {
                for index in [0, 1, TUN_SLOT_MESSAGES - 1, 0xff_ffff] {
                    assert_eq!(Op::decode(op.encode(slot, index)), Some((op, slot, index)));
                }
            }
        }
        assert_eq!(Op::decode(0), None);
        assert_eq!(Op::decode(u64::MAX), None);
    }

    fn recvmsg_out(
        namelen: u32,
        payloadlen: u32,
        flags: u32,
        from: SocketAddrV4,
        control: &[u8],
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [namelen, control.len() as u32, payloadlen, flags] {
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        let addr = to_sockaddr(from);
        // SAFETY: sockaddr_in is a plain C struct; viewing it as bytes is sound.
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&addr as *const libc::sockaddr_in).cast::<u8>(),
                std::mem::size_of::<libc::sockaddr_in>(),
            )
        };
        bytes.extend_from_slice(raw);
        bytes.extend_from_slice(control);
        bytes
    }

    /// A `UDP_GRO` control message for `size`-byte datagrams, as the kernel lays it out.
    fn gro_control(size: i32) -> Vec<u8> {
        let mut control = vec![0u8; CONTROL_LEN];
        let len = std::mem::size_of::<libc::cmsghdr>() + 4;
        control[..8].copy_from_slice(&len.to_ne_bytes());
        control[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
        control[12..16].copy_from_slice(&libc::UDP_GRO.to_ne_bytes());
        control[16..20].copy_from_slice(&size.to_ne_bytes());
        control
    }

    #[test]
    fn recvmsg_headers_are_read() {
        let peer = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285);
        let mut bytes = recvmsg_out(16, 5, 0, peer, &[]);
        bytes.extend_from_slice(b"hello");
        assert_eq!(
            parse_recvmsg_out(&bytes, 0),
            Some(Received {
                from: Some(peer),
                len: 5,
                truncated: false,
                segment: None,
            })
        );
        // The kernel says more arrived than it wrote: truncated.
        let mut bytes = recvmsg_out(16, 9, 0, peer, &[]);
        bytes.extend_from_slice(b"hello");
        assert!(parse_recvmsg_out(&bytes, 0).unwrap().truncated);
        let bytes = recvmsg_out(16, 0, libc::MSG_TRUNC as u32, peer, &[]);
        assert!(parse_recvmsg_out(&bytes, 0).unwrap().truncated);
        // A short name is not an IPv4 sender.
        let bytes = recvmsg_out(2, 0, 0, peer, &[]);
        assert_eq!(parse_recvmsg_out(&bytes, 0).unwrap().from, None);
        // Too short for the header.
        let prefix = RECVMSG_OUT_LEN + NAME_LEN;
        assert_eq!(parse_recvmsg_out(&bytes[..prefix - 1], 0), None);
        assert_eq!(parse_recvmsg_out(&[], 0), None);
    }

    #[test]
    fn gro_runs_carry_their_datagram_size() {
        let peer = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285);
        let mut bytes = recvmsg_out(16, 3000, 0, peer, &gro_control(1472));
        bytes.extend_from_slice(&[7; 3000]);
        let received = parse_recvmsg_out(&bytes, CONTROL_LEN).unwrap();
        assert_eq!(received.segment, Some(1472));
        assert_eq!(received.len, 3000);
        // Without a control message (a single datagram), or with room but none written.
        let mut bytes = recvmsg_out(16, 4, 0, peer, &[]);
        bytes[4..8].copy_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&[0; CONTROL_LEN]);
        bytes.extend_from_slice(b"abcd");
        let received = parse_recvmsg_out(&bytes, CONTROL_LEN).unwrap();
        assert_eq!((received.segment, received.len), (None, 4));
        // Zero or negative sizes are no run.
        for size in [0, -1] {
            let bytes = recvmsg_out(16, 0, 0, peer, &gro_control(size));
            assert_eq!(
                parse_recvmsg_out(&bytes, CONTROL_LEN).unwrap().segment,
                None
            );
        }
    }

    #[test]
    fn buffer_rings_hand_out_ids_in_order() {
        let mut ring = BufferRing::new(4);
        let mut buf = [0u8; 8];
        for bid in 0..4u16 {
            ring.give(bid, buf.as_mut_ptr(), 8);
        }
        ring.publish();
        // SAFETY: the ring is not registered; reading its entries and tail is plain memory.
        unsafe {
            let tail = *types::BufRingEntry::tail(ring.entries.as_ptr());
            assert_eq!(tail, 4);
            for i in 0..4 {
                let entry = &*ring.entries.as_ptr().add(i);
                assert_eq!(entry.bid(), i as u16);
                assert_eq!(entry.len(), 8);
            }
        }
        // Wrapping around reuses the first entry.
        ring.give(9, buf.as_mut_ptr(), 8);
        // SAFETY: as above.
        assert_eq!(unsafe { (*ring.entries.as_ptr()).bid() }, 9);
    }
}
