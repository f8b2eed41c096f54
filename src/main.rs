//! The `ringkv` binary: parses flags and environment, then runs one node until SIGTERM.

use std::cell::Cell;
use std::time::{Duration, Instant};

use clap::Parser;
use tracing_subscriber::EnvFilter;

use ringkv::config::{Args, Config};
use ringkv::node::Node;
use ringkv::server;

/// glibc's allocator spent ~10% of a forwarding node's time (malloc_consolidate on the
/// request buffers); mimalloc's thread-local free lists make that a few percent.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's `mi_collect` (the allocator above links it in).
    fn mi_collect(force: bool);
}

/// Least time between two collections on one runtime thread.
const COLLECT_EVERY: Duration = Duration::from_millis(100);

thread_local! {
    static COLLECTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Called when a runtime thread runs out of work (and by the background pool's threads).
/// mimalloc gives the pages freed on a thread back to the OS only when that thread calls
/// into it again (and a page freed by another thread, or one that was full, only on a
/// forced collection), so a thread that went idle after a burst of deletes or a view
/// change's handover kept all it had freed: a node emptied of its keys stayed at its
/// loaded RSS (`tests/memory.rs`). A forced collection visits every page of the thread's
/// heap (tens of microseconds with a million keys), so it runs at most once per
/// [`COLLECT_EVERY`] per thread; [`wake_threads`] makes sure a thread idle since a skipped
/// one parks, and collects, again. Answers whether it collected (`false`: call again).
fn collect_freed_pages() -> bool {
    if ringkv::reclaim::held() {
        // A view change runs: its buffers are wanted again at once (`ringkv::reclaim`).
        return false;
    }
    COLLECTED.with(|last| {
        let now = Instant::now();
        let due = last
            .get()
            .is_none_or(|at| now.duration_since(at) >= COLLECT_EVERY);
        if due {
            last.set(Some(now));
            // SAFETY: mimalloc's collection of the calling thread's heap: no arguments
            // to get wrong, valid on any thread at any time.
            unsafe { mi_collect(true) };
        }
        due
    })
}

/// How long an idle thread of the runtime's blocking pool lives. Such a thread (a commit's,
/// or a runtime thread that handed its work on in `block_in_place`) never parks, so never
/// collects: the pages it took stayed with it while it idled (tokio's default is 10 s).
/// When it ends, mimalloc hands its heap on, and the next forced collection on any
/// thread gives back what is free in it.
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// Every other [`COLLECT_EVERY`], from a thread of its own, hands the runtime a few tasks
/// per thread: each task from outside the runtime wakes an idle thread to run it, so one
/// that went idle within [`COLLECT_EVERY`] of its last collection parks again, and collects.
fn wake_threads(runtime: tokio::runtime::Handle, threads: usize) {
    loop {
        std::thread::sleep(COLLECT_EVERY * 2);
        for _ in 0..threads * 2 {
            runtime.spawn(tokio::task::yield_now());
        }
    }
}

/// Turns transparent huge pages off for this process. mimalloc asks for them on its arenas
/// (`MADV_HUGEPAGE`), and a purge that gives part of a huge page back splits it: the next
/// allocation there faults in, and clears, a whole 2 MiB page again. A profile of a 1M-key
/// view change (`perf record -a`) spent 30% of all CPU in the kernel's `clear_page`.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with an integer option and integer arguments; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        eprintln!("ringkv: transparent huge pages stay on (prctl refused)");
    }
}

fn main() -> std::process::ExitCode {
    no_huge_pages();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .on_thread_park(|| {
            collect_freed_pages();
        })
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build();
    match runtime {
        Ok(runtime) => {
            ringkv::blocking::on_background_idle(collect_freed_pages);
            let handle = runtime.handle().clone();
            let waker = std::thread::Builder::new()
                .name("ringkv-collect".into())
                .spawn(move || wake_threads(handle, threads));
            if let Err(error) = waker {
                tracing::warn!(%error, "no thread to wake idle runtime threads for collection");
            }
            runtime.block_on(run())
        }
        Err(error) => {
            eprintln!("ringkv: cannot start the runtime: {error}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ringkv: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    ringkv::blocking::set_priority(config.transfer_priority);
    let node = match Node::new(config) {
        Ok(node) => node,
        Err(error) => {
            eprintln!("ringkv: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let listener = match server::bind(&node).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("ringkv: cannot listen on {}: {error}", node.config().listen);
            return std::process::ExitCode::from(1);
        }
    };
    let view = node.view();
    tracing::info!(
        listen = %node.config().listen,
        address = %node.address(),
        view = %view.members_text(),
        epoch = view.epoch,
        vnodes = node.config().vnodes,
        forwarding = node.config().forwarding_address.as_deref().unwrap_or("-"),
        "ringkv node started"
    );
    let crashed = node.clone();
    let node_for_exit = node.clone();
    tokio::select! {
        _ = server::serve(node, listener, server::shutdown_signal()) => {}
        _ = crashed.faults().crashed() => {
            // A test's fault hook: end now, as a crash would, with nothing flushed.
            std::process::exit(17);
        }
    }
    if let Some(disk) = node_for_exit.disk() {
        match disk.flush() {
            Ok(()) => {
                tracing::info!(data_dir = ?node_for_exit.data_dir().map(|d| d.path()), "the data directory is on disk")
            }
            Err(error) => tracing::error!(%error, "could not flush the data directory"),
        }
    }
    tracing::info!("stopped");
    // Now, without waiting for blocking tasks (a log effect a test's hook holds, a large
    // commit): in memory mode there is nothing left to write.
    std::process::exit(0)
}
