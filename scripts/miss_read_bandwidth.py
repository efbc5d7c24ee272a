"""A layer's misses read through the pager's reader against a plain sequential read of
the same bytes from the same file, cold (pages dropped), interleaved and repeated.

    python scripts/miss_read_bandwidth.py CHECKPOINT [--reader pread] [--rounds 9]

Each round: the top-k-sized group of one layer's experts (random, distinct) through
``Reader.read`` (its pool of threads), then as many bytes read sequentially from the
file's start with ``os.preadv`` into one buffer. Prints MB/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from mlx_pager.paging.loader import inspect_model
from mlx_pager.storage.readers import drop_page_cache, make_reader


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--reader", default="pread")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    layout = inspect_model(args.checkpoint, 4096)
    expert_map = layout.expert_map
    rng = np.random.default_rng(0)
    reader = make_reader(args.reader, expert_map.files(), drop_cache=False)
    paged, plain = [], []
    try:
        for _ in range(args.rounds):
            layer = int(rng.integers(len(expert_map.layer_paths)))
            experts = rng.choice(expert_map.num_experts, layout.top_k, replace=False)
            pieces = [
                pc for e in experts for pc in expert_map.expert_pieces(layer, int(e)).values()
            ]
            nbytes = sum(pc.nbytes for pc in pieces)
            file = pieces[0].path
            reader.drop()
            start = time.perf_counter()
            reader.read(pieces)
            paged.append(nbytes / (time.perf_counter() - start))
            fd = os.open(file, os.O_RDONLY)
            try:
                drop_page_cache(fd)
                buffer = bytearray(nbytes)
                start = time.perf_counter()
                done = 0
                while done < nbytes:
                    done += os.preadv(fd, [memoryview(buffer)[done:]], done)
                plain.append(nbytes / (time.perf_counter() - start))
                drop_page_cache(fd)
            finally:
                os.close(fd)
    finally:
        reader.close()
    expert_mb = expert_map.expert_disk_bytes() / 1e6
    ratio = statistics.median(p / q for p, q in zip(paged, plain, strict=True))
    print(
        f"experts of {expert_mb:.2f} MB, {layout.top_k} a layer, {args.rounds} rounds: "
        f"{args.reader} misses {statistics.median(paged) / 1e6:.0f} MB/s, sequential "
        f"{statistics.median(plain) / 1e6:.0f} MB/s, ratio {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
