//! The cluster engine: a channel's numbering, history and delivery in Redis, shared by every
//! node (docs/CLUSTER.md). The owner shard of a channel sends its publishes and history
//! reads to the node's link threads (`cluster::link`) and hears the channel's messages from
//! the node's PUB/SUB threads (`cluster::pubsub`), in seq order through `cluster::Order`.
//! A node delivers its own publishes the way it delivers every other node's: when Redis
//! publishes them, so every node has one order.
//!
//! No I/O here: requests go out on flume channels that never block, and the answers come in
//! through [`Engine::heard`]. Decisions are committed first and numbered by
//! [`Engine::publish_stored`] (`numbers_locally` is false).
//!
//! While the node's PUB/SUB connection to a channel's Redis is down, the channel is
//! [`Engine::degraded`]: its publishes come to its owner shard, which still tries Redis first
//! and, when Redis cannot be reached, numbers and delivers them itself under a local epoch of
//! its own (`Local`), told to the subscribers as a reset; when the connection is back, they
//! are moved back to Redis's numbering and get what was published there meanwhile
//! ([`Order::divert`]).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use super::history::{Found, Limits, Ring};
use super::{Arrival, Engine, Event, Numbered, Reach};
use crate::cluster::client::UserSend;
use crate::cluster::control::Control;
use crate::cluster::keys::{
    connection_place, member_bytes, parse_member, redis_for, user_redis, Heard,
};
use crate::cluster::link::{Completion, Op, Request, UsersOp};
use crate::cluster::node::Instance;
use crate::cluster::order::{Order, Step};
use crate::cluster::{Claimed, ClusterError, Incoming, Page, Publish};
use crate::dialect::{Change, Kind, Member, Publication};

/// What the engine's threads report to a shard.
#[derive(Debug)]
pub enum Input {
    /// A link answered a request.
    Link(Completion),
    /// The PUB/SUB side heard something.
    PubSub(Incoming),
}

/// Tokens of the engine's own history reads (gaps being filled) have this bit; the shard's
/// never do.
const FETCH: u64 = 1 << 63;

/// Tokens of the reads of a channel's top before subscribing to it have this one.
const ANCHOR: u64 = 1 << 62;
/// Marks the token of a control message for every node (not one node's): this node's own
/// PUB/SUB connection is among its receivers.
const TOLD_ALL: u64 = 1 << 61;

/// A channel this node numbers itself while its Redis is down.
struct Local {
    epoch: Box<str>,
    seq: u64,
    ring: Ring,
}

/// The cluster engine of one shard.
pub struct Redis {
    shard: usize,
    /// Channels are spread over these by [`redis_for`].
    instances: Vec<Instance>,
    /// Per instance: the node's PUB/SUB connection to it is down.
    down: Vec<bool>,
    /// Channels numbered here meanwhile.
    local: HashMap<Rc<str>, Local>,
    /// Shards of the node (a channel's owner is `shard::owner_of`).
    nshards: usize,
    /// Local epochs are `{node}.{shard}.{n}`: never one of Redis's (16 hex digits).
    node: u64,
    /// The node's boot id in hex: what its connection ids begin with, and the name its
    /// presence changes go out under.
    boot: String,
    locals_made: u64,
    /// History kept of local channels.
    limits: Limits,
    order: Order,
    steps: Vec<Step>,
    events: VecDeque<Event>,
    /// Channels the node wants, with how many of their subscriptions Redis has not yet
    /// confirmed.
    wanted: HashMap<Rc<str>, u32>,
    /// The engine's own history reads, by token.
    fetches: HashMap<u64, String>,
    /// Publishes of messages to users, by token (their answers carry a [`Reach`]).
    to_users: std::collections::HashSet<u64>,
    next_fetch: u64,
    /// Channels whose top is being read before subscribing, by token.
    anchors: HashMap<u64, Rc<str>>,
    /// Channels whose top could not be read: read again at the next sweep.
    unanchored: Vec<Rc<str>>,
    /// Channels whose history could not be read to fill a gap: read again at the next sweep.
    unfetched: Vec<String>,
    /// Most messages read per history request.
    page: usize,
    /// Publishes waiting for their answer, and how many may.
    in_flight: usize,
    max_in_flight: usize,
}

