"""The logical -> physical expert map every MoE layer's dispatch reads, kept on the model's device.

A token routed to logical expert ``e`` goes to one of ``e``'s replicas: replica ``(row + salt) % count``,
where ``row`` is the token's row in its DP group's batch and ``salt`` this rank's EP rank, so consecutive
tokens (and the same row on different ranks) take turns over the replicas. Every replica holds the same
weights, so which one serves a token does not change its result. Shapes never change across rebalances
(``log2phy`` is padded to ``num_redundant + 1`` replicas): a switch is an in-place copy.
"""

from __future__ import annotations

import torch

from engine.eplb.policy import Placement, static_placement


class ExpertMap:
    """Per-layer maps of one instance (indexed by decoder layer id; dense layers keep the static rows).

    Attributes:
        num_logical / num_physical: routed experts, and physical slots over all EP ranks.
        phy2log / log2phy / logcnt: as in ``engine.eplb.policy.Placement``, on ``device``, ``log2phy`` padded
            to ``num_physical - num_logical + 1`` replicas.
        version: how many placements were switched in since start-up.
    """

    def __init__(self, num_layers: int, num_logical: int, num_physical: int,
                 device: torch.device | str = "cpu") -> None:
        self.num_layers, self.num_logical, self.num_physical = num_layers, num_logical, num_physical
        self.width = num_physical - num_logical + 1
        start = static_placement(num_layers, num_logical, num_physical)
        self.phy2log = start.phy2log.to(device)
        self.log2phy = torch.full((num_layers, num_logical, self.width), -1, dtype=torch.int64, device=device)
        self.logcnt = start.logcnt.to(device)
        self.log2phy[:, :, : start.log2phy.shape[2]] = start.log2phy.to(device)
        self.version = 0

    def placement(self) -> Placement:
        """The current map, on the CPU (what the policy and the weight moves read)."""
        return Placement(self.phy2log.cpu(), self.log2phy.cpu(), self.logcnt.cpu())

    def switch(self, layers: list[int], new: Placement) -> None:
        """Installs ``new`` (rows in the order of ``layers``) in place."""
        if new.log2phy.shape[2] > self.width:
            raise ValueError(f"a placement with {new.log2phy.shape[2]} replicas of one expert does not fit "
                             f"{self.num_physical} slots for {self.num_logical} experts")
        index = torch.tensor(layers, dtype=torch.int64)
        padded = torch.full((len(layers), self.num_logical, self.width), -1, dtype=torch.int64)
        padded[:, :, : new.log2phy.shape[2]] = new.log2phy
        device = self.phy2log.device
        self.phy2log[index.to(device)] = new.phy2log.to(device)
        self.log2phy[index.to(device)] = padded.to(device)
        self.logcnt[index.to(device)] = new.logcnt.to(device)
        self.version += 1

    def to_physical(self, layer: int, topk_ids: torch.Tensor, first_row: int, salt: int) -> torch.Tensor:
        """Logical ids ``[T, K]`` (-1 = none) -> physical slots, spreading each expert's tokens over its
        replicas. Fixed shapes, no host sync."""
        ids = topk_ids.long()
        known = ids >= 0
        safe = torch.where(known, ids, 0)
        count = self.logcnt[layer][safe]
        rows = torch.arange(first_row + salt, first_row + salt + ids.shape[0], device=ids.device).unsqueeze(1)
        replica = torch.remainder(rows, count)
        physical = self.log2phy[layer][safe, replica]
        return torch.where(known, physical, -1)
