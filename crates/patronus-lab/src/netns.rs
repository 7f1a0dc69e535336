//! Network namespaces and the `ip` command: the small set of operations the lab needs.
//!
//! Configuration goes through iproute2 in batch mode (`ip -n NS -batch -`), one process per
//! namespace and address family, so that every failure comes back with the exact command that
//! failed. Work that must happen *inside* a namespace from this process (sysctls, sockets, TUN
//! devices) runs on a thread that has entered it with `setns(2)`: a thread's network namespace is
//! its own, so the rest of the process is untouched.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("`ip` (iproute2) is not installed or not runnable: {0}")]
    NoIp(std::io::Error),
    #[error("entering network namespace {name}: {message}")]
    Enter { name: String, message: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `ip [args] -batch -` with `lines` on stdin. `-force` keeps going after an error, but the
/// exit status and stderr still report it; we do not pass it, so the first bad line stops the
/// batch and is named in the error.
pub fn ip_batch(args: &[&str], lines: &[String]) -> Result<(), NetnsError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut all = args.to_vec();
    all.extend(["-batch", "-"]);
    let out = ip_with_input(&all, format!("{}\n", lines.join("\n")).as_bytes())?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // iproute2 names the failing batch line as "Command failed -:N"; show that line.
        let line = stderr
            .split("Command failed -:")
            .nth(1)
            .and_then(|s| s.trim().parse::<usize>().ok())
            .and_then(|n| lines.get(n.wrapping_sub(1)));
        return Err(NetnsError::Command {
            command: match line {
                Some(l) => format!("ip {} {l}", args.join(" ")),
                None => format!("ip {} -batch ({} lines)", args.join(" "), lines.len()),
            },
            message: stderr.trim().to_string(),
        });
    }
    Ok(())
}

/// Runs `ip [args]` with `input` on its stdin; its output (stdout discarded), whatever its
/// exit status.
pub fn ip_with_input(args: &[&str], input: &[u8]) -> Result<std::process::Output, NetnsError> {
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetnsError::NoIp)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input)?;
    }
    Ok(child.wait_with_output()?)
}

/// Runs one `ip` command.
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(NetnsError::NoIp)?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command: format!("ip {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Names of all network namespaces that `ip netns` knows.
pub fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// Enters the network namespace `name` on the calling thread.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let f = File::open(netns_path(name)).map_err(|e| NetnsError::Enter {
        name: name.into(),
        message: e.to_string(),
    })?;
    setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
        name: name.into(),
        message: e.to_string(),
    })
}

/// Runs `f` on a fresh thread inside namespace `name` and returns its result (sockets it opens
/// stay in that namespace).
pub fn run_in<T: Send, E: From<NetnsError> + Send>(
    name: &str,
    f: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetnsError::Enter {
                name: name.into(),
                message: "the thread working in it panicked".into(),
            }
            .into())
        })
    })
}

/// Writes sysctls (`net/ipv4/ip_forward` style paths) inside namespace `name`.
pub fn sysctls(name: &str, settings: &[(&str, &str)]) -> Result<(), NetnsError> {
    run_in(name, || {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value).map_err(|e| NetnsError::Command {
                command: format!("sysctl {}={value} in {name}", key.replace('/', ".")),
                message: e.to_string(),
            })?;
        }
        Ok(())
    })
}

/// PIDs of the processes whose network namespace is `name` (what `ip netns pids` prints).
pub fn pids(name: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p: &i32| p != std::process::id() as i32)
        .collect()
}

/// Kills every process in namespace `name` and deletes it. Returns how many processes it killed.
pub fn destroy(name: &str) -> Result<usize, NetnsError> {
    let victims = pids(name);
    for &p in &victims {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    if netns_path(name).exists() {
        ip(&["netns", "delete", name])?;
    }
    Ok(victims.len())
}

/// Waits until none of `pids` runs, or `timeout` passes; true if they all ended.
pub fn wait_exit(pids: &[i32], timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while pids.iter().any(|&p| alive(p)) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// True if a process with this PID exists.
pub fn alive(pid: i32) -> bool {
    pid > 0 && kill(Pid::from_raw(pid), None).is_ok()
}

/// Whether this process may build labs: root (it needs CAP_NET_ADMIN and CAP_SYS_ADMIN for
/// namespaces, veth pairs and TUN devices) and iproute2 present.
pub fn privilege_problem() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("the lab needs root (network namespaces, veth pairs, TUN devices)".into());
    }
    if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Some("the lab needs `ip` from iproute2 (apt-get install iproute2)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("the lab needs /dev/net/tun".into());
    }
    None
}
