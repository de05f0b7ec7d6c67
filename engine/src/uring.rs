//! The io_uring back end of a worker.
//!
//! Every packet slot owns a 64 KiB buffer, a reply buffer, a `msghdr`, an `iovec` and a
//! `sockaddr_in` at fixed addresses. [`TUN_SLOTS`] slots are lent to the kernel for TUN reads
//! and [`UDP_SLOTS`] for datagrams, through two provided-buffer rings, and one multishot read
//! on the TUN and one multishot `recvmsg` on the socket stay armed: each arriving packet
//! completes into a free slot. The packet is decided on where it lies and leaves from the same
//! buffer (a `sendmsg` to the peer or a TUN write: no copy); when that completes, the slot goes
//! back to its ring. ICMP errors leave from the slot's reply buffer. Completions are reaped in
//! batches and every operation they cause is submitted with the next wait, one
//! `io_uring_enter` per loop. A poll on the stop eventfd stays in the ring, so a stop request
//! ends the wait at once.
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

use crate::counters::{BatchCounts, DropReason};
use crate::decide::{self, Decision, Policy};
use crate::route::RouteTable;
use crate::tun::TunQueue;
use crate::udp::{from_sockaddr, to_sockaddr, SOCKADDR_IN_LEN};
use crate::worker::{
    count_output, plan, read_error_is_fatal, write_error_is_fatal, Action, PacketBuffers, Source,
    StopSignal, WorkerContext, WorkerError, MAX_READ_FAILURES_IN_A_ROW, PACKET_BUF_LEN,
    UNREADABLE_SENDER,
};

/// Slots that read from the TUN and send to peers (a power of two: a buffer ring's size).
pub const TUN_SLOTS: usize = 64;
/// Slots that receive from peers and write to the TUN (a power of two).
pub const UDP_SLOTS: usize = 64;

const SLOTS: usize = TUN_SLOTS + UDP_SLOTS;

/// Registered-file indexes: the kernel skips the descriptor-table lookup for each operation.
const TUN_FILE: types::Fixed = types::Fixed(0);
const SOCKET_FILE: types::Fixed = types::Fixed(1);
const STOP_FILE: types::Fixed = types::Fixed(2);

/// Provided-buffer group ids.
const TUN_GROUP: u16 = 0;
const UDP_GROUP: u16 = 1;

/// What a multishot `recvmsg` writes before each datagram: `struct io_uring_recvmsg_out`
/// (16 bytes) and the sender's address in a field of the `msg_namelen` the request asked for.
const RECVMSG_OUT_LEN: usize = 16;
const RECV_PREFIX: usize = RECVMSG_OUT_LEN + SOCKADDR_IN_LEN as usize;

/// How long shutdown waits for cancelled operations to complete.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What an operation in the ring is, recorded in its `user_data` beside its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    TunRead = 1,
    UdpRecv = 2,
    Send = 3,
    Write = 4,
    SendReply = 5,
    WriteReply = 6,
    Stop = 7,
    Cancel = 8,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::TunRead,
        Op::UdpRecv,
        Op::Send,
        Op::Write,
        Op::SendReply,
        Op::WriteReply,
        Op::Stop,
        Op::Cancel,
    ];

    fn encode(self, slot: usize) -> u64 {
        (u64::from(self as u8) << 32) | (slot as u64 & 0xffff_ffff)
    }

    fn decode(user_data: u64) -> Option<(Op, usize)> {
        let code = (user_data >> 32) as u8;
        let op = Op::ALL.into_iter().find(|op| *op as u8 == code)?;
        Some((op, (user_data & 0xffff_ffff) as usize))
    }

    fn what(self) -> &'static str {
        match self {
            Op::TunRead => "TUN read",
            Op::UdpRecv => "UDP receive",
            Op::Send | Op::SendReply => "UDP send",
            Op::Write | Op::WriteReply => "TUN write",
            Op::Stop => "stop poll",
            Op::Cancel => "cancel",
        }
    }
}

