"""Every DeepSpeed internal neo relies on, in one place.

neo drives DeepSpeed through its public API (``deepspeed.initialize``, ``engine.backward/step``,
``train_batch``, ``deepspeed.pipe`` layer specs, ``deepspeed.utils.safe_{get,set}_*``) wherever one exists.
What has no public API is reached only through the functions below, each saying why neo needs it.
``tests/test_ds_compat.py`` exercises every one of them against the installed DeepSpeed, so an upgrade that
moves one fails there, loudly, in one place. Tested with DeepSpeed 0.19.8 (pyproject.toml pins >=0.19,<0.20).
"""

from __future__ import annotations

import contextlib
import importlib

import torch

# ------------------------------------------------------------------------------------ start-up patches


def skip_shm_build() -> None:
    """DeepSpeed compiles a shared-memory all-reduce helper with g++ at every start on CPU (30-65 s on a
    fresh machine; ``deepspeed.comm.torch.build_shm_op``); it serves only DeepSpeed's inference kernels,
    so neo tells it the op is unavailable."""
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def fp32_zero_grad_norms() -> None:
    """Make DeepSpeed's ZeRO optimizers take gradient norms in fp32 (for a CPU run).

    ZeRO-1/2/3 convert every gradient to a fresh fp64 copy for the norm wherever the device has fp64
    (``deepspeed.runtime.zero.{stage_1_and_2,stage3}.get_norm_dtype``). On a CPU that is a full extra pass
    plus fresh pages each step: 40 ms against 5 ms in fp32 for 20M gradients, and the ZeRO-1 step of
    bench/train_step.py's ~20M model 1-3% faster in A/B runs (2-core AVX2 CPU, 2026-12-01). torch sums an
    fp32 norm pairwise (relative error ~1e-7), far below what clipping can notice. GPUs keep DeepSpeed's
    choice; a DeepSpeed without ``get_norm_dtype`` is left as it is.
    """
    for name in ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3"):
        module = importlib.import_module(name)
        if callable(getattr(module, "get_norm_dtype", None)):
            module.get_norm_dtype = _fp32


def _fp32() -> torch.dtype:
    return torch.float32


def skip_single_rank_allreduce(engine) -> bool:
    """Stop a ZeRO-0 engine from "all-reducing" gradients over a data-parallel group of one rank.

    Without ZeRO, DeepSpeed reduces gradients after every backward (``allreduce_gradients`` ->
    ``buffered_allreduce_fallback``): it flattens every gradient into one buffer, all-reduces it, scales it
    by 1/dp and copies it back, three passes over all gradients that change nothing when dp = 1 (14M
    gradients: ~0.1 s of a ~3 s quickstart step on a 2-core CPU). The switches are the engine's
    ``enable_backward_allreduce`` (the plain engine) and ``pipeline_enable_backward_allreduce`` (the
    pipeline engine, which reduces tied weights across stages separately). Returns whether it applied:
    only ZeRO-0 engines; ZeRO-1/2 move gradients into their fp32 partitions in that same call.
    """
    if engine.zero_optimization_stage() != 0 or engine.dp_world_size != 1:
        return False
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = False
    engine.enable_backward_allreduce = False
    return True


# ------------------------------------------------------------------------------- optimizer wrappers


def optimizer_kinds() -> dict[str, tuple[type, ...]]:
    """DeepSpeed's optimizer wrapper classes by how neo reaches their state (their modules are internal):
    ``unfused`` (fp16 without ZeRO: one fp32 master per parameter), ``fragments`` (ZeRO-1/2 and bf16
    without ZeRO: flat fp32 partitions), ``zero3`` (ZeRO-3: every parameter partitioned)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return {"unfused": (FP16_UnfusedOptimizer,), "fragments": (DeepSpeedZeroOptimizer, BF16_Optimizer),
            "zero3": (DeepSpeedZeroOptimizer_Stage3,)}  # fmt: skip


def unfused_masters(wrapper) -> dict[int, torch.Tensor]:
    """FP16_UnfusedOptimizer: id(module parameter) -> its fp32 master (``fp16_groups``/``fp32_groups``)."""
    return {
        id(lp): hp for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(lps, hps)
    }


def can_link_fragments(wrapper) -> bool:
    return hasattr(wrapper, "_lazy_init_hp_params_optimizer_state")


def link_fragments(wrapper) -> None:
    """Point each module parameter's fragment at the optimizer state of its flat partition, now.

    ZeRO-1/2 and BF16_Optimizer link them once, lazily, right after stepping their first parameter group,
    before the other groups have any state (DeepSpeed 0.19); ``safe_get_full_optimizer_state`` then finds
    nothing for those. Linking again after all state exists (or after neo created it) fixes both ways."""
    wrapper._hp_optimizer_states_linked = False
    wrapper._lazy_init_hp_params_optimizer_state()


def zero3_flat_groups(wrapper) -> list[tuple[torch.Tensor, int]]:
    """ZeRO-3: (flat fp32 partition, its parameter group index) for each sub-group, the tensors that carry
    the inner optimizer's state (``fp32_partitioned_groups_flat``, ``sub_group_to_group_id``)."""
    return [
        (hp, wrapper.sub_group_to_group_id[i]) for i, hp in enumerate(wrapper.fp32_partitioned_groups_flat)
    ]


