//! Consistent-hash ring of virtual nodes, and the move plan (`diff`) between two rings.
//!
//! Every node of a view owns `vnodes` tokens on a 64-bit ring: token `i` of node `A` is
//! `xxh3_64("<A>#<i>")`. A key hashes to `xxh3_64(key)` and belongs to the node of the first
//! token at or after that hash, wrapping past `u64::MAX` to the smallest token. The ring
//! depends only on the *set* of addresses, so every node computes the same ring on its own.
//!
//! Hash ranges are inclusive at both ends (`start..=end`). Token `t_i` therefore owns
//! `t_{i-1}+1 ..= t_i`. A range with `start > end` wraps through `u64::MAX` to `0`; a range
//! with `start == end.wrapping_add(1)` covers the whole ring.

use std::net::SocketAddr;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

/// The vnode count a node uses unless told otherwise (docs/RING.md has the measurements
/// behind it).
pub const DEFAULT_VNODES: u32 = 1024;

/// Why a ring could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("the view is empty")]
    EmptyView,
    #[error("the vnode count must be at least 1")]
    ZeroVnodes,
    #[error("'{0}' is not an ip:port address")]
    BadAddress(String),
    #[error("a view of {0} nodes is more than {MAX_NODES}")]
    TooManyNodes(usize),
}

/// Most nodes a view (and so a ring) may have: a view from a peer or a client becomes a ring
/// of `nodes × vnodes` tokens, so its size must be bounded.
pub const MAX_NODES: usize = 1024;

/// Hash of a key's bytes: where the key sits on the ring.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// Position of virtual node `index` of the node at `addr`.
pub fn token_hash(addr: &str, index: u32) -> u64 {
    xxh3_64(format!("{addr}#{index}").as_bytes())
}

/// Checks that `addr` is an IP literal with a port (`10.0.0.4:13800`, `[::1]:13800`).
pub fn validate_address(addr: &str) -> Result<(), RingError> {
    addr.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| RingError::BadAddress(addr.to_string()))
}

/// The canonical spelling of an `ip:port` address (`10.0.0.1:080` → `10.0.0.1:80`,
/// `[0:0::1]:80` → `[::1]:80`), so that nodes that spell an address differently still
/// compute the same ring.
pub fn canonical_address(addr: &str) -> Result<String, RingError> {
    addr.parse::<SocketAddr>()
        .map(|a| a.to_string())
        .map_err(|_| RingError::BadAddress(addr.to_string()))
}

/// An inclusive range of key hashes; wraps through zero when `start > end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HashRange {
    pub start: u64,
    pub end: u64,
}

impl HashRange {
    /// Whether `hash` lies in this range.
    #[inline]
    pub fn contains(&self, hash: u64) -> bool {
        if self.start <= self.end {
            self.start <= hash && hash <= self.end
        } else {
            hash >= self.start || hash <= self.end
        }
    }

    /// Whether the range wraps through `u64::MAX` to `0`.
    pub fn wraps(&self) -> bool {
        self.start > self.end
    }

    /// The range as one or two non-wrapping inclusive segments, in ascending order.
    pub fn segments(&self) -> impl Iterator<Item = (u64, u64)> {
        let (first, second) = if self.wraps() {
            ((0, self.end), Some((self.start, u64::MAX)))
        } else {
            ((self.start, self.end), None)
        };
        std::iter::once(first).chain(second)
    }

    /// Number of hashes in the range (up to 2^64).
    pub fn len(&self) -> u128 {
        self.segments()
            .map(|(s, e)| (e - s) as u128 + 1)
            .sum::<u128>()
    }

    /// A range always holds at least one hash.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The share of the whole ring this range covers, in `0.0..=1.0`.
    pub fn fraction(&self) -> f64 {
        self.len() as f64 / RING_SIZE
    }
}

const RING_SIZE: f64 = 18_446_744_073_709_551_616.0; // 2^64

/// A hash range whose owner changes between two rings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedRange {
    pub range: HashRange,
    pub from: Arc<str>,
    pub to: Arc<str>,
}

