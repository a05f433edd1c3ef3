"""An elastic prefill instance's bootstrap service follows the instance's scales (``LayoutHooks``) and publishes
where every room runs (``kvtransfer.placements``).

The ranks re-form at a turn boundary (``engine.runtime.elastic``); what decode ranks must learn of it is which
ranks hold each room's KV. Rank 0 reports every room it routes with the layout of that turn (``RoomsPlaced``),
so a decode rank maps a room begun before the switch with the old layout whenever it asks, and one begun after
with the new. The service takes the new ranks' registrations while they load (``starting``), gives the new
layout to lookups once the ranks switched (``switched``), and forgets the registrations of ranks that never
joined when a scale is given up (``abandoned``): they were killed and could not deregister.
"""

from __future__ import annotations

from engine.runtime.launch import InstanceSpec
from engine.server.messages import RoomsPlaced
from kvtransfer.bootstrap import BootstrapService
from kvtransfer.mapping import ParallelLayout
from kvtransfer.messages import RoomPlacement


def parallel_layout(spec: InstanceSpec) -> ParallelLayout:
    return ParallelLayout(spec.tp_size, spec.dp_size, spec.mla_core)


class BootstrapLayoutHooks:
    """``engine.runtime.scaling.LayoutHooks`` over the instance's ``BootstrapService`` (which it does not own),
    and the sink of rank 0's placements (``rooms_placed``)."""

    def __init__(self, service: BootstrapService) -> None:
        self.service = service

    def starting(self, new: InstanceSpec) -> None:
        self.service.expect(parallel_layout(new))

    def switched(self, new: InstanceSpec) -> None:
        self.service.relayout(parallel_layout(new))

    def abandoned(self, old: InstanceSpec) -> None:
        self.service.abandon()

    def rooms_placed(self, placed: RoomsPlaced) -> None:
        self.service.place([RoomPlacement(room=room, dp_rank=dp_rank, tp_size=placed.tp_size,
                                          dp_size=placed.dp_size) for room, dp_rank in placed.rooms])
