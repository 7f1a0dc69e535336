//! The TUN interface's address and state and the routes to the peers' prefixes through it, set
//! over rtnetlink.
//!
//! Every request is a "create or replace" (`NLM_F_CREATE | NLM_F_REPLACE`), so installing twice
//! is harmless, and each is acknowledged: a refusal comes back as the kernel's errno, with the
//! request named. Routes through the TUN go with it when the edge exits (the kernel removes the
//! routes of a deleted interface), so nothing is left to undo.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use patronus_api::Prefix;

fn family(a: IpAddr) -> AddressFamily {
    if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_address(a: IpAddr) -> RouteAddress {
    match a {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// A netlink route socket that sends one request at a time and waits for its answer.
struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; 16 * 1024],
        })
    }

    /// Sends `msg` with `flags` and waits for its acknowledgement.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16, what: &str) -> Result<(), String> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        m.finalize();
        let len = m.buffer_len();
        if len > self.buf.len() {
            return Err(format!("{what}: request of {len} bytes is too long"));
        }
        m.serialize(&mut self.buf[..len]);
        self.sock
            .send(&self.buf[..len], 0)
            .map_err(|e| format!("{what}: sending to netlink: {e}"))?;
        loop {
            let n = self
                .sock
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|e| format!("{what}: reading from netlink: {e}"))?;
            let mut at = 0;
            while at < n {
                let reply = <NetlinkMessage<RouteNetlinkMessage>>::deserialize(&self.buf[at..n])
                    .map_err(|e| format!("{what}: unreadable netlink answer: {e}"))?;
                let size = reply.header.length as usize;
                if reply.header.sequence_number == self.seq {
                    if let NetlinkPayload::Error(e) = reply.payload {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(format!(
                                "{what}: {}",
                                io::Error::from_raw_os_error(-code.get())
                            )),
                        };
                    }
                }
                if size == 0 {
                    break;
                }
                at += size;
            }
        }
    }
}

/// Brings the interface `index` (named `name`, for messages) up with `overlay`, and routes
/// `prefixes` through it in the main table.
pub fn install(name: &str, index: u32, overlay: IpAddr, prefixes: &[Prefix]) -> Result<(), String> {
    let mut nl = Rtnl::open().map_err(|e| format!("opening a netlink socket: {e}"))?;

    let mut addr = AddressMessage::default();
    addr.header.family = family(overlay);
    addr.header.prefix_len = if overlay.is_ipv4() { 32 } else { 128 };
    addr.header.scope = AddressScope::Universe;
    addr.header.index = index;
    addr.attributes.push(AddressAttribute::Local(overlay));
    addr.attributes.push(AddressAttribute::Address(overlay));
    nl.request(
        RouteNetlinkMessage::NewAddress(addr),
        NLM_F_CREATE | NLM_F_REPLACE,
        &format!("adding {overlay} to {name}"),
    )?;

    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    nl.request(
        RouteNetlinkMessage::SetLink(link),
        0,
        &format!("bringing {name} up"),
    )?;

    add_routes(&mut nl, name, index, prefixes)
}

fn route_message(index: u32, p: &Prefix) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family(p.addr());
    route.header.destination_prefix_length = p.prefix_len();
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Link;
    route.header.kind = RouteType::Unicast;
    route
        .attributes
        .push(RouteAttribute::Destination(route_address(p.addr())));
    route.attributes.push(RouteAttribute::Oif(index));
    route
}

fn add_routes(nl: &mut Rtnl, name: &str, index: u32, prefixes: &[Prefix]) -> Result<(), String> {
    for p in prefixes {
        nl.request(
            RouteNetlinkMessage::NewRoute(route_message(index, p)),
            NLM_F_CREATE | NLM_F_REPLACE,
            &format!("routing {p} through {name}"),
        )?;
    }
    Ok(())
}

/// Routes `prefixes` through the interface `index` (a peer that joined).
pub fn add(name: &str, index: u32, prefixes: &[Prefix]) -> Result<(), String> {
    let mut nl = Rtnl::open().map_err(|e| format!("opening a netlink socket: {e}"))?;
    add_routes(&mut nl, name, index, prefixes)
}

/// Removes the routes of `prefixes` through the interface `index` (a peer that left); one
/// already gone is not an error.
pub fn remove(name: &str, index: u32, prefixes: &[Prefix]) -> Result<(), String> {
    let mut nl = Rtnl::open().map_err(|e| format!("opening a netlink socket: {e}"))?;
    for p in prefixes {
        match nl.request(
            RouteNetlinkMessage::DelRoute(route_message(index, p)),
            0,
            &format!("removing the route of {p} through {name}"),
        ) {
            Ok(()) => {}
            Err(e) if e.contains("No such process") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
