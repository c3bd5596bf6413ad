"""The template variants: one plan per branch of the kernel templates.

Each entry exercises a distinct path through the templates (segment count and
sorting, hull schedule, dilation groups, document ids, score modifiers, padded head
dims, each dtype and head-dim class with its tile config). The test suite compiles all of them, each kernel
kind (forward, backward dQ, backward dK/dV, decode), to cubin for sm_80 and sm_90; run
``python -m sparseforge.runtime.variants`` to do the same by hand.
Cross-compilation must run in a process where Triton's interpreter is off.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from ..codegen.render import KINDS, routed_kernels
from ..ir import nodes as ir
from ..ir import routing, scores
from ..ir.affine import affine, top_left
from ..ir.neighborhood import NeighborhoodPart, neighborhood
from ..planner.plan import Plan, plan
from .compile import build_binary

L = 4096


def variant_specs() -> dict[str, tuple]:
    """name -> (pattern, head_dim, dtype, plan overrides)."""
    ids = torch.zeros(L, dtype=torch.long)
    shapes = {
        "one_segment": (ir.causal(), 128, "bfloat16", {}),
        "sorted_segments": (ir.sliding_window(512) | ir.sinks(4), 128, "bfloat16",
                            {"schedule": "segments"}),
        "hull_schedule": (ir.sliding_window(512) | ir.sinks(4), 64, "float16",
                          {"schedule": "hull"}),
        "three_segments": (ir.global_queries(16) | ir.window(64, 64) | ir.sinks(8), 64, "bfloat16",
                           {"schedule": "segments"}),
        "dilation_groups": (ir.window(64, 64, dilation=4), 64, "bfloat16", {"groups": 4}),
        # two id tensors (packed documents beside a shared prompt): the kernels' id loops
        "documents": ((ir.documents(ids) & ir.causal()) | ir.documents(ids, kv_ids=ids), 64,
                      "bfloat16", {}),
        "chunks": (ir.chunks(1000) & ir.causal(), 64, "float16", {}),
        # FlexAttention masks: queries aligned to the first key (Lq < Lkv), a non-unit
        # half-plane (kv <= 2 q) beside strict causal, and a bool mask table (a
        # speculative-decoding tree): the table's word loads
        "flex_top_left": (top_left(affine(2, -1, 0) & (affine(1, -1, -1) | ir.sinks(4)))
                          | ir.mask_table(torch.zeros(L // 2, L, dtype=torch.bool)), 64,
                          "bfloat16", {"q_len": L // 2}),
        # a table every pair must satisfy (a tree mask beside causal): the segments are
        # clamped to the tiles of the table's true pairs
        "table_conjunct": (ir.causal() & ir.mask_table(torch.zeros(L, L, dtype=torch.bool)), 128,
                           "bfloat16", {}),
        # packed documents every pair must satisfy, beside causal: the causal segments
        # clamped per tile to the documents' tiles and full tiles (the common Flex mask)
        "documents_conjunct": (ir.documents(ids) & ir.causal(), 64, "bfloat16", {}),
        # v's head dim apart from q/k's: DeepSeek's MLA (192 / 128), and a padded one (96
        # in 128 columns) beside q/k's 64, moved by TMA on sm_90
        "mla": (ir.causal(), 192, "bfloat16", {"value_dim": 128}),
        "value_dim_padded": (ir.sliding_window(512) | ir.sinks(4), 64, "float16",
                             {"value_dim": 96}),
    }
    for d in (16, 64, 80, 128, 256):
        shapes[f"bf16_d{d}"] = (ir.sliding_window(1024), d, "bfloat16", {})
    for d in (32, 96, 256):
        shapes[f"fp32_d{d}"] = (ir.sliding_window(1024), d, "float32", {})
    shapes["fp16_d48"] = (ir.sliding_window(1024), 48, "float16", {})
    # score modifiers: every one at once at the smallest and largest register budgets,
    # and the rel_bias gradient on dilation groups (strided offsets)
    heads = 8
    table = torch.zeros(heads, 2 * 64 + 1)
    every = scores.alibi(torch.ones(heads)) & scores.rel_bias(table) & scores.softcap(30.0)
    shapes["scores_d64"] = (ir.sliding_window(1024) & every, 64, "bfloat16", {})
    shapes["scores_d128"] = (ir.sliding_window(1024) & every, 128, "float16", {})
    shapes["scores_d256"] = (ir.sliding_window(1024) & every, 256, "bfloat16", {})
    shapes["scores_fp32"] = (ir.causal() & every, 64, "float32", {})
    # a table too wide for register accumulators (radius 2048): its gradient is summed in
    # the program's row of the buffer
    # a bias per pair (Graphormer): a [BM, BN] load beside the scores, and dQ's store of dS
    # (with a wide rel_bias table too, dK/dV stacked 64 bytes on sm_80: kept apart)
    pair = scores.pair_bias(torch.zeros(1, 1, 1, 1).expand(1, heads, L, L))
    shapes["scores_pair_bias"] = (ir.sliding_window(1024) & pair & scores.softcap(30.0), 128,
                                  "float16", {})
    # a rel_bias table too wide for register accumulators (radius 2048): its gradient is
    # summed in the dK/dV program's row of the buffer
    shapes["scores_rel_bias_wide"] = (ir.causal() & scores.rel_bias(torch.zeros(heads, 4097)),
                                      128, "bfloat16", {})
    shapes["scores_dilated"] = (ir.window(64, 64, dilation=4) & scores.rel_bias(table), 64,
                                "float16", {"groups": 4})
    # N-D neighbourhoods: the tiled layout (2-D dilated, with sinks and a causal axis; 3-D
    # video-style, causal in time, walked as a segment family) and original token order
    shapes["na3d_tiled"] = (neighborhood((4, 32, 32), (3, 7, 7), dilation=(1, 2, 1),
                                         causal=(True, False, False)), 64, "bfloat16",
                            {"tiled": True})
    shapes["na2d_tiled"] = (neighborhood((64, 64), 7, dilation=(2, 1), causal=(False, True))
                            | ir.sinks(4), 64, "bfloat16", {"tiled": True})
    shapes["na2d_original"] = (neighborhood((64, 64), (5, 9), stride=(1, 3)), 64, "bfloat16",
                               {"tiled": False})
    # a part of a grid (context parallelism: a rank's query run against a key run, both
    # offset into the whole grid): the grid's rule at the offsets, in original order, and
    # ALiBi with the part's integer offset to j - p; or a window-offset table read at the
    # part's positions moved onto the grid
    part = NeighborhoodPart(neighborhood((128, 64), 7), L // 2, L // 2)
    shapes["na2d_part"] = (part & scores.Alibi(torch.ones(heads), -L // 2), 64, "bfloat16",
                           {"q_len": L // 2})
    shapes["na2d_part_rel_bias"] = (part & scores.rel_bias(torch.zeros(heads, 13, 13)), 64,
                                    "bfloat16", {"q_len": L // 2})
    # window-offset rel_bias (Swin / MaxViT / NATTEN rpb) on a dilated 2-D neighbourhood:
    # inside the table's windows (one difference per pair), and clipped per dimension
    # beside sinks and every other modifier
    na = neighborhood((64, 64), 7, dilation=(1, 2))
    window_table = scores.rel_bias(torch.zeros(heads, 13, 13))
    shapes["na2d_rel_bias"] = (na & window_table, 64, "bfloat16", {"tiled": False})
    shapes["na2d_tiled_rel_bias"] = (na & window_table, 64, "bfloat16", {"tiled": True})
    # 3-D with a window table: the tiled layout's scored tiles (tiles.tiled_forward_config)
    shapes["na3d_tiled_rel_bias"] = (shapes["na3d_tiled"][0]
                                     & scores.rel_bias(torch.zeros(heads, 5, 13, 13)), 64,
                                     "bfloat16", {"tiled": True})
    shapes["na2d_rel_bias_clipped"] = ((na | ir.sinks(4)) & window_table & scores.softcap(20.0)
                                       & scores.alibi(torch.ones(heads)), 64, "bfloat16",
                                       {"tiled": False})
    # routed kernels (static segments + selected tiles): static part empty, beside one and
    # three segments, chunks with score modifiers; the bucket rules with their backward
    shapes["routed_topk"] = (ir.causal() & routing.topk_blocks(128, 4), 128, "bfloat16", {})
    shapes["routed_moba"] = ((ir.causal() & routing.topk_blocks(512, 3, query_block=1))
                             | (ir.causal() & ir.chunks(512)), 128, "bfloat16", {})
    shapes["routed_threshold"] = ((ir.causal() & routing.threshold_blocks(64, 0.9))
                                  | ir.sliding_window(256) | ir.sinks(4), 64, "float16",
                                  {"schedule": "segments"})
    cuts = torch.tensor([0, 100, 900, 1500, 3000, L])
    shapes["routed_chunks_scores"] = (ir.causal() & routing.topk_chunks(cuts, 2, share="all")
                                      & scores.alibi(torch.ones(heads)) & scores.softcap(30.0),
                                      64, "bfloat16", {})
    shapes["routed_topk_keys"] = ((ir.causal() & routing.topk_keys(torch.zeros(heads, L), 512))
                                  | ir.sliding_window(128), 128, "bfloat16", {})
    shapes["routed_clusters"] = (ir.causal() & routing.clusters(torch.zeros(heads, 16, 128))
                                 & scores.softcap(30.0), 128, "bfloat16", {})
    shapes["routed_vertical_slash"] = ((ir.causal() & routing.vertical_slash(1000, 2000))
                                       | (ir.causal() & ir.sinks(64)), 128, "bfloat16", {})
    # a part of a routed sequence (context parallelism: 2048 queries at 6144 against keys
    # at 3072 of 8192, ``distributed.parts.part_pattern`` of causal & top-k | a window):
    # half-planes beside the selection the whole sequence made
    shapes["routed_part"] = ((affine(1, -1, 1024) & routing.topk_blocks(64, 4))
                             | (affine(-1, 1, -897) & affine(1, -1, 1024)), 64, "bfloat16",
                             {"q_len": L // 2})
    return shapes


#: the routed variants whose backward and decode kernels are in the set: one segment
#: (MoBA), score modifiers on chunks, DMA's key bias, lines and sorted clusters span the
#: routed branches of the dQ, dK/dV and decode templates (the static part empty and three
#: segments differ only
#: in the segment-skip test; they compiled clean too when this set was chosen, and their
#: forwards stay in it)
ROUTED_TRAINING = ("routed_moba", "routed_chunks_scores", "routed_topk_keys", "routed_clusters",
                   "routed_vertical_slash", "routed_part")


def variant_kinds(name: str) -> tuple[str, ...]:
    """The kernel kinds a variant has: routed plans have a forward kernel, and those in
    ``ROUTED_TRAINING`` their backward (dQ, dK/dV) and split-KV decode kernels where the
    rule has them."""
    if not name.startswith("routed_"):
        return tuple(KINDS)
    pattern = variant_specs()[name][0]
    return tuple(kind for kind in KINDS
                 if kind == "forward" or (name in ROUTED_TRAINING and routed_kernels(pattern, kind)))


def variant_plan(name: str, target: str = "sm_90") -> Plan:
    p, d, dt, kw = variant_specs()[name]
    kw = dict(kw)
    return plan(p, q_len=kw.pop("q_len", L), kv_len=L, head_dim=d, dtype=dt, target=target,
                **kw)


def template_variants(target: str = "sm_90") -> dict[str, Plan]:
    return {name: variant_plan(name, target) for name in variant_specs()}


def _compile_one(job: tuple[str, str]) -> dict:
    torch.set_num_threads(1)
    name, arch, kind = job
    p = variant_plan(name, arch)
    return [{"variant": name, "template": kind, **build_binary(p, index, arch, kind).info.to_dict()}
            for index in range(len(p.kernels))]


def compile_all(archs=("sm_80", "sm_90"), workers: int = 2, kinds=KINDS,
                names=None) -> list[dict]:
    """Compile the variants (``names``: a subset) for ``archs``; one info dict per kernel."""
    specs = variant_specs()
    unknown = set(names or ()) - set(specs)
    if unknown:
        raise ValueError(f"names: unknown variants {sorted(unknown)}")
    jobs = [(name, arch, kind) for name in (names or specs) for arch in archs for kind in kinds
            if kind in variant_kinds(name)]
    # spawn, not fork: a forked child of a process that ran torch ops can deadlock in
    # torch's thread pool
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [info for infos in pool.map(_compile_one, jobs) for info in infos]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_80,sm_90")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: cross-compilation needs the compiler", file=sys.stderr)
        return 2
    names = args.variants.split(",") if args.variants else None
    results = compile_all(tuple(args.arch.split(",")), args.workers, tuple(args.kinds.split(",")),
                          names)
    json.dump(results, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
