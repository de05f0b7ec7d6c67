//! The batched-system-call back end of a worker: `poll`, `read`, `sendmmsg`, `recvmmsg` and
//! `writev`, for kernels or workloads where io_uring does not pay.
//!
//! One loop waits in `poll(2)` on the TUN queue, the socket and the stop eventfd. A readable TUN
//! is drained with `read` into up to [`BATCH`] buffers, every packet is decided on, and the
//! datagrams go out with one `sendmmsg`. A readable socket gives up to [`BATCH`] datagrams in
//! one `recvmmsg`; each accepted packet is written to the TUN with `writev`. While batches come
//! back full, `poll` does not wait. A send queue that the kernel cannot take (`EAGAIN`) waits
//! for the socket to become writable instead of spinning; a packet the kernel refuses is
//! counted in `io_errors` and skipped.

use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use crate::counters::{BatchCounts, DropReason};
use crate::decide::{self, Decision, Policy};
use crate::route::RouteTable;
use crate::tun::TunQueue;
use crate::udp::{from_sockaddr, to_sockaddr, SOCKADDR_IN_LEN};
use crate::worker::{
    count_output, plan, read_error_is_fatal, write_error_is_fatal, Action, PacketBuffers, Source,
    StopSignal, WorkerContext, WorkerError, BATCH, MAX_READ_FAILURES_IN_A_ROW, PACKET_BUF_LEN,
    UNREADABLE_SENDER,
};

/// How long a send waits for room in the socket buffer before giving the rest of its batch up.
const SEND_WAIT_MS: libc::c_int = 1000;

/// Buffer slots `0..BATCH` hold packets read from the TUN, `BATCH..2*BATCH` datagrams.
const UDP_BASE: usize = BATCH;

/// A worker's descriptors, buffers and the message arrays of one batch.
pub(crate) struct SyscallWorker {
    tun: TunQueue,
    socket: UdpSocket,
    stop: Arc<StopSignal>,
    buffers: PacketBuffers,
    tun_lens: [usize; BATCH],
    recv: MessageArray,
    send: MessageArray,
    send_sources: [Source; BATCH],
    send_len: usize,
    read_failures: u32,
}

/// `mmsghdr`s with their `iovec`s and addresses, one of each per message.
struct MessageArray {
    headers: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_in]>,
}

impl MessageArray {
    fn new() -> Self {
        Self {
            // SAFETY: mmsghdr, iovec and sockaddr_in are plain C structs of integers and
            // pointers; all zeroes (null pointers) is a valid value of each.
            headers: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            iovs: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            addrs: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
        }
    }

    /// Point message `i` at `len` bytes from `buf` and at the address slot `i`.
    fn set(&mut self, i: usize, buf: *mut u8, len: usize, peer: Option<SocketAddrV4>) {
        self.iovs[i] = libc::iovec {
            iov_base: buf.cast(),
            iov_len: len,
        };
        self.addrs[i] = match peer {
            Some(peer) => to_sockaddr(peer),
            // SAFETY: all zeroes is a valid sockaddr_in.
            None => unsafe { std::mem::zeroed() },
        };
    }

    /// Link every header to its iovec and address; done right before each system call, so
    /// the pointers are fresh.
    fn link(&mut self, count: usize) {
        let iovs = self.iovs.as_mut_ptr();
        let addrs = self.addrs.as_mut_ptr();
        for (i, header) in self.headers.iter_mut().take(count).enumerate() {
            header.msg_len = 0;
            let msg = &mut header.msg_hdr;
            // SAFETY: i < count <= BATCH, the length of both arrays.
            msg.msg_iov = unsafe { iovs.add(i) };
            msg.msg_iovlen = 1;
            // SAFETY: as above.
            msg.msg_name = unsafe { addrs.add(i) }.cast();
            msg.msg_namelen = SOCKADDR_IN_LEN;
            msg.msg_control = std::ptr::null_mut();
            msg.msg_controllen = 0;
            msg.msg_flags = 0;
        }
    }
}

