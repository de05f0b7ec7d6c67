//! A worker's preallocated packet memory, lent to the kernel between calls.

use std::ptr::NonNull;

use crate::decide::REPLY_BUF_LEN;
use crate::wire::vnet::VnetHeader;

/// Size of every packet buffer: the largest IPv4 packet, and the 64 KiB super-packets that
/// TUN and UDP offloads produce.
pub const PACKET_BUF_LEN: usize = 65536;

/// Bytes reserved in front of every packet buffer, for headers the kernel puts before a packet
/// (the virtio-net header of a TUN read; io_uring's `recvmsg` header, the sender's address and
/// the control data).
pub(crate) const HEADROOM: usize = 64;

/// Distance between two packet buffers.
const STRIDE: usize = HEADROOM + PACKET_BUF_LEN;

/// A worker's preallocated packet memory: `slots` packet buffers of [`PACKET_BUF_LEN`] bytes
/// (each behind [`HEADROOM`] bytes) and as many reply buffers of [`REPLY_BUF_LEN`] bytes, each
/// pair used by one packet at a time.
///
/// The memory is reached only through raw pointers derived once from the allocation, because
/// the kernel reads and writes it between calls (io_uring) and no Rust reference may claim it
/// meanwhile. Whoever hands a buffer to the kernel must not touch it until the kernel is done.
pub(crate) struct PacketBuffers {
    packets: NonNull<u8>,
    replies: NonNull<u8>,
    slots: usize,
}

impl PacketBuffers {
    /// Zeroed buffers for `slots` packets (the pages are mapped lazily on first touch).
    pub(crate) fn new(slots: usize) -> Self {
        let packets = Box::into_raw(vec![0u8; slots * STRIDE].into_boxed_slice());
        let replies = Box::into_raw(vec![0u8; slots * REPLY_BUF_LEN].into_boxed_slice());
        Self {
            // A pointer from Box::into_raw is never null.
            packets: NonNull::new(packets.cast::<u8>()).unwrap_or(NonNull::dangling()),
            replies: NonNull::new(replies.cast::<u8>()).unwrap_or(NonNull::dangling()),
            slots,
        }
    }

