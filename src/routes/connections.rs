//! Who is connected, through the server API: `GET /api/connections`, `GET /api/users/{id}`,
//! `GET /api/channels`, and disconnects: `DELETE /api/connections/{id}`, `DELETE
//! /api/users/{id}/connections`. Every shard answers for its own connections; the handler
//! asks them and puts the answers together.

use super::api::{params, principal, stopping};
use super::deliver::{acting_org, ask_every_shard, direct_everywhere, user_of};
use super::write::{bad, respond};
use super::Route;
use crate::auth::Channel;
use crate::clock::Now;
use crate::cluster::keys::Control;
use crate::codes::{Close, ErrorCode};
use crate::http::{self, Response};
use crate::json;
use crate::shard::directory::{Audience, ConnInfo, Direct, Filter, Listing};
use crate::shard::{MeshMsg, Shard};

/// Connections per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 100;
/// Most connections (or channels) per page.
pub const MAX_LIMIT: usize = 1_000;

fn limit(value: &str) -> Result<usize, Response> {
    match value.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(bad(&format!("limit must be 1 to {MAX_LIMIT}"))),
    }
}

/// `GET /api/connections?org=&user=&cursor=&limit=` → `{"totals":{"connections","shards":[…],
/// "orgs":{…}},"connections":[…],"nextCursor":…}`: the totals of the orgs the caller may
/// see, and a page of the connections that match, in (shard, connection) order. Every
/// shard is asked at once: those from the cursor's on for up to a page each, the others
/// for their totals only.
pub fn list(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let (mut org, mut user, mut page) = (None, None, DEFAULT_LIMIT);
        let mut cursor = (0usize, 0u64);
        for (name, value) in params(&request.query) {
            match name.as_str() {
                "org" => org = Some(value),
                "user" => user = Some(value.into()),
                "limit" => page = limit(&value)?,
                "cursor" => cursor = parse_cursor(&value, shard.nshards)?,
                _ => {}
            }
        }
        let org = acting_org(&principal, org.as_deref())?;
        let filter = Filter { org, user };
        let mut asks = Vec::with_capacity(shard.nshards);
        for s in 0..shard.nshards {
            let (reply, answer) = flume::bounded(1);
            let (after, limit) = match s.cmp(&cursor.0) {
                std::cmp::Ordering::Less => (u64::MAX, 0),
                std::cmp::Ordering::Equal => (cursor.1, page),
                std::cmp::Ordering::Greater => (0, page),
            };
            let filter = filter.clone();
            let msg = MeshMsg::Connections {
                filter,
                after,
                limit,
                reply,
            };
            shard.to_shard(s, msg, Now::read());
            asks.push(answer);
        }
        Ok(Box::pin(async move {
            let mut listings = Vec::with_capacity(asks.len());
            for answer in asks {
                match answer.recv_async().await {
                    Ok(listing) => listings.push(listing),
                    Err(_) => return stopping(),
                }
            }
            let mut conns: Vec<(usize, &ConnInfo)> = Vec::new();
            let mut next = None;
            for (s, listing) in listings.iter().enumerate() {
                for c in &listing.conns {
                    if conns.len() == page {
                        next = Some(format!("{}.{}", conns[page - 1].0, conns[page - 1].1.conn));
                        break;
                    }
                    conns.push((s, c));
                }
                if next.is_some() {
                    break;
                }
                if conns.len() == page && listing.more {
                    next = Some(format!("{s}.{}", conns[page - 1].1.conn));
                    break;
                }
            }
            Response::json(200, list_body(&listings, &conns, next.as_deref()))
        }))
    })
}

fn parse_cursor(value: &str, nshards: usize) -> Result<(usize, u64), Response> {
    let wrong = || bad("cursor must be a nextCursor from an earlier page");
    let (s, c) = value.split_once('.').ok_or_else(wrong)?;
    let s: usize = s.parse().map_err(|_| wrong())?;
    let c: u64 = c.parse().map_err(|_| wrong())?;
    if s >= nshards {
        return Err(wrong());
    }
    Ok((s, c))
}

