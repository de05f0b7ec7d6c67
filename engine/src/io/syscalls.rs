//! The batched-system-call back end of a worker: `poll`, `read`, `sendmmsg`, `recvmmsg` and
//! `writev`, for kernels or workloads where io_uring does not pay.
//!
//! One loop waits in `poll(2)` on the TUN queue, the socket and the stop eventfd. A readable TUN
//! is drained with `read` into up to [`BATCH`] buffers (super-packets, with TUN offloads), every
//! packet is decided on, and the datagrams — a super-packet's segments as header and payload
//! pieces, runs of equal-sized ones merged by UDP GSO — go out with `sendmmsg`. A readable
//! socket gives up to [`BATCH`] buffers in one `recvmmsg` (each a run of datagrams, with UDP
//! GRO); every datagram is decided on, the accepted ones of the whole batch are coalesced into
//! super-packets where they can be, and each write goes to the TUN with `writev`. While batches
//! come back full, `poll` does not wait. A send queue that the kernel cannot take (`EAGAIN`)
//! waits for the socket to become writable instead of spinning; a datagram the kernel refuses
//! is counted in `io_errors` and skipped.

use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batch::{decide_tun_read, Source, TunAction};
use crate::config::ActiveOffloads;
use crate::counters::BatchCounts;
use crate::crypto::{Opener, Sealer};
use crate::decide::Policy;
use crate::icmp_limit::IcmpGate;
use crate::io::buffers::{PacketBuffers, PACKET_BUF_LEN};
use crate::io::context::WorkerContext;
use crate::io::crypt::{queue_sealed, send_outbox, SEALED_BYTES};
use crate::io::error::{ReadFailures, WorkerError};
use crate::io::execute::{
    count_send, count_write, handle_send_result, queue_segments, reply_write, Accepted,
    DirectWrites, SendOutcome, Written,
};
use crate::io::stop::StopSignal;
use crate::io::tun::TunQueue;
use crate::io::udp::{from_sockaddr, gro_segment_size, SendBatch, CONTROL_LEN, SOCKADDR_IN_LEN};
use crate::offload::segment::MAX_HEADER_LEN;
use crate::poll_window::PollWindow;
use crate::route::RouteTable;

/// How long a send waits for room in the socket buffer before giving the rest of its batch up.
const SEND_WAIT_MS: libc::c_int = 1000;

/// Buffer slots `0..BATCH` hold packets read from the TUN, `BATCH..2*BATCH` datagrams.
const UDP_BASE: usize = BATCH;

/// The send batch's capacity: messages, pieces and segment headers.
const SEND_MESSAGES: usize = 256;
const SEND_PIECES: usize = 4096;
const SEND_HEADERS: usize = 2048;

/// How many packets a worker moves per batch in each direction.
pub(crate) const BATCH: usize = 64;

/// A worker's descriptors, buffers and the message arrays of one batch.
pub(crate) struct SyscallWorker {
    tun: TunQueue,
    socket: UdpSocket,
    stop: Arc<StopSignal>,
    offloads: ActiveOffloads,
    buffers: PacketBuffers,
    tun_lens: [usize; BATCH],
    recv: RecvArray,
    sends: SendBatch,
    accepted: Accepted,
    read_failures: ReadFailures,
    /// The ICMP errors this worker may still send.
    icmp: IcmpGate,
    /// The worker's clock origin, for the ICMP rate limit.
    origin: Instant,
    /// With encryption between hosts: what seals every datagram sent.
    sealer: Option<Sealer>,
}

/// `mmsghdr`s for `recvmmsg`, with their `iovec`s, sender addresses and control buffers.
struct RecvArray {
    headers: Box<[libc::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_in]>,
    controls: Box<[[u64; CONTROL_LEN / 8]]>,
}

impl RecvArray {
    fn new() -> Self {
        Self {
            // SAFETY: mmsghdr, iovec and sockaddr_in are plain C structs of integers and
            // pointers; all zeroes (null pointers) is a valid value of each.
            headers: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            iovs: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            addrs: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            controls: vec![[0u64; CONTROL_LEN / 8]; BATCH].into_boxed_slice(),
        }
    }

