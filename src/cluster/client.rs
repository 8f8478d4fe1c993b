//! One blocking connection to one Redis: the scripts loaded once, publishes pipelined (one
//! round trip for a whole batch), history read in one script call. Used only from the
//! cluster's own threads (`link.rs`), never from an executor.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

use redis::{RedisError, Value};

use crate::dialect::{Kind, Publication};

use super::keys::{kind_code, kind_of, Keys};
use super::ClusterError;

const PUBLISH: &str = include_str!("lua/publish.lua");
const HISTORY: &str = include_str!("lua/history.lua");
const PRESENCE: &str = include_str!("lua/presence.lua");
const SESSION: &str = include_str!("lua/session.lua");
const USERS: &str = include_str!("lua/users.lua");
const CENSUS: &str = include_str!("lua/census.lua");

/// Members (or locks) per call of the presence (or session) script: a refresh of a channel
/// with 100,000 members is many short calls, not one that holds Redis for long.
const ENTRIES_PER_CALL: usize = 256;

/// Messages per call of the publish script: the call's own cost is shared by this many, and
/// Redis, which runs one script at a time, is held for about 0.3 ms by each.
const MESSAGES_PER_CALL: usize = 64;

/// How long channels and idempotency results are kept in Redis.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Messages kept per channel's history stream, at least (0: none); up to a stream node
    /// (100 entries) more, as Redis trims a node at a time.
    pub history_size: usize,
    /// Seconds a channel's history outlives its last publish (0: for ever).
    pub history_ttl_s: u64,
    /// Seconds a channel's epoch and top seq outlive its last publish (0: for ever).
    pub meta_ttl_s: u64,
    /// Seconds a publish's idempotency result is remembered.
    pub result_ttl_s: u64,
    /// What is kept for users connected nowhere: messages and bytes per user, bytes for
    /// all users (`[offline]`).
    pub kept: KeptBounds,
}

/// The bounds of what is kept for users connected nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeptBounds {
    /// Messages per user (the oldest go first).
    pub messages: usize,
    /// Bytes per user, as stored (the oldest go first).
    pub bytes: usize,
    /// Bytes for all users (past it, nothing more is kept).
    pub total_bytes: usize,
}

/// A message to a user: every node is told (`head`, its seq, then `tail`: a control
/// message), or, while the user is connected nowhere, it is kept.
#[derive(Debug, Clone)]
pub struct UserSend {
    /// The user.
    pub user: String,
    /// The control message before its seq.
    pub head: String,
    /// The control message after its seq.
    pub tail: String,
    /// What is kept after its seq (`created\nexpires\norg\nchannel\ndata`), or nothing.
    pub keep: Option<Vec<u8>>,
}

/// One message to number and publish.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The channel.
    pub channel: String,
    /// What it is.
    pub kind: Kind,
    /// Its data, as published.
    pub data: Vec<u8>,
    /// A retry with the same key gets the first one's seq and publishes nothing.
    pub idempotency_key: Option<String>,
    /// Where the channel's numbering starts when Redis has none (its stored decisions'
    /// highest seq); `None`: such a publish is refused with [`ClusterError::NoFloor`].
    pub floor: Option<u64>,
    /// A message to a user: told to every node, or kept, in the same step.
    pub to_user: Option<Box<UserSend>>,
}

/// What Redis numbered a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its seq on the channel.
    pub seq: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// The key was known: this is the first publish's outcome, and nothing was published.
    pub repeated: bool,
    /// A message to a user: how many nodes were told, or -1 when it was kept, -2 when it
    /// was not (too much is kept already); 0 otherwise.
    pub reach: i64,
    /// Kept messages of the user dropped to make room for it.
    pub dropped: u64,
}

/// A channel's history after a seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The channel's top seq.
    pub top: u64,
    /// The channel's epoch.
    pub epoch: String,
    /// Kept messages after the seq asked for, in order (the oldest may be later than the
    /// one asked for: the stream keeps only so many).
    pub messages: Vec<Publication<Vec<u8>>>,
}

/// A page of a channel's presence in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresencePage {
    /// Members in all.
    pub total: usize,
    /// Distinct users among them.
    pub users: usize,
    /// The page, in id order, as `keys::member_bytes` wrote them.
    pub members: Vec<Vec<u8>>,
    /// The last id of the page, when more follow.
    pub last: Option<String>,
}

