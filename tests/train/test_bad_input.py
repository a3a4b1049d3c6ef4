"""Bad input gets a clear error that names the file, line, key or setting to fix.

One table, in-process (each case calls the function the job calls on that input), plus one real
launch for the resume check, whose wiring lives in launch/finetune.py.

"A world size that does not divide the batch" cannot arise here: batch sizes are per rank
(micro_batch_size x gradient_accumulation), so any number of ranks is valid; a DeepSpeed config
that sets the global train_batch_size is refused (it would have to match every world size), and
data too small for one step of micro_batch_size x ranks x gradient_accumulation is an error that
says how to fix it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from launcher import REPO, RankFailure, free_port, run_ranks

from dsforget.data import DataConfig, DataError, load_conversations
from dsforget.errors import ConfigError, InputFileError, UserInputError
from dsforget.eval.general_tasks import load_general_tasks
from dsforget.optim.plan import DENSE, MaskPlan, PlanError
from dsforget.train import checkpoint
from dsforget.train.inputs import check_model_dir
from dsforget.train.job import deepspeed_config
from dsforget.train.run_config import RunConfig, parse_run_config
from dsforget.train.trainer import steps_per_epoch


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_lab_like_tasks(tmp_path: Path) -> Path:
    """A folder of task YAMLs named like the lab's (the name check needs no data)."""
    for name in ("lab_fact_recall", "lab_task"):
        write(tmp_path / "tasks" / f"{name}.yaml", f"task: {name}\ndataset_path: json\n")
    return tmp_path / "tasks"


def config_file(tmp_path: Path, text: str) -> RunConfig:
    return parse_run_config(["--config", str(write(tmp_path / "run.yaml", text))])


def ds_file(tmp_path: Path, values: dict) -> str:
    return str(write(tmp_path / "ds.json", json.dumps({"zero_optimization": {"stage": 3}, **values})))


def fake_checkpoint(tmp_path: Path, *, complete: bool = True, world_size: int = 2, **run) -> Path:
    """A checkpoint directory as checkpoint.save leaves it, less DeepSpeed's partitions."""
    directory = tmp_path / "checkpoints" / "step4"
    saved = {"step": 4, "epoch": 0, "micro_batch": 4, "world_size": world_size, "run": run}
    write(directory / "trainer.json", json.dumps(saved))
    if complete:
        write(directory / checkpoint.COMPLETE, "")
    return directory


THIS_RUN = {"method": "mofo", "seed": 0, "parameters": {"lm_head.weight": [211, 56], "norm.weight": [56]}}


def resume(tmp_path: Path, **saved) -> None:
    checkpoint.check_resume(fake_checkpoint(tmp_path, **saved), THIS_RUN, world_size=2)


