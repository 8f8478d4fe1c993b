//! What the server API asks of a shard's connections: who is connected (each user's
//! connections, each org's count), a page of them, messages sent straight to a user's
//! connections or to everyone, and disconnects. Each shard answers for its own connections;
//! the HTTP handler asks every shard and adds the answers up.

use std::collections::HashMap;
use std::rc::Rc;

use smallvec::SmallVec;

use super::{MeshMsg, Peer, Phase, Shard};
use crate::auth::Principal;
use crate::clock::Now;
use crate::cluster::control::Control;
use crate::codes::Close;
use crate::dialect::{Dialect, Publication, Reply};

/// The open sessions of one shard, by user and by org.
#[derive(Debug, Default)]
pub(super) struct Directory {
    /// Each user's (JWT `sub`'s) connections here.
    users: HashMap<Rc<str>, SmallVec<[u64; 2]>>,
    /// Each org's number of connections here.
    orgs: HashMap<Rc<str>, usize>,
}

impl Directory {
    /// Add connection `conn`: true when it is its user's first here.
    fn add(&mut self, principal: &Principal, conn: u64) -> bool {
        *self.orgs.entry(Rc::from(&*principal.org)).or_default() += 1;
        let Some(user) = &principal.user else {
            return false;
        };
        let conns = self.users.entry(Rc::from(&**user)).or_default();
        conns.push(conn);
        conns.len() == 1
    }

    /// Remove connection `conn`: true when it was its user's last here.
    fn remove(&mut self, principal: &Principal, conn: u64) -> bool {
        let mut last = false;
        if let Some(user) = &principal.user {
            if let Some(conns) = self.users.get_mut(&**user) {
                conns.retain(|c| *c != conn);
                if conns.is_empty() {
                    self.users.remove(&**user);
                    last = true;
                }
            }
        }
        if let Some(n) = self.orgs.get_mut(&*principal.org) {
            *n -= 1;
            if *n == 0 {
                self.orgs.remove(&*principal.org);
            }
        }
        last
    }

    /// `user`'s connections here.
    fn of(&self, user: &str) -> &[u64] {
        self.users.get(user).map_or(&[], |conns| conns)
    }
}

/// Whose connections a direct message or a disconnect is for.
#[derive(Debug, Clone)]
pub enum Audience {
    /// One connection of the receiving shard (if of this org, unless `None`).
    Conn {
        /// Its id on the shard.
        conn: u64,
        /// Only if of this org.
        org: Option<Box<str>>,
    },
    /// One user's connections (of one org, or any: `None`).
    User {
        /// The JWT `sub`.
        user: Box<str>,
        /// Only connections of this org.
        org: Option<Box<str>>,
    },
    /// Every connection of one org, or every connection (`None`).
    Org(Option<Box<str>>),
}

impl Audience {
    fn includes(&self, principal: &Principal) -> bool {
        let org_ok = |org: &Option<Box<str>>| org.as_deref().is_none_or(|o| *o == *principal.org);
        match self {
            Audience::Conn { org, .. } => org_ok(org),
            Audience::User { user, org } => {
                principal.user.as_deref() == Some(&**user) && org_ok(org)
            }
            Audience::Org(org) => org_ok(org),
        }
    }
}

/// What reaches an audience.
#[derive(Debug, Clone)]
pub enum Direct {
    /// A message numbered on `channel` (a user's own), for the connections that are not
    /// its subscribers (those have it already, from its owner).
    Publication {
        /// The channel.
        channel: Box<str>,
        /// The message.
        publication: Publication<Vec<u8>>,
    },
    /// `SYSTEM broadcast` with this raw `data`.
    Broadcast(Vec<u8>),
    /// A close with this code and reason.
    Close {
        /// The close code.
        close: Close,
        /// The reason.
        reason: Box<str>,
    },
}

/// Sent to a user through the server API: once its owner has numbered it on the user's
/// channel, it goes to the user's other connections on every shard.
#[derive(Debug)]
pub struct ToUser {
    /// The JWT `sub`.
    pub user: Box<str>,
    /// Only connections of this org (`None`: an admin's send).
    pub org: Option<Box<str>>,
    /// Each shard sends how many of the user's connections it reached (dropped when done).
    pub reached: flume::Sender<usize>,
    /// True once the message is kept for when the user connects (dropped unsent: it was
    /// not kept).
    pub queued: flume::Sender<bool>,
}

/// Which connections a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    /// Of this org.
    pub org: Option<Box<str>>,
    /// Of this user.
    pub user: Option<Box<str>>,
}

/// One connection as the server API lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnInfo {
    /// Its id on the shard (the page cursor).
    pub conn: u64,
    /// The id clients see (`{boot}-{shard}-{conn}`).
    pub connection_id: String,
    /// Its org.
    pub org: Box<str>,
    /// Its JWT `sub`.
    pub user: Option<Box<str>>,
    /// Its API key id.
    pub key_id: Option<Box<str>>,
    /// Its subscriptions.
    pub channels: Vec<Box<str>>,
    /// Frames waiting to be written to it.
    pub queued: usize,
    /// Frames dropped because it read too slowly.
    pub dropped: u64,
    /// When its session opened (unix ms).
    pub since_ms: u64,
    /// Its peer's address, when the socket still has one.
    pub remote: Option<String>,
    /// Its wire dialect.
    pub dialect: Dialect,
}

