#!/usr/bin/env python3
"""Render a Helm chart like `helm template`, with Helm's own Go SDK and no helm binary or cluster.

    render.py CHART [-f VALUES.yaml]... [--set-json JSON]... [--name N] [--namespace NS] [--lint]

Prints the manifests as one multi-document YAML stream (`---` and `# Source: CHART/templates/FILE` before each
document, ordered by kind the way Helm installs them, NOTES.txt left out) and exits 0. On a Helm error (schema
violation, a template's `fail`, bad YAML) it prints `render.py: <Helm's message>` on stderr and exits 1; bad
usage exits 2.

Values: each `-f` file is read with Helm's YAML reader and merged over the previous ones (maps merge key by
key, anything else is replaced), then each `--set-json` over that. `--set-json` takes Helm's form,
`key.path=<JSON>` (e.g. `replicas=3`, `etcd={"endpoints":["https://etcd:2379"]}`), or a whole JSON object of
values (`{"replicas": 3}`). The chart's values.yaml is the base, as with helm; `null` removes a default.

`--lint` first runs `helm lint --strict` with the same values: every finding is printed on stderr, and a
warning or an error fails the run (exit 1) before anything is rendered.

Needs the PyPI package helm-python-sdk (==0.2.2: Helm v4's Go SDK as a native library). Run this file with
the python of the venv that deploy/helm/install-renderer.sh creates (it prints that path).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

try:
    import helm_python as helm
except ImportError as err:  # pragma: no cover - depends on the interpreter used
    sys.stderr.write(
        f"render.py: cannot import helm_python ({err}): run deploy/helm/install-renderer.sh and use the "
        "python it prints (a venv with helm-python-sdk==0.2.2)\n"
    )
    sys.exit(1)

# Helm's install order (pkg/release/v1/util InstallOrder); `helm template` prints in this order, unknown kinds
# last (alphabetically), and keeps the template order within one kind.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
    "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass",
    "PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole", "ClusterRoleList",
    "ClusterRoleBinding", "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList",
    "Service", "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]

# A template's output is split into documents on `---` at the start of a line (as releaseutil.SplitManifests
# does; unlike its regex, this one leaves `-----BEGIN CERTIFICATE-----` lines alone).
DOC_SEPARATOR = re.compile(r"^---(?=[ \t]|$)", re.MULTILINE)
KIND_LINE = re.compile(r"^kind:\s*[\"']?([A-Za-z0-9]+)", re.MULTILINE)

# Lint severities of helm-python-sdk: 0 unknown, 1 info, 2 warning, 3 error.
SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge key by key, any other value replaces (a copy of `base`)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_values_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise UsageError(f"cannot read values file {path}: {err.strerror}") from err
    try:
        return helm.values_from_yaml(text)
    except helm.HelmError as err:
        raise UsageError(f"values file {path} is not valid YAML: {err}") from err


def parse_set_json(expr: str) -> dict[str, Any]:
    if expr.lstrip().startswith("{"):
        try:
            doc = json.loads(expr)
        except json.JSONDecodeError as err:
            raise UsageError(f"--set-json {expr!r}: not a JSON object: {err}") from err
        if not isinstance(doc, dict):
            raise UsageError(f"--set-json {expr!r}: give a JSON object or key.path=<JSON>")
        return doc
    try:
        return helm.parse_set_json(expr)
    except helm.HelmError as err:
        raise UsageError(f"--set-json {expr!r}: {err} (write key.path=<JSON> or a JSON object)") from err


def kind_rank(manifest: str) -> tuple[int, str]:
    found = KIND_LINE.search(manifest)
    kind = found.group(1) if found else ""
    if kind in INSTALL_ORDER:
        return (INSTALL_ORDER.index(kind), "")
    return (len(INSTALL_ORDER), kind)


def to_stream(rendered: dict[str, str]) -> str:
    """`helm template`'s output: one `# Source:` document per manifest, NOTES.txt left out."""
    docs: list[tuple[tuple[int, str], str, int, str]] = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for index, doc in enumerate(DOC_SEPARATOR.split(rendered[path])):
            if doc.strip():
                docs.append((kind_rank(doc), path, index, doc.strip()))
    docs.sort(key=lambda d: (d[0], d[1], d[2]))
    return "".join(f"---\n# Source: {path}\n{doc}\n" for _, path, _, doc in docs)


def lint(chart: str, values: dict[str, Any], namespace: str) -> bool:
    """Strict lint; prints every finding. True when there is no warning or error."""
    report = helm.lint(chart, values, strict=True, namespace=namespace)
    clean = not report.get("errors")
    for msg in report.get("messages", []):
        severity = int(msg.get("severity", 0))
        text = str(msg.get("error", "")).strip().replace("\n", " ")
        sys.stderr.write(f"render.py: lint: [{SEVERITY.get(severity, severity)}] {msg.get('path', '')}: {text}\n")
        if severity >= 2:
            clean = False
    return clean


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="render.py",
        description="Render a Helm chart like `helm template`, with Helm's Go SDK (helm-python-sdk).",
    )
    parser.add_argument("chart", help="chart directory or .tgz")
    parser.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                        help="values file (YAML); repeatable, later files win")
    parser.add_argument("--set-json", action="append", default=[], metavar="JSON",
                        help="key.path=<JSON> or a JSON object of values; repeatable, applied after -f")
    parser.add_argument("--name", default="release-name", help="release name [default: release-name]")
    parser.add_argument("--namespace", default="default", help="release namespace [default: default]")
    parser.add_argument("--lint", action="store_true",
                        help="run `helm lint --strict` first; any warning or error fails")
    args = parser.parse_args(argv)

    # The library logs through Go's default logger (e.g. an INFO line for every `fail` lint meets): keep
    # warnings and above, on stderr.
    logging.basicConfig(stream=sys.stderr, format="render.py: helm: %(levelname)s %(message)s")
    helm.enable_logging(logging.WARNING)

    try:
        values: dict[str, Any] = {}
        for path in args.values:
            values = merge(values, read_values_file(path))
        for expr in args.set_json:
            values = merge(values, parse_set_json(expr))
        helm.validate_release_name(args.name)
    except UsageError as err:
        sys.stderr.write(f"render.py: {err}\n")
        return 2
    except helm.HelmError as err:
        sys.stderr.write(f"render.py: release name {args.name!r}: {err}\n")
        return 2

    try:
        if args.lint and not lint(args.chart, values, args.namespace):
            sys.stderr.write("render.py: lint failed (strict: warnings count as errors)\n")
            return 1
        with helm.Chart.load(args.chart) as chart:
            rendered = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    except helm.HelmError as err:
        sys.stderr.write(f"render.py: {str(err).strip()}\n")
        return 1
    sys.stdout.write(to_stream(rendered))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
