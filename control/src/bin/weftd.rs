//! weftd: the weft overlay daemon, a drop-in for flanneld with the udp backend.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;
use weft_control::flags::Flags;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let flags = Flags::parse_or_exit();
    if flags.version {
        println!("weftd {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    init_logging(flags.verbosity);
    for ignored in &flags.ignored {
        tracing::info!(flag = %ignored, "ignoring a flanneld logging flag weftd does not need");
    }
    match run(flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(flags: Flags) -> anyhow::Result<()> {
    // The control thread: etcd, netlink, iptables, health. The data plane has threads of its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("weft-control")
        .build()?;
    runtime.block_on(weft_control::daemon::run(flags))?;
    Ok(())
}

/// `-v` follows flanneld's glog levels: 0 is informational, 1 adds the periodic counter
/// summary, 2 and more add debug output. RUST_LOG, when set, wins.
fn init_logging(verbosity: u32) {
    let default = match verbosity {
        0 | 1 => "info",
        2 | 3 => "info,weft_control=debug,weft_engine=debug",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
