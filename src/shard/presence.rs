//! Presence: who is in a channel. A channel's members are kept by its owner shard
//! ([`Rosters`], plain data). A member's own shard tells the owner when it joins (a SUB with
//! `presence`), leaves (UNSUB, or its connection closes) or changes status (STATUS); the
//! owner tells the channel's presence members on every shard, through the mesh like any
//! fan-out, and answers PRESENCE a page at a time.
//!
//! In a cluster the owner keeps the node's own members, and the engine tells them to the other
//! nodes (Redis keeps every node's members, each refreshed by its node: see
//! `cluster/lua/presence.lua`): what the other nodes' members do comes back as an
//! [`crate::engine::Event::PresenceChange`], fanned out here as the node's own, and PRESENCE
//! pages through Redis (through the node's own members while Redis cannot be asked).

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use super::{MeshMsg, Origin, Peer, Shard};
use crate::auth::Principal;
use crate::dialect::{Answer, Change, Member, Refusal, Reply, Status};
use crate::engine::PresencePage;
use crate::metrics::Counter;

/// Where a member is: its shard and connection (unique on the node, and the order pages
/// follow).
pub type Place = (u16, u64);

/// A connection's STATUS: its status and metadata (a JSON object, raw).
pub type Statused = (Status, Box<[u8]>);

/// What a member's shard tells a channel's owner.
#[derive(Debug)]
pub enum Roster {
    /// The connection is a member now, or changed its status.
    Set(Member),
    /// It is not a member any more.
    Leave,
}

/// One channel's members, and how many connections each user has among them.
#[derive(Debug, Default)]
struct Members {
    /// Boxed: a B-tree leaf has room for 11 entries, so inline members made a channel of one
    /// member cost about 1.75 KB (docs/BENCHMARKS.md, issue 13).
    by_place: BTreeMap<Place, Box<Member>>,
    users: HashMap<Box<str>, u32>,
}

/// The members of the channels one shard owns.
#[derive(Debug, Default)]
pub(super) struct Rosters {
    by_channel: HashMap<Box<str>, Members>,
    total: usize,
}

impl Rosters {
    /// `member`, at `place`, is in `channel`: a JOIN if it was not, else a STATUS.
    fn set(&mut self, channel: &str, place: Place, member: Member) -> Change {
        if !self.by_channel.contains_key(channel) {
            self.by_channel.insert(channel.into(), Members::default());
        }
        let Some(members) = self.by_channel.get_mut(channel) else {
            return Change::Join;
        };
        let user = member.user.clone();
        if members.by_place.insert(place, Box::new(member)).is_some() {
            return Change::Status;
        }
        *members.users.entry(user).or_default() += 1;
        self.total += 1;
        Change::Join
    }

    /// The member at `place` left `channel`, if it was in it.
    fn remove(&mut self, channel: &str, place: Place) -> Option<Member> {
        let members = self.by_channel.get_mut(channel)?;
        let member = members.by_place.remove(&place)?;
        if let Some(n) = members.users.get_mut(&member.user) {
            *n -= 1;
            if *n == 0 {
                members.users.remove(&member.user);
            }
        }
        if members.by_place.is_empty() {
            self.by_channel.remove(channel);
        }
        self.total -= 1;
        Some(*member)
    }

    /// How many members `channel` has.
    fn count(&self, channel: &str) -> usize {
        self.by_channel.get(channel).map_or(0, |m| m.by_place.len())
    }

    /// Every channel with members, and its members.
    fn each(&self) -> impl Iterator<Item = (&str, Vec<&Member>)> {
        self.by_channel.iter().map(|(channel, members)| {
            let list = members.by_place.values().map(|m| &**m).collect();
            (&**channel, list)
        })
    }

