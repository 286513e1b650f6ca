"""Benchmark of the lens arithmetic: one 576-patch image, N = 32,000 tokens, d = 4096, 5 layers,
on the CPU (the issue's target: seconds). Also checks the ids against a float64 full-matrix argmax
on the first 64 patches and reports the peak extra memory of the chunked scoring.

    .venv/bin/python scripts/bench_lens.py [--chunk 256] [--threads N]
"""
import argparse
import time

import torch

from nemo_basic.analysis.nearest import TokenTable, valid_rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--patches", type=int, default=576)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    E = torch.randn(a.vocab + 64, a.hidden, generator=g)     # + 64 Megatron-style padding rows
    hs = [torch.randn(a.patches, a.hidden, generator=g) for _ in range(a.layers)]
    t0 = time.perf_counter()
    table = TokenTable(E, valid_rows(E.shape[0], a.vocab), chunk=a.chunk)
    t_table = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = [table.topk(h, 5) for h in hs]
    t_lens = time.perf_counter() - t0
    h = hs[0][:64].double()
    ref = ((h @ E[:a.vocab].double().T) / E[:a.vocab].double().norm(dim=-1)).argmax(-1)
    ok = torch.equal(results[0][0][:64, 0], ref)
    block = a.chunk * E.shape[0] * 4 / 2**20
    print(f"lens: {a.patches} patches x {a.layers} layers, N={a.vocab} (+64 padding rows), d={a.hidden}, "
          f"{torch.get_num_threads()} threads: {t_lens:.2f} s ({t_table:.2f} s to prepare the table); "
          f"score block {a.chunk} x {E.shape[0]} = {block:.0f} MiB; ids equal the float64 argmax: {ok}")


if __name__ == "__main__":
    main()