/// A consistent-hash ring over a set of node addresses.
#[derive(Debug, Clone)]
pub struct HashRing {
    /// Distinct addresses, sorted.
    nodes: Vec<Arc<str>>,
    /// Token positions, sorted ascending.
    tokens: Vec<u64>,
    /// `owners[i]` indexes `nodes` for `tokens[i]`.
    owners: Vec<u32>,
    /// Lookup index by the top bits of a hash: `bucket_start[p]` is the index of the first
    /// token whose top bits are `>= p`, so the tokens with top bits `p` are
    /// `bucket_start[p]..bucket_start[p + 1]` and a lookup binary-searches only those few.
    bucket_start: Vec<u32>,
    /// `64 - index bits`: `hash >> bucket_shift` is a hash's bucket.
    bucket_shift: u32,
}

/// About this many tokens per lookup bucket: a bucket fits in a cache line or two, and
/// the index is a quarter of the token count in `u32`s.
const TOKENS_PER_BUCKET_LOG2: u32 = 2;

/// `(bucket_start, bucket_shift)` for sorted `tokens`.
fn bucket_index(tokens: &[u64]) -> (Vec<u32>, u32) {
    let log2_tokens = tokens.len().max(1).ilog2();
    let bits = log2_tokens
        .saturating_sub(TOKENS_PER_BUCKET_LOG2)
        .clamp(1, 24);
    let shift = 64 - bits;
    let buckets = 1usize << bits;
    let mut bucket_start = Vec::with_capacity(buckets + 1);
    let mut i = 0;
    for bucket in 0..=buckets {
        while i < tokens.len() && ((tokens[i] >> shift) as usize) < bucket {
            i += 1;
        }
        bucket_start.push(i as u32);
    }
    (bucket_start, shift)
}

