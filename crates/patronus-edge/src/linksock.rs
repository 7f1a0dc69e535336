//! A WAN link's sockets: two queues on one address and port.
//!
//! Handshake messages cost crypto (a MAC check at least, a Diffie-Hellman when admitted) and
//! anyone can send them, from any source, a peer's real endpoint included. On one socket a
//! flood of them shares the receive buffer with the path's data and probes: once the edge falls
//! behind, the kernel drops whatever comes next, data or flood alike, and the path looks lossy
//! or dead. So each link has two sockets in one `SO_REUSEPORT` group, bound to the same address,
//! port and device, and a classic BPF program on the group hands the kernel's choice of socket
//! to the first byte of the UDP payload: WireGuard message types 1-3 (initiation, response,
//! cookie reply) go to the handshake socket, everything else (transport data, type 4: data and
//! probes) to the data socket. Each has its own buffer, so a flood can fill only the handshake
//! queue, and the edge reads that queue with a budget per pass of its loop (see
//! `Edge::read_link`), so a flood cannot take the loop from the data either. Both sockets are
//! read with the same code: a message on the "wrong" queue (a GRO batch whose first datagram
//! decided its queue, say) is handled all the same.
//!
//! The kernel counts what it drops for want of buffer space per socket (`SO_RXQ_OVFL`): the
//! edge exports both queues' counts, so that "the flood pushed no data out" is a counter that
//! stayed at zero, not a belief.
//!
//! A group of `SO_REUSEPORT` sockets would take in any other socket of the same user bound to
//! the same address and port, a second edge started by mistake, say, which would then split
//! the link's traffic with the first without an error. The address is therefore first bound
//! alone, as before, so that a port in use fails loudly; a second process that slipped in
//! between would join the group without ever being handed a datagram (the program returns only
//! the first two sockets' indices).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;

use nix::libc;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage, bind, setsockopt, socket,
    sockopt,
};

/// The two queues of a link.
#[derive(Debug)]
pub struct LinkSockets {
    /// Data and probes (WireGuard transport messages), and everything else.
    pub data: UdpSocket,
    /// Handshake messages (types 1-3), when the kernel took the steering program; otherwise
    /// they arrive on `data`.
    pub handshake: Option<UdpSocket>,
}

/// Why the link's sockets could not be made: what failed, and the error.
#[derive(Debug)]
pub struct BindError {
    pub what: String,
    pub error: std::io::Error,
}

/// The steering program, in classic BPF, run by the kernel on each datagram with the data
/// pointer at the UDP payload. It returns the index of the socket in the group (0: data, the
/// first bound; 1: handshakes). A datagram too short to load a byte from ends the program,
/// which returns 0.
fn steering_program() -> [libc::sock_filter; 5] {
    const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS: A = payload[k]
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K: A >= k ? jt : jf (relative)
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K: return k
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        insn(LD_B_ABS, 0, 0, 0),
        // Type 4 and above: data (4), or not WireGuard: the data socket.
        insn(JGE_K, 2, 0, 4),
        // Types 1-3: the handshake socket; 0: the data socket.
        insn(JGE_K, 0, 1, 1),
        insn(RET_K, 0, 0, 1),
        insn(RET_K, 0, 0, 0),
    ]
}

/// One member of the group: `SO_REUSEPORT`, bound to `dev` and `addr`, non-blocking.
fn member(addr: SocketAddr, dev: Option<&str>) -> Result<OwnedFd, BindError> {
    let fail = |what: &str| {
        let what = what.to_string();
        move |e: nix::Error| BindError {
            what,
            error: std::io::Error::from(e),
        }
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::Udp,
    )
    .map_err(fail("creating a socket"))?;
    setsockopt(&fd, sockopt::ReusePort, &true).map_err(fail("setting SO_REUSEPORT"))?;
    if let Some(dev) = dev {
        setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(dev))
            .map_err(fail(&format!("binding to device {dev}")))?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )
    .map_err(fail(&format!("binding {addr}")))?;
    Ok(fd)
}

