//! The underlay UDP socket of one worker, its offloads, and the message layouts the kernel
//! uses to send and receive datagrams.
//!
//! Every worker binds its own socket to the same public address and port with `SO_REUSEPORT`,
//! so the kernel spreads peers across workers and no socket is shared. Buffers are made large
//! (bursts of 64 KiB super-packets are coming) with the `…BUFFORCE` options, which ignore the
//! `rmem_max`/`wmem_max` limits when the process may; otherwise the plain options are used.
//!
//! Two offloads cut the per-datagram cost. With UDP GSO (`SendBatch`), a run of equal-sized
//! datagrams to one peer leaves in one `sendmsg` with a `UDP_SEGMENT` control message, and the
//! kernel cuts it (on veth without even cutting it: the receiver gets it whole). With UDP GRO
//! (`enable_gro`), the kernel hands over such a run in one buffer with the datagram size in
//! a `UDP_GRO` control message (`gro_segment_size`). Each datagram is still one inner
//! packet: the wire format does not change.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::batch::Source;

/// The socket buffer size asked for in each direction.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

// `SO_SNDBUFFORCE`/`SO_RCVBUFFORCE` from asm-generic/socket.h (the numbering of x86, arm,
// riscv and most other architectures); the libc crate does not export them for glibc targets.
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;

/// Open a nonblocking, close-on-exec UDP socket bound to `addr` that other workers may bind
/// too (`SO_REUSEPORT`), with large send and receive buffers.
pub fn bind_worker_socket(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    grow_buffer(&socket, Direction::Receive, SOCKET_BUFFER_BYTES)?;
    grow_buffer(&socket, Direction::Send, SOCKET_BUFFER_BYTES)?;
    socket.bind(&std::net::SocketAddr::V4(addr).into())?;
    Ok(socket.into())
}

#[derive(Clone, Copy)]
enum Direction {
    Receive,
    Send,
}

/// Ask for `bytes` of buffer, beyond the system limit when the process is allowed to, else up
/// to the limit.
fn grow_buffer(socket: &Socket, direction: Direction, bytes: usize) -> io::Result<()> {
    let forced = match direction {
        Direction::Receive => SO_RCVBUFFORCE,
        Direction::Send => SO_SNDBUFFORCE,
    };
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    match set_int_option(socket, libc::SOL_SOCKET, forced, value) {
        Ok(()) => Ok(()),
        Err(error) if error.raw_os_error() == Some(libc::EPERM) => match direction {
            Direction::Receive => socket.set_recv_buffer_size(bytes),
            Direction::Send => socket.set_send_buffer_size(bytes),
        },
        Err(error) => Err(error),
    }
}

fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    use std::os::fd::AsFd;
    set_raw_int_option(socket.as_fd(), level, name, value)
}

fn set_raw_int_option(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live `c_int` and the length passed is its size; the
    // descriptor is borrowed for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// `SO_ATTACH_REUSEPORT_CBPF` from asm-generic/socket.h; the libc crate does not export it for
// glibc targets.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Classic BPF opcodes (from linux/filter.h) and an instruction builder, for the reuseport
/// programs below.
mod bpf {
    pub(super) const LD: u16 = libc::BPF_LD as u16;
    pub(super) const LDX: u16 = libc::BPF_LDX as u16;
    pub(super) const ST: u16 = libc::BPF_ST as u16;
    pub(super) const ALU: u16 = libc::BPF_ALU as u16;
    pub(super) const JMP: u16 = libc::BPF_JMP as u16;
    pub(super) const RET: u16 = libc::BPF_RET as u16;
    pub(super) const MISC: u16 = libc::BPF_MISC as u16;
    pub(super) const W: u16 = libc::BPF_W as u16;
    pub(super) const B: u16 = libc::BPF_B as u16;
    pub(super) const ABS: u16 = libc::BPF_ABS as u16;
    pub(super) const IND: u16 = libc::BPF_IND as u16;
    pub(super) const IMM: u16 = libc::BPF_IMM as u16;
    pub(super) const MEM: u16 = libc::BPF_MEM as u16;
    pub(super) const MSH: u16 = libc::BPF_MSH as u16;
    pub(super) const K: u16 = libc::BPF_K as u16;
    pub(super) const X: u16 = libc::BPF_X as u16;
    pub(super) const A: u16 = libc::BPF_A as u16;

    /// One instruction.
    pub(super) fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }
}

