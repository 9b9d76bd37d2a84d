//! The TCP loopback scenario of `examples/tcp_controller`: a controller and
//! four routers over real sockets, on a multi-thread runtime, with exact
//! counts, and a restart of the controller that loses no client session.

#[path = "../examples/tcp_controller/scenario.rs"]
mod scenario;

use scenario::Config;
use scenario::summary::{Closes, Counts};
use tokio::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_loopback_scenario_ends_with_exact_counts_and_a_clean_audit() {
    let config = Config::default();
    let summary = tokio::time::timeout(Duration::from_secs(30), scenario::run(config.clone()))
        .await
        .expect("the scenario finishes within 30 s")
        .unwrap_or_else(|error| panic!("the scenario failed: {error}"));
    println!("{summary}");

    assert_eq!(
        summary.counts,
        Counts {
            routers: 4,
            // 4 routers × 200 sessions over the wire; one more refused on
            // the mute router once it is deleted.
            opened: 800,
            refused: 1,
            // The steady router: every session confirmed by a `Closed` frame.
            confirmed: 200,
            confirmations: 200,
            // The mute router: every session forced.
            forced: 200,
            // The flaky router: its 5 lost sessions closed, the 1 it made up
            // dropped, its grace period cancelled.
            reconciled_closed: 5,
            reconciled_dropped: 1,
            grace_cancelled: 1,
            grace_expired: 0,
            // The quiet router: its 10 dead sessions reaped.
            reaped: 10,
            // The restart: the flaky router's 195 and the quiet router's
            // 190 live sessions adopted, the session the flaky router made
            // up meanwhile rejected, no client session lost.
            adopted: 385,
            adoption_rejected: 1,
            lost: 0,
            closes: Closes {
                router_deleted: 200,
                forced: 200,
                reclaimed: 5,
                liveness_timeout: 10,
                router_lost: 0,
                other: 0,
            },
            // The flaky router's 195 and the quiet router's 190, adopted by
            // the restarted controller.
            remaining: 385,
            zombies: 0,
            audit_clean: true,
            events_lagged: 0,
        },
        "{summary}"
    );
    assert_eq!(summary.counts, Counts::expected(&config));
    // Each of the quiet router's 190 live sessions answered a probe (it
    // never heartbeats) before its dead ones were reaped.
    assert!(summary.probes >= 3, "{summary}");
    assert!(summary.probe_answers >= 190, "{summary}");
}
