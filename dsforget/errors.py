"""Errors in what the user gave (flags, config files, data, model directories), and how an entry
point reports them: one line, once, without a traceback.

Anything else (a bug, a failed collective, DeepSpeed's own errors) keeps its traceback: the
user cannot fix those by editing a command line, and whoever debugs them needs the stack.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

# As argparse's own usage errors: the command line or the files it names are wrong.
USER_ERROR_EXIT_CODE = 2


class UserInputError(Exception):
    """The user's input is wrong; the message names the flag, key, file or line to fix."""


class ConfigError(UserInputError, ValueError):
    """A flag or config value that is unknown, out of range, or contradicts another."""


class InputFileError(UserInputError, FileNotFoundError):
    """A file or directory the user named does not exist or lacks what it must hold."""


def _rank() -> int:
    """This process's global rank, before or after the process group exists."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def exit_now(status: int) -> NoReturn:
    """Close the process group, flush the logs and end this rank with `status`.

    ``os._exit`` rather than ``sys.exit``: nothing after a failed build is worth running, and a
    rank must not linger in interpreter teardown while the launcher stops the others.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_main(main: Callable[[list[str]], object], argv: list[str]) -> None:
    """Run an entry point's ``main(argv)``; a ``UserInputError`` becomes ``error: <message>`` on
    rank 0 (every rank raises the same one: they read the same flags and files) and status
    ``USER_ERROR_EXIT_CODE`` on every rank, which the deepspeed launcher, torchrun and srun pass
    on. Other exceptions propagate with their traceback."""
    try:
        main(argv)
    except UserInputError as error:
        if _rank() == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        exit_now(USER_ERROR_EXIT_CODE)
