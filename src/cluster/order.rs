//! A node's order of a channel's messages from Redis: each seq delivered once, in order, and
//! any seq that cannot be had reported, never skipped in silence.
//!
//! PUB/SUB brings a channel's messages in seq order, but a node can miss some (its connection
//! was down, a shard's queue was full) and hears nothing of what was published before it
//! subscribed. The owner shard of a channel feeds every message it hears to [`Order::live`]
//! and every history page it asked for to [`Order::fetched`], and does the [`Step`]s they
//! give back. A gap in the seqs is filled from the channel's history, with the live messages
//! held meanwhile and merged by seq (centrifuge's `PubSubSync` does the same). What the
//! history no longer has is a [`Step::Gap`]; a new epoch (Redis lost the channel) a
//! [`Step::Reset`]. A channel numbered on the node while Redis was down is [`Order::divert`]ed:
//! its subscribers were moved to a local numbering, and are moved back with a `Reset` before
//! the first message from Redis when it returns. No I/O and no clock: the shard's tests and
//! this file's drive it alone.

use std::collections::{BTreeMap, HashMap};

use crate::dialect::Publication;

use super::client::Page;
use super::keys::Envelope;

/// Live messages held per channel while a gap is being filled; later ones are dropped (the
/// history has them, and the fetch after this one gets them).
pub const MAX_HELD: usize = 4096;

/// What the owner must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fan this message out.
    Deliver {
        /// The channel.
        channel: String,
        /// The next message, in seq order.
        publication: Publication<Vec<u8>>,
    },
    /// Read the channel's history after `since` and hand the page to [`Order::fetched`].
    Fetch {
        /// The channel.
        channel: String,
        /// The last seq delivered.
        since: u64,
    },
    /// Seqs `from..=to` were published but can no longer be had: tell the subscribers.
    Gap {
        /// The channel.
        channel: String,
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// The channel started again in Redis under a new epoch (its state there was lost): the
    /// subscribers' positions mean nothing now.
    Reset {
        /// The channel.
        channel: String,
        /// Its new epoch.
        epoch: String,
    },
}

impl Stream {
    /// See [`Order::catch_up`].
    fn catch_up(&mut self) -> Option<u64> {
        if self.next == 0 || self.fetching {
            return None;
        }
        self.fetching = true;
        Some(self.next - 1)
    }
}

#[derive(Debug, Default)]
struct Stream {
    epoch: String,
    /// The next seq to deliver (0: nothing delivered yet, the first message heard starts).
    next: u64,
    fetching: bool,
    /// Live messages after a gap, by seq.
    held: BTreeMap<u64, Publication<Vec<u8>>>,
    diverted: Diverted,
    /// A new numbering (epoch) began: the next page read starts it, from the first message
    /// it or the held ones have, with no gap before.
    restarted: bool,
}

/// Whether a channel's subscribers follow Redis's numbering (see [`Order::divert`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Diverted {
    /// They do.
    #[default]
    No,
    /// They follow the node's own while Redis is down: nothing from Redis is delivered.
    Away,
    /// Redis is back: the next thing delivered is a `Reset` to its epoch.
    Returning,
}

/// The order of every channel a node's shard owns and hears from Redis.
#[derive(Debug, Default)]
pub struct Order {
    streams: HashMap<String, Stream>,
}

