"""The mask rules of docs/ALGORITHM.md written out entry by entry, independent of tidar_export.model.masks."""


def train_mask_entry(q: int, k: int, S: int, b: int) -> bool:
    """May row q of the 2S training layout [x_0..x_{S-1} | M x S] attend to column k?"""
    if q < S and k < S:
        return k <= q  # clean -> clean: causal
    if q < S:
        return False  # clean -> mask: never
    if k < S:
        return k < b * ((q - S) // b)  # mask -> clean prefix before its own block
    return (k - S) // b == (q - S) // b  # mask -> mask: own block only, bidirectional
