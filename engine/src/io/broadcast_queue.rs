//! The queue from the workers to the multicast relay thread for UDP to the overlay Network's
//! broadcast address, which workers read from the TUN (see
//! [`crate::multicast::network_broadcast`]): bounded, so that a flood costs memory for at most
//! [`BROADCAST_QUEUE_LEN`] packets, with an eventfd the relay polls beside its TAP.

use std::io;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use crate::io::stop::EventFd;
use crate::multicast::network_broadcast::BroadcastSink;
use crate::multicast::{MulticastCounters, MulticastDrop};

/// Packets to the Network's broadcast address that may wait for the relay; what does not fit
/// is counted as `rate_limited` (the relay could not keep up, so it would refuse them anyway).
const BROADCAST_QUEUE_LEN: usize = 256;

/// The workers' end of the queue to the relay thread: copies a packet to the Network's
/// broadcast address into the queue and wakes the relay.
#[derive(Clone, Debug)]
pub(crate) struct BroadcastQueue {
    sender: SyncSender<Vec<u8>>,
    wake: Arc<EventFd>,
    counters: Arc<MulticastCounters>,
}

/// A queue from the workers to the relay thread: the workers' end, and the relay's.
pub(crate) fn broadcast_queue(
    counters: Arc<MulticastCounters>,
) -> io::Result<(BroadcastQueue, Receiver<Vec<u8>>, Arc<EventFd>)> {
    let (sender, receiver) = mpsc::sync_channel(BROADCAST_QUEUE_LEN);
    let wake = Arc::new(EventFd::new()?);
    let queue = BroadcastQueue {
        sender,
        wake: Arc::clone(&wake),
        counters,
    };
    Ok((queue, receiver, wake))
}

impl BroadcastSink for BroadcastQueue {
    fn hand_off(&self, packet: &[u8]) {
        match self.sender.try_send(packet.to_vec()) {
            Ok(()) => self.wake.notify(),
            Err(TrySendError::Full(_)) => self.counters.count_drop(MulticastDrop::RateLimited, 1),
            // The relay thread has ended (its TAP is gone): nothing carries broadcast now.
            Err(TrySendError::Disconnected(_)) => {
                self.counters.count_drop(MulticastDrop::IoError, 1)
            }
        }
    }
}
