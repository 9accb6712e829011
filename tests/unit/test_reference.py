"""docs/configuration.md is generated from the config models and must not drift."""

from __future__ import annotations

from pydantic import BaseModel

from appliance.config import ApplianceConfig
from appliance.reference import REFERENCE_PATH, config_reference


def test_committed_reference_is_current() -> None:
    assert REFERENCE_PATH.read_text() == config_reference(), "run `invoke docs` and commit docs/configuration.md"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _keys(ann, f"{prefix}{name}.")
        else:
            assert field.description, f"{prefix}{name} has no description"
            out.append(prefix + name)
    return out


def test_every_setting_is_documented() -> None:
    text = config_reference()
    keys = _keys(ApplianceConfig)
    assert len(keys) > 40
    for key in keys:
        assert f"| `{key}` |" in text, key
