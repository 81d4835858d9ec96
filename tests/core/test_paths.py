from pathlib import Path

from core import paths


def test_home_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESTUDIO_HOME", str(tmp_path / "ms"))
    assert paths.home() == tmp_path / "ms"
    assert paths.home().is_dir()
    assert paths.settings_file().parent == tmp_path / "ms"
    assert paths.cache_dir().is_dir()


def test_home_without_override_uses_platformdirs(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGESTUDIO_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert paths.home() == Path(tmp_path / "xdg" / "mergestudio")
