//! The signal that stops a worker.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Tells a worker to stop: an eventfd its I/O loop waits on beside the TUN and the socket, so
/// the request is seen at once, plus a flag for loops that are too busy to wait.
#[derive(Debug)]
pub(crate) struct StopSignal {
    fd: EventFd,
    raised: AtomicBool,
}

impl StopSignal {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            fd: EventFd::new()?,
            raised: AtomicBool::new(false),
        })
    }

    /// Ask the worker to stop. The eventfd stays readable from then on.
    pub(crate) fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.fd.notify();
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

/// A nonblocking eventfd: readable once notified, until cleared.
#[derive(Debug)]
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self { fd })
    }

    /// Make the descriptor readable.
    pub(crate) fn notify(&self) {
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

    /// Reset the counter, so that the descriptor waits for the next notification.
    pub(crate) fn clear(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads the 8-byte counter into a live u64; nonblocking, so an eventfd that
        // was not notified returns EAGAIN, which needs nothing done.
        unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut fds = [libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one live pollfd, no wait.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) == 1 && fds[0].revents & libc::POLLIN != 0 }
    }

    #[test]
    fn an_event_fd_is_readable_from_a_notification_until_cleared() {
        let event = EventFd::new().unwrap();
        assert!(!readable(event.as_fd()));
        event.notify();
        event.notify();
        assert!(readable(event.as_fd()));
        event.clear();
        assert!(!readable(event.as_fd()));
        event.clear();
        assert!(!readable(event.as_fd()));
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
