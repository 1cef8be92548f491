"""The one way a training command reads YAML (its configs, a run's config.yaml): PyYAML's
safe loader, refusing a document that is small on disk and huge once read. An alias stands
for the whole value its anchor names, so nine lines of nine aliases each are 9**9 values
(jsonargparse then walked them for minutes with gigabytes resident), and an alias inside
the value it names is a value without end (a hang). Both are checked on the composed nodes,
where an alias is one shared node, before any value is built."""

from __future__ import annotations

import yaml

MAX_VALUES = 100_000  # once aliases are expanded; a config holds a few hundred
MAX_DEPTH = 100  # levels of nesting; a config has a few (jsonargparse recursed past ~450)
# libyaml's parser where PyYAML was built with it (as jsonargparse uses): it refuses nesting
# deeper than 1,000 in one line, where the Python parser recurses into a RecursionError
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigTooLarge(yaml.YAMLError):
    """A YAMLError, so jsonargparse reports it as it reports any config it cannot parse."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_expansion(text: str) -> None:
    """Raise ConfigTooLarge where the YAML `text` holds an alias of itself, or more than
    MAX_VALUES values or MAX_DEPTH levels once its aliases are expanded (YAMLError where it
    is not YAML)."""
    try:
        root = yaml.compose(text, Loader=LOADER)
    except RecursionError:
        raise ConfigTooLarge("nested deeper than the YAML parser can follow") from None
    sizes: dict[int, tuple[int, int]] = {}  # node -> (values, levels) in it, aliases expanded
    open_nodes: set[int] = set()  # the nodes whose values are being counted: a path
    stack = [(root, False)] if root is not None else []
    while stack:  # depth first without recursion: nesting is bounded by memory only
        node, closing = stack.pop()
        if closing:
            inner = [sizes[id(c)] for c in _children(node)]
            values = 1 + sum(v for v, _ in inner)
            levels = 1 + max((h for _, h in inner), default=0)
            sizes[id(node)] = values, levels
            open_nodes.discard(id(node))
            if values > MAX_VALUES or levels > MAX_DEPTH:
                what = (f"more than {MAX_VALUES:,} values once its aliases are expanded"
                        if values > MAX_VALUES else f"nested more than {MAX_DEPTH} levels deep")
                raise ConfigTooLarge(f"{what} (line {node.start_mark.line + 1}); a config holds "
                                     "a few hundred values a few levels deep")
            continue
        if id(node) in sizes:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise ConfigTooLarge(f"line {child.start_mark.line + 1}: an alias inside the "
                                     "value its anchor names (a value without end)")
            if id(child) not in sizes:
                stack.append((child, False))


def problem(message: str) -> str:
    """A YAML error's message (or jsonargparse's of one) as part of one line: PyYAML names
    its text "<unicode string>", not the file."""
    return " ".join(message.replace('in "<unicode string>", ', "at ").split())[:300]


def load(text: str):
    """yaml.safe_load of `text`, checked first (check_expansion)."""
    check_expansion(text)
    return yaml.load(text, Loader=LOADER)  # a safe loader: plain values only


def guard_jsonargparse() -> None:
    """Have jsonargparse check every YAML it parses (config files, values given as YAML)
    before loading it its own way."""
    from jsonargparse import get_loader, set_loader

    original = get_loader("yaml")
    if getattr(original, "checked", False):
        return

    def checked_load(stream):
        if isinstance(stream, str):
            check_expansion(stream)
        return original(stream)

    checked_load.checked = True
    set_loader("yaml", checked_load, (yaml.YAMLError,))
