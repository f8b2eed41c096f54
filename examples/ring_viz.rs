//! Prints what a view change does to the ring: each node's share before and after, the
//! hash ranges that move (from which node to which), and the same movement under modulo
//! hashing for comparison.
//!
//! ```text
//! cargo run --release --example ring_viz -- --from 2 --to 3 --keys 100000
//! cargo run --release --example ring_viz -- --old 10.0.0.1:80,10.0.0.2:80 \
//!     --new 10.0.0.1:80,10.0.0.2:80,10.0.0.3:80 --vnodes 256
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgGroup, Parser};
use ringkv::ring::{key_hash, HashRing, MovedRange, DEFAULT_VNODES};

const SECTIONS: &str = "\
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

/// Show ownership and movement of a view change on the consistent-hash ring.
#[derive(Parser, Debug)]
#[command(after_help = SECTIONS)]
#[command(group(ArgGroup::new("views").required(true).args(["old", "from"])))]
struct Args {
    /// Old view: comma-separated ip:port addresses.
    #[arg(long, value_delimiter = ',', requires = "new", conflicts_with_all = ["from", "to"])]
    old: Vec<String>,
    /// New view: comma-separated ip:port addresses.
    #[arg(long, value_delimiter = ',', requires = "old")]
    new: Vec<String>,
    /// Old view of N generated addresses 10.10.0.4:13800, 10.10.0.5:13800, ...
    #[arg(long, value_name = "N", requires = "to")]
    from: Option<usize>,
    /// New view of M generated addresses, the first N of them shared with --from.
    #[arg(long, value_name = "M", requires = "from")]
    to: Option<usize>,
    /// Tokens per node.
    #[arg(long, default_value_t = DEFAULT_VNODES)]
    vnodes: u32,
    /// Also place K synthetic keys "key0".."key{K-1}" and count those that move.
    #[arg(long, value_name = "K")]
    keys: Option<usize>,
}

/// The course's addresses: 10.10.0.4:13800 and up.
fn generated_view(n: usize) -> Vec<String> {
    let first = u32::from(Ipv4Addr::new(10, 10, 0, 4));
    (0..n as u32)
        .map(|i| format!("{}:13800", Ipv4Addr::from(first + i)))
        .collect()
}

/// Spreadsheet-style labels: A..Z, AA, AB, ...
fn label(mut index: usize) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'A' + (index % 26) as u8);
        if index < 26 {
            break;
        }
        index = index / 26 - 1;
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII")
}

/// Every address of either view, in first-listed order, with its label.
struct Legend {
    entries: Vec<(String, String)>,
}

impl Legend {
    fn new(old: &[String], new: &[String]) -> Self {
        let mut addresses: Vec<String> = Vec::new();
        for addr in old.iter().chain(new) {
            if !addresses.contains(addr) {
                addresses.push(addr.clone());
            }
        }
        let entries = addresses
            .into_iter()
            .enumerate()
            .map(|(i, a)| (label(i), a))
            .collect();
        Legend { entries }
    }

    fn label_of(&self, addr: &str) -> &str {
        let entry = self.entries.iter().find(|(_, a)| a == addr);
        &entry.expect("address in legend").0
    }
}

fn percent(fraction: f64) -> String {
    format!("{:.2}%", fraction * 100.0)
}

fn bar(fraction: f64) -> String {
    "#".repeat((fraction * 50.0).round() as usize)
}

/// Distinct addresses in listed order (a view may repeat one; the ring ignores repeats).
fn distinct(view: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for addr in view {
        if !out.contains(addr) {
            out.push(addr.clone());
        }
    }
    out
}

fn print_ownership(title: &str, ring: &HashRing, view: &[String], legend: &Legend, keys: &[u64]) {
    let fair = 1.0 / ring.nodes().len() as f64;
    println!("{title} (fair share {})", percent(fair));
    let shares: BTreeMap<Arc<str>, f64> = ring.ownership().into_iter().collect();
    let mut held: BTreeMap<&str, usize> = BTreeMap::new();
    for &hash in keys {
        *held.entry(ring.owner_of_hash(hash).as_ref()).or_default() += 1;
    }
    for addr in view {
        let share = shares[addr.as_str()];
        let key_column = if keys.is_empty() {
            String::new()
        } else {
            format!(" {:>9} keys", held.get(addr.as_str()).copied().unwrap_or(0))
        };
        println!(
            "  {:<3} {:<22} {:>7}  x{:.3}{key_column}  |{}",
            legend.label_of(addr),
            addr,
            percent(share),
            share / fair,
            bar(share)
        );
    }
    println!();
}

