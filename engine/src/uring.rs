//! The io_uring back end of a worker.
//!
//! Every packet slot owns a 64 KiB buffer, a reply buffer, a `msghdr`, an `iovec` and a
//! `sockaddr_in` at fixed addresses. [`TUN_SLOTS`] slots keep a TUN read in flight and
//! [`UDP_SLOTS`] slots keep a `recvmsg` in flight. When a read completes, the packet is decided
//! on where it lies and leaves from the same buffer (a `sendmsg` to the peer or a TUN write: no
//! copy); when that completes, the slot reads again. ICMP errors leave from the slot's reply
//! buffer. Completions are reaped in batches and every operation they cause is submitted with
//! the next wait, one `io_uring_enter` per loop. A poll on the stop eventfd stays in the ring,
//! so a stop request ends the wait at once.
//!
//! Before the buffers are freed, every operation still in flight is cancelled and its
//! completion awaited; if the kernel does not answer in time, the buffers are leaked rather
//! than freed under it.

use std::io;
use std::mem::ManuallyDrop;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

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

/// Slots that read from the TUN and send to peers.
pub const TUN_SLOTS: usize = 64;
/// Slots that receive from peers and write to the TUN.
pub const UDP_SLOTS: usize = 64;

const SLOTS: usize = TUN_SLOTS + UDP_SLOTS;

/// Registered-file indexes: the kernel skips the descriptor-table lookup for each operation.
const TUN_FILE: types::Fixed = types::Fixed(0);
const SOCKET_FILE: types::Fixed = types::Fixed(1);
const STOP_FILE: types::Fixed = types::Fixed(2);

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
}

