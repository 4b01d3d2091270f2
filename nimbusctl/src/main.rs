//! `nimbusctl`: the operator's CLI over the coordinator's admin API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets};
use nimbus_proto::*;

mod audit_cmd;
mod bootstrap_cmd;
mod context;
mod hardware;
mod latency_view;
mod policy_view;
mod release_cmd;
mod rollout_view;
mod storage_view;

use policy_view::Verb;

/// Operate a polynimbus fleet through the coordinator's admin API.
///
/// Examples:
///   nimbusctl token create --ttl 1h --uses 3 --labels env=prod
///   nimbusctl nodes
///   nimbusctl -o json node show agent-1
///   nimbusctl node revoke agent-1 --reason "host retired"
///   nimbusctl policy validate -f policy.yaml && nimbusctl diff -f policy.yaml && nimbusctl apply -f policy.yaml
///
/// Exit codes: 0 done, 1 failed or refused, 65 the policy file is invalid.
#[derive(Parser, Debug)]
#[command(name = "nimbusctl", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// Admin socket of the coordinator (mode 0600: run as the coordinator's user or root).
    #[arg(
        long,
        global = true,
        env = "NIMBUS_ADMIN_SOCKET",
        default_value = "/run/nimbus/admin.sock"
    )]
    socket: PathBuf,
    /// Use this context of the contexts file (a remote coordinator's admin API over TLS, with a client
    /// certificate or an OIDC token command) instead of the local socket. [default: the file's current-context]
    #[arg(long, global = true, env = "NIMBUS_CONTEXT")]
    context: Option<String>,
    /// Contexts file (kubeconfig-like YAML). [default: ~/.config/nimbus/contexts.yaml]
    #[arg(long, global = true, env = "NIMBUS_CONTEXTS")]
    contexts: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Output {
    Text,
    Json,
    /// Helm values (`plan replication`) or the policy document (`policy show`).
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Join tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
    /// List nodes: NAME, ID, OVERLAY-IP, STATE (connected/lost/revoked), ENV, POOL, COHORTS (placement under
    /// the fleet policy), LAST-SEEN, VERSION, CPUS, MEMORY. Policy warnings (unplaced nodes, pools below their
    /// minimum) follow on stderr.
    Nodes {
        /// Also PLATFORM, INSTANCE-TYPE, ZONE, a disk summary (e.g. `2×1.7T nvme-local`) and CONVERGED (whether
        /// the agent applied the current policy revision: yes/pending).
        #[arg(long)]
        wide: bool,
    },
    /// One node: show or revoke.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Measured round-trip times between nodes on the underlay: a matrix of p50/p99 in ms, grouped by zone
    /// and colored against the 2 ms zone budget (on a terminal); `-o json` for every window field.
    Latency {
        /// Also write the p50 matrix as an SVG heatmap to this file (for reports).
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Plans from measured latency.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// The fleet policy: validate a file (locally), list the applied revisions, show one.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Show what applying a policy file would change, without changing anything
    ///
    /// The coordinator validates the file and places every node as `apply` would (a dry run: nothing is
    /// stored). Per node: `NODE: BEFORE → AFTER` (environment/pool, or `unplaced`), then each change.
    /// DISRUPTIVE nodes and `!` changes mean a new environment or pool, or losing the placement: the node is
    /// drained, reset (kubeadm reset) and re-joined. Cohort, label and taint changes are applied in place.
    /// Policy warnings (unplaced nodes, pools below their minimum, overlaps) follow.
    ///
    /// Example:
    ///   nimbusctl diff -f policy.yaml
    ///   nimbusctl -o json diff -f - < policy.yaml
    ///
    /// Exit codes: 0 shown (even with disruptive changes), 65 the file is invalid (every error printed as
    /// FILE:LINE:COL: MESSAGE (hint: HINT)), 1 other failures.
    #[command(verbatim_doc_comment)]
    Diff {
        /// The policy file (schema: policy/README.md); `-` reads stdin.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Compute the diff as an apply with --allow-disruptive would (no "would be refused" note).
        #[arg(long)]
        allow_disruptive: bool,
    },
    /// Apply a policy file: store it as a new numbered revision and converge the fleet to it
    ///
    /// Prints the new revision and the per-node changes. Run `nimbusctl diff -f FILE` first.
    /// Disruptive changes (a node moving to another environment or pool, or losing its placement: drain,
    /// kubeadm reset, re-join) are refused unless --allow-disruptive is given: then nothing is stored, the
    /// refused changes are listed and the exit code is 1. With it, those nodes are drained and moved in waves
    /// (each pool's max_unavailable at a time). Cohort, label and taint changes are never disruptive.
    /// Applying the current policy again stores nothing ("unchanged").
    ///
    /// Example:
    ///   nimbusctl apply -f policy.yaml
    ///   nimbusctl apply -f policy.yaml --allow-disruptive
    ///
    /// Exit codes: 0 applied or unchanged, 1 refused (disruptive) or failed, 65 the file is invalid.
    #[command(verbatim_doc_comment)]
    Apply {
        /// The policy file (schema: policy/README.md); `-` reads stdin.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Allow changes that drain nodes and move them to another environment or pool (in waves).
        #[arg(long)]
        allow_disruptive: bool,
    },
    /// Put the agent on new hosts: render cloud-init, Azure custom data, OpenNebula context, VMware guestinfo or
    /// iPXE artefacts with a fresh join token.
    #[command(subcommand)]
    Bootstrap(BootstrapCmd),
    /// Local storage planned for nodes by their pool's storage profiles.
    #[command(subcommand)]
    Storage(StorageCmd),
    /// Rollouts in waves: agent upgrades (start) and disruptive policy changes; status, pause, resume, abort.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Signed agent releases (TUF): create the repository and its keys, hand it to the coordinator, publish
    /// agent builds, list them.
    ///
    /// Example:
    ///   nimbusctl release init --root-key /media/usb/nimbus-root.pem --out ./releases
    ///   nimbusctl release install ./releases && rm -r ./releases/keys
    ///   nimbusctl release add ./nimbus-agent --version 0.2.0
    ///   nimbusctl release list
    #[command(subcommand, verbatim_doc_comment)]
    Release(ReleaseCmd),
    /// Re-apply an earlier policy revision, stored as a new revision (history is never rewritten)
    ///
    /// Printed like `apply` (or like `diff` with --dry-run). The same rule holds for disruptive changes:
    /// without --allow-disruptive a rollback that would drain and move nodes is refused (exit 1).
    ///
    /// Example:
    ///   nimbusctl policy history
    ///   nimbusctl rollback --to 3 --dry-run
    ///   nimbusctl rollback --to 3 --allow-disruptive
    ///
    /// Exit codes: 0 rolled back, unchanged or shown, 1 refused (disruptive) or failed.
    #[command(verbatim_doc_comment)]
    Rollback {
        /// The revision to go back to (see `nimbusctl policy history`).
        #[arg(long, value_name = "N")]
        to: u64,
        /// Only show what would change; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Allow changes that drain nodes and move them to another environment or pool (in waves).
        #[arg(long)]
        allow_disruptive: bool,
    },
    // Help text: on `audit_cmd::AuditArgs`.
    Audit(audit_cmd::AuditArgs),
    /// Who the coordinator takes you for (uid on the local socket, certificate subject or OIDC subject on a
    /// remote context) and the roles it grants: viewer (read), operator (tokens, apply, rollouts, releases),
    /// admin (revoke, decommission, keys, release repository).
    Whoami,
    /// The coordinator replicas sharing this fleet's store (several on etcd, one otherwise): id, overlay
    /// address, endpoints, agents streaming to each, and which one leads (runs rollouts, drains, label sync).
    Replicas,
    /// Rotate the coordinator's keys (admin role).
    #[command(subcommand)]
    Key(KeyCmd),
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// Rotate a key with an overlap in which old and new are both accepted:
    ///
    ///   wireguard        the coordinator's WireGuard key; connected agents are told the new key over their
    ///                    stream and switch without losing it, agents connecting later are told on connect.
    ///                    The old key is retired at the end of the overlap (default 24h) or with --finish.
    ///   enrollment-cert  the enrollment TLS certificate, re-issued by the same CA (join tokens and their
    ///                    pin stay valid); takes effect at once.
    ///   ca               the CA itself: a new CA cross-signed by the old one. Tokens pinned to either CA
    ///                    enroll during the overlap (default 24h); new tokens carry the new pin. --finish
    ///                    retires the old CA: tokens still pinned to it stop working.
    ///
    /// Examples:
    ///   nimbusctl key rotate wireguard --overlap 1h
    ///   nimbusctl key rotate wireguard --finish
    ///   nimbusctl key rotate ca && nimbusctl token create --ttl 1h     # the new token has the new pin
    #[command(verbatim_doc_comment)]
    Rotate {
        #[arg(value_parser = ["wireguard", "enrollment-cert", "ca"])]
        kind: String,
        /// Retire the old key now (ends a running wireguard or ca rotation).
        #[arg(long, conflicts_with = "overlap")]
        finish: bool,
        /// How long the old key stays accepted, e.g. 30m or 24h. [default: 24h]
        #[arg(long, value_parser = humantime::parse_duration)]
        overlap: Option<Duration>,
    },
}

#[derive(Subcommand, Debug)]
enum BootstrapCmd {
    /// Mint a single-use join token for a new host and render what makes it install and enroll the agent at
    /// first boot
    ///
    /// The token carries the enrollment labels of the environment's (and --pool's) match rules in the current
    /// policy, so the host lands there. It is the only secret in the output: files holding it are written
    /// 0600 (the rest 0644) into --out; hand them to the platform and delete them.
    ///
    ///   aws         user-data.yaml (#cloud-config): EC2 user data
    ///   azure       custom-data.b64: the VM's custom data (64 KiB limit checked)
    ///   opennebula  context.one: the template's CONTEXT section (START_SCRIPT_BASE64, or USER_DATA with
    ///               --opennebula-cloud-init for cloud-init images)
    ///   vmware      guestinfo.vmx / guestinfo.json: guestinfo.userdata and .metadata (base64)
    ///   ipxe        boot.ipxe + seeds/<mac>/{meta-data,user-data}: one token per --host, bound to its MAC;
    ///               those enrollments wait in `pending` until `nimbusctl node accept NAME`
    ///
    /// Example:
    ///   nimbusctl bootstrap render --platform aws --env production \
    ///     --package-url http://10.0.0.5:8080/nimbus-agent_0.1.0_amd64.deb --package-sha256 <hex> --out ./db-7 \
    ///     --release-root ./releases/repo/metadata/1.root.json
    ///   nimbusctl bootstrap render --platform ipxe --env production --host 52:54:00:ab:cd:ef=metal-1 \
    ///     --kernel-url https://boot/vmlinuz --initrd-url https://boot/initrd --seed-url https://boot/seeds \
    ///     --package-url https://mirror/nimbus-agent.deb --package-sha256 <hex>
    #[command(verbatim_doc_comment)]
    Render {
        #[arg(long, value_enum)]
        platform: bootstrap_cmd::Platform,
        /// The environment the host joins (its match labels go onto the token).
        #[arg(long)]
        env: String,
        /// A pool that selects nodes by enrollment labels (those go onto the token too).
        #[arg(long)]
        pool: Option<String>,
        /// The node name the agent asks for.
        #[arg(long)]
        node_name: Option<String>,
        /// How long the token stays valid.
        #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Where the host downloads the agent package (the coordinator's package mirror or another one).
        #[arg(long)]
        package_url: String,
        /// SHA-256 (hex) of the package; the host refuses a download that does not match.
        #[arg(long)]
        package_sha256: String,
        /// deb, rpm or binary.
        #[arg(long, default_value = "deb", value_parser = parse_package_kind)]
        package_kind: bootstrap::PackageKind,
        /// Output directory (created 0700).
        #[arg(long, default_value = "nimbus-bootstrap")]
        out: PathBuf,
        /// iPXE: a machine allowed to boot into enrollment, MAC=NAME (repeat).
        #[arg(long = "host", value_parser = parse_host)]
        hosts: Vec<(String, String)>,
        /// iPXE: the installer kernel.
        #[arg(long)]
        kernel_url: Option<String>,
        /// iPXE: the installer initrd.
        #[arg(long)]
        initrd_url: Option<String>,
        /// iPXE: where the NoCloud seeds (seeds/<mac>/) are served. The coordinator's package mirror serves
        /// them at https://HOST:PORT/seeds once the output's seeds/ is copied into its packages_dir (use
        /// https: the user-data carries the join token; see packages_tls_cert).
        #[arg(long)]
        seed_url: Option<String>,
        /// OpenNebula: USER_DATA for images with cloud-init instead of START_SCRIPT_BASE64.
        #[arg(long)]
        opennebula_cloud_init: bool,
        /// The release repository's root (releases/repo/metadata/1.root.json from `nimbusctl release init`):
        /// pinned on the host as /etc/nimbus/release-root.json, so its agent only accepts releases signed under
        /// this root. Without it, agents refuse upgrades until the root is installed by hand.
        #[arg(long, value_name = "FILE")]
        release_root: Option<PathBuf>,
    },
}

fn parse_package_kind(s: &str) -> Result<bootstrap::PackageKind, String> {
    match s {
        "deb" => Ok(bootstrap::PackageKind::Deb),
        "rpm" => Ok(bootstrap::PackageKind::Rpm),
        "binary" => Ok(bootstrap::PackageKind::Binary),
        other => Err(format!("{other:?}: use deb, rpm or binary")),
    }
}

fn parse_host(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(m, n)| (m.to_string(), n.to_string()))
        .filter(|(m, n)| !m.is_empty() && !n.is_empty())
        .ok_or_else(|| format!("{s:?}: write MAC=NAME, e.g. 52:54:00:ab:cd:ef=metal-1"))
}

