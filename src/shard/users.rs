//! Messages to users across a cluster. Redis numbers a message to a user and, in the same
//! script call (`publish.lua`), either tells every node of it on the control channel,
//! the sender too, so that every node hands a user's messages to its connections in seq
//! order; or, with `[offline]` and the user connected nowhere, keeps it. Where users are
//! connected is in Redis too (`users.lua`): each node's owner of a user's channels marks
//! the user when the node has its first connection of it, takes what was kept in the same
//! call, and refreshes the mark while it lasts (a node that dies loses its marks after the
//! presence TTL).
//!
//! What comes for a user while its kept messages are being taken is held and delivered
//! after them.

use super::asks::Sink;
use super::directory::{Audience, Direct, ToUser};
use super::Shard;
use crate::cluster::client::UserSend;
use crate::cluster::control::{Control, Question};
use crate::dialect::{Kind, Publication};
use crate::engine::Reach;
use crate::metrics::Counter;
use crate::storage::OfflineRow;

/// The seq a control message is made with before it is cut around it (no real seq is it).
const SEQ_MARK: &str = "18446744073709551615";

/// A message that came for a user whose kept messages are being taken.
#[derive(Debug)]
pub(super) struct Held {
    org: Option<Box<str>>,
    channel: Box<str>,
    publication: Publication,
    reached: flume::Sender<usize>,
}

/// A read of what Redis keeps for a user, under way.
#[derive(Debug)]
pub(super) enum Read {
    /// Taken as the node's first connection of the user arrived.
    Take(Box<str>),
    /// For the server API.
    Queue(flume::Sender<Result<Vec<OfflineRow>, String>>),
}

impl Shard {
    /// At the owner of `channel` (a user's), in a cluster: number `data` and have Redis
    /// tell every node of it, or keep it. `Ok`: under way (the question every node answers
    /// with its reach, and the addressee); `Err`: Redis cannot be asked now.
    pub(super) fn publish_to_user(
        &self,
        channel: &str,
        data: &[u8],
        key: Option<&str>,
        to: ToUser,
        token: u64,
    ) -> Result<(u64, ToUser), Box<ToUser>> {
        let reply_to = self.expect_answers(Sink::Counts(to.reached.clone()));
        let id = reply_to.id;
        let command = Control::ToUser {
            user: to.user.to_string(),
            org: to.org.as_deref().map(String::from),
            channel: channel.into(),
            seq: u64::MAX,
            data: data.to_vec(),
        };
        let ask = Control::Ask {
            to: reply_to,
            question: Question::Count(Box::new(command)),
        };
        let encoded = ask.encode(&self.node_hex());
        let mark = format!("\"seq\":{SEQ_MARK},");
        let encoded = String::from_utf8_lossy(&encoded);
        // The field's quote: inside a JSON string it would be escaped.
        let cut = encoded.find(&mark).map(|at| at + "\"seq\":".len());
        // An org with a line break would not read back (none should have one).
        let keep =
            self.config().offline.enabled && !to.org.as_deref().is_some_and(|o| o.contains('\n'));
        let sent = cut.is_some_and(|at| {
            let now = self.now().unix_ms;
            let ttl_ms = self.config().offline.ttl_secs.saturating_mul(1_000);
            let keep = keep.then(|| {
                let org = to.org.as_deref().unwrap_or("");
                let expires = now.saturating_add(ttl_ms);
                let mut entry = format!("{now}\n{expires}\n{org}\n{channel}\n").into_bytes();
                entry.extend_from_slice(data);
                entry
            });
            let send = UserSend {
                user: to.user.to_string(),
                head: encoded[..at].to_owned(),
                tail: encoded[at + SEQ_MARK.len()..].to_owned(),
                keep,
            };
            self.engine
                .borrow_mut()
                .publish_to_user(channel, data, key, send, token)
        });
        if sent {
            Ok((id, to))
        } else {
            self.told(id, Some(0));
            Err(Box::new(to))
        }
    }