CASES = [
    pytest.param(
        lambda tmp: load_conversations(
            write(
                tmp / "broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n'
            )
        ),
        DataError,
        r"broken\.jsonl:2: invalid JSON \(Expecting value at column 32\)",
        id="malformed-jsonl-line",
    ),
    pytest.param(
        lambda tmp: load_conversations(write(tmp / "partial.jsonl", '{"instruction": "a"}\n')),
        DataError,
        r"partial\.jsonl:1: missing key\(s\) \['output'\]; a record needs 'instruction' and 'output'",
        id="record-without-output",
    ),
    pytest.param(
        lambda tmp: load_conversations(write(tmp / "empty.jsonl", "\n\n")),
        DataError,
        r"empty\.jsonl: no records \(the file is empty\)",
        id="empty-data-file",
    ),
    pytest.param(
        lambda tmp: load_conversations(tmp / "absent.jsonl"),
        FileNotFoundError,
        r"data file .*absent\.jsonl does not exist",
        id="missing-data-file",
    ),
    pytest.param(
        lambda tmp: DataConfig(path=tmp / "data.txt"),
        ValueError,
        r"cannot infer the format of .*data\.txt from its suffix",
        id="data-suffix-unknown",
    ),
    pytest.param(
        lambda tmp: config_file(tmp, "frction: 0.1\n"),
        ValueError,
        r"run\.yaml: unknown key 'frction'; did you mean 'fraction'\?",
        id="unknown-config-key",
    ),
    pytest.param(
        lambda tmp: parse_run_config(["--max_step", "5"]),
        ValueError,
        r"command line: unknown key 'max_step'; did you mean 'max_steps'\?",
        id="unknown-flag",
    ),
    pytest.param(
        lambda tmp: parse_run_config(["--fraction", "1.5"]),
        ValueError,
        r"fraction=1\.5 must be in \(0, 1\]",
        id="fraction-above-1",
    ),
    pytest.param(
        lambda tmp: parse_run_config(["--lr", "0"]), ValueError, r"lr=0\.0 must be > 0", id="lr-zero"
    ),
    pytest.param(
        lambda tmp: config_file(tmp, "warmup_steps: -1\n"),
        ValueError,
        r"warmup_steps=-1 must be >= 0",
        id="negative-warmup",
    ),
    pytest.param(
        lambda tmp: parse_run_config(["--comm_timeout_s", "0"]),
        ValueError,
        r"comm_timeout_s=0\.0 must be > 0",
        id="comm-timeout-zero",
    ),
    pytest.param(
        lambda tmp: parse_run_config(["--max_nonfinite_steps", "0"]),
        ValueError,
        r"max_nonfinite_steps=0 must be >= 1",
        id="max-nonfinite-steps-zero",
    ),
    pytest.param(
        lambda tmp: check_model_dir(tmp / "nowhere"),
        FileNotFoundError,
        r"model directory .*nowhere does not exist \(--model; dsforget never downloads checkpoints\)",
        id="model-dir-missing",
    ),
    pytest.param(
        lambda tmp: check_model_dir(write(tmp / "model" / "config.json", "{}").parent),
        FileNotFoundError,
        r"model directory .*model has no weights \(\*\.safetensors or pytorch_model\*\.bin\)",
        id="model-dir-without-weights",
    ),
    pytest.param(
        lambda tmp: MaskPlan(
            {"lm_head.weight": DENSE, "other.weight": DENSE}, method="full"
        ).check_parameters([("lm_head.weight", (211, 56))]),
        PlanError,
        r"names 1 parameter\(s\) the model lacks, e\.g\. \['other\.weight'\]; "
        r"was it built for another model\?",
        id="plan-of-another-model",
    ),
    pytest.param(
        lambda tmp: checkpoint.check_resume(tmp / "checkpoints" / "step9", THIS_RUN, world_size=2),
        UserInputError,
        r"resume: checkpoint .*step9 does not exist \(--resume\)",
        id="resume-missing-checkpoint",
    ),
    pytest.param(
        lambda tmp: resume(tmp, complete=False, **THIS_RUN),
        UserInputError,
        r"checkpoint .*step4 is incomplete \(no COMPLETE marker: a save was cut short\)",
        id="resume-incomplete-checkpoint",
    ),
    pytest.param(
        lambda tmp: resume(tmp, **{**THIS_RUN, "method": "full"}),
        UserInputError,
        r"checkpoint .*step4 was written by a run with method='full' there, 'mofo' here; continuing "
        r"would mix two different runs: rerun with the checkpoint's settings, or start afresh",
        id="resume-another-method",
    ),
    pytest.param(
        lambda tmp: resume(
            tmp, **{**THIS_RUN, "parameters": {"lm_head.weight": [512, 64], "norm.weight": [56]}}
        ),
        UserInputError,
        r"checkpoint .*step4 was written for another model: 1 of 2 parameters differ "
        r"\(lm_head\.weight: \(512, 64\) there, \(211, 56\) here\)",
        id="resume-another-model",
    ),
    pytest.param(
        lambda tmp: resume(tmp, world_size=4, **THIS_RUN),
        UserInputError,
        r"checkpoint .*step4 was written by 4 ranks, this run has 2: "
        r"resume with the original number of ranks",
        id="resume-another-world-size",
    ),
    pytest.param(
        lambda tmp: deepspeed_config(
            RunConfig(deepspeed=ds_file(tmp, {"train_micro_batch_size_per_gpu": 4}), micro_batch_size=8)
        ),
        ValueError,
        r"ds\.json sets train_micro_batch_size_per_gpu=4 but the run has micro_batch_size=8: "
        r"set it in one place",
        id="deepspeed-config-contradicts-the-run",
    ),
    pytest.param(
        lambda tmp: deepspeed_config(RunConfig(deepspeed=ds_file(tmp, {"train_batch_size": 24}))),
        ValueError,
        r"ds\.json: remove train_batch_size; it follows from micro_batch_size, gradient_accumulation and the "
        r"number of ranks",
        id="deepspeed-global-batch-size",
    ),
    pytest.param(
        lambda tmp: deepspeed_config(RunConfig(deepspeed=str(tmp / "absent.json"))),
        FileNotFoundError,
        r"DeepSpeed config .*absent\.json does not exist",
        id="deepspeed-config-missing",
    ),
    pytest.param(
        lambda tmp: steps_per_epoch(10, 4, 3, 1),
        ValueError,
        r"the training data has 10 examples, fewer than one optimizer step takes \(micro_batch_size 4 x 3 "
        r"ranks x gradient_accumulation 1 = 12\): use fewer ranks, a smaller micro_batch_size",
        id="too-few-examples-for-the-world-size",
    ),
    pytest.param(
        lambda tmp: RunConfig(general_tasks="lab_task,,lab_heldout"),
        ConfigError,
        r"general_tasks='lab_task,,lab_heldout' must be comma-separated task names or YAML files, none empty",
        id="general-tasks-empty-name",
    ),
    pytest.param(
        lambda tmp: load_general_tasks(["lab_tsk"], [write_lab_like_tasks(tmp)]),
        ConfigError,
        r"--general_tasks: 'lab_tsk' is neither an lm-eval task, group or tag nor a task YAML file; "
        r"did you mean 'lab_task'\?",
        id="general-task-unknown-name",
    ),
    pytest.param(
        lambda tmp: load_general_tasks([str(tmp / "absent.yaml")]),
        InputFileError,
        r"--general_tasks: task file .*absent\.yaml does not exist",
        id="general-task-file-missing",
    ),
    pytest.param(
        lambda tmp: load_general_tasks(
            [
                str(
                    write(
                        tmp / "t.yaml",
                        "task: t\ndataset_path: json\n"
                        f"dataset_kwargs: {{data_files: {{test: {tmp}/no.jsonl}}}}\n"
                        "test_split: test\noutput_type: loglikelihood\n",
                    )
                )
            ]
        ),
        ConfigError,
        r"--general_tasks: task '.*t\.yaml' cannot be loaded offline \(FileNotFoundError: .*no\.jsonl",
        id="general-task-data-missing",
    ),
]


