"""The planner against fake GPUs (1, 2, 4, 8, mixed sizes), foreign processes, reserves, TP groups, CPU mode."""

from __future__ import annotations

import random
import stat
from pathlib import Path
from typing import Any

import pytest

from router.config import Model, parse
from router.gpu import MIG_UNSUPPORTED, FakeInventory, GiB, GpuUnavailable, HostMemory
from router.placement import (
    CPU_RUNTIME_BYTES,
    GPU_RUNTIME_BYTES,
    ModelFacts,
    Placement,
    Plan,
    bind_spec,
    cpu_models,
    evictable,
    format_plan,
    gib,
    is_lasting,
    pick_cores,
    plan,
    supports_kv_cache_memory_bytes,
    usage,
)


def models(*entries: dict[str, Any]) -> list[Model]:
    """Validated models, as serve would have them (names get ":latest")."""
    return parse({"models": [{"source": "org/" + e["name"].split(":")[0], **e} for e in entries]}).models


def one(name: str, **kw: Any) -> Model:
    return models({"name": name, **kw})[0]


def check_invariants(p: Plan) -> None:
    """No GPU is over-committed by what the plan placed, and the rows add up."""
    for r in p.devices:
        assert r.free_after >= 0, (r, format_plan(p))
        placed = [x for x in p.placements.values() if (r.index in x.gpus) or (r.index is None and x.device == "cpu")]
        assert r.budgeted == sum(x.budget_on(r.index) if r.index is not None else x.budget_bytes for x in placed)


def summary(p: Plan) -> dict[str, Any]:
    return {
        "placed": {n: (x.gpus, x.budget_bytes, x.vllm_args, x.env) for n, x in p.placements.items()},
        "refused": p.refused,
    }


# --- one GPU -----------------------------------------------------------------------


def test_one_gpu_fits_and_is_enforced() -> None:
    p = plan(models({"name": "a", "vram_gb": 20}), FakeInventory([80]))
    assert p.ok and p.mode == "gpu"
    a = p.placements["a:latest"]
    assert a.gpus == [0] and a.budget_bytes == 20 * GiB
    assert a.env == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert a.vllm_args == ["--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.25"]
    assert p.devices[0].free_after == 60 * GiB
    check_invariants(p)


def test_utilization_is_rounded_down_so_vllm_never_exceeds_the_budget() -> None:
    p = plan(models({"name": "a", "vram_gb": 10}), FakeInventory([79.1]))
    util = float(p.placements["a:latest"].vllm_args[-1])
    assert util * 79.1 <= 10 and util == 0.1264  # 10 / 79.1 = 0.126422…


def test_vram_fraction_is_passed_through() -> None:
    p = plan(models({"name": "a", "vram_fraction": 0.5}), FakeInventory([48]))
    a = p.placements["a:latest"]
    assert a.budget_bytes == 24 * GiB and a.vllm_args[-2:] == ["--gpu-memory-utilization", "0.5"]


def test_over_commit_on_one_gpu_refuses_only_the_model_that_does_not_fit() -> None:
    ms = models({"name": "big", "vram_gb": 50, "gpus": [0]}, {"name": "small", "vram_gb": 40, "gpus": [0]})
    p = plan(ms, FakeInventory([80]))
    assert list(p.placements) == ["big:latest"]
    (msg,) = p.refused["small:latest"]
    assert msg == (
        "small:latest: does not fit on GPU 0: budget 40 GiB, only 30 GiB left "
        "(80 total − 50 budgeted for big:latest)"
    )
    assert p.problems == [msg] and not p.ok
    check_invariants(p)