    /// `channel`'s members after `after`, at most `max`: (members in all, distinct users, the
    /// page, where the next page begins if there is more).
    fn page(
        &self,
        channel: &str,
        after: Option<Place>,
        max: usize,
    ) -> (usize, usize, Vec<Member>, Option<Place>) {
        let Some(members) = self.by_channel.get(channel) else {
            return (0, 0, Vec::new(), None);
        };
        let range = match after {
            Some(after) => members
                .by_place
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => members.by_place.range(..),
        };
        let mut page: Vec<(Place, Member)> = range
            .take(max.saturating_add(1))
            .map(|(place, member)| (*place, Member::clone(member)))
            .collect();
        let more = page.len() > max;
        page.truncate(max);
        let next = if more {
            page.last().map(|(place, _)| *place)
        } else {
            None
        };
        let page = page.into_iter().map(|(_, member)| member).collect();
        (members.by_place.len(), members.users.len(), page, next)
    }
}

/// Longest PRESENCE cursor a cluster gives (a connection id).
const MAX_CURSOR: usize = 128;

/// A PRESENCE cursor: opaque to clients, the place the last page ended at.
fn cursor_text(place: Place) -> Box<str> {
    format!("{}.{}", place.0, place.1).into()
}

/// The place a cursor names.
pub fn parse_cursor(text: &str) -> Option<Place> {
    let (shard, conn) = text.split_once('.')?;
    Some((shard.parse().ok()?, conn.parse().ok()?))
}

impl Shard {
    /// What `peer` (`principal`) looks like as a member.
    fn member(&self, peer: &Peer, principal: &Principal) -> Member {
        let user = principal.user.as_deref().or(principal.key_id.as_deref());
        let statuses = self.statuses.borrow();
        let (status, meta) = match statuses.get(&peer.id) {
            Some((status, meta)) => (*status, meta.clone()),
            None => (Status::Online, b"{}".to_vec().into()),
        };
        Member {
            user: user.unwrap_or_default().into(),
            connection_id: self.connection_id(peer.id).into(),
            status,
            meta,
        }
    }

    /// `peer`, just subscribed to `channels` with `presence`, becomes a member of each.
    pub(super) fn join(&self, peer: &Rc<Peer>, principal: &Principal, channels: &[String]) {
        for name in channels {
            let channel: Rc<str> = name.as_str().into();
            if self.subs.borrow_mut().add_member(channel, peer) {
                let member = self.member(peer, principal);
                self.to_roster(name, peer.id, Roster::Set(member));
            }
        }
    }

    /// Connection `conn` unsubscribes from `channel`: it leaves, if it was a member.
    pub(super) fn leave(&self, conn: u64, channel: &str) {
        if self.subs.borrow_mut().remove_member(channel, conn) {
            self.to_roster(channel, conn, Roster::Leave);
        }
    }

    /// STATUS: `peer`'s status and metadata, in every channel where it is a member.
    pub(super) fn set_status(
        &self,
        peer: &Peer,
        principal: &Principal,
        status: Status,
        meta: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        let max = self.config().presence.max_meta_bytes;
        if meta.is_some_and(|m| m.len() > max) {
            return Err(Refusal::bad_request(format!(
                "\"meta\" is over {max} bytes ([presence] max_meta_bytes)"
            )));
        }
        let meta = meta.unwrap_or(b"{}").into();
        self.statuses.borrow_mut().insert(peer.id, (status, meta));
        let member = self.member(peer, principal);
        let channels = peer.channels.borrow().to_vec();
        for channel in channels {
            if self.subs.borrow().is_member(&channel, peer.id) {
                self.to_roster(&channel, peer.id, Roster::Set(member.clone()));
            }
        }
        Ok(())
    }

    /// PRESENCE on `channel` (allowed): asked of its owner, answered to `peer` with the page
    /// after `cursor`.
    pub(super) fn presence_query(
        &self,
        peer: &Peer,
        channel: &str,
        id: Option<&[u8]>,
        cursor: Option<&str>,
    ) -> Result<(), Refusal> {
        // One node's cursors are places; a cluster's are connection ids, from Redis.
        let clustered = !self.engine.borrow().numbers_locally();
        let known = |text: &str| {
            if clustered {
                text.len() <= MAX_CURSOR
            } else {
                parse_cursor(text).is_some()
            }
        };
        if cursor.is_some_and(|text| !known(text)) {
            return Err(Refusal::bad_request(
                "\"cursor\" is not one this server gave",
            ));
        }
        let origin = Origin::conn(self.id, peer.id, id);
        let owner = self.owner_of(channel);
        if owner == self.id {
            self.presence_page(channel, cursor, origin);
        } else {
            peer.owed.set(peer.owed.get() + 1);
            let msg = MeshMsg::PresenceQuery {
                channel: channel.into(),
                after: cursor.map(Box::from),
                origin,
            };
            self.route(owner, msg);
        }
        Ok(())
    }

