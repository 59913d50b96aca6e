//! Recorded kernel events: `kspan --record FILE` writes the raw ring-buffer records, and
//! `--replay FILE` feeds them through the same pipeline (tests and benchmarks use this).
//! Format: the magic line, then records as a little-endian u32 length followed by the bytes.
use std::io::{self, BufRead, Write};

/// Version 2: connections are identified by their socket, not by (process, fd).
pub const MAGIC: &[u8] = b"KSPANREC2\n";
/// Larger than any record the kernel can produce; guards against corrupt length fields.
const MAX_RECORD: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "not a kspan recording of this version (bad magic; recordings by an older kspan, which keyed connections by fd, cannot be replayed)"
    )]
    BadMagic,
    #[error("record length {0} exceeds the {MAX_RECORD}-byte limit")]
    TooLong(usize),
    #[error("recording truncated inside a record")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub struct Recorder<W: Write> {
    out: W,
}

impl<W: Write> Recorder<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        Ok(Self { out })
    }

    pub fn record(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(&(bytes.len() as u32).to_le_bytes())?;
        self.out.write_all(bytes)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Iterates over the records of a recording.
pub struct Player<R: BufRead> {
    input: R,
    buf: Vec<u8>,
}

impl<R: BufRead> Player<R> {
    pub fn new(mut input: R) -> Result<Self, ReplayError> {
        let mut magic = [0u8; MAGIC.len()];
        input
            .read_exact(&mut magic)
            .map_err(|_| ReplayError::BadMagic)?;
        if magic != MAGIC {
            return Err(ReplayError::BadMagic);
        }
        Ok(Self {
            input,
            buf: Vec::new(),
        })
    }

    /// The next record, or `None` at a clean end of file.
    pub fn next_record(&mut self) -> Result<Option<&[u8]>, ReplayError> {
        if self.input.fill_buf()?.is_empty() {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.input
            .read_exact(&mut len)
            .map_err(|_| ReplayError::Truncated)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_RECORD {
            return Err(ReplayError::TooLong(len));
        }
        self.buf.resize(len, 0);
        self.input
            .read_exact(&mut self.buf)
            .map_err(|_| ReplayError::Truncated)?;
        Ok(Some(&self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let mut rec = Recorder::new(Vec::new()).unwrap();
        rec.record(b"one").unwrap();
        rec.record(b"").unwrap();
        rec.record(b"three").unwrap();
        let data = rec.out;
        let mut p = Player::new(&data[..]).unwrap();
        assert_eq!(p.next_record().unwrap(), Some(&b"one"[..]));
        assert_eq!(p.next_record().unwrap(), Some(&b""[..]));
        assert_eq!(p.next_record().unwrap(), Some(&b"three"[..]));
        assert_eq!(p.next_record().unwrap(), None);

        let mut p = Player::new(&data[..data.len() - 2]).unwrap();
        p.next_record().unwrap();
        p.next_record().unwrap();
        assert!(matches!(p.next_record(), Err(ReplayError::Truncated)));
        assert!(matches!(
            Player::new(&b"nope"[..]),
            Err(ReplayError::BadMagic)
        ));
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Player::new(&huge[..]).unwrap().next_record(),
            Err(ReplayError::TooLong(_))
        ));
    }
}