impl Redis {
    /// The engine of shard `shard` of `nshards` of node `node` (its boot id), reading pages
    /// of `page` messages, and keeping `limits` of history of the channels it numbers while
    /// Redis is down.
    pub fn new(
        (node, shard, nshards): (u64, usize, usize),
        instances: Vec<Instance>,
        page: usize,
        max_in_flight: usize,
        limits: Limits,
    ) -> Self {
        Self {
            shard,
            down: vec![false; instances.len()],
            instances,
            local: HashMap::new(),
            nshards,
            node,
            boot: format!("{node:x}"),
            locals_made: 0,
            limits,
            order: Order::default(),
            steps: Vec::new(),
            events: VecDeque::new(),
            wanted: HashMap::new(),
            fetches: HashMap::new(),
            to_users: Default::default(),
            next_fetch: 0,
            anchors: HashMap::new(),
            unanchored: Vec::new(),
            unfetched: Vec::new(),
            page: page.max(1),
            in_flight: 0,
            max_in_flight,
        }
    }

    fn instance(&self, channel: &str) -> &Instance {
        &self.instances[self.redis_of(channel)]
    }

    fn redis_of(&self, channel: &str) -> usize {
        redis_for(channel, self.instances.len())
    }

    /// Number and deliver a publish Redis could not take, under the channel's local epoch
    /// (made, and told to its subscribers, at the first).
    fn publish_here(&mut self, token: u64, unsent: Publish, at: Arrival) {
        let channel: Rc<str> = unsent.channel.into();
        let (kind, data) = (unsent.kind, Rc::from(unsent.data));
        if !self.local.contains_key(&channel) {
            self.locals_made += 1;
            let epoch = format!("{:x}.{}.{}", self.node, self.shard, self.locals_made);
            tracing::warn!(shard = self.shard, %channel, %epoch, "Redis is down: numbering here");
            self.order.divert(&channel);
            self.events.push_back(Event::Reset {
                channel: Rc::clone(&channel),
                epoch: epoch.as_str().into(),
            });
            let local = Local {
                epoch: epoch.into(),
                seq: 0,
                ring: Ring::new(0),
            };
            self.local.insert(Rc::clone(&channel), local);
        }
        let Some(local) = self.local.get_mut(&channel) else {
            return;
        };
        local.seq += 1;
        let publication = Publication {
            seq: local.seq,
            kind,
            data,
        };
        local.ring.push(&publication, at.at_ms, self.limits);
        let seq = local.seq;
        self.events.push_back(Event::Publication {
            channel,
            publication,
            at,
        });
        self.events.push_back(Event::Numbered {
            token,
            result: Ok(seq),
            local: true,
            reach: None,
        });
    }

    /// The PUB/SUB connection to Redis `redis` is back: its channels numbered here go back to
    /// Redis's numbering (their subscribers are moved by the first message from it).
    fn reconnected(&mut self, redis: usize) {
        self.down[redis] = false;
        self.events.push_back(Event::Reconnected);
        let n = self.instances.len();
        self.local
            .retain(|channel, _| redis_for(channel, n) != redis);
        let of = |channel: &str| redis_for(channel, n) == redis;
        self.order.resubscribed(&of, &mut self.steps);
    }

    /// `users.lua`'s `op`, on the Redis of each user's keys.
    /// Keep or take a Socket.IO connection's record, on the Redis its pid hashes to.
    fn record_op(&mut self, pid: &str, value: Option<Vec<u8>>, ttl_ms: u64, token: u64) {
        let n = self.instances.len();
        let taking = value.is_none();
        let op = Op::Record {
            pid: pid.to_owned(),
            value,
            ttl_ms,
        };
        let request = Request {
            shard: self.shard,
            token,
            op,
        };
        if self.instances[redis_for(pid, n)]
            .link
            .send(request)
            .is_err()
            && taking
        {
            let result = Err("the Redis link has stopped".to_owned());
            self.events.push_back(Event::Record { token, result });
        }
    }

