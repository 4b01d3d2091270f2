//! Planner thresholds (the `settings:` section of the store file).

use serde::{Deserialize, Serialize};

use crate::physics::{ZONE_INFERENCE_THRESHOLD, ZONE_MAX_RTT};
use crate::units::{Nanos, duration_with_unit};

/// Tunables of zone inference and timeout derivation. Every field is optional in YAML.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanConfig {
    /// Nodes whose p50 RTT is below this are clustered into one zone. Default 0.5 ms.
    #[serde(deserialize_with = "duration_with_unit")]
    pub zone_threshold: Nanos,
    /// Members of one zone must be at most this far apart (p50). Default 2 ms (the deck's zone definition).
    #[serde(deserialize_with = "duration_with_unit")]
    pub zone_max_rtt: Nanos,
    /// Accepted probability, in parts per million, that consecutive packet losses outlast a recommended
    /// timeout (see [`crate::timeouts`]). Default 1 (one in a million).
    pub timeout_miss_ppm: u32,
}

impl Default for PlanConfig {
    fn default() -> PlanConfig {
        PlanConfig {
            zone_threshold: ZONE_INFERENCE_THRESHOLD,
            zone_max_rtt: ZONE_MAX_RTT,
            timeout_miss_ppm: 1,
        }
    }
}