    /// The start of packet buffer `slot` (which must be below the slot count).
    pub(crate) fn packet_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots, "packet slot {slot} out of range");
        // SAFETY: slot < slots, so the offset stays inside the allocation.
        unsafe { self.packets.as_ptr().add(slot * STRIDE + HEADROOM) }
    }

    /// The slot whose packet buffer `ptr` points into, if any.
    pub(crate) fn slot_of(&self, ptr: *const u8) -> Option<usize> {
        let offset = (ptr as usize).checked_sub(self.packets.as_ptr() as usize)?;
        let slot = offset / STRIDE;
        (slot < self.slots && offset % STRIDE >= HEADROOM).then_some(slot)
    }

    /// `bytes` (at most [`HEADROOM`]) before the start of packet buffer `slot`.
    pub(crate) fn headroom_ptr(&self, slot: usize, bytes: usize) -> *mut u8 {
        assert!(bytes <= HEADROOM, "headroom of {bytes} bytes is too large");
        // SAFETY: the packet buffer starts HEADROOM bytes into its stride, so stepping back at
        // most HEADROOM bytes stays inside the allocation.
        unsafe { self.packet_ptr(slot).sub(bytes) }
    }

    /// The start of reply buffer `slot` (which must be below the slot count).
    pub(crate) fn reply_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots, "reply slot {slot} out of range");
        // SAFETY: slot < slots, so the offset stays inside the allocation.
        unsafe { self.replies.as_ptr().add(slot * REPLY_BUF_LEN) }
    }

    /// The first `len` bytes of packet buffer `slot` and the whole reply buffer `slot`.
    ///
    /// # Safety
    /// No I/O may be in flight on either buffer, and the caller must not hold another slice
    /// of the same slot while these live.
    pub(crate) unsafe fn slot(&mut self, slot: usize, len: usize) -> (&mut [u8], &mut [u8]) {
        let len = len.min(PACKET_BUF_LEN);
        let packet = self.packet_ptr(slot);
        let reply = self.reply_ptr(slot);
        // SAFETY: both ranges lie inside their allocations and do not overlap each other; the
        // caller guarantees nothing else reads or writes them meanwhile.
        unsafe {
            (
                std::slice::from_raw_parts_mut(packet, len),
                std::slice::from_raw_parts_mut(reply, REPLY_BUF_LEN),
            )
        }
    }

    /// `len` bytes of slot `slot`'s headroom and packet buffer, starting `before` bytes in
    /// front of the packet, for reading what the kernel wrote there.
    ///
    /// # Safety
    /// As for [`PacketBuffers::slot`].
    pub(crate) unsafe fn with_headroom(&self, slot: usize, before: usize, len: usize) -> &[u8] {
        let start = self.headroom_ptr(slot, before);
        let len = len.min(before + PACKET_BUF_LEN);
        // SAFETY: the range starts inside the slot's stride and ends at most at the end of its
        // packet buffer; the caller guarantees the kernel no longer writes it.
        unsafe { std::slice::from_raw_parts(start, len) }
    }

    /// What a TUN read of `total` bytes left in `slot`: the virtio-net header read from the
    /// `vnet_len` bytes of headroom (a plain one without them, or when it cannot be read),
    /// the packet after it, and the slot's reply buffer.
    ///
    /// # Safety
    /// As for [`PacketBuffers::slot`]: the read has completed, and nothing else reads or
    /// writes the slot while the slices live.
    pub(crate) unsafe fn tun_read(
        &mut self,
        slot: usize,
        vnet_len: usize,
        total: usize,
    ) -> (VnetHeader, &mut [u8], &mut [u8]) {
        let header = if vnet_len > 0 {
            // SAFETY: the caller guarantees the kernel no longer writes the slot.
            let head = unsafe { self.with_headroom(slot, vnet_len, total) };
            VnetHeader::parse(head).unwrap_or(VnetHeader::PLAIN)
        } else {
            VnetHeader::PLAIN
        };
        let len = total.saturating_sub(vnet_len).min(PACKET_BUF_LEN);
        // SAFETY: as above, and the header slice is no longer used.
        let (packet, reply) = unsafe { self.slot(slot, len) };
        (header, packet, reply)
    }
}

/// A worker's arena for the packets opened from a batch's datagrams (with encryption only),
/// reached, as the packet buffers are, through a raw pointer derived once: the batch's
/// accepted packets point into its filled part while the rest is lent out for the next
/// receive.
///
/// Why an arena rather than room in the slots: the tunnel cannot decrypt a message where it
/// lies (it reads the message from one slice and writes into another), and a packet opened
/// into its own slot would need room ahead of the slot's first datagram as large as that
/// datagram, up to 64 KiB in front of every slot, plaintext or not. The arena costs nothing
/// without encryption and is mapped lazily, as far as batches fill it.
pub(crate) struct OpenedArena {
    start: NonNull<u8>,
    len: usize,
    used: usize,
}

impl OpenedArena {
    /// An arena for the packets of `slots` packet buffers' worth of datagrams: a packet is
    /// shorter than its datagram, so they always fit.
    pub(crate) fn new(slots: usize) -> Self {
        let len = slots * PACKET_BUF_LEN;
        let arena = Box::into_raw(vec![0u8; len].into_boxed_slice());
        Self {
            // A pointer from Box::into_raw is never null.
            start: NonNull::new(arena.cast::<u8>()).unwrap_or(NonNull::dangling()),
            len,
            used: 0,
        }
    }

    /// The unfilled rest of the arena, and where it starts.
    ///
    /// # Safety
    /// The caller must not hold another slice of the rest while this one lives.
    pub(crate) unsafe fn rest(&mut self) -> (*mut u8, &mut [u8]) {
        // SAFETY: `used` never passes `len`, so the range lies inside the allocation, and it
        // does not overlap the filled part, which only raw pointers reach.
        unsafe {
            let rest = self.start.as_ptr().add(self.used);
            (
                rest,
                std::slice::from_raw_parts_mut(rest, self.len - self.used),
            )
        }
    }

