//! One data-plane worker: a thread that owns a TUN queue, a UDP socket and an I/O back end,
//! and moves packets between them until told to stop.
//!
//! Both back ends ([`crate::uring`] and [`crate::syscalls`]) share what is here: the stop
//! signal, how a [`Decision`] turns into an I/O action and which counters it touches, which
//! errors end a worker, the thread itself and its optional pinning to a core.

use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::counters::{BatchCounts, DropReason, WorkerCounters};
use crate::decide::{Decision, Policy, REPLY_BUF_LEN};
use crate::engine::IoBackend;
use crate::route::Routes;
use crate::tun::TunQueue;

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
/// (io_uring's `recvmsg` header and the sender's address; later a virtio-net header).
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

    /// The start of `source`'s buffer for `slot`.
    pub(crate) fn source_ptr(&self, slot: usize, source: Source) -> *mut u8 {
        match source {
            Source::Packet => self.packet_ptr(slot),
            Source::Reply => self.reply_ptr(slot),
        }
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

/// The I/O a decision asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send `len` bytes of `source` as one datagram to `to`.
    Send {
        to: SocketAddrV4,
        source: Source,
        len: usize,
    },
    /// Write `len` bytes of `source` to the TUN.
    Write { source: Source, len: usize },
    /// Nothing to send: the buffer goes back to reading.
    Recycle,
}

/// Turn `decision` about a `packet_len`-byte packet into I/O and count its drops. A reply
/// whose length does not fit the reply buffer is not sent (its drop is still counted).
pub(crate) fn plan(decision: Decision, packet_len: usize, counts: &mut BatchCounts) -> Action {
    let reply_fits = |len: usize| len > 0 && len <= REPLY_BUF_LEN;
    match decision {
        Decision::SendToPeer(to) => Action::Send {
            to,
            source: Source::Packet,
            len: packet_len,
        },
        Decision::WriteToTun => Action::Write {
            source: Source::Packet,
            len: packet_len,
        },
        Decision::ReplyToTun { len, reason } => {
            counts.drop(reason);
            if reply_fits(len) {
                Action::Write {
                    source: Source::Reply,
                    len,
                }
            } else {
                Action::Recycle
            }
        }
        Decision::ReplyToPeer { to, len, reason } => {
            counts.drop(reason);
            if reply_fits(len) {
                Action::Send {
                    to,
                    source: Source::Reply,
                    len,
                }
            } else {
                Action::Recycle
            }
        }
        Decision::Drop(reason) => {
            counts.drop(reason);
            Action::Recycle
        }
    }
}

/// Count the outcome of a send (`udp == true`) or TUN write of `len` bytes from `source`:
/// `result` is the kernel's byte count or a negative errno.
pub(crate) fn count_output(counts: &mut BatchCounts, udp: bool, source: Source, result: i64) {
    if result < 0 {
        counts.io_errors += 1;
        return;
    }
    let bytes = result as u64;
    match (source, udp) {
        (Source::Reply, _) => counts.icmp_sent += 1,
        (Source::Packet, true) => {
            counts.udp_tx_packets += 1;
            counts.udp_tx_bytes += bytes;
        }
        (Source::Packet, false) => {
            counts.tun_tx_packets += 1;
            counts.tun_tx_bytes += bytes;
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
            crate::uring::UringWorker::new(tun, socket, stop).and_then(|mut worker| {
                let _ = ready.send(());
                worker.run(&context)
            })
        }
        IoBackend::Syscalls => {
            crate::syscalls::SyscallWorker::new(tun, socket, stop).and_then(|mut worker| {
                let _ = ready.send(());
                worker.run(&context)
            })
        }
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
    use std::net::Ipv4Addr;

    fn peer() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285)
    }

    #[test]
    fn forwarding_decisions_use_the_packet_buffer() {
        let mut counts = BatchCounts::default();
        assert_eq!(
            plan(Decision::SendToPeer(peer()), 1400, &mut counts),
            Action::Send {
                to: peer(),
                source: Source::Packet,
                len: 1400
            }
        );
        assert_eq!(
            plan(Decision::WriteToTun, 60, &mut counts),
            Action::Write {
                source: Source::Packet,
                len: 60
            }
        );
        assert_eq!(counts, BatchCounts::default(), "forwarding counts no drop");
    }

    #[test]
    fn replies_count_the_drop_and_use_the_reply_buffer() {
        let mut counts = BatchCounts::default();
        let to_tun = Decision::ReplyToTun {
            len: 56,
            reason: DropReason::NoRoute,
        };
        assert_eq!(
            plan(to_tun, 84, &mut counts),
            Action::Write {
                source: Source::Reply,
                len: 56
            }
        );
        let to_peer = Decision::ReplyToPeer {
            to: peer(),
            len: 56,
            reason: DropReason::TtlExpired,
        };
        assert_eq!(
            plan(to_peer, 84, &mut counts),
            Action::Send {
                to: peer(),
                source: Source::Reply,
                len: 56
            }
        );
        assert_eq!(counts.drops[DropReason::NoRoute as usize], 1);
        assert_eq!(counts.drops[DropReason::TtlExpired as usize], 1);
    }

    #[test]
    fn impossible_reply_lengths_are_not_sent() {
        let mut counts = BatchCounts::default();
        for len in [0, REPLY_BUF_LEN + 1, usize::MAX] {
            let decision = Decision::ReplyToTun {
                len,
                reason: DropReason::TooBig,
            };
            assert_eq!(plan(decision, 2000, &mut counts), Action::Recycle);
        }
        assert_eq!(counts.drops[DropReason::TooBig as usize], 3);
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let mut counts = BatchCounts::default();
        assert_eq!(
            plan(Decision::Drop(DropReason::SpoofedSource), 100, &mut counts),
            Action::Recycle
        );
        assert_eq!(counts.drops[DropReason::SpoofedSource as usize], 1);
    }

    #[test]
    fn outputs_are_counted_by_path() {
        let mut counts = BatchCounts::default();
        count_output(&mut counts, true, Source::Packet, 1400);
        count_output(&mut counts, false, Source::Packet, 60);
        count_output(&mut counts, false, Source::Reply, 56);
        count_output(&mut counts, true, Source::Reply, 56);
        count_output(&mut counts, true, Source::Packet, -i64::from(libc::ENOBUFS));
        assert_eq!((counts.udp_tx_packets, counts.udp_tx_bytes), (1, 1400));
        assert_eq!((counts.tun_tx_packets, counts.tun_tx_bytes), (1, 60));
        assert_eq!(counts.icmp_sent, 2);
        assert_eq!(counts.io_errors, 1);
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
