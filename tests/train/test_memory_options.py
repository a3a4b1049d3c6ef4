"""--gradient_checkpointing and --attn_implementation: same numbers, recorded, checked on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, tiny_llama_config
from transformers import LlamaForCausalLM

from dsforget.errors import ConfigError
from dsforget.train import checkpoint, job
from dsforget.train.cofitune_importance import activation_checkpointing_off
from dsforget.train.run_config import RunConfig, parse_run_config

FP32_DS = {"bf16": {"enabled": False}}


def tiny_llama(dropout: float = 0.0) -> LlamaForCausalLM:
    """TinyLM's Llama with three layers, eager attention (it applies attention dropout), float64."""
    torch.manual_seed(0)
    config = tiny_llama_config(num_hidden_layers=3, attention_dropout=dropout, attn_implementation="eager")
    return LlamaForCausalLM(config).double()


def enable_checkpointing(model: LlamaForCausalLM) -> None:
    job.enable_gradient_checkpointing(model)


def losses_and_gradients(
    model: LlamaForCausalLM, seed: int = 3
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two forward/backward passes on fixed tokens, dropout drawn from `seed`."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 3, 19), generator=generator)
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    losses = []
    for batch in tokens:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("frozen_embeddings", [False, True])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(frozen_embeddings: bool) -> None:
    """float64, with attention dropout: catches a recomputation that redraws dropout (seen failing
    with preserve_rng_state=False), also with the embeddings frozen as HFT and CoFiTune may leave
    them (the checkpointed layers' inputs then need no gradient of their own)."""
    plain, checkpointed = tiny_llama(dropout=0.2), tiny_llama(dropout=0.2)
    enable_checkpointing(checkpointed)
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    if frozen_embeddings:
        for model in (plain, checkpointed):
            model.model.embed_tokens.weight.requires_grad_(False)
    want_losses, want_grads = losses_and_gradients(plain)
    got_losses, got_grads = losses_and_gradients(checkpointed)
    assert got_losses == pytest.approx(want_losses, rel=1e-12, abs=0)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 20
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-10, atol=1e-12, msg=name)
    # a different dropout seed changes the losses: the comparison above is not vacuous
    assert losses_and_gradients(plain, seed=4)[0] != want_losses


def test_load_model_applies_both_options(tmp_path: Path) -> None:
    tiny_llama().float().save_pretrained(tmp_path)
    model = job.load_model(tmp_path, FP32_DS, attn_implementation="sdpa", gradient_checkpointing=True)
    assert model.config._attn_implementation == "sdpa" and model.is_activation_checkpointing
    layer = model.model.layers[0]
    assert layer._gradient_checkpointing_func.keywords.get("use_reentrant") is False
    default = job.load_model(tmp_path, FP32_DS)
    assert not default.is_activation_checkpointing
    # the implementation transformers chose is what a resume compares, not the flag's None
    assert (
        job.run_identity(RunConfig(), default)["attn_implementation"] == default.config._attn_implementation
    )
    eager = job.load_model(tmp_path, FP32_DS, attn_implementation="eager")
    assert job.run_identity(RunConfig(attn_implementation="eager"), eager)["attn_implementation"] == "eager"


def test_flags_reach_config_json_and_the_resume_identity(tmp_path: Path) -> None:
    config = parse_run_config(["--gradient_checkpointing", "--attn_implementation", "eager"])
    saved = json.loads(json.dumps(config.to_dict()))  # what FinetuneJob writes to config.json
    assert saved["gradient_checkpointing"] is True and saved["attn_implementation"] == "eager"
    assert parse_run_config([]).to_dict()["attn_implementation"] is None
    with pytest.raises(ConfigError, match="--attn_implementation: invalid choice: 'flash'"):
        parse_run_config(["--attn_implementation", "flash"])
    identity = job.run_identity(config, tiny_llama())
    assert identity["attn_implementation"] == "eager" and "gradient_checkpointing" not in identity


def write_checkpoint(tmp_path: Path, run: dict) -> Path:
    directory = tmp_path / "checkpoints" / "step2"
    directory.mkdir(parents=True)
    (directory / "trainer.json").write_text(json.dumps({"step": 2, "world_size": 1, "run": run}))
    (directory / checkpoint.COMPLETE).write_text("")
    return directory