def test_reserve_and_driver_reserved_memory_reduce_capacity() -> None:
    inv = FakeInventory([24], reserved_gib=0.5)
    assert plan(models({"name": "a", "vram_gb": 19.5}), inv, reserve_gb=4).ok
    p = plan(models({"name": "a", "vram_gb": 19.6}), inv, reserve_gb=4)
    assert p.refused["a:latest"] == [
        "a:latest: no room: no GPU has 19.6 GiB free (GPU 0: 19.5 GiB left = 24 total − 0.5 driver − 4 reserve)"
    ]
    p = plan(models({"name": "a", "vram_gb": 19.6, "gpus": [0]}), inv, reserve_gb=4)
    assert p.refused["a:latest"] == [
        "a:latest: does not fit on GPU 0: budget 19.6 GiB, only 19.5 GiB left (24 total − 0.5 driver − 4 reserve)"
    ]
    row = p.devices[0]
    assert (row.total, row.driver_reserved, row.reserve, row.foreign) == (24 * GiB, GiB // 2, 4 * GiB, 0)


def test_foreign_processes_are_subtracted() -> None:
    inv = FakeInventory([80], processes=[(999, 0, 70.0)])
    p = plan(models({"name": "a", "vram_gb": 20}), inv)
    assert p.refused["a:latest"] == [
        "a:latest: no room: no GPU has 20 GiB free (GPU 0: 10 GiB left = 80 total − 70 used by other processes)"
    ]
    p = plan(models({"name": "a", "vram_gb": 20, "gpus": [0]}), inv)
    assert "70 used by other processes" in p.refused["a:latest"][0]
    assert plan(models({"name": "a", "vram_gb": 10}), inv).ok


def test_memory_not_attributed_to_any_process_counts_as_foreign() -> None:
    inv = FakeInventory([24], unattributed_gib={0: 20})
    assert not plan(models({"name": "a", "vram_gb": 8}), inv).ok


# --- the minimum: weights + KV + runtime -----------------------------------------------


def test_budget_too_small_for_the_weights_gives_the_numbers() -> None:
    # 34.4 GiB of weights at TP=2 → 17.2 per GPU, + 2 GiB runtime = 19.2 GiB; KV unknown.
    ms = models({"name": "qwen:32b", "vram_gb": 16, "tensor_parallel": 2, "gpus": "auto"})
    facts = {"qwen:32b": ModelFacts(weights_bytes=int(34.4 * GiB))}
    p = plan(ms, FakeInventory([24, 24]), facts=facts)
    (msg,) = p.refused["qwen:32b"]
    assert msg.startswith("qwen:32b needs ≥ 19.2 GiB per GPU for weights at TP=2, budget is 16 GiB")
    assert msg.endswith("(weights 17.2 GiB + KV cache unknown + runtime 2 GiB)")
    assert p.placements == {}


def test_minimum_includes_kv_for_max_model_len() -> None:
    # Llama-3.1-8B-like: 15 GiB weights, 128 KiB per token at TP=1.
    facts = {"llama:8b": ModelFacts(weights_bytes=15 * GiB, kv_bytes_per_token=128 * 1024)}
    ok = models({"name": "llama:8b", "vram_gb": 21, "max_model_len": 32768})  # 15 + 4 + 2
    assert plan(ok, FakeInventory([24]), facts=facts).ok
    bad = models({"name": "llama:8b", "vram_gb": 20, "max_model_len": 32768})
    (msg,) = plan(bad, FakeInventory([24]), facts=facts).refused["llama:8b"]
    assert msg == (
        "llama:8b needs ≥ 21 GiB per GPU for weights at TP=1, budget is 20 GiB "
        "(weights 15 GiB + KV cache 4 GiB for max_model_len 32768 + runtime 2 GiB)"
    )


def test_unset_max_model_len_means_the_models_full_context() -> None:
    facts = {"m:latest": ModelFacts(weights_bytes=15 * GiB, kv_bytes_per_token=128 * 1024, max_context=131072)}
    (msg,) = plan(models({"name": "m", "vram_gb": 30}), FakeInventory([80]), facts=facts).refused["m:latest"]
    assert "KV cache 16 GiB for max_model_len 131072" in msg


def test_kv_per_token_from_config_divides_kv_heads_by_tp() -> None:
    config = {
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "hidden_size": 4096, "torch_dtype": "bfloat16", "max_position_embeddings": 8192,
    }  # fmt: skip
    f = ModelFacts(weights_bytes=16 * GiB, config=config)
    assert f.kv_per_token(1) == 128 * 1024 and f.kv_per_token(2) == 64 * 1024 and f.kv_per_token(16) == 16 * 1024
    p = plan(models({"name": "m", "vram_gb": 13, "tensor_parallel": 2}), FakeInventory([16, 16]), facts={"m:latest": f})
    assert p.placements["m:latest"].need_bytes == 8 * GiB + 512 * 1024 * 1024 + GPU_RUNTIME_BYTES


def test_facts_may_be_a_callable() -> None:
    seen: list[str] = []

    def facts(m: Model) -> ModelFacts | None:
        seen.append(m.name)
        return ModelFacts(weights_bytes=30 * GiB) if m.name == "a:latest" else None

    p = plan(models({"name": "a", "vram_gb": 20}, {"name": "b", "vram_gb": 20}), FakeInventory([80]), facts=facts)
    assert list(p.refused) == ["a:latest"] and list(p.placements) == ["b:latest"]
    assert sorted(seen) == ["a:latest", "b:latest"]  # asked once each


# --- two GPUs of different sizes: best fit -------------------------------------------------


def test_best_fit_puts_small_models_on_small_gpus() -> None:
    ms = models({"name": "small", "vram_gb": 20}, {"name": "large", "vram_gb": 50})
    p = plan(ms, FakeInventory([80, 24]))
    assert p.placements["small:latest"].gpus == [1]
    assert p.placements["large:latest"].gpus == [0]
    assert "best fit: leaves GPU 1 4 GiB (next: GPU 0 would leave 10 GiB)" in p.placements["small:latest"].reason
    # Best fit also means filling a GPU exactly when that is the tightest fit.
    p = plan(models({"name": "small", "vram_gb": 20}, {"name": "large", "vram_gb": 60}), FakeInventory([80, 24]))
    assert p.placements["small:latest"].gpus == [0] and p.devices[0].free_after == 0
    check_invariants(p)


def test_best_fit_keeps_a_big_hole_for_a_big_model() -> None:
    # Worst fit would put "a" on GPU 0 and leave no room for "b".
    ms = models({"name": "a", "vram_gb": 10}, {"name": "b", "vram_gb": 40})
    p = plan(ms, FakeInventory([48, 16]))
    assert p.ok and p.placements["a:latest"].gpus == [1] and p.placements["b:latest"].gpus == [0]


def test_ties_go_to_the_lowest_index() -> None:
    p = plan(models({"name": "a", "vram_gb": 10}), FakeInventory([24, 24]))
    assert p.placements["a:latest"].gpus == [0]


def test_pinned_gpu_that_is_not_visible() -> None:
    p = plan(models({"name": "a", "vram_gb": 10, "gpus": [3]}), FakeInventory([24, 24]))
    assert p.refused["a:latest"] == ["a:latest: GPU 3 is not available (visible GPUs: 0, 1)"]


# --- models without a budget get whole GPUs ----------------------------------------------------


def test_model_without_budget_gets_a_gpu_to_itself() -> None:
    ms = models({"name": "solo"}, {"name": "shared", "vram_gb": 10})
    p = plan(ms, FakeInventory([80, 24]))
    solo = p.placements["solo:latest"]
    assert solo.gpus == [0] and solo.dedicated  # biggest when its minimum is unknown
    assert solo.budget_bytes == int(0.92 * 80 * GiB)
    assert solo.vllm_args[-1] == "0.92"
    assert p.placements["shared:latest"].gpus == [1]
    check_invariants(p)


def test_second_model_without_budget_on_one_gpu_is_refused() -> None:
    p = plan(models({"name": "a"}, {"name": "b"}), FakeInventory([80]))
    assert list(p.placements) == ["a:latest"]
    assert "sets no vram_gb or vram_fraction, so it needs 1 GPU(s) to itself" in p.refused["b:latest"][0]


def test_budgeted_model_cannot_join_a_dedicated_gpu() -> None:
    ms = models({"name": "a", "gpus": [0]}, {"name": "b", "vram_gb": 2, "gpus": [0]})
    p = plan(ms, FakeInventory([80]))
    assert p.refused["b:latest"] == [
        "b:latest: GPU 0 is reserved for a:latest, which sets no vram_gb or vram_fraction; give a:latest a budget to share it"
    ]


def test_dedicated_model_takes_smallest_gpu_that_holds_its_minimum() -> None:
    facts = {"a:latest": ModelFacts(weights_bytes=30 * GiB)}
    p = plan(models({"name": "a"}), FakeInventory([80, 24, 48]), facts=facts)
    assert p.placements["a:latest"].gpus == [2]


# --- four GPUs: tensor-parallel groups ------------------------------------------------------


def test_tp_group_on_gpus_with_enough_free_each() -> None:
    inv = FakeInventory([24, 48, 48, 80], processes=[(999, 1, 40.0)])
    ms = models({"name": "tp", "vram_gb": 20, "tensor_parallel": 2})
    p = plan(ms, inv)
    tp = p.placements["tp:latest"]
    assert tp.gpus == [0, 2]  # GPU 1 has only 8 GiB left; 0 then 2 leave the least
    assert tp.env["CUDA_VISIBLE_DEVICES"] == "0,2"
    assert tp.vllm_args[:2] == ["--tensor-parallel-size", "2"]
    # One utilization for both GPUs: the smallest budget/total, so neither exceeds 20 GiB.
    assert tp.vllm_args[-1] == "0.4166"  # 20 / 48 = 0.41666…, rounded down
    # No two free GPUs of one size: every rank sizes its KV cache like GPU 0's 0.4166 × 24 GiB.
    assert p.warnings == [(
        "tp:latest: its GPUs differ in size (GPU 0 24 GiB, GPU 2 48 GiB): one --gpu-memory-utilization (0.4166) "
        "for every rank gives it 10 GiB per GPU, not its 20 GiB budget"
    )]
    check_invariants(p)


def test_tp_group_that_cannot_be_formed() -> None:
    inv = FakeInventory([24, 48, 48, 80], processes=[(999, 1, 40.0), (998, 2, 40.0)])
    p = plan(models({"name": "tp", "vram_gb": 30, "tensor_parallel": 2}), inv)
    assert p.refused["tp:latest"] == [(
        "tp:latest: no room: no 2 GPUs have 30 GiB free each for TP=2 (GPU 0: 24 GiB left = 24 total; "
        "GPU 1: 8 GiB left = 48 total − 40 used by other processes; "
        "GPU 2: 8 GiB left = 48 total − 40 used by other processes; GPU 3: 80 GiB left = 80 total)"
    )]


def test_pinned_tp_group_with_fraction_on_mixed_gpus() -> None:
    p = plan(models({"name": "tp", "vram_fraction": 0.5, "tensor_parallel": 2, "gpus": [0, 3]}), FakeInventory([24, 48, 48, 80]))
    tp = p.placements["tp:latest"]
    assert tp.budgets == {0: 12 * GiB, 3: 40 * GiB} and tp.budget_bytes == 12 * GiB
    assert tp.vllm_args[-1] == "0.5"
    check_invariants(p)


def test_tp_on_gpus_of_different_sizes_is_checked_against_what_vllm_gets() -> None:
    """One utilization for every rank, KV sized like the smallest GPU's: 20 GiB on 24 + 80 GiB
    GPUs is --gpu-memory-utilization 0.25, i.e. 6 GiB on the 24 GiB one, not 20."""
    facts = {"tp:latest": ModelFacts(weights_bytes=26 * GiB)}  # 13 GiB per GPU + 2 runtime = 15
    msg = (
        "tp:latest needs ≥ 15 GiB per GPU for weights at TP=2, but its GPUs differ in size (GPU 0 24 GiB, "
        "GPU 1 80 GiB) and vLLM applies one --gpu-memory-utilization (0.25) to every rank, which gives it 6 GiB "
        "on GPU 0 (weights 13 GiB + KV cache unknown + runtime 2 GiB); use GPUs of one size, or vram_fraction"
    )
    for gpus in ("auto", [0, 1]):
        p = plan(models({"name": "tp", "vram_gb": 20, "tensor_parallel": 2, "gpus": gpus}), FakeInventory([24, 80]),
                 facts=facts)
        assert p.refused["tp:latest"] == [msg] and not p.placements
    # A fraction is of each GPU's own total: 0.7 gives 16.8 GiB on the small one, enough.
    p = plan(models({"name": "tp", "vram_fraction": 0.7, "tensor_parallel": 2}), FakeInventory([24, 80]), facts=facts)
    assert p.placements["tp:latest"].gpus == [0, 1] and not p.warnings
    # Unknown weights: placed, with the shortfall said.
    p = plan(models({"name": "tp", "vram_gb": 20, "tensor_parallel": 2}), FakeInventory([24, 80]))
    assert p.fits("tp:latest") and "gives it 6 GiB per GPU, not its 20 GiB budget" in p.warnings[0]


def test_tp_group_prefers_gpus_of_one_size() -> None:
    # Best fit row by row would pair the 48 GiB GPU (least left) with an 80: utilization 0.25, 12 GiB on it.
    facts = {"tp:latest": ModelFacts(weights_bytes=30 * GiB)}  # 15 + 2 = 17 GiB per GPU
    p = plan(models({"name": "tp", "vram_gb": 20, "tensor_parallel": 2}), FakeInventory([48, 80, 80]), facts=facts)
    assert p.ok and p.placements["tp:latest"].gpus == [1, 2] and p.placements["tp:latest"].vllm_args[-1] == "0.25"
    # Only mixed sizes have room, but a pair of one size exists: a lack of room (waiting may cure it), not lasting.
    inv = FakeInventory([48, 80, 80], processes=[(9, 2, 70.0)])
    (msg,) = plan(models({"name": "tp", "vram_gb": 20, "tensor_parallel": 2}), inv, facts=facts).refused["tp:latest"]
    assert msg.startswith("tp:latest: no room: the GPUs with room for it (GPU 0, GPU 1) differ in size")
    assert not is_lasting(msg)


def test_kv_cache_memory_bytes_on_mixed_sizes_asks_no_rank_for_more_than_its_budget() -> None:
    """vLLM checks utilization × total is free on every rank: weights/24 GiB × 80 GiB would be 26 GiB."""
    facts = {"tp:latest": ModelFacts(weights_bytes=16 * GiB)}  # 8 GiB per GPU
    inv = FakeInventory([24, 80], processes=[(9, 1, 60.0)])  # GPU 1: 20 GiB left, all of it the budget
    ms = models({"name": "tp", "vram_gb": 20, "tensor_parallel": 2, "gpus": [0, 1]})
    args = plan(ms, inv, facts=facts, kv_cache_memory_bytes=True).placements["tp:latest"].vllm_args
    assert args[2:4] == ["--kv-cache-memory-bytes", str(20 * GiB - 8 * GiB - GPU_RUNTIME_BYTES)]
    util = float(args[-1])
    assert util * 80 <= 20 and util * 24 <= 20 and util == 0.1


def test_wider_groups_are_placed_first() -> None:
    # If "single" went first it would take GPU 1 (best fit, 2 GiB left) and the TP=2 group could not form.
    ms = models({"name": "single", "vram_gb": 14}, {"name": "wide", "vram_gb": 10, "tensor_parallel": 2})
    p = plan(ms, FakeInventory([24, 16]))
    assert p.ok and p.placements["wide:latest"].gpus == [0, 1]
    assert p.placements["single:latest"].gpus == [0]
    check_invariants(p)


# --- eight GPUs, many models, determinism ------------------------------------------------------

EIGHT = [80, 80, 48, 48, 24, 24, 16, 141]


def eight_models() -> list[Model]:
    return models(
        {"name": "llama:70b", "vram_gb": 70, "tensor_parallel": 2},
        {"name": "qwen:32b", "vram_gb": 40, "tensor_parallel": 2},
        {"name": "mistral:7b", "vram_gb": 18},
        {"name": "phi:3b", "vram_gb": 8},
        {"name": "gemma:2b", "vram_gb": 6},
        {"name": "embed", "vram_gb": 3, "embedding": True},
        {"name": "coder:14b", "vram_fraction": 0.4},
        {"name": "pinned", "vram_gb": 10, "gpus": [6]},
        {"name": "dedicated"},
        {"name": "remote", "url": "http://elsewhere:8000"},
        {"name": "too-big", "vram_gb": 100, "tensor_parallel": 4},
    )


def test_eight_mixed_gpus_place_everything_that_can_fit() -> None:
    inv = FakeInventory(EIGHT, processes=[(4242, 7, 30.0)], reserved_gib=0.5)
    p = plan(eight_models(), inv, reserve_gb=1)
    check_invariants(p)
    assert set(p.refused) == {"too-big:latest"}
    assert p.skipped == {"remote:latest": "remote (http://elsewhere:8000)"}
    assert p.placements["pinned:latest"].gpus == [6]
    for x in p.placements.values():
        assert len(x.gpus) == max(1, {"llama:70b": 2, "qwen:32b": 2}.get(x.model, 1))
    ded = p.placements["dedicated:latest"]
    assert all(p.devices[i].models == ["dedicated:latest"] for i in ded.gpus)
    text = format_plan(p)
    for name in ("llama:70b", "too-big:latest", "remote:latest", "GPU 7"):
        assert name in text


def test_plan_is_deterministic_whatever_the_order_of_models() -> None:
    inv = FakeInventory(EIGHT, processes=[(4242, 7, 30.0)])
    base = summary(plan(eight_models(), inv, reserve_gb=1))
    rng = random.Random(5)
    for _ in range(20):
        ms = eight_models()
        rng.shuffle(ms)
        assert summary(plan(ms, inv, reserve_gb=1)) == base


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_many_small_models_never_over_commit(n: int) -> None:
    sizes = [24, 80, 48, 16, 40, 24, 80, 32][:n]
    rng = random.Random(n)
    ms = models(*({"name": f"m{i}", "vram_gb": rng.choice([2, 5, 7.5, 11])} for i in range(30)))
    inv = FakeInventory(sizes, processes=[(1, 0, 3.0)])
    p = plan(ms, inv, reserve_gb=0.5)
    check_invariants(p)
    assert p.placements and len(p.placements) + len(p.refused) == 30
    # Whatever was refused really had no room left anywhere.
    smallest_refused = min((m.vram_gb for m in ms if m.name in p.refused), default=None)
    if smallest_refused is not None:
        assert all(r.free_after < smallest_refused * GiB for r in p.devices)


# --- re-planning around running models ---------------------------------------------------------


def test_running_models_stay_where_they_are() -> None:
    inv = FakeInventory([24, 80], processes=[(500, 1, 19.0)])
    ms = models({"name": "a", "vram_gb": 20}, {"name": "b", "vram_gb": 20})
    first = plan(ms[:1], FakeInventory([24, 80]))
    assert first.placements["a:latest"].gpus == [0]
    # Pretend "a" was started on GPU 1 (e.g. before GPU 0 was added); it must not move.
    running = {"a:latest": Placement("a:latest", "gpu", [1], 20 * GiB, {}, [], "", budgets={1: 20 * GiB})}
    p = plan(ms, inv, our_pids={500}, running=running)
    assert p.placements["a:latest"].gpus == [1] and p.placements["a:latest"].kept
    assert p.placements["b:latest"].gpus == [0]
    assert p.devices[1].foreign == 0  # pid 500 is ours
    check_invariants(p)


def test_our_memory_is_not_double_counted_when_pids_are_invisible() -> None:
    # In a container NVML reports host PIDs: the GPU shows 19 GiB used by nobody we know.
    inv = FakeInventory([24], unattributed_gib={0: 19})
    running = {"a:latest": Placement("a:latest", "gpu", [0], 12 * GiB, {}, [], "")}
    p = plan(models({"name": "a", "vram_gb": 12}), inv, running=running)
    assert p.devices[0].foreign == 7 * GiB  # 19 used − 12 assumed ours
    assert p.devices[0].free_after == 5 * GiB


def test_a_model_placed_but_not_started_does_not_hide_foreign_memory() -> None:
    """NVML shows our PIDs (pid 100 runs "a" on GPU 0), so "b", placed on GPU 1 but not started
    yet, holds nothing there: the 10 GiB in use on GPU 1 are somebody else's."""
    inv = FakeInventory([16, 24], processes=[(100, 0, 12.0), (999, 1, 10.0)])
    running = {
        "a:latest": Placement("a:latest", "gpu", [0], 12 * GiB, {}, [], ""),
        "b:latest": Placement("b:latest", "gpu", [1], 12 * GiB, {}, [], ""),
    }
    ms = models({"name": "a", "vram_gb": 12}, {"name": "b", "vram_gb": 12}, {"name": "c", "vram_gb": 10})
    p = plan(ms, inv, our_pids={100}, running=running)
    assert p.devices[1].foreign == 10 * GiB and p.devices[0].foreign == 0
    assert not p.fits("c:latest")  # 10 + 12 + 10 > 24: it would over-commit GPU 1
    check_invariants(p)
    # Our PID listed without a size (some drivers): that GPU falls back to the budgets.
    inv = FakeInventory([16, 24], processes=[(100, 0, 12.0), (101, 1, None)], unattributed_gib={1: 11})
    p = plan(models({"name": "c", "vram_gb": 2}), inv, our_pids={100, 101}, running=running)
    assert p.devices[1].foreign == 0


def test_foreign_growth_under_a_running_model_is_a_warning_not_an_eviction() -> None:
    inv = FakeInventory([24], processes=[(1, 0, 20.0), (2, 0, 10.0)])
    running = {"a:latest": Placement("a:latest", "gpu", [0], 20 * GiB, {}, [], "")}
    p = plan(models({"name": "a", "vram_gb": 20}), inv, our_pids={1}, running=running)
    assert p.fits("a:latest") and p.ok
    assert p.warnings and "GPU 0 is over-committed by 6 GiB" in p.warnings[0]


def test_evictable_picks_the_least_recently_used_that_make_room() -> None:
    inv = FakeInventory([24, 24])
    running = {
        "old:latest": Placement("old:latest", "gpu", [0], 10 * GiB, {}, [], ""),
        "mid:latest": Placement("mid:latest", "gpu", [1], 12 * GiB, {}, [], ""),
        "new:latest": Placement("new:latest", "gpu", [0], 10 * GiB, {}, [], ""),
    }
    want = one("want", vram_gb=14)
    lru = ["old:latest", "mid:latest", "new:latest"]
    # Stopping "old" alone frees GPU 0 to 14 GiB: exactly enough.
    assert evictable(want, inv, lru, running=running) == ["old:latest"]
    # Stopping "mid" is what it takes when it is the oldest: GPU 1 becomes free.
    assert evictable(want, inv, ["mid:latest", "old:latest"], running=running) == ["mid:latest"]
    # Prefix then prune: "old" was stopped on the way, but once "mid" goes GPU 1 is free: keep "old".
    big = one("big", vram_gb=24)
    assert evictable(big, inv, ["old:latest", "mid:latest", "new:latest"], running=running) == ["mid:latest"]
    assert evictable(one("tiny", vram_gb=4), inv, lru, running=running) == []
    assert evictable(one("huge", vram_gb=30), inv, lru, running=running) is None


# --- enforcement with --kv-cache-memory-bytes ----------------------------------------------------


def test_kv_cache_memory_bytes_mode() -> None:
    facts = {"a:latest": ModelFacts(weights_bytes=16 * GiB, kv_bytes_per_token=128 * 1024)}
    ms = models({"name": "a", "vram_gb": 30, "tensor_parallel": 2, "max_model_len": 8192})
    p = plan(ms, FakeInventory([40, 40]), facts=facts, kv_cache_memory_bytes=True)
    args = p.placements["a:latest"].vllm_args
    assert args[:2] == ["--tensor-parallel-size", "2"]
    assert args[2:4] == ["--kv-cache-memory-bytes", str(30 * GiB - 8 * GiB - GPU_RUNTIME_BYTES)]
    assert args[4:] == ["--gpu-memory-utilization", "0.2"]  # weights/total: fail fast if they cannot load
    # Without known weights it falls back to utilization.
    p = plan(ms, FakeInventory([40, 40]), kv_cache_memory_bytes=True)
    assert "--kv-cache-memory-bytes" not in p.placements["a:latest"].vllm_args


def test_installed_vllm_has_kv_cache_memory_bytes() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # not importorskip: importing vLLM takes seconds
        pytest.skip("vLLM is not installed")
    assert supports_kv_cache_memory_bytes() is True


def test_kv_flag_detection_for_another_interpreter(tmp_path: Path) -> None:
    root = tmp_path / "vllm"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "arg_utils.py").write_text('parser.add_argument("--gpu-memory-utilization")\n')
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\necho {root}\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    assert supports_kv_cache_memory_bytes(str(fake_python)) is False
    assert supports_kv_cache_memory_bytes(str(tmp_path / "missing")) is False


