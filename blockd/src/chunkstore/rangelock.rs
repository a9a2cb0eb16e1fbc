//! Block-range locks within one chunk: readers share, writers exclude, only where ranges
//! overlap. A write to blocks 0..4 never waits for a write to blocks 8..12 of the same chunk,
//! yet a read never sees data and checksum from two different writes.

use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
struct State {
    held: Vec<(u32, u32, bool, u64)>,
    next: u64,
    closed: bool,
}

#[derive(Default)]
pub struct RangeLock {
    state: Mutex<State>,
    notify: Notify,
}

/// The lock was closed (the chunk is being deleted).
#[derive(Debug)]
pub struct Closed;

pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    /// Locks blocks `start..end` (exclusive when `excl`), waiting for overlapping holders.
    pub async fn lock(&self, start: u32, end: u32, excl: bool) -> Result<RangeGuard<'_>, Closed> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock().unwrap();
                if s.closed {
                    return Err(Closed);
                }
                let conflict = s
                    .held
                    .iter()
                    .any(|&(a, b, x, _)| a < end && start < b && (x || excl));
                if !conflict {
                    let id = s.next;
                    s.next += 1;
                    s.held.push((start, end, excl, id));
                    return Ok(RangeGuard { lock: self, id });
                }
            }
            notified.await;
        }
    }

    /// Waits until nobody holds any range, then refuses all future locks.
    pub async fn close(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = self.state.lock().unwrap();
                if s.held.is_empty() {
                    s.closed = true;
                    return;
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.lock.state.lock().unwrap();
        s.held.retain(|h| h.3 != self.id);
        drop(s);
        self.lock.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn shared_and_exclusive() {
        let l = Arc::new(RangeLock::default());
        let r1 = l.lock(0, 4, false).await.unwrap();
        let _r2 = l.lock(2, 6, false).await.unwrap(); // readers share
        let _w_other = l.lock(8, 9, true).await.unwrap(); // disjoint writer
        let l2 = l.clone();
        let w = tokio::spawn(async move {
            let _g = l2.lock(3, 4, true).await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!w.is_finished(), "writer must wait for overlapping readers");
        drop(r1);
        drop(_r2);
        tokio::time::timeout(Duration::from_secs(1), w)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn close_waits_then_refuses() {
        let l = Arc::new(RangeLock::default());
        let g = l.lock(0, 1, true).await.unwrap();
        let l2 = l.clone();
        let c = tokio::spawn(async move { l2.close().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!c.is_finished());
        drop(g);
        c.await.unwrap();
        assert!(l.lock(0, 1, false).await.is_err());
    }
}
