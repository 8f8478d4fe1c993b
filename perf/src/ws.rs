//! Client side of the WebSocket wire: the upgrade request, masked frames out, unmasked frames
//! in, parsed in place without allocating.

/// The upgrade request for `path` on `host`.
pub fn upgrade_request(host: &str, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Append one masked client frame. The mask is fixed: it only has to exist, not be secret,
/// for a load generator talking to a server it controls.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    push_header(out, opcode, payload.len(), 0x80);
    out.extend_from_slice(&MASK);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= MASK[i & 3];
    }
}

/// Append one unmasked server frame (for the floor server).
pub fn push_server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    push_header(out, opcode, payload.len(), 0);
    out.extend_from_slice(payload);
}

/// A final frame's first bytes: opcode and payload length, `mask_bit` set for a client's.
fn push_header(out: &mut Vec<u8>, opcode: u8, len: usize, mask_bit: u8) {
    out.push(0x80 | opcode);
    match len {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n < 65536 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
}

/// A frame parsed from the server.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong).
    pub opcode: u8,
    /// Payload, as sent (server frames are unmasked; a client's stays masked).
    pub payload: &'a [u8],
    /// The masking key, if the frame had one (client frames).
    pub mask: Option<[u8; 4]>,
}

/// Parse the frame at the front of `buf`: the frame and its total length, or `None` if
/// incomplete. Fragmented messages are not expected from the servers under test.
pub fn parse_frame(buf: &[u8]) -> Option<(Frame<'_>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let mut mask = None;
    if masked {
        // Servers must not mask; the floor server reads client frames with this too.
        mask = Some(buf.get(at..at + 4)?.try_into().ok()?);
        at += 4;
    }
    if buf.len() < at + len {
        return None;
    }
    Some((
        Frame {
            opcode,
            payload: &buf[at..at + len],
            mask,
        },
        at + len,
    ))
}

/// Find the end of the HTTP response head; true in the second value if the status is 101.
pub fn response_head(buf: &[u8]) -> Option<(usize, bool)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some((end, buf.starts_with(b"HTTP/1.1 101")))
}

/// The unsigned integer after `key` (e.g. `"t":`) in `text`.
pub fn field_u64(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = memfind(text, key)? + key.len();
    digits(&text[at..]).map(|(n, _)| n)
}

/// The unsigned integer at the start of `text`, and how many bytes it took.
pub fn digits(text: &[u8]) -> Option<(u64, usize)> {
    let len = text.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 {
        return None;
    }
    let n = text[..len].iter().fold(0u64, |n, &b| {
        n.wrapping_mul(10).wrapping_add(u64::from(b - b'0'))
    });
    Some((n, len))
}

/// Position of `needle` in `hay` (SIMD search from memchr).
pub fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_parser_when_unmasked() {
        let server_frame = [0x81, 3, b'a', b'b', b'c', 0x82];
        let (f, len) = parse_frame(&server_frame).unwrap();
        assert_eq!((f.opcode, f.payload, len), (1, &b"abc"[..], 5));
        assert!(parse_frame(&server_frame[5..]).is_none());
        let mut out = Vec::new();
        push_frame(&mut out, 1, &[7u8; 300]);
        assert_eq!(&out[..4], &[0x81, 0x80 | 126, 1, 44]);
        assert_eq!(out.len(), 4 + 4 + 300);
    }

    #[test]
    fn finds_numeric_fields() {
        let text = br#"{"type":"MESSAGE","seq":12,"data":{"t":987,"p":3,"s":41}}"#;
        assert_eq!(field_u64(text, br#""t":"#), Some(987));
        assert_eq!(field_u64(text, br#""seq":"#), Some(12));
        assert_eq!(field_u64(text, br#""zz":"#), None);
        assert_eq!(memfind(b"aaab", b"ab"), Some(2));
    }
}
