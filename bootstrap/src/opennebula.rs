//! OpenNebula: the `CONTEXT = [ … ]` section of a VM template.
//!
//! - [`ContextMode::StartScript`], for images with OpenNebula's context packages and no cloud-init:
//!   `START_SCRIPT_BASE64` holds the stand-alone install script ([`crate::shell`], with the configuration and
//!   the token). The context packages run it as root at every boot; it is idempotent.
//! - [`ContextMode::CloudInit`], for images with cloud-init (its OpenNebula datasource): `USER_DATA` holds the
//!   cloud-config, base64-encoded, with `USERDATA_ENCODING = "base64"`.
//!
//! Both set `NETWORK = "YES"` and, with a node name, `SET_HOSTNAME`. OneGate's `TOKEN` is not set: it is
//! unrelated to the join token.
//!
//! Template syntax (OpenNebula "Virtual Machine Template" reference, *Syntax*): `#` starts a comment; strings
//! are in double quotes, a double quote inside one is escaped as `\"`; vector attributes are
//! `NAME = [ NAME1 = VALUE1, NAME2 = VALUE2 ]`. [`quote`] applies that rule and refuses what the reference
//! leaves undefined or what OpenNebula would interpret: backslashes, `$` (context variable substitution such
//! as `$NAME`) and control characters.

use base64::Engine;

use crate::cloud_init;
use crate::error::BootstrapError;
use crate::shell::{self, ScriptKind};
use crate::spec::{Artefact, BootstrapSpec};
use crate::validate;

/// Name of the template fragment in [`render`]'s artefact.
pub const CONTEXT_FILE: &str = "context.one";

/// How the VM image takes its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextMode {
    /// Images with OpenNebula's context packages: `START_SCRIPT_BASE64`.
    StartScript,
    /// Images with cloud-init: `USER_DATA` + `USERDATA_ENCODING = "base64"`.
    CloudInit,
}

/// `value` as an OpenNebula template string: `"…"`, `"` escaped as `\"`. Refuses `\`, `$` and control
/// characters.
pub fn quote(value: &str) -> Result<String, BootstrapError> {
    validate::single_line("OpenNebula value", value)?;
    if let Some(c) = value.chars().find(|c| matches!(c, '\\' | '$')) {
        return Err(BootstrapError::invalid(
            "OpenNebula value",
            format!(
                "{value:?} contains {c:?}, which an OpenNebula template would interpret (`$` substitutes context \
                 variables); leave it out"
            ),
        ));
    }
    Ok(format!("\"{}\"", value.replace('"', "\\\"")))
}

/// `context.one`: a `CONTEXT = [ … ]` section to put in the VM template (`onetemplate create`/`update`), or to
/// merge into an existing `CONTEXT`.
pub fn render(spec: &BootstrapSpec, mode: ContextMode) -> Result<Artefact, BootstrapError> {
    let c = spec.checked()?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let mut attrs: Vec<(&str, String)> = vec![("NETWORK", "YES".into())];
    if let Some(n) = &spec.node_name {
        attrs.push(("SET_HOSTNAME", n.clone()));
    }
    let holder = match mode {
        ContextMode::StartScript => {
            attrs.push(("START_SCRIPT_BASE64", b64(&shell::script(&c, ScriptKind::Standalone)?)));
            "START_SCRIPT_BASE64"
        }
        ContextMode::CloudInit => {
            attrs.push(("USER_DATA", b64(&cloud_init::cloud_config_checked(&c)?)));
            attrs.push(("USERDATA_ENCODING", "base64".into()));
            "USER_DATA"
        }
    };
    let mut out = String::new();
    out.push_str("# polynimbus: VM template CONTEXT that installs the nimbus-agent and enrolls the VM.\n");
    out.push_str("# Rendered by nimbus-bootstrap; merge it into the template's CONTEXT.\n");
    out.push_str(&format!("# {holder}: {}\n", c.secret_comment()));
    out.push_str("CONTEXT = [\n");
    let n = attrs.len();
    for (i, (k, v)) in attrs.iter().enumerate() {
        let sep = if i + 1 == n { " ]" } else { "," };
        out.push_str(&format!("  {k} = {}{sep}\n", quote(v)?));
    }
    let mut a = Artefact {
        notes: c.token_notes(),
        ..Artefact::default()
    };
    a.notes.push(match mode {
        ContextMode::StartScript => {
            "OpenNebula: for images with the one-context packages (no cloud-init); START_SCRIPT runs at every boot \
             and is idempotent"
                .to_string()
        }
        ContextMode::CloudInit => "OpenNebula: for images with cloud-init (OpenNebula datasource)".to_string(),
    });
    a.push(CONTEXT_FILE, out, true);
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("YES").unwrap(), "\"YES\"");
        assert_eq!(quote("say \"hi\"").unwrap(), "\"say \\\"hi\\\"\"");
        for bad in ["$NAME", "a\\b", "a\nb", "a\0b", "$USER[SSH_PUBLIC_KEY]"] {
            assert!(quote(bad).is_err(), "{bad:?}");
        }
    }
}
