//! cloud-init user-data (AWS, and the payload of the Azure, OpenNebula, VMware and NoCloud artefacts).
//!
//! The `#cloud-config` document has two keys:
//! - `write_files`: the agent configuration (`/etc/nimbus/agent.toml`, 0644), the join token
//!   (`/etc/nimbus/join-token`, 0600), the release root when pinned (`/etc/nimbus/release-root.json`, 0644)
//!   and the install script (`/var/lib/nimbus-bootstrap/install-agent.sh`, 0700, see [`crate::shell`]), all
//!   owned by root;
//! - `runcmd`: runs the install script, which downloads the package with curl, checks its SHA-256
//!   (`sha256sum -c`), installs it (`dpkg -i`, `rpm -U`, or the bare binary plus a systemd unit) and runs
//!   `systemctl daemon-reload` and `systemctl enable --now nimbus-agent`. Keeping the script on disk lets an
//!   operator re-run it; it is idempotent.
//!
//! The YAML is produced by `serde_norway` from typed structs; only the leading comment lines are text.
//! [`multipart`] wraps the document and extra user scripts into a MIME multipart message, as cloud-init
//! accepts when user-data must carry more than one part.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::agent_files;
use crate::error::BootstrapError;
use crate::shell::{self, ScriptKind};
use crate::spec::{
    AGENT_CONFIG_PATH, Artefact, BootstrapSpec, Checked, INSTALL_SCRIPT_PATH, RELEASE_ROOT_PATH, TOKEN_FILE_PATH,
};

/// Name of the cloud-config in [`render`]'s artefact.
pub const USER_DATA_FILE: &str = "user-data.yaml";
/// Name of the MIME message in [`render_multipart`]'s artefact.
pub const MULTIPART_FILE: &str = "user-data.mime";
/// Longest line a `7bit` MIME part may have (RFC 5322 §2.1.1); longer bodies are base64-encoded.
const MAX_7BIT_LINE: usize = 998;

#[derive(Serialize)]
struct CloudConfig<'a> {
    write_files: Vec<WriteFile<'a>>,
    runcmd: Vec<Vec<&'a str>>,
}

#[derive(Serialize)]
struct WriteFile<'a> {
    path: &'a str,
    owner: &'a str,
    permissions: &'a str,
    content: String,
}

/// The `#cloud-config` document for `spec`.
pub fn cloud_config(spec: &BootstrapSpec) -> Result<String, BootstrapError> {
    cloud_config_checked(&spec.checked()?)
}

pub(crate) fn cloud_config_checked(c: &Checked<'_>) -> Result<String, BootstrapError> {
    let mut write_files = vec![WriteFile {
        path: AGENT_CONFIG_PATH,
        owner: "root:root",
        permissions: "0644",
        content: agent_files::agent_config(c)?,
    }];
    write_files.push(WriteFile {
        path: TOKEN_FILE_PATH,
        owner: "root:root",
        permissions: "0600",
        content: agent_files::token_file(c),
    });
    if let Some(root) = &c.release_root {
        write_files.push(WriteFile {
            path: RELEASE_ROOT_PATH,
            owner: "root:root",
            permissions: "0644",
            content: root.contents().to_string(),
        });
    }
    write_files.push(WriteFile {
        path: INSTALL_SCRIPT_PATH,
        owner: "root:root",
        permissions: "0700",
        content: shell::script(c, ScriptKind::InstallOnly)?,
    });
    let doc = CloudConfig {
        write_files,
        runcmd: vec![vec!["sh", INSTALL_SCRIPT_PATH]],
    };
    let yaml = serde_norway::to_string(&doc).map_err(|e| BootstrapError::render("the cloud-config", e))?;
    Ok(format!(
        "#cloud-config\n\
         # polynimbus: installs the nimbus-agent and enrolls this host. Rendered by nimbus-bootstrap.\n\
         # {}\n\
         {yaml}",
        c.secret_comment()
    ))
}

/// `user-data.yaml`: the cloud-config as AWS (EC2 user data) and any cloud-init image take it.
pub fn render(spec: &BootstrapSpec) -> Result<Artefact, BootstrapError> {
    let c = spec.checked()?;
    let mut a = Artefact {
        notes: c.token_notes(),
        ..Artefact::default()
    };
    a.push(USER_DATA_FILE, cloud_config_checked(&c)?, true);
    Ok(a)
}

/// `user-data.mime`: the cloud-config plus `user_scripts`, as one MIME multipart message (see [`multipart`]).
pub fn render_multipart(
    spec: &BootstrapSpec,
    user_scripts: &[(&str, &str, &[u8])],
) -> Result<Artefact, BootstrapError> {
    let c = spec.checked()?;
    let mut a = Artefact {
        notes: c.token_notes(),
        ..Artefact::default()
    };
    let cc = cloud_config_checked(&c)?;
    a.push(MULTIPART_FILE, multipart(cc.as_bytes(), user_scripts)?, true);
    Ok(a)
}

