//! Running a CPU-bound pass (a scan of a store, a batch of a transfer) without holding up
//! requests: beside the runtime's threads ([`off_runtime`]), or on background threads the
//! OS runs only on a core that no request needs ([`in_background`]).

use std::collections::VecDeque;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Runs `scan` (a pass over a whole store or a slice of it, a batch of keys) so that it
/// does not hold up the other tasks of its runtime thread (requests, the log's heartbeats):
/// on a multi-threaded runtime they move to another thread meanwhile.
pub fn off_runtime<R>(scan: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(scan),
        _ => scan(),
    }
}

/// Runs `job` on the background pool and waits for it; a panic in it resumes here.
///
/// The pool's threads run at the OS's idle priority (Linux `SCHED_IDLE`; elsewhere, or
/// where that is refused, the lowest nice level): a request thread that wakes up takes the
/// core from them at once, so a view change's bulk transfer (reading batches out of the
/// store, taking them in) uses what the requests leave idle. A job that has waited
/// [`STARVED`] (the requests keep every core busy) is run by a thread of normal priority,
/// one at a time: the work goes on at a bounded share of a core however busy the node is.
/// `cargo bench --bench reshard` measures what readers see during a change. Without a pool
/// (its threads could not start) the job runs beside the runtime, as [`off_runtime`].
pub async fn in_background<R: Send + 'static>(job: impl FnOnce() -> R + Send + 'static) -> R {
    in_background_at(priority(), job).await
}

/// [`in_background`] at `priority`: [`TransferPriority::Normal`] runs the job beside the
/// runtime, as [`off_runtime`].
async fn in_background_at<R: Send + 'static>(
    priority: TransferPriority,
    job: impl FnOnce() -> R + Send + 'static,
) -> R {
    match (priority, pool()) {
        (TransferPriority::Idle, Some(pool)) => pool.run(job).await,
        _ => off_runtime(job),
    }
}

/// At what priority a view change's bulk transfer runs (`--transfer-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TransferPriority {
    /// On the background pool: requests first, the transfer in what they leave idle (and
    /// at a bounded share of a core when they leave nothing).
    #[default]
    Idle,
    /// Beside the runtime at normal priority: as fast as the cores allow, sharing them
    /// with requests (readers' p99 rises several times during a change on a busy node).
    Normal,
}

static NORMAL: AtomicBool = AtomicBool::new(false);

/// Sets the priority of [`in_background`] jobs for this process.
pub fn set_priority(priority: TransferPriority) {
    NORMAL.store(priority == TransferPriority::Normal, Ordering::Relaxed);
}

fn priority() -> TransferPriority {
    match NORMAL.load(Ordering::Relaxed) {
        true => TransferPriority::Normal,
        false => TransferPriority::Idle,
    }
}

/// Sets what a background thread calls when it has had no job for [`IDLE_AFTER`] since
/// its last one (the binary gives the allocator's freed pages back to the OS there, as its
/// runtime threads do when they park). The hook answers whether it is done: one that
/// answers `false` (it may not give memory back yet) is called again after each further
/// [`IDLE_AFTER`] without a job. Only the first call counts, and only before the first
/// background job (the pool takes the hook when it starts).
pub fn on_background_idle(hook: fn() -> bool) {
    let _ = IDLE_HOOK.set(hook);
}

/// How long a background thread waits without a job before it calls the idle hook.
const IDLE_AFTER: Duration = Duration::from_millis(200);

/// How long a job may wait for an idle-priority thread before the normal-priority one
/// takes it.
pub const STARVED: Duration = Duration::from_millis(5);

type Job = Box<dyn FnOnce() + Send>;

static POOL: OnceLock<Option<Pool>> = OnceLock::new();
static IDLE_HOOK: OnceLock<fn() -> bool> = OnceLock::new();

/// Jobs waiting for a background thread, each with when it came.
#[derive(Default)]
struct Queue {
    /// Called by a thread idle since its last job (see [`on_background_idle`]).
    idle_hook: Option<fn() -> bool>,
    jobs: Mutex<VecDeque<(Instant, Job)>>,
    /// Signalled for each job that comes (wakes an idle-priority thread).
    more: Condvar,
    /// Signalled when a job comes to an empty queue (wakes the normal-priority thread).
    first: Condvar,
}

struct Pool {
    queue: Arc<Queue>,
}

impl Queue {
    /// Runs `job`, or without one calls the idle hook (if there is one); whether the
    /// thread still owes the hook a call (a job ran, or the hook was not done).
    fn run_or_idle(&self, job: Option<Job>) -> bool {
        match job {
            Some(job) => {
                job();
                true
            }
            None => !self.idle_hook.is_none_or(|hook| hook()),
        }
    }
}

impl Pool {
    /// `idle` threads of idle priority and one of normal priority for starved jobs, each
    /// calling `idle_hook` when idle after a job.
    fn start(idle: usize, idle_hook: Option<fn() -> bool>) -> Option<Pool> {
        let queue = Arc::new(Queue {
            idle_hook,
            ..Queue::default()
        });
        let started = (0..idle)
            .filter(|i| {
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("ringkv-bg-{i}"))
                    .spawn(move || work(&queue))
                    .is_ok()
            })
            .count();
        let rescuer = queue.clone();
        let rescuing = std::thread::Builder::new()
            .name("ringkv-bg-starved".into())
            .spawn(move || rescue(&rescuer));
        (started == idle && rescuing.is_ok()).then_some(Pool { queue })
    }

    fn push(&self, job: Job) {
        let mut jobs = self.queue.jobs.lock();
        if jobs.is_empty() {
            self.queue.first.notify_one();
        }
        jobs.push_back((Instant::now(), job));
        drop(jobs);
        self.queue.more.notify_one();
    }

    async fn run<R: Send + 'static>(&self, job: impl FnOnce() -> R + Send + 'static) -> R {
        let (done, result) = tokio::sync::oneshot::channel();
        self.push(Box::new(move || {
            let _ = done.send(catch_unwind(AssertUnwindSafe(job)));
        }));
        match result.await {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => resume_unwind(panic),
            // The pool's threads catch every panic and never drop a job unrun.
            Err(_) => unreachable!("a background job ends by sending its result"),
        }
    }
}

