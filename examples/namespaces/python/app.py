"""`namespaces`: per-namespace rules for Kubernetes objects, the Python edition.

The same policy is written in Rust (`../rust/src/lib.rs`) and JavaScript (`../js/policy.js`);
aq's conformance suite runs all three on `../fixtures` and requires identical answers, so the
three follow `../README.md` line by line.

A key `/registry/<resource>/<namespace>/<name>` (exactly four segments) belongs to
`<namespace>`; other keys belong to none.

Built with componentize-py against aq's WIT (`make` does it; see `../README.md`). The host
creates a fresh instance for every call and calls `init` first, so module state lives for one
call only.
"""

import json

from wit_world import exports
from componentize_py_types import Err
from wit_world.imports import host
from wit_world.imports.host import ReadError_Failed, ReadError_OutsideScope
from wit_world.imports.types import (
    Advice_Keep,
    Advice_Merge,
    Advice_Split,
    ApprovalRule,
    Annotation,
    ConfigError_Invalid,
    ConfigError_Malformed,
    Decision,
    LineageLevel,
    Op_Put,
    Verdict_Allow,
    Verdict_Deny,
    Verdict_RequireApproval,
    Voter,
)

# Field name -> (kind, default). Kinds: "names" (list of strings), "voters", "count" (a
# non-negative integer), "rate" (a number), "text".
FIELDS = {
    "max_value_bytes": ("count", None),
    "frozen": ("names", []),
    "guarded": ("names", []),
    "approvers": ("voters", []),
    "threshold": ("count", 1),
    "expiry_seconds": ("count", 3600),
    "admin_role": ("text", None),
    "max_keys_per_namespace": ("count", None),
    "split_write_rate": ("rate", None),
    "merge_write_rate": ("rate", None),
}

config = {}


def malformed(message):
    return Err(ConfigError_Malformed(message))


def invalid(message):
    return Err(ConfigError_Invalid(message))


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_field(name, kind, value):
    """The field's value, or raises Err naming the field."""
    if value is None:
        return FIELDS[name][1]
    if kind == "count" and is_count(value):
        return value
    if kind == "rate" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "text" and isinstance(value, str):
        return value
    if kind == "names" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if kind == "voters" and isinstance(value, list):
        voters = []
        for v in value:
            if not (isinstance(v, dict) and set(v) == {"principal", "weight"}
                    and isinstance(v["principal"], str) and is_count(v["weight"]) and v["weight"] < 2**32):
                raise malformed(f"field `{name}`: each approver is {{\"principal\": text, \"weight\": integer}}")
            voters.append(Voter(v["principal"], v["weight"]))
        return voters
    expected = {"count": "a non-negative integer", "rate": "a number", "text": "a string",
                "names": "a list of strings", "voters": "a list of approvers"}[kind]
    raise malformed(f"field `{name}`: expected {expected}")


def validate(c):
    for field in ("frozen", "guarded"):
        for name in c[field]:
            if name == "" or "/" in name:
                raise invalid(f"{field}: {json.dumps(name)} is not a namespace name; give names without '/'")
    total = sum(v.weight for v in c["approvers"])
    if c["guarded"] and not c["approvers"]:
        raise invalid("guarded: guarded namespaces need approvers; list them under approvers")
    threshold = c["threshold"]
    if threshold == 0 or (c["approvers"] and threshold > total):
        raise invalid(f"threshold: {threshold} cannot be met by the approvers' weights, which add up to {total}; give 1 to {total}")
    split, merge = c["split_write_rate"], c["merge_write_rate"]
    if split is not None and merge is not None and merge >= split:
        raise invalid("merge_write_rate: must be below split_write_rate, or a scope would split and merge back in turn")