/// The body of `GET /api/connections`.
fn list_body(listings: &[Listing], conns: &[(usize, &ConnInfo)], next: Option<&str>) -> Vec<u8> {
    let total: usize = listings.iter().map(|l| l.total).sum();
    let mut orgs: std::collections::BTreeMap<&str, usize> = Default::default();
    for listing in listings {
        for (org, n) in &listing.orgs {
            *orgs.entry(org).or_default() += n;
        }
    }
    let mut out = br#"{"totals":{"connections":"#.to_vec();
    json::push_u64(&mut out, total as u64);
    out.extend_from_slice(br#","shards":["#);
    for (s, listing) in listings.iter().enumerate() {
        if s > 0 {
            out.push(b',');
        }
        out.extend_from_slice(
            format!(r#"{{"shard":{s},"connections":{}}}"#, listing.total).as_bytes(),
        );
    }
    out.extend_from_slice(br#"],"orgs":{"#);
    for (i, (org, n)) in orgs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json::push_str(&mut out, org);
        out.push(b':');
        json::push_u64(&mut out, *n as u64);
    }
    out.extend_from_slice(br#"}},"connections":"#);
    push_conns(&mut out, conns.iter().map(|(s, c)| (*s, *c)));
    out.extend_from_slice(br#","nextCursor":"#);
    push_opt(&mut out, next);
    out.push(b'}');
    out
}

/// A JSON array of connections (each with its shard).
fn push_conns<'a>(out: &mut Vec<u8>, conns: impl Iterator<Item = (usize, &'a ConnInfo)>) {
    out.push(b'[');
    for (i, (shard, c)) in conns.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        conn_json(out, shard, c);
    }
    out.push(b']');
}

/// One connection as JSON.
pub fn conn_json(out: &mut Vec<u8>, shard: usize, c: &ConnInfo) {
    out.extend_from_slice(br#"{"connectionId":"#);
    json::push_str(out, &c.connection_id);
    out.extend_from_slice(br#","shard":"#);
    json::push_u64(out, shard as u64);
    out.extend_from_slice(br#","org":"#);
    json::push_str(out, &c.org);
    out.extend_from_slice(br#","user":"#);
    push_opt(out, c.user.as_deref());
    out.extend_from_slice(br#","keyId":"#);
    push_opt(out, c.key_id.as_deref());
    out.extend_from_slice(br#","channels":["#);
    for (i, channel) in c.channels.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json::push_str(out, channel);
    }
    out.extend_from_slice(br#"],"queued":"#);
    json::push_u64(out, c.queued as u64);
    out.extend_from_slice(br#","dropped":"#);
    json::push_u64(out, c.dropped);
    out.extend_from_slice(br#","connectedAt":"#);
    json::push_str(out, &crate::decision::rfc3339(c.since_ms));
    out.extend_from_slice(br#","remoteAddress":"#);
    push_opt(out, c.remote.as_deref());
    out.push(b'}');
}

fn push_opt(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(v) => json::push_str(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// A close code the API may ask for, and a reason that fits a close frame.
fn close_of(query: &str) -> Result<(Close, Box<str>), Response> {
    let (mut code, mut reason) = (1000u16, String::from("closed by the server API"));
    for (name, value) in params(query) {
        match name.as_str() {
            "code" => {
                code = value
                    .parse()
                    .ok()
                    .filter(|c| matches!(c, 1000 | 1001 | 1008 | 3000..=4999))
                    .ok_or_else(|| bad("code must be 1000, 1001, 1008 or 3000 to 4999"))?
            }
            "reason" if value.len() <= 123 => reason = value,
            "reason" => return Err(bad("reason must be at most 123 bytes")),
            _ => {}
        }
    }
    Ok((Close::Requested(code), reason.into()))
}

/// `DELETE /api/connections/{id}?code=&reason=` → `{"closed":1}`, or 404 when no such
/// connection is open (on this node).
pub fn disconnect(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let (close, reason) = close_of(&request.query)?;
        let id = request.path.strip_prefix("/api/connections/").unwrap_or("");
        let id = http::percent_decode(id);
        let place = crate::cluster::keys::connection_place(&id);
        let here = format!("{:x}", shard.global.boot_id);
        let Some((node, s, conn)) =
            place.filter(|(node, s, _)| *node != here || *s < shard.nshards)
        else {
            return Err(not_found(&id));
        };
        if node != here {
            // Another node's: it closes it, if it has it (a single node has no others).
            let control = Control::CloseConn {
                shard: s,
                conn,
                org: org.as_deref().map(String::from),
                code: close.code(),
                reason: reason.to_string(),
            };
            let hex = node.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex || !shard.tell_nodes(control, Some(node)) {
                return Err(not_found(&id));
            }
            let mut body = br#"{"forwarded":"#.to_vec();
            json::push_str(&mut body, node);
            body.push(b'}');
            return Err(Response::json(202, body));
        }
        let (reply, reached) = flume::bounded(1);
        let msg = MeshMsg::Direct {
            // Only a connection of the caller's org is closed.
            audience: Audience::Conn { conn, org },
            direct: Direct::Close { close, reason },
            reply: Some(reply),
        };
        shard.to_shard(s, msg, Now::read());
        Ok(Box::pin(async move {
            match reached.recv_async().await {
                Ok(0) | Err(_) => not_found(&id),
                Ok(n) => Response::json(200, format!(r#"{{"closed":{n}}}"#)),
            }
        }))
    })
}

fn not_found(id: &str) -> Response {
    let message = format!("no open connection {}", json::echo(id));
    Response::error(404, ErrorCode::NotFound, &message)
}

/// `DELETE /api/users/{userId}/connections?code=&reason=` → `{"closed":N}`.
pub fn disconnect_user(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let (close, reason) = close_of(&request.query)?;
        let user = user_of(request, "/connections")?;
        let control = Control::CloseUser {
            user: user.clone(),
            org: org.as_deref().map(String::from),
            code: close.code(),
            reason: reason.to_string(),
        };
        // The other nodes close theirs; `closed` counts this node's.
        shard.tell_nodes(control, None);
        let audience = Audience::User {
            user: user.into(),
            org,
        };
        let direct = Direct::Close { close, reason };
        Ok(direct_everywhere(shard, audience, direct, "closed"))
    })
}

/// `GET /api/channels?prefix=&cursor=&limit=` → `{"channels":[{"channel","subscribers"}],
/// "nextCursor":…}`: the channels with subscribers, by name, with their subscribers on
/// every shard; an org's key sees its org's channels.
pub fn channels(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let (mut prefix, mut after, mut page) = (String::new(), String::new(), DEFAULT_LIMIT);
        for (name, value) in params(&request.query) {
            match name.as_str() {
                "prefix" => prefix = value,
                "cursor" => after = value,
                "limit" => page = limit(&value)?,
                _ => {}
            }
        }
        let counts = ask_every_shard(shard, |reply| MeshMsg::Channels {
            prefix: prefix.as_str().into(),
            reply,
        });
        let categories = shard.config.channels.categories.clone();
        Ok(Box::pin(async move {
            let mut all: std::collections::BTreeMap<Box<str>, usize> = Default::default();
            while let Ok(list) = counts.recv_async().await {
                for (channel, n) in list {
                    *all.entry(channel).or_default() += n;
                }
            }
            let visible = |name: &str| match &org {
                None => true,
                Some(org) => {
                    Channel::parse(name, &categories).is_ok_and(|c| c.org() == Some(&**org))
                }
            };
            let mut shown = all
                .iter()
                .filter(|(name, _)| ***name > *after && visible(name))
                .take(page + 1);
            let mut out = br#"{"channels":["#.to_vec();
            let mut last = None;
            for (i, (name, n)) in shown.by_ref().take(page).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(br#"{"channel":"#);
                json::push_str(&mut out, name);
                out.extend_from_slice(br#","subscribers":"#);
                json::push_u64(&mut out, *n as u64);
                out.push(b'}');
                last = Some(name);
            }
            out.extend_from_slice(br#"],"nextCursor":"#);
            match last.filter(|_| shown.next().is_some()) {
                Some(name) => json::push_str(&mut out, name),
                None => out.extend_from_slice(b"null"),
            }
            out.push(b'}');
            Response::json(200, out)
        }))
    })
}

/// `GET /api/users/{userId}` → `{"user","online","connections":[…],"channels":[…]}`: the
/// user's open connections (of the caller's org) and the channels they hold.
pub fn user(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let user = user_of(request, "")?;
        let filter = Filter {
            org,
            user: Some(user.as_str().into()),
        };
        let listings = ask_every_shard(shard, |reply| MeshMsg::Connections {
            filter: filter.clone(),
            after: 0,
            limit: MAX_LIMIT,
            reply,
        });
        Ok(Box::pin(async move {
            let mut conns: Vec<(usize, ConnInfo)> = Vec::new();
            while let Ok(listing) = listings.recv_async().await {
                let shard = listing.shard;
                conns.extend(listing.conns.into_iter().map(|c| (shard, c)));
            }
            conns.sort_by_key(|(shard, c)| (*shard, c.conn));
            let mut channels: Vec<&str> = conns
                .iter()
                .flat_map(|(_, c)| c.channels.iter().map(|c| &**c))
                .collect();
            channels.sort_unstable();
            channels.dedup();
            let mut out = br#"{"user":"#.to_vec();
            json::push_str(&mut out, &user);
            out.extend_from_slice(br#","online":"#);
            out.extend_from_slice(if conns.is_empty() { b"false" } else { b"true" });
            out.extend_from_slice(br#","connections":"#);
            push_conns(&mut out, conns.iter().map(|(s, c)| (*s, c)));
            out.extend_from_slice(br#","channels":["#);
            for (i, channel) in channels.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json::push_str(&mut out, channel);
            }
            out.extend_from_slice(b"]}");
            Response::json(200, out)
        }))
    })
}
