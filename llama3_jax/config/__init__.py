"""Typed configs loaded from TOML, with `section.key=value` overrides, and `validate`.

A run config has three sections: [model], [data] and [train]; a mesh file has [mesh].
Presets are the top-level `configs/` and `meshes/` folders of a checkout, which a wheel
carries inside the package (`llama3_jax/configs`, `llama3_jax/meshes`). A config may start
from another with a top-level `base = "name"` (a preset) or `base = "file.toml"` (a path
relative to the config's own folder); sections are merged key by key. Unknown keys are
errors that list the valid ones.

`validate` is the one check of a config against a mesh, a device count and a process
count; it runs before anything is compiled or written and raises `ConfigError` with a
one-line message that names the fix.

The package holds the dataclasses (`schema`), loading (`load`), `validate` (`checks`) and
`write_atomic` (`files`: a file written whole or not at all, for every room above).

Imports: the standard library only (this is the bottom of the package).
"""

from llama3_jax.config.checks import validate
from llama3_jax.config.files import replaced_atomically, write_atomic
from llama3_jax.config.load import (from_dict, load_config, load_mesh, parse_override, preset_dir, resolve_preset,
                                    to_dict)
from llama3_jax.config.schema import (ATTENTION_IMPLS, DTYPES, FAKE_DEVICES_HINT, MESH_AXES, REMAT_POLICIES, SECTIONS,
                                      STAGES, AlignConfig, Config, ConfigError, ContextStage, DataConfig, DataSource,
                                      MeshConfig, ModelConfig, TrainConfig, dtype_of)

__all__ = ["ATTENTION_IMPLS", "DTYPES", "FAKE_DEVICES_HINT", "MESH_AXES", "REMAT_POLICIES", "SECTIONS", "STAGES",
           "AlignConfig", "Config", "ConfigError", "ContextStage", "DataConfig", "DataSource", "MeshConfig",
           "ModelConfig", "TrainConfig", "dtype_of", "from_dict", "load_config", "load_mesh", "parse_override", "preset_dir",
           "replaced_atomically", "resolve_preset", "to_dict", "validate", "write_atomic"]
