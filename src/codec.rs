//! WebSocket frame codec (RFC 6455), server side, free of I/O.
//!
//! Built on tungstenite's frame types (`FrameHeader`, `OpCode`, `CloseCode`) rather than its
//! `WebSocket`, for two reasons that matter at scale: the decoder reads from a buffer the caller
//! owns (one scratch buffer per shard) instead of keeping a 128 KiB read buffer per connection,
//! and outgoing frames are encoded once into shared bytes instead of once per recipient.
//! The decoder keeps only what it must across reads: the tail of an incomplete frame and the
//! fragments of an unfinished message, both normally empty.

use std::io::Cursor;
use std::rc::Rc;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::codes::Close;

/// Bytes of one or more complete frames, shared by every connection that sends them.
pub type Frame = Rc<[u8]>;

/// Largest server frame header: 2 bytes plus a 64-bit length (server frames are unmasked).
const MAX_HEADER: usize = 10;
/// Control frames may carry at most 125 bytes (RFC 6455 5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// One decoded message or control frame; payloads borrow the caller's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete text message, already checked to be UTF-8.
    Text(&'a str),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A ping; the connection owes a pong with the same payload.
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// The peer started (or answered) the closing handshake.
    Close(Option<(u16, &'a str)>),
}

/// What the decoder does after handing over an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Decode the next frame.
    Continue,
    /// Stop and discard the rest of the input (the connection is closing).
    Stop,
    /// Stop and keep the rest of the input for the next call (the caller is not taking
    /// requests for now: a later `decode`, with or without new bytes, resumes).
    Pause,
}

/// Why the decoder gave up on a connection: the close code and reason to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct ProtocolViolation {
    /// Close code to send (1002, 1007 or 1009).
    pub code: u16,
    /// Human-readable reason, sent in the close frame.
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> ProtocolViolation {
    ProtocolViolation { code, reason }
}

/// Incremental decoder for frames sent by a client.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Bytes of a frame that has not fully arrived yet.
    partial: Vec<u8>,
    /// Fragments of a message whose final frame has not arrived yet.
    message: Vec<u8>,
    /// Opcode of the message being assembled, if any.
    message_kind: Option<Data>,
    /// How much of `message` is known to be valid UTF-8 (for fail-fast checks).
    utf8_valid: usize,
}

