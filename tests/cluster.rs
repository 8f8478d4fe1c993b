//! The Redis side of a cluster against a real Redis: numbering, history, idempotency, epochs,
//! batching and reconnection (`src/cluster/`).

mod common;

use std::time::{Duration, Instant};

use shardcast::cluster::keys::{member_bytes, parse_member, Heard, Kill};
use shardcast::cluster::{
    Claimed, Client, ClusterError, Completion, Envelope, Keys, Link, Op, Publish, Request,
    Retention, Settings,
};
use shardcast::dialect::{Change, Kind, Member, Status};

fn retention(history_size: usize) -> Retention {
    Retention {
        history_size,
        history_ttl_s: 600,
        meta_ttl_s: 3600,
        result_ttl_s: 300,
        kept: Default::default(),
    }
}

/// Keys of this test's own (tests share one Redis).
fn keys(test: &str) -> Keys {
    Keys::new(&format!("sctest.{}.{test}", std::process::id()))
}

fn message(channel: &str, data: &str) -> Publish {
    Publish {
        channel: channel.into(),
        kind: Kind::Message,
        data: data.as_bytes().to_vec(),
        idempotency_key: None,
        floor: Some(0),
        to_user: None,
    }
}

fn keyed(channel: &str, data: &str, key: &str) -> Publish {
    Publish {
        idempotency_key: Some(key.into()),
        floor: Some(0),
        ..message(channel, data)
    }
}

/// A connection for [`listening`].
fn listener(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// `conn` subscribed to PUB/SUB channel `name`, reads bounded by 5 s.
fn listening(conn: &mut redis::Connection, name: String) -> redis::PubSub<'_> {
    let mut pubsub = conn.as_pubsub();
    pubsub.subscribe(name).unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    pubsub
}

fn connect(url: &str, keys: Keys, size: usize) -> Client {
    Client::connect(url, keys, retention(size), Duration::from_secs(2)).expect("connect")
}

#[test]
fn publishes_are_numbered_kept_and_published_in_seq_order() {
    let Some(url) = common::redis_url("publishes_are_numbered_kept_and_published_in_seq_order")
    else {
        return;
    };
    let keys = keys("order");
    let channel = "org:acme:decisions";
    let mut listener = listener(&url);
    let mut pubsub = listening(&mut listener, keys.pubsub(channel));

    let mut client = connect(&url, keys.clone(), 1000);
    let batch: Vec<Publish> = (1..=100)
        .map(|i| message(channel, &format!("{{\"n\":{i},\"s\":\"a:b\"}}")))
        .collect();
    let outcomes = client.publish(&batch).expect("one round trip");
    let epoch = outcomes[0].as_ref().unwrap().epoch.clone();
    for (i, outcome) in outcomes.iter().enumerate() {
        let published = outcome.as_ref().expect("published");
        assert_eq!(published.seq, i as u64 + 1);
        assert_eq!(published.epoch, epoch);
        assert!(!published.repeated);
    }
    for i in 1..=100u64 {
        let msg = pubsub.get_message().expect("every message on PUB/SUB");
        let payload: Vec<u8> = msg.get_payload().unwrap();
        let envelope = Envelope::parse(&payload).unwrap();
        assert_eq!(envelope.seq, i, "in seq order");
        assert_eq!(envelope.epoch, epoch);
        assert_eq!(envelope.kind, Kind::Message);
        assert_eq!(envelope.data, batch[i as usize - 1].data.as_slice());
    }

    let page = client.history(channel, 50, 1000).unwrap();
    assert_eq!((page.top, page.epoch.as_str()), (100, epoch.as_str()));
    // Both expire (600 s and 3,600 s here) unless published to again.
    for (key, most) in [(keys.stream(channel), 600), (keys.meta(channel), 3600)] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query(client.connection())
            .unwrap();
        assert!((most - 10..=most).contains(&ttl), "{key}: TTL {ttl}");
    }
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (51..=100).collect::<Vec<_>>());
    assert_eq!(page.messages[0].data, batch[50].data);
    let top_only = client.history(channel, 0, 0).unwrap();
    assert_eq!((top_only.top, top_only.messages.len()), (100, 0));
}

