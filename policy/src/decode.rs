//! YAML nodes (with positions) → model values plus the positions validation needs. Every field is visited
//! and every problem reported, so one run lists all of them; an entry missing its name is dropped after its
//! other fields were checked, an invalid value is replaced by a placeholder (the caller never returns a
//! policy when anything was reported).

use std::collections::{BTreeMap, BTreeSet};

use inventory::PlatformKind;
use marked_yaml::Node;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, Span};

use crate::diagnostic::{Pos, Sink};
use crate::model::{
    Cohort, Credentials, DiskSelector, Environment, EnvironmentMatch, KubeadmApi, Kubernetes, Pool, PoolMatch,
    StorageLayout, StorageProfile, Taint, TaintEffect,
};
use crate::syntax::{self, Problem};

pub(crate) const TOP_FIELDS: &[&str] = &["version", "environments", "pools", "cohorts"];
pub(crate) const ENV_FIELDS: &[&str] = &["name", "match", "kubernetes"];
pub(crate) const ENV_MATCH_FIELDS: &[&str] = &["labels"];
pub(crate) const KUBERNETES_FIELDS: &[&str] = &[
    "api_endpoint",
    "ca_cert_hash",
    "kubeadm_api",
    "credentials",
    "join_token_command",
];
pub(crate) const CREDENTIALS_FIELDS: &[&str] = &["kubeconfig", "token_command"];
pub(crate) const POOL_FIELDS: &[&str] = &[
    "name",
    "environments",
    "match",
    "min",
    "max",
    "max_unavailable",
    "labels",
    "storage",
];
pub(crate) const STORAGE_FIELDS: &[&str] = &[
    "name",
    "disks",
    "layout",
    "filesystem",
    "mount_point",
    "mount_options",
    "labels",
    "wipe",
];
pub(crate) const DISK_SELECTOR_FIELDS: &[&str] = &["class", "transport", "min_size", "model", "by_id", "max_disks"];
/// Disk classes as the inventory serializes them (`removable` and `unknown` are never chosen).
pub(crate) const DISK_CLASSES: &[(&str, inventory::DiskClass)] = &[
    ("local-instance-store", inventory::DiskClass::LocalInstanceStore),
    ("local", inventory::DiskClass::Local),
    ("network-volume", inventory::DiskClass::NetworkVolume),
    ("virtual-disk", inventory::DiskClass::VirtualDisk),
    ("logical", inventory::DiskClass::Logical),
];
pub(crate) const TRANSPORTS: &[(&str, inventory::Transport)] = &[
    ("nvme", inventory::Transport::Nvme),
    ("sata", inventory::Transport::Sata),
    ("sas", inventory::Transport::Sas),
    ("scsi", inventory::Transport::Scsi),
    ("virtio", inventory::Transport::Virtio),
    ("xen", inventory::Transport::Xen),
    ("iscsi", inventory::Transport::Iscsi),
    ("loop", inventory::Transport::Loop),
];
/// Mount points under these are refused (system directories).
const SYSTEM_DIRS: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr",
];
pub(crate) const POOL_MATCH_FIELDS: &[&str] = &[
    "platform",
    "instance_type",
    "min_cpus",
    "min_memory",
    "local_nvme",
    "zone",
    "labels",
];
pub(crate) const COHORT_FIELDS: &[&str] = &["name", "pools", "labels", "taints", "anti_affinity"];
pub(crate) const TAINT_FIELDS: &[&str] = &["key", "value", "effect"];

/// Platform names as the inventory serializes them.
pub(crate) const PLATFORMS: &[(&str, PlatformKind)] = &[
    ("aws", PlatformKind::Aws),
    ("azure", PlatformKind::Azure),
    ("opennebula", PlatformKind::Opennebula),
    ("vmware", PlatformKind::Vmware),
    ("baremetal", PlatformKind::Baremetal),
    ("other-virtual", PlatformKind::OtherVirtual),
];

/// Positions of one environment.
#[derive(Debug, Clone, Default)]
pub(crate) struct EnvPos {
    pub at: Pos,
    pub name: Pos,
    pub selector: Pos,
    /// `match` decoded without problems (overlap checks skip entries with placeholder rules).
    pub selector_ok: bool,
}

/// Positions of one pool; list positions are aligned with the decoded values.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolPos {
    pub at: Pos,
    pub name: Pos,
    pub environments: Vec<Pos>,
    pub selector: Pos,
    /// `match` decoded without problems (overlap checks skip entries with placeholder rules).
    pub selector_ok: bool,
    pub max: Pos,
    pub labels: BTreeMap<String, Pos>,
}

/// Positions of one cohort; list positions are aligned with the decoded values.
#[derive(Debug, Clone, Default)]
pub(crate) struct CohortPos {
    pub at: Pos,
    pub name: Pos,
    pub pools: Vec<Pos>,
    pub labels: BTreeMap<String, Pos>,
    pub taints: Vec<Pos>,
    pub anti_affinity: Vec<Pos>,
}

/// The decoded document, in file order.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub version: u32,
    pub environments: Vec<(Environment, EnvPos)>,
    pub pools: Vec<(Pool, PoolPos)>,
    pub cohorts: Vec<(Cohort, CohortPos)>,
}

fn span_pos(span: &Span) -> Pos {
    span.start().map(|m| Pos::new(m.line(), m.column())).unwrap_or_default()
}

