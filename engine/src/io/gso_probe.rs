//! The thread that sends the per-peer GSO checks' probe runs (see [`crate::gso_check`]).

use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::gso_check::{probe_run, GsoCheck, PROBE_SEGMENT_LEN};
use crate::io::periodic::PeriodicThread;
use crate::io::udp::{to_sockaddr, write_segment_control, ControlBuf, CONTROL_LEN};

/// How often the thread looks for runs due: new peers are probed within this.
const TICK: Duration = Duration::from_millis(50);

/// Send `run` to `to` as one GSO send of [`PROBE_SEGMENT_LEN`]-byte datagrams.
fn send_run(socket: &UdpSocket, to: SocketAddrV4, run: &[u8]) -> io::Result<()> {
    let mut addr = to_sockaddr(to);
    let mut control: ControlBuf = [0; CONTROL_LEN / 8];
    let control_len = write_segment_control(&mut control, PROBE_SEGMENT_LEN as u16);
    let mut piece = libc::iovec {
        iov_base: run.as_ptr().cast_mut().cast(),
        iov_len: run.len(),
    };
    // SAFETY: msghdr is plain data; all zeroes is valid, and every pointer set below is live.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
    message.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    message.msg_iov = &mut piece;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = control_len as _;
    // SAFETY: the message points at `addr`, `piece` (over `run`, only read) and `control`,
    // all alive for the call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &message, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Start the thread `weft-gso-probe`, which sends each checked peer its probe runs from
/// `socket` (a duplicate of a worker's socket) to the peer's address at `port`.
pub(crate) fn spawn(check: GsoCheck, socket: UdpSocket, port: u16) -> io::Result<PeriodicThread> {
    PeriodicThread::spawn("weft-gso-probe", TICK, move || {
        for (peer, nonce) in check.due(Instant::now()) {
            let run = probe_run(peer, nonce);
            if let Err(error) = send_run(&socket, SocketAddrV4::new(peer, port), &run) {
                // Unanswered, the run is sent again; after the last, the peer fails.
                tracing::debug!(%peer, %error, "cannot send a GSO probe run");
            }
        }
    })
}