#[test]
fn a_channel_redis_has_no_numbering_for_goes_on_from_the_floor_it_is_given() {
    let Some(url) = common::redis_url("a_channel_redis_has_no_numbering_for") else {
        return;
    };
    let mut client = connect(&url, keys("floor"), 1000);
    let channel = "org:acme:decisions";
    let unknown = Publish {
        floor: None,
        ..message(channel, "1")
    };
    // Without a floor, refused, and nothing done: the channel still has no numbering.
    let outcomes = client.publish(&[unknown.clone(), unknown.clone()]).unwrap();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(ClusterError::NoFloor))),
        "{outcomes:?}"
    );
    assert_eq!(client.history(channel, 0, 0).unwrap().top, 0);
    let floored = Publish {
        floor: Some(41),
        ..message(channel, "2")
    };
    let outcomes = client.publish(&[floored.clone(), unknown]).unwrap();
    let seqs: Vec<u64> = outcomes.iter().map(|o| o.as_ref().unwrap().seq).collect();
    // Once it has a numbering, a floor changes nothing.
    assert_eq!(seqs, [42, 43]);
    assert_eq!(
        client.publish(&[floored]).unwrap()[0].as_ref().unwrap().seq,
        44
    );
}

#[test]
fn a_retried_idempotency_key_gets_its_first_seq_and_publishes_nothing() {
    let Some(url) = common::redis_url("a_retried_idempotency_key_gets_its_first_seq") else {
        return;
    };
    let channel = "org:acme:usage";
    let mut client = connect(&url, keys("idem"), 100);
    let first = client
        .publish(&[keyed(channel, "1", "k1"), keyed(channel, "1 again", "k1")])
        .unwrap();
    let (a, b) = (first[0].clone().unwrap(), first[1].clone().unwrap());
    assert_eq!((a.seq, a.repeated), (1, false));
    assert_eq!((b.seq, b.repeated), (1, true));
    assert_eq!(a.epoch, b.epoch);
    let later = client
        .publish(&[keyed(channel, "again", "k1"), message(channel, "2")])
        .unwrap();
    assert_eq!(later[0].clone().unwrap().seq, 1);
    assert_eq!(
        later[1].clone().unwrap().seq,
        2,
        "no seq was spent on retries"
    );
    let page = client.history(channel, 0, 100).unwrap();
    let data: Vec<&[u8]> = page.messages.iter().map(|m| m.data.as_slice()).collect();
    assert_eq!(data, [&b"1"[..], b"2"]);
}

#[test]
fn a_channel_whose_meta_is_lost_gets_a_new_epoch_and_no_old_history() {
    let Some(url) = common::redis_url("a_channel_whose_meta_is_lost_gets_a_new_epoch") else {
        return;
    };
    let keys = keys("epoch");
    let channel = "org:acme:alerts";
    let mut client = connect(&url, keys.clone(), 100);
    let before = client
        .publish(&[message(channel, "a"), message(channel, "b")])
        .unwrap();
    let old = before[1].clone().unwrap();
    let read = client.history(channel, 0, 10).unwrap();
    assert_eq!((read.top, read.epoch.as_str()), (2, old.epoch.as_str()));

    // As after a restart of a Redis that keeps nothing on disk (or an eviction).
    let _: () = redis::cmd("DEL")
        .arg(keys.meta(channel))
        .query(client.connection())
        .unwrap();
    let after = client.publish(&[message(channel, "c")]).unwrap();
    let new = after[0].clone().unwrap();
    assert_eq!(new.seq, 1, "numbering starts again");
    assert_ne!(new.epoch, old.epoch, "a reader of the old epoch can tell");
    let page = client.history(channel, 0, 10).unwrap();
    assert_eq!(page.epoch, new.epoch);
    let data: Vec<&[u8]> = page.messages.iter().map(|m| m.data.as_slice()).collect();
    assert_eq!(data, [&b"c"[..]], "nothing of the old epoch is served");

    // A channel read before anything was published keeps the epoch it was read with.
    let empty = client.history("org:acme:empty", 0, 10).unwrap();
    let first = client.publish(&[message("org:acme:empty", "x")]).unwrap();
    assert_eq!(first[0].clone().unwrap().epoch, empty.epoch);
}

