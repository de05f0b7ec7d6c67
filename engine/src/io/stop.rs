//! The signal that stops a worker.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

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

#[cfg(test)]
mod tests {
    use super::*;

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
