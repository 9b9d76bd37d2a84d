//! The TCP loopback scenario of `examples/tcp_controller`: a controller and
//! four routers over real sockets, on a multi-thread runtime, with exact
//! counts.

#[path = "../examples/tcp_controller/scenario.rs"]
mod scenario;

use tokio::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_loopback_scenario_ends_with_exact_counts_and_a_clean_audit() {
    let config = scenario::Config::default();
    let summary = tokio::time::timeout(Duration::from_secs(30), scenario::run(config.clone()))
        .await
        .expect("the scenario finishes within 30 s")
        .unwrap_or_else(|error| panic!("the scenario failed: {error}"));
    println!("{summary}");

    assert_eq!(summary.routers, 4);
    assert_eq!((summary.opened, summary.refused), (800, 1));
    // The steady router: every session confirmed by a `Closed` frame.
    assert_eq!((summary.confirmed, summary.confirmations), (200, 200));
    // The mute router: every session forced.
    assert_eq!(summary.forced, 200);
    // The flaky router: 5 lost sessions closed, 1 unknown dropped, grace
    // cancelled, none expired.
    assert_eq!(
        (summary.reconciled_closed, summary.reconciled_dropped),
        (5, 1)
    );
    assert_eq!((summary.grace_cancelled, summary.grace_expired), (1, 0));
    // The quiet router: its 10 dead sessions reaped, the live ones kept by
    // probe answers (each live one answered at least once).
    assert_eq!(summary.reaped, 10);
    assert!(summary.probes > 0, "{summary}");
    assert!(summary.probe_answers >= 190, "{summary}");
    assert_eq!(
        summary.closes,
        scenario::Closes {
            router_deleted: 200,
            forced: 200,
            reclaimed: 5,
            liveness_timeout: 10,
            router_lost: 0,
            other: 0,
        }
    );
    // Left: the flaky router's 195 and the quiet router's 190.
    assert_eq!(summary.remaining, 385);
    assert_eq!(summary.zombies, 0);
    assert!(summary.audit_clean);
    assert_eq!(summary.events_lagged, 0);
    assert_eq!(summary.check(&config), Ok(()));
}