#[test]
fn history_keeps_about_its_size_and_the_oldest_kept_seq_shows_the_gap() {
    let Some(url) = common::redis_url("history_keeps_about_its_size") else {
        return;
    };
    let keys = keys("trim");
    let channel = "org:acme:trim";
    let mut client = connect(&url, keys.clone(), 10);
    let batch: Vec<Publish> = (1..=500)
        .map(|i| message(channel, &i.to_string()))
        .collect();
    client.publish(&batch).unwrap();
    // Trimmed a stream node at a time (MAXLEN ~): at least the size, at most a node (100
    // entries, Redis's default) more.
    let kept: u64 = redis::cmd("XLEN")
        .arg(keys.stream(channel))
        .query(client.connection())
        .unwrap();
    assert!((10..=110).contains(&kept), "{kept} kept");
    let page = client.history(channel, 3, 1000).unwrap();
    assert_eq!(page.top, 500);
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    let oldest = 500 - kept + 1;
    assert!(oldest > 4, "what is gone shows as a gap after 3");
    assert_eq!(seqs, (oldest..=500).collect::<Vec<_>>());
    let limited = client.history(channel, 480, 2).unwrap();
    let seqs: Vec<u64> = limited.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [481, 482]);
}

#[test]
fn a_message_that_fails_in_a_batch_fails_alone() {
    let Some(url) = common::redis_url("a_message_that_fails_in_a_batch_fails_alone") else {
        return;
    };
    let keys = keys("fails");
    let mut client = connect(&url, keys.clone(), 100);
    // Someone else's key where the channel's meta hash would be.
    let _: () = redis::cmd("SET")
        .arg(keys.meta("org:a:bad"))
        .arg("not a hash")
        .query(client.connection())
        .unwrap();
    let batch: Vec<Publish> = (0..150)
        .map(|i| message(if i == 70 { "org:a:bad" } else { "org:a:ok" }, "x"))
        .collect();
    let outcomes = client.publish(&batch).unwrap();
    assert!(
        matches!(outcomes[70], Err(ClusterError::Refused(_))),
        "{:?}",
        outcomes[70]
    );
    let seqs: Vec<u64> = outcomes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 70)
        .map(|(_, o)| o.clone().expect("the others are published").seq)
        .collect();
    assert_eq!(seqs, (1..=149).collect::<Vec<_>>());
}

/// A member as a node keeps it in Redis.
fn member(user: &str, id: &str, status: Status) -> (String, Vec<u8>) {
    let member = Member {
        user: user.into(),
        connection_id: id.into(),
        status,
        meta: b"{}".to_vec().into(),
    };
    (id.to_owned(), member_bytes(&member))
}

/// The presence changes told on a channel's PUB/SUB, as (change, node, connection id).
fn changes(pubsub: &mut redis::PubSub<'_>, n: usize) -> Vec<(Change, String, String)> {
    (0..n)
        .map(|_| {
            let payload: Vec<u8> = pubsub.get_message().expect("told").get_payload().unwrap();
            let Ok(Heard::Presence {
                change,
                node,
                member,
            }) = Heard::parse(&payload)
            else {
                panic!("not a presence change: {payload:?}");
            };
            let id = parse_member(member).expect("member").connection_id;
            (change, node.to_owned(), id.to_string())
        })
        .collect()
}

