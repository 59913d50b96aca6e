//! HPACK (RFC 7541) decoding for one direction of one HTTP/2 connection.
//!
//! Written for an observer that may join late or lose a header block: the dynamic table is
//! kept as the entries known for certain (the newest ones) plus a flag saying older, unknown
//! entries may follow. A reference into the unknown part yields [`Field::Unknown`], never a
//! guessed value. Known entries are exact; once they alone overflow the table, every unknown
//! entry must have been evicted and the table is fully known again.
use std::{borrow::Cow, collections::VecDeque};

mod huffman {
    //! RFC 7541 Appendix B's canonical Huffman code, decoded strictly (§5.2). The code is
    //! canonical, so the codes of one length are consecutive and a symbol is found from the
    //! first code and count of each length; the tables are built once. (A decoder that built
    //! hash tables per string was most of the agent's CPU under HTTP/2 load.) Codes of up to 8
    //! bits, the common characters, are found in one step by their first byte: decoded bit by
    //! bit, Huffman strings were 7% of an HTTP/2 replay's instructions.
    use std::sync::OnceLock;

    const EOS: u16 = 256;
    const MAX_LEN: usize = 30;

    struct Canonical {
        /// Per code length: first code, how many codes, and where they start in `symbols`.
        first: [u32; MAX_LEN + 1],
        count: [u32; MAX_LEN + 1],
        start: [u16; MAX_LEN + 1],
        /// Symbols ordered by (length, code).
        symbols: Vec<u16>,
        /// By the next 8 bits: the symbol whose code of up to 8 bits begins them, and that
        /// code's length (0: the code is longer).
        short: [(u8, u8); 256],
    }

