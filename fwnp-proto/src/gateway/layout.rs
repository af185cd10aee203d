//! Where the book keeps its leases and how it finds one by id, laid out so that a growing book
//! never stops to move or rehash all of it at once.
//!
//! A book in one vector with one hash index by id grew by doubling both: a copy of every lease,
//! and a rehash that read every lease's id again, each a cache miss. With the book's lock held,
//! every request waited meanwhile: 210 ms at 917,505 leases and 409 ms at 1,835,009 (the book's
//! growth benchmark, `benches/book_growth.rs`). Here the leases lie in chunks of fixed size that
//! are never moved, and the id index is split in [`ID_SHARDS`] tables whose entries carry their
//! hash, so that a table grows alone and without reading a lease.

use hashbrown::HashTable;

use super::Lease;

/// LeaseChunks per chunk: 4,096 leases of 88 bytes, 352 KiB a chunk.
const CHUNK: usize = 4096;

/// The leases, by position: position `at` is lease `at % CHUNK` of chunk `at / CHUNK`. Every
/// chunk but the last is full; a removal moves the last lease into the hole, so that there is
/// none. One empty chunk is kept past the last lease, so that a book that grows and shrinks
/// across a chunk's edge does not allocate and free a chunk each time.
#[derive(Debug, Default)]
pub(super) struct LeaseChunks {
    chunks: Vec<Vec<Lease>>,
    len: usize,
}

impl LeaseChunks {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lease records' room, in leases (for the book's memory test).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.chunks.iter().map(Vec::capacity).sum()
    }

    pub(super) fn get(&self, at: usize) -> Option<&Lease> {
        self.chunks.get(at / CHUNK)?.get(at % CHUNK)
    }

    pub(super) fn get_mut(&mut self, at: usize) -> Option<&mut Lease> {
        self.chunks.get_mut(at / CHUNK)?.get_mut(at % CHUNK)
    }

    /// Adds a lease at position `len()`.
    pub(super) fn push(&mut self, lease: Lease) {
        let chunk = self.len / CHUNK;
        if chunk == self.chunks.len() {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        if let Some(leases) = self.chunks.get_mut(chunk) {
            leases.push(lease);
            self.len += 1;
        }
    }

    /// Removes the lease at `at`, moving the last lease into its place.
    pub(super) fn swap_remove(&mut self, at: usize) -> Option<Lease> {
        if at >= self.len {
            return None;
        }
        let last = self.chunks.get_mut((self.len - 1) / CHUNK)?.pop()?;
        self.len -= 1;
        // One empty chunk stays past the last lease; one more is freed.
        if self.chunks.len() > self.len.div_ceil(CHUNK) + 1 {
            self.chunks.pop();
        }
        if at == self.len {
            return Some(last);
        }
        self.get_mut(at).map(|hole| std::mem::replace(hole, last))
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.chunks.iter().flatten()
    }
}

/// Tables of the id index. A table grows alone when it fills: at a million leases, a table of
/// about 4,000 entries of 8 bytes is copied, where one table of them all copied a million
/// (and read a million leases). With 64 tables, the slowest Open of the growth benchmark took
/// 0.9 to 1.2 ms; with 256, 0.5 to 0.65 ms, which is also how long a host's index of 7,000
/// leases takes to grow.
pub(super) const ID_SHARDS: usize = 256;

/// A lease's entry in the id index: its position, and 32 bits of its id's hash, by which its
/// table places it, so that a table growing places its entries again without reading a lease
/// (and a lookup reads only the lease whose hash matches).
#[derive(Debug, Clone, Copy)]
struct IdEntry {
    at: u32,
    hash: u32,
}

/// An id's place in the index: its table, and the hash its entry carries.
#[derive(Debug, Clone, Copy)]
pub(super) struct IdHash {
    shard: usize,
    hash: u32,
}

impl IdHash {
    /// Splits a 64-bit hash of an id: the top bits pick the table, the low 32 bits are the
    /// entry's own (disjoint, so that the entries of one table do not share hash bits).
    pub(super) fn of(hash: u64) -> Self {
        IdHash {
            shard: (hash >> (64 - ID_SHARDS.trailing_zeros())) as usize,
            hash: hash as u32,
        }
    }

    /// The hash the table is given: a table picks a slot by the low bits and tells entries
    /// apart by the top seven, so both halves carry all 32 bits.
    fn table_hash(hash: u32) -> u64 {
        (u64::from(hash) << 32) | u64::from(hash)
    }
}

/// The leases' positions, found by id.
#[derive(Debug)]
pub(super) struct IdIndex {
    shards: Vec<HashTable<IdEntry>>,
}

impl Default for IdIndex {
    fn default() -> Self {
        IdIndex {
            shards: std::iter::repeat_with(HashTable::new)
                .take(ID_SHARDS)
                .collect(),
        }
    }
}

