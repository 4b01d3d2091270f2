//! Bare metal: an iPXE script that boots each registered MAC into enrollment, and a NoCloud seed per MAC.
//!
//! `boot.ipxe` compares `${netX/mac}` (the MAC of the NIC iPXE last opened, i.e. the one it is booting
//! from, which on a multi-port server need not be `net0`) with every registered MAC (lowercase, colon form:
//! how iPXE prints a MAC) and jumps to that machine's branch: `kernel <kernel_url> initrd=initrd ds=<datasource>;s=<seed base
//! URL>/<mac>/ <kernel args>`, `initrd --name initrd <initrd_url>`, `boot`. Any other machine falls through to
//! the default branch, which prints a message and `exit`s back to the firmware: an unknown MAC is never booted
//! into enrollment.
//!
//! The seed of each machine, served by the coordinator at `<seed base URL>/<mac>/`, is `meta-data`
//! (`instance-id: iid-nimbus-<mac hex>`, stable for the machine; `local-hostname`), `user-data` (the
//! cloud-config of [`crate::cloud_init`] with that machine's node name and token; bare-metal tokens are
//! per MAC) and an empty `vendor-data` (cloud-init asks for it; serving it saves retries).
//!
//! Values in the script are validated rather than escaped: iPXE splits on whitespace, expands `${…}` and takes
//! a word starting with `#` as a comment, so URLs and arguments with whitespace, `$`, quotes or backslashes are
//! refused, as are arguments starting with `#` and the bare words `&&`, `||` and `;`.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::cloud_init;
use crate::error::BootstrapError;
use crate::spec::{Artefact, BootstrapSpec};
use crate::validate::{self, Scheme};

/// Name of the script in [`render`]'s artefact.
pub const SCRIPT_FILE: &str = "boot.ipxe";

/// Which name the kernel command line gives cloud-init's NoCloud datasource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NoCloudDatasource {
    /// `ds=nocloud-net`: seeds over http(s) on every cloud-init release (deprecated in name since 24.1, still
    /// honoured). cloud-init 22.4 (Debian 12) and 23.x take http seeds only under this name.
    #[default]
    NocloudNet,
    /// `ds=nocloud`: cloud-init 24.1 and later.
    Nocloud,
}

impl NoCloudDatasource {
    fn as_str(self) -> &'static str {
        match self {
            NoCloudDatasource::NocloudNet => "nocloud-net",
            NoCloudDatasource::Nocloud => "nocloud",
        }
    }
}

/// One machine allowed to boot into enrollment.
#[derive(Clone, PartialEq, Eq)]
pub struct BareMetalHost {
    /// The MAC of the NIC it boots from; any common notation (normalised to `52:54:00:12:34:56`).
    pub mac: String,
    /// Node name (and host name) it enrolls as.
    pub node_name: String,
    /// Its own join token, bound to this MAC.
    pub token: String,
}

impl std::fmt::Debug for BareMetalHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BareMetalHost")
            .field("mac", &self.mac)
            .field("node_name", &self.node_name)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// The boot side of a bare-metal enrollment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpxeSpec {
    /// URL of the kernel to boot (an image whose userspace runs cloud-init, e.g. a live or cloud image).
    pub kernel_url: String,
    /// URL of its initrd.
    pub initrd_url: String,
    /// Extra kernel arguments, e.g. `ip=dhcp`, `console=ttyS0,115200`.
    pub kernel_args: Vec<String>,
    /// Where the coordinator serves the seeds; `<seed_base_url>/<mac>/` is one machine's. https strongly
    /// preferred: the seeds hold the join tokens.
    pub seed_base_url: String,
    /// `ds=nocloud-net` (default) or `ds=nocloud`.
    pub datasource: NoCloudDatasource,
    /// The machines; at least one.
    pub hosts: Vec<BareMetalHost>,
}

#[derive(Serialize)]
struct MetaData<'a> {
    #[serde(rename = "instance-id")]
    instance_id: String,
    #[serde(rename = "local-hostname")]
    local_hostname: &'a str,
}

/// Refuses what iPXE would split, expand or treat as a comment or an operator.
fn ipxe_word(field: &str, value: &str) -> Result<(), BootstrapError> {
    validate::single_line(field, value)?;
    let bad_char = value
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '$' | '"' | '\'' | '\\' | '`'));
    if value.is_empty() || bad_char.is_some() || value.starts_with('#') || matches!(value, "&&" | "||" | ";") {
        return Err(BootstrapError::invalid(
            field,
            format!(
                "{value:?} cannot be passed through iPXE unchanged; give one word without whitespace, `$`, quotes \
                 or backslashes, not starting with `#`"
            ),
        ));
    }
    Ok(())
}

