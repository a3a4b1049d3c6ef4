"""CoFiTune's coarse-level tree search: score, tree, budget, resume, state file, and the driver."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launcher import REPO

from dsforget.experiments.cofitune_search import (
    HALVES,
    QUARTERS,
    Candidate,
    SearchConfig,
    SearchStateError,
    TrialResult,
    base_run_values,
    chosen_run_values,
    quarters_of,
    ranking_table,
    score,
    tree_search,
    trial_run_values,
    write_run_config,
)
from dsforget.strict_json import dumps
from dsforget.train.run_config import RunConfig, read_config_file

# ---- a synthetic score surface whose best candidate is known ----------------------------------

BEFORE = {"task_exact_match": 0.2, "fact_recall": 0.8, "general_perplexity": 10.0}
# task utility of each quarter; a half's is the mean of its two quarters
QUARTER_UTILITY = {"bottom1": 0.3, "bottom2": 0.6, "middle": 0.4, "top": 0.2}
# per module set: speciality factor, and general ability lost per quarter of the layers trained
MODULE_EFFECT = {"ffn": (1.0, 0.02), "both": (1.05, 0.06), "mha": (0.5, 0.03)}


def surface(candidate: Candidate) -> tuple[float, float]:
    """(speciality, versatility) the synthetic trial of `candidate` is built to score exactly."""
    quarters = quarters_of(candidate.layers) if candidate.layers in HALVES else (candidate.layers,)
    utility = sum(QUARTER_UTILITY[q] for q in quarters) / len(quarters)
    factor, loss_per_quarter = MODULE_EFFECT[candidate.modules]
    return factor * utility, 1 - loss_per_quarter * len(quarters)


def expected_score(candidate: Candidate, weight: float) -> float:
    speciality, versatility = surface(candidate)
    return speciality + weight * (versatility - 1)


ALL_CANDIDATES = [Candidate(m, r) for m in MODULE_EFFECT for r in HALVES + QUARTERS]


class SyntheticTrials:
    """run_trial with a known surface; records its calls; can fail or be interrupted on demand."""

    def __init__(
        self, interrupt_at: int | None = None, fail: set[str] = frozenset(), diverge: set[str] = frozenset()
    ) -> None:
        self.calls: list[str] = []
        self.interrupt_at, self.fail, self.diverge = interrupt_at, fail, diverge

    def __call__(self, candidate: Candidate) -> TrialResult:
        self.calls.append(candidate.key)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if candidate.key in self.fail:
            raise RuntimeError("rank 1 ran out of memory")
        speciality, versatility = surface(candidate)
        task = BEFORE["task_exact_match"]
        after = {
            "task_exact_match": task + speciality * (1 - task),
            "fact_recall": BEFORE["fact_recall"] * versatility,  # retention = versatility
            "general_perplexity": BEFORE["general_perplexity"] / versatility,  # retention = versatility
        }
        if candidate.key in self.diverge:  # the run diverged: its general perplexity is not finite
            after["general_perplexity"] = float("inf")
        return TrialResult(dict(BEFORE), after, {"synthetic": True})


def search(tmp: Path, trials: SyntheticTrials, settings: dict | None = None, **options):
    config = SearchConfig(n_layers=options.pop("n_layers", 8), **options)
    return tree_search(
        config, trials, tmp / "trials.jsonl", settings or {"lab": "synthetic"}, log=lambda _: None
    )


def comparable(result) -> dict:
    """The result without wall-clock seconds (which differ between any two runs)."""
    data = result.to_dict()
    for row in data["ranking"]:
        row.pop("seconds")
    return data


# ---- score and candidate space ----------------------------------------------------------------


def test_score_by_hand() -> None:
    """Pins the documented formula: a swapped retention direction (after/before for perplexity),
    a speciality not normalised by headroom, or lambda applied to the wrong term all change it."""
    after = {"task_exact_match": 0.6, "fact_recall": 0.6, "general_perplexity": 12.5}
    # S = (0.6 - 0.2) / (1 - 0.2) = 0.5; V = mean(0.6 / 0.8, 10 / 12.5) = mean(0.75, 0.8) = 0.775
    one = score(BEFORE, after, versatility_weight=1.0)
    assert one.speciality == pytest.approx(0.5) and one.versatility == pytest.approx(0.775)
    assert one.value == pytest.approx(0.5 - 0.225)
    assert score(BEFORE, after, versatility_weight=2.0).value == pytest.approx(0.5 - 0.45)
    assert score(BEFORE, after, versatility_weight=0.0).value == pytest.approx(0.5)
    assert score(BEFORE, dict(BEFORE)).value == 0.0  # the base model scores 0
    with pytest.raises(ValueError, match="--eval_data"):
        score({"fact_recall": 1.0}, {"fact_recall": 1.0})
    with pytest.raises(ValueError, match="--general_text"):
        score({"task_exact_match": 0.0}, {"task_exact_match": 0.5})


def test_quarters_of_each_half_and_candidate_checks() -> None:
    """Catches a refinement into quarters that lie outside the chosen half (a wrong LAYER_RANGES
    reading), and candidates or options outside CoFiTune's space accepted silently."""
    assert quarters_of("bottom-plus") == ("bottom1", "bottom2")
    assert quarters_of("middle-plus") == ("bottom2", "middle")
    assert quarters_of("top-plus") == ("middle", "top")
    with pytest.raises(ValueError, match="modules='attn'.*mha, ffn, both"):
        Candidate("attn", "top")
    with pytest.raises(ValueError, match="layers='all'"):
        Candidate("ffn", "all")
    with pytest.raises(ValueError, match="module_sets=ffn,gate"):
        SearchConfig(n_layers=8, module_sets=("ffn", "gate"))
    with pytest.raises(ValueError, match="budget=0"):
        SearchConfig(n_layers=8, budget=0)


