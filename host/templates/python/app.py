"""{{name}}: an aq policy in Python. Denies writes under the key prefixes listed in the
binding's configuration (`{"read_only": [...]}`) and keeps digest lineage of the rest.

aq calls `init` with the configuration in every fresh instance, then `evaluate` (a write) or
`advise` (the scope's statistics). The types come from aq's WIT (`wit/governance.wit`) as
componentize-py maps them: records are dataclasses, variants are classes named
`<Variant>_<Case>`, `list<u8>` is `bytes`, and a `result` error is raised as `Err(...)`.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import (
    Advice_Keep,
    ConfigError_Invalid,
    ConfigError_Malformed,
    Decision,
    LineageLevel,
    Verdict_Allow,
    Verdict_Deny,
)

read_only = []


class Policy(exports.Policy):
    def init(self, config):
        global read_only
        try:
            parsed = json.loads(config or "{}")
        except ValueError as e:
            raise Err(ConfigError_Malformed(f"not JSON: {e}"))
        prefixes = parsed.get("read_only", []) if isinstance(parsed, dict) else None
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise Err(ConfigError_Malformed("read_only: expected a list of key prefixes"))
        if "" in prefixes:
            raise Err(ConfigError_Invalid("read_only: an empty prefix would make every key read-only; remove it"))
        read_only = [p.encode() for p in prefixes]

    def evaluate(self, ctx):
        for op in ctx.ops:
            key = op.value.key
            for prefix in read_only:
                if key.startswith(prefix):
                    reason = (f"{key.decode('utf-8', 'replace')} is under the read-only prefix "
                              f"{prefix.decode()}; change it through its owner instead")
                    return Decision(Verdict_Deny(reason), LineageLevel.NONE, [])
        return Decision(Verdict_Allow(), LineageLevel.DIGEST, [])

    def advise(self, stats):
        return Advice_Keep()
