"""`DMinConfig` settings as command-line flags and as a training script's arguments, derived from each field's
:class:`~dmin_diffusers.config.Setting`.

A setting is read from ``args.<script_argument>`` when the training scripts have an argument for it
(``resolution``, ``image_interpolation_mode``, ...), else from ``args.dmin_<field>`` (a training script that wants to
set it adds ``--dmin_<field>``; ``dmin cache`` has ``--<field>``, or the setting's own ``flag``). ``None`` leaves
the config's default.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from .config import DMinConfig, Setting, settings


def argument_name(name: str, declared: Setting) -> str | None:
    """The namespace attribute a setting is read from (``None``: it is never read from arguments)."""
    if declared.script_argument:
        return declared.script_argument
    return None if declared.flag == "" else f"dmin_{name}"


def add_setting_arguments(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    config_class: type = DMinConfig,
    notes: dict[str, str] | None = None,
) -> None:
    """Adds a flag for each setting of ``config_class`` that has one (or for ``names`` only), defaulting to
    ``None``; ``notes`` appends text to a flag's help."""
    declared_settings = settings(config_class)
    for name in names or declared_settings:
        declared = declared_settings[name]
        if declared.flag == "":
            continue
        flag = declared.flag or f"--{declared.script_argument or name}"
        help_text = declared.help.replace("``", "").replace("%", "%%") + (notes or {}).get(name, "")
        options: dict[str, Any] = {"dest": argument_name(name, declared), "default": None, "help": help_text}
        if declared.allowed() is not None:
            options["choices"] = list(declared.allowed())
        else:
            options["metavar"] = (declared.script_argument or name).upper()
        if declared.kind is list:
            options.update(nargs="+" if declared.item is int else "*", type=declared.item)
        elif declared.kind in (int, float):
            options["type"] = declared.kind
        parser.add_argument(flag, **options)


def chosen_settings(args: Any, config_class: type = DMinConfig) -> dict[str, Any]:
    """The settings that ``args`` (a parsed ``dmin cache`` command line or a training script's namespace) gives,
    by field name; the ones it leaves out (or sets to ``None``) are absent."""
    chosen = {}
    for name, declared in settings(config_class).items():
        attribute = argument_name(name, declared)
        value = getattr(args, attribute, None) if attribute else None
        if value is not None:
            chosen[name] = value
    return chosen
