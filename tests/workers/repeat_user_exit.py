"""Run tests/workers/user_zero3_exit.py N times under DeepSpeed's launcher (2 CPU ranks) and
count the runs that do not exit 0: the reproduction of issue 15 item 13 (an intermittent abort,
"terminate called without an active exception", at interpreter exit after ZeRO-3 on CPU ranks).

Usage: .venv/bin/python tests/workers/repeat_user_exit.py [N [DIR]]   (default 8; prints each failure's
tail without faulthandler's list of extension modules; DIR keeps each failure's whole output)

tests/integration/test_exit.py runs 3 of them in the suite; long series (40 and more) belong here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(runs: int, keep: Path | None = None) -> int:
    sys.path.insert(0, str(HERE.parent))
    from launcher import free_port

    launcher = Path(sys.executable).with_name("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONFAULTHANDLER": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(runs):
            result = Path(scratch) / f"result{run}"
            command = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
            command += [str(HERE / "user_zero3_exit.py"), str(result)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            if done.returncode != 0 or not result.exists():
                failed += 1
                output = done.stdout + done.stderr
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    (keep / f"run{run}.log").write_text(output)
                lines = [line for line in output.splitlines() if not line.startswith("Extension modules:")]
                print(f"run {run}: status {done.returncode}\n" + "\n".join(lines)[-3000:], flush=True)
    print(f"{failed} of {runs} runs did not exit 0")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 8, Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    )