/// A slot's message header, pointing at the slot's own `iovec` and address.
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

    fn header(&self, slot: usize) -> *mut SlotHeader {
        assert!(slot < self.headers.len(), "header slot {slot} out of range");
        // SAFETY: slot is in range, so the element pointer stays inside the allocation.
        unsafe { self.headers.cast::<SlotHeader>().add(slot) }
    }

    /// Point slot `slot`'s header at `len` bytes from `buf` and, for a send, at `peer`.
    ///
    /// # Safety
    /// No operation may be in flight on the slot.
    unsafe fn prepare(
        &self,
        slot: usize,
        buf: *mut u8,
        len: usize,
        peer: Option<SocketAddrV4>,
    ) -> *mut libc::msghdr {
        let header = self.header(slot);
        // SAFETY: the header is inside the allocation and, by the caller's promise, not in
        // use by the kernel; field pointers are taken without creating references.
        unsafe {
            (*header).iov = libc::iovec {
                iov_base: buf.cast(),
                iov_len: len,
            };
            (*header).addr = match peer {
                Some(peer) => to_sockaddr(peer),
                None => std::mem::zeroed(),
            };
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

    /// The sender the kernel recorded for slot `slot`'s last `recvmsg`, and whether the
    /// datagram was truncated.
    ///
    /// # Safety
    /// No operation may be in flight on the slot.
    unsafe fn received_from(&self, slot: usize) -> (Option<SocketAddrV4>, bool) {
        let header = self.header(slot);
        // SAFETY: the header is inside the allocation and the kernel is done with it.
        unsafe {
            let from = from_sockaddr(&(*header).addr, (*header).msg.msg_namelen);
            let truncated = (*header).msg.msg_flags & libc::MSG_TRUNC != 0;
            (from, truncated)
        }
    }
}

impl Drop for SlotHeaders {
    fn drop(&mut self) {
        // SAFETY: the pointer came from Box::into_raw and is freed once.
        drop(unsafe { Box::from_raw(self.headers) });
    }
}

/// A worker's ring, its slots and the descriptors they read and write.
pub(crate) struct UringWorker {
    ring: IoUring,
    // Freed only after every operation that uses them has completed (see `Drop`).
    buffers: ManuallyDrop<PacketBuffers>,
    headers: ManuallyDrop<SlotHeaders>,
    in_flight: usize,
    read_failures: u32,
    completions: Vec<(u64, i32)>,
    // Registered with the ring; kept open until the ring is gone.
    _tun: TunQueue,
    _socket: UdpSocket,
    _stop: Arc<StopSignal>,
}

impl UringWorker {
    /// Set up the ring (on the calling thread, which must be the one that runs it) and
    /// register the TUN queue, the socket and the stop signal with it.
    pub(crate) fn new(
        tun: TunQueue,
        socket: UdpSocket,
        stop: Arc<StopSignal>,
    ) -> Result<Self, WorkerError> {
        let entries = (SLOTS + 2).next_power_of_two() as u32;
        let ring = build_ring(entries).map_err(|e| WorkerError::setup("io_uring", e))?;
        ring.submitter()
            .register_files(&[
                tun.as_raw_fd(),
                socket.as_raw_fd(),
                stop.as_fd().as_raw_fd(),
            ])
            .map_err(|e| WorkerError::setup("io_uring registered files", e))?;
        let completions = Vec::with_capacity(ring.params().cq_entries() as usize);
        Ok(Self {
            ring,
            buffers: ManuallyDrop::new(PacketBuffers::new(SLOTS)),
            headers: ManuallyDrop::new(SlotHeaders::new(SLOTS)),
            in_flight: 0,
            read_failures: 0,
            completions,
            _tun: tun,
            _socket: socket,
            _stop: stop,
        })
    }

    /// Move packets until the stop signal is raised or a fatal error occurs.
    pub(crate) fn run(&mut self, context: &WorkerContext) -> Result<(), WorkerError> {
        self.push(
            opcode::PollAdd::new(STOP_FILE, libc::POLLIN as u32)
                .build()
                .user_data(Op::Stop.encode(0)),
        )?;
        for slot in 0..SLOTS {
            self.read_into(slot)?;
        }
        loop {
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
            let (user_data, result) = self.completions[index];
            let Some((op, slot)) = Op::decode(user_data) else {
                continue;
            };
            match op {
                Op::TunRead | Op::UdpRecv => {
                    if result < 0 {
                        self.read_failed(op, slot, -result)?;
                        continue;
                    }
                    self.read_failures = 0;
                    packets += 1;
                    let len = (result as usize).min(PACKET_BUF_LEN);
                    let action = self.decide(op, slot, len, &table, &context.policy, counts);
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
                    self.read_into(slot)?;
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

    /// Decide on the `len`-byte packet a read put in `slot`, and count its arrival.
    fn decide(
        &mut self,
        op: Op,
        slot: usize,
        len: usize,
        table: &RouteTable,
        policy: &Policy,
        counts: &mut BatchCounts,
    ) -> Action {
        let decision = if op == Op::TunRead {
            counts.tun_rx_packets += 1;
            counts.tun_rx_bytes += len as u64;
            // SAFETY: the read on this slot has just completed and nothing else is in flight
            // on it: a slot holds one operation at a time.
            let (packet, reply) = unsafe { self.buffers.slot(slot, len) };
            decide::from_tun(packet, table, policy, reply)
        } else {
            counts.udp_rx_packets += 1;
            counts.udp_rx_bytes += len as u64;
            // SAFETY: as above, the slot's recvmsg has completed.
            let (from, truncated) = unsafe { self.headers.received_from(slot) };
            // SAFETY: as above.
            let (packet, reply) = unsafe { self.buffers.slot(slot, len) };
            match from {
                _ if truncated => Decision::Drop(DropReason::TooBig),
                Some(from) => decide::from_peer(from, packet, table, policy, reply),
                None => Decision::Drop(UNREADABLE_SENDER),
            }
        };
        plan(decision, len, counts)
    }

    /// Carry out `action` for the packet in `slot`.
    fn execute(&mut self, slot: usize, action: Action) -> Result<(), WorkerError> {
        match action {
            Action::Recycle => self.read_into(slot),
            Action::Send { to, source, len } => {
                let buf = self.buffers.source_ptr(slot, source);
                // SAFETY: the slot's read has completed and this send becomes its only
                // operation.
                let msg = unsafe { self.headers.prepare(slot, buf, len, Some(to)) };
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

    /// Give `slot` back to reading: a TUN read or a `recvmsg`, by the slot's kind.
    fn read_into(&mut self, slot: usize) -> Result<(), WorkerError> {
        let buf = self.buffers.packet_ptr(slot);
        let entry = if slot < TUN_SLOTS {
            opcode::Read::new(TUN_FILE, buf, PACKET_BUF_LEN as u32)
                .build()
                .user_data(Op::TunRead.encode(slot))
        } else {
            // SAFETY: the slot's previous operation has completed (or it never had one).
            let msg = unsafe { self.headers.prepare(slot, buf, PACKET_BUF_LEN, None) };
            opcode::RecvMsg::new(SOCKET_FILE, msg)
                .build()
                .user_data(Op::UdpRecv.encode(slot))
        };
        self.push(entry)
    }

    fn read_failed(&mut self, op: Op, slot: usize, errno: i32) -> Result<(), WorkerError> {
        if read_error_is_fatal(errno) {
            return Err(WorkerError::fatal(op.what(), errno));
        }
        if errno != libc::EAGAIN && errno != libc::EINTR {
            self.read_failures += 1;
            if self.read_failures > MAX_READ_FAILURES_IN_A_ROW {
                return Err(WorkerError::fatal(op.what(), errno));
            }
        }
        self.read_into(slot)
    }

    /// Queue `entry`; it goes to the kernel with the next wait.
    fn push(&mut self, entry: squeue::Entry) -> Result<(), WorkerError> {
        loop {
            // SAFETY: every pointer in an entry built by this worker leads into `buffers` or
            // `headers`, which stay allocated until the operation has completed (`Drop` waits
            // for every operation before freeing them), and into a slot that has no other
            // operation in flight.
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

    /// Move every available completion into `self.completions`.
    fn reap(&mut self) {
        self.completions.clear();
        for cqe in self.ring.completion() {
            self.completions.push((cqe.user_data(), cqe.result()));
        }
        self.in_flight = self.in_flight.saturating_sub(self.completions.len());
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
        if self.cancel_and_drain() {
            // The ring is torn down asynchronously after its descriptor closes; releasing the
            // registered files now closes the TUN queue and the socket before `drop` returns,
            // so the device is gone when the engine says it has stopped.
            if let Err(error) = self.ring.submitter().unregister_files() {
                tracing::debug!(%error, "cannot unregister io_uring files");
            }
            // SAFETY: no operation is in flight any more, so nothing else refers to the
            // buffers or headers, and they are dropped exactly once, here.
            unsafe {
                ManuallyDrop::drop(&mut self.buffers);
                ManuallyDrop::drop(&mut self.headers);
            }
        } else {
            tracing::warn!(
                in_flight = self.in_flight,
                "io_uring operations did not complete; leaking their buffers"
            );
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

impl Op {
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
    fn headers_point_at_their_own_slot() {
        let headers = SlotHeaders::new(2);
        let mut buf = [0u8; 16];
        let peer = SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 0, 2), 8285);
        // SAFETY: no I/O uses these headers.
        unsafe {
            let msg = headers.prepare(1, buf.as_mut_ptr(), 9, Some(peer));
            assert_eq!((*msg).msg_iovlen, 1);
            assert_eq!((*(*msg).msg_iov).iov_len, 9);
            assert_eq!((*(*msg).msg_iov).iov_base, buf.as_mut_ptr().cast());
            let addr = &*((*msg).msg_name as *const libc::sockaddr_in);
            assert_eq!(from_sockaddr(addr, (*msg).msg_namelen), Some(peer));
            assert_eq!(headers.received_from(1), (Some(peer), false));
            let msg = headers.prepare(0, buf.as_mut_ptr(), 16, None);
            assert_eq!((*msg).msg_namelen, SOCKADDR_IN_LEN);
            assert_eq!(headers.received_from(0).0, None);
        }
    }
}