# ---- (1) the tree finds the known best ---------------------------------------------------------


@pytest.mark.parametrize(("weight", "best"), [(1.0, "ffn@bottom2"), (0.0, "both@bottom2")])
def test_tree_finds_the_best_configuration_and_ranks_in_order(
    tmp_path: Path, weight: float, best: str
) -> None:
    """Catches a search that refines the wrong half or module set, ignores lambda (at lambda 0 the
    more forgetful 'both' wins), ranks unsorted, or tries quarters outside the best half."""
    assert max(ALL_CANDIDATES, key=lambda c: expected_score(c, weight)).key == best  # the surface's truth
    trials = SyntheticTrials()
    result = search(tmp_path, trials, versatility_weight=weight)
    assert result.chosen.record.candidate.key == best
    assert result.complete and len(trials.calls) == 9 + 2 <= SearchConfig(n_layers=8).tree_size
    # level 1 is every module set on every half, level 2 only the best half's two quarters
    assert set(trials.calls[:9]) == {f"{m}@{h}" for m in MODULE_EFFECT for h in HALVES}
    assert trials.calls[9:] == [f"{best.split('@')[0]}@bottom2", f"{best.split('@')[0]}@middle"]
    values = [entry.score.value for entry in result.ranking]
    assert values == sorted(values, reverse=True)
    for entry in result.ranking:
        assert entry.score.value == pytest.approx(expected_score(entry.record.candidate, weight))
    table = ranking_table(result)
    assert table.splitlines()[1].split()[:2] == ["1", best]


def test_refining_two_module_sets(tmp_path: Path) -> None:
    """refine_module_sets=2 must refine the best half with the two module sets whose best level-1
    scores are highest (ffn 0.46, both 0.405; not mha 0.19), best first."""
    trials = SyntheticTrials()
    result = search(tmp_path, trials, refine_module_sets=2)
    assert trials.calls[9:] == ["ffn@bottom2", "ffn@middle", "both@bottom2", "both@middle"]
    assert result.chosen.record.candidate.key == "ffn@bottom2"


