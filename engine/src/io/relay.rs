//! The multicast relay thread: one per engine, beside the workers. It reads the frames the
//! container bridge floods to weft's TAP, has the pure [`Relay`] decide on each, sends the
//! copies with `sendmmsg` from a duplicate of worker 0's bound socket (so that they leave from
//! the overlay port, which receivers check), publishes the local groups, and keeps members
//! reporting with an IGMP general query every minute (and a group-specific one after a leave).
//! Workers hand it the UDP to the Network's broadcast address they read from the TUN through a
//! [`BroadcastQueue`](crate::io::broadcast_queue::BroadcastQueue); it writes each into the TAP
//! for this host's containers and sends the copies with those of the frames.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::io::stop::{EventFd, StopSignal};
use crate::io::tap::Tap;
use crate::io::udp::to_sockaddr;
use crate::multicast::relay::{FrameOutcome, Relay};
use crate::multicast::{Groups, LocalGroups, MulticastCounters, MulticastDrop};
use crate::route::Routes;
use crate::wire::ethernet::{self, BROADCAST_MAC};
use crate::wire::igmp;

/// How often the relay asks the bridge's members to report.
pub(crate) const QUERY_INTERVAL: Duration = Duration::from_secs(60);
/// How soon a query that could not be written is tried again.
const QUERY_RETRY: Duration = Duration::from_secs(1);
/// How long members may wait to answer a general query, in tenths of a second: short, so
/// that the groups are known soon after a start (a bridge holds tens of members, not the
/// thousands the 10 s default spreads out).
const QUERY_RESPONSE_TENTHS: u8 = 20;
/// How long members may wait to answer a group-specific query, in tenths of a second.
const LEAVE_RESPONSE_TENTHS: u8 = 10;
/// Frames read per round before their copies are sent.
const FRAMES_PER_ROUND: usize = 16;
/// The largest frame a TAP hands over: a 64 KiB packet behind an Ethernet header.
const FRAME_BUF_LEN: usize = 65_536 + ethernet::HEADER_LEN;
/// The longest the relay sleeps, so that expiries and queries stay on time.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// The running relay thread, as the engine holds it.
pub(crate) struct RelayThread {
    pub(crate) thread: Option<JoinHandle<()>>,
    pub(crate) stop: Arc<StopSignal>,
}

/// What the relay thread starts from.
pub(crate) struct RelaySetup {
    pub(crate) tap: Arc<Tap>,
    pub(crate) socket: UdpSocket,
    pub(crate) routes: Routes,
    pub(crate) groups: Groups,
    pub(crate) local: LocalGroups,
    pub(crate) counters: Arc<MulticastCounters>,
    pub(crate) relay: Relay,
    /// What the workers hand over from the TUN, and the signal that they did.
    pub(crate) handed: Receiver<Vec<u8>>,
    pub(crate) wake: Arc<EventFd>,
}

/// Start the relay thread, named `weft-relay`.
pub(crate) fn spawn(setup: RelaySetup) -> io::Result<RelayThread> {
    let stop = Arc::new(StopSignal::new()?);
    let signal = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("weft-relay".into())
        .spawn(move || run(setup, &signal))?;
    Ok(RelayThread {
        thread: Some(thread),
        stop,
    })
}

impl RelayThread {
    /// Stop the thread and wait for it, which closes its socket duplicate.
    pub(crate) fn stop_and_join(&mut self) {
        self.stop.raise();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("multicast relay thread panicked");
            }
        }
    }
}