impl Order {
    /// A message heard on PUB/SUB.
    pub fn live(&mut self, channel: &str, message: &Envelope<'_>, steps: &mut Vec<Step>) {
        let stream = self.streams.entry(channel.to_owned()).or_default();
        if stream.diverted == Diverted::Away {
            return; // Read from the history once Redis is back.
        }
        let publication = Publication {
            seq: message.seq,
            kind: message.kind,
            data: message.data.to_vec(),
        };
        let new_epoch = stream.next != 0 && stream.epoch != message.epoch;
        if stream.next == 0 || new_epoch {
            if new_epoch || stream.diverted == Diverted::Returning {
                steps.push(Step::Reset {
                    channel: channel.to_owned(),
                    epoch: message.epoch.to_owned(),
                });
            }
            *stream = Stream {
                epoch: message.epoch.to_owned(),
                next: message.seq + 1,
                ..Stream::default()
            };
            // Heard first: what came before this node listened is not its subscribers' (a
            // subscriber asks for it with `since`).
            if !new_epoch || message.seq == 1 {
                steps.push(deliver(channel, publication));
                return;
            }
            // A new numbering that began while this node was not listening: all of it that
            // is kept is its subscribers'.
            stream.restarted = true;
            stream.fetching = true;
            stream.held.insert(message.seq, publication);
            steps.push(Step::Fetch {
                channel: channel.to_owned(),
                since: 0,
            });
            return;
        }
        if message.seq < stream.next {
            return; // Already delivered: heard twice (a fetch and PUB/SUB both had it).
        }
        // A returning channel's subscribers are moved back by the fetch.
        if message.seq == stream.next && !stream.fetching && stream.diverted == Diverted::No {
            stream.next += 1;
            stream.restarted = false;
            steps.push(deliver(channel, publication));
            return;
        }
        if stream.held.len() < MAX_HELD {
            stream.held.insert(message.seq, publication);
        }
        if !stream.fetching {
            stream.fetching = true;
            steps.push(Step::Fetch {
                channel: channel.to_owned(),
                since: stream.next - 1,
            });
        }
    }

    /// The history page a [`Step::Fetch`] asked for.
    pub fn fetched(&mut self, channel: &str, page: Page, steps: &mut Vec<Step>) {
        let Some(stream) = self.streams.get_mut(channel) else {
            return; // Forgotten meanwhile.
        };
        stream.fetching = false;
        match stream.diverted {
            Diverted::Away => return, // Read again once Redis is back.
            Diverted::Returning => {
                stream.diverted = Diverted::No;
                steps.push(Step::Reset {
                    channel: channel.to_owned(),
                    epoch: page.epoch.clone(),
                });
            }
            Diverted::No if page.epoch != stream.epoch => steps.push(Step::Reset {
                channel: channel.to_owned(),
                epoch: page.epoch.clone(),
            }),
            Diverted::No => {}
        }
        if page.epoch != stream.epoch {
            // Read from its start: the page began after the old numbering's seq.
            stream.epoch = page.epoch;
            stream.held.clear();
            stream.restarted = true;
            stream.fetching = true;
            steps.push(Step::Fetch {
                channel: channel.to_owned(),
                since: 0,
            });
            return;
        }
        if stream.restarted {
            // Where the new numbering starts (a decision channel's continues from the
            // store's highest seq, so it may not be 1); nothing yet: its first message.
            let first_kept = page.messages.first().map(|m| m.seq);
            let first_held = stream.held.keys().next().copied();
            let first = first_kept.into_iter().chain(first_held).min();
            stream.restarted = first.is_none();
            stream.next = first.unwrap_or(page.top + 1);
        }
        // A page stops short of the top when it held as many as were asked for: the rest is
        // still there, to be read next.
        let covered = page.messages.last().map_or(page.top, |m| m.seq);
        for publication in page.messages {
            Self::advance(channel, stream, publication, steps);
        }
        if covered == page.top && page.top >= stream.next {
            // Published up to the top, and the history keeps none of it but what is held.
            let held = stream.held.range(stream.next..).next().map(|(&seq, _)| seq);
            let to = held.map_or(page.top, |seq| page.top.min(seq - 1));
            if to >= stream.next {
                steps.push(Step::Gap {
                    channel: channel.to_owned(),
                    from: stream.next,
                    to,
                });
                stream.next = to + 1;
            }
        }
        while let Some(entry) = stream.held.first_entry() {
            if *entry.key() > stream.next {
                break;
            }
            let publication = entry.remove();
            Self::advance(channel, stream, publication, steps);
        }
        // Held messages left come after seqs published since the read, or past a short page.
        if !stream.held.is_empty() || covered < page.top {
            stream.fetching = true;
            steps.push(Step::Fetch {
                channel: channel.to_owned(),
                since: stream.next - 1,
            });
        }
    }

    /// Deliver `publication` if it is next, reporting what was skipped to reach it.
    fn advance(
        channel: &str,
        stream: &mut Stream,
        publication: Publication<Vec<u8>>,
        steps: &mut Vec<Step>,
    ) {
        if publication.seq < stream.next {
            return;
        }
        if publication.seq > stream.next {
            steps.push(Step::Gap {
                channel: channel.to_owned(),
                from: stream.next,
                to: publication.seq - 1,
            });
        }
        stream.next = publication.seq + 1;
        steps.push(deliver(channel, publication));
    }

