"""Wire field names of the PD protocol (SGLang-compatible).

The router imports only this module of `kvtransfer`: it adds these fields to the request body it sends
to both the prefill and the decode instance, so the names must match SGLang's exactly.
"""

BOOTSTRAP_HOST = "bootstrap_host"
BOOTSTRAP_PORT = "bootstrap_port"
BOOTSTRAP_ROOM = "bootstrap_room"
# Optional: the attention-DP group of the instance that answers the request (decode, or a colocated
# instance) runs it (SGLang's and vLLM's field; SGLang's newer name for it is `routed_dp_rank`). The same
# body goes to prefill, which leaves it to decode.
DATA_PARALLEL_RANK = "data_parallel_rank"
ROUTED_DP_RANK = "routed_dp_rank"
# Optional: the attention-DP group of the prefill instance that runs the prompt and holds its KV (SGLang's
# field); without it that group is bootstrap_room % the prefill's dp_size, on both sides.
DISAGG_PREFILL_DP_RANK = "disagg_prefill_dp_rank"

# bootstrap_room is a random non-negative 63-bit integer drawn by the router.
ROOM_BITS = 63

# Decode-side prefix reuse: a decode worker's answer to a disaggregated request carries this header,
# "<reused>/<prompt>": how many of the prompt's tokens had their KV held by the decode instance already (not
# transferred). The router's cache-aware decode choice learns from it where a conversation's KV is.
KV_REUSED_HEADER = "X-Tandem-KV-Reused-Tokens"


# Error bodies (DESIGN.md, Errors and limits): OpenAI's `{"error": {"message", "type", "code", "param"}}`,
# built here alone for the router (its own HTTP server) and every aiohttp server (kvtransfer.http_errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_document(status: int, message: str, code: str | int | None = None,
                   param: str | None = None) -> dict[str, dict[str, object]]:
    """The error body for an answer of HTTP ``status``: its OpenAI type by the status (``ERROR_TYPES``, else
    by class), ``code`` the finer machine-readable reason, ``param`` the request field at fault."""
    err_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
