//! Why a worker stops, and which kernel errors mean it must: one policy for both back ends.

use std::io;

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

/// The read failures of one worker since its last successful read or receive.
#[derive(Debug, Default)]
pub(crate) struct ReadFailures(u32);

impl ReadFailures {
    /// A read or receive succeeded.
    pub(crate) fn reset(&mut self) {
        self.0 = 0;
    }

    /// A read or receive (`what`) failed with `errno`. Nothing to read (`EAGAIN`), an
    /// interrupted call (`EINTR`) and no free buffer (`ENOBUFS`) are not failures; a broken
    /// descriptor ends the worker at once, anything else after
    /// [`MAX_READ_FAILURES_IN_A_ROW`] in a row.
    pub(crate) fn failed(&mut self, what: &'static str, errno: i32) -> Result<(), WorkerError> {
        if matches!(errno, libc::ENOBUFS | libc::EAGAIN | libc::EINTR) {
            return Ok(());
        }
        if read_error_is_fatal(errno) {
            return Err(WorkerError::fatal(what, errno));
        }
        self.0 += 1;
        if self.0 > MAX_READ_FAILURES_IN_A_ROW {
            return Err(WorkerError::fatal(what, errno));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