    /// Redis numbered a message to a user (question `ask`): told to `reach` nodes, or kept.
    pub(super) fn user_reached(&self, ask: u64, reach: Reach, to: ToUser) {
        match reach {
            Reach::Told(nodes) => return self.told(ask, Some(nodes)),
            Reach::Kept(dropped) => {
                self.counters.add(Counter::OfflineDropped, dropped);
                let _ = to.queued.send(true);
            }
            Reach::Refused => self.counters.add(Counter::OfflineRefused, 1),
        }
        self.told(ask, Some(0));
    }

    /// At the owner: a message numbered on `user`'s `channel`, heard from Redis, for the
    /// user's connections here (held while what was kept for the user is being taken).
    pub(super) fn user_message_heard(
        &self,
        user: Box<str>,
        org: Option<Box<str>>,
        channel: Box<str>,
        publication: Publication,
        reached: flume::Sender<usize>,
    ) {
        let mut offline = self.offline.borrow_mut();
        if let Some(held) = offline.taking.get_mut(&user) {
            held.push(Held {
                org,
                channel,
                publication,
                reached,
            });
            return;
        }
        drop(offline);
        self.to_connected(&user, org, &channel, &publication, reached);
    }

    /// At the owner, in a cluster: `shard` has (or no longer has) connections of `user`.
    /// The node's first one marks the user in Redis and takes what was kept for it; the
    /// node's last one unmarks it.
    pub(super) fn user_online_in_cluster(&self, user: &str, shard: u16, on: bool) {
        let mut offline = self.offline.borrow_mut();
        let marks = self.config().offline.enabled;
        if !on {
            let Some(shards) = offline.online.get_mut(user) else {
                return;
            };
            shards.retain(|s| *s != shard);
            if shards.is_empty() {
                offline.online.remove(user);
                drop(offline);
                if marks {
                    self.engine.borrow_mut().user_online(user, false, 0);
                }
            }
            return;
        }
        let shards = offline.online.entry(user.into()).or_default();
        let first = shards.is_empty();
        if !shards.contains(&shard) {
            shards.push(shard);
        }
        if !first || !marks {
            return;
        }
        let token = self.token();
        offline.taking.insert(user.into(), Vec::new());
        offline.reads.insert(token, Read::Take(user.into()));
        drop(offline);
        self.engine.borrow_mut().user_online(user, true, token);
    }

    /// Every third of the presence TTL: the users this node still has connections of.
    pub(super) fn refresh_users(&self) {
        if !self.config().offline.enabled {
            return;
        }
        let unmarked = std::mem::take(&mut self.offline.borrow_mut().unmarked);
        for user in unmarked {
            let mut offline = self.offline.borrow_mut();
            if !offline.online.contains_key(&user) || offline.taking.contains_key(&user) {
                continue;
            }
            let token = self.token();
            offline.taking.insert(user.clone(), Vec::new());
            offline.reads.insert(token, Read::Take(user.clone()));
            drop(offline);
            self.engine.borrow_mut().user_online(&user, true, token);
        }
        let users = self
            .offline
            .borrow()
            .online
            .keys()
            .map(|u| u.to_string())
            .collect();
        self.engine.borrow_mut().users_online(users);
    }

    /// At the owner, in a cluster: what Redis keeps for `user` (sent by `org`), dropped
    /// too with `clear`, to `reply`.
    pub(super) fn kept_in_redis(
        &self,
        user: &str,
        org: Option<&str>,
        clear: bool,
        reply: flume::Sender<Result<Vec<OfflineRow>, String>>,
    ) {
        let token = self.token();
        self.offline
            .borrow_mut()
            .reads
            .insert(token, Read::Queue(reply));
        self.engine.borrow_mut().kept(user, org, clear, token);
    }

