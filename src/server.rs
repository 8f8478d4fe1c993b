//! Start-up and shutdown: file-descriptor limit, CPU placement, listeners, one glommio executor
//! per shard, the channel mesh, and the graceful drain on SIGTERM/SIGINT.
//!
//! Everything that can fail is done before any executor starts: `MeshBuilder::join` waits for
//! every shard, so a shard that failed on its own would hang the others.
//!
//! Shutdown: a signal thread tells every shard. Each shard sends `SYSTEM restart` to every
//! client, lets the queues drain, closes with 1001, and returns once its WebSocket
//! connections are gone or `drain_timeout_ms` has passed; until then it still answers HTTP
//! (503 for `/health/ready` and for upgrades), then drops its listener.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};

use crate::clock::Now;
use crate::cluster::node::{Node, ShardSide};
use crate::config::Config;
use crate::engine::Input;
use crate::mesh::{self, Batch};
use crate::metrics::{Global, Task};
use crate::poller::{self, Poller, Ring, Watched};
use crate::shard::{Shard, StorageLink};
use crate::storage::{self, Completion, Recovery, StorageError, Writer};

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The decision store could not be opened.
    #[error("cannot open storage: {0}")]
    Storage(#[from] StorageError),
    /// The cluster's Redis threads could not be started.
    #[error("cannot start the cluster's Redis threads: {0}")]
    Cluster(std::io::Error),
    /// The TLS certificate or key could not be used.
    #[error("{0}")]
    Tls(String),
    /// A shard's readiness ring could not be made.
    #[error("cannot set up io_uring for shard {shard}: {source}")]
    Ring {
        /// Shard index.
        shard: usize,
        /// The error.
        source: std::io::Error,
    },
    /// An executor could not be started.
    #[error("cannot start shard {shard}: {message}")]
    Executor {
        /// Shard index.
        shard: usize,
        /// What went wrong.
        message: String,
    },
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    global: Arc<Global>,
    stops: Vec<flume::Sender<()>>,
    reloader: Reloader,
    shards: Vec<glommio::ExecutorJoinHandle<()>>,
    storage: Option<(Writer, std::thread::JoinHandle<()>)>,
    cluster: Option<Node>,
}

impl Server {
    /// The address actually bound (the port is real even if the config said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS listener's address, when `[tls] listen` is set.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Process-wide counters.
    pub fn global(&self) -> &Arc<Global> {
        &self.global
    }

    /// A handle that starts graceful shutdown.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stops.clone())
    }

    /// A handle that applies a new configuration to the running shards.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Wait for every shard to finish, then for the storage writer to commit what it holds.
    pub fn join(self) {
        for handle in self.shards {
            if let Err(e) = handle.join() {
                tracing::error!("shard ended abnormally: {e}");
            }
        }
        // The shards are gone; the writer commits what is still queued (decisions written
        // behind under ack = "received"), then ends.
        if let Some((writer, thread)) = self.storage {
            writer.stop();
            let _ = thread.join();
        }
        if let Some(node) = self.cluster {
            node.join();
        }
    }
}

/// Starts graceful shutdown of a [`Server`].
#[derive(Clone)]
pub struct Stopper(Vec<flume::Sender<()>>);

impl Stopper {
    /// Ask every shard to drain and stop.
    pub fn stop(&self) {
        for tx in &self.0 {
            let _ = tx.send(());
        }
    }
}

/// Applies a new configuration to a running [`Server`] (SIGHUP, a change of the file).
#[derive(Clone)]
pub struct Reloader {
    /// What is in force (reloads are rare: a lock is fine here).
    current: Arc<std::sync::Mutex<InForce>>,
    shards: Vec<flume::Sender<Reconfig>>,
    global: Arc<Global>,
}

/// The configuration in force.
struct InForce {
    config: Config,
    /// The configuration as last read (before start-up filled in what it does).
    loaded: Config,
    /// Reloads that changed something.
    reloads: u64,
    /// The TLS certificate and key files as last read (a renewed certificate comes with
    /// the same configuration).
    tls_files: Option<(Vec<u8>, Vec<u8>)>,
}

