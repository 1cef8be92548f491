"""One line for a mistake in a training command's options: which option, where it came from
(the command line or the YAML file that holds it) and the closest valid names, instead of
jsonargparse's usage text (over 100 lines) and multi-line type errors."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

UNRECOGNIZED = re.compile(r"unrecognized arguments: (\S+)")
NOT_ACCEPTED = re.compile(r"(?:Group|Subcommand) '([^']+)' does not accept (?:nested key |option )'([^']+)'")
BAD_VALUE = re.compile(r'Parser key "([^"]+)":\s*(.*?)(?:\n|$)(?:.*Given value: (.*))?', re.S)


def option_names(parser) -> list[str]:
    """The dotted names a (sub)command parser accepts, e.g. `data.batch_size`."""
    names = set()
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", "")
        if dest and dest not in ("help", "config", "print_config"):
            names.add(dest)
    return sorted(names)


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
    if not close:  # a wrong last part under a right group: compare within the group
        group, _, last = name.rpartition(".")
        within = [n for n in names if n.rpartition(".")[0] == group]
        close = [f"{group}.{m}" if group else m for m in difflib.get_close_matches(
            last, [n.rpartition(".")[2] for n in within], n=2, cutoff=0.5)]
    return f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""


def _holder(key: str, args: list[str]) -> str:
    """Where `key` (dotted) was last set: a config file that holds it, or the command line
    (arguments are applied in order, the last one wins)."""
    found = "the command line"
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args) or arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1] if "=" in arg else args[i + 1])
            if _has_key(path, key):
                found = str(path)
        elif arg == f"--{key}" or arg.startswith(f"--{key}="):
            found = "the command line"
    return found


def _has_key(path: Path, key: str) -> bool:
    import yaml

    from trainer import configyaml

    try:
        node = configyaml.load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return isinstance(node, dict) and parts[-1] in node


def explain(message: str, args: list[str], parser) -> str:
    """One line for jsonargparse's error `message` about `args`."""
    names = option_names(parser)
    if m := UNRECOGNIZED.search(message):
        option = m.group(1).split("=", 1)[0]
        name = option[2:] if option.startswith("--") else option
        return f"unknown option {option} (on the command line){_suggest(name, names)}"
    if m := NOT_ACCEPTED.search(message):
        group, option = m.groups()
        key = option if group in ("fit", "validate", "test") else f"{group}.{option}"
        return (f"unknown option {key!r} (in {_holder(key, args)})"
                f"{_suggest(key, names)}")
    if m := BAD_VALUE.search(message):
        key, reason, given = m.group(1), m.group(2).strip(), (m.group(3) or "").strip()
        expected = [{"NoneType": "null"}.get(t, t)
                    for t in re.findall(r"Expected a <class '(\w+)'>", message)]
        what = f"expected {' or '.join(expected)}" if expected else reason.rstrip(":")
        return (f"--{key} (from {_holder(key, args)}): {what}"
                + (f", got {given!r}" if given else ""))
    return " ".join(message.split())[:400]
