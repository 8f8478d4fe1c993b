//! A Socket.IO client's text frame (or long-polling record) through the packet readers the
//! server uses, and, for JSON the server would accept as a message's data, the frames it
//! makes of it for Socket.IO subscribers: they must be Socket.IO packets holding valid JSON.
#![no_main]

use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use shardcast::dialect::shardcast::Parser;
use shardcast::dialect::socketio::{self, packet};
use shardcast::dialect::{Kind, Publication};

/// The opcodes and payloads of the unmasked server frames `bytes` holds.
fn frames(mut bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (len, head) = match bytes[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&bytes[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            n => (usize::from(n), 2),
        };
        out.push((bytes[0] & 0x0f, &bytes[head..head + len]));
        bytes = &bytes[head + len..];
    }
    out
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
        let frames = frames(&frame);
        let (opcode, text) = frames[0];
        assert_eq!(opcode, 1, "a text frame first");
        // An EVENT, or a BINARY_EVENT followed by as many binary frames as it says.
        let json = match text.strip_prefix(b"45") {
            Some(rest) => {
                let dash = rest.iter().position(|b| *b == b'-').expect("attachments counted");
                let n: usize = std::str::from_utf8(&rest[..dash]).unwrap().parse().unwrap();
                assert_eq!(frames.len(), 1 + n);
                assert!(frames[1..].iter().all(|(opcode, _)| *opcode == 2));
                &rest[dash + 1..]
            }
            None => {
                assert_eq!(frames.len(), 1);
                text.strip_prefix(b"42").expect("an EVENT packet")
            }
        };
        let mut copy = json.to_vec();
        assert!(
            simd_json::to_tape(&mut copy).is_ok(),
            "{}",
            String::from_utf8_lossy(text)
        );
    }
    // Binary values taken out and put back are the same values (data holding placeholders
    // of its own is as ambiguous to Socket.IO as here).
    let own_placeholders = data.windows(14).any(|w| w == b"\"_placeholder\"");
    if let Some((text, attachments)) =
        socketio::binary::extract(data).filter(|_| !own_placeholders)
    {
        let back = socketio::binary::embed(&text, &attachments).expect("its own placeholders");
        assert_eq!(socketio::binary::extract(&back).map(|(_, a)| a), Some(attachments));
    }
});
