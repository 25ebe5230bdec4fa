// `namespaces`: per-namespace rules for Kubernetes objects, the JavaScript edition.
//
// The same policy is written in Rust (`../rust/src/lib.rs`) and Python (`../python/app.py`);
// aq's conformance suite runs all three on `../fixtures` and requires identical answers, so the
// three follow `../README.md` line by line.
//
// A key `/registry/<resource>/<namespace>/<name>` (exactly four segments) belongs to
// `<namespace>`; other keys belong to none.
//
// Built with componentize-js against aq's WIT (`make` does it; see `../README.md`). WIT types
// map to JavaScript as jco maps them: records are objects with camelCase fields, variants are
// `{ tag, val }`, `list<u8>` is a Uint8Array, 64-bit integers are BigInts, and an exported
// function's `result` error is whatever it throws.

import { log, read, count } from 'aq:governance/host@0.1.1';

// Field name -> [kind, default]. Kinds: names (list of strings), voters, count (a non-negative
// integer), rate (a number), text.
const FIELDS = {
  max_value_bytes: ['count', null],
  frozen: ['names', []],
  guarded: ['names', []],
  approvers: ['voters', []],
  threshold: ['count', 1],
  expiry_seconds: ['count', 3600],
  admin_role: ['text', null],
  max_keys_per_namespace: ['count', null],
  split_write_rate: ['rate', null],
  merge_write_rate: ['rate', null],
};

const EXPECTED = {
  count: 'a non-negative integer',
  rate: 'a number',
  text: 'a string',
  names: 'a list of strings',
  voters: 'a list of approvers',
};

let config = null;

const malformed = (message) => ({ tag: 'malformed', val: message });
const invalid = (message) => ({ tag: 'invalid', val: message });
const isCount = (value) => Number.isInteger(value) && value >= 0;
const decoder = new TextDecoder();
const shown = (key) => decoder.decode(key);

function parseField(name, kind, value) {
  if (value === undefined || value === null) return FIELDS[name][1];
  if (kind === 'count' && isCount(value)) return value;
  if (kind === 'rate' && typeof value === 'number') return value;
  if (kind === 'text' && typeof value === 'string') return value;
  if (kind === 'names' && Array.isArray(value) && value.every((v) => typeof v === 'string')) return value;
  if (kind === 'voters' && Array.isArray(value)) {
    return value.map((v) => {
      const ok = v !== null && typeof v === 'object' && !Array.isArray(v)
        && Object.keys(v).sort().join(',') === 'principal,weight'
        && typeof v.principal === 'string' && isCount(v.weight) && v.weight < 2 ** 32;
      if (!ok) throw malformed(`field \`${name}\`: each approver is {"principal": text, "weight": integer}`);
      return { principal: v.principal, weight: v.weight };
    });
  }
  throw malformed(`field \`${name}\`: expected ${EXPECTED[kind]}`);
}

function validate(c) {
  for (const field of ['frozen', 'guarded']) {
    for (const name of c[field]) {
      if (name === '' || name.includes('/')) {
        throw invalid(`${field}: ${JSON.stringify(name)} is not a namespace name; give names without '/'`);
      }
    }
  }
  const total = c.approvers.reduce((sum, v) => sum + v.weight, 0);
  if (c.guarded.length > 0 && c.approvers.length === 0) {
    throw invalid('guarded: guarded namespaces need approvers; list them under approvers');
  }
  if (c.threshold === 0 || (c.approvers.length > 0 && c.threshold > total)) {
    throw invalid(`threshold: ${c.threshold} cannot be met by the approvers' weights, which add up to ${total}; give 1 to ${total}`);
  }
  if (c.split_write_rate !== null && c.merge_write_rate !== null && c.merge_write_rate >= c.split_write_rate) {
    throw invalid('merge_write_rate: must be below split_write_rate, or a scope would split and merge back in turn');
  }
}

// [resource, namespace] of a key, or null.
function object(key) {
  let text;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(key);
  } catch {
    return null;
  }
  const parts = text.split('/');
  if (parts.length === 5 && parts[0] === '' && parts[1] === 'registry') return [parts[2], parts[3]];
  return null;
}

