//! Bad layers get a clear error and nothing is written to the output.

use std::io::Write;

use anyhow::Result;
use lazy_erofs_image::convert::{ConvertError, ConvertOptions, convert_layer};

fn convert(input: &[u8]) -> (Result<(), ConvertError>, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = Vec::new();
    let result = convert_layer(input, &mut out, &ConvertOptions::default(), dir.path()).map(drop);
    (result, out)
}

/// A raw ustar header with any name and size (the tar crate's builder refuses bad ones).
fn raw_header(name: &[u8], size: u64, kind: u8) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn file_tar(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        out.extend(raw_header(name, data.len() as u64, b'0'));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend([0u8; 1024]);
    out
}

#[test]
fn dotdot_paths_are_refused() {
    let (result, out) = convert(&file_tar(&[(b"../../etc/passwd", b"x")]));
    assert!(
        matches!(result, Err(ConvertError::PathEscapes(ref p)) if p == "../../etc/passwd"),
        "{result:?}"
    );
    assert!(out.is_empty(), "something was written");
}

#[test]
fn duplicate_entries_are_refused() {
    let (result, out) = convert(&file_tar(&[(b"a/file", b"1"), (b"./a/file", b"2")]));
    assert!(
        matches!(result, Err(ConvertError::Duplicate(ref p)) if p == "./a/file"),
        "{result:?}"
    );
    assert!(out.is_empty());
}

#[test]
fn truncated_tar_is_an_error() {
    let mut tar = file_tar(&[(b"big", &vec![7u8; 100_000])]);
    tar.truncate(50_000);
    let (result, out) = convert(&tar);
    let message = result.expect_err("truncated tar converted").to_string();
    assert!(message.contains("big"), "{message}");
    assert!(out.is_empty());
}

#[test]
fn absurd_header_size_is_an_error() {
    let mut tar = raw_header(b"huge", 1 << 60, b'0');
    tar.extend([0u8; 4096]);
    let (result, out) = convert(&tar);
    let message = result.expect_err("absurd size converted").to_string();
    assert!(message.contains("huge"), "{message}");
    assert!(out.is_empty());
}

#[test]
fn corrupt_gzip_is_an_error() -> Result<()> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&file_tar(&[(b"f", &vec![1u8; 10_000])]))?;
    let mut bytes = gz.finish()?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    bytes[middle + 1] ^= 0xff;
    let (result, out) = convert(&bytes);
    let err = result.expect_err("corrupt gzip converted");
    // What decoding hits first depends on where the damage lands; the message must say
    // the input is corrupt (here: the damaged deflate data spoils a tar header).
    let text = err.to_string();
    assert!(
        [
            "checksum mismatch",
            "corrupt deflate",
            "corrupt gzip",
            "invalid gzip",
            "crc"
        ]
        .iter()
        .any(|m| text.to_lowercase().contains(m)),
        "{text}"
    );
    assert!(out.is_empty());
    Ok(())
}

#[test]
fn hard_link_to_a_missing_target_is_refused() {
    let mut header = tar::Header::new_gnu();
    header.set_path("link").expect("path");
    header.set_link_name("missing/target").expect("link name");
    header.set_entry_type(tar::EntryType::Link);
    header.set_size(0);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend([0u8; 1024]);
    let (result, _) = convert(&tar);
    let message = result
        .expect_err("dangling hard link converted")
        .to_string();
    assert!(
        message.contains("missing/target") && message.contains("not found"),
        "{message}"
    );
}

#[test]
fn zero_byte_and_empty_layers_convert() -> Result<()> {
    for input in [Vec::new(), vec![0u8; 1024]] {
        let (result, out) = convert(&input);
        result?;
        assert!(out.len() >= 8192, "header and metadata expected");
    }
    Ok(())
}

/// A pax record whose value holds a newline cannot be parsed safely with tar 0.4 (its tail
/// could pose as a `path` record): the layer is refused, naming the entry.
#[test]
fn pax_value_with_a_newline_is_refused_not_misread() {
    // The tail "19 path=etc/forged\n" is itself a well-formed record.
    let record = b"SCHILY.xattr.user.x=a\n19 path=etc/forged";
    // Length prefix counts itself, the space, the record and its final newline.
    let len = record.len() + 1 + 3;
    let data = format!("{len} {}\n", String::from_utf8_lossy(record));
    assert_eq!(data.len(), len);
    let mut tar = raw_header(b"PaxHeader/f", data.len() as u64, b'x');
    tar.extend_from_slice(data.as_bytes());
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.extend(raw_header(b"f", 1, b'0'));
    tar.extend_from_slice(b"1");
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.extend([0u8; 1024]);
    let (result, out) = convert(&tar);
    let message = result.expect_err("forged pax record accepted").to_string();
    assert!(message.contains("newline"), "{message}");
    assert!(
        !message.contains("forged"),
        "the forged path was used: {message}"
    );
    assert!(out.is_empty());
}

/// The tar is inflated on a thread of its own, a few MiB ahead of the parser: a bad
/// entry at the start of a long layer ends the conversion there, the inflating thread
/// with it (it must not wait forever to hand over blocks nobody reads).
#[test]
fn a_bad_entry_at_the_start_of_a_long_layer_ends_the_conversion() -> Result<()> {
    let big = vec![7u8; 32 << 20];
    let tar = file_tar(&[(b"../escape", b"x"), (b"big", &big)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    let (result, out) = convert(&gz.finish()?);
    assert!(
        matches!(result, Err(ConvertError::PathEscapes(ref p)) if p == "../escape"),
        "{result:?}"
    );
    assert!(out.is_empty());
    Ok(())
}