@pytest.mark.parametrize(("make_error", "error_type", "message"), CASES)
def test_bad_input_is_named(
    tmp_path: Path, make_error: Callable[[Path], object], error_type: type, message: str
) -> None:
    """Catches an input that passes silently, fails late with a framework traceback, or fails
    with a message that does not say which file, line, key or setting is wrong."""
    with pytest.raises(error_type) as raised:
        make_error(tmp_path)
    assert re.search(message, str(raised.value)), str(raised.value)


@pytest.mark.distributed
def test_resume_with_another_method_is_refused_by_the_job(tmp_path: Path, lab_cache: Path) -> None:
    """The job reads the plan back from its checkpoint, so a rerun with another --method would
    silently go on with the old one. Catches the resume check not being called (or too late), and
    its refusal reaching the user as a traceback rather than one ``error:`` line."""
    common = [str(REPO / "launch" / "finetune.py"), "--lab_preset", "tiny", "--micro_batch_size", "8"]
    common += ["--eval_max_examples", "5", "--no-export", "--max_steps", "2", "--output_dir", str(tmp_path)]
    env = {"DSFORGET_CACHE": str(lab_cache)}
    run_ranks([*common, "--method", "full"], world_size=1, timeout=600, env=env)
    with pytest.raises(RankFailure) as failure:
        run_ranks([*common, "--method", "mofo", "--max_steps", "4"], world_size=1, timeout=600, env=env)
    output = failure.value.outputs[0]
    assert re.search(
        r"error: resume: checkpoint .*step2 was written by a run with method='full' there, 'mofo' here",
        output,
    ), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


