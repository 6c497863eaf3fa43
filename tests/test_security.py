"""What a .dsg file may make dsgraph import or load, and when (docs/reliability.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dsgraph.runtime import sources


def test_factories_come_from_the_dsg_directory_not_the_current_one(tmp_path, monkeypatch):
    here, there = tmp_path / "cwd", tmp_path / "pipeline"
    here.mkdir()
    there.mkdir()
    (here / "planted.py").write_text("def make():\n    return 'from the current directory'\n")
    (there / "mine.py").write_text("def make():\n    return 'beside the .dsg file'\n")
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "path", ["", str(here), *sys.path])
    sources.set_import_path(str(there / "p.dsg"))
    assert sources.resolve_factory("mine:make")() == "beside the .dsg file"
    assert "" not in sys.path and str(here) not in sys.path
    with pytest.raises(sources.SourceError, match="cannot import module `planted`"):
        sources.resolve_factory("planted:make")


def _tiny_hf_model(path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)


def test_hf_passes_trust_remote_code_only_when_the_file_says_so(tmp_path, monkeypatch):
    import transformers

    _tiny_hf_model(tmp_path / "tiny")
    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model = sources.build_hf(["tiny"], {}, tmp_path)
    sources.build_hf(["tiny"], {"trust_remote_code": True}, tmp_path)
    assert seen == [False, True]
    assert model.config.n_embd == 16


def test_hf_never_downloads(tmp_path):
    with pytest.raises(sources.SourceError, match="does not exist"):
        sources.build_hf(["gpt2"], {}, tmp_path)