def test_small_model_skips_empty_and_repeated_ranges(tmp_path: Path) -> None:
    """On 2 layers middle-plus and bottom2 are layer 0 like bottom-plus, and middle is empty: a
    search that trains them anyway wastes trials on duplicates or crashes on an empty range."""
    trials = SyntheticTrials()
    result = search(tmp_path, trials, n_layers=2, module_sets=("ffn",))
    assert trials.calls == ["ffn@bottom-plus", "ffn@top-plus"]
    assert {s.candidate.key: s.reason for s in result.skipped} == {
        "ffn@middle-plus": "same layers 0..0 as ffn@bottom-plus",
        "ffn@bottom1": "empty on 2 layers",  # refining the best half, bottom-plus
        "ffn@bottom2": "same layers 0..0 as ffn@bottom-plus",
    }
    assert {r.record.layer_indices for r in result.ranking} == {(0, 1), (1, 2)}


# ---- (2) resume after an interruption ---------------------------------------------------------


def test_interrupted_search_resumes_without_rerunning(tmp_path: Path) -> None:
    """Stopping at the 5th trial and restarting must rerun none of the 4 recorded trials, run the
    interrupted one again, and end with exactly the result of an uninterrupted search."""
    straight = search(tmp_path / "straight", SyntheticTrials())
    first = SyntheticTrials(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path / "split", first)
    lines = (tmp_path / "split" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 4  # header + the 4 finished trials; the interrupted one is not recorded
    second = SyntheticTrials()
    resumed = search(tmp_path / "split", second)
    assert not set(first.calls[:4]) & set(second.calls)
    assert second.calls[0] == first.calls[4] and len(second.calls) == 11 - 4
    assert resumed.new_trials == 7
    assert comparable(resumed) == comparable(straight)


# ---- (3) budget, failures, state file ----------------------------------------------------------


def test_budget_is_respected_across_restarts(tmp_path: Path) -> None:
    """Catches a budget counted per call (a restart would run 5 more) or ignored at level 2."""
    trials = SyntheticTrials()
    result = search(tmp_path, trials, budget=5)
    assert len(trials.calls) == 5 and not result.complete
    assert len(result.not_run) == 9 - 5 + 2 and len(result.ranking) == 5
    assert result.chosen.record.candidate.key in trials.calls
    again = SyntheticTrials()
    search(tmp_path, again, budget=5)
    assert again.calls == []
    more = SyntheticTrials()
    assert search(tmp_path, more, budget=11).complete and len(more.calls) == 6


def test_failed_trial_is_recorded_skipped_and_retried_only_when_asked(tmp_path: Path) -> None:
    """A crashing trial must not stop the search, must be stored with its error, rank last, not be
    rerun on a restart (a deterministic crash would loop), and be rerun with retry_failed."""
    trials = SyntheticTrials(fail={"mha@top-plus"})
    result = search(tmp_path, trials)
    assert result.chosen.record.candidate.key == "ffn@bottom2" and len(trials.calls) == 11
    last = result.ranking[-1]
    assert last.score is None and last.record.candidate.key == "mha@top-plus"
    assert last.record.error == "RuntimeError: rank 1 ran out of memory"
    assert "failed: RuntimeError: rank 1 ran out of memory" in ranking_table(result)
    assert result.to_dict()["ranking"][-1]["status"] == "failed"
    again = SyntheticTrials(fail={"mha@top-plus"})
    search(tmp_path, again)
    assert again.calls == []
    retry = SyntheticTrials()
    retried = search(tmp_path, retry, retry_failed=True)
    assert retry.calls == ["mha@top-plus"] and all(r.score is not None for r in retried.ranking)


def test_corrupt_state_line_is_named(tmp_path: Path) -> None:
    """A damaged trial line must stop the search with the file and line number (not be skipped
    silently, which would rerun or lose that trial)."""
    search(tmp_path, SyntheticTrials(), budget=4)
    state = tmp_path / "trials.jsonl"
    lines = state.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # line 3 of the file: half a JSON object
    state.write_text("\n".join(lines) + "\n")
    with pytest.raises(SearchStateError, match=f"{state}:3: cannot read"):
        search(tmp_path, SyntheticTrials(), budget=4)


def test_torn_last_line_is_dropped_and_its_trial_rerun(tmp_path: Path) -> None:
    """A crash during the append leaves a last line without a newline: that trial was never
    recorded, so it must run again, and the next append must not be glued onto the torn bytes."""
    search(tmp_path, SyntheticTrials(), budget=3)
    state = tmp_path / "trials.jsonl"
    lines = state.read_text().splitlines()
    torn_key = json.loads(lines[-1])["key"]
    state.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    trials = SyntheticTrials()
    search(tmp_path, trials, budget=3)
    assert trials.calls == [torn_key]
    lines = state.read_text().splitlines()
    assert len(lines) == 4 and [json.loads(line)["kind"] for line in lines[1:]] == ["trial"] * 3
    rerun = SyntheticTrials()
    search(tmp_path, rerun, budget=3)
    assert rerun.calls == []


def strict_json(text: str):
    """`text` parsed as JSON that strict parsers (JavaScript, jq) accept: no bare NaN/Infinity."""
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"bare {constant} in {text[:200]}"))