    fn users_op(&self, op: UsersOp, users: Vec<String>, org: &str, token: u64) {
        let n = self.instances.len();
        let mut by_redis: Vec<Vec<String>> = vec![Vec::new(); n];
        for user in users {
            by_redis[user_redis(&user, n)].push(user);
        }
        for (redis, users) in by_redis.into_iter().enumerate() {
            // A refresh goes to every Redis: it sweeps what is kept there too.
            if users.is_empty() && op != UsersOp::Refresh {
                continue;
            }
            let op = Op::Users {
                op,
                users,
                org: org.to_owned(),
                entries: Vec::new(),
            };
            let request = Request {
                shard: self.shard,
                token,
                op,
            };
            let _ = self.instances[redis].link.send(request);
        }
    }

    fn send(&self, channel: &str, token: u64, op: Op) -> bool {
        let request = Request {
            shard: self.shard,
            token,
            op,
        };
        self.instance(channel).link.send(request).is_ok()
    }

    /// Carry out what [`Order`] said, in order.
    fn take_steps(&mut self, at: Arrival) {
        let steps = std::mem::take(&mut self.steps);
        for step in steps {
            match step {
                Step::Deliver {
                    channel,
                    publication,
                } => self.events.push_back(Event::Publication {
                    channel: channel.into(),
                    publication: publication.into_shared(),
                    at,
                }),
                Step::Fetch { channel, since } => self.fetch(channel, since),
                Step::Gap { channel, from, to } => self.events.push_back(Event::Gap {
                    channel: channel.into(),
                    from,
                    to,
                }),
                Step::Reset { channel, epoch } => self.events.push_back(Event::Reset {
                    channel: channel.into(),
                    epoch: epoch.into(),
                }),
            }
        }
    }

    /// The answer to the publish of `token`, numbered by Redis (or not).
    fn answer(&mut self, token: u64, result: Result<u64, String>) {
        self.answer_reach(token, result, None);
    }

    fn answer_reach(&mut self, token: u64, result: Result<u64, String>, reach: Option<Reach>) {
        let local = false;
        self.events.push_back(Event::Numbered {
            token,
            result,
            local,
            reach,
        });
    }

    /// Read `channel`'s history after `since` for [`Order::fetched`].
    fn fetch(&mut self, channel: String, since: u64) {
        self.next_fetch += 1;
        let token = FETCH | self.next_fetch;
        let op = Op::History {
            channel: channel.clone(),
            since,
            limit: self.page,
        };
        if self.send(&channel, token, op) {
            self.fetches.insert(token, channel);
        } else {
            self.order.fetch_failed(&channel);
        }
    }

    /// Read `channel`'s top, then subscribe: what is published after that top is delivered,
    /// from PUB/SUB or, for what it did not bring, from the history (see [`Order::anchor`]).
    fn anchor(&mut self, channel: Rc<str>) {
        self.next_fetch += 1;
        let token = ANCHOR | self.next_fetch;
        let op = Op::History {
            channel: channel.to_string(),
            since: 0,
            limit: 0,
        };
        if self.send(&channel, token, op) {
            self.anchors.insert(token, channel);
        } else {
            // The link has stopped (the node is stopping): listen all the same.
            self.instance(&channel).wants.subscribe(&channel);
        }
    }

    /// The top of a channel about to be subscribed to was read, or could not be.
    fn anchored(&mut self, token: u64, result: Result<Page, crate::cluster::ClusterError>) {
        let Some(channel) = self.anchors.remove(&token) else {
            return; // Unwanted meanwhile.
        };
        match result {
            Ok(page) => {
                self.order.anchor(&channel, page.epoch, page.top);
                self.instance(&channel).wants.subscribe(&channel);
            }
            Err(e) => {
                tracing::debug!(shard = self.shard, %channel, "cannot read the top yet: {e}");
                self.unanchored.push(channel);
            }
        }
    }

    /// A publish Redis could not be reached for: numbered here if the node cannot hear
    /// Redis either (a publish of a decision is not: it is numbered when Redis is back), by
    /// the channel's owner, to which another shard sends it back. Whether it is answered.
    fn unsent(&mut self, token: u64, unsent: Publish, at: Arrival) -> bool {
        if unsent.idempotency_key.is_some() || !self.degraded(&unsent.channel) {
            return false;
        }
        if crate::shard::owner_of(&unsent.channel, self.nshards) == self.shard {
            self.publish_here(token, unsent, at);
        } else {
            self.events.push_back(Event::Reroute {
                token,
                channel: unsent.channel.into(),
                data: unsent.data.into(),
            });
        }
        true
    }

