"""Runs the flagd testbed's provider-level gherkin through the OpenFeature
Python flagd provider against a flagmesh PoP.

Usage: gherkin_provider.py HOST PORT MODE FEATURE_DIR FEATURES SKIP_TAGS
  MODE      rpc | in-process (scenarios tagged @rpc or @in-process run)
  FEATURES  comma-separated feature files (e.g. targeting.feature)
  SKIP_TAGS comma-separated tags whose scenarios are not run

The testbed names flag sources as flagd does (`flags/allFlags.json`,
`rawflags/selector-flags.json`); on the PoP they are flag sets, so a
`selector` option is mapped to the set of that name (the file name without
folder and extension; `allFlags` is the PoP's default set). Nothing else is
adapted. Prints one JSON line per scenario, then a summary line
{"passed": N, "failed": [...], "skipped": {tag: N}, "not_for_mode": N}
(scenarios not tagged with the mode are not run in it).
"""

import json
import re
import sys
import time
import traceback

from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import CacheType, ResolverType
from openfeature.evaluation_context import EvaluationContext


# --- a small gherkin reader: features, tags, background, outlines ----------

def cells(line):
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [p.strip().replace("\\|", "|").replace('\\"', '"') for p in parts]


def parse(path):
    feature_tags, background, scenarios = [], [], []
    pending_tags, current, examples = [], None, None
    in_background = False
    for raw in open(path, encoding="utf-8"):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            pending_tags += [t for t in line.split() if t.startswith("@")]
            continue
        if line.startswith("Feature:"):
            feature_tags, pending_tags = pending_tags, []
            continue
        if line.startswith("Background:"):
            in_background, current = True, None
            continue
        m = re.match(r"(Scenario Outline|Scenario Template|Scenario|Example):\s*(.*)", line)
        if m:
            in_background = False
            current = {"name": m.group(2), "tags": pending_tags, "steps": [], "examples": []}
            pending_tags, examples = [], None
            scenarios.append(current)
            continue
        if line.startswith("Examples:") or line.startswith("Scenarios:"):
            examples = {"tags": pending_tags, "rows": []}
            pending_tags = []
            current["examples"].append(examples)
            continue
        if line.startswith("|"):
            if examples is not None:
                examples["rows"].append(cells(line))
                continue
            steps = background if in_background else current["steps"]
            if steps[-1]["table"] is None:
                steps[-1]["table"] = []
            steps[-1]["table"].append(cells(line))
            continue
        m = re.match(r"(Given|When|Then|And|But)\s+(.*)", line)
        if m:
            step = {"text": m.group(2), "table": None}
            if in_background:
                background.append(step)
            else:
                current["steps"].append(step)
                examples = None
    out = []
    for sc in scenarios:
        if not sc["examples"]:
            out.append((sc["name"], feature_tags + sc["tags"], background + sc["steps"], {}))
            continue
        for ex in sc["examples"]:
            header, rows = ex["rows"][0], ex["rows"][1:]
            for row in rows:
                values = dict(zip(header, row))
                name = f'{sc["name"]} [{", ".join(row)}]'
                out.append((name, feature_tags + sc["tags"] + ex["tags"], background + sc["steps"], values))
    return out


def substitute(text, values):
    return re.sub(r"<([^>]+)>", lambda m: values.get(m.group(1), m.group(0)), text)


# --- the steps --------------------------------------------------------------

def typed(kind, value):
    if kind == "Boolean":
        return value == "true"
    if kind == "Integer":
        return int(value)
    if kind == "Float":
        return float(value)
    if kind == "Object":
        return json.loads(value) if value else {}
    return value


def set_name(selector):
    name = selector.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return "" if name == "allFlags" else name