/// The contents of `[tls]`'s files, when TLS is on.
fn tls_files(tls: &crate::config::Tls) -> Option<(Vec<u8>, Vec<u8>)> {
    tls.listen?;
    let read = |path: &str| std::fs::read(path).unwrap_or_default();
    Some((read(&tls.cert), read(&tls.key)))
}

/// What a shard is told on a reload.
struct Reconfig {
    config: Config,
    /// The reload's number.
    reloads: u64,
    /// New TLS connections' settings (the certificate read again).
    tls: Option<crate::tls::Acceptor>,
}

/// What a reload did.
#[derive(Debug)]
pub struct Reloaded {
    /// The configuration now in force.
    pub config: Config,
    /// Settings that differ in the new file but only change with a restart.
    pub restart: Vec<&'static str>,
    /// Whether anything that can change live did.
    pub changed: bool,
}

impl Reloader {
    /// Put `new` (already checked by [`Config::validate`]) in force on every shard, less
    /// what needs a restart.
    pub fn reload(&self, new: Config) -> Reloaded {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let (config, restart) = current.config.live_part(&current.loaded, new.clone());
        let text = |c: &Config| toml::Value::try_from(c).ok();
        let files = tls_files(&config.tls);
        let changed = text(&config) != text(&current.config) || files != current.tls_files;
        if changed {
            // `validate` read the files a moment ago: an error here is a file changed since,
            // and the certificate in force stays.
            let tls = match config.tls.listen.map(|_| crate::tls::acceptor(&config.tls)) {
                Some(Err(e)) => {
                    tracing::error!("the TLS certificate in force stays: {e}");
                    None
                }
                built => built.and_then(Result::ok),
            };
            let reloads = current.reloads + 1;
            for shard in &self.shards {
                let config = config.clone();
                let tls = tls.clone();
                let _ = shard.send(Reconfig {
                    config,
                    reloads,
                    tls,
                });
            }
            current.config = config.clone();
            current.reloads = reloads;
            current.tls_files = files;
        }
        current.loaded = new;
        Reloaded {
            config,
            restart,
            changed,
        }
    }

    /// Count a reload refused because the new configuration was invalid.
    pub fn refused(&self) {
        self.global
            .reloads_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Raise the soft file-descriptor limit to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Most file descriptors the start-up reserves room for (a table of 65,536 is 512 KiB).
const FD_TABLE_RESERVE: u64 = 1 << 16;

/// Grow the process's descriptor table to hold `fds` now, not during a storm of connections:
/// the kernel doubles the table when a new descriptor does not fit, and in a process with
/// several threads each doubling waits for an RCU grace period. Those were the accept loop's
/// slowest polls (12-35 ms, one per doubling up to 32,768) while 19,900 connections came in.
/// The table never shrinks, so taking and closing one high descriptor is enough.
fn reserve_fd_table(fds: u64) {
    let Ok(highest) = libc::c_int::try_from(fds.min(FD_TABLE_RESERVE).saturating_sub(1)) else {
        return;
    };
    // SAFETY: plain syscalls on descriptors opened and closed here; F_DUPFD takes the lowest
    // free descriptor at or above `highest`, so no open one is replaced.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if null < 0 {
            return;
        }
        let high = libc::fcntl(null, libc::F_DUPFD_CLOEXEC, highest);
        if high >= 0 {
            libc::close(high);
        }
        libc::close(null);
    }
}

/// CPUs this process may run on (`CpuSet::online()` ignores taskset and cgroups).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a zeroed cpu_set_t we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect();
        if cpus.is_empty() {
            vec![0]
        } else {
            cpus
        }
    }
}

