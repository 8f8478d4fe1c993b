//! The server API's questions across a cluster: what a node answers for itself, and the
//! questions a shard has put to the other nodes.
//!
//! A question goes out on the control channel (or one node's channel) with the asking
//! shard's number for it; Redis says how many other nodes heard it; each of them asks its
//! own shards ([`Shard::node_part`], the same part a single node answers for itself) and
//! publishes its answer on the asker's node channel, whose shard 0 hands it to the asking
//! shard. The asker waits for as many answers as nodes heard the question, or until
//! `[cluster] timeout_ms` has passed: a node that dies meanwhile costs the wait, not the
//! answer.

use std::collections::HashMap;

use super::directory::{Filter, Listing};
use super::{MeshMsg, Shard};
use crate::auth::Channel;
use crate::cluster::control::{Control, NodeAnswer, Question, ReplyTo};

/// Where the answers to a question go.
#[derive(Debug)]
pub enum Sink {
    /// Every answer as it comes.
    Answers(flume::Sender<NodeAnswer>),
    /// The counts of [`NodeAnswer::Count`] answers.
    Counts(flume::Sender<usize>),
}

impl Sink {
    fn give(&self, answer: NodeAnswer) {
        match (self, answer) {
            (Sink::Answers(to), answer) => drop(to.send(answer)),
            (Sink::Counts(to), NodeAnswer::Count(n)) => drop(to.send(n)),
            (Sink::Counts(_), _) => {}
        }
    }
}

/// A question this shard put to the other nodes.
#[derive(Debug)]
struct Waiting {
    /// How many answers to wait for, once Redis has said.
    expected: Option<usize>,
    /// Answers so far.
    got: usize,
    /// Given up then (shard ms).
    deadline_ms: u64,
    /// Dropped when done: whoever reads the answers then knows there are no more.
    sink: Sink,
}

/// The questions a shard is waiting on, and its parts of other nodes' questions that are
/// still being gathered.
#[derive(Debug, Default)]
pub(super) struct Asks {
    next: u64,
    waiting: HashMap<u64, Waiting>,
    answering: Vec<(ReplyTo, Part)>,
}

/// A node's part of a question, asked of its shards: [`Part::gather`] waits for them.
#[derive(Debug)]
pub enum Part {
    /// The connections each shard reached or closed.
    Count(flume::Receiver<usize>),
    /// Each shard's page, in shard order.
    Connections {
        /// The node, boot id in hex.
        node: String,
        /// Per shard.
        pages: Vec<flume::Receiver<Listing>>,
    },
    /// Each shard's channels, to be added up and cut to a page.
    Channels {
        /// Per shard.
        counts: flume::Receiver<Vec<(Box<str>, usize)>>,
        /// After this name.
        after: String,
        /// Only what this org may see.
        org: Option<String>,
        /// At most this many.
        limit: usize,
        /// The configured channel categories (to tell an org's channels).
        categories: Vec<String>,
    },
}

impl Part {
    /// The node's answer, once its shards have given theirs (`None`: the node is stopping).
    pub async fn gather(self) -> Option<NodeAnswer> {
        match self {
            Part::Count(counts) => {
                let mut total = 0;
                while let Ok(n) = counts.recv_async().await {
                    total += n;
                }
                Some(NodeAnswer::Count(total))
            }
            Part::Connections { node, pages } => {
                let mut shards = Vec::with_capacity(pages.len());
                for page in pages {
                    shards.push(page.recv_async().await.ok()?);
                }
                Some(NodeAnswer::Connections { node, shards })
            }
            Part::Channels {
                counts,
                after,
                org,
                limit,
                categories,
            } => {
                let mut all: std::collections::BTreeMap<Box<str>, usize> = Default::default();
                while let Ok(list) = counts.recv_async().await {
                    for (channel, n) in list {
                        *all.entry(channel).or_default() += n;
                    }
                }
                let visible = |name: &str| match &org {
                    None => true,
                    Some(org) => Channel::parse(name, &categories)
                        .is_ok_and(|c| c.org() == Some(org.as_str())),
                };
                let page = all
                    .into_iter()
                    .filter(|(name, _)| **name > *after && visible(name))
                    .take(limit)
                    .map(|(name, n)| (name.into(), n))
                    .collect();
                Some(NodeAnswer::Channels(page))
            }
        }
    }
}

impl Shard {
    /// Put `question` to the other nodes (or to node `node`, boot id in hex): their answers
    /// go to `sink`, which is dropped once they are all in (at once on a single node).
    pub fn ask_nodes(&self, question: Question, node: Option<&str>, sink: Sink) {
        let to = self.expect_answers(sink);
        let id = to.id;
        let ask = Control::Ask { to, question };
        if !self.engine.borrow_mut().tell_nodes(&ask, node, id) {
            // One node, or the link has stopped: nobody else answers.
            self.asks.borrow_mut().waiting.remove(&id);
        }
    }

    /// Number a question whose control message is sent another way (by Redis, in the
    /// step that numbers a message to a user): its answers go to `sink` once
    /// [`Shard::told`] says how many to wait for.
    pub(super) fn expect_answers(&self, sink: Sink) -> ReplyTo {
        let mut asks = self.asks.borrow_mut();
        asks.next += 1;
        let id = asks.next;
        let waiting = Waiting {
            expected: None,
            got: 0,
            deadline_ms: self.now_ms() + self.config().cluster.timeout_ms,
            sink,
        };
        asks.waiting.insert(id, waiting);
        ReplyTo {
            node: self.node_hex(),
            shard: self.id as u16,
            id,
        }
    }

