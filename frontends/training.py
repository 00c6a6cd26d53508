"""Training graphs: one training step of a module and its loss, forward and backward, as one lifetime graph.

`lower_training(module, example_inputs)` traces `loss(module(*inputs))` with
AOTAutograd (`aot_function` over the parameters, buffers and user inputs,
through the fx frontend's core-ATen decomposition table less the backward ops
ATen computes in one kernel: decomposed, BatchNorm's backward alone is some
twenty ops with full-size intermediates that no runtime allocates; a small
ResNet-50 training graph has 513 ops kept so, 1,888 decomposed) and records
the joint forward + backward graph exactly as AOTAutograd hands it to a
partition function, then stops the trace (nothing is partitioned, compiled or
run: on DenseNet-121 that saves a quarter of the lowering time). The joint
graph gets the two clean-ups PyTorch's min-cut partitioner applies before it
partitions (dead code elimination, then common-subexpression elimination when
`torch._functorch.config.cse` is on), so that our graph and the partitioner's
see the same nodes, and is lowered with `frontends.fx.lower_graph_module`:
parameters and buffers are weights, user inputs and the tangent (the loss's
gradient, 1.0 at run time) are inputs; all of them are fed by the caller in the
joint graph's placeholder order (`TrainingGraph.joint_inputs`). Outputs, in the
joint graph's order: the forward outputs (BatchNorm's updated running statistics,
then the loss), then one gradient per joint input (None, an output constant, for
buffers and user inputs). Every op's name is its joint-graph node name.

Each op gets attrs["phase"]: "backward" when it depends on a tangent or writes
a gradient output (PyTorch's `required_bw_nodes` in
torch._functorch.partitioners.classify_nodes), "forward" otherwise; forward ops
that only the backward reads (a ReLU mask, a transposed weight) are forward
here, and where they run is the partition's business. Ops that draw random
numbers carry attrs["random"] (the fx frontend's nondeterministic_seeded tag on ATen
ops, plus the rng op names below for ops outside ATen: philox, seeds): a plan may
recompute them, and the executor runs a recompute with the generator state of the
first run (planner.runtime.rng), as torch.utils.checkpoint does. `saved_for_backward` lists
the storage (root tensors) that forward ops write and backward ops read.

`TrainingGraph.pytorch_partition(budget)` runs PyTorch's own min-cut partition
with `activation_memory_budget` and returns its execution order as op ids of
our graph (`complete_sequence` says how ops PyTorch does not name are placed).
"""

from __future__ import annotations

import copy
import json
import operator
import re
from collections import deque
from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from frontends.common import FrontendError, Lowered
from planner.graph import LifetimeGraph

# names of ops outside ATen that draw random numbers (ATen's own carry the nondeterministic_seeded tag)
_RANDOM_OP = re.compile(r"rand|bernoulli|dropout|philox|rng|seed|normal|uniform|multinomial|exponential|poisson")


