"""conadv-pack IMAGE_FOLDER OUT_DIR: pack train/ and val/ into shards (data.name=shards)."""

from __future__ import annotations

import argparse
from pathlib import Path

from conadv.cli.common import positive, run_cli
from conadv.config import DEFAULT_MAX_PIXELS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="conadv-pack", description=__doc__)
    parser.add_argument("root", type=Path, help="image folder with train/ and val/")
    parser.add_argument("out", type=Path, help="where to write the shards and their indexes")
    parser.add_argument("--shard-mb", type=positive("MB"), default=1024,
                        help="about this many MB a shard")
    parser.add_argument("--val-labels", help="labels file of a flat val/ folder "
                        "(as data.val_labels)")
    parser.add_argument("--max-pixels", type=positive("pixels"), default=DEFAULT_MAX_PIXELS,
                        help="largest image (width x height) packed, as data.max_pixels; a "
                             "larger one is unreadable (default %(default)s)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave out images that do not decode (listed in the index) "
                             "instead of stopping")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> int:
        from conadv.data.shards import pack_image_folder
        from conadv.telemetry import setup_logging

        setup_logging(True)
        packed = pack_image_folder(args.root, args.out, args.shard_mb << 20, args.val_labels,
                                   args.skip_unreadable, args.max_pixels)
        for split, index in packed.items():
            left_out = (f"; {len(index['skipped'])} unreadable left out (listed in "
                        f"{split}.index.json)" if index["skipped"] else "")
            print(f"{split}: {len(index['samples'])} images in {len(index['shards'])} shards "
                  f"under {args.out}{left_out}")
        return 0

    run_cli("conadv-pack", body)


if __name__ == "__main__":
    main()