    /// Redis answered read `token` of what it keeps for a user.
    pub(super) fn kept_read(&self, token: u64, result: Result<Vec<Vec<u8>>, String>) {
        let read = self.offline.borrow_mut().reads.remove(&token);
        let rows = result.map(|entries| entries.iter().filter_map(|e| entry_row(e)).collect());
        match (read, rows) {
            (Some(Read::Queue(reply)), rows) => drop(reply.send(rows)),
            (Some(Read::Take(user)), Ok(rows)) => self.taken(&user, rows),
            (Some(Read::Take(user)), Err(e)) => {
                // Not marked, and what is kept is still in Redis: the next refresh marks
                // the user and takes it, if the user is still here.
                tracing::warn!(
                    shard = self.id,
                    "a user could not be marked connected in Redis: {e}"
                );
                self.offline.borrow_mut().unmarked.push(user.clone());
                self.taken(&user, Vec::new());
            }
            (None, _) => {}
        }
    }

    /// What was kept for `user` is here: to the shards with its connections, then what
    /// came meanwhile. A user gone again meanwhile has it kept again, as it was.
    fn taken(&self, user: &str, rows: Vec<OfflineRow>) {
        let mut offline = self.offline.borrow_mut();
        let held = offline.taking.remove(user).unwrap_or_default();
        let shards = offline.online.get(user).cloned().unwrap_or_default();
        drop(offline);
        if shards.is_empty() && !rows.is_empty() {
            // Kept again, in front of anything kept since.
            let entries = rows.iter().map(row_entry).collect();
            self.engine.borrow_mut().keep_again(user, entries);
        }
        let now = self.now().unix_ms;
        let mut delivered = 0;
        for row in rows.into_iter().filter(|r| r.expires_ms > now as i64) {
            if shards.is_empty() {
                break;
            }
            delivered += 1;
            let audience = Audience::User {
                user: user.into(),
                org: row.org.map(Into::into),
            };
            for &shard in &shards {
                let direct = Direct::Publication {
                    channel: row.channel.as_str().into(),
                    publication: Publication {
                        seq: row.seq,
                        kind: Kind::Message,
                        data: row.data.as_bytes().to_vec(),
                    },
                };
                self.direct_to(shard, audience.clone(), direct, None);
            }
        }
        self.counters.add(Counter::OfflineDelivered, delivered);
        for h in held {
            self.to_connected(user, h.org, &h.channel, &h.publication, h.reached);
        }
    }
}

/// A kept entry as `users.lua` keeps it: `seq\ncreated\nexpires\norg\nchannel\ndata`.
fn entry_row(entry: &[u8]) -> Option<OfflineRow> {
    let mut parts = entry.splitn(6, |b| *b == b'\n');
    let mut text = || std::str::from_utf8(parts.next()?).ok();
    let seq = text()?.parse().ok()?;
    let created_ms = text()?.parse().ok()?;
    let expires_ms = text()?.parse().ok()?;
    let org = Some(text()?).filter(|o| !o.is_empty()).map(String::from);
    let channel = text()?.to_owned();
    let data = text()?.to_owned();
    let user = channel.strip_prefix("user:")?.split(':').next()?.to_owned();
    Some(OfflineRow {
        id: format!("{channel}#{seq}"),
        ord: 0,
        user,
        org,
        channel,
        seq,
        data,
        created_ms,
        expires_ms,
    })
}

/// The entry of a kept row (its inverse).
fn row_entry(row: &OfflineRow) -> Vec<u8> {
    let org = row.org.as_deref().unwrap_or("");
    let (seq, created, expires) = (row.seq, row.created_ms, row.expires_ms);
    let channel = &row.channel;
    format!(
        "{seq}\n{created}\n{expires}\n{org}\n{channel}\n{}",
        row.data
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_entries_read_back_as_written() {
        let entry = b"7\n1000\n2000\nacme\nuser:u1:notifications\n{\"a\":\"x\\ny\"}";
        let row = entry_row(entry).unwrap();
        assert_eq!((row.seq, row.created_ms, row.expires_ms), (7, 1000, 2000));
        assert_eq!(row.org.as_deref(), Some("acme"));
        assert_eq!(row.channel, "user:u1:notifications");
        assert_eq!(row.data, "{\"a\":\"x\\ny\"}");
        assert_eq!(row_entry(&row), entry);
        assert!(entry_row(b"x\n1\n2\n\nc\nd").is_none());
        assert!(entry_row(b"1\n2").is_none());
    }
}
