//! The WAN emulator: one thread in the `wan` namespace that carries every emulated link's packets
//! through its [`Shaper`]s.
//!
//! # How packets reach it
//!
//! Each emulated link `k` has a TUN device `t<k>` in the wan namespace, owned by this thread.
//! Policy routing sends it every packet that enters the WAN from link `k` (`iif l<k>` → table
//! `1000+k` → `default dev t<k>`), and the main table routes packets *for* an emulated link to
//! its TUN too (from unemulated links and from the wan namespace itself). A packet read from
//! `t<k>` that is not for link `k` came from link `k` and passes `k`'s `up` shaper; it is then
//! held until it leaves `up`, passes its destination link's `down` shaper at that moment (so
//! `down` sees the packets of all sources in time order), is held again until it leaves `down`,
//! and is written to the destination link's TUN. The kernel then delivers it (`iif t<k>` →
//! table 200, the real veth routes). Every packet crosses one userspace hop however many shapers
//! it passes; the destination link is found by longest-prefix match on the destination address.
//!
//! # I/O
//!
//! The TUN devices use offload: a read may return a TCP or UDP GSO super-packet, which is split
//! into wire-sized packets so that loss, rate and delay apply to each real packet; on the way out,
//! packets released together are coalesced again (GRO) and written in one call. One epoll loop
//! waits on the TUNs, a timerfd armed for the earliest release, and an eventfd for commands.
//! Packets leave in release order (a binary heap keyed by release time, then arrival order).
//!
//! # Limits
//!
//! At most [`MAX_QUEUED`] packets wait in the emulator at once; more are dropped and counted as
//! `overflow` (at 1 Gbit/s of 1500-byte packets that is over 300 ms of delay).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use patronus_api::Prefix;
use tun_rs::{DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::impair::{DirStats, Impairment, Shaper};
use crate::netns;

/// Most packets held in the emulator at once.
pub const MAX_QUEUED: usize = 32_768;
/// Capacity of the buffers packets are written from: a coalesced 64 KB packet plus headroom.
const WRITE_CAPACITY: usize = 65_536 + 2 * VIRTIO_NET_HDR_LEN + 64;

/// A link as the emulator sees it.
#[derive(Debug, Clone)]
pub struct EmuLink {
    /// `site/link`, for status output.
    pub name: String,
    /// The link's global index; its TUN is `t<index>`.
    pub index: usize,
    pub emulated: bool,
    /// Addresses reached through this link (its subnet, and LANs routed over it).
    pub prefixes: Vec<Prefix>,
    pub impairment: Impairment,
    pub mtu: u16,
}

/// Which direction(s) of a link a setting applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dir {
    /// From the site into the WAN.
    Up,
    /// From the WAN to the site.
    Down,
    Both,
}

impl std::str::FromStr for Dir {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "up" => Ok(Dir::Up),
            "down" => Ok(Dir::Down),
            "both" => Ok(Dir::Both),
            _ => Err(format!("dir: expected up, down or both, got {s:?}")),
        }
    }
}

/// One link's impairments and counters.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub name: String,
    pub emulated: bool,
    pub up: Impairment,
    pub down: Impairment,
    pub up_stats: DirStats,
    pub down_stats: DirStats,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EmulatorStatus {
    pub links: Vec<LinkStatus>,
    /// Packets whose destination is on no link.
    pub unroutable: u64,
    /// Packets dropped because [`MAX_QUEUED`] were already waiting.
    pub overflow: u64,
    /// Batched writes to a TUN device that the kernel refused (each may carry several packets).
    pub tx_errors: u64,
    /// Reads from a TUN device that failed (a packet that could not be split is lost with it).
    pub read_errors: u64,
    /// Packets waiting for their release time now.
    pub queued: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("emulator setup: {0}")]
    Setup(String),
    #[error("the emulator thread has stopped")]
    Stopped,
    #[error("no link with index {0}")]
    NoLink(usize),
    #[error("link {0} is not emulated: it is a bare veth and cannot be impaired")]
    NotEmulated(String),
}

