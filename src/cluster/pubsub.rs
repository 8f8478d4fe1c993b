//! The node's PUB/SUB connection to one Redis: it subscribes to the channels the node's
//! shards want and hands each message to the owner shard of its channel.
//!
//! Two threads share one socket. The control thread writes (SUBSCRIBE and UNSUBSCRIBE in
//! batches, probes) and owns the set of wanted channels; the reader thread parses what Redis
//! sends. After a (re)connect every wanted channel is subscribed again, then a PING: Redis
//! answers in order, so its PONG means all of them are in place, and only then is every shard
//! told [`Incoming::Resubscribed`] (messages published while the connection was down must be
//! read from the history). The reader tells the shards, so that for each shard `Resubscribed`
//! comes before the connection's first message and `Down` after its last. Every probe
//! interval the connection gets a PING; one whose PING is not answered within the timeout is
//! dropped and made again (centrifugo #1189: a dead PUB/SUB connection went unnoticed while
//! publishes succeeded).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, IntoConnectionInfo, Value};

use super::keys::Keys;
use super::Backoff;

/// Channels per SUBSCRIBE or UNSUBSCRIBE command.
const SUBSCRIBE_BATCH: usize = 512;

/// Where to connect and how to watch the connection.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Redis URL (`redis://[[user]:password@]host:port`).
    pub url: String,
    /// Key prefix (as the publishing side's).
    pub prefix: String,
    /// A connection silent this long is probed.
    pub probe_interval: Duration,
    /// Bound on connecting, and on a probe's answer.
    pub timeout: Duration,
    /// First wait before reconnecting (doubled up to 32 times as long).
    pub backoff: Duration,
    /// Set when the connection is lost: the link to the same Redis checks its own before
    /// using it again (Redis may have restarted).
    pub lost: Arc<std::sync::atomic::AtomicBool>,
    /// This Redis's place in `cluster.redis_url`, told with `Down` and `Resubscribed`.
    pub redis: usize,
    /// This node's boot id in hex: its own channel (`Keys::node`) brings kill switches.
    pub node: String,
}

/// What the shards hear from PUB/SUB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message published on `channel` (a channel's messages come in the order Redis
    /// published them: seq order).
    Message {
        /// The shardcast channel.
        channel: String,
        /// `seq:epoch:kind:data` ([`super::Envelope`]).
        payload: Vec<u8>,
    },
    /// The connection to Redis `redis` (its place in `cluster.redis_url`) is down, or could
    /// not be made: nothing arrives from it until [`Incoming::Resubscribed`].
    Down {
        /// Which Redis.
        redis: usize,
    },
    /// Connected to Redis `redis`, and every wanted channel subscribed: what was published
    /// since the last message delivered must be read from the history.
    Resubscribed {
        /// Which Redis.
        redis: usize,
    },
    /// Connection `conn` of the shard told must give up exclusive session `key`: a newer
    /// connection took it at `at_ms` (unix ms, Redis's clock), on some node.
    Kill {
        /// The connection.
        conn: u64,
        /// Its session key.
        key: String,
        /// When.
        at_ms: u64,
    },
    /// A control message (`control::Control`, still encoded) from the control channel or the
    /// node's own: to shard 0, which acts for the node.
    Control(Vec<u8>),
    /// A [`Wants::subscribe`] of `channel` has taken effect: every message published from
    /// now on arrives. Each call is answered once, to the channel's owner shard, unless the
    /// connection drops first: then it is answered after the next `Resubscribed`.
    Subscribed {
        /// The shardcast channel.
        channel: String,
    },
}

/// What the PUB/SUB side has done (written by its threads, read by health and metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connected, with every wanted channel subscribed.
    pub up: std::sync::atomic::AtomicBool,
    /// Connections made.
    pub connections: AtomicU64,
    /// Times every wanted channel was subscribed again on a new connection.
    pub resubscribes: AtomicU64,
    /// Messages heard.
    pub messages: AtomicU64,
    /// Messages a shard had no room for (it reads them from the history).
    pub dropped: AtomicU64,
    /// Channels the node wants.
    pub subscriptions: AtomicU64,
}

/// The owner shard of a channel.
pub type Route = Arc<dyn Fn(&str) -> usize + Send + Sync>;

