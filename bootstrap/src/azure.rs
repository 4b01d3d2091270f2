//! Azure custom data: the cloud-config, base64-encoded, as the VM's `osProfile.customData` takes it.
//!
//! The limit: the Compute API reference for `OSProfile.customData` says "The base-64 encoded string is decoded
//! to a binary array that is saved as a file on the Virtual Machine. The maximum length of the binary array is
//! 65535 bytes" (<https://learn.microsoft.com/en-us/javascript/api/@azure/arm-compute/osprofileprovisioningdata>,
//! the same text in every SDK's `CustomData` property); the overview page rounds it to "The size can't exceed
//! 64 KB" (<https://learn.microsoft.com/en-us/azure/virtual-machines/custom-data>). So the limit applies to the
//! payload *before* base64: at most [`CUSTOM_DATA_MAX_BYTES`] bytes, which is at most 87 380 base64
//! characters.

use base64::Engine;

use crate::cloud_init;
use crate::error::BootstrapError;
use crate::spec::{Artefact, BootstrapSpec};

/// Largest custom data payload Azure accepts, in bytes before base64 encoding.
pub const CUSTOM_DATA_MAX_BYTES: usize = 65_535;
/// Name of the base64 file in [`render`]'s artefact.
pub const CUSTOM_DATA_FILE: &str = "custom-data.b64";

/// `payload` (a cloud-config or a MIME multipart message) base64-encoded, or [`BootstrapError::TooLarge`]
/// when it is over [`CUSTOM_DATA_MAX_BYTES`].
pub fn custom_data(payload: &[u8]) -> Result<String, BootstrapError> {
    if payload.len() > CUSTOM_DATA_MAX_BYTES {
        return Err(BootstrapError::TooLarge {
            what: "the Azure custom data (before base64)",
            size: payload.len(),
            limit: CUSTOM_DATA_MAX_BYTES,
        });
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(payload))
}

/// `custom-data.b64`: the cloud-config of [`cloud_init::render`], base64-encoded for `osProfile.customData`
/// (ARM templates, Bicep, the REST API, Terraform's `custom_data`). No trailing newline.
pub fn render(spec: &BootstrapSpec) -> Result<Artefact, BootstrapError> {
    let c = spec.checked()?;
    let cc = cloud_init::cloud_config_checked(&c)?;
    render_payload(&c.token_notes(), cc.as_bytes())
}

/// `custom-data.b64` for a payload rendered elsewhere (e.g. [`cloud_init::multipart`] with user scripts), with
/// the spec's notes.
pub fn render_multipart(
    spec: &BootstrapSpec,
    user_scripts: &[(&str, &str, &[u8])],
) -> Result<Artefact, BootstrapError> {
    let c = spec.checked()?;
    let cc = cloud_init::cloud_config_checked(&c)?;
    render_payload(&c.token_notes(), &cloud_init::multipart(cc.as_bytes(), user_scripts)?)
}

fn render_payload(notes: &[String], payload: &[u8]) -> Result<Artefact, BootstrapError> {
    let encoded = custom_data(payload)?;
    let mut a = Artefact {
        notes: notes.to_vec(),
        ..Artefact::default()
    };
    a.notes.push(format!(
        "Azure custom data: {} of at most {CUSTOM_DATA_MAX_BYTES} bytes before base64; `az vm create \
         --custom-data` encodes by itself, so give it the decoded file (base64 -d {CUSTOM_DATA_FILE})",
        payload.len()
    ));
    a.push(CUSTOM_DATA_FILE, encoded, true);
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_is_65535_bytes_before_base64() {
        let at_limit = vec![b'a'; CUSTOM_DATA_MAX_BYTES];
        let encoded = custom_data(&at_limit).unwrap();
        assert_eq!(encoded.len(), 87_380);
        let over = vec![b'a'; CUSTOM_DATA_MAX_BYTES + 1];
        let e = custom_data(&over).unwrap_err();
        assert_eq!(
            e,
            BootstrapError::TooLarge {
                what: "the Azure custom data (before base64)",
                size: 65_536,
                limit: 65_535
            }
        );
        assert!(
            e.to_string().contains("65536 bytes, over the platform limit of 65535"),
            "{e}"
        );
    }

    #[test]
    fn round_trip() {
        let payload = b"#cloud-config\nruncmd: [[echo, hi]]\n";
        let encoded = custom_data(payload).unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD.decode(encoded).unwrap(),
            payload
        );
    }
}