/// A MIME `multipart/mixed` message: `cloud_config` as a `text/cloud-config` part, then each user script
/// `(name, content_type, body)` as its own part (e.g. `("setup.sh", "text/x-shellscript", b"#!/bin/sh…")`).
///
/// `name` is 1-64 characters of `[A-Za-z0-9._-]`; `content_type` a lowercase `type/subtype` (cloud-init knows
/// `text/x-shellscript`, `text/cloud-config`, `text/cloud-boothook`, `text/x-include-url`, `text/jinja2`, …).
/// ASCII bodies with lines up to 998 bytes are sent `7bit`, anything else base64. The boundary is derived from
/// a SHA-256 of the parts, so the same input gives the same bytes, and is checked not to occur in any body.
pub fn multipart(cloud_config: &[u8], user_scripts: &[(&str, &str, &[u8])]) -> Result<Vec<u8>, BootstrapError> {
    for (i, (name, content_type, _)) in user_scripts.iter().enumerate() {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok {
            return Err(BootstrapError::invalid(
                format!("user_scripts[{i}].name"),
                format!("{name:?} is not a plain file name; use 1-64 characters of [A-Za-z0-9._-], e.g. setup.sh"),
            ));
        }
        let is_token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".+-".contains(&b))
        };
        let type_ok = content_type.len() <= 100
            && content_type
                .split_once('/')
                .is_some_and(|(t, s)| is_token(t) && is_token(s));
        if !type_ok {
            return Err(BootstrapError::invalid(
                format!("user_scripts[{i}].content_type"),
                format!(
                    "{content_type:?} is not a MIME type; give one such as text/x-shellscript or text/cloud-config"
                ),
            ));
        }
    }
    let mut parts: Vec<(&str, String, &[u8])> = vec![(
        "cloud-config.yaml",
        "text/cloud-config; charset=\"utf-8\"".to_string(),
        cloud_config,
    )];
    parts.extend(user_scripts.iter().map(|(n, t, b)| (*n, (*t).to_string(), *b)));

    let boundary = boundary_for(&parts);
    let mut out = Vec::new();
    out.extend_from_slice(
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n").as_bytes(),
    );
    for (name, content_type, body) in &parts {
        let seven_bit = is_7bit(body);
        out.extend_from_slice(
            format!(
                "--{boundary}\nContent-Type: {content_type}\nMIME-Version: 1.0\nContent-Transfer-Encoding: {}\n\
                 Content-Disposition: attachment; filename=\"{name}\"\n\n",
                if seven_bit { "7bit" } else { "base64" }
            )
            .as_bytes(),
        );
        if seven_bit {
            out.extend_from_slice(body);
        } else {
            out.extend_from_slice(base64_lines(body).as_bytes());
        }
        // The line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1), so a body's own final
        // newline survives.
        out.push(b'\n');
    }
    out.extend_from_slice(format!("--{boundary}--\n").as_bytes());
    Ok(out)
}

/// `==nimbus-<32 hex>==` from a SHA-256 of the parts (and a counter, bumped in the unlikely case the candidate
/// occurs in a body).
fn boundary_for(parts: &[(&str, String, &[u8])]) -> String {
    let mut counter: u32 = 0;
    loop {
        let mut h = Sha256::new();
        for (name, content_type, body) in parts {
            for field in [name.as_bytes(), content_type.as_bytes(), body] {
                h.update((field.len() as u64).to_be_bytes());
                h.update(field);
            }
        }
        h.update(counter.to_be_bytes());
        let digest = hex::encode(h.finalize());
        let candidate = format!("==nimbus-{}==", &digest[..32]);
        if !parts
            .iter()
            .any(|(_, _, body)| body.windows(candidate.len()).any(|w| w == candidate.as_bytes()))
        {
            return candidate;
        }
        counter += 1;
    }
}

fn is_7bit(body: &[u8]) -> bool {
    body.iter().all(|&b| b != 0 && b != b'\r' && b < 0x80)
        && body.split(|&b| b == b'\n').all(|l| l.len() <= MAX_7BIT_LINE)
}

/// Base64 in lines of 76 characters (RFC 2045 §6.8), each ending in a newline but the last.
fn base64_lines(body: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(body);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_is_stable_and_content_derived() {
        let a = multipart(
            b"#cloud-config\n{}\n",
            &[("a.sh", "text/x-shellscript", b"#!/bin/sh\necho a\n")],
        )
        .unwrap();
        let b = multipart(
            b"#cloud-config\n{}\n",
            &[("a.sh", "text/x-shellscript", b"#!/bin/sh\necho a\n")],
        )
        .unwrap();
        let c = multipart(
            b"#cloud-config\n{}\n",
            &[("a.sh", "text/x-shellscript", b"#!/bin/sh\necho b\n")],
        )
        .unwrap();
        assert_eq!(a, b);
        let first_line = |m: &[u8]| m.split(|&x| x == b'\n').next().unwrap().to_vec();
        assert_ne!(first_line(&a), first_line(&c));
    }

    #[test]
    fn boundary_avoids_body_collision() {
        // A body that contains the boundary the parts would otherwise get.
        let parts: Vec<(&str, String, &[u8])> = vec![("x", "text/plain".into(), b"hello")];
        let first = boundary_for(&parts);
        let body = format!("--{first}\n");
        let parts2: Vec<(&str, String, &[u8])> = vec![("x", "text/plain".into(), body.as_bytes())];
        let second = boundary_for(&parts2);
        assert!(!body.contains(&second));
    }

    #[test]
    fn bad_names_and_types_refused() {
        for (n, t) in [
            ("", "text/x-shellscript"),
            ("a/b.sh", "text/x-shellscript"),
            ("a\".sh", "text/x-shellscript"),
            ("a.sh", "text/x-shellscript\nX-Evil: 1"),
            ("a.sh", "Text/X"),
            ("a.sh", "text"),
            ("a.sh", "text/"),
        ] {
            assert!(multipart(b"#cloud-config\n", &[(n, t, b"x")]).is_err(), "{n:?} {t:?}");
        }
    }

    #[test]
    fn seven_bit_rule() {
        assert!(is_7bit(b"#!/bin/sh\necho hi\n"));
        assert!(!is_7bit("é".as_bytes()));
        assert!(!is_7bit(b"a\r\nb"));
        assert!(!is_7bit(b"a\0b"));
        assert!(!is_7bit(&[b'a'; 999]));
        assert!(is_7bit(&[b'a'; 998]));
    }
}
