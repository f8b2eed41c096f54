//! hyper's header-read timer, armed in tokio's timer wheel about once per timeout window
//! instead of once per request.
//!
//! hyper starts a header-read deadline each time a connection waits for a request head,
//! and drops it once the head is in. With tokio's own timer that is a wheel insertion and a
//! removal (each under the wheel's lock) on every request of a keep-alive connection. Here
//! every deadline of one connection shares one tokio alarm: a deadline that is later than
//! the alarm leaves it alone (the alarm wakes the connection early, the deadline sees it is
//! not due yet and moves the alarm to itself), so a busy connection touches the wheel once
//! per window, and a dropped deadline costs nothing. A deadline polled again by the task
//! the alarm will wake, before its time, returns at once: no clock read, no wheel access.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::time::Sleep;

type Alarm = Arc<Mutex<AlarmState>>;

/// A connection's one wheel entry, and the task it wakes.
#[derive(Default)]
struct AlarmState {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the alarm was last polled with.
    wakes: Option<Waker>,
}

/// One connection's timer (give each connection its own).
#[derive(Clone, Default)]
pub struct HeaderTimer {
    alarm: Alarm,
}

impl hyper::rt::Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline {
            at: deadline.into(),
            alarm: self.alarm.clone(),
        })
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into()
    }
}

/// A deadline handed to hyper: ready once `at` has passed.
struct Deadline {
    at: tokio::time::Instant,
    alarm: Alarm,
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut alarm = self.alarm.lock();
        let AlarmState { sleep, wakes } = &mut *alarm;
        // An alarm that has not rung, due at or before this deadline, will wake this task
        // in time: nothing to check before it rings.
        if let (Some(sleep), Some(wakes)) = (sleep.as_ref(), wakes.as_ref()) {
            if !sleep.is_elapsed() && sleep.deadline() <= self.at && wakes.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        loop {
            if tokio::time::Instant::now() >= self.at {
                return Poll::Ready(());
            }
            let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(self.at)));
            // An alarm due at or before this deadline wakes the task in time; one that rang
            // already, or is due later, is moved here.
            if sleep.is_elapsed() || sleep.deadline() > self.at {
                sleep.as_mut().reset(self.at);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                *wakes = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
    }
}

impl hyper::rt::Sleep for Deadline {}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use hyper::rt::Timer;

    #[tokio::test(start_paused = true)]
    async fn deadlines_ring_on_time_and_share_one_alarm() {
        let timer = HeaderTimer::default();
        let mut first = timer.sleep(Duration::from_secs(10));
        assert!(first.as_mut().now_or_never().is_none());
        drop(first);
        tokio::time::advance(Duration::from_secs(5)).await;
        // Due at 15 s; the alarm still rings at 10 s.
        let mut second = timer.sleep(Duration::from_secs(10));
        assert!(second.as_mut().now_or_never().is_none());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(second.as_mut().now_or_never().is_none(), "not due at 11 s");
        tokio::time::advance(Duration::from_millis(3_999)).await;
        assert!(
            second.as_mut().now_or_never().is_none(),
            "not due at 14.999 s"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(second.as_mut().now_or_never().is_some(), "due at 15 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_deadline_is_woken_when_it_is_due() {
        let timer = HeaderTimer::default();
        // Paused time advances to the next timer only if one is registered: the deadline
        // completes only if its alarm is in the wheel.
        let begun = tokio::time::Instant::now();
        assert!(timer.sleep(Duration::from_secs(3)).now_or_never().is_none());
        timer.sleep(Duration::from_secs(10)).await;
        assert_eq!(begun.elapsed(), Duration::from_secs(10));
    }
}