/// A page of one shard's connections, and its totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Listing {
    /// The shard.
    pub shard: usize,
    /// Connections matching the filter, after the cursor, up to the limit.
    pub conns: Vec<ConnInfo>,
    /// More match after the last one.
    pub more: bool,
    /// Open sessions on the shard (of the filter's org).
    pub total: usize,
    /// Open sessions per org on the shard (the filter's org only, when it names one).
    pub orgs: Vec<(Box<str>, usize)>,
}

impl Shard {
    /// `peer`'s session opens as `principal`: the server API can find it from now on.
    pub fn open_session(&self, peer: &Peer, principal: &Rc<Principal>) {
        let first = self.directory.borrow_mut().add(principal, peer.id);
        peer.set_principal(Some(principal.clone()));
        if let Some(user) = principal.user.as_deref().filter(|_| first) {
            self.tell_online(user, true);
        }
    }

    /// `peer` runs on a refreshed credential (the same user and org).
    pub fn refresh_session(&self, peer: &Peer, principal: &Rc<Principal>) {
        peer.set_principal(Some(principal.clone()));
    }

    /// `peer` is gone.
    pub(super) fn close_session(&self, peer: &Peer) {
        let Some(principal) = peer.take_principal() else {
            return;
        };
        self.leave_census(&principal);
        let last = self.directory.borrow_mut().remove(&principal, peer.id);
        if let Some(user) = principal.user.as_deref().filter(|_| last) {
            self.tell_online(user, false);
        }
    }

    /// Give `direct` to this shard's connections in `audience`: how many it reached.
    pub(super) fn direct(&self, audience: &Audience, direct: &Direct) -> usize {
        let peers: Vec<Rc<Peer>> = match audience {
            Audience::Conn { conn, .. } => self.peer(*conn).into_iter().collect(),
            Audience::User { user, .. } => {
                let directory = self.directory.borrow();
                let conns = directory.of(user).iter();
                conns.filter_map(|c| self.peer(*c)).collect()
            }
            Audience::Org(_) => self.peers(),
        };
        let mut frames: [Option<crate::codec::Frame>; Dialect::COUNT] = Default::default();
        let mut reached = 0;
        for peer in peers {
            let Some(principal) = peer.principal() else {
                continue;
            };
            if peer.phase.get() != Phase::Open || !audience.includes(&principal) {
                continue;
            }
            reached += 1;
            let dialect = peer.dialect();
            // Encoded once per dialect in use, shared by all.
            let slot = &mut frames[dialect as usize];
            match direct {
                Direct::Publication {
                    channel,
                    publication,
                } => {
                    // Its subscribers have it from the owner, in order with the rest.
                    if self.subs.borrow().has(channel, peer.id) {
                        continue;
                    }
                    let f = slot.get_or_insert_with(|| dialect.publication(channel, publication));
                    self.deliver_publication(&peer, channel, publication.seq, f.clone());
                }
                Direct::Broadcast(data) => {
                    let f = slot.get_or_insert_with(|| dialect.reply(&Reply::Broadcast { data }));
                    self.deliver(&peer, f.clone());
                }
                Direct::Close { close, reason } => {
                    peer.request_close(*close, reason.to_string(), false);
                }
            }
        }
        reached
    }

    /// Refuse the tokens `revocation` covers from now on, and close this shard's connections
    /// that use one (4403): how many.
    pub(super) fn revoke(&self, revocation: crate::auth::Revocation) -> usize {
        let mut closed = 0;
        for peer in self.peers() {
            let covered = peer.principal().is_some_and(|p| revocation.covers(&p));
            if covered && peer.phase.get() == Phase::Open {
                peer.request_close(Close::TokenRefused, "token revoked", false);
                closed += 1;
            }
        }
        self.auth.revoke(revocation);
        closed
    }

    /// A control message from another node (shard 0 hears them for the node).
    pub(super) fn controlled(&self, control: Control) {
        match control {
            Control::Ask { to, question } => self.asked(to, &question),
            Control::Answer { to, answer } => {
                let shard = usize::from(to.shard);
                if shard < self.nshards {
                    let id = to.id;
                    self.route(shard, MeshMsg::NodeAnswer { id, answer });
                }
            }
            command => self.command(&command, None),
        }
    }

