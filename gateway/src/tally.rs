//! Bounded records of events that anyone can repeat at will: failed handshakes (anyone on the
//! network can fail one), handshakes refused over the per-source limit, and Lists. The first
//! event of a key in a window is recorded at once; the rest of that window are only counted,
//! and the count becomes one record when the window ends. A flood thus costs the audit trail
//! and the log at most two records per key and window, however fast it comes.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys tracked at once. Beyond it, events of new keys are counted together (the second value
/// [`Tally::ended`] returns) rather than each given an entry: memory stays bounded even when the
/// keys come from an attacker.
pub const MAX_KEYS: usize = 65_536;

/// Counts of repeated events per key in windows of a fixed length.
#[derive(Debug)]
pub struct Tally<K, V> {
    window: Duration,
    state: Mutex<State<K, V>>,
}

#[derive(Debug)]
struct State<K, V> {
    entries: HashMap<K, Entry<V>>,
    overflow: u64,
}

#[derive(Debug)]
struct Entry<V> {
    started: Instant,
    first: V,
    more: u64,
}

/// Events of a key that were counted, not recorded one by one, in a window that has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted<K, V> {
    /// The key.
    pub key: K,
    /// What the window's first (recorded) event carried.
    pub first: V,
    /// How many more there were in the window.
    pub more: u64,
}

/// What to do with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<K, V> {
    /// The first of its key's window: record it. A window of the same key that had ended with
    /// counted events is handed back, to be recorded first.
    Record(Option<Counted<K, V>>),
    /// Counted in its key's window, not recorded now.
    Counted,
}

impl<K: Hash + Eq + Clone, V: Clone> Tally<K, V> {
    /// A tally with windows of `window`.
    pub fn new(window: Duration) -> Self {
        Tally {
            window,
            state: Mutex::new(State {
                entries: HashMap::new(),
                overflow: 0,
            }),
        }
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K, V>> {
        // The map stays consistent if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one event of `key`, carrying `first` in case it is the window's first.
    pub fn event(&self, key: &K, first: V) -> Verdict<K, V> {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(entry) = state.entries.get_mut(key) {
            if now.duration_since(entry.started) < self.window {
                entry.more = entry.more.saturating_add(1);
                return Verdict::Counted;
            }
            let ended = std::mem::replace(
                entry,
                Entry {
                    started: now,
                    first,
                    more: 0,
                },
            );
            return Verdict::Record((ended.more > 0).then(|| Counted {
                key: key.clone(),
                first: ended.first,
                more: ended.more,
            }));
        }
        if state.entries.len() >= MAX_KEYS {
            state.overflow = state.overflow.saturating_add(1);
            return Verdict::Counted;
        }
        state.entries.insert(
            key.clone(),
            Entry {
                started: now,
                first,
                more: 0,
            },
        );
        Verdict::Record(None)
    }

    /// Removes the windows that have ended; returns those with counted events, and the events
    /// of keys beyond [`MAX_KEYS`] since the last call.
    pub fn ended(&self) -> (Vec<Counted<K, V>>, u64) {
        let now = Instant::now();
        let mut state = self.lock();
        let mut ended = Vec::new();
        state.entries.retain(|key, entry| {
            if now.duration_since(entry.started) < self.window {
                return true;
            }
            if entry.more > 0 {
                ended.push(Counted {
                    key: key.clone(),
                    first: entry.first.clone(),
                    more: entry.more,
                });
            }
            false
        });
        let overflow = std::mem::take(&mut state.overflow);
        (ended, overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_key_and_window_then_one_count() {
        let tally: Tally<&str, u32> = Tally::new(Duration::from_millis(50));
        assert_eq!(tally.event(&"a", 1), Verdict::Record(None));
        assert_eq!(tally.event(&"b", 7), Verdict::Record(None));
        for n in 2..100 {
            assert_eq!(tally.event(&"a", n), Verdict::Counted);
        }
        assert_eq!(tally.ended(), (Vec::new(), 0), "no window has ended yet");
        std::thread::sleep(Duration::from_millis(60));
        let (ended, overflow) = tally.ended();
        assert_eq!(
            ended,
            vec![Counted {
                key: "a",
                first: 1,
                more: 98
            }]
        );
        assert_eq!(overflow, 0);
        assert_eq!(tally.ended(), (Vec::new(), 0), "a count is handed out once");
        // A new window, ended by the next event of its key rather than by `ended`.
        assert_eq!(tally.event(&"a", 200), Verdict::Record(None));
        assert_eq!(tally.event(&"a", 201), Verdict::Counted);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            tally.event(&"a", 300),
            Verdict::Record(Some(Counted {
                key: "a",
                first: 200,
                more: 1
            }))
        );
    }

    #[test]
    fn keys_beyond_the_bound_are_counted_together() {
        let tally: Tally<usize, ()> = Tally::new(Duration::from_secs(60));
        for key in 0..MAX_KEYS {
            assert_eq!(tally.event(&key, ()), Verdict::Record(None));
        }
        assert_eq!(tally.event(&MAX_KEYS, ()), Verdict::Counted);
        assert_eq!(tally.event(&(MAX_KEYS + 1), ()), Verdict::Counted);
        assert_eq!(tally.ended(), (Vec::new(), 2));
    }
}
