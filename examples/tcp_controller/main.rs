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
//! `Hello` of a reconnection, or, after a restart of the controller,
//! adopts the sessions it reports (`Reconciler::reconcile_adopting`, each
//! session's token checked against the controller's key).
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
//! 5. the controller restarts: its store and pieces are dropped and built
//!    again on the same address; the routers still there reconnect and
//!    report their sessions with the tokens the controller issued; the new
//!    controller adopts every one (385 by default) and rejects the one the
//!    flaky router made up meanwhile: zero client sessions lost;
//! 6. everything shuts down and both stores are audited.
//!
//! Each session's close is counted by reason through a resource attached
//! when it opens, released exactly once whichever path closes it. The
//! scenario waits on the event bus and on the deletions' reports, never by
//! sleeping, and takes about a second.
//!
//! It prints the counts and exits non-zero if an audit is not clean or a
//! count is not what the configuration implies (a client session lost in
//! the restart among them).
//!
//! `cargo run --example tcp_controller` (`-- --help` for the sizes)

mod scenario;

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;

/// The controller over real TCP on loopback.
///
/// Sizes are capped so that a debug build keeps up with the heartbeats
/// (every router heartbeats all its sessions every 50 ms): past that, the
/// controller falls behind on its sockets and the monitor rightly reaps
/// sessions it has not heard from.
#[derive(Debug, Parser)]
struct Args {
    /// Routers: steady, mute, flaky, quiet, then steady bystanders.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(4..=8))]
    routers: u16,
    /// Sessions each router opens (the quiet router's 10 dead among them).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(10..=5_000))]
    sessions: u16,
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn Error + Send + Sync>> {
    let args = Args::parse();
    let config = scenario::Config {
        routers: usize::from(args.routers),
        sessions_per_router: usize::from(args.sessions),
        ..scenario::Config::default()
    };
    let summary = scenario::run(config.clone()).await?;
    println!("{summary}");
    let expected = scenario::summary::Counts::expected(&config);
    if !summary.counts.audit_clean {
        eprintln!("the audit is not clean");
        return Ok(ExitCode::FAILURE);
    }
    if summary.counts != expected {
        eprintln!(
            "unexpected counts:\n  got      {:?}\n  expected {expected:?}",
            summary.counts
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