/// The pool, started on first use: one idle-priority thread per core and one of normal
/// priority for starved jobs.
fn pool() -> Option<&'static Pool> {
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = Pool::start(threads, IDLE_HOOK.get().copied());
        if pool.is_none() {
            tracing::warn!("background threads did not start: bulk work runs beside the runtime");
        }
        pool
    })
    .as_ref()
}

/// An idle-priority thread: runs jobs as they come, and the idle hook once it has been
/// idle for [`IDLE_AFTER`] after one (again after each further [`IDLE_AFTER`] until the
/// hook is done).
fn work(queue: &Queue) {
    lower_priority();
    // Whether the idle hook is owed a call ([`Queue::run_or_idle`]).
    let mut owing = false;
    loop {
        let job = {
            let mut jobs = queue.jobs.lock();
            loop {
                if let Some((_, job)) = jobs.pop_front() {
                    break Some(job);
                }
                if queue.more.wait_for(&mut jobs, IDLE_AFTER).timed_out() && owing {
                    break None;
                }
            }
        };
        owing = queue.run_or_idle(job);
    }
}

/// The normal-priority thread: runs, one at a time, each job that waited [`STARVED`], and
/// the idle hook as [`work`] does (a busy node's transfer runs here, and the pages its
/// batches took are this thread's to give back).
fn rescue(queue: &Queue) {
    let mut owing = false;
    loop {
        let job = {
            let mut jobs = queue.jobs.lock();
            loop {
                let waited = jobs.front().map(|(came, _)| came.elapsed());
                match waited {
                    Some(waited) if waited >= STARVED => break jobs.pop_front(),
                    Some(waited) => {
                        queue.first.wait_for(&mut jobs, STARVED - waited);
                    }
                    None if owing => {
                        if queue.first.wait_for(&mut jobs, IDLE_AFTER).timed_out()
                            && jobs.is_empty()
                        {
                            break None;
                        }
                    }
                    None => queue.first.wait(&mut jobs),
                }
            }
        };
        owing = queue.run_or_idle(job.map(|(_, job)| job));
    }
}

/// Puts the calling thread at the OS's idle priority.
#[cfg(target_os = "linux")]
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on the calling thread (pid 0), with a valid parameter.
    let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
    if !idle && unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
        tracing::warn!("background thread runs at normal priority: SCHED_IDLE and nice refused");
    }
}

/// Puts the calling thread at the lowest nice level.
#[cfg(all(unix, not(target_os = "linux")))]
fn lower_priority() {
    // SAFETY: a plain system call on the calling process, with valid arguments.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
}

#[cfg(not(unix))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_jobs_return_their_result_and_their_panic() {
        let name = in_background(|| std::thread::current().name().map(String::from)).await;
        assert!(name.is_some_and(|n| n.starts_with("ringkv-bg-")));
        let joined: Vec<u64> =
            futures_util::future::join_all((0..64u64).map(|i| in_background(move || i * i))).await;
        assert_eq!(joined, (0..64u64).map(|i| i * i).collect::<Vec<_>>());
        let panicked = tokio::spawn(in_background(|| -> u8 { panic!("boom") })).await;
        assert!(panicked.is_err_and(|e| e.is_panic()));
    }

    #[tokio::test]
    async fn at_normal_priority_a_job_runs_on_the_calling_thread() {
        let here = std::thread::current().id();
        let ran = in_background_at(TransferPriority::Normal, || std::thread::current().id());
        assert_eq!(ran.await, here);
    }

    #[tokio::test]
    async fn a_starved_job_runs_on_the_normal_priority_thread() {
        // No idle-priority thread: every job starves.
        let pool = Pool::start(0, None).unwrap();
        let came = Instant::now();
        let (name, waited) = pool
            .run(move || {
                (
                    std::thread::current().name().map(String::from),
                    came.elapsed(),
                )
            })
            .await;
        assert_eq!(name.as_deref(), Some("ringkv-bg-starved"));
        assert!(waited >= STARVED, "ran after {waited:?}");
    }

    #[tokio::test]
    async fn a_thread_calls_the_idle_hook_again_until_it_is_done() {
        // The hook may not give memory back for its first two calls (a view change ran).
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn hook() -> bool {
            CALLS.fetch_add(1, Ordering::SeqCst) >= 2
        }
        // Only the normal-priority thread, the one that runs a busy node's transfer.
        let pool = Pool::start(0, Some(hook)).unwrap();
        pool.run(|| ()).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while CALLS.load(Ordering::SeqCst) < 3 {
            assert!(
                Instant::now() < deadline,
                "the hook was called {} times",
                CALLS.load(Ordering::SeqCst)
            );
            tokio::time::sleep(IDLE_AFTER / 4).await;
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn background_threads_run_at_idle_priority() {
        // A job the busy test machine starved runs at normal priority: wait for one that
        // an idle-priority thread ran.
        loop {
            let (name, policy) = in_background(|| {
                let name = std::thread::current().name().map(String::from);
                // SAFETY: a plain system call on the calling thread.
                (name, unsafe { libc::sched_getscheduler(0) })
            })
            .await;
            if name.as_deref() != Some("ringkv-bg-starved") {
                assert_eq!(policy, libc::SCHED_IDLE);
                break;
            }
        }
    }
}
