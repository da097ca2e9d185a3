//! `limiter-agent detach`: removes the shield an agent left pinned (its XDP links, program
//! and maps), from every interface or from the ones named.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::dataplane::pin::{self, PinDir};

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The bpffs directory the agent pinned into (`limiter-agent run --pin-dir`).
    #[arg(long, value_name = "DIR", default_value = pin::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Detach from this interface only (repeatable). Without any, or once the last link is
    /// gone, the program and every map are removed too.
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,
}

pub fn run(args: DetachArgs) -> anyhow::Result<()> {
    crate::cli::run::require_root()?;
    let dir = PinDir::open_existing(&args.pin_dir)
        .with_context(|| format!("opening the pinned shield in {}", args.pin_dir.display()))?;
    let Some(dir) = dir else {
        println!("nothing pinned in {}: no shield to remove", args.pin_dir.display());
        return Ok(());
    };
    let removed =
        dir.remove(&args.ifaces).with_context(|| format!("removing the pins in {}", args.pin_dir.display()))?;
    println!("{removed}");
    // The SYN proxy's netfilter half goes with the whole shield (it is useless without the
    // program answering cookies, and its conntrack setting changes the namespace's behaviour).
    if args.ifaces.is_empty() && crate::synproxy::installed() {
        crate::synproxy::remove().context("removing the SYN proxy's nftables table and ip6tables chain")?;
        println!("removed the SYN proxy's nftables table {}", crate::synproxy::TABLE);
    }
    Ok(())
}
