//! `patronus edge reflect`, the STAMP reflector for a peer that runs no Patronus edge, as a
//! process: a real engine's probe goes to it over UDP and its reply brings the path up.
//! (A stock peer needs nothing at all with `probe = "icmp-echo"`; the reflector adds both
//! directions' jitter.)

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use patronus_api::{Link, LinkKind, Name};
use patronus_core::{Engine, EngineConfig, PathState};

struct Reflector(Child);

impl Drop for Reflector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_reflector_answers_a_real_probe_and_the_path_comes_up() {
    // A free port for it to listen on.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _r = Reflector(
        Command::new(env!("CARGO_BIN_EXE_patronus"))
            .args(["edge", "reflect", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    let mut e = Engine::new(EngineConfig::default(), t0).unwrap();
    let peer = e
        .add_peer("stock", &["10.2.0.0/16".parse().unwrap()])
        .unwrap();
    let link = Link::new(Name::new("mpls").unwrap(), LinkKind::Mpls);
    let path = e.add_path(peer, &link, &link, t0).unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 1500];
    // The reflector may still be starting: probe until it answers, at most 5 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = Instant::now();
        e.handle_timeout(now);
        while let Some(tx) = e.poll_transmit() {
            sock.send_to(&tx.payload, ("127.0.0.1", port)).unwrap();
        }
        if let Ok(n) = sock.recv(&mut buf) {
            // Garbage first: refused, nothing changes.
            assert!(
                e.handle_probe_reply(path, &[0u8; 60], Instant::now())
                    .is_err()
            );
            e.handle_probe_reply(path, &buf[..n], Instant::now())
                .unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "the reflector never answered");
    }
    let s = e.path(path, Instant::now()).unwrap();
    assert_eq!(s.state, PathState::Up);
    assert!(s.rtt.unwrap() < Duration::from_millis(200), "{:?}", s.rtt);
}