/// Where a node starts. A block mapping's own mark is where the loader saw its first value, so the first
/// key's position is used when it comes earlier.
pub(crate) fn node_pos(n: &Node) -> Pos {
    match n {
        Node::Mapping(m) => {
            let own = span_pos(m.span());
            match m.keys().next() {
                Some(k) if own == Pos::default() => span_pos(k.span()),
                Some(k) => own.min(span_pos(k.span())),
                None => own,
            }
        }
        _ => span_pos(n.span()),
    }
}

/// A plain `~`, `null` or empty scalar: the field is treated as absent.
fn is_null(n: &Node) -> bool {
    match n {
        Node::Scalar(s) => s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"),
        _ => false,
    }
}

fn kind_of(n: &Node) -> &'static str {
    match n {
        Node::Scalar(_) => "a string",
        Node::Mapping(_) => "a mapping",
        Node::Sequence(_) => "a list",
    }
}

/// A field's value with the position of its key (used when the value is empty and has no position of its own).
#[derive(Clone, Copy)]
struct Field<'n> {
    key: Pos,
    node: &'n Node,
}

impl Field<'_> {
    fn pos(&self) -> Pos {
        match self.node {
            Node::Scalar(s) if s.as_str().is_empty() => self.key,
            n => node_pos(n),
        }
    }
}

struct MapView<'n> {
    map: &'n MarkedMappingNode,
    pos: Pos,
}

impl<'n> MapView<'n> {
    fn entry(&self, key: &str) -> Option<(&'n MarkedScalarNode, &'n Node)> {
        self.map.iter().find(|(k, _)| k.as_str() == key)
    }

    /// The field, unless absent or null.
    fn get(&self, key: &str) -> Option<Field<'n>> {
        let (k, v) = self.entry(key)?;
        (!is_null(v)).then(|| Field {
            key: span_pos(k.span()),
            node: v,
        })
    }
}

/// What [`Dec::argv`] checks beyond "a list of strings whose program is not empty".
#[derive(Clone, Copy, PartialEq, Eq)]
enum ArgvRules {
    /// `credentials.token_command`: nothing more (the program may be found on `PATH`, as in
    /// `[aws, eks, get-token, ...]`; kept as it was so existing policies stay valid).
    Token,
    /// `join_token_command`: the program is an absolute path and no argument is empty.
    Strict,
}

fn quote_list(names: &[&str]) -> String {
    names.join(", ")
}

struct Dec<'s> {
    sink: &'s mut Sink,
}

