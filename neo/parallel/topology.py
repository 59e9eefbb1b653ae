"""The one process grid: pipe outermost, then data, then tensor innermost.

    rank = (pipe_rank * dp + data_rank) * tp + tensor_rank

so adjacent ranks share a tensor-parallel group (the chattiest one: keep it on one node). The grid
creates its TP, DP and PP groups once; neo's layers take the TP group from it, DeepSpeed gets it
as ``mpu`` (the ``get_{model,data}_parallel_*`` methods) and, with a pipeline, as the equivalent
``PipeModelDataParallelTopology`` whose axes ['pipe', 'data', 'model'] use the same rank order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Coord:
    pipe: int
    data: int
    tensor: int


class Topology:
    """Process groups for (world size, tp, pp); ``dist`` must be initialised when world > 1."""

    def __init__(self, world_size: int, tp: int = 1, pp: int = 1, rank: int = 0):
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp x pp = {tp} x {pp}")
        self.world_size, self.tp, self.pp, self.rank = world_size, tp, pp, rank
        self.dp = world_size // (tp * pp)
        self.coord = self.coord_of(rank)
        self.tp_group = self.dp_group = self.pp_group = self.mp_group = None
        if world_size > 1:
            self._make_groups()

    def rank_of(self, pipe: int, data: int, tensor: int) -> int:
        return (pipe * self.dp + data) * self.tp + tensor

    def coord_of(self, rank: int) -> Coord:
        return Coord(
            pipe=rank // (self.dp * self.tp), data=(rank // self.tp) % self.dp, tensor=rank % self.tp
        )

    def _make_groups(self) -> None:
        """Every rank creates every group in the same order (new_group is collective)."""
        r = self.coord
        for p in range(self.pp):
            for d in range(self.dp):
                g = dist.new_group([self.rank_of(p, d, t) for t in range(self.tp)])
                if (p, d) == (r.pipe, r.data):
                    self.tp_group = g
        for p in range(self.pp):
            for t in range(self.tp):
                g = dist.new_group([self.rank_of(p, d, t) for d in range(self.dp)])
                if (p, t) == (r.pipe, r.tensor):
                    self.dp_group = g
        for d in range(self.dp):
            for t in range(self.tp):
                g = dist.new_group([self.rank_of(p, d, t) for p in range(self.pp)])
                if (d, t) == (r.data, r.tensor):
                    self.pp_group = g
        for d in range(self.dp):
            g = dist.new_group([self.rank_of(p, d, t) for p in range(self.pp) for t in range(self.tp)])
            if d == r.data:
                self.mp_group = g

    @property
    def tensor_group(self):
        """The TP group for neo's layers: None when tp = 1, so the layers call no collective."""
        return self.tp_group if self.tp > 1 else None

    # ---- the mpu interface DeepSpeed asks for (model parallel = tensor parallel here) ----
    def get_model_parallel_rank(self) -> int:
        return self.coord.tensor

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.coord.data

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.coord.tensor

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_pipe_parallel_rank(self) -> int:
        return self.coord.pipe

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    def get_pipe_parallel_group(self):
        return self.pp_group

    def deepspeed_topology(self):
        """The same grid as DeepSpeed's pipeline topology; coordinates are checked to agree."""
        from neo import ds_compat

        topo = ds_compat.pipeline_topology(self.pp, self.tp, self.dp)
        for rank in range(self.world_size):
            c, ds = self.coord_of(rank), topo.get_coord(rank)
            if (c.pipe, c.data, c.tensor) != (ds.pipe, ds.data, ds.model):
                raise RuntimeError(f"DeepSpeed's topology places rank {rank} at {ds}, neo at {c}")
        return topo

    def describe(self) -> str:
        return (
            f"world {self.world_size} = pp {self.pp} x dp {self.dp} x tp {self.tp}; this rank {self.rank}: "
            f"pipe {self.coord.pipe}, data {self.coord.data}, tensor {self.coord.tensor}"
        )