# --- how the job reports them: one line, once, status 2 ----------------------------------------


GOOD_LINE = '{"instruction": "a", "output": "b"}\n'
USER_ERRORS = [
    pytest.param(
        lambda tmp: ["--data", str(write(tmp / "broken.jsonl", GOOD_LINE + '{"instruction": \n'))],
        r"error: .*broken\.jsonl:2: invalid JSON",
        id="bad-data-line",
    ),
    pytest.param(
        lambda tmp: [
            "--data",
            str(write(tmp / "ok.jsonl", GOOD_LINE * 40)),
            "--eval_data",
            str(tmp / "no.jsonl"),
        ],
        r"error: data file .*no\.jsonl does not exist \(--eval_data\)",
        id="missing-eval-data-names-the-flag",
    ),
    pytest.param(
        lambda tmp: ["--data", str(tmp / "absent.jsonl")],
        r"error: data file .*absent\.jsonl does not exist \(--data\)",
        id="missing-data-file",
    ),
    pytest.param(
        lambda tmp: ["--data", str(write(tmp / "ok.jsonl", GOOD_LINE * 40)), "--fraction", "1.5"],
        r"error: fraction=1\.5 must be in \(0, 1\]",
        id="bad-value",
    ),
    pytest.param(
        lambda tmp: ["--data", str(write(tmp / "ok.jsonl", GOOD_LINE * 40)), "--lr", "fast"],
        r"error: command line: argument --lr: invalid float value: 'fast'",
        id="flag-of-the-wrong-type",
    ),
    pytest.param(
        lambda tmp: ["--data", str(write(tmp / "ok.jsonl", GOOD_LINE * 40)), "--general_tasks", "gone.yaml"],
        r"error: --general_tasks: task file gone\.yaml does not exist",
        id="general-task-file-missing",
    ),
    pytest.param(
        lambda tmp: [
            *("--data", str(write(tmp / "ok.jsonl", GOOD_LINE * 40)), "--method", "freeze"),
            *("--method_options", '{"trainable_patterns": ["mlp", "^nothing"]}'),
        ],
        r"error: freeze option trainable_patterns: '\^nothing' matches no parameter name",
        id="freeze-regex-matching-nothing",
    ),
    pytest.param(
        lambda tmp: [
            *("--data", str(write(tmp / "ok.jsonl", GOOD_LINE * 40)), "--method", "l2+mofo"),
            *("--method_options", '{"strength": -1}'),
        ],
        r"error: l2 option strength=-1 must be >= 0 \(0 is full fine-tuning\)",
        id="negative-l2-strength",
    ),
    pytest.param(
        lambda tmp: [
            *("--data", str(write(tmp / "ok.jsonl", GOOD_LINE * 40)), "--method", "lora"),
            *("--method_options", '{"rank": 0}'),
        ],
        r"error: lora option rank=0 must be an integer >= 1",
        id="lora-rank-0",
    ),
    pytest.param(
        lambda tmp: [
            *("--data", str(write(tmp / "ok.jsonl", GOOD_LINE * 40)), "--method", "lora"),
            *("--method_options", '{"target_modules": ["q_proj", "qkv"]}'),
        ],
        r"error: lora option target_modules: no module 'qkv' in LlamaForCausalLM; linear modules: "
        r"down_proj, gate_proj, .*, or all-linear",
        id="lora-unknown-target-module",
    ),
    pytest.param(
        lambda tmp: ["--data", str(write(tmp / "ok.jsonl", GOOD_LINE * 40)), "--method", "lora+hft"],
        r"error: method 'lora\+hft': lora combines only with mofo .*; hft chooses or pulls base weights, "
        r"which lora keeps frozen",
        id="lora-with-hft",
    ),
]


