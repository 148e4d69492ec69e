"""bench / tune on a tiny random artifact: the report has every field and is self-consistent,
tune writes a manifest that matches its graphs. Timings are never asserted (benchmarks are
scripts: benchmarks/cpu_benchmarks.py, docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from tests.conftest import random_model
from tidar_export.bench import measure as bench
from tidar_export import cli
from tidar_export.bench import report, tune
from tidar_export.errors import TiDARError
from tidar_runtime.manifest import load_manifest

SMALL = ["--num-prompts", "2", "--prompt-len", "5", "--max-new-tokens", "6", "--repeats", "2", "--cost-iters", "3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tidar_export.model.checkpoint import save_checkpoint
    from tidar_export.export.artifact import export_artifact

    root = tmp_path_factory.mktemp("bench")
    ckpt = save_checkpoint(random_model(seed=3), root / "ckpt")
    art = export_artifact(ckpt, root / "art", block_size=3, max_seq_len=48)
    return ckpt, art


def test_bench_json_has_every_field(tiny, tmp_path):
    _, art = tiny
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    assert cli.main(["bench", str(art), "--json", str(out), "--markdown", str(md)] + SMALL) == 0
    r = json.loads(out.read_text())
    for key in ("artifact", "backend", "threads", "machine", "versions", "model", "block_size", "proposals",
                "step_width", "max_seq_len", "precision", "target", "prompts", "repeats", "ar", "tidar", "speedup",
                "tokens_per_forward", "equal_to_ar", "mismatched_prompts", "projected_speedup", "conversion_ratio",
                "step_cost", "peak_rss_mib", "wall_s"):
        assert key in r, key
    for mode in ("ar", "tidar"):
        for key in ("tokens_per_s", "e2e_tokens_per_s", "tokens_per_forward", "prefill_ms", "step_ms"):
            assert key in r[mode], (mode, key)
        assert r[mode]["tokens_per_s"]["n"] == 2 and r[mode]["tokens_per_s"]["median"] > 0
        assert set(r[mode]["step_ms"]) == {"p50", "p90", "p99"} and set(r[mode]["prefill_ms"]) == {"p50", "p99"}
    for key in ("median", "min", "p25", "p75", "max", "n", "per_repeat"):
        assert key in r["speedup"]
    assert r["speedup"]["min"] <= r["speedup"]["median"] <= r["speedup"]["max"]
    assert r["block_size"] == 3 and r["step_width"] == 12 and r["prompts"]["count"] == 2
    assert r["equal_to_ar"] is True and r["mismatched_prompts"] == []
    assert r["peak_rss_mib"] > 0
    # the histogram and T/NFE describe the same steps: every step emits 1..b tokens
    hist = {int(k): v for k, v in r["tidar"]["accepted_histogram"].items()}
    assert hist and all(1 <= k <= 3 for k in hist)
    assert r["tokens_per_forward"] == pytest.approx(sum(k * v for k, v in hist.items()) / sum(hist.values()), abs=1e-3)
    assert r["tidar"]["forwards_per_repeat"] == sum(hist.values())
    # 6 new tokens per prompt: the first from the prefill, then 5 from decode forwards
    assert sum(k * v for k, v in hist.items()) >= 2 * 5
    widths = {p["width"]: p for p in r["step_cost"]["points"]}
    assert set(widths) == {1, 12} and widths[1]["cost_ratio"] == 1.0
    assert r["projected_speedup"] == pytest.approx(
        r["tokens_per_forward"] * widths[1]["ms_p50"] / widths[12]["ms_p50"], rel=1e-3)
    assert r["conversion_ratio"] == pytest.approx(r["speedup"]["median"] / r["tokens_per_forward"], rel=1e-3)
    assert "| TiDAR |" in md.read_text() and "Step-cost curve" in md.read_text()


def test_prompts_file(tiny, tmp_path):
    _, art = tiny
    f = tmp_path / "p.jsonl"
    f.write_text('{"ids": [5, 6, 7]}\n\n[8, 9]\n')
    assert bench.load_prompts(f, None, 512) == [[5, 6, 7], [8, 9]]
    out = tmp_path / "b.json"
    assert cli.main(["bench", str(art), "--prompts", str(f), "--json", str(out)] + SMALL) == 0
    r = json.loads(out.read_text())
    assert r["prompts"]["source"] == "file" and r["prompts"]["count"] == 2 and r["equal_to_ar"]
    txt = tmp_path / "p.txt"
    txt.write_text("def f(x):\n")
    with pytest.raises(TiDARError, match="needs the artifact's tokenizer"):
        bench.load_prompts(txt, None, 512)
    f.write_text('{"ids": [5, 600]}\n')
    with pytest.raises(TiDARError, match="outside the vocabulary"):
        bench.load_prompts(f, None, 512)


def test_prompt_too_long_for_cache(tiny, capsys):
    _, art = tiny
    assert cli.main(["bench", str(art), "--prompt-len", "30", "--max-new-tokens", "20", "--num-prompts", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "exceeds the KV cache" in err and "\n" not in err


def test_plot_needs_matplotlib(tiny, tmp_path, monkeypatch, capsys):
    _, art = tiny
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert cli.main(["bench", str(art), "--plot", str(tmp_path / "x.png")] + SMALL) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --plot needs matplotlib: pip install 'tidar-export[plot]'"


def test_candidates_and_sparse_parsing():
    cands, skipped = tune.candidates([2, 4, 8], ["8:1,2,8"], max_seq_len=48, need=10)
    assert cands == [(2, (1, 2)), (4, (1, 2, 3, 4)), (8, (1, 2, 8))]
    assert [(s["block_size"], s["width"]) for s in skipped] == [(8, 72)]
    with pytest.raises(TiDARError, match="must contain block 1"):
        bench.parse_sparse(["16:4,7,10,16"])
    with pytest.raises(TiDARError, match="expected B:R"):
        bench.parse_sparse(["16"])


def test_tune_writes_a_consistent_manifest(tiny, tmp_path):
    from tidar_runtime import generate_ar, generate_tidar
    from tidar_runtime.backends.ort import OrtBackend

    ckpt, art = tiny
    target = tmp_path / "art"
    shutil.copytree(art, target)
    out = tmp_path / "tune.json"
    args = ["tune", str(target), "--checkpoint", str(ckpt), "--block-sizes", "2", "--sparse", "3:1,3",
            "--workdir", str(tmp_path / "work"), "--json", str(out)] + SMALL
    assert cli.main(args) == 0
    r = json.loads(out.read_text())
    tried = sorted((c["block_size"], tuple(c["proposals"])) for c in r["candidates"])
    assert tried == [(2, (1, 2)), (3, (1, 2, 3)), (3, (1, 3))]  # the artifact's own b=3 is always tried
    assert all(c["equal_to_ar"] for c in r["candidates"]) and r["written"]
    m = load_manifest(target)
    chosen = m.tuning["chosen"]
    assert (m.block_size, m.proposals) == (chosen["block_size"], chosen["proposals"])
    assert (chosen["block_size"], chosen["proposals"]) == (r["choice"]["block_size"], r["choice"]["proposals"])
    assert chosen["speedup"] == max(c["speedup"]["median"] for c in r["candidates"])
    assert chosen["mode"] == ("tidar" if chosen["speedup"] >= 1 else "ar")  # AR when no TiDAR setting wins
    assert m.max_seq_len == 48 and m.tuning["backend"] == "ort"
    # the graphs are the chosen ones: the artifact decodes with them, equal to AR
    be = OrtBackend(target)
    assert be.block_size == chosen["block_size"]
    assert generate_tidar(be, [5, 6, 7], 8).tokens == generate_ar(be, [5, 6, 7], 8).tokens
    assert not list(tmp_path.glob(".art.*"))  # no temp directory left beside the artifact


def test_manifest_without_tuning_still_loads(tiny, tmp_path):
    _, art = tiny
    target = tmp_path / "art"
    shutil.copytree(art, target)
    d = json.loads((target / "manifest.json").read_text())
    d.pop("tuning", None)
    (target / "manifest.json").write_text(json.dumps(d))
    assert load_manifest(target).tuning == {}


def test_tune_refuses_another_checkpoint(tiny, tmp_path):
    from tidar_export.model.checkpoint import save_checkpoint

    _, art = tiny
    other = save_checkpoint(random_model(seed=1, num_layers=1), tmp_path / "other")
    with pytest.raises(TiDARError, match="not the artifact's checkpoint"):
        tune.tune(art, other, block_sizes=[2], sparse=[], num_prompts=1, prompt_len=4, max_new=4, repeats=1)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    curve = [{"block_size": 1, "proposals": [], "width": 1, "ms_p50": 0.3},
             {"block_size": 2, "proposals": [1, 2], "width": 6, "ms_p50": 0.5},
             {"block_size": 4, "proposals": [1, 2], "width": 12, "ms_p50": 0.9}]
    s = bench.spread([10.0, 12.0])
    sweep = [{"block_size": 2, "proposals": [1, 2], "dense": True, "tidar_tokens_per_s": s, "ar_tokens_per_s": s},
             {"block_size": 4, "proposals": [1, 2], "dense": False, "tidar_tokens_per_s": s, "ar_tokens_per_s": s}]
    out = report.plot(tmp_path / "p.png", curve, sweep, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # written via a temp file, renamed


def test_bench_curve_with_variants(tiny, tmp_path):
    ckpt, art = tiny
    out = tmp_path / "curve.json"
    work = tmp_path / "work"
    args = ["bench", str(art), "--checkpoint", str(ckpt), "--curve-block-sizes", "2,7", "--sparse", "3:1,2,3",
            "--workdir", str(work), "--json", str(out)] + SMALL
    assert cli.main(args) == 0
    r = json.loads(out.read_text())
    points = {(p["block_size"], tuple(p["proposals"])): p for p in r["step_cost"]["points"]}
    assert set(points) == {(1, ()), (2, (1, 2)), (3, (1, 2, 3))}  # b=3 dense is the artifact's own step
    assert points[(2, (1, 2))]["width"] == 6 and points[(2, (1, 2))]["source"] == "variant step"
    assert [(s["block_size"], s["width"]) for s in r["step_cost"]["skipped"]] == [(7, 56)]  # 56 + 1 > 48
    assert [p["width"] for p in r["step_cost"]["points"]] == [1, 6, 12]  # sorted by width
    # the variant is kept in --workdir with its sidecar, and reused (not re-exported) next time
    sidecar = work / "b2-r1-2.json"
    mtime = (work / "b2-r1-2" / "manifest.json").stat().st_mtime_ns
    assert json.loads(sidecar.read_text())["options"]["max_seq_len"] == 48
    assert cli.main(args) == 0
    assert (work / "b2-r1-2" / "manifest.json").stat().st_mtime_ns == mtime