    fn completed(&mut self, completion: Completion, at: Arrival) {
        match completion {
            Completion::History { token, result } if token & ANCHOR != 0 => {
                self.anchored(token, result)
            }
            Completion::Published {
                token,
                result,
                unsent,
            } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                let to_user = self.to_users.remove(&token);
                if let Some(unsent) = unsent {
                    if self.unsent(token, *unsent, at) {
                        return;
                    }
                }
                let reach = result
                    .as_ref()
                    .ok()
                    .filter(|_| to_user)
                    .map(|p| match p.reach {
                        -1 => Reach::Kept(p.dropped),
                        -2 => Reach::Refused,
                        n => Reach::Told(n.max(0) as usize),
                    });
                let result = result.map(|p| p.seq).map_err(|e| e.to_string());
                self.answer_reach(token, result, reach);
            }
            Completion::Kept { token, result } => {
                let result = result.map_err(|e| e.to_string());
                self.events.push_back(Event::Kept { token, result });
            }
            Completion::Record { token, result } => {
                let result = result.map_err(|e| e.to_string());
                self.events.push_back(Event::Record { token, result });
            }
            Completion::History { token, result } if token & FETCH != 0 => {
                let Some(channel) = self.fetches.remove(&token) else {
                    return;
                };
                match result {
                    Ok(page) => self.order.fetched(&channel, page, &mut self.steps),
                    Err(e) => {
                        // Read again at the next sweep (the link may be reconnecting).
                        tracing::debug!(shard = self.shard, channel, "history read failed: {e}");
                        self.order.fetch_failed(&channel);
                        self.unfetched.push(channel);
                    }
                }
            }
            Completion::History { token, result } => {
                let found = result.map(found).map_err(|e| e.to_string());
                self.events.push_back(Event::History { token, found });
            }
            Completion::PresencePage { token, result } => {
                let result = result.map_err(|e| e.to_string()).and_then(|page| {
                    let members: Result<Vec<Member>, ClusterError> =
                        page.members.iter().map(|m| parse_member(m)).collect();
                    let members = members.map_err(|e| e.to_string())?;
                    let cursor = page.last.map(Box::from);
                    Ok((page.total, page.users, members, cursor))
                });
                self.events.push_back(Event::PresencePage { token, result });
            }
            Completion::Claimed { token, result } => {
                let result = result
                    .map(|claimed| !matches!(claimed, Claimed::Refused(_)))
                    .map_err(|e| e.to_string());
                self.events.push_back(Event::Claimed { token, result });
            }
            Completion::Told { token, heard } => {
                // The control channel's receivers include this node's own PUB/SUB connection,
                // while it is up; a node's own channel has no other listener.
                let own = usize::from(!self.down.first().copied().unwrap_or(true));
                let mut nodes = heard.ok().map(|n| n as usize);
                if token & TOLD_ALL != 0 {
                    nodes = nodes.map(|n| n.saturating_sub(own));
                }
                let token = token & !TOLD_ALL;
                self.events.push_back(Event::Told { token, nodes });
            }
            Completion::Census { counts, result } => match result {
                Ok((nodes, totals)) => {
                    let counts = counts
                        .into_iter()
                        .zip(totals)
                        .map(|((tenant, mine), all)| (tenant, mine, all))
                        .collect();
                    self.events.push_back(Event::Census { nodes, counts });
                }
                // The shares stay as they were; the next second tries again.
                Err(e) => tracing::debug!(shard = self.shard, "census not taken: {e}"),
            },
            Completion::Refreshed { lost } => match lost {
                Ok(lost) if lost.is_empty() => {}
                Ok(lost) => self.events.push_back(Event::LocksLost(lost)),
                Err(e) => tracing::debug!(shard = self.shard, "locks not refreshed: {e}"),
            },
        }
    }

    /// A presence change heard on `channel`'s PUB/SUB: told to the shard unless it is one
    /// of this node's own members (the node told its members itself, and keeps them).
    fn presence_heard(&mut self, channel: &str, change: Change, node: &str, member: &[u8]) {
        if node == self.boot {
            return;
        }
        let member = match parse_member(member) {
            Ok(member) => member,
            Err(e) => return tracing::warn!(shard = self.shard, channel, "{e}"),
        };
        let ours = connection_place(&member.connection_id).is_some_and(|(n, ..)| n == self.boot);
        if ours {
            // Expired in Redis while the node still has it (it could not refresh it): the
            // next refresh puts it back.
            return;
        }
        let channel = channel.into();
        self.events.push_back(Event::PresenceChange {
            channel,
            change,
            member,
        });
    }

    /// Hand a publish to the link; a link that has stopped is answered at once.
    fn send_publish(
        &mut self,
        channel: &str,
        kind: Kind,
        data: &[u8],
        idempotency_key: Option<&str>,
        token: u64,
    ) -> Numbered {
        self.send_publish_to(channel, (kind, data), idempotency_key, None, token)
    }

    /// [`Self::send_publish`], of a message to a user with `to_user`.
    fn send_publish_to(
        &mut self,
        channel: &str,
        (kind, data): (Kind, &[u8]),
        idempotency_key: Option<&str>,
        to_user: Option<Box<UserSend>>,
        token: u64,
    ) -> Numbered {
        if to_user.is_some() {
            self.to_users.insert(token);
        }
        let op = Op::Publish(Publish {
            channel: channel.to_owned(),
            kind,
            data: data.to_vec(),
            idempotency_key: idempotency_key.map(str::to_owned),
            // The link knows where a channel Redis lost goes on from.
            floor: None,
            to_user,
        });
        if self.send(channel, token, op) {
            self.in_flight += 1;
        } else {
            self.answer(token, Err("the Redis link has stopped".to_owned()));
        }
        Numbered::Later
    }

    fn confirmed(&mut self, channel: &str) {
        if let Some((name, waiting)) = self.wanted.get_key_value(channel) {
            let name = Rc::clone(name);
            let left = waiting.saturating_sub(1);
            self.wanted.insert(Rc::clone(&name), left);
            if left == 0 {
                self.events.push_back(Event::Subscribed { channel: name });
            }
        }
    }
}