/// A slot's message header for sends, pointing at the slot's own `iovec` and address.
#[repr(C)]
struct SlotHeader {
    msg: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_in,
}

/// The slots' message headers, at addresses that never change.
struct SlotHeaders {
    headers: *mut [SlotHeader],
}

impl SlotHeaders {
    fn new(count: usize) -> Self {
        let headers: Box<[SlotHeader]> = (0..count)
            // SAFETY: a msghdr, an iovec and a sockaddr_in are plain C structs of integers and
            // pointers, for which all zeroes (null pointers) is valid.
            .map(|_| unsafe { std::mem::zeroed::<SlotHeader>() })
            .collect();
        Self {
            headers: Box::into_raw(headers),
        }
    }

    /// Point slot `slot`'s header at `len` bytes from `buf`, addressed to `peer`.
    ///
    /// # Safety
    /// No operation may be in flight on the slot's header.
    unsafe fn prepare_send(
        &self,
        slot: usize,
        buf: *mut u8,
        len: usize,
        peer: SocketAddrV4,
    ) -> *mut libc::msghdr {
        assert!(slot < self.headers.len(), "header slot {slot} out of range");
        // SAFETY: slot is in range, so the element is inside the allocation; by the caller's
        // promise the kernel does not use it; fields are reached without creating references.
        unsafe {
            let header = self.headers.cast::<SlotHeader>().add(slot);
            (*header).iov = libc::iovec {
                iov_base: buf.cast(),
                iov_len: len,
            };
            (*header).addr = to_sockaddr(peer);
            let msg = std::ptr::addr_of_mut!((*header).msg);
            (*msg).msg_name = std::ptr::addr_of_mut!((*header).addr).cast();
            (*msg).msg_namelen = SOCKADDR_IN_LEN;
            (*msg).msg_iov = std::ptr::addr_of_mut!((*header).iov);
            (*msg).msg_iovlen = 1;
            (*msg).msg_control = std::ptr::null_mut();
            (*msg).msg_controllen = 0;
            (*msg).msg_flags = 0;
            msg
        }
    }
}

impl Drop for SlotHeaders {
    fn drop(&mut self) {
        // SAFETY: the pointer came from Box::into_raw and is freed once.
        drop(unsafe { Box::from_raw(self.headers) });
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
    headers: ManuallyDrop<SlotHeaders>,
    tun_intake: Intake,
    udp_intake: Intake,
    /// The `msghdr` the multishot `recvmsg` was armed with: only its name and control lengths
    /// matter, and they shape what the kernel writes before each datagram.
    recv_template: Box<libc::msghdr>,
    in_flight: usize,
    read_failures: u32,
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
    ) -> Result<Self, WorkerError> {
        let entries = (SLOTS + 4).next_power_of_two() as u32;
        let ring = build_ring(entries).map_err(|e| WorkerError::setup("io_uring", e))?;
        check_opcodes(&ring)?;
        ring.submitter()
            .register_files(&[
                tun.as_raw_fd(),
                socket.as_raw_fd(),
                stop.as_fd().as_raw_fd(),
            ])
            .map_err(|e| WorkerError::setup("io_uring registered files", e))?;
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths).
        let mut recv_template: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        recv_template.msg_namelen = SOCKADDR_IN_LEN;
        let completions = Vec::with_capacity(ring.params().cq_entries() as usize);
        let mut worker = Self {
            ring,
            buffers: ManuallyDrop::new(PacketBuffers::new(SLOTS)),
            headers: ManuallyDrop::new(SlotHeaders::new(SLOTS)),
            tun_intake: Intake::new(0, TUN_SLOTS),
            udp_intake: Intake::new(TUN_SLOTS, UDP_SLOTS),
            recv_template,
            in_flight: 0,
            read_failures: 0,
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
        self.push(
            opcode::PollAdd::new(STOP_FILE, libc::POLLIN as u32)
                .build()
                .user_data(Op::Stop.encode(0)),
        )?;
        loop {
            self.tun_intake.ring.publish();
            self.udp_intake.ring.publish();
            self.arm_intakes()?;
            self.submit_and_wait()?;
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
        let mut flow = Flow::Continue;
        let mut packets = 0u64;
        for index in 0..self.completions.len() {
            let (user_data, result, flags) = self.completions[index];
            let Some((op, slot)) = Op::decode(user_data) else {
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
                    self.read_failures = 0;
                    packets += 1;
                    let action = self.decide(op, slot, result as usize, &table, context, counts);
                    self.execute(slot, action)?;
                }
                Op::Send | Op::Write | Op::SendReply | Op::WriteReply => {
                    if result < 0 && write_error_is_fatal(-result) {
                        return Err(WorkerError::fatal(op.what(), -result));
                    }
                    let udp = matches!(op, Op::Send | Op::SendReply);
                    let source = match op {
                        Op::SendReply | Op::WriteReply => Source::Reply,
                        _ => Source::Packet,
                    };
                    count_output(counts, udp, source, i64::from(result));
                    self.give_back(slot);
                }
                Op::Stop => flow = Flow::Stop,
                Op::Cancel => {}
            }
        }
        if packets > 0 {
            counts.batches += 1;
            counts.batch_packets += packets;
        }
        Ok(flow)
    }

