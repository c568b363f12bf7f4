//! A `select!` branch whose futures are polled only when one of them woke the task.
//!
//! The connection's task is woken two or three times per request, nearly always for hyper's
//! connection. A plain `select!` then polls every branch again: the shutdown `watch`, the
//! activity `Notify` (each poll takes the `Notify`'s lock to compare wakers) and the timer,
//! ~600 instructions per request for branches that had nothing to say. Branches behind
//! `Woken` are polled with a waker of their own, which marks them and wakes the task; on any
//! other wake-up they cost an atomic swap and a waker registration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

struct Flag {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

pub(super) struct Woken {
    flag: Arc<Flag>,
    waker: Waker,
}

impl Woken {
    pub(super) fn new() -> Self {
        let flag = Arc::new(Flag {
            fired: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Woken { flag, waker }
    }

    /// The next `poll` polls the future whether or not it was woken: for a future made anew, or
    /// one changed by its owner (a timer set again), which has not yet registered this waker.
    pub(super) fn again(&self) {
        self.flag.fired.store(true, Ordering::Release);
    }

    /// Runs `poll` (which polls the branch's futures) if they were woken, or `again` asked,
    /// since it last ran.
    pub(super) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // Registered before the flag is taken: a wake between the two still reaches the task.
        self.flag.task.register(cx.waker());
        if !self.flag.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;

    /// A future that counts its polls and hands out the waker it was given.
    #[derive(Default)]
    struct Probe {
        polls: usize,
        waker: Option<Waker>,
        ready: bool,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls += 1;
            self.waker = Some(cx.waker().clone());
            if self.ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    /// Polls `probe` through `branch`, with the task's waker `task`.
    fn poll_probe(branch: &Woken, task: &Waker, probe: &mut Probe) -> Poll<()> {
        branch.poll(&mut Context::from_waker(task), |cx| {
            Pin::new(probe).poll(cx)
        })
    }

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polls_only_first_and_after_its_own_wake() {
        let task = Arc::new(Count::default());
        let task_waker = Waker::from(task.clone());
        let branch = Woken::new();
        let mut probe = Probe::default();

        assert!(poll_probe(&branch, &task_waker, &mut probe).is_pending());
        assert_eq!(probe.polls, 1, "a new branch is polled");
        // Woken for something else: the branch is not polled.
        assert!(poll_probe(&branch, &task_waker, &mut probe).is_pending());
        assert!(poll_probe(&branch, &task_waker, &mut probe).is_pending());
        assert_eq!(probe.polls, 1);

        // Its own waker fires: the task is woken, and the branch is polled once.
        probe.ready = true;
        probe.waker.take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(poll_probe(&branch, &task_waker, &mut probe).is_ready());
        assert_eq!(probe.polls, 2);
    }

    #[test]
    fn again_polls_a_future_that_has_not_been_woken() {
        let task_waker = Waker::from(Arc::new(Count::default()));
        let branch = Woken::new();
        let mut first = Probe::default();
        assert!(poll_probe(&branch, &task_waker, &mut first).is_pending());
        // A new future in the branch's place.
        let mut next = Probe::default();
        branch.again();
        assert!(poll_probe(&branch, &task_waker, &mut next).is_pending());
        assert_eq!(next.polls, 1);
        assert!(poll_probe(&branch, &task_waker, &mut next).is_pending());
        assert_eq!(next.polls, 1);
    }

    #[test]
    fn a_wake_reaches_the_latest_task_waker() {
        let branch = Woken::new();
        let mut probe = Probe::default();
        let old = Arc::new(Count::default());
        let old_waker = Waker::from(old.clone());
        assert!(poll_probe(&branch, &old_waker, &mut probe).is_pending());
        // The task moved on with another waker (hyper's, a new runtime tick): the branch's wake
        // must reach that one.
        let new = Arc::new(Count::default());
        let new_waker = Waker::from(new.clone());
        assert!(poll_probe(&branch, &new_waker, &mut probe).is_pending());
        probe.waker.take().unwrap().wake_by_ref();
        assert_eq!(new.0.load(Ordering::SeqCst), 1);
        assert_eq!(old.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_behind_a_branch_fires_and_so_does_one_set_again() {
        use std::time::Duration;
        use tokio::time::{timeout, Instant};
        let branch = Woken::new();
        let start = Instant::now();
        let timer = tokio::time::sleep_until(start + Duration::from_millis(100));
        tokio::pin!(timer);
        let fired = std::future::poll_fn(|cx| branch.poll(cx, |cx| timer.as_mut().poll(cx)));
        timeout(Duration::from_secs(1), fired)
            .await
            .expect("the timer's wake reached the task");
        assert_eq!(start.elapsed(), Duration::from_millis(100));

        timer
            .as_mut()
            .reset(Instant::now() + Duration::from_millis(50));
        branch.again();
        let fired = std::future::poll_fn(|cx| branch.poll(cx, |cx| timer.as_mut().poll(cx)));
        timeout(Duration::from_secs(1), fired)
            .await
            .expect("the timer set again fired");
        assert_eq!(start.elapsed(), Duration::from_millis(150));
    }
}
