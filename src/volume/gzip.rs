//! Parallel multi-member gzip for `.nii.gz`.
//!
//! Writing: the payload is cut into 1 MiB chunks, each deflated on its own
//! (rayon) into a complete gzip *member*; RFC 1952 §2.2 says a gzip file is a
//! series of members, so nibabel (Python's `gzip`), ITK and zlib's `gunzip`
//! read the concatenation as one stream. Each member carries an `FEXTRA`
//! subfield `TD` holding the member's compressed length (the idea of htslib's
//! BGZF `BC` field), so our reader can find the members without inflating and
//! decompress them in parallel too. Files from other writers (one member)
//! fall back to a single streaming inflate.
//!
//! The compression level defaults to 1, nibabel's `Opener.default_compresslevel`.

use std::io::Read;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use rayon::prelude::*;

/// Uncompressed bytes per member.
const CHUNK: usize = 1 << 20;
/// Our extra subfield id (SI1, SI2).
const SUBFIELD: [u8; 2] = *b"TD";
/// Bytes in our member header: 10 fixed + XLEN 2 + subfield (4 + 4).
const HEADER_LEN: usize = 20;

/// A gzip stream that could not be decoded; the caller adds the file name.
#[derive(Debug, thiserror::Error)]
pub enum GzipError {
    /// The stream ended before its members were complete.
    #[error("gzip stream is truncated ({0})")]
    Truncated(String),
    /// Bad magic, bad CRC, bad deflate data.
    #[error("gzip stream is corrupt ({0})")]
    Corrupt(String),
}

/// True when `bytes` start with the gzip magic.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b
}

/// Compresses `data` into parallel gzip members at `level` (0–9).
pub fn compress(data: &[u8], level: u32) -> Vec<u8> {
    compress_parts(&[data], level)
}

/// Compresses the concatenation of `parts` without copying them together;
/// each part starts a new member (the NIfTI header gets its own, so a reader
/// can inflate the voxels straight into their typed buffer).
pub fn compress_parts(parts: &[&[u8]], level: u32) -> Vec<u8> {
    let chunks: Vec<&[u8]> = parts.iter().flat_map(|p| p.chunks(CHUNK)).collect();
    if chunks.is_empty() {
        return member(&[], level);
    }
    let members: Vec<Vec<u8>> = chunks.par_iter().map(|c| member(c, level)).collect();
    let mut out = Vec::with_capacity(members.iter().map(Vec::len).sum());
    for m in &members {
        out.extend_from_slice(m);
    }
    out
}

/// One complete gzip member with our `TD` length subfield.
fn member(chunk: &[u8], level: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + chunk.len() / 2 + 64);
    // ID1 ID2 CM=deflate FLG=FEXTRA MTIME=0 XFL=0 OS=255 (unknown).
    out.extend_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255]);
    out.extend_from_slice(&8u16.to_le_bytes()); // XLEN
    out.extend_from_slice(&SUBFIELD);
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // member length, patched below
    let mut c = Compress::new(Compression::new(level), false);
    out.reserve(chunk.len() + chunk.len() / 1000 + 64);
    loop {
        let consumed = c.total_in() as usize;
        let st = c
            .compress_vec(&chunk[consumed..], &mut out, FlushCompress::Finish)
            .expect("deflate of an in-memory buffer cannot fail");
        if st == Status::StreamEnd {
            break;
        }
        out.reserve(out.capacity().max(4096));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(chunk);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
    let n = out.len() as u32;
    out[16..20].copy_from_slice(&n.to_le_bytes());
    out
}

/// Our member length, if `m` starts with one of our members.
fn td_length(m: &[u8]) -> Option<usize> {
    if m.len() < HEADER_LEN || !is_gzip(m) || m[3] != 4 || m[10..12] != 8u16.to_le_bytes() {
        return None;
    }
    if m[12..14] != SUBFIELD || m[14..16] != 4u16.to_le_bytes() {
        return None;
    }
    Some(u32::from_le_bytes([m[16], m[17], m[18], m[19]]) as usize)
}