# --- remote models and warnings ---------------------------------------------------------------


def test_remote_models_are_not_placed_and_owned_flags_warn() -> None:
    ms = models(
        {"name": "r", "url": "http://x:8000"},
        {"name": "a", "vram_gb": 4, "vllm_args": ["--gpu-memory-utilization=0.9"], "env": {"CUDA_VISIBLE_DEVICES": "3"}},
    )
    p = plan(ms, FakeInventory([24]))
    assert "r:latest" not in p.placements and p.skipped["r:latest"].startswith("remote")
    assert any("--gpu-memory-utilization, CUDA_VISIBLE_DEVICES" in w for w in p.warnings)


def test_no_gpu_visible_refuses_gpu_models() -> None:
    p = plan(models({"name": "a", "vram_gb": 4}), FakeInventory([]))
    assert p.refused["a:latest"] == ["a:latest: no GPU is visible"]


def test_mig_gpus_are_named_not_silently_missing() -> None:
    inv = FakeInventory([80, 80], unusable={1: MIG_UNSUPPORTED})
    p = plan(models({"name": "a", "vram_gb": 4, "gpus": [1]}, {"name": "b", "vram_gb": 4}), inv)
    assert p.refused["a:latest"] == [f"a:latest: GPU 1 is not available: {MIG_UNSUPPORTED} (visible GPUs: 0)"]
    assert p.placements["b:latest"].gpus == [0] and p.warnings == [f"GPU 1 is not used: {MIG_UNSUPPORTED}"]
    assert is_lasting(p.refused["a:latest"][0])


