"""The configuration reference (``docs/configuration.md``), generated from the config models.

Generated, so it cannot drift from the code: a unit test compares the committed file
with a fresh render, and ``invoke docs`` rewrites it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from appliance.config import PROJECT_ROOT, ApplianceConfig
from appliance.formats import FORMATS

REFERENCE_PATH = PROJECT_ROOT / "docs" / "configuration.md"
FORMATS_PATH = PROJECT_ROOT / "docs" / "formats.md"
FORMATS_BEGIN = "<!-- formats table: generated from appliance/formats.py by `invoke docs` -->"
FORMATS_END = "<!-- end of the generated formats table -->"

HEADER = """# Configuration reference

<!-- Generated from appliance/config.py by `invoke docs`. Do not edit by hand. -->

Settings come from, lowest first: the defaults below < `appliance.yaml` in the working
directory (or `--config FILE`) < `--set key.path=value` (repeatable, Helm style: values are
YAML scalars, `{a,b}` is a list, `list[0].key` addresses an element) < `--provider X`.
Unknown keys, wrong types and out-of-range values are errors, all reported at once (exit 2).
`invoke config` prints the fully resolved configuration.

Settings marked with an environment variable reach the provisioning scripts under that name.

"""


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return value


def _type_name(field: FieldInfo) -> str:
    ann = field.annotation
    text = getattr(ann, "__name__", None) or str(ann)
    args = getattr(ann, "__args__", None)
    if text == "Literal" or (args and str(ann).startswith("typing.Literal")):
        return " \\| ".join(f"`{a}`" for a in args or ())
    return text.replace("typing.", "")


def _section(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    rows = []
    subsections = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            subsections.append((key, ann, field))
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        env = f"`{extra['env']}`" if "env" in extra else ""
        default = json.dumps(_default(field))
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(field)} | `{default}` | {env} | {desc} |")
    if rows:
        lines.append("| key | type | default | env | meaning |")
        lines.append("|---|---|---|---|---|")
        lines.extend(rows)
        lines.append("")
    for key, sub, field in subsections:
        lines.append(f"{'#' * min(2 + key.count('.'), 4)} `{key}`: {field.description or ''}")
        lines.append("")
        _section(sub, key + ".", lines)


def config_reference() -> str:
    lines: list[str] = [HEADER.rstrip("\n"), "", "## Top level", ""]
    _section(ApplianceConfig, "", lines)
    return "\n".join(lines).rstrip("\n") + "\n"


def write_reference(path: Path = REFERENCE_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_reference(), encoding="utf-8")
    return path


def formats_table() -> str:
    """The table of output formats in docs/formats.md, from the records in ``appliance.formats``."""
    lines = [FORMATS_BEGIN, "",
             "| `output.formats` name | file | what | imported by | OVF | hardware family | controller | NIC "
             "| manifest |",
             "|---|---|---|---|---|---|---|---|---|"]
    for fmt in FORMATS.values():
        file_name = fmt.file_name("<name>-<version>")
        if fmt.ovf is not None:
            p = fmt.ovf
            nic = f"`{p.nic.subtype}`" if p.nic.subtype else "per `virtualbox.nic_type`"
            ovf = (f"{p.version_text} | `{p.system_type}` | `{p.controller.subtype}` ({p.controller.guest_driver}) "
                   f"| {nic} ({p.nic.guest_driver}) | {p.manifest_digest}")
        else:
            ovf = "- | - | - | - | -"
        lines.append(f"| `{fmt.name}` | `{file_name}` | {fmt.title} | {', '.join(fmt.hypervisors)} | {ovf} |")
    lines += ["", "How to import each, and what else to know:", ""]
    for fmt in FORMATS.values():
        lines.append(f"- `{fmt.name}`: {fmt.how_to_import}" + "".join(f" {note}" for note in fmt.notes))
    lines += ["", FORMATS_END]
    return "\n".join(lines)


def formats_reference(current: str) -> str:
    """``current`` (docs/formats.md) with its generated table replaced by today's."""
    head, sep, rest = current.partition(FORMATS_BEGIN)
    _, sep2, tail = rest.partition(FORMATS_END)
    if not sep or not sep2:
        raise ValueError(f"{FORMATS_PATH} lacks the markers of the generated table")
    return head + formats_table() + tail


def write_formats_reference(path: Path = FORMATS_PATH) -> Path:
    path.write_text(formats_reference(path.read_text(encoding="utf-8")), encoding="utf-8")
    return path
