"""Start-up of an image-folder dataset: the file index of a synthetic tree of many small files,
built by walking the tree (first run) against read from conadv's cache (later runs) and the
index of the same samples as packed shards, with torchvision's ImageFolder walk for reference.
In a job, rank 0 alone reads a folder's index and sends it to the other ranks.

    python -m benchmarks.index_startup --files 200000 --classes 1000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_json


def make_tree(root: Path, files: int, classes: int) -> None:
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(files // classes):
            (folder / f"img_{i:06d}.JPEG").write_bytes(b"\xff\xd8")


def run(files: int, classes: int) -> dict[str, Any]:
    from torchvision.datasets.folder import find_classes, make_dataset

    from conadv.data import sources
    from conadv.data.shards import ShardSource, index_path

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        started = time.perf_counter()
        make_tree(root, files, classes)
        made_s = time.perf_counter() - started
        previous = os.environ.get("CONADV_CACHE_DIR")
        os.environ["CONADV_CACHE_DIR"] = str(Path(tmp) / "cache")
        timings = {}
        try:
            for name in ("first_run_walk_s", "cached_s"):
                started = time.perf_counter()
                found = sources.folder_index(root)
                timings[name] = time.perf_counter() - started
        finally:
            if previous is None:
                del os.environ["CONADV_CACHE_DIR"]
            else:
                os.environ["CONADV_CACHE_DIR"] = previous
        # packed shards: their index is one JSON file of the same samples
        (Path(tmp) / "shards").mkdir()
        index_path(Path(tmp) / "shards", "train").write_text(json.dumps({
            "format": 1, "split": "train", "classes": found[0],
            "shards": [{"name": "train-00000.tar",
                        "bytes": 512 * max(len(files_) for files_ in found[1]), "sha256": ""}],
            "samples": [[0, 512 * i, 100, c] for c, files_ in enumerate(found[1])
                        for i in range(len(files_))]}))
        started = time.perf_counter()
        shards = ShardSource(Path(tmp) / "shards", "train")
        timings["shards_index_s"] = time.perf_counter() - started
        assert len(shards) == sum(len(f) for f in found[1])
        started = time.perf_counter()
        _, class_to_idx = find_classes(str(root))
        torchvision_count = len(make_dataset(str(root), class_to_idx, extensions=(".jpeg",)))
        timings["torchvision_imagefolder_s"] = time.perf_counter() - started
    count = sum(len(f) for f in found[1])
    assert count == torchvision_count == (files // classes) * classes
    return {"machine": machine_info(), "files": count, "classes": classes,
            "tree_written_s": made_s, **timings}


def print_report(report: dict[str, Any]) -> None:
    print(f"file index of {report['files']:,} files in {report['classes']} classes:")
    print(f"  conadv, first run (walk + write the cache) {report['first_run_walk_s']:7.2f} s")
    print(f"  conadv, cached                            {report['cached_s']:7.2f} s")
    print(f"  conadv, packed shards (their index)       {report['shards_index_s']:7.2f} s")
    print(f"  torchvision ImageFolder (walk, after ours: warm metadata) "
          f"{report['torchvision_imagefolder_s']:7.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--out")
    args = parser.parse_args()
    report = run(args.files, args.classes)
    print_report(report)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
