"""ForgetAdamW: one AdamW for every method, applying a MaskPlan to whatever shard it is given.

Per flat shard and step (see dsforget.kernels for the fused ops):
1. row-scale the gradient, update m and v on every entry, histogram |m| of top-k blocks;
2. exact mode: sum the histograms over the data-parallel group and refine the threshold
   digit by digit, so the selection is the top `fraction` of the *whole* parameter on any
   number of ranks; shard mode: each shard selects its own top `fraction`, no communication
   (what the MoFO reference code effectively computes under ZeRO);
3. the masked, bias-corrected AdamW update; each parameter is bias-corrected by its own count of
   moment updates (state["param_steps"]), which stops while HFT resampling holds it.

Without ZeRO (the parameters themselves, DeepSpeed's stage 0 in fp32) the optimizer steps all of
a param group's parameters that have gradients in one such step on the fused backends: the ops
see the separate tensors as one shard (kernels.TensorList, a segment table over the tensors laid
end to end, each op finding each tensor where it lies), so a step makes a handful of kernel calls
whatever the number of tensors, copies nothing, and leaves the parameters, their state and the
checkpoint format as they are (``multi_tensor``; the result is the per-tensor step's bit for bit).

Weight decay is decoupled (AdamW). Its scope for top-k parameters is ``decay_scope``:
``"all"`` (default, the MoFO reference code) decays every entry each step, selected or not;
``"selected"`` decays only the entries that are updated.

A rule's ``pull`` (l2, L2-SP) is decoupled the same way, applied before the fused step:
w ← w − lr·pull·(w − w0) on every entry of the parameter, selected by top-k or not, whatever the
decay scope. w0 is the shard's value at its first step (the pretrained weights: nothing has
updated the master copy before it), kept as the shard's state["initial"], so it is partitioned
like the master weights and checkpointed with the moments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import (
    DENSE,
    NO_ROWSCALE,
    SegmentTable,
    TensorList,
    ThresholdHint,
    resolve_backend,
    topk_adamw_step,
)
from .comm import close_process_group_at_exit, release_shared_memory_names, sum_counts, verify_plan_agreement
from .layout import Segment, ShardLayout
from .params import full_shape, row_length
from .partitions import discover_layouts
from .plan import MaskPlan, ParamRule, PlanError

logger = logging.getLogger("dsforget")

TOPK_MODES = ("exact", "shard")
DECAY_SCOPES = ("all", "selected")
BACKENDS = ("auto", "torch", "cpu", "triton")
# state key: per parameter of a shard's group, how many moment updates it has seen (its Adam step)
PARAM_STEPS = "param_steps"
# state key: the shard's values at its first step, w0 of the rules' pull (l2)
INITIAL = "initial"

ParamsArg = Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[Mapping[str, Any]]


def _choose(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not supported; allowed: {', '.join(allowed)}")
    return value


@dataclass
class _Batch:
    """A multi-tensor step's cached inputs: the tensors it stepped (by id), their segment table
    and TensorList starts, and the threshold hints its last step returned."""

    key: tuple[int, ...]
    table: SegmentTable
    starts: torch.Tensor
    hint: ThresholdHint | None = None


def _trained_numel(rule: ParamRule, shape: tuple[int, ...]) -> int:
    """Entries of a parameter of `shape` that train under `rule` (all but its frozen rows)."""
    rows, row_len = (shape[0] if shape else 1), row_length(shape)
    return sum(stop - start for start, stop in rule.trained_rows(rows)) * row_len


def _trained_pieces(seg: Segment, rule: ParamRule, param_numel: int) -> list[Segment]:
    """The parts of `seg` that train under `rule`: the whole segment, nothing (frozen), or the
    pieces of it outside the rule's frozen rows, so the kernels never touch a frozen row."""
    if rule.frozen_rows is None:
        return [seg] if rule.trains else []
    pieces = []
    seg_stop = seg.param_offset + seg.length
    for start_row, stop_row in rule.trained_rows(param_numel // seg.row_len):
        start = max(seg.param_offset, start_row * seg.row_len)
        stop = min(seg_stop, stop_row * seg.row_len)
        if start < stop:
            shard_offset = seg.shard_offset + start - seg.param_offset
            pieces.append(Segment(seg.name, start, shard_offset, stop - start, seg.row_len))
    return pieces


def named_groups(params: ParamsArg) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Param groups holding plain tensors, and the name of every tensor.

    Accepts tensors, (name, tensor) pairs such as ``model.named_parameters()``, or group dicts
    whose "params" hold either. Unnamed tensors are called ``group{g}.param{i}``.
    """
    items = list(params)
    if not items:
        raise ValueError("the optimizer got an empty parameter list")
    is_group = [isinstance(item, Mapping) for item in items]
    if any(is_group) and not all(is_group):
        raise TypeError("pass either parameter groups (dicts) or parameters, not a mix")
    groups = [dict(item) for item in items] if all(is_group) else [{"params": items}]
    names: dict[int, str] = {}
    for g, group in enumerate(groups):
        entries = group["params"]
        entries = [entries] if isinstance(entries, torch.Tensor) else list(entries)
        tensors = []
        for i, entry in enumerate(entries):
            if isinstance(entry, tuple):
                name, tensor = entry
            else:
                name, tensor = f"group{g}.param{i}", entry
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"parameter {name!r} is a {type(tensor).__name__}, not a tensor")
            names[id(tensor)] = name
            tensors.append(tensor)
        group["params"] = tensors
    return groups, names


class ForgetAdamW(torch.optim.Optimizer):
    """AdamW applying a MaskPlan (frozen / dense / top-k / row-scaled) inside any ZeRO stage.

    With every rule dense and no row scales it is ``torch.optim.AdamW`` (same hyperparameters).
    Frozen parameters are dropped from the groups: they get no state and DeepSpeed never sees
    them (``dsforget.initialize`` also sets their ``requires_grad=False``).

    multi_tensor: on the fused backends ("cpu", "triton"), step all of a param group's parameters
    that have gradients in one call of the fused ops per (gradient dtype, device) (a TensorList:
    one segment table over the separate tensors, one radix bookkeeping for all their blocks,
    nothing copied; a Triton kernel finds each tile's tensor by its address), as torch's fused
    AdamW steps a list of tensors; False steps them one call per tensor. The result is the same
    bit for bit. It applies where the optimizer steps the parameters themselves (no ZeRO,
    DeepSpeed's stage 0 in fp32); ZeRO's flat partitions are one call each already. Tensors that
    are not contiguous fp32, and every tensor on the "torch" references, step one at a time.

    one_pass: on the "cpu" backend, step top-k shards in one pass over memory (the update applied
    in the moments pass, kernels/speculative.py), which keeps list buffers of ~0.75 B per element
    between steps; False takes the two-pass step, whose extra memory is O(blocks x bins). The
    result is the same bit for bit.

    backend: "auto" (the device's fused kernels: C++ on CPU tensors, Triton on CUDA; where they
    cannot run, a WARNING names why and the plain-PyTorch references run), or "torch", "cpu",
    "triton" (an error where unusable). Resolved, and the C++ extension built, when the optimizer
    is bound to an engine (dsforget.initialize), else on its first step.
    """

    def __init__(
        self,
        params: ParamsArg,
        plan: MaskPlan,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        topk: str = "exact",
        decay_scope: str = "all",
        backend: str = "auto",
        one_pass: bool = True,
        multi_tensor: bool = True,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.plan = plan
        self.membership_plan = plan  # which parameters the optimizer holds; fixed for its lifetime
        self.topk = _choose("topk", topk, TOPK_MODES)
        self.decay_scope = _choose("decay_scope", decay_scope, DECAY_SCOPES)
        self.backend = _choose("backend", backend, BACKENDS)
        self.one_pass = bool(one_pass)
        self.multi_tensor = bool(multi_tensor)
        groups, self._names = named_groups(params)
        for group in groups:
            for tensor in group["params"]:
                self._check_rule(self._names[id(tensor)], tensor)
                if not plan[self._names[id(tensor)]].trains and tensor.requires_grad:
                    tensor.requires_grad_(False)  # no gradient, master copy or state under DeepSpeed
            group["params"] = [t for t in group["params"] if plan[self._names[id(t)]].trains]
        groups = [group for group in groups if group["params"]]
        if not groups:
            raise PlanError(f"the plan ({plan.method}) freezes every parameter given to the optimizer")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            for tensor in group["params"]:
                pull = plan[self._names[id(tensor)]].pull
                if pull * group["lr"] > 1:  # the step would overshoot w0 and diverge
                    raise PlanError(
                        f"pull {pull} (l2 strength) x lr {group['lr']} of {self._names[id(tensor)]!r} is "
                        "above 1: each step would move it past its initial value; lower the strength"
                    )
        # Names of each group's parameters in order: under ZeRO-1/2 a group becomes one flat
        # partition and these are its blocks.
        self.group_param_names: list[list[str]] = [[self._names[id(p)] for p in g["params"]] for g in groups]
        # The parameters themselves, kept because DeepSpeed swaps the groups' tensors for flat
        # partitions; their partition mappings are how the optimizer finds its layouts.
        self.trained_parameters: dict[str, torch.Tensor] = {
            self._names[id(p)]: p for g in groups for p in g["params"]
        }
        self._discovered = False
        self._layouts: dict[int, ShardLayout] = {}
        self._tables: dict[int, SegmentTable] = {}
        self._hints: dict[int, ThresholdHint] = {}  # per shard: topk_adamw_step's threshold hints
        self._pulls: dict[int, list[tuple[int, int, float]]] = {}  # per shard: _pull_runs
        # multi-tensor steps, one per (param group, gradient dtype): the ids of the tensors stepped
        # together last, their table and starts, and the hints topk_adamw_step returned for that
        # table. One entry per slot, rebuilt when the set of tensors with gradients changes, so
        # steps that skip different parameters (unrouted experts) do not pile up tables.
        self._batches: dict[tuple[int, torch.dtype, torch.device], _Batch] = {}
        self._dp_group: Any = None
        self._backends: dict[str, str] = {}  # device type -> the backend resolved for it

    def adopt_names(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Call the optimizer's tensors by the model's names (matched by identity).

        Lets ``MoFOAdamW(model.parameters())`` work under dsforget.initialize: the model knows
        the names the plan needs even when the optimizer was given bare tensors.
        """
        by_identity = {id(tensor): name for name, tensor in named_parameters}
        renamed = {key: by_identity.get(key, name) for key, name in self._names.items()}
        if renamed == self._names:
            return
        self._names = renamed
        self.group_param_names = [[renamed[id(p)] for p in g["params"]] for g in self.param_groups]
        self.trained_parameters = {renamed[id(p)]: p for p in self.trained_parameters.values()}
        self.plan = self.membership_plan = self._plan_for_names(self.plan)
        self._layouts.clear()
        self._forget_tables()

    def _plan_for_names(self, plan: MaskPlan) -> MaskPlan:
        """The plan after parameters were renamed; an explicit plan stays as given."""
        return plan

    def set_active_plan(self, plan: MaskPlan) -> None:
        """Switch, between steps, which of the optimizer's parameters train (HFT resampling).

        A parameter the new plan freezes is *held*: no moment update and no parameter update, its
        moments kept for when it trains again. DeepSpeed still computes and reduces its gradient,
        so a run that resamples costs what full fine-tuning costs; only parameters given to the
        optimizer at construction (the membership plan) can train. Call it on every rank with the
        same plan (dsforget.build_plan); the checkpointed state stays tied to the membership plan.
        """
        outside = [
            name for name, rule in plan.rules.items() if rule.trains and name not in self.trained_parameters
        ]
        if outside:
            raise PlanError(
                f"the plan ({plan.method}) trains {len(outside)} parameter(s) this optimizer was built "
                f"without, e.g. {outside[:3]}: build it with a membership plan that trains them all"
            )
        for name, tensor in self.trained_parameters.items():
            rule = plan[name]
            if rule.trains:
                self._check_rule(name, tensor, plan)
            if rule.frozen_rows != self.membership_plan[name].frozen_rows:
                raise PlanError(
                    f"the plan ({plan.method}) holds rows {[list(r) for r in rule.frozen_rows or ()]} of "
                    f"{name!r} that the optimizer's membership plan does not: a parameter has one Adam step "
                    "count, so part of it cannot be held while the rest trains (HFT resampling of a fused "
                    "qkv_proj/gate_up_proj is not supported)"
                )
        self.plan = plan
        self._forget_tables()

    def _check_rule(self, name: str, tensor: torch.Tensor, plan: MaskPlan | None = None) -> None:
        rule = (plan or self.plan)[name]
        rows = full_shape(tensor)[0] if full_shape(tensor) else 1
        if rule.row_scale is not None and len(rule.row_scale) != rows:
            raise PlanError(
                f"params[{name!r}].row_scale has {len(rule.row_scale)} values, the parameter {rows} rows"
            )
        if rule.frozen_rows and rule.frozen_rows[-1][1] > rows:
            raise PlanError(
                f"params[{name!r}].frozen_rows reach row {rule.frozen_rows[-1][1]}, "
                f"the parameter has {rows} rows"
            )

    # -- binding to DeepSpeed's partitions -------------------------------------------------

    def bind(
        self,
        layouts: Mapping[torch.Tensor, ShardLayout] | Iterable[tuple[torch.Tensor, ShardLayout]],
        data_parallel_group: Any = None,
    ) -> None:
        """Tell the optimizer what each flat tensor DeepSpeed will hand it holds, and resolve (build)
        the kernels for their devices now, before the first step."""
        pairs = layouts.items() if isinstance(layouts, Mapping) else layouts
        for tensor, layout in pairs:
            if tensor.numel() != layout.numel:
                raise ValueError(f"layout of {layout.numel} elements bound to a tensor of {tensor.numel()}")
            for seg in layout.segments:
                self.plan[seg.name]  # noqa: B018 - fails with a clear error for unknown names
            self._layouts[id(tensor)] = layout
            self._backend(tensor)
        self._forget_tables()
        self._dp_group = data_parallel_group

    def _layout(self, tensor: torch.Tensor) -> ShardLayout:
        layout = self._layouts.get(id(tensor))
        if layout is not None:
            return layout
        name = self._names.get(id(tensor))
        if name is None and not self._discovered:
            # An engine built by plain deepspeed.initialize (HF Trainer, accelerate): find the
            # layouts from the parameters' partition mappings, once, on every rank alike (and
            # unlink DeepSpeed's CPU all-reduce buffers, as dsforget.initialize does).
            self._discovered = True
            release_shared_memory_names()
            verify_plan_agreement(self.plan)
            layouts, group = discover_layouts(
                self.param_groups, self.group_param_names, self.trained_parameters
            )
            self.bind(layouts, data_parallel_group=group)
            return self._layout(tensor)
        if name is None:
            raise RuntimeError(
                "ForgetAdamW was handed a tensor it cannot map to parameters (a DeepSpeed flat "
                "partition?): build the engine with dsforget.initialize"
            )
        layout = ShardLayout.whole(name, full_shape(tensor))
        self._layouts[id(tensor)] = layout
        return layout

    def _forget_tables(self) -> None:
        self._tables.clear()
        self._hints.clear()
        self._pulls.clear()
        self._batches.clear()

    def _table(self, tensor: torch.Tensor) -> SegmentTable:
        table = self._tables.get(id(tensor))
        if table is None:
            table = self._build_table([self._layout(tensor)], [0], tensor.device)
            self._tables[id(tensor)] = table
        return table

    def _build_table(
        self, layouts: list[ShardLayout], starts: list[int], device: torch.device
    ) -> SegmentTable:
        """The segment table of shards laid end to end (shard i from element starts[i]): one flat
        shard, or the tensors of a multi-tensor step (a TensorList). Counter c is the c-th entry
        of the layouts' group_params, in order (the step counts `_param_steps` lists)."""
        group_params = [entry for layout in layouts for entry in layout.group_params]
        numels = dict(group_params)
        block_k: list[int] = []
        block_of: dict[str, int] = {}
        if self.topk == "exact":
            for name, _ in group_params:
                rule = self.plan[name]
                if rule.mode == "topk":  # k of the parameter's trained entries
                    shape = full_shape(self.trained_parameters[name])
                    block_of[name] = len(block_k)
                    block_k.append(rule.top_k(_trained_numel(rule, shape)))
        rows, scales, scale_start = [], [], {}
        counters: list[int] = []
        scale_total = 0
        placed = []  # (segment, start of its shard, its counter)
        first_counter = 0  # the counters of each layout's group_params follow the previous layout's
        for layout, start in zip(layouts, starts, strict=True):
            counter_of = {name: first_counter + index for index, (name, _) in enumerate(layout.group_params)}
            placed += [(seg, start, counter_of[seg.name]) for seg in layout.segments]
            first_counter += len(layout.group_params)
        for seg, start, counter in placed:
            rule = self.plan[seg.name]
            pieces = _trained_pieces(seg, rule, numels[seg.name])
            if not pieces:
                continue
            block = DENSE
            if rule.mode == "topk":
                if self.topk == "exact":
                    block = block_of[seg.name]
                else:  # the segment's trained entries are one block, however many pieces they make
                    block = len(block_k)
                    block_k.append(rule.top_k(sum(piece.length for piece in pieces)))
            rowscale_start = NO_ROWSCALE
            if rule.row_scale is not None:
                if seg.name not in scale_start:
                    scale_start[seg.name] = scale_total
                    scales.append(torch.tensor(rule.row_scale, dtype=torch.float32))
                    scale_total += len(rule.row_scale)
                rowscale_start = scale_start[seg.name]
            rows += [
                (start + p.shard_offset, p.length, p.param_offset, p.row_len, block, rowscale_start)
                for p in pieces
            ]
            counters += [counter] * len(pieces)
        rowscale = torch.cat(scales) if scales else None
        return SegmentTable.build(rows, rowscale, block_k, device=device, counters=counters)

    def _pull_runs(self, tensor: torch.Tensor) -> list[tuple[int, int, float]]:
        """(start, stop, pull) of the shard's ranges pulled towards w0 under the active plan:
        adjacent segments with the same pull merged, so ZeRO-1/2's flat shard of one method
        takes one op per run of parameters, not per parameter."""
        runs = self._pulls.get(id(tensor))
        if runs is None:
            runs = []
            layout = self._layout(tensor)
            numels = dict(layout.group_params)
            for seg in layout.segments:
                rule = self.plan[seg.name]
                if not rule.pull:
                    continue
                for piece in _trained_pieces(seg, rule, numels[seg.name]):
                    stop = piece.shard_offset + piece.length
                    if runs and runs[-1][1] == piece.shard_offset and runs[-1][2] == rule.pull:
                        runs[-1] = (runs[-1][0], stop, rule.pull)
                    else:
                        runs.append((piece.shard_offset, stop, rule.pull))
            self._pulls[id(tensor)] = runs
        return runs

    def _keeps_initial(self, tensor: torch.Tensor) -> bool:
        """Whether any parameter of the shard may be pulled (under the membership plan, so a
        parameter HFT resampling holds now still has its w0 when drawn later)."""
        return any(self.membership_plan[seg.name].pull for seg in self._layout(tensor).segments)

    # -- the step --------------------------------------------------------------------------

    def _backend(self, tensor: torch.Tensor) -> str:
        """The backend for tensors of `tensor`'s device, resolved on first use: for the C++ CPU
        backend that builds and loads the extension, so a failed build is seen when the optimizer
        is bound, not mid-training ("auto": a WARNING and the torch references; "cpu": an error)."""
        backend = self._backends.get(tensor.device.type)
        if backend is None:
            backend = resolve_backend(self.backend, tensor.device)
            self._backends[tensor.device.type] = backend
            logger.info(
                "dsforget: optimizer step uses the %r kernels on %s tensors", backend, tensor.device.type
            )
        return backend

    def prepare_kernels(self) -> None:
        """Resolve (and build) the kernels for every device the optimizer's tensors live on; called
        when the optimizer is bound to an engine, before the first step."""
        for group in self.param_groups:
            for tensor in group["params"]:
                self._backend(tensor)

    def _sum_over_data_parallel(self, counts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum integer counts over the data-parallel group in one all-reduce (exact mode)."""
        if self.topk != "exact" or self._dp_group is None:
            return counts
        return sum_counts(counts, self._dp_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        # every way in (dsforget.initialize, plain deepspeed.initialize at any stage, no DeepSpeed
        # under torchrun) closes the process group at exit after gloo's workers finish; registered once
        close_process_group_at_exit()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            together: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                if self._steps_together(param):
                    together.setdefault((param.grad.dtype, param.device), []).append(param)
                else:
                    self._step_shard(param, group)
            for (dtype, device), params in together.items():
                if len(params) == 1:
                    self._step_shard(params[0], group)
                else:
                    self._step_tensors(params, group, slot=(index, dtype, device))
        return loss

    def _steps_together(self, param: torch.Tensor) -> bool:
        """Whether `param` (with a gradient) joins its group's multi-tensor step: a parameter the
        optimizer steps itself (not a DeepSpeed flat partition), a contiguous fp32 tensor with a
        dense contiguous gradient, on a fused backend ("cpu" on CPU, "triton" on CUDA)."""
        if not self.multi_tensor or id(param) not in self._names:
            return False
        grad = param.grad
        return (
            param.dtype == torch.float32
            and grad.dtype in (torch.float32, torch.bfloat16)
            and grad.layout == torch.strided
            and param.is_contiguous()
            and grad.is_contiguous()
            and self._backend(param) in ("cpu", "triton")
        )

    def _param_steps(self, state: dict[str, Any], layout: ShardLayout) -> list[int]:
        """The moment updates each parameter of the shard's group has seen, after this step.

        A parameter's count advances exactly when its moments are updated: every step it trains
        under the active plan, not while it is held (HFT resampling). Kept per parameter of the
        whole group (layout.group_params), so every rank holds the same counts whatever it holds
        of the parameters; a list of ints, so DeepSpeed's checkpoints carry it unchanged. State
        saved before counts existed has one count for the shard: every parameter starts from it.
        """
        counts = state.get(PARAM_STEPS)
        if counts is None:
            counts = [int(state["step"].item())] * len(layout.group_params)
        if len(counts) != len(layout.group_params):
            raise PlanError(
                f"the optimizer state holds step counts of {len(counts)} parameters, the shard's group "
                f"{len(layout.group_params)}: resume with the plan and parameter groups that wrote it"
            )
        # a new list (not updated in place): a state_dict taken earlier keeps its counts
        return [
            count + 1 if self.plan[name].trains else count
            for count, (name, _) in zip(counts, layout.group_params, strict=True)
        ]

    def _begin_step(self, param: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The shard's state, created at its first step, with its step counts advanced and the
        rules' pull applied; what every step does before the fused ops."""
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state[PARAM_STEPS] = [0] * len(self._layout(param).group_params)
            if self._keeps_initial(param):  # the first step: the master copy is still the base model
                state[INITIAL] = param.detach().clone()
        state[PARAM_STEPS] = self._param_steps(state, self._layout(param))
        state["step"] += 1
        # l2's pull as its own pass before the fused step: torch.lerp_ is one fused op on every
        # device (w += lr·pull·(w0 − w), 12 B/element), and strength 0 leaves no run at all.
        for start, stop, pull in self._pull_runs(param):
            param.view(-1)[start:stop].lerp_(state[INITIAL].view(-1)[start:stop], group["lr"] * pull)
        return state

    def _step_tensors(
        self, params: list[torch.Tensor], group: dict[str, Any], slot: tuple[int, torch.dtype, torch.device]
    ) -> None:
        """One fused step over `params` (parameters the optimizer steps itself, with gradients of
        one dtype): the same result as `_step_shard` on each, bit for bit, in one call of each op
        over a TensorList (one segment table, whose counters are the parameters' step counts)."""
        key = tuple(id(param) for param in params)
        batch = self._batches.get(slot)
        if batch is None or batch.key != key:
            starts = TensorList.starts_of([param.numel() for param in params])
            layouts = [self._layout(param) for param in params]
            batch = _Batch(key, self._build_table(layouts, starts.tolist(), params[0].device), starts)
            self._batches[slot] = batch
        table, starts = batch.table, batch.starts
        states = [self._begin_step(param, group) for param in params]
        counts = [count for state in states for count in state[PARAM_STEPS]]

        def tensors(chosen: list[torch.Tensor]) -> TensorList:
            return TensorList(tuple(chosen), starts)

        batch.hint = topk_adamw_step(
            tensors(params),
            tensors([param.grad for param in params]),
            tensors([state["exp_avg"] for state in states]),
            tensors([state["exp_avg_sq"] for state in states]),
            table,
            step=counts,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decay_selected_only=self.decay_scope == "selected",
            hint=batch.hint,
            sum_over_ranks=self._sum_over_data_parallel,
            backend=self._backend(params[0]),
            speculate=self.one_pass,
        )

    def _step_shard(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        table = self._table(param)
        state = self._begin_step(param, group)
        # Threshold hints change only the work a step does, never its result, so they are kept
        # out of the state dict (and checkpoints); they are equal on all ranks like the thresholds.
        self._hints[id(param)] = topk_adamw_step(
            param.view(-1),
            param.grad.view(-1),
            state["exp_avg"].view(-1),
            state["exp_avg_sq"].view(-1),
            table,
            step=state[PARAM_STEPS],
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decay_selected_only=self.decay_scope == "selected",
            hint=self._hints.get(id(param)),
            sum_over_ranks=self._sum_over_data_parallel,
            backend=self._backend(param),
            speculate=self.one_pass,
        )

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["dsforget"] = {
            "plan_digest": self.membership_plan.digest,
            "topk": self.topk,
            "decay_scope": self.decay_scope,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dsforget")
        if saved is None:
            raise PlanError("this optimizer state was not saved by ForgetAdamW (no 'dsforget' entry)")
        if saved["plan_digest"] != self.membership_plan.digest:
            raise PlanError(
                f"the optimizer state was saved under plan {saved['plan_digest'][:12]}, this run's plan is "
                f"{self.membership_plan.digest[:12]}: resume with the plan.json of the run that wrote "
                "the checkpoint"
            )
        if (saved["topk"], saved["decay_scope"]) != (self.topk, self.decay_scope):
            raise PlanError(
                f"the optimizer state was saved with topk={saved['topk']!r}, "
                f"decay_scope={saved['decay_scope']!r}; this run uses {self.topk!r}, {self.decay_scope!r}"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "dsforget"})
