//! What stands between unauthenticated handshake messages and the work they ask for.
//!
//! Anyone who knows an edge's public key can make handshake initiations that pass its first MAC
//! check (MAC1 is keyed by the public key alone) and send them from a spoofed address, for
//! example the real WAN endpoint of a peer. Answering every one costs an X25519 operation, and
//! WireGuard's defence, a cookie reply that the initiator must echo in MAC2, was in boringtun
//! sent for every such initiation with no limit: a flood turned the edge into a reflector aimed
//! at its own peer, and its CPU away from forwarding.
//!
//! Here every handshake message (initiation or response) that reaches a path is first checked
//! by that path's [`Guard`], before its session sees it:
//!
//! - its MAC1, with the key of the session it is for (bad: refused, as before);
//! - whether that path is under load: more than [`UNDER_LOAD_PER_S`] messages of its kind in
//!   the current second. If it is, only a message with a valid MAC2 (proof that its sender
//!   receives at its source address) goes on;
//! - the others get a cookie reply only while two token buckets allow it, one for the path
//!   (its link and source) and one for the whole edge ([`patronus_api::HandshakeLimits`]), and
//!   are dropped silently beyond that.
//!
//! Initiations and responses are counted apart, so a flood of initiations never makes a genuine
//! response (to a handshake this edge started) need a cookie: while one path's peer endpoint
//! is being spoofed, that path still comes up from this side's own initiation, and every other
//! path is untouched (its own counts, its own bucket).

use std::time::Instant;

use boringtun::noise::TunnResult;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519::PublicKey;

/// Handshake messages of one kind per path per second that are admitted without MAC2
/// (boringtun's own figure; a genuine peer sends a few a minute).
pub const UNDER_LOAD_PER_S: u64 = 10;

/// A token bucket: `rate` per second, at most one second's worth saved.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn new(rate_per_s: u32, now: Instant) -> Self {
        let rate = f64::from(rate_per_s.max(1));
        Self {
            rate,
            tokens: rate,
            at: now,
        }
    }

    /// Whether a token is there (refilled up to `now`).
    pub fn ready(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        // Datagrams are timed by their arrival, which across sockets is not quite monotonic.
        self.at = self.at.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        self.tokens >= 1.0
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.ready(now) {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One own key's check of one kind of handshake message on one path.
struct KeyGuard {
    own: [u8; 32],
    initiations: RateLimiter,
    responses: RateLimiter,
}

/// A path's guard: one check per own key in use (two during a key roll), and its budget of
/// cookie replies.
pub struct Guard {
    keys: Vec<KeyGuard>,
    cookies: Bucket,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("keys", &self.keys.len())
            .field("cookies", &self.cookies)
            .finish()
    }
}

/// What the guard decided about one handshake message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its session may process it.
    Admit,
    /// Not a valid handshake message for this key (bad MAC1, malformed).
    Refuse,
    /// Under load without a valid MAC2: send the cookie reply of this length (written to the
    /// buffer given; a token of both budgets is spent).
    Cookie(usize),
    /// Under load without a valid MAC2, and the path's or the edge's cookie budget is spent:
    /// drop (no cookie was made: what a dropped message costs is its MAC checks).
    Drop,
}

impl Guard {
    pub fn new(cookies_per_s: u32, now: Instant) -> Self {
        Self {
            keys: Vec::new(),
            cookies: Bucket::new(cookies_per_s, now),
        }
    }

    /// Checks `msg` (an initiation, or a response if `response`), from `from`, for the session
    /// made with our key `own`; a cookie reply is written to `cookie` (64 bytes) if this
    /// path's budget and the edge's (`edge`) both have a token.
    #[allow(clippy::too_many_arguments)] // one message, where it is from and for, and budgets
    pub fn check(
        &mut self,
        own: [u8; 32],
        response: bool,
        from: std::net::IpAddr,
        msg: &[u8],
        cookie: &mut [u8; 64],
        edge: &mut Bucket,
        now: Instant,
    ) -> Verdict {
        let i = match self.keys.iter().position(|k| k.own == own) {
            Some(i) => i,
            None => {
                let public = PublicKey::from(own);
                self.keys.push(KeyGuard {
                    own,
                    initiations: RateLimiter::new(&public, UNDER_LOAD_PER_S),
                    responses: RateLimiter::new(&public, UNDER_LOAD_PER_S),
                });
                self.keys.len() - 1
            }
        };
        let k = &self.keys[i];
        let limiter = if response {
            &k.responses
        } else {
            &k.initiations
        };
        // Without a budget, boringtun is given no room for a cookie: it then stops at "under
        // load, no valid MAC2" instead of encrypting a reply that would be thrown away.
        let budget = self.cookies.ready(now) && edge.ready(now);
        let room: &mut [u8] = if budget { &mut cookie[..] } else { &mut [] };
        match limiter.verify_packet(Some(from), msg, room) {
            Ok(_) => Verdict::Admit,
            Err(TunnResult::WriteToNetwork(c)) => {
                let n = c.len();
                self.cookies.take(now);
                edge.take(now);
                Verdict::Cookie(n)
            }
            Err(TunnResult::Err(WireGuardError::DestinationBufferTooSmall)) => Verdict::Drop,
            Err(_) => Verdict::Refuse,
        }
    }

