//! A connection's bounded outbound queue of shared frames.
//!
//! Bounded in messages and bytes; when full, the oldest frame not yet partly written is dropped
//! (or, under the "close" policy, the push reports an overflow and the caller closes the
//! connection). Frames are `Rc` slices shared with every other subscriber, so a queued frame
//! costs a pointer here, not a copy.

use std::collections::VecDeque;

use crate::codec::Frame;

/// Outcome of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; this many older frames were dropped to make room.
    Queued {
        /// Frames dropped.
        dropped: u32,
    },
    /// The queue is full and the policy forbids dropping.
    Overflow,
}

/// Queue bounds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most frames.
    pub messages: usize,
    /// Most bytes.
    pub bytes: usize,
    /// Drop the oldest frame when full (otherwise report an overflow).
    pub drop_oldest: bool,
}

/// The queue.
#[derive(Debug, Default)]
pub struct OutQueue {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// Bytes of the front frame already written to the socket.
    head_written: usize,
    /// Frames dropped since the client was last told.
    unreported_drops: u64,
    /// One past the last urgent frame: urgent frames keep their own order at the front.
    urgent_end: usize,
}

impl OutQueue {
    /// Queue `frame` within `bounds`.
    pub fn push(&mut self, frame: Frame, bounds: Bounds) -> Pushed {
        let mut dropped = 0;
        while !self.frames.is_empty()
            && (self.frames.len() + 1 > bounds.messages || self.bytes + frame.len() > bounds.bytes)
        {
            if !bounds.drop_oldest {
                return Pushed::Overflow;
            }
            // A partly written frame must finish, or the stream would be corrupt: drop the next.
            let victim = usize::from(self.head_written > 0);
            match self.frames.remove(victim) {
                Some(old) => {
                    if victim < self.urgent_end {
                        self.urgent_end -= 1;
                    }
                    self.bytes -= old.len();
                    dropped += 1;
                }
                None => break,
            }
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        self.unreported_drops += u64::from(dropped);
        Pushed::Queued { dropped }
    }

    /// Queue `frame` ahead of ordinary frames not yet started, after earlier urgent ones
    /// (pongs must answer pings in order).
    pub fn push_urgent(&mut self, frame: Frame) {
        let started = usize::from(self.head_written > 0).min(self.frames.len());
        let at = self.urgent_end.max(started);
        self.bytes += frame.len();
        self.frames.insert(at, frame);
        self.urgent_end = at + 1;
    }

    /// Frames dropped since the last call (the caller tells the client once per burst).
    pub fn take_unreported_drops(&mut self) -> u64 {
        std::mem::take(&mut self.unreported_drops)
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Bytes waiting (not counting what is already written of the front frame).
    pub fn bytes(&self) -> usize {
        self.bytes - self.head_written
    }

    /// Append the unwritten bytes of queued frames to `buf`, front first, whole frames only,
    /// stopping once `buf` holds at least `limit` bytes; returns how many bytes were added.
    pub fn gather(&self, buf: &mut Vec<u8>, limit: usize) -> usize {
        let start = buf.len();
        for (i, frame) in self.frames.iter().enumerate() {
            if buf.len() - start >= limit {
                break;
            }
            let skip = if i == 0 { self.head_written } else { 0 };
            buf.extend_from_slice(&frame[skip..]);
        }
        buf.len() - start
    }

    /// Record that `written` bytes went out; returns how many whole frames were completed.
    pub fn consume(&mut self, mut written: usize) -> usize {
        let mut completed = 0;
        while let Some(front) = self.frames.front() {
            let left = front.len() - self.head_written;
            if written < left {
                self.head_written += written;
                break;
            }
            written -= left;
            self.bytes -= front.len();
            self.head_written = 0;
            self.frames.pop_front();
            self.urgent_end = self.urgent_end.saturating_sub(1);
            completed += 1;
        }
        completed
    }

    /// Give back the slots of an empty queue. Called by the sweeper, not after every write:
    /// a busy connection would otherwise regrow its queue on every burst.
    pub fn shrink_if_idle(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
    }

    /// Heap bytes held for queue slots.
    pub fn slot_bytes(&self) -> usize {
        self.frames.capacity() * std::mem::size_of::<Frame>()
    }

    /// Forget everything queued.
    pub fn clear(&mut self) {
        self.frames = VecDeque::new();
        self.bytes = 0;
        self.head_written = 0;
        self.urgent_end = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn f(n: u8, len: usize) -> Frame {
        Rc::from(vec![n; len])
    }

    const BOUNDS: Bounds = Bounds {
        messages: 3,
        bytes: 100,
        drop_oldest: true,
    };

    fn contents(q: &OutQueue) -> Vec<u8> {
        let mut buf = Vec::new();
        q.gather(&mut buf, usize::MAX);
        buf
    }

    #[test]
    fn drops_oldest_when_full_by_count_or_bytes() {
        let mut q = OutQueue::default();
        for i in 0..3 {
            assert_eq!(q.push(f(i, 10), BOUNDS), Pushed::Queued { dropped: 0 });
        }
        assert_eq!(q.push(f(3, 10), BOUNDS), Pushed::Queued { dropped: 1 });
        assert_eq!(
            contents(&q),
            [vec![1; 10], vec![2; 10], vec![3; 10]].concat()
        );
        // 20 + 90 bytes would exceed 100: one more goes, then 10 + 90 fits exactly.
        assert_eq!(q.push(f(4, 90), BOUNDS), Pushed::Queued { dropped: 2 });
        assert_eq!(q.len(), 2);
        assert_eq!(q.bytes(), 100);
        assert_eq!(q.take_unreported_drops(), 3);
        assert_eq!(q.take_unreported_drops(), 0);
    }

    #[test]
    fn partly_written_frame_is_never_dropped() {
        let mut q = OutQueue::default();
        for i in 0..3 {
            q.push(f(i, 10), BOUNDS);
        }
        assert_eq!(q.consume(4), 0);
        q.push(f(3, 10), BOUNDS);
        assert_eq!(
            contents(&q),
            [vec![0; 6], vec![2; 10], vec![3; 10]].concat()
        );
        assert_eq!(q.bytes(), 26);
        assert_eq!(q.consume(6 + 10), 2);
        assert_eq!(contents(&q), vec![3; 10]);
    }

    #[test]
    fn gather_takes_whole_frames_up_to_the_limit() {
        let mut q = OutQueue::default();
        for i in 0..3 {
            q.push(f(i, 10), BOUNDS);
        }
        q.consume(4);
        let mut buf = Vec::new();
        assert_eq!(
            q.gather(&mut buf, 1),
            6,
            "at least the rest of the first frame"
        );
        buf.clear();
        assert_eq!(q.gather(&mut buf, 7), 16);
        buf.clear();
        assert_eq!(q.gather(&mut buf, 1000), 26);
    }

    #[test]
    fn idle_queue_gives_its_slots_back() {
        let mut q = OutQueue::default();
        for i in 0..3 {
            q.push(f(i, 10), BOUNDS);
        }
        q.shrink_if_idle();
        assert!(q.slot_bytes() > 0, "a queue with frames keeps its slots");
        q.consume(30);
        q.shrink_if_idle();
        assert_eq!(q.slot_bytes(), 0);
    }

    #[test]
    fn close_policy_reports_overflow() {
        let strict = Bounds {
            drop_oldest: false,
            ..BOUNDS
        };
        let mut q = OutQueue::default();
        for i in 0..3 {
            q.push(f(i, 1), strict);
        }
        assert_eq!(q.push(f(9, 1), strict), Pushed::Overflow);
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn urgent_frames_go_first_but_after_a_started_frame() {
        let mut q = OutQueue::default();
        q.push(f(1, 4), BOUNDS);
        q.push_urgent(f(0, 2));
        assert_eq!(contents(&q), vec![0, 0, 1, 1, 1, 1]);
        q.push_urgent(f(5, 1));
        assert_eq!(
            contents(&q),
            vec![0, 0, 5, 1, 1, 1, 1],
            "urgent frames stay in order"
        );
        q.consume(1);
        q.push_urgent(f(7, 1));
        assert_eq!(contents(&q), vec![0, 5, 7, 1, 1, 1, 1]);
        q.consume(3);
        q.push_urgent(f(8, 1));
        assert_eq!(contents(&q), vec![8, 1, 1, 1, 1]);
    }
}