def test_gpus_nvml_cannot_read_refuse_every_model_instead_of_raising() -> None:
    class Lost(FakeInventory):
        def gpus(self) -> list[Any]:
            raise GpuUnavailable("NVML cannot read the memory of GPU 0 (H100): GPU is lost")

    ms = models({"name": "a", "vram_gb": 4}, {"name": "b", "vram_gb": 4})
    p = plan(ms, Lost([80]))
    assert p.refused["a:latest"] == ["a:latest: no GPU is visible (NVML cannot read the memory of GPU 0 (H100): GPU is lost)"]
    assert set(p.refused) == {"a:latest", "b:latest"} and is_lasting(p.refused["b:latest"][0])
    assert evictable(ms[0], Lost([80]), [], running={}) is None


# --- CPU mode --------------------------------------------------------------------------------


def test_cpu_mode_refuses_budgets_beyond_ram_before_launch() -> None:
    host = HostMemory(total=24 * GiB, available=20 * GiB, reason="CPU mode: test")
    p = plan(models({"name": "a", "memory_gb": 30}), host)
    assert p.mode == "cpu" and p.note == "CPU mode: test"
    assert p.refused["a:latest"] == [
        "a:latest: needs 30 GiB of RAM, only 20 GiB left (24 total − 4 used by other processes)"
    ]