@dataclass(frozen=True)
class TrainingGraph:
    lowered: Lowered  # the joint graph as a lifetime graph; ops carry attrs["phase"]
    joint_module: Any  # torch.fx.GraphModule: the joint graph after DCE and CSE, flat placeholders
    joint_inputs: tuple  # real tensors in placeholder order: parameters, buffers, user inputs, then tangents
    num_fwd_outputs: int  # the first joint outputs are the forward's (loss, updated buffers)
    saved_for_backward: tuple[int, ...]  # root tensor ids written by forward ops and read by backward ops
    input_names: tuple[str, ...]  # per joint input: parameter / buffer name, "input{i}" or "tangent{i}"
    weight_inputs: tuple[int, ...]  # positions of the joint inputs that are parameters and buffers

    @property
    def graph(self) -> LifetimeGraph:
        return self.lowered.graph

    @property
    def loss(self) -> int:
        """Tensor id of the loss: the last forward output (updated buffers come first)."""
        return flat_outputs(self.lowered)[self.num_fwd_outputs - 1]

    @property
    def gradients(self) -> dict[str, int]:
        """Joint input name -> tensor id of its gradient output, for every input that has one."""
        grads = flat_outputs(self.lowered)[self.num_fwd_outputs:]
        return {n: t for n, t in zip(self.input_names, grads) if t is not None}

    def pytorch_partition(self, activation_memory_budget: float = 1.0) -> list[int]:
        """The execution order of PyTorch's min-cut partition at this activation memory budget, as op ids.

        Forward graph's ops in its order, then the backward graph's; forward ops the
        backward recomputes appear again. Parameters and buffers are static inputs, as
        torch.compile passes a module's state. Re-running a view is left out: a view
        reads its root's buffer, so only the root's recompute matters. The order is
        PyTorch's even where it recomputes an op we mark not recomputable: below budget
        1 it may recompute dropout with a fresh mask (pytorch/pytorch#190758).
        """
        import torch
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        if not 0.0 <= activation_memory_budget <= 1.0:
            raise ValueError(f"activation_memory_budget must be in [0, 1], not {activation_memory_budget}")
        gm = _copy_module(self.joint_module)  # the partitioner rewrites the graph it is given
        n_primals = len(self.joint_inputs) - _count_tangents(gm)
        inputs = [list(self.joint_inputs[:n_primals]), list(self.joint_inputs[n_primals:])]
        with torch._functorch.config.patch(activation_memory_budget=float(activation_memory_budget)):
            fw, bw = min_cut_rematerialization_partition(
                gm, inputs, compiler="inductor", num_fwd_outputs=self.num_fwd_outputs,
                static_lifetime_input_indices=list(self.weight_inputs))
        g = self.graph
        order = _op_sequence(g, fw.graph) + _op_sequence(g, bw.graph)
        return complete_sequence(g, order)


def lower_training(module, example_inputs: Sequence[Any], *, loss: Callable[[Any], Any] | None = None,
                   name: str | None = None, elem_size: int | None = None) -> TrainingGraph:
    """The joint forward + backward graph of one training step of `module` (train mode) and `loss`.

    `loss`: output -> scalar tensor; default: the mean of the output in fp32 (the
    sum of the means of every floating-point tensor in a tuple / dict output).
    The module's own parameters and buffers are not changed.
    """
    import torch

    gname = name or f"{type(module).__name__}_train"
    inputs = tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise FrontendError(f"{gname}: example input {i} is a {type(x).__name__}; training graphs take tensors")
    params = dict(module.named_parameters())  # tied parameters once: functional_call ties them back
    buffers = dict(module.named_buffers())
    names = [*params, *buffers]
    n_state = len(names)
    loss_fn = loss or _mean_loss

    def step(*flat):
        state = dict(zip(names, flat[:n_state]))
        out = torch.func.functional_call(module, state, tuple(flat[n_state:]))
        value = loss_fn(out)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise FrontendError(f"{gname}: the loss must be a floating-point tensor, not {type(value).__name__}")
        return value

    was_training = module.training
    try:
        module.train()
        tg = lower_joint(step, (*params.values(), *buffers.values(), *inputs), range(n_state), name=gname,
                         elem_size=elem_size)
    finally:
        module.train(was_training)
    return replace(tg, input_names=(*names, *(f"input{i}" for i in range(len(inputs))),
                                    *(f"tangent{i}" for i in range(len(tg.joint_inputs) - len(names) - len(inputs)))))


