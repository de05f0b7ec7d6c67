//! Checked, zero-copy views of IPv4 packets and the Internet checksum.
//!
//! [`Ipv4Packet::new_checked`] validates a buffer once — lengths, version, header length,
//! header checksum — after which every accessor stays in bounds. A TUN read and a received
//! datagram each carry exactly one packet, so the header's total length must equal the buffer
//! length: anything shorter or longer is malformed, never truncated or padded. Header edits
//! (the TTL, the checksum) are methods on views over mutable buffers.

use std::net::Ipv4Addr;

/// Length of an IPv4 header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// IP protocol numbers weft looks at.
pub mod protocol {
    /// Internet Control Message Protocol.
    pub const ICMP: u8 = 1;
    /// Transmission Control Protocol.
    pub const TCP: u8 = 6;
    /// User Datagram Protocol.
    pub const UDP: u8 = 17;
}

// Byte offsets of the header fields.
const VERSION_IHL: usize = 0;
const TOTAL_LEN: usize = 2;
const IDENT: usize = 4;
const FLAGS_FRAG: usize = 6;
const TTL: usize = 8;
const PROTOCOL: usize = 9;
const CHECKSUM: usize = 10;
const SRC: usize = 12;
const DST: usize = 16;

const FLAG_DF: u8 = 0x40;
const FLAG_MF: u8 = 0x20;

/// Why a buffer is not a well-formed IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than the smallest IPv4 header.
    #[error("{len} bytes is shorter than an IPv4 header")]
    TooShort {
        /// The buffer length.
        len: usize,
    },
    /// The version nibble is not 4.
    #[error("IP version {version}, not 4")]
    NotIpv4 {
        /// The version nibble.
        version: u8,
    },
    /// The header length field is below the minimum of five 32-bit words.
    #[error("header length field {ihl} is below 5")]
    HeaderLenTooSmall {
        /// The IHL field (32-bit words).
        ihl: u8,
    },
    /// The header length field claims more bytes than the buffer holds.
    #[error("header of {header_len} bytes does not fit in {len} bytes")]
    HeaderLenTooLong {
        /// The header length in bytes.
        header_len: usize,
        /// The buffer length.
        len: usize,
    },
    /// The total length field is smaller than the header.
    #[error("total length {total_len} is shorter than the {header_len}-byte header")]
    TotalLenTooShort {
        /// The total length field.
        total_len: usize,
        /// The header length in bytes.
        header_len: usize,
    },
    /// The total length field differs from the buffer length.
    #[error("total length {total_len} differs from the {len}-byte buffer")]
    LengthMismatch {
        /// The total length field.
        total_len: usize,
        /// The buffer length.
        len: usize,
    },
    /// The header checksum does not verify.
    #[error("header checksum does not verify")]
    BadChecksum,
}

