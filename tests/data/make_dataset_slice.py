"""Cut ``tests/data/datasets`` (a small slice of SMD and ASD) from the published data sets.

The tests and ``osad up --demo`` read this slice, so a clone of the repository needs nothing beside it;
bigger evaluations and the benchmarks read the full sets (``../shared/datasets``, ``--datasets`` /
``OSAD_DATASETS``). Both sets are MIT-licensed by their publishers; each folder keeps their LICENSE.

What is kept, per entity (``SLICE`` below):

* ``train``: the last ``train`` rows, extended back to the nearest earlier row whose number in the
  published file is a multiple of the featurizer's gap (10). A window ends where ``(seq + 1) % 10 == 0``,
  ``seq`` counting from the file's first row, so the kept rows fall on the same window grid as in the full
  file: ``osad evaluate --limit-train N`` (N <= ``train``) and ``osad agreement`` give the same numbers on
  the slice as on the full set.
* ``test`` and ``test_label``: the first ``test`` rows (a cut never splits a labelled anomaly; checked).
* ``interpretation_label``: the lines of the anomalies that start within the kept test rows (unchanged).

Lines are copied byte for byte, so the files keep the published format and ``osad.core.datasets`` reads
them unchanged. The output is the same on every run (no randomness, no timestamps)::

    .venv/bin/python tests/data/make_dataset_slice.py                    # from ../shared/datasets
    .venv/bin/python tests/data/make_dataset_slice.py --source DIR       # from another copy
    .venv/bin/python tests/data/make_dataset_slice.py --check            # compare with the files in git

This file is not a test (pytest collects ``test_*.py`` only).
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile
import textwrap

from osad.core.metrics import segments

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "datasets"
SOURCE = HERE.parent.parent.parent / "shared" / "datasets"
GAP = 10  # the featurizer's default gap (osad.core.signature.DEFAULT_GAP): the window grid

# data set -> entity -> (last train rows at least, first test rows); who needs them:
SLICE = {
    "SMD": {
        # osad agreement --limit-train 5000 --limit-test 6000 (tests/test_agreement.py); osad up --demo
        # (its last 750 train rows, test rows 116.. with the labelled anomaly at 246..251); the featurizer
        # tests (2100 and 3000 test rows)
        "machine-1-6": (5000, 6000),
        # the replica tests replay every entity (at most 400 test rows)
        "machine-2-1": (500, 400),
        "machine-3-3": (500, 400),
    },
    "ASD": {
        # the detector service test (260 test rows, osad train on the train rows), the replica tests; its first
        # labelled anomaly is at test rows 760..765
        "omi-1": (1000, 800),
        # tests/test_evaluate.py: --limit-train 900 --limit-test 800 (3 labelled anomalies)
        "omi-2": (900, 800),
        # the replica tests (400 test rows); their first labelled anomalies end before row 900
        "omi-3": (500, 900),
        "omi-4": (500, 900),
    },
}

# where the published sets come from (as ../shared/datasets/README.md says)
ORIGIN = {
    "SMD": "Server Machine Dataset, published with OmniAnomaly (Su et al., KDD 2019; "
           "github.com/NetManAIOps/OmniAnomaly): server metrics of a large internet company, 38 features scaled "
           "to [0,1], one row a minute. The values here are those of the float32 arrays published with "
           "InterFusion (github.com/zhhlee/InterFusion), printed with 6 significant digits; the labels are "
           "OmniAnomaly's, byte for byte",
    "ASD": "Application Server Dataset, published with InterFusion (Li et al., KDD 2021; "
           "github.com/zhhlee/InterFusion): service metrics, 19 features scaled to [0,1], one row every 5 "
           "minutes, converted from its float32 arrays (6 significant digits)",
}


def lines_of(path: pathlib.Path) -> list[bytes]:
    """The file's lines, each with its line end as published (the last may have none)."""
    return path.read_bytes().splitlines(keepends=True)


def label_runs(label_lines: list[bytes]) -> list[tuple[int, int]]:
    """Runs of rows labelled 1: (first, last), inclusive."""
    return segments([float(line) for line in label_lines])


