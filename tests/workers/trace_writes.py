"""Run a Python script with every file it writes recorded: which rank opened which path for
writing, and what it renamed where.

Usage: python trace_writes.py LOG_DIR SCRIPT.py ARGS...   (one LOG_DIR/writes-rank<RANK>.jsonl
per process, a JSON object a line: {"rank", "event": "write"|"rename", "path"[, "to"]})

Python's audit hooks see every open through open()/io.open()/os.open() (with the flags, so
writes can be told from reads) and every os.rename/os.replace. Three writers open their files in
native code without an audit event: torch.save given a path (the zip writer is C++; DeepSpeed's
checkpoints and dsforget's RNG files), safetensors' save_file (Rust; the exported model) and
tokenizers' Tokenizer.save (Rust; tokenizer.json). They are wrapped here, before the script
imports anything that binds them by name. A writer not covered leaves a file no record names,
which tests/integration/test_multinode.py reports.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main() -> None:
    log_dir, script, *args = sys.argv[1:]
    rank = int(os.environ["RANK"])
    # opened before the hook is installed, and written without opening anything: no recursion
    log = open(os.path.join(log_dir, f"writes-rank{rank}.jsonl"), "a", buffering=1)  # noqa: SIM115

    def record(event: str, path: object, to: object = None) -> None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str | os.PathLike):
            return  # a file descriptor: opened before, by path
        entry = {"rank": rank, "event": event, "path": os.path.abspath(path)}
        if to is not None:
            entry["to"] = os.path.abspath(os.fsdecode(to))
        log.write(json.dumps(entry) + "\n")

    def audit(event: str, details: tuple) -> None:
        if event == "open":
            path, mode, flags = details
            if (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
                record("write", path)
        elif event == "os.rename":  # os.rename and os.replace
            record("rename", details[0], details[1])

    import safetensors.torch
    import tokenizers
    import torch

    def traced(save):
        def wrapper(obj, f, *rest, **kwargs):
            record("write", f)
            return save(obj, f, *rest, **kwargs)

        return wrapper

    torch.save = traced(torch.save)
    safetensors.torch.save_file = traced(safetensors.torch.save_file)
    tokenizers.Tokenizer.save = traced(tokenizers.Tokenizer.save)  # (self, path): the path is second
    sys.addaudithook(audit)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