def test_cpu_mode_fits_and_sets_kv_cache_space_in_whole_gib() -> None:
    host = HostMemory(total=24 * GiB, available=20 * GiB)
    facts = {"a:latest": ModelFacts(weights_bytes=int(1.2 * GiB), kv_bytes_per_token=32 * 1024)}
    p = plan(models({"name": "a", "memory_gb": 6.9, "max_model_len": 4096}), host, reserve_gb=2, facts=facts)
    a = p.placements["a:latest"]
    assert a.device == "cpu" and a.gpus == []
    # 6.9 − 1.2 weights − 2 runtime = 3.7 → 3 whole GiB (vLLM parses the variable with int()).
    assert a.env == {"VLLM_CPU_KVCACHE_SPACE": "3"}
    assert a.vllm_args == []
    assert p.devices[0].free_after == int(24 * GiB - 2 * GiB - 4 * GiB - int(6.9 * GiB))


def test_cpu_default_budget_from_weights_and_context() -> None:
    host = HostMemory(total=24 * GiB, available=20 * GiB)
    facts = {"a:latest": ModelFacts(weights_bytes=GiB, kv_bytes_per_token=32 * 1024)}
    p = plan(models({"name": "a", "max_model_len": 65536}), host, facts=facts)  # KV 2 GiB
    a = p.placements["a:latest"]
    assert a.budget_bytes == GiB + 2 * GiB + CPU_RUNTIME_BYTES
    assert a.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    p = plan(models({"name": "b"}), host)
    assert "weights unknown (not downloaded yet?) and no memory_gb set" in p.refused["b:latest"][0]


