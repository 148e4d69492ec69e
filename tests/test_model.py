"""The reference model's two cache layouts agree: in-place scatter and [cache | new] concat."""

import torch

from tidar_export.model import masks


def test_concat_and_scatter_agree(tiny_model):
    cfg = tiny_model.cfg
    b, S = 3, 48
    torch.manual_seed(1)
    keys, values = tiny_model.new_cache(2, S)
    # fill a committed prefix of different lengths per row through the scatter path
    prompt = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        _, keys, values = tiny_model(prompt, torch.arange(10).expand(2, -1), masks.causal_mask(10),
                                     keys, values, torch.zeros(2, dtype=torch.long))
        L = torch.tensor([10, 7])  # row 1 committed only 7 of its 10 written tokens
        in_step = masks.step_mask(b)
        ids = torch.randint(0, cfg.vocab_size, (2, in_step.shape[0]))
        pos = L[:, None] + masks.step_offsets(b)
        lg_s, k_s, v_s = tiny_model(ids, pos, in_step, keys, values, L, kv_update="inplace")
        lg_c, k_c, v_c = tiny_model(ids, pos, in_step, keys, values, L, kv_update="slice")
    torch.testing.assert_close(lg_c, lg_s, rtol=1e-5, atol=1e-5)
    q = in_step.shape[0]
    for row, n in enumerate(L.tolist()):
        torch.testing.assert_close(k_c[0][row], k_s[0][row, :, n : n + q])
        torch.testing.assert_close(v_c[-1][row], v_s[-1][row, :, n : n + q])
        assert k_c[0].shape[2] == q
