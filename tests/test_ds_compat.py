"""Every DeepSpeed internal neo uses (neo/ds_compat.py), exercised against the installed DeepSpeed.

A DeepSpeed upgrade that renames or removes one of them fails here, by name, before anything subtler
breaks (a resume that silently starts Adam afresh, a slow CPU step). The engines are real: built by neo's
own build functions on 2 gloo processes (ZeRO-1 and ZeRO-3 in fp32; bf16 without ZeRO), and a 1-stage
PipelineModule.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from distributed_helpers import spawn
from runs import TINY

pytestmark = pytest.mark.multiproc


def _engine(stage: int, dtype: str = "fp32"):
    import deepspeed

    from neo.config import load_config
    from neo.parallel.topology import Topology
    from neo.train import build

    os.environ.update(
        RANK=str(torch.distributed.get_rank()), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1"
    )
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    cfg = load_config([TINY], [f"zero.stage={stage}", f"precision.dtype={dtype}", "model.vocab_size=256",
                               "batch.micro_batch_size=2"], world_size=2)  # fmt: skip
    topo, device = Topology(2, 1, 1, torch.distributed.get_rank()), torch.device("cpu")
    args = build.model_args(cfg, SimpleNamespace(vocab_size=256, name="random-256"))
    model = build.build_model(args, cfg, topo)
    engine, _, _ = build.build_engine(
        model, build.build_optimizer(model, cfg, topo, device), cfg, topo, device
    )
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()
    return engine


def _zero1(rank: int, world: int) -> dict:
    from deepspeed.utils import safe_get_full_optimizer_state

    from neo import ds_compat

    engine = _engine(1)
    kinds = ds_compat.optimizer_kinds()
    assert isinstance(engine.optimizer, kinds["fragments"]) and ds_compat.can_link_fragments(engine.optimizer)
    ds_compat.link_fragments(engine.optimizer)
    # after linking, every parameter (both groups: decayed matrices and undecayed biases/norms) has moments
    moments = [safe_get_full_optimizer_state(p, "exp_avg") for p in engine.module.parameters()]
    assert all(m is not None and m.abs().sum() > 0 for m in moments)
    state = ds_compat.engine_state(engine)
    assert state["global_steps"] == 1 and state["loss_scaler"]["cur_scale"] == 1.0
    ds_compat.set_engine_state(engine, dict(state, global_steps=7, skipped_steps=2))
    assert engine.global_steps == 7 and engine.skipped_steps == 2 and ds_compat.loss_scale(engine) == 1.0
    return {"ok": True}


def _zero3(rank: int, world: int) -> dict:
    from neo import ds_compat

    engine = _engine(3)
    opt = engine.optimizer
    assert isinstance(opt, ds_compat.optimizer_kinds()["zero3"]) and not ds_compat.swaps_optimizer(opt)
    groups = ds_compat.zero3_flat_groups(opt)
    assert groups and all(hp.dtype == torch.float32 and hp in opt.optimizer.state for hp, _ in groups)
    p = engine.module.layers[0].word_embeddings.weight
    shape, size, group = ds_compat.zero3_partition(p, opt)
    assert shape == (256, 64) and size == 256 * 64 // 2 and torch.distributed.get_world_size(group) == 2
    assert (
        ds_compat.param_numel(p) == 256 * 64
    )  # its full size, whether ZeRO-3 partitioned it or kept it whole
    with ds_compat.gathered_parameters([p]):
        assert tuple(p.shape) == (256, 64)
    # the module called outside the engine (rollouts, LoRA's reference) computes what the engine does, and
    # the engine's hooks work again afterwards
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        inside = float(engine(tokens[:, :-1], tokens[:, 1:]))
        with ds_compat.zero3_outside_engine(engine):
            outside = float(engine.module(tokens[:, :-1], tokens[:, 1:]))
    assert abs(inside - outside) < 1e-6
    engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
    engine.step()
    return {"ok": True}


def _bf16(rank: int, world: int) -> dict:
    """bf16 without ZeRO and without a pipeline: DeepSpeed wraps the optimizer in FP16_UnfusedOptimizer, one
    fp32 master per bf16 module parameter (with a pipeline it is BF16_Optimizer, a "fragments" kind)."""
    from neo import ds_compat

    engine = _engine(0, "bf16")
    assert isinstance(engine.optimizer, ds_compat.optimizer_kinds()["unfused"])
    masters = ds_compat.unfused_masters(engine.optimizer)
    for p in engine.module.parameters():
        assert p.dtype == torch.bfloat16 and masters[id(p)].dtype == torch.float32
        assert torch.equal(masters[id(p)].bfloat16(), p.data)
    assert "global_steps" in ds_compat.engine_state(engine)
    return {"ok": True}


def _all_engines(rank: int, world: int) -> dict:
    return {case.__name__: case(rank, world) for case in (_zero1, _zero3, _bf16)}


def test_optimizer_internals_on_real_engines():
    """One pair of processes builds the three engines in turn (DeepSpeed starts once)."""
    ok = {"_zero1": {"ok": True}, "_zero3": {"ok": True}, "_bf16": {"ok": True}}
    assert spawn(_all_engines, 2) == [ok, ok]


def test_start_up_patches():
    import importlib

    from neo import ds_compat

    ds_compat.skip_shm_build()
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
    ds_compat.fp32_zero_grad_norms()
    for name in ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3"):
        assert importlib.import_module(name).get_norm_dtype() == torch.float32


def _pipeline(rank: int, world: int) -> dict:
    import deepspeed

    from neo import ds_compat
    from neo.model.args import ModelArgs
    from neo.model.gpt import pipeline_module
    from neo.parallel.topology import Topology

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    ds_compat.skip_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    module = pipeline_module(ModelArgs(vocab_size=256), Topology(1, 1, 1, 0), seed=1)
    names = ds_compat.pipeline_layer_names(module)
    assert names == [
        "PipelineEmbedding",
        "PipelineBlock",
        "PipelineBlock",
        "PipelineFinalNorm",
        "PipelineHead",
    ]
    assert ds_compat.pipeline_parts(module) == [0, 5]
    assert type(ds_compat.pipeline_last_layer(module, None)).__name__ == "PipelineHead"
    assert ds_compat.pipeline_topology(1, 1, 1).get_coord(0).pipe == 0
    return {"ok": True}


def _one_process(rank: int, world: int) -> dict:
    return {"pipeline": _pipeline(rank, world), "single_rank": _single_rank(rank, world)}


def test_pipeline_internals_and_the_single_rank_allreduce():
    """One process (DeepSpeed starts once): the pipeline internals, and ZeRO-0 on one data-parallel rank
    without the gradient all-reduce (see ``_single_rank``)."""
    single = {0: (False, 0, True), 1: (True, 1, False), "pipe": (True, False)}
    assert spawn(_one_process, 1) == [{"pipeline": {"ok": True}, "single_rank": single}]


def _single_rank(rank: int, world: int) -> dict:
    """(After ``_pipeline`` started DeepSpeed.) ZeRO-0 on one data-parallel rank skips the gradient all-reduce
    (its flatten, scale and copy change nothing there); ZeRO-1 keeps it (that call moves the gradients into
    its partitions). Per stage: (all-reduce on after build_engine, all-reduce calls in one step, skip applies)."""
    import deepspeed

    from neo import ds_compat
    from neo.config import load_config
    from neo.model.args import ModelArgs
    from neo.model.gpt import pipeline_module
    from neo.parallel.topology import Topology
    from neo.train import build

    topo, device, tokens = Topology(1, 1, 1, 0), torch.device("cpu"), torch.randint(0, 256, (2, 17))
    out = {}
    for stage in (0, 1):
        cfg = load_config([TINY], [f"zero.stage={stage}", "model.vocab_size=256", "batch.micro_batch_size=2"])
        model = build.build_model(build.model_args(cfg, SimpleNamespace(vocab_size=256)), cfg, topo)
        optimizer = build.build_optimizer(model, cfg, topo, device)
        engine, _, _ = build.build_engine(model, optimizer, cfg, topo, device)
        calls, reduce = [], engine.allreduce_gradients

        def counted(*args, _calls=calls, _reduce=reduce, **kwargs):
            _calls.append(1)
            return _reduce(*args, **kwargs)

        engine.allreduce_gradients = counted
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        engine.step()
        out[stage] = (
            engine.enable_backward_allreduce,
            len(calls),
            ds_compat.skip_single_rank_allreduce(engine),
        )
    cfg = load_config([TINY], ["model.vocab_size=256", "batch.micro_batch_size=2"])
    sgd = {"type": "SGD", "params": {"lr": 0.1}}
    module = pipeline_module(ModelArgs(vocab_size=256), topo)
    pipe, _, _, _ = deepspeed.initialize(
        model=module, config=dict(build.deepspeed_config(cfg), optimizer=sgd)
    )
    out["pipe"] = (ds_compat.skip_single_rank_allreduce(pipe), pipe.pipeline_enable_backward_allreduce)
    return out
