//! A webhook receiver for the lab: an HTTP/1.1 listener inside a namespace (the controller's,
//! say) that keeps every `POST` it gets and answers 204. Tests check the controller's
//! deliveries with it; `patronus lab demo` prints the events it receives as they come.
//!
//! It reads one request per connection (`Content-Length` bodies up to 1 MiB), and closes
//! anything else; it checks no signature (its users do, with the webhook's secret).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
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
    stop: Arc<AtomicBool>,
}

const MAX_BODY: usize = 1 << 20;

impl Receiver {
    /// Listens on `addr` inside namespace `ns` (the socket stays in it; the thread that serves
    /// it need not).
    pub fn start_in(ns: &str, addr: SocketAddr) -> Result<Self, NetnsError> {
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
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        std::thread::Builder::new()
            .name("webhook-receiver".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    if let Some(r) = serve(conn) {
                        g.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                    }
                }
            })
            .map_err(|e| NetnsError::Enter {
                name: ns.into(),
                message: e.to_string(),
            })?;
        Ok(Self { addr, got, stop })
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

/// Reads one request and answers it.
fn serve(conn: TcpStream) -> Option<Received> {
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
    post.then(|| Received {
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
