//! Text rendering of the ring for people: each node's share of the hash space, and what a
//! view change moves (the ranges `HashRing::diff` returns, from which node to which), next
//! to what modulo hashing would move. Used by `examples/ring_viz.rs` and `ringctl ring`.

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::ring::{key_hash, HashRing, MovedRange, RingError};

/// What each section of [`render`]'s output means, for `--help` texts.
pub const SECTIONS: &str = "\
Output sections:
  Nodes            every address of the old and new view with a short label (A, B, ...)
                   used in the matrices, and whether it is added, removed or kept.
  Ownership        each node's share of the 64-bit hash space before and after the change:
                   percent, ratio to the fair share 1/N, and a bar (50 characters = 100%).
                   With --keys, also how many of the synthetic keys the node holds.
  Ring movement    the maximal hash ranges HashRing::diff returns: how many, the share of
                   the key space they cover next to the ideal (the share of the added or
                   removed node, 1/max(N, M)), and a from -> to matrix of that share.
  Keys             (with --keys K) how many of the keys \"key0\"..\"key{K-1}\" change owner,
                   and a check that each of them lies in a moved range with its from -> to.
  Modulo hashing   the same figures when the owner is hash % N over the view in listed
                   order, computed over the whole hash space; the moved hashes are
                   scattered, not ranges.";

/// Why a ring could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VizError {
    #[error("old view: {0}")]
    Old(RingError),
    #[error("new view: {0}")]
    New(RingError),
    #[error("the rendering could not be written")]
    Format,
}

impl From<fmt::Error> for VizError {
    fn from(_: fmt::Error) -> Self {
        VizError::Format
    }
}

/// The course's addresses: `n` of them from 10.10.0.4:13800 up.
pub fn generated_view(n: usize) -> Vec<String> {
    let first = u32::from(Ipv4Addr::new(10, 10, 0, 4));
    (0..n as u32)
        .map(|i| format!("{}:13800", Ipv4Addr::from(first + i)))
        .collect()
}

/// Spreadsheet-style labels: A..Z, AA, AB, ...
fn label(mut index: usize) -> String {
    let mut out = String::new();
    loop {
        out.insert(0, char::from(b'A' + (index % 26) as u8));
        if index < 26 {
            break;
        }
        index = index / 26 - 1;
    }
    out
}

/// Every address of either view, in first-listed order, with its label.
struct Legend {
    entries: Vec<(String, String)>,
}

impl Legend {
    fn new(old: &[String], new: &[String]) -> Self {
        let entries = distinct(old.iter().chain(new))
            .into_iter()
            .enumerate()
            .map(|(i, a)| (label(i), a))
            .collect();
        Legend { entries }
    }

    fn label_of(&self, addr: &str) -> &str {
        self.entries
            .iter()
            .find(|(_, a)| a == addr)
            .map_or("?", |(label, _)| label)
    }
}

fn percent(fraction: f64) -> String {
    format!("{:.2}%", fraction * 100.0)
}

fn bar(fraction: f64) -> String {
    "#".repeat((fraction * 50.0).round() as usize)
}

/// Distinct addresses in listed order (a view may repeat one; the ring ignores repeats).
fn distinct<'a>(view: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for addr in view {
        if !out.contains(addr) {
            out.push(addr.clone());
        }
    }
    out
}

fn ownership(
    out: &mut String,
    title: &str,
    ring: &HashRing,
    view: &[String],
    legend: &Legend,
    keys: &[u64],
) -> fmt::Result {
    let fair = 1.0 / ring.nodes().len() as f64;
    writeln!(out, "{title} (fair share {})", percent(fair))?;
    let shares: BTreeMap<Arc<str>, f64> = ring.ownership().into_iter().collect();
    let mut held: BTreeMap<&str, usize> = BTreeMap::new();
    for &hash in keys {
        *held.entry(ring.owner_of_hash(hash).as_ref()).or_default() += 1;
    }
    for addr in view {
        let share = shares.get(addr.as_str()).copied().unwrap_or(0.0);
        let key_column = if keys.is_empty() {
            String::new()
        } else {
            format!(" {:>9} keys", held.get(addr.as_str()).copied().unwrap_or(0))
        };
        writeln!(
            out,
            "  {:<3} {:<22} {:>7}  x{:.3}{key_column}  |{}",
            legend.label_of(addr),
            addr,
            percent(share),
            share / fair,
            bar(share)
        )?;
    }
    writeln!(out)
}

