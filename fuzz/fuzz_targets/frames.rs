//! The WebSocket frame decoder on arbitrary client bytes (masked or not, fragmented, control
//! frames), fed in pieces split where the input says, pausing where it says: it must never
//! panic, and must hand over only text that is valid UTF-8 and messages within the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::codec::{Decoder, Event, Flow};

const MAX_MESSAGE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&control, wire)) = data.split_first() else {
        return;
    };
    let mut decoder = Decoder::default();
    let chunk = usize::from(control % 64) + 1;
    let mut n = 0u32;
    for piece in wire.chunks(chunk) {
        let mut piece = piece.to_vec();
        // Decode, then resume after each pause (as a connection does once its replies drain).
        let mut input: &mut [u8] = &mut piece;
        loop {
            let mut paused = false;
            let result = decoder.decode(input, MAX_MESSAGE, &mut |event| {
                n = n.wrapping_add(1);
                match event {
                    Event::Text(t) => assert!(t.len() <= MAX_MESSAGE),
                    Event::Binary(b) => assert!(b.len() <= MAX_MESSAGE),
                    Event::Ping(p) | Event::Pong(p) => assert!(p.len() <= 125),
                    Event::Close(_) => {}
                }
                if control & 0x80 != 0 && n % 3 == 0 {
                    paused = true;
                    Flow::Pause
                } else {
                    Flow::Continue
                }
            });
            if result.is_err() {
                return;
            }
            if !paused {
                break;
            }
            input = &mut [];
        }
    }
});