impl Dec<'_> {
    fn problem(&mut self, pos: Pos, p: Problem) {
        self.sink.error(pos, p.message, p.hint);
    }

    fn error(&mut self, pos: Pos, message: String, hint: impl Into<String>) {
        self.sink.error(pos, message, hint);
    }

    fn type_error(&mut self, pos: Pos, want: &str, what: &str, found: &Node) {
        let hint = match want {
            "a mapping" => "write `key: value` pairs indented below the field, or { key: value }",
            "a list" => "write [a, b] or one `- item` per line",
            _ => "write a single value",
        };
        self.error(
            pos,
            format!("expected {want} for {what}, found {}", kind_of(found)),
            hint,
        );
    }

    /// A mapping node; `what` names it in messages (`` `match` in pool "x" ``, `environment #2`).
    fn map<'n>(&mut self, node: &'n Node, pos: Pos, what: &str) -> Option<MapView<'n>> {
        match node {
            Node::Mapping(m) => Some(MapView {
                map: m,
                pos: node_pos(node),
            }),
            other => {
                self.type_error(pos, "a mapping", what, other);
                None
            }
        }
    }

    fn field_map<'n>(&mut self, f: Field<'n>, field: &str, ctx: &str) -> Option<MapView<'n>> {
        self.map(f.node, f.pos(), &format!("`{field}` in {ctx}"))
    }

    fn unknown(&mut self, m: &MapView<'_>, ctx: &str, allowed: &[&str]) {
        for k in m.map.keys() {
            if !allowed.contains(&k.as_str()) {
                self.error(
                    span_pos(k.span()),
                    format!("unknown field `{}` in {ctx}", k.as_str()),
                    format!("allowed fields: {}", quote_list(allowed)),
                );
            }
        }
    }

    fn required<'n>(&mut self, m: &MapView<'n>, field: &str, ctx: &str, hint: &str) -> Option<Field<'n>> {
        let f = m.get(field);
        if f.is_none() {
            let pos = m.entry(field).map_or(m.pos, |(k, _)| span_pos(k.span()));
            self.error(pos, format!("missing field `{field}` in {ctx}"), hint);
        }
        f
    }

    fn string(&mut self, f: Field<'_>, field: &str, ctx: &str) -> Option<(String, Pos)> {
        match f.node {
            Node::Scalar(s) => Some((s.as_str().to_string(), f.pos())),
            other => {
                self.type_error(f.pos(), "a string", &format!("`{field}` in {ctx}"), other);
                None
            }
        }
    }

    fn uint(&mut self, f: Field<'_>, field: &str, ctx: &str) -> Option<u32> {
        let (s, pos) = self.string(f, field, ctx)?;
        let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match s.parse::<u32>() {
            Ok(n) if ok => Some(n),
            _ => {
                self.error(
                    pos,
                    format!("invalid number {s:?} for `{field}` in {ctx}"),
                    "write a whole number such as 3",
                );
                None
            }
        }
    }

    fn boolean(&mut self, f: Field<'_>, field: &str, ctx: &str) -> Option<bool> {
        let (s, pos) = self.string(f, field, ctx)?;
        match s.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                self.error(
                    pos,
                    format!("expected true or false for `{field}` in {ctx}, found {s:?}"),
                    "write true or false",
                );
                None
            }
        }
    }

    /// A list of strings, in order (duplicates kept: argv may repeat).
    fn strings(&mut self, f: Field<'_>, field: &str, ctx: &str) -> Option<Vec<(String, Pos)>> {
        let Node::Sequence(seq) = f.node else {
            self.type_error(f.pos(), "a list", &format!("`{field}` in {ctx}"), f.node);
            return None;
        };
        let mut out = Vec::new();
        for item in seq.iter() {
            match item {
                Node::Scalar(s) => out.push((s.as_str().to_string(), node_pos(item))),
                other => self.type_error(
                    node_pos(item),
                    "a string",
                    &format!("an entry of `{field}` in {ctx}"),
                    other,
                ),
            }
        }
        Some(out)
    }

    /// A command's argv (run without a shell): a list of strings whose first entry, the program, is not empty.
    /// [`ArgvRules::Strict`] also wants the program as an absolute path and no empty argument. `field` names
    /// the list in messages, `ctx` the entry it belongs to (`environment "prod"`), `fctx` the mapping holding
    /// it; `example` is shown in the hint of an empty list.
    fn argv(
        &mut self,
        f: Field<'_>,
        field: &str,
        fctx: &str,
        ctx: &str,
        rules: ArgvRules,
        example: &str,
    ) -> Option<Vec<String>> {
        let total = match f.node {
            Node::Sequence(seq) => seq.len(),
            _ => 0,
        };
        let argv = self.strings(f, field, fctx)?;
        if argv.first().is_none_or(|(a, _)| a.is_empty()) {
            self.error(
                f.pos(),
                format!("{field} of {ctx} is empty"),
                format!("give the command and its arguments, e.g. {example}"),
            );
        } else if rules == ArgvRules::Strict && argv.len() == total {
            // Only when every entry is a string: otherwise the indices below would be off.
            for (i, (arg, pos)) in argv.iter().enumerate() {
                if i == 0 && !arg.starts_with('/') {
                    self.error(
                        *pos,
                        format!("program {arg:?} of {field} of {ctx} is not an absolute path"),
                        "write the program's absolute path, e.g. /usr/local/bin/mint-join-token",
                    );
                } else if i > 0 && arg.is_empty() {
                    self.error(
                        *pos,
                        format!("argument #{i} of {field} of {ctx} is empty"),
                        "remove it or write the argument (the command runs without a shell)",
                    );
                }
            }
        }
        Some(argv.into_iter().map(|(a, _)| a).collect())
    }

    /// A list of strings that is a set: must not be empty (when `non_empty_hint` is given) and must not repeat.
    fn string_set(
        &mut self,
        f: Field<'_>,
        field: &str,
        ctx: &str,
        empty: Option<(String, &str)>,
    ) -> Option<Vec<(String, Pos)>> {
        let items = self.strings(f, field, ctx)?;
        if items.is_empty()
            && let Some((message, hint)) = empty
        {
            self.error(f.pos(), message, hint);
        }
        let mut seen = BTreeSet::new();
        for (v, pos) in &items {
            if !seen.insert(v.as_str()) {
                self.error(
                    *pos,
                    format!("{v:?} is listed twice in `{field}` of {ctx}"),
                    "remove the repeated entry",
                );
            }
        }
        Some(items)
    }

    /// A mapping of strings to strings (null values read as empty strings).
    fn string_map(&mut self, f: Field<'_>, field: &str, ctx: &str) -> Vec<(String, Pos, String, Pos)> {
        let Some(m) = self.field_map(f, field, ctx) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in m.map.iter() {
            let kpos = span_pos(k.span());
            match v {
                _ if is_null(v) => out.push((k.as_str().to_string(), kpos, String::new(), kpos)),
                Node::Scalar(s) => out.push((k.as_str().to_string(), kpos, s.as_str().to_string(), node_pos(v))),
                other => self.type_error(
                    node_pos(other),
                    "a string",
                    &format!("{} in `{field}` of {ctx}", k.as_str()),
                    other,
                ),
            }
        }
        out
    }

    /// Labels a node must carry (enrollment labels): Kubernetes syntax only.
    fn match_labels(&mut self, f: Field<'_>, ctx: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, kpos, v, vpos) in self.string_map(f, "labels", ctx) {
            let key_ok = syntax::check_label_key("label", &k)
                .map_err(|p| self.problem(kpos, p))
                .is_ok();
            if key_ok && let Err(p) = syntax::check_label_value("label", &k, &v) {
                self.problem(vpos, p);
            }
            out.insert(k, v);
        }
        out
    }

    /// Labels the policy puts on nodes: Kubernetes syntax and the `polynimbus.io/` rule.
    fn node_labels(&mut self, f: Field<'_>, ctx: &str) -> (BTreeMap<String, String>, BTreeMap<String, Pos>) {
        let mut out = BTreeMap::new();
        let mut pos = BTreeMap::new();
        for (k, kpos, v, vpos) in self.string_map(f, "labels", ctx) {
            let key_ok = syntax::check_node_key("label", &k)
                .map_err(|p| self.problem(kpos, p))
                .is_ok();
            if key_ok && let Err(p) = syntax::check_label_value("label", &k, &v) {
                self.problem(vpos, p);
            }
            pos.insert(k.clone(), kpos);
            out.insert(k, v);
        }
        (out, pos)
    }

    fn name(&mut self, m: &MapView<'_>, kind: &str, generic: &str) -> Option<(String, Pos)> {
        let f = self.required(m, "name", generic, &format!("every {kind} needs a unique name"))?;
        let (name, pos) = self.string(f, "name", generic)?;
        if let Err(p) = syntax::check_name(kind, &name) {
            self.problem(pos, p);
        }
        Some((name, pos))
    }
}

