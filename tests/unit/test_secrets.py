from llmtrain.manifest import masked_env


def test_tokens_keys_and_passwords_are_masked() -> None:
    env = {
        "HF_TOKEN": "hf_abc", "WANDB_API_KEY": "k", "MY_SECRET": "s", "DB_PASSWORD": "p",
        "GITHUB_TOKEN": "g", "NCCL_DEBUG": "INFO", "HOME": "/root",
    }
    masked = masked_env(env)
    for name in ("HF_TOKEN", "WANDB_API_KEY", "MY_SECRET", "DB_PASSWORD", "GITHUB_TOKEN"):
        assert masked[name] == "***"
    assert masked["NCCL_DEBUG"] == "INFO"
    assert "HOME" not in masked