/// A history page as a replay sees it: what is kept after the reader's seq, and where the
/// kept part begins.
fn found(page: Page) -> Found {
    let floor = page.messages.first().map_or(page.top, |m| m.seq - 1);
    Found {
        messages: page
            .messages
            .into_iter()
            .map(Publication::into_shared)
            .collect(),
        upto: page.top,
        floor,
        epoch: Some(page.epoch.into()),
    }
}

impl Engine for Redis {
    fn publish(
        &mut self,
        channel: &str,
        kind: Kind,
        data: Rc<[u8]>,
        key: Option<&str>,
        _at: Arrival,
        token: u64,
    ) -> Numbered {
        // Apart from decision ids (`publish_stored`), which share the channel's results.
        let key = key.map(|key| format!("publish:{key}"));
        self.send_publish(channel, kind, &data, key.as_deref(), token)
    }

    fn publish_stored(&mut self, channel: &str, id: &str, data: Rc<[u8]>, token: u64) -> Numbered {
        self.send_publish(channel, Kind::Decision, &data, Some(id), token)
    }

    fn publish_to_user(
        &mut self,
        channel: &str,
        data: &[u8],
        key: Option<&str>,
        send: UserSend,
        token: u64,
    ) -> bool {
        if self.degraded(channel) {
            return false;
        }
        let key = key.map(|key| format!("publish:{key}"));
        let message = (Kind::Message, data);
        let send = Some(Box::new(send));
        self.send_publish_to(channel, message, key.as_deref(), send, token);
        true
    }

    fn user_online(&mut self, user: &str, on: bool, token: u64) {
        let op = if on { UsersOp::On } else { UsersOp::Off };
        self.users_op(op, vec![user.to_owned()], "", token);
    }

    fn users_online(&mut self, users: Vec<String>) {
        // A call per thousand users: one script call holds Redis for as long as it runs.
        let mut users = users.into_iter().peekable();
        loop {
            let chunk: Vec<String> = users.by_ref().take(1_000).collect();
            self.users_op(UsersOp::Refresh, chunk, "", 0);
            if users.peek().is_none() {
                break;
            }
        }
    }

    fn census(&mut self, counts: Vec<(String, u32)>) {
        // On the first Redis, a call per thousand tenants (one script holds Redis while it
        // runs).
        let mut counts = counts.into_iter().peekable();
        while counts.peek().is_some() {
            let chunk: Vec<(String, u32)> = counts.by_ref().take(1_000).collect();
            let request = Request {
                shard: self.shard,
                token: 0,
                op: Op::Census(chunk),
            };
            let _ = self.instances[0].link.send(request);
        }
    }

