"""A small renderer for the subset of Helm's Go templates that k8s/rose uses, so the
chart renders (and every object is schema-checked) where no `helm` binary exists.

Supported: text/template actions with {{- -}} trimming and {{/* comments */}};
if / else if / else, range (lists; maps in key order, `$k, $v :=`), with, define,
variables (`$x :=`, `$`), pipelines, parenthesised calls, field chains on `.`, `$` and
variables; the functions listed in FUNCTIONS (Helm's and Sprig's of those names).
Anything else raises TemplateError, so a template outside the subset fails loudly
rather than rendering something helm would not.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml


class TemplateError(Exception):
    pass


# ---------------------------------------------------------------- lexing
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _tokens(source: str, name: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with whitespace trimming applied."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            out.append(("action", body))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = source[pos:]
    out.append(("text", text.lstrip() if trim_next else text))
    if "{{" in "".join(t for k, t in out if k == "text"):
        raise TemplateError(f"{name}: unterminated action")
    return out


# ---------------------------------------------------------------- parsing
@dataclass
class Node:
    kind: str  # text, action, if, range, with
    text: str = ""
    branches: list[tuple[str, list]] = field(default_factory=list)  # (pipeline, body) for if/range/with
    otherwise: list = field(default_factory=list)


def parse(source: str, name: str) -> tuple[list, dict[str, list]]:
    """The node list of a template and the {{ define }}s it holds."""
    defines: dict[str, list] = {}
    tokens = _tokens(source, name)
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list, str]:
        nonlocal pos
        nodes: list = []
        while pos < len(tokens):
            kind, value = tokens[pos]
            pos += 1
            if kind == "text":
                if value:
                    nodes.append(Node("text", value))
                continue
            word = value.split(None, 1)[0] if value else ""
            if word in stop:
                return nodes, value
            if word in ("if", "range", "with"):
                node = Node(word)
                pipeline = value[len(word):].strip()
                while True:
                    body, ended = block(("else", "end"))
                    node.branches.append((pipeline, body))
                    if ended == "end":
                        break
                    rest = ended[len("else"):].strip()
                    if rest.startswith("if ") and word == "if":
                        pipeline = rest[3:].strip()
                        continue
                    if rest:
                        raise TemplateError(f"{name}: unsupported {{{{ {ended} }}}}")
                    node.otherwise, ended = block(("end",))
                    break
                nodes.append(node)
            elif word == "define":
                define_name = json.loads(value[len("define"):].strip())
                defines[define_name], _ = block(("end",))
            elif word in ("end", "else"):
                raise TemplateError(f"{name}: unexpected {{{{ {value} }}}}")
            elif word in ("template", "block", "break", "continue"):
                raise TemplateError(f"{name}: {word} is outside the supported subset")
            else:
                nodes.append(Node("action", value))
        if stop:
            raise TemplateError(f"{name}: missing {{{{ end }}}}")
        return nodes, ""

    nodes, _ = block(())
    return nodes, defines


# ---------------------------------------------------------------- pipelines
_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)(?![\w.])|(?P<op>:=|=|\||\(|\)|,)'
    r"|(?P<word>[$.]?[A-Za-z0-9_$.\-/]*[A-Za-z0-9_$]|\$|\.))"
)


def _lex_pipeline(text: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot read {text[pos:]!r}")
        pos = m.end()
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "str":
            out.append(("lit", json.loads(value)))
        elif kind == "raw":
            out.append(("lit", value[1:-1]))
        elif kind == "num":
            out.append(("lit", float(value) if "." in value else int(value)))
        elif kind == "op":
            out.append(("op", value))
        else:
            out.append(("word", value))
    return out


class Renderer:
    """Renders the templates of one chart against a context (.Values, .Release, .Chart...)."""

    def __init__(self, files: dict[str, str]):
        self.files: dict[str, list] = {}
        self.defines: dict[str, list] = {}
        for path, source in files.items():
            nodes, defines = parse(source, path)
            self.files[path] = nodes
            self.defines.update(defines)

    def render(self, path: str, context: dict) -> str:
        return self._run(self.files[path], context, {"$": context})

    # ------------------------------------------------------------ execution
    def _run(self, nodes: list, dot, variables: dict) -> str:
        out = []
        for node in nodes:
            if node.kind == "text":
                out.append(node.text)
            elif node.kind == "action":
                value = self._pipeline(node.text, dot, variables)
                if value is not _NO_OUTPUT:
                    out.append(_to_text(value))
            elif node.kind == "if":
                for pipeline, body in node.branches:
                    if _truthy(self._pipeline(pipeline, dot, variables)):
                        out.append(self._run(body, dot, dict(variables)))
                        break
                else:
                    out.append(self._run(node.otherwise, dot, dict(variables)))
            elif node.kind == "with":
                ((pipeline, body),) = node.branches
                value = self._pipeline(pipeline, dot, variables)
                out.append(self._run(body, value, dict(variables)) if _truthy(value) else self._run(node.otherwise, dot, dict(variables)))
            elif node.kind == "range":
                ((pipeline, body),) = node.branches
                names, expression = _split_declaration(pipeline)
                items = self._pipeline(expression, dot, variables)
                pairs = sorted(items.items()) if isinstance(items, dict) else list(enumerate(items or []))
                if not pairs:
                    out.append(self._run(node.otherwise, dot, dict(variables)))
                for key, value in pairs:
                    scope = dict(variables)
                    if len(names) == 2:
                        scope[names[0]], scope[names[1]] = key, value
                    elif len(names) == 1:
                        scope[names[0]] = value
                    out.append(self._run(body, value, scope))
        return "".join(out)

    def _pipeline(self, text: str, dot, variables: dict):
        names, expression = _split_declaration(text)
        tokens = _lex_pipeline(expression)
        value = self._eval_tokens(tokens, dot, variables)
        if names:
            variables[names[0]] = value
            return _NO_OUTPUT
        return value

    def _eval_tokens(self, tokens: list, dot, variables: dict):
        commands, current, depth = [], [], 0
        for token in tokens:
            if token == ("op", "(") :
                depth += 1
            elif token == ("op", ")"):
                depth -= 1
            if token == ("op", "|") and depth == 0:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
        value = _NO_VALUE
        for command in commands:
            value = self._command(command, dot, variables, value)
        return value

    def _command(self, tokens: list, dot, variables: dict, piped):
        args = self._operands(tokens, dot, variables)
        if not args:
            raise TemplateError("empty command")
        head, rest = args[0], args[1:]
        if piped is not _NO_VALUE:
            rest = rest + [piped]
        if isinstance(head, _Function):
            return self._call(head.name, rest)
        if rest:
            raise TemplateError(f"{head!r} is not a function")
        return head

    def _operands(self, tokens: list, dot, variables: dict) -> list:
        values, i = [], 0
        while i < len(tokens):
            kind, value = tokens[i]
            if (kind, value) == ("op", "("):
                depth, j = 1, i + 1
                while depth:
                    if tokens[j] == ("op", "("):
                        depth += 1
                    elif tokens[j] == ("op", ")"):
                        depth -= 1
                    j += 1
                values.append(self._eval_tokens(tokens[i + 1:j - 1], dot, variables))
                i = j
                continue
            if kind == "lit":
                values.append(value)
            elif kind == "word":
                values.append(self._word(value, dot, variables))
            else:
                raise TemplateError(f"unexpected {value!r}")
            i += 1
        return values

    def _word(self, word: str, dot, variables: dict):
        if word in ("true", "false"):
            return word == "true"
        if word == "nil":
            return None
        if word.startswith("$"):
            name, _, chain = word.partition(".")
            if name not in variables:
                raise TemplateError(f"undefined variable {name}")
            return _field_chain(variables[name], chain)
        if word.startswith("."):
            return _field_chain(dot, word[1:])
        if word in FUNCTIONS or word in ("include", "required"):
            return _Function(word)
        raise TemplateError(f"function {word!r} is not supported")

    def _call(self, name: str, args: list):
        if name == "include":
            template, dot = args
            nodes = self.defines.get(template) or self.files.get(template)
            if nodes is None:
                raise TemplateError(f"no template {template!r}")
            return self._run(nodes, dot, {"$": dot})
        if name == "required":
            message, value = args
            if value is None or value == "":
                raise TemplateError(message)
            return value
        return FUNCTIONS[name](*args)


@dataclass(frozen=True)
class _Function:
    name: str


_NO_VALUE = object()
_NO_OUTPUT = object()


def _split_declaration(text: str) -> tuple[list[str], str]:
    m = re.match(r"^\s*(\$\w*(?:\s*,\s*\$\w*)?)\s*:?=\s*(.*)$", text, re.S)
    if not m:
        return [], text
    return [n.strip() for n in m.group(1).split(",")], m.group(2)


def _field_chain(value, chain: str):
    for key in filter(None, chain.split(".")):
        if value is None:
            raise TemplateError(f"nil pointer evaluating .{key}")
        if not isinstance(value, dict):
            raise TemplateError(f"cannot read .{key} of {type(value).__name__}")
        value = value.get(key)
    return value


def _truthy(value) -> bool:
    return bool(value) if value is not None else False


def _to_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        raise TemplateError("a map or list printed without toYaml")
    return str(value)


def _to_yaml(value) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(_ints(value), default_flow_style=False, sort_keys=True, width=10**9).rstrip("\n")


def _ints(value):
    """Helm holds every number as float64 and writes 8000.0 as 8000."""
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def as_helm_numbers(value):
    """Values as Helm sees them after YAML -> JSON: every number a float."""
    if isinstance(value, dict):
        return {k: as_helm_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_helm_numbers(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _indent(spaces: int, text: str) -> str:
    pad = " " * spaces
    return pad + text.replace("\n", "\n" + pad)


def _printf(fmt: str, *args) -> str:
    converted = []
    for spec, arg in zip(re.findall(r"%[-+ #0]*\d*(?:\.\d+)?([sdvqf])", fmt), args):
        if spec == "d" and not isinstance(arg, int):
            raise TemplateError(f"%d of {arg!r}")
        converted.append(_to_text(arg) if spec in "sv" else json.dumps(str(arg)) if spec == "q" else arg)
    return re.sub(r"%([-+ #0]*\d*(?:\.\d+)?)[vq]", r"%\1s", fmt) % tuple(converted)


def _default(fallback, value=None):
    return value if _truthy(value) else fallback


def _dict(*pairs):
    return {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}


FUNCTIONS = {
    "default": _default,
    "trunc": lambda n, s: s[:n],
    "trimSuffix": lambda suffix, s: s[: -len(suffix)] if suffix and s.endswith(suffix) else s,
    "printf": _printf,
    "print": lambda *a: "".join(_to_text(x) for x in a),
    "quote": lambda *a: " ".join(json.dumps(_to_text(x)) for x in a),
    "toYaml": _to_yaml,
    "nindent": lambda n, s: "\n" + _indent(n, s),
    "indent": _indent,
    "sha256sum": lambda s: hashlib.sha256(s.encode()).hexdigest(),
    "dict": _dict,
    "list": lambda *a: list(a),
    "not": lambda v: not _truthy(v),
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "int": lambda v: int(v or 0),
    "empty": lambda v: not _truthy(v),
    "contains": lambda needle, haystack: needle in haystack,
}
