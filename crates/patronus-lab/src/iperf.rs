//! TCP throughput between two namespaces with `iperf3` (Debian package `iperf3`).

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum IperfError {
    #[error("iperf3 is not installed (apt-get install iperf3): {0}")]
    Missing(std::io::Error),
    #[error("iperf3 {0}")]
    Failed(String),
}

/// One TCP test's result.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Throughput {
    /// Received goodput, Gbit/s.
    pub gbps: f64,
    /// Bytes the receiver received.
    pub bytes: u64,
    /// TCP retransmissions the sender counted.
    pub retransmits: u64,
    pub seconds: f64,
}

/// Kills the server if the test fails half way.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one `iperf3` TCP test: server in namespace `server_ns` listening on `dst`, client in
/// `client_ns` (bound to `bind` if given) for `seconds`.
pub fn tcp(
    server_ns: &str,
    client_ns: &str,
    dst: IpAddr,
    bind: Option<IpAddr>,
    seconds: u32,
) -> Result<Throughput, IperfError> {
    let port = "5201";
    let mut server = Server(
        Command::new("ip")
            .args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", port])
            .args(["--forceflush", "-B", &dst.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(IperfError::Missing)?,
    );
    // Wait for the server to listen (it says so) rather than for a fixed time.
    let stdout = server
        .0
        .stdout
        .take()
        .ok_or_else(|| IperfError::Failed("server has no stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("Server listening") => break,
            Some(Ok(_)) => {}
            _ => {
                let mut err = String::new();
                if let Some(mut e) = server.0.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(IperfError::Failed(format!(
                    "server in {server_ns} did not start: {}",
                    err.trim()
                )));
            }
        }
    }
    // Keep draining the server's output so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.for_each(drop));
    let mut client = Command::new("ip");
    client
        .args([
            "netns",
            "exec",
            client_ns,
            "iperf3",
            "-c",
            &dst.to_string(),
            "-p",
            port,
        ])
        .args(["-t", &seconds.to_string(), "-J"]);
    if let Some(b) = bind {
        client.args(["-B", &b.to_string()]);
    }
    let out = client
        .stdin(Stdio::null())
        .output()
        .map_err(IperfError::Missing)?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        IperfError::Failed(format!(
            "client output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })?;
    if let Some(e) = json.get("error").and_then(|e| e.as_str()) {
        return Err(IperfError::Failed(format!("client: {e}")));
    }
    let end = &json["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| IperfError::Failed("no end.sum_received.bits_per_second".into()))?;
    let bytes = end["sum_received"]["bytes"]
        .as_u64()
        .ok_or_else(|| IperfError::Failed("no end.sum_received.bytes".into()))?;
    let result = Throughput {
        gbps: bps / 1e9,
        bytes,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        seconds: end["sum_received"]["seconds"].as_f64().unwrap_or(0.0),
    };
    // The one-off server exits after the test; give it a moment, then the guard kills it.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if matches!(server.0.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(server);
    let _ = drain.join();
    Ok(result)
}