impl Decoder {
    /// True when the decoder holds no bytes between reads.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.message.is_empty()
    }

    /// Heap bytes held by the decoder (partial frames and fragments).
    pub fn held_bytes(&self) -> usize {
        self.partial.capacity() + self.message.capacity()
    }

    /// Decode every complete frame in `input` (unmasking it in place) and hand each message to
    /// `on_event`, which says whether to go on (see [`Flow`]). Incomplete trailing bytes, and
    /// everything after a pause, are kept for the next call.
    pub fn decode(
        &mut self,
        input: &mut [u8],
        max_message: usize,
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<(), ProtocolViolation> {
        if self.partial.is_empty() {
            let used = self.decode_frames(input, max_message, on_event)?;
            if used < input.len() {
                self.partial.extend_from_slice(&input[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(input);
            let used = self.decode_frames(&mut buf, max_message, on_event)?;
            buf.drain(..used);
            if buf.is_empty() {
                // Give the memory back: idle connections should hold nothing.
                buf = Vec::new();
            }
            self.partial = buf;
        }
        Ok(())
    }

    /// Decode complete frames from the front of `buf`; returns how many bytes were used.
    fn decode_frames(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<usize, ProtocolViolation> {
        let mut pos = 0;
        while pos < buf.len() {
            let mut cursor = Cursor::new(&buf[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(_) => {
                    return Err(violation(
                        Close::ProtocolError.code(),
                        "malformed frame header",
                    ))
                }
            };
            let header_len = cursor.position() as usize;
            self.check_header(&header, len, max_message)?;
            let len = len as usize;
            if buf.len() - pos - header_len < len {
                break;
            }
            let start = pos + header_len;
            let payload = &mut buf[start..start + len];
            if let Some(mask) = header.mask {
                apply_mask(payload, mask);
            }
            pos = start + len;
            match self.dispatch(&header, payload, max_message, on_event)? {
                Flow::Continue => {}
                Flow::Stop => return Ok(buf.len()),
                Flow::Pause => return Ok(pos),
            }
        }
        Ok(pos)
    }

    /// Reject what RFC 6455 forbids before waiting for a payload that may never be valid.
    fn check_header(
        &self,
        header: &FrameHeader,
        len: u64,
        max_message: usize,
    ) -> Result<(), ProtocolViolation> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(violation(
                Close::ProtocolError.code(),
                "reserved bits set without an extension",
            ));
        }
        if header.mask.is_none() {
            return Err(violation(
                Close::ProtocolError.code(),
                "client frames must be masked",
            ));
        }
        match header.opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(violation(Close::ProtocolError.code(), "reserved opcode"))
            }
            OpCode::Control(_) if !header.is_final => Err(violation(
                Close::ProtocolError.code(),
                "fragmented control frame",
            )),
            OpCode::Control(_) if len > MAX_CONTROL_PAYLOAD => Err(violation(
                Close::ProtocolError.code(),
                "control frame payload over 125 bytes",
            )),
            OpCode::Data(_)
                if (self.message.len() as u64).saturating_add(len) > max_message as u64 =>
            {
                Err(violation(Close::TooBig.code(), "message too big"))
            }
            _ => Ok(()),
        }
    }

    fn dispatch(
        &mut self,
        header: &FrameHeader,
        payload: &mut [u8],
        max_message: usize,
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, ProtocolViolation> {
        match header.opcode {
            OpCode::Control(Control::Ping) => Ok(on_event(Event::Ping(payload))),
            OpCode::Control(Control::Pong) => Ok(on_event(Event::Pong(payload))),
            OpCode::Control(Control::Close) => {
                let close = parse_close(payload)?;
                Ok(on_event(Event::Close(close)))
            }
            OpCode::Data(Data::Continue) => {
                let Some(kind) = self.message_kind else {
                    return Err(violation(
                        Close::ProtocolError.code(),
                        "continuation frame without a message",
                    ));
                };
                if self.message.len() + payload.len() > max_message {
                    return Err(violation(Close::TooBig.code(), "message too big"));
                }
                self.message.extend_from_slice(payload);
                if kind == Data::Text {
                    self.check_utf8_prefix()?;
                }
                if !header.is_final {
                    return Ok(Flow::Continue);
                }
                let message = std::mem::take(&mut self.message);
                self.message_kind = None;
                self.utf8_valid = 0;
                let keep_going = deliver(kind, &message, on_event)?;
                Ok(keep_going)
            }
            OpCode::Data(kind) => {
                if self.message_kind.is_some() {
                    return Err(violation(
                        Close::ProtocolError.code(),
                        "new message before the last one finished",
                    ));
                }
                if header.is_final {
                    return deliver(kind, payload, on_event);
                }
                self.message_kind = Some(kind);
                self.message.extend_from_slice(payload);
                if kind == Data::Text {
                    self.check_utf8_prefix()?;
                }
                Ok(Flow::Continue)
            }
            OpCode::Control(Control::Reserved(_)) => {
                Err(violation(Close::ProtocolError.code(), "reserved opcode"))
            }
        }
    }

    /// Fail fast on invalid UTF-8 in a fragmented text message, allowing a code point that is
    /// split across fragments to complete later.
    fn check_utf8_prefix(&mut self) -> Result<(), ProtocolViolation> {
        match std::str::from_utf8(&self.message[self.utf8_valid..]) {
            Ok(_) => self.utf8_valid = self.message.len(),
            Err(e) if e.error_len().is_none() => self.utf8_valid += e.valid_up_to(),
            Err(_) => {
                return Err(violation(
                    Close::InvalidData.code(),
                    "invalid UTF-8 in text message",
                ))
            }
        }
        Ok(())
    }
}

fn deliver(
    kind: Data,
    payload: &[u8],
    on_event: &mut dyn FnMut(Event<'_>) -> Flow,
) -> Result<Flow, ProtocolViolation> {
    match kind {
        Data::Text => match std::str::from_utf8(payload) {
            Ok(text) => Ok(on_event(Event::Text(text))),
            Err(_) => Err(violation(
                Close::InvalidData.code(),
                "invalid UTF-8 in text message",
            )),
        },
        _ => Ok(on_event(Event::Binary(payload))),
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, ProtocolViolation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(violation(
            Close::ProtocolError.code(),
            "close frame with a one-byte payload",
        )),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(violation(Close::ProtocolError.code(), "invalid close code"));
            }
            match std::str::from_utf8(&payload[2..]) {
                Ok(reason) => Ok(Some((code, reason))),
                Err(_) => Err(violation(
                    Close::InvalidData.code(),
                    "invalid UTF-8 in close reason",
                )),
            }
        }
    }
}

/// Codes a peer may send in a close frame (RFC 6455 7.4).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// XOR `buf` with the 4-byte mask, eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Builds one unmasked server frame without knowing its length in advance: the payload is
/// written after room for the largest header, which is filled in by `finish`.
#[derive(Debug)]
pub struct FrameBuilder {
    buf: Vec<u8>,
    opcode: OpCode,
}

impl FrameBuilder {
    /// Start a text frame.
    pub fn text() -> Self {
        Self::new(OpCode::Data(Data::Text), 128)
    }

    /// Start a frame with the given opcode and payload capacity.
    pub fn new(opcode: OpCode, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(MAX_HEADER + capacity);
        buf.resize(MAX_HEADER, 0);
        Self { buf, opcode }
    }

    /// The payload written so far.
    pub fn payload_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Append payload bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Finish the frame as shared bytes.
    pub fn finish(self) -> Frame {
        let (start, buf) = self.finish_in_place();
        Rc::from(&buf[start..])
    }

    fn finish_in_place(self) -> (usize, Vec<u8>) {
        let mut buf = self.buf;
        let len = (buf.len() - MAX_HEADER) as u64;
        let header = FrameHeader {
            opcode: self.opcode,
            ..FrameHeader::default()
        };
        let header_len = header.len(len);
        let start = MAX_HEADER - header_len;
        let mut slot = &mut buf[start..MAX_HEADER];
        // Writing into a slice of exactly the header's size cannot fail.
        let _ = header.format(len, &mut slot);
        (start, buf)
    }
}

/// A complete frame with the given opcode and payload.
pub fn frame(opcode: OpCode, payload: &[u8]) -> Frame {
    let mut builder = FrameBuilder::new(opcode, payload.len());
    builder.push(payload);
    builder.finish()
}

/// A close frame with a code and reason (the reason is cut to fit in a control frame).
pub fn close_frame(code: u16, reason: &str) -> Frame {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD as usize - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut builder = FrameBuilder::new(OpCode::Control(Control::Close), 2 + end);
    builder.push(&code.to_be_bytes());
    builder.push(&reason.as_bytes()[..end]);
    builder.finish()
}

/// Opcodes of the frames the server sends.
pub mod opcode {
    use super::{Control, Data, OpCode};
    /// Text frame.
    pub const TEXT: OpCode = OpCode::Data(Data::Text);
    /// Binary frame.
    pub const BINARY: OpCode = OpCode::Data(Data::Binary);
    /// Ping frame.
    pub const PING: OpCode = OpCode::Control(Control::Ping);
    /// Pong frame.
    pub const PONG: OpCode = OpCode::Control(Control::Pong);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let mut body = payload.to_vec();
        apply_mask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    #[derive(Debug, PartialEq)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    fn run(decoder: &mut Decoder, input: &[u8]) -> Result<Vec<Owned>, ProtocolViolation> {
        let mut out = Vec::new();
        let mut buf = input.to_vec();
        decoder.decode(&mut buf, 1 << 16, &mut |event| {
            out.push(match event {
                Event::Text(t) => Owned::Text(t.to_string()),
                Event::Binary(b) => Owned::Binary(b.to_vec()),
                Event::Ping(b) => Owned::Ping(b.to_vec()),
                Event::Pong(b) => Owned::Pong(b.to_vec()),
                Event::Close(c) => Owned::Close(c.map(|(code, r)| (code, r.to_string()))),
            });
            Flow::Continue
        })?;
        Ok(out)
    }

    #[test]
    fn a_pause_keeps_the_rest_for_the_next_call() {
        let mut wire = client_frame(0x81, b"one");
        wire.extend(client_frame(0x81, b"two"));
        wire.extend(&client_frame(0x81, b"three")[..4]);
        let mut decoder = Decoder::default();
        let mut seen = Vec::new();
        decoder
            .decode(&mut wire, 1 << 16, &mut |event| {
                seen.push(format!("{event:?}"));
                Flow::Pause
            })
            .unwrap();
        assert_eq!(seen, [r#"Text("one")"#]);
        assert!(!decoder.is_idle(), "the unread frames are kept");
        // Resumed without new bytes, then the rest of the last frame arrives.
        let mut events = run(&mut decoder, &[]).unwrap();
        events.extend(run(&mut decoder, &client_frame(0x81, b"three")[4..]).unwrap());
        assert_eq!(
            events,
            vec![Owned::Text("two".into()), Owned::Text("three".into())]
        );
        assert!(decoder.is_idle());
    }

    #[test]
    fn decodes_frames_split_at_every_byte() {
        let mut wire = client_frame(0x81, b"hello");
        wire.extend(client_frame(0x82, &[1, 2, 3]));
        wire.extend(client_frame(0x89, b"p"));
        for split in 0..wire.len() {
            let mut decoder = Decoder::default();
            let mut events = run(&mut decoder, &wire[..split]).unwrap();
            events.extend(run(&mut decoder, &wire[split..]).unwrap());
            assert_eq!(
                events,
                vec![
                    Owned::Text("hello".into()),
                    Owned::Binary(vec![1, 2, 3]),
                    Owned::Ping(b"p".to_vec())
                ],
                "split at {split}"
            );
            assert!(decoder.is_idle());
            assert_eq!(decoder.held_bytes(), 0, "idle decoder keeps no memory");
        }
    }

    #[test]
    fn assembles_fragments_with_interleaved_control_frames() {
        let mut wire = client_frame(0x01, "héllo ".as_bytes());
        wire.extend(client_frame(0x89, b""));
        wire.extend(client_frame(0x80, "wörld".as_bytes()));
        let events = run(&mut Decoder::default(), &wire).unwrap();
        assert_eq!(
            events,
            vec![Owned::Ping(vec![]), Owned::Text("héllo wörld".into())]
        );
    }

    #[test]
    fn code_point_split_across_fragments_is_accepted() {
        let bytes = "€".as_bytes();
        let mut wire = client_frame(0x01, &bytes[..1]);
        wire.extend(client_frame(0x80, &bytes[1..]));
        assert_eq!(
            run(&mut Decoder::default(), &wire).unwrap(),
            vec![Owned::Text("€".into())]
        );
    }

    #[test]
    fn rejects_protocol_violations_with_the_right_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (client_frame(0xC1, b"x"), 1002),                       // rsv1
            (client_frame(0x83, b"x"), 1002),                       // reserved opcode
            (client_frame(0x09, b"x"), 1002),                       // fragmented ping
            (client_frame(0x89, &[0u8; 126]), 1002),                // big ping
            (client_frame(0x80, b"x"), 1002),                       // continuation first
            (client_frame(0x81, &[0xff, 0xfe]), 1007),              // invalid utf-8
            (client_frame(0x01, &[0xce, 0xba, 0xff]), 1007),        // fail fast in fragment
            (client_frame(0x88, &[3]), 1002),                       // one-byte close
            (client_frame(0x88, &999u16.to_be_bytes()), 1002),      // bad close code
            (client_frame(0x88, &[0x03, 0xe8, 0xff]), 1007),        // bad close reason
            (vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'], 1002), // unmasked
        ];
        for (wire, code) in cases {
            let err = run(&mut Decoder::default(), &wire).unwrap_err();
            assert_eq!(err.code, code, "{wire:?}: {err}");
        }
        let mut wire = client_frame(0x01, b"a");
        wire.extend(client_frame(0x01, b"b"));
        assert_eq!(run(&mut Decoder::default(), &wire).unwrap_err().code, 1002);
    }

    #[test]
    fn refuses_oversized_message_before_it_arrives() {
        let mut decoder = Decoder::default();
        let wire = client_frame(0x81, &vec![b'a'; 70_000]);
        // Only the header has arrived: the length alone is enough to refuse.
        let err = run(&mut decoder, &wire[..14]).unwrap_err();
        assert_eq!(err.code, 1009);
    }

    #[test]
    fn close_frames_parse_code_and_reason() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let events = run(&mut Decoder::default(), &client_frame(0x88, &payload)).unwrap();
        assert_eq!(events, vec![Owned::Close(Some((1000, "bye".into())))]);
        for code in [1004u16, 1005, 1006, 1015, 1016, 2999, 5000] {
            let wire = client_frame(0x88, &code.to_be_bytes());
            assert!(run(&mut Decoder::default(), &wire).is_err(), "{code}");
        }
        for code in [1000u16, 1001, 1003, 1007, 1011, 3000, 4999] {
            let wire = client_frame(0x88, &code.to_be_bytes());
            assert!(run(&mut Decoder::default(), &wire).is_ok(), "{code}");
        }
    }

    #[test]
    fn server_frames_have_minimal_headers() {
        assert_eq!(&*frame(opcode::TEXT, b"hi"), &[0x81, 2, b'h', b'i']);
        let medium = frame(opcode::BINARY, &[7u8; 300]);
        assert_eq!(&medium[..4], &[0x82, 126, 1, 44]);
        assert_eq!(medium.len(), 304);
        let big = frame(opcode::TEXT, &vec![b'x'; 70_000]);
        assert_eq!(big[1], 127);
        assert_eq!(big.len(), 70_010);
        let close = close_frame(1001, "going away");
        assert_eq!(&close[..4], &[0x88, 12, 0x03, 0xe9]);
        let long = close_frame(1000, &"é".repeat(100));
        assert!(long.len() <= 127);
    }
}