    /// The PUB/SUB connection of the channels `of` was made again: what each missed
    /// meanwhile must be read, and those diverted go back to Redis's numbering.
    pub fn resubscribed(&mut self, of: &dyn Fn(&str) -> bool, steps: &mut Vec<Step>) {
        for (channel, stream) in &mut self.streams {
            if !of(channel) {
                continue;
            }
            if stream.diverted == Diverted::Away {
                stream.diverted = Diverted::Returning;
            }
            if let Some(since) = stream.catch_up() {
                let channel = channel.clone();
                steps.push(Step::Fetch { channel, since });
            }
        }
    }

    /// A fetch failed: ask again with [`Order::catch_up`] (or at the next live message).
    pub fn fetch_failed(&mut self, channel: &str) {
        if let Some(stream) = self.streams.get_mut(channel) {
            stream.fetching = false;
        }
    }

    /// Where to read `channel`'s history from, unless it is being read already or nothing
    /// of it was heard yet (then it is being read now).
    pub fn catch_up(&mut self, channel: &str) -> Option<u64> {
        self.streams.get_mut(channel)?.catch_up()
    }

    /// The channel's `top` and `epoch` read before the node subscribed to it: every seq
    /// after `top` is its subscribers', and one that PUB/SUB did not bring (published before
    /// the subscription took effect, or during an outage) is read from the history. Without
    /// it, a channel heard nothing of before an outage would start again at whatever it
    /// heard next.
    pub fn anchor(&mut self, channel: &str, epoch: String, top: u64) {
        let stream = self.streams.entry(channel.to_owned()).or_default();
        if stream.next == 0 {
            stream.epoch = epoch;
            stream.next = top + 1;
        }
    }

    /// The node numbers `channel` itself while Redis is down, and told its subscribers so:
    /// nothing from Redis is delivered until [`Order::resubscribed`], and then, before the
    /// first message, a [`Step::Reset`] to Redis's epoch (the same as before or not) moves
    /// them back.
    pub fn divert(&mut self, channel: &str) {
        let stream = self.streams.entry(channel.to_owned()).or_default();
        stream.diverted = Diverted::Away;
    }

    /// `channel`'s epoch, once it is heard or anchored.
    pub fn epoch(&self, channel: &str) -> Option<&str> {
        let stream = self.streams.get(channel)?;
        (stream.next > 0).then_some(stream.epoch.as_str())
    }

    /// The node no longer wants `channel`.
    pub fn forget(&mut self, channel: &str) {
        self.streams.remove(channel);
    }
}