/// Channels whose subscription a tagged PING confirms, by tag (shared by the control thread,
/// which tags, and the readers, which see the PONGs).
type Tags = Arc<Mutex<HashMap<u64, Vec<String>>>>;

enum Control {
    Subscribe(String),
    Unsubscribe(String),
    /// The reader of connection `generation` stopped (having told the shards `Down` if it
    /// had told them `Resubscribed`).
    ReaderDown(u64, bool),
    /// Connection `generation` answered a PING.
    Pong(u64),
    /// The node stops (whoever still holds a [`Wants`]).
    Stop,
}

/// How shards say which channels the node wants (cheap to clone, never blocks).
#[derive(Clone)]
pub struct Wants(flume::Sender<Control>);

impl Wants {
    /// The node has a subscriber for `channel` now; [`Incoming::Subscribed`] says when Redis
    /// has the subscription.
    pub fn subscribe(&self, channel: &str) {
        let _ = self.0.send(Control::Subscribe(channel.to_owned()));
    }

    /// The node has no subscriber for `channel` any more.
    pub fn unsubscribe(&self, channel: &str) {
        let _ = self.0.send(Control::Unsubscribe(channel.to_owned()));
    }
}

/// The running PUB/SUB side: dropping it (and every [`Wants`]) stops its threads.
pub struct Subscriber {
    wants: Wants,
    /// What it has done.
    pub stats: Arc<Stats>,
    thread: JoinHandle<()>,
}

impl Subscriber {
    /// Start it; messages of a channel go to `incoming[route(channel)]` (dropped when that
    /// channel is full), and `Down` and `Resubscribed` to every shard (waiting for room).
    pub fn spawn(
        settings: Settings,
        route: Route,
        incoming: Vec<flume::Sender<Incoming>>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = flume::unbounded();
        let backoff = Backoff::new(settings.backoff);
        let stats = Arc::new(Stats::default());
        let mut control = ControlThread {
            stats: stats.clone(),
            keys: Keys::new(&settings.prefix),
            settings,
            route,
            incoming: Arc::new(incoming),
            self_tx: tx.downgrade(),
            wanted: HashSet::new(),
            tags: Tags::default(),
            next_tag: 0,
            unconfirmed: Vec::new(),
            conn: None,
            generation: 0,
            backoff,
            told_down: false,
        };
        let thread = std::thread::Builder::new()
            .name("redis-pubsub".into())
            .spawn(move || control.run(&rx))?;
        Ok(Self {
            wants: Wants(tx),
            stats,
            thread,
        })
    }

    /// Where shards send what they want.
    pub fn wants(&self) -> Wants {
        self.wants.clone()
    }

    /// Stop: close the connection and wait for the control thread (every [`Wants`] clone
    /// must be gone).
    pub fn join(self) {
        // Told, not left to the last sender's drop: state leaked at exit may still hold one.
        let _ = self.wants.0.send(Control::Stop);
        drop(self.wants);
        let _ = self.thread.join();
    }
}

struct Conn {
    write: TcpStream,
    /// When Redis last answered a PING, or when the connection was made.
    heard: Instant,
    /// A probe is out since then.
    probing: Option<Instant>,
}

struct ControlThread {
    stats: Arc<Stats>,
    settings: Settings,
    keys: Keys,
    route: Route,
    incoming: Arc<Vec<flume::Sender<Incoming>>>,
    /// For the reader threads (weak: the control thread stops once the shards are gone).
    self_tx: flume::WeakSender<Control>,
    wanted: HashSet<String>,
    /// Subscriptions sent, waiting for their PONG.
    tags: Tags,
    next_tag: u64,
    /// Subscriptions asked for while there was no connection: the next one confirms them.
    unconfirmed: Vec<String>,
    conn: Option<Conn>,
    generation: u64,
    backoff: Backoff,
    /// The shards were told `Down`, or will be by the reader that told them `Resubscribed`:
    /// a failed attempt need not tell them.
    told_down: bool,
}

