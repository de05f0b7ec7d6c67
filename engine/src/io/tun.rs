//! The TUN device: opening the queues of a multi-queue layer-3 tunnel.
//!
//! Every worker owns one queue of the same device, so the kernel spreads flows across workers
//! and no two threads ever share a file descriptor. The device lives as long as one queue is
//! open and disappears with the last one. With offloads, the device is opened with a virtio-net
//! header before every packet and told (`TUNSETOFFLOAD`) that the engine completes checksums and
//! cuts TCP and UDP super-packets itself. This is one of the few modules that talk to the kernel
//! through raw `ioctl`s; every `unsafe` block says why it is sound.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::batch::{Source, WriteCount};
pub use crate::config::TunOffload;
use crate::offload::coalesce::MAX_SEGMENTS;
use crate::wire::vnet::VNET_HDR_LEN;

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
/// which whole IPv4 packets are read and to which they are written — each behind a 10-byte
/// virtio-net header ([`crate::offload::VnetHeader`]) when the queue was opened with one.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
    name: String,
    vnet_hdr: bool,
}

impl TunQueue {
    /// The interface's name as the kernel assigned it (a pattern such as `flannel%d` resolved).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether every packet read or written carries a virtio-net header: the device was opened
    /// with `IFF_VNET_HDR`, which segmentation offloads need.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
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

/// The interface flags every queue is opened with; [`libc::IFF_VNET_HDR`] is added for
/// offloads.
const QUEUE_FLAGS: libc::c_int = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE;

/// Create (or attach to) the TUN device `name` and open `queues` queues of it, each nonblocking
/// and close-on-exec, carrying bare packets as flanneld's device does (no TUN offloads; see
/// [`open_queues_with`]).
pub fn open_queues(name: &str, queues: usize) -> Result<Vec<TunQueue>, TunError> {
    open_queues_with(name, queues, false)
}

/// Create (or attach to) the TUN device `name` and open `queues` queues of it, each nonblocking
/// and close-on-exec. `name` may be a kernel pattern such as `flannel%d`; every returned queue
/// reports the resolved name.
///
/// With `vnet_hdr`, the device is opened with `IFF_VNET_HDR` (and a 10-byte header,
/// `TUNSETVNETHDRSZ`) if the kernel offers it, which lets the engine turn on segmentation
/// offloads; [`TunQueue::vnet_hdr`] tells whether it was. Without, packets are read and
/// written bare, as the udp backend always did.
pub fn open_queues_with(
    name: &str,
    queues: usize,
    vnet_hdr: bool,
) -> Result<Vec<TunQueue>, TunError> {
    let requested = InterfaceName::new(name)?;
    if queues == 0 || queues > MAX_QUEUES {
        return Err(TunError::BadQueueCount(queues));
    }
    let mut opened: Vec<TunQueue> = Vec::with_capacity(queues);
    let mut current = requested;
    let mut flags = QUEUE_FLAGS;
    for queue in 0..queues {
        let attach_error = |source| TunError::Attach {
            name: name.to_owned(),
            queue,
            source,
        };
        let file = open_clone_device().map_err(TunError::Open)?;
        if queue == 0 && vnet_hdr && supports_vnet_hdr(&file) {
            flags |= libc::IFF_VNET_HDR;
        }
        let resolved = attach(&file, &current, flags).map_err(attach_error)?;
        if flags & libc::IFF_VNET_HDR != 0 {
            set_vnet_hdr_len(&file).map_err(attach_error)?;
        }
        // Later queues attach to the device the first one created, by its real name.
        current = resolved;
        opened.push(TunQueue {
            fd: file,
            name: current.as_str().to_owned(),
            vnet_hdr: flags & libc::IFF_VNET_HDR != 0,
        });
    }
    Ok(opened)
}

/// Open (creating it if need be) the layer-2 TAP device `name`, bare frames without packet
/// information, nonblocking: the multicast relay's port on the container bridge. Returns the
/// descriptor and the device's name.
pub(crate) fn open_tap(name: &str) -> Result<(OwnedFd, String), TunError> {
    let requested = InterfaceName::new(name)?;
    let file = open_clone_device().map_err(TunError::Open)?;
    let resolved =
        attach(&file, &requested, libc::IFF_TAP | libc::IFF_NO_PI).map_err(|source| {
            TunError::Attach {
                name: name.to_owned(),
                queue: 0,
                source,
            }
        })?;
    Ok((file, resolved.as_str().to_owned()))
}

fn open_clone_device() -> io::Result<OwnedFd> {
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        // std adds O_CLOEXEC itself.
        .custom_flags(libc::O_NONBLOCK)
        .open(CLONE_DEVICE)?;
    Ok(OwnedFd::from(file))
}

/// Whether the kernel's TUN driver offers `IFF_VNET_HDR` (`TUNGETFEATURES`).
fn supports_vnet_hdr(fd: &OwnedFd) -> bool {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int of feature flags to the live `features`;
    // `fd` is an open /dev/net/tun descriptor.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETFEATURES, &mut features) };
    rc == 0 && features & libc::IFF_VNET_HDR as libc::c_uint != 0
}

/// Attach the unattached `/dev/net/tun` descriptor `fd` to device `name` with `flags`, and
/// return the name the kernel gave the device.
fn attach(fd: &OwnedFd, name: &InterfaceName, flags: libc::c_int) -> io::Result<InterfaceName> {
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
        return Err(io::Error::last_os_error());
    }
    InterfaceName::from_kernel(&request.ifr_name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "kernel returned an unterminated interface name",
        )
    })
}

