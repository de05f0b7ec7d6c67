//! One data-plane worker: a thread that owns a TUN queue, a UDP socket and an I/O back end,
//! and moves packets between them until told to stop; optionally pinned to a core.

use std::io;
use std::net::UdpSocket;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::{ActiveOffloads, IoBackend};
use crate::counters::WorkerCounters;
use crate::io::context::WorkerContext;
use crate::io::error::WorkerError;
use crate::io::stop::StopSignal;
use crate::io::syscalls::SyscallWorker;
use crate::io::tun::TunQueue;
use crate::io::uring::UringWorker;

/// A running worker thread, as the engine holds it.
pub(crate) struct WorkerThread {
    pub(crate) thread: Option<JoinHandle<Result<(), WorkerError>>>,
    pub(crate) stop: Arc<StopSignal>,
    pub(crate) counters: Arc<WorkerCounters>,
}

/// What a worker thread starts from.
pub(crate) struct WorkerSetup {
    pub(crate) index: usize,
    pub(crate) backend: IoBackend,
    pub(crate) pin_core: bool,
    pub(crate) tun: TunQueue,
    pub(crate) socket: UdpSocket,
    pub(crate) offloads: ActiveOffloads,
    pub(crate) context: WorkerContext,
}

/// Start a worker thread named `weft-worker-N` and wait until its I/O is set up. On failure the
/// thread has ended and its error is returned.
pub(crate) fn spawn(setup: WorkerSetup) -> Result<WorkerThread, SpawnError> {
    let stop = Arc::clone(&setup.context.stop);
    let counters = Arc::clone(&setup.context.counters);
    let index = setup.index;
    let (ready_tx, ready_rx) = mpsc::sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name(format!("weft-worker-{index}"))
        .spawn(move || run(setup, ready_tx))
        .map_err(SpawnError::Spawn)?;
    match ready_rx.recv() {
        Ok(()) => Ok(WorkerThread {
            thread: Some(thread),
            stop,
            counters,
        }),
        // The thread dropped the sender without a word: it failed during setup.
        Err(mpsc::RecvError) => match thread.join() {
            Ok(Err(error)) => Err(SpawnError::Setup(error)),
            Ok(Ok(())) | Err(_) => Err(SpawnError::Lost),
        },
    }
}

/// Why [`spawn`] failed.
#[derive(Debug)]
pub(crate) enum SpawnError {
    Spawn(io::Error),
    Setup(WorkerError),
    Lost,
}

fn run(setup: WorkerSetup, ready: mpsc::SyncSender<()>) -> Result<(), WorkerError> {
    let WorkerSetup {
        index,
        backend,
        pin_core,
        tun,
        socket,
        offloads,
        context,
    } = setup;
    if pin_core {
        match pin_current_thread(index) {
            Ok(cpu) => tracing::debug!(worker = index, cpu, "worker pinned"),
            Err(error) => tracing::warn!(worker = index, %error, "cannot pin worker to a core"),
        }
    }
    let stop = Arc::clone(&context.stop);
    let result = match backend {
        IoBackend::Uring => UringWorker::new(tun, socket, stop, offloads).and_then(|mut worker| {
            let _ = ready.send(());
            worker.run(&context)
        }),
        IoBackend::Syscalls => {
            SyscallWorker::new(tun, socket, stop, offloads).and_then(|mut worker| {
                let _ = ready.send(());
                worker.run(&context)
            })
        }
    };
    match &result {
        Ok(()) => tracing::debug!(worker = index, %backend, "worker stopped"),
        Err(error) => tracing::error!(worker = index, %backend, %error, "worker failed"),
    }
    result
}

/// Pin the calling thread to the `index`-th CPU it may run on (wrapping around), and return
/// that CPU's number.
fn pin_current_thread(index: usize) -> io::Result<usize> {
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size and pointer describe `allowed`.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET only reads bit `cpu` of `allowed`, and cpu < CPU_SETSIZE.
        .filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &allowed) })
        .collect();
    let Some(cpu) = cpus.get(index % cpus.len().max(1)).copied() else {
        return Err(io::Error::other("no CPU in the affinity mask"));
    };
    // SAFETY: as above, all zeroes is the empty set.
    let mut only: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes bit `cpu` of `only`, and cpu < CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut only) };
    // SAFETY: pid 0 is the calling thread; the size and pointer describe `only`.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &only) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_leaves_one_allowed_cpu() {
        let (cpu, count, is_set) = std::thread::spawn(|| {
            let cpu = pin_current_thread(1).unwrap();
            // SAFETY: all zeroes is the empty set.
            let mut now: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: pid 0 is this thread; the size and pointer describe `now`.
            let rc = unsafe {
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut now)
            };
            assert_eq!(rc, 0);
            // SAFETY: CPU_COUNT and CPU_ISSET only read the live set; cpu < CPU_SETSIZE.
            unsafe { (cpu, libc::CPU_COUNT(&now), libc::CPU_ISSET(cpu, &now)) }
        })
        .join()
        .unwrap();
        assert_eq!(count, 1);
        assert!(is_set, "pinned to CPU {cpu}");
    }
}