fn deliver(channel: &str, publication: Publication<Vec<u8>>) -> Step {
    Step::Deliver {
        channel: channel.to_owned(),
        publication,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialect::Kind;

    const C: &str = "org:a:x";

    fn live(order: &mut Order, seq: u64, epoch: &str) -> Vec<Step> {
        let data = seq.to_string();
        let message = Envelope {
            seq,
            epoch,
            kind: Kind::Message,
            data: data.as_bytes(),
        };
        let mut steps = Vec::new();
        order.live(C, &message, &mut steps);
        steps
    }

    fn publication(seq: u64) -> Publication<Vec<u8>> {
        Publication {
            seq,
            kind: Kind::Message,
            data: seq.to_string().into_bytes(),
        }
    }

    fn page(top: u64, epoch: &str, seqs: impl IntoIterator<Item = u64>) -> Page {
        Page {
            top,
            epoch: epoch.into(),
            messages: seqs.into_iter().map(publication).collect(),
        }
    }

    fn fetched(order: &mut Order, page: Page) -> Vec<Step> {
        let mut steps = Vec::new();
        order.fetched(C, page, &mut steps);
        steps
    }

    fn delivered(steps: &[Step]) -> Vec<u64> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Deliver { publication, .. } => Some(publication.seq),
                _ => None,
            })
            .collect()
    }

    fn fetch(since: u64) -> Step {
        Step::Fetch {
            channel: C.into(),
            since,
        }
    }

    fn gap(from: u64, to: u64) -> Step {
        Step::Gap {
            channel: C.into(),
            from,
            to,
        }
    }

    #[test]
    fn an_anchored_channel_reads_what_pubsub_did_not_bring_after_its_top() {
        let mut order = Order::default();
        order.anchor(C, "e".into(), 4);
        // Seqs 5 and 6 were published before the subscription took effect.
        assert_eq!(live(&mut order, 7, "e"), [fetch(4)]);
        assert_eq!(
            delivered(&fetched(&mut order, page(7, "e", 5..=7))),
            [5, 6, 7]
        );
        // An anchor read later (a second subscription) changes nothing heard already.
        order.anchor(C, "e".into(), 9);
        assert_eq!(delivered(&live(&mut order, 8, "e")), [8]);
    }

    #[test]
    fn an_anchored_channel_heard_nothing_of_reads_what_it_missed_after_a_reconnect() {
        let mut order = Order::default();
        order.anchor(C, "e".into(), 0);
        let mut steps = Vec::new();
        order.resubscribed(&|_| true, &mut steps);
        assert_eq!(steps, [fetch(0)]);
        assert_eq!(delivered(&fetched(&mut order, page(2, "e", 1..=2))), [1, 2]);
        assert_eq!(delivered(&live(&mut order, 3, "e")), [3]);
    }

    #[test]
    fn in_order_messages_go_straight_through_and_repeats_are_dropped() {
        let mut order = Order::default();
        assert_eq!(
            delivered(&live(&mut order, 7, "e")),
            [7],
            "the first heard starts"
        );
        assert_eq!(delivered(&live(&mut order, 8, "e")), [8]);
        assert!(live(&mut order, 8, "e").is_empty());
        assert!(live(&mut order, 3, "e").is_empty());
        assert_eq!(delivered(&live(&mut order, 9, "e")), [9]);
    }

    #[test]
    fn a_gap_is_filled_from_the_history_and_merged_with_what_arrived_meanwhile() {
        let mut order = Order::default();
        live(&mut order, 1, "e");
        assert_eq!(live(&mut order, 4, "e"), [fetch(1)], "2 and 3 were missed");
        assert!(live(&mut order, 5, "e").is_empty(), "held while fetching");
        // The history was read after 6 was published; 6 has not arrived live yet.
        let steps = fetched(&mut order, page(6, "e", [2, 3, 4, 5, 6]));
        assert_eq!(delivered(&steps), [2, 3, 4, 5, 6]);
        assert_eq!(steps.len(), 5, "no gap, no second fetch");
        assert!(live(&mut order, 6, "e").is_empty(), "6 came twice");
        assert_eq!(delivered(&live(&mut order, 7, "e")), [7]);
    }

    #[test]
    fn what_the_history_no_longer_has_is_reported_not_skipped() {
        let mut order = Order::default();
        live(&mut order, 1, "e");
        assert_eq!(live(&mut order, 50, "e"), [fetch(1)]);
        // The stream kept only 40..: 2..=39 are gone.
        let steps = fetched(&mut order, page(50, "e", 40..=50));
        assert_eq!(steps[0], gap(2, 39));
        assert_eq!(delivered(&steps), (40..=50).collect::<Vec<_>>());
        // Nothing kept at all, and messages published up to the top.
        assert_eq!(live(&mut order, 60, "e"), [fetch(50)]);
        let steps = fetched(&mut order, page(59, "e", []));
        assert_eq!(
            steps,
            [
                gap(51, 59),
                Step::Deliver {
                    channel: C.into(),
                    publication: publication(60)
                }
            ]
        );
    }

    #[test]
    fn held_messages_past_the_page_are_fetched_again() {
        let mut order = Order::default();
        live(&mut order, 1, "e");
        assert_eq!(live(&mut order, 3, "e"), [fetch(1)]);
        assert!(live(&mut order, 6, "e").is_empty());
        // Read before 4 and 5 were published: 2..3 now, then 4 and 5 are still owed.
        let steps = fetched(&mut order, page(3, "e", [2, 3]));
        assert_eq!(delivered(&steps), [2, 3]);
        assert_eq!(steps.last(), Some(&fetch(3)));
        let steps = fetched(&mut order, page(6, "e", [4, 5, 6]));
        assert_eq!(delivered(&steps), [4, 5, 6]);
    }

    #[test]
    fn a_page_cut_short_by_its_limit_is_read_on_not_taken_for_a_gap() {
        let mut order = Order::default();
        live(&mut order, 1, "e");
        assert_eq!(live(&mut order, 9, "e"), [fetch(1)]);
        // Asked for at most 3: 2..=4 of a history that goes to 9.
        let steps = fetched(&mut order, page(9, "e", [2, 3, 4]));
        assert_eq!(delivered(&steps), [2, 3, 4]);
        assert_eq!(steps.last(), Some(&fetch(4)));
        let steps = fetched(&mut order, page(9, "e", [5, 6, 7, 8, 9]));
        assert_eq!(delivered(&steps), [5, 6, 7, 8, 9]);
        assert!(!steps
            .iter()
            .any(|s| matches!(s, Step::Gap { .. } | Step::Fetch { .. })));
    }

    #[test]
    fn a_new_epoch_resets_the_channel() {
        let mut order = Order::default();
        live(&mut order, 41, "old");
        let steps = live(&mut order, 1, "new");
        assert_eq!(
            steps[0],
            Step::Reset {
                channel: C.into(),
                epoch: "new".into()
            }
        );
        assert_eq!(delivered(&steps), [1]);
        assert_eq!(delivered(&live(&mut order, 2, "new")), [2]);
        // Found by a fetch: the page's epoch differs.
        assert_eq!(live(&mut order, 5, "new"), [fetch(2)]);
        let steps = fetched(&mut order, page(3, "newer", [3]));
        assert_eq!(steps, [reset("newer"), fetch(0)], "read from its start");
        assert!(
            live(&mut order, 4, "newer").is_empty(),
            "held behind the read"
        );
        let steps = fetched(&mut order, page(4, "newer", [1, 2, 3, 4]));
        assert_eq!(delivered(&steps), [1, 2, 3, 4]);
        assert_eq!(delivered(&live(&mut order, 5, "newer")), [5]);
    }

    #[test]
    fn a_new_numbering_heard_past_its_start_is_read_from_where_it_starts() {
        let mut order = Order::default();
        live(&mut order, 7, "e");
        // A decision channel's new numbering continues from the store's seq 1.
        assert_eq!(live(&mut order, 3, "f"), [reset("f"), fetch(0)]);
        let steps = fetched(&mut order, page(3, "f", [2, 3]));
        assert_eq!(steps.len(), 2, "no gap before its start: {steps:?}");
        assert_eq!(delivered(&steps), [2, 3]);
        // No history kept at all: from the held message.
        order.forget(C);
        live(&mut order, 7, "e");
        assert_eq!(live(&mut order, 5, "g"), [reset("g"), fetch(0)]);
        assert_eq!(delivered(&fetched(&mut order, page(5, "g", []))), [5]);
        // Nothing in the new numbering yet when it is read: it starts at its first message.
        order.forget(C);
        live(&mut order, 7, "e");
        order.resubscribed(&|_| true, &mut Vec::new());
        assert_eq!(
            fetched(&mut order, page(0, "h", [])),
            [reset("h"), fetch(0)]
        );
        assert!(fetched(&mut order, page(0, "h", [])).is_empty());
        assert_eq!(live(&mut order, 2, "h"), [fetch(0)]);
        let steps = fetched(&mut order, page(2, "h", [2]));
        assert_eq!(steps.len(), 1, "no gap before its start: {steps:?}");
        assert_eq!(delivered(&steps), [2]);
    }

    #[test]
    fn after_a_reconnect_every_known_channel_reads_what_it_missed() {
        let mut order = Order::default();
        live(&mut order, 9, "e");
        let mut steps = Vec::new();
        order.resubscribed(&|c| c != "org:a:other", &mut steps);
        assert_eq!(steps, [fetch(9)]);
        let mut again = Vec::new();
        order.resubscribed(&|_| true, &mut again);
        assert!(again.is_empty(), "one fetch at a time");
        assert!(
            live(&mut order, 12, "e").is_empty(),
            "held behind the fetch"
        );
        let steps = fetched(&mut order, page(12, "e", [10, 11, 12]));
        assert_eq!(delivered(&steps), [10, 11, 12]);
        order.fetch_failed(C);
        order.forget(C);
        assert_eq!(
            delivered(&live(&mut order, 20, "e")),
            [20],
            "forgotten: starts again"
        );
    }

    #[test]
    fn holding_is_bounded_and_what_is_dropped_comes_from_the_history() {
        let mut order = Order::default();
        live(&mut order, 1, "e");
        live(&mut order, 3, "e");
        for seq in 4..(MAX_HELD as u64 + 100) {
            live(&mut order, seq, "e");
        }
        let top = MAX_HELD as u64 + 99;
        let steps = fetched(&mut order, page(top, "e", 2..=top));
        assert_eq!(delivered(&steps), (2..=top).collect::<Vec<_>>());
        assert!(!steps.iter().any(|s| matches!(s, Step::Gap { .. })));
    }

    fn reset(epoch: &str) -> Step {
        Step::Reset {
            channel: C.into(),
            epoch: epoch.into(),
        }
    }

    #[test]
    fn a_diverted_channel_hears_nothing_then_moves_back_with_a_reset_and_what_it_missed() {
        let mut order = Order::default();
        live(&mut order, 3, "e");
        order.divert(C);
        assert!(
            live(&mut order, 4, "e").is_empty(),
            "not delivered while away"
        );
        assert!(fetched(&mut order, page(4, "e", [4])).is_empty());
        // Redis is back with the same epoch: moved back, then 4 and 5 from the history.
        let mut steps = Vec::new();
        order.resubscribed(&|_| true, &mut steps);
        assert_eq!(steps, [fetch(3)]);
        assert!(live(&mut order, 6, "e").is_empty(), "held behind the fetch");
        let steps = fetched(&mut order, page(5, "e", [4, 5]));
        assert_eq!(steps[0], reset("e"));
        assert_eq!(delivered(&steps), [4, 5, 6]);
        assert_eq!(steps.len(), 4, "one reset");
        assert_eq!(delivered(&live(&mut order, 7, "e")), [7]);
    }

    #[test]
    fn a_returning_channel_is_moved_back_even_when_its_fetch_failed() {
        let mut order = Order::default();
        live(&mut order, 3, "e");
        order.divert(C);
        order.resubscribed(&|_| true, &mut Vec::new());
        order.fetch_failed(C);
        assert_eq!(order.catch_up(C), Some(3), "read again");
        assert_eq!(order.catch_up(C), None, "one read at a time");
        order.fetch_failed(C);
        // The next in seq order is not delivered before the reset: it fetches first.
        assert_eq!(live(&mut order, 4, "e"), [fetch(3)]);
        let steps = fetched(&mut order, page(4, "e", [4]));
        assert_eq!(steps[0], reset("e"));
        assert_eq!(delivered(&steps), [4]);
        // Redis lost the channel meanwhile: one reset, to the new epoch.
        order.divert(C);
        order.resubscribed(&|_| true, &mut Vec::new());
        let steps = fetched(&mut order, page(2, "new", [2]));
        assert_eq!(steps, [reset("new"), fetch(0)]);
        let steps = fetched(&mut order, page(2, "new", [1, 2]));
        assert_eq!(delivered(&steps), [1, 2]);
        assert_eq!(delivered(&live(&mut order, 3, "new")), [3]);
    }

    #[test]
    fn a_diverted_channel_never_heard_is_moved_back_by_its_first_message() {
        let mut order = Order::default();
        order.divert(C);
        assert!(live(&mut order, 1, "e").is_empty());
        order.resubscribed(&|_| true, &mut Vec::new());
        let steps = live(&mut order, 2, "e");
        assert_eq!(steps[0], reset("e"));
        assert_eq!(delivered(&steps), [2]);
    }

    #[test]
    fn a_held_message_is_delivered_when_the_history_keeps_nothing() {
        let mut order = Order::default();
        live(&mut order, 1, "e");
        assert_eq!(live(&mut order, 5, "e"), [fetch(1)]);
        let steps = fetched(&mut order, page(5, "e", []));
        assert_eq!(steps[0], gap(2, 4));
        assert_eq!(delivered(&steps), [5]);
    }
}
