"""Loading configs: TOML presets and files with `base`, `section.key=value` overrides, and
typed coercion into the dataclasses (unknown keys are errors that list the valid ones).

Imports: the standard library and `config.schema`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib
import typing

from llama3_jax.config.schema import SECTIONS, Config, ConfigError, MeshConfig

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent

def preset_dir(kind: str) -> pathlib.Path:
    """The folder of presets of `kind` ("configs" or "meshes"): inside an installed wheel,
    else the checkout's top-level folder (a checkout, or an editable install)."""
    for cand in (_PACKAGE / kind, _PACKAGE.parent / kind):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"no {kind}/ folder next to {_PACKAGE}; reinstall llama3_jax")




def _coerce(value, typ, where: str):
    """Turn a TOML value (or a command-line string) into the dataclass field's type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is tuple:  # tuple[DataSource, ...]
        if isinstance(value, str):
            raise ConfigError(f"{where} is a list of tables; set it in a TOML file")
        return tuple(_coerce(v, args[0], where) for v in value)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table")
        return _build(typ, value, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ in (int, float):
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {typ.__name__}, got {value!r}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return out
    if typ is str:
        return str(value)
    raise TypeError(typ)


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + '.' + u for u in unknown)}; "
                          f"valid keys in [{where}]: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def build(cls, values: dict, where: str):
    """`values` (a TOML table) as the dataclass `cls`, coerced like a run config: unknown keys
    are a ConfigError naming `where` and the valid keys. For other commands' configs."""
    return _build(cls, values, where)


def resolve_preset(name_or_path: str, kind: str = "configs", relative_to: pathlib.Path | None = None
                   ) -> pathlib.Path:
    """A .toml path (relative to `relative_to` if given, else the working directory), else
    the preset of that name in the `kind` folder."""
    p = pathlib.Path(name_or_path).expanduser()
    if p.suffix == ".toml":
        p = (relative_to / p) if relative_to is not None and not p.is_absolute() else p
        if p.is_file():
            return p
    directory = preset_dir(kind)
    cand = directory / f"{name_or_path}.toml"
    if cand.is_file():
        return cand
    known = sorted(x.stem for x in directory.glob("*.toml"))
    what = {"configs": "config", "meshes": "mesh"}[kind]
    raise ConfigError(f"{what} {name_or_path!r} not found: give a .toml path or one of {', '.join(known)}")


def _read_toml(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None


def _read_config(path: pathlib.Path, seen=()) -> dict:
    raw = _read_toml(path)
    base = raw.pop("base", None)
    merged: dict = {}
    if base is not None:
        bpath = resolve_preset(str(base), relative_to=path.parent).resolve()
        if bpath in seen or bpath == path.resolve():
            raise ConfigError(f"{path}: circular base {base!r}")
        merged = _read_config(bpath, seen + (path.resolve(),))
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; valid: {', '.join(SECTIONS)}")
        merged.setdefault(section, {}).update(values)
    return merged


def parse_override(text: str) -> tuple[str, str, str]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=1e-3)")
    key, value = text.split("=", 1)
    section, name = key.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
    return section, name, value


def load_config(name_or_path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a preset (or the defaults) and apply `section.key=value` overrides."""
    raw = _read_config(resolve_preset(name_or_path)) if name_or_path else {}
    for text in overrides:
        section, name, value = parse_override(text)
        raw.setdefault(section, {})[name] = value
    cfg = Config(**{s: _build(cls, raw.get(s, {}), s) for s, cls in SECTIONS.items()})
    cfg.model.validate()
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    return Config(**{s: _build(cls, d.get(s, {}), s) for s, cls in SECTIONS.items()})


def load_mesh(name_or_path: str | None = None) -> MeshConfig:
    """A mesh file from `meshes/` (by name or path); None = one device."""
    if not name_or_path:
        return MeshConfig()
    path = resolve_preset(name_or_path, kind="meshes")
    raw = _read_toml(path)
    unknown = sorted(set(raw) - {"mesh"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; a mesh file has only [mesh]")
    return _build(MeshConfig, raw.get("mesh", {}), "mesh")
