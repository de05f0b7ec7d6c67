//! The GSO check's receive side: any bytes that start like a probe or verdict, from a peer, on
//! a host answering probe runs and on a host waiting for a verdict. Nothing may panic; a probe
//! run whose pattern was altered is never answered intact; a verdict settles a check only with
//! the nonce of the run out.

#![no_main]

use std::net::Ipv4Addr;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use weft_engine::gso_check::{
    parse, probe_run, Checks, GsoCheck, Message, Outcome, Received, HEADER_LEN, PROBE_LAST_LEN,
    PROBE_SEGMENT_LEN,
};

const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => any_bytes(rest),
        1 => altered_run(rest),
        _ => verdicts(rest),
    }
});

/// Any bytes, with the magic in front so that the parser gets past it, on the answering side.
fn any_bytes(rest: &[u8]) {
    let answering = GsoCheck::default();
    let mut datagram = b"\0WEFTGSO".to_vec();
    datagram.extend_from_slice(rest);
    for datagram in [&datagram[..], rest] {
        let mut reply = [0u8; 64];
        match answering.receive(A, datagram, &mut reply) {
            Received::Answer(len) => {
                assert!(len <= reply.len());
                assert!(matches!(parse(&reply[..len]), Some(Message::Verdict { .. })));
            }
            Received::Taken | Received::Bad => {}
        }
    }
}

/// A genuine run (nonce from the input) with the rest of the input XORed onto its patterns:
/// answered intact only if no pattern byte changed.
fn altered_run(rest: &[u8]) {
    let (nonce, flips) = match rest.split_first_chunk::<8>() {
        Some((nonce, flips)) => (u64::from_le_bytes(*nonce), flips),
        None => (0, rest),
    };
    let mut run = probe_run(B, nonce);
    let mut altered = false;
    let starts = [0, PROBE_SEGMENT_LEN, 2 * PROBE_SEGMENT_LEN];
    let mut flips = flips.iter();
    for start in starts {
        let end = (start + PROBE_SEGMENT_LEN).min(run.len());
        for byte in &mut run[start + HEADER_LEN..end] {
            let Some(flip) = flips.next() else { break };
            *byte ^= flip;
            altered |= *flip != 0;
        }
    }
    assert_eq!(run.len(), 2 * PROBE_SEGMENT_LEN + PROBE_LAST_LEN);
    let answering = GsoCheck::default();
    let mut reply = [0u8; 64];
    let mut verdict = None;
    for start in starts {
        let end = (start + PROBE_SEGMENT_LEN).min(run.len());
        if let Received::Answer(len) = answering.receive(A, &run[start..end], &mut reply) {
            verdict = parse(&reply[..len]);
            break;
        }
    }
    match verdict {
        Some(Message::Verdict { nonce: n, intact }) => {
            assert_eq!(n, nonce);
            assert_eq!(intact, !altered, "a run answered wrongly (altered: {altered})");
        }
        other => panic!("every run is answered: {other:?}"),
    }
}

/// Any bytes as a verdict from the peer whose run is out: settles its check only if they are a
/// well-formed verdict with that run's nonce.
fn verdicts(rest: &[u8]) {
    let mut checks = Checks::default();
    checks.set_peers([B]);
    let nonce = 0x5745_4654_4753_4f00;
    let (runs, _) = checks.due(Instant::now(), || nonce);
    assert_eq!(runs, vec![(B, nonce)]);
    let mut datagram = b"\0WEFTGSO".to_vec();
    datagram.extend_from_slice(rest);
    for datagram in [&datagram[..], rest] {
        let expected = match parse(datagram) {
            Some(Message::Verdict { nonce: n, intact }) if n == nonce => Some(if intact {
                Outcome::Proven
            } else {
                Outcome::Damaged
            }),
            _ => None,
        };
        let mut again = Checks::default();
        again.set_peers([B]);
        again.due(Instant::now(), || nonce);
        let outcome = match parse(datagram) {
            Some(Message::Verdict { nonce: n, intact }) => again.verdict(B, n, intact),
            _ => None,
        };
        assert_eq!(outcome, expected);
        // A stranger's verdict settles nothing.
        if let Some(Message::Verdict { nonce: n, intact }) = parse(datagram) {
            assert_eq!(checks.verdict(A, n, intact), None);
        }
    }
}
