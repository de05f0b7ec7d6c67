//! UDP headers: the fields weft reads and edits, and a checked view.

use super::be16;

/// Length of a UDP header.
pub const HEADER_LEN: usize = 8;
/// Offset of the length field.
pub const LENGTH: usize = 4;
/// Offset of the checksum.
pub const CHECKSUM: usize = 6;

/// Bytes too short to hold a UDP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes cannot hold a UDP header")]
pub struct UdpTooShort {
    /// The bytes given.
    pub len: usize,
}

/// A checked view of a UDP header at the start of `buffer` (an IPv4 payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpHeader<T> {
    /// Check that `buffer` starts with a whole UDP header.
    pub fn new_checked(buffer: T) -> Result<Self, UdpTooShort> {
        let len = buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(UdpTooShort { len });
        }
        Ok(Self { buffer })
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The length field: header and payload, as the sender said.
    #[inline]
    pub fn length(&self) -> u16 {
        be16(self.bytes(), LENGTH).unwrap_or_default()
    }

    /// The checksum field (0: none).
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.bytes(), CHECKSUM).unwrap_or_default()
    }

    /// The bytes after the header.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.bytes()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_eight_bytes() {
        let datagram = [0, 1, 0, 2, 0, 10, 0xab, 0xcd, 1, 2];
        let udp = UdpHeader::new_checked(&datagram[..]).unwrap();
        assert_eq!(udp.length(), 10);
        assert_eq!(udp.checksum(), 0xabcd);
        assert_eq!(udp.payload(), &[1, 2]);
        assert_eq!(
            UdpHeader::new_checked(&datagram[..7]),
            Err(UdpTooShort { len: 7 })
        );
    }
}
