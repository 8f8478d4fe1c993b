//! A Socket.IO client's text frame (or long-polling record) through the packet readers the
//! server uses, and, for JSON the server would accept as a message's data, the frames it
//! makes of it for Socket.IO subscribers: they must be Socket.IO packets holding valid JSON.
#![no_main]

use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use shardcast::dialect::shardcast::Parser;
use shardcast::dialect::socketio::{self, packet};
use shardcast::dialect::{Kind, Publication};

/// The payload of the one unmasked server frame `frame` holds.
fn payload(frame: &[u8]) -> &[u8] {
    match frame[1] & 0x7f {
        126 => &frame[4..],
        127 => &frame[10..],
        _ => &frame[2..],
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(packet::Engine::Message(inner)) = packet::engine(text) {
        let _ = packet::packet(inner, 10);
    }
    let _ = packet::packet(text, 10);
    let mut parser = Parser::default();
    if parser.validate(data).is_err() {
        return;
    }
    let publication = Publication {
        seq: 7,
        kind: Kind::Message,
        data: Rc::<[u8]>::from(data),
    };
    for frame in [
        socketio::publication("org:a:rooms:x:1", &publication),
        socketio::room_message("org:a:rooms:x:1", &publication),
    ] {
        let text = payload(&frame);
        let json = text.strip_prefix(b"42").expect("an EVENT packet");
        let mut copy = json.to_vec();
        assert!(
            simd_json::to_tape(&mut copy).is_ok(),
            "{}",
            String::from_utf8_lossy(text)
        );
    }
});