#[test]
fn presence_counts_users_pages_by_id_tells_changes_and_expires_members() {
    let Some(url) = common::redis_url("presence_counts_users_pages_by_id") else {
        return;
    };
    let keys = keys("presence");
    let channel = "org:acme:usage";
    let mut listener = listener(&url);
    let mut pubsub = listening(&mut listener, keys.pubsub(channel));
    let mut client = connect(&url, keys, 10);
    let users = ["u0", "u0", "u1", "u2", "u3"];
    let five: Vec<_> = (0..5)
        .map(|i| member(users[i], &format!("n1-0-{i}"), Status::Online))
        .collect();
    client
        .presence_write(&[(channel.into(), five.clone(), vec![])], "n1", 60_000)
        .unwrap();
    let told = changes(&mut pubsub, 5);
    assert!(told.iter().all(|(c, n, _)| *c == Change::Join && n == "n1"));
    // Refreshed unchanged: nothing told; changed: STATUS.
    let away = member("u0", "n1-0-0", Status::Away);
    let again = [five[1].clone(), away];
    client
        .presence_write(&[(channel.into(), again.to_vec(), vec![])], "n1", 60_000)
        .unwrap();
    let told = changes(&mut pubsub, 1);
    assert_eq!(told[0], (Change::Status, "n1".into(), "n1-0-0".into()));

    let mut pages = Vec::new();
    let mut after = String::new();
    loop {
        let page = client.presence_page(channel, &after, 2).unwrap();
        assert_eq!((page.total, page.users), (5, 4));
        assert!(page.members.len() <= 2);
        pages.push(page.members.len());
        match page.last {
            Some(last) => after = last,
            None => break,
        }
    }
    assert_eq!(pages, [2, 2, 1]);

    client
        .presence_write(
            &[(channel.into(), vec![], vec!["n1-0-4".into(), "gone".into()])],
            "n2",
            60_000,
        )
        .unwrap();
    let told = changes(&mut pubsub, 1);
    assert_eq!(told[0], (Change::Leave, "n2".into(), "n1-0-4".into()));
    let page = client.presence_page(channel, "", 10).unwrap();
    assert_eq!((page.total, page.users, page.members.len()), (4, 3, 4));

    // A member not refreshed within its TTL (0 here) is gone at the next call, told as a
    // LEAVE of no node's ("-"), and no longer counted.
    let brief = [(
        channel.into(),
        vec![member("u9", "n3-0-1", Status::Online)],
        vec![],
    )];
    client.presence_write(&brief, "n3", 0).unwrap();
    assert_eq!(changes(&mut pubsub, 1)[0].0, Change::Join);
    let page = client.presence_page(channel, "", 10).unwrap();
    assert_eq!((page.total, page.users), (4, 3));
    let told = changes(&mut pubsub, 1);
    assert_eq!(told[0], (Change::Leave, "-".into(), "n3-0-1".into()));
}

#[test]
fn a_session_lock_is_granted_replaced_refused_refreshed_and_released() {
    let Some(url) = common::redis_url("a_session_lock_is_granted_replaced") else {
        return;
    };
    let keys = keys("sessions");
    let mut listener = listener(&url);
    let mut pubsub = listening(&mut listener, keys.node("n1"));
    let mut client = connect(&url, keys, 10);
    let key = "acme\0solo\0tab";
    assert_eq!(
        client.claim(key, "n1-0-1", 60_000, true).unwrap(),
        Claimed::Granted
    );
    assert_eq!(
        client.claim(key, "n1-0-1", 60_000, true).unwrap(),
        Claimed::Granted
    );
    assert_eq!(
        client.claim(key, "n2-1-5", 60_000, true).unwrap(),
        Claimed::Replaced("n1-0-1".into())
    );
    // The holder's node is told on its channel.
    let payload: Vec<u8> = pubsub.get_message().unwrap().get_payload().unwrap();
    let kill = Kill::parse(&payload).unwrap();
    assert_eq!((kill.shard, kill.conn, kill.key.as_str()), (0, 1, key));
    assert_eq!(
        client.claim(key, "n3-0-1", 60_000, false).unwrap(),
        Claimed::Refused("n2-1-5".into())
    );
    // The replaced holder's refresh finds it lost; a lock nobody holds is taken again.
    let locks = [
        (key.to_owned(), "n1-0-1".to_owned()),
        ("other".to_owned(), "n1-0-2".to_owned()),
        (key.to_owned(), "n2-1-5".to_owned()),
    ];
    assert_eq!(client.refresh(&locks, 60_000).unwrap(), [0]);
    assert_eq!(
        client.claim("other", "n3-0-1", 60_000, false).unwrap(),
        Claimed::Refused("n1-0-2".into())
    );
    // Only the holder's release frees it.
    client.release(key, "n1-0-1").unwrap();
    assert!(matches!(
        client.claim(key, "n3-0-1", 60_000, false),
        Ok(Claimed::Refused(_))
    ));
    client.release(key, "n2-1-5").unwrap();
    assert_eq!(
        client.claim(key, "n3-0-1", 60_000, false).unwrap(),
        Claimed::Granted
    );
}