function decision(verdict, lineage, annotations = []) {
  return { verdict, lineage, annotations: annotations.map(([key, value]) => ({ key, value })) };
}

const deny = (reason) => decision({ tag: 'deny', val: reason }, 'none');

function readProblem(key, error) {
  let why = 'reads are unavailable here';
  if (error && error.tag === 'outside-scope') why = 'the key is outside the scope';
  if (error && error.tag === 'failed') why = `a read failed: ${error.val}`;
  return `${shown(key)}: cannot check max_keys_per_namespace (${why}); retry later`;
}

// null when a put of `key` leaves its namespace within `maximum`, else the reason.
function checkRoom(key, resource, namespace, maximum) {
  const prefix = new TextEncoder().encode(`/registry/${resource}/${namespace}/`);
  let held;
  try {
    held = count(prefix);
    if (held < BigInt(maximum) || read(key) != null) return null;
  } catch (e) {
    return readProblem(key, e && e.payload);
  }
  return `${shown(key)}: namespace ${namespace} already holds ${held} ${resource}, `
    + `the most max_keys_per_namespace = ${maximum} allows; delete one first`;
}

export const policy = {
  init(text) {
    if (text.trim() === '') text = '{}';
    let raw;
    try {
      raw = JSON.parse(text);
    } catch (e) {
      throw malformed(`not JSON: ${e.message}`);
    }
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) throw malformed('expected a JSON object');
    for (const name of Object.keys(raw)) {
      if (!(name in FIELDS)) throw malformed(`unknown field \`${name}\`, expected one of ${Object.keys(FIELDS).join(', ')}`);
    }
    const parsed = {};
    for (const [name, [kind]] of Object.entries(FIELDS)) parsed[name] = parseField(name, kind, raw[name]);
    validate(parsed);
    config = parsed;
  },

  evaluate(ctx) {
    const namespaces = [];
    for (const op of ctx.ops) {
      const key = op.val.key;
      const found = object(key);
      if (found !== null) {
        const namespace = found[1];
        if (config.frozen.includes(namespace)) {
          log('debug', `namespaces: ${shown(key)} is in a frozen namespace`);
          return deny(`${shown(key)}: namespace ${namespace} is frozen; writes to it are refused until an operator unfreezes it`);
        }
        if (!namespaces.includes(namespace)) namespaces.push(namespace);
      }
      if (op.tag === 'put') {
        const put = op.val;
        const maximum = config.max_value_bytes;
        if (maximum !== null && !put.ignoreValue && put.value.length > maximum) {
          return deny(`${shown(key)}: the value is ${put.value.length} bytes, over max_value_bytes = ${maximum}; store less`);
        }
      } else if (op.val.rangeEnd.length > 0) {
        return deny(`${shown(key)}: deleting a range is refused in this scope; delete keys one at a time`);
      }
    }

    const role = config.admin_role;
    if (role !== null) {
      const admin = ctx.credentials.find((c) => c.roles.includes(role));
      if (admin) return decision({ tag: 'allow' }, 'full', [['admin', admin.principal]]);
    }

    const maximum = config.max_keys_per_namespace;
    if (maximum !== null) {
      for (const op of ctx.ops) {
        if (op.tag !== 'put') continue;
        const found = object(op.val.key);
        if (found === null) continue;
        const reason = checkRoom(op.val.key, found[0], found[1], maximum);
        if (reason !== null) return deny(reason);
      }
    }

    const guarded = namespaces.find((n) => config.guarded.includes(n));
    if (guarded !== undefined) {
      const rule = { voters: config.approvers, threshold: config.threshold, expirySeconds: BigInt(config.expiry_seconds) };
      return decision({ tag: 'require-approval', val: rule }, 'full', [['namespace', guarded]]);
    }

    return decision({ tag: 'allow' }, 'digest', namespaces.length > 0 ? [['namespaces', namespaces.join(',')]] : []);
  },

  advise(stats) {
    const split = config.split_write_rate;
    const merge = config.merge_write_rate;
    if (split !== null && stats.writeRate >= split && stats.splitCandidates.length > 0) {
      return { tag: 'split', val: stats.splitCandidates[0] };
    }
    if (merge !== null && stats.writeRate < merge) return { tag: 'merge' };
    return { tag: 'keep' };
  },
};
