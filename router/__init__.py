"""tandem's PD router: an OpenAI-compatible HTTP front door that pairs prefill and decode workers.

It speaks SGLang's PD protocol to the workers (adds `bootstrap_host/port/room` to the request body and
sends it to the chosen prefill and decode instance at once), so it fronts tandem and SGLang workers
alike. It never imports torch or a worker package: `python -m router --help` starts in well under a
second on a machine with no GPU stack.
"""

from router.config import RouterConfig, WorkerSpec

__all__ = ["RouterApp", "RouterConfig", "WorkerSpec"]


def __getattr__(name: str) -> object:
    # RouterApp pulls in the serving modules: imported on first use so `--help` stays instant.
    if name == "RouterApp":
        from router.app import RouterApp

        return RouterApp
    raise AttributeError(name)
