"""Write tests/data/numpy_vectors.json: what numpy and tidar_runtime.sampling compute, for the C++
unit tests (tests/test_rng_sampling.cpp) to reproduce. Run from the repository root:
    python cpp/tests/make_vectors.py
Doubles are stored as float.hex() strings (exact)."""

import hashlib
import json
from pathlib import Path

import numpy as np

from tidar_runtime.sampling import SamplingParams, probs, sample

OUT = Path(__file__).parent / "data" / "numpy_vectors.json"


def main() -> None:
    streams = []
    for seed, row in [(0, 0), (3, 1), (7, 0), (2**32, 5), (2**64 - 1, 2), (123456789, 4095)]:
        rng = np.random.default_rng([seed, row])
        streams.append({"seed": str(seed), "row": row, "random": [float(x).hex() for x in rng.random(8)]})
    cases = []
    gen = np.random.default_rng(0)
    for vocab, t, k, p in [(7, 1.0, 0, 1.0), (50, 0.7, 5, 1.0), (300, 1.3, 0, 0.9), (1000, 0.9, 40, 0.95),
                           (64, 2.0, 3, 0.5)]:
        logits = (gen.standard_normal(vocab) * 3).astype(np.float32)
        params = SamplingParams(temperature=t, top_k=k, top_p=p, seed=11)
        dist = probs(logits, params)
        rng = np.random.default_rng([11, 0])
        draws = [sample(dist, rng) for _ in range(5)]
        nz = np.flatnonzero(dist)
        cases.append({"temperature": t, "top_k": k, "top_p": p, "logits": [float(x).hex() for x in logits],
                      "nonzero": nz.tolist(), "probs": [float(dist[i]).hex() for i in nz], "samples": draws})
    sums = []
    for n in (1, 7, 8, 9, 127, 128, 129, 1000, 2100):
        a = gen.random(n) ** 8
        sums.append({"values": [float(x).hex() for x in a], "sum": float(np.sum(a)).hex()})
    blake = [{"data": d, "hex": hashlib.blake2b(d.encode(), digest_size=16).hexdigest()}
             for d in ("", "abc", "x" * 127, "y" * 128, "z" * 129, "w" * 1000)]
    OUT.write_text(json.dumps({"streams": streams, "probs": cases, "sums": sums, "blake2b": blake}) + "\n")


if __name__ == "__main__":
    main()