fn listener_socket(addr: SocketAddr, backlog: u32) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    // Non-blocking, so the accept loop's direct accept4 returns EAGAIN instead of waiting.
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Start the server in the background.
pub fn start(mut config: Config) -> Result<Server, ServerError> {
    let loaded = config.clone();
    let fd_limit = raise_fd_limit();
    // Leave room for listeners, the io_uring rings, logs and the database connections.
    let capacity = fd_limit.saturating_sub(64) as usize;
    if config.max_connections == 0 {
        config.max_connections = capacity;
    } else if config.max_connections > capacity {
        tracing::warn!(
            "max_connections {} exceeds what the file-descriptor limit allows; using {capacity}",
            config.max_connections
        );
        config.max_connections = capacity;
    }
    reserve_fd_table(config.max_connections as u64 + 64);
    let cpus = allowed_cpus();
    let nshards = if config.shards == 0 {
        cpus.len()
    } else {
        config.shards
    };
    tracing::info!(
        fd_limit,
        max_connections = config.max_connections,
        shards = nshards,
        "file-descriptor limit {fd_limit}: this process can hold about {capacity} connections"
    );

    // Bind every shard's listener here, so a busy port fails start-up instead of one shard.
    let first =
        listener_socket(config.listen, config.backlog).map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = first
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(config.listen);
    let mut sockets = vec![first];
    for _ in 1..nshards {
        let socket = listener_socket(addr, config.backlog)
            .map_err(|source| ServerError::Listen { addr, source })?;
        sockets.push(socket);
    }
    let (tls, tls_addr, mut tls_sockets) = match config.tls.listen {
        Some(at) => {
            let acceptor = crate::tls::acceptor(&config.tls).map_err(ServerError::Tls)?;
            let bind = |addr| {
                listener_socket(addr, config.backlog)
                    .map_err(|source| ServerError::Listen { addr, source })
            };
            let first = bind(at)?;
            let at = first
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(at);
            let mut sockets = vec![first];
            for _ in 1..nshards {
                sockets.push(bind(at)?);
            }
            (
                Some(acceptor),
                Some(at),
                sockets.into_iter().map(Some).collect::<Vec<_>>(),
            )
        }
        None => (None, None, (0..nshards).map(|_| None).collect()),
    };

    let (writer, thread, reader, recovery) = match storage::open(&config, nshards)? {
        Some(opened) => (
            Some(opened.writer),
            Some(opened.thread),
            Some((opened.reader, opened.ordered)),
            opened.recovery,
        ),
        None => (None, None, None, Recovery::Now(Arc::default())),
    };
    let mut global = Global::new(nshards);
    let (cluster, mut sides) = if config.cluster.enabled() {
        if config.cluster.node_id.is_empty() {
            config.cluster.node_id =
                format!("{}-{}", std::process::id(), crate::decision::unix_ms());
        }
        let route = Arc::new(move |channel: &str| crate::shard::owner_of(channel, nshards));
        let boot = format!("{:x}", global.boot_id);
        let (node, sides) =
            Node::start(&config, &boot, nshards, route).map_err(ServerError::Cluster)?;
        tracing::info!(
            node = config.cluster.node_id,
            redis = ?config.cluster.redis_url,
            "cluster node: channels numbered and delivered through Redis"
        );
        (Some(node), sides.into_iter().map(Some).collect())
    } else {
        (None, Vec::new())
    };
    sides.resize_with(nshards, || None);
    global.cluster = cluster.as_ref().map(|n| n.stats(&config.cluster.node_id));
    let config = Arc::new(config);
    let global = Arc::new(global);
    let mut reloader = Reloader {
        current: Arc::new(std::sync::Mutex::new(InForce {
            config: Config::clone(&config),
            loaded,
            reloads: 0,
            tls_files: tls_files(&config.tls),
        })),
        shards: Vec::new(),
        global: global.clone(),
    };
    let mesh =
        (nshards > 1).then(|| MeshBuilder::<Batch, _>::full(nshards, config.mesh.channel_capacity));
    let mut stops = Vec::new();
    let mut shards = Vec::new();
    for ((id, socket), cluster) in sockets.into_iter().enumerate().zip(sides) {
        let (stop_tx, stop_rx) = flume::bounded(1);
        stops.push(stop_tx);
        let (reload_tx, reloads) = flume::unbounded();
        reloader.shards.push(reload_tx);
        let cpu = cpus[(config.cpu_offset + id) % cpus.len()];
        let (config, global, mesh) = (config.clone(), global.clone(), mesh.clone());
        let per_shard = (config.max_connections / nshards + 1).min(u32::MAX as usize) as u32;
        let ring =
            Ring::new(per_shard).map_err(|source| ServerError::Ring { shard: id, source })?;
        let listener = OwnedFd::from(socket);
        let tls_listener = tls_sockets[id].take().map(OwnedFd::from);
        let link = writer
            .as_ref()
            .zip(reader.as_ref())
            .map(|(writer, (reader, ordered))| {
                let (completions, inbox) = flume::unbounded();
                let (loaded, loads) = flume::unbounded();
                let durable = config.storage.ack == crate::config::AckMode::Durable;
                let link = StorageLink {
                    writer: writer.clone(),
                    completions,
                    durable,
                    reader: reader.clone(),
                    ordered: ordered.clone(),
                    loaded,
                };
                let inboxes = Inboxes {
                    completions: inbox,
                    loads,
                };
                (link, inboxes, recovery.clone())
            });
        let parts = ShardParts {
            listener,
            ring,
            storage: link,
            cluster,
            reloads,
            tls: tls.clone().zip(tls_listener),
        };
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            .spawn(move || run_shard(id, nshards, config, global, parts, mesh, stop_rx))
            .map_err(|e| ServerError::Executor {
                shard: id,
                message: e.to_string(),
            })?;
        shards.push(handle);
    }
    tracing::info!("listening on ws://{addr}/ws with {nshards} shard(s)");
    Ok(Server {
        addr,
        tls_addr,
        global,
        stops,
        reloader,
        shards,
        storage: writer.zip(thread),
        cluster,
    })
}

