"""A Ray driver in a process of its own, for the cluster tests: `ray.init` replaces the SIGSEGV
handler wasmtime relies on, so the pytest process (which runs sandboxes) must never call it.

Run as `python ray_driver.py ADDRESS`; reads one JSON request a line (`[name, args]`) and
answers one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import ray

NAMESPACE = "ubertool"


def nodes() -> dict[str, float]:
    """Alive nodes' Ray memory, by node id."""
    return {n["NodeID"]: n["Resources"].get("memory", 0.0) for n in ray.nodes() if n["Alive"]}


def where(handle: str) -> str:
    """The node session `handle`'s actor runs on (one restored after a lost node has another name)."""
    name = ray.get(ray.get_actor("ubertool-directory", namespace=NAMESPACE).actor_name.remote(handle))
    return ray.get(ray.get_actor(name, namespace=NAMESPACE).where.remote())


def pool() -> dict[str, int]:
    """The directory's warm sessions per node."""
    return ray.get(ray.get_actor("ubertool-directory", namespace=NAMESPACE).pool.remote())


def call_as(handle: str, principal: str, code: str) -> dict[str, Any]:
    """Call session `handle`'s actor directly, as `principal` says it is."""
    try:
        result = ray.get(ray.get_actor(handle, namespace=NAMESPACE).call.remote(principal, code, None, None))
    except ray.exceptions.RayTaskError as exc:
        return {"error": str(exc.cause)}
    return {"result": result.structured_content}


def main() -> None:
    # Answers go to the real stdout; Ray's own messages (e.g. a node marked dead) to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    ray.init(address=sys.argv[1], namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    requests = {f.__name__: f for f in (nodes, where, pool, call_as)}
    for line in sys.stdin:
        name, args = json.loads(line)
        print(json.dumps(requests[name](*args)), file=answers, flush=True)


if __name__ == "__main__":
    main()