fn settings(url: String, keys_prefix: &str) -> Settings {
    Settings {
        url,
        prefix: keys_prefix.into(),
        retention: retention(1000),
        timeout: Duration::from_secs(2),
        backoff: Duration::from_millis(20),
        probe: Duration::from_millis(200),
        suspect: Default::default(),
        floors: None,
        node: "n1".into(),
        presence_ttl_ms: 30_000,
        session_ttl_ms: 15_000,
    }
}

fn publish_request(shard: usize, token: u64, channel: &str, data: &str) -> Request {
    Request {
        shard,
        token,
        op: Op::Publish(message(channel, data)),
    }
}

#[test]
fn the_link_answers_every_request_of_every_shard_in_the_order_sent() {
    let Some(url) = common::redis_url("the_link_answers_every_request") else {
        return;
    };
    let prefix = format!("sctest.{}.link", std::process::id());
    let (to0, from0) = flume::unbounded();
    let (to1, from1) = flume::unbounded();
    let link = Link::spawn(settings(url, &prefix), vec![to0, to1]).unwrap();
    // Two shards publishing to the same two channels, interleaved, without waiting.
    for token in 0..2000u64 {
        let shard = (token % 2) as usize;
        let channel = if token % 3 == 0 { "org:a:x" } else { "org:a:y" };
        link.requests
            .send(publish_request(shard, token, channel, &token.to_string()))
            .unwrap();
    }
    link.requests
        .send(Request {
            shard: 1,
            token: 9999,
            op: Op::History {
                channel: "org:a:x".into(),
                since: 0,
                limit: 5000,
            },
        })
        .unwrap();
    let mut seqs = std::collections::HashMap::new();
    let mut next = [0u64, 0];
    let mut history = None;
    for (shard, from) in [(0usize, &from0), (1, &from1)] {
        loop {
            match from
                .recv_timeout(Duration::from_secs(10))
                .expect("an answer")
            {
                Completion::Published { token, result, .. } => {
                    assert_eq!(token, next[shard] * 2 + shard as u64, "answers in order");
                    next[shard] += 1;
                    seqs.insert(token, result.expect("published").seq);
                }
                Completion::History { token, result } => {
                    assert_eq!(token, 9999);
                    history = Some(result.expect("history"));
                }
                other => panic!("not asked: {other:?}"),
            }
            if next[shard] == 1000 && (shard == 0 || history.is_some()) {
                break;
            }
        }
    }
    // Per channel, seqs follow the order the requests were sent in, without gaps.
    let mut x = Vec::new();
    let mut y = Vec::new();
    for token in 0..2000u64 {
        let seq = seqs[&token];
        if token % 3 == 0 {
            x.push(seq);
        } else {
            y.push(seq);
        }
    }
    assert_eq!(x, (1..=x.len() as u64).collect::<Vec<_>>());
    assert_eq!(y, (1..=y.len() as u64).collect::<Vec<_>>());
    let history = history.unwrap();
    assert_eq!(history.top, x.len() as u64, "sent after every publish");
    assert_eq!(history.messages.len(), x.len());
    link.join();
}