/// What a shard's executor is handed at start.
struct ShardParts {
    listener: OwnedFd,
    ring: Ring,
    /// The storage link, where this shard's answers come back, and what the store recovered
    /// (or where that will come from).
    storage: Option<(StorageLink, Inboxes, Recovery)>,
    /// In a cluster: the Redis instances, and where their answers come back.
    cluster: Option<ShardSide>,
    /// New configurations (reloads).
    reloads: flume::Receiver<Reconfig>,
    /// TLS: what connections are served with, and the shard's TLS listener.
    tls: Option<(crate::tls::Acceptor, OwnedFd)>,
}

/// Where the storage threads answer one shard.
struct Inboxes {
    completions: flume::Receiver<Completion>,
    loads: flume::Receiver<crate::shard::Loaded>,
}

async fn run_shard(
    id: usize,
    nshards: usize,
    config: Arc<Config>,
    global: Arc<Global>,
    parts: ShardParts,
    mesh: Option<MeshBuilder<Batch, glommio::channels::channel_mesh::Full>>,
    stop: flume::Receiver<()>,
) {
    let drain = Duration::from_millis(config.shutdown.drain_timeout_ms);
    let ShardParts {
        listener,
        ring,
        storage,
        cluster,
        reloads,
        tls,
    } = parts;
    let (page, max_in_flight) = (config.history.size.max(100), config.cluster.max_in_flight);
    let (node, limits) = ((global.boot_id, id, nshards), config.history.limits());
    let mut shard = Shard::new(id, nshards, config, global, Now::read());
    let cluster = cluster.map(|side| {
        let engine = crate::engine::Redis::new(node, side.instances, page, max_in_flight, limits);
        shard.attach_engine(Box::new(engine));
        (side.completions, side.incoming)
    });
    let mut later = None;
    let inboxes = storage.map(|(link, inboxes, recovered)| {
        match recovered {
            Recovery::Now(recovered) => shard.attach_storage(link, Some(&recovered), Now::read()),
            Recovery::Later(announced) => {
                shard.attach_storage(link, None, Now::read());
                later = Some(announced);
            }
        }
        inboxes
    });
    let shard = Rc::new(shard);
    if let Some(announced) = later {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            // Each shard takes one announcement.
            if let Ok(recovered) = announced.recv_async().await {
                shard.recover(&recovered, Now::read());
            }
        })
        .detach();
    }
    // Storage outcomes come back from the writer and reader threads; only these tasks wait
    // for them.
    let stored = inboxes.map(|inboxes| {
        let shard = shard.clone();
        let loads = inboxes.loads;
        let reads = shard.clone();
        glommio::spawn_local(timed(shard.clone(), Task::Storage, async move {
            while let Ok(loaded) = loads.recv_async().await {
                reads.loaded(loaded, Now::read());
            }
        }))
        .detach();
        let completions = inboxes.completions;
        glommio::spawn_local(timed(shard.clone(), Task::Storage, async move {
            while let Ok(completion) = completions.recv_async().await {
                shard.stored(completion, Now::read());
            }
        }))
    });
    // What the Redis threads answer and hear; only these tasks wait for them.
    if let Some((completions, incoming)) = cluster {
        let answers = shard.clone();
        glommio::spawn_local(timed(shard.clone(), Task::Cluster, async move {
            while let Ok(completion) = completions.recv_async().await {
                answers.heard(Input::Link(completion), Now::read());
            }
        }))
        .detach();
        let heard = shard.clone();
        glommio::spawn_local(timed(shard.clone(), Task::Cluster, async move {
            while let Ok(incoming) = incoming.recv_async().await {
                heard.heard(Input::PubSub(incoming), Now::read());
                // Other nodes' questions: this node's part, gathered from its shards.
                for (to, part) in heard.take_answering() {
                    let shard = heard.clone();
                    glommio::spawn_local(async move {
                        if let Some(answer) = part.gather().await {
                            shard.answer_node(to, answer);
                        }
                    })
                    .detach();
                }
            }
        }))
        .detach();
    }
    let reconfigured = shard.clone();
    glommio::spawn_local(async move {
        while let Ok(Reconfig {
            config,
            reloads,
            tls,
        }) = reloads.recv_async().await
        {
            if tls.is_some() {
                reconfigured.set_tls(tls);
            }
            let closed = reconfigured.reconfigure(config);
            reconfigured.global.reconfigured(id, reloads);
            if closed > 0 {
                tracing::info!(
                    shard = id,
                    closed,
                    "closed connections on withdrawn API keys"
                );
            }
        }
    })
    .detach();
    let poller = Rc::new(Poller::new(ring));
    {
        // Not the shard itself: it holds the adopter (a cycle would keep it for ever).
        let (weak, poller) = (Rc::downgrade(&shard), poller.clone());
        shard.set_adopter(Box::new(move |adoption| {
            let Some(shard) = weak.upgrade() else {
                return;
            };
            match crate::conn::adopt(shard, poller.clone(), adoption) {
                Ok(conn) => drop(glommio::spawn_local(conn).detach()),
                Err(e) => tracing::warn!("could not serve a handed-over connection: {e}"),
            }
        }));
    }
    if let Some(mesh) = mesh {
        match mesh.join().await {
            Ok((senders, receivers)) => mesh::spawn(&shard, senders, receivers),
            Err(_) => {
                tracing::error!(shard = id, "could not join the channel mesh");
                return;
            }
        }
    }
    let timers = timed(shard.clone(), Task::Timers, timers(shard.clone()));
    let timers = glommio::spawn_local(timers);
    let accepts = Rc::new([Accepts::default(), Accepts::default()]);
    let readiness = readiness(shard.clone(), poller.clone(), accepts.clone());
    let readiness = glommio::spawn_local(timed(shard.clone(), Task::Readiness, readiness));
    let plain = Listener::Plain(listener);
    let accepting = accept_loop(shard.clone(), poller.clone(), plain, accepts.clone());
    let accepting = glommio::spawn_local(timed(shard.clone(), Task::Accept, accepting));
    let accepting_tls = tls.map(|(acceptor, listener)| {
        shard.set_tls(Some(acceptor));
        let tls = accept_loop(shard.clone(), poller, Listener::Tls(listener), accepts);
        glommio::spawn_local(timed(shard.clone(), Task::Accept, tls))
    });
    let _ = stop.recv_async().await;
    // Still accepting while draining: probes get 503 from /health/ready and upgrades 503 with
    // Retry-After, instead of "connection refused".
    shard
        .global
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    shard.begin_shutdown();
    let deadline = Instant::now() + drain;
    // WebSocket connections first; then decisions still waiting for their commit, so their
    // ACKs go out (or their clients learn they were not stored) before the shard stops.
    while (shard.websocket_count() > 0 || shard.unconfirmed_count() > 0)
        && Instant::now() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // The listeners go: new connections are refused by the kernel from here on.
    drop(accepting);
    drop(accepting_tls);
    let left = shard.conn_count();
    if left > 0 {
        tracing::warn!(
            shard = id,
            left,
            "drain timeout: dropping remaining connections"
        );
    }
    shard.publish_counters();
    drop(timers);
    drop(readiness);
    drop(stored);
}