/// Decode the whole document. `root` is the top-level node.
pub(crate) fn decode(sink: &mut Sink, root: &Node) -> Decoded {
    let mut d = Dec { sink };
    let mut out = Decoded::default();
    let root_pos = node_pos(root);
    let Some(top) = d.map(root, root_pos, "the policy") else {
        return out;
    };
    d.unknown(&top, "the policy", TOP_FIELDS);
    let ctx = "the policy";
    if let Some(f) = d.required(&top, "version", ctx, "add `version: 1` at the top of the file")
        && let Some(v) = d.uint(f, "version", ctx)
    {
        if v != crate::model::POLICY_VERSION {
            d.error(
                f.pos(),
                format!("unsupported policy version {v}"),
                "this release understands version 1; write `version: 1`",
            );
        }
        out.version = v;
    }

    let no_envs = (
        "the policy defines no environments",
        "add `environments:` with at least one environment",
    );
    match top.get("environments") {
        None => d.error(top.pos, no_envs.0.to_string(), no_envs.1),
        Some(f) => {
            if let Some(items) = list(&mut d, f, "environments", no_envs) {
                for (i, item) in items.iter().enumerate() {
                    if let Some(e) = environment(&mut d, i + 1, item) {
                        out.environments.push(e);
                    }
                }
            }
        }
    }

    let no_pools = ("the policy defines no pools", "add `pools:` with at least one pool");
    match top.get("pools") {
        None => d.error(top.pos, no_pools.0.to_string(), no_pools.1),
        Some(f) => {
            if let Some(items) = list(&mut d, f, "pools", no_pools) {
                for (i, item) in items.iter().enumerate() {
                    if let Some(p) = pool(&mut d, i + 1, item) {
                        out.pools.push(p);
                    }
                }
            }
        }
    }

    if let Some(f) = top.get("cohorts") {
        let Node::Sequence(seq) = f.node else {
            d.type_error(f.pos(), "a list", "`cohorts` in the policy", f.node);
            return out;
        };
        for (i, item) in seq.iter().enumerate() {
            if let Some(c) = cohort(&mut d, i + 1, item) {
                out.cohorts.push(c);
            }
        }
    }
    out
}

/// A top-level list that must not be empty.
fn list<'n>(d: &mut Dec<'_>, f: Field<'n>, field: &str, empty: (&str, &str)) -> Option<&'n [Node]> {
    let Node::Sequence(seq) = f.node else {
        d.type_error(f.pos(), "a list", &format!("`{field}` in the policy"), f.node);
        return None;
    };
    if seq.is_empty() {
        d.error(f.pos(), empty.0.to_string(), empty.1);
    }
    Some(seq.as_slice())
}

fn environment(d: &mut Dec<'_>, idx: usize, node: &Node) -> Option<(Environment, EnvPos)> {
    let generic = format!("environment #{idx}");
    let m = d.map(node, node_pos(node), &generic)?;
    let name = d.name(&m, "environment", &generic);
    let ctx = name.as_ref().map_or(generic, |(n, _)| format!("environment {n:?}"));
    d.unknown(&m, &ctx, ENV_FIELDS);
    let mut pos = EnvPos {
        at: m.pos,
        name: name.as_ref().map_or(m.pos, |(_, p)| *p),
        selector: m.pos,
        selector_ok: false,
    };

    let mut selector = EnvironmentMatch::default();
    if let Some(f) = d.required(
        &m,
        "match",
        &ctx,
        "add `match: { labels: { env: <name> } }` naming the enrollment labels of its nodes",
    ) {
        pos.selector = f.pos();
        let before = d.sink.diags.len();
        let mctx = format!("match of {ctx}");
        if let Some(mm) = d.field_map(f, "match", &ctx) {
            d.unknown(&mm, &mctx, ENV_MATCH_FIELDS);
            if let Some(lf) = mm.get("labels") {
                selector.labels = d.match_labels(lf, &mctx);
            }
        }
        pos.selector_ok = d.sink.diags.len() == before;
    }

    let mut kubernetes = Kubernetes {
        api_endpoint: String::new(),
        ca_cert_hash: String::new(),
        kubeadm_api: KubeadmApi::default(),
        credentials: Credentials::Kubeconfig(String::new()),
        join_token_command: None,
    };
    if let Some(f) = d.required(
        &m,
        "kubernetes",
        &ctx,
        "add `kubernetes:` with api_endpoint, ca_cert_hash and credentials",
    ) && let Some(km) = d.field_map(f, "kubernetes", &ctx)
    {
        kubernetes = decode_kubernetes(d, &km, &format!("kubernetes of {ctx}"), &ctx);
    }

    let (name, _) = name?;
    Some((
        Environment {
            name,
            selector,
            kubernetes,
        },
        pos,
    ))
}

