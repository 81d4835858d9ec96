"""Shared test set-up: hermetic environment and tiny local models.

Environment (set at import, before any test module imports project code):
  MERGESTUDIO_HOME   a temporary folder (re-pointed to a tmp_path_factory folder by the
                     session autouse fixture ``mergestudio_home`` before the first test)
  QT_QPA_PLATFORM    offscreen
  HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE = 1, HF_HOME = an empty temporary folder
  TOKENIZERS_PARALLELISM = false

Session fixtures (built once, under tmp_path_factory; see tests/fixtures/tiny_models.py):
  llama_family, gpt2_family, bert_family   {"base", "a", "b", "c"} -> Path (float32)
  llama_family_bf16                         same for llama in bfloat16
  llama_sharded                             Path: llama base as index + several shards
  single_file_ckpt                          Path: one .safetensors file with llama base
  diffusers_pipelines                       {"a", "b"} -> Path: two SD-style pipelines
  bad_models                                BadModels: name -> BadInput (attribute access too)
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # so `tests.fixtures` imports without PYTHONPATH
    sys.path.insert(0, str(_REPO))

_IMPORT_HOME = Path(tempfile.mkdtemp(prefix="mergestudio-test-home-"))
atexit.register(shutil.rmtree, _IMPORT_HOME, True)

os.environ["MERGESTUDIO_HOME"] = str(_IMPORT_HOME)
os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_IMPORT_HOME / "hf")  # never see (or write) the user's HF cache
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session", autouse=True)
def mergestudio_home(tmp_path_factory) -> Path:
    """The MERGESTUDIO_HOME every test runs with (a fresh temporary folder)."""
    home = tmp_path_factory.mktemp("mergestudio_home")
    old = os.environ.get("MERGESTUDIO_HOME")
    os.environ["MERGESTUDIO_HOME"] = str(home)
    yield home
    if old is not None:
        os.environ["MERGESTUDIO_HOME"] = old


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Path:
    """A per-test empty MERGESTUDIO_HOME (for tests that need an empty database/settings)."""
    home = tmp_path / "mergestudio_home"
    home.mkdir()
    monkeypatch.setenv("MERGESTUDIO_HOME", str(home))
    return home


# ----------------------------------------------------------------------------- models


class BadModels(dict):
    """name -> BadInput; also readable as attributes (bad_models.truncated.tensor)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    from tests.fixtures.tiny_models import make_family

    return make_family(tmp_path_factory.mktemp("llama"), arch="llama")


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory) -> dict[str, Path]:
    from tests.fixtures.tiny_models import make_family

    return make_family(tmp_path_factory.mktemp("gpt2"), arch="gpt2")


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory) -> dict[str, Path]:
    from tests.fixtures.tiny_models import make_family

    return make_family(tmp_path_factory.mktemp("bert"), arch="bert")


@pytest.fixture(scope="session")
def llama_family_bf16(tmp_path_factory) -> dict[str, Path]:
    import torch

    from tests.fixtures.tiny_models import make_family

    return make_family(tmp_path_factory.mktemp("llama_bf16"), arch="llama", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def llama_sharded(llama_family, tmp_path_factory) -> Path:
    from tests.fixtures.tiny_models import make_sharded

    return make_sharded(llama_family["base"], tmp_path_factory.mktemp("sharded") / "tiny-llama-sharded")


@pytest.fixture(scope="session")
def single_file_ckpt(llama_family, tmp_path_factory) -> Path:
    from tests.fixtures.tiny_models import make_single_file

    return make_single_file(llama_family["base"], tmp_path_factory.mktemp("single") / "tiny-llama.safetensors")


@pytest.fixture(scope="session")
def diffusers_pipelines(tmp_path_factory) -> dict[str, Path]:
    from tests.fixtures.tiny_models import make_diffusers_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    return {
        "a": make_diffusers_pipeline(root / "tiny-sd-a", seed=0),
        "b": make_diffusers_pipeline(root / "tiny-sd-b", seed=1),
    }


@pytest.fixture(scope="session")
def bad_models(llama_family, tmp_path_factory) -> BadModels:
    from tests.fixtures.tiny_models import make_all_bad

    return BadModels(make_all_bad(llama_family["base"], tmp_path_factory.mktemp("bad"), arch="llama"))