impl SyscallWorker {
    pub(crate) fn new(
        tun: TunQueue,
        socket: UdpSocket,
        stop: Arc<StopSignal>,
    ) -> Result<Self, WorkerError> {
        socket
            .set_nonblocking(true)
            .map_err(|e| WorkerError::setup("nonblocking UDP socket", e))?;
        crate::tun::set_nonblocking(tun.as_fd(), true)
            .map_err(|e| WorkerError::setup("nonblocking TUN queue", e))?;
        Ok(Self {
            tun,
            socket,
            stop,
            buffers: PacketBuffers::new(2 * BATCH),
            tun_lens: [0; BATCH],
            recv: MessageArray::new(),
            send: MessageArray::new(),
            send_sources: [Source::Packet; BATCH],
            send_len: 0,
            read_failures: 0,
        })
    }

    /// Move packets until the stop signal is raised or a fatal error occurs.
    pub(crate) fn run(&mut self, context: &WorkerContext) -> Result<(), WorkerError> {
        let mut tun_more = false;
        let mut udp_more = false;
        loop {
            // With work left over, only look (timeout 0) whether the other side has some too.
            let timeout = if tun_more || udp_more { 0 } else { -1 };
            let Some(ready) = self.wait(timeout)? else {
                return Ok(());
            };
            let run_tun = tun_more || ready.tun;
            let run_udp = udp_more || ready.udp;
            let mut counts = BatchCounts::default();
            let table = context.routes.snapshot();
            let result = self
                .tun_batch(
                    run_tun,
                    ready.tun_error,
                    &table,
                    &context.policy,
                    &mut counts,
                )
                .and_then(|more| {
                    tun_more = more;
                    self.udp_batch(run_udp, &table, &context.policy, &mut counts)
                })
                .map(|more| udp_more = more);
            let packets = counts.tun_rx_packets + counts.udp_rx_packets;
            if packets > 0 {
                counts.batches += 1;
                counts.batch_packets += packets;
            }
            context.counters.add(&counts);
            result?;
        }
    }