impl IdIndex {
    /// Makes room for `additional` more entries at once, spread evenly over the tables. A
    /// table's room is a power of two, usually well beyond its share; one that gets more than
    /// its room grows alone. (A margin for an uneven spread made many tables twice as large.)
    pub(super) fn reserve(&mut self, additional: usize) {
        let each = additional.div_ceil(ID_SHARDS);
        for shard in &mut self.shards {
            shard.reserve(each, |entry| IdHash::table_hash(entry.hash));
        }
    }

    /// The position of the entry of `id`, whose lease `is_it` recognizes.
    pub(super) fn find(&self, id: IdHash, is_it: impl Fn(usize) -> bool) -> Option<usize> {
        self.shards
            .get(id.shard)?
            .find(IdHash::table_hash(id.hash), |entry| {
                entry.hash == id.hash && is_it(entry.at as usize)
            })
            .map(|entry| entry.at as usize)
    }

    /// Adds the entry of a lease whose id is not in the index.
    pub(super) fn insert(&mut self, id: IdHash, at: u32) {
        if let Some(shard) = self.shards.get_mut(id.shard) {
            shard.insert_unique(
                IdHash::table_hash(id.hash),
                IdEntry { at, hash: id.hash },
                |entry| IdHash::table_hash(entry.hash),
            );
        }
    }

    /// Removes the entry of the lease at `at`.
    pub(super) fn remove(&mut self, id: IdHash, at: u32) {
        if let Some(Ok(entry)) = self
            .shards
            .get_mut(id.shard)
            .map(|shard| shard.find_entry(IdHash::table_hash(id.hash), |entry| entry.at == at))
        {
            entry.remove();
        }
    }

    /// Points the entry of the lease at `from` to `to`.
    pub(super) fn moved(&mut self, id: IdHash, from: u32, to: u32) {
        if let Some(entry) = self
            .shards
            .get_mut(id.shard)
            .and_then(|shard| shard.find_mut(IdHash::table_hash(id.hash), |entry| entry.at == from))
        {
            entry.at = to;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::LeaseId;

    fn lease(n: usize) -> Lease {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(n as u64).to_be_bytes());
        Lease {
            id: LeaseId(id),
            host: Arc::from("fwnp://host/a"),
            grants: Vec::new(),
            lifetime: 60,
            created_ms: 0,
            expires_ms: n as u64,
            app: None,
        }
    }

    fn expiries(leases: &LeaseChunks) -> Vec<u64> {
        leases.iter().map(|lease| lease.expires_ms).collect()
    }

    /// Removals across chunks' edges move the last lease into the hole, as a vector's
    /// `swap_remove` does, and free chunks left empty but one.
    #[test]
    fn leases_in_chunks_are_removed_as_from_one_vector() {
        let mut leases = LeaseChunks::default();
        let mut model = Vec::new();
        for n in 0..3 * CHUNK + 5 {
            leases.push(lease(n));
            model.push(n as u64);
        }
        assert_eq!(leases.len(), model.len());
        for at in [0, CHUNK - 1, CHUNK, 2 * CHUNK + 3, 3 * CHUNK, 17] {
            let removed = leases.swap_remove(at).map(|lease| lease.expires_ms);
            assert_eq!(removed, Some(model.swap_remove(at)));
            assert_eq!(leases.len(), model.len());
        }
        assert_eq!(expiries(&leases), model);
        assert!(leases.swap_remove(leases.len()).is_none());
        while !leases.is_empty() {
            let at = leases.len() / 2;
            assert_eq!(
                leases.swap_remove(at).map(|lease| lease.expires_ms),
                Some(model.swap_remove(at))
            );
            assert!(leases.chunks.len() <= leases.len().div_ceil(CHUNK) + 1);
        }
        assert_eq!(leases.capacity(), CHUNK, "one empty chunk is kept");
        leases.push(lease(7));
        assert_eq!(leases.get(0).map(|lease| lease.expires_ms), Some(7));
    }

    /// Ids whose hashes share their 32 bits are told apart by their leases.
    #[test]
    fn ids_of_the_same_entry_hash_are_told_apart() {
        let mut index = IdIndex::default();
        let same = IdHash::of(0xdead_beef);
        index.insert(same, 1);
        index.insert(same, 2);
        assert_eq!(index.find(same, |at| at == 2), Some(2));
        index.moved(same, 2, 5);
        assert_eq!(index.find(same, |at| at == 2), None);
        assert_eq!(index.find(same, |at| at == 5), Some(5));
        index.remove(same, 1);
        assert_eq!(index.find(same, |at| at == 1), None);
        assert_eq!(index.find(same, |_| true), Some(5));
        assert_eq!(index.find(IdHash::of(0xdead_beee), |_| true), None);
    }
}
