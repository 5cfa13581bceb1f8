"""The package as a user installs it: a wheel in a venv of its own, used from outside the
checkout, with presets by name and the console commands."""

import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def sh(cmd, cwd, env=None, timeout=600):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, environment) of a venv holding the wheel built from this checkout.
    Its dependencies come from the test environment's site-packages through a plain path
    entry (so that environment's editable install of llama3_jax stays invisible)."""
    tmp = tmp_path_factory.mktemp("wheel")
    try:
        import setuptools  # noqa: F401 - build here, offline, when the environment can
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", tmp / "dist", REPO], cwd=tmp)
    wheel = next((tmp / "dist").glob("llama3_jax-*.whl"))
    venv = tmp / "venv"
    sh([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    py = venv / "bin" / "python"
    site = pathlib.Path(sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip())
    (site / "test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel], cwd=tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    return venv / "bin", env, tmp


def test_wheel_has_presets_and_commands_outside_the_checkout(installed):
    bin_dir, env, tmp = installed
    work = tmp / "elsewhere"
    work.mkdir()
    where = sh([bin_dir / "python", "-c", "import llama3_jax, llama3_jax.config as c; "
                "print(llama3_jax.__file__); print(c.preset_dir('configs')); print(c.preset_dir('meshes'))"],
               cwd=work, env=env).split()
    assert all(pathlib.Path(p).is_relative_to(tmp / "venv") for p in where), where  # not the checkout

    out = sh([bin_dir / "llama3-train", "--config", "debug-tiny", "--mesh", "cpu-8", "--steps", "2", "--out", "run",
              "train.sample_tokens=2"], cwd=work, env=env)
    assert "on 8 cpu device(s)" in out and (work / "run" / "checkpoints" / "2").is_dir()
    sh([bin_dir / "llama3-convert", "to-hf", "run", "hf"], cwd=work, env=env)
    assert (work / "hf" / "model.safetensors").is_file() and (work / "hf" / "tokenizer.json").is_file()
    # from-meta looks up the Llama 3.2 presets (their RoPE factor), so it needs them installed.
    sh([bin_dir / "python", "-m", "llama3_jax.convert", "to-meta", "run", "meta"], cwd=work, env=env)
    sh([bin_dir / "llama3-convert", "from-meta", "meta", "back"], cwd=work, env=env)
    assert (work / "back" / "checkpoints" / "0").is_dir()


def test_own_config_file_starts_from_a_preset(installed):
    bin_dir, env, tmp = installed
    work = tmp / "own-config"
    work.mkdir()
    (work / "mine.toml").write_text('base = "debug-tiny"\n[model]\nn_layers = 1\n')
    code = "from llama3_jax.config import load_config; print(load_config('mine.toml').model.n_layers)"
    assert sh([bin_dir / "python", "-c", code], cwd=work, env=env).strip() == "1"
