//! The TUN interface's address and the routes to the peers' prefixes through it.
//!
//! Installed with iproute2 (`ip -batch`), with `replace` so that running twice is harmless.
//! Routes through the TUN disappear with it when the edge exits, so there is nothing to undo.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use patronus_api::Prefix;

/// Brings `tun` up with `overlay` and routes `prefixes` through it.
pub fn install(tun: &str, overlay: IpAddr, prefixes: &[Prefix]) -> Result<(), String> {
    let host = if overlay.is_ipv4() { 32 } else { 128 };
    let mut lines = vec![
        format!("addr replace {overlay}/{host} dev {tun}"),
        format!("link set {tun} up"),
    ];
    for p in prefixes {
        lines.push(format!("route replace {p} dev {tun}"));
    }
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running ip (iproute2): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all((lines.join("\n") + "\n").as_bytes())
            .map_err(|e| format!("writing to ip: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "configuring {tun}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