    /// This node's part of a server API command, sent to its shards, each of which sends
    /// `reply` how many connections it reached or closed.
    pub(super) fn command(&self, control: &Control, reply: Option<&flume::Sender<usize>>) {
        let every_shard = |make: &dyn Fn() -> MeshMsg| {
            for shard in 0..self.nshards {
                self.route(shard, make());
            }
        };
        let boxed = |org: &Option<String>| org.as_deref().map(Into::into);
        match control {
            Control::Broadcast { org, data } => {
                let audience = Audience::Org(boxed(org));
                every_shard(&|| MeshMsg::Direct {
                    audience: audience.clone(),
                    direct: Direct::Broadcast(data.clone()),
                    reply: reply.cloned(),
                });
            }
            Control::CloseUser {
                user,
                org,
                code,
                reason,
            } => {
                let audience = Audience::User {
                    user: user.as_str().into(),
                    org: boxed(org),
                };
                let direct = Direct::Close {
                    close: Close::Requested(*code),
                    reason: reason.as_str().into(),
                };
                every_shard(&|| MeshMsg::Direct {
                    audience: audience.clone(),
                    direct: direct.clone(),
                    reply: reply.cloned(),
                });
            }
            Control::CloseConn {
                shard,
                conn,
                org,
                code,
                reason,
            } if *shard < self.nshards => {
                let msg = MeshMsg::Direct {
                    audience: Audience::Conn {
                        conn: *conn,
                        org: boxed(org),
                    },
                    direct: Direct::Close {
                        close: Close::Requested(*code),
                        reason: reason.as_str().into(),
                    },
                    reply: reply.cloned(),
                };
                self.route(*shard, msg);
            }
            Control::Revoke(revocation) => every_shard(&|| MeshMsg::Revoke {
                revocation: revocation.clone(),
                reply: reply.cloned(),
            }),
            Control::ToUser {
                user,
                org,
                channel,
                seq,
                data,
            } => {
                let owner = super::offline::owner_of_user(user, self.nshards);
                let publication = Publication {
                    seq: *seq,
                    kind: crate::dialect::Kind::Message,
                    data: data.clone(),
                };
                let msg = MeshMsg::UserMessage {
                    user: user.as_str().into(),
                    org: boxed(org),
                    channel: channel.as_str().into(),
                    publication,
                    reply: reply.cloned(),
                };
                self.route(owner, msg);
            }
            // Not commands: nothing to do, nothing reached.
            Control::CloseConn { .. } | Control::Ask { .. } | Control::Answer { .. } => {}
        }
    }

    /// Send `msg` to shard `to` (this one too) at `now`, from the server API.
    pub fn to_shard(&self, to: usize, msg: MeshMsg, now: Now) {
        self.enter(now);
        self.route(to, msg);
    }

    /// A page of this shard's open sessions matching `filter`, after connection `after`, at
    /// most `limit`; with the shard's totals.
    pub(super) fn listing(&self, filter: &Filter, after: u64, limit: usize) -> Listing {
        let mut peers: Vec<Rc<Peer>> = match &filter.user {
            Some(user) => {
                let directory = self.directory.borrow();
                let conns = directory.of(user).iter();
                conns.filter_map(|c| self.peer(*c)).collect()
            }
            None => self.peers(),
        };
        peers.retain(|peer| {
            peer.id > after
                && peer.phase.get() == Phase::Open
                && peer.principal().is_some_and(|p| {
                    filter.org.as_deref().is_none_or(|org| *org == *p.org)
                        && filter
                            .user
                            .as_deref()
                            .is_none_or(|u| p.user.as_deref() == Some(u))
                })
        });
        peers.sort_unstable_by_key(|peer| peer.id);
        let more = peers.len() > limit;
        peers.truncate(limit);
        let now_ms = self.now_ms();
        let unix_now = self.now().unix_ms;
        let conns = peers
            .iter()
            .filter_map(|peer| {
                let principal = peer.principal()?;
                let opened = now_ms.saturating_sub(peer.phase_since.get());
                Some(ConnInfo {
                    conn: peer.id,
                    connection_id: self.connection_id(peer.id),
                    org: principal.org.clone(),
                    user: principal.user.clone(),
                    key_id: principal.key_id.clone(),
                    channels: peer
                        .channels
                        .borrow()
                        .iter()
                        .map(|c| c.as_ref().into())
                        .collect(),
                    queued: peer.out().borrow().len(),
                    dropped: peer.dropped.get(),
                    since_ms: unix_now.saturating_sub(opened),
                    remote: remote_address(peer.fd.get()),
                    dialect: peer.dialect(),
                })
            })
            .collect();
        // The totals of the orgs the filter lets through.
        let directory = self.directory.borrow();
        let orgs: Vec<(Box<str>, usize)> = directory
            .orgs
            .iter()
            .filter(|(o, _)| filter.org.as_deref().is_none_or(|org| *org == ***o))
            .map(|(o, n)| ((**o).into(), *n))
            .collect();
        Listing {
            shard: self.id,
            conns,
            more,
            total: orgs.iter().map(|(_, n)| n).sum(),
            orgs,
        }
    }
}

/// The address of the peer of socket `fd`, if it has one.
fn remote_address(fd: i32) -> Option<String> {
    peer_address(fd).map(|a| a.to_string())
}

/// The address and port of the peer of socket `fd`, if it has one.
pub(super) fn peer_address(fd: i32) -> Option<std::net::SocketAddr> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is the open socket of a connection this shard holds (its task owns it
    // and unregisters the peer before closing it); the borrow does not outlive this call.
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let address = socket2::SockRef::from(&socket).peer_addr().ok()?;
    address.as_socket()
}
