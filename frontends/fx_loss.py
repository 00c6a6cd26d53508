"""The cross-entropy backward of a joint training graph, rewritten so it never holds three
logits-sized tensors at once.

ATen differentiates log_softmax + nll_loss as
    G   = nll_loss_backward(g, Y, target, None, reduction, ignore_index, total_weight)   (N, V)
    out = _log_softmax_backward_data(G, Y, 1, dtype) = G - exp(Y) * sum(G, 1)           (N, V)
G is zero but for -c_i at (i, target_i), with c_i = g / total_weight (mean), g (sum) or g_i (none)
for rows whose target is not ignore_index and 0 for the others, so
    out = exp(Y) * c - onehot(target) * c.
The second op holds G, Y and out together: for a language model's logits (GPT-2 small, batch 8,
sequence 1024: 1.53 GiB each) 4.6 GiB, the largest working set of the whole step and a floor under
any plan's peak. Written as
    c   = unsqueeze(valid * (g / total_weight | g), 1)          valid = target != ignore_index
    out = scatter_add(exp(Y) * c, 1, unsqueeze(target * valid, 1), -c)
no op holds more than two logits-sized tensors (Y and exp(Y), exp(Y) and the product, the
product and out). One more element-wise pass over the logits (about 1 ms on an H100); the
gradient equals ATen's within float rounding. Applied when G has no other reader, there are no
class weights, the class dimension is 1 of a 2-D input and Y, g and dtype agree.
"""

from __future__ import annotations

from typing import Any

_NLL_BACKWARD = "aten.nll_loss_backward.default"
_LOG_SOFTMAX_BACKWARD = "aten._log_softmax_backward_data.default"
_MEAN, _SUM = 1, 2  # at::Reduction


def split_cross_entropy_backward(graph) -> int:
    """Rewrite every nll_loss_backward -> _log_softmax_backward_data pair as above; returns how many."""
    changed = 0
    for lsb in [n for n in graph.nodes if _target(n) == _LOG_SOFTMAX_BACKWARD]:
        grad, y, dim, dtype = lsb.args[:4]
        if _target(grad) != _NLL_BACKWARD or list(grad.users) != [lsb] or dim not in (1, -1):
            continue
        g, _, target, weight, reduction, ignore_index, total_weight = grad.args[:7]
        yv, gv = _val(y), _val(g)
        if weight is not None or yv is None or gv is None or yv.dim() != 2 or yv.dtype != dtype \
                or gv.dtype != dtype or reduction not in (0, _MEAN, _SUM):
            continue
        out = _replace(graph, lsb, g, y, target, reduction, ignore_index, total_weight)
        lsb.replace_all_uses_with(out)
        graph.erase_node(lsb)
        graph.erase_node(grad)
        changed += 1
    return changed


def _replace(graph, before, g, y, target, reduction, ignore_index, total_weight):
    import torch

    aten = torch.ops.aten

    def call(op, *args):
        node = graph.call_function(op, args)
        node.meta["val"] = op(*(_val(a) if isinstance(a, torch.fx.Node) else a for a in args))
        return node

    with graph.inserting_before(before):
        valid = call(aten.ne.Scalar, target, ignore_index)
        scale = call(aten.div.Tensor, g, total_weight) if reduction == _MEAN else g
        c = call(aten.unsqueeze.default, call(aten.mul.Tensor, valid, scale), 1)
        product = call(aten.mul.Tensor, call(aten.exp.default, y), c)
        index = call(aten.unsqueeze.default, call(aten.mul.Tensor, target, valid), 1)
        return call(aten.scatter_add.default, product, 1, index, call(aten.neg.default, c))


def _target(node) -> str:
    return str(node.target) if getattr(node, "op", None) == "call_function" else ""


def _val(node) -> Any:
    return node.meta.get("val") if hasattr(node, "meta") else None
