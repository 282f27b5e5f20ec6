"""Model presets, dummy loading from a folder, KV sizing."""

from __future__ import annotations

import pytest
import torch

from executor_svc import models
from executor_svc.kv_cache import KVCache, KVShape, kv_shape_from_config, num_blocks_for_device


def test_presets_are_seeded_and_shaped():
    a = models.load_model("tiny-llama", seed=3)
    b = models.load_model("tiny-llama", seed=3)
    assert type(a.model).__name__ == "LlamaForCausalLM"
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name
    cfg = models.preset_config("mistral-7b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.sliding_window) == (4096, 32, 8, None)
    # K and V x 32 layers x 8 KV heads x 128 dims x 2 bytes
    assert kv_shape_from_config(cfg, 16, torch.float16).bytes_per_token == 128 * 1024
    with pytest.raises(ValueError, match="unknown preset"):
        models.preset_config("gpt-17")


def test_dummy_from_folder_and_local_folder(tmp_path):
    cfg = models.preset_config("tiny-mistral")
    cfg.num_hidden_layers = 2
    cfg.save_pretrained(tmp_path)
    dummy = models.load_model(str(tmp_path), load_format="dummy")
    assert dummy.config.num_hidden_layers == 2 and dummy.path == tmp_path
    dummy.model.save_pretrained(tmp_path)
    real = models.load_model(str(tmp_path))  # weights from disk
    sd = dummy.model.state_dict()
    for name, p in real.model.state_dict().items():
        assert torch.equal(p, sd[name]), name
    with pytest.raises(FileNotFoundError):
        models.load_model(str(tmp_path / "missing"))


def test_kv_sizing():
    shape = KVShape(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
    assert shape.bytes_per_block == 2 * 4 * 2 * 64 * 4 * 16
    cpu = torch.device("cpu")
    assert num_blocks_for_device(shape, cpu, num_blocks=10) == 10
    assert num_blocks_for_device(shape, cpu, kv_bytes=shape.bytes_per_block * 7 + 5) == 7
    assert num_blocks_for_device(shape, cpu, max_blocks=3) == 3
    with pytest.raises(ValueError):
        num_blocks_for_device(shape, cpu, kv_bytes=10)
    kv = KVCache(shape, 5)
    assert kv.k.shape == (4, 2, 80, 64) and kv.nbytes == 5 * shape.bytes_per_block


def test_runner_sizes_kv_from_budget(tiny):
    from executor_svc.runner import ModelRunner

    runner = ModelRunner(tiny, kv_bytes=1 << 20)
    info = runner.info()
    assert info.num_blocks == (1 << 20) // info.kv_bytes_per_block == 16
    assert info.eos_token_ids == (2,) and info.max_model_len == 4096


def test_select_backend():
    from executor_svc.attention import HAS_FLASH_ATTN, select_backend

    cpu = torch.device("cpu")
    assert select_backend(cpu, torch.float32) == "sdpa"
    assert select_backend(cpu, torch.float16, "sdpa") == "sdpa"
    if not HAS_FLASH_ATTN:
        with pytest.raises(RuntimeError, match="flash_attn"):
            select_backend(torch.device("cuda"), torch.float16, "flash-attn")
    with pytest.raises(ValueError):
        select_backend(cpu, torch.float32, "xformers")


def test_cpu_bf16_units_and_auto_dtype(tmp_path):
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert models.cpu_bf16_units(amx) == ("amx_bf16", "avx512_bf16")
    assert models.cpu_bf16_units(plain) == ()
    assert models.cpu_bf16_units(tmp_path / "missing") == ()
    native = bool(models.cpu_bf16_units())
    assert models.resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert models.resolve_dtype(None, "cpu") == torch.float32  # no choice made: exact fp32
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        models.resolve_dtype("int8", "cpu")