/// One channel's presence change: (channel, members kept as (connection id, member bytes),
/// connection ids removed).
pub type PresenceWrite = (String, Vec<(String, Vec<u8>)>, Vec<String>);

/// How a claim of an exclusive session ended in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The claimer holds it; no one else did (or it did already).
    Granted,
    /// The claimer holds it; this holder was told to go.
    Replaced(String),
    /// This holder keeps it (policy "reject").
    Refused(String),
}

/// The cluster's scripts.
#[derive(Debug, Clone, Copy)]
enum Script {
    Presence,
    Session,
}

/// A connection to one Redis with the cluster's scripts loaded.
pub struct Client {
    conn: redis::Connection,
    keys: Keys,
    retention: Retention,
    publish_sha: String,
    history_sha: String,
    presence_sha: String,
    session_sha: String,
    users_sha: String,
    census_sha: String,
    epochs: RandomState,
    made: u64,
}

impl Client {
    /// Connect to `url` (each call and the connect itself bounded by `timeout`) and load the
    /// scripts.
    pub fn connect(
        url: &str,
        keys: Keys,
        retention: Retention,
        timeout: Duration,
    ) -> Result<Self, ClusterError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let conn = client
            .get_connection_with_timeout(timeout)
            .map_err(unavailable)?;
        conn.set_read_timeout(Some(timeout)).map_err(unavailable)?;
        conn.set_write_timeout(Some(timeout)).map_err(unavailable)?;
        let mut client = Self {
            conn,
            keys,
            retention,
            publish_sha: String::new(),
            history_sha: String::new(),
            presence_sha: String::new(),
            session_sha: String::new(),
            users_sha: String::new(),
            census_sha: String::new(),
            epochs: RandomState::new(),
            made: 0,
        };
        // Nothing is done on a connection that cannot even load them (Redis out of clients
        // answers its first command with an error): Redis could not be reached.
        client
            .load_scripts()
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        Ok(client)
    }

    fn load_scripts(&mut self) -> Result<(), ClusterError> {
        let load = |conn: &mut redis::Connection, code: &str| {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(code)
                .query::<String>(conn)
                .map_err(failed)
        };
        self.publish_sha = load(&mut self.conn, PUBLISH)?;
        self.history_sha = load(&mut self.conn, HISTORY)?;
        self.presence_sha = load(&mut self.conn, PRESENCE)?;
        self.session_sha = load(&mut self.conn, SESSION)?;
        self.users_sha = load(&mut self.conn, USERS)?;
        self.census_sha = load(&mut self.conn, CENSUS)?;
        Ok(())
    }

    /// An epoch for a channel that has none: random, so that a channel whose meta Redis
    /// lost is told apart from its earlier life.
    fn fresh_epoch(&mut self) -> String {
        self.made += 1;
        format!("{:016x}", self.epochs.hash_one(self.made))
    }

    /// Number and publish `batch` in one round trip, in order; each message's own outcome.
    /// An `Err` for the whole call means the connection failed: which of the batch ran is
    /// not known (a retry of those with an idempotency key is safe).
    pub fn publish(
        &mut self,
        batch: &[Publish],
    ) -> Result<Vec<Result<Published, ClusterError>>, ClusterError> {
        let mut outcomes: Vec<Option<Result<Published, ClusterError>>> = vec![None; batch.len()];
        // Script calls, each a range of the batch.
        let mut todo: Vec<std::ops::Range<usize>> = (0..batch.len())
            .step_by(MESSAGES_PER_CALL)
            .map(|start| start..(start + MESSAGES_PER_CALL).min(batch.len()))
            .collect();
        // A second pass only for the calls Redis answered NOSCRIPT (it restarted and forgot
        // the script): those did not run, so running them again publishes nothing twice.
        for pass in 0..2 {
            let mut pipe = redis::pipe();
            for range in &todo {
                let call = self.publish_call(&batch[range.clone()]);
                pipe.add_command(call);
            }
            let replies: Vec<redis::RedisResult<Value>> =
                pipe.ignore_errors().query(&mut self.conn).map_err(lost)?;
            if replies.len() != todo.len() {
                return Err(ClusterError::Protocol(format!(
                    "{} replies to a pipeline of {}",
                    replies.len(),
                    todo.len()
                )));
            }
            let mut again = Vec::new();
            for (range, reply) in todo.into_iter().zip(replies) {
                match reply {
                    Err(e) if pass == 0 && e.code() == Some("NOSCRIPT") => again.push(range),
                    Err(e) => {
                        let e = failed(e);
                        range.for_each(|i| outcomes[i] = Some(Err(e.clone())));
                    }
                    Ok(value) => {
                        let answers = published_all(value, range.len());
                        for (i, answer) in range.zip(answers) {
                            outcomes[i] = Some(answer);
                        }
                    }
                }
            }
            if again.is_empty() {
                break;
            }
            self.load_scripts()?;
            todo = again;
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(ClusterError::Protocol("no reply".into()))))
            .collect())
    }

    /// One call of the publish script for `messages`.
    fn publish_call(&mut self, messages: &[Publish]) -> redis::Cmd {
        let mut keys = Vec::with_capacity(messages.len() * 4);
        for p in messages {
            keys.push(self.keys.meta(&p.channel));
            keys.push(self.keys.stream(&p.channel));
            keys.push(
                p.idempotency_key
                    .as_deref()
                    .map_or_else(String::new, |key| self.keys.result(&p.channel, key)),
            );
            keys.push(self.keys.pubsub(&p.channel));
        }
        let r = &self.retention;
        let mut call = redis::cmd("EVALSHA");
        call.arg(&self.publish_sha)
            .arg(keys.len())
            .arg(&keys)
            .arg(r.history_size)
            .arg(r.history_ttl_s)
            .arg(r.meta_ttl_s)
            .arg(r.result_ttl_s.max(1))
            .arg(self.keys.control())
            .arg(self.keys.users())
            .arg(crate::clock::unix_ms())
            .arg(r.kept.messages)
            .arg(r.kept.bytes)
            .arg(r.kept.total_bytes);
        for p in messages {
            let epoch = self.fresh_epoch();
            let floor = p.floor.map_or(-1, |f| f.min(i64::MAX as u64) as i64);
            // A message to a user is kind "u", and only it has four more arguments.
            let kind = match p.to_user {
                Some(_) => "u",
                None => kind_code(p.kind),
            };
            call.arg(&p.data[..]).arg(kind).arg(epoch).arg(floor);
            if let Some(send) = &p.to_user {
                call.arg(&send.user)
                    .arg(&send.head)
                    .arg(&send.tail)
                    .arg(send.keep.as_deref().unwrap_or_default());
            }
        }
        call
    }

    /// What `channel` keeps after seq `since`, at most `limit` messages (0: only its top
    /// and epoch).
    pub fn history(
        &mut self,
        channel: &str,
        since: u64,
        limit: usize,
    ) -> Result<Page, ClusterError> {
        for pass in 0..2 {
            let epoch = self.fresh_epoch();
            let reply = redis::cmd("EVALSHA")
                .arg(&self.history_sha)
                .arg(2)
                .arg(self.keys.meta(channel))
                .arg(self.keys.stream(channel))
                .arg(since.saturating_add(1))
                .arg(limit)
                .arg(epoch)
                .arg(self.retention.meta_ttl_s)
                .query::<Value>(&mut self.conn);
            match reply {
                Err(e) if pass == 0 && e.code() == Some("NOSCRIPT") => self.load_scripts()?,
                Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                    return Err(unavailable(e))
                }
                Err(e) => return Err(failed(e)),
                Ok(value) => return page(value),
            }
        }
        Err(ClusterError::Protocol(
            "the history script stays unknown".into(),
        ))
    }

    /// Run the calls of `script` (keys, arguments) in one round trip: each call's reply. A
    /// call Redis answers NOSCRIPT (it restarted) did not run: all are sent again once the
    /// scripts are loaded again.
    fn run(
        &mut self,
        script: Script,
        calls: &[(Vec<String>, Vec<Vec<u8>>)],
    ) -> Result<Vec<Value>, ClusterError> {
        for pass in 0..2 {
            let sha = match script {
                Script::Presence => &self.presence_sha,
                Script::Session => &self.session_sha,
            };
            let mut pipe = redis::pipe();
            for (keys, args) in calls {
                let mut call = redis::cmd("EVALSHA");
                call.arg(sha).arg(keys.len()).arg(keys).arg(args);
                pipe.add_command(call);
            }
            let replies: Vec<redis::RedisResult<Value>> =
                pipe.ignore_errors().query(&mut self.conn).map_err(lost)?;
            if pass == 0
                && replies
                    .iter()
                    .any(|r| matches!(r, Err(e) if e.code() == Some("NOSCRIPT")))
            {
                self.load_scripts()?;
                continue;
            }
            return replies.into_iter().map(|r| r.map_err(failed)).collect();
        }
        Err(ClusterError::Protocol("the scripts stay unknown".into()))
    }

    /// Presence of several channels in one round trip, each (channel, members `set` as (id,
    /// member) kept for `ttl_ms` (JOIN or STATUS told for the new and the changed), ids
    /// `removed` (LEAVE told)), on behalf of `node`.
    pub fn presence_write(
        &mut self,
        writes: &[PresenceWrite],
        node: &str,
        ttl_ms: u64,
    ) -> Result<(), ClusterError> {
        let mut calls = Vec::new();
        for (channel, set, removed) in writes {
            let keys = self.presence_keys(channel);
            for chunk in set.chunks(ENTRIES_PER_CALL) {
                let mut args = vec![b"set".to_vec(), ttl_ms.to_string().into(), node.into()];
                for (id, member) in chunk {
                    args.push(id.as_bytes().to_vec());
                    args.push(member.clone());
                }
                calls.push((keys.clone(), args));
            }
            for chunk in removed.chunks(ENTRIES_PER_CALL) {
                let mut args = vec![b"rem".to_vec(), node.into()];
                args.extend(chunk.iter().map(|id| id.as_bytes().to_vec()));
                calls.push((keys.clone(), args));
            }
        }
        if calls.is_empty() {
            return Ok(());
        }
        self.run(Script::Presence, &calls).map(drop)
    }

    /// `channel`'s members after id `after` (`""`: from the first), at most `max`.
    pub fn presence_page(
        &mut self,
        channel: &str,
        after: &str,
        max: usize,
    ) -> Result<PresencePage, ClusterError> {
        let args = vec![b"get".to_vec(), after.into(), max.to_string().into()];
        let call = (self.presence_keys(channel), args);
        let reply = self.run(Script::Presence, &[call])?.pop();
        let reply = reply.ok_or_else(|| ClusterError::Protocol("no reply".into()))?;
        let (total, users, members, last): (usize, usize, Vec<Vec<u8>>, String) =
            redis::from_redis_value(reply).map_err(|e| ClusterError::Protocol(e.to_string()))?;
        Ok(PresencePage {
            total,
            users,
            members,
            last: (!last.is_empty()).then_some(last),
        })
    }

    fn presence_keys(&self, channel: &str) -> Vec<String> {
        let mut keys = self.keys.presence(channel).to_vec();
        keys.push(self.keys.pubsub(channel));
        keys
    }

    /// Connection `holder` claims session `key` for `ttl_ms`; `replace`: a holder is told
    /// to go, else the claim is refused.
    pub fn claim(
        &mut self,
        key: &str,
        holder: &str,
        ttl_ms: u64,
        replace: bool,
    ) -> Result<Claimed, ClusterError> {
        let policy = if replace { "replace" } else { "reject" };
        let args = [
            "claim",
            holder,
            &ttl_ms.to_string(),
            policy,
            self.keys.prefix(),
            key,
        ];
        let args = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        let call = (vec![self.keys.session(key)], args);
        let reply = self.run(Script::Session, &[call])?.pop();
        let reply = reply.ok_or_else(|| ClusterError::Protocol("no reply".into()))?;
        let (outcome, held): (u8, String) =
            redis::from_redis_value(reply).map_err(|e| ClusterError::Protocol(e.to_string()))?;
        Ok(match outcome {
            1 => Claimed::Granted,
            2 => Claimed::Replaced(held),
            _ => Claimed::Refused(held),
        })
    }

    /// Connection `holder` lets session `key` go (if it still holds it).
    pub fn release(&mut self, key: &str, holder: &str) -> Result<(), ClusterError> {
        let args = vec![b"release".to_vec(), holder.into()];
        let call = (vec![self.keys.session(key)], args);
        self.run(Script::Session, &[call]).map(drop)
    }

    /// Keep `locks` (session key, holder) for `ttl_ms` more: the places of those someone
    /// else holds now.
    pub fn refresh(
        &mut self,
        locks: &[(String, String)],
        ttl_ms: u64,
    ) -> Result<Vec<usize>, ClusterError> {
        let calls: Vec<_> = locks
            .chunks(ENTRIES_PER_CALL)
            .map(|chunk| {
                let keys = chunk.iter().map(|(k, _)| self.keys.session(k)).collect();
                let mut args = vec![b"refresh".to_vec(), ttl_ms.to_string().into()];
                args.extend(chunk.iter().map(|(_, h)| h.as_bytes().to_vec()));
                (keys, args)
            })
            .collect();
        let replies = self.run(Script::Session, &calls)?;
        let mut lost = Vec::new();
        for (n, reply) in replies.into_iter().enumerate() {
            let places: Vec<usize> = redis::from_redis_value(reply)
                .map_err(|e| ClusterError::Protocol(e.to_string()))?;
            let first = n * ENTRIES_PER_CALL;
            lost.extend(places.into_iter().map(|p| first + p.saturating_sub(1)));
        }
        Ok(lost)
    }

    /// PUBLISH `payload` on the PUB/SUB channel `channel`: how many connections heard it.
    /// Keep `value` at `key` for `ttl_ms`.
    pub fn keep(&mut self, key: &str, value: &[u8], ttl_ms: u64) -> Result<(), ClusterError> {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query::<()>(&mut self.conn)
            .map_err(unavailable)
    }

    /// The value at `key`, taken (at most one caller gets it).
    pub fn take(&mut self, key: &str) -> Result<Option<Vec<u8>>, ClusterError> {
        redis::cmd("GETDEL")
            .arg(key)
            .query::<Option<Vec<u8>>>(&mut self.conn)
            .map_err(unavailable)
    }

    pub fn publish_raw(&mut self, channel: &str, payload: &[u8]) -> Result<u64, ClusterError> {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query::<u64>(&mut self.conn)
            .map_err(unavailable)
    }

    /// `users.lua`'s `op` (`on`, `off`, `refresh`, `read`, `clear`, `back`) for `users`
    /// (`org` for `read` and `clear`, `entries` for `back`), this node `node` having them until `till_ms`: the kept entries
    /// (`on`, `read`, `clear`), or none.
    pub fn users(
        &mut self,
        op: &str,
        node: &str,
        till_ms: u64,
        users: &[String],
        org: &str,
        entries: &[Vec<u8>],
    ) -> Result<Vec<Vec<u8>>, ClusterError> {
        let mut call = redis::cmd("EVALSHA");
        call.arg(&self.users_sha)
            .arg(0)
            .arg(op)
            .arg(self.keys.users())
            .arg(node)
            .arg(crate::clock::unix_ms())
            .arg(till_ms)
            .arg(users);
        if matches!(op, "read" | "clear") {
            call.arg(org);
        }
        for entry in entries {
            call.arg(&entry[..]);
        }
        let value = match call.query::<Value>(&mut self.conn) {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.load_scripts()?;
                call.query::<Value>(&mut self.conn).map_err(lost)?
            }
            other => other.map_err(lost)?,
        };
        Ok(match value {
            Value::Array(entries) => entries
                .into_iter()
                .filter_map(|e| redis::from_redis_value::<Vec<u8>>(e).ok())
                .collect(),
            _ => Vec::new(),
        })
    }

    /// Write `node`'s sessions per tenant (its record living `ttl_ms`) and read every
    /// node's (`census.lua`): how many nodes are alive, and each tenant's sessions over
    /// them, in the order given.
    pub fn census(
        &mut self,
        node: &str,
        ttl_ms: u64,
        counts: &[(String, u32)],
    ) -> Result<(u32, Vec<u32>), ClusterError> {
        let mut call = redis::cmd("EVALSHA");
        call.arg(&self.census_sha)
            .arg(0)
            .arg(self.keys.prefix())
            .arg(node)
            .arg(ttl_ms);
        for (tenant, count) in counts {
            call.arg(tenant).arg(count);
        }
        let totals = match call.query::<Vec<u32>>(&mut self.conn) {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.load_scripts()?;
                call.query::<Vec<u32>>(&mut self.conn).map_err(lost)?
            }
            other => other.map_err(lost)?,
        };
        let nodes = totals.first().copied().unwrap_or(1);
        Ok((nodes, totals.get(1..).unwrap_or_default().to_vec()))
    }

    /// Whether the connection still reaches Redis (a PING).
    pub fn ping(&mut self) -> Result<(), ClusterError> {
        redis::cmd("PING")
            .query::<String>(&mut self.conn)
            .map(drop)
            .map_err(unavailable)
    }

    /// The connection itself, for commands the cluster's tests and tools send directly.
    pub fn connection(&mut self) -> &mut redis::Connection {
        &mut self.conn
    }
}