fn decode_kubernetes(d: &mut Dec<'_>, km: &MapView<'_>, kctx: &str, ctx: &str) -> Kubernetes {
    d.unknown(km, kctx, KUBERNETES_FIELDS);
    let mut k = Kubernetes {
        api_endpoint: String::new(),
        ca_cert_hash: String::new(),
        kubeadm_api: KubeadmApi::default(),
        credentials: Credentials::Kubeconfig(String::new()),
        join_token_command: None,
    };
    if let Some(f) = d.required(
        km,
        "api_endpoint",
        kctx,
        "add the API server's host:port, e.g. 10.0.0.10:6443",
    ) && let Some((s, pos)) = d.string(f, "api_endpoint", kctx)
    {
        if let Err(p) = syntax::check_endpoint(&s) {
            d.problem(pos, p);
        }
        k.api_endpoint = s;
    }
    if let Some(f) = d.required(
        km,
        "ca_cert_hash",
        kctx,
        "add the cluster CA hash as kubeadm prints it: sha256:<64 hex digits>",
    ) && let Some((s, pos)) = d.string(f, "ca_cert_hash", kctx)
    {
        if let Err(p) = syntax::check_ca_cert_hash(&s) {
            d.problem(pos, p);
        }
        k.ca_cert_hash = s.to_ascii_lowercase();
    }
    if let Some(f) = km.get("kubeadm_api")
        && let Some((s, pos)) = d.string(f, "kubeadm_api", kctx)
    {
        match s.as_str() {
            "v1beta3" => k.kubeadm_api = KubeadmApi::V1beta3,
            "v1beta4" => k.kubeadm_api = KubeadmApi::V1beta4,
            _ => d.error(
                pos,
                format!("unsupported kubeadm_api {s:?} in {ctx}"),
                "one of v1beta3 (kubeadm 1.22-1.30) or v1beta4 (1.31 and later, the default)",
            ),
        }
    }
    let cred_hint =
        "give exactly one: { kubeconfig: /etc/nimbus/envs/<env>.kubeconfig } or { token_command: [argv...] }";
    if let Some(f) = d.required(km, "credentials", kctx, cred_hint)
        && let Some(cm) = d.field_map(f, "credentials", kctx)
    {
        let cctx = format!("credentials of {ctx}");
        d.unknown(&cm, &cctx, CREDENTIALS_FIELDS);
        let kubeconfig = cm.get("kubeconfig");
        let command = cm.get("token_command");
        match (kubeconfig, command) {
            (Some(_), Some(_)) => d.error(
                f.pos(),
                format!("{cctx} name both kubeconfig and token_command"),
                cred_hint,
            ),
            (None, None) => d.error(
                f.pos(),
                format!("{cctx} name neither kubeconfig nor token_command"),
                cred_hint,
            ),
            (Some(kf), None) => {
                if let Some((path, pos)) = d.string(kf, "kubeconfig", &cctx) {
                    if !path.starts_with('/') {
                        d.error(
                            pos,
                            format!("kubeconfig path {path:?} of {ctx} is not absolute"),
                            "write an absolute path such as /etc/nimbus/envs/production.kubeconfig",
                        );
                    }
                    k.credentials = Credentials::Kubeconfig(path);
                }
            }
            (None, Some(cf)) => {
                if let Some(argv) = d.argv(
                    cf,
                    "token_command",
                    &cctx,
                    ctx,
                    ArgvRules::Token,
                    "[aws, eks, get-token, --cluster-name, prod]",
                ) {
                    k.credentials = Credentials::TokenCommand(argv);
                }
            }
        }
    }
    if let Some(f) = km.get("join_token_command") {
        k.join_token_command = d.argv(
            f,
            "join_token_command",
            kctx,
            ctx,
            ArgvRules::Strict,
            "[/usr/local/bin/mint-join-token, --cluster, prod]",
        );
    }
    k
}

fn pool(d: &mut Dec<'_>, idx: usize, node: &Node) -> Option<(Pool, PoolPos)> {
    let generic = format!("pool #{idx}");
    let m = d.map(node, node_pos(node), &generic)?;
    let name = d.name(&m, "pool", &generic);
    let ctx = name.as_ref().map_or(generic, |(n, _)| format!("pool {n:?}"));
    d.unknown(&m, &ctx, POOL_FIELDS);
    let mut pos = PoolPos {
        at: m.pos,
        name: name.as_ref().map_or(m.pos, |(_, p)| *p),
        selector: m.pos,
        max: m.pos,
        ..PoolPos::default()
    };
    let mut p = Pool {
        name: String::new(),
        environments: None,
        selector: PoolMatch::default(),
        min: 0,
        max: None,
        max_unavailable: 1,
        labels: BTreeMap::new(),
        storage: Vec::new(),
    };

    if let Some(f) = m.get("environments") {
        let empty = (
            format!("`environments` of {ctx} is empty"),
            "omit the key to allow every environment, or list at least one",
        );
        if let Some(envs) = d.string_set(f, "environments", &ctx, Some(empty)) {
            pos.environments = envs.iter().map(|(_, p)| *p).collect();
            p.environments = Some(envs.into_iter().map(|(e, _)| e).collect());
        }
    }
    if let Some(f) = d.required(
        &m,
        "match",
        &ctx,
        "add `match:` with the rules its nodes satisfy (platform, instance_type, min_cpus, min_memory, local_nvme, \
         zone, labels)",
    ) {
        pos.selector = f.pos();
        let before = d.sink.diags.len();
        if let Some(mm) = d.field_map(f, "match", &ctx) {
            p.selector = pool_match(d, &mm, &format!("match of {ctx}"));
        }
        pos.selector_ok = d.sink.diags.len() == before;
    }
    if let Some(f) = m.get("min") {
        p.min = d.uint(f, "min", &ctx).unwrap_or(0);
    }
    if let Some(f) = m.get("max") {
        pos.max = f.pos();
        p.max = d.uint(f, "max", &ctx);
    }
    if let Some(f) = m.get("max_unavailable") {
        p.max_unavailable = d.uint(f, "max_unavailable", &ctx).unwrap_or(1);
        if p.max_unavailable == 0 {
            d.error(
                f.pos(),
                format!("max_unavailable of {ctx} is 0"),
                "at least one node must be allowed to roll at a time; the default is 1",
            );
        }
    }
    if let Some(f) = m.get("labels") {
        (p.labels, pos.labels) = d.node_labels(f, &ctx);
    }
    if let Some(f) = m.get("storage") {
        p.storage = storage_profiles(d, f, &ctx);
    }
    p.name = name?.0;
    Some((p, pos))
}

