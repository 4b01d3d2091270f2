//! Mount table (`proc/self/mountinfo`, see proc(5)) and active swap (`proc/swaps`).

use crate::reader::Ctx;

/// One mountinfo line, the parts we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    /// `major:minor` of the mounted device (0:N for btrfs, overlay, tmpfs, ...).
    pub dev: String,
    pub mount_point: String,
    pub fstype: String,
    /// Mount source, e.g. `/dev/nvme0n1p1`.
    pub source: String,
}

pub(crate) fn read_mountinfo(ctx: &mut Ctx<'_>) -> Vec<Mount> {
    match ctx.required("disks.mount_points", "proc/self/mountinfo") {
        Some(text) => parse_mountinfo(&text),
        None => Vec::new(),
    }
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _id = fields.next()?;
            let _parent = fields.next()?;
            let dev = fields.next()?;
            let _root = fields.next()?;
            let mount_point = unescape(fields.next()?);
            // Options, then optional fields up to the "-" separator.
            for f in fields.by_ref() {
                if f == "-" {
                    break;
                }
            }
            let fstype = fields.next()?.to_string();
            let source = unescape(fields.next()?);
            if !dev.contains(':') {
                return None;
            }
            Some(Mount {
                dev: dev.to_string(),
                mount_point,
                fstype,
                source,
            })
        })
        .collect()
}

/// The mount that is `/` now (the last one mounted there wins).
pub(crate) fn root_mount(mounts: &[Mount]) -> Option<&Mount> {
    mounts.iter().rev().find(|m| m.mount_point == "/")
}

/// Device paths of active swap areas (`type` partition; swap files are not devices).
pub(crate) fn read_swaps(ctx: &mut Ctx<'_>) -> Vec<String> {
    let Some(text) = ctx.file("disks.mount_points", "proc/swaps") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut it = line.split_whitespace();
            let path = it.next()?;
            (it.next()? == "partition").then(|| unescape(path))
        })
        .collect()
}

/// Undo the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
pub fn unescape(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let text = "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    40 27 8:17 / /srv/my\\040data rw - xfs /dev/sdb1 rw\n\
                    41 27 0:44 / /tmp rw - tmpfs tmpfs rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            Mount {
                dev: "254:0".into(),
                mount_point: "/".into(),
                fstype: "ext4".into(),
                source: "/dev/vda".into()
            }
        );
        assert_eq!(m[1].mount_point, "/srv/my data");
        assert_eq!(root_mount(&m).unwrap().dev, "254:0");
    }

    #[test]
    fn unescape_leaves_short_or_bad_escapes() {
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\999b"), "a\\999b");
        assert_eq!(unescape("\\134x"), "\\x");
    }
}