/// The classic BPF program that picks, among `workers` sockets bound to one port, the one a
/// datagram goes to, by its inner packet's flow: source and destination address, and for TCP
/// and UDP the ports. The kernel runs it with the data starting at the UDP payload (the inner
/// IPv4 header); a packet too short for a load makes it return 0, the first socket.
fn inner_flow_program(workers: u32) -> [libc::sock_filter; 22] {
    use bpf::*;
    [
        op(LD | B | ABS, 0, 0, 9),                    // A = protocol
        op(JMP | libc::BPF_JEQ as u16 | K, 1, 0, 6),  // TCP: ports
        op(JMP | libc::BPF_JEQ as u16 | K, 0, 3, 17), // UDP: ports; else none
        op(LDX | B | MSH, 0, 0, 0),                   // X = header length
        op(LD | W | IND, 0, 0, 0),                    // A = both ports
        op(JMP | libc::BPF_JA as u16, 0, 0, 1),       //
        op(LD | W | IMM, 0, 0, 0),                    // A = 0 (no ports)
        op(ST, 0, 0, 0),                              // M[0] = ports
        op(LD | W | ABS, 0, 0, 16),                   // A = destination
        op(MISC | libc::BPF_TAX as u16, 0, 0, 0),     // X = A
        op(LD | W | ABS, 0, 0, 12),                   // A = source
        op(ALU | libc::BPF_XOR as u16 | X, 0, 0, 0),  // A ^= X
        op(MISC | libc::BPF_TAX as u16, 0, 0, 0),     // X = A
        op(LD | MEM, 0, 0, 0),                        // A = ports
        op(ALU | libc::BPF_XOR as u16 | X, 0, 0, 0),  // A ^= X
        // Fold the high half (the source port) onto the low one, then mix every bit into
        // the upper half (Fibonacci hashing): connect() picks even source ports, so a plain
        // modulo of the low bits would send every flow to the same socket.
        op(MISC | libc::BPF_TAX as u16, 0, 0, 0), // X = A
        op(ALU | libc::BPF_RSH as u16 | K, 0, 0, 16), // A >>= 16
        op(ALU | libc::BPF_XOR as u16 | X, 0, 0, 0), // A ^= X
        op(ALU | libc::BPF_MUL as u16 | K, 0, 0, 0x9e37_79b1), // A *= 2^32 / phi
        op(ALU | libc::BPF_RSH as u16 | K, 0, 0, 16), // A >>= 16
        op(ALU | libc::BPF_MOD as u16 | K, 0, 0, workers), // A %= workers
        op(RET | A, 0, 0, 0),                     // the socket's index
    ]
}

/// The classic BPF program that picks, among `workers` sockets bound to one port, the one an
/// encrypted datagram goes to, by the lane its session index names (see
/// [`crate::crypto::tunnels`]): byte 9 of a handshake response (type 2), byte 5 of every
/// other message, modulo `workers`. Worker `w` seals on lane `w` (for `w` below the lane
/// count), so a lane's datagrams land on the worker that seals that lane here; a datagram too
/// short for the load goes to the first socket, whose opener drops it.
fn lane_program(workers: u32) -> [libc::sock_filter; 7] {
    use bpf::*;
    let response = crate::crypto::tunnels::lane_offset(2) as u32;
    let other = crate::crypto::tunnels::lane_offset(4) as u32;
    [
        op(LD | B | ABS, 0, 0, 0),                         // A = message type
        op(JMP | libc::BPF_JEQ as u16 | K, 0, 2, 2),       // handshake response?
        op(LD | B | ABS, 0, 0, response),                  // A = its receiver's lane
        op(JMP | libc::BPF_JA as u16, 0, 0, 1),            //
        op(LD | B | ABS, 0, 0, other),                     // A = the lane of the rest
        op(ALU | libc::BPF_MOD as u16 | K, 0, 0, workers), // A %= workers
        op(RET | A, 0, 0, 0),                              // the socket's index
    ]
}

/// Spread the datagrams arriving at a port that `workers` sockets share (`SO_REUSEPORT`)
/// across them by inner flow, with `socket` any member of the group. Without this the kernel
/// hashes the outer addresses and ports, which are the same for everything one peer sends
/// (flannel's wire format has one port), so one worker would receive all of a peer's traffic.
/// A flow stays on one socket, so its packets are never reordered.
pub(crate) fn steer_by_inner_flow(socket: BorrowedFd<'_>, workers: usize) -> io::Result<()> {
    let mut program = inner_flow_program(reuseport_workers(workers)?);
    attach_reuseport_program(socket, &mut program)
}

/// With encryption, spread the datagrams arriving at the shared port across the `workers`
/// sockets by lane (see [`lane_program`]), with `socket` any member of the group. A peer's
/// lane stays on one socket: a session's messages are never reordered by the spreading, and
/// its lock is normally taken by one worker only.
pub(crate) fn steer_by_lane(socket: BorrowedFd<'_>, workers: usize) -> io::Result<()> {
    let mut program = lane_program(reuseport_workers(workers)?);
    attach_reuseport_program(socket, &mut program)
}