    fn table() -> &'static Canonical {
        static TABLE: OnceLock<Canonical> = OnceLock::new();
        TABLE.get_or_init(|| {
            let codes = &httlib_huffman::encoder::table::ENCODE_TABLE;
            let mut order: Vec<u16> = (0..codes.len() as u16).collect();
            order.sort_by_key(|&s| codes[s as usize]);
            let mut t = Canonical {
                first: [0; MAX_LEN + 1],
                count: [0; MAX_LEN + 1],
                start: [0; MAX_LEN + 1],
                symbols: order.clone(),
                short: [(0, 0); 256],
            };
            for (i, &s) in order.iter().enumerate() {
                let (len, code) = codes[s as usize];
                let len = len as usize;
                if t.count[len] == 0 {
                    t.first[len] = code;
                    t.start[len] = i as u16;
                }
                t.count[len] += 1;
                if len <= 8 {
                    // Every byte this code begins.
                    let first = (code << (8 - len)) as usize;
                    for entry in &mut t.short[first..first + (1 << (8 - len))] {
                        *entry = (s as u8, len as u8);
                    }
                }
            }
            t
        })
    }

    /// Decodes `raw` into `out` (cleared first); false for an invalid string: a code no
    /// symbol has, EOS inside the string, or padding that is longer than 7 bits or not all
    /// ones.
    pub fn decode_into(raw: &[u8], out: &mut Vec<u8>) -> bool {
        let t = table();
        out.clear();
        out.reserve(raw.len() * 8 / 5);
        // Unread bits, most significant first, and how many.
        let (mut bits, mut held) = (0u64, 0u32);
        let mut input = raw.iter();
        loop {
            while held <= 56 {
                let Some(&byte) = input.next() else { break };
                bits |= u64::from(byte) << (56 - held);
                held += 8;
            }
            let Some((symbol, len)) = next_symbol(t, bits, held) else {
                // What is left must be padding: EOS's first bits (all ones), under a byte.
                return held <= 7 && (held == 0 || bits >> (64 - held) == (1 << held) - 1);
            };
            if symbol == EOS {
                return false;
            }
            out.push(symbol as u8);
            bits <<= len;
            held -= len;
        }
    }

    /// The symbol the `held` bits at the top of `bits` begin with and its code's length, if
    /// they hold a whole code.
    fn next_symbol(t: &Canonical, bits: u64, held: u32) -> Option<(u16, u32)> {
        let (symbol, len) = t.short[(bits >> 56) as usize];
        if len > 0 {
            return (u32::from(len) <= held).then_some((u16::from(symbol), u32::from(len)));
        }
        (9..=MAX_LEN.min(held as usize)).find_map(|len| {
            let code = (bits >> (64 - len)) as u32;
            let offset = code.wrapping_sub(t.first[len]);
            (t.count[len] > 0 && code >= t.first[len] && offset < t.count[len]).then(|| {
                (
                    t.symbols[t.start[len] as usize + offset as usize],
                    len as u32,
                )
            })
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Strings of every length and symbol decode to what the reference encoder encoded.
        #[test]
        fn encoded_strings_round_trip() {
            let mut text: Vec<u8> = (0..=255).collect();
            text.extend(b"GET /api/v1/items?id=42 HTTP/2 user-agent: h2load nghttp2/1.52.0");
            let (mut encoded, mut out) = (Vec::new(), Vec::new());
            for start in 0..text.len() {
                for len in [1, 2, 7, 8, 9, 31, 64] {
                    let Some(s) = text.get(start..start + len) else {
                        continue;
                    };
                    encoded.clear();
                    httlib_huffman::encode(s, &mut encoded).expect("encodes");
                    assert!(decode_into(&encoded, &mut out), "{s:?}");
                    assert_eq!(out, s);
                }
            }
        }

        /// Every symbol's code decodes back to it (which also proves the code canonical).
        #[test]
        fn every_code_decodes_to_its_symbol() {
            let codes = &httlib_huffman::encoder::table::ENCODE_TABLE;
            for (symbol, &(len, code)) in codes.iter().enumerate().take(256) {
                // Left-align the code, pad with ones to whole bytes.
                let len = len as u32;
                let total = len.div_ceil(8) * 8;
                let bits = (u64::from(code) << (total - len)) | ((1u64 << (total - len)) - 1);
                let bytes: Vec<u8> = (0..total / 8)
                    .rev()
                    .map(|i| (bits >> (i * 8)) as u8)
                    .collect();
                let mut out = vec![0xff; 3];
                assert!(decode_into(&bytes, &mut out), "symbol {symbol}");
                assert_eq!(out, [symbol as u8], "symbol {symbol}");
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer overflows")]
    Integer,
    #[error("index {0} is outside the tables")]
    Index(usize),
    #[error("invalid Huffman string")]
    Huffman,
    #[error("dynamic table size {0} exceeds the limit {1}")]
    TableSize(usize, usize),
}

/// One decoded header field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field {
    Known(String, String),
    /// Refers to a dynamic-table entry from before we joined (or after a lost block).
    Unknown,
}

const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Largest decoding buffer a connection keeps between header blocks.
const SCRATCH_KEPT: usize = 4096;

/// Per-entry overhead the RFC adds to name and value lengths.
const ENTRY_OVERHEAD: usize = 32;

pub struct Decoder {
    /// Newest first.
    known: VecDeque<(String, String)>,
    known_size: usize,
    /// Entries we never saw may sit after the known ones.
    unknown_tail: bool,
    max_size: usize,
    /// Upper bound announced by SETTINGS_HEADER_TABLE_SIZE (4096 by default).
    limit: usize,
    /// Where Huffman-coded names and values are decoded: a field the table does not keep is
    /// handed on from here without an allocation of its own.
    scratch: [Vec<u8>; 2],
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder that saw the connection from its first byte.
    pub fn new() -> Self {
        Self {
            known: VecDeque::new(),
            known_size: 0,
            unknown_tail: false,
            max_size: 4096,
            limit: 4096,
            scratch: Default::default(),
        }
    }

    /// A decoder for a connection joined mid-way: its table holds entries we never saw.
    pub fn joined_late() -> Self {
        Self {
            unknown_tail: true,
            ..Self::new()
        }
    }

    /// A header block was not seen (or not fully): its insertions are unknown.
    pub fn lost_block(&mut self) {
        self.known.clear();
        self.known_size = 0;
        self.unknown_tail = true;
    }

    /// Whether every dynamic-table reference can currently be resolved.
    pub fn exact(&self) -> bool {
        !self.unknown_tail
    }

    /// SETTINGS_HEADER_TABLE_SIZE from the peer that decodes this direction.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    fn evict(&mut self) {
        while self.known_size > self.max_size {
            match self.known.pop_back() {
                Some((n, v)) => {
                    self.known_size -= n.len() + v.len() + ENTRY_OVERHEAD;
                    // The known entries alone overflowed: anything older is gone too.
                    self.unknown_tail = false;
                }
                None => break,
            }
        }
    }

    fn insert(&mut self, name: String, value: String) {
        self.known_size += name.len() + value.len() + ENTRY_OVERHEAD;
        self.known.push_front((name, value));
        self.evict();
    }

    fn lookup(&self, index: usize) -> Result<Option<(&str, &str)>, HpackError> {
        match index {
            0 => Err(HpackError::Index(0)),
            1..=61 => Ok(Some(STATIC[index - 1])),
            _ => match self.known.get(index - 62) {
                Some((n, v)) => Ok(Some((n, v))),
                None if self.unknown_tail => Ok(None),
                None => Err(HpackError::Index(index)),
            },
        }
    }

    /// Decodes one complete header block into owned fields.
    pub fn decode(&mut self, block: &[u8], out: &mut Vec<Field>) -> Result<(), HpackError> {
        self.decode_with(block, |f| {
            out.push(match f {
                Some((n, v)) => Field::Known(n.to_string(), v.to_string()),
                None => Field::Unknown,
            })
        })
    }

    /// Decodes one complete header block, handing each field to `field` as it is read (`None`
    /// for [`Field::Unknown`]): the caller copies only the fields it keeps.
    pub fn decode_with(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(Option<(&str, &str)>),
    ) -> Result<(), HpackError> {
        let [mut names, mut values] = std::mem::take(&mut self.scratch);
        let decoded = self.decode_fields(block, [&mut names, &mut values], &mut field);
        // A huge literal leaves no buffer of its size behind on every connection.
        for buf in [&mut names, &mut values] {
            if buf.capacity() > SCRATCH_KEPT {
                *buf = Vec::new();
            }
        }
        self.scratch = [names, values];
        decoded
    }

    fn decode_fields(
        &mut self,
        block: &[u8],
        [names, values]: [&mut Vec<u8>; 2],
        field: &mut impl FnMut(Option<(&str, &str)>),
    ) -> Result<(), HpackError> {
        let mut r = Reader { buf: block, pos: 0 };
        while let Some(&b) = r.buf.get(r.pos) {
            if b & 0x80 != 0 {
                let index = r.integer(7)?;
                field(self.lookup(index)?);
            } else if b & 0xe0 == 0x20 {
                let size = r.integer(5)?;
                if size > self.limit {
                    return Err(HpackError::TableSize(size, self.limit));
                }
                self.max_size = size;
                if size == 0 {
                    self.unknown_tail = false;
                }
                self.evict();
            } else {
                let (prefix, indexing) = if b & 0xc0 == 0x40 {
                    (6, true)
                } else {
                    (4, false)
                };
                let name_index = r.integer(prefix)?;
                if name_index == 0 {
                    let (name, value) = (r.string(names)?, r.string(values)?);
                    field(Some((&name, &value)));
                    if indexing {
                        self.insert(name.into_owned(), value.into_owned());
                    }
                    continue;
                }
                let value = r.string(values)?;
                match self.lookup(name_index)? {
                    Some((name, _)) => {
                        field(Some((name, &value)));
                        if indexing {
                            let name = name.to_string();
                            self.insert(name, value.into_owned());
                        }
                    }
                    None => {
                        // Its name is an entry we never saw; the table still grows by one.
                        if indexing {
                            self.lost_block();
                        }
                        field(None);
                    }
                }
            }
        }
        Ok(())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, HpackError> {
        let b = *self.buf.get(self.pos).ok_or(HpackError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    /// RFC 7541 §5.1 integer with an N-bit prefix.
    fn integer(&mut self, prefix: u8) -> Result<usize, HpackError> {
        let max = (1usize << prefix) - 1;
        let mut value = (self.byte()? as usize) & max;
        if value < max {
            return Ok(value);
        }
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            if shift > 28 {
                return Err(HpackError::Integer);
            }
            value = value
                .checked_add(((b & 0x7f) as usize) << shift)
                .ok_or(HpackError::Integer)?;
            shift += 7;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
    }

    /// A string literal (§5.2), read in place or, Huffman-coded, decoded into `scratch`.
    fn string<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Result<Cow<'s, str>, HpackError>
    where
        'a: 's,
    {
        let huffman = self.buf.get(self.pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = self.integer(7)?;
        let end = self.pos.checked_add(len).ok_or(HpackError::Truncated)?;
        let raw = self.buf.get(self.pos..end).ok_or(HpackError::Truncated)?;
        self.pos = end;
        if !huffman {
            return Ok(String::from_utf8_lossy(raw));
        }
        if !huffman::decode_into(raw, scratch) {
            return Err(HpackError::Huffman);
        }
        Ok(String::from_utf8_lossy(scratch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(fields: &[Field]) -> Vec<(&str, &str)> {
        fields
            .iter()
            .map(|f| match f {
                Field::Known(n, v) => (n.as_str(), v.as_str()),
                Field::Unknown => ("?", "?"),
            })
            .collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 7541 Appendix C.4: three requests with Huffman coding sharing a dynamic table.
    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"), &mut out)
            .unwrap();
        assert_eq!(
            known(&out),
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ]
        );
        out.clear();
        d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf"), &mut out)
            .unwrap();
        assert_eq!(
            known(&out),
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ]
        );
        out.clear();
        d.decode(
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            known(&out),
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ]
        );
        assert!(d.exact());
    }

    /// RFC 7541 Appendix C.5: responses that evict entries from a 256-byte table.
    #[test]
    fn rfc_7541_c5_eviction() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        // Table size update to 256 first (the RFC example assumes a 256-byte table).
        let mut first = vec![0x3f, 0xe1, 0x01];
        first.extend(hex(
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        ));
        d.decode(&first, &mut out).unwrap();
        assert_eq!(out[0], Field::Known(":status".into(), "302".into()));
        out.clear();
        d.decode(&hex("4803 3330 37c1 c0bf"), &mut out).unwrap();
        assert_eq!(
            known(&out),
            [
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com")
            ]
        );
    }

    #[test]
    fn late_join_never_guesses() {
        let mut d = Decoder::joined_late();
        let mut out = Vec::new();
        // Indexed 62 (dynamic, unknown), then a static entry, then a literal with indexing.
        d.decode(&[0xbe, 0x82, 0x40, 0x01, b'x', 0x01, b'y'], &mut out)
            .unwrap();
        assert_eq!(
            out,
            [
                Field::Unknown,
                Field::Known(":method".into(), "GET".into()),
                Field::Known("x".into(), "y".into())
            ]
        );
        out.clear();
        // The entry inserted after joining is exact at index 62; 63 is still unknown.
        d.decode(&[0xbe, 0xbf], &mut out).unwrap();
        assert_eq!(out, [Field::Known("x".into(), "y".into()), Field::Unknown]);
        assert!(!d.exact());
        // A size update to zero empties the table: exact from here on.
        d.decode(&[0x20], &mut out).unwrap();
        assert!(d.exact());
    }

    /// RFC 7541 §5.2: padding is the most significant bits of EOS (all ones), shorter than a
    /// byte, and EOS itself never appears in a string.
    #[test]
    fn huffman_strings_follow_section_5_2() {
        let value = |huff: &[u8]| {
            // Literal without indexing, new name "x", Huffman-coded value.
            let mut block = vec![0x00, 0x01, b'x', 0x80 | huff.len() as u8];
            block.extend_from_slice(huff);
            let mut out = Vec::new();
            Decoder::new().decode(&block, &mut out).map(|()| out)
        };
        // 'a' is 00011: padded with ones it is valid, with zeros it is not.
        assert_eq!(
            value(&[0b0001_1111]).unwrap(),
            [Field::Known("x".into(), "a".into())]
        );
        assert!(value(&[0b0001_1000]).is_err(), "padding must be ones");
        assert!(
            value(&[0b0001_1111, 0xff]).is_err(),
            "padding longer than 7 bits"
        );
        assert!(
            value(&[0xff, 0xff, 0xff, 0xfc]).is_err(),
            "EOS inside the string"
        );
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            &[0x80],                                     // index 0
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], // integer overflow
            &[0x40, 0x05, b'a'],                         // truncated name
            &[0x40, 0x81, 0xff],                         // bad Huffman (EOS padding)
            &[0xbe],                                     // dynamic index on an empty, exact table
            &[0x3f, 0xff, 0x7f],                         // table size above the limit
        ];
        for c in cases {
            let mut d = Decoder::new();
            assert!(d.decode(c, &mut Vec::new()).is_err(), "{c:?}");
        }
    }
}