impl ControlThread {
    fn run(&mut self, rx: &flume::Receiver<Control>) {
        loop {
            let now = Instant::now();
            if self.conn.is_none() && now >= self.backoff.retry_at {
                self.connect();
            }
            let wait = match &self.conn {
                None => self.backoff.retry_at.saturating_duration_since(now),
                Some(conn) => match conn.probing {
                    Some(since) => (since + self.settings.timeout).saturating_duration_since(now),
                    None => {
                        (conn.heard + self.settings.probe_interval).saturating_duration_since(now)
                    }
                },
            };
            match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(first) => {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    if let Some(stop) = batch.iter().position(|c| matches!(c, Control::Stop)) {
                        batch.truncate(stop);
                        self.handle(batch);
                        break;
                    }
                    self.handle(batch);
                }
                Err(flume::RecvTimeoutError::Timeout) => self.probe(),
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.drop_conn();
    }

    fn handle(&mut self, batch: Vec<Control>) {
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        // Every request is confirmed, even one for a channel wanted already: its SUBSCRIBE
        // may still be on its way.
        let mut confirm = Vec::new();
        for control in batch {
            match control {
                Control::Subscribe(channel) => {
                    confirm.push(channel.clone());
                    if self.wanted.insert(channel.clone()) {
                        unsubscribe.retain(|c| c != &channel);
                        subscribe.push(channel);
                    }
                }
                Control::Unsubscribe(channel) => {
                    if self.wanted.remove(&channel) {
                        subscribe.retain(|c| c != &channel);
                        unsubscribe.push(channel);
                    }
                }
                Control::ReaderDown(generation, told) if generation == self.generation => {
                    self.told_down |= told;
                    self.lost("the connection closed");
                }
                Control::ReaderDown(_, told) => self.told_down |= told,
                Control::Pong(generation) if generation == self.generation => {
                    if let Some(conn) = &mut self.conn {
                        conn.heard = Instant::now();
                        conn.probing = None;
                    }
                }
                Control::Pong(_) | Control::Stop => {}
            }
        }
        let wanted = self.wanted.len() as u64;
        self.stats.subscriptions.store(wanted, Relaxed);
        if self.conn.is_none() {
            self.unconfirmed.extend(confirm);
            return;
        }
        let sent = self
            .send_batched("SUBSCRIBE", subscribe.iter())
            .and_then(|()| self.send_batched("UNSUBSCRIBE", unsubscribe.iter()));
        if let Err(e) = sent {
            // The next connection subscribes them and confirms it.
            self.unconfirmed.extend(confirm);
            return self.lost(&e.to_string());
        }
        // Tagged even if the PING cannot be sent: the next connection confirms those too.
        if let Err(e) = self.confirm(confirm) {
            self.lost(&e.to_string());
        }
    }

    /// Send a PING whose PONG, coming after everything sent before it, confirms `channels`.
    fn confirm(&mut self, channels: Vec<String>) -> std::io::Result<()> {
        if channels.is_empty() {
            return Ok(());
        }
        self.next_tag += 1;
        let tag = self.next_tag;
        self.tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tag, channels);
        self.send(&[&b"PING"[..], tag.to_string().as_bytes()])
    }

    /// Probe a silent connection, or drop one whose probe went unanswered.
    fn probe(&mut self) {
        let now = Instant::now();
        let Some(conn) = &mut self.conn else {
            return;
        };
        match conn.probing {
            Some(since) if now >= since + self.settings.timeout => {
                self.lost("a probe went unanswered");
            }
            Some(_) => {}
            None if now >= conn.heard + self.settings.probe_interval => {
                conn.probing = Some(now);
                if let Err(e) = self.send(&[&b"PING"[..]]) {
                    self.lost(&e.to_string());
                }
            }
            None => {}
        }
    }

    fn connect(&mut self) {
        match self.open() {
            Ok(()) => self.backoff.succeeded(),
            Err(e) => {
                tracing::warn!(url = %self.settings.url, "cannot reach Redis for PUB/SUB: {e}");
                self.drop_conn();
                self.backoff.failed(Instant::now());
                // A node that never reached Redis, or whose connection failed before it was
                // announced, has not been told by a reader.
                if !self.told_down {
                    self.told_down = true;
                    let redis = self.settings.redis;
                    for shard in self.incoming.iter() {
                        let _ = shard.send(Incoming::Down { redis });
                    }
                }
            }
        }
    }

