//! Who is connected, through the server API: `GET /api/connections`, `GET /api/users/{id}`,
//! `GET /api/channels`, and disconnects: `DELETE /api/connections/{id}`, `DELETE
//! /api/users/{id}/connections`. Every shard answers for its own connections; the handler
//! asks them and puts the answers together.

use super::api::{params, principal, stopping};
use super::deliver::{acting_org, ask_cluster, count_cluster, user_of, Nodes};
use super::write::{bad, respond};
use super::Route;
use crate::cluster::control::{Control, NodeAnswer, Question};
use crate::codes::{Close, ErrorCode};
use crate::http::{self, Response};
use crate::json;
use crate::shard::directory::{ConnInfo, Filter, Listing};
use crate::shard::Shard;

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

/// `GET /api/connections?org=&user=&cursor=&limit=` → `{"totals":{"connections","nodes":[…],
/// "shards":[…],"orgs":{…}},"connections":[…],"nextCursor":…}`: the totals of the orgs the
/// caller may see, and a page of the connections that match, in (node, shard, connection)
/// order, from every node of a cluster. The cursor is the last connection id of a page.
pub fn list(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let (mut org, mut user, mut page) = (None, None, DEFAULT_LIMIT);
        let mut after = None;
        for (name, value) in params(&request.query) {
            match name.as_str() {
                "org" => org = Some(value),
                "user" => user = Some(value.into()),
                "limit" => page = limit(&value)?,
                "cursor" if crate::cluster::keys::connection_place(&value).is_some() => {
                    after = Some(value)
                }
                "cursor" => return Err(bad("cursor must be a nextCursor from an earlier page")),
                _ => {}
            }
        }
        let org = acting_org(&principal, org.as_deref())?;
        let question = Question::Connections {
            filter: Filter { org, user },
            after,
            limit: page,
        };
        let answers = ask_cluster(shard, question);
        let here = shard.node_hex();
        Ok(Box::pin(async move {
            let Some(answers) = answers.await else {
                return stopping();
            };
            let mut nodes: Vec<(String, Vec<Listing>)> = answers
                .into_iter()
                .filter_map(|answer| match answer {
                    NodeAnswer::Connections { node, shards } => Some((node, shards)),
                    _ => None,
                })
                .collect();
            nodes.sort_by(|a, b| a.0.cmp(&b.0));
            Response::json(200, list_body(&nodes, &here, page))
        }))
    })
}

