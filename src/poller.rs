//! Readiness of a shard's sockets, from an io_uring of the shard's own.
//!
//! glommio arms one readiness poll per socket and keeps it on the heap (a 576-byte source)
//! for as long as the socket waits: most of an idle connection's memory. Here every socket
//! gets a single multishot poll in a ring that belongs to the shard: the kernel keeps it armed
//! and user space keeps nothing per socket. The ring signals an eventfd on every completion,
//! and the shard's readiness task waits for that eventfd with an ordinary glommio read, so the
//! shard still sleeps in one place (glommio's own ring).
//!
//! Nothing is ever submitted that could block: the ring only holds polls, so every buffer and
//! file descriptor stays owned by the caller.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use glommio::io::BufferedFile;
use io_uring::{cqueue, opcode, types, IoUring};

/// Set in a completion's token when it reports writability (a one-shot poll).
const WRITABLE: u64 = 1 << 63;
/// Token of cancellation requests, whose completions carry no news.
const CANCELLED: u64 = u64::MAX;
/// Largest token a caller may use.
pub const MAX_TOKEN: u64 = WRITABLE - 2;

/// What a completion says about the socket watched under `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The caller's token.
    pub token: u64,
    /// Writability (from [`Poller::watch_writable`]) rather than readability.
    pub writable: bool,
    /// The read watch ended (an error, or the kernel dropped it): call [`Poller::watch`] again.
    pub ended: bool,
    /// The peer closed its side (or the socket failed): reading will end in EOF or an error,
    /// even if the bytes that came with it are read first.
    pub hangup: bool,
}

/// One shard's readiness ring.
pub struct Poller {
    ring: RefCell<IoUring>,
    /// Completions copied out, so that handling them never runs under the ring's borrow.
    events: RefCell<Vec<Event>>,
    /// The eventfd the ring signals, read through glommio.
    signal: BufferedFile,
}

/// A poller's ring and eventfd, made before its shard's executor starts (so that a failure
/// stops start-up rather than one shard).
pub struct Ring {
    ring: IoUring,
    signal: OwnedFd,
}

impl Ring {
    /// A ring sized for `sockets` watched sockets.
    pub fn new(sockets: u32) -> io::Result<Self> {
        // Completions that do not fit wait in the kernel's overflow list (see `drain`).
        let cq = sockets.clamp(1024, 1 << 16).next_power_of_two();
        // Cooperative task running: a completion never interrupts the running shard with an
        // IPI; it is posted at the shard's next system call, or wakes the shard if it sleeps.
        // Without it, ingest at 64 publishers lost about 12% of its rate to those interrupts.
        // (Not single-issuer: the ring is made on this thread and used on the shard's.)
        let ring = IoUring::builder()
            .setup_cqsize(cq)
            .setup_coop_taskrun()
            .build(256)?;
        // Blocking on purpose: io_uring answers a read of a non-blocking file with EAGAIN
        // instead of waiting for it.
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh eventfd that nothing else owns.
        let signal = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(fd)?;
        Ok(Self { ring, signal })
    }
}

impl Poller {
    /// The poller of `ring`; must be called on the shard's glommio executor.
    pub fn new(ring: Ring) -> Self {
        let fd = ring.signal.into_raw_fd();
        Self {
            ring: RefCell::new(ring.ring),
            events: RefCell::default(),
            // SAFETY: the eventfd's ownership moves here.
            signal: unsafe { BufferedFile::from_raw_fd(fd) },
        }
    }

    /// Report `fd`'s readability (new data, end of stream, errors) under `token` until
    /// [`forget`](Self::forget) is called or an event says the watch `ended`.
    pub fn watch(&self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert!(token <= MAX_TOKEN);
        let events = (libc::POLLIN | libc::POLLRDHUP) as u32;
        let entry = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(true)
            .build()
            .user_data(token);
        self.submit(&entry)
    }

    /// Report once, under `token`, when `fd` can take more bytes.
    pub fn watch_writable(&self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert!(token <= MAX_TOKEN);
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(token | WRITABLE);
        self.submit(&entry)
    }