    /// Tell `channel`'s owner what connection `conn` of this shard did.
    fn to_roster(&self, channel: &str, conn: u64, op: Roster) {
        let owner = self.owner_of(channel);
        let place = (self.id as u16, conn);
        if owner == self.id {
            return self.roster(channel, place, op);
        }
        let channel = channel.into();
        self.route(owner, MeshMsg::Roster { channel, place, op });
    }

    /// On `channel`'s owner: the member at `place` did `op`; its presence members are told,
    /// on this node and (through the engine) the others.
    pub(super) fn roster(&self, channel: &str, place: Place, op: Roster) {
        let told = match op {
            Roster::Set(member) => {
                let change = self
                    .rosters
                    .borrow_mut()
                    .set(channel, place, member.clone());
                Some((change, member))
            }
            Roster::Leave => {
                let gone = self.rosters.borrow_mut().remove(channel, place);
                gone.map(|member| (Change::Leave, member))
            }
        };
        let total = self.rosters.borrow().total;
        self.counters.set(Counter::PresenceMembers, total as u64);
        let Some((change, member)) = told else {
            return;
        };
        let mut engine = self.engine.borrow_mut();
        match change {
            Change::Leave => engine.presence(channel, &[], &[&member.connection_id]),
            Change::Join | Change::Status => engine.presence(channel, &[&member], &[]),
        }
        drop(engine);
        self.presence_changed(channel, change, &member);
    }

    /// On `channel`'s owner: tell its presence members on every shard of the node, unless
    /// it has more than `[presence] max_announced` here, counting the member (so a LEAVE is
    /// told where its JOIN was, if nobody joined between).
    pub(super) fn presence_changed(&self, channel: &str, change: Change, member: &Member) {
        let with_it = self.rosters.borrow().count(channel) + usize::from(change == Change::Leave);
        if with_it > self.config().presence.max_announced {
            return self.counters.add(Counter::PresenceUntold, 1);
        }
        self.counters.add(Counter::PresenceChanges, 1);
        if let Some(owned) = self.channels.borrow().get(channel) {
            for &shard in &owned.interest {
                let (channel, member) = (channel.into(), member.clone());
                let msg = MeshMsg::PresenceChange {
                    channel,
                    change,
                    member,
                };
                self.route(usize::from(shard), msg);
            }
        }
        self.tell_members(channel, change, member);
    }

    /// Tell the engine again of every member of the channels this shard owns (in a cluster,
    /// Redis forgets those their node stops refreshing).
    pub(super) fn refresh_presence(&self) {
        let rosters = self.rosters.borrow();
        let mut engine = self.engine.borrow_mut();
        for (channel, members) in rosters.each() {
            engine.presence(channel, &members, &[]);
        }
    }

    /// Tell this shard's presence members of `channel` what changed, as fan-out (a member
    /// that has fallen behind loses the oldest first, as with messages).
    pub(super) fn tell_members(&self, channel: &str, change: Change, member: &Member) {
        let reply = Reply::PresenceChange {
            channel,
            change,
            member,
        };
        let frame = |dialect: crate::dialect::Dialect| dialect.reply(&reply);
        let deliver = |peer: &Rc<Peer>, frame| self.deliver(peer, frame);
        self.subs.borrow().tell_members(channel, frame, deliver);
    }

    /// On `channel`'s owner: answer a PRESENCE from `origin` with the page after cursor
    /// `after`: asked of the engine (every node's members), or from the node's own.
    pub(super) fn presence_page(&self, channel: &str, after: Option<&str>, origin: Origin) {
        let max = self.config().presence.max_members;
        let token = self.token();
        let asked =
            self.engine
                .borrow_mut()
                .presence_page(channel, after.unwrap_or_default(), max, token);
        if asked {
            let ask = (channel.into(), origin);
            self.presence_asks.borrow_mut().insert(token, ask);
            return;
        }
        let after = after.and_then(parse_cursor);
        let (total, users, members, next) = self.rosters.borrow().page(channel, after, max);
        let cursor = next.map(cursor_text);
        self.presence_answer(channel, origin, (total, users, members, cursor));
    }

