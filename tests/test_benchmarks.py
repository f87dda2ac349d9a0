"""Fast checks of the benchmark scripts' arithmetic and reporting (no engines, no timing assertions).

The scripts live in benchmarks/ (not a package); they are imported from there.
"""
from __future__ import annotations

import http.server
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_offline  # noqa: E402
import bench_peers  # noqa: E402
import bench_serve  # noqa: E402
import cost_model  # noqa: E402
import plots  # noqa: E402

from vllm_specdiff.offline import EngineSpec, acceptance_histogram  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Cost model formulas

def test_expected_tokens_per_round():
    assert cost_model.expected_tokens_per_round(0.0, 5) == 1.0
    assert cost_model.expected_tokens_per_round(1.0, 5) == 6.0
    assert cost_model.expected_tokens_per_round(0.5, 1) == pytest.approx(1.5)
    # sum_{j=0}^{k} a^j
    assert cost_model.expected_tokens_per_round(0.9, 40) == pytest.approx(
        sum(0.9 ** j for j in range(41)))
    with pytest.raises(ValueError, match="alpha"):
        cost_model.expected_tokens_per_round(1.5, 3)


def test_predicted_speedup_and_break_even():
    # E = 1 + 0.8 + 0.64 = 2.44 tokens per round; a round costs 0.5 + 1.2 target steps
    assert cost_model.predicted_speedup(0.8, 2, 1.0, 0.5, 1.2) == pytest.approx(2.44 / 1.7)
    alpha = cost_model.break_even_alpha(2, 1.0, 0.5, 1.2)
    assert 0 < alpha < 1
    assert cost_model.predicted_speedup(alpha, 2, 1.0, 0.5, 1.2) == pytest.approx(1.0, abs=1e-9)
    assert cost_model.break_even_alpha(2, 1.0, 3.0, 1.2) is None  # even a = 1 gives 3 / 4.2
    assert cost_model.break_even_alpha(2, 1.0, 0.0, 0.5) == 0.0  # verification alone is cheap


@pytest.mark.parametrize("alpha,k", [(0.8, 4), (0.3, 1), (0.95, 16)])
def test_alpha_from_histogram_recovers_iid_acceptance(alpha, k):
    """Expected counts of i.i.d. acceptance truncated at k give back exactly a."""
    histogram = [alpha ** j * (1 - alpha) for j in range(k)] + [alpha ** k]
    assert cost_model.alpha_from_histogram(histogram) == pytest.approx(alpha)
    mean_length = 1 + sum(j * h for j, h in enumerate(histogram))
    assert mean_length == pytest.approx(cost_model.expected_tokens_per_round(alpha, k))
    assert cost_model.alpha_from_acceptance_length(mean_length, k) == pytest.approx(alpha, abs=1e-9)


def test_alpha_from_histogram_edges():
    assert cost_model.alpha_from_histogram([0, 0, 0]) is None
    assert cost_model.alpha_from_histogram([5, 0, 0]) == 0.0
    assert cost_model.alpha_from_histogram([0, 0, 7]) == 1.0
    with pytest.raises(ValueError):
        cost_model.alpha_from_acceptance_length(7.0, 5)


def test_measured_alphas_pool_batches():
    rows = [
        {"method": "specdiff", "num_draft_tokens": 2, "num_steps": 1, "temperature": 1.0, "batch": 1,
         "acceptance_histogram": [2, 1, 1]},
        {"method": "specdiff", "num_draft_tokens": 2, "num_steps": 1, "temperature": 1.0, "batch": 4,
         "acceptance_histogram": [0, 1, 3]},
        {"method": "none", "num_draft_tokens": 0, "temperature": 1.0, "acceptance_histogram": []},
    ]
    (measured,) = cost_model.measured_alphas(rows)
    # pooled [2, 2, 4]: accepted 2 + 8 = 10, rejections 4 -> a = 10 / 14; mean length 1 + 10 / 8
    assert measured["alpha"] == pytest.approx(10 / 14)
    assert measured["mean_acceptance_length"] == pytest.approx(1 + 10 / 8)
    assert (measured["num_draft_tokens"], measured["num_steps"]) == (2, 1)


def test_extrapolation_from_two_depths():
    assert cost_model.depths_to_time(48, 0) == [48]
    assert cost_model.depths_to_time(48, 4) == [1, 4]
    assert cost_model.depths_to_time(2, 4) == [2]
    # fixed 3 + 2 per layer
    assert cost_model.extrapolate({1: 5.0, 4: 11.0}, 48) == pytest.approx(3 + 2 * 48)
    assert cost_model.extrapolate({48: 7.0}, 48) == 7.0
    assert cost_model.extrapolate({1: 5.0, 4: 4.0}, 10) == 5.0  # noise never makes layers free-er


