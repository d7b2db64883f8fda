"""Saved models and serving cards appear whole or not at all."""

from __future__ import annotations

import json
import os

import pytest

from pipelines import storage


def test_a_folder_save_that_dies_midway_leaves_the_previous_folder(tmp_path):
    target = tmp_path / "model"

    def save(path: str, marker: str = "first") -> None:
        os.makedirs(path)
        with open(os.path.join(path, "weights"), "w") as handle:
            handle.write(marker)

    storage.replace_local_folder(str(target), save)
    assert (target / "weights").read_text() == "first"

    def dies(path: str) -> None:
        os.makedirs(path)
        (open(os.path.join(path, "weights"), "w")).write("half")
        raise KeyboardInterrupt("killed while saving")

    with pytest.raises(KeyboardInterrupt):
        storage.replace_local_folder(str(target), dies)
    assert (target / "weights").read_text() == "first"
    storage.replace_local_folder(str(target), lambda path: save(path, "second"))
    assert (target / "weights").read_text() == "second"


def test_the_best_model_record_names_a_whole_model(tmp_path):
    from pipelines.training import _keep_best

    class Model:
        def __init__(self, name: str, dies: bool = False):
            self.name, self.dies = name, dies

        def save(self, path: str) -> None:
            os.makedirs(path)
            (open(os.path.join(path, "weights"), "w")).write(self.name)
            if self.dies:
                raise KeyboardInterrupt("killed while saving")

    folder = tmp_path / "best"
    folder.mkdir()
    _keep_best(str(folder), "m", {"m": 0.5}, Model("step-10"), 10)
    with pytest.raises(KeyboardInterrupt):
        _keep_best(str(folder), "m", {"m": 0.7}, Model("step-20", dies=True), 20)
    record = json.loads((folder / "best.json").read_text())
    assert (record["step"], record["value"]) == (10, 0.5)
    assert (folder / record["folder"] / "weights").read_text() == "step-10"
    _keep_best(str(folder), "m", {"m": 0.4}, Model("step-30"), 30)  # worse: kept out
    _keep_best(str(folder), "m", {"m": 0.8}, Model("step-40"), 40)
    record = json.loads((folder / "best.json").read_text())
    assert (folder / record["folder"] / "weights").read_text() == "step-40"
    assert sorted(os.listdir(folder)) == ["best.json", "model-40"]


def test_a_gs_url_without_gcsfs_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gcsfs(name, *args, **kwargs):
        if name == "gcsfs" or name.startswith("gcsfs."):
            raise ImportError("No module named 'gcsfs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gcsfs)
    monkeypatch.delitem(__import__("sys").modules, "gcsfs", raising=False)
    with pytest.raises(ImportError, match=r"gs://bucket/index: gs:// needs gcsfs, not installed; pip install 'retrieval-pipelines\[gcs\]'"):
        storage.filesystem_and_path("gs://bucket/index")