/// Binds a link's sockets on `addr` (port 0: one the kernel picks), on device `dev` if given.
/// The data socket is required; the handshake socket is an improvement, so a kernel that
/// refuses it is reported in the returned note and the link works on one socket.
pub fn bind_link(
    addr: SocketAddr,
    dev: Option<&str>,
) -> Result<(LinkSockets, Option<String>), BindError> {
    // Alone first: a port another socket holds fails here, as it did before the group.
    let alone = UdpSocket::bind(addr).map_err(|error| BindError {
        what: format!("binding {addr}"),
        error,
    })?;
    let addr = alone.local_addr().map_err(|error| BindError {
        what: "reading the bound address".into(),
        error,
    })?;
    drop(alone);
    let data = UdpSocket::from(member(addr, dev)?);
    let handshake = member(addr, dev).and_then(|hs| {
        let mut prog = steering_program();
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_mut_ptr(),
        };
        // The kernel copies the program; `prog` need not outlive the call.
        setsockopt(&hs, sockopt::AttachReusePortCbpf, &fprog).map_err(|e| BindError {
            what: "attaching the handshake steering program".into(),
            error: e.into(),
        })?;
        Ok(UdpSocket::from(hs))
    });
    match handshake {
        Ok(hs) => Ok((
            LinkSockets {
                data,
                handshake: Some(hs),
            },
            None,
        )),
        // The handshake socket, if it was bound, closes here and leaves the group: every
        // datagram then goes to `data`.
        Err(e) => Ok((
            LinkSockets {
                data,
                handshake: None,
            },
            Some(format!(
                "no separate handshake queue ({}: {}); handshakes share the data socket",
                e.what, e.error
            )),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every datagram until `last` (its first byte and length), in the order it arrived.
    fn read_until(s: &UdpSocket, last: &[u8]) -> Vec<Vec<u8>> {
        s.set_nonblocking(false).unwrap();
        // Only against a hang: both markers were sent before, in order, on loopback.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        loop {
            let (n, _) = s.recv_from(&mut buf).expect("a datagram before the marker");
            got.push(buf[..n].to_vec());
            if buf[..n] == *last {
                return got;
            }
        }
    }

    /// Handshake messages (types 1-3) reach the handshake socket, everything else (transport
    /// data, garbage, an empty datagram) the data socket, and a second bind of the address
    /// fails as it always did.
    #[test]
    fn handshake_messages_get_their_own_queue_and_the_port_stays_exclusive() {
        let (socks, note) = bind_link("127.0.0.1:0".parse().unwrap(), Some("lo")).unwrap();
        assert!(note.is_none(), "{note:?}");
        let hs = socks.handshake.as_ref().unwrap();
        let addr = socks.data.local_addr().unwrap();
        assert_eq!(hs.local_addr().unwrap(), addr);
        let e = bind_link(addr, Some("lo")).unwrap_err();
        assert_eq!(e.error.kind(), std::io::ErrorKind::AddrInUse, "{e:?}");

        let msg = |ty: u8, len: usize, tag: u8| {
            let mut m = vec![tag; len];
            if let Some(b) = m.first_mut() {
                *b = ty;
            }
            m
        };
        let sent: Vec<Vec<u8>> = vec![
            msg(1, 148, 0xa1),
            msg(4, 1000, 0xb1),
            msg(2, 92, 0xa2),
            msg(4, 32, 0xb2),
            msg(3, 64, 0xa3),
            msg(0, 10, 0xb3),
            msg(9, 10, 0xb4),
            msg(0, 0, 0),
            msg(1, 148, 0xaf),
            msg(4, 64, 0xbf),
        ];
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        for m in &sent {
            client.send_to(m, addr).unwrap();
        }
        let to_hs = read_until(hs, &sent[8]);
        let to_data = read_until(&socks.data, &sent[9]);
        let pick = |idx: &[usize]| idx.iter().map(|&i| sent[i].clone()).collect::<Vec<_>>();
        assert_eq!(to_hs, pick(&[0, 2, 4, 8]));
        assert_eq!(to_data, pick(&[1, 3, 5, 6, 7, 9]));
    }
}