def lower_joint(fn: Callable[..., Any], primals: Sequence[Any], weight_inputs: Collection[int], *,
                name: str, elem_size: int | None = None) -> TrainingGraph:
    """The joint graph of `fn(*primals)` (a tensor or a tuple of tensors) and its backward: AOTAutograd
    records it and stops (see the module docstring). `weight_inputs`: the positions of `primals` that
    are weights (parameters, buffers); the other primals and the tangents, one per differentiable
    output, are inputs. A torch.compile backend calls this with a Dynamo graph and its inputs."""
    import torch
    from torch._functorch.aot_autograd import aot_function

    from frontends.fx import lower_graph_module
    from frontends.fx_fuse import fuse_gelu

    primals = tuple(primals)
    if isinstance(fn, torch.fx.GraphModule):  # GELU spelled out: one op, so its backward is one op too
        fused = _copy_module(fn)
        if fuse_gelu(fused.graph):
            fused.recompile()
            fn = fused
    captured: dict[str, Any] = {}

    def record_joint(joint, joint_inputs, **kwargs):
        captured["joint"], captured["num_fwd_outputs"] = joint, kwargs["num_fwd_outputs"]
        raise _JointCaptured  # all we need: partitioning, compiling and running the step cost time

    compiled = aot_function(fn, fw_compiler=_as_is, bw_compiler=_as_is, partition_fn=record_joint,
                            decompositions=training_decompositions())
    try:
        with torch.enable_grad(), _as_export():
            compiled(*primals)
    except _JointCaptured:
        pass
    except FrontendError:
        raise
    except Exception as e:  # AOTAutograd's errors are long; the first line names the problem
        text = str(e).strip()
        raise FrontendError(f"{name}: AOTAutograd failed: {type(e).__name__}: "
                            f"{text.splitlines()[0] if text else ''}") from e
    if "joint" not in captured:
        raise FrontendError(f"{name}: no parameter needs a gradient, so there is no backward graph")

    joint = _clean_joint(captured["joint"])
    holders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    tangent_nodes = holders[len(primals):]
    if len(holders) - len(tangent_nodes) != len(primals) or not all(_is_tangent(n) for n in tangent_nodes):
        raise FrontendError(f"{name}: the joint graph has {len(holders)} inputs; expected {len(primals)} "
                            "primals then tangents (duplicated or aliased inputs are not supported)")
    device = next((x.device for x in primals if isinstance(x, torch.Tensor)), None)
    tangents = [torch.ones(n.meta["val"].shape, dtype=n.meta["val"].dtype, device=device) for n in tangent_nodes]
    joint_inputs = (*primals, *tangents)
    weights = set(weight_inputs)
    lowered = lower_graph_module(joint, joint_inputs, name=name, elem_size=elem_size,
                                 weight_inputs=weights, trace=False)
    lowered, saved = _tag(lowered, len(primals), captured["num_fwd_outputs"])
    input_names = tuple(f"primal{i}" for i in range(len(primals))) + tuple(
        f"tangent{i}" for i in range(len(tangents)))
    return TrainingGraph(lowered, joint, joint_inputs, captured["num_fwd_outputs"], saved, input_names,
                         tuple(sorted(weights)))


# ------------------------------------------------------------------ tracing
def training_decompositions() -> dict:
    """The fx frontend's decomposition table without backward ops (native_batch_norm_backward,
    threshold_backward, gelu_backward, ...) and without scaled dot-product attention: those stay
    one op, as ATen runs them. Decomposed, SDPA would save the seq x seq attention probabilities of
    every layer for the backward (GPT-2 small at batch 8, sequence 1024: 384 MiB a layer), which the
    fused kernels (flash / memory-efficient attention, picked by the device) never materialise."""
    from frontends.fx import decomposition_table

    return {op: fn for op, fn in decomposition_table().items()
            if "backward" not in op.name() and "scaled_dot_product" not in op.name()}


class _JointCaptured(Exception):
    """Raised by the partition function once it has the joint graph: the trace need not go on."""


def _as_is(gm, example_inputs):
    return gm


@contextmanager
def _as_export():
    """Trace as torch.export's own AOT trace does, under torch.compiler.is_exporting(): libraries skip
    data-dependent shortcuts there (transformers' `padding_mask.all()`) that fake tensors cannot take."""
    import torch.compiler

    old = getattr(torch.compiler, "_is_exporting_flag", None)
    if old is None:  # a torch without the flag: trace as is
        yield
        return
    torch.compiler._is_exporting_flag = True
    try:
        yield
    finally:
        torch.compiler._is_exporting_flag = old


