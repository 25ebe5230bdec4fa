// A hostile guest: `evaluate` loops forever ("spin") or allocates without end ("grow"), as its
// configuration says.

let mode = '';

export const policy = {
  init(config) {
    mode = config.trim().replace(/^"|"$/g, '');
  },
  evaluate(ctx) {
    if (mode === 'spin') {
      let n = 0;
      for (;;) n += 1;
    }
    if (mode === 'grow') {
      const hoard = [];
      for (;;) hoard.push(new Uint8Array(1 << 20).fill(1));
    }
    return { verdict: { tag: 'allow' }, lineage: 'none', annotations: [] };
  },
  advise(stats) {
    return { tag: 'keep' };
  },
};