/// Ask for the 10-byte virtio-net header (the kernel's default, set explicitly so that a
/// device another program created with a different size cannot surprise the engine).
fn set_vnet_hdr_len(fd: &OwnedFd) -> io::Result<()> {
    let len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the live `len`; `fd` is an attached queue.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The `TUN_F_*` flags for `offload`.
fn offload_flags(offload: TunOffload) -> libc::c_uint {
    let mut flags = 0;
    if offload.csum {
        flags |= libc::TUN_F_CSUM;
    }
    if offload.tso {
        flags |= libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    }
    if offload.uso {
        flags |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
    }
    flags
}

/// Turn the device's offloads on (`wanted`) or off, through queue `queue` (the setting is the
/// device's). On, the richest set the kernel accepts is chosen: checksum, TSO and USO; without
/// USO (before Linux 6.2); checksum alone. A queue without a virtio-net header cannot have any.
pub fn set_offload(queue: &TunQueue, wanted: bool) -> io::Result<TunOffload> {
    if !queue.vnet_hdr {
        return Ok(TunOffload::default());
    }
    let candidates: &[TunOffload] = if wanted {
        &[
            TunOffload {
                csum: true,
                tso: true,
                uso: true,
            },
            TunOffload {
                csum: true,
                tso: true,
                uso: false,
            },
            TunOffload {
                csum: true,
                tso: false,
                uso: false,
            },
        ]
    } else {
        &[]
    };
    for offload in candidates {
        // SAFETY: TUNSETOFFLOAD takes the flags as the integer argument itself; `queue` is an
        // attached queue.
        let rc = unsafe {
            libc::ioctl(
                queue.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                offload_flags(*offload) as libc::c_ulong,
            )
        };
        if rc == 0 {
            return Ok(*offload);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(error);
        }
    }
    // SAFETY: as above, with no flags: plain packets only.
    let rc = unsafe { libc::ioctl(queue.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TunOffload::default())
}

/// TUN writes prepared for the kernel, each a virtio-net header (when the device takes one)
/// and the pieces of a packet or super-packet, as an `iovec` array whose memory never moves:
/// io_uring reads it after the submitting call has returned.
pub(crate) struct WriteList {
    vnets: Box<[[u8; VNET_HDR_LEN]]>,
    iovs: Box<[libc::iovec]>,
    writes: Box<[WriteEntry]>,
    len: usize,
    iovs_used: usize,
}

/// One write of a [`WriteList`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WriteEntry {
    first_iov: u32,
    iovs: u32,
    vnet: bool,
    /// What the write carries.
    pub(crate) count: WriteCount,
    /// Forwarded packets or an ICMP error.
    pub(crate) source: Source,
}

impl WriteList {
    /// Room for `writes` writes of `iovs` pieces in all (headers included).
    pub(crate) fn new(writes: usize, iovs: usize) -> Self {
        let entry = WriteEntry {
            first_iov: 0,
            iovs: 0,
            vnet: false,
            count: WriteCount::default(),
            source: Source::Packet,
        };
        Self {
            vnets: vec![[0u8; VNET_HDR_LEN]; writes].into_boxed_slice(),
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                iovs
            ]
            .into_boxed_slice(),
            writes: vec![entry; writes].into_boxed_slice(),
            len: 0,
            iovs_used: 0,
        }
    }

    /// Forget every write (none may be in flight).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
        self.iovs_used = 0;
    }

    /// How many writes are prepared.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Add a write of `pieces` behind `vnet`; `false` if there is no room.
    pub(crate) fn push(
        &mut self,
        vnet: Option<[u8; VNET_HDR_LEN]>,
        pieces: &[libc::iovec],
        count: WriteCount,
        source: Source,
    ) -> bool {
        let needed = pieces.len() + usize::from(vnet.is_some());
        if self.len == self.writes.len() || self.iovs_used + needed > self.iovs.len() {
            return false;
        }
        let first = self.iovs_used;
        let mut at = first;
        if let Some(vnet) = vnet {
            self.vnets[self.len] = vnet;
            self.iovs[at] = libc::iovec {
                iov_base: self.vnets[self.len].as_mut_ptr().cast(),
                iov_len: VNET_HDR_LEN,
            };
            at += 1;
        }
        self.iovs[at..at + pieces.len()].copy_from_slice(pieces);
        self.writes[self.len] = WriteEntry {
            first_iov: first as u32,
            iovs: needed as u32,
            vnet: vnet.is_some(),
            count,
            source,
        };
        self.len += 1;
        self.iovs_used += needed;
        true
    }

    /// The pieces of write `i`: its `iovec`s without the virtio-net header's.
    pub(crate) fn pieces(&self, i: usize) -> &[libc::iovec] {
        let Some(entry) = self.writes.get(..self.len).and_then(|w| w.get(i)) else {
            return &[];
        };
        let first = entry.first_iov as usize + usize::from(entry.vnet);
        let end = entry.first_iov as usize + entry.iovs as usize;
        self.iovs.get(first..end).unwrap_or_default()
    }

    /// Write `i`: its `iovec` array and length, and what it carries.
    pub(crate) fn get(&self, i: usize) -> Option<(*const libc::iovec, u32, WriteEntry)> {
        let entry = *self.writes.get(..self.len)?.get(i)?;
        let iovs = self.iovs.get(entry.first_iov as usize..)?.as_ptr();
        Some((iovs, entry.iovs, entry))
    }
}

/// Write one packet to the TUN from `pieces`, behind `vnet` when the device takes a header:
/// the byte count or a negative errno.
pub(crate) fn write_packet(
    fd: RawFd,
    vnet: Option<&[u8; VNET_HDR_LEN]>,
    pieces: &[libc::iovec],
) -> i64 {
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_SEGMENTS + 2];
    let mut used = 0;
    if let Some(vnet) = vnet {
        iovs[0] = libc::iovec {
            iov_base: vnet.as_ptr().cast_mut().cast(),
            iov_len: VNET_HDR_LEN,
        };
        used = 1;
    }
    let take = pieces.len().min(iovs.len() - used);
    iovs[used..used + take].copy_from_slice(&pieces[..take]);
    used += take;
    loop {
        // SAFETY: `iovs[..used]` describes live memory (the caller's pieces and `vnet`) that
        // nothing writes during the call.
        let rc = unsafe { libc::writev(fd, iovs.as_ptr(), used as libc::c_int) };
        if rc >= 0 {
            return rc as i64;
        }
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if errno != libc::EINTR {
            return -i64::from(errno);
        }
    }
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