/// The body of `GET /api/connections`: nodes' pages in node order, cut to `page`.
fn list_body(nodes: &[(String, Vec<Listing>)], here: &str, page: usize) -> Vec<u8> {
    let listings = || nodes.iter().flat_map(|(_, shards)| shards);
    let mut conns: Vec<(usize, &ConnInfo)> = listings()
        .flat_map(|l| l.conns.iter().map(move |c| (l.shard, c)))
        .collect();
    // A shard with more than it sent sent a whole page.
    let more = conns.len() > page || listings().any(|l| l.more);
    conns.truncate(page);
    let next = conns
        .last()
        .filter(|_| more && conns.len() == page)
        .map(|(_, c)| c.connection_id.as_str());
    let total: usize = listings().map(|l| l.total).sum();
    let mut orgs: std::collections::BTreeMap<&str, usize> = Default::default();
    for listing in listings() {
        for (org, n) in &listing.orgs {
            *orgs.entry(org).or_default() += n;
        }
    }
    let mut out = br#"{"totals":{"connections":"#.to_vec();
    json::push_u64(&mut out, total as u64);
    out.extend_from_slice(br#","nodes":["#);
    for (i, (node, shards)) in nodes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"node":"#);
        json::push_str(&mut out, node);
        out.extend_from_slice(br#","connections":"#);
        json::push_u64(&mut out, shards.iter().map(|l| l.total as u64).sum());
        out.push(b'}');
    }
    // The shards of the node that answers.
    out.extend_from_slice(br#"],"shards":["#);
    let mine = nodes.iter().find(|(node, _)| node == here);
    for (i, listing) in mine.into_iter().flat_map(|(_, s)| s).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let shard = listing.shard;
        let entry = format!(r#"{{"shard":{shard},"connections":{}}}"#, listing.total);
        out.extend_from_slice(entry.as_bytes());
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
/// connection is open (of the caller's org), on whichever node of a cluster has it.
pub fn disconnect(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let (close, reason) = close_of(&request.query)?;
        let id = request.path.strip_prefix("/api/connections/").unwrap_or("");
        let id = http::percent_decode(id);
        let place = crate::cluster::keys::connection_place(&id);
        let here = shard.node_hex();
        let Some((node, s, conn)) =
            place.filter(|(node, _, _)| node.bytes().all(|b| b.is_ascii_hexdigit()))
        else {
            return Err(not_found(&id));
        };
        let command = Control::CloseConn {
            shard: s,
            conn,
            org: org.as_deref().map(String::from),
            code: close.code(),
            reason: reason.to_string(),
        };
        // Another node's connection: that node closes it, if it has it (a single node has
        // no others, and answers 0 at once).
        let nodes = if node == here {
            Nodes::Here
        } else {
            Nodes::One(node)
        };
        let closed = count_cluster(shard, command, nodes);
        Ok(Box::pin(async move {
            match closed.await {
                0 => not_found(&id),
                n => Response::json(200, format!(r#"{{"closed":{n}}}"#)),
            }
        }))
    })
}

fn not_found(id: &str) -> Response {
    let message = format!("no open connection {}", json::echo(id));
    Response::error(404, ErrorCode::NotFound, &message)
}

/// `DELETE /api/users/{userId}/connections?code=&reason=` → `{"closed":N}`, on every node.
pub fn disconnect_user(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let (close, reason) = close_of(&request.query)?;
        let user = user_of(request, "/connections")?;
        let command = Control::CloseUser {
            user,
            org: org.as_deref().map(String::from),
            code: close.code(),
            reason: reason.to_string(),
        };
        let closed = count_cluster(shard, command, Nodes::All);
        Ok(Box::pin(async move {
            let closed = closed.await;
            Response::json(200, format!(r#"{{"closed":{closed}}}"#))
        }))
    })
}

/// `GET /api/channels?prefix=&cursor=&limit=` → `{"channels":[{"channel","subscribers"}],
/// "nextCursor":…}`: the channels with subscribers, by name, with their subscribers on
/// every shard of every node; an org's key sees its org's channels.
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
        // Each node's first page + 1 after the cursor holds every name of the whole first
        // page + 1, with all of its subscribers on that node.
        let question = Question::Channels {
            prefix,
            after,
            org: org.map(String::from),
            limit: page + 1,
        };
        let answers = ask_cluster(shard, question);
        Ok(Box::pin(async move {
            let Some(answers) = answers.await else {
                return stopping();
            };
            let mut all: std::collections::BTreeMap<String, usize> = Default::default();
            for answer in answers {
                if let NodeAnswer::Channels(list) = answer {
                    for (channel, n) in list {
                        *all.entry(channel).or_default() += n;
                    }
                }
            }
            let mut shown = all.iter().take(page + 1);
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
/// user's open connections (of the caller's org) on every node, and the channels they hold.
pub fn user(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let user = user_of(request, "")?;
        let question = Question::Connections {
            filter: Filter {
                org,
                user: Some(user.as_str().into()),
            },
            after: None,
            limit: MAX_LIMIT,
        };
        let answers = ask_cluster(shard, question);
        Ok(Box::pin(async move {
            let Some(answers) = answers.await else {
                return stopping();
            };
            let mut conns: Vec<(&str, usize, &ConnInfo)> = Vec::new();
            for answer in &answers {
                if let NodeAnswer::Connections { node, shards } = answer {
                    for listing in shards {
                        let shard = listing.shard;
                        conns.extend(listing.conns.iter().map(|c| (node.as_str(), shard, c)));
                    }
                }
            }
            conns.sort_by_key(|(node, shard, c)| (*node, *shard, c.conn));
            let mut channels: Vec<&str> = conns
                .iter()
                .flat_map(|(_, _, c)| c.channels.iter().map(|c| &**c))
                .collect();
            channels.sort_unstable();
            channels.dedup();
            let mut out = br#"{"user":"#.to_vec();
            json::push_str(&mut out, &user);
            out.extend_from_slice(br#","online":"#);
            out.extend_from_slice(if conns.is_empty() { b"false" } else { b"true" });
            out.extend_from_slice(br#","connections":"#);
            push_conns(&mut out, conns.iter().map(|(_, s, c)| (*s, *c)));
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
