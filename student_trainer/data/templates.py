"""Zero-shot templates and class-name lists: the generic defaults, and reading what a user gives.

A template is a sentence with one ``{}`` where the class name goes; zero-shot classification
averages the text embeddings of every template filled with a class's name (``dataset.json``'s
``templates``). Every ingestion path writes the generic templates below unless the data set has
its own (the digits, the IDX presets) or the user passes ``--templates``: a folder of clothing
photos must not be described as "a handwritten {}."
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# CLIP-style prompts that say nothing about the domain (a subset of CLIP's ImageNet ensemble that
# fits any object photograph).
GENERIC_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a bad photo of the {}.",
    "itap of a {}.",
]


def read_list_file(path, what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped; lines starting with ``#`` are comments.

    ``what`` names the list in errors (e.g. "templates file")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    items = [line for line in lines if line and not line.startswith("#")]
    if not items:
        raise ValueError(f"{what} {path} holds no entries (one per line; '#' starts a comment)")
    return items


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """The templates as a list, or ValueError naming the first one without exactly one ``{}``."""
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where}: no templates given")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"{where}: template {template!r} needs exactly one '{{}}' where the class name goes")
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"{where}: template {template!r} has braces other than one '{{}}' ({exc})") from None
    return templates


def load_templates(values: Sequence[str] | None) -> list[str] | None:
    """``--templates`` values (repeatable) → templates; None when none were given.

    A value holding ``{}`` is a template; any other value is a file with one template per line."""
    if not values:
        return None
    templates: list[str] = []
    for value in values:
        if "{}" in value:
            templates.append(value)
        elif Path(value).is_file():
            templates.extend(read_list_file(value, "templates file"))
        else:
            raise ValueError(f"--templates {value!r} is neither a template (it has no '{{}}' for the class "
                             f"name) nor a file of templates")
    return check_templates(templates, "--templates")
