"""The Helm chart in k8s/rose as data: values files and template sources."""

from __future__ import annotations

import glob
import os
import re

import yaml

from .compose import REPO

CHART = os.path.join(REPO, "k8s", "rose")
COMPONENTS = ("gateway", "formatter", "scheduler", "worker", "redis")
KUBERNETES_VERSION = "1.31.0"  # the API version every rendered object is validated against

# .Values.a.b or $.Values.a.b (an identifier path after .Values)
_VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def load_values(name: str = "values.yaml") -> dict:
    with open(os.path.join(CHART, name)) as f:
        return yaml.safe_load(f)


def templates() -> dict[str, str]:
    """template path under templates/ -> source (every file, tests/ included)."""
    out = {}
    root = os.path.join(CHART, "templates")
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path) as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def values_references(source: str) -> set[tuple[str, ...]]:
    """Every .Values path a template names, as key tuples."""
    return {tuple(m.group(1).lstrip(".").split(".")) for m in _VALUES_REF.finditer(source)}


def lookup(values: dict, path: tuple[str, ...]):
    """The value at path; KeyError naming the first missing key."""
    node = values
    for i, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(".".join(path[: i + 1]))
        node = node[key]
    return node


def leaf_paths(values, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths of every leaf (and empty map) in a values tree."""
    if isinstance(values, dict) and values:
        out = set()
        for key, value in values.items():
            out |= leaf_paths(value, prefix + (key,))
        return out
    return {prefix}


def merge_values(base: dict, override: dict) -> dict:
    """Helm's coalescing of a -f file onto values.yaml: maps merge, null deletes a key."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = value
    return out


def render(values: dict, release: str = "rose", namespace: str = "default") -> list[dict]:
    """Every object the chart renders with these (already merged) values, via tests/deploy/gotemplate."""
    from .gotemplate import Renderer, as_helm_numbers

    with open(os.path.join(CHART, "Chart.yaml")) as f:
        meta = yaml.safe_load(f)
    files = {f"{meta['name']}/templates/{name}": source for name, source in templates().items()}
    renderer = Renderer(files)
    context = {
        "Values": as_helm_numbers(values),
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": True, "IsUpgrade": False},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion", "")},
        "Template": {"BasePath": f"{meta['name']}/templates"},
    }
    objects = []
    for path in files:
        name = path.rsplit("/", 1)[1]
        if name.startswith("_") or not name.endswith((".yaml", ".yml")):
            continue
        text = renderer.render(path, {**context, "Template": {**context["Template"], "Name": path}})
        for document in re.split(r"^---\s*$", text, flags=re.M):
            obj = yaml.safe_load(document)
            if obj:
                objects.append(obj)
    return objects


def render_notes(values: dict) -> str:
    from .gotemplate import Renderer, as_helm_numbers

    files = {f"rose/templates/{name}": source for name, source in templates().items()}
    context = {"Values": as_helm_numbers(values), "Release": {"Name": "rose", "Service": "Helm"},
               "Chart": {"Name": "rose", "Version": "0.1.0", "AppVersion": "0.1.0"}, "Template": {"BasePath": "rose/templates"}}
    return Renderer(files).render("rose/templates/NOTES.txt", context)
