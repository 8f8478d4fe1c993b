//! Wire dialects: how a client's messages are read and how the core's answers and
//! publications are written for it.
//!
//! The core never writes bytes for a client. It reads [`Request`]s, emits numbered
//! [`Publication`]s and answers with [`Reply`]s; the connection's [`Dialect`] (a one-byte tag
//! chosen by the route it came in on) encodes them. A publication is encoded once per dialect
//! in use among a shard's subscribers ([`Encoded`]) and those bytes are shared by all of them.
//!
//! - [`shardcast`]: the shardcast JSON protocol (`/ws`).
//! - [`socketio`]: Socket.IO v4 (`/socket.io/`).
//!
//! A new dialect is a module beside `shardcast` with a parser producing [`Request`]s and an
//! encoder for [`Reply`] and [`Publication`], a variant of [`Dialect`], and a route.

use std::rc::Rc;

use crate::codec::Frame;
use crate::codes::ErrorCode;

pub mod shardcast;
pub mod socketio;

/// The wire format of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Dialect {
    /// The shardcast JSON protocol.
    #[default]
    Shardcast,
    /// Socket.IO v4 (Engine.IO protocol 4, Socket.IO protocol 5): channel messages as the
    /// document service's events.
    SocketIo,
    /// Socket.IO v4, channel messages as the intelligence-graph service's `room:message`
    /// (a connection that joined a room with `room:join`).
    SocketIoRooms,
}

impl Dialect {
    /// Number of dialects (the size of an [`Encoded`] cache).
    pub const COUNT: usize = 3;

    /// `publication` of `channel`, framed for this dialect.
    pub fn publication(self, channel: &str, publication: &Publication<impl AsRef<[u8]>>) -> Frame {
        match self {
            Dialect::Shardcast => shardcast::publication(channel, publication),
            Dialect::SocketIo => socketio::publication(channel, publication),
            Dialect::SocketIoRooms => socketio::room_message(channel, publication),
        }
    }

    /// `reply`, framed for this dialect.
    pub fn reply(self, reply: &Reply<'_>) -> Frame {
        match self {
            Dialect::Shardcast => shardcast::reply(reply),
            Dialect::SocketIo | Dialect::SocketIoRooms => socketio::reply(reply),
        }
    }
}

/// Kinds of fanned-out message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A PUBLISH, delivered as MESSAGE.
    Message,
    /// An INGEST, delivered as DECISION.
    Decision,
}

/// A numbered message of one channel, as its owner emits it: what every dialect encodes.
/// `D` is `Rc<[u8]>` within a shard and `Vec<u8>` to cross to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication<D = Rc<[u8]>> {
    /// Its seq on the channel.
    pub seq: u64,
    /// What it is.
    pub kind: Kind,
    /// Raw JSON of its `data`, byte for byte as published (decisions: enriched).
    pub data: D,
}

impl Publication {
    /// The same publication with owned bytes, to cross to another shard.
    pub fn to_sendable(&self) -> Publication<Vec<u8>> {
        Publication {
            seq: self.seq,
            kind: self.kind,
            data: self.data.to_vec(),
        }
    }
}

impl Publication<Vec<u8>> {
    /// The same publication, shareable within a shard.
    pub fn into_shared(self) -> Publication {
        Publication {
            seq: self.seq,
            kind: self.kind,
            data: Rc::from(self.data),
        }
    }
}

/// One publication's frames, encoded on first use for each dialect and then shared by every
/// subscriber of that dialect.
pub struct Encoded<'a> {
    channel: &'a str,
    publication: &'a Publication,
    frames: [Option<Frame>; Dialect::COUNT],
    /// Encodings done (what the encode-once test and `shardcast_frames_encoded_total` count).
    pub encodings: u64,
}

impl<'a> Encoded<'a> {
    /// Nothing encoded yet.
    pub fn new(channel: &'a str, publication: &'a Publication) -> Self {
        Self {
            channel,
            publication,
            frames: Default::default(),
            encodings: 0,
        }
    }

    /// The frame for `dialect`, encoded the first time it is asked for.
    pub fn frame(&mut self, dialect: Dialect) -> &Frame {
        let (channel, publication) = (self.channel, self.publication);
        let slot = &mut self.frames[dialect as usize];
        if slot.is_none() {
            self.encodings += 1;
        }
        slot.get_or_insert_with(|| dialect.publication(channel, publication))
    }
}