def zero3_partition(p: torch.nn.Parameter, wrapper) -> tuple[tuple[int, ...], int, object]:
    """ZeRO-3: a parameter's full shape, the size of each rank's (padded) slice, and its process group
    (``ds_shape``, ``ds_tensor``, ``ds_process_group``)."""
    group = getattr(p, "ds_process_group", None) or wrapper.dp_process_group
    return tuple(p.ds_shape), p.ds_tensor.numel(), group


def param_numel(p: torch.nn.Parameter) -> int:
    """A parameter's full size, also under ZeRO-3, where the module's tensor is an empty placeholder
    (``ds_numel``)."""
    return int(getattr(p, "ds_numel", p.numel()))


def swaps_optimizer(wrapper) -> bool:
    """ZeRO-3 with optimizer state swapped to NVMe, where neo cannot set it."""
    return bool(getattr(wrapper, "swap_optimizer", False))


def gathered_parameters(params: list[torch.nn.Parameter]):
    """ZeRO-3: a context in which every rank holds the full values of ``params`` (read only). Public API
    (``deepspeed.zero.GatheredParameters``), here so that the checkpoint writer does not import DeepSpeed."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@contextlib.contextmanager
def zero3_outside_engine(engine):
    """A context for running the engine's module outside the engine's own forward (rollout sampling, which
    calls the layers one by one with a KV cache). Under ZeRO-3 the partitioned parameters are gathered for the
    duration and DeepSpeed's module hooks are taken off meanwhile: called layer by layer, without the root
    module's hook, they release a layer's weights after its forward while neo reads some after it (the
    blocks' output biases). As TRL's ``unwrap_model_for_generation``: private attributes of
    ``DeepSpeedZeRoOffload``. Without ZeRO-3, nothing to do."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        yield
        return
    params = list(engine.module.parameters())
    with gathered_parameters(params):
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


# ------------------------------------------------------------------------------- engine state

# DeepSpeed's own state that a resume must restore (neo saves it in neo.json instead of DeepSpeed's pickles):
# the engine's step counters, and the fp16 loss scaler (ZeRO keeps a DynamicLossScaler in ``loss_scaler``,
# the non-ZeRO fp16 optimizers a ``loss_scale_config``; bf16/fp32 have a static one or none).
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _loss_scaler(engine):
    opt = engine.optimizer
    return getattr(opt, "loss_scaler", None) or getattr(opt, "loss_scale_config", None)


def loss_scale(engine) -> float:
    """The fp16 dynamic loss scale now (DeepSpeed's optimizer wrappers keep it in ``cur_scale``)."""
    return float(engine.optimizer.cur_scale)


def engine_state(engine) -> dict:
    """The engine's step counters and loss-scaler state, as JSON."""
    state = {k: int(getattr(engine, k)) for k in _ENGINE_COUNTERS if hasattr(engine, k)}
    scaler = _loss_scaler(engine)
    if scaler is not None:
        state["loss_scaler"] = {k: _plain(getattr(scaler, k)) for k in _SCALER_FIELDS if hasattr(scaler, k)}
    return state


def set_engine_state(engine, state: dict) -> None:
    """Restore ``engine_state``."""
    for k in _ENGINE_COUNTERS:
        if k in state:
            setattr(engine, k, state[k])
    scaler = _loss_scaler(engine)
    if scaler is not None:
        for k, v in state.get("loss_scaler", {}).items():
            if hasattr(scaler, k):
                setattr(scaler, k, v)


def _plain(value):
    """A tensor or numpy number inside DeepSpeed's counters as a plain number."""
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------------------------ pipelines


def pipeline_layer_names(module) -> list[str]:
    """Class names of a PipelineModule's layers, in order (its ``_layer_specs``), for the partitioning log."""
    return [spec.typename.__name__ for spec in module._layer_specs]


def pipeline_parts(module) -> list[int]:
    """Layer index boundaries of the stages of a PipelineModule (``parts``: stage s holds [parts[s], parts[s+1]))."""
    return list(module.parts)


def pipeline_last_layer(module, tie_key: str | None):
    """The module that runs as the last layer of the last stage: the tied embedding (``tied_modules``) or
    the last built layer (``forward_funcs``); None on other stages (``stage_id``, ``num_stages``)."""
    if module.stage_id != module.num_stages - 1:
        return None
    return module.tied_modules[tie_key] if tie_key else module.forward_funcs[-1]


def pipeline_topology(pp: int, tp: int, dp: int):
    """DeepSpeed's pipe x data x model process grid (``deepspeed.runtime.pipe.topology``)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
