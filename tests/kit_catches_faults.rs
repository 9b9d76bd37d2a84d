//! Proof that the test kit catches bugs: a store with a known fault
//! injected, driven by the kit's operation sequences with the invariants
//! checked after every step. proptest must find the fault, shrink it (to
//! its smallest counterexample with the seed used here; a few seeds in a
//! thousand stop a step or two short of it), and the checker's report must
//! name it.
//! Only the public API and the `test-util` feature, as a downstream suite.

use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};
use session_lifecycle::test_util::model::{Op, OpKind, OpWeights, Space};
use session_lifecycle::test_util::strategy::ops;
use session_lifecycle::test_util::{InvariantChecker, Violation, run_paused};
use std::sync::atomic::{AtomicBool, Ordering};

use session_lifecycle::{
    CloseReason, Incarnation, MemoryStore, NewSession, RouterId, Session, SessionId, SessionKey,
    SessionStore, session::CloseOutcome, store::AuditReport, store::BackendError,
    store::Corruption, store::CreateError, store::Fault, store::FenceError, store::FenceSnapshot,
    store::FinishError, store::FinishReport, store::RegisterError, store::Repair,
    store::RouterCensus, store::RouterError, store::RouterStatus, store::SessionError,
};

/// Runs `ops` on a fresh store with `fault`, checking after every step;
/// `Err` with the checker's report at the first violation.
fn run_ops(ops: &[Op], fault: Option<Fault>) -> Result<(), String> {
    run_paused(async {
        let store = MemoryStore::new();
        if let Some(fault) = fault {
            store.inject_fault(fault);
        }
        let checker = InvariantChecker::new();
        let mut incarnations = std::collections::HashMap::new();
        for op in ops {
            match *op {
                Op::Register(router) => {
                    if let Ok(incarnation) = store.register_router(router).await {
                        incarnations.insert(router, incarnation);
                    }
                }
                Op::Create {
                    session, router, ..
                } => {
                    if let Some(&incarnation) = incarnations.get(&router) {
                        let _ = store
                            .create(NewSession::new(session, router, incarnation))
                            .await;
                    }
                }
                Op::Fence(router) => {
                    let _ = store.fence(router).await;
                }
                Op::Close { session, reason } => {
                    let _ = store.close(session, reason).await;
                }
                _ => {}
            }
            let report = checker.check(&store).await;
            if !report.is_clean() {
                return Err(format!("after {op:?}: {report}"));
            }
        }
        Ok(())
    })
}

/// What a store does in a controller, minus deletions' last step: the
/// fault shows between the fence and the finish.
fn weights() -> OpWeights {
    OpWeights::none()
        .with(OpKind::Register, 2)
        .with(OpKind::Create, 6)
        .with(OpKind::Close, 2)
        .with(OpKind::Fence, 1)
}