/// A from -> to matrix of key-space shares; rows are old nodes, columns new nodes.
fn matrix(
    out: &mut String,
    old: &[String],
    new: &[String],
    legend: &Legend,
    share: &BTreeMap<(String, String), f64>,
) -> fmt::Result {
    write!(out, "  {:<9}", "from\\to")?;
    for to in new {
        write!(out, "{:>9}", legend.label_of(to))?;
    }
    writeln!(out)?;
    for from in old {
        write!(out, "  {:<9}", legend.label_of(from))?;
        for to in new {
            match share.get(&(from.clone(), to.clone())) {
                Some(&s) if s > 0.0 => write!(out, "{:>9}", percent(s))?,
                _ => write!(out, "{:>9}", ".")?,
            }
        }
        writeln!(out)?;
    }
    writeln!(out)
}

/// Movement under `hash % N` over the listed views, exact over the whole hash space: a
/// hash's pair of residues (h mod N, h mod M) is uniform over 0..lcm(N, M) (up to an error
/// of lcm/2^64).
fn modulo_movement(old: &[String], new: &[String]) -> BTreeMap<(String, String), f64> {
    let (n, m) = (old.len(), new.len());
    let lcm = n / gcd(n, m) * m;
    let mut moved = BTreeMap::new();
    for residue in 0..lcm {
        let (from, to) = (&old[residue % n], &new[residue % m]);
        if from != to {
            *moved.entry((from.clone(), to.clone())).or_default() += 1.0 / lcm as f64;
        }
    }
    moved
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The moved range holding `hash`: `moved` is sorted by start, so it is the last range
/// starting at or before `hash`, or else the wrapping range, which sorts last.
fn range_of(moved: &[MovedRange], hash: u64) -> Option<&MovedRange> {
    let i = moved.partition_point(|m| m.range.start <= hash);
    let candidates = i
        .checked_sub(1)
        .into_iter()
        .chain([moved.len().wrapping_sub(1)]);
    candidates
        .filter_map(|c| moved.get(c))
        .find(|m| m.range.contains(hash))
}

fn keys_section(
    out: &mut String,
    old: &HashRing,
    new: &HashRing,
    moved: &[MovedRange],
    key_hashes: &[u64],
) -> fmt::Result {
    let mut moved_keys = 0usize;
    let mut disagreeing = 0usize;
    for &hash in key_hashes {
        let (from, to) = (old.owner_of_hash(hash), new.owner_of_hash(hash));
        if from != to {
            moved_keys += 1;
        }
        let agrees = match range_of(moved, hash) {
            Some(m) => (&m.from, &m.to) == (from, to),
            None => from == to,
        };
        if !agrees {
            disagreeing += 1;
        }
    }
    writeln!(out, "Keys (\"key0\"..\"key{}\")", key_hashes.len() - 1)?;
    writeln!(
        out,
        "  moved: {moved_keys} of {} ({})",
        key_hashes.len(),
        percent(moved_keys as f64 / key_hashes.len() as f64)
    )?;
    writeln!(
        out,
        "  keys whose move disagrees with the ranges: {disagreeing}{}",
        if disagreeing == 0 {
            " (every moved key is in a moved range with its from -> to, no other key is)"
        } else {
            "  <-- BUG"
        }
    )?;
    writeln!(out)
}

/// Renders the ring of `old` with `vnodes` tokens per node: the nodes and their ownership,
/// and, given a `new` view, the ownership after the change, the ranges that move and the
/// comparison with modulo hashing. With `keys` > 0, also places the synthetic keys
/// `"key0".."key{keys-1}"` and counts those that move.
pub fn render(
    old: &[String],
    new: Option<&[String]>,
    vnodes: u32,
    keys: usize,
) -> Result<String, VizError> {
    let old = distinct(old);
    let old_ring = HashRing::new(&old, vnodes).map_err(VizError::Old)?;
    let key_hashes: Vec<u64> = (0..keys)
        .map(|i| key_hash(format!("key{i}").as_bytes()))
        .collect();
    let mut out = String::new();
    let Some(new) = new else {
        let legend = Legend::new(&old, &[]);
        writeln!(
            out,
            "ring: {} nodes, {vnodes} vnodes per node ({} tokens)\n",
            old.len(),
            old_ring.token_count()
        )?;
        ownership(&mut out, "Ownership", &old_ring, &old, &legend, &key_hashes)?;
        return Ok(out);
    };
    let new = distinct(new);
    let new_ring = HashRing::new(&new, vnodes).map_err(VizError::New)?;
    let legend = Legend::new(&old, &new);
    let ideal = 1.0 / old.len().max(new.len()) as f64;

    writeln!(
        out,
        "ring_viz: {} -> {} nodes, {} vnodes per node ({} -> {} tokens)\n",
        old.len(),
        new.len(),
        vnodes,
        old_ring.token_count(),
        new_ring.token_count()
    )?;
    writeln!(out, "Nodes")?;
    for (label, addr) in &legend.entries {
        let status = match (old.contains(addr), new.contains(addr)) {
            (true, true) => "kept",
            (true, false) => "removed",
            _ => "added",
        };
        writeln!(out, "  {label:<3} {addr:<22} {status}")?;
    }
    writeln!(out)?;

    let o = &mut out;
    ownership(o, "Ownership before", &old_ring, &old, &legend, &key_hashes)?;
    ownership(o, "Ownership after", &new_ring, &new, &legend, &key_hashes)?;

    let moved = HashRing::diff(&old_ring, &new_ring);
    let moved_share: f64 = moved.iter().map(|m| m.range.fraction()).sum();
    let mut shares: BTreeMap<(String, String), f64> = BTreeMap::new();
    for m in &moved {
        *shares
            .entry((m.from.to_string(), m.to.to_string()))
            .or_default() += m.range.fraction();
    }
    writeln!(out, "Ring movement")?;
    writeln!(
        out,
        "  moved ranges: {}, covering {} of the key space (ideal {}, x{:.3})",
        moved.len(),
        percent(moved_share),
        percent(ideal),
        moved_share / ideal
    )?;
    matrix(&mut out, &old, &new, &legend, &shares)?;

    if !key_hashes.is_empty() {
        keys_section(&mut out, &old_ring, &new_ring, &moved, &key_hashes)?;
    }

    let modulo = modulo_movement(&old, &new);
    let modulo_share: f64 = modulo.values().sum();
    writeln!(
        out,
        "Modulo hashing (owner = hash % N over the view in listed order)"
    )?;
    writeln!(
        out,
        "  moved: {} of the key space (ideal {}, x{:.3})",
        percent(modulo_share),
        percent(ideal),
        modulo_share / ideal
    )?;
    if !key_hashes.is_empty() {
        let moved_keys = key_hashes
            .iter()
            .filter(|&&h| {
                old[(h % old.len() as u64) as usize] != new[(h % new.len() as u64) as usize]
            })
            .count();
        writeln!(
            out,
            "  keys moved: {moved_keys} of {} ({})",
            key_hashes.len(),
            percent(moved_keys as f64 / key_hashes.len() as f64)
        )?;
    }
    matrix(&mut out, &old, &new, &legend, &modulo)?;
    Ok(out)
}

/// Writes `text` to standard output; a reader that went away early (`ring_viz | head`) is
/// not an error.
pub fn print_text(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_run_like_spreadsheet_columns() {
        assert_eq!(label(0), "A");
        assert_eq!(label(25), "Z");
        assert_eq!(label(26), "AA");
        assert_eq!(label(27), "AB");
        assert_eq!(label(26 + 26 * 26), "AAA");
    }

    #[test]
    fn renders_a_change_and_a_single_view() {
        let (old, new) = (generated_view(2), generated_view(3));
        let text = render(&old, Some(&new), 64, 1000).unwrap();
        assert!(text.starts_with("ring_viz: 2 -> 3 nodes, 64 vnodes per node"));
        assert!(text.contains("C   10.10.0.6:13800        added"));
        assert!(text.contains("keys whose move disagrees with the ranges: 0 "));
        let single = render(&old, None, 64, 0).unwrap();
        assert!(single.starts_with("ring: 2 nodes, 64 vnodes per node (128 tokens)"));
        assert!(!single.contains("Ring movement"));
        assert_eq!(
            render(&["x".to_string()], None, 8, 0),
            Err(VizError::Old(RingError::BadAddress("x".into())))
        );
        assert!(matches!(
            render(&old, Some(&[]), 8, 0),
            Err(VizError::New(RingError::EmptyView))
        ));
    }
}
