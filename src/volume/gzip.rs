//! Parallel multi-member gzip for `.nii.gz`.
//!
//! Writing: the payload is cut into 1 MiB chunks, each deflated on its own
//! (rayon) into a complete gzip *member*; RFC 1952 §2.2 says a gzip file is a
//! series of members, so nibabel (Python's `gzip`), ITK and zlib's `gunzip`
//! read the concatenation as one stream. Each member carries an `FEXTRA`
//! subfield `TD` holding the member's compressed length (the idea of htslib's
//! BGZF `BC` field), so our reader can find the members without inflating and
//! decompress them in parallel too. Files from other writers (one member)
//! are inflated in one call straight into a buffer of their ISIZE; anything
//! else (several foreign members, ≥ 4 GiB, damage) takes a streaming inflate,
//! which also names the damage.
//!
//! Deflate and inflate are libdeflate's whole-buffer codecs: on this data
//! (noisy int16 CT) its inflate is ~1.6× zlib-rs's, and its level 1 gives
//! zlib level 1's size (what nibabel writes), where zlib-rs's level 1 is a
//! quick static-Huffman mode ~50% larger. The compression level defaults to
//! 1, nibabel's `Opener.default_compresslevel`.

use std::io::Read;

use libdeflater::{CompressionLvl, Compressor, DecompressionError, Decompressor};
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

/// Compresses `data` into parallel gzip members at `level` (0–12, as libdeflate).
pub fn compress(data: &[u8], level: u32) -> Vec<u8> {
    compress_parts(&[data], level).concat()
}

/// Compresses the concatenation of `parts` without copying them together
/// into gzip members, in file order (write them one after another); each
/// part starts a new member (the NIfTI header gets its own, so a reader can
/// inflate the voxels straight into their typed buffer).
pub fn compress_parts(parts: &[&[u8]], level: u32) -> Vec<Vec<u8>> {
    let lvl = CompressionLvl::new(level.min(12) as i32).expect("0..=12 is a valid level");
    let chunks: Vec<&[u8]> = parts.iter().flat_map(|p| p.chunks(CHUNK)).collect();
    if chunks.is_empty() {
        return vec![member(&mut Compressor::new(lvl), &[])];
    }
    chunks
        .par_iter()
        .map_init(|| Compressor::new(lvl), |c, chunk| member(c, chunk))
        .collect()
}

/// One complete gzip member with our `TD` length subfield.
fn member(c: &mut Compressor, chunk: &[u8]) -> Vec<u8> {
    let bound = c.deflate_compress_bound(chunk.len());
    let mut out = vec![0u8; HEADER_LEN + bound + 8];
    // ID1 ID2 CM=deflate FLG=FEXTRA MTIME=0 XFL=0 OS=255 (unknown).
    out[..10].copy_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255]);
    out[10..12].copy_from_slice(&8u16.to_le_bytes()); // XLEN
    out[12..14].copy_from_slice(&SUBFIELD);
    out[14..16].copy_from_slice(&4u16.to_le_bytes());
    let n = c
        .deflate_compress(chunk, &mut out[HEADER_LEN..HEADER_LEN + bound])
        .expect("the compress bound always suffices");
    out.truncate(HEADER_LEN + n);
    let mut crc = crc32fast::Hasher::new();
    crc.update(chunk);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
    let len = out.len() as u32;
    out[16..20].copy_from_slice(&len.to_le_bytes());
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
    if let Some(out) = inflate_single(bytes) {
        return Ok(out);
    }
    let mut out = Vec::with_capacity(size_hint.unwrap_or(0).min(1 << 34));
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

/// A file that is exactly one good gzip member (what nibabel, ITK and gzip
/// write), inflated in one call into a buffer of its ISIZE; None otherwise.
fn inflate_single(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; single_member_size(bytes)?];
    inflate_single_into(bytes, &mut out).then_some(out)
}

/// The ISIZE at the end of a gzip file: its size if it is one member < 4 GiB.
pub fn single_member_size(bytes: &[u8]) -> Option<usize> {
    let t = bytes.get(bytes.len().checked_sub(4)?..)?;
    Some(u32::from_le_bytes(t.try_into().ok()?) as usize)
}

/// Inflates a file that is exactly one good gzip member holding exactly
/// `dst.len()` bytes into `dst`; false (dst unspecified) for anything else.
pub fn inflate_single_into(bytes: &[u8], dst: &mut [u8]) -> bool {
    let (mut used_in, mut used_out) = (0usize, 0usize);
    // SAFETY: the decompressor is live for the call and freed once; in/out
    // pointers and lengths come from live slices.
    let ok = unsafe {
        let d = libdeflate_sys::libdeflate_alloc_decompressor();
        if d.is_null() {
            return false;
        }
        let r = libdeflate_sys::libdeflate_gzip_decompress_ex(
            d,
            bytes.as_ptr().cast(),
            bytes.len(),
            dst.as_mut_ptr().cast(),
            dst.len(),
            &mut used_in,
            &mut used_out,
        );
        libdeflate_sys::libdeflate_free_decompressor(d);
        r == libdeflate_sys::libdeflate_result_LIBDEFLATE_SUCCESS
    };
    // libdeflate checked CRC and ISIZE; a second member (or a file ≥ 4 GiB,
    // whose ISIZE wraps) shows as input left over or output short.
    ok && used_in == bytes.len() && used_out == dst.len()
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
        .try_for_each_init(Decompressor::new, |d, (i, (dst, mb))| {
            let m = &bytes[mb.start..mb.end];
            let body = &m[HEADER_LEN..m.len() - 8];
            let n = d.deflate_decompress(body, dst).map_err(|err| {
                GzipError::Corrupt(match err {
                    DecompressionError::BadData => format!("member {i}: bad deflate data"),
                    DecompressionError::InsufficientSpace => {
                        format!("member {i}: longer than its ISIZE")
                    }
                })
            })?;
            if n != dst.len() {
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

    /// A gzip member as zlib writes it (what nibabel's files are).
    fn foreign(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn foreign_files_one_member_or_several() {
        let data: Vec<u8> = (0..500_000u32)
            .map(|i| (i % 97) as u8 ^ (i >> 11) as u8)
            .collect();
        let one = foreign(&data);
        assert!(our_members(&one).is_none());
        assert!(inflate_single(&one).is_some());
        assert_eq!(decompress(&one, None).unwrap(), data);
        // Two identical members: the first alone has the tail's CRC and
        // ISIZE, so only "all input used" tells it is not the whole file.
        let two = [one.clone(), one.clone()].concat();
        assert!(inflate_single(&two).is_none());
        assert_eq!(
            decompress(&two, None).unwrap(),
            [&data[..], &data[..]].concat()
        );
        assert!(matches!(
            decompress(&one[..one.len() / 2], None),
            Err(GzipError::Truncated(_))
        ));
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
