"""Every command and snippet in README.md refers to something the suite runs.

Bash blocks: each command's script (or ``-m`` module, or make target) exists, its flags are ones
the script defines (the main job's: every RunConfig field), files under configs/ exist, and
python is the project's ``.venv/bin/python``. Python blocks: each is a verbatim excerpt of an
example under launch/examples/ (run by tests/integration/test_examples.py), or is run here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
FINETUNE = "launch/finetune.py"
LAUNCHERS = {".venv/bin/python", ".venv/bin/deepspeed", ".venv/bin/mpirun", "sbatch", "bash", "make"}


def finetune_flags() -> set[str]:
    from dsforget.train.run_config import RunConfig

    flags = {"--config", "--help"}
    for field in dataclasses.fields(RunConfig):
        flags.add(f"--{field.name}")
        if field.metadata["kind"] is bool:
            flags.add(f"--no-{field.name}")
    return flags


def flags_of(source_file: Path) -> set[str]:
    """The flags a script defines: its string literals that look like flags; the main job's too
    when it parses a RunConfig or passes flags on to launch/finetune.py."""
    source = source_file.read_text()
    flags = set(re.findall(r"""["'](--[A-Za-z][A-Za-z0-9_-]*)["']""", source)) | {"--help"}
    if "parse_run_config" in source or source_file.suffix == ".sbatch":
        flags |= finetune_flags()
    return flags


def commands() -> list[tuple[str, list[str]]]:
    """(line as written, tokens) for every command in the README's bash blocks."""
    found = []
    for language, body in BLOCKS:
        if language != "bash" or ". .venv/bin/activate" in body:  # the install block makes the venv
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                found.append((line, shlex.split(line)))
    return found


COMMANDS = commands()


@pytest.mark.parametrize(("line", "tokens"), COMMANDS, ids=[line[:60] for line, _ in COMMANDS])
def test_readme_command_refers_to_what_exists(line: str, tokens: list[str]) -> None:
    """Catches a README command naming a script, module, make target, config file or flag that
    does not exist, and a bare `python` that works only inside an activated virtualenv."""
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    assert tokens[0] in LAUNCHERS, f"{line!r}: start with one of {sorted(LAUNCHERS)}"
    if tokens[0] == "make":
        targets = re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), flags=re.M)
        assert tokens[1] in targets, line
        return
    for token in tokens:
        if token.startswith("configs/"):
            assert (REPO / token).exists(), f"{line!r}: {token} does not exist"
    if "-m" in tokens:
        module = tokens[tokens.index("-m") + 1]
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{line!r}: no module {module}"
        script, rest = Path(spec.origin), tokens[tokens.index("-m") + 2 :]
        if script.name == "__init__.py":
            script = script.with_name("__main__.py")
    else:
        scripts = [t for t in tokens if t.endswith((".py", ".sbatch")) and not t.startswith("-")]
        assert scripts, f"{line!r}: no script"
        script, rest = REPO / scripts[0], tokens[tokens.index(scripts[0]) + 1 :]
    assert script.exists(), f"{line!r}: {script} does not exist"
    own, passed_on = (rest[: rest.index("--")], rest[rest.index("--") + 1 :]) if "--" in rest else (rest, [])
    defined = flags_of(script)
    if script.name == "__main__.py":  # python -m package: flags may live in the package's modules
        defined |= {flag for path in script.parent.glob("*.py") for flag in flags_of(path)}
    for flag in (t.split("=")[0] for t in own if t.startswith("--")):
        assert flag in defined, f"{line!r}: {script.name} has no flag {flag}"
    for flag in (t.split("=")[0] for t in passed_on if t.startswith("--")):
        assert flag in finetune_flags(), f"{line!r}: {FINETUNE} has no flag {flag} (passed on after --)"


def lines_of(code: str) -> list[str]:
    return [line.strip() for line in code.splitlines() if line.strip()]


def excerpt_source(block: str) -> Path | None:
    """The example file that holds `block` verbatim (ignoring indentation), if any."""
    wanted = lines_of(block)
    for path in sorted((REPO / "launch" / "examples").glob("*.py")):
        have = lines_of(path.read_text())
        if any(have[i : i + len(wanted)] == wanted for i in range(len(have) - len(wanted) + 1)):
            return path
    return None


RUN_HERE = "plan = dsforget.build_plan("  # the plan snippet is run by test_plan_snippet_runs below
PYTHON_BLOCKS = [body for language, body in BLOCKS if language == "python"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[lines_of(b)[0][:50] for b in PYTHON_BLOCKS])
def test_readme_python_is_an_example_the_suite_runs(block: str) -> None:
    """Catches a snippet that drifted from its runnable example or hides a needed argument behind
    `...` (the ForgetTrainer snippet hid use_cpu, and each CPU rank trained alone on all data)."""
    if block.lstrip().startswith(RUN_HERE):
        return
    assert not [line for line in lines_of(block) if "..." in line and not line.startswith("#")], block
    assert excerpt_source(block) is not None, f"no file under launch/examples holds this verbatim:\n{block}"


def test_plan_snippet_runs(tmp_path: Path, monkeypatch) -> None:
    """The README's plan snippet, run as written on a small Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import dsforget

    (block,) = [b for b in PYTHON_BLOCKS if b.lstrip().startswith(RUN_HERE)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    monkeypatch.chdir(tmp_path)
    namespace = {"dsforget": dsforget, "model": model}
    exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "plan.json").exists()
    assert isinstance(namespace["optimizer"], dsforget.ForgetAdamW)


def test_readme_prose_runs_python_from_the_venv() -> None:
    """Catches `python -m dsforget.lab` in prose, which fails unless a virtualenv is active while
    every other command uses .venv/bin/python."""
    spans = re.findall(r"`([^`\n]*python[^`\n]*)`", README)
    bare = [span for span in spans if re.match(r"python3? ", span) and "-m venv" not in span]
    assert not bare, bare
