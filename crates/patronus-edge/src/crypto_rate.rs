//! How fast one core of this machine seals and opens WireGuard data messages with the edge's
//! own code (boringtun sessions over ring's ChaCha20-Poly1305, the calls the edge makes per
//! packet), for `patronus bench throughput`. Every byte a tunnel carries is sealed once and
//! opened once, so on a machine whose cores did nothing else a tunnel could carry at most
//! `cores / (1 / seal + 1 / open)`: a bound set by the CPU alone, unlike the bare veth's rate,
//! which the kernel's own forwarding sets.

use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// One core's rates, in inner (plaintext) bytes a second.
#[derive(Debug, Clone, Copy)]
pub struct CryptoRate {
    /// The inner packet measured: an IPv4 packet of this many bytes.
    pub packet_bytes: usize,
    pub seal_bytes_per_s: f64,
    pub open_bytes_per_s: f64,
}

impl CryptoRate {
    /// What `cores` cores doing nothing but this could carry, in bits a second.
    pub fn ceiling_bits_per_s(&self, cores: usize) -> f64 {
        cores as f64 * 8.0 / (1.0 / self.seal_bytes_per_s + 1.0 / self.open_bytes_per_s)
    }
}

fn key() -> Result<StaticSecret, String> {
    let mut k = [0u8; 32];
    getrandom::getrandom(&mut k).map_err(|e| format!("random key: {e}"))?;
    Ok(StaticSecret::from(k))
}

/// Measures on the calling thread, for about `time` in all, with inner IPv4 packets of
/// `packet_bytes` (at least 20). The keys are made for this and dropped with it.
pub fn measure(packet_bytes: usize, time: Duration) -> Result<CryptoRate, String> {
    if !(20..=9000).contains(&packet_bytes) {
        return Err(format!("packet size {packet_bytes}: 20 to 9000 bytes"));
    }
    let (ka, kb) = (key()?, key()?);
    let (pa, pb) = (PublicKey::from(&ka), PublicKey::from(&kb));
    let mut a = Tunn::new(ka, pb, None, None, 1, None);
    let mut b = Tunn::new(kb, pa, None, None, 2, None);
    let (mut x, mut y) = (vec![0u8; 2048], vec![0u8; 2048]);
    // The handshake, in memory: initiation, response, and a's first message (a keepalive),
    // which confirms the session to b.
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut x, false) else {
        return Err("no handshake initiation".into());
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, init, &mut y) else {
        return Err("the initiation was not answered".into());
    };
    let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, resp, &mut x) else {
        return Err("the response was not accepted".into());
    };
    let keepalive = keepalive.to_vec();
    if !matches!(b.decapsulate(None, &keepalive, &mut y), TunnResult::Done) {
        return Err("the first data message was not accepted".into());
    }

    // An IPv4 header that says how long the packet is (boringtun checks it on opening).
    let mut pkt = vec![0u8; packet_bytes];
    pkt[0] = 0x45;
    pkt[2..4].copy_from_slice(&(packet_bytes as u16).to_be_bytes());
    pkt[8] = 64;
    pkt[9] = 17;
    pkt[12..16].copy_from_slice(&[10, 0, 0, 1]);
    pkt[16..20].copy_from_slice(&[10, 0, 0, 2]);

    const BATCH: usize = 256;
    let stride = packet_bytes + 64;
    let mut sealed = vec![0u8; BATCH * stride];
    let mut lens = [0usize; BATCH];
    let mut inner = vec![0u8; packet_bytes + 64];
    let (mut seal_t, mut open_t, mut bytes) = (Duration::ZERO, Duration::ZERO, 0u64);
    while seal_t + open_t < time {
        let t0 = Instant::now();
        for (i, len) in lens.iter_mut().enumerate() {
            let out = &mut sealed[i * stride..(i + 1) * stride];
            *len = match a.encapsulate(&pkt, out) {
                TunnResult::WriteToNetwork(d) => d.len(),
                _ => return Err("sealing failed".into()),
            };
        }
        let t1 = Instant::now();
        for (i, len) in lens.iter().enumerate() {
            let msg = &sealed[i * stride..i * stride + len];
            match b.decapsulate(None, msg, &mut inner) {
                TunnResult::WriteToTunnelV4(p, _) if p.len() == packet_bytes => {}
                _ => return Err("opening failed".into()),
            }
        }
        let t2 = Instant::now();
        seal_t += t1 - t0;
        open_t += t2 - t1;
        bytes += (BATCH * packet_bytes) as u64;
    }
    Ok(CryptoRate {
        packet_bytes,
        seal_bytes_per_s: bytes as f64 / seal_t.as_secs_f64(),
        open_bytes_per_s: bytes as f64 / open_t.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    /// The measurement runs the real sessions end to end (a packet that did not open would
    /// fail it) and reports positive rates, whatever the build's speed.
    #[test]
    fn sealing_and_opening_are_measured_on_real_sessions() {
        let r = super::measure(1420, std::time::Duration::from_millis(50)).unwrap();
        assert!(
            r.seal_bytes_per_s > 0.0 && r.open_bytes_per_s > 0.0,
            "{r:?}"
        );
        assert!(r.ceiling_bits_per_s(2) > r.ceiling_bits_per_s(1));
        assert!(super::measure(10, std::time::Duration::from_millis(1)).is_err());
    }
}