def test_decoder_verify_forward_equals_sequential_steps():
    """The cost model's verification forward computes what k + 1 decode steps compute."""
    shape = cost_model.DecoderShape("tiny", hidden=64, layers=2, heads=2, vocab=97, max_positions=64)
    model = cost_model.build_decoder(shape, shape.layers, torch.device("cpu"), torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.ln_f.weight, torch.ones(64))
    tokens = torch.randint(0, 97, (2, 5))
    with torch.inference_mode():
        context = 7
        cache = model.new_cache(2, 16)
        parallel = model(tokens, context, cache)
        assert parallel.shape == (2, 5, 97)
        cache_seq = model.new_cache(2, 16)
        for (k1, v1), (k2, v2) in zip(cache, cache_seq):  # same context in both caches
            k2[:, :, :context] = k1[:, :, :context]
            v2[:, :, :context] = v1[:, :, :context]
        sequential = torch.cat([model(tokens[:, i:i + 1], context + i, cache_seq) for i in range(5)], 1)
    torch.testing.assert_close(parallel, sequential, rtol=1e-4, atol=1e-4)


def test_sedd_round_timing_runs_on_a_tiny_model():
    config = cost_model.SEDDConfig(tokens=50, hidden_size=32, cond_dim=16, length=32, n_blocks=2,
                                   n_heads=2)
    timings = cost_model.time_sedd_rounds(config, [(4, 2, 16), (8, 8, 32)], 2, torch.device("cpu"),
                                          torch.float32, 0, 0, 1, lambda message: None)
    assert set(timings) == {(4, 2, 16), (8, 8, 32)}
    assert all(t > 0 for t in timings.values())


def test_cost_model_predictions_summary_and_plot(tmp_path):
    targets = {"big": {"t_step": 1.0, "t_verify": {3: 1.1, 5: 1.3}}}
    drafts = {(2, 1, 16): 0.2, (4, 2, 16): 0.4, (4, 4, 16): 0.8}
    predictions = cost_model.prediction_rows(targets, drafts, 0.1, [0.5, 0.9], [0.8])
    assert len(predictions) == 3 * 2 + 2 * 1  # sedd: 3 rounds x 2 alphas; AR: 2 k x 1 alpha
    row = next(p for p in predictions if p["drafter"] == "sedd-small" and p["num_draft_tokens"] == 4
               and p["num_steps"] == 2 and p["alpha"] == 0.9)
    assert row["speedup"] == pytest.approx(cost_model.expected_tokens_per_round(0.9, 4) / 1.7)
    ar = next(p for p in predictions if p["drafter"] == "gpt2 (AR)" and p["num_draft_tokens"] == 2)
    assert ar["t_draft_round"] == pytest.approx(0.2)
    summary = cost_model.summary_rows(predictions, [0.9])
    assert len(summary) == 3 + 2
    table = plots.format_table(summary, cost_model.summary_columns([0.9]))
    assert "x @ a=0.9" in table and "break-even a" in table
    assert cost_model.plot_steps_for({(4, 2), (4, 4), (2, 1)}, 4, 3) == 2
    assert cost_model.plot_steps_for({(4, 2), (4, 4)}, 4, 1) == 2
    path = cost_model.plot_speedup_vs_k(predictions, tmp_path / "k.png", 4, 0.8)
    assert path is not None and path.stat().st_size > 0
    # --no-ar: no AR rows and no AR alpha (this used to crash formatting the AR legend label).
    sedd_only = [p for p in predictions if p["drafter"] == "sedd-small"]
    path = cost_model.plot_speedup_vs_k(sedd_only, tmp_path / "k-no-ar.png", 4, None)
    assert path is not None and path.stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Acceptance counters

def test_acceptance_histogram_from_per_position_counts():
    # 10 rounds; 6 accepted position 0, 3 position 1, 1 position 2 (of k = 3)
    assert acceptance_histogram(10, [6, 3, 1], 3) == [4, 3, 2, 1]
    assert acceptance_histogram(5, [], 2) == [5, 0, 0]
    histogram = acceptance_histogram(10, [6, 3, 1], 3)
    assert sum(histogram) == 10 and sum(j * h for j, h in enumerate(histogram)) == 6 + 3 + 1