/// What a channel's subscribers are told besides its messages: what a cluster node could
/// not deliver. Owned, to cross the mesh as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Seqs `from..=to` were published but can no longer be had: resync if they matter.
    Lost {
        /// First missing seq.
        from: u64,
        /// Last missing seq.
        to: u64,
    },
    /// The channel's numbering started again (Redis lost it): seqs may repeat, and a
    /// position held from before recovers nothing.
    Reset {
        /// The channel's new epoch.
        epoch: Box<str>,
    },
}

/// A presence member's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Status {
    /// The default.
    #[default]
    Online,
    /// Away.
    Away,
    /// Busy.
    Busy,
}

impl Status {
    /// The status named `name`, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "online" => Some(Status::Online),
            "away" => Some(Status::Away),
            "busy" => Some(Status::Busy),
            _ => None,
        }
    }

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Away => "away",
            Status::Busy => "busy",
        }
    }
}

/// A connection present in a channel, as JOIN, LEAVE, STATUS and PRESENCE show it. Owned, to
/// cross the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The JWT `sub`, or the API key id.
    pub user: Box<str>,
    /// The connection's id, as READY gave it.
    pub connection_id: Box<str>,
    /// Its status.
    pub status: Status,
    /// Its metadata: a JSON object, raw (`{}` when none was set).
    pub meta: Box<[u8]>,
}

/// What changed in a channel's presence, told to its presence subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A member came.
    Join,
    /// A member went.
    Leave,
    /// A member's status changed.
    Status,
}

/// What the core says to one client, before any wire format. Borrowed: it is encoded at
/// once (see [`Answer`] for what crosses shards).
#[derive(Debug, Clone, Copy)]
pub enum Reply<'a> {
    /// The session is open.
    Ready {
        /// The connection's id.
        connection_id: &'a str,
        /// The shard serving it.
        shard: usize,
    },
    /// Subscribed; for channels asked with `since`, whether the replay that follows is
    /// complete.
    Subscribed {
        /// Channels subscribed.
        channels: &'a [String],
        /// Raw request id to echo.
        id: Option<&'a [u8]>,
        /// The server's epoch.
        epoch: u64,
        /// `(channel, epoch)` for each channel whose own epoch is known (in a cluster).
        epochs: &'a [(&'a str, &'a str)],
        /// `(channel, complete)` for each replay.
        recovered: &'a [(&'a str, bool)],
    },
    /// Unsubscribed.
    Unsubscribed {
        /// Channels asked.
        channels: &'a [String],
        /// Raw request id to echo.
        id: Option<&'a [u8]>,
    },
    /// The answer to PRESENCE: a page of `channel`'s members (`cursor`: where the next
    /// begins, when there is more).
    Presence {
        /// The channel.
        channel: &'a str,
        /// Raw request id to echo.
        id: Option<&'a [u8]>,
        /// Members in all.
        total: usize,
        /// Distinct users among them.
        users: usize,
        /// This page.
        members: &'a [Member],
        /// Where the next page begins.
        cursor: Option<&'a str>,
    },
    /// A presence change on `channel`.
    PresenceChange {
        /// The channel.
        channel: &'a str,
        /// What changed.
        change: Change,
        /// Who.
        member: &'a Member,
    },
    /// A newer connection took this one's exclusive session: it is closed next.
    SessionReplaced,
    /// The answer to CHANNELS.
    Channels {
        /// The connection's subscriptions, in the order made.
        channels: &'a [std::rc::Rc<str>],
        /// Raw request id to echo.
        id: Option<&'a [u8]>,
    },
    /// A PUBLISH numbered `seq`.
    PublishAck {
        /// Raw request id.
        id: &'a [u8],
        /// The message's seq.
        seq: u64,
        /// Numbered and delivered by this node alone: the cluster's Redis is down.
        local: bool,
    },
    /// A decision stored (or known: `dedup`) as `decision_id`, numbered `seq`.
    IngestAck {
        /// Its idempotency key.
        key: &'a str,
        /// Its decision id.
        decision_id: &'a str,
        /// A retry of a known key: the original's id and seq.
        dedup: bool,
        /// Its seq.
        seq: u64,
    },
    /// The decision with this key was not stored: retry it.
    StorageUnavailable {
        /// Its idempotency key.
        key: &'a str,
    },
    /// A refused or failed request.
    Error {
        /// The code.
        code: ErrorCode,
        /// What went wrong, for people.
        message: &'a str,
        /// Raw request id (or idempotency key) to echo.
        id: Option<&'a [u8]>,
        /// The channel concerned, when one of several.
        channel: Option<&'a str>,
    },
    /// Messages were dropped because the client reads too slowly.
    SlowConsumer {
        /// How many.
        dropped: u64,
    },
    /// A message over the rate limit, not processed.
    RateLimited {
        /// When the next one may be sent.
        retry_after_ms: u64,
    },
    /// The answer to an application-level PING.
    Pong {
        /// Raw `timestamp` to echo.
        timestamp: Option<&'a [u8]>,
    },
    /// The connection runs on a new token.
    Refreshed {
        /// Raw request id to echo.
        id: Option<&'a [u8]>,
        /// Its expiry (Unix ms).
        expires_ms: u64,
    },
    /// The token has expired: refresh within the grace or be closed.
    TokenExpired {
        /// The grace.
        grace_ms: u64,
    },
    /// The server is restarting: reconnect after this long.
    Restart {
        /// The delay.
        reconnect_in_ms: u64,
    },
    /// A message the server API broadcast to every connection (of an org).
    Broadcast {
        /// Raw JSON of its `data`.
        data: &'a [u8],
    },
    /// Something about a subscribed channel's stream of messages.
    Channel {
        /// The channel.
        channel: &'a str,
        /// What.
        notice: &'a Notice,
    },
}