    fn open(&mut self) -> std::io::Result<()> {
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let info = self
            .settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| invalid(e.to_string()))?;
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Err(invalid("only redis://host:port is supported".into()));
        };
        let addr = (host.as_str(), *port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| invalid(format!("{host} does not resolve")))?;
        let write = TcpStream::connect_timeout(&addr, self.settings.timeout)?;
        write.set_nodelay(true)?;
        write.set_write_timeout(Some(self.settings.timeout))?;
        let read = write.try_clone()?;
        self.generation += 1;
        let now = Instant::now();
        self.conn = Some(Conn {
            write,
            heard: now,
            probing: Some(now),
        });
        let redis = info.redis_settings();
        if let Some(password) = redis.password() {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = redis.username() {
                auth.push(user.as_bytes());
            }
            auth.push(password.as_bytes());
            self.send(&auth)?;
        }
        let wanted: Vec<String> = self.wanted.iter().cloned().collect();
        let own = self.keys.node(&self.settings.node);
        let control = self.keys.control();
        self.send(&[&b"SUBSCRIBE"[..], own.as_bytes(), control.as_bytes()])?;
        self.send_batched("SUBSCRIBE", wanted.iter())?;
        // Answered after every SUBSCRIBE above: its PONG announces the subscriptions, and
        // confirms those a lost connection left unconfirmed.
        let mut confirm = std::mem::take(&mut self.unconfirmed);
        let lost: Vec<Vec<String>> = {
            let mut tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
            tags.drain().map(|(_, channels)| channels).collect()
        };
        confirm.extend(lost.into_iter().flatten());
        self.next_tag += 1;
        let tag = self.next_tag;
        self.tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tag, confirm);
        self.send(&[&b"PING"[..], tag.to_string().as_bytes()])?;
        self.stats.connections.fetch_add(1, Relaxed);
        let reader = Reader {
            redis: self.settings.redis,
            stats: self.stats.clone(),
            generation: self.generation,
            tags: self.tags.clone(),
            keys: self.keys.clone(),
            own,
            control_channel: control,
            route: self.route.clone(),
            incoming: self.incoming.clone(),
            control: self.self_tx.clone(),
        };
        std::thread::Builder::new()
            .name("redis-pubsub-read".into())
            .spawn(move || reader.run(read))?;
        Ok(())
    }

    fn lost(&mut self, why: &str) {
        tracing::warn!(url = %self.settings.url, "Redis PUB/SUB connection lost: {why}");
        self.settings.lost.store(true, Relaxed);
        // Its reader tells the shards, after the last message it read, if it told them
        // `Resubscribed`.
        self.told_down |= self.stats.up.load(Relaxed);
        self.drop_conn();
        self.backoff.failed(Instant::now());
    }

    fn drop_conn(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Ends the reader too.
            let _ = conn.write.shutdown(Shutdown::Both);
        }
    }

    fn send_batched<'a>(
        &mut self,
        command: &str,
        channels: impl Iterator<Item = &'a String>,
    ) -> std::io::Result<()> {
        let names: Vec<String> = channels.map(|c| self.keys.pubsub(c)).collect();
        for chunk in names.chunks(SUBSCRIBE_BATCH) {
            let mut args: Vec<&[u8]> = vec![command.as_bytes()];
            args.extend(chunk.iter().map(|n| n.as_bytes()));
            self.send(&args)?;
        }
        Ok(())
    }

    fn send(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        let Some(conn) = &mut self.conn else {
            return Ok(());
        };
        let owned: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        conn.write.write_all(&redis::pack_command(&owned))
    }
}

struct Reader {
    redis: usize,
    stats: Arc<Stats>,
    generation: u64,
    tags: Tags,
    keys: Keys,
    /// The node's own channel.
    own: String,
    /// The control channel every node hears.
    control_channel: String,
    route: Route,
    incoming: Arc<Vec<flume::Sender<Incoming>>>,
    control: flume::WeakSender<Control>,
}

