"""Tokenised training data kept on disk, so a run tokenises its data once, not on every rank and
every restart.

A cache entry is ``<cache_dir>/<key>/`` with ``train/`` and ``validation/`` (``datasets``
``save_to_disk``, read back memory-mapped) and ``meta.json`` (what the key was made of, in words,
and the counts). The key is a digest of everything the tokens depend on:

- the data file's **content** (SHA-256 of its bytes) and format. Not path + size + mtime: a file
  rewritten in place within the filesystem's mtime granularity, or replaced by one with the same
  size and mtime (``cp -p``, ``rsync -t``, a checkout), would silently reuse stale tokens. Hashing
  reads the file once, on the one process that needs the key (~1 s per GB on this machine's
  2 cores), against the minutes to hours tokenising it takes;
- the tokenizer: its full serialised form (``tokenizer.json``: vocabulary, merges, normaliser,
  pre-tokeniser, added tokens), its class and special tokens, and the chat template;
- ``max_length``, ``packing``, the validation split (fraction and seed);
- for plain-text files (``DataConfig.text``, replay data) that they are text and the digest of
  the held-out texts left out of them (absent from other keys, which stay as they were);
- ``CACHE_FORMAT`` (bumped when tokenisation or packing change) and the transformers and
  tokenizers versions (their rendering and tokenisation could change).

One writer per entry: whoever holds ``<key>.lock`` (an ``flock``, released by the kernel when its
holder dies) builds into a temporary directory and renames it to ``<key>`` in one step, so readers
see a whole entry or none. On a shared filesystem one process builds and every node reads; on a
node-local one each node's first process builds its own copy. Waiting for the lock is bounded.
Entries are never modified; delete the directory (or one entry) to reclaim the space.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from .atomic import fsync_directory, fsync_tree
from .data import PLAIN_CHAT_TEMPLATE, DataConfig, PreparedData, prepare_data
from .errors import UserInputError

logger = logging.getLogger(__name__)

CACHE_ENV = "DSFORGET_CACHE"
CACHE_FORMAT = 1  # bump when what prepare_data produces changes for the same inputs
LOCK_POLL_S = 0.5


class CacheWaitError(UserInputError, TimeoutError):
    """Another process held a cache entry's lock for longer than the wait allows."""


def cache_root() -> Path:
    """``$DSFORGET_CACHE``, or ``~/.cache/dsforget``: the root of the lab's and the data's caches."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dsforget")


def default_data_cache_dir() -> Path:
    return cache_root() / "data"


def file_digest(path: str | Path) -> str:
    """SHA-256 of the file's bytes, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while piece := file.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of what decides how text becomes ids: the serialised fast tokenizer, its class,
    special tokens and chat template (``PLAIN_CHAT_TEMPLATE`` where it has none)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())),
        "special_tokens": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
        "chat_template": tokenizer.chat_template or PLAIN_CHAT_TEMPLATE,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def cache_key(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[str, dict[str, Any]]:
    """The entry name for `config` tokenised by `tokenizer`, and what it was made of."""
    import tokenizers
    import transformers

    described = {
        "cache_format": CACHE_FORMAT,
        "data_sha256": file_digest(config.path),
        "data_format": config.file_format,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "max_length": config.max_length,
        "packing": config.packing,
        "validation_fraction": config.validation_fraction,
        "seed": config.seed,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    if config.text:
        excluded = hashlib.sha256(json.dumps(sorted(config.exclude_texts)).encode()).hexdigest()
        described.update(text=True, exclude_texts_sha256=excluded)
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]
    return key, described


def load_entry(entry: Path) -> PreparedData:
    """A complete entry, memory-mapped (every rank reads the same pages from the page cache)."""
    import datasets

    validation: Any = []
    if (entry / "validation").exists():
        validation = datasets.load_from_disk(str(entry / "validation"))
    return PreparedData(datasets.load_from_disk(str(entry / "train")), validation)


def _locked(lock_path: Path, timeout_s: float, what: str) -> Any:
    """An open lock file held exclusively; waits for it at most `timeout_s`."""
    handle = open(lock_path, "w")  # noqa: SIM115  closed by the caller, which holds the lock until then
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                raise CacheWaitError(
                    f"gave up after {timeout_s:g} s (data_timeout_s) waiting for another process to "
                    f"finish {what} ({lock_path} is locked): it is still at it or hung; raise "
                    "--data_timeout_s if tokenising legitimately takes longer"
                ) from None
            if not said:
                logger.info("waiting for another process to finish %s (%s)", what, lock_path)
                said = True
            time.sleep(LOCK_POLL_S)


def prepare_cached(
    config: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path,
    num_proc: int = 1,
    timeout_s: float = 3600.0,
    key: str | None = None,
) -> tuple[PreparedData, str]:
    """``prepare_data`` through the cache: the entry for these inputs, built first if it is not
    there (by this process, or by whichever holds the lock). Returns the data and the key.

    `key` is given by processes that trust another's digest of the same inputs (the ranks that
    are not rank 0: only rank 0 reads the whole file to hash it)."""
    cache_dir = Path(cache_dir)
    described = None
    if key is None:
        key, described = cache_key(config, tokenizer)
    entry = cache_dir / key
    if entry.is_dir():
        logger.info("tokenised data: reusing %s (%s)", entry, config.path)
        return load_entry(entry), key
    cache_dir.mkdir(parents=True, exist_ok=True)
    what = f"tokenising {config.path} into {entry}"
    with _locked(cache_dir / f"{key}.lock", timeout_s, what):
        if not entry.is_dir():  # whoever held the lock before may have built it
            if described is None:
                described = cache_key(config, tokenizer)[1]
            _build(config, tokenizer, entry, num_proc, described)
        else:
            logger.info("tokenised data: reusing %s (%s)", entry, config.path)
    return load_entry(entry), key


def _build(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, entry: Path, num_proc: int, described: dict
) -> None:
    # Holding the lock, no one else builds into this name: leftovers are from crashed builds.
    for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        start = time.perf_counter()
        logger.info("tokenising %s into %s", config.path, entry)
        data = prepare_data(config, tokenizer, num_proc=num_proc)
        data.train.save_to_disk(str(staging / "train"))
        if len(data.validation):
            data.validation.save_to_disk(str(staging / "validation"))
        seconds = time.perf_counter() - start
        meta = {
            **described,
            "data": str(config.path),
            "tokenizer": str(tokenizer.name_or_path),
            "train_rows": len(data.train),
            "validation_rows": len(data.validation),
            "seconds": round(seconds, 2),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        fsync_tree(staging)
        try:
            os.rename(staging, entry)  # a directory appears whole, in one step
        except OSError:
            if not entry.is_dir():
                raise
            # Another node built it meanwhile (a shared filesystem whose directory listing this
            # node saw late): the entries are equal, keep theirs.
            shutil.rmtree(staging, ignore_errors=True)
        fsync_directory(entry.parent)
        logger.info("tokenised %s in %.1f s: %d training rows", config.path, seconds, len(data.train))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