/// `storage:` of a pool: a list of profiles with unique names and mount points.
fn storage_profiles(d: &mut Dec<'_>, f: Field<'_>, pctx: &str) -> Vec<StorageProfile> {
    let Node::Sequence(seq) = f.node else {
        d.type_error(f.pos(), "a list", &format!("`storage` in {pctx}"), f.node);
        return Vec::new();
    };
    let mut out: Vec<StorageProfile> = Vec::new();
    for (i, item) in seq.iter().enumerate() {
        let Some((profile, name_pos, mount_pos)) = storage_profile(d, i + 1, item, pctx) else {
            continue;
        };
        if out.iter().any(|o| o.name == profile.name) {
            d.error(
                name_pos,
                format!("storage profile {:?} appears twice in {pctx}", profile.name),
                "give each profile of a pool its own name",
            );
        }
        if !profile.mount_point.is_empty() && out.iter().any(|o| o.mount_point == profile.mount_point) {
            d.error(
                mount_pos,
                format!("mount point {} is used twice in {pctx}", profile.mount_point),
                "give each storage profile its own mount point",
            );
        }
        out.push(profile);
    }
    out
}

fn storage_profile(d: &mut Dec<'_>, idx: usize, node: &Node, pctx: &str) -> Option<(StorageProfile, Pos, Pos)> {
    let generic = format!("storage profile #{idx} of {pctx}");
    let m = d.map(node, node_pos(node), &generic)?;
    let name = d.name(&m, "storage profile", &generic);
    let ctx = name
        .as_ref()
        .map_or(generic, |(n, _)| format!("storage profile {n:?} of {pctx}"));
    d.unknown(&m, &ctx, STORAGE_FIELDS);
    let mut ok = true;
    let mut disks = DiskSelector::default();
    match d.required(
        &m,
        "disks",
        &ctx,
        "add `disks:` with the rules the disks satisfy (class, transport, min_size, model, max_disks), e.g.          { class: [local-instance-store] }",
    ) {
        Some(f) => match d.field_map(f, "disks", &ctx) {
            Some(dm) => disks = disk_selector(d, &dm, &format!("disks of {ctx}")),
            None => ok = false,
        },
        None => ok = false,
    }
    let mut layout = StorageLayout::PerDisk;
    if let Some(f) = m.get("layout")
        && let Some((s, pos)) = d.string(f, "layout", &ctx)
    {
        match StorageLayout::ALL.into_iter().find(|l| l.as_str() == s) {
            Some(l) => layout = l,
            None => d.error(
                pos,
                format!("unknown layout {s:?} in {ctx}"),
                "one of per-disk, lvm, raid0",
            ),
        }
    }
    let mut filesystem = storage::Filesystem::Xfs;
    if let Some(f) = m.get("filesystem")
        && let Some((s, pos)) = d.string(f, "filesystem", &ctx)
    {
        match s.as_str() {
            "xfs" => filesystem = storage::Filesystem::Xfs,
            "ext4" => filesystem = storage::Filesystem::Ext4,
            _ => d.error(pos, format!("unknown filesystem {s:?} in {ctx}"), "one of xfs, ext4"),
        }
    }
    let mut mount_point = String::new();
    let mut mount_pos = m.pos;
    match m.get("mount_point") {
        Some(f) => {
            if let Some((s, pos)) = d.string(f, "mount_point", &ctx) {
                mount_pos = pos;
                match check_mount_point(&s) {
                    Ok(()) => mount_point = s,
                    Err(hint) => d.error(pos, format!("mount point {s:?} of {ctx} is not usable"), hint),
                }
            }
        }
        None if layout == StorageLayout::Lvm => {}
        None => d.error(
            m.pos,
            format!("missing field `mount_point` in {ctx}"),
            "add e.g. `mount_point: /var/lib/nimbus/volumes/fast` (only an lvm layout may omit it: the volume              group is then left to a CSI driver)",
        ),
    }
    let mut mount_options = Vec::new();
    if let Some(f) = m.get("mount_options")
        && let Some(items) = d.strings(f, "mount_options", &ctx)
    {
        for (o, pos) in items {
            let fine = !o.is_empty()
                && o.bytes().all(|b| b.is_ascii_alphanumeric() || b"=_-.,:/".contains(&b))
                && !o.contains(',');
            if fine {
                mount_options.push(o);
            } else {
                d.error(
                    pos,
                    format!("invalid mount option {o:?} in {ctx}"),
                    "one option per list item, letters, digits and = _ - . : / only (e.g. noatime)",
                );
            }
        }
    }
    let mut labels = BTreeMap::new();
    if let Some(f) = m.get("labels") {
        (labels, _) = d.node_labels(f, &ctx);
    }
    let mut wipe = Vec::new();
    if let Some(f) = m.get("wipe")
        && let Some(items) = d.string_set(f, "wipe", &ctx, None)
    {
        for (w, pos) in items {
            if w.trim().is_empty() {
                d.error(
                    pos,
                    format!("empty entry in `wipe` of {ctx}"),
                    "name a disk by serial, WWN or by-id path",
                );
            } else {
                wipe.push(w);
            }
        }
    }
    let (name, name_pos) = name?;
    if !ok {
        return None;
    }
    Some((
        StorageProfile {
            name,
            disks,
            layout,
            filesystem,
            mount_point,
            mount_options,
            labels,
            wipe,
        },
        name_pos,
        mount_pos,
    ))
}