def _mean_loss(out):
    import torch

    leaves = [x for x in torch.utils._pytree.tree_leaves(out)
              if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not leaves:
        raise FrontendError(f"the default loss needs a floating-point tensor output, got {type(out).__name__}")
    total = leaves[0].float().mean()
    for x in leaves[1:]:
        total = total + x.float().mean()
    return total


def _copy_module(gm):
    import torch

    return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))


def _is_tangent(node) -> bool:
    return node.op == "placeholder" and "tangents" in str(node.target)


def _count_tangents(gm) -> int:
    return sum(_is_tangent(n) for n in gm.graph.nodes)


def _clean_joint(gm):
    """DCE and CSE as min_cut_rematerialization_partition applies them, with plain (flat) placeholders;
    causal masks of attention as is_causal (frontends.fx_attention.causal_masks), the cross-entropy
    backward in two-logits steps (frontends.fx_loss)."""
    import torch
    from torch._functorch import config
    from torch._functorch.compile_utils import fx_graph_cse

    from frontends.fx_attention import causal_masks
    from frontends.fx_inference import constant_values
    from frontends.fx_loss import split_cross_entropy_backward

    gm.graph.eliminate_dead_code()  # the graph is ours: the trace stopped before anything else saw it
    graph = fx_graph_cse(gm.graph) if config.cse else copy.deepcopy(gm.graph)
    graph._codegen = torch.fx.graph.CodeGen()  # AOT's pytree codegen takes ([primals], [tangents])
    causal_masks(graph, constant_values(graph))  # a traced causal mask -> is_causal (fused kernels skip blocks)
    split_cross_entropy_backward(graph)  # never three logits-sized tensors at once
    return torch.fx.GraphModule(gm, graph)


# ------------------------------------------------------------------ phases
def _tag(lowered: Lowered, n_primals: int, num_fwd_outputs: int) -> tuple[Lowered, tuple[int, ...]]:
    """Phases and recomputability on every op; the tensors saved for backward."""
    g = lowered.graph
    tangents = set(lowered.inputs[n_primals:])
    grads = {t for t in flat_outputs(lowered)[num_fwd_outputs:] if t is not None}
    backward = {op.id for op in g.ops
                if any(t in tangents or g.root(t) in tangents for t in op.inputs)
                or any(t in grads for t in op.outputs)}
    for op in g.ops:  # program order is topological: one pass closes over successors
        if op.id in backward:
            backward.update(g.successors[op.id])
    ops = tuple(replace(op, attrs={**op.attrs, "phase": "backward" if op.id in backward else "forward",
                                   **({"random": True} if _draws_random(op.op_type) else {})})
                for op in g.ops)
    graph = LifetimeGraph(g.name, g.tensors, ops)
    saved = sorted({g.root(t) for op in g.ops if op.id in backward for t in op.inputs
                    if g.producer.get(g.root(t)) is not None and g.producer[g.root(t)] not in backward})
    return replace(lowered, graph=graph), tuple(saved)


def _draws_random(op_type: str) -> bool:
    """An op outside ATen (prims, rngprims) whose name says it samples; native_dropout_backward does not."""
    return not op_type.startswith("aten.") and bool(_RANDOM_OP.search(op_type))


def flat_outputs(lowered: Lowered) -> list[int | None]:
    """Every joint output position: its tensor id, or None where the graph returns a constant."""
    tensors = iter(lowered.outputs)
    positions = len(lowered.outputs) + len(lowered.output_constants)
    return [None if i in lowered.output_constants else next(tensors) for i in range(positions)]


