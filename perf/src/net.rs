//! A single-threaded epoll (mio) engine for many WebSocket client connections.
//!
//! One thread, one scratch read buffer, frames parsed in place: the load generator must not
//! be the bottleneck. Scenarios plug in through [`Handler`]; what they send goes into
//! per-connection output buffers that are flushed once per loop iteration.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::ws;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for 101.
    Upgrading,
    /// WebSocket open.
    Open,
    /// Closed or failed.
    Dead,
}

struct Conn {
    stream: TcpStream,
    /// TLS state (`wss://`): plaintext in and out of it, records on the stream.
    tls: Option<Box<rustls::ClientConnection>>,
    phase: Phase,
    /// Bytes of an incomplete frame or response head.
    partial: Vec<u8>,
}

/// Output side, separate from the sockets so handlers can send while input is being parsed.
#[derive(Default)]
pub struct Outs {
    bufs: Vec<Vec<u8>>,
    sent: Vec<usize>,
    dirty: Vec<usize>,
}

impl Outs {
    /// Queue a text frame for connection `id`.
    pub fn text(&mut self, id: usize, payload: &[u8]) {
        self.frame(id, 1, payload);
    }

    fn frame(&mut self, id: usize, opcode: u8, payload: &[u8]) {
        let buf = &mut self.bufs[id];
        if buf.is_empty() {
            self.dirty.push(id);
        }
        ws::push_frame(buf, opcode, payload);
    }

    fn raw(&mut self, id: usize, bytes: &[u8]) {
        let buf = &mut self.bufs[id];
        if buf.is_empty() {
            self.dirty.push(id);
        }
        buf.extend_from_slice(bytes);
    }

    /// Bytes waiting to be written to `id`.
    pub fn pending(&self, id: usize) -> usize {
        self.bufs[id].len() - self.sent[id]
    }
}

/// What a scenario does with connection events.
pub trait Handler {
    /// Connection `id` finished its upgrade.
    fn on_open(&mut self, id: usize, outs: &mut Outs);
    /// A text frame arrived on `id`.
    fn on_text(&mut self, id: usize, text: &[u8], outs: &mut Outs);
    /// Connection `id` failed or closed.
    fn on_dead(&mut self, id: usize, error: Option<io::Error>);
    /// Bytes were just read (one clock reading per read serves every frame in it).
    fn on_read(&mut self) {}
}

/// The engine.
pub struct Engine {
    poll: Poll,
    events: Events,
    conns: Vec<Conn>,
    /// Output buffers.
    pub outs: Outs,
    read_buf: Vec<u8>,
    host: String,
    paths: Vec<String>,
    /// Frames received (all kinds).
    pub frames_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Connect with TLS, trusting what this says.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Plaintext out of TLS records.
    plain: Vec<u8>,
}

