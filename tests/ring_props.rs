//! Property tests of the ring and its move plan (`HashRing::diff`).
//!
//! Views are 1..12 distinct random `a.b.c.d:port` addresses; a view change grows, shrinks,
//! replaces one member or replaces an arbitrary subset. Owners are checked against an
//! independent model (a `BTreeMap` of every token), and besides random key hashes every
//! check also runs at each token and range boundary and one hash either side of it, where
//! off-by-one errors live.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use ringkv::ring::{key_hash, token_hash, HashRange, HashRing, MovedRange, RangeSet, RingError};

/// A random IPv4 address with a port, as a view lists it.
fn address() -> impl Strategy<Value = String> {
    (any::<[u8; 4]>(), 1u16..).prop_map(|([a, b, c, d], port)| format!("{a}.{b}.{c}.{d}:{port}"))
}

/// 1..12 distinct addresses.
fn view() -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set(address(), 1..12).prop_map(|set| set.into_iter().collect())
}

/// Few vnodes make boundary-dense rings with long arcs; more make realistic ones.
fn vnodes() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..=4, 5u32..=64]
}

#[derive(Debug, Clone)]
enum Change {
    /// Add these addresses.
    Grow(Vec<String>),
    /// Keep the members whose mask bit is set (at least one goes, at least one stays).
    Shrink(Vec<bool>),
    /// Swap member `index % len` for a new address.
    Replace(usize, String),
    /// Keep the members whose mask bit is set and add these addresses.
    Arbitrary(Vec<bool>, Vec<String>),
}

fn change() -> impl Strategy<Value = Change> {
    let mask = || prop::collection::vec(any::<bool>(), 12);
    let extra = || prop::collection::vec(address(), 1..6);
    prop_oneof![
        extra().prop_map(Change::Grow),
        mask().prop_map(Change::Shrink),
        (any::<usize>(), address()).prop_map(|(i, a)| Change::Replace(i, a)),
        (mask(), extra()).prop_map(|(m, e)| Change::Arbitrary(m, e)),
    ]
}

fn apply(old: &[String], change: &Change) -> Vec<String> {
    let kept = |mask: &[bool]| -> Vec<String> {
        old.iter()
            .zip(mask.iter().cycle())
            .filter(|(_, &keep)| keep)
            .map(|(a, _)| a.clone())
            .collect()
    };
    match change {
        Change::Grow(extra) => old.iter().chain(extra).cloned().collect(),
        Change::Shrink(mask) => {
            let mut new = kept(mask);
            if new.len() == old.len() && new.len() > 1 {
                new.pop();
            }
            if new.is_empty() {
                new.push(old[0].clone());
            }
            new
        }
        Change::Replace(index, addr) => {
            let mut new = old.to_vec();
            new[index % old.len()] = addr.clone();
            new
        }
        Change::Arbitrary(mask, extra) => kept(mask).into_iter().chain(extra.clone()).collect(),
    }
}

/// The ring as the design states it, built without `HashRing`: every token of every node
/// in a sorted map; a hash belongs to the first token at or after it, wrapping. On a token
/// collision the smaller address wins, as in `HashRing`.
struct ModelRing(BTreeMap<u64, String>);

impl ModelRing {
    fn new(members: &[String], vnodes: u32) -> Self {
        let mut tokens = BTreeMap::new();
        let distinct: BTreeSet<&String> = members.iter().collect();
        for addr in distinct {
            for i in 0..vnodes {
                tokens
                    .entry(token_hash(addr, i))
                    .or_insert_with(|| addr.clone());
            }
        }
        ModelRing(tokens)
    }

    fn owner_of_hash(&self, hash: u64) -> &str {
        let next = self.0.range(hash..).next().or_else(|| self.0.iter().next());
        next.expect("a ring has tokens").1
    }

    /// Every hash at which an owner can change, and one either side.
    fn boundaries(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.keys().flat_map(|&t| around(t))
    }
}

fn around(hash: u64) -> [u64; 3] {
    [hash.wrapping_sub(1), hash, hash.wrapping_add(1)]
}

