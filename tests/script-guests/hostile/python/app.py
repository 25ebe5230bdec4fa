"""A hostile guest: `evaluate` loops forever ("spin") or allocates without end ("grow"),
as its configuration says."""

from wit_world import exports
from wit_world.imports.types import Decision, LineageLevel, Verdict_Allow, Advice_Keep

mode = ""


class Policy(exports.Policy):
    def init(self, config):
        global mode
        mode = config.strip().strip('"')

    def evaluate(self, ctx):
        if mode == "spin":
            n = 0
            while True:
                n += 1
        if mode == "grow":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        return Decision(Verdict_Allow(), LineageLevel.NONE, [])

    def advise(self, stats):
        return Advice_Keep()
