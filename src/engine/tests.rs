//! The contract every engine passes: each test takes a fresh engine keeping [`LIMITS`] of
//! history, drives it only through [`Engine`], and is instantiated for each implementation
//! at the bottom (a Redis engine adds one line there).

use std::rc::Rc;
use std::time::Instant;

use super::history::Limits;
use super::{Arrival, Engine, Event, Memory};
use crate::dialect::{Kind, Publication};

/// Three messages, one second.
const LIMITS: Limits = Limits {
    size: 3,
    ttl_ms: 1_000,
};

fn at(at_ms: u64) -> Arrival {
    Arrival {
        t0: Instant::now(),
        at_ms,
    }
}

fn data(text: &str) -> Rc<[u8]> {
    Rc::from(text.as_bytes())
}

fn publish(engine: &mut dyn Engine, channel: &str, text: &str, at_ms: u64) -> u64 {
    match engine.publish(channel, Kind::Message, data(text), None, at(at_ms), 0) {
        super::Numbered::Now(seq) => seq,
        super::Numbered::Later => panic!("the contract is for engines that answer at once"),
    }
}

/// What the engine has to deliver: (channel, seq, data).
fn delivered(engine: &mut dyn Engine) -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    while let Some(Event::Publication {
        channel,
        publication,
        ..
    }) = engine.next_event()
    {
        let text = String::from_utf8_lossy(&publication.data).into_owned();
        out.push((channel.to_string(), publication.seq, text));
    }
    out
}

fn read(engine: &mut dyn Engine, channel: &str, after: u64, now_ms: u64) -> super::Found {
    let found = engine.history(channel, after, now_ms, 0);
    found.expect("the contract is for engines that answer at once")
}

fn seqs(engine: &mut dyn Engine, channel: &str, after: u64, now_ms: u64) -> Vec<u64> {
    let found = read(engine, channel, after, now_ms);
    found.messages.iter().map(|p| p.seq).collect()
}

fn numbers_each_channel_on_its_own_and_delivers_in_order(engine: &mut dyn Engine) {
    let mut numbers = Vec::new();
    for (channel, text) in [
        ("a", "a1"),
        ("b", "b1"),
        ("a", "a2"),
        ("a", "a3"),
        ("b", "b2"),
    ] {
        numbers.push(publish(engine, channel, text, 0));
    }
    assert_eq!(numbers, [1, 1, 2, 3, 2]);
    let events = delivered(engine);
    let on = |name: &str| -> Vec<(u64, String)> {
        let mine = events.iter().filter(|(channel, ..)| channel == name);
        mine.map(|(_, seq, text)| (*seq, text.clone())).collect()
    };
    assert_eq!(
        on("a"),
        [(1, "a1".into()), (2, "a2".into()), (3, "a3".into())]
    );
    assert_eq!(on("b"), [(1, "b1".into()), (2, "b2".into())]);
    assert_eq!(events.len(), 5, "each message delivered once");
}

fn history_keeps_the_newest_and_says_what_it_lost(engine: &mut dyn Engine) {
    for n in 1..=5 {
        publish(engine, "h", &n.to_string(), 0);
    }
    let found = read(engine, "h", 0, 0);
    let texts: Vec<_> = found.messages.iter().map(|p| p.data.to_vec()).collect();
    assert_eq!(texts, [b"3".to_vec(), b"4".to_vec(), b"5".to_vec()]);
    assert_eq!((found.upto, found.floor), (5, 2), "seqs 1 and 2 are gone");
    assert_eq!(seqs(engine, "h", 4, 0), [5]);
    let found = read(engine, "h", 5, 0);
    assert!(found.messages.is_empty());
    assert_eq!(found.upto, 5);
    let unknown = read(engine, "never-used", 0, 0);
    assert!(unknown.messages.is_empty());
    assert_eq!((unknown.upto, unknown.floor), (0, 0));
}

fn history_expires_by_age(engine: &mut dyn Engine) {
    publish(engine, "t", "old", 0);
    publish(engine, "t", "new", 900);
    assert_eq!(seqs(engine, "t", 0, 1_000), [1, 2]);
    let found = read(engine, "t", 0, 1_500);
    assert_eq!(found.messages.len(), 1);
    assert_eq!((found.messages[0].seq, found.floor), (2, 1));
    assert!(seqs(engine, "t", 0, 10_000).is_empty());
}

