//! `patronus edge …`: run a site's data plane from a local configuration file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use nix::sys::signal::{SigSet, Signal};
use patronus_api::EdgeConfig;
use patronus_edge::{Edge, PrivateKey};

#[derive(Debug, Subcommand)]
pub enum EdgeCmd {
    /// Run the edge (root: it creates a TUN device and routes).
    Run {
        /// The edge's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the edge's public key, generating its private key (0600) first if there is none.
    Pubkey {
        /// Where the private key is (or will be) stored.
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a configuration file and print every problem in it.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
}

pub fn run(cmd: EdgeCmd) -> anyhow::Result<()> {
    match cmd {
        EdgeCmd::Pubkey { key } => {
            let k = PrivateKey::load_or_create(&key)?;
            outln!("{}", k.public());
            Ok(())
        }
        EdgeCmd::Check { config } => {
            load(&config)?;
            outln!("{}: ok", config.display());
            Ok(())
        }
        EdgeCmd::Run { config } => {
            // Shutdown signals are taken by one thread with sigwait, which stops the loop; the
            // TUN device (and with it every route through it) goes when the edge exits.
            let mut signals = SigSet::empty();
            for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
                signals.add(s);
            }
            signals.thread_block()?;
            let cfg = load(&config)?;
            let key = PrivateKey::load_or_create(&cfg.private_key_file)?;
            let mut edge = Edge::new(&cfg, &key).context("starting the edge")?;
            let stop = edge.stop_handle();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    if let Ok(sig) = signals.wait() {
                        eprintln!("edge: {sig:?}, stopping");
                    }
                    stop.stop();
                })?;
            eprintln!(
                "edge {} up: public key {}, {} links, {} peers, TUN MTU {}",
                cfg.site,
                key.public(),
                cfg.links.len(),
                cfg.peers.len(),
                edge.tun_mtu()
            );
            edge.run()?;
            Ok(())
        }
    }
}

/// Reads and validates a configuration, naming every bad key.
fn load(path: &Path) -> anyhow::Result<EdgeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: EdgeConfig =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Err(e) = cfg.validate() {
        bail!("{}: {e}", path.display());
    }
    Ok(cfg)
}
