"""YAML from people and files we do not control, loaded with bounds.

``yaml.safe_load`` builds no objects, but it still expands aliases without limit (a
few hundred bytes of "billion laughs" become a billion list entries), builds recursive
structures from self-referencing anchors, recurses once per nesting level, silently keeps
the last of two equal keys and turns a 5000-digit number into an exception from ``int``.
:func:`load` refuses each of these with a :class:`YAMLRefused` naming the place and the limit,
and does so in time proportional to the text: nesting is measured on the event stream before
anything is composed, and the composed node graph is walked with a budget before anything is
constructed.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 4 << 20  # a configuration file; read no further (a 3 GB file, /dev/zero)
MAX_DEPTH = 64
MAX_VALUES = 100_000  # after alias expansion: far beyond any real configuration
MAX_INT_DIGITS = 30

_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
# What a configuration value can be: text, numbers, booleans, null, dates, lists and mappings.
# !!binary builds bytes (a UnicodeDecodeError traceback when the config is dumped), !!set a set,
# !!omap/!!pairs lists of tuples: none of them has a place in a config, a template or Helm values.
_REFUSED_TAGS = {"tag:yaml.org,2002:binary": "!!binary", "tag:yaml.org,2002:set": "!!set",
                 "tag:yaml.org,2002:omap": "!!omap", "tag:yaml.org,2002:pairs": "!!pairs"}
_KEY_KINDS = {"tag:yaml.org,2002:int": "an integer", "tag:yaml.org,2002:null": "null",
              "tag:yaml.org,2002:bool": "a boolean", "tag:yaml.org,2002:float": "a number",
              "tag:yaml.org,2002:timestamp": "a date"}


class YAMLRefused(ValueError):
    """The YAML text is well formed but exceeds a bound (or repeats a key). ``key`` is where."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.key = key


def _line(node: Node) -> str:
    return f"line {node.start_mark.line + 1}"


def _check_depth(text: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark is not None else "?"
                raise YAMLRefused(
                    f"nested more than {MAX_DEPTH} levels deep at line {line}; "
                    f"at most {MAX_DEPTH} levels are allowed"
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def _check_graph(root: Node) -> None:
    """Walk the node tree as construction would (aliases expanded), within a budget.

    Refuses a node that contains itself, more than ``MAX_VALUES`` values in all, a key given
    twice in one mapping, and integers longer than ``MAX_INT_DIGITS`` digits.
    """
    count = 0
    on_path: set[int] = set()
    # (node, key path, leaving?) - an explicit stack: no Python recursion per level.
    stack: list[tuple[Node, str, bool]] = [(root, "", False)]
    while stack:
        node, path, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        count += 1
        if node.tag in _REFUSED_TAGS:
            raise YAMLRefused(
                f"is tagged {_REFUSED_TAGS[node.tag]} at {_line(node)}; allowed: text, numbers, booleans, null, "
                "lists and mappings", path,
            )
        if count > MAX_VALUES:
            raise YAMLRefused(
                f"expands to more than {MAX_VALUES} values (aliases repeating anchors, an "
                f"alias bomb?); at most {MAX_VALUES} are allowed", path,
            )
        if isinstance(node, ScalarNode):
            if node.tag == _INT_TAG and len(node.value.lstrip("+-").replace("_", "")) > MAX_INT_DIGITS:
                raise YAMLRefused(
                    f"a number with {len(node.value)} digits at {_line(node)}; at most {MAX_INT_DIGITS} "
                    "digits are allowed", path,
                )
            continue
        if id(node) in on_path:
            raise YAMLRefused(
                f"an alias at or near {_line(node)} refers to a node that contains it (a recursive "
                "structure); anchors may only be used after they are complete", path,
            )
        on_path.add(id(node))
        stack.append((node, path, True))
        if isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                stack.append((item, _join(path, i), False))
        elif isinstance(node, MappingNode):
            seen: dict[tuple[str, str], Node] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag not in (_STR_TAG, _MERGE_TAG):
                    what = _KEY_KINDS.get(key_node.tag, "a list or mapping" if not isinstance(key_node, ScalarNode)
                                          else f"tagged {key_node.tag}")
                    shown = (key_node.value or "null") if isinstance(key_node, ScalarNode) else "?"
                    raise YAMLRefused(
                        f"holds the key {shown} at {_line(key_node)}, {what}: every key must be text "
                        f"(quote it: '{shown}')", path,
                    )
                if isinstance(key_node, ScalarNode) and key_node.tag != _MERGE_TAG:
                    ident = (key_node.tag, key_node.value)
                    if ident in seen:
                        raise YAMLRefused(
                            f"the key {key_node.value!r} appears twice in one mapping ({_line(seen[ident])} "
                            f"and {_line(key_node)}); give each key once",
                            _join(path, key_node.value),
                        )
                    seen[ident] = key_node
                    child = _join(path, key_node.value)
                else:
                    child = path
                stack.append((key_node, child, False))
                stack.append((value_node, child, False))


def load(text: str) -> Any:
    """Like ``yaml.safe_load`` for one document, within the bounds above.

    Raises ``yaml.YAMLError`` for malformed text and :class:`YAMLRefused` for text beyond a bound.
    """
    _check_depth(text)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