/// The moved ranges as sorted, non-wrapping segments, each with the index of its range.
fn segments(moved: &[MovedRange]) -> Vec<(u64, u64, usize)> {
    let mut segments: Vec<(u64, u64, usize)> = moved
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.range.segments().map(move |(s, e)| (s, e, i)))
        .collect();
    segments.sort_unstable();
    segments
}

/// The moved range holding `hash`, if any (segments must be sorted and disjoint).
fn range_of(segments: &[(u64, u64, usize)], hash: u64) -> Option<usize> {
    let i = segments.partition_point(|&(start, _, _)| start <= hash);
    (i > 0 && hash <= segments[i - 1].1).then(|| segments[i - 1].2)
}

fn pair(m: &MovedRange) -> (&str, &str) {
    (&m.from, &m.to)
}

/// Checks the move plan between two views against the model, at random hashes and at
/// every boundary.
fn check_diff(
    old_view: &[String],
    new_view: &[String],
    vnodes: u32,
    random: &[u64],
) -> Result<(), TestCaseError> {
    let old = HashRing::new(old_view, vnodes).unwrap();
    let new = HashRing::new(new_view, vnodes).unwrap();
    let (old_model, new_model) = (
        ModelRing::new(old_view, vnodes),
        ModelRing::new(new_view, vnodes),
    );
    let moved = HashRing::diff(&old, &new);

    // Shape: sorted by start, no identity moves, disjoint, maximal.
    for m in &moved {
        prop_assert_ne!(&m.from, &m.to, "{:?}", m);
    }
    for w in moved.windows(2) {
        prop_assert!(w[0].range.start < w[1].range.start, "not sorted: {:?}", w);
    }
    let segs = segments(&moved);
    for w in segs.windows(2) {
        prop_assert!(w[0].1 < w[1].0, "overlap: {:?} {:?}", w[0], w[1]);
    }
    let covered: u128 = moved.iter().map(|m| m.range.len()).sum();
    prop_assert!(covered <= 1u128 << 64);
    let whole_ring = covered == 1u128 << 64 && moved.len() == 1;
    for (i, m) in moved.iter().enumerate() {
        // Adjacent ranges, the last and first one included (across u64::MAX -> 0).
        let next = &moved[(i + 1) % moved.len()];
        if moved.len() > 1 && m.range.end.wrapping_add(1) == next.range.start {
            prop_assert_ne!(pair(m), pair(next), "not maximal: {:?} {:?}", m, next);
        }
        // The hashes just outside a range do not move the same way.
        if !whole_ring {
            for outside in [m.range.start.wrapping_sub(1), m.range.end.wrapping_add(1)] {
                let outside_pair = (
                    old.owner_of_hash(outside).as_ref(),
                    new.owner_of_hash(outside).as_ref(),
                );
                prop_assert_ne!(outside_pair, pair(m), "not maximal at {}: {:?}", outside, m);
            }
        }
    }

    // A hash moves iff it lies in a range, and that range says from where to where.
    let range_ends = moved
        .iter()
        .flat_map(|m| around(m.range.start).into_iter().chain(around(m.range.end)));
    let hashes = random
        .iter()
        .copied()
        .chain([0, u64::MAX])
        .chain(old_model.boundaries())
        .chain(new_model.boundaries())
        .chain(range_ends);
    for hash in hashes {
        let (from, to) = (old.owner_of_hash(hash), new.owner_of_hash(hash));
        prop_assert_eq!(
            from.as_ref(),
            old_model.owner_of_hash(hash),
            "old owner of {}",
            hash
        );
        prop_assert_eq!(
            to.as_ref(),
            new_model.owner_of_hash(hash),
            "new owner of {}",
            hash
        );
        match range_of(&segs, hash) {
            Some(i) => prop_assert_eq!(
                pair(&moved[i]),
                (from.as_ref(), to.as_ref()),
                "hash {} in {:?}",
                hash,
                moved[i]
            ),
            None => prop_assert_eq!(from, to, "hash {} moves but is in no range", hash),
        }
    }

    // Each node's change of share is what the ranges bring in minus what they take away.
    let mut balance: BTreeMap<Arc<str>, f64> = BTreeMap::new();
    for (node, share) in new.ownership() {
        *balance.entry(node).or_default() += share;
    }
    for (node, share) in old.ownership() {
        *balance.entry(node).or_default() -= share;
    }
    for m in &moved {
        *balance.entry(m.to.clone()).or_default() -= m.range.fraction();
        *balance.entry(m.from.clone()).or_default() += m.range.fraction();
    }
    for (node, rest) in balance {
        prop_assert!(rest.abs() < 1e-9, "{} is off by {}", node, rest);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn diff_moves_exactly_the_hashes_whose_owner_changes(
        old_view in view(),
        change in change(),
        vnodes in vnodes(),
        random in prop::collection::vec(any::<u64>(), 64),
        keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 32),
    ) {
        let new_view = apply(&old_view, &change);
        let hashes: Vec<u64> = random.into_iter().chain(keys.iter().map(|k| key_hash(k))).collect();
        check_diff(&old_view, &new_view, vnodes, &hashes)?;
    }

    #[test]
    fn a_range_set_and_its_cursor_agree_with_the_ranges(
        view in view(),
        vnodes in vnodes(),
        random in prop::collection::vec(any::<u64>(), 64),
    ) {
        // The ranges a joining node takes (some wrap), probed at their bounds and at random hashes, in
        // order (as a batch comes) and not.
        let ring = HashRing::new(&view, vnodes).unwrap();
        let mut grown = view.clone();
        grown.push("10.255.255.255:1".to_string());
        let bigger = HashRing::new(&grown, vnodes).unwrap();
        let ranges: Vec<HashRange> = HashRing::diff(&ring, &bigger).into_iter().map(|m| m.range).collect();
        let set = RangeSet::new(&ranges);
        let mut probes: Vec<u64> = ranges
            .iter()
            .flat_map(|r| [r.start, r.end, r.start.wrapping_sub(1), r.end.wrapping_add(1)])
            .chain(random)
            .chain([0, u64::MAX])
            .collect();
        let mut cursor = set.cursor();
        for hash in &probes {
            let expected = ranges.iter().any(|r| r.contains(*hash));
            prop_assert_eq!(set.contains(*hash), expected);
            prop_assert_eq!(cursor.contains(*hash), expected);
        }
        probes.sort_unstable();
        let mut cursor = set.cursor();
        for hash in &probes {
            prop_assert_eq!(cursor.contains(*hash), ranges.iter().any(|r| r.contains(*hash)));
        }
    }

    #[test]
    fn diff_of_a_ring_with_itself_is_empty(view in view(), vnodes in vnodes()) {
        let ring = HashRing::new(&view, vnodes).unwrap();
        prop_assert!(HashRing::diff(&ring, &ring).is_empty());
        let rebuilt = HashRing::new(&view, vnodes).unwrap();
        prop_assert!(HashRing::diff(&ring, &rebuilt).is_empty());
    }

    #[test]
    fn order_and_duplicates_of_the_view_do_not_matter(
        (view, shuffled) in view().prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
        duplicates in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        vnodes in vnodes(),
        keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 32),
    ) {
        let mut listed = shuffled.clone();
        for d in &duplicates {
            let at = d.index(listed.len() + 1);
            listed.insert(at, shuffled[d.index(shuffled.len())].clone());
        }
        let ring = HashRing::new(&view, vnodes).unwrap();
        let other = HashRing::new(&listed, vnodes).unwrap();
        prop_assert_eq!(ring.nodes(), other.nodes());
        prop_assert_eq!(ring.token_count(), other.token_count());
        prop_assert_eq!(ring.token_count(), view.len() * vnodes as usize);
        prop_assert_eq!(ring.ownership(), other.ownership());
        prop_assert!(HashRing::diff(&ring, &other).is_empty());
        let model = ModelRing::new(&view, vnodes);
        for hash in model.boundaries().chain(keys.iter().map(|k| key_hash(k))) {
            prop_assert_eq!(ring.owner_of_hash(hash), other.owner_of_hash(hash));
        }
        for key in &keys {
            prop_assert_eq!(ring.owner(key), other.owner(key));
            prop_assert_eq!(ring.owner(key), ring.owner_of_hash(key_hash(key)));
        }
    }

    #[test]
    fn owner_matches_the_model_at_aligned_hashes(
        view in view(),
        vnodes in prop_oneof![7 => 1u32..=64, 1 => Just(ringkv::ring::DEFAULT_VNODES)],
        random in prop::collection::vec(any::<u64>(), 8),
    ) {
        // Hashes on power-of-two boundaries, where an index by the top bits of a hash would
        // split the ring, and the tokens' own aligned prefixes.
        let ring = HashRing::new(&view, vnodes).unwrap();
        let model = ModelRing::new(&view, vnodes);
        let seeds = random.iter().chain(model.0.keys().take(64));
        for &seed in seeds {
            for shift in 32..64 {
                for hash in around((seed >> shift) << shift) {
                    prop_assert_eq!(ring.owner_of_hash(hash).as_ref(), model.owner_of_hash(hash));
                }
            }
        }
    }

    #[test]
    fn ownership_sums_to_one_and_matches_the_model(view in view(), vnodes in vnodes()) {
        let ring = HashRing::new(&view, vnodes).unwrap();
        let shares = ring.ownership();
        let total: f64 = shares.iter().map(|(_, s)| s).sum();
        prop_assert!((total - 1.0).abs() < 1e-9, "total {}", total);
        // The model's share of a node: the arcs (previous token, token] it owns.
        let model = ModelRing::new(&view, vnodes);
        let tokens: Vec<(&u64, &String)> = model.0.iter().collect();
        let mut expected: BTreeMap<&str, u128> = BTreeMap::new();
        for (i, (&token, owner)) in tokens.iter().enumerate() {
            let previous = *tokens[(i + tokens.len() - 1) % tokens.len()].0;
            let arc = match tokens.len() {
                1 => 1u128 << 64,
                _ => token.wrapping_sub(previous) as u128,
            };
            *expected.entry(owner.as_str()).or_default() += arc;
        }
        for (node, share) in shares {
            let want = expected.get(node.as_ref()).copied().unwrap_or(0) as f64 / 2f64.powi(64);
            prop_assert!((share - want).abs() < 1e-12, "{}: {} vs {}", node, share, want);
        }
    }
}