/// Token of the plain listener in the shard's poller (connections use their ids); the TLS
/// listener's is the one below it.
const LISTENER: u64 = poller::MAX_TOKEN;

/// A shard's listening socket.
enum Listener {
    /// `ws://` and `http://`.
    Plain(OwnedFd),
    /// `wss://` and `https://`.
    Tls(OwnedFd),
}

impl Listener {
    /// Its token in the poller and its index among the shard's [`Accepts`].
    fn index(&self) -> usize {
        match self {
            Listener::Plain(_) => 0,
            Listener::Tls(_) => 1,
        }
    }
}

/// What the readiness task tells the accept loop.
#[derive(Default)]
struct Accepts {
    /// Connections may be waiting.
    pending: Cell<bool>,
    /// The poller dropped the listener's watch.
    rewatch: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

/// Hand the poller's events to the connections (and the accept loop) they are for.
async fn readiness(shard: Rc<Shard>, poller: Rc<Poller>, accepts: Rc<[Accepts; 2]>) {
    loop {
        poller.drain(|event| dispatch(&shard, &accepts, event));
        if let Err(e) = poller.wait().await {
            tracing::error!(shard = shard.id, "waiting for socket readiness failed: {e}");
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Hand one readiness event to the connection (or the accept loop) it is for.
fn dispatch(shard: &Shard, accepts: &[Accepts; 2], event: poller::Event) {
    if event.token >= LISTENER - 1 {
        let accepts = &accepts[(LISTENER - event.token) as usize];
        accepts.pending.set(true);
        accepts.rewatch.set(accepts.rewatch.get() || event.ended);
        if let Some(waker) = accepts.waker.take() {
            waker.wake();
        }
    } else if let Some(peer) = shard.peer(event.token) {
        crate::conn::on_ready(&peer, event);
    }
}

/// Run `future` with each of its polls timed as `task`'s (the event-loop metrics). The edge
/// times the shard's tasks: the core itself reads no clock.
pub(crate) async fn timed<F: Future>(shard: Rc<Shard>, task: Task, future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        let start = Instant::now();
        let done = future.as_mut().poll(cx);
        shard.counters.record_poll(task, start.elapsed());
        done
    })
    .await
}

/// Connections accepted before the accept loop lets other tasks run.
const ACCEPT_BURST: u32 = 16;

/// Let the shard's other ready tasks run, then continue.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Accept connections until the future is dropped (which stops watching the listener and
/// closes it).
async fn accept_loop(
    shard: Rc<Shard>,
    poller: Rc<Poller>,
    listener: Listener,
    all: Rc<[Accepts; 2]>,
) {
    let index = listener.index();
    let (token, accepts, tls) = (LISTENER - index as u64, &all[index], index == 1);
    let (Listener::Plain(listener) | Listener::Tls(listener)) = listener;
    let listener = match Watched::new(listener, poller.clone(), token) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(shard = shard.id, "cannot watch the listener: {e}");
            return std::future::pending().await;
        }
    };
    let mut burst = 0;
    loop {
        // SAFETY: accept4 on our listening socket, with no address buffer.
        let accepted = unsafe {
            libc::accept4(
                listener.fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        let error = if accepted >= 0 {
            // SAFETY: a freshly accepted socket that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(accepted) };
            match crate::conn::serve(shard.clone(), poller.clone(), fd, tls) {
                Ok(conn) => {
                    glommio::spawn_local(conn).detach();
                    burst += 1;
                    if burst == ACCEPT_BURST {
                        // Let the connections just accepted read their handshakes before
                        // taking more: a full backlog accepted in one poll held the shard
                        // for up to 50 ms, and every handshake waited for all of it.
                        burst = 0;
                        // glommio reaps its ring (where the readiness task waits) only once
                        // no task is ready, which a storm of connections can put off for tens
                        // of milliseconds: hand out what the poller has seen here, so
                        // connections whose requests came after their accept are not kept
                        // waiting behind the ones still being accepted.
                        poller.drain(|event| dispatch(&shard, &all, event));
                        yield_now().await;
                    }
                    continue;
                }
                Err(e) => e,
            }
        } else {
            match std::io::Error::last_os_error() {
                e if e.kind() == std::io::ErrorKind::WouldBlock => {
                    burst = 0;
                    if accepts.rewatch.take() {
                        if let Err(e) = poller.watch(listener.fd(), token) {
                            tracing::error!(shard = shard.id, "cannot watch the listener: {e}");
                        }
                    }
                    std::future::poll_fn(|cx| {
                        if accepts.pending.take() {
                            Poll::Ready(())
                        } else {
                            accepts.waker.set(Some(cx.waker().clone()));
                            Poll::Pending
                        }
                    })
                    .await;
                    continue;
                }
                e if e.kind() == std::io::ErrorKind::Interrupted => continue,
                e => e,
            }
        };
        // Out of descriptors (or a transient error): back off instead of spinning.
        tracing::warn!(shard = shard.id, "accept failed: {error}");
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}

/// The timers' tick: how often the lag is sampled and a slice of the connections swept.
const TICK: Duration = Duration::from_millis(10);

/// The shard's clockwork, one tick every [`TICK`]: how late the tick ran (the event-loop lag:
/// a shard busy in one long poll, or kept off its core, runs it late by that long), a sweep
/// (pings and timeouts) that visits every connection once per quarter of the shortest
/// timeout (between 10 ms and 1 s) a slice per tick, and counters published every 100 ms for
/// the HTTP endpoints.
async fn timers(shard: Rc<Shard>) {
    const PUBLISH_TICKS: u64 = 10;
    // Once a second: key and org rates follow their sessions between shards.
    const REBALANCE_TICKS: u64 = 100;
    let ws = &shard.config().websocket;
    let shortest = ws
        .ping_interval_ms
        .min(ws.idle_timeout_ms)
        .min(ws.handshake_timeout_ms)
        .min(ws.message_timeout_ms)
        .min(ws.reply_timeout_ms)
        .min(crate::shard::CLOSE_TIMEOUT_MS)
        .min(shard.config().socketio.ping_interval_ms)
        .min(shard.config().socketio.ping_timeout_ms);
    let sweep_ms = (shortest / 4).clamp(10, 1_000);
    let slices = (sweep_ms / TICK.as_millis() as u64).max(1);
    let ping = Shard::ping_frame();
    for tick in 0u64.. {
        let due = Instant::now() + TICK;
        glommio::timer::sleep(TICK).await;
        let now = Now::read();
        shard
            .counters
            .record_lag(now.instant.saturating_duration_since(due));
        shard.sweep_slice(&ping, now, tick % slices, slices);
        if tick % PUBLISH_TICKS == 0 {
            shard.publish_counters();
        }
        if tick % REBALANCE_TICKS == 0 {
            shard.rebalance_quotas();
        }
    }
}
