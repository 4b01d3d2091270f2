//! The files every artefact puts on the host: the agent configuration, the join token file, the release root
//! (when pinned), and the systemd unit / drop-in.

use serde::Serialize;

use crate::error::BootstrapError;
use crate::spec::{AGENT_BINARY_PATH, AGENT_CONFIG_PATH, Checked, RELEASE_ROOT_PATH, TOKEN_FILE_PATH};

/// The keys of the agent's TOML configuration that bootstrap sets (the agent's `Settings` names).
#[derive(Serialize)]
struct AgentConfig<'a> {
    coordinator: &'a str,
    ca_pin: &'a str,
    token_file: &'a str,
    state_dir: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    release_root: Option<&'a str>,
}

/// `/etc/nimbus/agent.toml`: coordinator, CA pin, token file, state directory, node name, and `release_root`
/// ([`RELEASE_ROOT_PATH`]) when the spec pins one. Holds no secret.
pub(crate) fn agent_config(c: &Checked<'_>) -> Result<String, BootstrapError> {
    agent_config_for(
        &c.spec.coordinator,
        &c.spec.ca_pin,
        c.state_dir,
        c.spec.node_name.as_deref(),
        c.release_root.as_ref().map(|_| RELEASE_ROOT_PATH),
    )
}

/// The agent configuration from plain values (also what `nimbus-agent bootstrap` writes on a host). The caller has
/// validated them. `release_root` is the path of the pinned release root (normally [`RELEASE_ROOT_PATH`]), or
/// `None` to leave the key out.
pub fn agent_config_for(
    coordinator: &str,
    ca_pin: &str,
    state_dir: &str,
    node_name: Option<&str>,
    release_root: Option<&str>,
) -> Result<String, BootstrapError> {
    let body = toml::to_string(&AgentConfig {
        coordinator,
        ca_pin,
        token_file: TOKEN_FILE_PATH,
        state_dir,
        node_name,
        release_root,
    })
    .map_err(|e| BootstrapError::render("the agent configuration", e))?;
    Ok(format!(
        "# polynimbus agent configuration, written by nimbus-bootstrap.\n\
         # The join token is in {TOKEN_FILE_PATH} (mode 0600); the agent needs it only to enroll the first time.\n\
         {body}"
    ))
}

/// `/etc/nimbus/join-token`: the token and a newline.
pub(crate) fn token_file(c: &Checked<'_>) -> String {
    format!("{}\n", c.spec.token)
}

/// The drop-in every kind gets: it points the agent at the configuration whatever unit the package ships.
pub fn dropin() -> String {
    format!(
        "# Written by nimbus-bootstrap: run nimbus-agent with the configuration it rendered.\n\
         [Service]\n\
         Environment=NIMBUS_CONFIG={AGENT_CONFIG_PATH}\n"
    )
}

/// The unit for a bare-binary agent (packages ship their own, hardened one).
pub fn binary_unit() -> String {
    format!(
        "# Written by nimbus-bootstrap for an agent installed as a bare binary.\n\
         [Unit]\n\
         Description=polynimbus agent\n\
         Documentation=https://github.com/polynimbus/polynimbus\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         # The launcher starts the current (self-upgraded) version and rolls a failing one back by itself.\n\
         ExecStart={AGENT_BINARY_PATH} launch\n\
         RuntimeDirectory=nimbus-agent\n\
         RuntimeDirectoryMode=0700\n\
         # The agent reports ready once enrolled; a bare-metal enrollment can wait for `nimbusctl node accept`.\n\
         TimeoutStartSec=infinity\n\
         Restart=on-failure\n\
         RestartSec=5s\n\
         # 10 revoked, 64 bad configuration, 77 enrollment refused: a restart cannot fix these.\n\
         RestartPreventExitStatus=10 64 77\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}