impl HashRing {
    /// Builds the ring of `members` (order and duplicates do not matter) with `vnodes`
    /// tokens per node.
    pub fn new<I, S>(members: I, vnodes: u32) -> Result<Self, RingError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut nodes: Vec<Arc<str>> = Vec::new();
        for member in members {
            let member = member.as_ref();
            validate_address(member)?;
            nodes.push(Arc::from(member));
        }
        HashRing::build(nodes, vnodes)
    }

    /// Builds the ring whose members are names, not addresses: the shards of a replicated
    /// cluster ([`crate::shard`]), each placed by the tokens of its id.
    pub fn of_names<I, S>(names: I, vnodes: u32) -> Result<Self, RingError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        HashRing::build(
            names.into_iter().map(|n| Arc::from(n.as_ref())).collect(),
            vnodes,
        )
    }

    fn build(mut nodes: Vec<Arc<str>>, vnodes: u32) -> Result<Self, RingError> {
        if vnodes == 0 {
            return Err(RingError::ZeroVnodes);
        }
        nodes.sort();
        nodes.dedup();
        if nodes.is_empty() {
            return Err(RingError::EmptyView);
        }
        let mut placed: Vec<(u64, u32)> = Vec::with_capacity(nodes.len() * vnodes as usize);
        for (node_index, node) in nodes.iter().enumerate() {
            placed.extend((0..vnodes).map(|i| (token_hash(node, i), node_index as u32)));
        }
        placed.sort_unstable();
        let (tokens, owners): (Vec<u64>, Vec<u32>) = placed.into_iter().unzip();
        let (bucket_start, bucket_shift) = bucket_index(&tokens);
        Ok(HashRing {
            nodes,
            tokens,
            owners,
            bucket_start,
            bucket_shift,
        })
    }

    /// The distinct node addresses, sorted.
    pub fn nodes(&self) -> &[Arc<str>] {
        &self.nodes
    }

    /// Total number of tokens on the ring.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Index of the first token at or after `hash`, wrapping to 0.
    #[inline]
    fn token_index_for(&self, hash: u64) -> usize {
        // Tokens before `low` are below `hash`'s bucket, tokens from `high` on above it, so
        // the first token >= hash is in `low..=high` (`high` itself if the bucket has none).
        let bucket = (hash >> self.bucket_shift) as usize;
        let low = self.bucket_start[bucket] as usize;
        let high = self.bucket_start[bucket + 1] as usize;
        let i = low + self.tokens[low..high].partition_point(|&t| t < hash);
        if i == self.tokens.len() {
            0
        } else {
            i
        }
    }

    /// The node that owns a key with this hash.
    #[inline]
    pub fn owner_of_hash(&self, hash: u64) -> &Arc<str> {
        &self.nodes[self.owners[self.token_index_for(hash)] as usize]
    }

    /// The node that owns `key`.
    #[inline]
    pub fn owner(&self, key: &[u8]) -> &Arc<str> {
        self.owner_of_hash(key_hash(key))
    }

    /// The share of the ring each node owns, in node order; the shares sum to 1.
    pub fn ownership(&self) -> Vec<(Arc<str>, f64)> {
        let mut owned = vec![0u128; self.nodes.len()];
        let last = *self.tokens.last().expect("a ring has tokens");
        let mut previous = last;
        for (i, &token) in self.tokens.iter().enumerate() {
            let arc = if i == 0 {
                (token as u128 + (1u128 << 64)) - previous as u128
            } else {
                (token - previous) as u128
            };
            owned[self.owners[i] as usize] += arc;
            previous = token;
        }
        self.nodes
            .iter()
            .cloned()
            .zip(owned.into_iter().map(|o| o as f64 / RING_SIZE))
            .collect()
    }

    /// The maximal contiguous hash ranges whose owner differs between `old` and `new`,
    /// sorted by `start`, disjoint, each with its old and new owner. Two returned ranges
    /// are never adjacent with the same `(from, to)` (the wrap-around range is one range).
    /// A key moves iff its hash lies in a returned range.
    pub fn diff(old: &HashRing, new: &HashRing) -> Vec<MovedRange> {
        let mut out = HashRing::pieces(old, new);
        out.retain(|piece| piece.from != piece.to);
        out
    }

    /// The whole ring cut into maximal contiguous ranges on which both `old` and `new` have
    /// one owner each, sorted by `start`, disjoint, covering every hash once; each with its
    /// owner in `old` (`from`) and in `new` (`to`), equal where nothing moves. Two returned
    /// ranges are never adjacent with the same `(from, to)` (the wrap-around range is one).
    pub fn pieces(old: &HashRing, new: &HashRing) -> Vec<MovedRange> {
        // Every boundary of either ring, ascending; between two consecutive boundaries
        // (b_{k-1}, b_k] both rings have a constant owner, the owner of b_k.
        let mut pieces: Vec<(u64, u32, u32)> =
            Vec::with_capacity(old.tokens.len() + new.tokens.len());
        let (mut i, mut j) = (0usize, 0usize);
        let (ot, nt) = (&old.tokens, &new.tokens);
        while i < ot.len() || j < nt.len() {
            let boundary = match (ot.get(i), nt.get(j)) {
                (Some(&a), Some(&b)) => a.min(b),
                (Some(&a), None) => a,
                (None, Some(&b)) => b,
                (None, None) => unreachable!(),
            };
            let old_owner = old.owners[if i < ot.len() { i } else { 0 }];
            let new_owner = new.owners[if j < nt.len() { j } else { 0 }];
            pieces.push((boundary, old_owner, new_owner));
            while i < ot.len() && ot[i] == boundary {
                i += 1;
            }
            while j < nt.len() && nt[j] == boundary {
                j += 1;
            }
        }

        let pair = |k: usize| (pieces[k].1, pieces[k].2);
        let range = |from: u32, to: u32, start: u64, end: u64| MovedRange {
            range: HashRange { start, end },
            from: old.nodes[from as usize].clone(),
            to: new.nodes[to as usize].clone(),
        };
        let m = pieces.len();
        let mut out = Vec::new();
        // Start at a piece whose predecessor has another owner pair, so no run is split by
        // the wrap; if there is none, one pair covers the whole ring.
        let Some(first) = (0..m).find(|&k| pair(k) != pair((k + m - 1) % m)) else {
            let (from, to) = pair(0);
            let end = pieces[m - 1].0;
            out.push(range(from, to, end.wrapping_add(1), end));
            return out;
        };
        let mut run_start = first;
        let mut k = first;
        for step in 0..m {
            let next = (k + 1) % m;
            let run_ends = step == m - 1 || pair(next) != pair(k);
            if run_ends {
                let (from, to) = pair(k);
                let before_start = pieces[(run_start + m - 1) % m].0;
                out.push(range(from, to, before_start.wrapping_add(1), pieces[k].0));
                run_start = next;
            }
            k = next;
        }
        out.sort_by_key(|r| r.range.start);
        out
    }
}

/// A set of hash ranges with fast membership tests (binary search over segments).
#[derive(Debug, Clone, Default)]
pub struct RangeSet {
    /// Non-wrapping inclusive segments, sorted and disjoint.
    segments: Vec<(u64, u64)>,
}