def test_cpu_budget_too_small_for_the_weights() -> None:
    host = HostMemory(total=24 * GiB, available=20 * GiB)
    facts = {"a:latest": ModelFacts(weights_bytes=3 * GiB, kv_bytes_per_token=1024)}
    (msg,) = plan(models({"name": "a", "memory_gb": 4, "max_model_len": 2048}), host, facts=facts).refused["a:latest"]
    assert msg == (
        "a:latest needs ≥ 6 GiB of RAM for weights, budget is 4 GiB "
        "(weights 3 GiB + KV cache 1 GiB for max_model_len 2048 + runtime 2 GiB)"
    )


def test_cpu_mode_our_running_servers_are_not_foreign() -> None:
    host = HostMemory(total=24 * GiB, available=10 * GiB, process_rss={77: 8 * GiB})
    running = {"a:latest": Placement("a:latest", "cpu", [], 9 * GiB, {}, [], "")}
    ms = models({"name": "a", "memory_gb": 9}, {"name": "b", "memory_gb": 8}, {"name": "c", "memory_gb": 2})
    p = plan(ms, host, our_pids={77}, running=running)
    row = p.devices[0]
    assert row.foreign == 6 * GiB  # 14 used − 8 ours
    assert p.fits("a:latest") and p.fits("b:latest") and not p.fits("c:latest")
    check_invariants(p)


