//! Segmentation of anything the TUN could hand over: a virtio-net header and a packet. Every
//! plan must hold up: segments cover the payload in order, each is a valid IPv4 packet whose
//! transport checksum verifies, and a completed checksum verifies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_engine::offload::segment::MAX_HEADER_LEN;
use weft_engine::offload::{complete_checksum, Plan, VnetHeader, VNET_HDR_LEN};
use weft_engine::wire::ipv4::{checksum, Ipv4Packet};

/// The folded sum of the IPv4 pseudo-header of `segment` (an IPv4 packet).
fn pseudo_sum(segment: &[u8], ip_len: usize) -> u16 {
    let len = (segment.len() - ip_len) as u16;
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&segment[12..20]);
    pseudo[9] = segment[9];
    pseudo[10..].copy_from_slice(&len.to_be_bytes());
    checksum::sum(&pseudo)
}

fuzz_target!(|data: &[u8]| {
    let Some(header) = VnetHeader::parse(data) else {
        return;
    };
    let mut packet = data[VNET_HDR_LEN..].to_vec();
    match Plan::new(&header, &packet) {
        Err(_) => {}
        Ok(Plan::Whole) => assert!(!header.is_gso() && !header.needs_csum()),
        Ok(Plan::Checksum { start, field }) => {
            assert!(field + 2 <= packet.len() && start <= field);
            let partial = u16::from_be_bytes([packet[field], packet[field + 1]]);
            complete_checksum(&mut packet, start, field).expect("a planned checksum fits");
            let covered = checksum::sum(&packet[start..]);
            assert_eq!(checksum::add(covered, partial), 0xffff);
        }
        Ok(Plan::Segment(segmenter)) => {
            let header_len = segmenter.header_len();
            let ip_len = usize::from(packet[0] & 0x0f) * 4;
            assert!(segmenter.segments() >= 1);
            let mut next_payload = header_len;
            let mut flat_len = 0;
            for index in 0..segmenter.segments() {
                let mut out = [0u8; MAX_HEADER_LEN];
                let segment = segmenter
                    .write_header(&packet, index, &mut out)
                    .expect("every planned segment can be written");
                assert_eq!(segment.payload.start, next_payload, "segments are contiguous");
                assert!(segment.payload.len() <= segmenter.gso_size());
                assert!(!segment.payload.is_empty() || segmenter.segments() == 1);
                next_payload = segment.payload.end;
                let mut bytes = out[..header_len].to_vec();
                bytes.extend_from_slice(&packet[segment.payload.clone()]);
                assert_eq!(bytes.len(), segment.len);
                assert!(bytes.len() <= segmenter.largest_segment());
                let ip = Ipv4Packet::new_checked(&bytes[..]).expect("a valid IPv4 packet");
                assert_eq!(ip.header_len(), ip_len);
                let transport = checksum::sum(&bytes[ip_len..]);
                assert_eq!(
                    checksum::add(transport, pseudo_sum(&bytes, ip_len)),
                    0xffff,
                    "the transport checksum verifies"
                );
                flat_len += bytes.len();
            }
            assert_eq!(next_payload, packet.len(), "the segments cover the payload");
            let mut flat = vec![0u8; flat_len];
            assert_eq!(segmenter.segment_into(&packet, &mut flat), Some(flat_len));
        }
    }
});
