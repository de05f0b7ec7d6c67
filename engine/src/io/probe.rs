//! What the running kernel can do, asked of the kernel itself wherever it can answer.
//!
//! Each offload is probed where it is turned on: the TUN's by `TUNSETOFFLOAD`, which refuses
//! flags it does not know ([`set_offload`]); UDP GSO by reading `UDP_SEGMENT`
//! ([`gso_supported`]); UDP GRO by setting `UDP_GRO` ([`enable_gro`]); io_uring's operations by
//! `IORING_REGISTER_PROBE` (in the io_uring back end). Two kernel bugs are invisible to every
//! probe, because the kernel accepts the request and then gets the packets wrong; only for
//! those does the kernel release decide ([`kernel_gso_broken`], [`kernel_cuts_tun_uso_safely`]).

use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use crate::config::{ActiveOffloads, Offloads, TunOffload};
use crate::io::tun::{set_offload, TunQueue};
use crate::io::udp::enable_gro;

/// Turn on what `wanted` asks for and the kernel supports, and log what is on.
pub(crate) fn probe_offloads(
    wanted: &Offloads,
    tun: &[TunQueue],
    sockets: &[UdpSocket],
) -> ActiveOffloads {
    let vnet_hdr = tun.iter().all(TunQueue::vnet_hdr);
    let tun_offload = match tun.first() {
        Some(queue) if vnet_hdr => match set_offload(queue, wanted.tun) {
            Ok(offload) => offload,
            Err(error) => {
                tracing::warn!(%error, "cannot set the TUN offloads; reading plain packets");
                TunOffload::default()
            }
        },
        _ => TunOffload::default(),
    };
    if wanted.tun && !vnet_hdr {
        tracing::info!("the TUN queues carry no virtio-net header: no TUN offloads");
    }
    let release = kernel_release().unwrap_or_default();
    let udp_gso = wanted.udp_gso
        && sockets.iter().all(|s| gso_supported(s.as_fd()))
        && if kernel_gso_broken(&release) {
            tracing::warn!(
                kernel = %release,
                "this kernel's UDP GSO corrupts headers (Linux 7.0 to 7.1.4): sending plain datagrams"
            );
            false
        } else {
            true
        };
    let udp_gro = wanted.udp_gro
        && sockets.iter().all(|s| match enable_gro(s.as_fd()) {
            Ok(()) => true,
            Err(error) => {
                tracing::info!(%error, "no UDP GRO");
                false
            }
        });
    let active = ActiveOffloads {
        vnet_hdr,
        tun: tun_offload,
        coalesce: vnet_hdr && wanted.tun,
        coalesce_udp: vnet_hdr
            && wanted.tun
            && tun_offload.uso
            && kernel_cuts_tun_uso_safely(&release),
        udp_gso,
        udp_gro,
        flow_steering: false,
    };
    tracing::info!(
        tun_csum = active.tun.csum,
        tun_tso = active.tun.tso,
        tun_uso = active.tun.uso,
        tun_coalesce = active.coalesce,
        tun_coalesce_udp = active.coalesce_udp,
        udp_gso = active.udp_gso,
        udp_gro = active.udp_gro,
        "offloads"
    );
    active
}

/// Whether the socket takes `UDP_SEGMENT` (Linux 4.18 and later): the option can be read.
pub(crate) fn gso_supported(socket: BorrowedFd<'_>) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live and sized for an integer option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0
}

/// Major, minor and patch of a kernel release as `uname -r` prints it (patch 0 when absent).
fn release_version(release: &str) -> Option<(u32, u32, u32)> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (numbers.next(), numbers.next()) else {
        return None;
    };
    Some((major, minor, numbers.next().flatten().unwrap_or(0)))
}

/// Whether a kernel release (as `uname -r` prints it) has the UDP GSO bug of Linux 7.0 to
/// 7.1.4, which corrupts the headers of segmented datagrams.
///
/// A version rule because no probe sees this bug: such a kernel accepts `UDP_SEGMENT` and
/// every GSO send, and the damage shows only in the datagrams that arrive at the peer.
pub fn kernel_gso_broken(release: &str) -> bool {
    release_version(release).is_some_and(|(major, minor, patch)| {
        major == 7 && (minor == 0 || (minor == 1 && patch <= 4))
    })
}

/// Whether a kernel release cuts a UDP super-packet written to a TUN correctly wherever it
/// goes. Linux 6.2 to 6.4 take USO on a TUN, but send such an untrusted ("dodgy") packet
/// through the old UFO path when it leaves by a device without `NETIF_F_GSO_ROBUST`, veth
/// among them, which destroys the datagrams (fixed in 6.5 by "gso: fix dodgy bit handling for
/// GSO_UDP_L4"). An unknown release counts as not safe.
///
/// A version rule because no probe sees this bug: `TUNSETOFFLOAD` accepts USO and a write of
/// a UDP super-packet succeeds; the datagrams are destroyed later, on their way out of another
/// device.
pub fn kernel_cuts_tun_uso_safely(release: &str) -> bool {
    release_version(release).is_some_and(|(major, minor, _)| (major, minor) >= (6, 5))
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> Option<String> {
    // SAFETY: `utsname` is a struct of byte arrays; all zeroes is valid.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the live struct it is given.
    if unsafe { libc::uname(&mut name) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = name
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Protocol, Socket, Type};

    #[test]
    fn broken_gso_kernels_are_recognised() {
        for broken in [
            "7.0",
            "7.0.0",
            "7.0.12-arch1",
            "7.1",
            "7.1.4",
            "7.1.4-1-default",
        ] {
            assert!(kernel_gso_broken(broken), "{broken}");
        }
        for fine in [
            "6.18.44-fc-v669",
            "6.1.0-13-amd64",
            "7.1.5",
            "7.2.0",
            "8.0",
            "",
            "garbage",
            "7",
        ] {
            assert!(!kernel_gso_broken(fine), "{fine}");
        }
        assert!(kernel_release().is_some_and(|r| !r.is_empty()));
    }

    #[test]
    fn kernels_that_cut_tun_uso_safely_are_recognised() {
        for safe in ["6.5", "6.5.0-rc3", "6.18.44-fc-v669", "7.0.1", "10.0"] {
            assert!(kernel_cuts_tun_uso_safely(safe), "{safe}");
        }
        for unsafe_release in [
            "6.2.0",
            "6.3.13",
            "6.4.16-arch1",
            "6.1.0-13-amd64",
            "5.15",
            "",
            "x",
        ] {
            assert!(
                !kernel_cuts_tun_uso_safely(unsafe_release),
                "{unsafe_release}"
            );
        }
    }

    #[test]
    fn gro_and_gso_are_available_on_this_kernel() {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        enable_gro(socket.as_fd()).unwrap();
        assert!(gso_supported(socket.as_fd()));
    }
}