impl<'a> Reply<'a> {
    /// The `ERROR` for a refused request.
    pub fn refusal(refusal: &'a Refusal) -> Self {
        Reply::Error {
            code: refusal.code,
            message: &refusal.message,
            id: refusal.id.as_deref(),
            channel: None,
        }
    }
}

/// An answer the owner of a channel owes a client that may be on another shard: owned, so
/// that it can cross the mesh, and encoded by the client's own shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// See [`Reply::PublishAck`].
    PublishAck {
        /// Raw request id.
        id: Box<[u8]>,
        /// The message's seq.
        seq: u64,
        /// See [`Reply::PublishAck`].
        local: bool,
    },
    /// See [`Reply::IngestAck`].
    IngestAck {
        /// Its idempotency key.
        key: Box<str>,
        /// Its decision id.
        decision_id: Box<str>,
        /// A retry of a known key.
        dedup: bool,
        /// Its seq.
        seq: u64,
    },
    /// See [`Reply::Presence`].
    Presence {
        /// The channel.
        channel: Box<str>,
        /// Raw request id to echo.
        id: Option<Box<[u8]>>,
        /// Members in all.
        total: usize,
        /// Distinct users among them.
        users: usize,
        /// This page.
        members: Vec<Member>,
        /// Where the next page begins.
        cursor: Option<Box<str>>,
    },
    /// See [`Reply::StorageUnavailable`].
    StorageUnavailable {
        /// Its idempotency key.
        key: Box<str>,
    },
    /// See [`Reply::Error`].
    Error {
        /// The code.
        code: ErrorCode,
        /// What went wrong, for people.
        message: Box<str>,
        /// Raw request id (or idempotency key, as JSON) to echo.
        id: Option<Box<[u8]>>,
        /// The request was owed an answer (counted by the client's shard as waiting for
        /// one): a PUBLISH without an id is not, but is still told it failed.
        owed: bool,
    },
}