fn run(setup: RelaySetup, stop: &StopSignal) {
    let RelaySetup {
        tap,
        socket,
        routes,
        groups,
        local,
        counters,
        mut relay,
        handed,
        wake,
    } = setup;
    let mut frames: Vec<Vec<u8>> = (0..FRAMES_PER_ROUND)
        .map(|_| vec![0; FRAME_BUF_LEN])
        .collect();
    let mut lens = [0usize; FRAMES_PER_ROUND];
    let mut next_query = Instant::now();
    tracing::info!(tap = tap.name(), "multicast relay started");
    while !stop.is_raised() {
        let now = Instant::now();
        if now >= next_query {
            // Until control brings the TAP up, writes fail: try again soon rather than in a
            // minute, so that members that joined before weft started are learned at once.
            let sent = query(
                &tap,
                Ipv4Addr::UNSPECIFIED,
                QUERY_RESPONSE_TENTHS,
                &counters,
            );
            next_query = now + if sent { QUERY_INTERVAL } else { QUERY_RETRY };
        }
        if relay.expire(now) {
            publish(&relay, &local, &counters);
        }
        let due = relay
            .membership()
            .next_expiry()
            .map_or(next_query, |expiry| expiry.min(next_query));
        let wait = due.saturating_duration_since(now).min(MAX_WAIT);
        let ready = match wait_readable(&tap, &wake, stop, wait) {
            Ok(ready) if ready.frames || ready.handed => ready,
            Ok(_) => continue,
            Err(error) => {
                tracing::error!(%error, "multicast relay stopped: no more multicast or broadcast is replicated");
                return;
            }
        };
        // Read what is waiting, up to a round's worth.
        let mut filled = 0;
        while ready.frames && filled < FRAMES_PER_ROUND {
            match tap.read(&mut frames[filled]) {
                Ok(Some(len)) => {
                    lens[filled] = len;
                    filled += 1;
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "cannot read from the multicast TAP");
                    break;
                }
            }
        }
        // And what the workers handed over, up to a round's worth.
        let mut broadcasts: Vec<Vec<u8>> = Vec::new();
        if ready.handed {
            wake.clear();
            broadcasts.extend(handed.try_iter().take(FRAMES_PER_ROUND));
            if broadcasts.len() == FRAMES_PER_ROUND {
                // More may wait: come back without sleeping.
                wake.notify();
            }
        }
        let now = Instant::now();
        let table = routes.snapshot();
        let receivers = groups.snapshot();
        let mut carried = Vec::with_capacity(broadcasts.len());
        for (index, packet) in broadcasts.iter_mut().enumerate() {
            match relay.on_network_broadcast(packet, now, &table, &receivers) {
                Ok(broadcast) => {
                    if let Some(reason) = broadcast.refused {
                        counters.count_drop(reason, 1);
                    }
                    carried.push((index, broadcast.to));
                }
                Err(reason) => counters.count_drop(reason, 1),
            }
        }
        let mut copies: Vec<(&[u8], SocketAddrV4)> = Vec::new();
        for (index, to) in carried {
            let packet = &broadcasts[index][..];
            // This host's other containers: the bridge floods the frame to every port but
            // the TAP. The sender's kernel drops its own copy (its own source address).
            match tap.write(&ethernet::ipv4_header(BROADCAST_MAC), packet) {
                Ok(()) => counters.delivered(),
                Err(error) => {
                    counters.count_drop(MulticastDrop::IoError, 1);
                    tracing::debug!(%error, "cannot write a broadcast into the TAP");
                }
            }
            copies.extend(to.iter().map(|peer| (packet, *peer)));
        }
        let mut membership_changed = false;
        let mut left = Vec::new();
        for (frame, len) in frames.iter().zip(lens).take(filled) {
            match relay.on_frame(&frame[..len], now, &table, &receivers) {
                FrameOutcome::Ignored => {}
                FrameOutcome::Membership(update) => {
                    counters.igmp();
                    membership_changed |= update.changed;
                    left.extend(update.left);
                    if update.malformed {
                        counters.count_drop(MulticastDrop::BadPacket, 1);
                    }
                }
                FrameOutcome::Replicate { packet, to } => {
                    copies.extend(to.iter().map(|peer| (packet, *peer)));
                }
                FrameOutcome::Drop(reason) => counters.count_drop(reason, 1),
            }
        }
        send_copies(&socket, &copies, &counters);
        if membership_changed {
            publish(&relay, &local, &counters);
        }
        for group in left {
            query(&tap, group, LEAVE_RESPONSE_TENTHS, &counters);
        }
    }
    tracing::info!(tap = tap.name(), "multicast relay stopped");
}

fn publish(relay: &Relay, local: &LocalGroups, counters: &MulticastCounters) {
    let groups = relay.membership().groups();
    counters.set_groups(groups.len());
    if local.set(&groups) {
        tracing::debug!(?groups, "local multicast groups changed");
    }
}

