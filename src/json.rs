//! Small JSON helpers around simd-json: raw value spans and string escaping.
//!
//! simd-json validates and decodes, but it rewrites its input and keeps no offsets. The protocol
//! promises that `data` reaches subscribers byte for byte as the publisher sent it, so the raw
//! text of top-level values is located here, on input that simd-json has already validated.

use std::ops::Range;

/// Raw byte ranges of the values of a JSON object's top-level members, in document order.
/// `input` must be valid JSON (checked beforehand by simd-json); returns `None` if it is not
/// an object.
pub fn object_members(input: &[u8]) -> Option<Vec<(Range<usize>, Range<usize>)>> {
    let mut members = Vec::new();
    let mut pos = skip_ws(input, 0);
    if input.get(pos) != Some(&b'{') {
        return None;
    }
    pos = skip_ws(input, pos + 1);
    if input.get(pos) == Some(&b'}') {
        return Some(members);
    }
    loop {
        // Key (a string, kept raw without its quotes).
        let key_end = skip_string(input, pos)?;
        let key = pos + 1..key_end - 1;
        pos = skip_ws(input, key_end);
        if input.get(pos) != Some(&b':') {
            return None;
        }
        pos = skip_ws(input, pos + 1);
        let value_end = skip_value(input, pos)?;
        members.push((key, pos..value_end));
        pos = skip_ws(input, value_end);
        match input.get(pos) {
            Some(b',') => pos = skip_ws(input, pos + 1),
            Some(b'}') => return Some(members),
            _ => return None,
        }
    }
}

/// The raw value of the last member named `name` (as simd-json keeps the last duplicate).
pub fn member<'a>(
    input: &'a [u8],
    members: &[(Range<usize>, Range<usize>)],
    name: &str,
) -> Option<&'a [u8]> {
    members
        .iter()
        .rev()
        .find(|(key, _)| &input[key.clone()] == name.as_bytes())
        .map(|(_, value)| &input[value.clone()])
}

fn skip_ws(input: &[u8], mut pos: usize) -> usize {
    while matches!(input.get(pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        pos += 1;
    }
    pos
}

/// End (exclusive) of the string starting at `pos` (which must be a quote).
fn skip_string(input: &[u8], pos: usize) -> Option<usize> {
    if input.get(pos) != Some(&b'"') {
        return None;
    }
    let mut i = pos + 1;
    while i < input.len() {
        match input[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// End (exclusive) of the value starting at `pos`.
fn skip_value(input: &[u8], pos: usize) -> Option<usize> {
    match *input.get(pos)? {
        b'"' => skip_string(input, pos),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = pos;
            while i < input.len() {
                match input[i] {
                    b'"' => {
                        i = skip_string(input, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let mut i = pos;
            while i < input.len()
                && !matches!(input[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                i += 1;
            }
            Some(i)
        }
    }
}

/// Append `s` as a JSON string literal (quotes included).
pub fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Append an unsigned integer.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_raw_member_values() {
        let doc = br#" { "type" : "PUBLISH", "data":{"a":[1,{"b":"}\"]"}],"c" : 2.5e3 } ,"id":7,"x":"\"q\"" } "#;
        let members = object_members(doc).unwrap();
        assert_eq!(member(doc, &members, "type"), Some(&br#""PUBLISH""#[..]));
        assert_eq!(
            member(doc, &members, "data"),
            Some(&br#"{"a":[1,{"b":"}\"]"}],"c" : 2.5e3 }"#[..])
        );
        assert_eq!(member(doc, &members, "id"), Some(&b"7"[..]));
        assert_eq!(member(doc, &members, "x"), Some(&br#""\"q\"""#[..]));
        assert_eq!(member(doc, &members, "missing"), None);
        assert_eq!(object_members(b"{}").unwrap().len(), 0);
        assert!(object_members(b"[1]").is_none());
    }

    #[test]
    fn last_duplicate_wins() {
        let doc = br#"{"a":1,"a":2}"#;
        let members = object_members(doc).unwrap();
        assert_eq!(member(doc, &members, "a"), Some(&b"2"[..]));
    }

    #[test]
    fn escapes_strings() {
        let mut out = Vec::new();
        push_str(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#.as_bytes());
        let mut n = Vec::new();
        push_u64(&mut n, 0);
        push_u64(&mut n, 18446744073709551615);
        assert_eq!(n, b"018446744073709551615".to_vec());
    }
}
