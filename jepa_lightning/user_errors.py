"""User errors as one short message: the file, the key, the fix, close matches; no traceback.

Why: jsonargparse prints ~70 lines of usage before ``Option 'batch_sise' is not accepted``
and never names the YAML file; a bad ``init_from`` or a broken manifest surfaces as a chained
traceback. :func:`config_error_message` turns a parse error into one paragraph, and
:func:`run_reporting_user_errors` (the console entry point) prints the exceptions that are
the user's to fix (``USER_ERRORS``) as ``error: ...`` and exits 1. ``main(argv)`` itself
still raises, so tests and notebooks see the exception.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

from data_modules.label_subsets import LabelFractionError
from data_modules.manifest import ManifestError
from data_modules.transforms import BadSampleError
from jepa_lightning.checkpoints import CheckpointMismatchError, CorruptCheckpointError

USER_ERRORS = (
    ManifestError,
    BadSampleError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    LabelFractionError,
    FileNotFoundError,
    FileExistsError,
)


def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` files of a command line, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _where(token: str, argv: list[str]) -> str:
    """Which YAML file (or the command line) holds ``token``."""
    hits = []
    for f in config_files(argv):
        try:
            if re.search(rf"\b{re.escape(token)}\b", Path(f).read_text()):
                hits.append(f)
        except OSError:
            continue
    if any(token in a for a in argv if not a.endswith((".yaml", ".yml"))):
        hits.append("the command line")
    return " and ".join(hits) if hits else "the configuration"


def _task_and_data_names() -> list[str]:
    import lightning as L

    from jepa_lightning.tasks.base import BaseTask

    def walk(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *walk(sub))]

    from jepa_lightning.tasks import MomentumSSLTask, SSLTask

    bases = {BaseTask, SSLTask, MomentumSSLTask}  # abstract: no method to run
    names = {c.__name__ for c in walk(BaseTask) + walk(L.LightningDataModule) if c not in bases}
    return sorted(n for n in names if not n.startswith("_"))


def _init_args(class_paths: list[str]) -> list[str]:
    """The named ``__init__`` arguments of each class, following ``**kwargs`` up the MRO as
    jsonargparse does (a task declares its own arguments and forwards the rest)."""
    names: list[str] = []
    for path in class_paths:
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            continue
        for klass in cls.__mro__:
            if "__init__" not in vars(klass):
                continue
            try:
                params = inspect.signature(klass.__init__).parameters.values()
            except (ValueError, TypeError):
                break
            kinds = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            names += [p.name for p in params if p.name != "self" and p.kind not in kinds]
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                break
    return list(dict.fromkeys(names))


def _backbone_error(text: str, argv: list[str]) -> str | None:
    """A bad ``backbone`` value (an unknown preset or field), named as such: jsonargparse
    reports it as a failed Union of a class and a Literal, or as an unknown class_path."""
    if 'Parser key "backbone"' not in text or "presets.Backbone" not in text:
        return None
    from jepa_lightning.backbones.presets import PRESETS, Backbone

    fields = list(Backbone.__dataclass_fields__)
    presets = ", ".join(PRESETS)
    option = re.search(r"Option '([^']+)' is not accepted", text)
    if option:
        key = option.group(1)
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"error: {_where(key, argv)}: unknown backbone field {key!r}{hint} Valid fields: "
            f"{', '.join(fields)} (preset: {presets})."
        )
    value = re.search(r'Parser key "backbone":(?s:.*?)Given value: (.+)', text)
    given = value.group(1).strip() if value else "?"
    close = difflib.get_close_matches(given, list(PRESETS), n=2, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return (
        f"error: {_where(given, argv)}: backbone {given!r} is not a preset{hint}. Write one of "
        f"{presets}, or a block such as {{preset: small, depth: 6}}."
    )


def config_error_message(text: str, argv: list[str]) -> str:
    """One paragraph for a jsonargparse error ``text`` of the command line ``argv``."""
    backbone = _backbone_error(text, argv)
    if backbone:
        return backbone
    option = re.search(r"Option '([^']+)' is not accepted", text) or re.search(
        r'Key "([^"]+)" is not expected', text
    )
    if option:
        key = option.group(1)
        classes = re.findall(r"class_path '([\w.]+)'", text)
        valid = _init_args(classes)
        close = difflib.get_close_matches(key.split(".")[-1], valid, n=3, cutoff=0.6)
        owner = f" of {classes[0].rsplit('.', 1)[-1]}" if classes else ""
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = f" Valid options{owner}: {', '.join(valid)}." if valid else ""
        return f"error: {_where(key, argv)}: unknown option {key!r}{owner}{hint}{listing}"
    bad_class = re.search(r"Expected a dot import path string: (\S+)", text) or re.search(
        r"Import path (\S+) does not correspond", text
    )
    if bad_class:
        name = bad_class.group(1).strip("'\"")
        valid = _task_and_data_names()
        close = difflib.get_close_matches(name.rsplit(".", 1)[-1], valid, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"error: {_where(name, argv)}: class_path {name!r} is not a known task or data "
            f"module{hint} Valid names: {', '.join(valid)}."
        )
    bad_value = _bad_value(text)
    if bad_value:
        key, problem = bad_value
        return f"error: {_where(key.rsplit('.', 1)[-1], argv)}: {key}: {problem}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return "error: " + " ".join(lines[:4]) + " (see --help or --print_config)"


def _bad_value(text: str) -> tuple[str, str] | None:
    """The dotted key and the complaint of a value that fails its type, or None.

    Why: jsonargparse >= 4.53 reports a bad value inside a class (``data.init_args.ehr_join:
    closest``) as "does not validate against any of the Union subtypes" of an
    ``Optional[DataModule]``, with the real complaint nested lines below beside a useless
    "Expected a <class 'NoneType'>". This walks the first branch down to its innermost
    "Parser key" and the message under it."""
    keys: list[str] = []
    for line in text.splitlines():
        stripped = line.strip().lstrip("- ").strip()
        key = re.match(r'Parser key "([^"]+)"', stripped)
        if key:
            if keys and keys[-1] == "class_path":
                keys[-1] = "init_args"
            keys.append(key.group(1))
        elif stripped.startswith("Problem with given class_path"):
            keys.append("class_path")
        elif (
            keys
            and stripped
            and not stripped.startswith(
                ("Does not validate", "Subtypes:", "Errors:", "Given value")
            )
        ):
            if "NoneType" in stripped:
                continue
            path = [k for k in keys if k != "class_path"]
            return ".".join(path), stripped
    return None


def run_reporting_user_errors(main: Callable[[], object]) -> None:
    """Run ``main``; a user error prints ``error: <message>`` on stderr and exits 1."""
    try:
        main()
    except USER_ERRORS as err:
        message = str(err.args[0]) if err.args and isinstance(err.args[0], str) else str(err)
        if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in message:
            message = f"{message}: {err.filename}"
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
