"""Build (or find) the lab ahead of a run, e.g. on a login node before a cluster job.

python -m dsforget.lab --preset default     # prints the directory of the cached lab
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .build import _build, build_lab
from .config import PRESETS, LabConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default="default", choices=sorted(PRESETS), help="lab size (default: default)"
    )
    parser.add_argument(
        "--cache-root", help="cache directory (default: $DSFORGET_CACHE/lab or ~/.cache/dsforget/lab)"
    )
    parser.add_argument("--build-into", help=argparse.SUPPRESS)  # internal: one build in a clean process
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.build_into:
        _build(LabConfig(**json.loads(args.config_json)), Path(args.build_into))
        return
    print(build_lab(LabConfig.preset(args.preset), cache_root=args.cache_root).root)


if __name__ == "__main__":
    main()
