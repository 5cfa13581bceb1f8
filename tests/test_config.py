"""Config files: presets by name, `base` resolution, and where presets are found."""

import pathlib

import pytest

from llama3_jax.config import ConfigError, load_config, load_mesh, preset_dir, replaced_atomically, write_atomic

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_presets_are_the_checkouts_folders():
    assert preset_dir("configs") == REPO / "configs" and preset_dir("meshes") == REPO / "meshes"
    assert load_mesh("paper-16").pp_microbatches == 4


def test_base_is_a_preset_by_name_from_any_folder(tmp_path):
    own = tmp_path / "elsewhere" / "mine.toml"
    own.parent.mkdir()
    own.write_text('base = "debug-tiny"\n[model]\nn_layers = 3\n')
    cfg = load_config(str(own))
    assert cfg.model.n_layers == 3 and cfg.model.dim == load_config("debug-tiny").model.dim


def test_base_may_be_a_path_relative_to_the_file(tmp_path):
    (tmp_path / "common.toml").write_text('base = "debug-tiny"\n[train]\nlr = 0.5\n')
    (tmp_path / "run.toml").write_text('base = "common.toml"\n[model]\nn_layers = 1\n')
    cfg = load_config(str(tmp_path / "run.toml"))
    assert (cfg.train.lr, cfg.model.n_layers, cfg.model.dim) == (0.5, 1, 64)


def test_base_errors_name_the_fix(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match="circular base"):
        load_config(str(tmp_path / "a.toml"))
    (tmp_path / "c.toml").write_text('base = "llama3-9b"\n')
    with pytest.raises(ConfigError, match="config 'llama3-9b' not found: give a .toml path or one of .*debug-tiny"):
        load_config(str(tmp_path / "c.toml"))


def test_an_atomic_write_replaces_the_file_whole_or_leaves_it_alone(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_atomic(path, "old\n")
    with pytest.raises(RuntimeError):
        with replaced_atomically(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("the writer failed midway")
    assert path.read_text() == "old\n" and sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
    write_atomic(path, b"new\n")
    assert path.read_bytes() == b"new\n" and oct(path.stat().st_mode & 0o777) == oct(0o644)