METRICS_PAGE = """# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 30.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 6.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 1.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 3.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7e9
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""


def test_parse_spec_metrics_and_delta():
    after = bench_serve.parse_spec_metrics(METRICS_PAGE)
    assert after == {"drafts": 10, "draft_tokens": 30, "accepted": 10, "accepted_per_pos": [6, 3, 1]}
    empty = bench_serve.parse_spec_metrics("")
    assert empty == {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}
    before = {"drafts": 4, "draft_tokens": 12, "accepted": 4, "accepted_per_pos": [3, 1]}
    delta = bench_serve.counters_delta(after, before)
    assert delta == {"drafts": 6, "draft_tokens": 18, "accepted": 6, "accepted_per_pos": [3, 2, 1]}
    fields = bench_serve.acceptance_fields(delta, 3)
    assert fields["acceptance_histogram"] == [3, 1, 1, 1]
    assert fields["mean_acceptance_length"] == pytest.approx(2.0)
    assert fields["acceptance_rate"] == pytest.approx(6 / 18)
    assert bench_serve.acceptance_fields(bench_serve.counters_delta(empty, empty), 0)[
        "mean_acceptance_length"] is None


# ---------------------------------------------------------------------------------------------
# bench_offline: grid, engines, speedups, prompts, reporting

def test_specdiff_grid():
    assert bench_offline.specdiff_grid([4, 8], [1, 2, 8], "axes", 8, 4) == [
        (4, 4), (8, 1), (8, 2), (8, 4), (8, 8)]
    assert bench_offline.specdiff_grid([2, 4], [1, 4], "grid", 4, 1) == [(2, 1), (4, 1), (4, 4)]
    with pytest.raises(ValueError, match="sweep"):
        bench_offline.specdiff_grid([2], [1], "diagonal", 2, 1)


def test_build_engines_order_and_labels():
    engines = bench_offline.build_engines(
        ["none", "draft_model", "draft_model_default", "specdiff"], "sedd", "ar", [2, 4], [4],
        [(8, 2)], None, baseline_reruns=2)
    labels = [e.label for e in engines]
    assert labels == ["no speculation", "draft_model k=2", "draft_model k=4",
                      "draft_model k=4 (default runner)", "specdiff-sedd k=8 T=2 a l",
                      "no speculation (rerun 1)"]
    assert [e.runner for e in engines] == ["v1", "v1", "v1", "default", "v1", "v1"]
    # A label shows what the engine runs: the plugin's adaptive and lookup defaults are on.
    assert EngineSpec("specdiff", "sedd", 8, 2).label == "specdiff-sedd k=8 T=2 a l"
    assert EngineSpec("specdiff", "sedd", 8, 2, options=(("lookup", False),)).label == \
        "specdiff-sedd k=8 T=2 a"
    with pytest.raises(ValueError, match="unknown methods"):
        bench_offline.build_engines(["eagle"], None, None, [], [], [], None, 1)
    with pytest.raises(ValueError, match="V1"):
        bench_offline.BenchEngine(EngineSpec("specdiff", "sedd", 4, 2), runner="default")


def _drafter_folders(tmp_path):
    """A DFlash-format folder (a config.json is all the benchmarks check) and a folder that
    EngineSpec.kind reads as a conditioned drafter (its config.json's architecture)."""
    from vllm_specdiff.models.conditioned_checkpoint import ARCHITECTURE

    dflash, conditioned = tmp_path / "dflash", tmp_path / "conditioned"
    for folder, config in ((dflash, {"architectures": ["DFlashDraftModel"]}),
                           (conditioned, {"architecture": ARCHITECTURE})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    return str(dflash), str(conditioned)


def test_build_engines_with_every_speculator(tmp_path):
    dflash, conditioned = _drafter_folders(tmp_path)
    # Run order does not depend on the order of --methods.
    engines = bench_offline.build_engines(
        list(reversed(bench_offline.ENGINE_KINDS)), "sedd", "ar", [2, 4], [4], [(8, 2)], None,
        baseline_reruns=2, dflash_drafter=dflash, conditioned_drafter=conditioned,
        conditioned_pairs=[(4, 1), (8, 2)])
    assert [e.label for e in engines] == [
        "no speculation", "ngram k=2", "ngram k=4", "draft_model k=2", "draft_model k=4",
        "draft_model k=4 (default runner)", "dflash k=2", "dflash k=4", "specdiff-sedd k=8 T=2 a l",
        "specdiff-conditioned k=4 T=1 a l", "specdiff-conditioned k=8 T=2 a l",
        "no speculation (rerun 1)"]
    assert [e.runner for e in engines].count("default") == 1
    assert [e.spec.kind for e in engines] == [
        "none", "ngram", "ngram", "draft_model", "draft_model", "draft_model", "dflash", "dflash",
        "sedd", "conditioned", "conditioned", "none"]
    configs = [e.spec.speculative_config() for e in engines]
    assert configs[1] == {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4,
                          "prompt_lookup_min": 2}
    assert configs[7] == {"method": "dflash", "num_speculative_tokens": 4, "model": dflash}
    assert configs[9] == {"method": "specdiff", "num_speculative_tokens": 4, "model": conditioned,
                          "num_steps": 1, "adaptive": True, "lookup": True}
    assert configs[8] == {"method": "specdiff", "num_speculative_tokens": 8, "model": "sedd",
                          "num_steps": 2, "adaptive": True, "lookup": True}

    (off,) = bench_offline.build_engines(["specdiff_conditioned"], None, None, [], [], [], None, 1,
                                         conditioned_drafter=conditioned, conditioned_pairs=[(4, 1)],
                                         adaptive=False, lookup=False)
    assert off.label == "specdiff-conditioned k=4 T=1"
    assert dict(off.spec.options) == {"adaptive": False, "lookup": False}
    assert off.spec.speculative_config()["adaptive"] is False


def test_build_engines_dflash_and_conditioned_folder_errors(tmp_path):
    missing = tmp_path / "dflash-smollm2"
    for folder in (missing, tmp_path):  # no folder; a folder without config.json
        with pytest.raises(ValueError, match="vllm-specdiff train --kind dflash --out DIR") as err:
            bench_offline.build_engines(["none", "dflash"], None, None, [4], [], [], None, 1,
                                        dflash_drafter=str(folder))
        assert str(folder) in str(err.value)
    # Only when dflash is asked for.
    engines = bench_offline.build_engines(["none", "ngram"], None, None, [4], [], [], None, 1,
                                          dflash_drafter=str(missing))
    assert [e.label for e in engines] == ["no speculation", "ngram k=4"]
    sedd = tmp_path / "sedd"
    sedd.mkdir()
    (sedd / "config.json").write_text(json.dumps({"architecture": "SEDD"}))
    with pytest.raises(ValueError, match="not a conditioned drafter"):
        bench_offline.build_engines(["specdiff_conditioned"], None, None, [], [], [], None, 1,
                                    conditioned_drafter=str(sedd), conditioned_pairs=[(4, 1)])


def test_choose_methods_and_drafter_options(tmp_path, monkeypatch, capsys):
    dflash, _ = _drafter_folders(tmp_path)
    parser = bench_offline.build_parser()
    args = parser.parse_args(["--dflash-drafter", str(tmp_path / "untrained")])
    assert (args.conditioned, args.adaptive, args.lookup) == ("4:1", True, True)
    monkeypatch.setattr(bench_offline, "default_runner_is_v1_no_async", lambda: False)
    assert bench_offline.choose_methods(args) == [
        "none", "ngram", "draft_model", "draft_model_default", "specdiff", "specdiff_conditioned"]
    assert "dflash left out" in capsys.readouterr().out
    args = parser.parse_args(["--dflash-drafter", dflash])
    assert bench_offline.choose_methods(args) == list(bench_offline.ENGINE_KINDS)
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(bench_offline, "default_runner_is_v1_no_async", lambda: True)
    args = parser.parse_args(["--methods", "dflash,draft_model_default, ngram", "--no-adaptive",
                              "--no-lookup", "--conditioned", "8:2,4:1"])
    assert bench_offline.choose_methods(args) == ["dflash", "ngram"]
    assert (args.adaptive, args.lookup) == (False, False)
    assert bench_offline.parse_pairs(args.conditioned) == [(8, 2), (4, 1)]
    assert bench_offline.drafter_paths(args)["conditioned_drafter"].endswith("conditioned-smollm2")


def _row(method, tps, temperature=0.0, batch=1, runner="v1", k=0, steps=None, **extra):
    return {"method": method, "label": f"{method} {k} {steps} {runner}", "tokens_per_s": tps,
            "temperature": temperature, "batch": batch, "runner": runner, "num_draft_tokens": k,
            "num_steps": steps, "mean_acceptance_length": 1.0 + k / 2 if k else None, **extra}


def test_add_speedups_uses_same_run_baseline_mean():
    rows = [_row("none", 10.0), _row("none", 14.0, baseline_run=1), _row("draft_model", 18.0, k=2),
            _row("draft_model", 24.0, k=4), _row("draft_model", 30.0, k=4, runner="default"),
            _row("specdiff", 36.0, k=8, steps=2), _row("specdiff", 5.0, batch=4, k=8, steps=2),
            {"method": "specdiff", "label": "failed", "tokens_per_s": None, "error": "boom"}]
    bench_offline.add_speedups(rows)
    assert rows[0]["speedup"] == pytest.approx(10 / 12)
    assert rows[5]["speedup"] == pytest.approx(3.0)
    assert rows[5]["speedup_vs_draft_model"] == pytest.approx(1.5)  # best v1 draft_model: 24
    assert rows[4]["speedup_vs_draft_model"] == pytest.approx(1.25)
    assert rows[6]["speedup"] is None  # no baseline at batch 4
    assert rows[7]["speedup"] is None
    assert bench_offline.baseline_drift(rows) == pytest.approx(4 / 12)
    # The demo's rows carry no runner (offline.run_engine always runs V1): still the baseline.
    demo = [{k: v for k, v in r.items() if k != "runner"} for r in rows[:4]]
    bench_offline.add_speedups(demo)
    assert demo[3]["speedup_vs_draft_model"] == pytest.approx(1.0)


def test_serve_speedups_per_temperature_and_concurrency():
    # bench_serve's rows: output tokens/s per (temperature, concurrency); best peer = the fastest
    # of ngram / draft_model / dflash in that cell, never a specdiff server.
    def row(method, label, conc, tps, runner="v1"):
        return {"method": method, "label": label, "temperature": 0.0, "concurrency": conc,
                "output_throughput": tps, "runner": runner}

    rows = [row("none", "none", 1, 10.0), row("ngram", "ngram k=4", 1, 20.0),
            row("dflash", "dflash k=4", 1, 12.0), row("specdiff", "specdiff a", 1, 25.0),
            row("none", "none", 4, 40.0), row("draft_model", "draft_model k=4", 4, 30.0),
            row("specdiff", "specdiff a", 4, 36.0)]
    bench_serve.add_speedups(rows, value="output_throughput", cell=("temperature", "concurrency"))
    assert rows[3]["speedup"] == pytest.approx(2.5)
    assert rows[3]["best_peer"] == "ngram k=4" and rows[3]["speedup_vs_best_peer"] == pytest.approx(1.25)
    assert rows[3]["speedup_vs_draft_model"] is None  # no draft_model server at concurrency 1
    assert rows[6]["speedup"] == pytest.approx(0.9)
    assert rows[6]["speedup_vs_best_peer"] == pytest.approx(1.2)
    assert rows[6]["speedup_vs_draft_model"] == pytest.approx(1.2)
    table = bench_serve.format_table(rows, bench_serve.TABLE_COLUMNS)
    assert "vs best peer" in table and "1.25" in table
    with pytest.raises(SystemExit):  # refused before any model is resolved
        bench_serve.main(["--waves", "0"])


def test_load_prompts_jsonl(tmp_path):
    class Tokenizer:
        def encode(self, text, add_special_tokens=False):
            return [len(word) for word in text.split()]

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a bb ccc"}\n\n{"prompt_token_ids": [5, 6]}\n{"prompt": "dddd"}\n')
    assert bench_offline.load_prompts(path, Tokenizer(), None) == [[1, 2, 3], [5, 6], [4]]
    assert bench_offline.load_prompts(path, Tokenizer(), 2) == [[1, 2, 3], [5, 6]]
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="prompt"):
        bench_offline.load_prompts(path, Tokenizer(), None)


def test_parser_quick_defaults():
    args = bench_offline.build_parser().parse_args(["--quick", "--batches", "1"])
    bench_offline.apply_quick_defaults(args)
    assert (args.num_prompts, args.max_tokens, args.batches, args.tag) == (4, 32, "1", "quick")
    args = bench_offline.build_parser().parse_args([])
    bench_offline.apply_quick_defaults(args)
    assert (args.batches, args.baseline_reruns, args.tag) == ("1,4,16", 2, None)


def test_offline_table_jsonl_and_plots(tmp_path):
    rows = []
    for temperature in (0.0, 1.0):
        for batch in (1, 4):
            rows += [_row("none", 10.0 * batch, temperature, batch),
                     _row("draft_model", 12.0 * batch, temperature, batch, k=4,
                          acceptance_histogram=[1, 1, 1, 1, 1]),
                     _row("ngram", 11.0 * batch, temperature, batch, k=4),
                     _row("dflash", 13.0 * batch, temperature, batch, k=4),
                     _row("specdiff", 15.0 * batch, temperature, batch, k=4, steps=1,
                          kind="conditioned", options={"adaptive": True, "lookup": True}),
                     *[_row("specdiff", (11.0 + k - steps) * batch, temperature, batch, k=k,
                            steps=steps, acceptance_histogram=[1] * (k + 1))
                       for k, steps in ((8, 2), (8, 4), (16, 4))]]
    rows.append({"method": "specdiff", "label": "specdiff k=32 T=4", "tokens_per_s": None,
                 "error": "RuntimeError: engine failed\ntraceback", "temperature": None,
                 "batch": None, "runner": "v1", "num_draft_tokens": 32, "num_steps": 4})
    bench_offline.add_speedups(rows)
    rows.sort(key=bench_offline.table_order)
    cell = [r for r in rows if (r["temperature"], r["batch"]) == (0.0, 1)]
    assert [bench_offline.engine_family(r) for r in cell] == [
        "none", "ngram", "draft_model", "dflash", "specdiff-sedd", "specdiff-sedd",
        "specdiff-sedd", "specdiff-conditioned"]
    assert cell[-1]["speedup_vs_best_peer"] == pytest.approx(15 / 13)  # dflash: the best peer
    table = plots.format_table(rows, bench_offline.TABLE_COLUMNS)
    assert "speedup" in table and "RuntimeError: engine failed" in table
    assert "vs best peer" in table
    assert len(table.splitlines()) == len(rows) + 2
    path = plots.write_jsonl(tmp_path / "out" / "offline.jsonl", rows)
    back = plots.read_jsonl(path)
    assert len(back) == len(rows) and back[0].keys() == rows[0].keys()
    written = bench_offline.write_plots(rows, tmp_path / "out" / "offline")
    assert sorted(p.name for p in written) == ["offline-acceptance_vs_draft_tokens.png",
                                               "offline-speedup_vs_steps.png",
                                               "offline-tokens_per_s_vs_batch.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_offline_plots_keep_drafter_kinds_apart(monkeypatch, tmp_path):
    """A conditioned specdiff row never joins the SEDD specdiff lines (same method, k and T)."""
    panels_by_file = {}

    def capture(path, panels, *args, **kwargs):
        panels_by_file[Path(path).name] = panels

    monkeypatch.setattr(bench_offline, "plot_lines", capture)
    rows = [_row("none", 10.0), _row("ngram", 11.0, k=4), _row("draft_model", 12.0, k=4),
            _row("draft_model", 12.5, k=4, runner="default"), _row("dflash", 13.0, k=4),
            _row("specdiff", 14.0, k=4, steps=1),  # an older row without "kind": SEDD
            _row("specdiff", 15.0, k=4, steps=1, kind="conditioned")]
    bench_offline.add_speedups(rows)
    bench_offline.write_plots(rows, tmp_path / "offline")
    (accept,) = panels_by_file["offline-acceptance_vs_draft_tokens.png"].values()
    assert {name: [y for _, y in points] for name, points in accept.items()} == {
        "ngram": [3.0], "draft_model": [3.0], "dflash": [3.0], "specdiff-sedd T=1": [3.0],
        "specdiff-conditioned T=1": [3.0]}
    (steps,) = panels_by_file["offline-speedup_vs_steps.png"].values()
    assert steps == {"specdiff-sedd k=4 batch 1": [(1, pytest.approx(1.4))],
                     "specdiff-conditioned k=4 batch 1": [(1, pytest.approx(1.5))]}


def test_group_points_and_empty_plot(tmp_path):
    rows = [{"p": "a", "l": "x", "x": 1, "y": 2.0}, {"p": "a", "l": "x", "x": 1, "y": 4.0},
            {"p": "a", "l": "x", "x": 2, "y": None}, {"p": "b", "l": "z", "x": 3, "y": 1.0}]
    grouped = plots.group_points(rows, lambda r: r["p"], lambda r: r["l"], lambda r: r["x"],
                                 lambda r: r["y"])
    assert grouped == {"a": {"x": [(1, 3.0)]}, "b": {"z": [(3, 1.0)]}}
    assert plots.plot_lines(tmp_path / "none.png", {"a": {}}, "x", "y") is None
    assert not (tmp_path / "none.png").exists()
    assert plots.format_table([{"v": None}, {"v": math.nan}], [("v", lambda r: r["v"], ".2f")]) \
        .splitlines()[2:] == ["-", "-"]


# ---------------------------------------------------------------------------------------------
# bench_serve: server command line, health wait, shutdown

def test_server_command_and_env():
    server = bench_serve.Server("specdiff", "/d/sedd", 8, 2, 64)
    cmd = server.command("/t", 8123, "float32", 512, 4, 0, ["--enforce-eager"])
    assert cmd[1:6] == ["-m", "vllm_specdiff.cli", "serve", "/t", "--host"]
    spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert spec == {"method": "specdiff", "model": "/d/sedd", "num_speculative_tokens": 8,
                    "num_steps": 2, "window": 64}
    assert "--no-async-scheduling" in cmd and cmd[-1] == "--enforce-eager"
    assert server.env()["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    default = bench_serve.Server("draft_model", "/d/ar", 4, runner="default")
    assert "--no-async-scheduling" not in default.command("/t", 1, "bfloat16", 512, 1, 0, [])
    assert "VLLM_USE_V2_MODEL_RUNNER" not in default.env()
    assert json.loads(default.command("/t", 1, "bfloat16", 512, 1, 0, [])[-1])[
        "draft_sample_method"] == "probabilistic"
    assert bench_serve.Server("none").speculative_config() is None
    assert bench_serve.parse_pairs("8:2, 16:4") == [(8, 2), (16, 4)]
    servers = bench_serve.build_servers(["none", "specdiff"], "s", "a", [4], [4], [(8, 2)], None)
    assert [s.label for s in servers] == ["no speculation", "specdiff-sedd k=8 T=2 a l"]


def _served_config(server):
    cmd = server.command("/t", 8123, "float32", 512, 4, 0, [])
    return json.loads(cmd[cmd.index("--speculative-config") + 1])


def test_build_servers_with_every_speculator(tmp_path):
    dflash, conditioned = _drafter_folders(tmp_path)
    servers = bench_serve.build_servers(
        list(reversed(bench_serve.SERVER_KINDS)), "/d/sedd", "/d/ar", [4], [4], [(8, 2)], None,
        dflash=dflash, conditioned=conditioned, conditioned_pairs=[(4, 1)])
    assert [s.label for s in servers] == [
        "no speculation", "ngram k=4", "draft_model k=4", "draft_model k=4 (default runner)",
        "dflash k=4", "specdiff-sedd k=8 T=2 a l", "specdiff-conditioned k=4 T=1 a l"]
    assert _served_config(servers[1]) == {"method": "ngram", "num_speculative_tokens": 4,
                                          "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    assert _served_config(servers[4]) == {"method": "dflash", "num_speculative_tokens": 4,
                                          "model": dflash}
    assert _served_config(servers[6]) == {"method": "specdiff", "num_speculative_tokens": 4,
                                          "model": conditioned, "num_steps": 1, "adaptive": True,
                                          "lookup": True}
    assert servers[6].options == (("adaptive", True), ("lookup", True))
    assert "--no-async-scheduling" in servers[4].command("/t", 1, "float32", 512, 1, 0, [])
    (off,) = bench_serve.build_servers(["specdiff_conditioned"], None, None, [], [], [], None,
                                       conditioned=conditioned, conditioned_pairs=[(8, 2)],
                                       adaptive=False, lookup=True)
    assert off.label == "specdiff-conditioned k=8 T=2 l"
    assert _served_config(off)["adaptive"] is False
    with pytest.raises(ValueError, match="--kind dflash") as err:
        bench_serve.build_servers(["dflash"], None, None, [4], [], [], None,
                                  dflash=str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(err.value)
    with pytest.raises(ValueError, match="unknown methods"):
        bench_serve.build_servers(["eagle"], None, None, [], [], [], None)
    # The result table's order: baseline, vLLM's speculators, SEDD, then conditioned specdiff.
    rows = [{"method": s.method, "kind": s.spec.kind} for s in reversed(servers)]
    assert [r["kind"] for r in sorted(rows, key=bench_offline.family_rank)] == [
        "none", "ngram", "draft_model", "draft_model", "dflash", "sedd", "conditioned"]
    args = bench_serve.build_parser().parse_args([])
    assert (args.conditioned, args.adaptive, args.lookup, args.dflash_drafter) == (
        "4:1", True, True, None)


def test_bench_args_and_dataset(tmp_path):
    dataset = bench_serve.write_prompts_dataset(["first prompt", "second"], tmp_path / "p.json")
    data = json.loads(dataset.read_text())
    assert data[1]["conversations"][0] == {"from": "human", "value": "second"}
    argv = bench_serve.bench_args("http://127.0.0.1:9", "/t", dataset, 8, 4, 32, 1.0, 0)
    assert argv[argv.index("--max-concurrency") + 1] == "4"
    assert argv[argv.index("--sharegpt-output-len") + 1] == "32"
    assert "--ignore-eos" in argv

    class Tokenizer:
        def decode(self, ids):
            return " ".join(f"t{i}" for i in ids)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n{"prompt_token_ids": [1, 2]}\n{"prompt": "x"}\n')
    assert bench_serve.load_text_prompts(prompts, Tokenizer(), 2) == ["hello there", "t1 t2"]


def test_level_row_keeps_scalars():
    result = {"duration": 2.0, "completed": 4, "output_throughput": 64.0, "mean_ttft_ms": 10.0,
              "p99_tpot_ms": 5.0, "ttfts": [0.1] * 4, "generated_texts": ["x"] * 4}
    row = bench_serve.level_row(result)
    assert row["output_throughput"] == 64.0 and row["p99_tpot_ms"] == 5.0
    assert "ttfts" not in row and row["mean_itl_ms"] is None


def test_wait_for_health_and_stop_server(tmp_path):
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               start_new_session=True, preexec_fn=bench_serve.default_sigint)
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert bench_serve.wait_for_health(url, process, tmp_path / "log", timeout=10) < 10
    finally:
        httpd.shutdown()
        start = time.perf_counter()
        bench_serve.stop_server(process, grace=5)
    assert process.poll() is not None and time.perf_counter() - start < 5

    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], start_new_session=True)
    dead.wait()
    (tmp_path / "log").write_text("boom: the server failed\n")
    with pytest.raises(RuntimeError, match="exited with code 3"):
        bench_serve.wait_for_health(f"http://127.0.0.1:{bench_serve.free_port()}", dead,
                                    tmp_path / "log", timeout=5)


# ---------------------------------------------------------------------------------------------
# bench_rejection: the CPU comparison with vLLM's own sampler times the same verification

def test_bench_rejection_greedy_vllm_cpu_sampler_agrees_with_ours_and_writes_rows(tmp_path):
    import bench_rejection

    from vllm_specdiff.verification import rejection_sample_reference

    device = torch.device("cpu")
    assert bench_rejection.prepare_vllm_cpu() is None  # vLLM's CPU sampler is set up here
    inputs = bench_rejection.make_inputs(3, 4, 97, torch.float32, False, device, temperature=0.0)
    ours = bench_rejection.ours(inputs, 4, rejection_sample_reference)().output_token_ids
    theirs = bench_rejection.vllm_method(inputs, 4)().sampled_token_ids
    assert torch.equal(ours, theirs.to(ours.dtype))  # greedy: one answer, same placeholders
    plugin = bench_rejection.vllm_method(inputs, 4, plugin=True)().sampled_token_ids
    assert torch.equal(ours, plugin.to(ours.dtype))  # the plugin's sampler, timed as "plugin"
    out = tmp_path / "rejection.jsonl"
    bench_rejection.main(["--vocab", "97", "--batch", "2", "--num-draft-tokens", "3", "--warmup", "0",
                          "--iters", "1", "--temperature", "0", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["method"] for r in rows} == {"reference", "vllm", "plugin"}
    assert all(r["temperature"] == 0 and r["ms"] > 0 for r in rows)


def test_default_dtype_is_float32_on_cpu_and_bf16_on_gpu(monkeypatch):
    from vllm_specdiff.offline import default_dtype

    assert default_dtype("bfloat16") == "bfloat16" and default_dtype("float16") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_dtype() == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_dtype("auto") == "bfloat16"


def test_bench_peers_merges_rounds_by_summing_tokens_and_seconds():
    def row(tps_tokens, seconds, drafts, accepted, hist):
        return {"label": "x", "batch": 1, "temperature": 0.0, "tokens": tps_tokens, "seconds": seconds,
                "tokens_per_s": tps_tokens / seconds, "num_drafts": drafts,
                "num_accepted_tokens": accepted, "acceptance_histogram": hist,
                "mean_acceptance_length": 1 + accepted / drafts}
    first = [row(100, 10.0, 50, 25, [30, 15, 5])]
    second = [row(100, 5.0, 50, 75, [10, 20, 20])]
    (merged,) = bench_peers.merge_rounds([first, second])
    assert merged["tokens_per_s"] == pytest.approx(200 / 15)
    assert merged["round_tokens_per_s"] == [10.0, 20.0]
    assert merged["mean_acceptance_length"] == pytest.approx(2.0)
    assert merged["acceptance_histogram"] == [40, 35, 25]
    assert bench_peers.merge_rounds([first]) == first
    assert first[0]["tokens_per_s"] == 10.0  # inputs untouched


def test_plugin_cost_per_cell_is_a_per_engine_step_difference():
    from vllm_specdiff.engine.offline import _plugin_delta

    before = {"engine_steps": 10, "proposer_seconds": 1.0, "observe_seconds": 0.2,
              "draft_seconds": 0.5}
    after = {"engine_steps": 30, "proposer_seconds": 1.4, "observe_seconds": 0.3,
             "draft_seconds": 0.7, "verifier": "specdiff"}
    delta = _plugin_delta(after, before)
    assert delta["engine_steps"] == 20 and delta["verifier"] == "specdiff"
    assert delta["plugin_ms_per_step"] == pytest.approx(20.0)
    assert delta["observe_ms_per_step"] == pytest.approx(5.0)
    assert delta["drafter_ms_per_step"] == pytest.approx(10.0)
    assert _plugin_delta({}, {}) == {}  # not a specdiff engine
    assert _plugin_delta(before, before)["plugin_ms_per_step"] is None  # no steps in the cell


def _exit_at_once() -> None:
    import os

    os._exit(3)


def test_a_dead_interleaved_engine_is_named_with_the_fix():
    """An engine process killed mid-run (the OOM killer, with every engine alive) ends the run with
    its name and the way out, not an EOFError or a hang."""
    import multiprocessing

    from vllm_specdiff.engine.offline import _reply

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_exit_at_once)
    process.start()
    child.close()
    with pytest.raises(RuntimeError, match=r"engine ngram k=2 died \(exit code 3\).*--no-interleave"):
        _reply(EngineSpec("ngram", num_draft_tokens=2), parent, process)
