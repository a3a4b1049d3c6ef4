"""Compatibility: the DeepSpeed binding now lives in dsforget.integration (initialize, ds_config)."""

from .integration.ds_config import load_deepspeed_config, prepare_config
from .integration.initialize import UnsupportedSetupError, bind_to_engine, initialize

__all__ = ["UnsupportedSetupError", "bind_to_engine", "initialize", "load_deepspeed_config", "prepare_config"]
