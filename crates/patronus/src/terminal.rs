//! The terminal, for the commands that face a person: secrets typed without echo, and the
//! window's size.
//!
//! A secret is prompted for (on stderr) and read with echo off only when stdin is a terminal;
//! otherwise it is a line of stdin, so scripts and tests pipe it in. While echo is off, a
//! Ctrl-C (or SIGTERM, SIGHUP) restores the terminal before the process ends: a shell left
//! without echo would be the next thing the user types into.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, bail};
use rustix::termios::{self, LocalModes, OptionalActions, Termios};

/// The terminal's settings to put back if a signal ends the process during a hidden read.
static RESTORE: Mutex<Option<Termios>> = Mutex::new(None);

/// Whether secrets are prompted for (stdin is a terminal) rather than read from stdin.
pub fn interactive() -> bool {
    std::io::stdin().is_terminal()
}

/// One secret: prompted for and typed without echo on a terminal, else the next line of
/// stdin. The line's end is not part of it.
pub fn read_secret(prompt: &str) -> anyhow::Result<String> {
    if !interactive() {
        return read_line().context("reading it from stdin");
    }
    let secret = hidden_line(prompt)?;
    if secret.is_empty() {
        bail!("nothing was typed");
    }
    Ok(secret)
}

/// A new secret: on a terminal typed twice, without echo, and refused unless both match; else
/// the next line of stdin.
pub fn read_new_secret(prompt: &str) -> anyhow::Result<String> {
    let first = read_secret(prompt)?;
    if interactive() && hidden_line("again: ")? != first {
        bail!("the two entries differ; nothing was changed");
    }
    Ok(first)
}

fn read_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// Prompts on stderr once echo is off (so nothing typed ahead of the prompt can show), reads
/// a line, and puts the terminal back as it was.
fn hidden_line(prompt: &str) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let saved = termios::tcgetattr(&stdin).context("reading the terminal's settings")?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    // The Enter key still moves to the next line.
    quiet.local_modes.insert(LocalModes::ECHONL);
    watch_signals()?;
    *RESTORE.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved.clone());
    // Flush: what was typed before the prompt (and echoed) is not taken as the secret.
    termios::tcsetattr(&stdin, OptionalActions::Flush, &quiet)
        .context("turning the terminal's echo off")?;
    {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(prompt.as_bytes()).and_then(|()| e.flush());
    }
    let line = read_line();
    RESTORE.lock().unwrap_or_else(|e| e.into_inner()).take();
    termios::tcsetattr(&stdin, OptionalActions::Now, &saved)
        .context("turning the terminal's echo back on")?;
    line
}

/// Takes SIGINT, SIGTERM and SIGHUP in a thread of their own from now on: each puts the
/// terminal back if a hidden read changed it, then ends the process as the signal would have.
fn watch_signals() -> anyhow::Result<()> {
    static STARTED: OnceLock<()> = OnceLock::new();
    if STARTED.get().is_some() {
        return Ok(());
    }
    let signals = crate::block_shutdown_signals().context("taking the shutdown signals")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = signals.wait().ok();
            if let Some(t) = RESTORE.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &t);
                eprintln!();
            }
            std::process::exit(128 + sig.map_or(2, |s| s as i32));
        })?;
    let _ = STARTED.set(());
    Ok(())
}

/// The terminal's size in columns and rows: the window's (TIOCGWINSZ on stdout), else
/// `COLUMNS` and `LINES`, else 80 × 24.
pub fn size() -> (usize, usize) {
    if let Ok(w) = termios::tcgetwinsize(std::io::stdout()) {
        if w.ws_col > 0 && w.ws_row > 0 {
            return (usize::from(w.ws_col), usize::from(w.ws_row));
        }
    }
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    (var("COLUMNS").unwrap_or(80), var("LINES").unwrap_or(24))
}
