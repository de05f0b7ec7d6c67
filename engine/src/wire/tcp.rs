//! TCP headers: the fields and flags weft reads and edits, and a checked view.

use super::{be16, be32};

/// Length of a TCP header without options.
pub const MIN_HEADER_LEN: usize = 20;
/// Offset of the sequence number.
pub const SEQ: usize = 4;
/// Offset of the acknowledgment number.
pub const ACK: usize = 8;
/// Offset of the data-offset byte.
pub const DATA_OFFSET: usize = 12;
/// Offset of the flags byte.
pub const FLAGS: usize = 13;
/// Offset of the checksum.
pub const CHECKSUM: usize = 16;

/// Flag: The last segment of a stream.
pub const FIN: u8 = 0x01;
/// Flag: Opens a connection.
pub const SYN: u8 = 0x02;
/// Flag: Resets a connection.
pub const RST: u8 = 0x04;
/// Flag: Push the data to the application at once.
pub const PSH: u8 = 0x08;
/// Flag: The urgent pointer is valid.
pub const URG: u8 = 0x20;
/// Flag: Congestion window reduced (ECN).
pub const CWR: u8 = 0x80;

/// Why bytes are not a TCP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TcpError {
    /// Shorter than the smallest header.
    #[error("{len} bytes cannot hold a TCP header")]
    TooShort {
        /// The bytes given.
        len: usize,
    },
    /// The data offset points before the options or past the bytes given.
    #[error("TCP header length {header_len} does not fit {len} bytes")]
    BadDataOffset {
        /// The header length the data offset gives.
        header_len: usize,
        /// The bytes given.
        len: usize,
    },
}

/// A checked view of a TCP header at the start of `buffer` (an IPv4 payload): once
/// [`TcpHeader::new_checked`] has accepted it, the whole header, options included, lies inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpHeader<T> {
    /// Check that `buffer` starts with a whole TCP header.
    pub fn new_checked(buffer: T) -> Result<Self, TcpError> {
        let bytes = buffer.as_ref();
        let len = bytes.len();
        let Some(&offset) = bytes.get(DATA_OFFSET).filter(|_| len >= MIN_HEADER_LEN) else {
            return Err(TcpError::TooShort { len });
        };
        let header_len = usize::from(offset >> 4) * 4;
        if header_len < MIN_HEADER_LEN || header_len > len {
            return Err(TcpError::BadDataOffset { header_len, len });
        }
        Ok(Self { buffer })
    }

    #[inline]
    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The header length, options included.
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.bytes()[DATA_OFFSET] >> 4) * 4
    }

    /// The sequence number.
    #[inline]
    pub fn seq(&self) -> u32 {
        be32(self.bytes(), SEQ).unwrap_or_default()
    }

    /// The acknowledgment number.
    #[inline]
    pub fn ack(&self) -> u32 {
        be32(self.bytes(), ACK).unwrap_or_default()
    }

    /// The flags byte.
    #[inline]
    pub fn flags(&self) -> u8 {
        self.bytes()[FLAGS]
    }

    /// The 32-bit word of data offset, flags and window.
    #[inline]
    pub fn offset_flags_window(&self) -> u32 {
        be32(self.bytes(), DATA_OFFSET).unwrap_or_default()
    }

    /// The checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        be16(self.bytes(), CHECKSUM).unwrap_or_default()
    }

    /// The options.
    #[inline]
    pub fn options(&self) -> &[u8] {
        &self.bytes()[MIN_HEADER_LEN..self.header_len()]
    }

    /// The bytes after the header.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.bytes()[self.header_len()..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_must_fit_their_data_offset() {
        let mut header = [0u8; 32];
        header[DATA_OFFSET] = 8 << 4;
        header[SEQ..SEQ + 4].copy_from_slice(&7u32.to_be_bytes());
        header[FLAGS] = PSH;
        let tcp = TcpHeader::new_checked(&header[..]).unwrap();
        assert_eq!(tcp.header_len(), 32);
        assert_eq!(tcp.seq(), 7);
        assert_eq!(tcp.flags(), PSH);
        assert_eq!(tcp.options().len(), 12);
        assert!(tcp.payload().is_empty());
        assert_eq!(
            TcpHeader::new_checked(&header[..31]),
            Err(TcpError::BadDataOffset {
                header_len: 32,
                len: 31
            })
        );
        assert_eq!(
            TcpHeader::new_checked(&header[..19]),
            Err(TcpError::TooShort { len: 19 })
        );
        header[DATA_OFFSET] = 4 << 4;
        assert!(TcpHeader::new_checked(&header[..]).is_err());
    }
}