def test_resume_refuses_another_attention_but_not_checkpointing(tmp_path: Path) -> None:
    """Catches a resume under another attention kernel (other rounding) going unnoticed, and a
    resume that refuses gradient checkpointing turned on to fit memory (it changes no number)."""
    model = tiny_llama()
    saved = job.run_identity(RunConfig(attn_implementation="eager"), model)
    directory = write_checkpoint(tmp_path, saved)
    checkpointed = job.run_identity(
        RunConfig(attn_implementation="eager", gradient_checkpointing=True), model
    )
    checkpoint.check_resume(directory, checkpointed, world_size=1)
    model.config._attn_implementation = "sdpa"
    other = job.run_identity(RunConfig(attn_implementation="sdpa"), model)
    with pytest.raises(ValueError, match="attn_implementation='eager' there, 'sdpa' here"):
        checkpoint.check_resume(directory, other, world_size=1)
    # a checkpoint written before the key existed still resumes
    older = write_checkpoint(tmp_path / "old", {k: v for k, v in saved.items() if k != "attn_implementation"})
    checkpoint.check_resume(older, other, world_size=1)


def test_flash_attention_is_refused_where_it_cannot_run(monkeypatch) -> None:
    import importlib.util

    with pytest.raises(ConfigError, match="needs the flash_attn package, which is not installed"):
        job.check_attn_implementation("flash_attention_2", precision_bf16=True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a),
    )
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cuda":
        with pytest.raises(ConfigError, match="runs on CUDA devices only, this run's accelerator is 'cpu'"):
            job.check_attn_implementation("flash_attention_2", precision_bf16=True)
    else:
        with pytest.raises(ConfigError, match="no fp32 kernels"):
            job.check_attn_implementation("flash_attention_2", precision_bf16=False)
    for name in (None, "sdpa", "eager"):
        job.check_attn_implementation(name, precision_bf16=False)


def test_importance_pass_turns_checkpointing_off_and_back_on() -> None:
    """compute_importance refuses a checkpointing model (recomputation would redraw its dropout);
    the job's pass must get the same importance as on a plain model and leave checkpointing on."""
    from dsforget.methods.cofitune.importance import compute_importance

    generator = torch.Generator().manual_seed(2)
    batches = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for ids in torch.randint(1, VOCAB, (2, 2, 11), generator=generator)
    ]
    plain, checkpointed = tiny_llama().float(), tiny_llama().float()
    enable_checkpointing(checkpointed)
    with pytest.raises(ValueError, match="needs gradient checkpointing off"):
        compute_importance(checkpointed, batches)
    want = compute_importance(plain, batches, seed=5)
    with activation_checkpointing_off(checkpointed) as was_on:
        got = compute_importance(checkpointed, batches, seed=5)
    assert was_on and checkpointed.is_activation_checkpointing
    for kind, tensor in want.tensors().items():
        torch.testing.assert_close(got.tensors()[kind], tensor, rtol=0, atol=0)
    with activation_checkpointing_off(plain) as was_on:
        assert not was_on


def test_forget_trainer_with_gradient_checkpointing_trains_the_same(tmp_path: Path) -> None:
    """dsforget.hf.ForgetTrainer under TrainingArguments(gradient_checkpointing=True): the Trainer
    turns checkpointing on itself; MoFO must see the same gradients, so the logged losses and the
    final weights equal those of the run without it."""
    from transformers import TrainingArguments

    import dsforget
    from dsforget.hf import ForgetTrainer

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (16, 13), generator=generator)
    data = [{"input_ids": row, "labels": row} for row in tokens]

    def train(checkpointing: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = tiny_llama().float()
        arguments = TrainingArguments(
            output_dir=str(tmp_path / f"gc{checkpointing}"),
            per_device_train_batch_size=4,
            max_steps=4,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            gradient_checkpointing=checkpointing,
            seed=0,
        )
        trainer = ForgetTrainer(
            model=model,
            args=arguments,
            train_dataset=data,
            make_optimizer=lambda m: dsforget.MoFOAdamW(m.named_parameters(), lr=1e-2, fraction=0.3),
        )
        trainer.train()
        assert model.is_activation_checkpointing == checkpointing
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, {name: p.detach().clone() for name, p in model.named_parameters()}

    plain_losses, plain_weights = train(False)
    losses, weights = train(True)
    assert len(losses) == 4 and losses == pytest.approx(plain_losses, rel=1e-6)
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(plain_weights["lm_head.weight"], tiny_llama().float().lm_head.weight)
