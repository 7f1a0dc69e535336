//! A webhook receiver for the lab: an HTTP/1.1 listener inside a namespace (the controller's,
//! say) that keeps every `POST` it gets and answers 204. Tests check the controller's
//! deliveries with it; `patronus lab demo` prints the events it receives as they come.
//!
//! It reads one request per connection (`Content-Length` bodies up to 1 MiB), and closes
//! anything else; it checks no signature (its users do, with the webhook's secret). A request
//! counts as received once it is read, before it is answered; a receiver started with a hold
//! answers each only after it, so that deliveries stay in flight (a slow endpoint).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::netns::{self, NetnsError};

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    /// Requests read and not answered yet.
    open: Arc<AtomicUsize>,
    /// Requests answered.
    answered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

const MAX_BODY: usize = 1 << 20;

/// Connections served at once; more wait in the listen queue.
const MAX_OPEN: usize = 64;

impl Receiver {
    /// Listens on `addr` inside namespace `ns` (the socket stays in it; the thread that serves
    /// it need not), answering each request as soon as it is read.
    pub fn start_in(ns: &str, addr: SocketAddr) -> Result<Self, NetnsError> {
        Self::start_holding(ns, addr, Duration::ZERO)
    }

    /// As [`Receiver::start_in`], but each request is answered `hold` after it was read (each
    /// connection on a thread of its own, up to 64 at once).
    pub fn start_holding(ns: &str, addr: SocketAddr, hold: Duration) -> Result<Self, NetnsError> {
        let listener = netns::run_in(ns, || {
            TcpListener::bind(addr).map_err(|e| NetnsError::Enter {
                name: ns.into(),
                message: format!("binding the webhook receiver on {addr}: {e}"),
            })
        })?;
        let addr = listener.local_addr().map_err(|e| NetnsError::Enter {
            name: ns.into(),
            message: e.to_string(),
        })?;
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let open = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, o, a, st) = (got.clone(), open.clone(), answered.clone(), stop.clone());
        let threads = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("webhook-receiver".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    while threads.load(Ordering::SeqCst) >= MAX_OPEN {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    threads.fetch_add(1, Ordering::SeqCst);
                    let (g, o, a, t) = (g.clone(), o.clone(), a.clone(), threads.clone());
                    let served = std::thread::Builder::new()
                        .name("webhook-request".into())
                        .spawn(move || {
                            serve(conn, hold, &g, &o, &a);
                            t.fetch_sub(1, Ordering::SeqCst);
                        });
                    if served.is_err() {
                        threads.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })
            .map_err(|e| NetnsError::Enter {
                name: ns.into(),
                message: e.to_string(),
            })?;
        Ok(Self {
            addr,
            got,
            open,
            answered,
            stop,
        })
    }

    /// Requests read and not answered yet (in flight, for the sender).
    pub fn in_flight(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// `http://addr/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Everything received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits up to `timeout` for a request that `pred` accepts.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Received) -> bool,
    ) -> Option<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.received().into_iter().find(|r| pred(r)) {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept (a connection from outside the namespace may fail: the namespace
        // then goes with the lab, and the thread with it when the process ends).
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

/// Reads one request, keeps it if it is a `POST`, and answers it after `hold`.
fn serve(
    conn: TcpStream,
    hold: Duration,
    got: &Mutex<Vec<Received>>,
    open: &AtomicUsize,
    answered: &AtomicUsize,
) {
    let Some((received, post)) = read(&conn) else {
        return;
    };
    open.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = received {
        got.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    }
    std::thread::sleep(hold);
    let status = if post {
        "204 No Content"
    } else {
        "405 Method Not Allowed"
    };
    let mut w = conn;
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    answered.fetch_add(1, Ordering::SeqCst);
    open.fetch_sub(1, Ordering::SeqCst);
}

/// One request: what a `POST` carried (none for another method), and whether it was one.
fn read(conn: &TcpStream) -> Option<(Option<Received>, bool)> {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let post = line.starts_with("POST ");
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        if headers.len() > 100 {
            return None;
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if len > MAX_BODY {
        return None;
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    let received = post.then(|| Received {
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    });
    Some((received, post))
}
