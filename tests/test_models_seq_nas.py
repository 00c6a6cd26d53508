"""Transformers, NAS cells, RandWire and random layered DAGs: sizes, shapes, export, determinism."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from models import registry
from models.layered import random_layered
from models.nas import DartsFactorizedReduce, SlimCell
from models.randwire import RandomStage, ba_graph, er_graph, stage_graphs, ws_graph
from planner.graph import LifetimeGraph

# name -> (parameters of our full-size definition, published figure or None)
FULL_SIZE_PARAMS = {
    "transformer": (63_082_496, None),  # paper: 65M with its (unstated-size) 37k vocabulary
    "vit_b_16": (86_567_656, 86_567_656),  # torchvision
    "gpt2": (124_439_808, 124_439_808),  # HF GPT2LMHeadModel, tied head
    "bert": (109_482_240, 109_482_240),  # HF BertModel with pooler
    "nasnet_a": (5_289_978, 5.3e6),  # Zoph et al. 2018, table 2
    "pnasnet5": (5_064_487, 5.1e6),  # Liu et al. 2018, table 3
    "amoebanet_d": (81_137_437, 82e6),  # Huang et al. 2019 (GPipe), table 1: AmoebaNet-D (18, 208)
    "darts": (4_718_752, 4.7e6),  # Liu et al. 2019, table 3
    "randwire_ws": (5_640_454, 5.6e6),  # Xie et al. 2019, table 2 (paper's first stage has N/2 nodes)
}
OURS = ["transformer", "vit_b_16", "gpt2", "bert", "nasnet_a", "pnasnet5", "amoebanet_d", "darts",
        "randwire_ws", "randwire_er", "randwire_ba"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models on a shared machine: thread start-up and contention cost more than they give
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _full_size(name: str):
    with torch.device("meta"):  # shapes and counts only: no memory, no init cost
        return registry.spec(name).builder()


@pytest.mark.parametrize("name", sorted(FULL_SIZE_PARAMS))
def test_full_size_parameter_count(name):
    module, _ = _full_size(name)
    ours, published = FULL_SIZE_PARAMS[name]
    assert sum(p.numel() for p in module.parameters()) == ours
    if published is not None:
        assert abs(ours - published) / published < 0.03


def test_registry_families():
    assert set(registry.names("transformer")) >= {"transformer", "vit_b_16", "gpt2", "bert"}
    assert set(registry.names("nas")) >= {"nasnet_a", "pnasnet5", "amoebanet_d", "darts"}
    assert set(registry.names("randwire")) >= {"randwire_ws", "randwire_er", "randwire_ba"}


SMALL_OUTPUT_SHAPES = {
    "transformer": [(2, 8, 100)],
    "vit_b_16": [(2, 10)],
    "gpt2": [(2, 8, 100)],
    "bert": [(2, 8, 32), (2, 32)],
    **{n: [(2, 10)] for n in ("nasnet_a", "pnasnet5", "amoebanet_d", "darts", "randwire_ws", "randwire_er",
                              "randwire_ba")},
}


@pytest.mark.parametrize("name", OURS)
def test_small_forward_export_and_onnx(name, tmp_path):
    import onnx

    module, inputs = registry.build_small(name)
    with torch.no_grad():
        out = module(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in outs] == SMALL_OUTPUT_SHAPES[name]
    assert all(torch.isfinite(o).all() for o in outs)

    exported = torch.export.export(module, inputs)
    with torch.no_grad():
        replay = exported.module()(*inputs)
    replays = replay if isinstance(replay, tuple) else (replay,)
    for a, b in zip(outs, replays):
        torch.testing.assert_close(a, b)

    path = tmp_path / f"{name}.onnx"
    registry.export_onnx(name, str(path), **registry.spec(name).small)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    op_types = {n.op_type for n in model.graph.node}
    assert len(model.graph.output) == len(outs)
    if registry.spec(name).family == "transformer":
        assert {"MatMul", "Softmax"} <= op_types and "Attention" not in op_types


def test_causal_attention_ignores_the_future():
    module, (ids,) = registry.build_small("gpt2")
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 100
    with torch.no_grad():
        a, b = module(ids), module(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_bad_parameters_are_named():
    with pytest.raises(registry.ModelSpecError, match="res=200"):
        registry.build("vit_b_16", res=200, layers=1)
    with pytest.raises(registry.ModelSpecError, match="seq=2048"):
        registry.build("gpt2", seq=2048, layers=1)
    with pytest.raises(registry.ModelSpecError, match="res=100"):
        registry.build("darts", res=100)
    with pytest.raises(registry.ModelSpecError, match="k=5"):
        ws_graph(32, k=5)


# ---- NAS structure -------------------------------------------------------------------------------

def _cells(module) -> list:
    return [m for m in module.modules() if isinstance(m, SlimCell)]


@pytest.mark.parametrize("name, cells, widths", [
    # 2 stem cells + normal cells + reduction cells; channels each cell concatenates, in order
    ("nasnet_a", 16, [44, 88] + [264] * 4 + [352] + [528] * 4 + [704] + [1056] * 4),
    ("pnasnet5", 11, [65, 135] + [270] * 3 + [540] * 3 + [1080] * 3),
    ("amoebanet_d", 22, [156, 312] + [832] * 6 + [1248] + [1664] * 6 + [2496] + [3328] * 6),
])
def test_slim_cell_sequence(name, cells, widths):
    module, _ = _full_size(name)
    found = _cells(module)
    assert len(found) == cells
    assert [c.out_channels for c in found] == widths
    assert module.classifier.in_features == widths[-1]


def test_genotype_concatenations():
    module, _ = _full_size("nasnet_a")
    cells = _cells(module)
    assert cells[2].concat == (1, 2, 3, 4, 5, 6)  # normal: h1 and all five blocks
    assert cells[6].concat == (3, 4, 5, 6)  # reduction: blocks 1..4
    amoeba = _cells(_full_size("amoebanet_d")[0])
    assert amoeba[2].concat == (0, 3, 4, 6) and amoeba[8].concat == (4, 5, 6)
    darts, _ = _full_size("darts")
    assert len(darts.cells) == 14 and darts.classifier.in_features == 4 * 192
    reducing = [i for i, c in enumerate(darts.cells) if any(isinstance(op, torch.nn.MaxPool2d) and op.stride == 2
                                                            for op in c.ops)]
    assert reducing == [4, 9]
    # s0 is factor-reduced right after each resolution change (the stem counts as one)
    assert [i for i, c in enumerate(darts.cells) if isinstance(c.pre0, DartsFactorizedReduce)] == [0, 5, 10]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nasnet_a", "pnasnet5", "darts", "amoebanet_d", "randwire_ws"])
def test_full_size_final_feature_map_is_7x7(name):
    module, inputs = registry.build(name)
    seen = []
    last = module.cells[-1] if hasattr(module, "cells") else module.head
    last.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        module(*inputs)
    assert len(seen) == 1 and tuple(seen[0][2:]) == (7, 7)


# ---- RandWire ------------------------------------------------------------------------------------

@pytest.mark.parametrize("generator", [ws_graph, er_graph, ba_graph])
def test_random_graphs_are_seeded_dags(generator):
    a, b, c = generator(32, seed=7), generator(32, seed=7), generator(32, seed=8)
    assert a.edges == b.edges and a.edges != c.edges
    assert all(u < v for u, v in a.edges) and len(set(a.edges)) == len(a.edges)
    g = nx.DiGraph(list(a.edges))
    g.add_nodes_from(range(32))
    assert g.number_of_nodes() == 32 and nx.is_directed_acyclic_graph(g)


def test_random_graph_edge_counts():
    for seed in range(10):
        assert len(ws_graph(32, 4, 0.75, seed).edges) == 32 * 4 // 2
        assert len(ba_graph(32, 5, seed).edges) == (32 - 5) * 5
    er = [len(er_graph(32, 0.2, seed).edges) for seed in range(20)]
    assert abs(sum(er) / len(er) - 0.2 * 32 * 31 / 2) < 8  # mean 99.2, sd of the mean ~2


@pytest.mark.parametrize("kind", ["ws", "er", "ba"])
def test_randwire_network_follows_its_stage_graphs(kind):
    module, _ = _full_size(f"randwire_{kind}")
    stages = [m for m in module.modules() if isinstance(m, RandomStage)]
    graphs = stage_graphs(kind, n=32, seed=0)
    assert [s.dag for s in stages] == graphs
    assert len({g.edges for g in graphs}) == 3  # every stage has its own graph
    for stage, dag in zip(stages, graphs):
        assert len(stage.nodes) == 32
        strided = [i for i, node in enumerate(stage.nodes) if node.conv[1].stride == (2, 2)]
        assert strided == list(dag.sources)
        for node, preds in zip(stage.nodes, dag.predecessors):
            assert (node.weights is None) if len(preds) <= 1 else node.weights.numel() == len(preds)


# ---- random layered DAGs -------------------------------------------------------------------------

def test_random_layered_is_deterministic_and_valid():
    kw = dict(width=(2, 6), edge_density=0.4, skip_prob=0.2, cost_range=(10, 20), size_range=(100, 200))
    g = random_layered(200, seed=5, **kw)
    assert isinstance(g, LifetimeGraph)
    assert g.to_dict() == random_layered(200, seed=5, **kw).to_dict()
    assert g.to_dict() != random_layered(200, seed=6, **kw).to_dict()
    assert len(g.ops) == 200 and len(g.tensors) == 201
    assert [t.id for t in g.tensors_of("input")] == [0]
    assert [t.id for t in g.tensors_of("output")] == [g.ops[-1].outputs[0]] == [200]
    assert all(100 <= t.nbytes <= 200 for t in g.tensors)
    assert all(10 <= op.flops <= 20 for op in g.ops)
    assert all(len(op.outputs) == 1 for op in g.ops)
    # every tensor but the output is read; the first layer reads the input; widths as asked
    assert all(g.consumers[t.id] for t in g.tensors if t.kind != "output")
    layers: dict[int, list[int]] = {}
    for op in g.ops:
        layers.setdefault(op.attrs["layer"], []).append(op.id)
    assert [op for op in g.ops if op.inputs == (0,)] == [g.ops[i] for i in layers[0]]
    inner = [len(v) for k, v in sorted(layers.items())][:-2]  # the last regular layer may be cut short
    assert all(2 <= w <= 6 for w in inner) and len(layers[max(layers)]) == 1
    assert nx.is_directed_acyclic_graph(g.to_networkx())


def test_random_layered_edges_follow_the_layers():
    g = random_layered(300, width=(3, 3), edge_density=1.0, skip_prob=0.0, seed=1)
    layer = {op.id: op.attrs["layer"] for op in g.ops}
    for op in g.ops[3:-1]:  # dense, no skips: exactly the three nodes of the layer below
        assert sorted(layer[g.producer[t]] for t in op.inputs) == [layer[op.id] - 1] * 3
    skips = random_layered(300, width=(3, 3), edge_density=0.0, skip_prob=1.0, seed=1)
    gaps = [skips.ops[i].attrs["layer"] - skips.ops[skips.producer[t]].attrs["layer"]
            for i in range(6, 299) for t in skips.ops[i].inputs]
    assert max(gaps) > 1 and min(gaps) == 1


def test_random_layered_rejects_bad_input():
    with pytest.raises(registry.ModelSpecError, match="width"):
        random_layered(10, width=(3, 2))
    with pytest.raises(registry.ModelSpecError, match="edge_density"):
        random_layered(10, edge_density=1.5)
    with pytest.raises(registry.ModelSpecError, match="n_nodes=0"):
        random_layered(0)
