"""``--enable-eplb`` and ``--eplb-config``: vLLM's flag names, keys, meanings and defaults.

    --enable-eplb --eplb-config '{"window_size": 1000, "step_interval": 3000, "num_redundant_experts": 0,
                                  "log_balancedness": false, "policy": "default"}'
    --enable-eplb --eplb-config.num_redundant_experts 2 --eplb-config.step_interval 64

The dotted form sets one key and wins over the JSON object. A key vLLM has and tandem does not honour is
refused naming it (``use_async: true``: tandem rebalances between two steps, synchronously), as is any
key no one documents.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from typing import Any

POLICIES = ("default",)  # DeepSeek's hierarchical EPLB (engine.eplb.policy), vLLM's "default"


@dataclass(frozen=True)
class EplbConfig:
    """EPLB settings of one instance (vLLM's ``EPLBConfig``).

    Attributes:
        window_size: engine steps of per-expert token counts the policy balances over.
        step_interval: steps between two rebalances (only the last ``window_size`` steps count).
        num_redundant_experts: extra physical expert slots over the instance; ``num_experts + this`` must
            split evenly over the EP ranks.
        log_balancedness: log mean / max tokens per rank every ``log_balancedness_interval`` steps (an
            all-reduce of the counts each time; /metrics has it without this).
        log_balancedness_interval: steps between two balancedness log lines.
        policy: the placement policy; ``"default"`` is DeepSeek's hierarchical EPLB.
    """

    window_size: int = 1000
    step_interval: int = 3000
    num_redundant_experts: int = 0
    log_balancedness: bool = False
    log_balancedness_interval: int = 1
    policy: str = "default"

    def __post_init__(self) -> None:
        for name in ("window_size", "step_interval", "log_balancedness_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"eplb-config {name} must be an integer >= 1, got {value!r}")
        redundant = self.num_redundant_experts
        if not isinstance(redundant, int) or isinstance(redundant, bool) or redundant < 0:
            raise ValueError(f"eplb-config num_redundant_experts must be an integer >= 0, got {redundant!r}")
        if not isinstance(self.log_balancedness, bool):
            raise ValueError(f"eplb-config log_balancedness must be true or false, got {self.log_balancedness!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"eplb-config policy {self.policy!r} is not known; choose one of {POLICIES}")


KEYS = {f.name: f.type for f in fields(EplbConfig)}
# vLLM keys tandem refuses unless they hold the value that means what tandem does.
ACCEPTED_ONLY_AS = {"use_async": False, "communicator": None}


def eplb_config_from_dict(values: dict[str, Any]) -> EplbConfig:
    """An ``EplbConfig`` from a JSON object; unknown keys and unhonoured values are a ValueError naming them."""
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in ACCEPTED_ONLY_AS:
            if value != ACCEPTED_ONLY_AS[key]:
                raise ValueError(f"eplb-config {key}={value!r} is not supported (tandem rebalances between two "
                                 f"steps on the instance's process group); only {ACCEPTED_ONLY_AS[key]!r} passes")
            continue
        if key not in KEYS:
            raise ValueError(f"eplb-config has no key {key!r}; keys: {', '.join(KEYS)}")
        kwargs[key] = value
    return EplbConfig(**kwargs)


def _parse_value(key: str, raw: str) -> Any:
    """A dotted flag's value: JSON where it parses (numbers, true/false), else the string (a policy name)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def add_eplb_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--enable-eplb``, ``--eplb-config JSON`` and ``--eplb-config.KEY VALUE`` for every key."""
    parser.add_argument("--enable-eplb", action="store_true",
                        help="expert-parallel load balancing: per-expert token counts over a window of steps, "
                             "redundant expert replicas, live rebalance between steps (engine.eplb)")
    parser.add_argument("--eplb-config", default=None,
                        help="JSON object of EPLB settings (vLLM's keys: window_size 1000, step_interval 3000, "
                             "num_redundant_experts 0, log_balancedness false, log_balancedness_interval 1, "
                             "policy default)")
    for key in KEYS:
        parser.add_argument(f"--eplb-config.{key}", dest=f"eplb_config__{key}", default=None, metavar="VALUE",
                            help=argparse.SUPPRESS)


def eplb_config_from_flags(args: argparse.Namespace) -> EplbConfig | None:
    """The instance's EPLB settings, or None without ``--enable-eplb`` (settings without it are refused)."""
    values: dict[str, Any] = {}
    if args.eplb_config is not None:
        try:
            parsed = json.loads(args.eplb_config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--eplb-config is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError("--eplb-config must be a JSON object, e.g. '{\"num_redundant_experts\": 2}'")
        values.update(parsed)
    for key in KEYS:
        raw = getattr(args, f"eplb_config__{key}", None)
        if raw is not None:
            values[key] = _parse_value(key, raw)
    if not args.enable_eplb:
        if values:
            raise ValueError(f"EPLB settings ({', '.join(values)}) were given without --enable-eplb")
        return None
    return eplb_config_from_dict(values)