/// Publish through `link` until an answer comes back as `ok` says, or time runs out.
fn publish_until(
    link: &Link,
    from: &flume::Receiver<Completion>,
    token: &mut u64,
    ok: impl Fn(&Result<shardcast::cluster::Published, ClusterError>) -> bool,
) -> Result<shardcast::cluster::Published, ClusterError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        *token += 1;
        link.requests
            .send(publish_request(0, *token, "org:a:r", "x"))
            .unwrap();
        let Completion::Published { result, .. } =
            from.recv_timeout(Duration::from_secs(5)).unwrap()
        else {
            panic!("a publish's answer");
        };
        if ok(&result) {
            return result;
        }
        assert!(Instant::now() < deadline, "no such answer: last {result:?}");
        // Between attempts only: the link's backoff decides when it connects again.
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_link_fails_fast_while_redis_is_down_and_reconnects_when_it_is_back() {
    let test = "the_link_fails_fast_while_redis_is_down";
    let Some(redis) = common::OwnRedis::start(test) else {
        return;
    };
    let (to, from) = flume::unbounded();
    let link = Link::spawn(settings(redis.url(), "sctest.down"), vec![to]).unwrap();
    let mut token = 0;
    let first = publish_until(&link, &from, &mut token, Result::is_ok).unwrap();
    assert_eq!(first.seq, 1);

    let port = redis.stop();
    let down = publish_until(&link, &from, &mut token, Result::is_err).unwrap_err();
    assert!(
        matches!(
            down,
            ClusterError::Unavailable(_) | ClusterError::Unknown(_)
        ),
        "{down:?}"
    );
    // Down, the link answers at once instead of waiting for a connect timeout each time,
    // and counts no round trip for what it did not send.
    let trips = || {
        link.stats
            .publish_round_trips
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let (started, sent) = (Instant::now(), trips());
    let again = publish_until(&link, &from, &mut token, Result::is_err).unwrap_err();
    assert!(matches!(again, ClusterError::Unavailable(_)), "{again:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(trips(), sent);

    let _back = common::OwnRedis::start_on(test, port).expect("restarted");
    let after = publish_until(&link, &from, &mut token, Result::is_ok).unwrap();
    assert_eq!(after.seq, 1, "Redis kept nothing: the channel starts again");
    assert_ne!(after.epoch, first.epoch, "with a new epoch");
    link.join();
}

mod pubsub {
    use super::*;
    use shardcast::cluster::pubsub::{Incoming, Settings, Subscriber};
    use std::sync::Arc;

    fn settings(url: String, prefix: &str) -> Settings {
        Settings {
            url,
            prefix: prefix.into(),
            probe_interval: Duration::from_millis(200),
            timeout: Duration::from_millis(500),
            backoff: Duration::from_millis(20),
            lost: Default::default(),
            redis: 0,
            node: "n1".into(),
        }
    }

    /// Channels ending in "x" belong to shard 0, the others to shard 1.
    fn spawn(
        settings: Settings,
    ) -> (
        Subscriber,
        flume::Receiver<Incoming>,
        flume::Receiver<Incoming>,
    ) {
        let (to0, from0) = flume::unbounded();
        let (to1, from1) = flume::unbounded();
        let route = Arc::new(|channel: &str| usize::from(!channel.ends_with('x')));
        let subscriber = Subscriber::spawn(settings, route, vec![to0, to1]).unwrap();
        (subscriber, from0, from1)
    }

    fn next(from: &flume::Receiver<Incoming>) -> Incoming {
        from.recv_timeout(Duration::from_secs(10))
            .expect("something from PUB/SUB")
    }

    /// Wait until Redis counts `n` subscribers of `channel`'s PUB/SUB name.
    fn await_subscribers(url: &str, keys: &Keys, channel: &str, n: i64) {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(keys.pubsub(channel))
                .query(&mut conn)
                .unwrap();
            if counts[0].1 == n {
                return;
            }
            assert!(Instant::now() < deadline, "{channel}: {counts:?}, not {n}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn subscribed(channel: &str) -> Incoming {
        Incoming::Subscribed {
            channel: channel.into(),
        }
    }

    fn seq_of(incoming: Incoming) -> (String, u64) {
        match incoming {
            Incoming::Message { channel, payload } => {
                (channel, Envelope::parse(&payload).unwrap().seq)
            }
            other => panic!("a message, not {other:?}"),
        }
    }

    #[test]
    fn each_channel_reaches_its_owner_shard_in_seq_order() {
        let Some(url) = common::redis_url("pubsub_each_channel_reaches_its_owner_shard") else {
            return;
        };
        let prefix = format!("sctest.{}.pubsub", std::process::id());
        let keys = Keys::new(&prefix);
        let (subscriber, from0, from1) = spawn(settings(url.clone(), &prefix));
        assert_eq!(next(&from0), Incoming::Resubscribed { redis: 0 });
        assert_eq!(next(&from1), Incoming::Resubscribed { redis: 0 });
        let wants = subscriber.wants();
        wants.subscribe("org:a:x");
        wants.subscribe("org:a:y");
        wants.subscribe("org:a:gone");
        wants.unsubscribe("org:a:gone");
        // Each subscription is confirmed to its owner once Redis has it, even one given up
        // since.
        assert_eq!(next(&from0), subscribed("org:a:x"));
        assert_eq!(next(&from1), subscribed("org:a:y"));
        assert_eq!(next(&from1), subscribed("org:a:gone"));
        await_subscribers(&url, &keys, "org:a:x", 1);
        await_subscribers(&url, &keys, "org:a:y", 1);
        await_subscribers(&url, &keys, "org:a:gone", 0);

        let mut client = connect(&url, keys.clone(), 100);
        let batch: Vec<Publish> = (0..100)
            .map(|i| {
                let channel = ["org:a:x", "org:a:y", "org:a:gone"][i % 3];
                message(channel, &i.to_string())
            })
            .collect();
        client.publish(&batch).unwrap();
        for seq in 1..=34 {
            assert_eq!(seq_of(next(&from0)), ("org:a:x".to_owned(), seq));
        }
        for seq in 1..=33 {
            assert_eq!(seq_of(next(&from1)), ("org:a:y".to_owned(), seq));
        }
        // Nothing of the channel no longer wanted, and nothing for the wrong shard.
        client.publish(&[message("org:a:x", "end")]).unwrap();
        assert_eq!(seq_of(next(&from0)), ("org:a:x".to_owned(), 35));
        assert!(from1.is_empty());

        wants.unsubscribe("org:a:x");
        await_subscribers(&url, &keys, "org:a:x", 0);
        drop(wants);
        subscriber.join();
    }

    #[test]
    fn a_restarted_redis_gets_every_subscription_again() {
        let test = "pubsub_a_restarted_redis_gets_every_subscription_again";
        let Some(redis) = common::OwnRedis::start(test) else {
            return;
        };
        let url = redis.url();
        let keys = Keys::new("sctest.restart");
        let (subscriber, from0, _from1) = spawn(settings(url.clone(), "sctest.restart"));
        let wants = subscriber.wants();
        wants.subscribe("org:a:x");
        assert_eq!(next(&from0), Incoming::Resubscribed { redis: 0 });
        assert_eq!(next(&from0), subscribed("org:a:x"));
        let mut client = connect(&url, keys.clone(), 100);
        client.publish(&[message("org:a:x", "1")]).unwrap();
        assert_eq!(seq_of(next(&from0)).1, 1);

        let port = redis.stop();
        assert_eq!(next(&from0), Incoming::Down { redis: 0 });
        let _back = common::OwnRedis::start_on(test, port).expect("restarted");
        // Subscribed again before it says so: nothing published after this is missed.
        assert_eq!(next(&from0), Incoming::Resubscribed { redis: 0 });
        let mut client = connect(&url, keys.clone(), 100);
        client.publish(&[message("org:a:x", "after")]).unwrap();
        let (channel, seq) = seq_of(next(&from0));
        assert_eq!((channel.as_str(), seq), ("org:a:x", 1));
        drop(wants);
        subscriber.join();
    }

    #[test]
    fn a_connection_that_stops_answering_is_dropped_and_made_again() {
        let test = "pubsub_a_connection_that_stops_answering";
        let Some(redis) = common::OwnRedis::start(test) else {
            return;
        };
        let url = redis.url();
        let keys = Keys::new("sctest.probe");
        let (subscriber, from0, _from1) = spawn(settings(url.clone(), "sctest.probe"));
        let wants = subscriber.wants();
        wants.subscribe("org:a:x");
        assert_eq!(next(&from0), Incoming::Resubscribed { redis: 0 });
        assert_eq!(next(&from0), subscribed("org:a:x"));
        await_subscribers(&url, &keys, "org:a:x", 1);

        // Redis holds every client's commands, the probe's PING too, for 2 s: the socket
        // stays open and says nothing.
        let mut admin = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let paused_at = Instant::now();
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(2000)
            .arg("ALL")
            .query(&mut admin)
            .unwrap();
        assert_eq!(next(&from0), Incoming::Down { redis: 0 });
        assert!(
            paused_at.elapsed() < Duration::from_millis(1900),
            "noticed by the probe, not by the pause's end"
        );
        assert_eq!(next(&from0), Incoming::Resubscribed { redis: 0 });
        let mut client = connect(&url, keys.clone(), 100);
        client.publish(&[message("org:a:x", "1")]).unwrap();
        assert_eq!(seq_of(next(&from0)).1, 1);
        drop(wants);
        subscriber.join();
    }
}