proptest! {
    // Realistic token counts: fewer cases, each one checks tens of thousands of boundaries.
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn diff_is_exact_at_the_default_vnode_count(
        old_view in view(),
        change in change(),
        random in prop::collection::vec(any::<u64>(), 64),
    ) {
        let new_view = apply(&old_view, &change);
        check_diff(&old_view, &new_view, ringkv::ring::DEFAULT_VNODES, &random)?;
    }
}

#[test]
fn an_empty_view_is_a_typed_error() {
    let err = HashRing::new(Vec::<String>::new(), 16).unwrap_err();
    assert_eq!(err, RingError::EmptyView);
}

#[test]
fn zero_vnodes_is_a_typed_error() {
    let err = HashRing::new(["10.0.0.1:13800"], 0).unwrap_err();
    assert_eq!(err, RingError::ZeroVnodes);
}

#[test]
fn a_hostname_or_a_missing_port_is_a_typed_error() {
    for bad in [
        "node1:13800",
        "localhost:13800",
        "10.0.0.1",
        "10.0.0.1:",
        "",
    ] {
        let view = ["10.0.0.1:13800", bad];
        let err = HashRing::new(view, 16).unwrap_err();
        assert_eq!(err, RingError::BadAddress(bad.to_string()), "{bad:?}");
    }
    assert!(HashRing::new(["[::1]:13800", "10.0.0.2:13800"], 16).is_ok());
}

#[test]
fn one_node_owns_everything_and_two_share_it() {
    let one = HashRing::new(["10.0.0.1:13800"], 8).unwrap();
    assert_eq!(one.ownership(), vec![(Arc::from("10.0.0.1:13800"), 1.0)]);
    let two = HashRing::new(["10.0.0.1:13800", "10.0.0.2:13800"], 8).unwrap();
    let moved = HashRing::diff(&one, &two);
    assert!(!moved.is_empty());
    assert!(moved.iter().all(|m| &*m.to == "10.0.0.2:13800"));
    let fraction: f64 = moved.iter().map(|m| m.range.fraction()).sum();
    assert!((fraction - two.ownership()[1].1).abs() < 1e-12);
}
