//! Session operations: create (and its event), get, close, remove.

use dashmap::mapref::entry::Entry;

use super::index::unindex;
use super::store::MemoryStore;
use crate::events::{CloseHook, Event, send_unrecorded};
use crate::id::{SessionId, SessionKey};
use crate::session::{CloseOutcome, CloseReason, NewSession, Session};
use crate::store::error::{CreateError, CreateErrorKind, SessionError};

impl<P> MemoryStore<P> {
    #[inline]
    pub(super) fn create_now(&self, spec: NewSession<P>) -> Result<Session<P>, CreateError<P>> {
        let mut displaced = None;
        let created = self.insert_new(spec, &mut displaced);
        // After the guards: a handle the index held for an id the map had
        // lost may be its session's last, and its payload's `Drop` is user
        // code; so is the metrics recorder.
        drop(displaced);
        #[cfg(feature = "metrics")]
        if let Ok(session) = &created {
            crate::events::record(|| created_event(session));
        }
        created
    }

    /// The checks and inserts of `create`, under the router's lock; an index
    /// entry the new session displaced is handed out in `displaced`.
    #[inline]
    fn insert_new(
        &self,
        spec: NewSession<P>,
        displaced: &mut Option<Session<P>>,
    ) -> Result<Session<P>, CreateError<P>> {
        let router = spec.router();
        let Some(entry) = self.routers.get(&router) else {
            return Err(CreateError::new(
                CreateErrorKind::UnknownRouter(router),
                spec,
            ));
        };
        let mut slot = entry.lock();
        let admitted = slot.admits(router, spec.incarnation());
        #[cfg(any(test, feature = "test-util"))]
        let admitted =
            admitted.or_else(|kind| self.skip_fence(slot.status, spec.incarnation(), kind));
        if let Err(kind) = admitted {
            return Err(CreateError::new(kind, spec));
        }
        match self.sessions.entry(spec.id()) {
            Entry::Occupied(_) => {
                let kind = CreateErrorKind::DuplicateSession(spec.id());
                Err(CreateError::new(kind, spec))
            }
            Entry::Vacant(vacant) => {
                let session = spec.into_session();
                self.announce(&session);
                *displaced = slot.index_mut().insert(session.id(), session.clone());
                // Only a fenced router keeps departed entries, and it admits
                // no create but through the test fault.
                #[cfg(any(test, feature = "test-util"))]
                if displaced.is_some() && slot.keeps_departed() {
                    // The map held no session of this id: the entry it
                    // displaced had departed (reachable only when a fenced
                    // router admits a create, `Fault::SkipFence`).
                    slot.departed = slot.departed.saturating_sub(1);
                }
                vacant.insert(session.clone());
                Ok(session)
            }
        }
    }

    #[inline]
    pub(super) fn get_now(&self, id: SessionId) -> Option<Session<P>> {
        self.sessions.get(&id).map(|session| session.clone())
    }

    /// Removes `session` from the map and its router's index if the map
    /// still holds this very session; `true` if it did.
    #[inline]
    fn unlink(&self, session: &Session<P>) -> bool {
        let Some(entry) = self.routers.get(&session.router()) else {
            return false;
        };
        let mut slot = entry.lock();
        // Checking the map under the router lock keeps a reused id safe: only
        // this session's own entry is removed, from both places at once.
        let unmapped = self
            .sessions
            .remove_if(&session.id(), |_, stored| Session::ptr_eq(stored, session));
        let unindexed = match unmapped {
            // A fenced router's `finish` drops its whole index: the entry
            // stays until then (see `RouterSlot::index`).
            Some(_) if slot.keeps_departed() => {
                slot.departed += 1;
                None
            }
            Some(_) => unindex(slot.index_mut(), session),
            None => None,
        };
        drop(slot);
        drop(entry);
        // What was removed drops after the guards: see `# Deadlock safety`.
        let removed = unmapped.is_some();
        drop((unmapped, unindexed));
        removed
    }

    /// The session with this key, if the map holds that very life of the id.
    #[inline]
    pub(super) fn get_exact(&self, key: SessionKey) -> Option<Session<P>> {
        self.sessions
            .get(&key.id())
            .filter(|session| session.value().key() == key)
            .map(|session| session.clone())
    }

    /// Closes `session` (outside every lock: closing runs its resources)
    /// and unlinks this very session.
    #[inline]
    pub(super) fn close_held(
        &self,
        session: Option<Session<P>>,
        id: SessionId,
        reason: CloseReason,
    ) -> Result<CloseOutcome, SessionError> {
        let session = session.ok_or(SessionError::UnknownSession(id))?;
        let outcome = session.close(reason);
        self.unlink(&session);
        Ok(outcome)
    }

    /// Closes `session` with `Reclaimed` if open, and unlinks it; the
    /// session if this call unlinked it.
    #[inline]
    pub(super) fn remove_held(
        &self,
        session: Option<Session<P>>,
        id: SessionId,
    ) -> Result<Session<P>, SessionError> {
        let session = session.ok_or(SessionError::UnknownSession(id))?;
        // Close before unlinking, so no session is ever out of the store and
        // still open; losing the close to another caller is fine.
        let _ = session.close(CloseReason::Reclaimed);
        if self.unlink(&session) {
            Ok(session)
        } else {
            Err(SessionError::UnknownSession(id))
        }
    }

    /// Publishes the creation of `session`, before anybody else can see it,
    /// and hooks its close to the event bus. The caller records the event
    /// in the metrics once its guards are released.
    fn announce(&self, session: &Session<P>) {
        let (id, router, incarnation) = (session.id(), session.router(), session.incarnation());
        send_unrecorded(self.events.as_ref(), || created_event(session));
        if let Some(bus) = &self.events {
            let hook = CloseHook {
                bus: bus.clone(),
                session: id,
                router,
                incarnation,
            };
            // A new session is open: the attach cannot be refused.
            let _ = session.attach(hook);
        }
    }
}

fn created_event<P>(session: &Session<P>) -> Event {
    Event::SessionCreated {
        session: session.id(),
        router: session.router(),
        incarnation: session.incarnation(),
    }
}