# ------------------------------------------------------------------ partitions -> op ids
def _op_sequence(g: LifetimeGraph, fx_graph) -> list[int]:
    """Op ids of the call nodes of one partition graph, in its order.

    A node is our op of the same name and target; failing that (a node the
    partitioner renamed), the op with the same target and the same arguments. Nodes
    our graph has no op for (rng state, ...) are skipped.
    """
    from frontends.fx import _encode

    by_name = {op.name: op.id for op in g.ops}
    by_tensor_name = {t.name: t.id for t in g.tensors}
    by_call: dict[tuple[str, str, str], int] | None = None
    ids: dict[Any, Any] = {}  # fx node -> tensor id, or {tuple position: tensor id} for multi-output ops
    order: list[int] = []
    for node in fx_graph.nodes:
        if node.op == "placeholder" and node.name in by_tensor_name:
            ids[node] = by_tensor_name[node.name]
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            parent = ids.get(node.args[0])
            if isinstance(parent, dict) and node.args[1] in parent:
                ids[node] = parent[node.args[1]]
            continue
        oid = by_name.get(node.name)
        if oid is None or g.ops[oid].attrs.get("target") != str(node.target):
            if by_call is None:
                by_call = {_call_key(op.attrs.get("target"), op.attrs.get("args"), op.attrs.get("kwargs")): op.id
                           for op in g.ops}
            try:
                key = _call_key(str(node.target), _encode(node.args, ids), _encode(dict(node.kwargs), ids))
            except (FrontendError, TypeError):
                continue
            oid = by_call.get(key)
            if oid is None:
                continue
        op = g.ops[oid]
        results = op.attrs.get("results")
        ids[node] = op.outputs[0] if results is None else dict(zip(results, op.outputs))
        order.append(oid)
    return order


def _call_key(target, args, kwargs) -> tuple[str, str, str]:
    return str(target), json.dumps(args, sort_keys=True), json.dumps(kwargs, sort_keys=True)


def complete_sequence(g: LifetimeGraph, order: Sequence[int]) -> list[int]:
    """A valid execution of `g` that follows `order` (op ids, repeats are recomputes).

    Ops that `order` never names (copies the lowering adds for outputs, nodes CSE
    merged) run as soon as all their inputs exist; an op of `order` whose input does
    not exist yet gets that input's producers run first. A repeated view is dropped:
    views own no buffer. Every op runs at least once and reads only tensors that an
    earlier op wrote (or inputs and weights).
    """
    named = set(order)
    is_view = [bool(op.outputs) and all(g.tensors[t].alias_of is not None for t in op.outputs) for op in g.ops]
    missing = [sum(1 for t in set(op.inputs) if t in g.producer) for op in g.ops]  # inputs not yet written
    ran = [0] * len(g.ops)
    seq: list[int] = []

    def run(first: int) -> None:
        queue = deque([first])
        while queue:
            oid = queue.popleft()
            if oid != first and ran[oid]:
                continue
            seq.append(oid)
            ran[oid] += 1
            if ran[oid] > 1:
                continue
            for t in g.ops[oid].outputs:
                for c in g.consumers[t]:
                    missing[c] -= 1
                    if missing[c] == 0 and c not in named and not ran[c]:
                        queue.append(c)

    def ensure_inputs(target: int) -> None:
        stack, seen = [(target, False)], {target}
        while stack:
            oid, expanded = stack.pop()
            if expanded:
                if oid != target and not ran[oid]:
                    run(oid)
                continue
            stack.append((oid, True))
            for t in g.ops[oid].inputs:
                p = g.producer.get(t)
                if p is not None and not ran[p] and p not in seen:
                    seen.add(p)
                    stack.append((p, False))

    for oid in range(len(g.ops)):  # ops that read only inputs and weights, and that no partition names
        if missing[oid] == 0 and oid not in named and not ran[oid]:
            run(oid)
    for oid in order:
        if ran[oid] and is_view[oid]:
            continue
        ensure_inputs(oid)
        run(oid)
    for oid in range(len(g.ops)):
        if not ran[oid]:
            ensure_inputs(oid)
            run(oid)
    return seq