/// A from -> to matrix of key-space shares; rows are old nodes, columns new nodes.
fn print_matrix(
    old: &[String],
    new: &[String],
    legend: &Legend,
    share: &BTreeMap<(String, String), f64>,
) {
    print!("  {:<9}", "from\\to");
    for to in new {
        print!("{:>9}", legend.label_of(to));
    }
    println!();
    for from in old {
        print!("  {:<9}", legend.label_of(from));
        for to in new {
            match share.get(&(from.clone(), to.clone())) {
                Some(&s) if s > 0.0 => print!("{:>9}", percent(s)),
                _ => print!("{:>9}", "."),
            }
        }
        println!();
    }
    println!();
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

fn run(args: Args) -> Result<(), String> {
    let (old, new, flags) = match (args.from, args.to) {
        (Some(n), Some(m)) => (generated_view(n), generated_view(m), ["--from", "--to"]),
        _ => (args.old, args.new, ["--old", "--new"]),
    };
    let (old, new) = (distinct(&old), distinct(&new));
    let old_ring = HashRing::new(&old, args.vnodes).map_err(|e| format!("{}: {e}", flags[0]))?;
    let new_ring = HashRing::new(&new, args.vnodes).map_err(|e| format!("{}: {e}", flags[1]))?;
    let legend = Legend::new(&old, &new);
    let key_hashes: Vec<u64> = (0..args.keys.unwrap_or(0))
        .map(|i| key_hash(format!("key{i}").as_bytes()))
        .collect();
    let ideal = 1.0 / old.len().max(new.len()) as f64;

    println!(
        "ring_viz: {} -> {} nodes, {} vnodes per node ({} -> {} tokens)\n",
        old.len(),
        new.len(),
        args.vnodes,
        old_ring.token_count(),
        new_ring.token_count()
    );
    println!("Nodes");
    for (label, addr) in &legend.entries {
        let status = match (old.contains(addr), new.contains(addr)) {
            (true, true) => "kept",
            (true, false) => "removed",
            _ => "added",
        };
        println!("  {label:<3} {addr:<22} {status}");
    }
    println!();

    print_ownership("Ownership before", &old_ring, &old, &legend, &key_hashes);
    print_ownership("Ownership after", &new_ring, &new, &legend, &key_hashes);

    let moved = HashRing::diff(&old_ring, &new_ring);
    let moved_share: f64 = moved.iter().map(|m| m.range.fraction()).sum();
    let mut matrix: BTreeMap<(String, String), f64> = BTreeMap::new();
    for m in &moved {
        *matrix
            .entry((m.from.to_string(), m.to.to_string()))
            .or_default() += m.range.fraction();
    }
    println!("Ring movement");
    println!(
        "  moved ranges: {}, covering {} of the key space (ideal {}, x{:.3})",
        moved.len(),
        percent(moved_share),
        percent(ideal),
        moved_share / ideal
    );
    print_matrix(&old, &new, &legend, &matrix);

    if !key_hashes.is_empty() {
        print_keys(&old_ring, &new_ring, &moved, &key_hashes);
    }

    let modulo = modulo_movement(&old, &new);
    let modulo_share: f64 = modulo.values().sum();
    println!("Modulo hashing (owner = hash % N over the view in listed order)");
    println!(
        "  moved: {} of the key space (ideal {}, x{:.3})",
        percent(modulo_share),
        percent(ideal),
        modulo_share / ideal
    );
    if !key_hashes.is_empty() {
        let moved_keys = key_hashes
            .iter()
            .filter(|&&h| {
                old[(h % old.len() as u64) as usize] != new[(h % new.len() as u64) as usize]
            })
            .count();
        println!(
            "  keys moved: {moved_keys} of {} ({})",
            key_hashes.len(),
            percent(moved_keys as f64 / key_hashes.len() as f64)
        );
    }
    print_matrix(&old, &new, &legend, &modulo);
    Ok(())
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

fn print_keys(old: &HashRing, new: &HashRing, moved: &[MovedRange], key_hashes: &[u64]) {
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
    println!("Keys (\"key0\"..\"key{}\")", key_hashes.len() - 1);
    println!(
        "  moved: {moved_keys} of {} ({})",
        key_hashes.len(),
        percent(moved_keys as f64 / key_hashes.len() as f64)
    );
    println!(
        "  keys whose move disagrees with the ranges: {disagreeing}{}",
        if disagreeing == 0 {
            " (every moved key is in a moved range with its from -> to, no other key is)"
        } else {
            "  <-- BUG"
        }
    );
    println!();
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ring_viz: {message}");
            ExitCode::from(2)
        }
    }
}
