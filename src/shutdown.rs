//! The signal that tells open HTTP connections to finish their last request and close: a
//! flag read on every poll of a connection without a lock, and the wakers of the
//! connections to wake when it is set.
//!
//! hyper-util's `GracefulShutdown` polls a `tokio::sync::watch` receiver on every poll of a
//! connection, which takes the channel's one waiter lock: on a busy node, a lock shared by
//! every connection on every request. Here a connection registers its waker once (again only
//! if its task's waker changes), and a poll reads one atomic.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};

use parking_lot::Mutex;

/// A connection that can be told to close after the request it serves (hyper's HTTP/1).
pub trait Finish: Future {
    fn finish(self: std::pin::Pin<&mut Self>);
}

impl<I, B, S> Finish for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn finish(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Set once, when the node stops accepting connections.
#[derive(Default)]
pub struct Stop {
    stopped: AtomicBool,
    next_id: AtomicU64,
    /// The connections to wake, by id.
    waiting: Mutex<HashMap<u64, Waker>>,
}

impl Stop {
    /// Tells every connection to finish: each closes after the request it is serving.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for waker in self.waiting.lock().drain().map(|(_, waker)| waker) {
            waker.wake();
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// One connection's registration with a [`Stop`]; removed when it ends.
struct Ticket {
    stop: Arc<Stop>,
    id: u64,
    /// The waker registered, if any.
    registered: Option<Waker>,
}

impl Ticket {
    fn new(stop: Arc<Stop>) -> Ticket {
        let id = stop.next_id.fetch_add(1, Ordering::Relaxed);
        Ticket {
            stop,
            id,
            registered: None,
        }
    }

    /// Whether the node stops; if not, the task of `cx` is woken when it does.
    fn poll_stopped(&mut self, cx: &Context<'_>) -> bool {
        if self.stop.is_stopped() {
            return true;
        }
        if !self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            self.stop.waiting.lock().insert(self.id, waker.clone());
            self.registered = Some(waker);
        }
        // Set while registering: `stop` may have drained the map before the insert.
        self.stop.is_stopped()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.registered.is_some() {
            self.stop.waiting.lock().remove(&self.id);
        }
    }
}

/// Runs `connection` to its end, shutting it down gracefully once `stop` is set.
pub async fn serve_until_stopped<C>(connection: C, stop: Arc<Stop>) -> C::Output
where
    C: Finish,
{
    let mut connection = pin!(connection);
    let mut ticket = Ticket::new(stop);
    let mut asked = false;
    poll_fn(|cx| {
        if !asked && ticket.poll_stopped(cx) {
            asked = true;
            connection.as_mut().finish();
        }
        connection.as_mut().poll(cx)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::pin::Pin;
    use std::task::Poll;

    /// A connection that ends once asked to shut down, and counts its polls.
    struct Idle {
        asked: bool,
        polls: usize,
    }

    impl Future for Idle {
        type Output = Result<usize, std::convert::Infallible>;
        fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            self.polls += 1;
            if self.asked {
                Poll::Ready(Ok(self.polls))
            } else {
                Poll::Pending
            }
        }
    }

    impl Finish for Idle {
        fn finish(mut self: Pin<&mut Self>) {
            self.asked = true;
        }
    }

    #[tokio::test]
    async fn a_waiting_connection_is_woken_and_finishes_when_the_node_stops() {
        let stop = Arc::new(Stop::default());
        let connection = Idle {
            asked: false,
            polls: 0,
        };
        let task = tokio::spawn(serve_until_stopped(connection, stop.clone()));
        // Let the connection register (a yield gives the spawned task a turn).
        while stop.waiting.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        assert!(!task.is_finished());
        stop.stop();
        assert!(task.await.unwrap().is_ok());
        assert!(stop.waiting.lock().is_empty(), "the ticket left on its end");
    }

    #[test]
    fn a_connection_opened_after_the_stop_is_asked_at_its_first_poll() {
        let stop = Arc::new(Stop::default());
        stop.stop();
        let connection = Idle {
            asked: false,
            polls: 0,
        };
        let polls = serve_until_stopped(connection, stop.clone())
            .now_or_never()
            .expect("finished at its first poll")
            .unwrap();
        assert_eq!(polls, 1);
        assert!(stop.waiting.lock().is_empty());
    }
}