/// Why `p` cannot be a mount point (as a hint), if it cannot.
fn check_mount_point(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p == "/" {
        return Err("write an absolute directory other than /, e.g. /var/lib/nimbus/volumes/fast".into());
    }
    if p.ends_with('/') || p.contains("//") || p.split('/').any(|c| c == "." || c == "..") {
        return Err("write it normalized: no trailing /, no //, no . or .. components".into());
    }
    if !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b)) {
        return Err("use letters, digits and / _ - . only".into());
    }
    if let Some(sys) = SYSTEM_DIRS.iter().find(|s| p == **s || p.starts_with(&format!("{s}/"))) {
        return Err(format!(
            "{sys} is a system directory; mount volumes under e.g. /var/lib/nimbus/volumes"
        ));
    }
    Ok(())
}

fn disk_selector(d: &mut Dec<'_>, dm: &MapView<'_>, ctx: &str) -> DiskSelector {
    d.unknown(dm, ctx, DISK_SELECTOR_FIELDS);
    let mut out = DiskSelector::default();
    let empty = |field: &str| {
        Some((
            format!("`{field}` in {ctx} is an empty list"),
            "an empty list matches no disk; omit the key to accept any",
        ))
    };
    if let Some(f) = dm.get("class")
        && let Some(items) = d.string_set(f, "class", ctx, empty("class"))
    {
        for (s, pos) in items {
            match DISK_CLASSES.iter().find(|(n, _)| *n == s) {
                Some((_, c)) => out.class.push(*c),
                None => d.error(
                    pos,
                    format!("unknown disk class {s:?} in {ctx}"),
                    format!(
                        "one of {}",
                        quote_list(&DISK_CLASSES.iter().map(|(n, _)| *n).collect::<Vec<_>>())
                    ),
                ),
            }
        }
    }
    if let Some(f) = dm.get("transport")
        && let Some(items) = d.string_set(f, "transport", ctx, empty("transport"))
    {
        for (s, pos) in items {
            match TRANSPORTS.iter().find(|(n, _)| *n == s) {
                Some((_, t)) => out.transport.push(*t),
                None => d.error(
                    pos,
                    format!("unknown transport {s:?} in {ctx}"),
                    format!(
                        "one of {}",
                        quote_list(&TRANSPORTS.iter().map(|(n, _)| *n).collect::<Vec<_>>())
                    ),
                ),
            }
        }
    }
    if let Some(f) = dm.get("min_size")
        && let Some((s, pos)) = d.string(f, "min_size", ctx)
    {
        match syntax::parse_size(&format!("min_size of {ctx}"), &s) {
            Ok(n) => out.min_size = Some(n),
            Err(p) => d.problem(pos, p),
        }
    }
    if let Some(f) = dm.get("model")
        && let Some((s, pos)) = d.string(f, "model", ctx)
    {
        match syntax::check_glob(&format!("model of {ctx}"), &s) {
            Ok(()) => out.model = Some(s),
            Err(p) => d.problem(pos, p),
        }
    }
    if let Some(f) = dm.get("by_id")
        && let Some((s, pos)) = d.string(f, "by_id", ctx)
    {
        match syntax::check_glob(&format!("by_id of {ctx}"), &s) {
            Ok(()) if !s.contains('/') => out.by_id = Some(s),
            Ok(()) => d.error(
                pos,
                format!("by_id of {ctx} contains a /"),
                "write a glob over the link name only, e.g. nvme-Amazon_EC2_NVMe_*",
            ),
            Err(p) => d.problem(pos, p),
        }
    }
    if let Some(f) = dm.get("max_disks") {
        out.max_disks = d.uint(f, "max_disks", ctx);
        if out.max_disks == Some(0) {
            d.error(
                f.pos(),
                format!("max_disks of {ctx} is 0"),
                "omit it to take every matching disk",
            );
        }
    }
    out
}

