//! VMware: guestinfo keys for cloud-init's VMware datasource.
//!
//! - `guestinfo.userdata`: the cloud-config, base64 (`guestinfo.userdata.encoding = "base64"`);
//! - `guestinfo.metadata`: JSON with `instance-id` (`iid-nimbus-<token id>`, new for every token so cloud-init
//!   runs again on a re-bootstrapped VM), `local-hostname` (the node name, when given) and `redact:
//!   [userdata]`, which makes cloud-init overwrite the user data (and so the join token) in guestinfo once it
//!   has read it; base64 (`guestinfo.metadata.encoding = "base64"`).
//!
//! Rendered twice: `.vmx` lines (`key = "value"`, for the VM's configuration file or `govc vm.change -e`) and a
//! JSON map (Terraform's `extra_config`, `govc`, PowerCLI `New-AdvancedSetting`).

use std::collections::BTreeMap;

use base64::Engine;
use serde::Serialize;

use crate::cloud_init;
use crate::error::BootstrapError;
use crate::spec::{Artefact, BootstrapSpec};

/// Name of the `.vmx` fragment in [`render`]'s artefact.
pub const VMX_FILE: &str = "guestinfo.vmx";
/// Name of the JSON map in [`render`]'s artefact.
pub const JSON_FILE: &str = "guestinfo.json";

#[derive(Serialize)]
struct Metadata<'a> {
    #[serde(rename = "instance-id")]
    instance_id: String,
    #[serde(rename = "local-hostname", skip_serializing_if = "Option::is_none")]
    local_hostname: Option<&'a str>,
    redact: [&'a str; 1],
}

/// The guestinfo keys and values, in key order.
pub fn guestinfo(spec: &BootstrapSpec) -> Result<BTreeMap<String, String>, BootstrapError> {
    let c = spec.checked()?;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let metadata = serde_json::to_string(&Metadata {
        instance_id: format!("iid-nimbus-{}", c.token_id),
        local_hostname: spec.node_name.as_deref(),
        redact: ["userdata"],
    })
    .map_err(|e| BootstrapError::render("the VMware metadata", e))?;
    let userdata = cloud_init::cloud_config_checked(&c)?;
    Ok(BTreeMap::from([
        ("guestinfo.metadata".to_string(), b64(metadata.as_bytes())),
        ("guestinfo.metadata.encoding".to_string(), "base64".to_string()),
        ("guestinfo.userdata".to_string(), b64(userdata.as_bytes())),
        ("guestinfo.userdata.encoding".to_string(), "base64".to_string()),
    ]))
}

/// `guestinfo.vmx` and `guestinfo.json`.
pub fn render(spec: &BootstrapSpec) -> Result<Artefact, BootstrapError> {
    let c = spec.checked()?;
    let keys = guestinfo(spec)?;
    let mut vmx = String::new();
    vmx.push_str("# polynimbus: guestinfo for cloud-init's VMware datasource. Rendered by nimbus-bootstrap.\n");
    vmx.push_str(&format!("# guestinfo.userdata: {}\n", c.secret_comment()));
    for (k, v) in &keys {
        // Every value is base64 or `base64`: nothing needs the .vmx `|XX` escapes.
        if !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) {
            return Err(BootstrapError::render("the .vmx lines", format!("{k} is not base64")));
        }
        vmx.push_str(&format!("{k} = \"{v}\"\n"));
    }
    let mut json = serde_json::to_string_pretty(&keys).map_err(|e| BootstrapError::render("the guestinfo JSON", e))?;
    json.push('\n');
    let mut a = Artefact {
        notes: c.token_notes(),
        ..Artefact::default()
    };
    a.notes.push(
        "VMware: cloud-init clears guestinfo.userdata (and so the token) once it has read it (metadata `redact`)"
            .to_string(),
    );
    a.push(VMX_FILE, vmx, true);
    a.push(JSON_FILE, json, true);
    Ok(a)
}
