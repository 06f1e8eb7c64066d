"""Drives the OpenFeature Python flagd provider against a flagmesh PoP.

Usage: flagd_provider.py HOST PORT MODE SELECTOR   (MODE: rpc | in-process)

Prints one JSON line with the details of every test flag, then waits for a
line on stdin; after it, resolves the `static-string` flag until its value
changes (at most 15 s) and prints one more JSON line.
"""

import json
import sys
import time

from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext


def details_json(d):
    return {
        "value": d.value,
        "reason": str(d.reason.value if hasattr(d.reason, "value") else d.reason),
        "variant": d.variant,
        "error_code": None if d.error_code is None else str(d.error_code.value if hasattr(d.error_code, "value") else d.error_code),
    }


def main():
    host, port, mode, selector = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    resolver = ResolverType.RPC if mode == "rpc" else ResolverType.IN_PROCESS
    provider = FlagdProvider(host=host, port=port, resolver_type=resolver, selector=selector, deadline_ms=3000)
    api.set_provider(provider)
    client = api.get_client()
    ctx = EvaluationContext(targeting_key="user-1", attributes={"email": "ana@example.com"})
    # in-process mode evaluates once the first document has arrived (a
    # targeted flag: RPC mode caches only static results)
    deadline = time.time() + 15
    while time.time() < deadline:
        d = client.get_string_details("string-flag", "fallback", ctx)
        if d.error_code is None:
            break
        time.sleep(0.1)
    out = {
        "bool-flag": details_json(client.get_boolean_details("bool-flag", False, ctx)),
        "string-flag": details_json(client.get_string_details("string-flag", "fallback", ctx)),
        "string-flag-other": details_json(client.get_string_details("string-flag", "fallback", EvaluationContext(targeting_key="u2", attributes={"email": "bob@other.org"}))),
        "int-flag": details_json(client.get_integer_details("int-flag", 0, ctx)),
        "float-flag": details_json(client.get_float_details("float-flag", 0.0, ctx)),
        "object-flag": details_json(client.get_object_details("object-flag", {}, ctx)),
        "static-string": details_json(client.get_string_details("static-string", "fallback", ctx)),
        "missing": details_json(client.get_string_details("no-such-flag", "fallback", ctx)),
    }
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
    first = out["static-string"]["value"]
    value = first
    deadline = time.time() + 15
    while time.time() < deadline:
        value = client.get_string_details("static-string", "fallback", ctx).value
        if value != first:
            break
        time.sleep(0.1)
    print(json.dumps({"static-string": value}), flush=True)
    api.shutdown()


if __name__ == "__main__":
    main()
