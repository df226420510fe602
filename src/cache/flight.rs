//! Single flight: at most one upstream call per cache key, however many callers want it.
//!
//! moka's `get_with`/`try_get_with` also collapse concurrent fills, but they run the fill inside
//! the first caller's future and drop it when that caller disconnects, so the fetch is lost and
//! the others start over. Here the fetch runs in its own spawned task: it completes, and fills
//! the cache, whatever happens to the callers. Waiters hold a `watch` receiver and are woken by
//! the result itself (no polling); each bounds its own wait by its request deadline.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// Whether this caller started the flight or joined one already under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Waiter,
}

/// The flights in progress, by key.
pub struct Flights<K, V> {
    in_flight: Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Self {
            in_flight: Arc::default(),
        }
    }
}

/// A joined flight: await [`Flight::result`] for the shared outcome.
pub struct Flight<V> {
    pub role: Role,
    receiver: watch::Receiver<Option<V>>,
}

impl<V: Clone> Flight<V> {
    /// The flight's result, or `None` if the fetch task died without one (runtime shutdown).
    pub async fn result(mut self) -> Option<V> {
        match self.receiver.wait_for(Option::is_some).await {
            Ok(value) => value.clone(),
            Err(_) => None,
        }
    }
}

impl<K, V> Flights<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Joins the flight for `key`, or starts one by spawning `fetch()`.
    ///
    /// `fetch` is only called (and its future only spawned) by the leader. The key leaves the
    /// in-flight map before the result is published, and `fetch` stores its result in the cache
    /// before it returns, so a request arriving at any moment either finds the flight or the
    /// stored entry.
    pub fn join<F, Fut>(&self, key: &K, fetch: F) -> Flight<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(receiver) = in_flight.get(key) {
            return Flight {
                role: Role::Waiter,
                receiver: receiver.clone(),
            };
        }
        let (sender, receiver) = watch::channel(None);
        in_flight.insert(key.clone(), receiver.clone());
        drop(in_flight);

        let landing = Landing {
            key: Some(key.clone()),
            in_flight: Arc::clone(&self.in_flight),
        };
        let future = fetch();
        tokio::spawn(async move {
            let value = future.await;
            drop(landing);
            // No receiver left is fine: the result is in the cache.
            let _ = sender.send(Some(value));
        });
        Flight {
            role: Role::Leader,
            receiver,
        }
    }

    /// How many flights are under way (tests use it to see that flights land).
    pub fn len(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes the flight from the map when the fetch task ends, also if it panics or is aborted.
struct Landing<K: Eq + Hash, V> {
    key: Option<K>,
    in_flight: Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>,
}

impl<K: Eq + Hash, V> Drop for Landing<K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn one_fetch_for_many_callers() {
        let flights: Flights<&str, u32> = Flights::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, released) = oneshot::channel::<()>();
        let mut released = Some(released);
        let mut joined = Vec::new();
        for _ in 0..100 {
            let calls = Arc::clone(&calls);
            let released = released.take();
            joined.push(flights.join(&"k", move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if let Some(released) = released {
                    let _ = released.await;
                }
                7
            }));
        }
        assert_eq!(flights.len(), 1);
        assert_eq!(joined[0].role, Role::Leader);
        assert!(joined[1..].iter().all(|f| f.role == Role::Waiter));
        release.send(()).unwrap();
        for flight in joined {
            assert_eq!(flight.result().await, Some(7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn fetch_survives_the_leader_going_away() {
        let flights: Flights<&str, u32> = Flights::default();
        let (done_tx, done_rx) = oneshot::channel();
        let leader = flights.join(&"k", || async move {
            tokio::task::yield_now().await;
            let _ = done_tx.send(());
            1
        });
        drop(leader);
        done_rx.await.unwrap();
    }

    #[tokio::test]
    async fn a_new_flight_starts_after_one_lands() {
        let flights: Flights<&str, u32> = Flights::default();
        assert_eq!(flights.join(&"k", || async { 1 }).result().await, Some(1));
        let second = flights.join(&"k", || async { 2 });
        assert_eq!(second.role, Role::Leader);
        assert_eq!(second.result().await, Some(2));
    }
}
