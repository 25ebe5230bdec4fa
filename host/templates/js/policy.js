// {{name}}: an aq policy in JavaScript. Denies writes under the key prefixes listed in the
// binding's configuration (`{"read_only": [...]}`) and keeps digest lineage of the rest.
//
// aq calls `init` with the configuration in every fresh instance, then `evaluate` (a write) or
// `advise` (the scope's statistics). The types come from aq's WIT (`wit/governance.wit`) as
// jco maps them: records are objects with camelCase fields, variants are `{ tag, val }`,
// `list<u8>` is a Uint8Array, 64-bit integers are BigInts, and a `result` error is thrown.

let readOnly = [];
const decoder = new TextDecoder();
const encoder = new TextEncoder();

function startsWith(key, prefix) {
  return key.length >= prefix.length && prefix.every((byte, i) => key[i] === byte);
}

export const policy = {
  init(config) {
    let parsed;
    try {
      parsed = JSON.parse(config.trim() === '' ? '{}' : config);
    } catch (e) {
      throw { tag: 'malformed', val: `not JSON: ${e.message}` };
    }
    const prefixes = parsed !== null && typeof parsed === 'object' ? (parsed.read_only ?? []) : null;
    if (!Array.isArray(prefixes) || !prefixes.every((p) => typeof p === 'string')) {
      throw { tag: 'malformed', val: 'read_only: expected a list of key prefixes' };
    }
    if (prefixes.includes('')) {
      throw { tag: 'invalid', val: 'read_only: an empty prefix would make every key read-only; remove it' };
    }
    readOnly = prefixes.map((p) => [p, encoder.encode(p)]);
  },

  evaluate(ctx) {
    for (const op of ctx.ops) {
      const key = op.val.key;
      for (const [text, prefix] of readOnly) {
        if (startsWith(key, prefix)) {
          const reason = `${decoder.decode(key)} is under the read-only prefix ${text}; change it through its owner instead`;
          return { verdict: { tag: 'deny', val: reason }, lineage: 'none', annotations: [] };
        }
      }
    }
    return { verdict: { tag: 'allow' }, lineage: 'digest', annotations: [] };
  },

  advise(stats) {
    return { tag: 'keep' };
  },
};