    /// Point every header at its buffer, address and (with GRO) control buffer; done right
    /// before each call, so the pointers are fresh.
    fn link(&mut self, buffers: &PacketBuffers, gro: bool) {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: buffers.packet_ptr(UDP_BASE + i).cast(),
                iov_len: PACKET_BUF_LEN,
            };
            let header = &mut self.headers[i];
            header.msg_len = 0;
            let msg = &mut header.msg_hdr;
            msg.msg_iov = &mut self.iovs[i];
            msg.msg_iovlen = 1;
            msg.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            msg.msg_namelen = SOCKADDR_IN_LEN;
            if gro {
                msg.msg_control = self.controls[i].as_mut_ptr().cast();
                msg.msg_controllen = CONTROL_LEN as _;
            } else {
                msg.msg_control = std::ptr::null_mut();
                msg.msg_controllen = 0;
            }
            msg.msg_flags = 0;
        }
    }

    /// The control data message `i` received.
    fn control(&self, i: usize) -> &[u8] {
        // `msg_controllen` is a `size_t` in glibc and a `socklen_t` in musl.
        #[allow(clippy::unnecessary_cast)]
        let len = (self.headers[i].msg_hdr.msg_controllen as usize).min(CONTROL_LEN);
        // SAFETY: the control buffer is CONTROL_LEN initialized bytes; u8 has no invalid values.
        let bytes = unsafe {
            std::slice::from_raw_parts(self.controls[i].as_ptr().cast::<u8>(), CONTROL_LEN)
        };
        &bytes[..len]
    }
}

impl SyscallWorker {
    pub(crate) fn new(
        tun: TunQueue,
        socket: UdpSocket,
        stop: Arc<StopSignal>,
        offloads: ActiveOffloads,
    ) -> Result<Self, WorkerError> {
        socket
            .set_nonblocking(true)
            .map_err(|e| WorkerError::setup("nonblocking UDP socket", e))?;
        crate::io::tun::set_nonblocking(tun.as_fd(), true)
            .map_err(|e| WorkerError::setup("nonblocking TUN queue", e))?;
        Ok(Self {
            tun,
            socket,
            stop,
            offloads,
            buffers: PacketBuffers::new(2 * BATCH),
            tun_lens: [0; BATCH],
            recv: RecvArray::new(),
            sends: SendBatch::new(SEND_MESSAGES, SEND_PIECES, SEND_HEADERS * MAX_HEADER_LEN),
            accepted: Accepted::new(BATCH, &offloads),
            read_failures: ReadFailures::default(),
            icmp: IcmpGate::unlimited(),
            origin: Instant::now(),
            sealer: None,
        })
    }