def cut_entity(src: pathlib.Path, dst: pathlib.Path, name: str, n_train: int, n_test: int) -> dict:
    """Write one entity's four files; returns what was kept (for the README)."""
    train = lines_of(src / "train" / f"{name}.txt")
    test = lines_of(src / "test" / f"{name}.txt")
    label = lines_of(src / "test_label" / f"{name}.txt")
    interp = lines_of(src / "interpretation_label" / f"{name}.txt")
    if len(label) != len(test):
        raise SystemExit(f"{src}/test_label/{name}.txt: {len(label)} labels for {len(test)} test rows")
    if n_train > len(train) or n_test > len(test):
        raise SystemExit(f"{src}: {name} has {len(train)} train and {len(test)} test rows; the slice wants "
                         f"{n_train} and {n_test}")
    first_train = (len(train) - n_train) // GAP * GAP
    for a, b in label_runs(label):
        if a < n_test <= b:
            raise SystemExit(f"{name}: the cut after test row {n_test - 1} splits the labelled anomaly {a}..{b}")
    kept_interp = []
    for line in interp:
        span = line.split(b":")[0].split(b"-")
        a, b = int(span[0]), int(span[1])
        if a < n_test <= b:
            raise SystemExit(f"{name}: the cut after test row {n_test - 1} splits interpretation line {line!r}")
        if a < n_test:
            kept_interp.append(line)
    files = {"train": train[first_train:], "test": test[:n_test], "test_label": label[:n_test],
             "interpretation_label": kept_interp}
    for split, rows in files.items():
        (dst / split).mkdir(parents=True, exist_ok=True)
        (dst / split / f"{name}.txt").write_bytes(b"".join(rows))
    return {"name": name, "train_total": len(train), "train_from": first_train, "test_total": len(test),
            "test_to": n_test, "anomalies": len(label_runs(label[:n_test])),
            "interp": f"{len(kept_interp)} of {len(interp)}"}


def readme(dataset: str, kept: list[dict]) -> str:
    rows = "\n".join(
        f"| {k['name']} | {k['train_from']}..{k['train_total'] - 1} ({k['train_total'] - k['train_from']} of "
        f"{k['train_total']}) | 0..{k['test_to'] - 1} ({k['test_to']} of {k['test_total']}) | {k['anomalies']} | "
        f"{k['interp']} |" for k in kept)
    origin = textwrap.fill(f"A few rows of {ORIGIN[dataset]}. MIT License: LICENSE is the publisher's, copied "
                           "unchanged.", 104)
    return f"""# {dataset}: a slice for the tests and the demo

{origin}

Cut from the copy in `../shared/datasets/{dataset}` by `tests/data/make_dataset_slice.py`, which says
who needs which rows. Lines are copied byte for byte, in the published layout
(`{{train,test,test_label,interpretation_label}}/<entity>.txt`).

| entity | train rows kept (0-based, inclusive) | test and test_label rows kept | labelled anomalies kept | interpretation_label lines kept |
| --- | --- | --- | --- | --- |
{rows}

Train: the last rows, starting at a row whose number in the published file is a multiple of 10 (the
featurizer's window grid, so windows end on the same rows as in the full file). Test: the first rows;
no cut splits a labelled anomaly. interpretation_label: the lines of the anomalies that start in the
kept test rows. Row numbers of the slice start again at 0.

Regenerate (the output is the same every time): `.venv/bin/python tests/data/make_dataset_slice.py`;
`--check` compares with the files here. For bigger evaluations use the full set
(`osad evaluate ../shared/datasets/{dataset}`, tests: `OSAD_DATASETS=../shared/datasets`).
"""


def make(source: pathlib.Path, out: pathlib.Path) -> None:
    for dataset, entities in SLICE.items():
        src, dst = source / dataset, out / dataset
        if not (src / "train").is_dir():
            raise SystemExit(f"{src}: no such data set folder (give the published sets with --source DIR)")
        if dst.exists():
            shutil.rmtree(dst)
        kept = [cut_entity(src, dst, name, *rows) for name, rows in entities.items()]
        shutil.copyfile(src / "LICENSE", dst / "LICENSE")
        (dst / "README.md").write_text(readme(dataset, kept))


def same_tree(a: pathlib.Path, b: pathlib.Path) -> list[str]:
    """Paths (relative) that differ between two folders."""
    fa = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    diff = sorted(str(p) for p in fa ^ fb)
    diff += sorted(str(p) for p in fa & fb if not filecmp.cmp(a / p, b / p, shallow=False))
    return diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=pathlib.Path, default=SOURCE, help=f"published data sets (default {SOURCE})")
    ap.add_argument("--out", type=pathlib.Path, default=OUT, help=f"where to write the slice (default {OUT})")
    ap.add_argument("--check", action="store_true", help="write to a temporary folder and compare with --out")
    a = ap.parse_args()
    if not a.check:
        make(a.source, a.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        make(a.source, pathlib.Path(tmp))
        diff = same_tree(pathlib.Path(tmp), a.out)
    if diff:
        print("differ from a fresh cut: " + ", ".join(diff), file=sys.stderr)
        return 1
    print(f"{a.out}: the same as a fresh cut from {a.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
