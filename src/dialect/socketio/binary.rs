//! Binary values on channels. Channel data is JSON: a Socket.IO client's binary value (an
//! attachment of its packet) is kept in it as `{"_binary":"BASE64"}`, which `/ws` clients and
//! the server API see as it is, and which Socket.IO clients receive as binary again (the
//! event becomes a BINARY_EVENT and the value one of its attachments). An object is taken for
//! binary only when `_binary` is its one member and a valid base64 string.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::json;

/// What a binary value's object holds, found by one substring search (most data has none).
const MARK: &[u8] = b"\"_binary\"";

/// Nesting looked into: deeper values are copied as they are.
const MAX_DEPTH: usize = 32;

/// `raw` (a packet's JSON, valid) with each placeholder `{"_placeholder":true,"num":N}`
/// replaced by attachment `N` as `{"_binary":"BASE64"}`; `None` when a placeholder names no
/// attachment.
pub fn embed(raw: &[u8], attachments: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut out =
        Vec::with_capacity(raw.len() + attachments.iter().map(|a| a.len() * 2).sum::<usize>());
    let mut bad = false;
    rewrite(raw, 0, &mut out, &mut |object| {
        let members = json::object_members(object)?;
        let [(k1, v1), (k2, v2)] = members.as_slice() else {
            return None;
        };
        let (placeholder, num) = if json::key_is(&object[k1.clone()], "_placeholder") {
            (
                &object[v1.clone()],
                (&object[k2.clone()], &object[v2.clone()]),
            )
        } else {
            (
                &object[v2.clone()],
                (&object[k1.clone()], &object[v1.clone()]),
            )
        };
        if placeholder != b"true" || !json::key_is(num.0, "num") {
            return None;
        }
        let found = std::str::from_utf8(num.1)
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| attachments.get(n));
        let Some(bytes) = found else {
            bad = true;
            return None;
        };
        let mut value = br#"{"_binary":""#.to_vec();
        value.extend_from_slice(STANDARD.encode(bytes).as_bytes());
        value.extend_from_slice(b"\"}");
        Some(value)
    });
    (!bad).then_some(out)
}

/// `data` (valid JSON) with each `{"_binary":"BASE64"}` replaced by a placeholder, and the
/// decoded values in order; `None` when it holds none.
pub fn extract(data: &[u8]) -> Option<(Vec<u8>, Vec<Vec<u8>>)> {
    if !data.windows(MARK.len()).any(|w| w == MARK) {
        return None;
    }
    let mut attachments = Vec::new();
    let mut out = Vec::with_capacity(data.len());
    rewrite(data, 0, &mut out, &mut |object| {
        let members = json::object_members(object)?;
        let [(key, value)] = members.as_slice() else {
            return None;
        };
        if !json::key_is(&object[key.clone()], "_binary") {
            return None;
        }
        let text = json::string(&object[value.clone()])?;
        let bytes = STANDARD.decode(text).ok()?;
        let mut placeholder = br#"{"_placeholder":true,"num":"#.to_vec();
        json::push_u64(&mut placeholder, attachments.len() as u64);
        placeholder.push(b'}');
        attachments.push(bytes);
        Some(placeholder)
    });
    (!attachments.is_empty()).then_some((out, attachments))
}

/// Copy the JSON value `raw` to `out`, objects that `swap` answers for replaced by its
/// answer (the others looked into, down to [`MAX_DEPTH`]).
fn rewrite(
    raw: &[u8],
    depth: usize,
    out: &mut Vec<u8>,
    swap: &mut impl FnMut(&[u8]) -> Option<Vec<u8>>,
) {
    let raw = raw.trim_ascii();
    if depth >= MAX_DEPTH {
        return out.extend_from_slice(raw);
    }
    match raw.first() {
        Some(b'{') => {
            if let Some(replacement) = swap(raw) {
                return out.extend_from_slice(&replacement);
            }
            let Some(members) = json::object_members(raw) else {
                return out.extend_from_slice(raw);
            };
            out.push(b'{');
            for (i, (key, value)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // The key with its quotes.
                out.extend_from_slice(&raw[key.start - 1..key.end + 1]);
                out.push(b':');
                rewrite(&raw[value.clone()], depth + 1, out, swap);
            }
            out.push(b'}');
        }
        Some(b'[') => {
            let Some(items) = json::array_items(raw) else {
                return out.extend_from_slice(raw);
            };
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                rewrite(&raw[item.clone()], depth + 1, out, swap);
            }
            out.push(b']');
        }
        _ => out.extend_from_slice(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachments_become_base64_objects_and_back() {
        let packet = br#"["room:send",{"room":"r","payload":{"img":{"_placeholder":true,"num":0},"n":[1,{"num":1,"_placeholder":true}]}}]"#;
        let attachments = vec![vec![0u8, 1, 2], vec![255u8]];
        let embedded = embed(packet, &attachments).unwrap();
        assert_eq!(
            String::from_utf8(embedded.clone()).unwrap(),
            r#"["room:send",{"room":"r","payload":{"img":{"_binary":"AAEC"},"n":[1,{"_binary":"/w=="}]}}]"#
        );
        let (text, back) = extract(&embedded).unwrap();
        assert_eq!(back, attachments);
        assert_eq!(
            String::from_utf8(text).unwrap(),
            r#"["room:send",{"room":"r","payload":{"img":{"_placeholder":true,"num":0},"n":[1,{"_placeholder":true,"num":1}]}}]"#
        );
    }

    #[test]
    fn only_exact_binary_objects_are_binary() {
        assert_eq!(extract(br#"{"a":1}"#), None);
        // Another member beside it, or not base64, or not a string: plain JSON.
        assert_eq!(extract(br#"{"_binary":"AA==","x":1}"#), None);
        assert_eq!(extract(br#"{"_binary":"not base64!"}"#), None);
        assert_eq!(extract(br#"{"_binary":3}"#), None);
        assert_eq!(extract(br#""\"_binary\"""#), None);
        // A placeholder naming no attachment.
        assert_eq!(
            embed(br#"[{"_placeholder":true,"num":2}]"#, &[vec![1]]),
            None
        );
        // Deep nesting is copied, not recursed into without end.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(embed(deep.as_bytes(), &[]).unwrap(), deep.as_bytes());
    }
}