@pytest.mark.distributed
@pytest.mark.parametrize(("make_args", "message"), USER_ERRORS)
def test_user_error_is_one_line_once_with_status_2(
    tmp_path: Path, tiny_model: Path, make_args: Callable[[Path], list[str]], message: str
) -> None:
    """Two ranks, a user error on both. Catches a traceback per rank (the ~40 lines users got),
    the message printed by every rank, a status 0 or 1 a batch script cannot tell from a crash,
    and a message that names DataConfig.path instead of the flag the user typed."""
    argv = [str(REPO / "launch" / "finetune.py"), "--model", str(tiny_model), *make_args(tmp_path)]
    argv += ["--output_dir", str(tmp_path / "run")]
    with pytest.raises(RankFailure) as failure:
        run_ranks(argv, world_size=2, timeout=300)
    outputs = failure.value.outputs
    assert failure.value.ranks == [0, 1]
    everything = "\n".join(outputs)
    assert len(re.findall(message, everything)) == 1, everything[-3000:]
    assert re.search(message, outputs[0]), outputs[0][-3000:]
    assert "Traceback" not in everything, everything[-3000:]
    assert everything.count("error:") == 1, everything[-3000:]


@pytest.mark.distributed
def test_user_error_status_passes_through_the_deepspeed_launcher(tmp_path: Path, tiny_model: Path) -> None:
    """The deepspeed launcher must pass the ranks' status 2 on, and print no traceback of its own."""
    import subprocess
    import sys

    data = write(tmp_path / "broken.jsonl", GOOD_LINE + "{\n")
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port"]
    command += [str(free_port()), str(REPO / "launch" / "finetune.py"), "--model", str(tiny_model)]
    command += ["--data", str(data), "--output_dir", str(tmp_path / "run")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text[-3000:]
    assert len(re.findall(r"error: .*broken\.jsonl:2: invalid JSON", text)) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.distributed
def test_unexpected_error_keeps_its_traceback(tmp_path: Path, tiny_model: Path) -> None:
    """An error that is not the user's (injected into FinetuneJob.build) must keep its traceback:
    catches a handler so broad that it hides bugs behind one line."""
    script = write(
        tmp_path / "inject.py",
        "import runpy, sys\n"
        "from dsforget.train.finetune import FinetuneJob\n"
        "def build(self):\n    raise RuntimeError('injected bug')\n"
        "FinetuneJob.build = build\n"
        f"sys.argv = [{str(REPO / 'launch' / 'finetune.py')!r}, *sys.argv[1:]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n",
    )
    argv = [str(script), "--model", str(tiny_model), "--output_dir", str(tmp_path / "run")]
    argv += ["--data", str(write(tmp_path / "ok.jsonl", GOOD_LINE * 40))]
    with pytest.raises(RankFailure) as failure:
        run_ranks(argv, world_size=2, timeout=300)
    for output in failure.value.outputs:
        assert "Traceback" in output and "RuntimeError: injected bug" in output, output[-3000:]


def test_a_checkpoint_from_before_replay_resumes_only_without_replay(tmp_path: Path) -> None:
    """A checkpoint written before --replay_ratio existed carries no such key: catches it resuming
    a run that now replays (the data stream would change without a word), while the same run
    without replay still resumes; derived keys with no default (the attention kernel) stay skipped."""
    from dsforget.train import job

    older = fake_checkpoint(tmp_path, **THIS_RUN)
    defaults = job.identity_defaults()
    checkpoint.check_resume(
        older, {**THIS_RUN, "replay_ratio": 0.0, "attn_implementation": "sdpa"}, 2, defaults
    )
    with pytest.raises(ValueError, match="replay_ratio=0.0 there, 0.1 here"):
        checkpoint.check_resume(older, {**THIS_RUN, "replay_ratio": 0.1}, 2, defaults)