fn reuseport_workers(workers: usize) -> io::Result<u32> {
    u32::try_from(workers)
        .ok()
        .filter(|w| *w > 0)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Attach `program` to the reuseport group of `socket`: it picks the socket each datagram
/// goes to, by its place in the group (the order the sockets were bound in).
fn attach_reuseport_program(
    socket: BorrowedFd<'_>,
    program: &mut [libc::sock_filter],
) -> io::Result<()> {
    let len = libc::c_ushort::try_from(program.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the option value is a live sock_fprog pointing at `program`, which outlives
    // the call (the kernel copies the program); the descriptor is borrowed for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The receive buffer the kernel actually granted (it reports twice the requested size).
pub fn receive_buffer_bytes(socket: BorrowedFd<'_>) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and sized for an integer option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(usize::try_from(value).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The most datagrams one GSO send may carry (`UDP_MAX_SEGMENTS` of older kernels).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// The most bytes one GSO send may carry: on veth and loopback a larger one is cut into plain
/// datagrams by software instead of travelling whole.
pub const MAX_GSO_BYTES: usize = 65_493;

/// Room for one control message holding an `int` (`UDP_GRO`) or a `u16` (`UDP_SEGMENT`):
/// `CMSG_SPACE(4)` = `CMSG_SPACE(2)` on every Linux ABI with an 8- or 4-byte `cmsghdr`
/// alignment.
pub(crate) const CONTROL_LEN: usize = 24;

/// Control-message buffer storage, aligned for `cmsghdr`.
pub(crate) type ControlBuf = [u64; CONTROL_LEN / 8];

/// Receive runs of datagrams from one sender in one buffer (`UDP_GRO`).
pub(crate) fn enable_gro(socket: BorrowedFd<'_>) -> io::Result<()> {
    set_raw_int_option(socket, libc::SOL_UDP, libc::UDP_GRO, 1)
}

/// The datagram size of a GRO buffer, from the control data `recvmsg` returned; `None` when
/// the buffer holds one datagram.
pub(crate) fn gro_segment_size(control: &[u8]) -> Option<usize> {
    const HEADER: usize = std::mem::size_of::<libc::cmsghdr>();
    let mut at = 0;
    while let Some(header) = control.get(at..at + HEADER) {
        let len_bytes = header.get(..std::mem::size_of::<usize>())?;
        let len = usize::from_ne_bytes(len_bytes.try_into().ok()?);
        let level = i32::from_ne_bytes(header.get(8..12)?.try_into().ok()?);
        let kind = i32::from_ne_bytes(header.get(12..16)?.try_into().ok()?);
        if len < HEADER {
            return None;
        }
        if level == libc::SOL_UDP && kind == libc::UDP_GRO {
            let data = control.get(at + HEADER..at + HEADER + 4)?;
            let size = i32::from_ne_bytes(data.try_into().ok()?);
            return usize::try_from(size).ok().filter(|size| *size > 0);
        }
        at = at.checked_add(len.checked_next_multiple_of(std::mem::size_of::<usize>())?)?;
    }
    None
}

/// Write a `UDP_SEGMENT` control message for datagrams of `size` bytes into `out`.
pub(crate) fn write_segment_control(out: &mut ControlBuf, size: u16) -> usize {
    // SAFETY: CMSG_LEN only computes a length.
    let len = unsafe { libc::CMSG_LEN(std::mem::size_of::<u16>() as libc::c_uint) } as usize;
    let header = libc::cmsghdr {
        cmsg_len: len as _,
        cmsg_level: libc::SOL_UDP,
        cmsg_type: libc::UDP_SEGMENT,
    };
    // SAFETY: `out` is 8-byte aligned and CONTROL_LEN bytes long, enough for a cmsghdr and a
    // u16 after it; both writes stay inside it.
    unsafe {
        let base = out.as_mut_ptr().cast::<u8>();
        std::ptr::write(base.cast::<libc::cmsghdr>(), header);
        std::ptr::write_unaligned(
            base.add(std::mem::size_of::<libc::cmsghdr>()).cast::<u16>(),
            size,
        );
    }
    CONTROL_LEN
}

/// What one message of a [`SendBatch`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MessageInfo {
    /// Where it goes.
    pub(crate) peer: SocketAddrV4,
    /// Forwarded packets or an ICMP error.
    pub(crate) source: Source,
    /// How many datagrams (0 once the message was split into plain ones).
    pub(crate) segments: u32,
    /// Bytes in all.
    pub(crate) bytes: u32,
    segment_len: u32,
    pieces: u32,
    first_iov: u32,
    iovs: u32,
    /// Whether more datagrams may join.
    open: bool,
}

/// Datagrams queued for the socket, as `mmsghdr`s with the `iovec`s, addresses, control data
/// and segment headers they point at. With GSO a message carries a run of datagrams to one
/// peer, all of one length but the last, which may be shorter; otherwise a message is one
/// datagram. A datagram is one or two pieces of memory (a whole packet, or a segment's headers
/// and its payload in the super-packet).
///
/// The batch's memory never moves, so messages may be handed to the kernel while it lives;
/// the pieces a message points at must stay untouched until it is sent.
pub(crate) struct SendBatch {
    msgs: Box<[libc::mmsghdr]>,
    info: Box<[MessageInfo]>,
    addrs: Box<[libc::sockaddr_in]>,
    controls: Box<[ControlBuf]>,
    iovs: Box<[libc::iovec]>,
    headers: Box<[u8]>,
    len: usize,
    iovs_used: usize,
    headers_used: usize,
}

impl SendBatch {
    /// A batch of at most `messages` messages, `iovs` pieces and `header_bytes` of segment
    /// headers.
    pub(crate) fn new(messages: usize, iovs: usize, header_bytes: usize) -> Self {
        let peer = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        Self {
            // SAFETY: mmsghdr, sockaddr_in and iovec are plain C structs of integers and
            // pointers; all zeroes (null pointers) is a valid value of each.
            msgs: (0..messages)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
            info: vec![
                MessageInfo {
                    peer,
                    source: Source::Packet,
                    segments: 0,
                    bytes: 0,
                    segment_len: 0,
                    pieces: 0,
                    first_iov: 0,
                    iovs: 0,
                    open: false,
                };
                messages
            ]
            .into_boxed_slice(),
            // SAFETY: as above.
            addrs: (0..messages)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
            controls: vec![[0u64; CONTROL_LEN / 8]; messages].into_boxed_slice(),
            // SAFETY: as above.
            iovs: (0..iovs).map(|_| unsafe { std::mem::zeroed() }).collect(),
            headers: vec![0u8; header_bytes].into_boxed_slice(),
            len: 0,
            iovs_used: 0,
            headers_used: 0,
        }
    }

    /// Forget every message (none may be in flight).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.iovs_used = 0;
        self.headers_used = 0;
    }

    /// How many messages are queued.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Message `i`'s description.
    pub(crate) fn info(&self, i: usize) -> Option<&MessageInfo> {
        self.info.get(..self.len)?.get(i)
    }

    /// Whether a datagram of `pieces` pieces and a `header_len`-byte segment header fits.
    pub(crate) fn has_room(&self, pieces: usize, header_len: usize) -> bool {
        self.len < self.msgs.len()
            && self.iovs_used + pieces <= self.iovs.len()
            && self.headers_used + header_len <= self.headers.len()
    }

    /// Space for a segment header of `len` bytes, which [`SendBatch::push`] must then use as
    /// its first piece; `None` if full.
    pub(crate) fn header_space(&mut self, len: usize) -> Option<&mut [u8]> {
        let space = self
            .headers
            .get_mut(self.headers_used..self.headers_used + len)?;
        self.headers_used += len;
        Some(space)
    }

    /// Queue one datagram of `pieces` for `peer`: with `gso`, appended to the last message
    /// if that one goes to the same peer, carries forwarded datagrams of the same length made
    /// of as many pieces, and has room; otherwise as a new message. `false` if the batch is
    /// full (nothing was queued).
    pub(crate) fn push(
        &mut self,
        peer: SocketAddrV4,
        source: Source,
        pieces: &[(*const u8, usize)],
        gso: bool,
    ) -> bool {
        let len: usize = pieces.iter().map(|(_, len)| len).sum();
        if self.iovs_used + pieces.len() > self.iovs.len() {
            return false;
        }
        let joins = gso
            && source == Source::Packet
            && self.len > 0
            && self.info[self.len - 1].joinable(peer, len, pieces.len());
        if !joins && self.len == self.msgs.len() {
            return false;
        }
        for (i, (base, piece_len)) in pieces.iter().enumerate() {
            self.iovs[self.iovs_used + i] = libc::iovec {
                iov_base: base.cast_mut().cast(),
                iov_len: *piece_len,
            };
        }
        if joins {
            let info = &mut self.info[self.len - 1];
            info.segments += 1;
            info.bytes += len as u32;
            info.iovs += pieces.len() as u32;
            info.open = len == info.segment_len as usize
                && info.segments < MAX_GSO_SEGMENTS as u32
                && info.bytes as usize + len <= MAX_GSO_BYTES;
        } else {
            self.info[self.len] = MessageInfo {
                peer,
                source,
                segments: 1,
                bytes: len as u32,
                segment_len: len as u32,
                pieces: pieces.len() as u32,
                first_iov: self.iovs_used as u32,
                iovs: pieces.len() as u32,
                open: gso && source == Source::Packet && 2 * len <= MAX_GSO_BYTES,
            };
            self.len += 1;
        }
        self.iovs_used += pieces.len();
        true
    }

    /// Turn message `i`, a GSO run the kernel refused, into one plain message per datagram at
    /// the end of the batch. `false` if there is no room (the message is left as it is).
    pub(crate) fn split(&mut self, i: usize) -> bool {
        let Some(info) = self.info(i).copied() else {
            return false;
        };
        let segments = info.segments as usize;
        if segments < 2 || self.len + segments > self.msgs.len() {
            return false;
        }
        for segment in 0..segments {
            let first = info.first_iov as usize + segment * info.pieces as usize;
            let len: usize = self.iovs[first..first + info.pieces as usize]
                .iter()
                .map(|iov| iov.iov_len)
                .sum();
            self.info[self.len] = MessageInfo {
                segments: 1,
                bytes: len as u32,
                segment_len: len as u32,
                first_iov: first as u32,
                iovs: info.pieces,
                open: false,
                ..info
            };
            self.len += 1;
        }
        self.info[i].segments = 0;
        self.info[i].bytes = 0;
        true
    }

    /// Point message `i`'s header at its pieces, address and (for a run of datagrams) its
    /// `UDP_SEGMENT` control message, and return it. Call right before handing it to the kernel.
    pub(crate) fn prepare(&mut self, i: usize) -> Option<*mut libc::msghdr> {
        let info = *self.info(i)?;
        self.addrs[i] = to_sockaddr(info.peer);
        let control_len = if info.segments > 1 {
            write_segment_control(&mut self.controls[i], info.segment_len as u16)
        } else {
            0
        };
        let header = &mut self.msgs[i];
        header.msg_len = 0;
        let msg = &mut header.msg_hdr;
        msg.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = SOCKADDR_IN_LEN;
        msg.msg_iov = self.iovs[info.first_iov as usize..].as_mut_ptr();
        msg.msg_iovlen = info.iovs as _;
        msg.msg_control = if control_len > 0 {
            self.controls[i].as_mut_ptr().cast()
        } else {
            std::ptr::null_mut()
        };
        msg.msg_controllen = control_len as _;
        msg.msg_flags = 0;
        Some(msg)
    }

    /// Messages `from..` as an `mmsghdr` array for `sendmmsg`, each prepared; with the count.
    pub(crate) fn prepare_from(&mut self, from: usize) -> (*mut libc::mmsghdr, usize) {
        for i in from..self.len {
            self.prepare(i);
        }
        let count = self.len.saturating_sub(from);
        let start = from.min(self.msgs.len());
        (self.msgs[start..].as_mut_ptr(), count)
    }

    /// The bytes the kernel reported sending for message `i` after `sendmmsg`.
    pub(crate) fn sent_len(&self, i: usize) -> u32 {
        self.msgs.get(i).map_or(0, |m| m.msg_len)
    }
}

impl MessageInfo {
    fn joinable(&self, peer: SocketAddrV4, len: usize, pieces: usize) -> bool {
        self.open
            && self.source == Source::Packet
            && self.peer == peer
            && self.pieces as usize == pieces
            && len <= self.segment_len as usize
            && self.bytes as usize + len <= MAX_GSO_BYTES
            && (self.segments as usize) < MAX_GSO_SEGMENTS
    }
}

/// The kernel's `sockaddr_in` for `addr`.
pub(crate) fn to_sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The address the kernel wrote into a `sockaddr_in` of which it reported `len` bytes, if it
/// is an IPv4 address.
pub(crate) fn from_sockaddr(raw: &libc::sockaddr_in, len: libc::socklen_t) -> Option<SocketAddrV4> {
    let complete = usize::try_from(len).ok()? >= std::mem::size_of::<libc::sockaddr_in>();
    if !complete || raw.sin_family != libc::AF_INET as libc::sa_family_t {
        return None;
    }
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
        u16::from_be(raw.sin_port),
    ))
}

