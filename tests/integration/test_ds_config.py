"""The DeepSpeed config rules (dsforget.integration.ds_config) on their own."""

from __future__ import annotations

import pytest

from dsforget.integration.ds_config import UnsupportedSetupError, prepare_config


def test_prepare_config_fills_client_optimizer_keys_and_refuses_contradictions(tmp_path) -> None:
    config = prepare_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    assert config["zero_allow_untested_optimizer"] is True
    assert config["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer is true"):
        prepare_config(
            {
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
                "zero_force_ds_cpu_optimizer": True,
            }
        )
    with pytest.raises(ValueError, match="has an 'optimizer' section"):
        prepare_config({"optimizer": {"type": "Adam"}})
    with pytest.raises(UnsupportedSetupError, match=r"bf16 without ZeRO \(zero_optimization.stage 0\)"):
        prepare_config({"bf16": {"enabled": True}})
    with pytest.raises(UnsupportedSetupError, match="offload_optimizer.device='nvme'"):
        prepare_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
    broken = tmp_path / "ds.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=f"DeepSpeed config {broken}: not valid JSON"):
        prepare_config(broken)
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        prepare_config(tmp_path / "missing.json")
