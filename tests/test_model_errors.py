"""Bad checkpoints give one specific, readable error from the Python API."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from stablelm_lsp.models import (CheckpointError, CheckpointNotFound, PickleRefused,
                                 UnsupportedModel, load_model)


@pytest.fixture()
def ckpt(stablelm_checkpoint, tmp_path):
    """A private copy of the tiny StableLM checkpoint that a test may damage."""
    return shutil.copytree(stablelm_checkpoint, tmp_path / "ckpt")


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFound) as exc:
        load_model(tmp_path / "nope")
    assert "no such folder" in one_line(exc)


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointNotFound) as exc:
        load_model(tmp_path)
    assert "config.json" in one_line(exc)


def test_unsupported_model_type_names_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel) as exc:
        load_model(ckpt)
    msg = one_line(exc)
    assert "llama" in msg and "stablelm" in msg and "persimmon" in msg and "starcoder2" in msg


def _rewrite(ckpt, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    assert "model.layers.1.mlp.up_proj.weight" in one_line(exc)


def test_wrong_shape_names_tensor_and_shapes(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    msg = one_line(exc)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and "[8, 64]" in msg and "[64, 64]" in msg


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    assert "truncated" in one_line(exc)


def test_corrupt_safetensors_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    assert "corrupt" in one_line(exc)


def test_sharded_checkpoint_and_missing_shard(ckpt):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, ckpt / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = load_model(ckpt)
    ids = torch.tensor([[5, 6, 7, 8]], device=sharded.device)   # the GPU where there is one
    assert sharded.model(ids).shape == (1, 4, sharded.config.vocab_size)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt)
    assert "missing shard model-00002-of-00002.safetensors" in one_line(exc)


def test_pickle_refused_unless_allowed(ckpt, stablelm_checkpoint):
    from safetensors.torch import load_file

    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(tensors, ckpt / "pytorch_model.bin")
    with pytest.raises(PickleRefused) as exc:
        load_model(ckpt)
    assert "pytorch_model.bin" in one_line(exc)
    allowed = load_model(ckpt, allow_pickle=True)
    ids = torch.tensor([[5, 6, 7, 8]], device=allowed.device)
    torch.testing.assert_close(allowed.model(ids), load_model(stablelm_checkpoint).model(ids))


def test_hub_id_offline_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointNotFound) as exc:
        load_model("someone/not-a-model", offline=True)
    assert "not in the Hugging Face cache" in one_line(exc)


def test_bad_device_and_dtype(stablelm_checkpoint):
    with pytest.raises(CheckpointError):
        load_model(stablelm_checkpoint, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError) as exc:
            load_model(stablelm_checkpoint, device="cuda")
        assert "CUDA is not available" in one_line(exc)


def test_a_cuda_device_beyond_the_machines_is_a_clear_error(stablelm_checkpoint, monkeypatch):
    if not torch.cuda.is_available():   # the check runs before CUDA is touched
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    count = torch.cuda.device_count()
    with pytest.raises(CheckpointError) as exc:
        load_model(stablelm_checkpoint, device=f"cuda:{count}")
    assert f"cuda:{count}" in one_line(exc) and f"has {count} CUDA device" in one_line(exc)


def test_missing_norm_biases_load_as_zero(ckpt):
    """StableLM 2 12B ships no LayerNorm biases (use_norm_bias false): they are zero."""
    _rewrite(ckpt, lambda t: [t.pop(k) for k in list(t) if "layernorm.bias" in k or k == "model.norm.bias"])
    loaded = load_model(ckpt)
    assert float(loaded.model.blocks[0].ln1.bias.abs().sum()) == 0.0