    /// Wait up to `timeout_ms` for the TUN or the socket to become readable; `None` when the
    /// worker must stop.
    fn wait(&self, timeout_ms: libc::c_int) -> Result<Option<Ready>, WorkerError> {
        let mut fds = [
            pollfd(self.stop.as_fd().as_raw_fd(), libc::POLLIN),
            pollfd(self.tun.as_raw_fd(), libc::POLLIN),
            pollfd(self.socket.as_raw_fd(), libc::POLLIN),
        ];
        loop {
            if self.stop.is_raised() {
                return Ok(None);
            }
            // SAFETY: `fds` is a live array of three pollfds and its length is passed.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if rc >= 0 {
                break;
            }
            let errno = last_errno();
            if errno != libc::EINTR && errno != libc::EAGAIN {
                return Err(WorkerError::fatal("poll", errno));
            }
        }
        let [stop, tun, socket] = fds;
        if stop.revents != 0 || self.stop.is_raised() {
            return Ok(None);
        }
        for fd in [tun, socket] {
            if fd.revents & libc::POLLNVAL != 0 {
                return Err(WorkerError::fatal("poll", libc::EBADF));
            }
        }
        Ok(Some(Ready {
            tun: tun.revents != 0,
            tun_error: tun.revents & (libc::POLLERR | libc::POLLHUP) != 0,
            udp: socket.revents != 0,
        }))
    }

    /// Read up to a batch from the TUN and send what goes to peers. Returns whether the batch
    /// was full (more may be waiting).
    fn tun_batch(
        &mut self,
        run: bool,
        tun_error: bool,
        table: &RouteTable,
        policy: &Policy,
        counts: &mut BatchCounts,
    ) -> Result<bool, WorkerError> {
        if !run {
            return Ok(false);
        }
        let mut read = 0;
        while read < BATCH {
            let buf = self.buffers.packet_ptr(read);
            // SAFETY: `buf` is the start of a PACKET_BUF_LEN-byte buffer that nothing else
            // uses during the call.
            let rc = unsafe { libc::read(self.tun.as_raw_fd(), buf.cast(), PACKET_BUF_LEN) };
            if rc < 0 {
                let errno = last_errno();
                match errno {
                    libc::EINTR => continue,
                    libc::EAGAIN => break,
                    _ => {
                        self.read_failed("TUN read", errno)?;
                        break;
                    }
                }
            }
            self.read_failures = 0;
            self.tun_lens[read] = (rc as usize).min(PACKET_BUF_LEN);
            read += 1;
        }
        if read == 0 && tun_error {
            // The queue reports an error but has nothing to read: it was detached.
            return Err(WorkerError::fatal("TUN read", libc::EBADFD));
        }
        for slot in 0..read {
            let len = self.tun_lens[slot];
            counts.tun_rx_packets += 1;
            counts.tun_rx_bytes += len as u64;
            // SAFETY: no I/O is in flight on any buffer between system calls, and the slices
            // end before the next use of the slot.
            let (packet, reply) = unsafe { self.buffers.slot(slot, len) };
            let decision = decide::from_tun(packet, table, policy, reply);
            let action = plan(decision, len, counts);
            self.execute(slot, action, counts)?;
        }
        self.flush_sends(counts)?;
        Ok(read == BATCH)
    }

    /// Receive up to a batch of datagrams and write what is accepted to the TUN. Returns
    /// whether the batch was full.
    fn udp_batch(
        &mut self,
        run: bool,
        table: &RouteTable,
        policy: &Policy,
        counts: &mut BatchCounts,
    ) -> Result<bool, WorkerError> {
        if !run {
            return Ok(false);
        }
        for i in 0..BATCH {
            let buf = self.buffers.packet_ptr(UDP_BASE + i);
            self.recv.set(i, buf, PACKET_BUF_LEN, None);
        }
        self.recv.link(BATCH);
        let received = loop {
            // SAFETY: the headers point at BATCH live iovecs, addresses and buffers, none of
            // which is used elsewhere during the call.
            let rc = unsafe {
                libc::recvmmsg(
                    self.socket.as_raw_fd(),
                    self.recv.headers.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if rc >= 0 {
                break rc as usize;
            }
            let errno = last_errno();
            match errno {
                libc::EINTR => continue,
                libc::EAGAIN => return Ok(false),
                _ => {
                    self.read_failed("UDP receive", errno)?;
                    return Ok(false);
                }
            }
        };
        self.read_failures = 0;
        for i in 0..received.min(BATCH) {
            let header = &self.recv.headers[i];
            let len = (header.msg_len as usize).min(PACKET_BUF_LEN);
            let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let from = from_sockaddr(&self.recv.addrs[i], header.msg_hdr.msg_namelen);
            counts.udp_rx_packets += 1;
            counts.udp_rx_bytes += len as u64;
            let slot = UDP_BASE + i;
            // SAFETY: the recvmmsg call has returned; nothing else uses the slot.
            let (packet, reply) = unsafe { self.buffers.slot(slot, len) };
            let decision = match from {
                _ if truncated => Decision::Drop(DropReason::TooBig),
                Some(from) => decide::from_peer(from, packet, table, policy, reply),
                None => Decision::Drop(UNREADABLE_SENDER),
            };
            let action = plan(decision, len, counts);
            self.execute(slot, action, counts)?;
        }
        self.flush_sends(counts)?;
        Ok(received >= BATCH)
    }

    /// Write to the TUN now, or queue a datagram for the batch's `sendmmsg`.
    fn execute(
        &mut self,
        slot: usize,
        action: Action,
        counts: &mut BatchCounts,
    ) -> Result<(), WorkerError> {
        match action {
            Action::Recycle => Ok(()),
            Action::Write { source, len } => {
                let buf = self.buffers.source_ptr(slot, source);
                let result = write_tun(self.tun.as_raw_fd(), buf, len);
                if result < 0 && write_error_is_fatal(-result as i32) {
                    return Err(WorkerError::fatal("TUN write", -result as i32));
                }
                count_output(counts, false, source, result);
                Ok(())
            }
            Action::Send { to, source, len } => {
                if self.send_len == BATCH {
                    self.flush_sends(counts)?;
                }
                let buf = self.buffers.source_ptr(slot, source);
                self.send.set(self.send_len, buf, len, Some(to));
                self.send_sources[self.send_len] = source;
                self.send_len += 1;
                Ok(())
            }
        }
    }

    /// Send every queued datagram, with as few `sendmmsg` calls as the kernel allows.
    fn flush_sends(&mut self, counts: &mut BatchCounts) -> Result<(), WorkerError> {
        let queued = std::mem::take(&mut self.send_len);
        if queued == 0 {
            return Ok(());
        }
        self.send.link(queued);
        let mut next = 0;
        while next < queued {
            // SAFETY: headers next..queued point at live iovecs, addresses and buffers that
            // nothing else uses during the call.
            let rc = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    self.send.headers.as_mut_ptr().add(next),
                    (queued - next) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                let sent = (rc as usize).min(queued - next);
                for i in next..next + sent {
                    let bytes = self.send.headers[i].msg_len;
                    count_output(counts, true, self.send_sources[i], i64::from(bytes));
                }
                next += sent;
                continue;
            }
            let errno = if rc == 0 { libc::EAGAIN } else { last_errno() };
            match errno {
                libc::EINTR => {}
                libc::EAGAIN => {
                    if !self.wait_writable()? {
                        // No room in time, or stopping: give up the rest of the batch.
                        counts.io_errors += (queued - next) as u64;
                        return Ok(());
                    }
                }
                errno if write_error_is_fatal(errno) => {
                    return Err(WorkerError::fatal("UDP send", errno));
                }
                _ => {
                    // The kernel refused this datagram (no buffer, no route, too big):
                    // count it and go on with the next.
                    counts.io_errors += 1;
                    next += 1;
                }
            }
        }
        Ok(())
    }

    /// Wait for room in the socket's send buffer; `false` on timeout or a stop request.
    fn wait_writable(&self) -> Result<bool, WorkerError> {
        let mut fds = [
            pollfd(self.socket.as_raw_fd(), libc::POLLOUT),
            pollfd(self.stop.as_fd().as_raw_fd(), libc::POLLIN),
        ];
        loop {
            // SAFETY: `fds` is a live array of two pollfds and its length is passed.
            let rc =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, SEND_WAIT_MS) };
            if rc >= 0 {
                break;
            }
            let errno = last_errno();
            if errno != libc::EINTR && errno != libc::EAGAIN {
                return Err(WorkerError::fatal("poll", errno));
            }
        }
        let [socket, stop] = fds;
        Ok(stop.revents == 0 && socket.revents & libc::POLLOUT != 0)
    }

    fn read_failed(&mut self, what: &'static str, errno: i32) -> Result<(), WorkerError> {
        if read_error_is_fatal(errno) {
            return Err(WorkerError::fatal(what, errno));
        }
        self.read_failures += 1;
        if self.read_failures > MAX_READ_FAILURES_IN_A_ROW {
            return Err(WorkerError::fatal(what, errno));
        }
        Ok(())
    }
}

/// Which descriptors `poll` found ready.
#[derive(Clone, Copy, Debug)]
struct Ready {
    tun: bool,
    tun_error: bool,
    udp: bool,
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Write `len` bytes from `buf` to the TUN as one packet; the byte count or a negative errno.
fn write_tun(fd: RawFd, buf: *mut u8, len: usize) -> i64 {
    // One iovec today; a virtio-net header will go in front of the packet as a second one.
    let iov = [libc::iovec {
        iov_base: buf.cast(),
        iov_len: len,
    }];
    loop {
        // SAFETY: `iov` describes `len` live bytes at `buf` that nothing writes during the
        // call.
        let rc = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
        if rc >= 0 {
            return rc as i64;
        }
        let errno = last_errno();
        if errno != libc::EINTR {
            return -i64::from(errno);
        }
    }
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}