class Run:
    providers = {}

    def __init__(self, host, port, mode):
        self.host, self.port, self.mode = host, port, mode
        self.options = {}
        self.flag = None
        self.targeting_key = None
        self.attributes = {}
        self.details = None

    def client(self):
        selector = set_name(self.options.get("selector", ""))
        domain = f"{self.mode}:{selector}"
        if domain not in Run.providers:
            provider = FlagdProvider(
                host=self.host,
                port=self.port,
                resolver_type=ResolverType.RPC if self.mode == "rpc" else ResolverType.IN_PROCESS,
                selector=selector or None,
                cache=CacheType.DISABLED,
                deadline_ms=3000,
            )
            api.set_provider(provider, domain)
            Run.providers[domain] = provider
            client = api.get_client(domain)
            # ready once a missing flag is reported missing (in-process
            # mode: once the first document has arrived)
            deadline = time.time() + 20
            while time.time() < deadline:
                d = client.get_boolean_details("__ready_probe__", False)
                if str(getattr(d.error_code, "value", d.error_code)) == "FLAG_NOT_FOUND":
                    break
                time.sleep(0.1)
        return api.get_client(domain)

    def step(self, text, table):
        m = re.fullmatch(r'an option "(.*)" of type "(.*)" with value "(.*)"', text)
        if m:
            self.options[m.group(1)] = m.group(3)
            return
        if re.fullmatch(r"a (stable|metadata) flagd provider", text):
            return
        m = re.fullmatch(r'an? (\w+)-flag with key "(.*)" and a default value "(.*)"', text)
        if m:
            self.flag = (m.group(1), m.group(2), typed(m.group(1), m.group(3)))
            return
        m = re.fullmatch(r'a context containing a key "(.*)", with type "(.*)" and with value "(.*)"', text)
        if m:
            self.attributes[m.group(1)] = typed(m.group(2), m.group(3))
            return
        m = re.fullmatch(r'a context containing a targeting key with value "(.*)"', text)
        if m:
            self.targeting_key = m.group(1)
            return
        m = re.fullmatch(r'a context containing a nested property with outer key "(.*)" and inner key "(.*)", with value "(.*)"', text)
        if m:
            self.attributes.setdefault(m.group(1), {})[m.group(2)] = m.group(3)
            return
        if text == "the flag was evaluated with details":
            kind, key, default = self.flag
            ctx = EvaluationContext(targeting_key=self.targeting_key, attributes=self.attributes)
            get = {
                "Boolean": "get_boolean_details",
                "String": "get_string_details",
                "Integer": "get_integer_details",
                "Float": "get_float_details",
                "Object": "get_object_details",
            }[kind]
            self.details = getattr(self.client(), get)(key, default, ctx)
            return
        m = re.fullmatch(r'the resolved details value should be "(.*)"', text)
        if m:
            expected = typed(self.flag[0], m.group(1))
            assert self.details.value == expected, f"value {self.details.value!r} != {expected!r} ({self.details})"
            return
        m = re.fullmatch(r'the reason should be "(.*)"', text)
        if m:
            got = str(getattr(self.details.reason, "value", self.details.reason))
            assert got == m.group(1), f"reason {got} != {m.group(1)} ({self.details})"
            return
        m = re.fullmatch(r'the error-code should be "(.*)"', text)
        if m:
            code = self.details.error_code
            got = "" if code is None else str(getattr(code, "value", code))
            assert got == m.group(1), f"error code {got!r} != {m.group(1)!r} ({self.details})"
            return
        m = re.fullmatch(r'the variant should be "(.*)"', text)
        if m:
            assert self.details.variant == m.group(1), f"variant {self.details.variant} ({self.details})"
            return
        if text == "the resolved metadata should contain":
            metadata = self.details.flag_metadata or {}
            for key, kind, value in table[1:]:
                assert metadata.get(key) == typed(kind, value), f"metadata {key}: {metadata}"
            return
        if text == "the resolved metadata is empty":
            assert not self.details.flag_metadata, f"metadata: {self.details.flag_metadata}"
            return
        raise NotImplementedError(f"no step for: {text}")


def main():
    host, port, mode, folder, features, skip = sys.argv[1:7]
    skip = {t for t in skip.split(",") if t}
    passed, failed, skipped, not_for_mode = 0, [], {}, 0
    for feature in features.split(","):
        for name, tags, steps, values in parse(f"{folder}/{feature}"):
            if f"@{mode}" not in tags:
                not_for_mode += 1
                continue
            if skip.intersection(tags):
                for tag in sorted(skip.intersection(tags)):
                    skipped[tag] = skipped.get(tag, 0) + 1
                continue
            run = Run(host, int(port), mode)
            try:
                for step in steps:
                    table = step["table"]
                    if table is not None:
                        table = [[substitute(c, values) for c in row] for row in table]
                    run.step(substitute(step["text"], values), table)
                passed += 1
                print(json.dumps({"feature": feature, "scenario": name, "ok": True}), flush=True)
            except Exception as e:  # a failed step ends the scenario
                detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc(limit=2)
                failed.append({"feature": feature, "scenario": name, "tags": tags, "error": detail})
                print(json.dumps(failed[-1]), flush=True)
    print(json.dumps({"passed": passed, "failed": failed, "skipped": skipped, "not_for_mode": not_for_mode}), flush=True)
    api.shutdown()


if __name__ == "__main__":
    main()