enum Cmd {
    Set {
        link: usize,
        dir: Dir,
        imp: Impairment,
        reply: mpsc::Sender<Result<(), EmulatorError>>,
    },
    Status {
        reply: mpsc::Sender<EmulatorStatus>,
    },
    /// Copy the next `count` packets entering the WAN from link `link`.
    Capture {
        link: usize,
        count: usize,
        reply: mpsc::Sender<Result<(), EmulatorError>>,
    },
    /// Hand over what the capture on `link` holds so far, and stop it.
    TakeCapture {
        link: usize,
        reply: mpsc::Sender<Vec<Vec<u8>>>,
    },
    Stop,
}

/// Handle to the emulator thread. Dropping it stops the thread and removes its TUN devices.
#[derive(Debug)]
pub struct Emulator {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Set { .. } => "Set",
            Cmd::Status { .. } => "Status",
            Cmd::Capture { .. } => "Capture",
            Cmd::TakeCapture { .. } => "TakeCapture",
            Cmd::Stop => "Stop",
        })
    }
}

impl Emulator {
    /// Starts the emulator in namespace `netns`, creating `t<k>` for every emulated link. Returns
    /// once the TUN devices exist (they are down; the caller brings them up and routes to them).
    pub fn start(netns: &str, links: Vec<EmuLink>, seed: u64) -> Result<Self, EmulatorError> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC)
                .map_err(|e| EmulatorError::Setup(e.to_string()))?,
        );
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns = netns.to_string();
        let wake2 = wake.clone();
        let thread = std::thread::Builder::new()
            .name("wan-emulator".into())
            .spawn(move || match Loop::new(&ns, links, seed, rx, wake2) {
                Ok(mut l) => {
                    let _ = ready_tx.send(Ok(()));
                    if let Err(e) = l.run() {
                        eprintln!("wan emulator stopped: {e}");
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| EmulatorError::Setup(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                tx,
                wake,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(EmulatorError::Setup("the emulator thread died".into()))
            }
        }
    }

    fn send(&self, cmd: Cmd) -> Result<(), EmulatorError> {
        self.tx.send(cmd).map_err(|_| EmulatorError::Stopped)?;
        self.wake.write(1).map_err(|_| EmulatorError::Stopped)?;
        Ok(())
    }

    /// Sets the impairment of one or both directions of link `index`. Applies to packets that
    /// arrive from now on.
    pub fn set(&self, index: usize, dir: Dir, imp: Impairment) -> Result<(), EmulatorError> {
        let (reply, rx) = mpsc::channel();
        self.send(Cmd::Set {
            link: index,
            dir,
            imp,
            reply,
        })?;
        rx.recv().map_err(|_| EmulatorError::Stopped)?
    }

    pub fn status(&self) -> Result<EmulatorStatus, EmulatorError> {
        let (reply, rx) = mpsc::channel();
        self.send(Cmd::Status { reply })?;
        rx.recv().map_err(|_| EmulatorError::Stopped)
    }

    /// Starts copying the next `count` IP packets that enter the WAN from emulated link
    /// `index` (as they arrive, before any impairment), replacing an earlier capture.
    pub fn capture(&self, index: usize, count: usize) -> Result<(), EmulatorError> {
        let (reply, rx) = mpsc::channel();
        self.send(Cmd::Capture {
            link: index,
            count,
            reply,
        })?;
        rx.recv().map_err(|_| EmulatorError::Stopped)?
    }

    /// The packets captured on link `index` so far; ends the capture.
    pub fn take_capture(&self, index: usize) -> Result<Vec<Vec<u8>>, EmulatorError> {
        let (reply, rx) = mpsc::channel();
        self.send(Cmd::TakeCapture { link: index, reply })?;
        rx.recv().map_err(|_| EmulatorError::Stopped)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A packet waiting for its release time (ordered by release time, then arrival).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    release: u64,
    seq: u64,
    tun: usize,
    /// The link whose `down` shaper the packet still has to pass, at `release`.
    down: Option<usize>,
    buf: Vec<u8>,
}

const TOKEN_WAKE: u64 = u64::MAX;
const TOKEN_TIMER: u64 = u64::MAX - 1;
/// Reads per TUN per wake-up, so that one busy link cannot starve the others.
const READ_BUDGET: usize = 32;

struct Loop {
    links: Vec<EmuLink>,
    /// `tun_of[global index]`: position in `tuns` of an emulated link's TUN.
    tun_of: Vec<Option<usize>>,
    /// `link_of_tun[tun]`: position in `links` of the link a TUN belongs to.
    link_of_tun: Vec<usize>,
    tuns: Vec<SyncDevice>,
    /// `(network, prefix length, link)`, longest first.
    routes4: Vec<(u32, u8, usize)>,
    routes6: Vec<(u128, u8, usize)>,
    /// `[up, down]` per link.
    shapers: Vec<[Shaper; 2]>,
    heap: BinaryHeap<Reverse<Held>>,
    seq: u64,
    buf_len: usize,
    pool: Vec<Vec<u8>>,
    /// Write buffers (capacity [`WRITE_CAPACITY`]), reused.
    big_pool: Vec<Vec<u8>>,
    rx: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    original: Vec<u8>,
    out: Vec<Vec<Vec<u8>>>,
    gro: GROTable,
    epoll: Epoll,
    timer: TimerFd,
    wake: Arc<EventFd>,
    cmds: mpsc::Receiver<Cmd>,
    unroutable: u64,
    overflow: u64,
    tx_errors: u64,
    read_errors: u64,
    /// Active captures: link position, packets still wanted, packets copied.
    captures: Vec<(usize, usize, Vec<Vec<u8>>)>,
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> EmulatorError + '_ {
    move |e| EmulatorError::Setup(format!("{what}: {e}"))
}

pub(crate) fn now_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux with a valid clock id; 0 would only delay releases.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

impl Loop {
    fn new(
        ns: &str,
        links: Vec<EmuLink>,
        seed: u64,
        cmds: mpsc::Receiver<Cmd>,
        wake: Arc<EventFd>,
    ) -> Result<Self, EmulatorError> {
        netns::enter(ns).map_err(setup("entering the wan namespace"))?;
        // Timers on this thread fire when asked, not up to 50 µs later (the default slack).
        nix::sys::prctl::set_timerslack(1).map_err(setup("timer slack"))?;
        let max_mtu = links.iter().map(|l| l.mtu).max().unwrap_or(1500) as usize;
        let buf_len = VIRTIO_NET_HDR_LEN + max_mtu;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(setup("epoll"))?;
        let mut tuns = Vec::new();
        let mut tun_of = vec![None; links.iter().map(|l| l.index + 1).max().unwrap_or(0)];
        let mut link_of_tun = Vec::new();
        let mut shapers = Vec::new();
        for (pos, l) in links.iter().enumerate() {
            let s = seed ^ (l.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            shapers.push([
                Shaper::new(l.impairment.clone(), s),
                Shaper::new(l.impairment.clone(), s.rotate_left(17) ^ 1),
            ]);
            if !l.emulated {
                continue;
            }
            let dev = DeviceBuilder::new()
                .name(format!("t{}", l.index))
                .mtu(max_mtu as u16)
                .offload(true)
                // The kernel's queue in front of the emulator must not drop what the emulated
                // link would have carried: the shapers decide what is lost, not a 500-packet
                // default queue overflowing while this thread is busy.
                .tx_queue_len(20_000)
                .build_sync()
                .map_err(setup(&format!("creating TUN t{}", l.index)))?;
            dev.set_nonblocking(true)
                .map_err(setup("non-blocking TUN"))?;
            epoll
                .add(
                    dev.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, tuns.len() as u64),
                )
                .map_err(setup("epoll add"))?;
            tun_of[l.index] = Some(tuns.len());
            link_of_tun.push(pos);
            tuns.push(dev);
        }
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(setup("timerfd"))?;
        epoll
            .add(
                timer.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_TIMER),
            )
            .map_err(setup("epoll add"))?;
        epoll
            .add(
                wake.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_WAKE),
            )
            .map_err(setup("epoll add"))?;
        let mut routes4 = Vec::new();
        let mut routes6 = Vec::new();
        for (pos, l) in links.iter().enumerate() {
            for p in &l.prefixes {
                match p.addr() {
                    IpAddr::V4(a) => routes4.push((u32::from(a), p.prefix_len(), pos)),
                    IpAddr::V6(a) => routes6.push((u128::from(a), p.prefix_len(), pos)),
                }
            }
        }
        routes4.sort_by_key(|r| Reverse(r.1));
        routes6.sort_by_key(|r| Reverse(r.1));
        let n_tuns = tuns.len();
        Ok(Self {
            links,
            tun_of,
            link_of_tun,
            tuns,
            routes4,
            routes6,
            shapers,
            heap: BinaryHeap::new(),
            seq: 0,
            buf_len,
            pool: Vec::new(),
            big_pool: Vec::new(),
            rx: (0..IDEAL_BATCH_SIZE).map(|_| vec![0; buf_len]).collect(),
            sizes: vec![0; IDEAL_BATCH_SIZE],
            original: vec![0; VIRTIO_NET_HDR_LEN + 65_536],
            out: (0..n_tuns).map(|_| Vec::new()).collect(),
            gro: GROTable::new(),
            epoll,
            timer,
            wake,
            cmds,
            unroutable: 0,
            overflow: 0,
            tx_errors: 0,
            read_errors: 0,
            captures: Vec::new(),
        })
    }

    fn run(&mut self) -> Result<(), EmulatorError> {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            self.arm_timer();
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(EmulatorError::Setup(format!("epoll_wait: {e}"))),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        if self.commands() {
                            return Ok(());
                        }
                    }
                    TOKEN_TIMER => {
                        let _ = self.timer.wait();
                    }
                    t => self.read_tun(t as usize),
                }
            }
            self.release_due(now_ns());
        }
    }

    /// Handles queued commands; true when told to stop.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                Cmd::Stop => return true,
                Cmd::Set {
                    link,
                    dir,
                    imp,
                    reply,
                } => {
                    let r = match self.links.iter().position(|l| l.index == link) {
                        None => Err(EmulatorError::NoLink(link)),
                        Some(pos) if !self.links[pos].emulated => {
                            Err(EmulatorError::NotEmulated(self.links[pos].name.clone()))
                        }
                        Some(pos) => {
                            let [up, down] = &mut self.shapers[pos];
                            if dir != Dir::Down {
                                up.set(imp.clone());
                            }
                            if dir != Dir::Up {
                                down.set(imp);
                            }
                            Ok(())
                        }
                    };
                    let _ = reply.send(r);
                }
                Cmd::Status { reply } => {
                    let _ = reply.send(self.status());
                }
                Cmd::Capture { link, count, reply } => {
                    let r = match self.links.iter().position(|l| l.index == link) {
                        Some(pos) if self.links[pos].emulated => {
                            self.captures.retain(|c| c.0 != pos);
                            self.captures.push((pos, count, Vec::new()));
                            Ok(())
                        }
                        Some(pos) => Err(EmulatorError::NotEmulated(self.links[pos].name.clone())),
                        None => Err(EmulatorError::NoLink(link)),
                    };
                    let _ = reply.send(r);
                }
                Cmd::TakeCapture { link, reply } => {
                    let pos = self.links.iter().position(|l| l.index == link);
                    let mut got = Vec::new();
                    if let Some(i) = self.captures.iter().position(|c| Some(c.0) == pos) {
                        got = self.captures.swap_remove(i).2;
                    }
                    let _ = reply.send(got);
                }
            }
        }
        false
    }

    fn status(&self) -> EmulatorStatus {
        EmulatorStatus {
            links: self
                .links
                .iter()
                .zip(&self.shapers)
                .map(|(l, [up, down])| LinkStatus {
                    name: l.name.clone(),
                    emulated: l.emulated,
                    up: up.impairment().clone(),
                    down: down.impairment().clone(),
                    up_stats: up.stats,
                    down_stats: down.stats,
                })
                .collect(),
            unroutable: self.unroutable,
            overflow: self.overflow,
            tx_errors: self.tx_errors,
            read_errors: self.read_errors,
            queued: self.heap.len(),
        }
    }

    fn arm_timer(&mut self) {
        let r = match self.heap.peek() {
            Some(Reverse(h)) => {
                // An absolute time in the past fires at once, which is what a due packet needs.
                let t = TimeSpec::new(
                    (h.release / 1_000_000_000) as i64,
                    (h.release % 1_000_000_000) as i64,
                );
                self.timer.set(
                    Expiration::OneShot(t.max(TimeSpec::new(0, 1))),
                    TimerSetTimeFlags::TFD_TIMER_ABSTIME,
                )
            }
            None => self.timer.unset(),
        };
        if let Err(e) = r {
            eprintln!("wan emulator: arming the release timer failed: {e}");
        }
    }

    fn lookup(&self, addr: IpAddr) -> Option<usize> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.routes4
                    .iter()
                    .find(|(net, len, _)| *len == 0 || (a ^ net) >> (32 - *len as u32) == 0)
                    .map(|r| r.2)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.routes6
                    .iter()
                    .find(|(net, len, _)| *len == 0 || (a ^ net) >> (128 - *len as u32) == 0)
                    .map(|r| r.2)
            }
        }
    }

    fn read_tun(&mut self, tun: usize) {
        for _ in 0..READ_BUDGET {
            let Some(dev) = self.tuns.get(tun) else {
                return;
            };
            let n = match dev.recv_multiple(
                &mut self.original,
                &mut self.rx,
                &mut self.sizes,
                VIRTIO_NET_HDR_LEN,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A packet tun-rs cannot split (e.g. a GSO packet of more segments than a
                    // batch holds) is dropped and counted. A dead device (EBADFD: someone
                    // deleted t<k>) is taken out of the loop instead of spinning on it.
                    self.read_errors += 1;
                    let dead = e.raw_os_error() == Some(nix::errno::Errno::EBADFD as i32);
                    if dead || self.read_errors.is_power_of_two() {
                        eprintln!(
                            "wan emulator: reading t{}: {e} ({} read errors so far{})",
                            self.links[self.link_of_tun[tun]].index,
                            self.read_errors,
                            if dead {
                                "; device gone, no longer read"
                            } else {
                                ""
                            }
                        );
                    }
                    if dead {
                        let _ = self.epoll.delete(dev);
                    }
                    return;
                }
            };
            let now = now_ns();
            for i in 0..n {
                self.admit(tun, i, now);
            }
        }
    }

    /// Passes packet `rx[i]` read from TUN position `from` through the source link's `up`
    /// shaper. Its destination link's `down` shaper runs when it leaves `up` (see
    /// [`Loop::release_due`]), so that `down` sees packets from every source in time order.
    fn admit(&mut self, from: usize, i: usize, now: u64) {
        let len = self.sizes[i];
        let pkt = &self.rx[i][VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len];
        let Some(dst_link) = destination(pkt).and_then(|d| self.lookup(d)) else {
            self.unroutable += 1;
            return;
        };
        if self.heap.len() >= MAX_QUEUED {
            self.overflow += 1;
            return;
        }
        // What arrives on t<k> either entered the WAN from link k (policy routing by input
        // interface) or is for link k from somewhere unemulated (the main table).
        let from_link = self.link_of_tun[from];
        if from_link != dst_link {
            if let Some(c) = self
                .captures
                .iter_mut()
                .find(|c| c.0 == from_link && c.1 > 0)
            {
                c.1 -= 1;
                c.2.push(self.rx[i][VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len].to_vec());
            }
        }
        let down = self.links[dst_link].emulated.then_some(dst_link);
        let out = self.tun_of[self.links[dst_link].index].unwrap_or(from);
        let (release, down) = if from_link != dst_link {
            match self.shapers[from_link][0].admit(now, len) {
                Ok(t) => (t, down),
                Err(_) => return,
            }
        } else {
            match down.map(|d| self.shapers[d][1].admit(now, len)) {
                Some(Ok(t)) => (t, None),
                Some(Err(_)) => return,
                None => (now, None),
            }
        };
        let fresh = self.pool.pop().unwrap_or_else(|| vec![0; self.buf_len]);
        let mut buf = std::mem::replace(&mut self.rx[i], fresh);
        buf.truncate(VIRTIO_NET_HDR_LEN + len);
        self.seq += 1;
        self.heap.push(Reverse(Held {
            release,
            seq: self.seq,
            tun: out,
            down,
            buf,
        }));
    }

    /// Moves every packet due by `now` on: through its `down` shaper if it still has one to
    /// pass (at the time it left `up`), else out of its TUN.
    fn release_due(&mut self, now: u64) {
        let mut pending = 0;
        while self.heap.peek().is_some_and(|Reverse(h)| h.release <= now) {
            let Some(Reverse(mut h)) = self.heap.pop() else {
                break;
            };
            if let Some(d) = h.down.take() {
                let len = h.buf.len() - VIRTIO_NET_HDR_LEN;
                match self.shapers[d][1].admit(h.release, len) {
                    Ok(t) if t > now => {
                        h.release = t;
                        self.heap.push(Reverse(h));
                        continue;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        self.recycle(h.buf);
                        continue;
                    }
                }
            }
            // Written from a buffer that can hold a whole coalesced 64 KB packet: tun-rs's GRO
            // merges only into a buffer that needs no reallocation.
            let mut big = self
                .big_pool
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(WRITE_CAPACITY));
            big.clear();
            big.extend_from_slice(&h.buf);
            self.recycle(h.buf);
            self.out[h.tun].push(big);
            pending += 1;
            // Bounded: at most this many large buffers exist at once.
            if pending == IDEAL_BATCH_SIZE {
                self.write_out();
                pending = 0;
            }
        }
        if pending > 0 {
            self.write_out();
        }
    }

    /// Writes what `out` holds to each TUN, coalesced, and keeps the buffers for reuse.
    fn write_out(&mut self) {
        for t in 0..self.out.len() {
            if self.out[t].is_empty() {
                continue;
            }
            let mut bufs = std::mem::take(&mut self.out[t]);
            if let Err(e) = self.tuns[t].send_multiple(&mut self.gro, &mut bufs, VIRTIO_NET_HDR_LEN)
            {
                self.tx_errors += 1;
                if self.tx_errors.is_power_of_two() {
                    eprintln!(
                        "wan emulator: writing t{t}: {e} ({} so far)",
                        self.tx_errors
                    );
                }
            }
            self.big_pool.append(&mut bufs);
            self.out[t] = bufs;
        }
    }

    fn recycle(&mut self, mut b: Vec<u8>) {
        b.resize(self.buf_len, 0);
        if b.capacity() > 4 * self.buf_len {
            b.shrink_to(self.buf_len);
        }
        self.pool.push(b);
    }
}

/// Destination of an IPv4 or IPv6 packet, or `None` if it is neither.
fn destination(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let d: [u8; 4] = pkt[16..20].try_into().ok()?;
            Some(IpAddr::from(d))
        }
        6 if pkt.len() >= 40 => {
            let d: [u8; 16] = pkt[24..40].try_into().ok()?;
            Some(IpAddr::from(d))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_read_from_v4_and_v6_headers_and_garbage_is_refused() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[10, 0, 0, 1]);
        v4[16..20].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(destination(&v4), Some("10.0.0.2".parse().unwrap()));
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[23] = 1;
        v6[39] = 2;
        assert_eq!(destination(&v6), Some("::2".parse().unwrap()));
        assert_eq!(destination(&v4[..19]), None);
        assert_eq!(destination(&[]), None);
        assert_eq!(destination(&[0x55; 60]), None);
    }
}