/// `boot.ipxe` and, per host, `seeds/<mac>/meta-data`, `seeds/<mac>/user-data` and `seeds/<mac>/vendor-data`.
///
/// `base` gives what the machines share (coordinator, CA pin, token expiry, package, state directory); its
/// `token` and `node_name` are replaced by each host's.
pub fn render(base: &BootstrapSpec, ipxe: &IpxeSpec) -> Result<Artefact, BootstrapError> {
    if ipxe.hosts.is_empty() {
        return Err(BootstrapError::invalid(
            "hosts",
            "is empty; register at least one machine (MAC, node name, token)",
        ));
    }
    let kernel_scheme = validate::url("kernel_url", &ipxe.kernel_url)?;
    ipxe_word("kernel_url", &ipxe.kernel_url)?;
    let initrd_scheme = validate::url("initrd_url", &ipxe.initrd_url)?;
    ipxe_word("initrd_url", &ipxe.initrd_url)?;
    let seed_scheme = validate::url("seed_base_url", &ipxe.seed_base_url)?;
    ipxe_word("seed_base_url", &ipxe.seed_base_url)?;
    if ipxe.seed_base_url.contains(['?', '#', ';']) {
        return Err(BootstrapError::invalid(
            "seed_base_url",
            format!(
                "{:?} has a query, fragment or `;`; give a plain base such as https://coord.example.net:7443/seed",
                ipxe.seed_base_url
            ),
        ));
    }
    for (i, arg) in ipxe.kernel_args.iter().enumerate() {
        let field = format!("kernel_args[{i}]");
        ipxe_word(&field, arg)?;
        if arg.starts_with("ds=") || arg.starts_with("initrd=") {
            return Err(BootstrapError::invalid(
                field,
                format!("{arg:?} is set by the renderer (ds= names the seed, initrd= the initrd); leave it out"),
            ));
        }
    }
    let seed_base = ipxe.seed_base_url.trim_end_matches('/');

    // Validate every host (and its derived spec) before rendering anything.
    let mut macs = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut hosts = Vec::with_capacity(ipxe.hosts.len());
    for (i, h) in ipxe.hosts.iter().enumerate() {
        let mac = validate::normalize_mac_field(&format!("hosts[{i}].mac"), &h.mac)?;
        validate::node_name(&format!("hosts[{i}].node_name"), &h.node_name)?;
        validate::token(&format!("hosts[{i}].token"), &h.token)?;
        if !macs.insert(mac.clone()) {
            return Err(BootstrapError::invalid(
                format!("hosts[{i}].mac"),
                format!("{mac} is registered twice; give each machine once"),
            ));
        }
        if !names.insert(h.node_name.clone()) {
            return Err(BootstrapError::invalid(
                format!("hosts[{i}].node_name"),
                format!("{:?} is used twice; give each machine its own node name", h.node_name),
            ));
        }
        let spec = BootstrapSpec {
            token: h.token.clone(),
            node_name: Some(h.node_name.clone()),
            ..base.clone()
        };
        spec.validate()?;
        hosts.push((mac, spec));
    }

    let mut script = String::new();
    script.push_str("#!ipxe\n");
    script.push_str("# polynimbus: boots the registered machines into enrollment. Rendered by nimbus-bootstrap.\n");
    script.push_str("# Holds no secret: each machine's join token is in its NoCloud seed, not here.\n");
    script.push_str("# Any other machine stops at the default branch and never enrolls.\n\n");
    for (mac, _) in &hosts {
        script.push_str(&format!(
            "iseq ${{netX/mac}} {mac} && goto nimbus_{} ||\n",
            mac.replace(':', "")
        ));
    }
    script.push_str("\n# Default branch: not a registered machine.\n");
    script.push_str("echo polynimbus: ${netX/mac} is not registered for enrollment, not booting it\n");
    script.push_str("echo polynimbus: an operator must register its MAC with the coordinator first\n");
    script.push_str("exit 1\n");
    let mut a = Artefact::default();
    let mut seeds = Vec::new();
    for (mac, spec) in &hosts {
        let label = mac.replace(':', "");
        let node = spec.node_name.as_deref().unwrap_or_default();
        let mut kernel = vec![
            ipxe.kernel_url.clone(),
            "initrd=initrd".to_string(),
            format!("ds={};s={seed_base}/{mac}/", ipxe.datasource.as_str()),
        ];
        kernel.extend(ipxe.kernel_args.iter().cloned());
        script.push_str(&format!("\n:nimbus_{label}\n"));
        script.push_str(&format!("echo polynimbus: booting {node} ({mac}) into enrollment\n"));
        script.push_str(&format!("kernel {}\n", kernel.join(" ")));
        script.push_str(&format!("initrd --name initrd {}\n", ipxe.initrd_url));
        script.push_str("boot\n");

        let c = spec.checked()?;
        let meta = serde_norway::to_string(&MetaData {
            instance_id: format!("iid-nimbus-{label}"),
            local_hostname: node,
        })
        .map_err(|e| BootstrapError::render("the NoCloud meta-data", e))?;
        seeds.push((format!("seeds/{mac}/meta-data"), meta, false));
        seeds.push((
            format!("seeds/{mac}/user-data"),
            cloud_init::cloud_config_checked(&c)?,
            true,
        ));
        seeds.push((
            format!("seeds/{mac}/vendor-data"),
            "#cloud-config\n{}\n".to_string(),
            false,
        ));
        if a.notes.is_empty() {
            a.notes = c.token_notes();
            a.notes[0] = format!(
                "the user-data seeds contain single-use join tokens bound to their MACs, valid until {}: they are \
                 the only secrets in these files; boot.ipxe and meta-data hold none",
                spec.token_expiry
            );
        }
    }
    a.push(SCRIPT_FILE, script, false);
    for (name, contents, secret) in seeds {
        a.push(name, contents, secret);
    }
    if seed_scheme == Scheme::Http {
        a.notes.push(format!(
            "the seeds are served over plain http ({seed_base}): anyone on the path can read the join tokens in \
             them; serve them over https"
        ));
    }
    if kernel_scheme == Scheme::Http || initrd_scheme == Scheme::Http {
        a.notes.push(
            "the kernel or initrd is fetched over plain http: nothing checks it; prefer https (iPXE built with \
             DOWNLOAD_PROTO_HTTPS)"
                .to_string(),
        );
    }
    Ok(a)
}