/// A view of a buffer holding exactly one valid IPv4 packet.
///
/// The only constructor is [`Ipv4Packet::new_checked`], so accessors never go out of bounds
/// (for buffer types whose `as_ref` returns the same slice every time, as all of std's do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Check that `buffer` holds exactly one well-formed IPv4 packet and wrap it.
    pub fn new_checked(buffer: T) -> Result<Self, PacketError> {
        let bytes = buffer.as_ref();
        let len = bytes.len();
        let Some(fixed) = bytes.first_chunk::<MIN_HEADER_LEN>() else {
            return Err(PacketError::TooShort { len });
        };
        let version = fixed[VERSION_IHL] >> 4;
        if version != 4 {
            return Err(PacketError::NotIpv4 { version });
        }
        let ihl = fixed[VERSION_IHL] & 0x0f;
        if ihl < 5 {
            return Err(PacketError::HeaderLenTooSmall { ihl });
        }
        let header_len = usize::from(ihl) * 4;
        if header_len > len {
            return Err(PacketError::HeaderLenTooLong { header_len, len });
        }
        let total_len = usize::from(u16::from_be_bytes([fixed[TOTAL_LEN], fixed[TOTAL_LEN + 1]]));
        if total_len < header_len {
            return Err(PacketError::TotalLenTooShort {
                total_len,
                header_len,
            });
        }
        if total_len != len {
            return Err(PacketError::LengthMismatch { total_len, len });
        }
        let header = bytes.get(..header_len).unwrap_or_default();
        if checksum::sum(header) != 0xffff {
            return Err(PacketError::BadChecksum);
        }
        Ok(Self { buffer })
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The whole packet.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    #[inline]
    fn fixed(&self) -> &[u8; MIN_HEADER_LEN] {
        self.buffer
            .as_ref()
            .first_chunk()
            .unwrap_or_else(|| unreachable!("new_checked verified the length"))
    }

    #[inline]
    fn word(&self, at: usize) -> u16 {
        let fixed = self.fixed();
        u16::from_be_bytes([fixed[at], fixed[at + 1]])
    }

    #[inline]
    fn addr(&self, at: usize) -> Ipv4Addr {
        let fixed = self.fixed();
        Ipv4Addr::new(fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3])
    }

    /// The header length in bytes (20 to 60).
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.fixed()[VERSION_IHL] & 0x0f) * 4
    }

    /// The total length field, which equals the buffer length.
    #[inline]
    pub fn total_len(&self) -> usize {
        usize::from(self.word(TOTAL_LEN))
    }

    /// The type-of-service byte (DSCP and ECN).
    #[inline]
    pub fn tos(&self) -> u8 {
        self.fixed()[1]
    }

    /// The identification field.
    #[inline]
    pub fn ident(&self) -> u16 {
        self.word(IDENT)
    }

    /// The don't-fragment flag.
    #[inline]
    pub fn dont_frag(&self) -> bool {
        self.fixed()[FLAGS_FRAG] & FLAG_DF != 0
    }

    /// The more-fragments flag.
    #[inline]
    pub fn more_frags(&self) -> bool {
        self.fixed()[FLAGS_FRAG] & FLAG_MF != 0
    }

    /// The fragment offset in bytes (the field counts 8-byte units).
    #[inline]
    pub fn frag_offset(&self) -> u16 {
        (self.word(FLAGS_FRAG) & 0x1fff) << 3
    }

    /// Whether this is a fragment of a larger datagram (MF set or a non-zero offset).
    #[inline]
    pub fn is_fragment(&self) -> bool {
        self.word(FLAGS_FRAG) & 0x3fff != 0
    }

    /// The time to live.
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.fixed()[TTL]
    }

    /// The protocol of the payload (see [`protocol`]).
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.fixed()[PROTOCOL]
    }

    /// The header checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        self.word(CHECKSUM)
    }

    /// The source address.
    #[inline]
    pub fn src(&self) -> Ipv4Addr {
        self.addr(SRC)
    }

    /// The destination address.
    #[inline]
    pub fn dst(&self) -> Ipv4Addr {
        self.addr(DST)
    }

    /// The header, options included.
    #[inline]
    pub fn header(&self) -> &[u8] {
        self.as_bytes().get(..self.header_len()).unwrap_or_default()
    }

    /// The header options (empty for a 20-byte header).
    #[inline]
    pub fn options(&self) -> &[u8] {
        self.header().get(MIN_HEADER_LEN..).unwrap_or_default()
    }

    /// Everything after the header.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        self.as_bytes().get(self.header_len()..).unwrap_or_default()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    #[inline]
    fn fixed_mut(&mut self) -> &mut [u8; MIN_HEADER_LEN] {
        self.buffer
            .as_mut()
            .first_chunk_mut()
            .unwrap_or_else(|| unreachable!("new_checked verified the length"))
    }

    /// Lower the TTL by one and patch the header checksum incrementally (RFC 1624, eqn. 3),
    /// returning the new TTL. A TTL of 0 is left alone and gives `None`.
    #[inline]
    pub fn decrement_ttl(&mut self) -> Option<u8> {
        let fixed = self.fixed_mut();
        let ttl = fixed[TTL].checked_sub(1)?;
        let proto = fixed[PROTOCOL];
        let old = u16::from_be_bytes([ttl + 1, proto]);
        let new = u16::from_be_bytes([ttl, proto]);
        let check = u16::from_be_bytes([fixed[CHECKSUM], fixed[CHECKSUM + 1]]);
        let check = checksum::update(check, old, new);
        fixed[TTL] = ttl;
        fixed[CHECKSUM..CHECKSUM + 2].copy_from_slice(&check.to_be_bytes());
        Some(ttl)
    }

    /// Recompute the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        let header_len = self.header_len();
        let bytes = self.buffer.as_mut();
        if let Some(header) = bytes.get_mut(..header_len) {
            header[CHECKSUM] = 0;
            header[CHECKSUM + 1] = 0;
            let check = checksum::of(header);
            header[CHECKSUM..CHECKSUM + 2].copy_from_slice(&check.to_be_bytes());
        }
    }
}

