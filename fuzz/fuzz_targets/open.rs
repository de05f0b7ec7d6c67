//! The receive path of encrypted datagrams: any bytes from a peer's address, and valid WireGuard
//! data messages with any bytes flipped, opened by a tunnel whose handshake is done. Nothing may
//! panic, only an untouched message may open, and what opens is the packet that was sealed.

#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use weft_engine::crypto::{sealed_len, Opened, Opener, Sealer};
use weft_engine::{StaticKeys, Tunnels};

const A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Host A's tunnels (the sender) and host B's opener, after one handshake.
struct Pair {
    a: Tunnels,
    b: Opener,
}

fn seal(a: &Tunnels, packet: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; sealed_len(packet.len())];
    let table = a.snapshot();
    let len = Sealer::seal(&mut table.get(&B).expect("B's tunnel").lock(), packet, &mut out);
    out.truncate(len);
    out
}

fn pair() -> Pair {
    let a = Tunnels::new(StaticKeys::from_private([0x11; 32]));
    let b = Tunnels::new(StaticKeys::from_private([0x22; 32]));
    a.publish([(B, b.public_key())]);
    b.publish([(A, a.public_key())]);
    let (mut a_opener, mut b_opener) = (Opener::new(a.clone()), Opener::new(b.clone()));
    let init = seal(&a, &[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 1, 1, 2, 10, 1, 2, 2]);
    let mut out = vec![0u8; 1 << 16];
    assert_eq!(b_opener.open(at(A), &init, &mut out), Opened::Handled);
    let (_, response) = b_opener.outbox().pop().expect("a handshake response");
    assert_eq!(a_opener.open(at(B), &response, &mut out), Opened::Handled);
    for (_, message) in a_opener.outbox().drain(..) {
        b_opener.open(at(A), &message, &mut out);
    }
    Pair { a, b: b_opener }
}

fn at(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 8285)
}

static PAIR: OnceLock<Mutex<Pair>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let mut pair = PAIR
        .get_or_init(|| Mutex::new(pair()))
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Any bytes, from the peer's address or a stranger's.
        let from = if mode & 2 == 0 { at(A) } else { at(Ipv4Addr::new(198, 18, 0, 9)) };
        let mut out = vec![0u8; rest.len()];
        match pair.b.open(from, rest, &mut out) {
            Opened::Packet(len) => assert!(len <= rest.len()),
            Opened::Handled | Opened::Drop(_) => {}
        }
        pair.b.outbox().clear();
        return;
    }
    // A valid message of a packet made of the first half of the input, with the second half
    // XORed onto it.
    let (packet, flips) = rest.split_at(rest.len() / 2);
    let mut sealed = seal(&pair.a, packet);
    let mut flipped = false;
    for (byte, flip) in sealed.iter_mut().zip(flips) {
        *byte ^= flip;
        flipped |= *flip != 0;
    }
    let mut out = vec![0u8; sealed.len()];
    match pair.b.open(at(A), &sealed, &mut out) {
        Opened::Packet(len) => {
            assert!(!flipped, "a modified message opened");
            assert!(len <= packet.len());
            assert_eq!(&out[..len], &packet[..len]);
        }
        Opened::Handled => assert!(flipped || packet.is_empty(), "a data message was not opened"),
        Opened::Drop(_) => {}
    }
    pair.b.outbox().clear();
});