def obj(key):
    """(resource, namespace) of a key, or None."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    parts = text.split("/")
    if len(parts) == 5 and parts[0] == "" and parts[1] == "registry":
        return parts[2], parts[3]
    return None


def shown(key):
    return key.decode("utf-8", errors="replace")


def decision(verdict, lineage, annotations=()):
    return Decision(verdict, lineage, [Annotation(k, v) for k, v in annotations])


def read_problem(key, error):
    if isinstance(error, ReadError_OutsideScope):
        why = "the key is outside the scope"
    elif isinstance(error, ReadError_Failed):
        why = f"a read failed: {error.value}"
    else:
        why = "reads are unavailable here"
    return f"{shown(key)}: cannot check max_keys_per_namespace ({why}); retry later"


def check_room(key, resource, namespace, maximum):
    """None when a put of `key` leaves its namespace within `maximum`, else the reason."""
    prefix = f"/registry/{resource}/{namespace}/".encode()
    try:
        held = host.count(prefix)
        if held < maximum or host.read(key) is not None:
            return None
    except Err as e:
        return read_problem(key, e.value)
    return (f"{shown(key)}: namespace {namespace} already holds {held} {resource}, "
            f"the most max_keys_per_namespace = {maximum} allows; delete one first")


class Policy(exports.Policy):
    def init(self, text):
        global config
        if text.strip() == "":
            text = "{}"
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise malformed(f"not JSON: {e}")
        if not isinstance(raw, dict):
            raise malformed("expected a JSON object")
        for name in raw:
            if name not in FIELDS:
                raise malformed(f"unknown field `{name}`, expected one of {', '.join(FIELDS)}")
        parsed = {name: parse_field(name, kind, raw.get(name)) for name, (kind, _) in FIELDS.items()}
        validate(parsed)
        config = parsed

    def evaluate(self, ctx):
        namespaces = []
        for op in ctx.ops:
            key = op.value.key
            found = obj(key)
            if found is not None:
                namespace = found[1]
                if namespace in config["frozen"]:
                    host.log(host.LogLevel.DEBUG, f"namespaces: {shown(key)} is in a frozen namespace")
                    return decision(Verdict_Deny(
                        f"{shown(key)}: namespace {namespace} is frozen; "
                        "writes to it are refused until an operator unfreezes it"), LineageLevel.NONE)
                if namespace not in namespaces:
                    namespaces.append(namespace)
            if isinstance(op, Op_Put):
                put = op.value
                maximum = config["max_value_bytes"]
                if maximum is not None and not put.ignore_value and len(put.value) > maximum:
                    return decision(Verdict_Deny(
                        f"{shown(key)}: the value is {len(put.value)} bytes, over max_value_bytes = {maximum}; store less"),
                        LineageLevel.NONE)
            elif len(op.value.range_end) > 0:
                return decision(Verdict_Deny(
                    f"{shown(key)}: deleting a range is refused in this scope; delete keys one at a time"),
                    LineageLevel.NONE)

        role = config["admin_role"]
        if role is not None:
            for credential in ctx.credentials:
                if role in credential.roles:
                    return decision(Verdict_Allow(), LineageLevel.FULL, [("admin", credential.principal)])

        maximum = config["max_keys_per_namespace"]
        if maximum is not None:
            for op in ctx.ops:
                if not isinstance(op, Op_Put):
                    continue
                found = obj(op.value.key)
                if found is None:
                    continue
                reason = check_room(op.value.key, found[0], found[1], maximum)
                if reason is not None:
                    return decision(Verdict_Deny(reason), LineageLevel.NONE)

        for namespace in namespaces:
            if namespace in config["guarded"]:
                rule = ApprovalRule(config["approvers"], config["threshold"], config["expiry_seconds"])
                return decision(Verdict_RequireApproval(rule), LineageLevel.FULL, [("namespace", namespace)])

        annotations = [("namespaces", ",".join(namespaces))] if namespaces else []
        return decision(Verdict_Allow(), LineageLevel.DIGEST, annotations)

    def advise(self, stats):
        split, merge = config["split_write_rate"], config["merge_write_rate"]
        if split is not None and stats.write_rate >= split and stats.split_candidates:
            return Advice_Split(stats.split_candidates[0])
        if merge is not None and stats.write_rate < merge:
            return Advice_Merge()
        return Advice_Keep()
