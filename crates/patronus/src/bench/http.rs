//! A small HTTP/1.1 client for the benches: one keep-alive connection to the controller's JSON
//! API on loopback, answers framed by `Content-Length` or chunked, bounded in size.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One answer: its status, its `ETag` and its body.
pub(super) struct Answer {
    pub status: u16,
    pub etag: Option<String>,
    pub body: Vec<u8>,
}

/// An HTTP/1.1 client on one keep-alive connection, for the controller's JSON API (answers
/// framed by `Content-Length` or chunked).
pub(super) struct Client {
    conn: BufReader<TcpStream>,
    pub addr: SocketAddr,
    pub token: String,
    line: String,
}

impl Client {
    /// A connection whose requests carry `token` (none when empty).
    pub(super) async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            conn: BufReader::new(s),
            addr,
            token: token.to_owned(),
            line: String::new(),
        })
    }

    /// A request with `If-Match` when given, and a JSON body when given.
    pub(super) async fn request(
        &mut self,
        method: &str,
        path: &str,
        if_match: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        match if_match {
            Some(e) => self.send(method, path, &[("If-Match", e)], body).await,
            None => self.send(method, path, &[], body).await,
        }
    }

    /// A request whose answer must have status `expect`: its JSON, or an error naming the
    /// request, the status and what the controller said.
    pub(super) async fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        expect: u16,
    ) -> anyhow::Result<Value> {
        let a = self.request(method, path, None, body).await?;
        anyhow::ensure!(
            a.status == expect,
            "{method} {path}: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
        serde_json::from_slice(&a.body).with_context(|| format!("{method} {path}: not JSON"))
    }

    /// A request with these extra headers; the bearer token (when there is one) and the body's
    /// headers are added.
    pub(super) async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        if !self.token.is_empty() {
            head.push_str(&format!("Authorization: Bearer {}\r\n", self.token));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        if !body.is_empty() {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        head.push_str(&body);
        self.conn.get_mut().write_all(head.as_bytes()).await?;
        self.read_answer().await
    }

    async fn read_line(&mut self) -> anyhow::Result<&str> {
        self.line.clear();
        let n = self.conn.read_line(&mut self.line).await?;
        anyhow::ensure!(n > 0, "the controller closed the connection");
        anyhow::ensure!(self.line.len() < 16 * 1024, "a header line over 16 KiB");
        Ok(self.line.trim_end())
    }

    async fn read_answer(&mut self) -> anyhow::Result<Answer> {
        let status: u16 = self
            .read_line()
            .await?
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("not an HTTP status line")?;
        let (mut length, mut chunked, mut etag) = (None, false, None);
        loop {
            let line = self.read_line().await?;
            if line.is_empty() {
                break;
            }
            let Some((k, v)) = line.split_once(':') else {
                bail!("a header line without a colon");
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse::<usize>().context("Content-Length")?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.eq_ignore_ascii_case("chunked");
            } else if k.eq_ignore_ascii_case("etag") {
                etag = Some(v.to_owned());
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size = usize::from_str_radix(
                    self.read_line().await?.split(';').next().unwrap_or(""),
                    16,
                )
                .context("a chunk size")?;
                anyhow::ensure!(body.len() + size <= 64 << 20, "an answer over 64 MiB");
                let at = body.len();
                body.resize(at + size, 0);
                self.conn.read_exact(&mut body[at..]).await?;
                self.read_line().await?;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            anyhow::ensure!(n <= 64 << 20, "an answer over 64 MiB");
            body.resize(n, 0);
            self.conn.read_exact(&mut body).await?;
        }
        Ok(Answer { status, etag, body })
    }
}
