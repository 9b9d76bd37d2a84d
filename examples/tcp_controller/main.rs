//! The controller over real TCP on loopback.
//!
//! A controller listens on an ephemeral port of 127.0.0.1 and routers
//! connect to it, each from its own task. They speak a framed protocol:
//! length-delimited frames (tokio-util's `LengthDelimitedCodec`) carrying
//! JSON-encoded frames, typed by direction (`RouterFrame`,
//! `ControllerFrame`; see `protocol.rs`). The controller runs the crate's
//! pieces over the wire: a `MemoryStore`; a `LivenessMonitor` fed by
//! `Heartbeat` frames whose `Prober` sends `Probe` frames and awaits the
//! `ProbeAnswer`; a `RouterDeleter` whose `TerminationNotifier` sends
//! `Terminate` frames, confirmed by `Closed` frames; and a `Reconciler`
//! that starts a grace period when a connection ends and reconciles the
//! `Hello` of a reconnection.
//!
//! The scenario (`scenario.rs`, also run by `tests/tcp_loopback.rs`), with
//! 4 routers × 200 sessions by default:
//!
//! 1. every router opens its sessions over the wire;
//! 2. the *flaky* router drops its connection, loses 5 sessions and picks
//!    up one the controller never heard of, and reconnects within its grace
//!    period: the 5 are closed, the unknown one is dropped, the grace period
//!    is cancelled;
//! 3. the *steady* router and the *mute* router (which never confirms a
//!    termination) are deleted at once: 200 sessions confirmed over the
//!    wire, 200 forced; a session opened on the mute router afterwards is
//!    refused;
//! 4. the *quiet* router never heartbeats and only answers probes: its 10
//!    dead sessions are reaped, its live ones kept by probe answers;
//! 5. everything shuts down and the store is audited.
//!
//! It prints the counts and exits non-zero if the audit is not clean or a
//! count is not what the configuration implies. It takes a few seconds.
//!
//! `cargo run --example tcp_controller [-- --routers 6 --sessions 1000]`

mod scenario;

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;

/// The controller over real TCP on loopback.
#[derive(Debug, Parser)]
struct Args {
    /// Routers: steady, mute, flaky, quiet, then steady bystanders.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(4..))]
    routers: u16,
    /// Sessions each router opens.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..999_999))]
    sessions: u32,
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn Error + Send + Sync>> {
    let args = Args::parse();
    let config = scenario::Config {
        routers: usize::from(args.routers),
        sessions_per_router: usize::try_from(args.sessions)?,
        ..scenario::Config::default()
    };
    let summary = scenario::run(config.clone()).await?;
    println!("{summary}");
    if !summary.audit_clean {
        eprintln!("the audit is not clean");
        return Ok(ExitCode::FAILURE);
    }
    if let Err(mismatches) = summary.check(&config) {
        eprintln!("unexpected counts: {mismatches}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
