//! The TUN device: opening the queues of a multi-queue layer-3 tunnel.
//!
//! Every worker owns one queue of the same device, so the kernel spreads flows across workers
//! and no two threads ever share a file descriptor. The device lives as long as one queue is
//! open and disappears with the last one. This is one of the few modules that talk to the kernel
//! through raw `ioctl`s; every `unsafe` block says why it is sound.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The character device through which TUN interfaces are created.
const CLONE_DEVICE: &str = "/dev/net/tun";

/// The kernel's limit on a multi-queue device (`MAX_TAP_QUEUES`).
pub const MAX_QUEUES: usize = 256;

/// Why the TUN queues could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The interface name is empty, too long for the kernel (15 bytes at most) or holds a
    /// character the kernel refuses (NUL, `/`, `:`, whitespace).
    #[error("invalid TUN interface name {0:?}")]
    BadName(String),
    /// Zero queues, or more than the kernel allows on one device.
    #[error("a TUN device takes 1 to {MAX_QUEUES} queues, not {0}")]
    BadQueueCount(usize),
    /// `/dev/net/tun` could not be opened (missing module, no permission).
    #[error("cannot open {CLONE_DEVICE}: {0}")]
    Open(#[source] io::Error),
    /// The kernel refused to create or attach to the device.
    #[error("cannot attach queue {queue} of TUN device {name:?}: {source}")]
    Attach {
        /// The requested name (possibly a pattern such as `flannel%d`).
        name: String,
        /// Which queue failed, counting from 0.
        queue: usize,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// One queue of a multi-queue TUN device: a nonblocking, close-on-exec file descriptor from
/// which whole IPv4 packets are read and to which they are written, with no header before them.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
    name: String,
}

impl TunQueue {
    /// The interface's name as the kernel assigned it (a pattern such as `flannel%d` resolved).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsFd for TunQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for TunQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The interface flags every queue is opened with. Kept in one place so that offloads
/// (`IFF_VNET_HDR`, then `TUNSETOFFLOAD`) are added by changing the flags and the per-queue
/// setup below, not the callers.
const QUEUE_FLAGS: libc::c_int = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE;

/// Create (or attach to) the TUN device `name` and open `queues` queues of it, each nonblocking
/// and close-on-exec. `name` may be a kernel pattern such as `flannel%d`; every returned queue
/// reports the resolved name.
pub fn open_queues(name: &str, queues: usize) -> Result<Vec<TunQueue>, TunError> {
    let requested = InterfaceName::new(name)?;
    if queues == 0 || queues > MAX_QUEUES {
        return Err(TunError::BadQueueCount(queues));
    }
    let mut opened: Vec<TunQueue> = Vec::with_capacity(queues);
    let mut current = requested;
    for queue in 0..queues {
        let (fd, resolved) = open_queue(&current, QUEUE_FLAGS).map_err(|error| match error {
            QueueError::Open(source) => TunError::Open(source),
            QueueError::Attach(source) => TunError::Attach {
                name: name.to_owned(),
                queue,
                source,
            },
        })?;
        // Later queues attach to the device the first one created, by its real name.
        current = resolved;
        opened.push(TunQueue {
            fd,
            name: current.as_str().to_owned(),
        });
    }
    Ok(opened)
}

enum QueueError {
    Open(io::Error),
    Attach(io::Error),
}

fn open_queue(
    name: &InterfaceName,
    flags: libc::c_int,
) -> Result<(OwnedFd, InterfaceName), QueueError> {
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        // std adds O_CLOEXEC itself.
        .custom_flags(libc::O_NONBLOCK)
        .open(CLONE_DEVICE)
        .map_err(QueueError::Open)?;
    let fd = OwnedFd::from(file);

    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers and
    // addresses) for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    name.write_to(&mut request.ifr_name);
    // The flags field is a C `short`; every flag used here fits.
    request.ifr_ifru.ifru_flags = flags as libc::c_short;

    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `request` is a live, properly
    // aligned `ifreq` for the duration of the call and `fd` is an open /dev/net/tun descriptor.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(QueueError::Attach(io::Error::last_os_error()));
    }
    let resolved = InterfaceName::from_kernel(&request.ifr_name).map_err(|_| {
        QueueError::Attach(io::Error::new(
            io::ErrorKind::InvalidData,
            "kernel returned an unterminated interface name",
        ))
    })?;
    Ok((fd, resolved))
}

/// An interface name as the kernel accepts it: 1 to 15 bytes, not `.` or `..`, no NUL, `/`,
/// `:` or whitespace.
#[derive(Clone, Debug, PartialEq, Eq)]
struct InterfaceName(String);

impl InterfaceName {
    fn new(name: &str) -> Result<Self, TunError> {
        let valid = !name.is_empty()
            && name.len() < libc::IFNAMSIZ
            && name != "."
            && name != ".."
            && !name
                .bytes()
                .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace());
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(TunError::BadName(name.to_owned()))
        }
    }

    fn from_kernel(raw: &[libc::c_char; libc::IFNAMSIZ]) -> Result<Self, TunError> {
        let bytes: Vec<u8> = raw.iter().map(|c| *c as u8).collect();
        let end = bytes
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| TunError::BadName(String::from_utf8_lossy(&bytes).into_owned()))?;
        let name = String::from_utf8_lossy(&bytes[..end]).into_owned();
        Self::new(&name)
    }

    fn write_to(&self, out: &mut [libc::c_char; libc::IFNAMSIZ]) {
        // `new` guarantees the name and its terminating NUL fit.
        for (slot, byte) in out
            .iter_mut()
            .zip(self.0.bytes().chain(std::iter::repeat(0)))
        {
            *slot = byte as libc::c_char;
        }
    }

    fn as_str(&self) -> &str {
        &self.0
    }
}

/// Switch a descriptor between blocking and nonblocking mode.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's status flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let wanted = if nonblocking {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if wanted != flags {
        // SAFETY: F_SETFL takes an integer of status flags; `fd` is open for this call.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, wanted) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_accepts() {
        for good in ["flannel0", "flannel%d", "a", "fifteen-chars-x"] {
            assert_eq!(InterfaceName::new(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-chars-xx",
            "a/b",
            "a:1",
            "a b",
            "nul\0",
            "tab\t",
        ] {
            assert!(
                matches!(InterfaceName::new(bad), Err(TunError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names_round_trip_through_the_kernel_layout() {
        let name = InterfaceName::new("flannel%d").unwrap();
        let mut raw = [0x55 as libc::c_char; libc::IFNAMSIZ];
        name.write_to(&mut raw);
        assert_eq!(raw[9], 0, "terminated and zero-padded");
        assert_eq!(raw[libc::IFNAMSIZ - 1], 0);
        assert_eq!(InterfaceName::from_kernel(&raw).unwrap(), name);
        let unterminated = [b'x' as libc::c_char; libc::IFNAMSIZ];
        assert!(InterfaceName::from_kernel(&unterminated).is_err());
    }

    #[test]
    fn queue_counts_are_checked_before_touching_the_kernel() {
        assert!(matches!(
            open_queues("weft-test", 0),
            Err(TunError::BadQueueCount(0))
        ));
        assert!(matches!(
            open_queues("weft-test", MAX_QUEUES + 1),
            Err(TunError::BadQueueCount(_))
        ));
        assert!(matches!(
            open_queues("has space", 1),
            Err(TunError::BadName(_))
        ));
    }
}