    /// Count the first `bytes` of the rest as filled.
    pub(crate) fn fill(&mut self, bytes: usize) {
        self.used = self.used.saturating_add(bytes).min(self.len);
    }

    /// Empty the arena, for the next batch: the packets in it are no longer read.
    pub(crate) fn clear(&mut self) {
        self.used = 0;
    }
}

impl Drop for OpenedArena {
    fn drop(&mut self) {
        let arena = std::ptr::slice_from_raw_parts_mut(self.start.as_ptr(), self.len);
        // SAFETY: it came from Box::into_raw with exactly this length and is freed once; no
        // I/O is ever in flight on it (the writes that read it are done within a batch).
        unsafe { drop(Box::from_raw(arena)) }
    }
}

impl Drop for PacketBuffers {
    fn drop(&mut self) {
        let packets =
            std::ptr::slice_from_raw_parts_mut(self.packets.as_ptr(), self.slots * STRIDE);
        let replies =
            std::ptr::slice_from_raw_parts_mut(self.replies.as_ptr(), self.slots * REPLY_BUF_LEN);
        // SAFETY: both came from Box::into_raw with exactly these lengths and are freed once.
        // Owners that may still have I/O in flight leak the buffers instead of dropping them.
        unsafe {
            drop(Box::from_raw(packets));
            drop(Box::from_raw(replies));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_buffers_do_not_overlap() {
        let mut buffers = PacketBuffers::new(3);
        for slot in 0..3 {
            // SAFETY: no I/O uses these buffers.
            let (packet, reply) = unsafe { buffers.slot(slot, PACKET_BUF_LEN) };
            packet.fill(slot as u8 + 1);
            reply.fill(slot as u8 + 10);
        }
        for slot in 0..3 {
            // SAFETY: as above.
            let (packet, reply) = unsafe { buffers.slot(slot, PACKET_BUF_LEN) };
            assert!(packet.iter().all(|b| *b == slot as u8 + 1));
            assert!(reply.iter().all(|b| *b == slot as u8 + 10));
            assert_eq!(reply.len(), REPLY_BUF_LEN);
        }
        // The headroom sits right before the packet, between the slots.
        let head = buffers.headroom_ptr(1, HEADROOM);
        assert_eq!(head as usize + HEADROOM, buffers.packet_ptr(1) as usize);
        assert_eq!(
            buffers.packet_ptr(0) as usize + PACKET_BUF_LEN + HEADROOM,
            buffers.packet_ptr(1) as usize
        );
        // SAFETY: as above.
        let seen = unsafe { buffers.with_headroom(2, 4, 6) };
        assert_eq!(seen, &[0, 0, 0, 0, 3, 3]);
    }

    #[test]
    fn an_arena_lends_its_rest_behind_what_is_filled_until_cleared() {
        let mut arena = OpenedArena::new(2);
        // SAFETY: no other slice of the arena lives.
        let (start, rest) = unsafe { arena.rest() };
        assert_eq!(rest.len(), 2 * PACKET_BUF_LEN);
        rest[..3].copy_from_slice(&[1, 2, 3]);
        arena.fill(3);
        // SAFETY: as above.
        let (next, rest) = unsafe { arena.rest() };
        assert_eq!(next as usize, start as usize + 3);
        assert_eq!(rest.len(), 2 * PACKET_BUF_LEN - 3);
        // SAFETY: the filled part is reached only through `start`, and no slice of it lives.
        assert_eq!(unsafe { std::slice::from_raw_parts(start, 3) }, &[1, 2, 3]);
        arena.fill(usize::MAX);
        // SAFETY: as above.
        assert!(
            unsafe { arena.rest() }.1.is_empty(),
            "filling stops at the end"
        );
        arena.clear();
        // SAFETY: as above.
        let (again, rest) = unsafe { arena.rest() };
        assert_eq!((again, rest.len()), (start, 2 * PACKET_BUF_LEN));
    }
}