/// The publish script's answers for `n` messages: `{seq, epoch, flag}` each, flag 2 for a
/// message that failed (its epoch field is the error).
fn published_all(value: Value, n: usize) -> Vec<Result<Published, ClusterError>> {
    // {seq, epoch, flag}, and for a message to a user numbered now {…, reach, dropped}.
    let answers: Vec<Vec<Value>> = match redis::from_redis_value(value) {
        Ok(answers) => answers,
        Err(e) => return vec![Err(ClusterError::Protocol(e.to_string())); n],
    };
    if answers.len() != n {
        let e = ClusterError::Protocol(format!("{} answers for {n} messages", answers.len()));
        return vec![Err(e); n];
    }
    answers
        .into_iter()
        .map(|answer| {
            let mut fields = answer.into_iter();
            let mut next = || fields.next().unwrap_or(Value::Nil);
            let seq: u64 = redis::from_redis_value(next()).unwrap_or(0);
            let epoch: String = redis::from_redis_value(next()).unwrap_or_default();
            let flag: u8 = redis::from_redis_value(next()).unwrap_or(2);
            let reach: i64 = redis::from_redis_value(next()).unwrap_or(0);
            let dropped: u64 = redis::from_redis_value(next()).unwrap_or(0);
            (seq, epoch, flag, reach, dropped)
        })
        .map(|(seq, epoch, flag, reach, dropped)| match flag {
            2 => Err(ClusterError::Refused(epoch)),
            3 => Err(ClusterError::NoFloor),
            _ => Ok(Published {
                seq,
                epoch,
                repeated: flag == 1,
                reach,
                dropped,
            }),
        })
        .collect()
}