def test_cpu_and_gpu_use_the_same_entry_point_and_order() -> None:
    host = HostMemory(total=16 * GiB, available=16 * GiB)
    ms = models({"name": "z", "memory_gb": 6}, {"name": "y", "memory_gb": 6}, {"name": "x", "memory_gb": 6})
    p = plan(ms, host)
    assert list(p.refused) == ["z:latest"]  # equal sizes: placed by name, so "z" comes last
    assert list(p.placements) == ["y:latest", "x:latest"]  # models.yaml order kept in the output


def test_cpu_models_get_cores_of_their_own() -> None:
    """vLLM alone would bind both models' threads to the same 15 cores: two spinning threads a core."""
    host = HostMemory(total=64 * GiB, available=60 * GiB, cores=tuple(range(16)))
    p = plan(models({"name": "a", "memory_gb": 8}, {"name": "b", "memory_gb": 4}), host)
    a, b = p.placements["a:latest"], p.placements["b:latest"]
    assert a.cpus == tuple(range(7)) and a.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-6"
    assert b.cpus == tuple(range(7, 14)) and b.env["VLLM_CPU_OMP_THREADS_BIND"] == "7-13"
    assert "cores 0-6" in a.reason
    assert 15 not in a.cpus + b.cpus  # left to the API servers, engine loops and the router


def test_an_on_demand_model_started_later_finds_cores_of_its_own() -> None:
    host = HostMemory(total=64 * GiB, available=60 * GiB, cores=tuple(range(16)))
    ms = models({"name": "a", "memory_gb": 4}, {"name": "b", "memory_gb": 4},
                {"name": "lazy", "memory_gb": 4, "load": "on_demand"})
    boot = plan(ms[:2], host, cpu_models=3)  # the registry's three share the cores from the start
    later = plan(ms[2:], host, running=boot.placements, cpu_models=3)
    taken = [set(boot.placements[n].cpus) for n in ("a:latest", "b:latest")] + [set(later.placements["lazy:latest"].cpus)]
    assert [len(t) for t in taken] == [5, 5, 5]
    assert not (taken[0] & taken[1]) and not (taken[2] & (taken[0] | taken[1]))
    again = plan(ms, host, running=boot.placements, cpu_models=3)
    assert again.placements["a:latest"].kept and again.placements["a:latest"].cpus == boot.placements["a:latest"].cpus