    /// Stop every watch on `fd`. The kernel holds the socket open while a poll is armed on
    /// it, so this must come before the descriptor is closed.
    pub fn forget(&self, fd: RawFd) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(CANCELLED);
        self.submit(&entry)
    }

    fn submit(&self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: polls and cancellations reference no memory of ours.
        if unsafe { ring.submission().push(entry) }.is_err() {
            ring.submit()?;
            // SAFETY: as above.
            unsafe { ring.submission().push(entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        ring.submit()?;
        Ok(())
    }

    /// Wait until the ring has completions to [`drain`](Self::drain) (or may have).
    pub async fn wait(&self) -> io::Result<()> {
        self.signal.read_at(0, 8).await.map_err(io::Error::from)?;
        Ok(())
    }

    /// Hand every completed event to `handle`.
    pub fn drain(&self, mut handle: impl FnMut(Event)) {
        let mut events = self.events.borrow_mut();
        {
            let mut ring = self.ring.borrow_mut();
            for cqe in ring.completion() {
                let data = cqe.user_data();
                if data == CANCELLED {
                    continue;
                }
                let writable = data & WRITABLE != 0;
                let mask = (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as i32;
                events.push(Event {
                    token: data & !WRITABLE,
                    writable,
                    ended: !writable && !cqueue::more(cqe.flags()),
                    hangup: cqe.result() > 0 && cqe.result() & mask != 0,
                });
            }
            // Completions the kernel could not post while the queue was full are waiting in
            // its overflow list: entering the ring moves them over (and signals again).
            if ring.submission().cq_overflow() {
                let _ = ring.submit();
            }
        }
        for event in events.drain(..) {
            handle(event);
        }
    }
}

/// A socket the poller watches: dropping it stops the watches, then closes the socket.
pub struct Watched {
    fd: OwnedFd,
    poller: Rc<Poller>,
}

impl Watched {
    /// Watch `fd`'s readability under `token`.
    pub fn new(fd: OwnedFd, poller: Rc<Poller>, token: u64) -> io::Result<Self> {
        poller.watch(fd.as_raw_fd(), token)?;
        Ok(Self { fd, poller })
    }

    /// The socket's descriptor.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The poller watching it.
    pub fn poller(&self) -> &Poller {
        &self.poller
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Err(e) = self.poller.forget(self.fd.as_raw_fd()) {
            // The socket then stays open until the shard exits; say so rather than hide it.
            tracing::warn!(
                "could not stop watching socket {}: {e}",
                self.fd.as_raw_fd()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Wait for the next completions and return them.
    async fn next(poller: &Poller) -> Vec<Event> {
        let mut got = Vec::new();
        while got.is_empty() {
            poller.wait().await.unwrap();
            poller.drain(|e| got.push(e));
        }
        got
    }

    #[test]
    fn reports_readability_repeatedly_then_stops_when_forgotten() {
        glommio::LocalExecutor::default().run(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            let poller = Poller::new(Ring::new(16).unwrap());
            let fd = server.as_raw_fd();
            poller.watch(fd, 7).unwrap();
            poller.watch_writable(fd, 7).unwrap();
            let writable = Event {
                token: 7,
                writable: true,
                ended: false,
                hangup: false,
            };
            assert_eq!(next(&poller).await, vec![writable]);

            // Each arrival of data is reported; the multishot watch stays armed.
            let readable = Event {
                token: 7,
                writable: false,
                ended: false,
                hangup: false,
            };
            for round in 0..3 {
                client.write_all(b"x").unwrap();
                assert_eq!(next(&poller).await, vec![readable], "round {round}");
            }

            // Forgetting ends the watch: its last completion says so, then nothing more.
            poller.forget(fd).unwrap();
            let last = next(&poller).await;
            assert!(last.iter().all(|e| e.ended && e.token == 7), "{last:?}");
            client.write_all(b"y").unwrap();
            let mut late = Vec::new();
            poller.drain(|e| late.push(e));
            assert!(late.is_empty(), "{late:?}");

            // The peer's FIN, even with bytes, is reported as a hangup: its reader must go on
            // to the EOF.
            poller.watch(fd, 8).unwrap();
            assert_eq!(next(&poller).await.len(), 1, "the unread byte");
            client.write_all(b"z").unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let events = next(&poller).await;
            assert!(
                events.iter().any(|e| e.hangup && e.token == 8),
                "{events:?}"
            );
        });
    }
}