fn find_counterexample(fault: Option<Fault>) -> Result<(), TestError<Vec<Op>>> {
    // A fixed seed: proptest shrinks a list by deleting elements first and
    // then shrinking them, so where it ends depends on the case it found
    // (of 3,000 seeds tried, 8 stopped at four or five steps).
    let config = Config {
        cases: 1_000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    runner.run(&ops(Space::new(3, 12), &weights(), 1..40), |ops| {
        run_ops(&ops, fault).map_err(proptest::test_runner::TestCaseError::fail)
    })
}

#[test]
fn a_store_that_skips_the_fence_is_caught_and_shrunk_to_three_steps() {
    // The same search on a correct store finds nothing.
    find_counterexample(None).expect("a correct store keeps the invariants");

    let Err(TestError::Fail(reason, shrunk)) = find_counterexample(Some(Fault::SkipFence)) else {
        panic!("the fault was not found");
    };
    eprintln!("shrunk counterexample: {shrunk:#?}\n{reason}");
    // The smallest sequence that shows it: a router, its fence, and a
    // session created after the fence.
    assert_eq!(shrunk.len(), 3, "{shrunk:?}");
    let (Op::Register(router), Op::Fence(fenced), Op::Create { router: on, .. }) =
        (&shrunk[0], &shrunk[1], &shrunk[2])
    else {
        panic!("unexpected counterexample {shrunk:?}");
    };
    assert!(router == fenced && fenced == on, "{shrunk:?}");
    let reason = reason.to_string();
    assert!(
        reason.contains("I2 fence") && reason.contains("after its fence"),
        "{reason}"
    );
}

#[test]
fn the_checker_names_each_kind_of_violation() {
    run_paused(async {
        let store = MemoryStore::new();
        let checker = InvariantChecker::new();
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        let mut sessions = Vec::new();
        for id in 1..=3 {
            let session = store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
            sessions.push(session);
        }
        checker.assert(&store).await;

        // I7: the index and the map disagree.
        store.corrupt(Corruption::Unindex(SessionId::new(1)));
        store.corrupt(Corruption::DropFromMap(SessionId::new(2)));
        let report = checker.check(&store).await;
        assert!(
            report.violations.contains(&Violation::NotIndexed {
                session: SessionId::new(1)
            }),
            "{report}"
        );
        assert!(
            report.violations.contains(&Violation::IndexedButMissing {
                router,
                session: SessionId::new(2)
            }),
            "{report}"
        );

        // I1: a session of a router whose incarnation is over.
        let _ = store.fence(router).await.unwrap();
        store.finish(router, incarnation).await.unwrap();
        let zombie = NewSession::new(SessionId::new(9), router, incarnation).into_session();
        store.corrupt(Corruption::Inject(zombie.clone()));
        checker.track(&zombie);
        let report = checker.check(&store).await;
        // Stored although its router's incarnation is deleted, and open:
        // both the injected one and the unindexed one, which `finish`
        // could not see.
        for id in [1, 9] {
            let session = SessionId::new(id);
            let zombie = report
                .of("I1")
                .any(|v| matches!(v, Violation::Zombie { session: s, .. } if *s == session));
            let open = report.of("I1").any(
                |v| matches!(v, Violation::OpenAfterDeletion { session: s, .. } if *s == session),
            );
            assert!(zombie && open, "{session}: {report}");
        }
        assert!(
            report
                .to_string()
                .contains("I1 zombie: session-9 of router-1 in incarnation-1 is stored"),
            "{report}"
        );
    });
}

/// A store of the user's own that lies: it wraps a `MemoryStore` and can
/// miscount a router's sessions or fail to list them.
#[derive(Default)]
struct Lying {
    inner: MemoryStore,
    miscount: AtomicBool,
    fail_listing: AtomicBool,
}

impl SessionStore for Lying {
    type Payload = ();

    async fn register_router(&self, router: RouterId) -> Result<Incarnation, RegisterError> {
        self.inner.register_router(router).await
    }
    async fn router_status(&self, router: RouterId) -> Result<RouterStatus, RouterError> {
        self.inner.router_status(router).await
    }
    async fn create(&self, spec: NewSession) -> Result<Session, CreateError<()>> {
        self.inner.create(spec).await
    }
    async fn get(&self, id: SessionId) -> Result<Option<Session>, BackendError> {
        self.inner.get(id).await
    }
    async fn close(
        &self,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close(id, reason).await
    }
    async fn close_exact(
        &self,
        key: SessionKey,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        self.inner.close_exact(key, reason).await
    }
    async fn remove(&self, id: SessionId) -> Result<Session, SessionError> {
        self.inner.remove(id).await
    }
    async fn remove_exact(&self, key: SessionKey) -> Result<Session, SessionError> {
        self.inner.remove_exact(key).await
    }
    async fn sessions(&self, router: RouterId) -> Result<Vec<Session>, RouterError> {
        if self.fail_listing.load(Ordering::SeqCst) {
            let down = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
            return Err(RouterError::Backend(BackendError::new(down)));
        }
        self.inner.sessions(router).await
    }
    async fn count(&self, router: RouterId) -> Result<usize, RouterError> {
        let count = self.inner.count(router).await?;
        Ok(count + usize::from(self.miscount.load(Ordering::SeqCst)))
    }
    async fn fence(&self, router: RouterId) -> Result<FenceSnapshot<()>, FenceError> {
        self.inner.fence(router).await
    }
    async fn fence_incarnation(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FenceSnapshot<()>, FenceError> {
        self.inner.fence_incarnation(router, incarnation).await
    }
    async fn finish(
        &self,
        router: RouterId,
        incarnation: Incarnation,
    ) -> Result<FinishReport, FinishError> {
        self.inner.finish(router, incarnation).await
    }
    async fn audit(&self) -> Result<AuditReport, BackendError> {
        self.inner.audit().await
    }
    async fn census(&self) -> Result<Vec<RouterCensus>, BackendError> {
        self.inner.census().await
    }
    async fn repair(&self, findings: &AuditReport) -> Result<Vec<Repair>, BackendError> {
        self.inner.repair(findings).await
    }
}

#[test]
fn a_store_of_your_own_that_miscounts_or_fails_is_reported() {
    run_paused(async {
        let store = Lying::default();
        let checker = InvariantChecker::new();
        let router = RouterId::new(1);
        let incarnation = store.register_router(router).await.unwrap();
        for id in 1..=2 {
            store
                .create(NewSession::new(SessionId::new(id), router, incarnation))
                .await
                .unwrap();
        }
        checker.assert(&store).await;

        store.miscount.store(true, Ordering::SeqCst);
        let report = checker.check(&store).await;
        assert_eq!(
            report.violations,
            vec![Violation::CountMismatch {
                router,
                count: 3,
                listed: 2
            }],
            "{report}"
        );
        store.miscount.store(false, Ordering::SeqCst);

        // A check that cannot look everywhere is not clean...
        let _ = store.fence(router).await.unwrap();
        store.fail_listing.store(true, Ordering::SeqCst);
        let report = checker.check(&store).await;
        assert!(
            matches!(
                &report.violations[..],
                [Violation::StoreFailed {
                    call: "sessions",
                    ..
                }]
            ),
            "{report}"
        );
        // ...and what it could not see does not become the fence's baseline:
        // the sessions created before the fence are not taken for late ones.
        store.fail_listing.store(false, Ordering::SeqCst);
        checker.assert(&store).await;
        store.inner.inject_fault(Fault::SkipFence);
        store
            .create(NewSession::new(SessionId::new(3), router, incarnation))
            .await
            .unwrap();
        let report = checker.check(&store).await;
        assert_eq!(
            report.violations,
            vec![Violation::CreatedAfterFence {
                session: SessionId::new(3),
                router,
                incarnation
            }],
            "{report}"
        );
    });
}
