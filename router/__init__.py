"""tandem's PD router: an OpenAI-compatible HTTP front door that pairs prefill and decode workers.

It speaks SGLang's PD protocol to the workers (adds `bootstrap_host/port/room` to the request body and
sends it to the chosen prefill and decode instance at once), so it fronts tandem and SGLang workers
alike. It never imports torch or a worker package: `python -m router --help` starts in well under a
second on a machine with no GPU stack.
"""

from router.config import RouterConfig, WorkerSpec

__all__ = ["RouterConfig", "WorkerSpec", "create_app"]


def __getattr__(name: str) -> object:
    # create_app pulls in aiohttp.web (~0.2 s): imported on first use so `--help` stays instant.
    if name == "create_app":
        from router.app import create_app

        return create_app
    raise AttributeError(name)