#[derive(Subcommand, Debug)]
enum StorageCmd {
    /// The node's storage plan: per volume its layout, file system, mount point and disks (by stable
    /// /dev/disk/by-id path, serial, WWN, size), disks explicitly allowed to be wiped, and what the agent
    /// last reported (ready, created, refused: why, failed: why)
    ///
    /// The coordinator selects the disks from the node's current inventory at every apply, so instance-store
    /// disks that come back with new serials are found again. A disk carrying data is never touched unless
    /// the profile's `wipe` names its serial, WWN or by-id path.
    ///
    /// Example:
    ///   nimbusctl storage plan db-1
    ///   nimbusctl -o json storage plan db-1
    #[command(verbatim_doc_comment)]
    Plan {
        /// The node's name (see `nimbusctl nodes`).
        node: String,
    },
}

#[derive(Subcommand, Debug)]
enum RolloutCmd {
    /// The running rollout (or the last one): phase, wave, and per node its pool, zone, wave and state
    ///
    /// A node of a wave is healthy when its agent applied the new desired state and its kubelet is joined to
    /// the node's environment (or, leaving every environment, reset). A node not healthy within the
    /// coordinator's --rollout-node-timeout (default 15m) fails, and the first failure pauses the rollout.
    ///
    /// With --watch it redraws every --interval until the rollout ends (one JSON object per line with -o json).
    ///
    /// Exit codes: 0 shown, 1 failed.
    #[command(verbatim_doc_comment)]
    Status {
        /// Follow the rollout live until it completes or is aborted.
        #[arg(long)]
        watch: bool,
        /// How often --watch redraws.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// Upgrade the fleet's agents to a published release, in waves
    ///
    /// The canary wave goes first, then batches of at most --max-unavailable nodes per pool (or zone). A node
    /// is healthy when it runs the new version (its launcher started it, its tunnel and stream are up); a node
    /// whose launcher rolled the version back (it exited or did not get ready in time), that could not install
    /// it, or that is not healthy within the coordinator's --rollout-node-timeout, fails, and more than
    /// --max-failures failures pause the rollout (the canary failing stops it there). With
    /// --abort-failure-percent a larger share of failed nodes aborts it, and --rollback then puts every node it
    /// touched back on its previous version.
    ///
    /// Example:
    ///   nimbusctl release add ./nimbus-agent --version 0.2.0
    ///   nimbusctl rollout start --version 0.2.0 --canary 1 --max-unavailable 10% --pause-after canary
    ///   nimbusctl rollout status
    ///
    /// Exit codes: 0 started, 1 refused (not published, another rollout running, nothing to upgrade).
    #[command(verbatim_doc_comment)]
    Start {
        /// The release to run (see `nimbusctl release list`).
        #[arg(long)]
        version: String,
        /// Nodes in the first wave; 0 for no canary.
        #[arg(long, default_value_t = 1)]
        canary: u32,
        /// Nodes upgrading at once per pool (or zone): a count or a share, e.g. 2 or 10% (at least one).
        #[arg(long, default_value = "1")]
        max_unavailable: String,
        /// What --max-unavailable counts per: pool or zone.
        #[arg(long, default_value = "pool", value_parser = ["pool", "zone"])]
        by: String,
        /// Pause after this stage until `nimbusctl rollout resume`: `canary` (the first wave).
        #[arg(long, value_name = "STAGE", value_parser = ["canary"])]
        pause_after: Option<String>,
        /// The same as --pause-after canary.
        #[arg(long, hide = true)]
        pause_after_canary: bool,
        /// Allow going back to an older version.
        #[arg(long)]
        allow_downgrade: bool,
        /// Failed nodes tolerated before the rollout pauses.
        #[arg(long, default_value_t = 0)]
        max_failures: u32,
        /// Abort when more than this share (per cent) of the nodes that finished their change failed (0: off).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
        abort_failure_percent: u32,
        /// On abort (by you or the failure share), put every node this rollout touched back on the version it ran
        /// before. Those versions must be published (`nimbusctl release list`).
        #[arg(long)]
        rollback: bool,
        /// The architecture of the release to use. [default: this machine's]
        #[arg(long, default_value = "")]
        arch: String,
    },
    /// Start no new wave; nodes already in flight finish. Resume with `rollout resume`.
    Pause {
        /// Why (shown in the coordinator log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Continue a paused rollout (also after it paused itself on a failed or timed-out node).
    Resume,
    /// Stop the rollout for good: nodes not moved yet keep their old place (a later `diff` shows them again);
    /// nodes already moved stay moved.
    Abort {
        /// Why (shown in the coordinator log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Check a policy file locally (no coordinator needed): every error with its position, or a summary
    ///
    /// Parses and validates the file with the same policy library the coordinator uses on `diff`/`apply`,
    /// and reports every problem, one per line: FILE:LINE:COL: MESSAGE (hint: HINT). A valid file prints its digest (the same
    /// for any file meaning the same policy), its environments, its pools with min/max and its cohorts.
    /// Nothing is sent anywhere; nodes are not placed (use `nimbusctl diff` for that).
    ///
    /// Example:
    ///   nimbusctl policy validate -f deploy/examples/policy.yaml
    ///   nimbusctl -o json policy validate -f - < policy.yaml
    ///
    /// Exit codes: 0 valid, 65 invalid (EX_DATAERR), 1 the file cannot be read.
    #[command(verbatim_doc_comment)]
    Validate {
        /// The policy file (schema: policy/README.md); `-` reads stdin.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Applied revisions, newest first: REV, APPLIED, BY, ACTION (apply / rollback to N), FILE,
    /// NODES-CHANGED, DISRUPTIVE, DIGEST. Go back with `nimbusctl rollback --to REV`.
    History,
    /// Print the YAML of a revision as it was applied (raw on stdout: `nimbusctl policy show > policy.yaml`)
    ///
    /// Example:
    ///   nimbusctl policy show                  # the current policy
    ///   nimbusctl policy show --revision 3 | diff - policy.yaml
    #[command(verbatim_doc_comment)]
    Show {
        /// The revision; 0 (the default) is the current one.
        #[arg(long, value_name = "N", default_value_t = 0)]
        revision: u64,
    },
}

#[derive(Subcommand, Debug)]
enum PlanCmd {
    /// Plan replicated stores (Galera, MySQL semi-sync, Kafka) against the measured p99 RTTs: predicted commit
    /// latency, which members can be synchronous, max serial transaction rate, timeouts, zone capacity.
    /// `-o yaml` prints helm values.
    Replication {
        /// The stores file (see planner/examples/stores.yaml).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Keep the file: the coordinator re-plans every probe window and warns (log + metric) on drift.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a join token. Prints the token (shown only once; the coordinator keeps a hash) and the CA pin agents need.
    Create {
        /// Lifetime, e.g. 30m, 1h, 7d (at most 30 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Labels given to nodes enrolled with it: k=v, repeat or separate with commas.
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Free-text note shown in `token list`.
        #[arg(long, default_value = "")]
        description: String,
        /// Bare metal: only a host with this MAC address may enroll with the token (single use). Such
        /// enrollments wait in `pending` until `nimbusctl node accept NAME`, since a MAC is easy to fake.
        #[arg(long, value_name = "MAC")]
        bind_mac: Option<String>,
        /// With --bind-mac: admit the node at once instead of waiting for `node accept`.
        #[arg(long, requires = "bind_mac")]
        auto_accept: bool,
        /// Enrollments with this token wait in `pending` until `nimbusctl node accept NAME`.
        #[arg(long, conflicts_with = "auto_accept")]
        require_acceptance: bool,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id so it can no longer be used.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum ReleaseCmd {
    /// Make a new release repository on this machine (no coordinator needed): the root key (created if missing,
    /// kept offline afterwards), the online keys (OUT/keys) and root.json v1 with the first signed metadata
    /// (OUT/repo). Agents pin OUT/repo/metadata/1.root.json.
    Init {
        /// The root key: created when missing. Keep it offline; it is needed again only to rotate keys.
        #[arg(long)]
        root_key: PathBuf,
        /// Directory for the repository and the online keys (must not hold a repository yet).
        #[arg(long)]
        out: PathBuf,
    },
    /// Give the coordinator the repository made by `init` and its online keys (delete OUT/keys afterwards).
    Install {
        /// The directory `init` wrote.
        dir: PathBuf,
        /// Replace an installed repository (agents that pinned its root refuse the new one).
        #[arg(long)]
        replace: bool,
    },
    /// Publish an agent build: uploaded in chunks, checked against its SHA-256 and signed into the repository.
    Add {
        /// The artefact (an agent binary, or a .deb/.rpm).
        file: PathBuf,
        /// Its semantic version, e.g. 0.2.0.
        #[arg(long)]
        version: String,
        /// binary, deb or rpm.
        #[arg(long, default_value = "binary")]
        kind: String,
        /// The architecture it runs on.
        #[arg(long, default_value = std::env::consts::ARCH)]
        arch: String,
    },
    /// What is published, the root agents pin, and when the signed timestamp expires.
    List,
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Everything known about a node.
    Show { name: String },
    /// Admit a pending node (enrolled with a token that requires acceptance, e.g. a MAC-bound bare-metal token):
    /// its WireGuard peer is added and its tunnel comes up. Check its MAC, hostname and machine id first with
    /// `nimbusctl node show NAME`.
    Accept { name: String },
    /// Revoke a node: it is told to stop, its WireGuard peer is removed and its key can never enroll again.
    Revoke {
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Take nodes out of the fleet, one at a time: drain each through its environment's Kubernetes API
    /// (cordon, evict pods, delete the Node), run `kubeadm reset` on it, revoke its keys, then free its overlay
    /// IP and name (an audit record is kept). Stops at the first node that fails and says what to do.
    ///
    /// Example: nimbusctl node decommission db-7 db-8 --drain-timeout 10m
    ///
    /// Exit codes: 0 all done, 1 a node failed (the ones after it were not touched).
    Decommission {
        /// Node names, taken in this order.
        #[arg(required = true)]
        names: Vec<String>,
        /// Skip the drain: the node's pods stop with it instead of being evicted first.
        #[arg(long)]
        no_drain: bool,
        /// Longest a drain may take (pod disruption budgets can hold evictions back).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label `{s}` must look like key=value")),
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// The coordinator refused a policy document: the message holds every diagnostic
/// (`FILE:LINE:COL: MESSAGE (hint: HINT)`), printed as is; the exit code is 65.
#[derive(Debug)]
struct InvalidPolicy(String);

impl std::fmt::Display for InvalidPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidPolicy {}

/// Like [`status_err`], but INVALID_ARGUMENT (the policy document failed validation) becomes
/// [`InvalidPolicy`].
fn policy_status_err(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::InvalidArgument {
        InvalidPolicy(s.message().to_string()).into()
    } else {
        status_err(s)
    }
}

/// The policy file named by `-f`: its name (for error positions) and text. `-` is stdin.
fn read_policy(file: &Path) -> Result<(String, String)> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading the policy from stdin")?;
        return Ok(("<stdin>".into(), text));
    }
    let text = std::fs::read_to_string(file).with_context(|| {
        format!(
            "reading the policy file {} (give an existing YAML file with -f FILE, or -f - for stdin)",
            file.display()
        )
    })?;
    Ok((file.display().to_string(), text))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ago(unix: u64) -> String {
    ago_at(unix, unix_now())
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago` (or `never` for 0), seen from `now`.
fn ago_at(unix: u64, now: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let secs = now.saturating_sub(unix);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn when(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

fn mem(bytes: u64) -> String {
    if bytes == 0 {
        return "-".into();
    }
    format!("{:.1}Gi", bytes as f64 / (1u64 << 30) as f64)
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header(header.to_vec());
    t
}

fn node_json(n: &Node) -> serde_json::Value {
    let (placement, unplaced_reason, convergence) = policy_view::placement_json(n);
    serde_json::json!({
        "id": n.id, "name": n.name, "overlay_ip": n.overlay_ip, "state": n.state,
        "last_seen_unix": n.last_seen_unix, "agent_version": n.agent_version, "hostname": n.hostname,
        "machine_id": n.machine_id, "wg_public_key": n.wg_public_key, "enrolled_at_unix": n.enrolled_at_unix,
        "labels": n.labels, "underlay_endpoint": n.underlay_endpoint, "rx_bytes": n.rx_bytes, "tx_bytes": n.tx_bytes,
        "handshake_age_secs": n.handshake_age_secs,
        "inventory": n.inventory.as_ref().map(|i| serde_json::json!({
            "hostname": i.hostname, "cpus": i.cpus, "memory_bytes": i.memory_bytes, "kernel": i.kernel, "os_release": i.os_release,
        })),
        "platform": n.platform, "instance_type": n.instance_type, "region": n.region, "zone": n.zone,
        "disk_summary": n.disk_summary,
        "hardware": hardware::document(&n.inventory_document),
        "inventory_updated_unix": n.inventory_updated_unix,
        "inventory_history": n.inventory_history.iter().map(|c| serde_json::json!({"at_unix": c.at_unix, "changes": c.changes})).collect::<Vec<_>>(),
        "placement": placement, "unplaced_reason": unplaced_reason, "convergence": convergence,
        "kubelet": n.kubelet, "cluster_sync": n.cluster_sync, "drift": n.drift, "drift_unix": n.drift_unix,
        "storage": n.storage.iter().map(|s| serde_json::json!({"name": s.name, "state": s.state, "detail": s.detail})).collect::<Vec<_>>(),
    })
}

/// The `nodes` table: NAME, ID, OVERLAY-IP, STATE, ENV, POOL, COHORTS, LAST-SEEN, VERSION, CPUS, MEMORY, and
/// with `wide` PLATFORM, INSTANCE-TYPE, ZONE, DISKS, CONVERGED.
fn nodes_table(nodes: &[Node], wide: bool) -> Table {
    let mut header = vec![
        "NAME",
        "ID",
        "OVERLAY-IP",
        "STATE",
        "ENV",
        "POOL",
        "COHORTS",
        "LAST-SEEN",
        "VERSION",
        "CPUS",
        "MEMORY",
    ];
    if wide {
        header.extend(["PLATFORM", "INSTANCE-TYPE", "ZONE", "DISKS", "CONVERGED"]);
    }
    let mut t = table(&header);
    for n in nodes {
        let inv = n.inventory.clone().unwrap_or_default();
        let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
        let wide_cols = [
            dash(&n.platform),
            dash(&n.instance_type),
            dash(&n.zone),
            dash(&n.disk_summary),
            policy_view::converged(n),
        ];
        let mut row = vec![n.name.clone(), n.id.clone(), n.overlay_ip.clone(), n.state.clone()];
        row.extend(policy_view::node_columns(n));
        row.extend([
            ago(n.last_seen_unix),
            n.agent_version.clone(),
            if inv.cpus == 0 {
                "-".into()
            } else {
                inv.cpus.to_string()
            },
            mem(inv.memory_bytes),
        ]);
        if wide {
            row.extend(wide_cols);
        }
        t.add_row(row);
    }
    t
}

fn token_json(t: &TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id, "created_at_unix": t.created_at_unix, "expires_at_unix": t.expires_at_unix,
        "uses_total": t.uses_total, "uses_left": t.uses_left, "revoked": t.revoked, "labels": t.labels,
        "description": t.description, "bind_mac": t.bind_mac, "require_acceptance": t.require_acceptance,
    })
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(v)?))
}

/// Write `text` to stdout. A reader that went away (`nimbusctl policy show | head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// `policy validate`: local, no coordinator.
fn validate(file: &Path, json: bool) -> Result<ExitCode> {
    let (name, text) = read_policy(file)?;
    let result = policy::parse(&name, &text);
    if json {
        print_json(&policy_view::validate_json(&result))?;
    }
    Ok(match &result {
        Ok(p) => {
            if !json {
                emit(&policy_view::validate_summary(&name, p))?;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if !json {
                eprint!("{}", policy_view::validate_errors(e));
            }
            ExitCode::from(policy_view::EX_DATAERR)
        }
    })
}

/// Print a diff/apply/rollback answer; exit 1 when disruptive changes were refused.
fn show_response(r: &ApplyPolicyResponse, verb: Verb, json: bool) -> Result<ExitCode> {
    if json {
        print_json(&policy_view::response_json(r, verb))?;
    } else {
        emit(&policy_view::response(r, verb))?;
    }
    Ok(if policy_view::refused(r, verb) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn run(cli: Cli) -> Result<ExitCode> {
    if cli.output == Output::Yaml && !matches!(cli.cmd, Cmd::Plan(_) | Cmd::Policy(PolicyCmd::Show { .. })) {
        bail!("-o yaml is only for `plan replication` and `policy show`; use -o json");
    }
    let json = cli.output == Output::Json;
    if let Cmd::Policy(PolicyCmd::Validate { file }) = &cli.cmd {
        return validate(file, json);
    }
    if let Cmd::Release(ReleaseCmd::Init { root_key, out }) = &cli.cmd {
        println!("{}", release_cmd::init(root_key, out).await?);
        return Ok(ExitCode::SUCCESS);
    }
    // Read the file before connecting, so a typo in -f is reported even without a coordinator.
    let file = match &cli.cmd {
        Cmd::Diff { file, .. } | Cmd::Apply { file, .. } => Some(read_policy(file)?),
        _ => None,
    };
    let ctx = context::select(cli.contexts.as_deref(), cli.context.as_deref())?;
    let mut c = context::connect(ctx.as_ref(), &cli.socket).await?;
    match cli.cmd {
        Cmd::Diff { allow_disruptive, .. } | Cmd::Apply { allow_disruptive, .. } => {
            let verb = if matches!(cli.cmd, Cmd::Diff { .. }) {
                Verb::Diff
            } else {
                Verb::Apply
            };
            let (file_name, yaml) = file.unwrap_or_default();
            let r = c
                .apply_policy(ApplyPolicyRequest {
                    file_name,
                    yaml,
                    dry_run: verb.dry_run(),
                    allow_disruptive,
                })
                .await
                .map_err(policy_status_err)?
                .into_inner();
            show_response(&r, verb, json)
        }
        Cmd::Rollback {
            to,
            dry_run,
            allow_disruptive,
        } => {
            let r = c
                .rollback_policy(RollbackPolicyRequest {
                    to_revision: to,
                    dry_run,
                    allow_disruptive,
                })
                .await
                .map_err(policy_status_err)?
                .into_inner();
            show_response(&r, Verb::Rollback { to, dry_run }, json)
        }
        Cmd::Policy(PolicyCmd::History) => {
            let r = c
                .list_policy_revisions(ListPolicyRevisionsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                print_json(&serde_json::Value::Array(
                    r.revisions.iter().map(policy_view::revision_json).collect(),
                ))?;
            } else {
                emit(&policy_view::history(&r.revisions, unix_now()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Policy(PolicyCmd::Show { revision }) => {
            let r = c
                .get_policy(GetPolicyRequest { revision })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                print_json(&policy_view::revision_json(&r))?;
            } else if r.yaml.is_empty() {
                bail!(
                    "revision {} has no stored document (see `nimbusctl policy history`)",
                    r.revision
                );
            } else {
                let newline = if r.yaml.ends_with('\n') { "" } else { "\n" };
                emit(&format!("{}{newline}", r.yaml))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Node(NodeCmd::Decommission {
            names,
            no_drain,
            drain_timeout,
        }) => {
            let r = c
                .decommission_nodes(DecommissionRequest {
                    names,
                    no_drain,
                    drain_timeout_secs: u32::try_from(drain_timeout.as_secs()).unwrap_or(u32::MAX).max(1),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let all_done = r.results.iter().all(|x| x.done);
            if json {
                print_json(&serde_json::Value::Array(
                    r.results
                        .iter()
                        .map(
                            |x| serde_json::json!({"node": x.node, "done": x.done, "steps": x.steps, "error": x.error}),
                        )
                        .collect(),
                ))?;
            } else {
                let mut text = String::new();
                for x in &r.results {
                    let verdict = if x.done { "decommissioned" } else { "NOT decommissioned" };
                    text.push_str(&format!("{}: {verdict}\n", x.node));
                    for step in &x.steps {
                        text.push_str(&format!("  - {step}\n"));
                    }
                    if !x.error.is_empty() {
                        text.push_str(&format!("  error: {}\n", x.error));
                    }
                }
                emit(&text)?;
            }
            Ok(if all_done { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Cmd::Audit(args) => audit_cmd::run(&mut c, args, json).await,
        cmd => {
            admin(c, cli.output, cmd).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The commands outside the fleet policy.
async fn admin(mut c: context::Client, output: Output, cmd: Cmd) -> Result<()> {
    let json = output == Output::Json;
    match cmd {
        Cmd::Release(rc) => {
            let list = match rc {
                ReleaseCmd::Init { .. } => bail!("release init runs without a coordinator"),
                ReleaseCmd::Install { dir, replace } => release_cmd::install(&mut c, &dir, replace).await?,
                ReleaseCmd::Add {
                    file,
                    version,
                    kind,
                    arch,
                } => release_cmd::add(&mut c, &file, &version, &kind, &arch).await?,
                ReleaseCmd::List => c
                    .list_releases(nimbus_proto::ListReleasesRequest {})
                    .await?
                    .into_inner(),
            };
            if json {
                print_json(&release_cmd::list_json(&list))?;
            } else {
                print!("{}", release_cmd::list_text(&list));
            }
        }
        Cmd::Token(TokenCmd::Create {
            ttl,
            uses,
            labels,
            description,
            bind_mac,
            auto_accept,
            require_acceptance,
        }) => {
            let r = c
                .create_token(CreateTokenRequest {
                    ttl_secs: ttl.as_secs().max(1),
                    uses,
                    labels: labels.into_iter().collect(),
                    description,
                    bind_mac: bind_mac.unwrap_or_default(),
                    require_acceptance,
                    auto_accept,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&serde_json::json!({
                    "token": r.token, "token_id": r.token_id, "ca_pin": r.ca_pin,
                    "expires_at_unix": r.expires_at_unix, "enroll_endpoints": r.enroll_endpoints,
                }));
            }
            let endpoint = r
                .enroll_endpoints
                .first()
                .cloned()
                .unwrap_or_else(|| "COORDINATOR:7443".into());
            println!("token:    {}", r.token);
            println!("ca-pin:   {}", r.ca_pin);
            println!("token-id: {}", r.token_id);
            println!("expires:  {} ({} uses)", when(r.expires_at_unix), uses);
            println!();
            println!("This token is a secret, shown only now. Enroll a host with:");
            println!(
                "  nimbus-agent --coordinator {endpoint} --ca-pin {} --token {}",
                r.ca_pin, r.token
            );
        }
        Cmd::Token(TokenCmd::List) => {
            let r = c
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&serde_json::Value::Array(r.tokens.iter().map(token_json).collect()));
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut t = table(&[
                "ID",
                "STATE",
                "USES-LEFT",
                "EXPIRES",
                "LABELS",
                "BOUND-TO",
                "DESCRIPTION",
            ]);
            for tok in &r.tokens {
                let state = if tok.revoked {
                    "revoked"
                } else if tok.expires_at_unix <= now {
                    "expired"
                } else if tok.uses_left == 0 {
                    "used-up"
                } else {
                    "valid"
                };
                let labels: Vec<String> = tok.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                t.add_row(vec![
                    tok.id.clone(),
                    state.into(),
                    format!("{}/{}", tok.uses_left, tok.uses_total),
                    when(tok.expires_at_unix),
                    labels.join(","),
                    match (tok.bind_mac.is_empty(), tok.require_acceptance) {
                        (true, false) => "-".into(),
                        (true, true) => "any (accept)".into(),
                        (false, true) => format!("{} (accept)", tok.bind_mac),
                        (false, false) => tok.bind_mac.clone(),
                    },
                    tok.description.clone(),
                ]);
            }
            println!("{t}");
        }
        Cmd::Token(TokenCmd::Revoke { id }) => {
            let r = c
                .revoke_token(RevokeTokenRequest { id })
                .await
                .map_err(status_err)?
                .into_inner();
            let tok = r.token.unwrap_or_default();
            if json {
                return print_json(&token_json(&tok));
            }
            println!("token {} revoked", tok.id);
        }
        Cmd::Nodes { wide } => {
            let r = c
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                print_json(&serde_json::Value::Array(r.nodes.iter().map(node_json).collect()))?;
            } else {
                emit(&format!("{}\n", nodes_table(&r.nodes, wide)))?;
            }
            // On stderr, so `-o json nodes` stays a plain array of nodes.
            for w in &r.policy_warnings {
                eprintln!("warning: {w}");
            }
        }
        Cmd::Plan(PlanCmd::Replication { file, keep }) => {
            let stores_yaml = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = c
                .plan_replication(PlanRequest { stores_yaml, keep })
                .await
                .map_err(status_err)?
                .into_inner();
            match output {
                Output::Yaml => print!("{}", r.helm_yaml),
                Output::Json => println!("{}", r.json),
                Output::Text => print!("{}", r.text),
            }
        }
        Cmd::Latency { svg } => {
            let m = c.latency(LatencyRequest {}).await.map_err(status_err)?.into_inner();
            if let Some(path) = svg {
                std::fs::write(&path, latency_view::svg(&m)).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("heatmap written to {}", path.display());
            }
            if json {
                let pairs: Vec<serde_json::Value> = m
                    .pairs
                    .iter()
                    .map(|p| {
                        let w = p.window.clone().unwrap_or_default();
                        serde_json::json!({
                            "from": p.from_node, "to": p.to_node,
                            "from_zone": m.zones.get(&p.from_node), "to_zone": m.zones.get(&p.to_node),
                            "start_unix_ms": w.start_unix_ms, "duration_ms": w.duration_ms,
                            "sent": w.sent, "samples": w.samples, "lost": w.lost, "late": w.late,
                            "min_ns": w.min_ns, "p50_ns": w.p50_ns, "p90_ns": w.p90_ns, "p99_ns": w.p99_ns,
                            "max_ns": w.max_ns, "mean_ns": w.mean_ns, "jitter_ns": w.jitter_ns,
                            "timestamping": w.timestamping,
                        })
                    })
                    .collect();
                return print_json(&serde_json::json!({
                    "pairs": pairs, "zones": m.zones, "zone_sources": m.zone_sources, "findings": m.findings,
                }));
            }
            print!(
                "{}",
                latency_view::matrix(&m, std::io::IsTerminal::is_terminal(&std::io::stdout()))
            );
        }
        Cmd::Node(NodeCmd::Show { name }) => {
            let n = c
                .get_node(GetNodeRequest { name })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&node_json(&n));
            }
            let inv = n.inventory.clone().unwrap_or_default();
            let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            for (k, v) in [
                ("name", n.name.clone()),
                ("id", n.id.clone()),
                ("state", n.state.clone()),
                ("overlay-ip", n.overlay_ip.clone()),
                ("underlay-endpoint", n.underlay_endpoint.clone()),
                ("wg-public-key", n.wg_public_key.clone()),
                ("last-seen", ago(n.last_seen_unix)),
                (
                    "last-handshake",
                    if n.handshake_age_secs == 0 {
                        "-".into()
                    } else {
                        format!("{}s ago", n.handshake_age_secs)
                    },
                ),
                ("rx/tx", format!("{} / {} bytes", n.rx_bytes, n.tx_bytes)),
                ("enrolled", when(n.enrolled_at_unix)),
                ("agent-version", n.agent_version.clone()),
                ("hostname", n.hostname.clone()),
                ("machine-id", n.machine_id.clone()),
                ("labels", labels.join(",")),
                ("cpus", inv.cpus.to_string()),
                ("memory", mem(inv.memory_bytes)),
                ("kernel", inv.kernel.clone()),
                ("os", inv.os_release.clone()),
            ] {
                println!("{k:<18} {v}");
            }
            print!("{}", policy_view::placement_section(&n));
            match hardware::document(&n.inventory_document) {
                Some(doc) => {
                    print!("{}", hardware::render(&doc));
                    println!("{:<18} {}", "inventory-updated", when(n.inventory_updated_unix));
                    for c in n.inventory_history.iter().take(5) {
                        println!("{:<18} {} {}", "change", when(c.at_unix), c.changes.join(", "));
                    }
                }
                None => println!("{:<18} not reported yet", "hardware"),
            }
        }
        Cmd::Node(NodeCmd::Accept { name }) => {
            let n = c
                .accept_node(AcceptNodeRequest { name })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&node_json(&n));
            }
            println!(
                "node {} accepted; its tunnel comes up at its next connection attempt",
                n.name
            );
        }
        Cmd::Node(NodeCmd::Revoke { name, reason }) => {
            let r = c
                .revoke_node(RevokeNodeRequest { name, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            let n = r.node.unwrap_or_default();
            if json {
                return print_json(&serde_json::json!({"node": node_json(&n), "was_connected": r.was_connected}));
            }
            let how = if r.was_connected {
                "it was told to stop"
            } else {
                "it was offline and will learn it when it next tries to connect"
            };
            println!("node {} revoked; {how}", n.name);
        }
        Cmd::Bootstrap(BootstrapCmd::Render {
            platform,
            env,
            pool,
            node_name,
            ttl,
            package_url,
            package_sha256,
            package_kind,
            out,
            hosts,
            kernel_url,
            initrd_url,
            seed_url,
            opennebula_cloud_init,
            release_root,
        }) => {
            let args = bootstrap_cmd::RenderArgs {
                platform,
                env,
                pool,
                node_name,
                ttl,
                package_url,
                package_sha256,
                package_kind,
                out: out.clone(),
                hosts,
                kernel_url,
                initrd_url,
                seed_url,
                opennebula_cloud_init,
                release_root,
            };
            let a = bootstrap_cmd::render(&mut c, &args).await?;
            let files: Vec<String> = a.files.iter().map(|(n, _)| n.clone()).collect();
            if json {
                return print_json(&serde_json::json!({
                    "out": out.display().to_string(), "files": files, "secret_files": a.secret_files, "notes": a.notes,
                }));
            }
            println!("wrote {} file(s) to {}:", files.len(), out.display());
            for f in &files {
                let secret = if a.secret_files.contains(f) {
                    "  (holds the join token, 0600)"
                } else {
                    ""
                };
                println!("  {f}{secret}");
            }
            for n in &a.notes {
                println!("note: {n}");
            }
        }
        Cmd::Storage(StorageCmd::Plan { node }) => {
            let n = c
                .get_node(GetNodeRequest { name: node })
                .await
                .map_err(status_err)?
                .into_inner();
            let plan = storage_view::plan(&n)?;
            if json {
                return print_json(&storage_view::json(&n, &plan));
            }
            emit(&storage_view::text(&n, &plan))?;
        }
        Cmd::Rollout(RolloutCmd::Status { watch: true, interval }) => {
            use std::io::IsTerminal;
            let tty = std::io::stdout().is_terminal();
            loop {
                let r = c
                    .get_rollout(GetRolloutRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner();
                if json {
                    println!("{}", serde_json::to_string(&rollout_view::json(&r))?);
                } else {
                    // Redraw in place on a terminal; frames one after the other otherwise (logs, pipes).
                    print!(
                        "{}{}",
                        if tty { "\x1b[2J\x1b[H" } else { "\n" },
                        rollout_view::text(&r, unix_now())
                    );
                }
                std::io::Write::flush(&mut std::io::stdout())?;
                if !r.active {
                    break;
                }
                tokio::time::sleep(interval.max(Duration::from_millis(200))).await;
            }
        }
        Cmd::Rollout(rc) => {
            let r = match rc {
                RolloutCmd::Status { .. } => c.get_rollout(GetRolloutRequest {}).await,
                RolloutCmd::Start {
                    version,
                    canary,
                    max_unavailable,
                    by,
                    pause_after,
                    pause_after_canary,
                    allow_downgrade,
                    max_failures,
                    abort_failure_percent,
                    rollback,
                    arch,
                } => {
                    let pause_after_canary = pause_after_canary || pause_after.is_some();
                    c.start_upgrade(nimbus_proto::StartUpgradeRequest {
                        version,
                        canary,
                        max_unavailable,
                        by,
                        pause_after_canary,
                        allow_downgrade,
                        max_failures,
                        arch,
                        abort_failure_percent,
                        rollback,
                    })
                    .await
                }
                RolloutCmd::Pause { reason } => {
                    c.control_rollout(ControlRolloutRequest {
                        action: "pause".into(),
                        reason,
                    })
                    .await
                }
                RolloutCmd::Resume => {
                    c.control_rollout(ControlRolloutRequest {
                        action: "resume".into(),
                        reason: String::new(),
                    })
                    .await
                }
                RolloutCmd::Abort { reason } => {
                    c.control_rollout(ControlRolloutRequest {
                        action: "abort".into(),
                        reason,
                    })
                    .await
                }
            }
            .map_err(status_err)?
            .into_inner();
            if json {
                return print_json(&rollout_view::json(&r));
            }
            emit(&rollout_view::text(&r, unix_now()))?;
        }
        Cmd::Key(KeyCmd::Rotate { kind, finish, overlap }) => {
            let r = c
                .rotate_key(RotateKeyRequest {
                    kind,
                    phase: if finish { "finish" } else { "start" }.into(),
                    overlap_secs: overlap.map_or(0, |d| d.as_secs().max(1)),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                return print_json(&serde_json::json!({
                    "kind": r.kind, "state": r.state, "new_key": r.new_key, "old_key": r.old_key,
                    "retire_at_unix": r.retire_at_unix, "agents_notified": r.agents_notified,
                }));
            }
            let mut text = format!("{} rotation: {}\n  new: {}\n", r.kind, r.state, r.new_key);
            if !r.old_key.is_empty() {
                text.push_str(&format!("  old: {}\n", r.old_key));
            }
            if r.retire_at_unix > 0 {
                text.push_str(&format!(
                    "  old key accepted until {} (finish earlier with `nimbusctl key rotate {} --finish`)\n",
                    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(r.retire_at_unix)),
                    r.kind
                ));
            }
            if r.kind == "wireguard" && r.state == "overlap" {
                text.push_str(&format!("  agents told: {}\n", r.agents_notified));
            }
            emit(&text)?;
        }
        Cmd::Replicas => {
            let r = c
                .list_replicas(ListReplicasRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            if output == Output::Json {
                let rows: Vec<serde_json::Value> = r
                    .replicas
                    .iter()
                    .map(|x| {
                        serde_json::json!({
                            "id": x.id, "overlay_ip": x.overlay_ip, "wg_endpoint": x.wg_endpoint,
                            "enroll_endpoint": x.enroll_endpoint, "leader": x.leader, "this": x.this, "agents": x.agents,
                        })
                    })
                    .collect();
                return print_json(&serde_json::Value::Array(rows));
            }
            let mut text = format!(
                "{:<28} {:<16} {:<22} {:<22} {:>7}  ROLE\n",
                "REPLICA", "OVERLAY", "WIREGUARD", "ENROLL", "AGENTS"
            );
            for x in &r.replicas {
                let mut role = if x.leader { "leader" } else { "follower" }.to_string();
                if x.this {
                    role.push_str(" (answered)");
                }
                text.push_str(&format!(
                    "{:<28} {:<16} {:<22} {:<22} {:>7}  {role}\n",
                    x.id, x.overlay_ip, x.wg_endpoint, x.enroll_endpoint, x.agents
                ));
            }
            if r.leader.is_empty() {
                text.push_str("no leader known right now (an election is under way, or etcd is unreachable)\n");
            }
            emit(&text)?;
        }
        Cmd::Whoami => {
            let me = c.who_am_i(WhoAmIRequest {}).await.map_err(status_err)?.into_inner();
            if output == Output::Json {
                return print_json(&serde_json::json!({
                    "kind": me.kind, "subject": me.subject, "roles": me.roles, "from": me.from,
                }));
            }
            emit(&format!(
                "{}:{}\nroles: {}\nfrom: {}\n",
                me.kind,
                me.subject,
                me.roles.join(", "),
                me.from
            ))?;
        }
        Cmd::Policy(_)
        | Cmd::Diff { .. }
        | Cmd::Apply { .. }
        | Cmd::Rollback { .. }
        | Cmd::Audit(_)
        | Cmd::Node(NodeCmd::Decommission { .. }) => {
            bail!("internal error: policy and audit commands are handled by run()")
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<InvalidPolicy>() {
            Some(InvalidPolicy(diagnostics)) => {
                eprintln!("{}", diagnostics.trim_end());
                ExitCode::from(policy_view::EX_DATAERR)
            }
            None => {
                eprintln!("nimbusctl: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_parses_policy_commands() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["nimbusctl", "apply", "-f", "p.yaml", "--allow-disruptive"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Apply { allow_disruptive: true, ref file } if file == Path::new("p.yaml")));
        let cli = Cli::try_parse_from(["nimbusctl", "rollback", "--to", "3", "--dry-run"]).unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Rollback {
                to: 3,
                dry_run: true,
                allow_disruptive: false
            }
        ));
        let cli = Cli::try_parse_from(["nimbusctl", "policy", "show"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Policy(PolicyCmd::Show { revision: 0 })));
        assert!(
            Cli::try_parse_from(["nimbusctl", "rollback"]).is_err(),
            "--to is required"
        );
        assert!(Cli::try_parse_from(["nimbusctl", "diff"]).is_err(), "-f is required");
        let cli = Cli::try_parse_from([
            "nimbusctl",
            "rollout",
            "start",
            "--version",
            "0.2.0",
            "--max-unavailable",
            "10%",
            "--by",
            "zone",
            "--pause-after",
            "canary",
        ])
        .unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Rollout(RolloutCmd::Start { ref pause_after, canary: 1, ref by, .. })
                if pause_after.as_deref() == Some("canary") && by == "zone"
        ));
        assert!(
            Cli::try_parse_from([
                "nimbusctl",
                "rollout",
                "start",
                "--version",
                "1.0.0",
                "--pause-after",
                "wave"
            ])
            .is_err()
        );
    }

    #[test]
    fn invalid_argument_becomes_exit_65() {
        let e = policy_status_err(tonic::Status::invalid_argument("p.yaml:1:1: bad (hint: fix)"));
        assert_eq!(
            e.downcast_ref::<InvalidPolicy>().map(|i| i.0.as_str()),
            Some("p.yaml:1:1: bad (hint: fix)")
        );
        let e = policy_status_err(tonic::Status::not_found("no revision 9"));
        assert!(e.downcast_ref::<InvalidPolicy>().is_none());
        assert_eq!(e.to_string(), "no revision 9");
    }

    #[test]
    fn ages() {
        assert_eq!(ago_at(0, 100), "never");
        assert_eq!(ago_at(100, 159), "59s ago");
        assert_eq!(ago_at(100, 100 + 7200), "2h ago");
        assert_eq!(ago_at(100, 100 + 3 * 86400), "3d ago");
    }

    #[test]
    fn nodes_table_puts_placement_after_state() {
        let n = Node {
            name: "db-1".into(),
            id: "n1".into(),
            overlay_ip: "100.64.0.2".into(),
            state: "connected".into(),
            agent_version: "0.1.0".into(),
            placement: Some(Placement {
                environment: "production".into(),
                pool: "fast-nvme".into(),
                cohorts: vec!["hub-enclave".into(), "storage".into()],
                ..Default::default()
            }),
            convergence: "converged".into(),
            ..Default::default()
        };
        let unplaced = Node {
            name: "x".into(),
            id: "n2".into(),
            state: "lost".into(),
            ..Default::default()
        };
        let lines: Vec<String> = nodes_table(&[n.clone(), unplaced.clone()], false)
            .to_string()
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect();
        assert_eq!(
            lines,
            [
                " NAME  ID  OVERLAY-IP  STATE      ENV         POOL       COHORTS              LAST-SEEN  VERSION  CPUS  MEMORY",
                " db-1  n1  100.64.0.2  connected  production  fast-nvme  hub-enclave,storage  never      0.1.0    -     -",
                " x     n2              lost       -           -          -                    never               -     -",
            ]
        );
        let wide = nodes_table(&[n, unplaced], true).to_string();
        let header = wide.lines().next().unwrap_or_default();
        assert!(
            header
                .trim_end()
                .ends_with("PLATFORM  INSTANCE-TYPE  ZONE  DISKS  CONVERGED"),
            "{wide}"
        );
        assert!(
            wide.lines()
                .nth(1)
                .unwrap_or_default()
                .trim_end()
                .ends_with("-      yes"),
            "{wide}"
        );
    }
}