    /// Redis says how many other nodes heard question `id` (`None`: it was not sent).
    pub(super) fn told(&self, id: u64, nodes: Option<usize>) {
        let mut asks = self.asks.borrow_mut();
        let Some(waiting) = asks.waiting.get_mut(&id) else {
            return;
        };
        waiting.expected = Some(nodes.unwrap_or(0));
        if waiting.got >= nodes.unwrap_or(0) {
            asks.waiting.remove(&id);
        }
    }

    /// A node's answer to question `id` of this shard.
    pub(super) fn node_answered(&self, id: u64, answer: NodeAnswer) {
        let mut asks = self.asks.borrow_mut();
        let Some(waiting) = asks.waiting.get_mut(&id) else {
            return;
        };
        waiting.sink.give(answer);
        waiting.got += 1;
        if waiting.expected.is_some_and(|n| waiting.got >= n) {
            asks.waiting.remove(&id);
        }
    }

    /// Give up on questions whose answers have not all come in time.
    pub(super) fn expire_asks(&self) {
        let now = self.now_ms();
        let mut asks = self.asks.borrow_mut();
        asks.waiting.retain(|id, waiting| {
            let keep = waiting.deadline_ms > now;
            if !keep {
                tracing::debug!(
                    shard = self.id,
                    id,
                    got = waiting.got,
                    expected = waiting.expected,
                    "some nodes did not answer a server API question in time"
                );
            }
            keep
        });
    }

    /// Another node's question (at shard 0): this node's part is asked of its shards now,
    /// in order with the other control messages; [`Shard::take_answering`] hands it over to
    /// be gathered and sent.
    pub(super) fn asked(&self, to: ReplyTo, question: &Question) {
        let part = self.node_part(question);
        self.asks.borrow_mut().answering.push((to, part));
    }

    /// Other nodes' questions whose parts are being asked of this node's shards: the caller
    /// gathers each and sends it back with [`Shard::answer_node`].
    pub fn take_answering(&self) -> Vec<(ReplyTo, Part)> {
        std::mem::take(&mut self.asks.borrow_mut().answering)
    }

    /// Send this node's answer to the node that asked (this one: over the mesh).
    pub fn answer_node(&self, to: ReplyTo, answer: NodeAnswer) {
        if to.node == self.node_hex() {
            let (shard, id) = (usize::from(to.shard), to.id);
            if shard < self.nshards {
                self.route(shard, MeshMsg::NodeAnswer { id, answer });
            }
            return;
        }
        let node = to.node.clone();
        let answer = Control::Answer { to, answer };
        self.engine.borrow_mut().tell_nodes(&answer, Some(&node), 0);
    }

    /// This node's part of `question`, asked of its shards (this one too) at `now`.
    pub fn ask_node(&self, question: &Question, now: crate::clock::Now) -> Part {
        self.enter(now);
        self.node_part(question)
    }

    /// This node's part of `question`, asked of its shards (this one too).
    fn node_part(&self, question: &Question) -> Part {
        match question {
            Question::Count(command) => {
                let (reply, counts) = flume::unbounded();
                self.command(command, Some(&reply));
                Part::Count(counts)
            }
            Question::Connections {
                filter,
                after,
                limit,
            } => self.connections_part(filter, after.as_deref(), *limit),
            Question::Channels {
                prefix,
                after,
                org,
                limit,
            } => {
                let (reply, counts) = flume::unbounded();
                for shard in 0..self.nshards {
                    let prefix = prefix.as_str().into();
                    let reply = reply.clone();
                    self.route(shard, MeshMsg::Channels { prefix, reply });
                }
                Part::Channels {
                    counts,
                    after: after.clone(),
                    org: org.clone(),
                    limit: *limit,
                    categories: self.config().channels.categories.clone(),
                }
            }
        }
    }

    /// Every shard's page of connections after connection id `after`, in (node, shard,
    /// connection) order: shards before the cursor give their totals only.
    fn connections_part(&self, filter: &Filter, after: Option<&str>, limit: usize) -> Part {
        let node = self.node_hex();
        let place = after.and_then(crate::cluster::keys::connection_place);
        let mut pages = Vec::with_capacity(self.nshards);
        for s in 0..self.nshards {
            let (after, limit) = match place {
                None => (0, limit),
                Some((n, _, _)) if *n > *node => (u64::MAX, 0),
                Some((n, _, _)) if *n < *node => (0, limit),
                Some((_, cs, _)) if s < cs => (u64::MAX, 0),
                Some((_, cs, conn)) if s == cs => (conn, limit),
                Some(_) => (0, limit),
            };
            let (reply, page) = flume::bounded(1);
            let msg = MeshMsg::Connections {
                filter: filter.clone(),
                after,
                limit,
                reply,
            };
            self.route(s, msg);
            pages.push(page);
        }
        Part::Connections { node, pages }
    }

    /// This node's boot id in hex, as connection ids and node channels carry it.
    pub fn node_hex(&self) -> String {
        format!("{:x}", self.global.boot_id)
    }
}