fn a_reserved_seq_is_delivered_when_kept(engine: &mut dyn Engine) {
    let seq = engine.reserve("r", true);
    assert_eq!(seq, 1);
    assert!(delivered(engine).is_empty(), "nothing until it is kept");
    assert_eq!(read(engine, "r", 0, 0).upto, 0, "not delivered yet");
    let publication = Publication {
        seq,
        kind: Kind::Decision,
        data: data("d1"),
    };
    engine.keep("r", publication, at(0));
    assert_eq!(delivered(engine), [("r".into(), 1, "d1".into())]);
    assert_eq!(publish(engine, "r", "m2", 0), 2);
    assert_eq!(seqs(engine, "r", 0, 0), [1, 2]);
}

fn the_newest_seq_given_back_goes_to_the_next_message(engine: &mut dyn Engine) {
    let seq = engine.reserve("g", true);
    engine.give_back("g", seq);
    assert_eq!(publish(engine, "g", "m", 0), seq, "no hole");
    assert_eq!(delivered(engine), [("g".into(), seq, "m".into())]);
}

fn a_seq_given_back_before_later_ones_is_never_reused(engine: &mut dyn Engine) {
    let first = engine.reserve("g", true);
    let second = engine.reserve("g", false);
    engine.give_back("g", first);
    let publication = Publication {
        seq: second,
        kind: Kind::Message,
        data: data("m2"),
    };
    engine.keep("g", publication, at(0));
    assert_eq!(publish(engine, "g", "m3", 0), 3);
    assert_eq!(seqs(engine, "g", 0, 0), [2, 3]);
    let found = read(engine, "g", 0, 0);
    assert_eq!(found.floor, 0, "a hole is not a loss");
}

fn numbering_continues_above_the_store(engine: &mut dyn Engine) {
    engine.recover("s", 10);
    assert_eq!(publish(engine, "s", "m", 0), 11);
    engine.recover("s", 3);
    assert_eq!(publish(engine, "s", "m", 0), 12, "never backwards");
    // Numbered before the store answered: the sequence jumps to the stored maximum, and the
    // numbers in between count as delivered by an earlier process.
    assert_eq!(publish(engine, "late", "m", 0), 1);
    engine.recover("late", 40);
    assert_eq!(publish(engine, "late", "m", 0), 41);
    let found = read(engine, "late", 0, 0);
    assert_eq!((found.floor, found.upto), (40, 41));
}

fn idle_channels_are_forgotten_and_continue_where_they_stood(engine: &mut dyn Engine) {
    publish(engine, "x", "1", 0);
    publish(engine, "x", "2", 0);
    let seq = engine.reserve("stored", true);
    let data = data("d");
    let kind = Kind::Decision;
    engine.keep("stored", Publication { seq, kind, data }, at(0));
    publish(engine, "wanted", "1", 0);
    let before = engine.channels();
    assert_eq!(engine.sweep(500, &|_| false), 0, "history is still kept");
    let freed = engine.sweep(5_000, &|name| name == "wanted");
    assert_eq!(freed, 2, "x and stored; wanted is needed");
    assert_eq!(engine.channels(), before - 2);
    assert!(
        publish(engine, "x", "3", 6_000) > 2,
        "never a seq given before"
    );
    assert_eq!(
        publish(engine, "stored", "m", 6_000),
        2,
        "continues exactly"
    );
    assert_eq!(publish(engine, "wanted", "2", 6_000), 2);
}

macro_rules! contract {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            macro_rules! case {
                ($test:ident) => {
                    #[test]
                    fn $test() {
                        let mut engine = $make;
                        super::$test(&mut engine);
                    }
                };
            }

            case!(numbers_each_channel_on_its_own_and_delivers_in_order);
            case!(history_keeps_the_newest_and_says_what_it_lost);
            case!(history_expires_by_age);
            case!(a_reserved_seq_is_delivered_when_kept);
            case!(the_newest_seq_given_back_goes_to_the_next_message);
            case!(a_seq_given_back_before_later_ones_is_never_reused);
            case!(numbering_continues_above_the_store);
            case!(idle_channels_are_forgotten_and_continue_where_they_stood);
        }
    };
}

contract!(memory, Memory::new(LIMITS));