type Entry = (String, Vec<Vec<u8>>);

fn page(value: Value) -> Result<Page, ClusterError> {
    let protocol = |e: String| ClusterError::Protocol(e);
    let (top, epoch, entries): (u64, String, Vec<Entry>) =
        redis::from_redis_value(value).map_err(|e| protocol(e.to_string()))?;
    let mut messages = Vec::with_capacity(entries.len());
    for (id, fields) in entries {
        let seq = id
            .split_once('-')
            .map_or(id.as_str(), |(ms, _)| ms)
            .parse()
            .map_err(|_| protocol(format!("stream entry id {id:?}")))?;
        let (mut data, mut kind) = (None, None);
        for pair in fields.chunks_exact(2) {
            match &pair[0][..] {
                b"d" => data = Some(pair[1].clone()),
                b"k" => kind = Some(kind_of(&pair[1])?),
                _ => {}
            }
        }
        let (Some(data), Some(kind)) = (data, kind) else {
            return Err(protocol(format!("stream entry {id} lacks its fields")));
        };
        messages.push(Publication { seq, kind, data });
    }
    Ok(Page {
        top,
        epoch,
        messages,
    })
}

/// Redis could not be reached.
fn unavailable(e: RedisError) -> ClusterError {
    ClusterError::Unavailable(e.to_string())
}

/// The connection failed during a call whose effects are not known.
fn lost(e: RedisError) -> ClusterError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        ClusterError::Unknown(e.to_string())
    } else {
        ClusterError::Refused(e.to_string())
    }
}

/// Redis answered with an error.
fn failed(e: RedisError) -> ClusterError {
    ClusterError::Refused(e.to_string())
}
