//! A deletion is traced: one `delete_router` span holding a span per phase,
//! and a warn-level event when sessions are forced.

use std::sync::Arc;

use parking_lot::Mutex;
use session_lifecycle::test_util::{
    HOUR, Notify, ObservedRouter, ScriptedNotifier, paused_runtime, within,
};
use session_lifecycle::{MemoryStore, RouterDeleter, RouterId};
use tokio::time::Duration;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// What the layer saw: span names with their parent's name, and events.
#[derive(Default)]
struct Seen {
    spans: Vec<(&'static str, Option<&'static str>)>,
    events: Vec<(Level, String, Option<&'static str>)>,
}

struct Recorder(Arc<Mutex<Seen>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let parent = ctx
            .span(id)
            .and_then(|span| span.parent())
            .map(|parent| parent.name());
        self.0.lock().spans.push((attrs.metadata().name(), parent));
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        struct Message(String);
        impl Visit for Message {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let scope = ctx.event_span(event).map(|span| span.name());
        self.0
            .lock()
            .events
            .push((*event.metadata().level(), message.0, scope));
    }
}

#[test]
fn the_run_and_each_phase_have_spans_and_forcing_warns() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let subscriber = tracing_subscriber::registry().with(Recorder(Arc::clone(&seen)));
    let _default = tracing::subscriber::set_default(subscriber);
    let runtime = paused_runtime();
    runtime.block_on(async {
        let store = Arc::new(MemoryStore::new());
        let router = RouterId::new(5);
        let observed = ObservedRouter::fill(&*store, router, 0, 4).await;
        let deleter = RouterDeleter::builder()
            .confirm_timeout(Duration::from_secs(1))
            .retries(1)
            .build(
                Arc::clone(&store),
                ScriptedNotifier::always(Arc::clone(&store), Notify::Never),
            )
            .expect("valid settings");
        let outcome = within(HOUR, deleter.delete(router)).await.unwrap();
        assert_eq!(outcome.report().unwrap().forced, 4);
        observed.assert_deleted(&*store).await;
    });

    let seen = seen.lock();
    assert!(
        seen.spans.contains(&("delete_router", None)),
        "{:?}",
        seen.spans
    );
    for phase in ["fence", "mark", "notify_and_wait", "force_close", "finish"] {
        assert!(
            seen.spans.contains(&(phase, Some("delete_router"))),
            "no {phase} span inside delete_router: {:?}",
            seen.spans
        );
    }
    assert!(
        seen.events
            .iter()
            .any(|(level, message, scope)| *level == Level::WARN
                && message.contains("force-closed")
                && *scope == Some("force_close")),
        "no warn event for the forced closes: {:?}",
        seen.events
    );
}
