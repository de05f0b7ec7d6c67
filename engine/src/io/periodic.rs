//! A background thread that does one piece of work every tick until it is stopped: the
//! tunnels' timers and the GSO check's probe runs.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::io::stop::StopSignal;

/// A running periodic thread.
pub(crate) struct PeriodicThread {
    name: &'static str,
    thread: Option<JoinHandle<()>>,
    stop: Arc<StopSignal>,
}

impl PeriodicThread {
    /// Start the thread `name`, which runs `work` and then sleeps `tick`, until stopped.
    pub(crate) fn spawn(
        name: &'static str,
        tick: Duration,
        mut work: impl FnMut() + Send + 'static,
    ) -> io::Result<Self> {
        let stop = Arc::new(StopSignal::new()?);
        let signal = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !signal.is_raised() {
                    work();
                    std::thread::sleep(tick);
                }
            })?;
        Ok(Self {
            name,
            thread: Some(thread),
            stop,
        })
    }

    /// Stop the thread and wait for it.
    pub(crate) fn stop_and_join(&mut self) {
        self.stop.raise();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(thread = self.name, "background thread panicked");
            }
        }
    }
}