/// The size of a `sockaddr_in`, as the kernel wants it in `msg_namelen`.
pub(crate) const SOCKADDR_IN_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn buffers_grow_past_the_system_limit() {
        // An unbound socket: nothing is sent or received.
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        grow_buffer(&socket, Direction::Receive, SOCKET_BUFFER_BYTES).unwrap();
        grow_buffer(&socket, Direction::Send, SOCKET_BUFFER_BYTES).unwrap();
        let granted = receive_buffer_bytes(socket.as_fd()).unwrap();
        let limit: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The kernel doubles the request (bookkeeping overhead); as root it ignores rmem_max.
        let expected = if is_root() {
            2 * SOCKET_BUFFER_BYTES
        } else {
            2 * limit.min(SOCKET_BUFFER_BYTES)
        };
        assert_eq!(granted, expected);
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn socket_addresses_round_trip() {
        let addr = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285);
        let raw = to_sockaddr(addr);
        assert_eq!(raw.sin_port, 8285u16.to_be());
        assert_eq!(raw.sin_addr.s_addr.to_ne_bytes(), [198, 18, 0, 2]);
        assert_eq!(from_sockaddr(&raw, SOCKADDR_IN_LEN), Some(addr));
    }

    /// Run a classic BPF program the way the kernel does for a reuseport group, over the
    /// opcodes `inner_flow_program` and `lane_program` use; a load beyond the packet ends it
    /// with 0.
    fn run_cbpf(program: &[libc::sock_filter], packet: &[u8]) -> u32 {
        let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
        let load = |at: usize, size: usize| -> Option<u32> {
            let bytes = packet.get(at..at + size)?;
            Some(bytes.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)))
        };
        let mut pc = 0;
        while let Some(insn) = program.get(pc) {
            pc += 1;
            let k = insn.k;
            let code = u32::from(insn.code);
            let class = code & 0x07;
            let size = match code & 0x18 {
                0x00 => 4,
                0x08 => 2,
                _ => 1,
            };
            match class {
                c if c == libc::BPF_LD => {
                    a = match code & 0xe0 {
                        m if m == libc::BPF_ABS => match load(k as usize, size) {
                            Some(v) => v,
                            None => return 0,
                        },
                        m if m == libc::BPF_IND => match load((x + k) as usize, size) {
                            Some(v) => v,
                            None => return 0,
                        },
                        m if m == libc::BPF_MEM => mem[k as usize],
                        _ => k,
                    }
                }
                c if c == libc::BPF_LDX => match load(k as usize, 1) {
                    Some(v) => x = 4 * (v & 0xf),
                    None => return 0,
                },
                c if c == libc::BPF_ST => mem[k as usize] = a,
                c if c == libc::BPF_ALU => {
                    let operand = if code & 0x08 != 0 { x } else { k };
                    a = match code & 0xf0 {
                        o if o == libc::BPF_XOR => a ^ operand,
                        o if o == libc::BPF_MUL => a.wrapping_mul(operand),
                        o if o == libc::BPF_RSH => a >> operand,
                        o if o == libc::BPF_MOD => a % operand,
                        o => panic!("ALU op {o:#x}"),
                    }
                }
                c if c == libc::BPF_JMP => match code & 0xf0 {
                    o if o == libc::BPF_JA => pc += k as usize,
                    o if o == libc::BPF_JEQ => {
                        pc += usize::from(if a == k { insn.jt } else { insn.jf })
                    }
                    o => panic!("jump {o:#x}"),
                },
                c if c == libc::BPF_RET => return a,
                c if c == libc::BPF_MISC => x = a,
                _ => panic!("class {class}"),
            }
        }
        panic!("fell off the program")
    }

    fn inner(protocol: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut packet = vec![0u8; 40];
        packet[0] = 0x45;
        packet[9] = protocol;
        packet[12..16].copy_from_slice(&[10, 1, 1, 2]);
        packet[16..20].copy_from_slice(&[10, 1, 2, 2]);
        packet[20..22].copy_from_slice(&sport.to_be_bytes());
        packet[22..24].copy_from_slice(&dport.to_be_bytes());
        packet
    }

    #[test]
    fn inner_flows_spread_across_workers() {
        for workers in [2u32, 3, 4] {
            let program = inner_flow_program(workers);
            let mut used = vec![0usize; workers as usize];
            // Even source ports, as connect() picks them, to one server port.
            for sport in (40_000u16..41_000).step_by(2) {
                let socket = run_cbpf(&program, &inner(6, sport, 5201));
                assert!(socket < workers);
                used[socket as usize] += 1;
                // Every packet of a flow lands on one socket.
                assert_eq!(socket, run_cbpf(&program, &inner(6, sport, 5201)));
            }
            for count in &used {
                let share = *count as f64 / 500.0;
                assert!(
                    share > 0.5 / f64::from(workers),
                    "{workers} workers: {used:?}"
                );
            }
            // UDP too; ICMP by addresses alone; short packets go to the first socket.
            assert!(run_cbpf(&program, &inner(17, 4000, 53)) < workers);
            let mut echo = inner(1, 0x0800, 0x1234);
            let first = run_cbpf(&program, &echo);
            echo[22] ^= 0xff;
            assert_eq!(
                run_cbpf(&program, &echo),
                first,
                "ICMP ignores the bytes after"
            );
            assert_eq!(run_cbpf(&program, &inner(6, 1, 2)[..21]), 0);
            assert_eq!(run_cbpf(&program, &[]), 0);
        }
    }

    /// A WireGuard message of `kind` whose session index names `lane` where that kind names
    /// the receiver's lane, with every other byte set to `fill`.
    fn message(kind: u8, lane: u8, fill: u8) -> Vec<u8> {
        let len = match kind {
            1 => 148,
            2 => 92,
            3 => 64,
            _ => 32 + 1400,
        };
        let mut message = vec![fill; len];
        message[..4].copy_from_slice(&[kind, 0, 0, 0]);
        message[if kind == 2 { 9 } else { 5 }] = lane;
        message
    }

    #[test]
    fn encrypted_datagrams_go_to_the_worker_of_their_lane() {
        for workers in [1u32, 2, 3, 4, 16] {
            let program = lane_program(workers);
            for kind in 1..=4u8 {
                for lane in 0..=255u8 {
                    for fill in [0u8, 0x5a, 0xff] {
                        assert_eq!(
                            run_cbpf(&program, &message(kind, lane, fill)),
                            u32::from(lane) % workers,
                            "type {kind}, lane {lane}, {workers} workers"
                        );
                    }
                }
            }
            // A response's own sender index (byte 5) does not steer it: its receiver's does.
            let mut response = message(2, 1, 0);
            response[5] = 3;
            assert_eq!(run_cbpf(&program, &response), 1 % workers);
            // Too short for the lane: the first socket, whose opener drops it.
            assert_eq!(run_cbpf(&program, &[4, 0, 0, 0, 1]), 0);
            assert_eq!(run_cbpf(&program, &message(2, 1, 0)[..9]), 0);
            assert_eq!(run_cbpf(&program, &[]), 0);
        }
    }

    fn peer(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, last), 8285)
    }

    #[test]
    fn gso_runs_take_equal_datagrams_for_one_peer() {
        let data = vec![0u8; 70_000];
        let piece = |len: usize| [(data.as_ptr(), len)];
        let mut batch = SendBatch::new(16, 128, 0);
        // Three of 1000 bytes, then a shorter one that ends the run.
        for _ in 0..3 {
            assert!(batch.push(peer(2), Source::Packet, &piece(1000), true));
        }
        assert!(batch.push(peer(2), Source::Packet, &piece(400), true));
        assert!(batch.push(peer(2), Source::Packet, &piece(1000), true));
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.info(0).unwrap().segments, 4);
        assert_eq!(batch.info(0).unwrap().bytes, 3400);
        // A larger datagram, another peer, an ICMP error: new messages.
        assert!(batch.push(peer(2), Source::Packet, &piece(1200), true));
        assert!(batch.push(peer(3), Source::Packet, &piece(1200), true));
        assert!(batch.push(peer(3), Source::Reply, &piece(56), true));
        assert!(batch.push(peer(3), Source::Packet, &piece(1200), true));
        assert_eq!(batch.len(), 6);
        assert_eq!(batch.info(4).unwrap().segments, 1);
        // Without GSO, every datagram is a message.
        batch.clear();
        for _ in 0..3 {
            assert!(batch.push(peer(2), Source::Packet, &piece(1000), false));
        }
        assert_eq!(batch.len(), 3);
    }

    #[test]
    fn gso_runs_stay_within_the_kernel_limits() {
        let data = vec![0u8; 70_000];
        let mut batch = SendBatch::new(16, 256, 0);
        for _ in 0..100 {
            assert!(batch.push(peer(2), Source::Packet, &[(data.as_ptr(), 100)], true));
        }
        assert_eq!(batch.info(0).unwrap().segments as usize, MAX_GSO_SEGMENTS);
        batch.clear();
        for _ in 0..50 {
            assert!(batch.push(peer(2), Source::Packet, &[(data.as_ptr(), 1472)], true));
        }
        assert_eq!(batch.info(0).unwrap().segments, 44);
        assert!(batch.info(0).unwrap().bytes as usize <= MAX_GSO_BYTES);
        // A datagram too large to pair never opens a run.
        batch.clear();
        assert!(batch.push(peer(2), Source::Packet, &[(data.as_ptr(), 40_000)], true));
        assert!(batch.push(peer(2), Source::Packet, &[(data.as_ptr(), 40_000)], true));
        assert_eq!(batch.len(), 2);
    }

    #[test]
    fn full_batches_refuse_more() {
        let data = [0u8; 100];
        let mut batch = SendBatch::new(2, 3, 8);
        assert!(batch.push(peer(2), Source::Packet, &[(data.as_ptr(), 10)], false));
        assert!(batch.push(peer(2), Source::Packet, &[(data.as_ptr(), 10)], false));
        assert!(!batch.push(peer(2), Source::Packet, &[(data.as_ptr(), 10)], false));
        assert!(!batch.has_room(1, 0));
        batch.clear();
        assert!(batch.is_empty() && batch.has_room(2, 8));
        assert!(!batch.has_room(4, 0));
        assert!(batch.header_space(8).is_some());
        assert!(batch.header_space(1).is_none());
        let two = [(data.as_ptr(), 10), (data.as_ptr(), 10)];
        assert!(batch.push(peer(2), Source::Packet, &two, true));
        assert!(
            !batch.push(peer(2), Source::Packet, &two, true),
            "no iovec room"
        );
    }

    #[test]
    fn prepared_messages_carry_address_pieces_and_segment_size() {
        let data = [0u8; 3000];
        let mut batch = SendBatch::new(8, 16, 0);
        for _ in 0..3 {
            batch.push(peer(2), Source::Packet, &[(data.as_ptr(), 1000)], true);
        }
        batch.push(peer(3), Source::Packet, &[(data.as_ptr(), 500)], true);
        let msg = batch.prepare(0).unwrap();
        // SAFETY: `prepare` pointed the header at the batch's live memory.
        unsafe {
            let addr = &*((*msg).msg_name as *const libc::sockaddr_in);
            assert_eq!(from_sockaddr(addr, (*msg).msg_namelen), Some(peer(2)));
            assert_eq!((*msg).msg_iovlen, 3);
            assert_eq!((*msg).msg_controllen, CONTROL_LEN);
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            assert_eq!((*cmsg).cmsg_level, libc::SOL_UDP);
            assert_eq!((*cmsg).cmsg_type, libc::UDP_SEGMENT);
            let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>());
            assert_eq!(size, 1000);
        }
        let msg = batch.prepare(1).unwrap();
        // SAFETY: as above.
        unsafe {
            assert_eq!((*msg).msg_iovlen, 1);
            assert_eq!((*msg).msg_controllen, 0);
            assert!((*msg).msg_control.is_null());
        }
        assert!(batch.prepare(2).is_none());
        let (_, count) = batch.prepare_from(0);
        assert_eq!(count, 2);
    }

    #[test]
    fn refused_runs_split_into_plain_datagrams() {
        let data = [0u8; 3000];
        let mut batch = SendBatch::new(8, 16, 0);
        for _ in 0..3 {
            batch.push(peer(2), Source::Packet, &[(data.as_ptr(), 1000)], true);
        }
        assert!(batch.split(0));
        assert_eq!(batch.len(), 4);
        assert_eq!(
            batch.info(0).unwrap().segments,
            0,
            "the run itself is emptied"
        );
        for i in 1..4 {
            let info = batch.info(i).unwrap();
            assert_eq!((info.segments, info.bytes), (1, 1000));
        }
        assert!(!batch.split(1), "a single datagram cannot be split");
        let mut small = SendBatch::new(2, 16, 0);
        for _ in 0..3 {
            small.push(peer(2), Source::Packet, &[(data.as_ptr(), 1000)], true);
        }
        assert!(!small.split(0), "no room for three messages");
    }

    #[test]
    fn gro_sizes_are_read_from_control_data() {
        let message = |level: i32, kind: i32, value: i32| {
            let mut control = vec![0u8; CONTROL_LEN];
            let len = std::mem::size_of::<libc::cmsghdr>() + 4;
            control[..8].copy_from_slice(&len.to_ne_bytes());
            control[8..12].copy_from_slice(&level.to_ne_bytes());
            control[12..16].copy_from_slice(&kind.to_ne_bytes());
            control[16..20].copy_from_slice(&value.to_ne_bytes());
            control
        };
        assert_eq!(
            gro_segment_size(&message(libc::SOL_UDP, libc::UDP_GRO, 1472)),
            Some(1472)
        );
        assert_eq!(
            gro_segment_size(&message(libc::SOL_UDP, libc::UDP_GRO, 0)),
            None
        );
        assert_eq!(
            gro_segment_size(&message(libc::SOL_IP, libc::UDP_GRO, 1472)),
            None
        );
        assert_eq!(gro_segment_size(&message(libc::SOL_UDP, 1, 1472)), None);
        // Two messages: the GRO size is in the second.
        let mut two = message(libc::SOL_IP, 8, 0);
        two.extend(message(libc::SOL_UDP, libc::UDP_GRO, 900));
        assert_eq!(gro_segment_size(&two), Some(900));
        // Truncated or nonsensical headers end the walk.
        assert_eq!(gro_segment_size(&[]), None);
        assert_eq!(gro_segment_size(&[0u8; 10]), None);
        assert_eq!(gro_segment_size(&[0u8; CONTROL_LEN]), None);
        let mut huge = message(libc::SOL_IP, 8, 0);
        huge[..8].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert_eq!(gro_segment_size(&huge), None);
    }

    #[test]
    fn short_or_foreign_addresses_are_refused() {
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 1);
        let raw = to_sockaddr(addr);
        assert_eq!(from_sockaddr(&raw, 0), None);
        assert_eq!(from_sockaddr(&raw, SOCKADDR_IN_LEN - 1), None);
        let mut v6 = raw;
        v6.sin_family = libc::AF_INET6 as libc::sa_family_t;
        assert_eq!(from_sockaddr(&v6, SOCKADDR_IN_LEN), None);
    }
}