    /// The engine's answer to the PRESENCE of `token`; when it could not ask, the node's own
    /// members are the answer.
    pub(super) fn presence_paged(&self, token: u64, result: Result<PresencePage, String>) {
        let Some((channel, origin)) = self.presence_asks.borrow_mut().remove(&token) else {
            return;
        };
        let page = result.unwrap_or_else(|e| {
            tracing::debug!(shard = self.id, %channel, "presence from this node only: {e}");
            let max = self.config().presence.max_members;
            let (total, users, members, next) = self.rosters.borrow().page(&channel, None, max);
            (total, users, members, next.map(cursor_text))
        });
        self.presence_answer(&channel, origin, page);
    }

    fn presence_answer(&self, channel: &str, mut origin: Origin, page: PresencePage) {
        let (total, users, members, cursor) = page;
        let answer = Answer::Presence {
            channel: channel.into(),
            id: origin.id.take(),
            total,
            users,
            members,
            cursor,
        };
        self.reply(&origin, answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str, n: u64) -> Member {
        Member {
            user: user.into(),
            connection_id: format!("c{n}").into(),
            status: Status::Online,
            meta: b"{}".to_vec().into(),
        }
    }

    #[test]
    fn members_join_change_leave_and_are_counted_by_user() {
        let mut rosters = Rosters::default();
        assert_eq!(rosters.set("c", (0, 1), member("ann", 1)), Change::Join);
        assert_eq!(rosters.set("c", (1, 1), member("ann", 2)), Change::Join);
        assert_eq!(rosters.set("c", (0, 2), member("bob", 3)), Change::Join);
        let away = Member {
            status: Status::Away,
            ..member("bob", 3)
        };
        assert_eq!(rosters.set("c", (0, 2), away), Change::Status);
        let (total, users, page, next) = rosters.page("c", None, 10);
        assert_eq!((total, users, page.len(), next), (3, 2, 3, None));
        assert_eq!(page[1].status, Status::Away, "in place order");
        assert_eq!(
            rosters.remove("c", (0, 1)).map(|m| m.user),
            Some("ann".into())
        );
        assert!(rosters.remove("c", (0, 1)).is_none(), "gone already");
        assert_eq!(rosters.page("c", None, 10).1, 2, "ann is still there once");
        rosters.remove("c", (1, 1));
        rosters.remove("c", (0, 2));
        assert_eq!((rosters.total, rosters.by_channel.len()), (0, 0));
    }

    #[test]
    fn a_channel_of_100_000_members_pages_through_all_of_them_and_empties() {
        let mut rosters = Rosters::default();
        let n = 100_000u64;
        for i in 0..n {
            let place = ((i % 4) as u16, i);
            rosters.set("big", place, member(&format!("u{}", i % 50_000), i));
        }
        assert_eq!(rosters.count("big"), 100_000);
        let (mut seen, mut after, mut pages) = (0, None, 0);
        loop {
            let (total, users, page, next) = rosters.page("big", after, 1_000);
            assert_eq!((total, users), (100_000, 50_000));
            assert!(page.len() <= 1_000);
            seen += page.len();
            pages += 1;
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!((seen, pages), (100_000, 100));
        for i in 0..n {
            rosters.remove("big", ((i % 4) as u16, i));
        }
        assert_eq!((rosters.total, rosters.by_channel.len()), (0, 0));
    }

    #[test]
    fn pages_follow_their_cursor_through_every_member_once() {
        let mut rosters = Rosters::default();
        for n in 0..25 {
            rosters.set("c", ((n % 2) as u16, n), member(&format!("u{n}"), n));
        }
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let (total, users, page, next) = rosters.page("c", after, 10);
            assert_eq!((total, users), (25, 25));
            seen.extend(page.into_iter().map(|m| m.connection_id));
            let Some(next) = next else { break };
            after = parse_cursor(&cursor_text(next));
            assert_eq!(after, Some(next));
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 25);
        assert_eq!(parse_cursor("x"), None);
    }
}