fn pool_match(d: &mut Dec<'_>, mm: &MapView<'_>, mctx: &str) -> PoolMatch {
    d.unknown(mm, mctx, POOL_MATCH_FIELDS);
    let mut out = PoolMatch::default();
    let empty = |field: &str| {
        Some((
            format!("`{field}` in {mctx} is an empty list"),
            "an empty list matches no node; omit the key to accept any",
        ))
    };
    if let Some(f) = mm.get("platform")
        && let Some(items) = d.string_set(f, "platform", mctx, empty("platform"))
    {
        for (s, pos) in items {
            match PLATFORMS.iter().find(|(n, _)| *n == s) {
                Some((_, k)) => out.platform.push(*k),
                None => d.error(
                    pos,
                    format!("unknown platform {s:?} in {mctx}"),
                    format!(
                        "one of {}",
                        quote_list(&PLATFORMS.iter().map(|(n, _)| *n).collect::<Vec<_>>())
                    ),
                ),
            }
        }
    }
    if let Some(f) = mm.get("instance_type")
        && let Some(items) = d.string_set(f, "instance_type", mctx, empty("instance_type"))
    {
        for (s, pos) in items {
            if let Err(p) = syntax::check_glob(
                &format!("instance_type of {}", mctx.trim_start_matches("match of ")),
                &s,
            ) {
                d.problem(pos, p);
            }
            out.instance_type.push(s);
        }
    }
    if let Some(f) = mm.get("min_cpus") {
        out.min_cpus = d.uint(f, "min_cpus", mctx);
    }
    if let Some(f) = mm.get("min_memory")
        && let Some((s, pos)) = d.string(f, "min_memory", mctx)
    {
        match syntax::parse_size(&format!("min_memory of {}", mctx.trim_start_matches("match of ")), &s) {
            Ok(n) => out.min_memory = Some(n),
            Err(p) => d.problem(pos, p),
        }
    }
    if let Some(f) = mm.get("local_nvme") {
        out.local_nvme = d.boolean(f, "local_nvme", mctx);
    }
    if let Some(f) = mm.get("zone")
        && let Some(items) = d.string_set(f, "zone", mctx, empty("zone"))
    {
        for (s, pos) in items {
            if s.is_empty() {
                d.error(
                    pos,
                    format!("empty zone in {mctx}"),
                    "write the zone name, e.g. eu-west-1a",
                );
            }
            out.zone.push(s);
        }
    }
    if let Some(f) = mm.get("labels") {
        out.labels = d.match_labels(f, mctx);
    }
    out
}

fn cohort(d: &mut Dec<'_>, idx: usize, node: &Node) -> Option<(Cohort, CohortPos)> {
    let generic = format!("cohort #{idx}");
    let m = d.map(node, node_pos(node), &generic)?;
    let name = d.name(&m, "cohort", &generic);
    let ctx = name.as_ref().map_or(generic, |(n, _)| format!("cohort {n:?}"));
    d.unknown(&m, &ctx, COHORT_FIELDS);
    let mut pos = CohortPos {
        at: m.pos,
        name: name.as_ref().map_or(m.pos, |(_, p)| *p),
        ..CohortPos::default()
    };
    let mut c = Cohort {
        name: String::new(),
        pools: Vec::new(),
        labels: BTreeMap::new(),
        taints: Vec::new(),
        anti_affinity: Vec::new(),
    };
    let no_pools = (
        format!("{ctx} lists no pools"),
        "list at least one pool, e.g. `pools: [performance]`",
    );
    match m.get("pools") {
        None => d.error(
            m.entry("pools").map_or(m.pos, |(k, _)| span_pos(k.span())),
            no_pools.0,
            no_pools.1,
        ),
        Some(f) => {
            if let Some(items) = d.string_set(f, "pools", &ctx, Some(no_pools)) {
                pos.pools = items.iter().map(|(_, p)| *p).collect();
                c.pools = items.into_iter().map(|(s, _)| s).collect();
            }
        }
    }
    if let Some(f) = m.get("labels") {
        (c.labels, pos.labels) = d.node_labels(f, &ctx);
    }
    if let Some(f) = m.get("taints") {
        match f.node {
            Node::Sequence(seq) => {
                for item in seq.iter() {
                    if let Some(t) = taint(d, item, &ctx) {
                        pos.taints.push(node_pos(item));
                        c.taints.push(t);
                    }
                }
            }
            other => d.type_error(f.pos(), "a list", &format!("`taints` in {ctx}"), other),
        }
    }
    if let Some(f) = m.get("anti_affinity")
        && let Some(items) = d.string_set(f, "anti_affinity", &ctx, None)
    {
        pos.anti_affinity = items.iter().map(|(_, p)| *p).collect();
        c.anti_affinity = items.into_iter().map(|(s, _)| s).collect();
    }
    c.name = name?.0;
    Some((c, pos))
}

fn taint(d: &mut Dec<'_>, node: &Node, ctx: &str) -> Option<Taint> {
    let tctx = format!("taint of {ctx}");
    let m = d.map(node, node_pos(node), &format!("a taint of {ctx}"))?;
    d.unknown(&m, &tctx, TAINT_FIELDS);
    let mut ok = true;
    let mut key = String::new();
    match d.required(&m, "key", &tctx, "add `key: polynimbus.io/<name>`") {
        Some(f) => match d.string(f, "key", &tctx) {
            Some((k, pos)) => {
                if let Err(p) = syntax::check_node_key("taint", &k) {
                    d.problem(pos, p);
                }
                key = k;
            }
            None => ok = false,
        },
        None => ok = false,
    }
    let mut value = String::new();
    if let Some(f) = m.get("value")
        && let Some((v, pos)) = d.string(f, "value", &tctx)
    {
        if let Err(p) = syntax::check_label_value("taint", &key, &v) {
            d.problem(pos, p);
        }
        value = v;
    }
    let effect_hint = "one of NoSchedule, PreferNoSchedule, NoExecute";
    let mut effect = None;
    if let Some(f) = d.required(&m, "effect", &tctx, effect_hint)
        && let Some((e, pos)) = d.string(f, "effect", &tctx)
    {
        effect = TaintEffect::ALL.into_iter().find(|x| x.as_str() == e);
        if effect.is_none() {
            d.error(pos, format!("invalid taint effect {e:?} in {ctx}"), effect_hint);
        }
    }
    match (ok, effect) {
        (true, Some(effect)) => Some(Taint { key, value, effect }),
        _ => None,
    }
}
