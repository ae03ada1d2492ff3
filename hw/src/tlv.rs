//! BER-TLV as PIV uses it (SP 800-73-4 Part 1, Appendix; ISO/IEC 7816-4 §5.2).
//!
//! Parsing borrows from the input and never allocates, recurses or trusts a
//! length: every length is checked against the bytes actually present before
//! it is used. Tags are at most three bytes and lengths at most three length
//! bytes (values up to 16 MiB), which covers every PIV object; anything longer
//! is an error rather than an attempt.

use std::fmt;

/// One parsed TLV: its tag (up to three bytes, big-endian in a `u32`) and a
/// borrowed value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// The tag, e.g. `0x53`, `0x5FC102`, `0x7F49`.
    pub tag: u32,
    /// The value bytes.
    pub value: &'a [u8],
}

impl fmt::Debug for Tlv<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tlv({:X}, {} bytes)", self.tag, self.value.len())
    }
}

/// Why a TLV did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlvError {
    /// The input ended inside a tag.
    TruncatedTag,
    /// The tag has more than three bytes.
    TagTooLong,
    /// The input ended inside a length.
    TruncatedLength,
    /// Indefinite length (0x80) or more than three length bytes.
    UnsupportedLength,
    /// The length says more bytes than there are.
    ValuePastEnd,
}

impl TlvError {
    /// A short description for error messages.
    pub fn reason(self) -> &'static str {
        match self {
            TlvError::TruncatedTag => "TLV tag truncated",
            TlvError::TagTooLong => "TLV tag longer than three bytes",
            TlvError::TruncatedLength => "TLV length truncated",
            TlvError::UnsupportedLength => "TLV length indefinite or over three bytes",
            TlvError::ValuePastEnd => "TLV length runs past the data",
        }
    }
}

/// Parses one TLV from the front of `input`, returning it and the rest.
pub fn parse_one(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), TlvError> {
    let (&first, mut rest) = input.split_first().ok_or(TlvError::TruncatedTag)?;
    let mut tag = u32::from(first);
    if first & 0x1F == 0x1F {
        // Subsequent tag bytes follow while bit 8 is set (ISO 7816-4 5.2.2.1).
        let mut n = 1;
        loop {
            let (&b, r) = rest.split_first().ok_or(TlvError::TruncatedTag)?;
            rest = r;
            n += 1;
            if n > 3 {
                return Err(TlvError::TagTooLong);
            }
            tag = (tag << 8) | u32::from(b);
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    let (&l0, r) = rest.split_first().ok_or(TlvError::TruncatedLength)?;
    rest = r;
    let len = match l0 {
        0x00..=0x7F => usize::from(l0),
        0x81..=0x83 => {
            let n = usize::from(l0 & 0x7F);
            if rest.len() < n {
                return Err(TlvError::TruncatedLength);
            }
            let (bytes, r) = rest.split_at(n);
            rest = r;
            bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        }
        _ => return Err(TlvError::UnsupportedLength),
    };
    if rest.len() < len {
        return Err(TlvError::ValuePastEnd);
    }
    let (value, rest) = rest.split_at(len);
    Ok((Tlv { tag, value }, rest))
}

/// Iterates over consecutive TLVs in a buffer. Stops after the first error.
pub struct TlvIter<'a> {
    rest: &'a [u8],
    failed: bool,
}

/// Iterates over the TLVs in `input`.
pub fn iter(input: &[u8]) -> TlvIter<'_> {
    TlvIter { rest: input, failed: false }
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = Result<Tlv<'a>, TlvError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        match parse_one(self.rest) {
            Ok((tlv, rest)) => {
                self.rest = rest;
                Some(Ok(tlv))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Finds the first TLV with `tag` at the top level of `input`. Errors in
/// the encoding are reported even when they come after a match would have
/// been found, so a half-valid buffer is not half-trusted.
pub fn find(input: &[u8], tag: u32) -> Result<Option<&[u8]>, TlvError> {
    let mut found = None;
    for tlv in iter(input) {
        let tlv = tlv?;
        if tlv.tag == tag && found.is_none() {
            found = Some(tlv.value);
        }
    }
    Ok(found)
}

/// Parses `input` as exactly one TLV with `tag` and nothing after it.
pub fn expect_single(input: &[u8], tag: u32) -> Result<Option<&[u8]>, TlvError> {
    let (tlv, rest) = parse_one(input)?;
    if tlv.tag != tag || !rest.is_empty() {
        return Ok(None);
    }
    Ok(Some(tlv.value))
}

/// Appends the encoding of `tag` (one to three bytes, as written).
pub fn write_tag(out: &mut Vec<u8>, tag: u32) {
    if tag > 0xFFFF {
        out.push((tag >> 16) as u8);
    }
    if tag > 0xFF {
        out.push((tag >> 8) as u8);
    }
    out.push(tag as u8);
}

/// Appends a BER length in the shortest form.
pub fn write_len(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=0x7F => out.push(len as u8),
        0x80..=0xFF => out.extend_from_slice(&[0x81, len as u8]),
        0x100..=0xFFFF => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
        _ => out.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]),
    }
}