/// A TLS client setting that trusts the CA certificate(s) in the PEM file at `ca`.
pub fn tls_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    // ring, offering what browsers offer first: X25519 (ring's own default puts P-384
    // first) and AES-128-GCM (its default puts AES-256 first).
    #[allow(deprecated)]
    use rustls::crypto::ring::{cipher_suite, default_provider, kx_group};
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1],
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..default_provider()
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Engine {
    /// A new engine talking to `host` (for the Host header), reading at most `read_bytes` per
    /// read (small reads behave like clients that read in small chunks).
    pub fn new(host: String, read_bytes: usize) -> io::Result<Self> {
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            conns: Vec::new(),
            outs: Outs::default(),
            read_buf: vec![0; read_bytes.max(1)],
            host,
            paths: Vec::new(),
            frames_in: 0,
            bytes_in: 0,
            tls: None,
            plain: vec![0; 16 * 1024],
        })
    }

    /// Open the connections from now on with TLS when `ca` names a PEM file of the CA
    /// certificate(s) to trust (the server's name: `localhost`).
    pub fn trust(&mut self, ca: Option<&std::path::Path>) -> Result<(), String> {
        self.tls = ca.map(tls_config).transpose()?;
        Ok(())
    }

    /// Start connecting to `addr` from `src` (spread sources to get past ~28k ports per
    /// address pair); returns the connection id.
    pub fn connect(
        &mut self,
        addr: SocketAddr,
        src: Option<Ipv4Addr>,
        path: &str,
    ) -> io::Result<usize> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        if let Some(src) = src {
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
        }
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(socket.into());
        let id = self.conns.len();
        self.poll.registry().register(
            &mut stream,
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let tls = match &self.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                let conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(io::Error::other)?;
                Some(Box::new(conn))
            }
            None => None,
        };
        self.conns.push(Conn {
            stream,
            tls,
            phase: Phase::Connecting,
            partial: Vec::new(),
        });
        self.paths.push(path.to_string());
        self.outs.bufs.push(Vec::new());
        self.outs.sent.push(0);
        Ok(id)
    }

    /// Phase of connection `id`.
    pub fn phase(&self, id: usize) -> Phase {
        self.conns[id].phase
    }

    /// Number of connections ever opened.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Close connection `id` (without a closing handshake: the server must cope).
    pub fn close(&mut self, id: usize) {
        let conn = &mut self.conns[id];
        if conn.phase != Phase::Dead {
            conn.phase = Phase::Dead;
            let _ = self.poll.registry().deregister(&mut conn.stream);
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            conn.partial = Vec::new();
            self.outs.bufs[id] = Vec::new();
        }
    }

    /// Wait up to `timeout` for events, handle them, then flush output.
    pub fn turn(&mut self, timeout: Option<Duration>, handler: &mut dyn Handler) -> io::Result<()> {
        self.flush(handler);
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.token().0,
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable(),
                )
            })
            .collect();
        for (id, readable, writable) in ready {
            if writable {
                self.on_writable(id, handler);
            }
            if readable {
                self.on_readable(id, handler);
            }
        }
        self.flush(handler);
        Ok(())
    }

    fn fail(&mut self, id: usize, error: Option<io::Error>, handler: &mut dyn Handler) {
        if self.conns[id].phase != Phase::Dead {
            self.close(id);
            handler.on_dead(id, error);
        }
    }

    fn on_writable(&mut self, id: usize, handler: &mut dyn Handler) {
        if self.conns[id].phase == Phase::Connecting {
            match self.conns[id].stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return self.fail(id, Some(e), handler),
            }
            if self.conns[id].stream.peer_addr().is_err() {
                return; // Not connected yet (spurious wakeup).
            }
            self.conns[id].phase = Phase::Upgrading;
            let request = ws::upgrade_request(&self.host, &self.paths[id]);
            self.outs.raw(id, &request);
        }
        let records = self.conns[id].tls.as_ref().is_some_and(|t| t.wants_write());
        if (records || self.outs.pending(id) > 0) && !self.outs.dirty.contains(&id) {
            self.outs.dirty.push(id);
        }
    }

    fn on_readable(&mut self, id: usize, handler: &mut dyn Handler) {
        loop {
            let conn = &mut self.conns[id];
            if conn.phase == Phase::Dead || conn.phase == Phase::Connecting {
                return;
            }
            let n = match conn.stream.read(&mut self.read_buf) {
                Ok(0) => return self.fail(id, None, handler),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(id, Some(e), handler),
            };
            self.bytes_in += n as u64;
            handler.on_read();
            let mut read_buf = std::mem::take(&mut self.read_buf);
            let keep_going = match self.conns[id].tls.take() {
                None => self.consume(id, &read_buf[..n], handler),
                Some(mut tls) => {
                    let alive = self.decrypt(id, &mut tls, &read_buf[..n], handler);
                    if tls.wants_write() && !self.outs.dirty.contains(&id) {
                        self.outs.dirty.push(id);
                    }
                    self.conns[id].tls = Some(tls);
                    alive
                }
            };
            std::mem::swap(&mut self.read_buf, &mut read_buf);
            if !keep_going || n < self.read_buf.len() {
                // A short read means the socket is drained; new data brings a new edge.
                return;
            }
        }
    }

    /// Feed records read on `id` to `tls` and parse the plaintext; false if it died.
    fn decrypt(
        &mut self,
        id: usize,
        tls: &mut rustls::ClientConnection,
        mut data: &[u8],
        handler: &mut dyn Handler,
    ) -> bool {
        let mut plain = std::mem::take(&mut self.plain);
        let mut alive = true;
        'records: while !data.is_empty() && alive {
            let fed = tls.read_tls(&mut data).and_then(|_| {
                tls.process_new_packets()
                    .map(drop)
                    .map_err(io::Error::other)
            });
            if let Err(e) = fed {
                self.fail(id, Some(e), handler);
                alive = false;
                break;
            }
            loop {
                match tls.reader().read(&mut plain) {
                    Ok(0) => {
                        self.fail(id, None, handler);
                        alive = false;
                        break 'records;
                    }
                    Ok(n) => {
                        if !self.consume(id, &plain[..n], handler) {
                            alive = false;
                            break 'records;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        self.fail(id, Some(e), handler);
                        alive = false;
                        break 'records;
                    }
                }
            }
        }
        self.plain = plain;
        alive
    }

    /// Parse `data` (after any partial bytes) for connection `id`; false if it died.
    fn consume(&mut self, id: usize, data: &[u8], handler: &mut dyn Handler) -> bool {
        let mut partial = std::mem::take(&mut self.conns[id].partial);
        let input: &[u8] = if partial.is_empty() {
            data
        } else {
            partial.extend_from_slice(data);
            &partial
        };
        let mut pos = 0;
        if self.conns[id].phase == Phase::Upgrading {
            match ws::response_head(input) {
                None => {
                    let rest = input.to_vec();
                    self.conns[id].partial = rest;
                    return true;
                }
                Some((_, false)) => {
                    let head = String::from_utf8_lossy(&input[..input.len().min(200)]).into_owned();
                    self.fail(id, Some(io::Error::other(head)), handler);
                    return false;
                }
                Some((end, true)) => {
                    pos = end;
                    self.conns[id].phase = Phase::Open;
                    handler.on_open(id, &mut self.outs);
                }
            }
        }
        while let Some((frame, len)) = ws::parse_frame(&input[pos..]) {
            pos += len;
            self.frames_in += 1;
            match frame.opcode {
                1 => handler.on_text(id, frame.payload, &mut self.outs),
                9 => self.outs.frame(id, 10, frame.payload),
                8 => {
                    self.fail(id, None, handler);
                    return false;
                }
                _ => {}
            }
        }
        let rest = &input[pos..];
        if !rest.is_empty() {
            let rest = rest.to_vec();
            self.conns[id].partial = rest;
        } else if partial.capacity() > 0 {
            partial.clear();
            self.conns[id].partial = partial;
        }
        true
    }

    /// Records onto the socket, plaintext into records, until the socket is full or
    /// nothing is left.
    fn flush_tls(&mut self, id: usize) -> io::Result<()> {
        let conn = &mut self.conns[id];
        let Some(tls) = conn.tls.as_mut() else {
            return Ok(());
        };
        loop {
            while tls.wants_write() {
                match tls.write_tls(&mut conn.stream) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let start = self.outs.sent[id];
            if start >= self.outs.bufs[id].len() {
                self.outs.bufs[id].clear();
                self.outs.sent[id] = 0;
                return Ok(());
            }
            let taken = tls.writer().write(&self.outs.bufs[id][start..])?;
            if taken == 0 {
                return Ok(());
            }
            self.outs.sent[id] += taken;
        }
    }

    /// Write every connection's pending output.
    pub fn flush(&mut self, handler: &mut dyn Handler) {
        let dirty = std::mem::take(&mut self.outs.dirty);
        for &id in &dirty {
            if matches!(self.conns[id].phase, Phase::Dead | Phase::Connecting) {
                continue;
            }
            if self.conns[id].tls.is_some() {
                if let Err(e) = self.flush_tls(id) {
                    self.fail(id, Some(e), handler);
                }
                continue;
            }
            loop {
                let start = self.outs.sent[id];
                let buf = &self.outs.bufs[id];
                if start >= buf.len() {
                    self.outs.bufs[id].clear();
                    self.outs.sent[id] = 0;
                    break;
                }
                match self.conns[id].stream.write(&buf[start..]) {
                    Ok(n) => self.outs.sent[id] += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.fail(id, Some(e), handler);
                        break;
                    }
                }
            }
        }
        // Connections left with output wait for a writable event, which re-queues them.
        let mut dirty = dirty;
        dirty.clear();
        if self.outs.dirty.is_empty() {
            self.outs.dirty = dirty;
        }
    }
}