    /// Starts a new second of counting where one has passed (called often: each limiter resets
    /// itself once a second), and forgets keys no session of the path uses any more (`own`,
    /// and `alt` during a key roll).
    pub fn tick(&mut self, own: [u8; 32], alt: Option<[u8; 32]>) {
        self.keys.retain(|k| k.own == own || Some(k.own) == alt);
        for k in &self.keys {
            k.initiations.reset_count();
            k.responses.reset_count();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::Tunn;
    use boringtun::x25519::StaticSecret;
    use std::time::Duration;

    fn key(seed: u8) -> StaticSecret {
        StaticSecret::from([seed; 32])
    }

    /// Initiations from `from_key` to `to`, each fresh (valid MAC1, no cookie).
    fn initiations(from_key: u8, to: &PublicKey, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut t = Tunn::new(key(from_key), *to, None, None, i as u32, None);
                let mut out = vec![0u8; 256];
                match t.format_handshake_initiation(&mut out, false) {
                    TunnResult::WriteToNetwork(d) => d.to_vec(),
                    _ => panic!("no initiation"),
                }
            })
            .collect()
    }

    #[test]
    fn a_flood_is_admitted_up_to_the_load_limit_then_answered_within_the_budget_then_dropped() {
        let me = key(1);
        let own = PublicKey::from(&me).to_bytes();
        let now = Instant::now();
        let mut g = Guard::new(5, now);
        let mut edge = Bucket::new(1000, now);
        let from = "192.0.2.7".parse().unwrap();
        let mut cookie = [0u8; 64];
        let mut seen = [0usize; 4];
        for m in initiations(66, &PublicKey::from(&me), 100) {
            let v = g.check(own, false, from, &m, &mut cookie, &mut edge, now);
            seen[match v {
                Verdict::Admit => 0,
                Verdict::Refuse => 1,
                Verdict::Cookie(n) => {
                    assert_eq!((n, cookie[0]), (64, 3), "a cookie reply");
                    2
                }
                Verdict::Drop => 3,
            }] += 1;
        }
        assert_eq!(seen, [UNDER_LOAD_PER_S as usize, 0, 5, 90 - 5]);

        // A response is counted apart: the flood of initiations does not make it need MAC2.
        let responder = initiations(66, &PublicKey::from(&me), 1);
        assert_eq!(
            g.check(own, true, from, &responder[0], &mut cookie, &mut edge, now),
            Verdict::Admit
        );
        // Initiations for another key fail MAC1 and are refused, whatever the load.
        let other = initiations(66, &PublicKey::from(&key(9)), 1);
        assert_eq!(
            g.check(own, false, from, &other[0], &mut cookie, &mut edge, now),
            Verdict::Refuse
        );
        // The budget refills at its rate: 100 ms later, half a token; 200 ms, one.
        let m = initiations(66, &PublicKey::from(&me), 2);
        let later = now + Duration::from_millis(100);
        assert_eq!(
            g.check(own, false, from, &m[0], &mut cookie, &mut edge, later),
            Verdict::Drop
        );
        let later = now + Duration::from_millis(200);
        assert!(matches!(
            g.check(own, false, from, &m[1], &mut cookie, &mut edge, later),
            Verdict::Cookie(64)
        ));
    }

    /// The edge's budget bounds the replies of all paths together.
    #[test]
    fn the_edge_budget_bounds_the_replies_of_every_path() {
        let me = key(1);
        let own = PublicKey::from(&me).to_bytes();
        let now = Instant::now();
        let mut edge = Bucket::new(3, now);
        let mut cookie = [0u8; 64];
        let from = "192.0.2.7".parse().unwrap();
        let mut cookies = 0;
        for _ in 0..4 {
            let mut g = Guard::new(100, now);
            for m in initiations(66, &PublicKey::from(&me), 20) {
                if let Verdict::Cookie(_) =
                    g.check(own, false, from, &m, &mut cookie, &mut edge, now)
                {
                    cookies += 1;
                }
            }
        }
        assert_eq!(cookies, 3);
    }

    /// A genuine initiator that got a cookie reply proves it receives at its address: its next
    /// initiation carries MAC2 and is admitted while the flood goes on.
    #[test]
    fn an_initiation_with_the_cookie_is_admitted_under_load() {
        let me = key(1);
        let own = PublicKey::from(&me).to_bytes();
        let now = Instant::now();
        let mut g = Guard::new(1000, now);
        let mut edge = Bucket::new(1000, now);
        let from: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let mut cookie = [0u8; 64];
        for m in initiations(66, &PublicKey::from(&me), 50) {
            let _ = g.check(own, false, from, &m, &mut cookie, &mut edge, now);
        }
        let mut genuine = Tunn::new(key(2), PublicKey::from(&me), None, None, 7, None);
        let mut out = vec![0u8; 256];
        let first = match genuine.format_handshake_initiation(&mut out, false) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        };
        let Verdict::Cookie(n) = g.check(own, false, from, &first, &mut cookie, &mut edge, now)
        else {
            panic!("no cookie under load");
        };
        // The genuine initiator takes the cookie and tries again.
        let mut dst = vec![0u8; 256];
        let _ = genuine.decapsulate(Some(from), &cookie[..n], &mut dst);
        let again = match genuine.format_handshake_initiation(&mut out, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no second initiation"),
        };
        assert_eq!(
            g.check(own, false, from, &again, &mut cookie, &mut edge, now),
            Verdict::Admit
        );
        // The same initiation from another address has no valid MAC2 there.
        let elsewhere = "198.51.100.9".parse().unwrap();
        assert!(matches!(
            g.check(own, false, elsewhere, &again, &mut cookie, &mut edge, now),
            Verdict::Cookie(_)
        ));
    }
}
