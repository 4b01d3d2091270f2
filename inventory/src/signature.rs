//! Partition-table, file-system and volume-member signatures, read from the first bytes of `dev/<name>`.
//!
//! No well-kept pure-Rust crate probes this set of formats (the `gpt`/`mbrman`/`bootsector` crates parse
//! partition tables only), and libblkid bindings would add a C library to the build and cannot be pointed at a
//! fixture tree, so the magic numbers are checked here. Every offset below is from the format's own
//! specification or on-disk layout documentation (as also used by util-linux `libblkid/src/superblocks`):
//!
//! | kind | where | magic | label / uuid |
//! |---|---|---|---|
//! | md RAID v1.1 / v1.2 | 0 / 4096 | `0xa92b4efc` (LE u32), major version 1 at +4 | set_uuid +16 (16 B), set_name +32 (32 B) |
//! | md RAID v1.0 | `((size/512 - 16) & !7) * 512` | same | same |
//! | md RAID v0.90 | `(size & !0xffff) - 0x10000` | same, major version 0 | — |
//! | LUKS 1/2 | 0 | `LUKS\xba\xbe` | uuid +168 (40 B text), LUKS2 label +24 (48 B) |
//! | LVM2 PV | label in sector 0..3 | `LABELONE`, type `LVM2 001` at +24 | PV uuid at label + offset(+20), 32 chars |
//! | GPT | 512 (and 4096 for 4 KiB sectors) | `EFI PART` | disk GUID at header +56 |
//! | XFS | 0 | `XFSB` | uuid +32, label +108 (12 B) |
//! | ext2/3/4 | superblock at 1024 | `0xEF53` (LE u16) at 1080 | uuid 1128, label 1144 (16 B); features decide ext2/3/4 |
//! | btrfs | superblock at 65536 | `_BHRfS_M` at 65600 | fsid 65568, label 65835 (256 B) |
//! | swap | page size − 10 (4086, 8182, 16374, 65526) | `SWAPSPACE2` / `SWAP-SPACE` | uuid 1036, label 1052 (16 B) |
//! | squashfs | 0 | `hsqs` | — |
//! | ISO 9660 | 32769 | `CD001` | volume id 32808 (32 B) |
//! | NTFS | 3 | `NTFS    ` | — |
//! | FAT32 / FAT12/16 | boot sector | `FAT32   ` at 82 / `FAT1x   ` at 54, `0x55AA` at 510 | id 67 / 39, label 71 / 43 (11 B) |
//! | MBR | 510 | `0x55AA`, boot flags 0x00/0x80 | disk signature 440 |
//!
//! Checked in that order (md first, as a v1.0/0.90 member also shows its array's contents at the start; GPT
//! before MBR because a GPT disk carries a protective MBR).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use crate::model::{Signature, SignatureKind};

/// Bytes read from the start of each device: enough for the btrfs label (65835 + 256).
pub(crate) const HEAD_LEN: usize = 68 * 1024;

/// Probe `path` (a block device, or a regular file in a fixture tree). `size_bytes` enables the md
/// superblocks stored near the end. `Ok(None)`: readable, nothing recognised. `Err`: not readable (absent
/// devices return `NotFound`; anything that is neither a block device nor a regular file, e.g. a FIFO planted
/// in the tree, returns `InvalidInput` without being opened).
pub(crate) fn probe(path: &Path, size_bytes: Option<u64>) -> io::Result<Option<Signature>> {
    let meta = std::fs::metadata(path)?;
    let ft = meta.file_type();
    if !(ft.is_block_device() || ft.is_file()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a block device or regular file",
        ));
    }
    let file = File::open(path)?;
    let mut head = vec![0u8; HEAD_LEN];
    let n = read_full_at(&file, &mut head, 0)?;
    head.truncate(n);
    if let Some(size) = size_bytes
        && let Some(sig) = md_at_end(&file, size)?
    {
        return Ok(Some(sig));
    }
    Ok(identify(&head))
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

const MD_MAGIC: u32 = 0xa92b_4efc;