/// Appends one TLV.
pub fn write(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    write_tag(out, tag);
    write_len(out, value.len());
    out.extend_from_slice(value);
}

/// Returns one TLV as a new buffer.
pub fn encode(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    write(&mut out, tag, value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_short_and_long_forms() {
        let (t, rest) = parse_one(&[0x53, 0x02, 1, 2, 0xFF]).unwrap();
        assert_eq!((t.tag, t.value, rest), (0x53, &[1u8, 2][..], &[0xFFu8][..]));
        let mut long = vec![0x5F, 0xC1, 0x02, 0x82, 0x01, 0x00];
        long.extend(std::iter::repeat_n(7, 256));
        let (t, rest) = parse_one(&long).unwrap();
        assert_eq!((t.tag, t.value.len(), rest.len()), (0x5FC102, 256, 0));
        assert_eq!(parse_one(&[0x7F, 0x49, 0x81, 0x01, 9]).unwrap().0.tag, 0x7F49);
    }

    #[test]
    fn rejects_hostile_encodings() {
        assert_eq!(parse_one(&[]), Err(TlvError::TruncatedTag));
        assert_eq!(parse_one(&[0x5F]), Err(TlvError::TruncatedTag));
        assert_eq!(parse_one(&[0x5F, 0xFF, 0xFF, 0x01, 0x00]), Err(TlvError::TagTooLong));
        assert_eq!(parse_one(&[0x53]), Err(TlvError::TruncatedLength));
        assert_eq!(parse_one(&[0x53, 0x82, 0x01]), Err(TlvError::TruncatedLength));
        assert_eq!(parse_one(&[0x53, 0x80, 0, 0]), Err(TlvError::UnsupportedLength));
        assert_eq!(parse_one(&[0x53, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), Err(TlvError::UnsupportedLength));
        assert_eq!(parse_one(&[0x53, 0x05, 1, 2]), Err(TlvError::ValuePastEnd));
        assert_eq!(parse_one(&[0x53, 0x83, 0xFF, 0xFF, 0xFF, 1]), Err(TlvError::ValuePastEnd));
    }

    #[test]
    fn find_reports_errors_after_a_match() {
        assert_eq!(find(&[0x30, 1, 9, 0x34, 5], 0x30), Err(TlvError::ValuePastEnd));
        assert_eq!(find(&[0x30, 1, 9, 0x34], 0x30), Err(TlvError::TruncatedLength));
        assert_eq!(find(&[0x30, 1, 9, 0x34, 0], 0x34), Ok(Some(&[][..])));
        assert_eq!(find(&[0x30, 1, 9], 0x34), Ok(None));
    }

    proptest! {
        #[test]
        fn encode_then_parse_round_trips(
            tag in prop_oneof![0x01u32..0x1F, 0x5F00u32..0x5F7F, Just(0x5FC105u32), Just(0x7F49u32)],
            value in proptest::collection::vec(any::<u8>(), 0..70_000),
        ) {
            let enc = encode(tag, &value);
            let (t, rest) = parse_one(&enc).unwrap();
            prop_assert_eq!(t.tag, tag);
            prop_assert_eq!(t.value, &value[..]);
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn parser_never_panics_and_stays_in_bounds(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut consumed = 0usize;
            for tlv in iter(&input) {
                match tlv {
                    Ok(t) => {
                        consumed += t.value.len();
                        prop_assert!(consumed <= input.len());
                    }
                    Err(_) => break,
                }
            }
        }
    }
}
