//! A connection's bounded outbound queue of shared frames.
//!
//! One FIFO holds two classes of frame. Fan-out frames (messages on subscribed channels) are
//! bounded in messages and bytes; when full, the oldest fan-out frame not yet partly written is
//! dropped (or, under the "close" policy, the push reports an overflow and the caller closes
//! the connection), and the client is told with one coalesced `slow_consumer` notice that goes
//! ahead of everything not yet started and is never dropped itself. Replies (the answers to the
//! client's own requests, control frames, the close frame) are never dropped: their bound is
//! the connection's reply budget, which the reader enforces by not reading more requests while
//! the budget is spent (see [`OutQueue::replies_over`]). Frames are `Rc` slices shared with
//! every other subscriber, so a queued frame costs a slot here, not a copy.

use std::collections::VecDeque;

use crate::codec::Frame;

/// Outcome of a fan-out push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; this many older fan-out frames were dropped to make room.
    Queued {
        /// Frames dropped.
        dropped: u32,
    },
    /// The queue is full and the policy forbids dropping.
    Overflow,
}

/// Fan-out bounds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most fan-out frames.
    pub messages: usize,
    /// Most fan-out bytes.
    pub bytes: usize,
    /// Drop the oldest fan-out frame when full (otherwise report an overflow).
    pub drop_oldest: bool,
}

/// How many replies may wait for a client that is not reading before its requests stop
/// being read.
#[derive(Debug, Clone, Copy)]
pub struct ReplyBudget {
    /// Most reply frames.
    pub messages: usize,
    /// Most reply bytes.
    pub bytes: usize,
}

/// What a queued frame that is not fan-out is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// An answer, a control frame or the close frame: never dropped.
    Reply,
    /// The `slow_consumer` notice: never dropped, at most one waiting.
    Notice,
    /// An HTTP response (or the `101` of an upgrade): never dropped, and not a message, so
    /// not counted among those written.
    Http,
}

/// The queue. Frames are kept as bare shared slices (16 bytes a slot, as fan-out alone needs);
/// the few that are not fan-out are listed beside them by position, so a queue holding only
/// fan-out frames (the hot case) does exactly what a plain drop-oldest queue does.
#[derive(Debug, Default)]
pub struct OutQueue {
    frames: VecDeque<Frame>,
    /// Bytes of every queued frame, whole.
    bytes: usize,
    /// The frames that are not fan-out (boxed: most of the time there are none, and every
    /// connection has a queue).
    kept: Option<Box<KeptList>>,
    /// Frames taken off the front so far (written, or dropped from the front).
    popped: u64,
    /// Bytes of the front frame already written to the socket.
    head_written: usize,
    /// Fan-out frames dropped and not yet reported to the client.
    unreported_drops: u64,
    /// A notice is queued and not yet fully written (later drops wait for the next one).
    notice_queued: bool,
    /// One past the last urgent frame: urgent frames keep their own order at the front.
    urgent_end: usize,
}

/// Frames that are not fan-out, in queue order, by absolute position (a frame's position is
/// the queue's `popped` plus its index), and their bytes.
#[derive(Debug, Default)]
struct KeptList {
    at: VecDeque<(u64, Kept)>,
    bytes: usize,
}

impl OutQueue {
    /// Queue a fan-out `frame` within `bounds`, dropping the oldest fan-out frames if need be.
    pub fn push(&mut self, frame: Frame, bounds: Bounds) -> Pushed {
        let mut dropped = 0;
        // Within bounds counting every frame, fan-out alone is within them too (the usual case).
        let fits = self.frames.len() < bounds.messages && self.bytes + frame.len() <= bounds.bytes;
        if !fits {
            loop {
                let (fanout, fanout_bytes) = self.fanout();
                if fanout == 0
                    || (fanout < bounds.messages && fanout_bytes + frame.len() <= bounds.bytes)
                {
                    break;
                }
                if !bounds.drop_oldest {
                    return Pushed::Overflow;
                }
                let Some(victim) = self.oldest_droppable() else {
                    break;
                };
                let old = if victim == 0 {
                    self.frames.pop_front()
                } else {
                    self.frames.remove(victim)
                };
                if let Some(old) = old {
                    self.bytes -= old.len();
                    self.removed(victim);
                    dropped += 1;
                }
            }
        }
        self.unreported_drops += u64::from(dropped);
        self.bytes += frame.len();
        self.frames.push_back(frame);
        Pushed::Queued { dropped }
    }