impl RangeSet {
    pub fn new<'a>(ranges: impl IntoIterator<Item = &'a HashRange>) -> Self {
        let mut segments: Vec<(u64, u64)> = ranges.into_iter().flat_map(|r| r.segments()).collect();
        segments.sort_unstable();
        RangeSet { segments }
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.segment_of(hash).is_some()
    }

    /// The segment holding `hash`, if any.
    fn segment_of(&self, hash: u64) -> Option<(u64, u64)> {
        let i = self.segments.partition_point(|&(start, _)| start <= hash);
        let segment = *self.segments.get(i.checked_sub(1)?)?;
        (hash <= segment.1).then_some(segment)
    }

    /// Membership tests for hashes that come in runs (a batch of one range): the segment
    /// of the last hash found is tried before a search.
    pub fn cursor(&self) -> RangeCursor<'_> {
        RangeCursor {
            set: self,
            last: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The non-wrapping segments, ascending.
    pub fn segments(&self) -> &[(u64, u64)] {
        &self.segments
    }
}

/// See [`RangeSet::cursor`].
pub struct RangeCursor<'a> {
    set: &'a RangeSet,
    last: Option<(u64, u64)>,
}

impl RangeCursor<'_> {
    pub fn contains(&mut self, hash: u64) -> bool {
        if let Some((start, end)) = self.last {
            if start <= hash && hash <= end {
                return true;
            }
        }
        match self.set.segment_of(hash) {
            Some(segment) => {
                self.last = Some(segment);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:13800", i + 1)).collect()
    }

    #[test]
    fn typed_errors_instead_of_panics() {
        assert_eq!(
            HashRing::new(Vec::<String>::new(), 8).unwrap_err(),
            RingError::EmptyView
        );
        assert_eq!(
            HashRing::new(view(2), 0).unwrap_err(),
            RingError::ZeroVnodes
        );
        assert_eq!(
            HashRing::new(["node-a:13800"], 8).unwrap_err(),
            RingError::BadAddress("node-a:13800".into())
        );
        assert!(HashRing::new(["[::1]:13800"], 8).is_ok());
    }

    #[test]
    fn owner_is_first_token_at_or_after_the_hash() {
        let ring = HashRing::new(view(3), 4).unwrap();
        for (i, &t) in ring.tokens.iter().enumerate() {
            let owner = &ring.nodes[ring.owners[i] as usize];
            assert_eq!(ring.owner_of_hash(t), owner);
            if t > 0 && (i == 0 || ring.tokens[i - 1] < t - 1) {
                assert_eq!(ring.owner_of_hash(t - 1), owner);
            }
        }
        let last = *ring.tokens.last().unwrap();
        let first_owner = &ring.nodes[ring.owners[0] as usize];
        if last < u64::MAX {
            assert_eq!(ring.owner_of_hash(last + 1), first_owner);
        }
    }

    #[test]
    fn ownership_sums_to_one() {
        let ring = HashRing::new(view(5), 64).unwrap();
        let total: f64 = ring.ownership().iter().map(|(_, f)| f).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
        let single = HashRing::new(view(1), 1).unwrap();
        assert_eq!(single.ownership()[0].1, 1.0);
    }

    #[test]
    fn replacing_the_only_node_moves_the_whole_ring_as_one_range() {
        let old = HashRing::new(["10.0.0.1:1"], 3).unwrap();
        let new = HashRing::new(["10.0.0.2:1"], 3).unwrap();
        let moved = HashRing::diff(&old, &new);
        assert_eq!(moved.len(), 1);
        assert_eq!(moved[0].range.len(), 1u128 << 64);
        assert!(HashRing::diff(&old, &old).is_empty());
    }

    #[test]
    fn range_helpers() {
        let wrap = HashRange {
            start: u64::MAX - 1,
            end: 1,
        };
        assert!(wrap.wraps() && wrap.contains(0) && wrap.contains(u64::MAX) && !wrap.contains(2));
        assert_eq!(wrap.len(), 4);
        let set = RangeSet::new([&wrap, &HashRange { start: 10, end: 20 }]);
        assert!(set.contains(0) && set.contains(15) && set.contains(u64::MAX));
        assert!(!set.contains(5) && !set.contains(21));
    }
}