impl Reader {
    fn run(self, read: TcpStream) {
        let mut parser = redis::Parser::new();
        let mut read = std::io::BufReader::new(read);
        let mut announced = false;
        while let Ok(value) = parser.parse_value(&mut read) {
            self.on_value(value, &mut announced);
        }
        if announced {
            // Told first: once health says it is down, every shard has been told.
            self.tell_all(&Incoming::Down { redis: self.redis });
            self.stats.up.store(false, Relaxed);
        }
        if let Some(control) = self.control.upgrade() {
            let _ = control.send(Control::ReaderDown(self.generation, announced));
        }
    }

    /// Hand a message to its channel's owner shard, a kill switch to its connection's shard.
    fn route_message(&self, name: &[u8], payload: Vec<u8>) {
        let own = name == self.own.as_bytes();
        let control = name == self.control_channel.as_bytes();
        if control || (own && super::control::Control::is_control(&payload)) {
            if let Some(to) = self.incoming.first() {
                // Waits for room, like a kill switch: a lost one would leave a connection
                // open that the API closed, or a token working that it revoked.
                let _ = to.send(Incoming::Control(payload));
            }
            return;
        }
        if own {
            match super::keys::Kill::parse(&payload) {
                Ok(kill) => {
                    if let Some(to) = self.incoming.get(kill.shard) {
                        let (conn, key, at_ms) = (kill.conn, kill.key, kill.at_ms);
                        // Waits for room: a lost kill switch would leave two holders until
                        // the next refresh of the locks.
                        let _ = to.send(Incoming::Kill { conn, key, at_ms });
                    }
                }
                Err(e) => tracing::warn!("{e}"),
            }
            return;
        }
        let Some(channel) = std::str::from_utf8(name)
            .ok()
            .and_then(|name| self.keys.channel_of(name))
        else {
            return;
        };
        if let Some(to) = self.incoming.get((self.route)(channel)) {
            // Never waits: with a bounded channel a shard that fell behind loses the message
            // and sees the gap in the seqs (the history has it), and the other shards are not
            // held up.
            self.stats.messages.fetch_add(1, Relaxed);
            let message = Incoming::Message {
                channel: channel.to_owned(),
                payload,
            };
            if to.try_send(message).is_err() {
                self.stats.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    fn tell_all(&self, incoming: &Incoming) {
        for shard in self.incoming.iter() {
            let _ = shard.send(incoming.clone());
        }
    }

    fn on_value(&self, value: Value, announced: &mut bool) {
        let mut pong = |tag: &[u8]| {
            // The first answers the PING sent after the subscriptions.
            if !*announced {
                *announced = true;
                self.stats.up.store(true, Relaxed);
                self.stats.resubscribes.fetch_add(1, Relaxed);
                self.tell_all(&Incoming::Resubscribed { redis: self.redis });
            }
            let tag = std::str::from_utf8(tag).ok().and_then(|t| t.parse().ok());
            if let Some(tag) = tag {
                let confirmed = self
                    .tags
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&tag);
                for channel in confirmed.into_iter().flatten() {
                    if let Some(to) = self.incoming.get((self.route)(&channel)) {
                        // Waits for room, like `Down`: a lost confirmation would leave a
                        // subscriber waiting for good.
                        let _ = to.send(Incoming::Subscribed { channel });
                    }
                }
            }
            if let Some(control) = self.control.upgrade() {
                let _ = control.send(Control::Pong(self.generation));
            }
        };
        match value {
            Value::Array(mut items) => {
                let kind = match items.first() {
                    Some(Value::BulkString(kind)) => kind.as_slice(),
                    _ => return,
                };
                if kind == b"pong" {
                    match items.get(1) {
                        Some(Value::BulkString(tag)) => pong(tag),
                        _ => pong(b""),
                    }
                } else if kind == b"message" && items.len() == 3 {
                    // Taken out of the reply, not copied.
                    if let (Some(Value::BulkString(payload)), Some(Value::BulkString(name))) =
                        (items.pop(), items.pop())
                    {
                        self.route_message(&name, payload);
                    }
                }
            }
            // PING outside subscribed mode (nothing subscribed) answers +PONG, or its
            // argument.
            Value::SimpleString(s) if s == "PONG" => pong(b""),
            Value::BulkString(tag) => pong(&tag),
            Value::ServerError(e) => {
                tracing::warn!("Redis PUB/SUB error: {e:?}");
            }
            _ => {}
        }
    }
}