    fn keep_again(&mut self, user: &str, entries: Vec<Vec<u8>>) {
        let n = self.instances.len();
        let op = Op::Users {
            op: UsersOp::Back,
            users: vec![user.to_owned()],
            org: String::new(),
            entries,
        };
        let request = Request {
            shard: self.shard,
            token: 0,
            op,
        };
        let _ = self.instances[user_redis(user, n)].link.send(request);
    }

    fn keep_record(&mut self, pid: &str, record: Vec<u8>, ttl_ms: u64) {
        self.record_op(pid, Some(record), ttl_ms, 0);
    }

    fn take_record(&mut self, pid: &str, token: u64) {
        self.record_op(pid, None, 0, token);
    }

    fn kept(&mut self, user: &str, org: Option<&str>, clear: bool, token: u64) {
        let op = if clear { UsersOp::Clear } else { UsersOp::Read };
        self.users_op(op, vec![user.to_owned()], org.unwrap_or(""), token);
    }

    fn numbers_locally(&self) -> bool {
        false
    }

    fn reserve(&mut self, channel: &str, _stored: bool) -> u64 {
        // The shard asks only when `numbers_locally`.
        tracing::error!(shard = self.shard, channel, "reserve on the cluster engine");
        0
    }

    fn keep(&mut self, channel: &str, _publication: Publication, _at: Arrival) {
        tracing::error!(shard = self.shard, channel, "keep on the cluster engine");
    }

    fn give_back(&mut self, _channel: &str, _seq: u64) {}

    fn history(&mut self, channel: &str, after: u64, now_ms: u64, token: u64) -> Option<Found> {
        if let Some(local) = self.local.get_mut(channel) {
            let mut found = local.ring.since(after, now_ms, self.limits);
            found.epoch = Some(local.epoch.clone());
            return Some(found);
        }
        let op = Op::History {
            channel: channel.to_owned(),
            since: after,
            limit: self.page,
        };
        if !self.send(channel, token, op) {
            let found = Err("the Redis link has stopped".to_owned());
            self.events.push_back(Event::History { token, found });
        }
        None
    }

    /// Decisions' numbering is not kept by this engine yet.
    fn recover(&mut self, _channel: &str, _seq: u64) {}

    fn want(&mut self, channel: &str, on: bool) -> bool {
        if !on {
            if self.wanted.remove(channel).is_some() {
                self.instance(channel).wants.unsubscribe(channel);
                self.order.forget(channel);
                self.local.remove(channel);
                // A read of its top still on the way must not subscribe it.
                self.anchors.retain(|_, c| &**c != channel);
                self.unanchored.retain(|c| &**c != channel);
            }
            return true;
        }
        if let Some(waiting) = self.wanted.get(channel) {
            return *waiting == 0;
        }
        let channel: Rc<str> = channel.into();
        if self.degraded(&channel) {
            // Redis cannot take the subscription now: the node's own publishes are heard at
            // once, Redis's from its top when it is back, the subscribers moved to its
            // numbering then.
            self.wanted.insert(Rc::clone(&channel), 0);
            self.order.divert(&channel);
            self.unanchored.push(channel);
            return true;
        }
        self.wanted.insert(Rc::clone(&channel), 1);
        self.anchor(channel);
        false
    }

    fn heard(&mut self, input: Input, at: Arrival) {
        match input {
            Input::Link(completion) => self.completed(completion, at),
            Input::PubSub(Incoming::Message { channel, payload }) => match Heard::parse(&payload) {
                Ok(Heard::Message(message)) => self.order.live(&channel, &message, &mut self.steps),
                Ok(Heard::Presence {
                    change,
                    node,
                    member,
                }) => self.presence_heard(&channel, change, node, member),
                Err(e) => tracing::warn!(shard = self.shard, channel, "bad PUB/SUB message: {e}"),
            },
            Input::PubSub(Incoming::Kill { conn, key, at_ms }) => {
                self.events.push_back(Event::Kill { conn, key, at_ms })
            }
            Input::PubSub(Incoming::Subscribed { channel }) => self.confirmed(&channel),
            Input::PubSub(Incoming::Resubscribed { redis }) => self.reconnected(redis),
            Input::PubSub(Incoming::Down { redis }) => self.down[redis] = true,
            Input::PubSub(Incoming::Control(payload)) => match Control::parse(&payload) {
                // Its own: done already, where the request was taken.
                Ok((from, control)) if from == self.boot && !control.heard_by_sender() => {}
                Ok((_, control)) => self.events.push_back(Event::Control(control)),
                Err(e) => tracing::warn!(shard = self.shard, "{e}"),
            },
        }
        self.take_steps(at);
    }