/// Decompresses a whole gzip file (one or many members).
///
/// `size_hint` is the expected uncompressed size when known.
pub fn decompress(bytes: &[u8], size_hint: Option<usize>) -> Result<Vec<u8>, GzipError> {
    if !is_gzip(bytes) {
        return Err(GzipError::Corrupt("no gzip magic".into()));
    }
    if let Some(members) = our_members(bytes) {
        let mut out = vec![0u8; members.iter().map(|m| m.size).sum()];
        inflate_members(bytes, &members, &mut out)?;
        return Ok(out);
    }
    let hint = size_hint.unwrap_or_else(|| {
        // ISIZE of the last member: right for single-member files < 4 GiB.
        let t = &bytes[bytes.len().saturating_sub(4)..];
        if t.len() == 4 {
            u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize
        } else {
            0
        }
    });
    let mut out = Vec::with_capacity(hint.min(1 << 34));
    let mut d = flate2::read::MultiGzDecoder::new(bytes);
    d.read_to_end(&mut out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            GzipError::Truncated(e.to_string())
        } else {
            GzipError::Corrupt(e.to_string())
        }
    })?;
    Ok(out)
}

/// One of our gzip members: byte span in the file and uncompressed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// First byte of the member.
    pub start: usize,
    /// One past its last byte.
    pub end: usize,
    /// Uncompressed bytes (its ISIZE).
    pub size: usize,
}

/// The members when every member is one of ours (else None: foreign or
/// truncated files take the streaming path, which reports the damage).
pub fn our_members(bytes: &[u8]) -> Option<Vec<Member>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = td_length(&bytes[at..])?;
        if len < HEADER_LEN + 8 || at + len > bytes.len() {
            return None;
        }
        let e = at + len;
        let size = u32::from_le_bytes([bytes[e - 4], bytes[e - 3], bytes[e - 2], bytes[e - 1]]);
        out.push(Member {
            start: at,
            end: e,
            size: size as usize,
        });
        at = e;
    }
    Some(out)
}

/// Inflates `members` of `bytes` in parallel into `dst`, whose length must
/// be the sum of their sizes; checks every CRC.
pub fn inflate_members(bytes: &[u8], members: &[Member], dst: &mut [u8]) -> Result<(), GzipError> {
    let total: usize = members.iter().map(|m| m.size).sum();
    if total != dst.len() {
        return Err(GzipError::Corrupt(format!(
            "members hold {total} bytes, expected {}",
            dst.len()
        )));
    }
    let mut slices = Vec::with_capacity(members.len());
    let mut rest = dst;
    for m in members {
        let (a, b) = rest.split_at_mut(m.size);
        slices.push(a);
        rest = b;
    }
    slices
        .into_par_iter()
        .zip(members.par_iter())
        .enumerate()
        .try_for_each(|(i, (dst, mb))| {
            let m = &bytes[mb.start..mb.end];
            let body = &m[HEADER_LEN..m.len() - 8];
            let mut d = Decompress::new(false);
            let st = d
                .decompress(body, dst, FlushDecompress::Finish)
                .map_err(|err| GzipError::Corrupt(format!("member {i}: {err}")))?;
            if st != Status::StreamEnd || d.total_out() as usize != dst.len() {
                return Err(GzipError::Corrupt(format!("member {i}: length mismatch")));
            }
            let n = m.len();
            let want = u32::from_le_bytes([m[n - 8], m[n - 7], m[n - 6], m[n - 5]]);
            let mut crc = crc32fast::Hasher::new();
            crc.update(dst);
            if crc.finalize() != want {
                return Err(GzipError::Corrupt(format!("member {i}: CRC mismatch")));
            }
            Ok(())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_both_paths() {
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| ((i * 7) % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        let z = compress(&data, 1);
        assert!(our_members(&z).unwrap().len() == 3);
        assert_eq!(decompress(&z, None).unwrap(), data);
        // The streaming path (what a foreign reader does) sees the same bytes.
        let mut s = Vec::new();
        flate2::read::MultiGzDecoder::new(&z[..])
            .read_to_end(&mut s)
            .unwrap();
        assert_eq!(s, data);
    }

    #[test]
    fn detects_corruption_and_truncation() {
        let data = vec![5u8; 100_000];
        let mut z = compress(&data, 1);
        let n = z.len();
        z[n - 6] ^= 0xff; // CRC byte
        assert!(matches!(decompress(&z, None), Err(GzipError::Corrupt(_))));
        let z = compress(&data, 1);
        assert!(decompress(&z[..z.len() - 10], None).is_err());
    }
}