    /// Decide on the packet a read put in `slot` (`result` is the completion's byte count),
    /// and count its arrival.
    fn decide(
        &mut self,
        op: Op,
        slot: usize,
        result: usize,
        table: &RouteTable,
        context: &WorkerContext,
        counts: &mut BatchCounts,
    ) -> Action {
        let policy: &Policy = &context.policy;
        if op == Op::TunRead {
            let len = result.min(PACKET_BUF_LEN);
            counts.tun_rx_packets += 1;
            counts.tun_rx_bytes += len as u64;
            // SAFETY: the kernel filled this buffer and handed it over with the completion;
            // it is lent to nobody else until given back.
            let (packet, reply) = unsafe { self.buffers.slot(slot, len) };
            let decision = decide::from_tun(packet, table, policy, reply);
            return plan(decision, len, counts);
        }
        // SAFETY: as above; the kernel wrote `result` bytes starting RECV_PREFIX bytes
        // before the packet buffer.
        let prefix = unsafe { self.buffers.with_headroom(slot, RECV_PREFIX, result) };
        let received = parse_recvmsg_out(prefix);
        let len = received.map_or(0, |r| r.len);
        counts.udp_rx_packets += 1;
        counts.udp_rx_bytes += len as u64;
        // SAFETY: as above.
        let (packet, reply) = unsafe { self.buffers.slot(slot, len) };
        let decision = match received {
            None => Decision::Drop(DropReason::BadPacket),
            Some(r) if r.truncated => Decision::Drop(DropReason::TooBig),
            Some(Received { from: None, .. }) => Decision::Drop(UNREADABLE_SENDER),
            Some(Received {
                from: Some(from), ..
            }) => decide::from_peer(from, packet, table, policy, reply),
        };
        plan(decision, len, counts)
    }

    /// Carry out `action` for the packet in `slot`.
    fn execute(&mut self, slot: usize, action: Action) -> Result<(), WorkerError> {
        match action {
            Action::Recycle => {
                self.give_back(slot);
                Ok(())
            }
            Action::Send { to, source, len } => {
                let buf = self.buffers.source_ptr(slot, source);
                // SAFETY: the slot is the worker's until given back, and its header is used
                // by this send alone.
                let msg = unsafe { self.headers.prepare_send(slot, buf, len, to) };
                let op = match source {
                    Source::Packet => Op::Send,
                    Source::Reply => Op::SendReply,
                };
                self.push(
                    opcode::SendMsg::new(SOCKET_FILE, msg)
                        .build()
                        .user_data(op.encode(slot)),
                )
            }
            Action::Write { source, len } => {
                let buf = self.buffers.source_ptr(slot, source);
                let op = match source {
                    Source::Packet => Op::Write,
                    Source::Reply => Op::WriteReply,
                };
                self.push(
                    opcode::Write::new(TUN_FILE, buf, len as u32)
                        .build()
                        .user_data(op.encode(slot)),
                )
            }
        }
    }

