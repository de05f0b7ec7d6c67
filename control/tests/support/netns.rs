//! Network namespaces for host tests.
//!
//! Every namespace is created by the test that uses it, named with a per-run prefix
//! (`wch-<pid>-<n>-<tag>`), and deleted when its [`NetNs`] is dropped, also while a failed
//! test unwinds. Nothing is ever created in the root namespace: veth pairs are created
//! with both ends inside test namespaces, and code under test runs on a thread that has
//! `setns`'d into the namespace (a netlink socket, TUN device or child process created there
//! stays there).

#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace owned by one test.
pub struct NetNs {
    name: String,
}

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "host tests create network namespaces and need root (run them as root)"
    );
}

fn check(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl NetNs {
    /// Creates a fresh namespace with `lo` up.
    pub fn new(tag: &str) -> Self {
        require_root();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("wch-{}-{n}-{tag}", std::process::id());
        check(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`, panicking with its output on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = check(Command::new("ip").arg("-n").arg(&self.name).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a program inside the namespace (`ip netns exec`), whatever its exit status.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.name))
    }

    /// Runs a program inside the namespace and returns its stdout; panics on failure.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> String {
        let out = check(
            Command::new("ip")
                .args(["netns", "exec", &self.name, program])
                .args(args),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered this namespace; panics in `f` propagate.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: `ns` is an open namespace file descriptor; setns only changes
                // the calling thread's network namespace, which this thread owns alone.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into {path}: {}",
                    std::io::Error::last_os_error()
                );
                f()
            });
            match worker.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs the future `make()` returns on a current-thread tokio runtime inside this
    /// namespace.
    pub fn block_on<F, Fut>(&self, make: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        self.enter(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(make())
        })
    }

    /// Creates a TUN device (IFF_TUN | IFF_NO_PI, like flanneld's) in this namespace; it
    /// lives as long as the returned descriptor.
    pub fn create_tun(&self, name: &str) -> OwnedFd {
        self.enter(|| open_tun(name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Processes a test started inside the namespace (and only those) are ended first.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    // SAFETY: kill has no memory-safety preconditions; the pid was listed
                    // as a member of this test's own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete network namespace {}", self.name);
        }
    }
}

/// A veth pair with one end in each namespace, addresses assigned and both ends up.
pub fn veth(a: &NetNs, a_if: &str, a_cidr: &str, b: &NetNs, b_if: &str, b_cidr: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["addr", "add", a_cidr, "dev", a_if]);
    b.ip(&["addr", "add", b_cidr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

fn open_tun(name: &str) -> OwnedFd {
    assert!(name.len() < libc::IFNAMSIZ, "interface name too long");
    let path = c"/dev/net/tun";
    // SAFETY: `path` is a NUL-terminated string; open returns a new descriptor or -1.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open /dev/net/tun: {} (is the tun module available?)",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just returned by open and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq, which `req` is, and `fd` is an open tun fd.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    fd
}
