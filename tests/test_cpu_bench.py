"""The CPU comparison (sparseforge bench): its FlexAttention masks are the same masks, its
Flex path compiles and agrees with the oracle, and a tiny run produces the table."""

import pytest
import torch

from sparseforge import cpu_bench
from sparseforge.oracle import dense_mask, reference_attention


def test_flex_mask_mods_equal_sparseforge_masks():
    for length in (1024, 4096):
        i = torch.arange(length)
        for name, pattern, mask_mod in cpu_bench.cases(length):
            ours = dense_mask(pattern, length, length).reshape(length, length)
            assert torch.equal(mask_mod(0, 0, i[:, None], i[None, :]), ours), name


@pytest.mark.slow  # FlexAttention's torch.compile alone takes ~20 s on the 2-core CI machine
def test_flex_forward_compiles_matches_and_keeps_the_thread_count():
    threads = torch.get_num_threads()
    _, pattern, mask_mod = cpu_bench.cases(256, window=32)[0]
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    ref = reference_attention(q, k, v, pattern)
    report, call = cpu_bench.flex_forward(q, k, v, mask_mod, 256, ref)
    assert report["flex_status"] == "ok", report
    assert report["flex_max_abs_error_vs_oracle"] < 1e-5
    assert (call(q, k, v).double() - ref).abs().max().item() < 1e-5
    assert torch.get_num_threads() == threads


def test_tiny_run_without_flex_makes_the_table(tmp_path):
    result = cpu_bench.run(length=256, repeats=1, with_flex=False, busy=False,
                           results_dir=str(tmp_path))
    assert (tmp_path / "cpu_attention.json").exists()
    assert [r["case"].split("(")[0] for r in result["cases"]] == [
        "sliding_window", "causal", "neighborhood", "documents"]
    for row in result["cases"]:
        assert row["max_abs_error_vs_oracle"] < 1e-5
        assert row["sparseforge_forward"]["median_ms"] > 0
    assert "sliding_window(256)" in cpu_bench.table(result)


def test_warm_dispatch_overhead_stays_in_microseconds():
    """The issue's budget is 20 us per warm call on the dev machine; the bound here is
    looser (CI shares its cores), but a per-call re-plan, re-compile or mask evaluation
    costs milliseconds and fails it."""
    from sparseforge.benchmarks import dispatch_overhead_spread_us
    loops = dispatch_overhead_spread_us(n=500, loops=5)
    assert min(loops) < 60, loops