/// Write a query for `group` (unspecified: a general query) into the TAP; whether it was.
fn query(tap: &Tap, group: Ipv4Addr, response_tenths: u8, counters: &MulticastCounters) -> bool {
    let interval = QUERY_INTERVAL.as_secs().min(u64::from(u8::MAX)) as u8;
    let frame = igmp::write_query(group, response_tenths, interval);
    let (header, packet) = frame.split_at(ethernet::HEADER_LEN);
    let header: &[u8; ethernet::HEADER_LEN] =
        header.try_into().unwrap_or(&[0; ethernet::HEADER_LEN]);
    match tap.write(header, packet) {
        Ok(()) => {
            counters.query_sent();
            true
        }
        Err(error) => {
            tracing::debug!(%error, "cannot send an IGMP query into the TAP");
            false
        }
    }
}

/// What the relay found to do after a wait.
#[derive(Clone, Copy, Debug, Default)]
struct Ready {
    /// The TAP has frames to read.
    frames: bool,
    /// A worker handed packets over.
    handed: bool,
}

/// Wait until the TAP is readable or a worker woke the relay, the stop signal is raised (then
/// nothing is ready) or `wait` passes.
fn wait_readable(
    tap: &Tap,
    wake: &EventFd,
    stop: &StopSignal,
    wait: Duration,
) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd {
            fd: tap.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let timeout = wait.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: three live pollfds, owned by this frame for the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
    if rc < 0 {
        let error = io::Error::last_os_error();
        return if error.raw_os_error() == Some(libc::EINTR) {
            Ok(Ready::default())
        } else {
            Err(error)
        };
    }
    if fds[1].revents != 0 {
        return Ok(Ready::default());
    }
    if fds[0].revents & libc::POLLIN == 0 && fds[0].revents & HANGUP != 0 {
        // The device was deleted under the descriptor: polling again would spin.
        return Err(io::Error::other("the multicast TAP device is gone"));
    }
    Ok(Ready {
        frames: fds[0].revents & libc::POLLIN != 0,
        handed: fds[2].revents & libc::POLLIN != 0,
    })
}

/// What `poll` reports for a TAP whose device was deleted.
const HANGUP: libc::c_short = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;

/// Send every copy, as few `sendmmsg` calls as the kernel allows; what cannot be sent is
/// counted.
fn send_copies(socket: &UdpSocket, copies: &[(&[u8], SocketAddrV4)], counters: &MulticastCounters) {
    if copies.is_empty() {
        return;
    }
    let mut addrs: Vec<libc::sockaddr_in> = copies.iter().map(|(_, to)| to_sockaddr(*to)).collect();
    let mut iovs: Vec<libc::iovec> = copies
        .iter()
        .map(|(packet, _)| libc::iovec {
            iov_base: packet.as_ptr().cast_mut().cast(),
            iov_len: packet.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(addrs.iter_mut())
        .map(|(iov, addr)| {
            // SAFETY: `msghdr` is a plain C struct for which all-zero bytes are valid.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_name = (addr as *mut libc::sockaddr_in).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_iov = iov;
            hdr.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            }
        })
        .collect();
    let mut next = 0;
    let mut waited = false;
    while next < msgs.len() {
        let count = (msgs.len() - next).min(1024);
        // SAFETY: messages next..next+count point at live addresses, iovecs and packets (in
        // the frame buffers) that nothing writes during the call.
        let rc = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs[next..].as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if rc > 0 {
            counters.replicated(rc as u64);
            next += rc as usize;
            continue;
        }
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        match errno {
            libc::EINTR => {}
            libc::EAGAIN if !waited => {
                waited = true;
                wait_writable(socket);
            }
            _ => {
                // This message failed (an unreachable peer, a full buffer): skip it.
                counters.count_drop(MulticastDrop::IoError, 1);
                next += 1;
            }
        }
    }
}

fn wait_writable(socket: &UdpSocket) {
    let mut fds = [libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    }];
    // SAFETY: one live pollfd; a short wait for room in the send buffer.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, 10) };
}