def test_cores_on_a_small_box() -> None:
    two = HostMemory(total=24 * GiB, available=20 * GiB, cores=(0, 1))
    alone = plan(models({"name": "a", "memory_gb": 3}), two).placements["a:latest"]
    assert alone.cpus == (0,)  # what vLLM's own binding does: core 1 for everything else
    p = plan(models({"name": "a", "memory_gb": 3}, {"name": "b", "memory_gb": 3}), two)
    assert [p.placements[n].cpus for n in ("a:latest", "b:latest")] == [(0,), (1,)]
    # More models than cores: they share, evenly.
    ms = models(*({"name": n, "memory_gb": 3} for n in "abc"))
    assert sorted(pl.cpus for pl in plan(ms, two).placements.values()) == [(0,), (0,), (1,)]


def test_cores_per_tensor_parallel_rank() -> None:
    host = HostMemory(total=64 * GiB, available=60 * GiB, cores=tuple(range(8)))
    a = plan(models({"name": "a", "memory_gb": 8, "tensor_parallel": 2}), host).placements["a:latest"]
    assert a.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3|4-6"
    one_core = HostMemory(total=64 * GiB, available=60 * GiB, cores=(0,))
    a = plan(models({"name": "a", "memory_gb": 8, "tensor_parallel": 2}), one_core).placements["a:latest"]
    assert a.cpus == () and "VLLM_CPU_OMP_THREADS_BIND" not in a.env  # fewer cores than ranks: vLLM's call


def test_an_operators_binding_is_kept() -> None:
    host = HostMemory(total=64 * GiB, available=60 * GiB, cores=tuple(range(8)))
    ms = models({"name": "a", "memory_gb": 4, "env": {"VLLM_CPU_OMP_THREADS_BIND": "2-3"}}, {"name": "b", "memory_gb": 4})
    p = plan(ms, host)
    assert p.placements["a:latest"].cpus == () and "VLLM_CPU_OMP_THREADS_BIND" not in p.placements["a:latest"].env
    assert p.placements["b:latest"].cpus  # the others are still bound
    cfg = parse({"engine": {"env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
                 "models": [{"name": "a", "source": "org/a"}, {"name": "r", "source": "org/r", "url": "http://h:1"}]})
    assert cpu_models(cfg) == 0  # engine.env binds every model: the planner stays out
    assert cpu_models(parse({"models": [{"name": "a", "source": "org/a"},
                                        {"name": "r", "source": "org/r", "url": "http://h:1"}]})) == 1
    p = plan(ms[1:], host, cpu_models=0)
    assert p.placements["b:latest"].cpus == () and "VLLM_CPU_OMP_THREADS_BIND" not in p.placements["b:latest"].env
    unknown = HostMemory(total=64 * GiB, available=60 * GiB)  # no core list: vLLM binds as it likes
    assert plan(ms[1:], unknown).placements["b:latest"].cpus == ()


def test_pick_cores_takes_the_least_loaded_contiguous_run() -> None:
    cores = tuple(range(9))
    assert pick_cores(cores, {}, share=2) == (0, 1, 2, 3)
    assert pick_cores(cores, {0: 1, 1: 1, 2: 1, 3: 1}, share=2) == (4, 5, 6, 7)
    assert pick_cores(cores, {c: 1 for c in range(8)}, share=2) == (0, 1, 2, 3)  # all busy: share the first
    assert pick_cores((0, 2, 4, 6), {}, share=1) == (0, 2, 4)  # ids as given (one per physical core)
    assert bind_spec((0, 1, 2, 5, 6), tp=2) == "0-2|5-6"


# --- measuring while running -------------------------------------------------------------------


def test_usage_flags_an_overrun_per_gpu() -> None:
    import os

    me = os.getpid()
    inv = FakeInventory([24, 24], processes=[(me, 0, 12.0), (me, 1, 9.0)])
    pl = Placement("a:latest", "gpu", [0, 1], 10 * GiB, {}, [], "")
    u = usage(pl, [me], inv)
    assert u.measured_bytes == 21 * GiB and u.budget_bytes == 20 * GiB
    assert u.by_gpu == {0: 12 * GiB, 1: 9 * GiB}
    assert u.overrun and u.over == ["GPU 0 12 GiB > budget 10 GiB"]
    u = usage(pl, [2**22 + 1], inv)
    assert u.measured_bytes is None and not u.overrun


def test_gib_formatting() -> None:
    assert gib(16 * GiB) == "16" and gib(int(19.2 * GiB)) == "19.2"
    assert gib(int(19.21 * GiB), up=True) == "19.3" and gib(int(19.2 * GiB), up=True) == "19.2"


def test_total_budget_sums_each_gpus_own_budget() -> None:
    """`vllama ps` shows this before the server runs: a vram_fraction is more bytes on the bigger GPU."""
    from router.placement import Placement

    p = Placement("m", "gpu", [0, 1], 8 * GiB, {}, [], "", budgets={0: 8 * GiB, 1: 20 * GiB})
    assert p.total_budget == 28 * GiB
    assert Placement("c", "cpu", [], 3 * GiB, {}, [], "").total_budget == 3 * GiB
