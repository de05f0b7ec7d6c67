//! The underlay UDP socket of one worker, and the socket-address layout the kernel uses.
//!
//! Every worker binds its own socket to the same public address and port with `SO_REUSEPORT`,
//! so the kernel spreads peers across workers and no socket is shared. Buffers are made large
//! (bursts of 64 KiB super-packets are coming) with the `…BUFFORCE` options, which ignore the
//! `rmem_max`/`wmem_max` limits when the process may; otherwise the plain options are used.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd};

use socket2::{Domain, Protocol, Socket, Type};

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
    // SAFETY: the option value is a live `c_int` and the length passed is its size; the
    // descriptor belongs to `socket`, which outlives the call.
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
