"""The base of every config read from JSON (StrictConfig) and how its validation errors read: one line per
problem, naming the field and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from .architectures import option_owners
from .jsonfile import ConfigError, read_json_object
from .text import brief


class StrictConfig(BaseModel):
    """A config read from JSON: unknown keys, NaN and Infinity are errors, and every error names its field."""

    # allow_inf_nan: NaN and Infinity (which JSON readers accept) are refused for every float field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_lax_coercion(cls, value, info: ValidationInfo):
        """A number field takes numbers and a switch takes true/false: pydantic alone would read true as 1,
        "5" as 5 and 1 as true."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        kinds = get_args(annotation) or (annotation,)  # `int | None` -> (int, NoneType)
        if bool in kinds:
            if not isinstance(value, bool) and value is not None:
                raise ValueError(f"must be true or false, got {brief(json.dumps(value, default=str), 40)}")
        elif any(kind in (int, float) for kind in kinds) and isinstance(value, bool | str):
            raise ValueError(f"must be a number, got {brief(json.dumps(value), 40)}")
        return value

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, list(cls.model_fields))) from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> Self:
        return cls.from_dict(read_json_object(path, "config file", f"{cls.__name__} keys"))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def describe_validation_error(exc: ValidationError, fields: list[str], arch: object = None) -> str:
    """One line per problem: `field: what is wrong (allowed: ...)`; a value is repeated briefly at most.
    `fields` are the allowed keys named for an unknown one; `arch` the architecture a TrainConfig asked for,
    named when a key is another architecture's option."""
    lines = []
    for err in exc.errors():
        field = brief(".".join(str(p) for p in err["loc"]) or "config", 60)
        kind = err["type"]
        if kind == "extra_forbidden" and (owners := option_owners(field)):
            lines.append(f"{field}: an option of {', '.join(owners)}, not of {brief(str(arch), 60)}")
        elif kind == "extra_forbidden":
            lines.append(f"{field}: unknown key (allowed keys: {', '.join(fields)})")
        elif kind == "missing":
            lines.append(f"{field}: required")
        elif kind == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            lines.append(f"{field}: got {brief(repr(err.get('input')), 60)}; allowed: {allowed}")
        elif kind == "string_pattern_mismatch":  # only hook has a pattern
            lines.append(
                f"{field}: {brief(repr(err.get('input')), 60)} is not a module path (dot-separated names, such as "
                "model.layers.12)"
            )
        elif kind == "finite_number":
            lines.append(f"{field}: must be a finite number, got {brief(err.get('input'), 60)}")
        else:
            msg = brief(err["msg"].removeprefix("Value error, "))
            lines.append(f"{field}: {msg}" if field != "config" else msg)
    return "; ".join(lines)