    fn congested(&self) -> bool {
        self.in_flight >= self.max_in_flight
    }

    fn tell_nodes(&mut self, control: &Control, node: Option<&str>, token: u64) -> bool {
        let Some(first) = self.instances.first() else {
            return false;
        };
        let token = match node {
            None if token != 0 => token | TOLD_ALL,
            _ => token,
        };
        let op = Op::Control {
            node: node.map(str::to_owned),
            payload: control.encode(&self.boot),
        };
        let request = Request {
            shard: self.shard,
            token,
            op,
        };
        first.link.send(request).is_ok()
    }

    fn presence(&mut self, channel: &str, set: &[&Member], removed: &[&str]) {
        let op = Op::Presence {
            channel: channel.to_owned(),
            set: set
                .iter()
                .map(|m| (m.connection_id.to_string(), member_bytes(m)))
                .collect(),
            removed: removed.iter().map(|id| (*id).to_owned()).collect(),
        };
        // Not answered: a failure is made good by the next refresh, or by the expiry.
        self.send(channel, 0, op);
    }

    fn presence_page(&mut self, channel: &str, after: &str, max: usize, token: u64) -> bool {
        let op = Op::PresencePage {
            channel: channel.to_owned(),
            after: after.to_owned(),
            max,
        };
        self.send(channel, token, op)
    }

    fn claim(&mut self, key: &str, holder: &str, replace: bool, token: u64) -> bool {
        let op = Op::Claim {
            key: key.to_owned(),
            holder: holder.to_owned(),
            replace,
        };
        self.send(key, token, op)
    }

    fn release(&mut self, key: &str, holder: &str) {
        let op = Op::Release {
            key: key.to_owned(),
            holder: holder.to_owned(),
        };
        self.send(key, 0, op);
    }

    fn refresh_locks(&mut self, locks: Vec<(String, String)>) {
        let mut by_redis: HashMap<usize, Vec<(String, String)>> = HashMap::new();
        for lock in locks {
            by_redis
                .entry(self.redis_of(&lock.0))
                .or_default()
                .push(lock);
        }
        for (_, locks) in by_redis {
            let Some(key) = locks.first().map(|(key, _)| key.clone()) else {
                continue;
            };
            // Answered as a `Completion::Refreshed`, which says which locks it concerns.
            self.send(&key, 0, Op::Refresh(locks));
        }
    }

    /// Redis expires what is not used; the node forgets a channel when it is not wanted.
    /// What could not be read (a channel's top, a gap) is read again; the history of the
    /// channels numbered here expires as one node's does.
    fn sweep(&mut self, now_ms: u64, needed: &dyn Fn(&str) -> bool) -> usize {
        // Not while their Redis is down: every sweep would send them all to fail again.
        let (later, now): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unanchored)
            .into_iter()
            .partition(|c| self.degraded(c));
        self.unanchored = later;
        for channel in now {
            self.anchor(channel);
        }
        let (later, now): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unfetched)
            .into_iter()
            .partition(|c| self.degraded(c));
        self.unfetched = later;
        for channel in now {
            if let Some(since) = self.order.catch_up(&channel) {
                self.fetch(channel, since);
            }
        }
        let before = self.local.len();
        let limits = self.limits;
        self.local.retain(|channel, local| {
            local.ring.expire(now_ms, limits);
            needed(channel) || !local.ring.is_empty()
        });
        before - self.local.len()
    }

    fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn channels(&self) -> usize {
        self.wanted.len()
    }

    fn epoch(&self, channel: &str) -> Option<&str> {
        match self.local.get(channel) {
            Some(local) => Some(&local.epoch),
            None => self.order.epoch(channel),
        }
    }

    fn degraded(&self, channel: &str) -> bool {
        self.down[self.redis_of(channel)]
    }
}
