"""``sharpflow claims --compare A B``: do two results trees (two machines, two sets of seeds) reach the
same verdicts, and do their intervals agree?

It reads each tree's ``tables/claims.csv`` (or the CSV files themselves) and, claim by claim, says
whether the verdicts are equal and whether the intervals of the statistics overlap. The intervals
are read back from the *measured* column, where :meth:`~.intervals.Estimate.text` wrote each as
``value [low, high] (n units)``, in the order of the claim's tests: two trees of the same config
list the same tests in the same order. Where the counts differ (a study added, a run missing), the
claim says so instead of pairing them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import SharpflowError

#: an interval as Estimate.text writes it: value [low, high] (n units)
INTERVAL = re.compile(r"(\S+) \[(\S+), (\S+)\] \((\d+) ([^)]+)\)")


@dataclass(frozen=True)
class Comparison:
    number: int
    claim: str
    verdict_a: str
    verdict_b: str
    overlapping: int  # pairs of intervals that overlap
    pairs: int  # pairs compared (0 where the tests differ in number)
    note: str

    @property
    def verdicts_agree(self) -> bool:
        return self.verdict_a == self.verdict_b

    @property
    def intervals_agree(self) -> bool:
        return self.pairs > 0 and self.overlapping == self.pairs


def _csv(path: Path) -> pd.DataFrame:
    """The claims CSV of a results root, a tables folder or the file itself, indexed by claim number."""
    path = Path(path)
    for candidate in (path, path / "tables" / "claims.csv", path / "claims.csv"):
        if candidate.is_file():
            try:
                df = pd.read_csv(candidate)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
                raise SharpflowError(f"{candidate}: not a readable claims table ({err})") from None
            missing = {"number", "claim", "verdict", "measured"} - set(df.columns)
            if missing:
                raise SharpflowError(f"{candidate}: not a claims table (no column {', '.join(sorted(missing))})")
            return df.set_index("number")
    raise SharpflowError(f"{path}: no claims table there (looked for {path}/tables/claims.csv; run the workflow "
                         "or `sharpflow claims --config` first)")


def intervals(measured: str) -> list[tuple[float, float]]:
    """The (low, high) of every interval in a *measured* cell, in order."""
    out = []
    for m in INTERVAL.finditer(str(measured)):
        try:
            out.append((float(m.group(2)), float(m.group(3))))
        except ValueError:
            continue
    return out


def compare(a: Path, b: Path) -> list[Comparison]:
    """One :class:`Comparison` per claim in either table, in claim order."""
    ta, tb = _csv(a), _csv(b)
    out = []
    for number in sorted(set(ta.index) | set(tb.index)):
        if number not in ta.index or number not in tb.index:
            which = "A" if number not in ta.index else "B"
            row = ta.loc[number] if number in ta.index else tb.loc[number]
            out.append(Comparison(int(number), str(row["claim"]), str(ta["verdict"].get(number, "–")),
                                  str(tb["verdict"].get(number, "–")), 0, 0, f"not in {which}"))
            continue
        ia, ib = intervals(ta.loc[number, "measured"]), intervals(tb.loc[number, "measured"])
        if len(ia) != len(ib):
            note, pairs, hits = f"different tests: {len(ia)} intervals in A, {len(ib)} in B", 0, 0
        else:
            pairs = len(ia)
            hits = sum(1 for (la, ha), (lb, hb) in zip(ia, ib, strict=True)
                       if math.isfinite(la + ha + lb + hb) and la <= hb and lb <= ha)
            note = "" if pairs else "no intervals"
        out.append(Comparison(int(number), str(ta.loc[number, "claim"]), str(ta.loc[number, "verdict"]),
                              str(tb.loc[number, "verdict"]), hits, pairs, note))
    return out


def report(rows: list[Comparison], a: Path, b: Path) -> str:
    """A Markdown table of the comparison and a one-line summary."""
    lines = [f"A: {a}", f"B: {b}", "",
             "| # | claim | verdict A | verdict B | verdicts | intervals overlapping | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.number} | {r.claim} | {r.verdict_a} | {r.verdict_b} | "
                     f"{'agree' if r.verdicts_agree else 'DIFFER'} | "
                     f"{f'{r.overlapping} of {r.pairs}' if r.pairs else '–'} | {r.note} |")
    same = sum(r.verdicts_agree for r in rows)
    overlap = sum(r.intervals_agree for r in rows)
    lines += ["", f"{same} of {len(rows)} verdicts agree; {overlap} of {len(rows)} claims have every interval "
                  "overlapping its counterpart."]
    return "\n".join(lines) + "\n"


__all__ = ["INTERVAL", "Comparison", "compare", "intervals", "report"]
