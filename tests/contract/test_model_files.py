"""Where the embedded model's files live: one definition for the executor, the gateway and `up`."""

from contract.model_files import MODEL_CACHE_ENV, default_model_dir, is_converted


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "m"))
    assert default_model_dir() == tmp_path / "m"


def test_is_converted_needs_weights_config_and_tokenizer(tmp_path):
    assert not is_converted(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    assert not is_converted(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert is_converted(tmp_path)