    /// Lend `slot`'s buffer to the kernel again, through its intake's ring.
    fn give_back(&mut self, slot: usize) {
        let intake = if slot < TUN_SLOTS {
            &mut self.tun_intake
        } else {
            &mut self.udp_intake
        };
        let bid = (slot - intake.first_slot) as u16;
        intake.lent = intake.lent.saturating_sub(1);
        if slot < TUN_SLOTS {
            let addr = self.buffers.packet_ptr(slot);
            intake.ring.give(bid, addr, PACKET_BUF_LEN);
        } else {
            // The kernel writes its recvmsg header and the sender's address in front of the
            // datagram, so the packet itself lands at the start of the packet buffer.
            let addr = self.buffers.headroom_ptr(slot, RECV_PREFIX);
            intake.ring.give(bid, addr, RECV_PREFIX + PACKET_BUF_LEN);
        }
    }

    /// Arm the multishot reads that are not armed and have buffers to fill.
    fn arm_intakes(&mut self) -> Result<(), WorkerError> {
        if !self.tun_intake.armed && self.tun_intake.has_free_buffers() {
            self.tun_intake.armed = true;
            self.push(
                opcode::ReadMulti::new(TUN_FILE, 0, TUN_GROUP)
                    .build()
                    .user_data(Op::TunRead.encode(0)),
            )?;
        }
        if !self.udp_intake.armed && self.udp_intake.has_free_buffers() {
            self.udp_intake.armed = true;
            let template: *const libc::msghdr = &*self.recv_template;
            self.push(
                opcode::RecvMsgMulti::new(SOCKET_FILE, template, UDP_GROUP)
                    .build()
                    .user_data(Op::UdpRecv.encode(0)),
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
        // No free buffer: the request ended and is re-armed once buffers come back.
        if errno == libc::ENOBUFS || errno == libc::EAGAIN || errno == libc::EINTR {
            return Ok(());
        }
        if read_error_is_fatal(errno) {
            return Err(WorkerError::fatal(op.what(), errno));
        }
        self.read_failures += 1;
        if self.read_failures > MAX_READ_FAILURES_IN_A_ROW {
            return Err(WorkerError::fatal(op.what(), errno));
        }
        Ok(())
    }

    /// Queue `entry`; it goes to the kernel with the next wait.
    fn push(&mut self, entry: squeue::Entry) -> Result<(), WorkerError> {
        loop {
            // SAFETY: every pointer in an entry built by this worker leads into `buffers`,
            // `headers` or `recv_template`, which stay allocated until the operation has
            // completed (`Drop` waits for every operation before freeing them), and into a
            // slot that no other operation uses.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            // The queue is full (it cannot be with one operation per slot, but be safe):
            // hand what is queued to the kernel to make room.
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

    /// Submit everything queued and wait for at least one completion.
    fn submit_and_wait(&mut self) -> Result<(), WorkerError> {
        loop {
            match self.ring.submit_and_wait(1) {
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
            .user_data(Op::Cancel.encode(0));
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
        // buffers or headers; each is dropped exactly once, here.
        unsafe {
            ManuallyDrop::drop(&mut self.buffers);
            ManuallyDrop::drop(&mut self.headers);
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

/// What a multishot `recvmsg` reported about one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Received {
    from: Option<SocketAddrV4>,
    len: usize,
    truncated: bool,
}

/// Read the `io_uring_recvmsg_out` header and the sender's address in front of a datagram;
/// `bytes` is everything the kernel reported writing. `None` if it is too short to hold them.
fn parse_recvmsg_out(bytes: &[u8]) -> Option<Received> {
    let word = |i: usize| -> Option<u32> {
        let raw: [u8; 4] = bytes.get(i * 4..i * 4 + 4)?.try_into().ok()?;
        Some(u32::from_ne_bytes(raw))
    };
    let (namelen, _controllen, payloadlen, flags) = (word(0)?, word(1)?, word(2)?, word(3)?);
    let name = bytes.get(RECVMSG_OUT_LEN..RECV_PREFIX)?;
    // SAFETY: `name` holds exactly size_of::<sockaddr_in>() bytes; read_unaligned copies them
    // into a sockaddr_in, a plain C struct valid for any bit pattern.
    let addr: libc::sockaddr_in =
        unsafe { std::ptr::read_unaligned(name.as_ptr().cast::<libc::sockaddr_in>()) };
    let from = from_sockaddr(&addr, namelen.min(SOCKADDR_IN_LEN));
    let written = bytes.len() - RECV_PREFIX;
    let len = (payloadlen as usize).min(written);
    let truncated = flags & libc::MSG_TRUNC as u32 != 0 || (payloadlen as usize) > written;
    Some(Received {
        from,
        len,
        truncated,
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
        (opcode::Write::CODE, "WRITE"),
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

/// A ring with `entries` submission slots. Deferred task work on a single issuer keeps
/// completions from interrupting the loop (they are run only when it waits); `SUBMIT_ALL`
/// keeps one bad entry from holding back the rest. Older kernels get a plain ring.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let tuned = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_submit_all()
        .build(entries);
    match tuned {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!("io_uring without DEFER_TASKRUN: {e}");
            IoUring::builder().build(entries)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn user_data_round_trips() {
        for op in Op::ALL {
            for slot in [0, 1, TUN_SLOTS, SLOTS - 1, u32::MAX as usize] {
                assert_eq!(Op::decode(op.encode(slot)), Some((op, slot)));
            }
        }
        assert_eq!(Op::decode(0), None);
        assert_eq!(Op::decode(u64::MAX), None);
    }

    #[test]
    fn send_headers_point_at_their_own_slot() {
        let headers = SlotHeaders::new(2);
        let mut buf = [0u8; 16];
        let peer = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285);
        // SAFETY: no I/O uses these headers.
        unsafe {
            let msg = headers.prepare_send(1, buf.as_mut_ptr(), 9, peer);
            assert_eq!((*msg).msg_iovlen, 1);
            assert_eq!((*(*msg).msg_iov).iov_len, 9);
            assert_eq!((*(*msg).msg_iov).iov_base, buf.as_mut_ptr().cast());
            let addr = &*((*msg).msg_name as *const libc::sockaddr_in);
            assert_eq!(from_sockaddr(addr, (*msg).msg_namelen), Some(peer));
        }
    }

    fn recvmsg_out(namelen: u32, payloadlen: u32, flags: u32, from: SocketAddrV4) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [namelen, 0, payloadlen, flags] {
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
        bytes
    }

    #[test]
    fn recvmsg_headers_are_read() {
        let peer = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285);
        let mut bytes = recvmsg_out(16, 5, 0, peer);
        bytes.extend_from_slice(b"hello");
        assert_eq!(
            parse_recvmsg_out(&bytes),
            Some(Received {
                from: Some(peer),
                len: 5,
                truncated: false
            })
        );
        // The kernel says more arrived than it wrote: truncated.
        let mut bytes = recvmsg_out(16, 9, 0, peer);
        bytes.extend_from_slice(b"hello");
        assert!(parse_recvmsg_out(&bytes).unwrap().truncated);
        let bytes = recvmsg_out(16, 0, libc::MSG_TRUNC as u32, peer);
        assert!(parse_recvmsg_out(&bytes).unwrap().truncated);
        // A short name is not an IPv4 sender.
        let bytes = recvmsg_out(2, 0, 0, peer);
        assert_eq!(parse_recvmsg_out(&bytes).unwrap().from, None);
        // Too short for the header.
        assert_eq!(parse_recvmsg_out(&bytes[..RECV_PREFIX - 1]), None);
        assert_eq!(parse_recvmsg_out(&[]), None);
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