fn md_at_end(file: &File, size: u64) -> io::Result<Option<Signature>> {
    let mut buf = [0u8; 64];
    // v1.0: 8 KiB from the end, 4 KiB aligned.
    let sectors = size / 512;
    if sectors > 16 {
        let off = ((sectors - 16) & !7) * 512;
        if read_full_at(file, &mut buf, off)? == buf.len()
            && let Some(sig) = md_superblock(&buf, 1)
        {
            return Ok(Some(sig));
        }
    }
    // v0.90: the last 64 KiB-aligned 64 KiB block.
    if size >= 2 * 65536 {
        let off = (size & !0xffff) - 0x10000;
        if read_full_at(file, &mut buf, off)? == buf.len()
            && let Some(sig) = md_superblock(&buf, 0)
        {
            return Ok(Some(sig));
        }
    }
    Ok(None)
}

fn md_superblock(b: &[u8], major: u32) -> Option<Signature> {
    if le32(b, 0)? != MD_MAGIC || le32(b, 4)? != major {
        return None;
    }
    let (uuid, label) = if major == 1 {
        (uuid_be(b.get(16..32)?), text(b.get(32..64)?))
    } else {
        (None, None)
    };
    Some(Signature {
        kind: SignatureKind::LinuxRaidMember,
        label,
        uuid,
    })
}

/// Identify the contents from the first bytes of a device.
pub(crate) fn identify(b: &[u8]) -> Option<Signature> {
    let sig = |kind, label, uuid| Some(Signature { kind, label, uuid });

    for off in [0usize, 4096] {
        if let Some(s) = b.get(off..off + 64).and_then(|s| md_superblock(s, 1)) {
            return Some(s);
        }
    }
    if b.get(0..6) == Some(b"LUKS\xba\xbe") {
        let version = be16(b, 6);
        let label = if version == Some(2) {
            b.get(24..72).and_then(text)
        } else {
            None
        };
        return sig(SignatureKind::CryptoLuks, label, b.get(168..208).and_then(text));
    }
    for sector in 0..4usize {
        let off = sector * 512;
        if b.get(off..off + 8) == Some(b"LABELONE") && b.get(off + 24..off + 32) == Some(b"LVM2 001") {
            let pv = le32(b, off + 20).and_then(|x| usize::try_from(x).ok()).map(|x| off + x);
            let uuid = pv.and_then(|p| b.get(p..p + 32)).and_then(lvm_uuid);
            return sig(SignatureKind::Lvm2Member, None, uuid);
        }
    }
    for off in [512usize, 4096] {
        if b.get(off..off + 8) == Some(b"EFI PART") {
            return sig(SignatureKind::Gpt, None, b.get(off + 56..off + 72).and_then(guid_mixed));
        }
    }
    if b.get(0..4) == Some(b"XFSB") {
        return sig(
            SignatureKind::Xfs,
            b.get(108..120).and_then(text),
            b.get(32..48).and_then(uuid_be),
        );
    }
    if le16(b, 1080) == Some(0xEF53) {
        let compat = le32(b, 1024 + 0x5c).unwrap_or(0);
        let incompat = le32(b, 1024 + 0x60).unwrap_or(0);
        let ro_compat = le32(b, 1024 + 0x64).unwrap_or(0);
        // ext4-only features: extents, 64bit, flex_bg / huge_file, gdt_csum, dir_nlink, extra_isize, metadata_csum.
        let kind = if incompat & (0x40 | 0x80 | 0x200) != 0 || ro_compat & (0x8 | 0x10 | 0x20 | 0x40 | 0x400) != 0 {
            SignatureKind::Ext4
        } else if compat & 0x4 != 0 {
            SignatureKind::Ext3
        } else {
            SignatureKind::Ext2
        };
        return sig(
            kind,
            b.get(1144..1160).and_then(text),
            b.get(1128..1144).and_then(uuid_be),
        );
    }
    if b.get(65600..65608) == Some(b"_BHRfS_M") {
        return sig(
            SignatureKind::Btrfs,
            b.get(65835..66091).and_then(text),
            b.get(65568..65584).and_then(uuid_be),
        );
    }
    for page in [4096usize, 8192, 16384, 65536] {
        let m = b.get(page - 10..page);
        if m == Some(b"SWAPSPACE2") || m == Some(b"SWAP-SPACE") {
            let (label, uuid) = if m == Some(b"SWAPSPACE2") {
                (b.get(1052..1068).and_then(text), b.get(1036..1052).and_then(uuid_be))
            } else {
                (None, None)
            };
            return sig(SignatureKind::Swap, label, uuid);
        }
    }
    if b.get(0..4) == Some(b"hsqs") {
        return sig(SignatureKind::Squashfs, None, None);
    }
    if b.get(32769..32774) == Some(b"CD001") {
        return sig(SignatureKind::Iso9660, b.get(32808..32840).and_then(text), None);
    }
    if b.get(3..11) == Some(b"NTFS    ") {
        return sig(SignatureKind::Ntfs, None, None);
    }
    let boot_sig = b.get(510..512) == Some(&[0x55, 0xaa]);
    if boot_sig {
        if b.get(82..87) == Some(b"FAT32") {
            return sig(
                SignatureKind::Vfat,
                b.get(71..82).and_then(fat_label),
                b.get(67..71).and_then(fat_id),
            );
        }
        if matches!(b.get(54..59), Some(b"FAT12") | Some(b"FAT16") | Some(b"FAT  ")) {
            return sig(
                SignatureKind::Vfat,
                b.get(43..54).and_then(fat_label),
                b.get(39..43).and_then(fat_id),
            );
        }
        let flags_ok = (0..4).all(|i| matches!(b.get(446 + 16 * i), Some(0x00) | Some(0x80)));
        if flags_ok {
            let id = le32(b, 440).filter(|v| *v != 0).map(|v| format!("{v:08x}"));
            return sig(SignatureKind::Mbr, None, id);
        }
    }
    None
}

fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// NUL/space-padded text; only printable ASCII is kept (the bytes are untrusted).
fn text(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s: String = b[..end]
        .iter()
        .filter(|c| c.is_ascii_graphic() || **c == b' ')
        .map(|&c| c as char)
        .collect();
    let s = s.trim();
    if s.is_empty() { None } else { Some(s.to_string()) }
}

fn fat_label(b: &[u8]) -> Option<String> {
    text(b).filter(|l| l != "NO NAME")
}

fn fat_id(b: &[u8]) -> Option<String> {
    let v = u32::from_le_bytes(b.try_into().ok()?);
    if v == 0 {
        return None;
    }
    Some(format!("{:04X}-{:04X}", v >> 16, v & 0xffff))
}

/// 16 bytes in RFC 4122 (big-endian) order → `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`. All-zero → `None`.
fn uuid_be(b: &[u8]) -> Option<String> {
    if b.len() != 16 || b.iter().all(|&x| x == 0) {
        return None;
    }
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    ))
}

/// EFI GUID: the first three fields are little-endian.
fn guid_mixed(b: &[u8]) -> Option<String> {
    if b.len() != 16 {
        return None;
    }
    let mut be = [0u8; 16];
    be[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
    be[4..6].copy_from_slice(&[b[5], b[4]]);
    be[6..8].copy_from_slice(&[b[7], b[6]]);
    be[8..16].copy_from_slice(&b[8..16]);
    uuid_be(&be)
}

/// LVM's 32-character PV id → the 6-4-4-4-4-4-6 form `pvs` prints.
fn lvm_uuid(b: &[u8]) -> Option<String> {
    if !b.iter().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let s = std::str::from_utf8(b).ok()?;
    let groups = [6usize, 4, 4, 4, 4, 4, 6];
    let mut out = Vec::with_capacity(7);
    let mut at = 0;
    for g in groups {
        out.push(s.get(at..at + g)?);
        at += g;
    }
    Some(out.join("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(len: usize) -> Vec<u8> {
        vec![0u8; len]
    }

    fn put(b: &mut [u8], off: usize, bytes: &[u8]) {
        b[off..off + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn ext4_with_label_and_uuid() {
        let mut b = img(2048);
        put(&mut b, 1080, &0xEF53u16.to_le_bytes());
        put(&mut b, 1024 + 0x60, &0x2c2u32.to_le_bytes()); // filetype|extents|flex_bg
        put(&mut b, 1128, &[0x11; 16]);
        put(&mut b, 1144, b"rootfs");
        let s = identify(&b).unwrap();
        assert_eq!(s.kind, SignatureKind::Ext4);
        assert_eq!(s.label.as_deref(), Some("rootfs"));
        assert_eq!(s.uuid.as_deref(), Some("11111111-1111-1111-1111-111111111111"));
    }

    #[test]
    fn ext3_and_ext2_by_features() {
        let mut b = img(2048);
        put(&mut b, 1080, &0xEF53u16.to_le_bytes());
        assert_eq!(identify(&b).unwrap().kind, SignatureKind::Ext2);
        put(&mut b, 1024 + 0x5c, &0x4u32.to_le_bytes());
        assert_eq!(identify(&b).unwrap().kind, SignatureKind::Ext3);
    }

    #[test]
    fn gpt_wins_over_protective_mbr() {
        let mut b = img(1024);
        put(&mut b, 510, &[0x55, 0xaa]);
        put(&mut b, 512, b"EFI PART");
        put(
            &mut b,
            512 + 56,
            &[0x78, 0x56, 0x34, 0x12, 0x34, 0x12, 0x78, 0x56, 1, 2, 3, 4, 5, 6, 7, 8],
        );
        let s = identify(&b).unwrap();
        assert_eq!(s.kind, SignatureKind::Gpt);
        assert_eq!(s.uuid.as_deref(), Some("12345678-1234-5678-0102-030405060708"));
    }

    #[test]
    fn mbr_needs_valid_boot_flags() {
        let mut b = img(512);
        put(&mut b, 510, &[0x55, 0xaa]);
        put(&mut b, 440, &0xdeadbeefu32.to_le_bytes());
        assert_eq!(identify(&b).unwrap().kind, SignatureKind::Mbr);
        assert_eq!(identify(&b).unwrap().uuid.as_deref(), Some("deadbeef"));
        put(&mut b, 446, &[0x42]);
        assert_eq!(identify(&b), None);
    }

    #[test]
    fn swap_lvm_md_xfs_iso_vfat() {
        let mut b = img(4096);
        put(&mut b, 4086, b"SWAPSPACE2");
        put(&mut b, 1052, b"swap");
        let s = identify(&b).unwrap();
        assert_eq!((s.kind, s.label.as_deref()), (SignatureKind::Swap, Some("swap")));

        let mut b = img(1024);
        put(&mut b, 512, b"LABELONE");
        put(&mut b, 512 + 20, &32u32.to_le_bytes());
        put(&mut b, 512 + 24, b"LVM2 001");
        put(&mut b, 512 + 32, b"AbCdEf0123456789AbCdEf0123456789");
        let s = identify(&b).unwrap();
        assert_eq!(s.kind, SignatureKind::Lvm2Member);
        assert_eq!(s.uuid.as_deref(), Some("AbCdEf-0123-4567-89Ab-CdEf-0123-456789"));

        let mut b = img(4200);
        put(&mut b, 4096, &MD_MAGIC.to_le_bytes());
        put(&mut b, 4100, &1u32.to_le_bytes());
        put(&mut b, 4096 + 32, b"host:backup");
        let s = identify(&b).unwrap();
        assert_eq!(
            (s.kind, s.label.as_deref()),
            (SignatureKind::LinuxRaidMember, Some("host:backup"))
        );

        let mut b = img(128);
        put(&mut b, 0, b"XFSB");
        put(&mut b, 108, b"data");
        assert_eq!(identify(&b).unwrap().kind, SignatureKind::Xfs);

        let mut b = img(32840);
        put(&mut b, 32769, b"CD001");
        put(&mut b, 32808, b"CONTEXT                         ");
        let s = identify(&b).unwrap();
        assert_eq!((s.kind, s.label.as_deref()), (SignatureKind::Iso9660, Some("CONTEXT")));

        let mut b = img(512);
        put(&mut b, 510, &[0x55, 0xaa]);
        put(&mut b, 82, b"FAT32   ");
        put(&mut b, 67, &0x1234abcdu32.to_le_bytes());
        put(&mut b, 71, b"NO NAME    ");
        let s = identify(&b).unwrap();
        assert_eq!(
            (s.kind, s.label, s.uuid.as_deref()),
            (SignatureKind::Vfat, None, Some("1234-ABCD"))
        );
    }

    #[test]
    fn hostile_bytes_do_not_panic() {
        // Truncated buffers at every interesting length, and garbage text fields.
        for len in [0, 3, 8, 440, 511, 1081, 1130, 4090, 4100, 32770, 65601] {
            let mut b = vec![0xffu8; len];
            if len > 1081 {
                put(&mut b, 1080, &0xEF53u16.to_le_bytes());
            }
            let _ = identify(&b);
        }
        let mut b = img(1024);
        put(&mut b, 0, b"LUKS\xba\xbe");
        put(&mut b, 168, &[0xff; 40]);
        assert_eq!(identify(&b).unwrap().uuid, None);
    }

    #[test]
    fn probe_refuses_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("sda");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).unwrap();
        let err = probe(&fifo, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