def test_diverged_trial_is_stored_as_strict_json_and_scored_the_same_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial whose general perplexity is infinite (a diverged run) was written as a bare
    ``Infinity`` into trials.jsonl, which strict JSON parsers reject. Stored as null it must still
    score as no general ability retained, in the first run and after a restart reads it back."""
    first = search(tmp_path, SyntheticTrials(diverge={"ffn@bottom2"}))
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    records = {record.get("key"): record for record in map(strict_json, lines)}
    assert records["ffn@bottom2"]["after"]["general_perplexity"] is None
    diverged = next(entry for entry in first.ranking if entry.record.candidate.key == "ffn@bottom2")
    recall_kept = surface(Candidate("ffn", "bottom2"))[1]
    assert diverged.score is not None and diverged.score.versatility == pytest.approx(recall_kept / 2)
    again = SyntheticTrials()
    resumed = search(tmp_path, again)
    assert again.calls == [] and comparable(resumed) == strict_json(dumps(comparable(first)))

    # the driver's ranking.json, written from the first run's in-memory result (inf, not null)
    spec = importlib.util.spec_from_file_location(
        "cofitune_search_driver", REPO / "launch" / "cofitune_search.py"
    )
    driver = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, driver)  # its dataclasses look their module up
    spec.loader.exec_module(driver)
    driver.report(first, tmp_path, base_run_values(None, []), ["deepspeed"])
    ranking = strict_json((tmp_path / "ranking.json").read_text())
    row = next(row for row in ranking["ranking"] if row["key"] == "ffn@bottom2")
    assert row["after"]["general_perplexity"] is None


def test_resume_with_other_trial_settings_is_refused(tmp_path: Path) -> None:
    """Mixing trials measured under different run settings (steps, lr, ranks) would rank
    incomparable numbers; a restart with other settings must be an error naming what differs."""
    search(tmp_path, SyntheticTrials(), settings={"trial_steps": 50, "ranks": 2}, budget=2)
    with pytest.raises(SearchStateError, match="differing: trial_steps"):
        search(tmp_path, SyntheticTrials(), settings={"trial_steps": 80, "ranks": 2}, budget=2)


def test_run_configs_for_trials_and_the_chosen_run(tmp_path: Path) -> None:
    """Trials must run cofitune with their candidate, their own output_dir and short length, keeping
    the base's other method options; the chosen config must keep the base's full length and parse
    as a run config; keys the search sets itself are refused in the base settings."""
    base_file = tmp_path / "base.yaml"
    base_file.write_text("lab_preset: tiny\nmax_steps: 300\nbetas: [0.9, 0.95]\n")
    base = base_run_values(base_file, ["--lr", "3e-4", "--method_options", '{"importance": "imp.pt"}'])
    assert base == {
        "lab_preset": "tiny",
        "max_steps": 300,
        "betas": (0.9, 0.95),
        "lr": 3e-4,
        "method_options": {"importance": "imp.pt"},
    }
    candidate = Candidate("ffn", "bottom2")
    trial = trial_run_values(base, candidate, tmp_path / "t", max_steps=20)
    assert (
        trial["max_steps"] == 20 and trial["export"] is False and trial["output_dir"] == str(tmp_path / "t")
    )
    assert trial["method"] == "cofitune"
    assert trial["method_options"] == {"importance": "imp.pt", "layers": "bottom2", "modules": "ffn"}
    chosen_file = tmp_path / "chosen.yaml"
    write_run_config(chosen_file, chosen_run_values(base, candidate), comments=["deepspeed ... --config x"])
    assert chosen_file.read_text().startswith("# deepspeed ... --config x\n")
    values = read_config_file(chosen_file)
    run = RunConfig(**values)
    assert run.method == "cofitune" and run.max_steps == 300 and run.betas == (0.9, 0.95)
    assert run.method_options == {"importance": "imp.pt", "layers": "bottom2", "modules": "ffn"}
    with pytest.raises(ValueError, match="output_dir is set per trial"):
        base_run_values(None, ["--output_dir", "x"])
    with pytest.raises(ValueError, match="method='mofo'"):
        base_run_values(None, ["--method", "mofo"])


# ---- (4) the driver end to end ----------------------------------------------------------------


@pytest.mark.distributed
def test_driver_searches_the_tiny_lab_and_writes_a_usable_config(tmp_path: Path, lab_cache: Path) -> None:
    """The command from the README on the tiny lab (2 layers, so ffn has two distinct halves): two
    real trials under the DeepSpeed launcher, a ranking of measured numbers, a chosen config that
    launch/finetune.py can read; run again, it resumes and trains nothing."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "DSFORGET_CACHE": str(lab_cache)}
    search_dir = tmp_path / "search"
    command = [
        sys.executable,
        str(REPO / "launch" / "cofitune_search.py"),
        "--config",
        str(REPO / "configs" / "cofitune_search_lab.yaml"),
        "--search_dir",
        str(search_dir),
        "--budget",
        "2",
        "--trial_steps",
        "2",
        "--module_sets",
        "ffn",
        "--",
        "--lab_preset",
        "tiny",
        "--eval_max_examples",
        "20",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranking = json.loads((search_dir / "ranking.json").read_text())
    rows = ranking["ranking"]
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert {tuple(row["layer_indices"]) for row in rows} == {(0, 1), (1, 2)}
    assert rows[0]["score"]["value"] >= rows[1]["score"]["value"]
    for row in rows:
        assert row["details"]["steps"] == 2 and row["after"] != row["before"]
        assert (Path(row["details"]["output_dir"]) / "report.json").exists()
    printed = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [cells[1] for cells in printed] == [row["key"] for row in rows]
    values = read_config_file(search_dir / "chosen.yaml")
    run = RunConfig(**values)
    assert run.method == "cofitune" and run.method_options == ranking["chosen"] == {
        "layers": rows[0]["layers"],
        "modules": "ffn",
    }
    assert run.max_steps == 300 and run.lab_preset == "tiny"  # the base's length, not the trials'
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[trial" not in again.stdout and f"chosen: {rows[0]['key']}" in again.stdout


@pytest.mark.distributed
def test_driver_records_a_crashing_trial(tmp_path: Path, lab_cache: Path) -> None:
    """A trial whose ranks crash must be recorded as failed with the root cause (rank 0's exception,
    not the other rank's 'connection closed'), and with no successful trial the driver must exit
    non-zero without writing a chosen config."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "DSFORGET_CACHE": str(lab_cache)}
    search_dir = tmp_path / "search"
    command = [
        sys.executable,
        str(REPO / "launch" / "cofitune_search.py"),
        "--search_dir",
        str(search_dir),
        "--budget",
        "1",
        "--trial_steps",
        "2",
        "--",
        "--lab_preset",
        "tiny",
        "--method_options",
        json.dumps({"importance": str(tmp_path / "missing.pt")}),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "no trial succeeded" in done.stderr, done.stdout[-3000:] + done.stderr
    (row,) = json.loads((search_dir / "ranking.json").read_text())["ranking"]
    assert row["status"] == "failed" and row["rank"] is None
    assert row["error"].startswith("TrialFailed: exit code 1: FileNotFoundError: unit importance file")
    assert not (search_dir / "chosen.yaml").exists()
