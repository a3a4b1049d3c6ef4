"""The fused ops on a TensorList (separate tensors seen as one shard, the multi-tensor step)
against the same step on one flat shard, bit for bit.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import pytest
import torch
from dsforget.kernels import TensorList, available_backends, topk_adamw_step, update_moments
from helpers import BETA1, BETA2, LAYOUTS, assert_bitwise, build_shard, clone, fused_backends, random_state

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="no C++ compiler")


def split(state: dict[str, torch.Tensor], cuts: list[int]) -> dict[str, TensorList]:
    """Each flat buffer as separate tensors (copies: their own memory) cut at `cuts`, shaped
    [rows, 1] where they can be, as parameters of any shape are."""
    starts = torch.tensor(cuts, dtype=torch.int64)
    bounds = [*cuts, next(iter(state.values())).numel()]
    lists = {}
    for name, flat in state.items():
        pieces = tuple(flat[a:b].clone().view(-1, 1) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        lists[name] = TensorList(pieces, starts)
    return lists


def joined(shard: TensorList) -> torch.Tensor:
    return torch.cat([tensor.view(-1) for tensor in shard.tensors])


# (backend, device, layout, speculate): the C++ ops on both layouts and steps; the Triton kernels
# (the two-pass step only) on the small layout, on CUDA or in the interpreter
CASES = [
    pytest.param("cpu", "cpu", layout, speculate, id=f"cpu-{layout}-{name}")
    for layout in ("small", "large")
    for speculate, name in ((True, "one-pass"), (False, "two-pass"))
] + [
    pytest.param(case.values[0], case.values[1], "small", False, id=case.id)
    for case in fused_backends()
    if case.values[0] == "triton"
]


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("scope", "weight_decay"), [("all", 0.1), ("selected", 0.1)])
@pytest.mark.parametrize(("backend", "device", "layout", "speculate"), CASES)
def test_tensor_list_step_equals_the_flat_step(
    backend, device, layout, speculate, scope, weight_decay, grad_dtype
) -> None:
    """Catches an element read or written in the wrong tensor: one tensor per segment (cut at each
    segment's start: it holds that segment and the padding after it), so a block's pieces lie in
    different tensors (listed entries found by their shard index: the C++ ops' and the Triton
    apply kernel's search of the starts), and the padding (poisoned: NaN, 1e30) must stay as it
    was; 5 steps carry hints, so the one-pass step's lists, rollbacks and corrections run, and
    the two-pass step's deferred entries."""
    shard = build_shard(LAYOUTS[layout], device)
    flat = random_state(shard, seed=3, grad_dtype=grad_dtype)
    cuts = [0] + [row[0] for row in shard.table.rows()[1:]]
    lists = split(clone(flat), cuts)
    before = {name: joined(shard_) for name, shard_ in lists.items()}
    hyper = dict(
        lr=1e-2,
        betas=(BETA1, BETA2),
        eps=1e-8,
        weight_decay=weight_decay,
        decay_selected_only=scope == "selected",
    )
    hints = {"flat": None, "list": None}
    generator = torch.Generator().manual_seed(5)
    for step in range(1, 6):
        noise = torch.randn(shard.numel, generator=generator).to(grad_dtype).to(device)
        flat["grad"].copy_(noise)
        for a, tensor in zip(cuts, lists["grad"].tensors, strict=True):
            tensor.view(-1).copy_(noise[a : a + tensor.numel()])
        for key, buffers in (("flat", flat), ("list", lists)):
            hints[key] = topk_adamw_step(
                buffers["param"],
                buffers["grad"],
                buffers["exp_avg"],
                buffers["exp_avg_sq"],
                shard.table,
                step=step,
                hint=hints[key],
                backend=backend,
                speculate=speculate,
                **hyper,
            )
    for name in ("param", "exp_avg", "exp_avg_sq"):
        after = joined(lists[name])
        assert not torch.equal(after[shard.covered], before[name][shard.covered]), f"{name} did not change"
        assert_bitwise(after, flat[name], name)


def test_tensor_list_on_another_backend_or_too_short_is_refused() -> None:
    """A TensorList reaching the references, or a tensor shorter than the table's segments in it
    (the C++ op would write past it), is an error naming the op and the tensor."""
    shard = build_shard(LAYOUTS["small"], "cpu")
    state = random_state(shard, seed=1)
    cuts = [0] + [row[0] for row in shard.table.rows()[1:]]
    lists = split(state, cuts)
    moments = dict(beta1=BETA1, beta2=BETA2)
    with pytest.raises(ValueError, match="update_moments: a TensorList .* fused backends"):
        update_moments(
            lists["grad"], lists["exp_avg"], lists["exp_avg_sq"], shard.table, backend="torch", **moments
        )
    short = TensorList(
        (*lists["exp_avg"].tensors[:-1], lists["exp_avg"].tensors[-1][:-10]), lists["exp_avg"].starts
    )
    with pytest.raises(RuntimeError, match=r"exp_avg\[\d+\] has \d+ elements, but the segment table reaches"):
        update_moments(lists["grad"], short, lists["exp_avg_sq"], shard.table, backend="cpu", **moments)
    other = TensorList(lists["exp_avg_sq"].tensors, lists["exp_avg_sq"].starts.clone())
    with pytest.raises(ValueError, match="other starts"):
        update_moments(lists["grad"], lists["exp_avg"], other, shard.table, backend="cpu", **moments)


def test_starts_that_are_not_the_tensors_end_to_end_are_refused() -> None:
    """An entry addressed by shard index finds its tensor from the starts alone: starts with a gap
    or out of order would send a write past a tensor's end (the C++ ops check only that each
    tensor covers its segments)."""
    tensors = (torch.zeros(100), torch.zeros(5))
    TensorList(tensors, TensorList.starts_of([100, 5]))
    for starts in ([0, 10], [0, 150], [5, 105]):
        with pytest.raises(ValueError, match="not the tensors laid end to end"):
            TensorList(tensors, torch.tensor(starts, dtype=torch.int64))
    with pytest.raises(ValueError, match="CPU int64"):
        TensorList(tensors, torch.tensor([0, 100], dtype=torch.int32))