    /// Move packets until the stop signal is raised or a fatal error occurs.
    pub(crate) fn run(&mut self, context: &WorkerContext) -> Result<(), WorkerError> {
        self.icmp = IcmpGate::new(context.icmp_rate_limit);
        self.accepted.set_groups(context.groups.clone());
        if let Some(tunnels) = &context.tunnels {
            self.sealer = Some(Sealer::new(tunnels.clone(), context.index));
            self.accepted
                .set_opener(Opener::new(tunnels.clone()), BATCH);
            self.sends = SendBatch::new(SEND_MESSAGES, SEND_PIECES, SEALED_BYTES);
        }
        self.accepted
            .set_partial_peers(context.partial_peers.clone());
        self.accepted.set_gso_check(context.gso_check.clone());
        let mut tun_more = false;
        let mut udp_more = false;
        let mut window = PollWindow::new(context.busy_poll);
        loop {
            // With work left over, only look (timeout 0) whether the other side has some too.
            let ready = if tun_more || udp_more {
                self.wait(0)?
            } else {
                self.wait_for_work(&mut window)?
            };
            let Some(ready) = ready else {
                return Ok(());
            };
            let run_tun = tun_more || ready.tun;
            let run_udp = udp_more || ready.udp;
            let mut counts = BatchCounts::default();
            let table = context.routes.snapshot();
            self.icmp.set_time(self.clock());
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

    /// Nanoseconds since the worker started: the ICMP rate limit's time, read once per batch.
    fn clock(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Wait for the TUN or the socket to become readable, looking without sleeping for
    /// `window`'s time first; `None` when the worker must stop.
    fn wait_for_work(&self, window: &mut PollWindow) -> Result<Option<Ready>, WorkerError> {
        let started = Instant::now();
        let look = window.window();
        if look > Duration::ZERO {
            loop {
                match self.wait(0)? {
                    Some(ready) if !ready.any() => {}
                    other => {
                        window.woke(started.elapsed());
                        return Ok(other);
                    }
                }
                if started.elapsed() >= look {
                    break;
                }
                // Let a thread waiting for this CPU (often the one that will answer) run.
                std::thread::yield_now();
            }
        }
        let ready = self.wait(-1)?;
        window.woke(started.elapsed());
        Ok(ready)
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
        let vnet_len = self.offloads.vnet_len();
        let mut read = 0;
        while read < BATCH {
            // The virtio-net header lands in the headroom, the packet at the buffer's start.
            let buf = self.buffers.headroom_ptr(read, vnet_len);
            // SAFETY: `buf` starts `vnet_len` bytes of headroom before a PACKET_BUF_LEN-byte
            // buffer that nothing else uses during the call.
            let rc =
                unsafe { libc::read(self.tun.as_raw_fd(), buf.cast(), vnet_len + PACKET_BUF_LEN) };
            if rc < 0 {
                let errno = last_errno();
                match errno {
                    libc::EINTR => continue,
                    libc::EAGAIN => break,
                    _ => {
                        self.read_failures.failed("TUN read", errno)?;
                        break;
                    }
                }
            }
            self.read_failures.reset();
            self.tun_lens[read] = rc as usize;
            read += 1;
        }
        if read == 0 && tun_error {
            // The queue reports an error but has nothing to read: it was detached.
            return Err(WorkerError::fatal("TUN read", libc::EBADFD));
        }
        for slot in 0..read {
            let total = self.tun_lens[slot];
            // SAFETY: the read has returned, no I/O is in flight on any buffer between
            // system calls, and the slices end before the next use of the slot.
            let (header, packet, reply) = unsafe { self.buffers.tun_read(slot, vnet_len, total) };
            match decide_tun_read(
                &header,
                packet,
                table,
                policy,
                reply,
                &mut self.icmp,
                counts,
                self.accepted.broadcast_sink(),
                &self.accepted.partial_peer_table(),
            ) {
                TunAction::Recycle => {}
                TunAction::WriteReply { len } => self.write_reply(slot, len, counts)?,
                TunAction::Send { to, len, segments } if self.sealer.is_some() => {
                    let packet = (self.buffers.packet_ptr(slot), len);
                    self.queue_sealed(packet, to, segments.as_ref(), counts)?
                }
                TunAction::Send {
                    to,
                    len,
                    segments: None,
                } => {
                    let piece = (self.buffers.packet_ptr(slot).cast_const(), len);
                    self.queue(to, Source::Packet, piece, counts)?;
                }
                TunAction::Send {
                    to,
                    len,
                    segments: Some(segmenter),
                } => {
                    // SAFETY: the buffer holds `len` bytes the read filled (and the decision
                    // edited); the datagrams point into it until the batch is flushed, and
                    // nothing writes it meanwhile.
                    let packet: &[u8] =
                        unsafe { std::slice::from_raw_parts(self.buffers.packet_ptr(slot), len) };
                    let mut next = 0;
                    let gso = self.accepted.gso_to(to, self.offloads.udp_gso);
                    while !queue_segments(&mut self.sends, to, packet, &segmenter, &mut next, gso) {
                        if self.sends.is_empty() {
                            break;
                        }
                        self.flush_sends(counts)?;
                    }
                }
            }
        }
        self.flush_sends(counts)?;
        Ok(read == BATCH)
    }

    /// Receive up to a batch of buffers and write what is accepted to the TUN. Returns
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
        self.recv.link(&self.buffers, self.offloads.udp_gro);
        let received = loop {
            // SAFETY: the headers point at BATCH live iovecs, addresses, control buffers and
            // packet buffers, none of which is used elsewhere during the call.
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
                    self.read_failures.failed("UDP receive", errno)?;
                    return Ok(false);
                }
            }
        };
        self.read_failures.reset();
        for i in 0..received.min(BATCH) {
            let header = &self.recv.headers[i];
            let len = (header.msg_len as usize).min(PACKET_BUF_LEN);
            let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let from = from_sockaddr(&self.recv.addrs[i], header.msg_hdr.msg_namelen);
            let segment = gro_segment_size(self.recv.control(i));
            let slot = UDP_BASE + i;
            // SAFETY: the recvmmsg call has returned; nothing else uses the slot until the
            // batch's writes are done.
            let answer = unsafe {
                self.accepted.receive(
                    &mut self.buffers,
                    slot,
                    len,
                    from,
                    segment,
                    truncated,
                    table,
                    policy,
                    &mut self.icmp,
                    counts,
                )
            };
            match answer {
                Some((to, (reply, len))) if self.sealer.is_some() => {
                    // The reply buffer is this worker's own memory, written by the decision.
                    self.queue_sealed((reply.cast_mut(), len), to, None, counts)?
                }
                Some((to, piece)) => self.queue(to, Source::Reply, piece, counts)?,
                None => {}
            }
        }
        let fd = self.tun.as_raw_fd();
        let mut direct = DirectWrites::default();
        // SAFETY: the accepted packets lie in this batch's buffers, which no I/O uses now.
        unsafe {
            self.accepted
                .write(&self.offloads, counts, |vnet, pieces, _| {
                    Written::Done(direct.write(fd, vnet.as_ref(), pieces))
                });
        }
        direct.finish()?;
        self.flush_sends(counts)?;
        if let Some(opener) = self.accepted.opener() {
            send_outbox(&self.socket, opener, counts);
        }
        Ok(received >= BATCH)
    }

