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

    /// The flags and fragment offset word: `0x4000` is DF alone, not a fragment.
    #[inline]
    pub fn flags_and_offset(&self) -> u16 {
        self.word(FLAGS_FRAG)
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

/// Packets for the tests, built by an independent encoder (etherparse), and a seeded
/// generator for reproducible random inputs.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::Ipv4Addr;

    use etherparse::{IpFragOffset, IpNumber, Ipv4Header, Ipv4Options};

    /// splitmix64: tiny, fast and good enough to make test inputs reproducible.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed)
        }

        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// A value in `0..n` (`n` > 0).
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        pub(crate) fn byte(&mut self) -> u8 {
            self.next_u64() as u8
        }

        pub(crate) fn coin(&mut self) -> bool {
            self.next_u64() & 1 == 1
        }

        pub(crate) fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.byte();
            }
        }

        pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.fill(&mut v);
            v
        }
    }

    /// The fields of a test packet.
    #[derive(Clone, Debug)]
    pub(crate) struct Spec {
        pub(crate) src: Ipv4Addr,
        pub(crate) dst: Ipv4Addr,
        pub(crate) ttl: u8,
        pub(crate) protocol: u8,
        pub(crate) ident: u16,
        pub(crate) dont_frag: bool,
        pub(crate) more_frags: bool,
        /// Fragment offset in 8-byte units.
        pub(crate) frag_units: u16,
        pub(crate) options: Vec<u8>,
        pub(crate) payload: Vec<u8>,
    }

    impl Spec {
        /// A UDP packet of `len` bytes in all with a patterned payload.
        pub(crate) fn udp(src: &str, dst: &str, len: usize) -> Self {
            Self {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                ttl: 64,
                protocol: 17,
                ident: 0x1234,
                dont_frag: true,
                more_frags: false,
                frag_units: 0,
                options: Vec::new(),
                payload: (0..len - 20).map(|i| (i * 7 + 3) as u8).collect(),
            }
        }

        /// An ICMP packet of the given type, `len` bytes in all.
        pub(crate) fn icmp(src: &str, dst: &str, icmp_type: u8, len: usize) -> Self {
            let mut spec = Self::udp(src, dst, len);
            spec.protocol = 1;
            if let Some(first) = spec.payload.first_mut() {
                *first = icmp_type;
            }
            spec
        }

        pub(crate) fn ttl(mut self, ttl: u8) -> Self {
            self.ttl = ttl;
            self
        }

        /// The encoded packet with a correct header checksum.
        pub(crate) fn bytes(&self) -> Vec<u8> {
            let mut header = Ipv4Header::new(
                0,
                self.ttl,
                IpNumber(self.protocol),
                self.src.octets(),
                self.dst.octets(),
            )
            .unwrap();
            header.identification = self.ident;
            header.dont_fragment = self.dont_frag;
            header.more_fragments = self.more_frags;
            header.fragment_offset = IpFragOffset::try_new(self.frag_units).unwrap();
            header.options = Ipv4Options::try_from(&self.options[..]).unwrap();
            header.set_payload_len(self.payload.len()).unwrap();
            header.header_checksum = header.calc_header_checksum();
            let mut out = header.to_bytes().to_vec();
            out.extend_from_slice(&self.payload);
            out
        }
    }

    /// A random but well-formed packet: random header fields and options, random length.
    pub(crate) fn random_packet(rng: &mut Rng, max_len: usize) -> Vec<u8> {
        let options_len = 4 * rng.below(11);
        let options = rng.bytes(options_len);
        let payload_len = rng.below(max_len.saturating_sub(20 + options.len()) + 1);
        Spec {
            src: Ipv4Addr::from(rng.next_u64() as u32),
            dst: Ipv4Addr::from(rng.next_u64() as u32),
            ttl: rng.byte(),
            protocol: rng.byte(),
            ident: rng.next_u64() as u16,
            dont_frag: rng.coin(),
            more_frags: rng.coin(),
            frag_units: (rng.next_u64() & 0x1fff) as u16,
            options,
            payload: rng.bytes(payload_len),
        }
        .bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{random_packet, Rng, Spec};
    use super::*;
    use etherparse::Ipv4HeaderSlice;

    fn parse(bytes: &[u8]) -> Result<Ipv4Packet<&[u8]>, PacketError> {
        Ipv4Packet::new_checked(bytes)
    }

    /// A straightforward RFC 1071 reference: 16-bit big-endian words, one at a time.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for pair in data.chunks(2) {
            let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            acc += u32::from(word);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn accessors_read_every_field() {
        let mut spec = Spec::udp("10.1.15.3", "10.1.81.200", 120);
        spec.ttl = 17;
        spec.ident = 0xbeef;
        spec.dont_frag = false;
        spec.more_frags = true;
        spec.frag_units = 185;
        spec.options = vec![1, 1, 1, 0];
        let bytes = spec.bytes();
        let packet = parse(&bytes).unwrap();
        let theirs = Ipv4HeaderSlice::from_slice(&bytes).unwrap();
        assert_eq!(packet.header_len(), 24);
        assert_eq!(packet.total_len(), 124);
        assert_eq!(packet.src(), Ipv4Addr::new(10, 1, 15, 3));
        assert_eq!(packet.dst(), Ipv4Addr::new(10, 1, 81, 200));
        assert_eq!(packet.ttl(), 17);
        assert_eq!(packet.protocol(), protocol::UDP);
        assert_eq!(packet.ident(), 0xbeef);
        assert!(!packet.dont_frag());
        assert!(packet.more_frags());
        assert_eq!(packet.frag_offset(), 185 * 8);
        assert!(packet.is_fragment());
        assert_eq!(packet.tos(), 0);
        assert_eq!(packet.checksum(), theirs.header_checksum());
        assert_eq!(packet.options(), theirs.options());
        assert_eq!(packet.header(), &bytes[..24]);
        assert_eq!(packet.payload(), &spec.payload[..]);
        assert_eq!(packet.as_bytes(), &bytes[..]);
        assert_eq!(packet.into_inner(), &bytes[..]);

        let whole = Spec::udp("10.1.15.3", "10.1.81.200", 20).bytes();
        let whole = parse(&whole).unwrap();
        assert!(!whole.is_fragment());
        assert!(whole.payload().is_empty());
        assert!(whole.options().is_empty());
    }

    #[test]
    fn random_headers_agree_with_etherparse() {
        let mut rng = Rng::new(7);
        for _ in 0..2_000 {
            let bytes = random_packet(&mut rng, 200);
            let packet = parse(&bytes).unwrap();
            let theirs = Ipv4HeaderSlice::from_slice(&bytes).unwrap();
            assert_eq!(packet.src(), theirs.source_addr());
            assert_eq!(packet.dst(), theirs.destination_addr());
            assert_eq!(packet.ttl(), theirs.ttl());
            assert_eq!(packet.protocol(), theirs.protocol().0);
            assert_eq!(packet.ident(), theirs.identification());
            assert_eq!(packet.dont_frag(), theirs.dont_fragment());
            assert_eq!(packet.more_frags(), theirs.more_fragments());
            assert_eq!(packet.frag_offset(), theirs.fragments_offset().value() * 8);
            assert_eq!(packet.header_len(), usize::from(theirs.ihl()) * 4);
            assert_eq!(packet.total_len(), usize::from(theirs.total_len()));
        }
    }

    #[test]
    fn every_malformation_has_its_error() {
        let good = Spec::udp("10.1.15.3", "10.1.81.2", 60).bytes();
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            edit(&mut bytes);
            parse(&bytes).map(|_| ())
        };

        assert_eq!(parse(&[]), Err(PacketError::TooShort { len: 0 }));
        assert_eq!(parse(&good[..19]), Err(PacketError::TooShort { len: 19 }));
        for version in [0u8, 5, 6, 15] {
            assert_eq!(
                with(&|b| b[0] = version << 4 | 5),
                Err(PacketError::NotIpv4 { version })
            );
        }
        for ihl in 0..5 {
            assert_eq!(
                with(&|b| b[0] = 0x40 | ihl),
                Err(PacketError::HeaderLenTooSmall { ihl })
            );
        }
        assert_eq!(
            with(&|b| {
                b[0] = 0x4f;
                b.truncate(40);
            }),
            Err(PacketError::HeaderLenTooLong {
                header_len: 60,
                len: 40
            })
        );
        assert_eq!(
            with(&|b| {
                b[0] = 0x46;
                b[2..4].copy_from_slice(&20u16.to_be_bytes());
            }),
            Err(PacketError::TotalLenTooShort {
                total_len: 20,
                header_len: 24
            })
        );
        // One byte missing, one byte of trailing padding: both malformed, never truncated.
        assert_eq!(
            parse(&good[..59]),
            Err(PacketError::LengthMismatch {
                total_len: 60,
                len: 59
            })
        );
        assert_eq!(
            with(&|b| b.push(0)),
            Err(PacketError::LengthMismatch {
                total_len: 60,
                len: 61
            })
        );
        assert_eq!(with(&|b| b[8] ^= 1), Err(PacketError::BadChecksum));
        assert_eq!(
            with(&|b| {
                b[8] ^= 1;
                refill(b);
            }),
            Ok(())
        );
        // A wrong checksum hidden in the options is still found.
        assert_eq!(
            with(&|b| {
                b[0] = 0x46;
                refill(b);
                b[22] ^= 0x80;
            }),
            Err(PacketError::BadChecksum)
        );
        // Errors print.
        assert_eq!(
            PacketError::LengthMismatch {
                total_len: 60,
                len: 59
            }
            .to_string(),
            "total length 60 differs from the 59-byte buffer"
        );
    }

    #[test]
    fn checksum_matches_the_reference_at_every_length_and_alignment() {
        let mut rng = Rng::new(11);
        let data = rng.bytes(600);
        for start in 0..9 {
            for len in 0..300 {
                let slice = &data[start..start + len];
                assert_eq!(
                    sum_of(slice),
                    reference_sum(slice),
                    "start {start} len {len}"
                );
            }
        }
        let ones = vec![0xffu8; 70_000];
        assert_eq!(sum_of(&ones), reference_sum(&ones));
        assert_eq!(checksum::of(&[]), 0xffff);

        fn sum_of(data: &[u8]) -> u16 {
            checksum::sum(data)
        }
    }

    #[test]
    fn checksum_add_and_update_follow_ones_complement_rules() {
        assert_eq!(checksum::add(0xffff, 0x0001), 0x0001);
        assert_eq!(checksum::add(0x8000, 0x8000), 0x0001);
        assert_eq!(checksum::add(0x1234, 0), 0x1234);
        let mut rng = Rng::new(13);
        for _ in 0..10_000 {
            let len = 2 * (1 + rng.below(30));
            let mut data = rng.bytes(len);
            let at = 2 * rng.below(data.len() / 2);
            let before = checksum::of(&data);
            let old = u16::from_be_bytes([data[at], data[at + 1]]);
            let new = rng.next_u64() as u16;
            data[at..at + 2].copy_from_slice(&new.to_be_bytes());
            let after = checksum::update(before, old, new);
            // Both the patched and the recomputed checksum verify; they are the same value
            // except that a recomputation may give +0 where the patch yields -0.
            let full = checksum::of(&data);
            assert!(
                after == full || (after, full) == (0xffff, 0x0000) || (after, full) == (0, 0xffff)
            );
        }
    }

    /// Recompute the header checksum of `bytes` without asking the header to be valid.
    fn refill(bytes: &mut [u8]) {
        bytes[10] = 0;
        bytes[11] = 0;
        let ihl = (usize::from(bytes[0] & 0xf) * 4).min(bytes.len());
        let check = checksum::of(&bytes[..ihl]);
        bytes[10..12].copy_from_slice(&check.to_be_bytes());
    }

    /// `packet` with its identification chosen so that the checksum field holds `target`.
    fn with_checksum(mut packet: Vec<u8>, target: u16) -> Option<Vec<u8>> {
        packet[4] = 0;
        packet[5] = 0;
        refill(&mut packet);
        let base = u16::from_be_bytes([packet[10], packet[11]]);
        let ident = checksum::add(!target, base);
        packet[4..6].copy_from_slice(&ident.to_be_bytes());
        refill(&mut packet);
        (u16::from_be_bytes([packet[10], packet[11]]) == target).then_some(packet)
    }

    #[test]
    fn ttl_decrement_matches_a_full_recomputation() {
        let mut rng = Rng::new(0x7715);
        let mut checked = 0;
        let targets = [
            0x0000, 0x0001, 0x00ff, 0x0100, 0x0101, 0xfeff, 0xfefe, 0xfffe,
        ];
        for round in 0..50_000 {
            let mut bytes = random_packet(&mut rng, 80);
            bytes[8] = match round % 4 {
                0 => 1,
                1 => 0xff,
                2 => 0x01 + (rng.byte() & 1),
                _ => rng.byte().max(1),
            };
            refill(&mut bytes);
            if round % 5 == 0 {
                // Steer the checksum to values next to the wrap-around.
                match with_checksum(bytes.clone(), targets[round % targets.len()]) {
                    Some(steered) => bytes = steered,
                    None => continue,
                }
            }
            let ttl = bytes[8];
            let mut packet = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
            assert_eq!(packet.decrement_ttl(), Some(ttl - 1));
            let patched = packet.checksum();
            packet.fill_checksum();
            assert_eq!(patched, packet.checksum(), "ttl {ttl}");
            let theirs = Ipv4HeaderSlice::from_slice(&bytes).unwrap();
            assert_eq!(theirs.ttl(), ttl - 1);
            assert_eq!(theirs.to_header().calc_header_checksum(), patched);
            checked += 1;
        }
        assert!(checked > 45_000);
    }

    #[test]
    fn ttl_decrement_keeps_a_negative_zero_checksum_valid() {
        // A sender may legitimately store 0xffff where a recomputation gives 0x0000.
        let mut rng = Rng::new(5);
        let mut seen = 0;
        for _ in 0..10_000 {
            let bytes = random_packet(&mut rng, 40);
            let Some(mut bytes) = with_checksum(bytes, 0x0000) else {
                continue;
            };
            if bytes[8] == 0 {
                continue;
            }
            bytes[10] = 0xff;
            bytes[11] = 0xff;
            let mut packet = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
            packet.decrement_ttl().unwrap();
            assert!(Ipv4Packet::new_checked(&bytes[..]).is_ok());
            seen += 1;
        }
        assert!(seen >= 50, "only {seen} headers steered to a zero checksum");
    }

    #[test]
    fn ttl_zero_is_left_alone() {
        let mut bytes = Spec::udp("10.1.15.3", "10.1.81.2", 40).ttl(0).bytes();
        let before = bytes.clone();
        let mut packet = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        assert_eq!(packet.decrement_ttl(), None);
        assert_eq!(bytes, before);
    }

    #[test]
    fn fill_checksum_repairs_the_header() {
        let mut bytes = Spec::udp("10.1.15.3", "10.1.81.2", 40).bytes();
        let expected = Ipv4HeaderSlice::from_slice(&bytes)
            .unwrap()
            .header_checksum();
        let mut packet = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        packet.fill_checksum();
        assert_eq!(packet.checksum(), expected);
        let mut copy = bytes.clone();
        copy[8] = 3;
        assert_eq!(parse(&copy), Err(PacketError::BadChecksum));
        // Repair through a view obtained before the edit.
        let mut packet = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        packet.buffer[8] = 3;
        packet.fill_checksum();
        assert!(parse(&bytes).is_ok());
        assert_eq!(
            Ipv4HeaderSlice::from_slice(&bytes)
                .unwrap()
                .to_header()
                .calc_header_checksum(),
            u16::from_be_bytes([bytes[10], bytes[11]])
        );
    }
}
