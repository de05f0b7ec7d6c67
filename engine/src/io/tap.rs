//! The multicast TAP: weft's layer-2 port on the container bridge. The relay thread reads the
//! frames the bridge floods to it; workers write the group traffic peers sent, one frame per
//! write (multicast is rare, so the writes are not batched). One descriptor serves them all:
//! a TAP write of one frame is atomic, whoever makes it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::io::tun::{open_tap, TunError};
use crate::wire::ethernet;

/// An open TAP device; it disappears when this is dropped.
#[derive(Debug)]
pub(crate) struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Create the TAP device `name` (nonblocking, bare frames).
    pub(crate) fn open(name: &str) -> Result<Self, TunError> {
        let (fd, name) = open_tap(name)?;
        Ok(Self { fd, name })
    }

    /// The device's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Read one frame into `buf`: its length, or `None` when none is waiting.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: reads at most `buf.len()` bytes into the live, writable `buf`.
            let rc = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if rc >= 0 {
                return Ok(Some(rc as usize));
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                _ => return Err(error),
            }
        }
    }

    /// Write one frame: `header` and then `packet`.
    pub(crate) fn write(
        &self,
        header: &[u8; ethernet::HEADER_LEN],
        packet: &[u8],
    ) -> io::Result<()> {
        let iovs = [
            libc::iovec {
                iov_base: header.as_ptr().cast_mut().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: packet.as_ptr().cast_mut().cast(),
                iov_len: packet.len(),
            },
        ];
        loop {
            // SAFETY: both iovecs describe live memory that nothing writes during the call;
            // the kernel only reads it.
            let rc = unsafe { libc::writev(self.fd.as_raw_fd(), iovs.as_ptr(), 2) };
            if rc >= 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EINTR) {
                return Err(error);
            }
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What a worker needs to deliver group traffic from peers: the TAP, what the host takes, and
/// the counters; and, with broadcast on, the queue that takes UDP to the Network's broadcast
/// address from the TUN to the relay thread.
#[derive(Clone, Debug)]
pub(crate) struct GroupDelivery {
    pub(crate) tap: std::sync::Arc<Tap>,
    pub(crate) delivery: crate::multicast::receive::Delivery,
    pub(crate) counters: std::sync::Arc<crate::multicast::MulticastCounters>,
    pub(crate) to_relay: Option<crate::io::broadcast_queue::BroadcastQueue>,
}

impl GroupDelivery {
    /// Write one frame into the TAP and count it.
    pub(crate) fn deliver(&self, header: &[u8; ethernet::HEADER_LEN], packet: &[u8]) {
        match self.tap.write(header, packet) {
            Ok(()) => self.counters.delivered(),
            Err(error) => {
                self.counters
                    .count_drop(crate::multicast::MulticastDrop::IoError, 1);
                tracing::debug!(%error, tap = self.tap.name(), "cannot deliver into the TAP");
            }
        }
    }
}