    /// Queue the packet `(start, len)` (in a packet or reply buffer) for `to` sealed, whole or
    /// as `segments` cuts it, sending the batch whenever it is full.
    fn queue_sealed(
        &mut self,
        (start, len): (*mut u8, usize),
        to: SocketAddrV4,
        segments: Option<&crate::offload::Segmenter>,
        counts: &mut BatchCounts,
    ) -> Result<(), WorkerError> {
        // SAFETY: `start` is one of this worker's own packet or reply buffers holding `len`
        // bytes, which nothing else reads or writes until the packet is sealed (the sealed
        // datagrams are copies, in the batch; a super-packet's segments are put together in
        // place, and the buffer is not read again).
        let packet: &mut [u8] = unsafe { std::slice::from_raw_parts_mut(start, len) };
        let gso = self.accepted.gso_to(to, self.offloads.udp_gso);
        let mut next = 0;
        loop {
            let Some(sealer) = self.sealer.as_mut() else {
                return Ok(());
            };
            let done = queue_sealed(
                &mut self.sends,
                sealer,
                to,
                packet,
                segments,
                &mut next,
                gso,
                counts,
            );
            if done || self.sends.is_empty() {
                return Ok(());
            }
            self.flush_sends(counts)?;
        }
    }

    /// Queue one whole datagram, sending the batch first if it is full.
    fn queue(
        &mut self,
        to: SocketAddrV4,
        source: Source,
        piece: (*const u8, usize),
        counts: &mut BatchCounts,
    ) -> Result<(), WorkerError> {
        let gso = self.accepted.gso_to(to, self.offloads.udp_gso);
        if !self.sends.push(to, source, &[piece], gso) {
            self.flush_sends(counts)?;
            if !self.sends.push(to, source, &[piece], gso) {
                counts.io_errors += 1;
            }
        }
        Ok(())
    }

    /// Write the `len`-byte ICMP error in `slot`'s reply buffer to the TUN.
    fn write_reply(
        &mut self,
        slot: usize,
        len: usize,
        counts: &mut BatchCounts,
    ) -> Result<(), WorkerError> {
        let (vnet, piece, count) = reply_write(&self.offloads, self.buffers.reply_ptr(slot), len);
        let mut direct = DirectWrites::default();
        let result = direct.write(self.tun.as_raw_fd(), vnet.as_ref(), &[piece]);
        direct.finish()?;
        count_write(counts, Source::Reply, count, result);
        Ok(())
    }

    /// Send every queued message, with as few `sendmmsg` calls as the kernel allows.
    fn flush_sends(&mut self, counts: &mut BatchCounts) -> Result<(), WorkerError> {
        let mut next = 0;
        while next < self.sends.len() {
            // Prepared afresh each time: a split adds messages at the end.
            let (msgs, count) = self.sends.prepare_from(next);
            // SAFETY: messages next.. point at live iovecs, addresses, control data and
            // buffers that nothing else uses during the call.
            let rc = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    msgs,
                    count as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                let sent = (rc as usize).min(count);
                for i in next..next + sent {
                    let len = i64::from(self.sends.sent_len(i));
                    self.send_result(i, len, counts)?;
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
                        for i in next..self.sends.len() {
                            if let Some(info) = self.sends.info(i) {
                                count_send(counts, info, -i64::from(libc::EAGAIN));
                            }
                        }
                        break;
                    }
                }
                errno => {
                    // A run split into plain messages is sent with the rest of the batch.
                    self.send_result(next, -i64::from(errno), counts)?;
                    next += 1;
                }
            }
        }
        self.sends.clear();
        Ok(())
    }

    /// Count what became of message `i`; a GSO run split into plain messages is left at the
    /// end of the batch, where the flush sends it.
    fn send_result(
        &mut self,
        i: usize,
        result: i64,
        counts: &mut BatchCounts,
    ) -> Result<SendOutcome, WorkerError> {
        handle_send_result(
            &mut self.sends,
            i,
            result,
            &mut self.offloads.udp_gso,
            counts,
        )
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
}

/// Which descriptors `poll` found ready.
#[derive(Clone, Copy, Debug)]
struct Ready {
    tun: bool,
    tun_error: bool,
    udp: bool,
}

impl Ready {
    fn any(&self) -> bool {
        self.tun || self.udp
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}
