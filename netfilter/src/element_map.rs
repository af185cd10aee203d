//! A map keyed by kernel element for a million entries, which grows without stopping.
//!
//! An `IndexMap` keeps its entries side by side and hashes only their positions, the least
//! memory a million elements take; but it grows by doubling, and its growth copies every entry
//! and rehashes every position, reading each entry's hash from wherever it lies. With a million
//! elements that took hundreds of milliseconds, with the map's lock held (the gateway's holders
//! of each element) or in the kernel batcher's thread (its desired elements): every grant
//! waited meanwhile. Here the entries are spread over [`SHARDS`] maps by their hash, and each
//! grows alone.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use indexmap::IndexMap;
use indexmap::map::raw_entry_v1::{RawEntryApiV1, RawEntryMut};

use crate::Element;

/// How many maps the entries are spread over: with a million entries, each holds about 4,000,
/// and grows in well under a millisecond.
const SHARDS: usize = 256;

/// Elements and a value of each, in no particular order.
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr};
/// use fwnp_netfilter::{Element, ElementMap, PortRange, Protocol};
///
/// let element = Element {
///     host: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
///     protocol: Protocol::Tcp,
///     ports: PortRange::single(443),
///     remote: None,
/// };
/// let mut expiries = ElementMap::new();
/// expiries.insert(element.clone(), 60_000u64);
/// *expiries.get_or_default(&element) += 1;
/// assert_eq!(expiries.get(&element), Some(&60_001));
/// assert_eq!(expiries.remove(&element), Some(60_001));
/// assert!(expiries.is_empty());
/// ```
#[derive(Debug)]
pub struct ElementMap<V> {
    /// The maps. Each is given the element's hash, made once by `hasher`: their own hasher is
    /// never asked (it would not know the key).
    shards: Vec<IndexMap<Element, V, BuildHasherDefault<Unused>>>,
    hasher: RandomState,
}

/// The hasher the maps are built with and never call: every key reaches them with its hash.
#[derive(Debug, Default)]
struct Unused;

impl Hasher for Unused {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, _: &[u8]) {}
}

impl<V> Default for ElementMap<V> {
    fn default() -> Self {
        ElementMap {
            shards: std::iter::repeat_with(IndexMap::default)
                .take(SHARDS)
                .collect(),
            hasher: RandomState::new(),
        }
    }
}

impl<V> ElementMap<V> {
    /// An empty map.
    pub fn new() -> Self {
        ElementMap::default()
    }

    /// How many elements the map holds.
    pub fn len(&self) -> usize {
        self.shards.iter().map(IndexMap::len).sum()
    }

    /// Whether the map holds no element.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(IndexMap::is_empty)
    }

    /// The element's hash, and the map it lies in. The map picks a slot by the hash's low bits
    /// and tells entries apart by its top seven: the shard is picked by bits between, so that
    /// the entries of one map do not share either.
    fn locate(&self, element: &Element) -> (u64, usize) {
        let hash = self.hasher.hash_one(element);
        (hash, (hash >> 32) as usize % SHARDS)
    }

    /// The value of `element`.
    pub fn get(&self, element: &Element) -> Option<&V> {
        let (hash, shard) = self.locate(element);
        self.shards
            .get(shard)?
            .raw_entry_v1()
            .from_key_hashed_nocheck(hash, element)
            .map(|(_, value)| value)
    }

    /// Sets the value of `element`; returns the one it replaced.
    pub fn insert(&mut self, element: Element, value: V) -> Option<V> {
        let (hash, shard) = self.locate(&element);
        let map = self.shards.get_mut(shard)?;
        match map
            .raw_entry_mut_v1()
            .from_key_hashed_nocheck(hash, &element)
        {
            RawEntryMut::Occupied(mut held) => Some(held.insert(value)),
            RawEntryMut::Vacant(vacant) => {
                vacant.insert_hashed_nocheck(hash, element, value);
                None
            }
        }
    }

    /// The value of `element`, made with `V::default()` if the map had none.
    pub fn get_or_default(&mut self, element: &Element) -> &mut V
    where
        V: Default,
    {
        let (hash, shard) = self.locate(element);
        match self.shards[shard]
            .raw_entry_mut_v1()
            .from_key_hashed_nocheck(hash, element)
        {
            RawEntryMut::Occupied(held) => held.into_mut(),
            RawEntryMut::Vacant(vacant) => {
                vacant
                    .insert_hashed_nocheck(hash, element.clone(), V::default())
                    .1
            }
        }
    }

    /// Removes `element`; returns its value.
    pub fn remove(&mut self, element: &Element) -> Option<V> {
        let (hash, shard) = self.locate(element);
        let map = self.shards.get_mut(shard)?;
        match map
            .raw_entry_mut_v1()
            .from_key_hashed_nocheck(hash, element)
        {
            RawEntryMut::Occupied(held) => Some(held.swap_remove()),
            RawEntryMut::Vacant(_) => None,
        }
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&Element, &mut V) -> bool) {
        for map in &mut self.shards {
            map.retain(|element, value| keep(element, value));
        }
    }

    /// Removes every entry, keeping the room they took.
    pub fn clear(&mut self) {
        self.shards.iter_mut().for_each(IndexMap::clear);
    }

    /// Makes room for `additional` more entries at once, spread evenly over the maps. A map's
    /// room is a power of two, usually well beyond its share; one that gets more than its room
    /// grows alone.
    pub fn reserve(&mut self, additional: usize) {
        let each = additional.div_ceil(SHARDS);
        for map in &mut self.shards {
            map.reserve(each);
        }
    }

    /// Gives back the room that entries do not use.
    pub fn shrink_to_fit(&mut self) {
        self.shards.iter_mut().for_each(IndexMap::shrink_to_fit);
    }

    /// The entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Element, &V)> {
        self.shards.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;
    use crate::{PortRange, Protocol};

    fn element(n: u32) -> Element {
        Element {
            host: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, (n % 7) as u16)),
            protocol: Protocol::Udp,
            ports: PortRange::single(1 + (n / 7) as u16),
            remote: None,
        }
    }

    /// Inserts, replacements, removals and a retain agree with a `HashMap` doing the same.
    #[test]
    fn the_map_holds_what_a_hash_map_holds() {
        let mut map = ElementMap::new();
        let mut model = HashMap::new();
        // Small enough that the allocation counts of this crate's memory tests, which run
        // beside it, are not disturbed (a million-entry count rose by 12 % with 9,000 keys).
        for n in 0..5_000u32 {
            let key = element(n % 2_000);
            match n % 5 {
                0..=2 => assert_eq!(map.insert(key.clone(), n), model.insert(key, n)),
                3 => assert_eq!(map.remove(&key), model.remove(&key)),
                _ => {
                    *map.get_or_default(&key) += 1;
                    *model.entry(key).or_default() += 1;
                }
            }
            assert_eq!(map.len(), model.len());
        }
        map.retain(|_, value| *value % 2 == 0);
        model.retain(|_, value| *value % 2 == 0);
        assert_eq!(map.len(), model.len());
        let held: HashMap<Element, u32> = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
        assert_eq!(held, model);
        for key in model.keys() {
            assert_eq!(map.get(key), model.get(key));
        }
        assert!(map.shards.iter().filter(|shard| !shard.is_empty()).count() > SHARDS / 2);
        map.clear();
        assert!(map.is_empty());
        assert_eq!(map.iter().count(), 0);
        assert_eq!(map.get(&element(1)), None);
    }
}
