"""How much host memory stays resident after freeing 50 blocks of 4 MiB that sit between live
ones: printed in MiB. `fixed`: with dsforget.train.memory.return_freed_memory() first.

Usage: python freed_memory.py moving|fixed   (see tests/train/test_scale.py)
"""

import sys

import torch

from dsforget.train.memory import return_freed_memory

if sys.argv[1] == "fixed":
    assert return_freed_memory()


def rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096


x = torch.ones(8 << 20, dtype=torch.uint8)
del x  # a freed 8 MiB mapping: glibc raises its threshold
base = rss()
blocks, pins = [], []
for _ in range(50):  # each freed block sits below a live one: the heap cannot shrink past it
    blocks.append(torch.ones(4 << 20, dtype=torch.uint8))
    pins.append(torch.ones(1 << 10, dtype=torch.uint8))
del blocks
print((rss() - base) / 2**20)