impl Answer {
    /// The reply to encode.
    pub fn reply(&self) -> Reply<'_> {
        match self {
            Answer::PublishAck { id, seq, local } => Reply::PublishAck {
                id,
                seq: *seq,
                local: *local,
            },
            Answer::IngestAck {
                key,
                decision_id,
                dedup,
                seq,
            } => Reply::IngestAck {
                key,
                decision_id,
                dedup: *dedup,
                seq: *seq,
            },
            Answer::StorageUnavailable { key } => Reply::StorageUnavailable { key },
            Answer::Presence {
                channel,
                id,
                total,
                users,
                members,
                cursor,
            } => Reply::Presence {
                channel,
                id: id.as_deref(),
                total: *total,
                users: *users,
                members,
                cursor: cursor.as_deref(),
            },
            Answer::Error {
                code, message, id, ..
            } => Reply::Error {
                code: *code,
                message,
                id: id.as_deref(),
                channel: None,
            },
        }
    }

    /// Whether this answers a request the client's shard counted as owed.
    pub fn owed(&self) -> bool {
        match self {
            Answer::Error { owed, .. } => *owed,
            _ => true,
        }
    }
}

/// A request from a client. Raw fields (`data`, `id`, `timestamp`) are the exact bytes sent.
#[derive(Debug, PartialEq)]
pub enum Request<'a> {
    /// Subscribe to channels.
    Sub {
        /// Channel names.
        channels: Vec<String>,
        /// Raw request id to echo, if any.
        id: Option<&'a [u8]>,
        /// `since`: per channel, the last seq the client has; what came after is replayed.
        since: Vec<(String, u64)>,
        /// `epoch`: the server epoch those seqs belong to (from an earlier SUBSCRIBED).
        epoch: Option<u64>,
        /// `epochs`: per channel, the channel's epoch those seqs belong to (a cluster's,
        /// from an earlier SUBSCRIBED); it takes the place of `epoch` for that channel.
        epochs: Vec<(String, String)>,
        /// `presence`: become a member of these channels, and hear their JOIN, LEAVE and
        /// STATUS.
        presence: bool,
    },
    /// Unsubscribe from channels.
    Unsub {
        /// Channel names.
        channels: Vec<String>,
        /// Raw request id to echo, if any.
        id: Option<&'a [u8]>,
    },
    /// Ephemeral fan-out.
    Publish {
        /// Target channel.
        channel: String,
        /// Raw JSON of `data`.
        data: &'a [u8],
        /// Raw request id; an ACK is sent only when present.
        id: Option<&'a [u8]>,
        /// `idempotencyKey`: a retry of a key the channel's owner remembers is answered with
        /// the original seq and not published again.
        key: Option<String>,
    },
    /// A governance decision to validate, deduplicate and fan out.
    Ingest(Ingest<'a>),
    /// A fresh token for this connection (same user and org; its scopes apply at once).
    Refresh {
        /// The JWT.
        token: String,
        /// Raw request id to echo, if any.
        id: Option<&'a [u8]>,
    },
    /// Application-level heartbeat.
    Ping {
        /// Raw `timestamp` to echo.
        timestamp: Option<&'a [u8]>,
    },
    /// The channels this connection is subscribed to.
    Channels {
        /// Raw request id to echo, if any.
        id: Option<&'a [u8]>,
    },
    /// A page of a channel's presence members.
    Presence {
        /// The channel.
        channel: String,
        /// Raw request id to echo, if any.
        id: Option<&'a [u8]>,
        /// From a previous answer's `cursor`.
        cursor: Option<String>,
    },
    /// This connection's status (and metadata) in every channel where it is a member.
    Status {
        /// The status.
        status: Status,
        /// Raw JSON object, if given.
        meta: Option<&'a [u8]>,
    },
}

/// An INGEST request.
#[derive(Debug, PartialEq)]
pub struct Ingest<'a> {
    /// Target channel.
    pub channel: String,
    /// Idempotency key.
    pub key: String,
    /// The key as sent (a JSON string), echoed in refusals.
    pub raw_key: &'a [u8],
    /// Raw JSON of `data`.
    pub data: &'a [u8],
    /// The decision's fields, checked.
    pub decision: Box<crate::decision::Decision>,
}

/// A refused request: a machine-readable code, a message, and the request id if one was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    /// Error code sent to the client.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
    /// Raw request id (or idempotency key) to echo.
    pub id: Option<Vec<u8>>,
}

impl Refusal {
    /// A `bad_request` refusal.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Refusal {
            code: ErrorCode::BadRequest,
            message: message.into(),
            id: None,
        }
    }

    /// Attach a raw request id (or idempotency key) to echo.
    pub fn with_id(mut self, id: Option<&[u8]>) -> Self {
        self.id = id.map(<[u8]>::to_vec);
        self
    }
}
