"""Reading YAML / JSON / text that a user hands to flashctl, safely.

Everything the CLI reads from a user (spec files, `key=value` overrides, JSONL manifests,
`manifest.json`, hostfiles) goes through here, so that a careless or hostile file gives one
line naming the file (and line) instead of a traceback, a hang or an out-of-memory kill:

* files are read with a size cap and must be UTF-8 text (a leading BOM is dropped);
* YAML is PyYAML's SafeLoader (no Python objects) that also refuses a mapping repeating a key
  (PyYAML keeps the last silently: `steps: 10` ... `steps: 1000` would run 1000 steps);
* YAML aliases are expanded by *reference* when loading but by *value* by everything after
  (JSON round trips, validation, line maps): a "billion laughs" file of 1 KB becomes 10^9
  nodes there. The composed tree's expanded size, depth and alias cycles are checked before
  anything is built from it -- cheap, since sizes are memoised per node;
* JSON refuses repeated keys too; numbers with more digits than Python converts, nesting
  deeper than the interpreter's stack, and invalid dates become errors with a location.

Imports only PyYAML and the standard library: the CLI uses it at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from flashctl.errors import UserError

MAX_SPEC_BYTES = 1 << 20
"""Largest spec / YAML file read (1 MiB; real specs are a few KB)."""
MAX_NODES = 20_000
"""Most YAML nodes, also after alias expansion (a spec with a large ablation table has ~1,000)."""
MAX_DEPTH = 64
"""Deepest YAML / JSON nesting accepted (specs nest 4 levels)."""
MERGE_TAG = "tag:yaml.org,2002:merge"


class InputError(UserError):
    """A file (or argument) that cannot be read as what it should be: `source`, 1-based
    `line` when known, and the `problem`; str() is the one line the CLI prints."""

    def __init__(self, source: str, problem: str, line: int | None = None):
        self.source, self.problem, self.line = str(source), problem, line
        where = f"{self.source}: line {line}" if line else self.source
        super().__init__(f"{where}: {problem}")


class YamlSyntaxError(InputError):
    """Text that does not parse as YAML at all (a `key=value` override keeps such a value as
    a plain string); other InputErrors are refusals of YAML that does parse."""


# ------------------------------------------------------------------------------------------
# Files


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_SPEC_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `max_bytes` (InputError otherwise).

    Reads at most `max_bytes + 1` bytes, so `/dev/zero`-like or huge files cost nothing;
    FIFOs and devices are refused before opening (opening a FIFO would block)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(str(p), f"no such {what}" if not p.exists() else f"not a regular file (a {what} is expected)")
    try:
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(str(p), f"cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise InputError(str(p), f"larger than {max_bytes:,} bytes: too big for a {what}")
    return decode_utf8(data, str(p), what)


def decode_utf8(data: bytes, source: str, what: str = "file") -> str:
    """`data` as UTF-8 text (BOM dropped); InputError naming the line of the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            source, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); a {what} must be UTF-8", line
        ) from None
    return text.removeprefix("\ufeff")


# ------------------------------------------------------------------------------------------
# YAML


class SafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing repeated mapping keys and reporting value errors
    (e.g. an integer of 5,000 digits, 2024-02-30) as YAML errors with their position.

    While composing it counts nodes (aliases once each) and nesting, and stops at
    `MAX_NODES` / `MAX_DEPTH`: the pure-Python composer takes ~15 s for a 1 MiB flat list,
    and recurses once per level (a file of 50,000 `[` would exhaust the stack)."""

    source = "<yaml>"

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH or self._nodes > MAX_NODES:
                line = self.peek_event().start_mark.line + 1
                if self._depth > MAX_DEPTH:
                    raise InputError(self.source, f"YAML nests deeper than {MAX_DEPTH} levels; refused", line)
                raise InputError(self.source, f"YAML has more than {MAX_NODES:,} nodes; refused", line)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                # merge keys (`<<: *base`) may be overridden by explicit keys: not a repeat
                if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first on line {first[key]})", key_node.start_mark,
                    )
                first[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ConstructorError(None, None, f"bad value: {exc}", node.start_mark) from None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def check_tree(root: yaml.Node, source: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> int:
    """Expanded node count of a composed YAML tree (each alias counted as the whole subtree
    it names); InputError if it exceeds `max_nodes`, nests deeper than `max_depth`, or an
    alias refers to a node that contains it (a cycle). Linear in the *distinct* nodes."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            on_path.discard(nid)
            kids = _children(node)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            height[nid] = 1 + max((height[id(k)] for k in kids), default=0)
            line = node.start_mark.line + 1
            if size[nid] > max_nodes:
                raise InputError(source, f"YAML expands to more than {max_nodes:,} nodes (aliases/anchors "
                                         "that repeat a subtree?); refused", line)
            if height[nid] > max_depth:
                raise InputError(source, f"YAML nests deeper than {max_depth} levels; refused", line)
            continue
        if nid in size:
            continue
        on_path.add(nid)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in on_path:
                raise InputError(source, "YAML alias refers to a node that contains it (recursive alias)",
                                 kid.start_mark.line + 1)
            if id(kid) not in size:
                stack.append((kid, False))
    return size[id(root)]


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, int | None]:
    """(one-line problem, 1-based line) of a PyYAML error."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
        return f"invalid YAML: character #x{code:04x}: {exc.reason}", line
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = (getattr(exc, "problem", None) or str(exc)).splitlines()[0]
    return f"invalid YAML: {problem}", (mark.line + 1 if mark else None)


def compose(text: str, source: str = "<yaml>") -> yaml.Node | None:
    """The checked (`check_tree`) node tree of one YAML document, or None when empty."""
    loader = None
    try:
        loader = SafeLoader(text)  # the reader refuses control characters right here
        loader.source = source
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        problem, line = _yaml_problem(exc, text)
        raise YamlSyntaxError(source, problem, line) from None
    except RecursionError:
        raise InputError(source, f"YAML nests deeper than {MAX_DEPTH} levels; refused") from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is not None:
        check_tree(root, source)
    return root


def load(text: str, source: str = "<yaml>") -> Any:
    """Python data of one YAML document (safe types only); InputError with the line for
    invalid YAML, repeated keys, bombs (see module docstring) and unconvertible values."""
    root = compose(text, source)
    if root is None:
        return None
    loader = SafeLoader("")
    try:
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        problem, line = _yaml_problem(exc, text)
        raise InputError(source, problem, line) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise InputError(source, f"invalid YAML value: {exc}") from None
    finally:
        loader.dispose()


def key_lines(root: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Map of key path -> 1-based line in a checked tree (for error messages)."""
    lines: dict[tuple[str, ...], int] = {}
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())] if root is not None else []
    while stack:
        node, path = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (str(k.value),)
                lines.setdefault(key, k.start_mark.line + 1)
                stack.append((v, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = path + (str(i),)
                lines.setdefault(key, v.start_mark.line + 1)
                stack.append((v, key))
    return lines


def load_file(path: str | Path, what: str = "YAML file", max_bytes: int = MAX_SPEC_BYTES) -> Any:
    """`load` of a file read with `read_text`."""
    return load(read_text(path, what, max_bytes), str(path))


# ------------------------------------------------------------------------------------------
# JSON


class _RepeatedKey(Exception):
    pass


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in items:
        if k in out:
            raise _RepeatedKey(k)
        out[k] = v
    return out


def load_json(text: str, source: str = "<json>", line: int | None = None) -> Any:
    """`json.loads` refusing repeated keys; every failure an InputError (`line` = the line
    of `text` in its file, for JSONL)."""
    try:
        return json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as exc:
        at = line if line is not None else exc.lineno
        raise InputError(source, f"invalid JSON: {exc.msg} (column {exc.colno})", at) from None
    except _RepeatedKey as exc:
        raise InputError(source, f"invalid JSON: duplicate key {exc.args[0]!r}", line) from None
    except RecursionError:
        raise InputError(source, "invalid JSON: nested too deeply", line) from None
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise InputError(source, f"invalid JSON: {exc}", line) from None


def load_json_file(path: str | Path, what: str = "JSON file", max_bytes: int = 32 << 20) -> Any:
    """`load_json` of a file read with `read_text` (32 MiB cap by default: a dataset manifest
    of 100,000 shards is ~20 MB)."""
    return load_json(read_text(path, what, max_bytes), str(path))