    /// Queue a reply after everything queued: it is never dropped.
    pub fn push_reply(&mut self, frame: Frame) {
        self.push_kept(frame, Kept::Reply);
    }

    /// Queue an HTTP response after everything queued: never dropped, and not counted as a
    /// message when written.
    pub fn push_http(&mut self, frame: Frame) {
        self.push_kept(frame, Kept::Http);
    }

    fn push_kept(&mut self, frame: Frame, kind: Kept) {
        let at = self.popped + self.frames.len() as u64;
        self.keep(at, kind, frame.len());
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Queue a control frame ahead of frames not yet started, after earlier urgent ones
    /// (pongs must answer pings in order); it is never dropped.
    pub fn push_urgent(&mut self, frame: Frame) {
        self.insert_urgent(frame, Kept::Reply);
    }

    /// If fan-out frames were dropped since the client was last told and no notice is waiting,
    /// queue one (made by `notice` from the count) ahead of what it reports. Drops that happen
    /// while a notice waits are told in the next one, so the client learns every drop, once.
    pub fn queue_notice(&mut self, notice: impl FnOnce(u64) -> Frame) {
        if self.unreported_drops == 0 || self.notice_queued {
            return;
        }
        let frame = notice(std::mem::take(&mut self.unreported_drops));
        self.notice_queued = true;
        self.insert_urgent(frame, Kept::Notice);
    }

    /// Fan-out frames dropped and not yet reported.
    pub fn unreported_drops(&self) -> u64 {
        self.unreported_drops
    }

    /// True when the replies waiting (answers, control frames, the drop notice) have spent
    /// `budget`: the connection should read no more requests until they are written.
    pub fn replies_over(&self, budget: ReplyBudget) -> bool {
        let (n, bytes) = self.kept_totals();
        n >= budget.messages || bytes >= budget.bytes
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

    /// Fan-out frames waiting, and their bytes (what [`Bounds`] limits).
    pub fn fanout(&self) -> (usize, usize) {
        let (n, bytes) = self.kept_totals();
        (self.frames.len() - n, self.bytes - bytes)
    }

    /// Append the unwritten bytes of queued frames to `buf`, front first, whole frames only,
    /// stopping once `buf` holds at least `limit` bytes, or after a drop notice (so that drops
    /// made while it was queued are told, by the next one, before anything that follows it);
    /// returns how many bytes were added.
    pub fn gather(&self, buf: &mut Vec<u8>, limit: usize) -> usize {
        let start = buf.len();
        let notice = if self.notice_queued {
            self.kept_positions()
                .find(|(_, kind)| *kind == Kept::Notice)
                .map(|(at, _)| (at - self.popped) as usize)
        } else {
            None
        };
        for (i, frame) in self.frames.iter().enumerate() {
            if buf.len() - start >= limit {
                break;
            }
            let skip = if i == 0 { self.head_written } else { 0 };
            buf.extend_from_slice(&frame[skip..]);
            if notice == Some(i) {
                break;
            }
        }
        buf.len() - start
    }

    /// The newest queued frame.
    #[cfg(test)]
    pub fn back(&self) -> Option<&Frame> {
        self.frames.back()
    }

    /// Record that `written` bytes went out; returns how many whole messages (frames other
    /// than HTTP responses) were completed.
    pub fn consume(&mut self, mut written: usize) -> usize {
        let mut completed = 0;
        while let Some(front) = self.frames.front() {
            let left = front.len() - self.head_written;
            if written < left {
                self.head_written += written;
                break;
            }
            written -= left;
            self.head_written = 0;
            let mut message = true;
            if let Some(done) = self.frames.pop_front() {
                self.bytes -= done.len();
                let popped = self.popped;
                if let Some(kept) = self.kept.as_mut() {
                    if kept.at.front().is_some_and(|(at, _)| *at == popped) {
                        if let Some((_, kind)) = kept.at.pop_front() {
                            kept.bytes -= done.len();
                            match kind {
                                Kept::Notice => self.notice_queued = false,
                                Kept::Http => message = false,
                                Kept::Reply => {}
                            }
                        }
                    }
                }
            }
            self.popped += 1;
            self.urgent_end = self.urgent_end.saturating_sub(1);
            completed += usize::from(message);
        }
        completed
    }

    /// Give back the slots of an empty queue. Called by the sweeper, not after every write:
    /// a busy connection would otherwise regrow its queue on every burst.
    pub fn shrink_if_idle(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
            self.kept = None;
        }
    }

    /// Heap bytes held for queue slots.
    pub fn slot_bytes(&self) -> usize {
        let kept = self.kept.as_ref().map_or(0, |k| {
            std::mem::size_of::<KeptList>() + k.at.capacity() * std::mem::size_of::<(u64, Kept)>()
        });
        self.frames.capacity() * std::mem::size_of::<Frame>() + kept
    }

    /// Forget everything queued (the connection is closing and will say so), but the rest of
    /// a frame partly written: cut short, it would corrupt the stream.
    pub fn clear(&mut self) {
        let popped = self.popped;
        let kind = self
            .kept_positions()
            .find(|(at, _)| *at == popped)
            .map_or(Kept::Reply, |(_, kind)| kind);
        let started = if self.head_written > 0 {
            self.frames.pop_front()
        } else {
            None
        };
        let head_written = self.head_written;
        *self = Self::default();
        if let Some(frame) = started {
            self.head_written = head_written;
            // A started notice becomes a plain reply: the notice bookkeeping starts afresh.
            let kind = if kind == Kept::Http {
                kind
            } else {
                Kept::Reply
            };
            self.push_kept(frame, kind);
        }
    }

    fn insert_urgent(&mut self, frame: Frame, kind: Kept) {
        let started = usize::from(self.head_written > 0).min(self.frames.len());
        let at = self.urgent_end.max(started);
        // Frames from `at` on move back one place.
        let absolute = self.popped + at as u64;
        if let Some(kept) = self.kept.as_mut() {
            for (position, _) in kept.at.iter_mut().filter(|(p, _)| *p >= absolute) {
                *position += 1;
            }
        }
        self.keep(absolute, kind, frame.len());
        self.bytes += frame.len();
        self.frames.insert(at, frame);
        self.urgent_end = at + 1;
    }

    /// List a frame that is not fan-out, keeping the list in queue order.
    fn keep(&mut self, at: u64, kind: Kept, len: usize) {
        let kept = self.kept.get_or_insert_with(Default::default);
        let index = kept.at.partition_point(|(p, _)| *p < at);
        kept.at.insert(index, (at, kind));
        kept.bytes += len;
    }

    /// How many frames are kept, and their bytes.
    fn kept_totals(&self) -> (usize, usize) {
        self.kept.as_ref().map_or((0, 0), |k| (k.at.len(), k.bytes))
    }

    fn kept_positions(&self) -> impl Iterator<Item = (u64, Kept)> + '_ {
        self.kept.iter().flat_map(|k| k.at.iter().copied())
    }

