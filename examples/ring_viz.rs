//! Prints what a view change does to the ring: each node's share before and after, the
//! hash ranges that move (from which node to which), and the same movement under modulo
//! hashing for comparison.
//!
//! ```text
//! cargo run --release --example ring_viz -- --from 2 --to 3 --keys 100000
//! cargo run --release --example ring_viz -- --old 10.0.0.1:80,10.0.0.2:80 \
//!     --new 10.0.0.1:80,10.0.0.2:80,10.0.0.3:80 --vnodes 256
//! ```

use std::process::ExitCode;

use clap::{ArgGroup, Parser};
use ringkv::ring::DEFAULT_VNODES;
use ringkv::viz::{self, generated_view, VizError, SECTIONS};

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

fn run(args: Args) -> Result<String, String> {
    let (old, new, flags) = match (args.from, args.to) {
        (Some(n), Some(m)) => (generated_view(n), generated_view(m), ["--from", "--to"]),
        _ => (args.old, args.new, ["--old", "--new"]),
    };
    viz::render(&old, Some(&new), args.vnodes, args.keys.unwrap_or(0)).map_err(
        |error| match error {
            VizError::Old(e) => format!("{}: {e}", flags[0]),
            VizError::New(e) => format!("{}: {e}", flags[1]),
            other => other.to_string(),
        },
    )
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(text) => match viz::print_text(&text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ring_viz: cannot write the output: {error}");
                ExitCode::FAILURE
            }
        },
        Err(message) => {
            eprintln!("ring_viz: {message}");
            ExitCode::from(2)
        }
    }
}
