//! A mutex that publishes a fingerprint of what it guards: every guard that was used mutably
//! stores the value's fingerprint in an atomic before it unlocks, so a reader can tell, with
//! one atomic load and without the lock, whether what the fingerprint covers has changed since
//! it last looked. The poll gate ([`super::poll_gate`]) answers a waiting client from these
//! fingerprints instead of taking the federation lock.
//!
//! A fingerprint that changes also wakes whoever waits on the [`Notify`] the value was built
//! with (a held poll, [`super::poll_gate`]): it learns of the change at once instead of at its
//! next poll.
//!
//! The fingerprint is stored while the lock is still held (the guard's `Drop` stores it, then
//! unlocks, then wakes the waiters), so a reader that holds the lock always sees the fingerprint of the
//! value it reads, and a reader without the lock sees the fingerprint of a state that was
//! released (never one half-way through a change).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LockResult, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// What a [`Watched`] value publishes: a number that changes whenever anything a lock-free
/// reader relies on changes (it may also change when nothing it relies on did).
pub(crate) trait Fingerprint {
    /// The value's fingerprint now.
    fn fingerprint(&self) -> u64;
}

/// A [`Mutex`] whose value's [`Fingerprint`] can be read without locking.
pub(crate) struct Watched<T: Fingerprint> {
    inner: Mutex<T>,
    print: AtomicU64,
    changed: Arc<Notify>,
}

impl<T: Fingerprint> Watched<T> {
    /// Guards `value` and publishes its fingerprint; every change of the fingerprint wakes the
    /// waiters of `changed` ([`Notify::notify_waiters`]).
    pub(crate) fn new(value: T, changed: Arc<Notify>) -> Self {
        let print = AtomicU64::new(value.fingerprint());
        Self {
            inner: Mutex::new(value),
            print,
            changed,
        }
    }

    /// Locks, like [`Mutex::lock`]; a mutable use of the guard republishes the fingerprint
    /// when the guard is dropped.
    pub(crate) fn lock(&self) -> LockResult<WatchedGuard<'_, T>> {
        match self.inner.lock() {
            Ok(g) => Ok(self.guard(g)),
            Err(p) => Err(PoisonError::new(self.guard(p.into_inner()))),
        }
    }

    /// Locks if no one holds the lock now (`None` otherwise, or when it is poisoned).
    #[cfg(test)]
    pub(crate) fn try_lock(&self) -> Option<WatchedGuard<'_, T>> {
        Some(self.guard(self.inner.try_lock().ok()?))
    }

    fn guard<'a>(&'a self, guard: MutexGuard<'a, T>) -> WatchedGuard<'a, T> {
        WatchedGuard {
            guard: Some(guard),
            print: &self.print,
            changed: &self.changed,
            touched: false,
        }
    }

    /// The fingerprint of the value as last released (no lock taken).
    pub(crate) fn fingerprint(&self) -> u64 {
        self.print.load(Ordering::Acquire)
    }
}

/// The guard of a [`Watched`] lock.
pub(crate) struct WatchedGuard<'a, T: Fingerprint> {
    /// Always `Some` until the guard is dropped (unlocked before the waiters are woken).
    guard: Option<MutexGuard<'a, T>>,
    print: &'a AtomicU64,
    changed: &'a Notify,
    touched: bool,
}

impl<T: Fingerprint> Deref for WatchedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl<T: Fingerprint> DerefMut for WatchedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.touched = true;
        self.guard.as_mut().expect("held until dropped")
    }
}

impl<T: Fingerprint> Drop for WatchedGuard<'_, T> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        if !self.touched {
            return;
        }
        // stored under the lock, then unlocked, then the waiters woken: they read the new
        // fingerprint and do not wake into a lock still held
        let print = guard.fingerprint();
        let moved = self.print.swap(print, Ordering::AcqRel) != print;
        drop(guard);
        if moved {
            self.changed.notify_waiters();
        }
    }
}

/// A fingerprint of any hashable value (std's SipHash with fixed keys): not a cryptographic
/// hash, only a number that changes when the value does, up to collisions (about 2⁻⁶⁴ for one
/// change between two looks).
pub(crate) fn print_of<H: std::hash::Hash>(value: &H) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter(u64, u64);
    impl Fingerprint for Counter {
        fn fingerprint(&self) -> u64 {
            // only the first field counts
            self.0
        }
    }

    #[test]
    fn a_mutable_guard_republishes_and_a_shared_one_does_not() {
        let w = Watched::new(Counter(1, 0), Arc::new(Notify::new()));
        assert_eq!(w.fingerprint(), 1);
        {
            let mut g = w.lock().unwrap();
            g.0 = 2;
            // not published before the guard is released
            assert_eq!(w.fingerprint(), 1);
        }
        assert_eq!(w.fingerprint(), 2);
        // a change the fingerprint does not cover leaves it as it was
        w.lock().unwrap().1 = 7;
        assert_eq!(w.fingerprint(), 2);
        // read-only use never stores (the value changed behind its back would not show: this
        // asserts reads take the shared path)
        let g = w.lock().unwrap();
        assert_eq!(g.0, 2);
        drop(g);
        assert_eq!(w.fingerprint(), 2);
    }

    #[test]
    fn a_changed_fingerprint_wakes_its_waiters_and_an_unchanged_one_does_not() {
        let changed = Arc::new(Notify::new());
        let w = Watched::new(Counter(1, 0), changed.clone());
        let n = changed.notified();
        let mut n = std::pin::pin!(n);
        n.as_mut().enable();
        w.lock().unwrap().1 = 9;
        assert!(
            !poll_once(n.as_mut()),
            "a change the fingerprint does not cover"
        );
        w.lock().unwrap().0 = 2;
        assert!(poll_once(n.as_mut()), "the fingerprint changed");
        let n = changed.notified();
        let mut n = std::pin::pin!(n);
        n.as_mut().enable();
        w.lock().unwrap().0 = 2;
        assert!(!poll_once(n.as_mut()), "written, but to the value it had");
    }

    /// Whether `f` is ready at its first poll.
    fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
            .is_ready()
    }

    #[test]
    fn prints_tell_orders_and_values_apart() {
        assert_ne!(print_of(&(1u64, 2u64)), print_of(&(2u64, 1u64)));
        assert_eq!(print_of(&(5u64, 6u64)), print_of(&(5u64, 6u64)));
    }
}