    /// The frame at index `index` was dropped (a fan-out frame): later ones move up.
    fn removed(&mut self, index: usize) {
        if index < self.urgent_end {
            self.urgent_end -= 1;
        }
        if index == 0 {
            // Off the front: positions stay, the front moves on.
            self.popped += 1;
            return;
        }
        let absolute = self.popped + index as u64;
        if let Some(kept) = self.kept.as_mut() {
            for (position, _) in kept.at.iter_mut().filter(|(p, _)| *p > absolute) {
                *position -= 1;
            }
        }
    }

    /// Index of the oldest fan-out frame that may be dropped (not partly written).
    fn oldest_droppable(&self) -> Option<usize> {
        let start = usize::from(self.head_written > 0);
        if self.kept_totals().0 == 0 {
            // Only fan-out frames: the answer needs no search (the common case).
            return (start < self.frames.len()).then_some(start);
        }
        // Kept frames are few (the reply budget bounds them): walk past them in step.
        let mut kept = self
            .kept_positions()
            .map(|(p, _)| (p - self.popped) as usize)
            .peekable();
        (start..self.frames.len()).find(|&i| {
            while kept.next_if(|&k| k < i).is_some() {}
            kept.peek() != Some(&i)
        })
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

    /// Every unwritten byte queued, in order.
    fn contents(q: &OutQueue) -> Vec<u8> {
        let mut buf = Vec::new();
        for (i, frame) in q.frames.iter().enumerate() {
            let skip = if i == 0 { q.head_written } else { 0 };
            buf.extend_from_slice(&frame[skip..]);
        }
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
        assert_eq!(q.unreported_drops(), 3);
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
    fn replies_are_never_dropped_and_keep_their_place() {
        let mut q = OutQueue::default();
        q.push(f(1, 10), BOUNDS);
        q.push_reply(f(100, 1));
        q.push(f(2, 10), BOUNDS);
        q.push_reply(f(101, 1));
        for i in 3..10 {
            q.push(f(i, 10), BOUNDS);
        }
        // Only fan-out frames went; the replies stay where they were sent.
        assert_eq!(
            contents(&q),
            [vec![100], vec![101], vec![7; 10], vec![8; 10], vec![9; 10]].concat()
        );
        assert_eq!(q.fanout(), (3, 30));
        assert_eq!(q.unreported_drops(), 6);
    }

    #[test]
    fn replies_spend_the_budget_fanout_does_not() {
        let budget = ReplyBudget {
            messages: 2,
            bytes: 50,
        };
        let mut q = OutQueue::default();
        for i in 0..3 {
            q.push(f(i, 40), BOUNDS);
        }
        q.push_reply(f(9, 5));
        assert!(!q.replies_over(budget));
        q.push_urgent(f(8, 2));
        assert!(
            q.replies_over(budget),
            "two replies spend a two-frame budget"
        );
        q.consume(2);
        assert!(!q.replies_over(budget));
        q.push_reply(f(7, 45));
        assert!(q.replies_over(budget), "50 bytes spend a 50-byte budget");
    }

    #[test]
    fn one_drop_notice_goes_first_and_counts_every_drop() {
        let notice = |n: u64| f(200 + n as u8, 1);
        let mut q = OutQueue::default();
        for i in 0..5 {
            q.push(f(i, 10), BOUNDS);
        }
        q.queue_notice(notice);
        assert_eq!(contents(&q)[0], 202, "ahead of what it reports");
        // More drops while it waits: it is neither dropped nor doubled.
        for i in 5..10 {
            q.push(f(i, 10), BOUNDS);
        }
        q.queue_notice(notice);
        assert_eq!(
            contents(&q),
            [vec![202], vec![7; 10], vec![8; 10], vec![9; 10]].concat()
        );
        // A send ends with it, so the next notice, with the drops since, comes before the rest.
        let mut sent = Vec::new();
        q.gather(&mut sent, usize::MAX);
        assert_eq!(sent, [202]);
        q.consume(1);
        q.queue_notice(notice);
        assert_eq!(contents(&q)[0], 205);
        assert_eq!(q.unreported_drops(), 0);
    }

    #[test]
    fn http_responses_are_written_but_not_counted_as_messages() {
        let mut q = OutQueue::default();
        q.push_http(f(1, 10));
        q.push_reply(f(2, 5));
        q.push(f(3, 5), BOUNDS);
        q.push_http(f(4, 10));
        // The response, the reply, the message; then half of the second response.
        assert_eq!(q.consume(25), 2);
        q.clear();
        assert_eq!(q.len(), 1, "the started response is kept");
        assert_eq!(q.consume(5), 0, "and is still not a message");
        assert!(q.is_empty());
    }

    #[test]
    fn clearing_keeps_the_rest_of_a_started_frame() {
        let mut q = OutQueue::default();
        q.push(f(1, 10), BOUNDS);
        q.push_reply(f(2, 10));
        q.consume(4);
        q.clear();
        q.push_reply(f(3, 1));
        assert_eq!(contents(&q), [vec![1; 6], vec![3]].concat());
        assert_eq!(q.fanout(), (0, 0));
        assert_eq!(q.consume(7), 2);
        assert!(q.is_empty());
    }

    /// The queue against a plain model (a list of frames with their class), over a long
    /// pseudo-random mix of pushes, replies, urgent frames, notices and partial writes.
    #[test]
    fn matches_a_plain_model() {
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum C {
            F,
            R,
        }
        let bounds = Bounds {
            messages: 5,
            bytes: 60,
            drop_oldest: true,
        };
        let mut q = OutQueue::default();
        // (byte value, length, class), front first; `written` bytes of the front are out.
        let mut model: Vec<(u8, usize, C)> = Vec::new();
        let (mut written, mut urgent_end) = (0usize, 0usize);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for step in 0..20_000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let v = (step % 251) as u8;
            let len = 1 + (seed >> 8) as usize % 12;
            match seed % 6 {
                0 | 1 => {
                    q.push(f(v, len), bounds);
                    let fanout = |m: &Vec<(u8, usize, C)>| {
                        let n = m.iter().filter(|e| e.2 == C::F).count();
                        let b: usize = m.iter().filter(|e| e.2 == C::F).map(|e| e.1).sum();
                        (n, b)
                    };
                    loop {
                        let (n, b) = fanout(&model);
                        if n == 0 || (n < bounds.messages && b + len <= bounds.bytes) {
                            break;
                        }
                        let start = usize::from(written > 0);
                        let Some(i) = (start..model.len()).find(|&i| model[i].2 == C::F) else {
                            break;
                        };
                        model.remove(i);
                        if i < urgent_end {
                            urgent_end -= 1;
                        }
                    }
                    model.push((v, len, C::F));
                }
                2 => {
                    q.push_reply(f(v, len));
                    model.push((v, len, C::R));
                }
                3 => {
                    q.push_urgent(f(v, len));
                    let at = urgent_end.max(usize::from(written > 0).min(model.len()));
                    model.insert(at, (v, len, C::R));
                    urgent_end = at + 1;
                }
                _ => {
                    let n = (seed >> 20) as usize % 30;
                    q.consume(n);
                    let mut n = n;
                    while let Some(front) = model.first() {
                        let left = front.1 - written;
                        if n < left {
                            written += n;
                            break;
                        }
                        n -= left;
                        written = 0;
                        model.remove(0);
                        urgent_end = urgent_end.saturating_sub(1);
                    }
                }
            }
            let mut expect = Vec::new();
            for (i, (v, len, _)) in model.iter().enumerate() {
                let skip = if i == 0 { written } else { 0 };
                expect.extend(std::iter::repeat_n(*v, len - skip));
            }
            assert_eq!(contents(&q), expect, "step {step}");
            let replies = model.iter().filter(|e| e.2 == C::R).count();
            assert_eq!(q.len() - q.fanout().0, replies, "step {step}");
        }
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