/// The Internet checksum (RFC 1071): the ones'-complement of the ones'-complement sum of
/// 16-bit big-endian words, an odd last byte padded with zero.
///
/// The sum is taken 64 bits at a time in native byte order: ones'-complement addition does
/// not care about byte order as long as the folded result is read back in the same order
/// (RFC 1071, 2(B)), and 2^16 ≡ 1 modulo 0xffff, so wide words fold to the same value.
pub mod checksum {
    /// The ones'-complement sum of `data` (not inverted), folded to 16 bits. A buffer that
    /// includes a correct checksum sums to `0xffff`.
    #[inline]
    pub fn sum(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        let mut chunks = data.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_ne_bytes(chunk.try_into().unwrap_or_default());
            let (next, carry) = acc.overflowing_add(word);
            acc = next + u64::from(carry);
        }
        let mut rest = chunks.remainder();
        if let Some((four, tail)) = rest.split_first_chunk::<4>() {
            acc = add_carry(acc, u64::from(u32::from_ne_bytes(*four)));
            rest = tail;
        }
        if let Some((two, tail)) = rest.split_first_chunk::<2>() {
            acc = add_carry(acc, u64::from(u16::from_ne_bytes(*two)));
            rest = tail;
        }
        if let Some(&last) = rest.first() {
            acc = add_carry(acc, u64::from(u16::from_ne_bytes([last, 0])));
        }
        u16::from_be_bytes(fold(acc).to_ne_bytes())
    }

    /// The checksum of `data`: the inverted [`sum`]. Zero the checksum field first.
    #[inline]
    pub fn of(data: &[u8]) -> u16 {
        !sum(data)
    }

    /// Ones'-complement addition of two folded sums, for combining a pseudo-header's sum with
    /// a payload's.
    #[inline]
    pub fn add(a: u16, b: u16) -> u16 {
        let s = u32::from(a) + u32::from(b);
        ((s & 0xffff) + (s >> 16)) as u16
    }

    /// The checksum after one 16-bit word of the covered data changes from `old` to `new`,
    /// per RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`. Unlike the older `HC - ~m - m'` form it
    /// never turns a valid checksum into `0xffff` where a full recomputation gives `0x0000`.
    #[inline]
    pub fn update(check: u16, old: u16, new: u16) -> u16 {
        !add(add(!check, !old), new)
    }

    #[inline]
    fn add_carry(acc: u64, word: u64) -> u64 {
        let (next, carry) = acc.overflowing_add(word);
        next + u64::from(carry)
    }

    #[inline]
    fn fold(acc: u64) -> u16 {
        let acc = (acc & 0xffff_ffff) + (acc >> 32);
        let acc = (acc & 0xffff_ffff) + (acc >> 32);
        let acc = (acc & 0xffff) + (acc >> 16);
        let acc = (acc & 0xffff) + (acc >> 16);
        acc as u16
    }
}
